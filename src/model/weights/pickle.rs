//! A small pickle virtual machine for the subset of opcodes `torch.save` emits (protocol 2, plus
//! the protocol 3-4 opcodes that show up in practice). It builds a value tree; tensors stay as
//! references to their storages (`persistent_load` ids), resolved by the caller.
use std::collections::HashMap;

/// A storage reference from `BINPERSID` `('storage', torch.<T>Storage, key, location, numel)`.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    /// Storage type name, e.g. `FloatStorage`.
    pub type_name: String,
    /// File name under `<archive>/data/`.
    pub key: String,
    pub numel: i64,
}

/// A tensor built by `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

/// A Python value as far as state dicts need one.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Dicts keep insertion order (OrderedDict).
    Dict(Vec<(Value, Value)>),
    /// A `module.name` global not otherwise understood.
    Global(String, String),
    Storage(StorageRef),
    Tensor(TensorRef),
    /// Result of calling an unknown global: kept opaque.
    Object(String),
}

/// A pickle decoding error: byte offset and what is wrong.
#[derive(Debug)]
pub struct PickleError {
    pub offset: usize,
    pub what: String,
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
    /// Values that may still be created by copies (memo GET, DUP): bounds "billion laughs".
    budget: usize,
    /// Set when a pushed value nests too deeply or the copy budget ran out (checked every opcode).
    limit_hit: Option<String>,
}

/// Deepest accepted nesting of containers (state dicts are 3-4 levels deep). Deeper values
/// would overflow the stack when dropped or printed.
pub const MAX_DEPTH: usize = 200;
/// Most values that copies (memo GET, DUP) may create in one pickle.
pub const MAX_COPIED_VALUES: usize = 1_000_000;

/// Walks `v` (at `depth`) counting values into `count`; `Err` past [`MAX_DEPTH`] or `max`.
fn measure(v: &Value, depth: usize, count: &mut usize, max: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("values nested deeper than {MAX_DEPTH} levels"));
    }
    *count += 1;
    if *count > max {
        return Err(format!(
            "more than {max} values created by memo copies (a pickle bomb?)"
        ));
    }
    match v {
        Value::Tuple(xs) | Value::List(xs) => {
            for x in xs {
                measure(x, depth + 1, count, max)?;
            }
        }
        Value::Dict(kv) => {
            for (k, x) in kv {
                measure(k, depth + 1, count, max)?;
                measure(x, depth + 1, count, max)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Drops a value without recursion (a value may nest [`MAX_DEPTH`] levels at most, but this
/// keeps even a partially built one from overflowing the stack).
fn drop_flat(v: Value) {
    let mut todo = vec![v];
    while let Some(v) = todo.pop() {
        match v {
            Value::Tuple(xs) | Value::List(xs) => todo.extend(xs),
            Value::Dict(kv) => {
                for (k, x) in kv {
                    todo.push(k);
                    todo.push(x);
                }
            }
            _ => {}
        }
    }
}

impl<'a> Machine<'a> {
    fn err<T>(&self, what: impl Into<String>) -> PResult<T> {
        let mut what: String = what.into();
        if what.len() > 400 {
            let mut cut = 400;
            while !what.is_char_boundary(cut) {
                cut -= 1;
            }
            what.truncate(cut);
            what.push_str("...");
        }
        Err(PickleError {
            offset: self.pos,
            what,
        })
    }
    /// Checks a value about to be stored at nesting `depth` (0 = on the stack); counts it
    /// against the copy budget when `copied`.
    fn admit(&mut self, v: &Value, depth: usize, copied: bool) {
        if self.limit_hit.is_some() {
            return;
        }
        let mut count = 0;
        let max = if copied { self.budget } else { usize::MAX };
        match measure(v, depth, &mut count, max) {
            Ok(()) if copied => self.budget -= count,
            Ok(()) => {}
            Err(e) => self.limit_hit = Some(e),
        }
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
    fn u64(&mut self) -> PResult<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn line(&mut self) -> PResult<String> {
        let start = self.pos;
        while self.pos < self.data.len() && self.data[self.pos] != b'\n' {
            self.pos += 1;
        }
        if self.pos >= self.data.len() {
            return self.err("unterminated text line");
        }
        let s = String::from_utf8_lossy(&self.data[start..self.pos]).into_owned();
        self.pos += 1;
        Ok(s)
    }
    fn utf8(&mut self, n: usize) -> PResult<Value> {
        let b = self.take(n)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Value::Str(s.to_string())),
            Err(_) => self.err("invalid UTF-8 in a string"),
        }
    }
    fn push(&mut self, v: Value) {
        self.admit(&v, 0, false);
        self.stack.push(Item::V(v));
    }
    fn pop(&mut self) -> PResult<Value> {
        match self.stack.pop() {
            Some(Item::V(v)) => Ok(v),
            Some(Item::Mark) => self.err("unexpected MARK on the stack"),
            None => self.err("stack underflow"),
        }
    }
    fn top_mut(&mut self) -> PResult<&mut Value> {
        let pos = self.pos;
        match self.stack.last_mut() {
            Some(Item::V(v)) => Ok(v),
            _ => Err(PickleError {
                offset: pos,
                what: "expected a value on the stack".into(),
            }),
        }
    }
    /// Pops everything above the topmost MARK (and the mark).
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
    fn memo_get(&mut self, i: u32) -> PResult<Value> {
        let v = match self.memo.get(&i) {
            Some(v) => v.clone(),
            None => return self.err(format!("memo entry {i} was never stored")),
        };
        self.admit(&v, 0, true);
        Ok(v)
    }
    fn memo_put(&mut self, i: u32) -> PResult<()> {
        let v = match self.stack.last() {
            Some(Item::V(v)) => v.clone(),
            _ => return self.err("PUT with no value on the stack"),
        };
        self.admit(&v, 0, true);
        self.memo.insert(i, v);
        Ok(())
    }

    fn persistent_load(&self, pid: Value) -> PResult<Value> {
        let items = match pid {
            Value::Tuple(items) => items,
            other => return self.err(format!("persistent id is not a tuple: {other:?}")),
        };
        match items.as_slice() {
            [Value::Str(tag), ty, Value::Str(key), _location, Value::Int(numel), ..]
                if tag == "storage" =>
            {
                let type_name = match ty {
                    Value::Global(_, name) => name.clone(),
                    other => return self.err(format!("storage type is not a global: {other:?}")),
                };
                Ok(Value::Storage(StorageRef {
                    type_name,
                    key: key.clone(),
                    numel: *numel,
                }))
            }
            _ => self.err(format!("unsupported persistent id {items:?}")),
        }
    }

    fn int_list(&self, v: &Value, what: &str) -> PResult<Vec<i64>> {
        match v {
            Value::Tuple(xs) | Value::List(xs) => xs
                .iter()
                .map(|x| match x {
                    Value::Int(i) => Ok(*i),
                    other => self.err(format!("{what}: expected an int, got {other:?}")),
                })
                .collect(),
            other => self.err(format!("{what}: expected a tuple, got {other:?}")),
        }
    }

    fn reduce(&self, callable: Value, args: Value) -> PResult<Value> {
        let (module, name) = match &callable {
            Value::Global(m, n) => (m.as_str(), n.as_str()),
            other => return self.err(format!("REDUCE of a non-global {other:?}")),
        };
        let args = match args {
            Value::Tuple(a) => a,
            other => return self.err(format!("REDUCE arguments are not a tuple: {other:?}")),
        };
        match (module, name) {
            ("collections", "OrderedDict") | ("builtins", "dict") => Ok(Value::Dict(Vec::new())),
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                if args.len() < 4 {
                    return self.err(format!(
                        "{name}: expected at least 4 arguments, got {}",
                        args.len()
                    ));
                }
                let storage = match &args[0] {
                    Value::Storage(s) => s.clone(),
                    other => {
                        return self.err(format!(
                            "{name}: first argument is not a storage: {other:?}"
                        ))
                    }
                };
                let offset = match &args[1] {
                    Value::Int(i) => *i,
                    other => {
                        return self.err(format!("{name}: storage offset is not an int: {other:?}"))
                    }
                };
                let size = self.int_list(&args[2], "tensor size")?;
                let stride = self.int_list(&args[3], "tensor stride")?;
                if size.len() != stride.len() {
                    return self.err(format!(
                        "tensor size {size:?} and stride {stride:?} differ in rank"
                    ));
                }
                Ok(Value::Tensor(TensorRef {
                    storage,
                    offset,
                    size,
                    stride,
                }))
            }
            ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state") => match args.into_iter().next() {
                Some(t @ Value::Tensor(_)) => Ok(t),
                other => self.err(format!("{name}: first argument is not a tensor: {other:?}")),
            },
            _ => Ok(Value::Object(format!("{module}.{name}"))),
        }
    }

    fn run(&mut self) -> PResult<Value> {
        loop {
            if let Some(what) = self.limit_hit.take() {
                return self.err(what);
            }
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return self.err(format!("unsupported pickle protocol {proto}"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: length only
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Item::Mark),
                b'}' => self.push(Value::Dict(Vec::new())),
                b']' => self.push(Value::List(Vec::new())),
                b')' => self.push(Value::Tuple(Vec::new())),
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'K' => {
                    let v = self.u8()? as i64;
                    self.push(Value::Int(v))
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.push(Value::Int(v))
                }
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.push(Value::Int(v))
                }
                0x8a => {
                    // LONG1: n-byte little-endian two's complement
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return self.err(format!("LONG1 of {n} bytes does not fit in 64 bits"));
                    }
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= (byte as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Value::Int(v))
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Value::Float(f64::from_be_bytes(a)))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.utf8(n)?;
                    self.push(v)
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.utf8(n)?;
                    self.push(v)
                }
                0x8d => {
                    let n = self.u64()? as usize;
                    let v = self.utf8(n)?;
                    self.push(v)
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Str(String::from_utf8_lossy(&b).into_owned()))
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Str(String::from_utf8_lossy(&b).into_owned()))
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b))
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b))
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    let v = self.memo_get(i)?;
                    self.push(v)
                }
                b'j' => {
                    let i = self.u32()?;
                    let v = self.memo_get(i)?;
                    self.push(v)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(module, name))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.push(Value::Global(m, n)),
                        other => return self.err(format!("STACK_GLOBAL of non-strings {other:?}")),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.push(v)
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(items))
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.push(v)
                }
                0x81 => {
                    // NEWOBJ cls args
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    let name = match cls {
                        Value::Global(m, n) => format!("{m}.{n}"),
                        other => format!("{other:?}"),
                    };
                    self.push(Value::Object(name))
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.admit(&v, 1, false);
                    match self.top_mut()? {
                        Value::Dict(d) => d.push((k, v)),
                        _ => return self.err("SETITEM on a non-dict"),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.err("SETITEMS with an odd number of items");
                    }
                    for x in &items {
                        self.admit(x, 1, false);
                    }
                    let pos = self.pos;
                    match self.top_mut()? {
                        Value::Dict(d) => {
                            let mut it = items.into_iter();
                            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                                d.push((k, v));
                            }
                        }
                        _ => {
                            return Err(PickleError {
                                offset: pos,
                                what: "SETITEMS on a non-dict".into(),
                            })
                        }
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    self.admit(&v, 1, false);
                    match self.top_mut()? {
                        Value::List(l) => l.push(v),
                        _ => return self.err("APPEND on a non-list"),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    for x in &items {
                        self.admit(x, 1, false);
                    }
                    let pos = self.pos;
                    match self.top_mut()? {
                        Value::List(l) => l.extend(items),
                        _ => {
                            return Err(PickleError {
                                offset: pos,
                                what: "APPENDS on a non-list".into(),
                            })
                        }
                    }
                }
                b'b' => {
                    // BUILD: state for the object below; state dicts carry `_metadata` here.
                    self.pop()?;
                }
                b'0' => {
                    self.stack.pop();
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = match self.stack.last() {
                        Some(Item::V(v)) => v.clone(),
                        _ => return self.err("DUP with no value"),
                    };
                    self.admit(&v, 0, true);
                    self.push(v)
                }
                other => {
                    self.pos -= 1;
                    return self.err(format!("unsupported pickle opcode 0x{other:02x}"));
                }
            }
        }
    }
}

/// Runs the pickle program `data` and returns the value it builds.
pub fn unpickle(data: &[u8]) -> PResult<Value> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        budget: MAX_COPIED_VALUES,
        limit_hit: None,
    };
    let r = m.run();
    for item in m.stack.drain(..) {
        if let Item::V(v) = item {
            drop_flat(v);
        }
    }
    for (_, v) in m.memo.drain() {
        drop_flat(v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_small_state_dict_program() {
        // OrderedDict([('w', tensor)]) as torch.save writes it (protocol 2), hand-assembled.
        let mut p: Vec<u8> = vec![0x80, 2];
        p.extend(b"ccollections\nOrderedDict\nq\x00)Rq\x01(");
        p.extend(b"X\x01\x00\x00\x00w");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x02(");
        p.extend(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        p.extend(b"K\x00K\x02K\x03\x86K\x03K\x01\x86\x89h\x00)Rtq\x03R");
        p.extend(b"u}b.");
        let v = unpickle(&p).unwrap();
        match v {
            Value::Dict(items) => {
                assert_eq!(items.len(), 1);
                assert_eq!(items[0].0, Value::Str("w".into()));
                match &items[0].1 {
                    Value::Tensor(t) => {
                        assert_eq!(t.size, vec![2, 3]);
                        assert_eq!(t.stride, vec![3, 1]);
                        assert_eq!(t.storage.key, "0");
                        assert_eq!(t.storage.numel, 6);
                        assert_eq!(t.storage.type_name, "FloatStorage");
                    }
                    other => panic!("not a tensor: {other:?}"),
                }
            }
            other => panic!("not a dict: {other:?}"),
        }
    }

    #[test]
    fn reports_unknown_opcodes_with_offset() {
        let e = unpickle(&[0x80, 2, 0xff]).unwrap_err();
        assert_eq!(e.offset, 2);
        assert!(e.what.contains("0xff"), "{}", e.what);
        let e = unpickle(&[0x80, 2, b'X', 9, 0]).unwrap_err();
        assert!(e.what.contains("truncated"), "{}", e.what);
    }

    #[test]
    fn long1_is_signed() {
        let v = unpickle(&[0x80, 2, 0x8a, 2, 0x00, 0xff, b'.']).unwrap();
        assert_eq!(v, Value::Int(-256));
        let v = unpickle(&[0x80, 2, 0x8a, 5, 0, 0, 0, 0, 1, b'.']).unwrap();
        assert_eq!(v, Value::Int(1 << 32));
    }
}
