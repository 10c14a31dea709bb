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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::GgufError;
use crate::types::GgmlType;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: u64 = 32;
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// ggml's `GGML_MAX_NAME`: a tensor name must be shorter.
pub const MAX_NAME: usize = 64;

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
    metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY).and_then(|(_, v)| v.as_u64()).unwrap_or(DEFAULT_ALIGNMENT)
}

/// `general.alignment` as llama.cpp's loader takes it: a u32, a power of two (32 when absent).
fn checked_alignment(value: Option<&Value>) -> Result<u64, GgufError> {
    let a = match value {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) => u64::from(*a),
        Some(v) => {
            return Err(GgufError::Invalid(format!(
                "`{ALIGNMENT_KEY}` is {}, but llama.cpp requires a u32",
                v.type_name()
            )));
        }
    };
    if !a.is_power_of_two() {
        return Err(GgufError::Invalid(format!("`{ALIGNMENT_KEY}` = {a} is not a power of two")));
    }
    Ok(a)
}

/// Refuses, before anything is written, what llama.cpp's loader rejects: forge never writes a
/// file that it or llama.cpp will not read back.
fn check_writable(metadata: &[(String, Value)], tensors: &[(&str, &[usize], GgmlType)]) -> Result<(), GgufError> {
    let mut keys = HashSet::new();
    for (k, v) in metadata {
        if k.is_empty() {
            return invalid("an empty metadata key".into());
        }
        if !keys.insert(k.as_str()) {
            return invalid(format!("metadata key `{k}` is given twice (llama.cpp rejects duplicate keys)"));
        }
        if v.as_array().is_some_and(|items| items.iter().any(|i| matches!(i, Value::Array(_)))) {
            return invalid(format!("metadata key `{k}` is an array of arrays, which llama.cpp does not read"));
        }
    }
    checked_alignment(metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY).map(|(_, v)| v))?;
    let mut names = HashSet::new();
    for (name, shape, _) in tensors {
        if name.len() >= MAX_NAME {
            return invalid(format!(
                "tensor name `{name}` is {} bytes; llama.cpp's limit is {}",
                name.len(),
                MAX_NAME - 1
            ));
        }
        if !names.insert(*name) {
            return invalid(format!("tensor `{name}` is given twice"));
        }
        if shape.len() > MAX_DIMS {
            return invalid(format!("tensor `{name}` has {} dimensions; llama.cpp allows {MAX_DIMS}", shape.len()));
        }
    }
    Ok(())
}

/// The bytes of a GGUF v3 file before its tensor data — magic, counts, metadata in the order
/// given, tensor descriptors (name, shape, type; data offsets follow from the types) — padded
/// to the [`alignment`]. Each tensor's data must then follow in order, padded to the alignment
/// with zeros: what [`write`] does, for writers that produce the data as they go.
pub fn header(metadata: &[(String, Value)], tensors: &[(&str, &[usize], GgmlType)]) -> Result<Vec<u8>, GgufError> {
    check_writable(metadata, tensors)?;
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

/// The smallest a metadata entry can be: a key of one byte (8 + 1), its type (4), a u8 (1).
const MIN_KV_BYTES: u64 = 14;
/// The smallest a tensor descriptor can be: an empty name (8), `n_dims` (4), no dimensions,
/// the type (4) and the offset (8).
const MIN_TENSOR_BYTES: u64 = 24;
/// gguf.cpp's `GGUF_MAX_STRING_LENGTH` and `GGUF_MAX_ARRAY_ELEMENTS`.
const MAX_STRING: u64 = 1 << 30;
const MAX_ARRAY: u64 = 1 << 30;
/// What forge holds in memory for a file's metadata, at most (values as [`Value`]s, strings,
/// keys): a limit for corrupt counts, 10× what a 262k-token vocabulary takes.
pub const METADATA_BUDGET: u64 = 256 << 20;
/// The most tensors forge reads from one file (real models have thousands).
pub const MAX_TENSORS: u64 = 1 << 20;

/// Reads a file. Every length and count in it is a claim, checked against the bytes left in the
/// file (and [`METADATA_BUDGET`]) before it sizes an allocation or a loop.
struct Reader<R> {
    r: R,
    /// Bytes the file has.
    size: u64,
    /// Bytes read so far.
    pos: u64,
    /// Memory the metadata may still take.
    budget: u64,
}

fn invalid<T>(m: String) -> Result<T, GgufError> {
    Err(GgufError::Invalid(m))
}

/// `n` rounded up to a multiple of `align` (a power of two); `None` on overflow.
fn pad_checked(n: u64, align: u64) -> Option<u64> {
    Some(n.checked_add(align - 1)? & !(align - 1))
}

/// Bytes an array element of GGUF type `ty` takes at least in the file (a string: its length),
/// and the type's name; `None` for a type that cannot be an array element.
fn element(ty: u32) -> Option<(u64, &'static str)> {
    Some(match ty {
        0 => (1, "u8"),
        1 => (1, "i8"),
        2 => (2, "u16"),
        3 => (2, "i16"),
        4 => (4, "u32"),
        5 => (4, "i32"),
        6 => (4, "f32"),
        7 => (1, "bool"),
        8 => (8, "string"),
        10 => (8, "u64"),
        11 => (8, "i64"),
        12 => (8, "f64"),
        _ => return None,
    })
}

impl<R: Read> Reader<R> {
    fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    fn read_into(&mut self, buf: &mut [u8]) -> Result<(), GgufError> {
        let n = buf.len() as u64;
        if n > self.remaining() {
            return invalid(format!(
                "the file ends early: {n} bytes are needed at byte {}, but the file has {} bytes",
                self.pos, self.size
            ));
        }
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => GgufError::Invalid(format!(
                "the file ends early: reading {n} bytes at byte {} (it was {} bytes when opened)",
                self.pos, self.size
            )),
            _ => GgufError::Io(format!("reading byte {}: {e}", self.pos)),
        })?;
        self.pos += n;
        Ok(())
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.read_into(&mut b)?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    /// Takes `bytes` of the metadata budget.
    fn charge(&mut self, bytes: u64) -> Result<(), GgufError> {
        match self.budget.checked_sub(bytes) {
            Some(left) => {
                self.budget = left;
                Ok(())
            }
            None => Err(GgufError::Unsupported(format!(
                "metadata that takes more than {} MiB of memory (at byte {}); forge reads at most that",
                METADATA_BUDGET >> 20,
                self.pos
            ))),
        }
    }

    /// A string of at most `max` bytes.
    fn string(&mut self, max: u64) -> Result<String, GgufError> {
        let at = self.pos;
        let n = self.u64()?;
        if n > max {
            return invalid(format!("a string of {n} bytes at byte {at}, longer than the {max} allowed"));
        }
        if n > self.remaining() {
            return invalid(format!(
                "a string of {n} bytes at byte {at}, but only {} bytes follow in the file",
                self.remaining()
            ));
        }
        self.charge(n)?;
        let mut b = vec![0u8; n as usize];
        self.read_into(&mut b)?;
        String::from_utf8(b).map_err(|_| GgufError::Invalid(format!("the string at byte {at} is not UTF-8")))
    }

    /// A metadata value of GGUF type `ty`; arrays hold scalars or strings (llama.cpp rejects
    /// arrays of arrays).
    fn value(&mut self, ty: u32, in_array: bool) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.bytes::<1>()?[0]),
            1 => Value::I8(i8::from_le_bytes(self.bytes()?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            8 => Value::String(self.string(MAX_STRING)?),
            9 if in_array => return invalid("an array of arrays, which llama.cpp does not read".into()),
            9 => {
                let at = self.pos;
                let ety = self.u32()?;
                let n = self.u64()?;
                let Some((min, name)) = element(ety) else {
                    let what = if ety == 9 {
                        "arrays, which llama.cpp does not read".to_string()
                    } else {
                        format!("the unknown type {ety}")
                    };
                    return invalid(format!("the array at byte {at} holds {what}"));
                };
                if n > MAX_ARRAY {
                    return invalid(format!(
                        "an array of {n} elements at byte {at}; llama.cpp reads at most {MAX_ARRAY}"
                    ));
                }
                let need = n.checked_mul(min).filter(|b| *b <= self.remaining());
                if need.is_none() {
                    return invalid(format!(
                        "an array of {n} {name} elements at byte {at}, but only {} bytes follow in the file",
                        self.remaining()
                    ));
                }
                // `n` is now bounded by the file; the budget bounds the memory it takes.
                self.charge(n * std::mem::size_of::<Value>() as u64)?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(ety, true)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            other => return invalid(format!("unknown metadata value type {other}")),
        })
    }
}

/// Reads the metadata and tensor descriptors of a GGUF file (v2 or v3), applying llama.cpp's
/// loader rules (`gguf_init_from_file_impl`, and `llama_model_loader`'s file-bounds check): no
/// empty or duplicate keys; `general.alignment` a u32 power of two; tensor names shorter than
/// 64 bytes and unique; at most 4 dimensions, none negative, fewer than 2^63 elements; rows of
/// whole blocks; each tensor's data right after the previous one's, padded to the alignment;
/// every tensor inside the file. Counts and lengths are checked against the bytes the file has
/// before they size anything, so a corrupt file takes bounded time and memory.
pub fn read(r: &mut (impl Read + Seek)) -> Result<Gguf, GgufError> {
    let size = r.seek(SeekFrom::End(0))?;
    r.seek(SeekFrom::Start(0))?;
    let mut rd = Reader { r, size, pos: 0, budget: METADATA_BUDGET };
    if &rd.bytes::<4>().map_err(|_| GgufError::Invalid(format!("not a GGUF file ({size} bytes, no GGUF magic)")))?
        != MAGIC
    {
        return invalid("not a GGUF file (no GGUF magic)".into());
    }
    let version = rd.u32()?;
    if !(2..=3).contains(&version) {
        return invalid(format!("GGUF version {version} (forge reads 2 and 3)"));
    }
    let n_tensors = rd.u64()?;
    let n_kv = rd.u64()?;
    let need = n_kv.checked_mul(MIN_KV_BYTES).and_then(|a| n_tensors.checked_mul(MIN_TENSOR_BYTES)?.checked_add(a));
    if need.is_none_or(|n| n > rd.remaining()) {
        return invalid(format!(
            "the header claims {n_tensors} tensors and {n_kv} metadata keys, more than {size} bytes can hold"
        ));
    }
    if n_tensors > MAX_TENSORS {
        return Err(GgufError::Unsupported(format!("{n_tensors} tensors (forge reads at most {MAX_TENSORS})")));
    }

    let mut metadata: Vec<(String, Value)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for i in 0..n_kv as usize {
        let key = rd.string(MAX_STRING).map_err(|e| e.context(&format!("metadata entry {i}")))?;
        if key.is_empty() {
            return invalid(format!("metadata entry {i} has an empty key"));
        }
        if let Some(first) = index.get(&key) {
            return invalid(format!(
                "metadata key `{key}` appears twice (entries {first} and {i}); llama.cpp rejects duplicate keys"
            ));
        }
        rd.charge(2 * key.len() as u64 + 2 * std::mem::size_of::<(String, Value)>() as u64)?;
        let ty = rd.u32()?;
        let v = rd.value(ty, false).map_err(|e| e.context(&format!("metadata key `{key}`")))?;
        index.insert(key.clone(), i);
        metadata.push((key, v));
    }
    let alignment = checked_alignment(index.get(ALIGNMENT_KEY).map(|&i| &metadata[i].1))?;

    // Descriptors: bounded by the file (checked above) and MAX_TENSORS.
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors.min(1 << 16) as usize);
    let mut names: HashMap<String, usize> = HashMap::new();
    for i in 0..n_tensors as usize {
        let name = rd.string(MAX_NAME as u64 - 1).map_err(|e| e.context(&format!("the name of tensor {i}")))?;
        if let Some(first) = names.get(&name) {
            return invalid(format!("tensor `{name}` appears twice (tensors {first} and {i}); llama.cpp rejects that"));
        }
        names.insert(name.clone(), i);
        let n_dims = rd.u32()?;
        if n_dims as usize > MAX_DIMS {
            return invalid(format!("tensor `{name}` has {n_dims} dimensions; llama.cpp allows at most {MAX_DIMS}"));
        }
        // ggml's `ne`, innermost first, 1 beyond `n_dims`.
        let mut ne = [1i64; MAX_DIMS];
        for (j, d) in ne.iter_mut().enumerate().take(n_dims as usize) {
            let v = rd.u64()? as i64;
            if v < 0 {
                return invalid(format!("tensor `{name}`: dimension {j} is {v} (llama.cpp reads dimensions as i64)"));
            }
            *d = v;
        }
        let shape: Vec<usize> = ne[..n_dims as usize].iter().rev().map(|d| *d as usize).collect();
        // gguf.cpp's test, which needs every dimension non-zero (and short-circuits before a
        // product could overflow).
        if ne.iter().all(|d| *d > 0)
            && (i64::MAX / ne[1] <= ne[0]
                || i64::MAX / ne[2] <= ne[0] * ne[1]
                || i64::MAX / ne[3] <= ne[0] * ne[1] * ne[2])
        {
            return invalid(format!("tensor `{name}` of shape {shape:?} has 2^63 elements or more"));
        }
        let ty_id = rd.u32()?;
        let ty = GgmlType::from_id(ty_id).ok_or_else(|| {
            GgufError::Invalid(format!("tensor `{name}` has ggml type {ty_id}, which llama.cpp does not define"))
        })?;
        let bytes = ty.bytes_for(&shape).map_err(|e| GgufError::Invalid(format!("tensor `{name}`: {e}")))? as u64;
        // Relative to the data section until it is known where that starts.
        let offset = rd.u64()?;
        tensors.push(TensorInfo { name, shape, ty, offset, bytes });
    }
    drop(names);
    let data_start = pad_checked(rd.pos, alignment).unwrap_or(u64::MAX);
    if !tensors.is_empty() && data_start > size {
        return invalid(format!(
            "the tensor data would start at byte {data_start}, past the end of the file ({size} bytes)"
        ));
    }
    // gguf.cpp: each tensor's data starts where the previous one's ends, padded to the alignment.
    let mut expected = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        if t.offset != expected {
            let how = match i.checked_sub(1).and_then(|p| tensors.get(p)) {
                Some(prev) if t.offset < expected => format!("it overlaps the data of `{}`", prev.name),
                _ => "it leaves a gap llama.cpp does not allow".to_string(),
            };
            return invalid(format!(
                "tensor `{}` has data offset {}, expected {expected}: {how} (llama.cpp requires each tensor's data \
                 to follow the previous one's, padded to {alignment} bytes)",
                t.name, t.offset
            ));
        }
        expected = pad_checked(t.bytes, alignment)
            .and_then(|b| expected.checked_add(b))
            .ok_or_else(|| GgufError::Invalid(format!("tensor `{}`: the data section's size overflows", t.name)))?;
    }
    // llama_model_loader: every tensor inside the file (padding after the last one may be cut).
    for t in &mut tensors {
        let start = data_start.checked_add(t.offset);
        match start.and_then(|s| s.checked_add(t.bytes)) {
            Some(end) if end <= size => t.offset += data_start,
            end => {
                let range = match (start, end) {
                    (Some(s), Some(e)) => format!("bytes {s}..{e}"),
                    _ => format!("{} bytes at offset {} past byte {data_start}", t.bytes, t.offset),
                };
                return invalid(format!(
                    "tensor `{}`: its data ({range}) ends past the end of the file ({size} bytes); the file is \
                     truncated or corrupt",
                    t.name
                ));
            }
        }
    }
    Ok(Gguf { version, metadata, tensors, alignment, data_start, file_size: size })
}

/// What a path is when it is not a regular file (`None` when it is).
fn not_a_file(ft: &std::fs::FileType) -> Option<&'static str> {
    if ft.is_file() {
        return None;
    }
    if ft.is_dir() {
        return Some("a directory");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return Some("a named pipe (FIFO)");
        }
        if ft.is_socket() {
            return Some("a socket");
        }
        if ft.is_char_device() {
            return Some("a character device");
        }
        if ft.is_block_device() {
            return Some("a block device");
        }
    }
    Some("not a regular file")
}

/// Opens a GGUF file for reading: a regular file (a directory, pipe or device is an error that
/// says so, and a pipe is never opened, which could block); errors name the path.
pub fn open_file(path: &std::path::Path) -> Result<std::fs::File, GgufError> {
    let p = path.display();
    let not_regular = |ft: &std::fs::FileType| match not_a_file(ft) {
        Some(what) => invalid(format!("{p} is {what}, not a GGUF file")),
        None => Ok(()),
    };
    let io = |e: io::Error| GgufError::Io(format!("{p}: {e}"));
    not_regular(&std::fs::metadata(path).map_err(io)?.file_type())?;
    let f = std::fs::File::open(path).map_err(io)?;
    // The path may have been replaced in between.
    not_regular(&f.metadata().map_err(io)?.file_type())?;
    Ok(f)
}

impl Gguf {
    /// Reads a file's header; errors name the file.
    pub fn open(path: &std::path::Path) -> Result<Gguf, GgufError> {
        let f = open_file(path)?;
        read(&mut std::io::BufReader::with_capacity(1 << 16, f)).map_err(|e| e.in_file(path))
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
        r.read_exact(&mut b).map_err(|e| {
            GgufError::Io(format!("tensor `{}`: reading {} bytes at byte {}: {e}", t.name, t.bytes, t.offset))
        })?;
        Ok(b)
    }
}
