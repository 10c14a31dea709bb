//! The GGUF container (version 3, read back to version 2): a header, typed key/value metadata,
//! tensor descriptors, and aligned tensor data.
//!
//! ```text
//! "GGUF" u32:version u64:n_tensors u64:n_kv
//! n_kv × (string:key u32:type value)
//! n_tensors × (string:name u32:n_dims u64×n_dims:ne (innermost first) u32:ggml_type u64:offset)
//! padding to `general.alignment` (default 32)
//! tensor data, each tensor at its offset from the start of this section, aligned
//! ```
//! Strings are a u64 byte length and UTF-8 bytes; arrays are a u32 element type, a u64 count and
//! the elements. Everything is little-endian.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::GgufError;
use crate::types::GgmlType;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// Any integer, widened.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    /// Any number, widened.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// A JSON rendering (long arrays abbreviated when `abbreviate`).
    pub fn to_json(&self, abbreviate: bool) -> serde_json::Value {
        use serde_json::json;
        match self {
            Value::Array(a) if abbreviate && a.len() > 8 => {
                let head: Vec<serde_json::Value> = a.iter().take(4).map(|v| v.to_json(true)).collect();
                json!({ "len": a.len(), "type": a.first().map(Value::type_name), "first": head })
            }
            Value::Array(a) => serde_json::Value::Array(a.iter().map(|v| v.to_json(abbreviate)).collect()),
            Value::String(s) => json!(s),
            Value::Bool(b) => json!(b),
            Value::F32(v) => json!(v),
            Value::F64(v) => json!(v),
            other => json!(other.as_u64().map(serde_json::Value::from).unwrap_or_else(|| match other {
                Value::I8(v) => json!(v),
                Value::I16(v) => json!(v),
                Value::I32(v) => json!(v),
                Value::I64(v) => json!(v),
                _ => serde_json::Value::Null,
            })),
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::String(s.to_string())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::String(s)
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::U32(v)
    }
}
impl From<f32> for Value {
    fn from(v: f32) -> Value {
        Value::F32(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Bool(v)
    }
}

/// A tensor to write: its GGUF name, shape in PyTorch order (outermost first, as `[out, in]`),
/// type, and encoded bytes.
#[derive(Clone, Debug)]
pub struct TensorData {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
}

/// A tensor in a file: where its data is.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// PyTorch order (outermost first); GGUF stores the reverse (`ne`).
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub bytes: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

fn pad(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}

fn write_string(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut impl Write, v: &Value) -> io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[*x as u8]),
        Value::String(s) => write_string(w, s),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Array(items) => {
            let ty = items.first().map(Value::type_id).unwrap_or(Value::U8(0).type_id());
            if items.iter().any(|i| i.type_id() != ty) {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "a GGUF array must hold one element type"));
            }
            w.write_all(&ty.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for i in items {
                write_value(w, i)?;
            }
            Ok(())
        }
    }
}

/// The alignment a file with this metadata uses: `general.alignment`, else 32.
pub fn alignment(metadata: &[(String, Value)]) -> u64 {
    metadata.iter().find(|(k, _)| k == "general.alignment").and_then(|(_, v)| v.as_u64()).unwrap_or(DEFAULT_ALIGNMENT)
}

/// The bytes of a GGUF v3 file before its tensor data — magic, counts, metadata in the order
/// given, tensor descriptors (name, shape, type; data offsets follow from the types) — padded
/// to the [`alignment`]. Each tensor's data must then follow in order, padded to the alignment
/// with zeros: what [`write`] does, for writers that produce the data as they go.
pub fn header(metadata: &[(String, Value)], tensors: &[(&str, &[usize], GgmlType)]) -> Result<Vec<u8>, GgufError> {
    let align = alignment(metadata);
    let mut head = Vec::new();
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        write_string(&mut head, k)?;
        head.extend_from_slice(&v.type_id().to_le_bytes());
        write_value(&mut head, v)?;
    }
    let mut offset = 0u64;
    for (name, shape, ty) in tensors {
        let bytes = ty.bytes_for(shape)? as u64;
        write_string(&mut head, name)?;
        head.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            head.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        head.extend_from_slice(&(ty.id()).to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset = pad(offset + bytes, align);
    }
    let data_start = pad(head.len() as u64, align);
    head.resize(data_start as usize, 0);
    Ok(head)
}

/// Writes a GGUF v3 file. Metadata keys are written in the order given; `general.alignment`
/// is honoured if present.
pub fn write(w: &mut impl Write, metadata: &[(String, Value)], tensors: &[TensorData]) -> Result<(), GgufError> {
    let align = alignment(metadata);
    for t in tensors {
        let expected = t.ty.bytes_for(&t.shape)?;
        if expected != t.data.len() {
            return Err(GgufError::Invalid(format!(
                "tensor {}: {} bytes of data, but {:?} as {} takes {expected}",
                t.name,
                t.data.len(),
                t.shape,
                t.ty
            )));
        }
    }
    let descriptors: Vec<(&str, &[usize], GgmlType)> =
        tensors.iter().map(|t| (t.name.as_str(), t.shape.as_slice(), t.ty)).collect();
    w.write_all(&header(metadata, &descriptors)?)?;
    let mut written = 0u64;
    for t in tensors {
        w.write_all(&t.data)?;
        written += t.data.len() as u64;
        let padded = pad(written, align);
        w.write_all(&vec![0u8; (padded - written) as usize])?;
        written = padded;
    }
    Ok(())
}

/// A parsed GGUF file: metadata in file order, tensor descriptors, where the data starts.
#[derive(Clone, Debug)]
pub struct Gguf {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_start: u64,
    pub file_size: u64,
}

struct Reader<R> {
    r: R,
    /// Bytes the file has (guards every length read from it).
    size: u64,
    /// Bytes read so far.
    pos: u64,
}

/// The most entries a reader reserves room for before it has read them: counts in a file are
/// claims, and a corrupt one must not size an allocation.
const RESERVE_MAX: u64 = 1 << 16;

fn reserve<T>(n: u64) -> Vec<T> {
    Vec::with_capacity(n.min(RESERVE_MAX) as usize)
}

impl<R: Read + Seek> Reader<R> {
    fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|_| GgufError::Invalid(format!("the file ends early (at byte {})", self.pos)))?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn string(&mut self) -> Result<String, GgufError> {
        let at = self.pos;
        let n = self.u64()?;
        if n > self.remaining() {
            return Err(GgufError::Invalid(format!(
                "a string of {n} bytes at byte {at}, with {} bytes left in the file",
                self.remaining()
            )));
        }
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b).map_err(|_| GgufError::Invalid("the file ends inside a string".into()))?;
        self.pos += n;
        String::from_utf8(b).map_err(|_| GgufError::Invalid(format!("the string at byte {at} is not UTF-8")))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.bytes::<1>()?[0]),
            1 => Value::I8(self.bytes::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(GgufError::Invalid("arrays nested too deeply".into()));
                }
                let ety = self.u32()?;
                let n = self.u64()?;
                // Every element takes at least one byte.
                if n > self.remaining() {
                    return Err(GgufError::Invalid(format!(
                        "an array of {n} elements with {} bytes left in the file",
                        self.remaining()
                    )));
                }
                let mut items = reserve(n);
                for _ in 0..n {
                    items.push(self.value(ety, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            other => return Err(GgufError::Invalid(format!("unknown metadata value type {other}"))),
        })
    }
}

/// Reads the metadata and tensor descriptors of a GGUF file (v2 or v3), checking that every
/// tensor's data lies inside the file.
pub fn read(r: &mut (impl Read + Seek)) -> Result<Gguf, GgufError> {
    let size = r.seek(SeekFrom::End(0))?;
    r.seek(SeekFrom::Start(0))?;
    let mut rd = Reader { r, size, pos: 0 };
    if &rd.bytes::<4>()? != MAGIC {
        return Err(GgufError::Invalid("not a GGUF file (no GGUF magic)".into()));
    }
    let version = rd.u32()?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Invalid(format!("GGUF version {version} (forge reads 2 and 3)")));
    }
    let n_tensors = rd.u64()?;
    let n_kv = rd.u64()?;
    // A key/value takes at least 12 bytes, a tensor descriptor at least 24.
    if n_tensors.saturating_mul(24) > size || n_kv.saturating_mul(12) > size {
        return Err(GgufError::Invalid(format!(
            "the header claims {n_tensors} tensors and {n_kv} metadata keys, more than {size} bytes can hold"
        )));
    }
    let mut metadata = reserve(n_kv);
    for _ in 0..n_kv {
        let key = rd.string()?;
        let ty = rd.u32()?;
        let v = rd.value(ty, 0)?;
        metadata.push((key, v));
    }
    let alignment = metadata
        .iter()
        .find(|(k, _)| k == "general.alignment")
        .and_then(|(_, v)| v.as_u64())
        .unwrap_or(DEFAULT_ALIGNMENT);
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(GgufError::Invalid(format!("general.alignment {alignment} is not a power of two")));
    }
    let mut raw = reserve(n_tensors);
    for _ in 0..n_tensors {
        let name = rd.string()?;
        let n_dims = rd.u32()?;
        if n_dims > 8 {
            return Err(GgufError::Invalid(format!("tensor {name} has {n_dims} dimensions")));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = rd.u64()?;
            if d > size.saturating_mul(8) {
                return Err(GgufError::Invalid(format!("tensor {name} claims a dimension of {d}")));
            }
            ne.push(d as usize);
        }
        ne.reverse();
        let ty_id = rd.u32()?;
        let ty = GgmlType::from_id(ty_id)
            .ok_or_else(|| GgufError::Invalid(format!("tensor {name}: unknown ggml type {ty_id}")))?;
        let offset = rd.u64()?;
        raw.push((name, ne, ty, offset));
    }
    let data_start = pad(rd.pos, alignment);
    let mut tensors = Vec::with_capacity(raw.len());
    let mut names = std::collections::HashSet::new();
    for (name, shape, ty, offset) in raw {
        if !names.insert(name.clone()) {
            return Err(GgufError::Invalid(format!("tensor {name} appears twice")));
        }
        let bytes = ty.bytes_for(&shape).map_err(|e| GgufError::Invalid(format!("tensor {name}: {e}")))? as u64;
        let abs = data_start.checked_add(offset);
        if offset % alignment != 0 || abs.and_then(|a| a.checked_add(bytes)).is_none_or(|end| end > size) {
            let abs = abs.map_or("beyond any file".to_string(), |a| a.to_string());
            return Err(GgufError::Invalid(format!(
                "tensor {name}: its data ({bytes} bytes at {abs}) is not inside the file"
            )));
        }
        tensors.push(TensorInfo { name, shape, ty, offset: data_start + offset, bytes });
    }
    Ok(Gguf { version, metadata, tensors, alignment, data_start, file_size: size })
}

impl Gguf {
    /// Reads a file's header; errors name the file.
    pub fn open(path: &std::path::Path) -> Result<Gguf, GgufError> {
        let mut f = std::fs::File::open(path).map_err(|e| GgufError::Io(format!("{}: {e}", path.display())))?;
        if f.metadata().is_ok_and(|m| m.is_dir()) {
            return Err(GgufError::Invalid(format!("{} is a directory, not a GGUF file", path.display())));
        }
        read(&mut std::io::BufReader::new(&mut f)).map_err(|e| e.in_file(path))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn metadata_map(&self) -> BTreeMap<&str, &Value> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect()
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, r: &mut (impl Read + Seek), t: &TensorInfo) -> Result<Vec<u8>, GgufError> {
        r.seek(SeekFrom::Start(t.offset))?;
        let mut b = vec![0u8; t.bytes as usize];
        r.read_exact(&mut b)?;
        Ok(b)
    }
}
