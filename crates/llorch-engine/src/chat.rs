//! Chat templates: the model's own Jinja template (GGUF `tokenizer.chat_template` or
//! `tokenizer_config.json`) rendered with minijinja, with the variables HF templates
//! expect (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`) and Python
//! string methods (`.strip()`, `.startswith()`...) through minijinja-contrib's pycompat.

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use crate::error::{EngineError, Result};

/// ChatML, for models that ship no template of their own.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    pub source: String,
}

fn raise_exception(msg: String) -> std::result::Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use it for a "today is" line; a fixed format keeps output stable.
            let _ = fmt;
            "01 Jan 2026".to_string()
        });
        env.add_template_owned("chat".to_string(), source.to_string())
            .map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        Ok(Self {
            env,
            source: source.to_string(),
        })
    }

    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        bos: &str,
        eos: &str,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos,
            eos_token => eos,
        })
        .map_err(|e| EngineError::ChatTemplate(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML).unwrap();
        let s = t
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", "Hi"),
                ],
                true,
                "",
                "",
            )
            .unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let s = t
            .render(&[Message::new("user", "Hi")], false, "", "")
            .unwrap();
        assert!(!s.ends_with("assistant\n"));
    }

    #[test]
    fn python_methods_and_bos_work() {
        // Gemma-style template: bos_token, .strip(), raise_exception on a bad role.
        let src = "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user','model','assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";
        let t = ChatTemplate::new(src).unwrap();
        let s = t
            .render(&[Message::new("user", "  hello ")], true, "<bos>", "<eos>")
            .unwrap();
        assert_eq!(
            s,
            "<bos><start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n"
        );
        let err = t
            .render(&[Message::new("tool", "x")], true, "<bos>", "<eos>")
            .unwrap_err();
        assert!(err.to_string().contains("bad role tool"), "{err}");
        let t = ChatTemplate::new("{{ messages[0]['content'].strip().upper() }}").unwrap();
        assert_eq!(
            t.render(&[Message::new("user", " hi ")], false, "", "")
                .unwrap(),
            "HI"
        );
    }

    #[test]
    fn broken_template_is_an_error() {
        assert!(ChatTemplate::new("{% for %}").is_err());
    }
}
