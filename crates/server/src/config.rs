//! Command line (clap, each flag with a `TESSERA_*` environment fallback) -> one
//! [`ServeConfig`], checked across fields at start-up with messages that name the flags.
//! `main` parses; nothing below it reads the environment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use engine::EngineConfig;

use crate::state::{LoraOptions, ServerOptions};

/// The default model file, as `scripts/fetch-model` names it.
pub const DEFAULT_MODEL_FILE: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, Parser)]
#[command(
    name = "tessera",
    version,
    about = "tessera: a low-latency LLM inference server"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a model behind the OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Generate from one prompt on the command line; prints prompt and decode speed.
    Generate(crate::commands::GenerateArgs),
    /// Single-stream prompt and decode speed (JSON lines).
    Bench(crate::commands::BenchArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// A .gguf file, a Hugging Face folder, or `default` (SmolLM2-135M-Instruct Q4_1,
    /// fetched by scripts/fetch-model when it is not in ./models).
    #[arg(long, env = "TESSERA_MODEL", default_value = "default")]
    pub model: String,
    /// Address to listen on.
    #[arg(long, env = "TESSERA_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, env = "TESSERA_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Model name clients use (default: the model's own name).
    #[arg(long, env = "TESSERA_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer <KEY>` on /v1/* routes.
    #[arg(long, env = "TESSERA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Most requests waiting for their first step; more get 429.
    #[arg(long, env = "TESSERA_MAX_QUEUED_REQUESTS", default_value_t = 1024)]
    pub max_queued_requests: usize,
    /// Most requests running in one engine step.
    #[arg(long, env = "TESSERA_MAX_NUM_SEQS", default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Most tokens in one engine step (decode rows + prefill chunks).
    #[arg(long, env = "TESSERA_MAX_NUM_BATCHED_TOKENS", default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// Context length limit (default: the model's).
    #[arg(long, env = "TESSERA_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Tokens per KV-cache block.
    #[arg(long, env = "TESSERA_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// KV-cache budget in bytes; suffixes such as 512MiB, 2GiB, 1.5GB are accepted.
    #[arg(long, env = "TESSERA_KV_CACHE_BYTES", default_value = "512MiB", value_parser = parse_bytes)]
    pub kv_cache_bytes: usize,
    /// Compute threads of the engine (default: all cores).
    #[arg(long, env = "TESSERA_THREADS")]
    pub threads: Option<usize>,
    /// Convert the linear layers' weights at load: none (keep the checkpoint's format),
    /// int8 (per-channel INT8 weights, per-token INT8 activations), fp8 (E4M3 weights
    /// with per-channel scales) or act8 (Q4_1 blocks kept, other formats to Q8_0 blocks;
    /// INT8 activations as llama.cpp).
    #[arg(long, env = "TESSERA_QUANTIZE", default_value = "none")]
    pub quantize: engine::Quantize,
    /// Under act8, prompt tokens' activations: int8 (as generated tokens; the fastest
    /// prefill) or f32 (the exact kernels on the same blocks: a prompt's prefill is the
    /// unquantized one, at about two thirds of the speed).
    #[arg(long, env = "TESSERA_ACT8_PROMPTS", default_value = "int8")]
    pub act8_prompts: engine::PromptActs,
    /// What the KV cache stores: f32 (exact attention) or f16 (half the cache bytes read
    /// per decode row and stored per token, as llama.cpp's default). The CUDA backend
    /// keeps f32.
    #[arg(long, env = "TESSERA_KV_CACHE_DTYPE", default_value = "f32")]
    pub kv_cache_dtype: engine::KvDtype,
    /// Where the model runs: cpu, cuda (fails at start, saying why, without a usable
    /// device) or auto (CUDA when this build has it and a device is usable, else CPU).
    #[arg(long, env = "TESSERA_DEVICE", default_value = "auto")]
    pub device: engine::Device,
    /// Folder where compiled CUDA kernels are cached (default: compile at every start).
    #[arg(long, env = "TESSERA_KERNEL_CACHE_DIR")]
    pub kernel_cache_dir: Option<PathBuf>,
    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT before aborting them.
    #[arg(long, env = "TESSERA_SHUTDOWN_TIMEOUT", default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Largest accepted request body (suffixes accepted, as for --kv-cache-bytes).
    #[arg(long, env = "TESSERA_MAX_BODY_BYTES", default_value = "4MiB", value_parser = parse_bytes)]
    pub max_body_bytes: usize,
    /// Most distinct LoRA adapters in one engine step.
    #[arg(long, env = "TESSERA_MAX_LORAS", default_value_t = 8)]
    pub max_loras: usize,
    /// A LoRA adapter (PEFT folder) to load at start-up, as NAME=PATH; repeatable (the
    /// environment variable takes a comma-separated list). Any path; a bad adapter stops start-up.
    #[arg(long = "lora", env = "TESSERA_LORA", value_name = "NAME=PATH", value_parser = parse_lora, value_delimiter = ',')]
    pub lora: Vec<StartupAdapter>,
    /// Adapters of a larger rank are refused.
    #[arg(long, env = "TESSERA_MAX_LORA_RANK", default_value_t = 64)]
    pub max_lora_rank: usize,
    /// LoRA adapters held in memory; beyond this, idle ones are evicted (least recently
    /// used first) and read back from disk when next requested.
    #[arg(long, env = "TESSERA_MAX_CPU_LORAS", default_value_t = 32)]
    pub max_cpu_loras: usize,
    /// Folder under which every adapter loaded at run time (POST /v1/load_lora_adapter) must
    /// resolve; relative lora_path values are relative to it. Without it, run-time loading is off.
    #[arg(long, env = "TESSERA_LORA_ROOT", value_name = "DIR")]
    pub lora_root: Option<PathBuf>,
    /// Log line format (the level comes from RUST_LOG, default info).
    #[arg(long, env = "TESSERA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// One `--lora NAME=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupAdapter {
    pub name: String,
    pub path: PathBuf,
}

/// `NAME=PATH` -> [`StartupAdapter`].
pub fn parse_lora(s: &str) -> Result<StartupAdapter, String> {
    match s.split_once('=') {
        Some((name, path)) if !name.trim().is_empty() && !path.trim().is_empty() => {
            Ok(StartupAdapter {
                name: name.trim().to_string(),
                path: PathBuf::from(path.trim()),
            })
        }
        _ => Err(format!(
            "`{s}` is not NAME=PATH (for example pirate=/adapters/pirate)"
        )),
    }
}

/// Everything `serve` needs, resolved and checked.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// `host:port` as given (resolved when binding).
    pub listen: String,
    pub server: ServerOptions,
    pub engine: EngineConfig,
    /// `--lora`: loaded after the engine starts, before the server is ready.
    pub adapters: Vec<StartupAdapter>,
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

impl ServeArgs {
    /// Checks the flags against each other; `model` is the resolved model path.
    pub fn into_config(self, model: PathBuf) -> Result<ServeConfig, ConfigError> {
        self.check()?;
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let engine = EngineConfig {
            model,
            block_size: self.block_size,
            kv_cache_bytes: self.kv_cache_bytes,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_model_len: self.max_model_len,
            threads,
            max_queued_requests: self.max_queued_requests,
            max_loras: self.max_loras,
            quantize: self.quantize,
            kv_cache_dtype: self.kv_cache_dtype,
            act8_prompts: self.act8_prompts,
            device: self.device,
            kernel_cache_dir: self.kernel_cache_dir.clone(),
            observer: None,
        };
        let lora_root = self
            .lora_root
            .as_deref()
            .map(canonical_lora_root)
            .transpose()?;
        let server = ServerOptions {
            api_key: self.api_key,
            served_model_name: self.served_model_name,
            max_body_bytes: self.max_body_bytes,
            lora: LoraOptions {
                max_loras: self.max_loras,
                max_lora_rank: self.max_lora_rank,
                max_cpu_loras: self.max_cpu_loras,
                root: lora_root,
            },
        };
        Ok(ServeConfig {
            listen: listen_addr(&self.host, self.port),
            server,
            engine,
            adapters: self.lora,
            shutdown_timeout: Duration::from_secs_f64(self.shutdown_timeout),
            log_format: self.log_format,
        })
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.max_num_seqs == 0 {
            return err("--max-num-seqs must be at least 1");
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            return err(format!(
                "--max-num-batched-tokens ({}) must be at least --max-num-seqs ({}): every running request decodes one token per step",
                self.max_num_batched_tokens, self.max_num_seqs
            ));
        }
        if self.block_size == 0 || self.block_size > 1024 {
            return err(format!(
                "--block-size must be in 1..=1024, got {}",
                self.block_size
            ));
        }
        if self.kv_cache_bytes < 1 << 20 {
            return err(format!(
                "--kv-cache-bytes must be at least 1MiB, got {}",
                self.kv_cache_bytes
            ));
        }
        if self.max_model_len == Some(0) {
            return err("--max-model-len must be at least 1");
        }
        if self.threads == Some(0) {
            return err("--threads must be at least 1");
        }
        if self.max_loras == 0 {
            return err("--max-loras must be at least 1");
        }
        self.check_lora()?;
        if self.max_queued_requests == 0 {
            return err("--max-queued-requests must be at least 1");
        }
        if self.max_body_bytes < 1024 {
            return err(format!(
                "--max-body-bytes must be at least 1KiB, got {}",
                self.max_body_bytes
            ));
        }
        if !(self.shutdown_timeout.is_finite()
            && self.shutdown_timeout >= 0.0
            && self.shutdown_timeout < 1e9)
        {
            return err(format!(
                "--shutdown-timeout must be a number of seconds >= 0, got {}",
                self.shutdown_timeout
            ));
        }
        if self.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            return err("--api-key is empty; leave it out to disable authentication");
        }
        if self
            .served_model_name
            .as_deref()
            .is_some_and(|n| n.trim().is_empty())
        {
            return err("--served-model-name is empty");
        }
        if self.host.trim().is_empty() {
            return err("--host is empty");
        }
        Ok(())
    }
}

impl ServeArgs {
    fn check_lora(&self) -> Result<(), ConfigError> {
        if self.max_lora_rank == 0 {
            return err("--max-lora-rank must be at least 1");
        }
        if self.max_cpu_loras < self.max_loras {
            return err(format!(
                "--max-cpu-loras ({}) must be at least --max-loras ({}): every adapter of a step is held in memory",
                self.max_cpu_loras, self.max_loras
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for a in &self.lora {
            if !seen.insert(a.name.as_str()) {
                return err(format!("--lora: the name `{}` is given twice", a.name));
            }
            if a.name.chars().any(|c| c == ',' || c.is_control()) {
                return err(format!(
                    "--lora {}: adapter names must not contain commas or control characters",
                    a.name
                ));
            }
            if self.served_model_name.as_deref() == Some(a.name.as_str()) {
                return err(format!(
                    "--lora {}: the name is the --served-model-name; choose another",
                    a.name
                ));
            }
        }
        Ok(())
    }
}

/// `--lora-root`: an existing folder, canonical (so symlinks in it are judged by their targets).
fn canonical_lora_root(p: &Path) -> Result<PathBuf, ConfigError> {
    let c = p
        .canonicalize()
        .map_err(|e| ConfigError(format!("--lora-root {}: {e}", p.display())))?;
    if !c.is_dir() {
        return err(format!("--lora-root {} is not a folder", p.display()));
    }
    Ok(c)
}

fn listen_addr(host: &str, port: u16) -> String {
    // A bare IPv6 address needs brackets before the port.
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `512MiB`, `2GiB`, `1.5GB`, `4k`, `1000000` -> bytes (KiB/MiB/GiB binary, kB/MB/GB decimal).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 512MiB, 2GiB, 1000000)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "ki" | "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mi" | "mib" => (1u64 << 20) as f64,
        "g" | "gb" => 1e9,
        "gi" | "gib" => (1u64 << 30) as f64,
        "t" | "tb" => 1e12,
        "ti" | "tib" => (1u64 << 40) as f64,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}` (use B, KiB, MiB, GiB, kB, MB, GB)"
            ))
        }
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 0.0 || bytes > usize::MAX as f64 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(bytes.round() as usize)
}

/// `--model`: a path that must exist, or `default`: ./models/<default file>, else the
/// same under the folders above the executable, else whatever `scripts/fetch-model`
/// (found the same way) prints on its last line.
pub fn resolve_model(model: &str) -> Result<PathBuf, ConfigError> {
    if model != "default" {
        let p = PathBuf::from(model);
        if !p.exists() {
            return err(format!("--model: no such file or folder: {model} (give a .gguf file, a Hugging Face folder or `default`)"));
        }
        return Ok(p);
    }
    let roots = search_roots();
    if let Some(p) = roots
        .iter()
        .map(|r| r.join(DEFAULT_MODEL_FILE))
        .find(|p| p.is_file())
    {
        return Ok(p);
    }
    let Some(script) = roots
        .iter()
        .map(|r| r.join("scripts/fetch-model"))
        .find(|p| p.is_file())
    else {
        return err(format!(
            "--model default: {DEFAULT_MODEL_FILE} is not here and scripts/fetch-model was not found; run tessera from the repository or give --model PATH"
        ));
    };
    fetch_default(&script)
}

fn search_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = std::env::current_dir().into_iter().collect();
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    roots
}

fn fetch_default(script: &Path) -> Result<PathBuf, ConfigError> {
    tracing::info!(script = %script.display(), "fetching the default model");
    let out = std::process::Command::new(script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| {
            ConfigError(format!(
                "--model default: could not run {}: {e}",
                script.display()
            ))
        })?;
    if !out.status.success() {
        return err(format!(
            "--model default: {} failed ({})",
            script.display(),
            out.status
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let p = PathBuf::from(last);
    if last.is_empty() || !p.is_file() {
        return err(format!(
            "--model default: {} printed no model path (last line: `{last}`)",
            script.display()
        ));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
        let argv = ["tessera", "serve"].iter().chain(extra).copied();
        Cli::try_parse_from(argv).map(|c| match c.command {
            Command::Serve(a) => a,
            other => panic!("parsed `serve` as {other:?}"),
        })
    }

    #[test]
    fn sizes_accept_suffixes() {
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes(" 4 KiB "), Ok(4096));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
    }

    #[test]
    fn defaults_parse_and_check() {
        let a = args(&[]).unwrap();
        assert_eq!(a.model, "default");
        assert_eq!(a.kv_cache_bytes, 512 << 20);
        let cfg = a.into_config(PathBuf::from("m.gguf")).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:8000");
        assert_eq!(cfg.server.max_body_bytes, 4 << 20);
        assert_eq!(cfg.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(cfg.engine.act8_prompts, engine::PromptActs::Int8);
    }

    #[test]
    fn act8_prompt_activations_parse() {
        let cfg = args(&["--quantize", "act8", "--act8-prompts", "f32"])
            .unwrap()
            .into_config(PathBuf::from("m.gguf"))
            .unwrap();
        assert_eq!((cfg.engine.quantize, cfg.engine.act8_prompts), (engine::Quantize::Act8, engine::PromptActs::F32));
        let e = args(&["--act8-prompts", "int4"]).unwrap_err().to_string();
        assert!(e.contains("--act8-prompts") && e.contains("int8 or f32"), "{e}");
    }

    #[test]
    fn cross_field_errors_name_the_flags() {
        let e = args(&["--max-num-seqs", "64", "--max-num-batched-tokens", "32"])
            .unwrap()
            .check()
            .unwrap_err();
        assert!(
            e.0.contains("--max-num-batched-tokens") && e.0.contains("--max-num-seqs"),
            "{e}"
        );
        let e = args(&["--api-key", " "]).unwrap().check().unwrap_err();
        assert!(e.0.contains("--api-key"), "{e}");
        assert!(args(&["--kv-cache-bytes", "lots"]).is_err());
        assert!(args(&["--log-format", "xml"]).is_err());
    }

    #[test]
    fn lora_flags_parse_and_check() {
        let a = args(&["--lora", "pirate=/a/p", "--lora", "shout=rel/s"]).unwrap();
        assert_eq!(
            a.lora,
            [
                StartupAdapter {
                    name: "pirate".into(),
                    path: "/a/p".into()
                },
                StartupAdapter {
                    name: "shout".into(),
                    path: "rel/s".into()
                }
            ]
        );
        assert_eq!((a.max_lora_rank, a.max_cpu_loras), (64, 32));
        assert!(args(&["--lora", "nameonly"]).is_err());
        let e = args(&["--max-loras", "8", "--max-cpu-loras", "4"])
            .unwrap()
            .check()
            .unwrap_err();
        assert!(
            e.0.contains("--max-cpu-loras") && e.0.contains("--max-loras"),
            "{e}"
        );
        let e = args(&["--lora", "a=x", "--lora", "a=y"])
            .unwrap()
            .check()
            .unwrap_err();
        assert!(e.0.contains("twice"), "{e}");
        let e = args(&["--served-model-name", "m", "--lora", "m=x"])
            .unwrap()
            .check()
            .unwrap_err();
        assert!(e.0.contains("--served-model-name"), "{e}");
        let e = args(&["--lora-root", "/no/such/root"])
            .unwrap()
            .into_config(PathBuf::from("m.gguf"))
            .unwrap_err();
        assert!(e.0.contains("--lora-root"), "{e}");
        let cfg = args(&["--lora-root", "/tmp", "--max-loras", "2"])
            .unwrap()
            .into_config(PathBuf::from("m.gguf"))
            .unwrap();
        assert_eq!(
            cfg.server.lora.root,
            Some(PathBuf::from("/tmp").canonicalize().unwrap())
        );
        assert_eq!(cfg.server.lora.max_loras, 2);
    }

    #[test]
    fn ipv6_hosts_get_brackets() {
        assert_eq!(listen_addr("::1", 80), "[::1]:80");
        assert_eq!(listen_addr("localhost", 80), "localhost:80");
    }

    #[test]
    fn a_missing_model_path_is_named() {
        let e = resolve_model("/no/such/model.gguf").unwrap_err();
        assert!(
            e.0.contains("--model") && e.0.contains("/no/such/model.gguf"),
            "{e}"
        );
    }
}
