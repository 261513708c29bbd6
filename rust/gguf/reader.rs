//! A bounded little-endian cursor over the file bytes. Every read is checked against what
//! remains, so no length or count taken from the file can make us read past its end or
//! allocate more than the file could describe.

use crate::error::{EngineError, Result};

/// Longest string we accept (llama.cpp's cap): a length field beyond this is corruption,
/// not a real key, value or token.
pub const MAX_STRING_BYTES: u64 = 1 << 30;

pub(crate) struct ByteReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> ByteReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    /// Byte offset of the next read, from the start of the file.
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// The next `n` bytes; `context` names what is being read for the error message.
    pub fn take(&mut self, n: u64, context: &str) -> Result<&'a [u8]> {
        let remaining = self.remaining();
        let n_usize = usize::try_from(n)
            .ok()
            .filter(|&n| n <= remaining)
            .ok_or_else(|| {
                EngineError::malformed(
                    context,
                    format!(
                        "file truncated: need {n} bytes at offset {}, only {remaining} remain",
                        self.pos
                    ),
                )
            })?;
        let start = self.pos;
        self.pos += n_usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, context: &str) -> Result<[u8; N]> {
        let slice = self.take(N as u64, context)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    pub fn u8(&mut self, context: &str) -> Result<u8> {
        Ok(self.array::<1>(context)?[0])
    }

    pub fn i8(&mut self, context: &str) -> Result<i8> {
        Ok(i8::from_le_bytes(self.array(context)?))
    }

    pub fn u16(&mut self, context: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(context)?))
    }

    pub fn i16(&mut self, context: &str) -> Result<i16> {
        Ok(i16::from_le_bytes(self.array(context)?))
    }

    pub fn u32(&mut self, context: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(context)?))
    }

    pub fn i32(&mut self, context: &str) -> Result<i32> {
        Ok(i32::from_le_bytes(self.array(context)?))
    }

    pub fn u64(&mut self, context: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(context)?))
    }

    pub fn i64(&mut self, context: &str) -> Result<i64> {
        Ok(i64::from_le_bytes(self.array(context)?))
    }

    pub fn f32(&mut self, context: &str) -> Result<f32> {
        Ok(f32::from_le_bytes(self.array(context)?))
    }

    pub fn f64(&mut self, context: &str) -> Result<f64> {
        Ok(f64::from_le_bytes(self.array(context)?))
    }

    /// A GGUF bool is one byte; anything but 0 or 1 means the bytes are not what the
    /// type id claims.
    pub fn bool(&mut self, context: &str) -> Result<bool> {
        let offset = self.pos;
        match self.u8(context)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(EngineError::malformed(
                context,
                format!("bool at offset {offset} has byte value {other}, expected 0 or 1"),
            )),
        }
    }

    /// A u64 byte length followed by that many UTF-8 bytes.
    pub fn str(&mut self, context: &str) -> Result<&'a str> {
        let offset = self.pos;
        let len = self.u64(context)?;
        if len > MAX_STRING_BYTES {
            return Err(EngineError::malformed(
                context,
                format!(
                    "string length {len} at offset {offset} exceeds the limit of {MAX_STRING_BYTES} bytes"
                ),
            ));
        }
        let bytes = self.take(len, context)?;
        std::str::from_utf8(bytes).map_err(|e| {
            EngineError::malformed(
                context,
                format!("string at offset {offset} is not valid UTF-8: {e}"),
            )
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_little_endian_and_tracks_position() {
        let bytes = [1u8, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0xff];
        let mut r = ByteReader::new(&bytes);
        assert_eq!(r.u32("a").ok(), Some(1));
        assert_eq!(r.u64("b").ok(), Some(2));
        assert_eq!(r.position(), 12);
        assert_eq!(r.i8("c").ok(), Some(-1));
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn short_read_names_context_and_offset() {
        let mut r = ByteReader::new(&[1, 2, 3]);
        let err = r.u32("header version").unwrap_err().to_string();
        assert!(
            err.contains("header version") && err.contains("offset 0"),
            "{err}"
        );
        // A failed read consumes nothing.
        assert_eq!(r.remaining(), 3);
    }

    #[test]
    fn huge_string_length_is_rejected_before_reading() {
        let mut bytes = (MAX_STRING_BYTES + 1).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"abc");
        let err = ByteReader::new(&bytes).str("key").unwrap_err().to_string();
        assert!(err.contains("exceeds the limit"), "{err}");

        let mut bytes = 100u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"abc");
        let err = ByteReader::new(&bytes).str("key").unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn invalid_utf8_and_bad_bool_are_errors() {
        let mut bytes = 2u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0xc3, 0x28]);
        let err = ByteReader::new(&bytes)
            .str("tokenizer.ggml.tokens")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer.ggml.tokens") && err.contains("UTF-8"),
            "{err}"
        );
        let err = ByteReader::new(&[2]).bool("flag").unwrap_err().to_string();
        assert!(err.contains("byte value 2"), "{err}");
    }
}
