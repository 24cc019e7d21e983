//! LoRA adapters over HTTP: vLLM's load and unload endpoints, the adapter list, and the
//! adapter a request's `model` names.
//!
//! ```text
//! POST /v1/load_lora_adapter   {lora_name, lora_path, load_inplace}  200 text | 400 (why)
//! POST /v1/unload_lora_adapter {lora_name}                           200 text | 404
//! GET  /v1/lora_adapters       {object: list, data: [{name, path, rank, bytes, state, parent}]}
//! request `model`:  missing, "" or the served name -> the base
//!                   an adapter name -> its Arc goes into every choice's GenerateRequest
//!                   anything else -> 404
//! ```
//!
//! Reading an adapter (a load, or a request for an evicted one) blocks, so it runs on
//! tokio's blocking pool; the engine thread never sees it.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use engine::adapters::{AdapterError, LoadSpec, Lookup, Origin};
use engine::lora::LoraAdapter;

use crate::error::{ApiError, AppJson};
use crate::openai::{AdapterCard, AdapterList, LoadLoraRequest, UnloadLoraRequest};
use crate::state::{AppState, Loaded};

/// Most names listed in a "model not found" message.
const MAX_NAMES_IN_MESSAGE: usize = 20;

/// What a request runs with.
#[derive(Debug, Clone)]
pub struct Selection {
    /// The `model` of the response: the served name or the adapter's.
    pub model: String,
    pub adapter: Option<Arc<LoraAdapter>>,
}

/// The base or the adapter `requested` names (reading an evicted adapter back from disk).
pub async fn select(l: &Loaded, requested: Option<&str>) -> Result<Selection, ApiError> {
    let name = match requested {
        None => return Ok(base(l)),
        Some(n) if n.is_empty() || n == l.served_name => return Ok(base(l)),
        Some(n) => n,
    };
    let adapter = match l.adapters.lookup(name) {
        Lookup::Ready(a) => a,
        Lookup::Unknown => return Err(model_not_found(l, name)),
        Lookup::Evicted => {
            let reg = l.adapters.clone();
            let owned = name.to_string();
            match blocking(move || reg.reload(&owned)).await? {
                Ok(a) => a,
                Err(AdapterError::NotFound(_)) => return Err(model_not_found(l, name)),
                Err(e) => return Err(e.into()),
            }
        }
    };
    Ok(Selection {
        model: name.to_string(),
        adapter: Some(adapter),
    })
}

fn base(l: &Loaded) -> Selection {
    Selection {
        model: l.served_name.clone(),
        adapter: None,
    }
}

/// 404 listing what exists (the base first, then adapters).
pub fn model_not_found(l: &Loaded, requested: &str) -> ApiError {
    let names = l.adapters.names();
    let mut listed: Vec<String> = std::iter::once(&l.served_name)
        .chain(names.iter())
        .take(MAX_NAMES_IN_MESSAGE)
        .map(|n| format!("`{n}`"))
        .collect();
    let more = (names.len() + 1).saturating_sub(MAX_NAMES_IN_MESSAGE);
    if more > 0 {
        listed.push(format!("and {more} more"));
    }
    ApiError::ModelNotFound {
        requested: requested.to_string(),
        available: listed.join(", "),
    }
}

/// Runs blocking registry work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("adapter task failed: {e}")))
}

fn required(v: Option<String>, param: &str) -> Result<String, ApiError> {
    v.ok_or_else(|| ApiError::invalid(param, "Both 'lora_name' and 'lora_path' must be provided."))
}

pub async fn load_lora_adapter(
    State(state): State<AppState>,
    AppJson(req): AppJson<LoadLoraRequest>,
) -> Result<Response, ApiError> {
    let l = state.serving()?;
    let name = required(req.lora_name, "lora_name")?;
    let path = required(req.lora_path, "lora_path")?;
    let replace = req.load_inplace.unwrap_or(false);
    let reg = l.adapters.clone();
    let (n, p) = (name.clone(), path.clone());
    let result = blocking(move || {
        reg.load(LoadSpec {
            name: &n,
            path: &p,
            origin: Origin::Runtime,
            replace,
        })
    })
    .await?;
    let out = match result {
        Ok(out) => out,
        Err(e) => {
            tracing::info!(adapter = %name, lora_path = %path, reason = %e, "adapter load refused");
            return Err(e.into());
        }
    };
    l.metrics.lora(&name);
    tracing::info!(
        adapter = %name,
        path = %out.info.path.display(),
        rank = out.info.rank,
        bytes = out.info.bytes,
        replaced = out.replaced,
        evicted = ?out.evicted,
        load_ms = out.elapsed.as_secs_f64() * 1e3,
        "adapter loaded"
    );
    Ok(format!("Success: LoRA adapter '{name}' added successfully.").into_response())
}

pub async fn unload_lora_adapter(
    State(state): State<AppState>,
    AppJson(req): AppJson<UnloadLoraRequest>,
) -> Result<Response, ApiError> {
    let l = state.serving()?;
    let name = req
        .lora_name
        .ok_or_else(|| ApiError::invalid("lora_name", "'lora_name' must be provided."))?;
    let info = l.adapters.unload(&name)?;
    tracing::info!(adapter = %name, path = %info.path.display(), "adapter unloaded");
    Ok(format!("Success: LoRA adapter '{name}' removed successfully.").into_response())
}

pub async fn list_lora_adapters(
    State(state): State<AppState>,
) -> Result<Json<AdapterList>, ApiError> {
    let l = loaded(&state)?;
    Ok(Json(AdapterList {
        object: "list",
        data: adapter_cards(l),
    }))
}

pub fn adapter_cards(l: &Loaded) -> Vec<AdapterCard> {
    l.adapters
        .list()
        .into_iter()
        .map(|a| AdapterCard {
            name: a.name,
            path: a.path.display().to_string(),
            rank: a.rank,
            bytes: a.bytes,
            state: if a.in_memory { "loaded" } else { "evicted" },
            parent: l.served_name.clone(),
        })
        .collect()
}

fn loaded(state: &AppState) -> Result<&Loaded, ApiError> {
    state
        .loaded()
        .ok_or_else(|| ApiError::Unavailable("the model is still loading; retry shortly".into()))
}
