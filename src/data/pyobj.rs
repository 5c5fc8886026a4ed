//! A small pickle virtual machine for data pickles that hold numpy arrays (pyskl / mmcv annotation
//! files): protocols 2-5, the built-in containers, and the numpy reconstructors
//! (`numpy.core.multiarray._reconstruct` + `BUILD`, `numpy.dtype`, `numpy.core.multiarray.scalar`,
//! protocol-5 `numpy.core.numeric._frombuffer`; `numpy._core.*` of numpy 2 too). Protocol 2 stores
//! bytes as `_codecs.encode(str, 'latin1')`, which is decoded here as well.
//!
//! Lists, dicts and arrays are shared (`Rc<RefCell<..>>`) as in Python, so a memoised object
//! filled after its `PUT` (the usual `EMPTY_LIST, PUT, APPENDS` order) is seen filled through `GET`.
//! Anything else (an unknown class) becomes an opaque [`Value::Object`]; the reader that needs a
//! value says which one it expected.
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A numpy array: element type, shape (C order after decoding), raw little-endian bytes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NdArray {
    /// numpy type string without byte order, e.g. `f4`, `f2`, `i8`, `u1`.
    pub dtype: String,
    /// `true` when the data are big-endian (`>`).
    pub big_endian: bool,
    pub shape: Vec<usize>,
    /// Fortran (column-major) order.
    pub fortran: bool,
    /// Shared with the pickle's bytes object (no copy).
    pub data: Rc<Vec<u8>>,
}

impl NdArray {
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Element size in bytes of the dtype, or `None` for a type we do not read.
    fn item_size(&self) -> Option<usize> {
        match self.dtype.as_str() {
            "f2" | "i2" | "u2" => Some(2),
            "f4" | "i4" | "u4" => Some(4),
            "f8" | "i8" | "u8" => Some(8),
            "i1" | "u1" | "b1" => Some(1),
            _ => None,
        }
    }

    /// The values as f64 in C order (integers and floats of any size, either byte order).
    pub fn to_f64(&self) -> std::result::Result<Vec<f64>, String> {
        let size = self
            .item_size()
            .ok_or_else(|| format!("array dtype {:?} is not a number type", self.dtype))?;
        let n = self.num_elements();
        if self.data.len() != n * size {
            return Err(format!(
                "array of shape {:?} and dtype {} needs {} bytes, has {}",
                self.shape,
                self.dtype,
                n * size,
                self.data.len()
            ));
        }
        let be = self.big_endian;
        let vals: Vec<f64> = self
            .data
            .chunks_exact(size)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..size].copy_from_slice(c);
                if be {
                    b[..size].reverse();
                }
                match self.dtype.as_str() {
                    "f2" => f16_to_f32(u16::from_le_bytes([b[0], b[1]])) as f64,
                    "f4" => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
                    "f8" => f64::from_le_bytes(b),
                    "i1" => b[0] as i8 as f64,
                    "u1" | "b1" => b[0] as f64,
                    "i2" => i16::from_le_bytes([b[0], b[1]]) as f64,
                    "u2" => u16::from_le_bytes([b[0], b[1]]) as f64,
                    "i4" => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
                    "u4" => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
                    "i8" => i64::from_le_bytes(b) as f64,
                    _ => u64::from_le_bytes(b) as f64,
                }
            })
            .collect();
        if !self.fortran || self.shape.len() < 2 {
            return Ok(vals);
        }
        // Column-major -> row-major.
        let mut out = vec![0f64; n];
        let rank = self.shape.len();
        let mut idx = vec![0usize; rank];
        for (f, &v) in vals.iter().enumerate() {
            let mut r = f;
            for (i, &s) in idx.iter_mut().zip(&self.shape) {
                *i = r % s;
                r /= s;
            }
            let c = idx
                .iter()
                .zip(&self.shape)
                .fold(0usize, |acc, (&i, &s)| acc * s + i);
            out[c] = v;
        }
        Ok(out)
    }

    /// A thread-safe array owning its bytes (moved out when this is their only holder).
    pub fn into_raw(self) -> RawArray {
        RawArray {
            dtype: self.dtype,
            big_endian: self.big_endian,
            shape: self.shape,
            fortran: self.fortran,
            data: Rc::try_unwrap(self.data).unwrap_or_else(|rc| rc.as_ref().clone()),
        }
    }
}

/// [`NdArray`] owning its bytes: `Send`, so it can be decoded on a worker thread.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawArray {
    pub dtype: String,
    pub big_endian: bool,
    pub shape: Vec<usize>,
    pub fortran: bool,
    pub data: Vec<u8>,
}

impl RawArray {
    /// [`NdArray::to_f64`] of these bytes.
    pub fn to_f64(&self) -> std::result::Result<Vec<f64>, String> {
        NdArray {
            dtype: self.dtype.clone(),
            big_endian: self.big_endian,
            shape: self.shape.clone(),
            fortran: self.fortran,
            data: Rc::new(self.data.clone()),
        }
        .to_f64()
    }
}

/// IEEE half -> single.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) & 1) as u32;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if frac == 0 {
            sign << 31
        } else {
            // Subnormal: value = frac * 2^-24.
            let v = frac as f32 * (1.0 / 16_777_216.0);
            return if sign == 1 { -v } else { v };
        }
    } else if exp == 0x1f {
        (sign << 31) | 0x7f80_0000 | (frac << 13)
    } else {
        (sign << 31) | ((exp + 112) << 23) | (frac << 13)
    };
    f32::from_bits(bits)
}

/// A Python value.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Shared (memoised strings are not copied).
    Str(Rc<str>),
    /// A long string (over [`LONG_STRING`] bytes) left in the pickle's bytes: `(offset, len)` of
    /// its UTF-8. Protocol 2 encodes every bytes object (e.g. array data) as such a string passed
    /// to `_codecs.encode(s, 'latin1')`, which reads it from there without a copy.
    LongStr(usize, usize),
    Bytes(Rc<Vec<u8>>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    /// Insertion order kept.
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// A `module.name` global not called (yet).
    Global(String, String),
    /// `numpy.dtype(...)`: the type string (e.g. `f4`).
    Dtype(Rc<RefCell<(String, bool)>>),
    Array(Rc<RefCell<NdArray>>),
    /// An instance of a class we do not model: its `module.name`.
    Object(String),
}

/// Dropping a value frees nested containers with a work list instead of recursion, so a deeply
/// nested pickle (100k nested lists: a few hundred bytes) cannot overflow the stack. Only
/// containers this value owns alone are taken apart; shared ones are left to their other owners.
impl Drop for Value {
    fn drop(&mut self) {
        let mut pending: Vec<Value> = Vec::new();
        take_children(self, &mut pending);
        while let Some(mut v) = pending.pop() {
            take_children(&mut v, &mut pending);
            // `v` now holds no nested container: its own drop does not recurse.
        }
    }
}

/// Moves the children of `v` into `out` when `v` is the only owner of its container.
fn take_children(v: &mut Value, out: &mut Vec<Value>) {
    match v {
        Value::Tuple(items) => {
            if let Some(items) = Rc::get_mut(items) {
                out.append(items);
            }
        }
        Value::List(items) if Rc::strong_count(items) == 1 => {
            out.append(&mut items.borrow_mut());
        }
        Value::Dict(pairs) if Rc::strong_count(pairs) == 1 => {
            for (k, x) in pairs.borrow_mut().drain(..) {
                out.push(k);
                out.push(x);
            }
        }
        _ => {}
    }
}

impl Value {
    /// A short description for error messages.
    pub fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) => "an int".into(),
            Value::Float(_) => "a float".into(),
            Value::Str(_) => "a string".into(),
            Value::LongStr(_, n) => format!("a string of {n} bytes"),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global(m, n) => format!("the global {m}.{n}"),
            Value::Dtype(_) => "a numpy dtype".into(),
            Value::Array(a) => format!("a numpy array of shape {:?}", a.borrow().shape),
            Value::Object(n) => format!("an object of class {n}"),
        }
    }

    /// Items of a list or tuple.
    pub fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::List(l) => Some(l.borrow().clone()),
            Value::Tuple(t) => Some(t.as_ref().clone()),
            _ => None,
        }
    }

    /// `dict[key]` for a string key.
    pub fn get(&self, key: &str) -> Option<Value> {
        match self {
            Value::Dict(d) => d.borrow().iter().find_map(|(k, v)| match k {
                Value::Str(s) if &**s == key => Some(v.clone()),
                Value::Bytes(b) if b.as_slice() == key.as_bytes() => Some(v.clone()),
                _ => None,
            }),
            _ => None,
        }
    }

    /// A string (`str` or `bytes`).
    pub fn as_str(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.to_string()),
            Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    /// An integer (Python int, bool, numpy integer scalar, or a 0-d / 1-element integer array).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            Value::Array(a) => {
                let a = a.borrow();
                if a.num_elements() == 1 && (a.dtype.starts_with('i') || a.dtype.starts_with('u')) {
                    a.to_f64().ok().map(|v| v[0] as i64)
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

/// A decoding error: byte offset and what is wrong.
#[derive(Debug)]
pub struct PickleError {
    pub offset: usize,
    pub what: String,
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "byte {}: {}", self.offset, self.what)
    }
}

type PResult<T> = std::result::Result<T, PickleError>;

enum Item {
    Mark,
    V(Value),
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Item>,
    memo: HashMap<u32, Value>,
}

fn dtype_of(s: &str) -> (String, bool) {
    let big = s.starts_with('>');
    let t = s.trim_start_matches(['<', '>', '|', '=']);
    let t = match t {
        "float32" => "f4",
        "float64" => "f8",
        "float16" => "f2",
        "int64" => "i8",
        "int32" => "i4",
        "int16" => "i2",
        "int8" => "i1",
        "uint8" => "u1",
        "bool" | "?" => "b1",
        o => o,
    };
    (t.to_string(), big)
}

impl<'a> Machine<'a> {
    fn err<T>(&self, what: impl Into<String>) -> PResult<T> {
        Err(PickleError {
            offset: self.pos,
            what: what.into(),
        })
    }
    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        if n > self.data.len() - self.pos {
            return self.err(format!("truncated: need {n} more bytes"));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> PResult<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> PResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> PResult<usize> {
        let b = self.take(8)?;
        let v = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        usize::try_from(v).or_else(|_| self.err("length does not fit in memory"))
    }
    fn line(&mut self) -> PResult<String> {
        let start = self.pos;
        while self.pos < self.data.len() && self.data[self.pos] != b'\n' {
            self.pos += 1;
        }
        if self.pos >= self.data.len() {
            return self.err("truncated: unterminated text line");
        }
        let s = String::from_utf8_lossy(&self.data[start..self.pos]).into_owned();
        self.pos += 1;
        Ok(s)
    }
    fn utf8(&mut self, n: usize) -> PResult<Value> {
        if n > LONG_STRING {
            let start = self.pos;
            self.take(n)?;
            return Ok(Value::LongStr(start, n));
        }
        let b = self.take(n)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Value::Str(Rc::from(s))),
            Err(_) => self.err("invalid UTF-8 in a string"),
        }
    }
    fn bytes(&mut self, n: usize) -> PResult<Value> {
        let b = self.take(n)?;
        Ok(Value::Bytes(Rc::new(b.to_vec())))
    }
    fn push(&mut self, v: Value) {
        self.stack.push(Item::V(v));
    }
    fn pop(&mut self) -> PResult<Value> {
        match self.stack.pop() {
            Some(Item::V(v)) => Ok(v),
            Some(Item::Mark) => self.err("unexpected MARK on the stack"),
            None => self.err("stack underflow"),
        }
    }
    fn top(&self) -> PResult<Value> {
        match self.stack.last() {
            Some(Item::V(v)) => Ok(v.clone()),
            _ => self.err("expected a value on the stack"),
        }
    }
    fn pop_mark(&mut self) -> PResult<Vec<Value>> {
        let mut items = Vec::new();
        loop {
            match self.stack.pop() {
                Some(Item::Mark) => break,
                Some(Item::V(v)) => items.push(v),
                None => return self.err("MARK not found"),
            }
        }
        items.reverse();
        Ok(items)
    }
    fn memo_put(&mut self, i: u32) -> PResult<()> {
        let v = self.top()?;
        self.memo.insert(i, v);
        Ok(())
    }
    fn memo_get(&mut self, i: u32) -> PResult<()> {
        match self.memo.get(&i) {
            Some(v) => {
                let v = v.clone();
                self.push(v);
                Ok(())
            }
            None => self.err(format!("memo entry {i} was never stored")),
        }
    }

    fn reduce(&self, callable: Value, args: Value) -> PResult<Value> {
        let (module, name) = match &callable {
            Value::Global(m, n) => (m.as_str(), n.as_str()),
            other => return self.err(format!("call of {}", other.kind())),
        };
        let args = match &args {
            Value::Tuple(a) => a.as_ref().clone(),
            other => return self.err(format!("call arguments are {}", other.kind())),
        };
        let numpy = module.starts_with("numpy");
        Ok(match (module, name) {
            ("collections", "OrderedDict") | ("builtins", "dict") | ("__builtin__", "dict") => {
                Value::Dict(Rc::new(RefCell::new(Vec::new())))
            }
            ("builtins", "list") | ("__builtin__", "list") => match args.first() {
                Some(v) => Value::List(Rc::new(RefCell::new(v.items().unwrap_or_default()))),
                None => Value::List(Rc::new(RefCell::new(Vec::new()))),
            },
            ("builtins", "tuple") | ("__builtin__", "tuple") => Value::Tuple(Rc::new(
                args.first().and_then(Value::items).unwrap_or_default(),
            )),
            ("builtins", "bytearray") | ("builtins", "bytes") | ("__builtin__", "bytearray") => {
                match args.first() {
                    Some(Value::Bytes(b)) => Value::Bytes(b.clone()),
                    Some(Value::Str(s)) => Value::Bytes(Rc::new(latin1(s))),
                    _ => Value::Bytes(Rc::new(Vec::new())),
                }
            }
            ("_codecs", "encode") => match args.first() {
                Some(Value::Str(s)) => Value::Bytes(Rc::new(latin1(s))),
                Some(Value::LongStr(at, n)) => match std::str::from_utf8(&self.data[*at..at + n]) {
                    Ok(s) => Value::Bytes(Rc::new(latin1(s))),
                    Err(_) => return self.err("invalid UTF-8 in a string"),
                },
                _ => return self.err("_codecs.encode of a non-string"),
            },
            (_, "dtype") if numpy => match args.first() {
                Some(Value::Str(s)) => Value::Dtype(Rc::new(RefCell::new(dtype_of(s)))),
                _ => return self.err("numpy.dtype without a type string"),
            },
            (_, "_reconstruct") if numpy => Value::Array(Rc::new(RefCell::new(NdArray::default()))),
            (_, "scalar") if numpy => {
                let (Some(Value::Dtype(d)), Some(Value::Bytes(b))) = (args.first(), args.get(1))
                else {
                    return self.err("numpy scalar without (dtype, bytes)");
                };
                let (t, big) = d.borrow().clone();
                let a = NdArray {
                    dtype: t.clone(),
                    big_endian: big,
                    shape: vec![],
                    fortran: false,
                    data: Rc::clone(b),
                };
                let v = match a.to_f64() {
                    Ok(v) if v.len() == 1 => v[0],
                    Ok(_) | Err(_) => return self.err(format!("numpy scalar of dtype {t}")),
                };
                if t.starts_with('f') {
                    Value::Float(v)
                } else {
                    Value::Int(v as i64)
                }
            }
            (_, "_frombuffer") if numpy => {
                let (Some(Value::Bytes(b)), Some(Value::Dtype(d)), Some(shape)) =
                    (args.first(), args.get(1), args.get(2))
                else {
                    return self.err("numpy _frombuffer without (buffer, dtype, shape)");
                };
                let shape = self.shape_of(shape)?;
                let (t, big) = d.borrow().clone();
                let fortran = matches!(args.get(3), Some(Value::Str(o)) if &**o == "F");
                Value::Array(Rc::new(RefCell::new(NdArray {
                    dtype: t,
                    big_endian: big,
                    shape,
                    fortran,
                    data: Rc::clone(b),
                })))
            }
            _ => Value::Object(format!("{module}.{name}")),
        })
    }

    fn shape_of(&self, v: &Value) -> PResult<Vec<usize>> {
        let items = match v.items() {
            Some(i) => i,
            None => return self.err(format!("array shape is {}", v.kind())),
        };
        items
            .iter()
            .map(|x| match x {
                Value::Int(i) if *i >= 0 => Ok(*i as usize),
                other => self.err(format!("array shape entry is {}", other.kind())),
            })
            .collect()
    }

    fn build(&self, obj: &Value, state: Value) -> PResult<()> {
        match obj {
            Value::Array(a) => {
                // (version, shape, dtype, is_fortran, rawdata)
                let s = match state.items() {
                    Some(s) if s.len() == 5 => s,
                    _ => return self.err(format!("ndarray state is {}", state.kind())),
                };
                let shape = self.shape_of(&s[1])?;
                let (t, big) = match &s[2] {
                    Value::Dtype(d) => d.borrow().clone(),
                    other => return self.err(format!("ndarray dtype is {}", other.kind())),
                };
                let data = match &s[4] {
                    Value::Bytes(b) => Rc::clone(b),
                    Value::Str(st) => Rc::new(latin1(st)),
                    other => {
                        return self.err(format!(
                            "ndarray data is {} (object arrays are not supported)",
                            other.kind()
                        ))
                    }
                };
                let mut a = a.borrow_mut();
                a.dtype = t;
                a.big_endian = big;
                a.shape = shape;
                a.fortran = matches!(s[3], Value::Bool(true) | Value::Int(1));
                a.data = data;
            }
            Value::Dtype(d) => {
                // (version, byte order, ...)
                if let Some(s) = state.items() {
                    if let Some(Value::Str(order)) = s.get(1) {
                        d.borrow_mut().1 = &**order == ">";
                    }
                }
            }
            Value::Dict(d) => {
                if let Value::Dict(src) = &state {
                    d.borrow_mut().extend(src.borrow().iter().cloned());
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn run(mut self) -> PResult<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return self.err(format!("pickle protocol {proto} is not supported"));
                    }
                }
                0x95 => {
                    self.take(8)?;
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Item::Mark),
                b'}' => self.push(Value::Dict(Rc::new(RefCell::new(Vec::new())))),
                b']' => self.push(Value::List(Rc::new(RefCell::new(Vec::new())))),
                b')' => self.push(Value::Tuple(Rc::new(Vec::new()))),
                0x8f => self.push(Value::List(Rc::new(RefCell::new(Vec::new())))),
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64));
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let b = self.take(n)?;
                    if n > 8 {
                        return self.err("integer wider than 64 bits");
                    }
                    let mut buf = if n > 0 && b[n - 1] & 0x80 != 0 {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(b);
                    self.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    let b = self.take(8)?;
                    let v = f64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                    self.push(Value::Float(v));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.utf8(n)?;
                    self.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.utf8(n)?;
                    self.push(v);
                }
                0x8d => {
                    let n = self.u64()?;
                    let v = self.utf8(n)?;
                    self.push(v);
                }
                b'U' | b'C' => {
                    let n = self.u8()? as usize;
                    let v = self.bytes(n)?;
                    self.push(v);
                }
                b'T' | b'B' => {
                    let n = self.u32()? as usize;
                    let v = self.bytes(n)?;
                    self.push(v);
                }
                0x8e | 0x96 => {
                    let n = self.u64()?;
                    let v = self.bytes(n)?;
                    self.push(v);
                }
                0x97 => return self.err("out-of-band buffers (NEXT_BUFFER) are not supported"),
                0x98 => {}
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                b'c' => {
                    let m = self.line()?;
                    let n = self.line()?;
                    self.push(Value::Global(m, n));
                }
                0x93 => {
                    let n = self.pop()?;
                    let m = self.pop()?;
                    match (&m, &n) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.push(Value::Global(m.to_string(), n.to_string()))
                        }
                        _ => return self.err("STACK_GLOBAL of non-strings"),
                    }
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(Rc::new(items)));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = items
                        .chunks(2)
                        .filter(|c| c.len() == 2)
                        .map(|c| (c[0].clone(), c[1].clone()))
                        .collect();
                    self.push(Value::Dict(Rc::new(RefCell::new(pairs))));
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.reduce(f, args)?;
                    self.push(v);
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = match &cls {
                        Value::Global(m, n) if n == "OrderedDict" || n == "dict" => {
                            Value::Dict(Rc::new(RefCell::new(Vec::new())))
                        }
                        Value::Global(..) => self.reduce(cls.clone(), args)?,
                        other => Value::Object(other.kind()),
                    };
                    self.push(v);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    self.push(Value::Object(cls.kind()));
                }
                b'b' => {
                    let state = self.pop()?;
                    let obj = self.top()?;
                    self.build(&obj, state)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match &self.top()? {
                        Value::Dict(d) => d.borrow_mut().push((k, v)),
                        other => return self.err(format!("SETITEM on {}", other.kind())),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    match &self.top()? {
                        Value::Dict(d) => {
                            let mut d = d.borrow_mut();
                            for c in items.chunks(2) {
                                if c.len() == 2 {
                                    d.push((c[0].clone(), c[1].clone()));
                                }
                            }
                        }
                        other => return self.err(format!("SETITEMS on {}", other.kind())),
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    match &self.top()? {
                        Value::List(l) => l.borrow_mut().push(v),
                        other => return self.err(format!("APPEND on {}", other.kind())),
                    }
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    match &self.top()? {
                        Value::List(l) => l.borrow_mut().extend(items),
                        other => return self.err(format!("APPENDS on {}", other.kind())),
                    }
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(Rc::new(items)));
                }
                b'0' => {
                    self.stack.pop();
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?;
                    self.push(v);
                }
                other => {
                    self.pos -= 1;
                    return self.err(format!(
                        "unsupported pickle opcode 0x{other:02x} (protocol 0/1 text pickles are not read; save with protocol >= 2)"
                    ));
                }
            }
        }
    }
}

/// Strings longer than this many bytes stay in the pickle's bytes ([`Value::LongStr`]).
pub const LONG_STRING: usize = 4096;

fn latin1(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len());
    v.extend(s.chars().map(|c| c as u32 as u8));
    v
}

/// Decodes a pickle.
pub fn unpickle(data: &[u8]) -> PResult<Value> {
    Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0), 0.0);
    }

    #[test]
    fn fortran_and_big_endian_arrays() {
        let a = NdArray {
            dtype: "f4".into(),
            big_endian: false,
            shape: vec![2, 3],
            fortran: true,
            data: Rc::new((0..6).flat_map(|i| (i as f32).to_le_bytes()).collect()),
        };
        assert_eq!(a.to_f64().unwrap(), vec![0.0, 2.0, 4.0, 1.0, 3.0, 5.0]);
        let b = NdArray {
            dtype: "i2".into(),
            big_endian: true,
            shape: vec![2],
            fortran: false,
            data: Rc::new(vec![0x01, 0x02, 0xff, 0xfe]),
        };
        assert_eq!(b.to_f64().unwrap(), vec![258.0, -2.0]);
    }

    /// `pickle.dumps({'a': [1, 'x'], 'b': 2.5}, protocol=2)`.
    #[test]
    fn plain_containers() {
        let p: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01X\x01\x00\x00\x00xq\x03eX\x01\x00\x00\x00bq\x04G@\x04\x00\x00\x00\x00\x00\x00u.";
        let v = unpickle(p).unwrap();
        let a = v.get("a").unwrap().items().unwrap();
        assert_eq!(a[0].as_i64(), Some(1));
        assert_eq!(a[1].as_str().as_deref(), Some("x"));
        assert!(matches!(v.get("b"), Some(Value::Float(f)) if f == 2.5));
    }
}
