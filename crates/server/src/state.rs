//! The router's state: the backend and its adapter registry once loaded, the draining
//! flag, the in-flight count.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use engine::adapters::{AdapterRegistry, RegistryOptions};

use crate::backend::Backend;
use crate::error::ApiError;
use crate::metrics::{Metrics, ModelMetrics};

/// What the HTTP layer is configured with (from `main`'s flags).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Bearer token required on `/v1/*` when set.
    pub api_key: Option<String>,
    /// Overrides the model's own name in `/v1/models` and responses.
    pub served_model_name: Option<String>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    pub lora: LoraOptions,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            api_key: None,
            served_model_name: None,
            max_body_bytes: 4 << 20,
            lora: LoraOptions::default(),
        }
    }
}

/// The LoRA flags the HTTP layer needs (the adapter registry's and the metrics').
#[derive(Debug, Clone)]
pub struct LoraOptions {
    /// `--max-loras` (the engine's limit; shown as `max_lora` in `tessera:lora_requests_info`).
    pub max_loras: usize,
    /// `--max-lora-rank`.
    pub max_lora_rank: usize,
    /// `--max-cpu-loras`.
    pub max_cpu_loras: usize,
    /// `--lora-root`, canonical; `None`: adapters can only be given at start-up.
    pub root: Option<PathBuf>,
}

impl Default for LoraOptions {
    fn default() -> Self {
        LoraOptions {
            max_loras: 8,
            max_lora_rank: 64,
            max_cpu_loras: 32,
            root: None,
        }
    }
}

/// The loaded model as the handlers see it.
pub struct Loaded {
    pub backend: Arc<dyn Backend>,
    /// The name clients must use (listed first by `/v1/models`).
    pub served_name: String,
    pub metrics: Arc<ModelMetrics>,
    /// LoRA adapters by name; a request's `model` may name one.
    pub adapters: Arc<AdapterRegistry>,
}

/// Cheap to clone; shared by every handler.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    opts: ServerOptions,
    metrics: Arc<Metrics>,
    loaded: OnceLock<Loaded>,
    draining: AtomicBool,
    inflight: AtomicUsize,
    /// Unix time the server started (the `created` of the model card).
    started: u64,
}

impl AppState {
    /// A state with no backend yet: `/ready` answers 503 until [`Self::set_backend`].
    pub fn new(opts: ServerOptions, metrics: Arc<Metrics>) -> Self {
        let inner = Inner {
            opts,
            metrics,
            loaded: OnceLock::new(),
            draining: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            started: unix_now(),
        };
        AppState {
            inner: Arc::new(inner),
        }
    }

    /// A state serving `backend` at once.
    pub fn with_backend(
        opts: ServerOptions,
        metrics: Arc<Metrics>,
        backend: Arc<dyn Backend>,
    ) -> Self {
        let s = Self::new(opts, metrics);
        s.set_backend(backend);
        s
    }

    /// The name clients use for `backend`'s model.
    pub fn served_name(&self, backend: &dyn Backend) -> String {
        self.inner
            .opts
            .served_model_name
            .clone()
            .unwrap_or_else(|| backend.info().name.clone())
    }

    /// An empty adapter registry for `backend`'s model, configured from the LoRA options.
    pub fn new_registry(&self, backend: &dyn Backend) -> Arc<AdapterRegistry> {
        let lora = &self.inner.opts.lora;
        let opts = RegistryOptions {
            max_rank: lora.max_lora_rank,
            max_cpu_loras: lora.max_cpu_loras,
            root: lora.root.clone(),
            reserved_names: vec![self.served_name(backend)],
        };
        Arc::new(AdapterRegistry::new(backend.model_config().clone(), opts))
    }

    /// Makes the model available with no adapter loaded yet; returns false when one was
    /// already set.
    pub fn set_backend(&self, backend: Arc<dyn Backend>) -> bool {
        let adapters = self.new_registry(backend.as_ref());
        self.set_backend_with_adapters(backend, adapters)
    }

    /// Makes the model available with `adapters` (made by [`Self::new_registry`], holding
    /// the start-up adapters); returns false when one was already set.
    pub fn set_backend_with_adapters(
        &self,
        backend: Arc<dyn Backend>,
        adapters: Arc<AdapterRegistry>,
    ) -> bool {
        let served_name = self.served_name(backend.as_ref());
        let metrics = self
            .inner
            .metrics
            .bind_model(&served_name, self.inner.opts.lora.max_loras);
        for name in adapters.names() {
            metrics.lora(&name);
        }
        let fresh = self
            .inner
            .loaded
            .set(Loaded {
                backend,
                served_name,
                metrics,
                adapters,
            })
            .is_ok();
        if fresh && self.is_draining() {
            if let Some(l) = self.loaded() {
                l.backend.stop_accepting();
            }
        }
        fresh
    }

    pub fn loaded(&self) -> Option<&Loaded> {
        self.inner.loaded.get()
    }

    /// The model, or 503 while loading, while draining, or once an internal error stopped
    /// the engine.
    pub fn serving(&self) -> Result<&Loaded, ApiError> {
        if self.is_draining() {
            return Err(ApiError::Unavailable("the server is shutting down".into()));
        }
        if let Some(e) = self.failure() {
            return Err(e);
        }
        self.loaded().ok_or_else(|| {
            ApiError::Unavailable("the model is still loading; retry shortly".into())
        })
    }

    /// The engine's internal error, once one stopped it (then `/health` answers 503).
    pub fn failure(&self) -> Option<ApiError> {
        let why = self.loaded()?.backend.failure()?;
        Some(ApiError::Unavailable(format!(
            "the engine stopped after an internal error ({why}); this server must be restarted"
        )))
    }

    /// Stop taking new requests: `/ready` and new requests answer 503; running ones go on.
    pub fn begin_drain(&self) {
        self.inner.draining.store(true, Ordering::Release);
        if let Some(l) = self.loaded() {
            l.backend.stop_accepting();
        }
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Generation requests whose response has not ended yet.
    pub fn inflight(&self) -> usize {
        self.inner.inflight.load(Ordering::Acquire)
    }

    /// Counts one generation request until the guard drops (with the response body).
    pub fn inflight_guard(&self) -> InflightGuard {
        self.inner.inflight.fetch_add(1, Ordering::AcqRel);
        InflightGuard {
            state: self.clone(),
        }
    }

    pub fn opts(&self) -> &ServerOptions {
        &self.inner.opts
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub fn started(&self) -> u64 {
        self.inner.started
    }
}

/// Decrements the in-flight count when dropped.
pub struct InflightGuard {
    state: AppState,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.state.inner.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
