//! The router: OpenAI routes, health and readiness, metrics, auth and HTTP metrics.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::error::{ApiError, AppJson, ErrorType};
use crate::generate::{
    self, chat_logprobs, collect_all, completion_logprobs, new_id, prompt_usage, Collected,
    ResponseMeta, Tracked,
};
use crate::lora::{self, Selection};
use crate::openai::{
    ChatChoice, ChatMessageOut, ChatRequest, ChatResponse, CompletionChoice, CompletionRequest,
    CompletionResponse, ModelCard, ModelList, Usage,
};
use crate::state::{unix_now, AppState, Loaded};
use crate::stream::{self, Kind, StreamSpec};
use crate::validate::{self, Plan};

/// All routes over `state`. `/health`, `/ready` and `/metrics` need no API key; the
/// adapter endpoints do, like every `/v1/*` route.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*model}", get(get_model))
        .route("/v1/load_lora_adapter", post(lora::load_lora_adapter))
        .route("/v1/unload_lora_adapter", post(lora::unload_lora_adapter))
        .route("/v1/lora_adapters", get(lora::list_lora_adapters))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.opts().max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), http_metrics))
        .with_state(state)
}

/// 200 while the process can serve (also while loading and draining); 503 once an
/// internal error stopped the engine, so a liveness probe restarts the process.
async fn health(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    if let Some(e) = state.failure() {
        return Err(e);
    }
    Ok(Json(serde_json::json!({"status": "ok"})))
}

async fn ready(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    state.serving()?;
    Ok(Json(serde_json::json!({"status": "ready"})))
}

async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let load = state.loaded().map(|l| l.backend.load());
    let text = state
        .metrics()
        .render(load)
        .map_err(|e| ApiError::Internal(format!("metrics: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

fn model_card(state: &AppState, l: &Loaded) -> ModelCard {
    ModelCard {
        id: l.served_name.clone(),
        object: "model",
        created: state.started(),
        owned_by: "tessera",
        max_model_len: l.backend.info().max_model_len,
        root: l.served_name.clone(),
        parent: None,
    }
}

/// The base first, then every adapter (by name) with `parent` = the base.
fn model_cards(state: &AppState, l: &Loaded) -> Vec<ModelCard> {
    let adapters = lora::adapter_cards(l).into_iter().map(|a| ModelCard {
        id: a.name,
        root: a.path,
        parent: Some(a.parent),
        ..model_card(state, l)
    });
    std::iter::once(model_card(state, l))
        .chain(adapters)
        .collect()
}

async fn list_models(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let l = loaded(&state)?;
    Ok(Json(ModelList {
        object: "list",
        data: model_cards(&state, l),
    }))
}

async fn get_model(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    let l = loaded(&state)?;
    model_cards(&state, l)
        .into_iter()
        .find(|c| c.id == model)
        .map(Json)
        .ok_or_else(|| lora::model_not_found(l, &model))
}

fn loaded(state: &AppState) -> Result<&Loaded, ApiError> {
    state
        .loaded()
        .ok_or_else(|| ApiError::Unavailable("the model is still loading; retry shortly".into()))
}

async fn route_not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_string())
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

async fn completions(
    State(state): State<AppState>,
    AppJson(req): AppJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let l = state.serving()?;
    let Selection { model, adapter } = lora::select(l, req.fields.model.as_deref()).await?;
    let plan = Plan {
        adapter,
        ..validate::completion(&req, l.backend.as_ref())?
    };
    let inflight = state.inflight_guard();
    let meta = meta(model, "cmpl");
    let choices = generate::submit(&plan, l, &meta.id)?;
    let prompt_tokens = prompt_usage(plan.n, choices.iter().map(Tracked::prompt_tokens));
    if plan.stream {
        let spec = StreamSpec {
            kind: Kind::Completion,
            meta,
            include_usage: plan.include_usage,
            logprobs: plan.params.logprobs.is_some(),
            echo: (0..choices.len())
                .map(|i| plan.echo_of(i).map(str::to_string))
                .collect(),
            prompt_tokens,
            backend: l.backend.clone(),
        };
        return Ok(stream::respond(spec, choices, inflight));
    }
    let done = collect_all(choices).await?;
    Ok(Json(completion_body(meta, &plan, l, &done)).into_response())
}

async fn chat_completions(
    State(state): State<AppState>,
    AppJson(req): AppJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let l = state.serving()?;
    let Selection { model, adapter } = lora::select(l, req.fields.model.as_deref()).await?;
    let plan = Plan {
        adapter,
        ..validate::chat(&req, l.backend.as_ref())?
    };
    let inflight = state.inflight_guard();
    let meta = meta(model, "chatcmpl");
    let choices = generate::submit(&plan, l, &meta.id)?;
    let prompt_tokens = prompt_usage(plan.n, choices.iter().map(Tracked::prompt_tokens));
    if plan.stream {
        let spec = StreamSpec {
            kind: Kind::Chat,
            meta,
            include_usage: plan.include_usage,
            logprobs: plan.params.logprobs.is_some(),
            echo: vec![None; choices.len()],
            prompt_tokens,
            backend: l.backend.clone(),
        };
        return Ok(stream::respond(spec, choices, inflight));
    }
    let done = collect_all(choices).await?;
    Ok(Json(chat_body(meta, &plan, l, &done)).into_response())
}

/// `model`: the served name, or the adapter's name when the request ran on one.
fn meta(model: String, prefix: &str) -> ResponseMeta {
    ResponseMeta {
        id: Arc::from(new_id(prefix)),
        created: unix_now(),
        model,
    }
}

fn usage(plan: &Plan, done: &[Collected]) -> Usage {
    let mut u = Usage::default();
    u.add(
        prompt_usage(plan.n, done.iter().map(|c| c.prompt_tokens)),
        done.iter().map(|c| c.finish.completion_tokens).sum(),
    );
    u
}

fn completion_body(
    meta: ResponseMeta,
    plan: &Plan,
    l: &Loaded,
    done: &[Collected],
) -> CompletionResponse {
    let codec = l.backend.codec();
    let choices = done
        .iter()
        .map(|c| {
            let echo = plan.echo_of(c.index).unwrap_or_default().to_string();
            let mut offset = echo.chars().count();
            let logprobs = plan
                .params
                .logprobs
                .is_some()
                .then(|| completion_logprobs(codec, &c.logprobs, &mut offset));
            CompletionChoice {
                index: c.index,
                text: echo + &c.text,
                logprobs,
                finish_reason: Some(c.finish.reason.as_str()),
            }
        })
        .collect();
    CompletionResponse {
        id: meta.id.to_string(),
        object: "text_completion",
        created: meta.created,
        model: meta.model,
        choices,
        usage: Some(usage(plan, done)),
    }
}

fn chat_body(meta: ResponseMeta, plan: &Plan, l: &Loaded, done: &[Collected]) -> ChatResponse {
    let codec = l.backend.codec();
    let choices = done
        .iter()
        .map(|c| ChatChoice {
            index: c.index,
            message: Some(ChatMessageOut {
                role: "assistant",
                content: c.text.clone(),
            }),
            delta: None,
            logprobs: plan
                .params
                .logprobs
                .is_some()
                .then(|| chat_logprobs(codec, &c.logprobs)),
            finish_reason: Some(c.finish.reason.as_str()),
        })
        .collect();
    ChatResponse {
        id: meta.id.to_string(),
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        choices,
        usage: Some(usage(plan, done)),
    }
}

/// 401 unless the bearer token equals `--api-key` (when one is set).
async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.opts().api_key {
        match bearer(req.headers()) {
            None => {
                return ApiError::Unauthorized(
                    "missing API key: send `Authorization: Bearer <key>`".into(),
                )
                .into_response()
            }
            Some(given) if !constant_time_eq(given.as_bytes(), key.as_bytes()) => {
                return ApiError::Unauthorized("invalid API key".into()).into_response()
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counts every response by route template, method and status (and error type).
async fn http_metrics(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        _ => "other",
    };
    let start = Instant::now();
    let res = next.run(req).await;
    let error_type = res.extensions().get::<ErrorType>().map(|e| e.0);
    let status = res.status();
    state
        .metrics()
        .record_http(&route, method, status.as_u16(), start.elapsed(), error_type);
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::warn!(route, "internal error");
    }
    res
}
