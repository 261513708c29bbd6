//! Typed GGUF metadata values, their parsing, and getters that say which key was missing
//! or had the wrong type.

use std::collections::HashMap;

use super::reader::ByteReader;
use crate::error::{EngineError, Result};

/// Most elements an array may declare (llama.cpp's cap).
pub const MAX_ARRAY_ELEMENTS: u64 = 1 << 30;

/// Arrays of arrays are legal GGUF but no real model nests deeply; the cap keeps a hostile
/// file from recursing the parser off the stack.
pub const MAX_ARRAY_DEPTH: usize = 4;

/// GGUF value type ids (gguf.h `enum gguf_type`).
mod type_id {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

#[derive(Clone, Debug, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(MetadataArray),
}

#[derive(Clone, Debug, PartialEq)]
pub enum MetadataArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<MetadataArray>),
}

impl MetadataValue {
    /// GGUF's name for the stored type, as used in error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "u8",
            Self::I8(_) => "i8",
            Self::U16(_) => "u16",
            Self::I16(_) => "i16",
            Self::U32(_) => "u32",
            Self::I32(_) => "i32",
            Self::U64(_) => "u64",
            Self::I64(_) => "i64",
            Self::F32(_) => "f32",
            Self::F64(_) => "f64",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(a) => a.type_name(),
        }
    }

    /// The value as an i128 when it is an integer: every GGUF integer type fits, so range
    /// checks against any target type are exact.
    fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            Self::U8(v) => v.into(),
            Self::I8(v) => v.into(),
            Self::U16(v) => v.into(),
            Self::I16(v) => v.into(),
            Self::U32(v) => v.into(),
            Self::I32(v) => v.into(),
            Self::U64(v) => v.into(),
            Self::I64(v) => v.into(),
            _ => return None,
        })
    }
}

impl MetadataArray {
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::U16(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::U64(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::F64(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::String(v) => v.len(),
            Self::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "array of u8",
            Self::I8(_) => "array of i8",
            Self::U16(_) => "array of u16",
            Self::I16(_) => "array of i16",
            Self::U32(_) => "array of u32",
            Self::I32(_) => "array of i32",
            Self::U64(_) => "array of u64",
            Self::I64(_) => "array of i64",
            Self::F32(_) => "array of f32",
            Self::F64(_) => "array of f64",
            Self::Bool(_) => "array of bool",
            Self::String(_) => "array of string",
            Self::Array(_) => "array of arrays",
        }
    }

    /// Integer elements widened to i128, or None for a non-integer array.
    fn integers(&self) -> Option<Box<dyn Iterator<Item = i128> + '_>> {
        fn widen<'a, T: Copy + Into<i128>>(v: &'a [T]) -> Box<dyn Iterator<Item = i128> + 'a> {
            Box::new(v.iter().map(|&x| x.into()))
        }
        Some(match self {
            Self::U8(v) => widen(v),
            Self::I8(v) => widen(v),
            Self::U16(v) => widen(v),
            Self::I16(v) => widen(v),
            Self::U32(v) => widen(v),
            Self::I32(v) => widen(v),
            Self::U64(v) => widen(v),
            Self::I64(v) => widen(v),
            _ => return None,
        })
    }
}

/// Ordered key -> value map; keys are unique (a duplicate makes the file malformed).
///
/// Typed getters return `Ok(None)` when the key is absent and a `MalformedFile` error naming
/// the key and the stored type when it has the wrong type. Integer getters accept any
/// integer type whose value fits the target; `require_*` turn absence into `MissingKey`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metadata {
    entries: Vec<(String, MetadataValue)>,
    index: HashMap<String, usize>,
}

fn key_context(key: &str) -> String {
    format!("metadata key '{key}'")
}

fn wrong_type(key: &str, expected: &str, found: &MetadataValue) -> EngineError {
    EngineError::malformed(
        key_context(key),
        format!("expected {expected}, found {}", found.type_name()),
    )
}

fn out_of_range(key: &str, target: &str, value: i128, found: &MetadataValue) -> EngineError {
    EngineError::malformed(
        key_context(key),
        format!(
            "value {value} (stored as {}) does not fit in {target}",
            found.type_name()
        ),
    )
}

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.index
            .get(key)
            .and_then(|&i| self.entries.get(i))
            .map(|(_, v)| v)
    }

    /// Keys in file order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }

    /// Key-value pairs in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &MetadataValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a pair; a key already present is an error naming it.
    pub(crate) fn insert(&mut self, key: String, value: MetadataValue) -> Result<()> {
        if self.index.contains_key(&key) {
            return Err(EngineError::malformed(
                key_context(&key),
                "duplicate metadata key",
            ));
        }
        self.index.insert(key.clone(), self.entries.len());
        self.entries.push((key, value));
        Ok(())
    }

    fn get_integer<T: TryFrom<i128>>(&self, key: &str, target: &str) -> Result<Option<T>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let wide = value
            .as_integer()
            .ok_or_else(|| wrong_type(key, target, value))?;
        T::try_from(wide)
            .map(Some)
            .map_err(|_| out_of_range(key, target, wide, value))
    }

    pub fn get_u32(&self, key: &str) -> Result<Option<u32>> {
        self.get_integer(key, "u32")
    }

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get_integer(key, "u64")
    }

    pub fn get_i64(&self, key: &str) -> Result<Option<i64>> {
        self.get_integer(key, "i64")
    }

    /// Accepts F32 or F64 (narrowed: hyperparameters stored as f64 are used as f32).
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetadataValue::F32(v)) => Ok(Some(*v)),
            Some(MetadataValue::F64(v)) => {
                let narrowed = *v as f32;
                if v.is_finite() && !narrowed.is_finite() {
                    return Err(EngineError::malformed(
                        key_context(key),
                        format!("value {v} (stored as f64) does not fit in f32"),
                    ));
                }
                Ok(Some(narrowed))
            }
            Some(other) => Err(wrong_type(key, "f32", other)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetadataValue::Bool(v)) => Ok(Some(*v)),
            Some(other) => Err(wrong_type(key, "bool", other)),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetadataValue::String(v)) => Ok(Some(v.as_str())),
            Some(other) => Err(wrong_type(key, "string", other)),
        }
    }

    pub fn get_str_array(&self, key: &str) -> Result<Option<&[String]>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetadataValue::Array(MetadataArray::String(v))) => Ok(Some(v.as_slice())),
            Some(other) => Err(wrong_type(key, "array of string", other)),
        }
    }

    pub fn get_f32_array(&self, key: &str) -> Result<Option<&[f32]>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetadataValue::Array(MetadataArray::F32(v))) => Ok(Some(v.as_slice())),
            Some(other) => Err(wrong_type(key, "array of f32", other)),
        }
    }

    pub fn get_i32_array(&self, key: &str) -> Result<Option<&[i32]>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetadataValue::Array(MetadataArray::I32(v))) => Ok(Some(v.as_slice())),
            Some(other) => Err(wrong_type(key, "array of i32", other)),
        }
    }

    /// Accepts an array of any integer type; every element must fit in u32.
    pub fn get_u32_array(&self, key: &str) -> Result<Option<Vec<u32>>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let elements = match value {
            MetadataValue::Array(array) => array.integers(),
            _ => None,
        }
        .ok_or_else(|| wrong_type(key, "array of integers", value))?;
        elements
            .enumerate()
            .map(|(i, wide)| {
                u32::try_from(wide).map_err(|_| {
                    EngineError::malformed(
                        key_context(key),
                        format!(
                            "element {i} = {wide} (in {}) does not fit in u32",
                            value.type_name()
                        ),
                    )
                })
            })
            .collect::<Result<Vec<u32>>>()
            .map(Some)
    }

    pub fn require_u32(&self, key: &str) -> Result<u32> {
        self.get_u32(key)?.ok_or_else(|| missing(key))
    }

    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.get_u64(key)?.ok_or_else(|| missing(key))
    }

    pub fn require_f32(&self, key: &str) -> Result<f32> {
        self.get_f32(key)?.ok_or_else(|| missing(key))
    }

    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.get_str(key)?.ok_or_else(|| missing(key))
    }
}

fn missing(key: &str) -> EngineError {
    EngineError::MissingKey {
        key: key.to_string(),
    }
}

/// Reads the `n_kv` key-value pairs that follow the GGUF header.
pub(crate) fn read_metadata(reader: &mut ByteReader<'_>, n_kv: u64) -> Result<Metadata> {
    let mut metadata = Metadata::default();
    for i in 0..n_kv {
        let key = reader.str(&format!("metadata key #{i}"))?;
        if key.is_empty() {
            return Err(EngineError::malformed(
                format!("metadata key #{i}"),
                "empty key name",
            ));
        }
        let context = key_context(key);
        let type_offset = reader.position();
        let type_id = reader.u32(&context)?;
        let value = read_value(reader, type_id, type_offset, &context)?;
        metadata.insert(key.to_string(), value)?;
    }
    Ok(metadata)
}

fn read_value(
    reader: &mut ByteReader<'_>,
    type_id: u32,
    type_offset: usize,
    context: &str,
) -> Result<MetadataValue> {
    Ok(match type_id {
        type_id::U8 => MetadataValue::U8(reader.u8(context)?),
        type_id::I8 => MetadataValue::I8(reader.i8(context)?),
        type_id::U16 => MetadataValue::U16(reader.u16(context)?),
        type_id::I16 => MetadataValue::I16(reader.i16(context)?),
        type_id::U32 => MetadataValue::U32(reader.u32(context)?),
        type_id::I32 => MetadataValue::I32(reader.i32(context)?),
        type_id::U64 => MetadataValue::U64(reader.u64(context)?),
        type_id::I64 => MetadataValue::I64(reader.i64(context)?),
        type_id::F32 => MetadataValue::F32(reader.f32(context)?),
        type_id::F64 => MetadataValue::F64(reader.f64(context)?),
        type_id::BOOL => MetadataValue::Bool(reader.bool(context)?),
        type_id::STRING => MetadataValue::String(reader.str(context)?.to_string()),
        type_id::ARRAY => MetadataValue::Array(read_array(reader, context, 1)?),
        other => return Err(unknown_type(context, other, type_offset)),
    })
}

fn unknown_type(context: &str, type_id: u32, offset: usize) -> EngineError {
    EngineError::malformed(
        context,
        format!("unknown value type id {type_id} at offset {offset}"),
    )
}

/// Smallest encoding of one element, used to bound a declared count by the bytes left
/// before anything is allocated.
fn min_element_bytes(type_id: u32) -> Option<u64> {
    Some(match type_id {
        type_id::U8 | type_id::I8 | type_id::BOOL => 1,
        type_id::U16 | type_id::I16 => 2,
        type_id::U32 | type_id::I32 | type_id::F32 => 4,
        type_id::U64 | type_id::I64 | type_id::F64 => 8,
        // A string is at least its u64 length.
        type_id::STRING => 8,
        // A nested array is at least its element type id and count.
        type_id::ARRAY => 12,
        _ => return None,
    })
}

fn read_n<T>(
    n: usize,
    reader: &mut ByteReader<'_>,
    context: &str,
    mut read_one: impl FnMut(&mut ByteReader<'_>, &str) -> Result<T>,
) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(read_one(reader, context)?);
    }
    Ok(out)
}

/// Reads a fixed-width little-endian array in one bounds check.
fn read_fixed<T, const N: usize>(
    n: usize,
    reader: &mut ByteReader<'_>,
    context: &str,
    decode: fn([u8; N]) -> T,
) -> Result<Vec<T>> {
    let total = (n as u64).saturating_mul(N as u64);
    let bytes = reader.take(total, context)?;
    Ok(bytes
        .chunks_exact(N)
        .map(|chunk| {
            let mut raw = [0u8; N];
            raw.copy_from_slice(chunk);
            decode(raw)
        })
        .collect())
}

fn read_array(reader: &mut ByteReader<'_>, context: &str, depth: usize) -> Result<MetadataArray> {
    if depth > MAX_ARRAY_DEPTH {
        return Err(EngineError::malformed(
            context,
            format!("arrays nested more than {MAX_ARRAY_DEPTH} deep"),
        ));
    }
    let header_offset = reader.position();
    let element_type = reader.u32(context)?;
    let count = reader.u64(context)?;
    let min_size = min_element_bytes(element_type)
        .ok_or_else(|| unknown_type(context, element_type, header_offset))?;
    if count > MAX_ARRAY_ELEMENTS {
        return Err(EngineError::malformed(
            context,
            format!(
                "array at offset {header_offset} declares {count} elements, more than the limit of {MAX_ARRAY_ELEMENTS}"
            ),
        ));
    }
    let remaining = reader.remaining() as u64;
    // count <= 2^30 and min_size <= 12, so the product cannot overflow u64.
    if count * min_size > remaining {
        return Err(EngineError::malformed(
            context,
            format!(
                "array at offset {header_offset} declares {count} elements of at least {min_size} bytes, but only {remaining} bytes remain"
            ),
        ));
    }
    // Bounded by the remaining bytes just above, so it fits in usize.
    let n = usize::try_from(count)
        .map_err(|_| EngineError::malformed(context, format!("array length {count} too large")))?;
    Ok(match element_type {
        type_id::U8 => MetadataArray::U8(reader.take(count, context)?.to_vec()),
        type_id::I8 => MetadataArray::I8(read_fixed(n, reader, context, i8::from_le_bytes)?),
        type_id::U16 => MetadataArray::U16(read_fixed(n, reader, context, u16::from_le_bytes)?),
        type_id::I16 => MetadataArray::I16(read_fixed(n, reader, context, i16::from_le_bytes)?),
        type_id::U32 => MetadataArray::U32(read_fixed(n, reader, context, u32::from_le_bytes)?),
        type_id::I32 => MetadataArray::I32(read_fixed(n, reader, context, i32::from_le_bytes)?),
        type_id::U64 => MetadataArray::U64(read_fixed(n, reader, context, u64::from_le_bytes)?),
        type_id::I64 => MetadataArray::I64(read_fixed(n, reader, context, i64::from_le_bytes)?),
        type_id::F32 => MetadataArray::F32(read_fixed(n, reader, context, f32::from_le_bytes)?),
        type_id::F64 => MetadataArray::F64(read_fixed(n, reader, context, f64::from_le_bytes)?),
        type_id::BOOL => MetadataArray::Bool(read_n(n, reader, context, |r, c| r.bool(c))?),
        type_id::STRING => MetadataArray::String(read_strings(n, reader, context)?),
        type_id::ARRAY => MetadataArray::Array(read_n(n, reader, context, |r, c| {
            read_array(r, c, depth + 1)
        })?),
        other => return Err(unknown_type(context, other, header_offset)),
    })
}

/// The token vocabulary is the one big string array (262,144 entries for Gemma 3), so this
/// loop does one allocation per string and formats an element index only on failure.
fn read_strings(n: usize, reader: &mut ByteReader<'_>, context: &str) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let s = reader.str(context).map_err(|e| match e {
            EngineError::MalformedFile { context, message } => EngineError::MalformedFile {
                context,
                message: format!("element {i}: {message}"),
            },
            other => other,
        })?;
        out.push(s.to_string());
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn metadata(pairs: Vec<(&str, MetadataValue)>) -> Metadata {
        let mut m = Metadata::default();
        for (k, v) in pairs {
            m.insert(k.to_string(), v).unwrap();
        }
        m
    }

    #[test]
    fn integer_getters_convert_losslessly_and_reject_out_of_range() {
        let m = metadata(vec![
            ("a", MetadataValue::U32(7)),
            ("neg", MetadataValue::I32(-3)),
            ("pos", MetadataValue::I32(5)),
            ("big", MetadataValue::U64(u64::MAX)),
            ("s", MetadataValue::String("x".into())),
        ]);
        assert_eq!(m.get_u64("a").unwrap(), Some(7));
        assert_eq!(m.get_i64("a").unwrap(), Some(7));
        assert_eq!(m.get_u32("pos").unwrap(), Some(5));
        assert_eq!(m.get_i64("neg").unwrap(), Some(-3));
        assert_eq!(m.get_u32("absent").unwrap(), None);

        let err = m.get_u32("neg").unwrap_err().to_string();
        assert!(
            err.contains("'neg'") && err.contains("-3") && err.contains("u32"),
            "{err}"
        );
        let err = m.get_i64("big").unwrap_err().to_string();
        assert!(
            err.contains("'big'") && err.contains(&u64::MAX.to_string()),
            "{err}"
        );
        let err = m.get_u32("s").unwrap_err().to_string();
        assert!(err.contains("'s'") && err.contains("found string"), "{err}");
    }

    #[test]
    fn float_bool_string_getters() {
        let m = metadata(vec![
            ("f", MetadataValue::F32(1.5)),
            ("d", MetadataValue::F64(0.25)),
            ("b", MetadataValue::Bool(true)),
            ("s", MetadataValue::String("llama".into())),
            ("i", MetadataValue::U32(1)),
        ]);
        assert_eq!(m.get_f32("f").unwrap(), Some(1.5));
        assert_eq!(m.get_f32("d").unwrap(), Some(0.25));
        assert_eq!(m.get_bool("b").unwrap(), Some(true));
        assert_eq!(m.get_str("s").unwrap(), Some("llama"));
        assert!(m
            .get_f32("i")
            .unwrap_err()
            .to_string()
            .contains("found u32"));
        assert!(m.get_bool("s").is_err());
        assert!(m.get_str("b").is_err());
        assert_eq!(m.require_str("s").unwrap(), "llama");
        assert!(
            matches!(m.require_u32("nope"), Err(EngineError::MissingKey { key }) if key == "nope")
        );
        assert!(matches!(
            m.require_f32("nope"),
            Err(EngineError::MissingKey { .. })
        ));
    }

    #[test]
    fn array_getters() {
        let m = metadata(vec![
            (
                "tokens",
                MetadataValue::Array(MetadataArray::String(vec!["a".into(), "b".into()])),
            ),
            (
                "scores",
                MetadataValue::Array(MetadataArray::F32(vec![0.5, -1.0])),
            ),
            (
                "types",
                MetadataValue::Array(MetadataArray::I32(vec![1, 3])),
            ),
            ("u8s", MetadataValue::Array(MetadataArray::U8(vec![1, 255]))),
            (
                "negs",
                MetadataValue::Array(MetadataArray::I64(vec![1, -1])),
            ),
        ]);
        assert_eq!(m.get_str_array("tokens").unwrap().unwrap(), ["a", "b"]);
        assert_eq!(m.get_f32_array("scores").unwrap().unwrap(), [0.5, -1.0]);
        assert_eq!(m.get_i32_array("types").unwrap().unwrap(), [1, 3]);
        assert_eq!(m.get_u32_array("types").unwrap().unwrap(), vec![1, 3]);
        assert_eq!(m.get_u32_array("u8s").unwrap().unwrap(), vec![1, 255]);
        let err = m.get_u32_array("negs").unwrap_err().to_string();
        assert!(
            err.contains("'negs'") && err.contains("element 1 = -1"),
            "{err}"
        );
        let err = m.get_str_array("scores").unwrap_err().to_string();
        assert!(
            err.contains("expected array of string, found array of f32"),
            "{err}"
        );
        assert!(m.get_u32_array("tokens").is_err());
        assert_eq!(m.get_f32_array("absent").unwrap(), None);
    }

    #[test]
    fn keys_keep_file_order_and_duplicates_are_rejected() {
        let mut m = metadata(vec![
            ("z", MetadataValue::U8(1)),
            ("a", MetadataValue::U8(2)),
        ]);
        assert_eq!(m.keys().collect::<Vec<_>>(), ["z", "a"]);
        let err = m
            .insert("z".into(), MetadataValue::U8(3))
            .unwrap_err()
            .to_string();
        assert!(err.contains("duplicate") && err.contains("'z'"), "{err}");
        assert_eq!(m.len(), 2);
    }
}
