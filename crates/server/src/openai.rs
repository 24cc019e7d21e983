//! OpenAI wire types: what comes in (lenient) and what goes out.
//!
//! Input is parsed in two steps: the JSON object is split between the fields of the
//! endpoint ([`CompletionFields`], [`ChatFields`]) and the sampling fields both endpoints
//! share ([`SamplingFields`]); a field that belongs to neither is refused by name (or, for
//! fields tessera knows but does not implement, with a message that says so). Lenient
//! shapes (`prompt`, `stop`, chat `content`) become one clean type each on the way in.

use std::collections::BTreeMap;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::error::{json_kind, ApiError};

// ---------------------------------------------------------------------------------------
// Requests

/// Sampling and streaming fields shared by `/v1/completions` and `/v1/chat/completions`.
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string key, as JSON requires) -> bias in [-100, 100].
    pub logit_bias: Option<BTreeMap<String, f64>>,
    pub seed: Option<serde_json::Number>,
    pub stop: Option<StopInput>,
    pub stop_token_ids: Option<Vec<i64>>,
    pub ignore_eos: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Accepted and ignored (OpenAI uses it for abuse monitoring).
    pub user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// Fields of `/v1/completions` besides the sampling ones.
#[derive(Debug, Default, Deserialize)]
pub struct CompletionFields {
    pub model: Option<String>,
    pub prompt: Option<PromptInput>,
    pub echo: Option<bool>,
    /// Number of top alternatives per token (legacy logprobs).
    pub logprobs: Option<i64>,
    /// Accepted only when equal to `n` (no server-side best-of selection).
    pub best_of: Option<i64>,
}

/// Fields of `/v1/chat/completions` besides the sampling ones.
#[derive(Debug, Default, Deserialize)]
pub struct ChatFields {
    pub model: Option<String>,
    pub messages: Option<Vec<ChatMessageIn>>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
}

#[derive(Debug)]
pub struct CompletionRequest {
    pub fields: CompletionFields,
    pub sampling: SamplingFields,
}

#[derive(Debug)]
pub struct ChatRequest {
    pub fields: ChatFields,
    pub sampling: SamplingFields,
}

/// One chat message as sent; `content` may be a string or a list of text parts.
#[derive(Debug, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<ContentInput>,
    pub name: Option<String>,
    /// Refused when present and not empty (tools are not implemented).
    pub tool_calls: Option<Value>,
    pub tool_call_id: Option<Value>,
    pub function_call: Option<Value>,
}

/// `"prompt"` normalised: one entry per prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptInput(pub Vec<PromptItem>);

#[derive(Debug, Clone, PartialEq)]
pub enum PromptItem {
    Text(String),
    Ids(Vec<u32>),
}

/// `"stop"` normalised: a string or a list of strings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StopInput(pub Vec<String>);

/// Chat `content` normalised to its text (text parts joined by newlines).
#[derive(Debug, Clone, PartialEq)]
pub struct ContentInput(pub String);

const PROMPT_SHAPES: &str =
    "a string, a list of strings, a list of token ids or a list of token-id lists";

impl<'de> Deserialize<'de> for PromptInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        prompt_from_value(v).map_err(D::Error::custom)
    }
}

fn prompt_from_value(v: Value) -> Result<PromptInput, String> {
    let items = match v {
        Value::String(s) => return Ok(PromptInput(vec![PromptItem::Text(s)])),
        Value::Array(items) => items,
        other => {
            return Err(format!(
                "expected {PROMPT_SHAPES}, got {}",
                json_kind(&other)
            ))
        }
    };
    if items.is_empty() {
        return Err("the prompt list is empty".into());
    }
    if items.iter().all(Value::is_number) {
        return Ok(PromptInput(vec![PromptItem::Ids(token_ids(&items)?)]));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        match item {
            Value::String(s) => out.push(PromptItem::Text(s)),
            Value::Array(ids) => out.push(PromptItem::Ids(
                token_ids(&ids).map_err(|e| format!("[{i}]: {e}"))?,
            )),
            other => {
                return Err(format!(
                    "[{i}]: expected {PROMPT_SHAPES}, got {} in the list",
                    json_kind(&other)
                ))
            }
        }
    }
    Ok(PromptInput(out))
}

fn token_ids(items: &[Value]) -> Result<Vec<u32>, String> {
    items
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| format!("token ids must be integers in 0..=4294967295, got {v}"))
        })
        .collect()
}

impl<'de> Deserialize<'de> for StopInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(StopInput(vec![s])),
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(D::Error::custom(format!(
                        "stop must hold strings, got {}",
                        json_kind(&other)
                    ))),
                })
                .collect::<Result<_, _>>()
                .map(StopInput),
            other => Err(D::Error::custom(format!(
                "expected a string or a list of strings, got {}",
                json_kind(&other)
            ))),
        }
    }
}

impl<'de> Deserialize<'de> for ContentInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(ContentInput(s)),
            Value::Array(parts) => {
                let texts = parts.iter().map(text_part).collect::<Result<Vec<_>, _>>().map_err(D::Error::custom)?;
                Ok(ContentInput(texts.join("\n")))
            }
            other => Err(D::Error::custom(format!(
                "content must be a string or a list of {{\"type\": \"text\", \"text\": ...}} parts, got {}",
                json_kind(&other)
            ))),
        }
    }
}

fn text_part(part: &Value) -> Result<String, String> {
    match part.get("type").and_then(Value::as_str) {
        Some("text") => part
            .get("text")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| "a text content part needs a string `text`".to_string()),
        Some(other) => Err(format!(
            "content parts of type `{other}` are not supported; only `text`"
        )),
        None => Err(format!(
            "a content part must be an object with a `type`, got {part}"
        )),
    }
}

/// Fields tessera knows and does not implement yet; a value other than null (or an empty
/// list, or the default) is refused with this message instead of being ignored.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("tools", "tool calling is not supported by tessera yet"),
    (
        "tool_choice",
        "tool calling is not supported by tessera yet",
    ),
    (
        "functions",
        "function calling is not supported by tessera yet",
    ),
    (
        "function_call",
        "function calling is not supported by tessera yet",
    ),
    (
        "parallel_tool_calls",
        "tool calling is not supported by tessera yet",
    ),
    (
        "response_format",
        "response_format (JSON mode, structured output) is not supported by tessera yet",
    ),
    ("suffix", "suffix (insertion) is not supported by tessera"),
    ("audio", "audio output is not supported by tessera"),
    ("modalities", "only text output is supported"),
    (
        "prediction",
        "predicted outputs are not supported by tessera",
    ),
    (
        "web_search_options",
        "web search is not supported by tessera",
    ),
    (
        "reasoning_effort",
        "reasoning_effort is not supported by tessera",
    ),
    (
        "guided_json",
        "guided decoding is not supported by tessera yet",
    ),
    (
        "guided_regex",
        "guided decoding is not supported by tessera yet",
    ),
    (
        "guided_choice",
        "guided decoding is not supported by tessera yet",
    ),
    (
        "guided_grammar",
        "guided decoding is not supported by tessera yet",
    ),
    (
        "lora_request",
        "select a LoRA adapter by giving its name as `model`",
    ),
];

/// Whether `value` for an unsupported field asks for nothing (and can be ignored).
fn asks_for_nothing(field: &str, value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Bool(false) => field == "parallel_tool_calls",
        Value::String(s) => {
            (field == "tool_choice" && s == "none") || (field == "suffix" && s.is_empty())
        }
        Value::Object(o) => {
            field == "response_format" && o.get("type").and_then(Value::as_str) == Some("text")
        }
        _ => false,
    }
}

/// A request body: built from the JSON object the extractor parsed.
pub trait FromBody: Sized {
    fn from_object(obj: Map<String, Value>) -> Result<Self, ApiError>;
}

impl FromBody for CompletionRequest {
    fn from_object(obj: Map<String, Value>) -> Result<Self, ApiError> {
        let (fields, sampling) = split_fields(obj)?;
        Ok(CompletionRequest { fields, sampling })
    }
}

impl FromBody for ChatRequest {
    fn from_object(obj: Map<String, Value>) -> Result<Self, ApiError> {
        let (fields, sampling) = split_fields(obj)?;
        Ok(ChatRequest { fields, sampling })
    }
}

/// Splits `obj` between the fields of `A` and of `B`, refusing the rest by name.
pub fn split_fields<A: DeserializeOwned, B: DeserializeOwned>(
    obj: Map<String, Value>,
) -> Result<(A, B), ApiError> {
    let (a_names, b_names) = (field_names::<A>(), field_names::<B>());
    let (mut a, mut b) = (Map::new(), Map::new());
    for (key, value) in obj {
        if a_names.contains(&key.as_str()) {
            a.insert(key, value);
        } else if b_names.contains(&key.as_str()) {
            b.insert(key, value);
        } else if let Some((_, why)) = UNSUPPORTED.iter().find(|(f, _)| *f == key) {
            if !asks_for_nothing(&key, &value) {
                return Err(ApiError::Unsupported {
                    message: format!("`{key}`: {why}"),
                    param: key,
                });
            }
        } else if !value.is_null() {
            return Err(ApiError::invalid(&key, format!("unknown field `{key}`")));
        }
    }
    Ok((typed(a)?, typed(b)?))
}

/// A JSON object -> `T`, a type error naming the path of the field.
pub fn typed<T: DeserializeOwned>(obj: Map<String, Value>) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(Value::Object(obj)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." || path.is_empty() {
            ApiError::InvalidParam {
                param: None,
                message: inner,
            }
        } else {
            let top = path.split(['.', '[']).next().unwrap_or(&path).to_string();
            ApiError::InvalidParam {
                param: Some(top),
                message: format!("{path}: {inner}"),
            }
        }
    })
}

/// The field names a derived `Deserialize` struct asks for.
pub fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut names = None;
    let _ = T::deserialize(FieldNames(&mut names));
    names.unwrap_or(&[])
}

/// A deserializer that only records the field list of `deserialize_struct`.
struct FieldNames<'a>(&'a mut Option<&'static [&'static str]>);

impl<'de> Deserializer<'de> for FieldNames<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(Self::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = Some(fields);
        Err(Self::Error::custom("field names recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

// ---------------------------------------------------------------------------------------
// Responses

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn add(&mut self, prompt: usize, completion: usize) {
        self.prompt_tokens += prompt;
        self.completion_tokens += completion;
        self.total_tokens = self.prompt_tokens + self.completion_tokens;
    }
}

#[derive(Debug, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// The legacy completions logprobs shape.
#[derive(Debug, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Serialize)]
pub struct ChatResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    /// Set in full responses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<ChatMessageOut>,
    /// Set in stream chunks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<ChatDelta>,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatLogprob>,
}

#[derive(Debug, Serialize)]
pub struct ChatLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub max_model_len: usize,
    /// The base: its served name; an adapter: its folder.
    pub root: String,
    /// An adapter: the served base name; the base: null (as vLLM lists them).
    pub parent: Option<String>,
}

// ---------------------------------------------------------------------------------------
// LoRA adapter management (vLLM's endpoints)

/// `POST /v1/load_lora_adapter`.
#[derive(Debug, Default, Deserialize)]
pub struct LoadLoraRequest {
    pub lora_name: Option<String>,
    pub lora_path: Option<String>,
    /// Replace an adapter of the same name instead of refusing.
    pub load_inplace: Option<bool>,
}

/// `POST /v1/unload_lora_adapter`.
#[derive(Debug, Default, Deserialize)]
pub struct UnloadLoraRequest {
    pub lora_name: Option<String>,
    /// Accepted and ignored (vLLM's numeric id; tessera goes by name).
    pub lora_int_id: Option<i64>,
}

impl FromBody for LoadLoraRequest {
    fn from_object(obj: Map<String, Value>) -> Result<Self, ApiError> {
        strict(obj)
    }
}

impl FromBody for UnloadLoraRequest {
    fn from_object(obj: Map<String, Value>) -> Result<Self, ApiError> {
        strict(obj)
    }
}

/// A JSON object -> `T`, refusing (by name) fields `T` does not have.
fn strict<T: DeserializeOwned>(obj: Map<String, Value>) -> Result<T, ApiError> {
    let names = field_names::<T>();
    if let Some(key) = obj
        .iter()
        .find(|(k, v)| !names.contains(&k.as_str()) && !v.is_null())
        .map(|(k, _)| k.clone())
    {
        return Err(ApiError::invalid(&key, format!("unknown field `{key}`")));
    }
    typed(obj)
}

/// `GET /v1/lora_adapters`.
#[derive(Debug, Serialize)]
pub struct AdapterList {
    pub object: &'static str,
    pub data: Vec<AdapterCard>,
}

#[derive(Debug, Serialize)]
pub struct AdapterCard {
    pub name: String,
    /// The adapter folder (canonical).
    pub path: String,
    /// Largest rank of its layers.
    pub rank: usize,
    /// Bytes of adapter weights (of the last version read, when evicted).
    pub bytes: usize,
    /// `loaded` (in memory) or `evicted` (read back from `path` on the next request).
    pub state: &'static str,
    /// The served base model it applies to.
    pub parent: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn every_prompt_shape_normalises() {
        let p = |v: Value| prompt_from_value(v).unwrap().0;
        assert_eq!(p(json!("a")), vec![PromptItem::Text("a".into())]);
        assert_eq!(p(json!(["a", "b"])).len(), 2);
        assert_eq!(p(json!([1, 2])), vec![PromptItem::Ids(vec![1, 2])]);
        assert_eq!(
            p(json!([[1], [2, 3]])),
            vec![PromptItem::Ids(vec![1]), PromptItem::Ids(vec![2, 3])]
        );
        assert!(prompt_from_value(json!([])).is_err());
        assert!(prompt_from_value(json!([-1])).is_err());
        assert!(prompt_from_value(json!([1, "a"])).is_err());
        assert!(prompt_from_value(json!({"a": 1})).is_err());
    }

    #[test]
    fn unknown_and_unsupported_fields_are_refused_by_name() {
        let e = CompletionRequest::from_object(obj(json!({"prompt": "x", "frobnicate": 1})))
            .unwrap_err();
        assert_eq!(
            e,
            ApiError::invalid("frobnicate", "unknown field `frobnicate`")
        );
        let e = ChatRequest::from_object(obj(
            json!({"messages": [], "tools": [{"type": "function"}]}),
        ))
        .unwrap_err();
        assert!(
            matches!(e, ApiError::Unsupported { ref param, .. } if param == "tools"),
            "{e:?}"
        );
        let ok = ChatRequest::from_object(obj(
            json!({"messages": [], "tools": [], "response_format": {"type": "text"}}),
        ));
        assert!(ok.is_ok());
    }

    #[test]
    fn stop_and_content_accept_both_shapes() {
        let r = ChatRequest::from_object(obj(json!({
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "stop": "x"
        })))
        .unwrap();
        assert_eq!(r.sampling.stop, Some(StopInput(vec!["x".into()])));
        let m = r.fields.messages.unwrap();
        assert_eq!(m[0].content, Some(ContentInput("a\nb".into())));
        let e =
            ChatRequest::from_object(obj(json!({"messages": [{"role": "user", "content": 3}]})))
                .unwrap_err();
        assert!(
            matches!(e, ApiError::InvalidParam { ref param, .. } if param.as_deref() == Some("messages")),
            "{e:?}"
        );
    }

    #[test]
    fn field_names_lists_struct_fields() {
        assert!(field_names::<SamplingFields>().contains(&"temperature"));
        assert!(field_names::<ChatFields>().contains(&"messages"));
    }
}
