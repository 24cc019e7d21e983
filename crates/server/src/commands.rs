//! `tessera generate` and `tessera bench`: the engine from the command line, no HTTP.

use std::io::Write;
use std::time::Instant;

use clap::Args;
use engine::chat::ChatMessage;
use engine::{Engine, EngineConfig, EngineHandle, GenerateRequest, SamplingParams};

use crate::config::{parse_bytes, resolve_model, ConfigError};

/// Engine flags shared by the offline commands.
#[derive(Debug, Clone, Args)]
pub struct OfflineEngineArgs {
    /// A .gguf file, a Hugging Face folder, or `default`.
    #[arg(long, env = "TESSERA_MODEL", default_value = "default")]
    pub model: String,
    /// Compute threads (default: all cores).
    #[arg(long, env = "TESSERA_THREADS")]
    pub threads: Option<usize>,
    /// KV-cache budget in bytes (suffixes such as 512MiB accepted).
    #[arg(long, env = "TESSERA_KV_CACHE_BYTES", default_value = "512MiB", value_parser = parse_bytes)]
    pub kv_cache_bytes: usize,
    /// Most tokens in one engine step (prefill chunk size for one stream).
    #[arg(long, env = "TESSERA_MAX_NUM_BATCHED_TOKENS", default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// Weight conversion at load: none, int8, fp8 or act8 (as for `serve`).
    #[arg(long, env = "TESSERA_QUANTIZE", default_value = "none")]
    pub quantize: engine::Quantize,
    /// KV cache element type: f32 or f16 (as for `serve`).
    #[arg(long, env = "TESSERA_KV_CACHE_DTYPE", default_value = "f32")]
    pub kv_cache_dtype: engine::KvDtype,
    /// Under act8, prompt tokens' activations: int8 or f32 (as for `serve`).
    #[arg(long, env = "TESSERA_ACT8_PROMPTS", default_value = "int8")]
    pub act8_prompts: engine::PromptActs,
    /// Where the model runs: cpu, cuda or auto (as for `serve`).
    #[arg(long, env = "TESSERA_DEVICE", default_value = "auto")]
    pub device: engine::Device,
}

impl OfflineEngineArgs {
    /// Offline commands keep stderr for their own report.
    pub fn log_level(&self) -> &'static str {
        "warn"
    }

    fn start(&self) -> Result<EngineHandle, ConfigError> {
        if self.threads == Some(0) {
            return Err(ConfigError("--threads must be at least 1".into()));
        }
        let model = resolve_model(&self.model)?;
        let cfg = EngineConfig {
            model,
            threads: self.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            kv_cache_bytes: self.kv_cache_bytes,
            max_num_batched_tokens: self.max_num_batched_tokens.max(1),
            quantize: self.quantize,
            kv_cache_dtype: self.kv_cache_dtype,
            act8_prompts: self.act8_prompts,
            device: self.device,
            ..EngineConfig::default()
        };
        Engine::start(cfg).map_err(|e| ConfigError(e.to_string()))
    }
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub engine: OfflineEngineArgs,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as one user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Also print model and KV-cache facts.
    #[arg(long)]
    pub verbose: bool,
}

/// Streams the completion to stdout, then prompt and decode speed to stderr.
pub fn generate(args: GenerateArgs) -> Result<(), ConfigError> {
    let h = args.engine.start()?;
    let tok = h.tokenizer().clone();
    let text = if args.chat {
        let tpl = h.chat_template().ok_or_else(|| ConfigError("--chat: the model has no chat template".into()))?;
        tpl.render(&[ChatMessage { role: "user".into(), content: args.prompt.clone() }], true).map_err(|e| ConfigError(e.to_string()))?
    } else {
        args.prompt.clone()
    };
    let ids = tok.encode(&text, !args.chat && tok.add_bos_default()).map_err(|e| ConfigError(e.to_string()))?;
    if args.verbose {
        let info = h.info();
        let mc = h.model_config();
        eprintln!(
            "model {}: vocab {}, context {}, {} layers, {} query heads / {} KV heads of {} ({})",
            info.name,
            info.vocab_size,
            info.max_model_len,
            mc.num_layers,
            mc.num_heads,
            mc.num_kv_heads,
            mc.head_dim,
            match mc.num_kv_heads {
                1 => "MQA".to_string(),
                n if n == mc.num_heads => "MHA".to_string(),
                n => format!("GQA, {} query heads per KV head", mc.num_heads / n),
            }
        );
        eprintln!(
            "KV cache: {} bytes per token of context; {} blocks of {} tokens, {} tokens of context in all",
            info.kv_bytes_per_token, info.num_blocks, info.block_size, info.kv_cache_tokens
        );
        if info.window_tokens > 0 {
            eprintln!(
                "  + sliding-window layers: {} bytes per token, only the last {} tokens of each request kept",
                info.window_kv_bytes_per_token, info.window_tokens
            );
        }
    }
    let params = SamplingParams { max_tokens: args.max_tokens, temperature: args.temperature, top_p: args.top_p, seed: args.seed, ..Default::default() };
    let t0 = Instant::now();
    let rx = h.submit(GenerateRequest { prompt_ids: ids.clone(), params, adapter: None }).map_err(|e| ConfigError(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    let (r, reason) = engine::bench::timed(rx, t0, ids.len(), |ev| {
        let _ = out.write_all(ev.text.as_bytes());
        let _ = out.flush();
    });
    let _ = writeln!(out);
    eprintln!(
        "prompt: {} tokens in {:.3} s ({:.1} tokens/s); decode: {} tokens in {:.3} s ({:.1} tokens/s); finish: {}",
        r.prompt_tokens,
        r.ttft_s,
        r.prompt_tps,
        r.decode_tokens,
        r.total_s - r.ttft_s,
        r.decode_tps,
        reason.map_or("none", |r| r.as_str()),
    );
    h.shutdown();
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub engine: OfflineEngineArgs,
    /// Prompt lengths to measure.
    #[arg(long, num_args = 1.., default_values_t = [128usize, 512])]
    pub prompt_tokens: Vec<usize>,
    /// Tokens generated per run.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Runs per prompt length; the mean is reported, as llama-bench does.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
}

/// Single-stream prompt and decode speed, one JSON line per prompt length.
pub fn bench(args: BenchArgs) -> Result<(), ConfigError> {
    let h = args.engine.start()?;
    let seed = h
        .tokenizer()
        .encode("The GNU General Public License is a free, copyleft license for software and other kinds of works.", false)
        .map_err(|e| ConfigError(e.to_string()))?;
    // Warm-up (threads, page faults).
    engine::bench::single_stream(&h, &seed, 32, 8).map_err(|e| ConfigError(e.to_string()))?;
    for &p in &args.prompt_tokens {
        let mut runs = Vec::new();
        for _ in 0..args.repeat.max(1) {
            runs.push(engine::bench::single_stream(&h, &seed, p, args.decode_tokens).map_err(|e| ConfigError(e.to_string()))?);
        }
        let mean = |f: &dyn Fn(&engine::bench::SpeedReport) -> f64| runs.iter().map(f).sum::<f64>() / runs.len() as f64;
        let line = serde_json::json!({
            "model": h.info().name,
            "threads": args.engine.threads,
            "quantize": args.engine.quantize.as_str(),
            "kv_cache_dtype": args.engine.kv_cache_dtype.as_str(),
            "act8_prompts": args.engine.act8_prompts.as_str(),
            "device": args.engine.device.as_str(),
            "prompt_tokens": p,
            "decode_tokens": args.decode_tokens,
            "repeat": runs.len(),
            "prompt_tokens_per_s": mean(&|r| r.prompt_tps),
            "decode_tokens_per_s": mean(&|r| r.decode_tps),
            "ttft_s": mean(&|r| r.ttft_s),
            // The decode roofline: weights read per step, and at what rate they were read.
            "weight_bytes_per_token": h.info().weight_bytes,
            "weight_read_gb_per_s": h.info().weight_bytes as f64 * mean(&|r| r.decode_tps) / 1e9,
        });
        println!("{line}");
    }
    h.shutdown();
    Ok(())
}
