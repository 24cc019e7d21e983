//! Chat templates: a model's Jinja template rendered with minijinja, the way transformers'
//! `apply_chat_template` renders it (`trim_blocks`, `lstrip_blocks`, Python string and
//! dict methods such as `.strip()` and `.items()`, `raise_exception(msg)`,
//! `strftime_now(fmt)`).

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::{context, Environment, Error, ErrorKind};

use crate::{EngineError, Result};

/// Name of the one template in the environment.
const TEMPLATE: &str = "chat";

/// One message of a conversation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template with the model's BOS and EOS texts.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).field("eos_token", &self.eos_token).finish()
    }
}

/// `raise_exception(msg)`: templates call it to reject a conversation.
fn raise_exception(msg: String) -> std::result::Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)` (UTC): `%Y %m %d %e %B %b %H %M %S %%`, as Llama 3 templates use.
fn strftime_now(fmt: String) -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    strftime(&fmt, secs)
}

/// Formats the UTC time `secs` after the Unix epoch.
fn strftime(fmt: &str, secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let days = (secs / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let name = MONTHS[(month - 1).clamp(0, 11) as usize];

    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('B') => out.push_str(name),
            Some('b') => out.push_str(&name[..3]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{m:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

impl ChatTemplate {
    /// Compiles `source`. A template that does not parse is a load error.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE, source.to_string())
            .map_err(|e| EngineError::Load(format!("chat template does not compile: {e:#}")))?;
        Ok(ChatTemplate { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// Renders a conversation; `add_generation_prompt` opens the assistant's turn.
    ///
    /// A template may reject a conversation (for example a role it does not know); that
    /// and any other render failure is an [`EngineError::Tokenizer`] with the template's
    /// message.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(TEMPLATE).map_err(render_error)?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(render_error)
    }
}

fn render_error(e: Error) -> EngineError {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => EngineError::Tokenizer(format!("chat template error: {detail}")),
        _ => EngineError::Tokenizer(format!("chat template error: {e}")),
    }
}

/// Gemma 3's chat template (Google's, text parts only), used when a Gemma 3 file has none.
pub const GEMMA3_TEMPLATE: &str = "{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = \"\" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = \"model\" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::{golden_prompts, smollm};

    fn smollm_template() -> ChatTemplate {
        let tok = smollm();
        let source = tok.chat_template().expect("the GGUF has a chat template");
        let bos = tok.token_str(tok.bos_id().unwrap());
        let eos = tok.token_str(tok.eos_ids()[0]);
        ChatTemplate::new(source, &bos, &eos).unwrap()
    }

    fn messages(v: &serde_json::Value) -> Vec<ChatMessage> {
        v.as_array()
            .expect("messages")
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect()
    }

    #[test]
    fn golden_chat_prompts_render_exactly() {
        let t = smollm_template();
        let chats: Vec<_> = golden_prompts().into_iter().filter(|p| p["kind"] == "chat").collect();
        assert!(chats.len() >= 6);
        let names: Vec<&str> = chats.iter().filter_map(|p| p["name"].as_str()).collect();
        assert!(names.contains(&"chat_multiturn") && names.contains(&"chat_system_colors"), "{names:?}");
        for p in &chats {
            let rendered = t.render(&messages(&p["messages"]), true).unwrap();
            assert_eq!(rendered, p["prompt_text"].as_str().unwrap(), "{}", p["name"]);
        }
    }

    #[test]
    fn explicit_system_message_replaces_the_default() {
        let t = smollm_template();
        let msgs = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn multi_turn_without_generation_prompt() {
        let t = smollm_template();
        let msgs = [
            ChatMessage::new("user", "2+2?"),
            ChatMessage::new("assistant", "4"),
            ChatMessage::new("user", "And 3+3?"),
        ];
        let out = t.render(&msgs, false).unwrap();
        assert!(out.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
        assert!(out.ends_with(
            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        ));
    }

    #[test]
    fn raise_exception_becomes_a_tokenizer_error() {
        let src = "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}\
                   {{ raise_exception('Unknown role: ' + m.role) }}{% endif %}{{ m.content }}{% endfor %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        match t.render(&[ChatMessage::new("wizard", "x")], true) {
            Err(EngineError::Tokenizer(msg)) => assert!(msg.contains("Unknown role: wizard"), "{msg}"),
            other => panic!("expected a tokenizer error, got {other:?}"),
        }
        assert_eq!(t.render(&[ChatMessage::new("user", "ok")], true).unwrap(), "ok");
    }

    #[test]
    fn python_methods_and_tokens_are_available() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}\
                   {% if m.role.startswith('us') %}!{% endif %}{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        assert_eq!(t.render(&[ChatMessage::new("user", "  hi ")], false).unwrap(), "<s>HI!</s>");
    }

    #[test]
    fn template_errors_never_panic() {
        assert!(matches!(ChatTemplate::new("{% for %}", "", ""), Err(EngineError::Load(_))));
        let t = ChatTemplate::new("{{ messages[5].content.nope() }}", "", "").unwrap();
        assert!(matches!(t.render(&[], true), Err(EngineError::Tokenizer(_))));
    }

    #[test]
    fn strftime_formats_utc_dates() {
        // 2024-02-29 13:05:09 UTC.
        assert_eq!(strftime("%d %b %Y %H:%M:%S %B %m %%", 1_709_211_909), "29 Feb 2024 13:05:09 February 02 %");
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
    }
}
