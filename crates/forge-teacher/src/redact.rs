//! Keeping secrets out of error texts.
//!
//! A teacher's error body is written to the terminal, the `--json` event stream, build logs and
//! the dataset journal, and a careless (or hostile) server may echo the request's
//! `Authorization` header back in it. Every text that leaves the client is passed through a
//! [`Redactor`] holding the secrets the client knows: the API key and its obvious encodings
//! (percent-encoding, JSON string escaping, base64 of the key, of `Bearer KEY` and of the HTTP
//! Basic forms). Any run of at least [`MIN_RUN`] characters of one of them — or the whole of a
//! shorter one — is replaced by `[redacted]`, so an echo cut short by a server's own truncation
//! is caught too.

/// What a secret is replaced with.
pub const REDACTED: &str = "[redacted]";

/// The shortest piece of a secret that is redacted on its own (a secret shorter than this is
/// redacted only whole).
pub const MIN_RUN: usize = 12;

/// At most this many bytes of a text are examined (and kept); error snippets are far shorter.
const MAX_TEXT: usize = 16 * 1024;

#[derive(Clone, Default)]
pub struct Redactor {
    /// Every form of every secret, as bytes.
    forms: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} forms)", self.forms.len())
    }
}

impl Redactor {
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Redactor {
        let mut forms: Vec<Vec<u8>> = Vec::new();
        for s in secrets {
            if s.is_empty() {
                continue;
            }
            let json = serde_json::to_string(s).unwrap_or_default();
            let json = json.trim_matches('"').to_string();
            let candidates = [
                s.to_string(),
                percent_encode(s),
                json,
                base64(s.as_bytes(), STANDARD),
                base64(s.as_bytes(), URL_SAFE),
                base64(format!("Bearer {s}").as_bytes(), STANDARD),
                base64(format!(":{s}").as_bytes(), STANDARD),
                base64(format!("{s}:").as_bytes(), STANDARD),
            ];
            for c in candidates {
                let c = c.trim_end_matches('=').as_bytes().to_vec();
                if !c.is_empty() && !forms.contains(&c) {
                    forms.push(c);
                }
            }
        }
        Redactor { forms }
    }

    pub fn is_empty(&self) -> bool {
        self.forms.is_empty()
    }

    /// `text` with every secret replaced by [`REDACTED`].
    pub fn redact(&self, text: &str) -> String {
        if self.forms.is_empty() {
            return text.to_string();
        }
        let mut cut = text.len().min(MAX_TEXT);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let t = &text.as_bytes()[..cut];
        let mut masked = vec![false; t.len()];
        let mut any = false;
        for form in &self.forms {
            let need = form.len().min(MIN_RUN);
            // run[j]: the length of the common run ending at text[i] and form[j - 1].
            let mut prev = vec![0usize; form.len() + 1];
            let mut cur = vec![0usize; form.len() + 1];
            for (i, &b) in t.iter().enumerate() {
                let mut best = 0;
                for j in 1..=form.len() {
                    cur[j] = if form[j - 1] == b { prev[j - 1] + 1 } else { 0 };
                    best = best.max(cur[j]);
                }
                if best >= need {
                    masked[i + 1 - best..=i].iter_mut().for_each(|m| *m = true);
                    any = true;
                }
                std::mem::swap(&mut prev, &mut cur);
            }
        }
        let tail = if cut < text.len() { "…" } else { "" };
        if !any {
            return format!("{}{tail}", &text[..cut]);
        }
        // Every form is ASCII, so masked bytes are ASCII and the rest stays valid UTF-8.
        let mut out = Vec::with_capacity(t.len());
        let mut i = 0;
        while i < t.len() {
            if masked[i] {
                out.extend_from_slice(REDACTED.as_bytes());
                while i < t.len() && masked[i] {
                    i += 1;
                }
            } else {
                out.push(t[i]);
                i += 1;
            }
        }
        let mut s = String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        s.push_str(tail);
        s
    }
}

impl Redactor {
    /// `text` of any length, whole: every full form of every secret replaced; a text short
    /// enough for [`Redactor::redact`] (16 KiB) loses the pieces of them too.
    pub fn redact_long(&self, text: &str) -> String {
        if text.len() <= MAX_TEXT {
            return self.redact(text);
        }
        let mut out = text.to_string();
        for form in &self.forms {
            if let Ok(f) = std::str::from_utf8(form)
                && out.contains(f)
            {
                out = out.replace(f, REDACTED);
            }
        }
        out
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64 with padding.
pub(crate) fn base64(data: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(alphabet[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-test-Secret+Key/0123456789abcdef";

    #[test]
    fn base64_matches_rfc_4648() {
        assert_eq!(base64(b"", STANDARD), "");
        assert_eq!(base64(b"f", STANDARD), "Zg==");
        assert_eq!(base64(b"fo", STANDARD), "Zm8=");
        assert_eq!(base64(b"foo", STANDARD), "Zm9v");
        assert_eq!(base64(b"foobar", STANDARD), "Zm9vYmFy");
        assert_eq!(base64(&[0xfb, 0xff], URL_SAFE), "-_8=");
    }

    #[test]
    fn every_encoding_and_fragment_of_the_key_is_redacted() {
        let r = Redactor::new([KEY]);
        let texts = [
            format!("Invalid header: Bearer {KEY}"),
            format!("{{\"authorization\":\"Bearer {KEY}\"}}"),
            format!("key={}", percent_encode(KEY)),
            format!("b64 {}", base64(KEY.as_bytes(), STANDARD)),
            format!("b64url {}", base64(KEY.as_bytes(), URL_SAFE)),
            format!("basic {}", base64(format!(":{KEY}").as_bytes(), STANDARD)),
            format!("bearer64 {}", base64(format!("Bearer {KEY}").as_bytes(), STANDARD)),
            // A server that cut the echo short.
            format!("got {}…", &KEY[..20]),
            format!("ends with {}", &KEY[KEY.len() - 14..]),
        ];
        for t in &texts {
            let out = r.redact(t);
            assert!(out.contains(REDACTED), "{t} -> {out}");
            for form in &r.forms {
                for w in form.windows(MIN_RUN.min(form.len())) {
                    let w = std::str::from_utf8(w).unwrap();
                    assert!(!out.contains(w), "{t} -> {out} still holds {w:?}");
                }
            }
        }
        // Text without the key is unchanged, multibyte text included.
        assert_eq!(r.redact("HTTP 401: clé invalide — réessayez"), "HTTP 401: clé invalide — réessayez");
        // A short key is redacted only whole.
        let short = Redactor::new(["ollama"]);
        assert_eq!(short.redact("key ollama; model olla"), "key [redacted]; model olla");
        assert_eq!(Redactor::new([""]).redact("x"), "x");
    }
}
