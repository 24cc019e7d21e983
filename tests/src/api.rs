//! An HTTP client of one server with the helpers the tests share.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::prom::Samples;
use crate::sse::SseStream;

/// Longest a whole non-streaming request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone)]
pub struct Api {
    pub client: reqwest::Client,
    /// `http://host:port`
    pub base: String,
}

impl Api {
    pub fn new(base: &str) -> Api {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("reqwest client");
        Api {
            client,
            base: base.trim_end_matches('/').to_string(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs `body`; the status and the body, which must be JSON.
    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let bytes = serde_json::to_vec(body).unwrap();
        let (status, text) = self.post_raw(path, bytes).await;
        let value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("POST {path}: the {status} response is not JSON ({e}): {text:?}")
        });
        (status, value)
    }

    /// POSTs raw bytes as `application/json`; the status and the body text.
    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> (StatusCode, String) {
        self.try_post_raw(path, body)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::post_raw`] with transport failures as errors.
    pub async fn try_post_raw(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, String), String> {
        let res = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .timeout(REQUEST_TIMEOUT)
            .body(body)
            .send()
            .await
            .map_err(|e| format!("POST {path}: {e:?}"))?;
        let status = res.status();
        let text = res
            .text()
            .await
            .map_err(|e| format!("POST {path}: reading the body: {e:?}"))?;
        Ok((status, text))
    }

    /// POSTs `body` and expects 200; the JSON answer.
    pub async fn ok(&self, path: &str, body: &Value) -> Value {
        let (status, v) = self.post(path, body).await;
        assert_eq!(status, StatusCode::OK, "POST {path} {body}: {v}");
        v
    }

    /// POSTs a streaming request and expects a 200 event stream.
    pub async fn stream(&self, path: &str, body: &Value) -> SseStream {
        let res = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e:?}"));
        SseStream::open(res).await
    }

    /// GET; the status and the body text.
    pub async fn get(&self, path: &str) -> (StatusCode, String) {
        let res = self
            .client
            .get(self.url(path))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e:?}"));
        let status = res.status();
        (status, res.text().await.unwrap_or_default())
    }

    /// The text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, StatusCode::OK, "/metrics: {text}");
        text
    }

    /// `/metrics` parsed.
    pub async fn metrics(&self) -> Samples {
        Samples::parse(&self.metrics_text().await)
    }
}

/// Checks the OpenAI error shape `{"error": {"message", "type", "param", "code"}}`: a
/// non-empty message, a type, and `param` and `code` each a string or null. Returns the
/// inner object.
pub fn error_shape(body: &Value) -> Result<&serde_json::Map<String, Value>, String> {
    let top = body
        .as_object()
        .ok_or_else(|| format!("the error body is not an object: {body}"))?;
    if top.len() != 1 {
        return Err(format!("only `error` may be at the top level: {body}"));
    }
    let err = top
        .get("error")
        .and_then(Value::as_object)
        .ok_or_else(|| format!("no `error` object: {body}"))?;
    let mut keys: Vec<&str> = err.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys != ["code", "message", "param", "type"] {
        return Err(format!("the error object's keys are {keys:?}: {body}"));
    }
    if err["message"].as_str().is_none_or(|m| m.trim().is_empty()) {
        return Err(format!("an empty message: {body}"));
    }
    if err["type"].as_str().is_none_or(str::is_empty) {
        return Err(format!("no type: {body}"));
    }
    for k in ["param", "code"] {
        if !(err[k].is_string() || err[k].is_null()) {
            return Err(format!("`{k}` must be a string or null: {body}"));
        }
    }
    Ok(err)
}

/// [`error_shape`], panicking with `what` on a mismatch.
pub fn assert_error_shape<'a>(what: &str, body: &'a Value) -> &'a serde_json::Map<String, Value> {
    error_shape(body).unwrap_or_else(|e| panic!("{what}: {e}"))
}
