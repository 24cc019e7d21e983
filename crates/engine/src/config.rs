//! Engine configuration, resolved by the caller (the server's `main`) and passed down.

use std::path::PathBuf;
use std::sync::Arc;

use crate::handle::StepObserver;

#[derive(Clone)]
pub struct EngineConfig {
    /// A `.gguf` file or a Hugging Face folder (config.json + *.safetensors + tokenizer.json).
    pub model: PathBuf,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Byte budget of the KV cache (all layers, K and V).
    pub kv_cache_bytes: usize,
    /// Most requests running in one step.
    pub max_num_seqs: usize,
    /// Most tokens in one step's packed forward (decode rows + prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Overrides the model's context length (must not exceed it).
    pub max_model_len: Option<usize>,
    /// Compute threads owned by the engine.
    pub threads: usize,
    /// Most requests waiting for their first step; more are refused with `QueueFull`.
    pub max_queued_requests: usize,
    /// Most distinct LoRA adapters in one step.
    pub max_loras: usize,
    /// Weight format the linear layers are converted to at load (`--quantize`).
    pub quantize: Quantize,
    /// Element type of the KV cache (`--kv-cache-dtype`).
    pub kv_cache_dtype: KvDtype,
    /// How `--quantize act8` multiplies prompt tokens (`--act8-prompts`).
    pub act8_prompts: PromptActs,
    /// Where the forward runs (`--device`).
    pub device: Device,
    /// Compiled CUDA kernels are cached here (by source hash and architecture); `None`
    /// compiles them at every start.
    pub kernel_cache_dir: Option<PathBuf>,
    /// Gets every step's statistics (metrics).
    pub observer: Option<Arc<dyn StepObserver>>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            model: PathBuf::new(),
            block_size: 16,
            kv_cache_bytes: 512 << 20,
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            max_model_len: None,
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            max_queued_requests: 1024,
            max_loras: 8,
            quantize: Quantize::None,
            kv_cache_dtype: KvDtype::F32,
            act8_prompts: PromptActs::Int8,
            device: Device::Cpu,
            kernel_cache_dir: None,
            observer: None,
        }
    }
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("model", &self.model)
            .field("block_size", &self.block_size)
            .field("kv_cache_bytes", &self.kv_cache_bytes)
            .field("max_num_seqs", &self.max_num_seqs)
            .field("max_num_batched_tokens", &self.max_num_batched_tokens)
            .field("max_model_len", &self.max_model_len)
            .field("threads", &self.threads)
            .field("max_queued_requests", &self.max_queued_requests)
            .field("max_loras", &self.max_loras)
            .field("quantize", &self.quantize)
            .field("kv_cache_dtype", &self.kv_cache_dtype)
            .field("act8_prompts", &self.act8_prompts)
            .field("device", &self.device)
            .finish()
    }
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// The first CUDA device; starting fails, saying why, when there is none usable.
    Cuda,
    /// CUDA when a device is usable, else the CPU (and the log says why).
    Auto,
}

impl Device {
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::Auto => "auto",
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            "auto" => Ok(Device::Auto),
            _ => Err(format!("unknown device {s:?} (expected cpu, cuda or auto)")),
        }
    }
}

/// What the KV cache stores. `f32` keeps attention exact (the float32 references are
/// reproduced); `f16` halves the bytes every decode row reads from the cache and the
/// memory per cached token, as llama.cpp's default cache; values are rounded to nearest
/// even when written and widened exactly when read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

impl KvDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }

    /// Bytes per stored value.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(KvDtype::F32),
            "f16" | "float16" | "half" => Ok(KvDtype::F16),
            _ => Err(format!("unknown KV cache dtype {s:?} (expected f32 or f16)")),
        }
    }
}

/// The activations of prompt tokens under `--quantize act8` (generated tokens are INT8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptActs {
    /// INT8 like generated tokens, as llama.cpp (the faster: one integer GEMM per step).
    #[default]
    Int8,
    /// f32, multiplied with the same blocks by the exact kernels: a prompt's prefill is
    /// then the `none` path's, and a step with prompt and generated rows splits them.
    F32,
}

impl PromptActs {
    pub fn as_str(self) -> &'static str {
        match self {
            PromptActs::Int8 => "int8",
            PromptActs::F32 => "f32",
        }
    }
}

impl std::str::FromStr for PromptActs {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "int8" => Ok(PromptActs::Int8),
            "f32" | "float32" => Ok(PromptActs::F32),
            _ => Err(format!("unknown act8 prompt activations {s:?} (expected int8 or f32)")),
        }
    }
}

/// What the linear layers' weights become at load. The embedding table keeps its
/// checkpoint format (it is gathered a row at a time, not multiplied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantize {
    /// As in the checkpoint (GGUF blocks read by the kernels, f32 otherwise).
    #[default]
    None,
    /// Symmetric INT8 per output channel; activations INT8 per token.
    Int8,
    /// FP8 E4M3 with a scale per output channel; f32 activations.
    Fp8,
    /// GGUF Q4_1 blocks kept as they are (other formats to Q8_0 blocks). Generated tokens
    /// multiply INT8 activations (per token, groups of 32: llama.cpp's arithmetic, the
    /// fewest bytes per decode step); prompt tokens multiply f32 activations with the same
    /// blocks (the `none` kernels: exact, and faster for batches on AVX-512).
    Act8,
}

impl Quantize {
    pub fn as_str(self) -> &'static str {
        match self {
            Quantize::None => "none",
            Quantize::Int8 => "int8",
            Quantize::Fp8 => "fp8",
            Quantize::Act8 => "act8",
        }
    }
}

impl std::str::FromStr for Quantize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Quantize::None),
            "int8" => Ok(Quantize::Int8),
            "fp8" => Ok(Quantize::Fp8),
            "act8" => Ok(Quantize::Act8),
            _ => Err(format!("unknown quantization {s:?} (expected none, int8, fp8 or act8)")),
        }
    }
}
