//! The default model and the reference generations made outside tessera
//! (`../shared/fixtures/golden/*.json`, described in `../shared/fixtures/README.md`).

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

/// The default model file; the test fails (never skips) when it is missing.
pub fn model_path() -> PathBuf {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
    ));
    assert!(
        p.exists(),
        "the default model is missing: run scripts/fetch-model first ({})",
        p.display()
    );
    p
}

/// `../shared/fixtures` next to the checkout.
pub fn fixtures_dir() -> PathBuf {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures"
    ));
    assert!(
        p.exists(),
        "the reference fixtures are missing: expected them in {}",
        p.display()
    );
    p
}

/// One prompt of a golden file: greedy decoding of the reference, 32 tokens at most.
#[derive(Debug, Clone, Deserialize)]
pub struct GoldenPrompt {
    pub name: String,
    /// `chat` or `text`.
    pub kind: String,
    /// The chat messages (chat prompts only).
    #[serde(default)]
    pub messages: Option<Vec<Value>>,
    /// The prompt as text (chat prompts: rendered through the chat template).
    pub prompt_text: String,
    /// The prompt as the tokenizer encodes it (no BOS).
    pub prompt_ids: Vec<u32>,
    /// Greedy tokens; ends with EOS (2) when `finish_reason` is `eos`.
    pub generated_ids: Vec<u32>,
    pub generated_text_skip_special: String,
    /// `eos` or `length`.
    pub finish_reason: String,
    pub steps: Vec<GoldenStep>,
}

/// The reference distribution before generated token `i`.
#[derive(Debug, Clone, Deserialize)]
pub struct GoldenStep {
    pub token_id: u32,
    pub logprob: f64,
    pub top5_ids: Vec<u32>,
    pub top5_logprobs: Vec<f64>,
}

#[derive(Deserialize)]
struct GoldenFile {
    prompts: Vec<GoldenPrompt>,
}

/// The prompt `name` of `golden/base.json`.
pub fn golden(name: &str) -> GoldenPrompt {
    let path = fixtures_dir().join("golden/base.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let file: GoldenFile = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
    file.prompts
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no prompt `{name}` in {}", path.display()))
}

impl GoldenPrompt {
    /// The reference's finish reason as the OpenAI API names it.
    pub fn openai_finish_reason(&self) -> &'static str {
        match self.finish_reason.as_str() {
            "eos" => "stop",
            "length" => "length",
            other => panic!("unknown fixture finish_reason {other}"),
        }
    }

    /// The `messages` field of a chat request for this prompt.
    pub fn messages(&self) -> Value {
        Value::Array(
            self.messages
                .clone()
                .unwrap_or_else(|| panic!("{} is not a chat prompt", self.name)),
        )
    }
}
