//! A bounds-checked reader for the protobuf wire format, enough for `sentencepiece.ModelProto`:
//! varints, fixed 32/64-bit values and length-delimited fields. Every read is checked against
//! the bytes that remain, so a truncated or hostile file gives an error naming the message
//! and the byte offset, never a panic or an out-of-bounds read.

use crate::error::{EngineError, Result};

/// A varint is at most 10 bytes (64 bits in 7-bit groups).
const MAX_VARINT_BYTES: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum WireValue<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Field<'a> {
    pub number: u32,
    pub value: WireValue<'a>,
    /// Offset of the field's tag from the start of the file.
    pub offset: usize,
    /// Offset of the field's value (after the length, for length-delimited fields).
    pub payload_offset: usize,
}

/// Iterates over the fields of one message.
#[derive(Debug, Clone)]
pub(super) struct ProtoReader<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of `data` from the start of the file, for error messages.
    base: usize,
    message: &'a str,
}

pub(super) fn malformed(message: &str, offset: usize, what: impl std::fmt::Display) -> EngineError {
    EngineError::malformed(
        format!("SentencePiece model, {message} at byte {offset}"),
        what.to_string(),
    )
}

impl<'a> ProtoReader<'a> {
    /// Reads the message in `data`, which starts `base` bytes into the file; `message` names it
    /// in errors (e.g. "ModelProto.pieces[12]").
    pub fn new(data: &'a [u8], base: usize, message: &'a str) -> ProtoReader<'a> {
        ProtoReader {
            data,
            pos: 0,
            base,
            message,
        }
    }

    fn error(&self, at: usize, what: impl std::fmt::Display) -> EngineError {
        malformed(self.message, self.base.saturating_add(at), what)
    }

    fn varint(&mut self) -> Result<u64> {
        let start = self.pos;
        let mut value = 0u64;
        for i in 0..MAX_VARINT_BYTES {
            let Some(&byte) = self.data.get(self.pos) else {
                return Err(self.error(start, "truncated varint"));
            };
            self.pos += 1;
            // The tenth byte carries only the top bit; protobuf drops anything above it.
            value |= u64::from(byte & 0x7f).wrapping_shl(7 * i as u32);
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(self.error(start, "varint longer than 10 bytes"))
    }

    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8]> {
        let start = self.pos;
        let end = start
            .checked_add(len)
            .filter(|&end| end <= self.data.len())
            .ok_or_else(|| {
                self.error(
                    start,
                    format!(
                        "{what} of {len} bytes runs past the end ({} bytes left)",
                        self.data.len() - start
                    ),
                )
            })?;
        self.pos = end;
        Ok(&self.data[start..end])
    }

    /// The next field, or `None` at the end of the message.
    pub fn next_field(&mut self) -> Result<Option<Field<'a>>> {
        if self.pos >= self.data.len() {
            return Ok(None);
        }
        let offset = self.base.saturating_add(self.pos);
        let tag_at = self.pos;
        let tag = self.varint()?;
        let number = u32::try_from(tag >> 3)
            .ok()
            .filter(|&n| n != 0 && n < (1 << 29))
            .ok_or_else(|| self.error(tag_at, format!("invalid field number in tag {tag}")))?;
        let mut payload_at = self.pos;
        let value = match tag & 7 {
            0 => WireValue::Varint(self.varint()?),
            1 => {
                let bytes = self.take(8, "fixed64 value")?;
                let mut word = [0u8; 8];
                word.copy_from_slice(bytes);
                WireValue::Fixed64(u64::from_le_bytes(word))
            }
            2 => {
                let len_at = self.pos;
                let len = self.varint()?;
                let len = usize::try_from(len)
                    .map_err(|_| self.error(len_at, format!("length {len} is too large")))?;
                payload_at = self.pos;
                WireValue::Bytes(self.take(len, &format!("field {number}"))?)
            }
            5 => {
                let bytes = self.take(4, "fixed32 value")?;
                let mut word = [0u8; 4];
                word.copy_from_slice(bytes);
                WireValue::Fixed32(u32::from_le_bytes(word))
            }
            wire => {
                // 3 and 4 are the deprecated groups, which no SentencePiece file uses.
                return Err(self.error(
                    tag_at,
                    format!("field {number} has unsupported wire type {wire}"),
                ));
            }
        };
        Ok(Some(Field {
            number,
            value,
            offset,
            payload_offset: self.base.saturating_add(payload_at),
        }))
    }
}

impl<'a> Field<'a> {
    fn wrong_type(&self, message: &str, name: &str, expected: &str) -> EngineError {
        malformed(
            message,
            self.offset,
            format!(
                "field {name} (number {}) should be {expected}, found {:?}",
                self.number,
                WireKind(&self.value)
            ),
        )
    }

    pub fn varint(&self, message: &str, name: &str) -> Result<u64> {
        match self.value {
            WireValue::Varint(v) => Ok(v),
            _ => Err(self.wrong_type(message, name, "a varint")),
        }
    }

    /// An `int32` or enum: negative values are sign-extended to 64 bits on the wire, and
    /// protobuf keeps the low 32 bits.
    pub fn int32(&self, message: &str, name: &str) -> Result<i32> {
        Ok(self.varint(message, name)? as u32 as i32)
    }

    pub fn bool(&self, message: &str, name: &str) -> Result<bool> {
        Ok(self.varint(message, name)? != 0)
    }

    pub fn float(&self, message: &str, name: &str) -> Result<f32> {
        match self.value {
            WireValue::Fixed32(bits) => Ok(f32::from_bits(bits)),
            _ => Err(self.wrong_type(message, name, "a fixed32 float")),
        }
    }

    pub fn bytes(&self, message: &str, name: &str) -> Result<&'a [u8]> {
        match self.value {
            WireValue::Bytes(bytes) => Ok(bytes),
            _ => Err(self.wrong_type(message, name, "length-delimited")),
        }
    }

    pub fn string(&self, message: &str, name: &str) -> Result<String> {
        let bytes = self.bytes(message, name)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| {
            malformed(
                message,
                self.offset,
                format!("field {name} is not valid UTF-8 ({e})"),
            )
        })
    }
}

/// The wire type of a value, for error messages.
struct WireKind<'v, 'a>(&'v WireValue<'a>);

impl std::fmt::Debug for WireKind<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            WireValue::Varint(_) => "a varint",
            WireValue::Fixed64(_) => "a fixed64",
            WireValue::Bytes(_) => "length-delimited bytes",
            WireValue::Fixed32(_) => "a fixed32",
        })
    }
}

/// Writing the wire format, for tests that build `.model` files by hand.
#[cfg(test)]
pub(super) mod write {
    pub fn varint(out: &mut Vec<u8>, mut value: u64) {
        while value >= 0x80 {
            out.push((value as u8) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    pub fn tag(out: &mut Vec<u8>, number: u32, wire: u8) {
        varint(out, u64::from(number) << 3 | u64::from(wire));
    }

    pub fn uint(out: &mut Vec<u8>, number: u32, value: u64) {
        tag(out, number, 0);
        varint(out, value);
    }

    pub fn int32(out: &mut Vec<u8>, number: u32, value: i32) {
        uint(out, number, value as i64 as u64);
    }

    pub fn float(out: &mut Vec<u8>, number: u32, value: f32) {
        tag(out, number, 5);
        out.extend_from_slice(&value.to_le_bytes());
    }

    pub fn bytes(out: &mut Vec<u8>, number: u32, value: &[u8]) {
        tag(out, number, 2);
        varint(out, value.len() as u64);
        out.extend_from_slice(value);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn fields(data: &[u8]) -> Result<Vec<(u32, WireValue<'_>)>> {
        let mut reader = ProtoReader::new(data, 0, "test");
        let mut out = Vec::new();
        while let Some(field) = reader.next_field()? {
            out.push((field.number, field.value));
        }
        Ok(out)
    }

    #[test]
    fn reads_every_wire_type() {
        let mut data = Vec::new();
        write::uint(&mut data, 1, 300);
        write::int32(&mut data, 2, -1);
        write::float(&mut data, 3, 1.5);
        write::bytes(&mut data, 40, b"hi");
        write::tag(&mut data, 5, 1);
        data.extend_from_slice(&7u64.to_le_bytes());
        assert_eq!(
            fields(&data).unwrap(),
            [
                (1, WireValue::Varint(300)),
                (2, WireValue::Varint(u64::MAX)),
                (3, WireValue::Fixed32(1.5f32.to_bits())),
                (40, WireValue::Bytes(b"hi")),
                (5, WireValue::Fixed64(7)),
            ]
        );
    }

    #[test]
    fn negative_int32_round_trips() {
        let mut data = Vec::new();
        write::int32(&mut data, 1, -7);
        let mut reader = ProtoReader::new(&data, 0, "m");
        let field = reader.next_field().unwrap().unwrap();
        assert_eq!(field.int32("m", "x").unwrap(), -7);
    }

    #[test]
    fn truncation_is_an_error_with_an_offset() {
        let mut data = Vec::new();
        write::bytes(&mut data, 1, b"hello");
        for cut in 1..data.len() {
            let err = fields(&data[..cut]).unwrap_err().to_string();
            assert!(err.contains("at byte"), "{err}");
        }
        let err = fields(&[0x0a, 0x80]).unwrap_err().to_string();
        assert!(err.contains("truncated varint"), "{err}");
    }

    #[test]
    fn rejects_huge_lengths_groups_and_field_zero() {
        let mut data = Vec::new();
        write::tag(&mut data, 1, 2);
        write::varint(&mut data, u64::MAX);
        assert!(fields(&data).unwrap_err().to_string().contains("runs past"));
        assert!(fields(&[0x0b])
            .unwrap_err()
            .to_string()
            .contains("wire type 3"));
        assert!(fields(&[0x00])
            .unwrap_err()
            .to_string()
            .contains("field number"));
        assert!(fields(&[0xff; 11])
            .unwrap_err()
            .to_string()
            .contains("longer than 10"));
    }

    #[test]
    fn wrong_wire_type_names_the_field() {
        let mut data = Vec::new();
        write::uint(&mut data, 2, 1);
        let mut reader = ProtoReader::new(&data, 100, "ModelProto.pieces[3]");
        let field = reader.next_field().unwrap().unwrap();
        let err = field
            .float("ModelProto.pieces[3]", "score")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pieces[3]") && err.contains("score") && err.contains("byte 100"),
            "{err}"
        );
    }
}
