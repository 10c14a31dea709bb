//! Tokenizers and chat templates: a Hugging Face folder's `tokenizer.json` and
//! `tokenizer_config.json`, or a byte-level BPE trained for a scratch model.
//!
//! The student's prompt format is the chat template (a Jinja template, rendered with minijinja
//! and transformers' Python-compatible methods): a training pair becomes
//! `render([user: input], add_generation_prompt)` + `output` + end-of-turn token.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerImpl};

use crate::{ModelError, Result};

/// One chat message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.to_string(), content: content.to_string() }
    }
}

/// The chat template of forge's scratch models: a turn is `<|role|>\ncontent<|end|>\n`.
pub const SCRATCH_CHAT_TEMPLATE: &str = "{% for message in messages %}<|{{ message.role }}|>\n{{ message.content }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

/// Gemma's chat format (the template Gemma 3's instruction-tuned checkpoints ship, for text
/// messages), for a Gemma base model whose file carries none: a turn is
/// `<start_of_turn>ROLE\ncontent<end_of_turn>\n`, the assistant's role is `model`, and a system
/// message is prepended to the first user turn.
pub const GEMMA_CHAT_TEMPLATE: &str = "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}";

/// The special tokens of a scratch tokenizer. `<|end|>` ends a turn (the EOS a model stops
/// at); `<|endoftext|>` pads.
pub const SCRATCH_SPECIAL: [&str; 5] = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"];

pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
    pub bos: Option<(String, u32)>,
    /// The token that ends the assistant's turn (generation stops here).
    pub eos: Option<(String, u32)>,
    pub pad: Option<(String, u32)>,
    /// Prepend BOS when the rendered prompt does not start with it.
    pub add_bos: bool,
    /// The original `tokenizer_config.json`, preserved on save.
    config: Value,
}

/// A special token in tokenizer_config.json: a string or an `AddedToken` object.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    fn with_id(inner: &tokenizers::Tokenizer, text: Option<String>) -> Option<(String, u32)> {
        let t = text?;
        inner.token_to_id(&t).map(|id| (t, id))
    }

    /// A tokenizer assembled from parts (e.g. read from a GGUF file's metadata).
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        chat_template: Option<String>,
        bos: Option<(String, u32)>,
        eos: Option<(String, u32)>,
        pad: Option<(String, u32)>,
        add_bos: bool,
    ) -> Tokenizer {
        Tokenizer { inner, chat_template, bos, eos, pad, add_bos, config: json!({}) }
    }

    /// Reads `tokenizer.json` and `tokenizer_config.json` (optional) from a model folder.
    pub fn load(dir: &Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ModelError::MissingFile(path));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let config: Value = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|e| ModelError::Config(format!("{}: {e}", cfg_path.display())))?
        } else {
            json!({})
        };
        let chat_template = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        let bos = Self::with_id(&inner, token_text(config.get("bos_token")));
        let eos = Self::with_id(&inner, token_text(config.get("eos_token")));
        let pad = Self::with_id(&inner, token_text(config.get("pad_token")));
        let add_bos = config.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false);
        Ok(Tokenizer { inner, chat_template, bos, eos, pad, add_bos, config })
    }

    /// Trains a byte-level BPE of at most `vocab` tokens on `texts` (GPT-2's pre-tokenizer,
    /// no prefix space), with forge's scratch special tokens and chat template.
    pub fn train_bpe<I: Iterator<Item = String> + Send>(texts: I, vocab: usize) -> Result<Tokenizer> {
        let special: Vec<AddedToken> = SCRATCH_SPECIAL.iter().map(|s| AddedToken::from(*s, true)).collect();
        let mut trainer = TrainerWrapper::BpeTrainer(
            BpeTrainerBuilder::new()
                .vocab_size(vocab)
                .min_frequency(2)
                .show_progress(false)
                .special_tokens(special)
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .build(),
        );
        let byte_level = ByteLevel::new(false, true, true);
        let mut imp: TokenizerImpl<_, _, _, _, _> = tokenizers::TokenizerBuilder::new()
            .with_model(tokenizers::ModelWrapper::BPE(BPE::default()))
            .with_normalizer(None::<tokenizers::NormalizerWrapper>)
            .with_pre_tokenizer(Some(tokenizers::PreTokenizerWrapper::ByteLevel(byte_level)))
            .with_post_processor(Some(tokenizers::PostProcessorWrapper::ByteLevel(byte_level)))
            .with_decoder(Some(tokenizers::DecoderWrapper::ByteLevel(byte_level)))
            .build()
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        imp.train(&mut trainer, texts).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let inner = tokenizers::Tokenizer::from(imp);
        let config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": SCRATCH_CHAT_TEMPLATE,
            "eos_token": "<|end|>",
            "pad_token": "<|endoftext|>",
            "bos_token": null,
            "add_bos_token": false,
            "add_eos_token": false,
            "model_max_length": 1_000_000,
            "clean_up_tokenization_spaces": false,
        });
        Ok(Tokenizer {
            chat_template: Some(SCRATCH_CHAT_TEMPLATE.to_string()),
            bos: None,
            eos: Self::with_id(&inner, Some("<|end|>".into())),
            pad: Self::with_id(&inner, Some("<|endoftext|>".into())),
            add_bos: false,
            inner,
            config,
        })
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.inner.save(&path, false).map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let mut config = self.config.clone();
        if let Some(t) = &self.chat_template {
            config["chat_template"] = json!(t);
        }
        let path = dir.join("tokenizer_config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&config).expect("serializes") + "\n")
            .map_err(|e| ModelError::io(&path, e))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; special tokens written in the text are recognised as such.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The prompt's ids, with BOS prepended when the tokenizer wants one and the template
    /// did not write it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        if let (true, Some((_, bos))) = (self.add_bos, &self.bos)
            && ids.first() != Some(bos)
        {
            ids.insert(0, *bos);
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Renders the chat template (or, without one, the scratch format).
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_deref().unwrap_or(SCRATCH_CHAT_TEMPLATE);
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", template).map_err(|e| ModelError::Template(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages.to_vec())),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_ref().map(|b| b.0.clone()).unwrap_or_default(),
            eos_token => self.eos.as_ref().map(|e| e.0.clone()).unwrap_or_default(),
        };
        env.get_template("chat").and_then(|t| t.render(ctx)).map_err(|e| ModelError::Template(e.to_string()))
    }

    /// What the template writes after an assistant message's content (e.g. `<|end|>\n`,
    /// `<|eot_id|>`, `<|im_end|>\n`): the end of turn a model must learn to produce. Found by
    /// rendering a conversation with a sentinel answer and checking that the prompt is a prefix.
    pub fn completion_suffix(&self) -> Result<String> {
        const SENTINEL: &str = "\u{1}forge-answer\u{1}";
        let user = ChatMessage::new("user", "hello");
        let prompt = self.render_chat(std::slice::from_ref(&user), true)?;
        let full = self.render_chat(&[user, ChatMessage::new("assistant", SENTINEL)], false)?;
        let at = full
            .find(SENTINEL)
            .ok_or_else(|| ModelError::Template("the chat template drops the assistant's message".into()))?;
        if full[..at] != prompt {
            return Err(ModelError::Template(
                "the chat template's generation prompt is not a prefix of a rendered answer".into(),
            ));
        }
        let suffix = &full[at + SENTINEL.len()..];
        if suffix.is_empty() {
            // No end-of-turn marker in the template: end with the EOS token.
            return Ok(self.eos.as_ref().map(|e| e.0.clone()).unwrap_or_default());
        }
        Ok(suffix.to_string())
    }

    /// The tokens generation stops at: the EOS tokens, and the end-of-turn token the chat
    /// template writes after an answer (`<end_of_turn>`, `<|im_end|>`, ...) when that is a
    /// token of its own.
    pub fn stop_ids(&self, model_eos: &[u32]) -> Vec<u32> {
        let mut stop: Vec<u32> = self.eos.iter().map(|e| e.1).chain(model_eos.iter().copied()).collect();
        if let Ok(suffix) = self.completion_suffix() {
            let end_of_turn =
                self.inner.get_added_vocabulary().get_vocab().iter().find(|(t, _)| suffix.starts_with(t.as_str()));
            if let Some((_, id)) = end_of_turn {
                stop.push(*id);
            }
        }
        stop.sort_unstable();
        stop.dedup();
        stop
    }

    /// The text after which the assistant's answer begins, for a user message `input`
    /// (and an optional system message).
    pub fn prompt(&self, system: Option<&str>, input: &str) -> Result<String> {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(ChatMessage::new("system", s));
        }
        messages.push(ChatMessage::new("user", input));
        self.render_chat(&messages, true)
    }
}
