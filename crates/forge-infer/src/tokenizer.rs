//! The model's tokenizer as a runtime needs it: chat prompts in the file's own template, the
//! tokens that end an answer, and text streamed while it is generated — never half a UTF-8
//! character, never the beginning of a stop string that may yet complete.

pub use forge_model::Tokenizer;
pub use forge_model::tokenizer::ChatMessage;

use crate::Result;

/// Text of a generation as it grows, one token at a time.
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// The text decoded so far, and how many of its bytes were handed out.
    text: String,
    sent: usize,
    stops: Vec<String>,
    stopped: bool,
}

impl<'a> TextStream<'a> {
    /// A stream that ends at the first of `stops` (which is not part of the answer).
    pub fn new(tok: &'a Tokenizer, stops: Vec<String>) -> TextStream<'a> {
        TextStream { tok, ids: Vec::new(), text: String::new(), sent: 0, stops, stopped: false }
    }

    /// Adds a token; returns the text that became final (perhaps empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.ids.push(id);
        self.text = self.tok.decode(&self.ids)?;
        if self.text.ends_with('\u{FFFD}') {
            // Most likely the first bytes of a character whose last come with the next token.
            return Ok(String::new());
        }
        Ok(self.release(false))
    }

    /// Whether a stop string ended the answer (later tokens add nothing).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The answer so far, up to the stop string if one came.
    pub fn answer(&self) -> &str {
        &self.text[..self.end()]
    }

    /// The rest of the text when generation ends: what was held back, unless it was the start
    /// of a stop string — which never completed, so it is the answer's.
    pub fn finish(&mut self) -> String {
        self.release(true)
    }

    /// Where the answer ends: at the first stop string, else at the end of the text.
    fn end(&self) -> usize {
        if !self.stopped {
            return self.text.len();
        }
        self.first_stop(floor_char_boundary(&self.text, self.sent.min(self.text.len()))).unwrap_or(self.text.len())
    }

    fn first_stop(&self, from: usize) -> Option<usize> {
        let from = floor_char_boundary(&self.text, from);
        self.stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[from..].find(s.as_str()))
            .min()
            .map(|p| from + p)
    }

    fn release(&mut self, all: bool) -> String {
        // A stop cannot begin inside text already handed out: that text was held while it could.
        // (A decoder may rewrite earlier text as tokens arrive; never cut inside a character.)
        let from = floor_char_boundary(&self.text, self.sent.min(self.text.len()));
        let upto = match self.first_stop(from) {
            Some(p) => {
                self.stopped = true;
                p
            }
            None if all => self.text.len(),
            None => self.text.len() - self.held_back(from),
        };
        let upto = upto.max(from);
        let out = self.text[from..upto].to_string();
        self.sent = upto;
        out
    }

    /// The longest tail of the text (after `from`) that a stop string begins with.
    fn held_back(&self, from: usize) -> usize {
        let tail = &self.text[from..];
        tail.char_indices()
            .map(|(i, _)| &tail[i..])
            .find(|t| self.stops.iter().any(|s| s.len() > t.len() && s.starts_with(*t)))
            .map_or(0, str::len)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let texts = ["HEAR YE, HEAR YE! The baron hoards grain. Ærøskøbing 🐉 END of poster".to_string()];
        Tokenizer::train_bpe(texts.into_iter().cycle().take(20), 300).unwrap()
    }

    /// Streamed pieces concatenate to the decoded answer, byte for byte, whatever the tokens.
    #[test]
    fn streamed_pieces_add_up_to_the_decoded_text() {
        let tok = tokenizer();
        let ids = tok.encode("The baron 🐉 hoards Ærøskøbing grain").unwrap();
        let mut s = TextStream::new(&tok, Vec::new());
        let mut out = String::new();
        for &id in &ids {
            let piece = s.push(id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "a piece holds half a character: {piece:?}");
            out.push_str(&piece);
        }
        out.push_str(&s.finish());
        assert_eq!(out, tok.decode(&ids).unwrap());
        assert!(!s.stopped());
    }

    /// A stop string ends the answer and is not part of it, even when it arrives over several
    /// tokens; text that only looked like its beginning is released at the end.
    #[test]
    fn stop_strings_end_the_answer_and_partial_matches_are_released() {
        let tok = tokenizer();
        let stops = vec!["END".to_string()];
        let ids = tok.encode("HEAR YE! END of poster").unwrap();
        let mut s = TextStream::new(&tok, stops.clone());
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&s.push(id).unwrap());
        }
        out.push_str(&s.finish());
        assert!(s.stopped());
        assert_eq!(out, "HEAR YE! ");
        assert_eq!(s.answer(), "HEAR YE! ");

        let stops = vec!["END!".to_string()];
        let ids = tok.encode("HEAR YE END").unwrap();
        let mut s = TextStream::new(&tok, stops.clone());
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&s.push(id).unwrap());
        }
        assert!(!out.ends_with("END"), "the possible start of a stop was held back: {out:?}");
        out.push_str(&s.finish());
        assert_eq!(out, "HEAR YE END");
        assert!(!s.stopped());
    }
}
