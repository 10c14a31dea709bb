//! A small length-prefixed binary encoding with a trailing BLAKE3 checksum.
//!
//! The stat cache and the build state are read on every `forge build`, including no-ops, so
//! they are stored compactly and decoded without a parser. The checksum makes a torn or
//! corrupted file detectable: it is then ignored (and rebuilt), never trusted.

use crate::digest::Digest;

pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    pub fn new(magic: &[u8]) -> Self {
        Encoder { buf: magic.to_vec() }
    }

    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn bool(&mut self, v: bool) {
        self.buf.push(v as u8);
    }

    pub fn bytes(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        self.buf.extend_from_slice(v);
    }

    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }

    pub fn digest(&mut self, d: &Digest) {
        self.buf.extend_from_slice(&d.0);
    }

    /// The encoded bytes followed by their checksum.
    pub fn finish(mut self) -> Vec<u8> {
        let sum = blake3::hash(&self.buf);
        self.buf.extend_from_slice(sum.as_bytes());
        self.buf
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("wrong format (expected {0})")]
    Magic(String),
    #[error("checksum mismatch: the file is torn or corrupted")]
    Checksum,
    #[error("truncated")]
    Truncated,
    #[error("invalid UTF-8")]
    Utf8,
}

pub struct Decoder<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    /// Checks the magic prefix and the trailing checksum.
    pub fn new(data: &'a [u8], magic: &[u8]) -> Result<Self, DecodeError> {
        if data.len() < magic.len() + 32 || !data.starts_with(magic) {
            return Err(DecodeError::Magic(String::from_utf8_lossy(magic).trim().to_string()));
        }
        let (body, sum) = data.split_at(data.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(DecodeError::Checksum);
        }
        Ok(Decoder { data: body, pos: magic.len() })
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.data.len()).ok_or(DecodeError::Truncated)?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| DecodeError::Truncated)?))
    }

    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().map_err(|_| DecodeError::Truncated)?))
    }

    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        Ok(self.take(1)?[0] != 0)
    }

    pub fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u64()? as usize;
        self.take(n)
    }

    pub fn str(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| DecodeError::Utf8)
    }

    pub fn digest(&mut self) -> Result<Digest, DecodeError> {
        let mut d = [0u8; 32];
        d.copy_from_slice(self.take(32)?);
        Ok(Digest(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_detects_corruption() {
        let mut e = Encoder::new(b"test-v1\n");
        e.u64(7);
        e.str("héllo");
        e.digest(&Digest::of(b"x"));
        e.bool(true);
        let mut data = e.finish();
        let mut d = Decoder::new(&data, b"test-v1\n").unwrap();
        assert_eq!(d.u64().unwrap(), 7);
        assert_eq!(d.str().unwrap(), "héllo");
        assert_eq!(d.digest().unwrap(), Digest::of(b"x"));
        assert!(d.bool().unwrap());
        assert!(d.is_empty());
        data[10] ^= 1;
        assert!(matches!(Decoder::new(&data, b"test-v1\n"), Err(DecodeError::Checksum)));
        assert!(matches!(Decoder::new(&data, b"other-v1\n"), Err(DecodeError::Magic(_))));
        assert!(matches!(Decoder::new(&data[..20], b"test-v1\n"), Err(DecodeError::Magic(_))));
    }
}
