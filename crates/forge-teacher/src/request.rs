//! Chat requests and responses, and the key a request is cached under.

use forge_cache::{Digest, canonical};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn system(content: impl Into<String>) -> Message {
        Message { role: "system".into(), content: content.into() }
    }
    pub fn user(content: impl Into<String>) -> Message {
        Message { role: "user".into(), content: content.into() }
    }
}

/// One call to a teacher. Everything that can change the answer is here, and all of it is in
/// the cache key — including the sample and repeat index, so that two samples (or two retries
/// of one sample) that happen to send the same messages get their own answers. The API key is
/// not here: it never changes the answer and must never reach the cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// `openai` or `grammar`.
    pub provider: String,
    pub model: String,
    pub base_url: String,
    pub messages: Vec<Message>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u32>,
    pub seed: Option<u64>,
    /// A JSON schema for structured output.
    pub response_schema: Option<serde_json::Value>,
    /// Which recipe node asks (`prompt` for the final answer): two nodes sending the same
    /// messages still get answers of their own.
    pub node: String,
    /// Which dataset sample this call serves.
    pub sample: u64,
    /// Which attempt at that sample (a rejected answer is asked for again with repeat + 1).
    pub repeat: u32,
}

/// Version of the request key derivation; part of every key.
const KEY_VERSION: &[u8] = b"forge-teacher-call-v1\0";

impl ChatRequest {
    pub fn key(&self) -> Digest {
        let v = serde_json::to_value(self).expect("requests serialize");
        let mut bytes = KEY_VERSION.to_vec();
        bytes.extend_from_slice(&canonical::to_vec(&v));
        Digest::of(&bytes)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, o: Usage) {
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    pub content: String,
    pub usage: Usage,
    pub finish_reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> ChatRequest {
        ChatRequest {
            provider: "openai".into(),
            model: "gpt-4o".into(),
            base_url: "https://api.openai.com/v1".into(),
            messages: vec![Message::user("hi")],
            temperature: Some(0.7),
            top_p: None,
            max_tokens: Some(100),
            seed: Some(7),
            response_schema: None,
            node: "prompt".into(),
            sample: 3,
            repeat: 0,
        }
    }

    type Change = Box<dyn Fn(&mut ChatRequest)>;

    #[test]
    fn every_identity_field_is_in_the_key() {
        let base = req().key();
        let variants: Vec<Change> = vec![
            Box::new(|r| r.model = "gpt-4o-mini".into()),
            Box::new(|r| r.provider = "grammar".into()),
            Box::new(|r| r.base_url = "http://127.0.0.1:1/v1".into()),
            Box::new(|r| r.messages[0].content = "hello".into()),
            Box::new(|r| r.temperature = Some(0.8)),
            Box::new(|r| r.top_p = Some(0.9)),
            Box::new(|r| r.max_tokens = None),
            Box::new(|r| r.seed = Some(8)),
            Box::new(|r| r.response_schema = Some(serde_json::json!({"type": "object"}))),
            Box::new(|r| r.node = "backstory".into()),
            Box::new(|r| r.sample = 4),
            Box::new(|r| r.repeat = 1),
        ];
        for change in variants {
            let mut r = req();
            change(&mut r);
            assert_ne!(r.key(), base, "{r:?}");
        }
        assert_eq!(req().key(), base);
    }
}
