//! API errors: the one place where failures become HTTP statuses.
//!
//! Every error body has the OpenAI shape `{"error": {"message", "type", "param", "code"}}`.
//! [`AppJson`] is the JSON body extractor of the API: malformed JSON, wrong types,
//! invalid UTF-8 and oversized bodies all come back in that shape.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use engine::adapters::AdapterError;
use engine::EngineError;
use serde::Serialize;

use crate::openai::{ErrorBody, ErrorDetail, FromBody};
use crate::state::AppState;

/// Everything a request can fail with, before or after it reaches the engine.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// A parameter is missing, has the wrong type or is out of range.
    #[error("{message}")]
    InvalidParam {
        param: Option<String>,
        message: String,
    },
    /// The request body is not JSON, not UTF-8 or not an object.
    #[error("{0}")]
    BadBody(String),
    /// A field tessera knows but does not implement yet (tools, response_format, ...).
    #[error("{message}")]
    Unsupported { param: String, message: String },
    /// Prompt + completion do not fit the model's context or the KV cache.
    #[error("{0}")]
    ContextLength(String),
    #[error("The model `{requested}` does not exist. Available models: {available}.")]
    ModelNotFound {
        requested: String,
        available: String,
    },
    /// Unloading an adapter that is not loaded (vLLM's message).
    #[error("The lora adapter '{0}' cannot be found.")]
    AdapterNotFound(String),
    #[error("route not found: {0}")]
    RouteNotFound(String),
    #[error("method {0} is not allowed on this route")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("request body too large: the limit is {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    QueueFull(String),
    /// Loading or draining.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError::InvalidParam {
            param: Some(param.to_string()),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidParam { .. }
            | ApiError::BadBody(_)
            | ApiError::Unsupported { .. }
            | ApiError::ContextLength(_) => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound { .. }
            | ApiError::AdapterNotFound(_)
            | ApiError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI `type` of the error; also the `error_type` label of the error metric.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::InvalidParam { .. }
            | ApiError::BadBody(_)
            | ApiError::Unsupported { .. }
            | ApiError::ContextLength(_)
            | ApiError::PayloadTooLarge { .. }
            | ApiError::MethodNotAllowed(_) => "invalid_request_error",
            ApiError::ModelNotFound { .. }
            | ApiError::AdapterNotFound(_)
            | ApiError::RouteNotFound(_) => "not_found_error",
            ApiError::Unauthorized(_) => "authentication_error",
            ApiError::QueueFull(_) => "rate_limit_error",
            ApiError::Unavailable(_) => "service_unavailable",
            ApiError::Internal(_) => "server_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::ContextLength(_) => Some("context_length_exceeded"),
            ApiError::ModelNotFound { .. } => Some("model_not_found"),
            ApiError::AdapterNotFound(_) => Some("lora_adapter_not_found"),
            ApiError::Unauthorized(_) => Some("invalid_api_key"),
            ApiError::PayloadTooLarge { .. } => Some("request_too_large"),
            ApiError::Unsupported { .. } => Some("unsupported_parameter"),
            ApiError::QueueFull(_) => Some("queue_full"),
            _ => None,
        }
    }

    fn param(&self) -> Option<String> {
        match self {
            ApiError::InvalidParam { param, .. } => param.clone(),
            ApiError::Unsupported { param, .. } => Some(param.clone()),
            ApiError::ModelNotFound { .. } => Some("model".into()),
            ApiError::AdapterNotFound(_) => Some("lora_name".into()),
            _ => None,
        }
    }

    /// The `{"error": {...}}` body, also sent as an SSE event when a stream fails.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: self.error_type().to_string(),
                param: self.param(),
                code: self.code().map(str::to_string),
            },
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::ContextLength(m) => ApiError::ContextLength(m),
            EngineError::InvalidParam { param, message } => ApiError::InvalidParam {
                param: Some(param),
                message,
            },
            EngineError::QueueFull(_) => ApiError::QueueFull(e.to_string()),
            EngineError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
            EngineError::Tokenizer(m) => ApiError::InvalidParam {
                param: None,
                message: m,
            },
            EngineError::Adapter(m) => ApiError::InvalidParam {
                param: Some("lora_path".into()),
                message: m,
            },
            EngineError::Load(_) | EngineError::Device(_) | EngineError::Internal(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<AdapterError> for ApiError {
    fn from(e: AdapterError) -> Self {
        match e {
            AdapterError::Invalid { param, message } => ApiError::invalid(param, message),
            AdapterError::AlreadyLoaded(_) => ApiError::invalid("lora_name", e.to_string()),
            AdapterError::NotFound(name) => ApiError::AdapterNotFound(name),
            AdapterError::Reload { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

/// Marks a response as an API error so the HTTP metrics layer can count it by type.
#[derive(Debug, Clone, Copy)]
pub struct ErrorType(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut res = (status, axum::Json(self.body())).into_response();
        res.extensions_mut().insert(ErrorType(self.error_type()));
        if status == StatusCode::UNAUTHORIZED {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}

/// JSON body extractor whose every failure is an [`ApiError`]; no content type required
/// (curl's `-d` sends form encoding by default).
pub struct AppJson<T>(pub T);

impl<T: FromBody> FromRequest<AppState> for AppJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = read_limited(req.into_body(), state.opts().max_body_bytes).await?;
        parse_json(&bytes).map(AppJson)
    }
}

/// Past the limit, up to this many more bytes are read and thrown away before answering
/// 413, so that a client that writes its whole body before reading (curl, requests,
/// reqwest) gets the 413 instead of a broken pipe; a larger body has its connection closed.
const DRAIN_CAP: usize = 64 << 20;
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The body, at most `limit` bytes.
async fn read_limited(body: axum::body::Body, limit: usize) -> Result<Bytes, ApiError> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadBody(format!("could not read the request body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            let mut drained = buf.len() + chunk.len();
            let drain = async {
                while let Some(Ok(c)) = stream.next().await {
                    drained += c.len();
                    if drained > limit + DRAIN_CAP {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
            return Err(ApiError::PayloadTooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// Bytes -> UTF-8 -> JSON object -> `T`, each failure named precisely.
pub fn parse_json<T: FromBody>(bytes: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ApiError::BadBody(format!(
            "the request body is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::BadBody(
            "the request body is empty; expected a JSON object".into(),
        ));
    }
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| ApiError::BadBody(format!("the request body is not valid JSON: {e}")))?;
    match value {
        serde_json::Value::Object(obj) => T::from_object(obj),
        other => Err(ApiError::BadBody(format!(
            "the request body must be a JSON object, got {}",
            json_kind(&other)
        ))),
    }
}

/// "a string", "an array", ... for messages.
pub fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Serializes a value that cannot fail to serialize (plain structs of strings and numbers).
pub fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| {
        format!(r#"{{"error":{{"message":"serialization failed: {e}","type":"server_error","param":null,"code":null}}}}"#)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct T {
        temperature: Option<f64>,
    }

    impl FromBody for T {
        fn from_object(obj: serde_json::Map<String, serde_json::Value>) -> Result<Self, ApiError> {
            crate::openai::typed(obj)
        }
    }

    #[test]
    fn wrong_type_names_the_param() {
        let e = parse_json::<T>(br#"{"temperature": "hot"}"#).unwrap_err();
        match e {
            ApiError::InvalidParam { param, message } => {
                assert_eq!(param.as_deref(), Some("temperature"));
                assert!(
                    message.contains("hot") && message.starts_with("temperature"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalid_utf8_and_non_objects_are_bad_bodies() {
        assert!(matches!(
            parse_json::<T>(b"{\"a\": \"\xff\"}"),
            Err(ApiError::BadBody(_))
        ));
        assert!(matches!(parse_json::<T>(b"[1]"), Err(ApiError::BadBody(_))));
        assert!(matches!(parse_json::<T>(b"{"), Err(ApiError::BadBody(_))));
        assert!(matches!(parse_json::<T>(b""), Err(ApiError::BadBody(_))));
    }

    #[test]
    fn engine_errors_map_to_statuses() {
        let s = |e: EngineError| ApiError::from(e).status().as_u16();
        assert_eq!(s(EngineError::ContextLength("x".into())), 400);
        assert_eq!(s(EngineError::invalid("top_p", "x")), 400);
        assert_eq!(s(EngineError::QueueFull(3)), 429);
        assert_eq!(s(EngineError::Unavailable("x".into())), 503);
        assert_eq!(s(EngineError::Internal("x".into())), 500);
        let a = |e: AdapterError| ApiError::from(e).status().as_u16();
        assert_eq!(a(AdapterError::AlreadyLoaded("x".into())), 400);
        assert_eq!(a(AdapterError::NotFound("x".into())), 404);
        let refused = AdapterError::Invalid {
            param: "lora_path",
            message: "DoRA".into(),
        };
        assert_eq!(a(refused), 400);
    }
}
