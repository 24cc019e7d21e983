//! The adapter registry: names -> immutable, reference-counted LoRA adapters.
//!
//! Reading, validating and converting an adapter ([`load_adapter`]) happens in the
//! caller's thread with no lock held, never on the engine thread; the registry lock only
//! guards the swap of an `Arc`. A request holds the `Arc` of the version it started with,
//! so replacing or unloading a name never disturbs it.
//!
//! ```text
//! load(name, path)   resolve the path (run time: under --lora-root) ─► load_adapter (no lock)
//!                    ─► lock: insert, or replace when asked ─► evict idle LRU past max_cpu_loras
//! lookup(name)       Ready(Arc) | Evicted (reload() reads it back from disk) | Unknown
//! unload(name)       entry removed; requests holding the Arc run to their end
//! ```
//!
//! Eviction drops the registry's `Arc` of an *idle* adapter (the registry holds the only
//! strong reference); the entry stays, with its path, and the next request reloads it.
//! An adapter in use is never evicted: when every resident adapter is in use the registry
//! holds more than `max_cpu_loras` until some become idle.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::lora::{load_adapter, LoadOptions, LoraAdapter};
use crate::model::ModelConfig;
use crate::EngineError;

/// The files of a PEFT adapter folder; each must resolve under the root too.
const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];
/// Longest adapter name.
pub const MAX_NAME_LEN: usize = 256;

/// Why the registry refused; the registry is unchanged after any of these.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdapterError {
    /// A bad name or path, or an adapter refused by validation; `param` names the field.
    #[error("{message}")]
    Invalid { param: &'static str, message: String },
    #[error("The lora adapter '{0}' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True.")]
    AlreadyLoaded(String),
    #[error("The lora adapter '{0}' cannot be found.")]
    NotFound(String),
    /// A known adapter that was evicted from memory can no longer be read from its path.
    #[error("the lora adapter '{name}' was evicted from memory and could not be reloaded: {message}")]
    Reload { name: String, message: String },
}

fn invalid(param: &'static str, message: impl Into<String>) -> AdapterError {
    AdapterError::Invalid { param, message: message.into() }
}

fn refused(e: EngineError) -> AdapterError {
    match e {
        EngineError::Adapter(m) => invalid("lora_path", m),
        other => invalid("lora_path", other.to_string()),
    }
}

/// How the registry is configured (from the server's flags).
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// `--max-lora-rank`: adapters of a larger rank are refused.
    pub max_rank: usize,
    /// `--max-cpu-loras`: adapters held in memory before idle ones are evicted.
    pub max_cpu_loras: usize,
    /// `--lora-root`: run-time load paths must resolve under it; `None` disables run-time loading.
    pub root: Option<PathBuf>,
    /// Names an adapter may not take (the served base model's).
    pub reserved_names: Vec<String>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions { max_rank: 64, max_cpu_loras: 32, root: None, reserved_names: Vec::new() }
    }
}

/// Where a load comes from, which decides the path rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `--lora NAME=PATH`: any path the operator gives (relative to the working directory).
    Startup,
    /// The load endpoint: the path must resolve under the root (relative paths are relative to it).
    Runtime,
}

/// One load.
#[derive(Debug, Clone, Copy)]
pub struct LoadSpec<'a> {
    pub name: &'a str,
    pub path: &'a str,
    pub origin: Origin,
    /// Replace an adapter of the same name (`load_inplace`); otherwise that is refused.
    pub replace: bool,
}

/// What the registry reports about one adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    pub name: String,
    /// Canonical path of the adapter folder.
    pub path: PathBuf,
    /// Largest rank of its layers.
    pub rank: usize,
    /// Bytes of weights (of the last version read, when evicted).
    pub bytes: usize,
    /// False when evicted: the next request reads it back from `path`.
    pub in_memory: bool,
}

/// The result of a successful load.
#[derive(Debug, Clone)]
pub struct LoadOutcome {
    pub info: AdapterInfo,
    /// An adapter of that name was replaced.
    pub replaced: bool,
    /// Names evicted from memory to make room.
    pub evicted: Vec<String>,
    /// Resolving, reading, validating and converting.
    pub elapsed: Duration,
}

/// The adapter a request names.
#[derive(Debug, Clone)]
pub enum Lookup {
    Ready(Arc<LoraAdapter>),
    /// Known, not in memory: [`AdapterRegistry::reload`] (blocking) brings it back.
    Evicted,
    Unknown,
}

struct Entry {
    path: PathBuf,
    /// Loaded at run time: its path must still resolve under the root when reloaded.
    confined: bool,
    adapter: Option<Arc<LoraAdapter>>,
    /// Changes with every (re)placement; a reload of an older one is thrown away.
    generation: u64,
    last_use: u64,
    rank: usize,
    bytes: usize,
}

impl Entry {
    fn info(&self, name: &str) -> AdapterInfo {
        AdapterInfo { name: name.to_string(), path: self.path.clone(), rank: self.rank, bytes: self.bytes, in_memory: self.adapter.is_some() }
    }
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// Logical clock of uses (LRU order).
    tick: u64,
    next_generation: u64,
}

impl Inner {
    fn tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    /// Drops the registry's reference to idle adapters, least recently used first, until at
    /// most `max` are resident; never `keep`, never one a request holds.
    fn evict(&mut self, max: usize, keep: &str) -> Vec<String> {
        let mut evicted = Vec::new();
        while self.entries.values().filter(|e| e.adapter.is_some()).count() > max {
            let victim = self
                .entries
                .iter()
                .filter(|(n, e)| n.as_str() != keep && e.adapter.as_ref().is_some_and(|a| Arc::strong_count(a) == 1))
                .min_by_key(|(_, e)| e.last_use)
                .map(|(n, _)| n.clone());
            let Some(name) = victim else { break };
            if let Some(e) = self.entries.get_mut(&name) {
                e.adapter = None;
            }
            evicted.push(name);
        }
        evicted
    }
}

/// Names -> adapters; `Send + Sync`, shared by the HTTP handlers.
pub struct AdapterRegistry {
    base: ModelConfig,
    opts: RegistryOptions,
    inner: Mutex<Inner>,
}

impl AdapterRegistry {
    /// `opts.root` is canonicalized here (a root that does not exist refuses every run-time load).
    pub fn new(base: ModelConfig, mut opts: RegistryOptions) -> Self {
        opts.root = opts.root.map(|r| r.canonicalize().unwrap_or(r));
        opts.max_cpu_loras = opts.max_cpu_loras.max(1);
        AdapterRegistry { base, opts, inner: Mutex::new(Inner::default()) }
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.opts
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The guarded data stays consistent across a panic (every update is one assignment).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load_options(&self) -> LoadOptions {
        LoadOptions { max_rank: self.opts.max_rank }
    }

    /// Reads, validates and registers an adapter (blocking: call it off the async runtime).
    /// Nothing changes unless it succeeds.
    pub fn load(&self, spec: LoadSpec<'_>) -> Result<LoadOutcome, AdapterError> {
        let started = Instant::now();
        self.check_name(spec.name)?;
        if !spec.replace && self.lock().entries.contains_key(spec.name) {
            return Err(AdapterError::AlreadyLoaded(spec.name.to_string()));
        }
        let path = match spec.origin {
            Origin::Runtime => self.resolve_runtime(spec.path)?,
            Origin::Startup => resolve_startup(spec.path)?,
        };
        let adapter = Arc::new(load_adapter(spec.name, &path, &self.base, self.load_options()).map_err(refused)?);
        let mut inner = self.lock();
        let replaced = inner.entries.contains_key(spec.name);
        if replaced && !spec.replace {
            return Err(AdapterError::AlreadyLoaded(spec.name.to_string()));
        }
        let (last_use, generation) = (inner.tick(), inner.generation());
        let entry = Entry {
            path,
            confined: spec.origin == Origin::Runtime,
            rank: adapter.max_rank,
            bytes: adapter.bytes,
            adapter: Some(adapter),
            generation,
            last_use,
        };
        let info = entry.info(spec.name);
        inner.entries.insert(spec.name.to_string(), entry);
        let evicted = inner.evict(self.opts.max_cpu_loras, spec.name);
        Ok(LoadOutcome { info, replaced, evicted, elapsed: started.elapsed() })
    }

    /// Forgets an adapter; requests that hold it run to their end.
    pub fn unload(&self, name: &str) -> Result<AdapterInfo, AdapterError> {
        let mut inner = self.lock();
        match inner.entries.remove(name) {
            Some(e) => Ok(e.info(name)),
            None => Err(AdapterError::NotFound(name.to_string())),
        }
    }

    /// The adapter a request names; counts as a use (LRU).
    pub fn lookup(&self, name: &str) -> Lookup {
        let mut inner = self.lock();
        let tick = inner.tick();
        match inner.entries.get_mut(name) {
            None => Lookup::Unknown,
            Some(e) => {
                e.last_use = tick;
                match &e.adapter {
                    Some(a) => Lookup::Ready(a.clone()),
                    None => Lookup::Evicted,
                }
            }
        }
    }

    /// The adapter, read back from disk if it was evicted (blocking: call it off the async
    /// runtime). Unloaded meanwhile: `NotFound`; replaced meanwhile: the new version.
    pub fn reload(&self, name: &str) -> Result<Arc<LoraAdapter>, AdapterError> {
        for _ in 0..4 {
            let (path, confined, generation) = {
                let mut inner = self.lock();
                let tick = inner.tick();
                let e = inner.entries.get_mut(name).ok_or_else(|| AdapterError::NotFound(name.to_string()))?;
                e.last_use = tick;
                if let Some(a) = &e.adapter {
                    return Ok(a.clone());
                }
                (e.path.clone(), e.confined, e.generation)
            };
            let reload_err = |message: String| AdapterError::Reload { name: name.to_string(), message };
            let path = if confined { self.resolve_runtime(&path.to_string_lossy()).map_err(|e| reload_err(e.to_string()))? } else { path };
            let adapter = Arc::new(load_adapter(name, &path, &self.base, self.load_options()).map_err(|e| reload_err(e.to_string()))?);
            let mut inner = self.lock();
            let tick = inner.tick();
            let e = inner.entries.get_mut(name).ok_or_else(|| AdapterError::NotFound(name.to_string()))?;
            if e.generation != generation {
                continue;
            }
            if let Some(a) = &e.adapter {
                return Ok(a.clone());
            }
            e.last_use = tick;
            (e.rank, e.bytes) = (adapter.max_rank, adapter.bytes);
            e.adapter = Some(adapter.clone());
            let evicted = inner.evict(self.opts.max_cpu_loras, name);
            if !evicted.is_empty() {
                tracing::info!(adapter = name, ?evicted, "evicted idle adapters from memory");
            }
            return Ok(adapter);
        }
        Err(AdapterError::Reload { name: name.to_string(), message: "it was replaced while being read; retry".into() })
    }

    /// Every adapter, by name.
    pub fn list(&self) -> Vec<AdapterInfo> {
        let inner = self.lock();
        let mut v: Vec<AdapterInfo> = inner.entries.iter().map(|(n, e)| e.info(n)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Adapter names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().entries.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check_name(&self, name: &str) -> Result<(), AdapterError> {
        if name.trim().is_empty() {
            return Err(invalid("lora_name", "lora_name is empty"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(invalid("lora_name", format!("lora_name is longer than {MAX_NAME_LEN} bytes")));
        }
        if name.chars().any(|c| c == ',' || c.is_control()) {
            return Err(invalid(
                "lora_name",
                format!("lora_name {name:?} must not contain commas or control characters (tessera:lora_requests_info joins names with commas)"),
            ));
        }
        if self.opts.reserved_names.iter().any(|r| r == name) {
            return Err(invalid("lora_name", format!("lora_name `{name}` is the name of the served base model; choose another")));
        }
        Ok(())
    }

    /// A run-time `lora_path`, checked against the root.
    fn resolve_runtime(&self, given: &str) -> Result<PathBuf, AdapterError> {
        match &self.opts.root {
            Some(root) => resolve_under_root(root, given),
            None => Err(invalid(
                "lora_path",
                "loading adapters at run time is disabled: start the server with --lora-root DIR (adapters given with --lora at start-up need no root)",
            )),
        }
    }
}

/// A `--lora` path: anything that exists, relative to the working directory.
fn resolve_startup(given: &str) -> Result<PathBuf, AdapterError> {
    if given.is_empty() {
        return Err(invalid("lora_path", "the adapter path is empty"));
    }
    Path::new(given).canonicalize().map_err(|e| invalid("lora_path", format!("adapter folder {given}: {e}")))
}

/// Resolves a run-time `lora_path` under `root` (canonical). Relative paths are taken
/// relative to the root; a path with a `..` component is refused outright; the folder,
/// with every symlink followed, must lie under the root, and so must the adapter files in
/// it (a symlinked `adapter_model.safetensors` may not point out either).
pub fn resolve_under_root(root: &Path, given: &str) -> Result<PathBuf, AdapterError> {
    if given.is_empty() {
        return Err(invalid("lora_path", "lora_path is empty"));
    }
    let p = Path::new(given);
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(invalid("lora_path", format!("lora_path {given} contains `..`; give a folder under --lora-root {}", root.display())));
    }
    let joined = if p.is_absolute() { p.to_path_buf() } else { root.join(p) };
    let outside = |what: &str, resolved: &Path| {
        invalid(
            "lora_path",
            format!(
                "lora_path {given}: {what} resolves to {}, outside --lora-root {}; only adapters under the root may be loaded",
                resolved.display(),
                root.display()
            ),
        )
    };
    let canon = match joined.canonicalize() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid("lora_path", format!("lora_path {given}: no such adapter folder ({} does not exist)", joined.display())));
        }
        Err(e) => return Err(invalid("lora_path", format!("lora_path {given}: {e}"))),
    };
    if !canon.starts_with(root) {
        return Err(outside("the folder", &canon));
    }
    if !canon.is_dir() {
        return Err(invalid(
            "lora_path",
            format!("lora_path {given} is not a folder (a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors)"),
        ));
    }
    for f in ADAPTER_FILES {
        let file = canon.join(f);
        if file.symlink_metadata().is_err() {
            continue; // missing: load_adapter says which file
        }
        match file.canonicalize() {
            Ok(c) if !c.starts_with(root) => return Err(outside(f, &c)),
            Ok(_) => {}
            Err(e) => return Err(invalid("lora_path", format!("lora_path {given}: {f}: {e}"))),
        }
    }
    Ok(canon)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RopeScaling;
    use candle_core::{Device, Tensor};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn tiny() -> ModelConfig {
        ModelConfig {
            name: "tiny".into(),
            hidden_size: 8,
            intermediate_size: 16,
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            vocab_size: 32,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            rope_interleaved: false,
            max_position_embeddings: 64,
            variant: crate::model::Variant::llama(2, 4),
        }
    }

    /// A fresh, empty temp folder.
    fn temp(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!("tessera-adapters-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.canonicalize().unwrap()
    }

    /// A rank-`r` adapter of q_proj for the tiny model.
    fn write_adapter(dir: &Path, r: usize) {
        std::fs::create_dir_all(dir).unwrap();
        let mut t = HashMap::new();
        for l in 0..2 {
            let key = format!("base_model.model.model.layers.{l}.self_attn.q_proj");
            t.insert(format!("{key}.lora_A.weight"), Tensor::ones((r, 8), candle_core::DType::F32, &Device::Cpu).unwrap());
            t.insert(format!("{key}.lora_B.weight"), Tensor::ones((8, r), candle_core::DType::F32, &Device::Cpu).unwrap());
        }
        candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).unwrap();
        let cfg = serde_json::json!({"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["q_proj"], "bias": "none"});
        std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    }

    fn registry(root: Option<&Path>, max_cpu_loras: usize) -> AdapterRegistry {
        let opts = RegistryOptions { max_rank: 8, max_cpu_loras, root: root.map(Path::to_path_buf), reserved_names: vec!["tiny".into()] };
        AdapterRegistry::new(tiny(), opts)
    }

    fn load(r: &AdapterRegistry, name: &str, path: &str, replace: bool) -> Result<LoadOutcome, AdapterError> {
        r.load(LoadSpec { name, path, origin: Origin::Runtime, replace })
    }

    fn ready(r: &AdapterRegistry, name: &str) -> Arc<LoraAdapter> {
        match r.lookup(name) {
            Lookup::Ready(a) => a,
            other => panic!("{name}: {other:?}"),
        }
    }

    fn resident(r: &AdapterRegistry) -> Vec<String> {
        r.list().into_iter().filter(|i| i.in_memory).map(|i| i.name).collect()
    }

    fn message(e: AdapterError) -> String {
        match e {
            AdapterError::Invalid { param: "lora_path", message } => message,
            other => panic!("expected a lora_path refusal, got {other:?}"),
        }
    }

    #[test]
    fn runtime_paths_must_resolve_under_the_root() {
        let (root, outside) = (temp("root"), temp("outside"));
        write_adapter(&root.join("good"), 2);
        write_adapter(&outside.join("evil"), 2);
        std::os::unix::fs::symlink(outside.join("evil"), root.join("link-out")).unwrap();
        std::os::unix::fs::symlink(root.join("good"), root.join("link-in")).unwrap();
        let files = root.join("file-link");
        std::fs::create_dir_all(&files).unwrap();
        std::fs::copy(root.join("good/adapter_config.json"), files.join("adapter_config.json")).unwrap();
        std::os::unix::fs::symlink(outside.join("evil/adapter_model.safetensors"), files.join("adapter_model.safetensors")).unwrap();
        std::fs::write(root.join("plain-file"), b"x").unwrap();

        assert_eq!(resolve_under_root(&root, "good").unwrap(), root.join("good"));
        assert_eq!(resolve_under_root(&root, root.join("good").to_str().unwrap()).unwrap(), root.join("good"));
        assert_eq!(resolve_under_root(&root, "link-in").unwrap(), root.join("good"), "a symlink that stays inside is fine");
        let refused = |given: &str| message(resolve_under_root(&root, given).unwrap_err());
        assert!(refused("../outside/evil").contains(".."));
        assert!(refused("good/../good").contains(".."), "`..` is refused even when it would stay inside");
        assert!(refused(outside.join("evil").to_str().unwrap()).contains("outside --lora-root"));
        assert!(refused("link-out").contains("outside --lora-root"));
        let f = refused("file-link");
        assert!(f.contains("adapter_model.safetensors") && f.contains("outside --lora-root"), "{f}");
        assert!(refused("missing").contains("no such adapter folder"));
        assert!(refused("plain-file").contains("not a folder"));
        assert!(refused("").contains("empty"));

        let r = registry(Some(&root), 4);
        assert!(load(&r, "ok", "good", false).is_ok());
        assert!(message(load(&r, "bad", "link-out", false).unwrap_err()).contains("outside"));
        assert_eq!(r.names(), ["ok"]);
        for d in [root, outside] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn runtime_loading_is_disabled_without_a_root_but_startup_loads_work() {
        let dir = temp("noroot");
        write_adapter(&dir.join("a"), 2);
        let r = registry(None, 4);
        let path = dir.join("a");
        let e = message(load(&r, "a", path.to_str().unwrap(), false).unwrap_err());
        assert!(e.contains("--lora-root"), "{e}");
        let out = r.load(LoadSpec { name: "a", path: path.to_str().unwrap(), origin: Origin::Startup, replace: false }).unwrap();
        assert_eq!((out.info.rank, out.info.in_memory, out.replaced), (2, true, false));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn lru_evicts_idle_adapters_only_and_evicted_ones_reload() {
        let root = temp("lru");
        write_adapter(&root.join("ad"), 2);
        let r = registry(Some(&root), 2);
        load(&r, "a", "ad", false).unwrap();
        load(&r, "b", "ad", false).unwrap();
        let held_a = ready(&r, "a"); // a request holds `a`; `b` is now the least recently used
        let out = load(&r, "c", "ad", false).unwrap();
        assert_eq!(out.evicted, ["b"]);
        assert_eq!(resident(&r), ["a", "c"]);
        assert!(matches!(r.lookup("b"), Lookup::Evicted));
        let info_b = r.list().into_iter().find(|i| i.name == "b").unwrap();
        assert_eq!((info_b.rank, info_b.in_memory), (2, false), "an evicted adapter keeps its listing");
        drop(held_a);
        // Reloading b makes room by evicting the least recently used idle one: a (c was loaded after a's use).
        let b = r.reload("b").unwrap();
        assert_eq!(resident(&r), ["b", "c"]);
        // Every resident one in use: the registry goes over the limit rather than evict one.
        let c = ready(&r, "c");
        let a = r.reload("a").unwrap();
        assert_eq!(resident(&r), ["a", "b", "c"]);
        drop((a, b, c));
        load(&r, "d", "ad", false).unwrap();
        assert_eq!(resident(&r).len(), 2);
        assert!(matches!(r.lookup("nope"), Lookup::Unknown));
        assert_eq!(r.reload("nope").unwrap_err(), AdapterError::NotFound("nope".into()));
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn replace_and_unload_leave_held_versions_alone() {
        let root = temp("swap");
        write_adapter(&root.join("r2"), 2);
        write_adapter(&root.join("r4"), 4);
        let r = registry(Some(&root), 4);
        load(&r, "x", "r2", false).unwrap();
        let v1 = ready(&r, "x");
        assert_eq!(load(&r, "x", "r4", false).unwrap_err(), AdapterError::AlreadyLoaded("x".into()));
        assert_eq!(ready(&r, "x").id, v1.id, "a refused load changes nothing");
        let out = load(&r, "x", "r4", true).unwrap();
        assert!(out.replaced);
        let v2 = ready(&r, "x");
        assert_ne!(v1.id, v2.id);
        assert_eq!((v1.max_rank, v2.max_rank), (2, 4), "the held version is untouched; new lookups see the new one");
        r.unload("x").unwrap();
        assert!(matches!(r.lookup("x"), Lookup::Unknown));
        assert_eq!(r.unload("x").unwrap_err(), AdapterError::NotFound("x".into()));
        assert_eq!(v2.max_rank, 4, "unloading does not touch a held adapter");
        // load_inplace of a new name just loads it.
        assert!(!load(&r, "y", "r2", true).unwrap().replaced);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn refused_loads_leave_the_registry_unchanged() {
        let root = temp("refuse");
        write_adapter(&root.join("good"), 2);
        write_adapter(&root.join("rank16"), 16);
        std::fs::create_dir_all(root.join("empty")).unwrap();
        let r = registry(Some(&root), 4);
        load(&r, "x", "good", false).unwrap();
        let before = (r.list(), ready(&r, "x").id);
        let e = message(load(&r, "x", "rank16", true).unwrap_err());
        assert!(e.contains("--max-lora-rank"), "{e}");
        assert!(message(load(&r, "y", "empty", false).unwrap_err()).contains("adapter_config.json"));
        assert!(message(load(&r, "y", "missing", false).unwrap_err()).contains("no such"));
        assert_eq!((r.list(), ready(&r, "x").id), before);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn names_are_checked() {
        let root = temp("names");
        write_adapter(&root.join("good"), 2);
        let r = registry(Some(&root), 4);
        for (name, want) in [("", "empty"), ("a,b", "commas"), ("tiny", "served base model"), ("a\nb", "control")] {
            match load(&r, name, "good", false).unwrap_err() {
                AdapterError::Invalid { param: "lora_name", message } => assert!(message.contains(want), "{name:?}: {message}"),
                other => panic!("{name:?}: {other:?}"),
            }
        }
        assert!(r.is_empty());
        std::fs::remove_dir_all(root).unwrap();
    }
}
