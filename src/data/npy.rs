//! NumPy `.npy` / `.npz` reading (owned or memory-mapped) and writing (atomic: `<name>.tmp` then
//! rename).
//!
//! Supported: format versions 1.0, 2.0 and 3.0; little-endian (or byte-order-free) `f4`, `f8`,
//! `i1`..`i8`, `u1`..`u8` and `b1`; C order only. Every header is validated strictly: the magic,
//! the version, the dict keys, the dtype, `fortran_order` and that the shape's size matches the
//! file length. Errors name the file, the place (`header`, `data`) and the problem.
use crate::data::dataset::F32Buf;
use crate::error::{Error, Result};
use memmap2::Mmap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `\x93NUMPY`: the first six bytes of every `.npy` file.
const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// numpy aligns the end of the header (and so the start of the data) to this many bytes.
const HEADER_ALIGN: usize = 64;

/// Element type of an `.npy` array (always little-endian in memory here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    Bool,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
            Dtype::I16 | Dtype::U16 => 2,
            Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }
    /// numpy's `descr` string (`<f4`, `|u1`, ...).
    pub fn descr(self) -> &'static str {
        match self {
            Dtype::F32 => "<f4",
            Dtype::F64 => "<f8",
            Dtype::I8 => "|i1",
            Dtype::I16 => "<i2",
            Dtype::I32 => "<i4",
            Dtype::I64 => "<i8",
            Dtype::U8 => "|u1",
            Dtype::U16 => "<u2",
            Dtype::U32 => "<u4",
            Dtype::U64 => "<u8",
            Dtype::Bool => "|b1",
        }
    }
    /// numpy's name (`float32`, `int64`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F64 => "float64",
            Dtype::I8 => "int8",
            Dtype::I16 => "int16",
            Dtype::I32 => "int32",
            Dtype::I64 => "int64",
            Dtype::U8 => "uint8",
            Dtype::U16 => "uint16",
            Dtype::U32 => "uint32",
            Dtype::U64 => "uint64",
            Dtype::Bool => "bool",
        }
    }
    pub fn is_integer(self) -> bool {
        !matches!(self, Dtype::F32 | Dtype::F64)
    }
    fn from_descr(descr: &str) -> Option<Dtype> {
        // (Not `split_at(1)`: a descr may start with a multi-byte character; found by cargo fuzz.)
        let code = match descr.strip_prefix(['<', '|', '=']) {
            Some(code) => code,
            // Big-endian data is not supported (no producer of skeleton data writes it).
            None if descr.starts_with('>') => return None,
            None => descr,
        };
        Some(match code {
            "f4" => Dtype::F32,
            "f8" => Dtype::F64,
            "i1" => Dtype::I8,
            "i2" => Dtype::I16,
            "i4" => Dtype::I32,
            "i8" => Dtype::I64,
            "u1" => Dtype::U8,
            "u2" => Dtype::U16,
            "u4" => Dtype::U32,
            "u8" => Dtype::U64,
            "b1" => Dtype::Bool,
            _ => return None,
        })
    }
}

/// A parsed `.npy` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte offset of the first element (header length included).
    pub data_offset: usize,
}

impl NpyHeader {
    /// Number of elements (product of the shape; 1 for a 0-d array).
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }
    /// Size of the data in bytes.
    pub fn data_bytes(&self) -> usize {
        self.num_elements() * self.dtype.size()
    }
}

/// Parses and validates the header at the start of `bytes` (at least the whole header must be
/// there). `file` names the source in errors. Does not check the data length (see
/// [`check_length`]).
pub fn parse_header(bytes: &[u8], file: &Path) -> Result<NpyHeader> {
    let bad = |what: String| Error::input(file, "header", what);
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad(
            "not a .npy file (wrong magic: expected \\x93NUMPY)".into()
        ));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(bad("file ends inside the header".into()));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        _ => {
            return Err(bad(format!(
                "unsupported .npy format version {major}.{minor}"
            )))
        }
    };
    let end = start + len;
    if bytes.len() < end {
        return Err(bad(format!(
            "file ends inside the header ({} of {end} bytes)",
            bytes.len()
        )));
    }
    let text = std::str::from_utf8(&bytes[start..end])
        .map_err(|_| bad("header is not text (latin-1/utf-8)".into()))?;
    let dict = parse_dict(text).map_err(|w| bad(format!("{w} in {:?}", text.trim_end())))?;
    let descr = dict
        .descr
        .ok_or_else(|| bad("missing key 'descr'".into()))?;
    let fortran = dict
        .fortran_order
        .ok_or_else(|| bad("missing key 'fortran_order'".into()))?;
    let shape = dict
        .shape
        .ok_or_else(|| bad("missing key 'shape'".into()))?;
    let dtype = Dtype::from_descr(&descr).ok_or_else(|| {
        bad(format!(
            "unsupported dtype {descr:?} (supported: little-endian float32/float64 and integer types)"
        ))
    })?;
    if fortran {
        return Err(bad(
            "fortran_order = True is not supported (save with C order)".into(),
        ));
    }
    shape
        .iter()
        .try_fold(dtype.size(), |acc: usize, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} is too large")))?;
    Ok(NpyHeader {
        dtype,
        shape,
        data_offset: end,
    })
}

/// Checks that a file of `file_len` bytes holds exactly the data its header announces.
pub fn check_length(header: &NpyHeader, file_len: usize, file: &Path) -> Result<()> {
    let expected = header.data_offset + header.data_bytes();
    if file_len != expected {
        let what = if file_len < expected {
            "truncated"
        } else {
            "has trailing bytes"
        };
        return Err(Error::input(
            file,
            "data",
            format!(
                "file {what}: shape {:?} of {} needs {} data bytes after the {}-byte header, the file has {}",
                header.shape,
                header.dtype.name(),
                header.data_bytes(),
                header.data_offset,
                file_len.saturating_sub(header.data_offset)
            ),
        ));
    }
    Ok(())
}

#[derive(Default)]
struct HeaderDict {
    descr: Option<String>,
    fortran_order: Option<bool>,
    shape: Option<Vec<usize>>,
}

/// Parses numpy's header literal `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
fn parse_dict(text: &str) -> std::result::Result<HeaderDict, String> {
    let s = text.trim();
    let inner = s
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .ok_or_else(|| "header is not a dict literal".to_string())?;
    let mut out = HeaderDict::default();
    let mut rest = inner.trim_start();
    while !rest.is_empty() {
        let (key, after) = parse_quoted(rest).ok_or("expected a quoted key")?;
        let after = after
            .trim_start()
            .strip_prefix(':')
            .ok_or("expected ':' after a key")?;
        let after = after.trim_start();
        rest = match key.as_str() {
            "descr" => {
                let (v, a) = parse_quoted(after).ok_or(
                    "'descr' must be a simple dtype string (structured dtypes are not supported)",
                )?;
                out.descr = Some(v);
                a
            }
            "fortran_order" => {
                if let Some(a) = after.strip_prefix("True") {
                    out.fortran_order = Some(true);
                    a
                } else if let Some(a) = after.strip_prefix("False") {
                    out.fortran_order = Some(false);
                    a
                } else {
                    return Err("'fortran_order' must be True or False".into());
                }
            }
            "shape" => {
                let a = after.strip_prefix('(').ok_or("'shape' must be a tuple")?;
                let close = a.find(')').ok_or("unclosed 'shape' tuple")?;
                let mut dims = Vec::new();
                for part in a[..close].split(',') {
                    let p = part.trim().trim_end_matches('L');
                    if p.is_empty() {
                        continue;
                    }
                    dims.push(
                        p.parse::<usize>()
                            .map_err(|_| format!("bad shape entry {p:?}"))?,
                    );
                }
                out.shape = Some(dims);
                &a[close + 1..]
            }
            other => return Err(format!("unknown header key {other:?}")),
        };
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
        } else if !rest.is_empty() {
            return Err("expected ',' between header entries".into());
        }
    }
    Ok(out)
}

fn parse_quoted(s: &str) -> Option<(String, &str)> {
    let q = s.chars().next()?;
    if q != '\'' && q != '"' {
        return None;
    }
    let body = &s[1..];
    let end = body.find(q)?;
    Some((body[..end].to_string(), &body[end + 1..]))
}

/// Builds a v1.0 header (or v2.0 if it does not fit in 65535 bytes) padded so the data starts
/// on a 64-byte boundary, as numpy writes it.
pub fn header_bytes(dtype: Dtype, shape: &[usize]) -> Vec<u8> {
    let shape_txt = match shape.len() {
        0 => "()".to_string(),
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_txt}, }}",
        dtype.descr()
    );
    for (major, prefix) in [(1u8, 10usize), (2, 12)] {
        let unpadded = prefix + dict.len() + 1; // + the final '\n'
        let total = unpadded.div_ceil(HEADER_ALIGN) * HEADER_ALIGN;
        let hlen = total - prefix;
        if major == 1 && hlen > u16::MAX as usize {
            continue;
        }
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[major, 0]);
        if major == 1 {
            out.extend_from_slice(&(hlen as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&(hlen as u32).to_le_bytes());
        }
        out.extend_from_slice(dict.as_bytes());
        out.resize(total - 1, b' ');
        out.push(b'\n');
        return out;
    }
    unreachable!("a v2.0 header always fits")
}

/// An array read from an `.npy` (or an `.npz` member): header plus raw little-endian bytes.
#[derive(Debug, Clone)]
pub struct NpyArray {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Raw element bytes, little-endian.
    pub bytes: Vec<u8>,
    /// Where it came from (for errors).
    pub source: PathBuf,
}

impl NpyArray {
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }
    /// Converts float32/float64 data to f32; integers are rejected.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        bytes_to_f32(&self.bytes, self.dtype, &self.source)
    }
    /// Converts any integer (or bool) data to i64; floats are rejected.
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        bytes_to_i64(&self.bytes, self.dtype, &self.source)
    }
    /// Converts any numeric data to f64 (for generic inspection).
    pub fn to_f64(&self) -> Vec<f64> {
        match self.dtype {
            Dtype::F32 => le_chunks::<4>(&self.bytes)
                .map(|b| f32::from_le_bytes(b) as f64)
                .collect(),
            Dtype::F64 => le_chunks::<8>(&self.bytes)
                .map(f64::from_le_bytes)
                .collect(),
            _ => bytes_to_i64_lossy(&self.bytes, self.dtype)
                .into_iter()
                .map(|v| v as f64)
                .collect(),
        }
    }
}

fn le_chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    b.chunks_exact(N).map(|c| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        a
    })
}

fn bytes_to_f32(bytes: &[u8], dtype: Dtype, file: &Path) -> Result<Vec<f32>> {
    match dtype {
        Dtype::F32 => Ok(le_chunks::<4>(bytes).map(f32::from_le_bytes).collect()),
        Dtype::F64 => Ok(le_chunks::<8>(bytes)
            .map(|b| f64::from_le_bytes(b) as f32)
            .collect()),
        other => Err(Error::input(
            file,
            "header",
            format!(
                "dtype {} where float32 or float64 was expected",
                other.name()
            ),
        )),
    }
}

fn bytes_to_i64_lossy(bytes: &[u8], dtype: Dtype) -> Vec<i64> {
    match dtype {
        Dtype::I8 => bytes.iter().map(|&b| b as i8 as i64).collect(),
        Dtype::U8 | Dtype::Bool => bytes.iter().map(|&b| b as i64).collect(),
        Dtype::I16 => le_chunks::<2>(bytes)
            .map(|b| i16::from_le_bytes(b) as i64)
            .collect(),
        Dtype::U16 => le_chunks::<2>(bytes)
            .map(|b| u16::from_le_bytes(b) as i64)
            .collect(),
        Dtype::I32 => le_chunks::<4>(bytes)
            .map(|b| i32::from_le_bytes(b) as i64)
            .collect(),
        Dtype::U32 => le_chunks::<4>(bytes)
            .map(|b| u32::from_le_bytes(b) as i64)
            .collect(),
        Dtype::I64 => le_chunks::<8>(bytes).map(i64::from_le_bytes).collect(),
        Dtype::U64 => le_chunks::<8>(bytes)
            .map(|b| u64::from_le_bytes(b) as i64)
            .collect(),
        Dtype::F32 | Dtype::F64 => Vec::new(),
    }
}

fn bytes_to_i64(bytes: &[u8], dtype: Dtype, file: &Path) -> Result<Vec<i64>> {
    if !dtype.is_integer() {
        return Err(Error::input(
            file,
            "header",
            format!("dtype {} where an integer type was expected", dtype.name()),
        ));
    }
    if dtype == Dtype::U64 {
        for (i, b) in le_chunks::<8>(bytes).enumerate() {
            if u64::from_le_bytes(b) > i64::MAX as u64 {
                return Err(Error::input(
                    file,
                    format!("element {i}"),
                    "uint64 value does not fit in int64",
                ));
            }
        }
    }
    Ok(bytes_to_i64_lossy(bytes, dtype))
}

/// Reads a whole `.npy` file into an [`NpyArray`] (validated header and length).
pub fn read_array(path: &Path) -> Result<NpyArray> {
    let mut bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let header = parse_header(&bytes, path)?;
    check_length(&header, bytes.len(), path)?;
    bytes.drain(..header.data_offset);
    Ok(NpyArray {
        dtype: header.dtype,
        shape: header.shape,
        bytes,
        source: path.to_path_buf(),
    })
}

/// Reads only the header of an `.npy` file (and checks the file length against it).
pub fn read_header(path: &Path) -> Result<NpyHeader> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len() as usize;
    let mut head = vec![0u8; 12];
    let n = read_up_to(&mut f, &mut head).map_err(|e| Error::io(path, e))?;
    head.truncate(n);
    // Read enough for the declared header length.
    let need = if n >= 10 && head[6] == 1 {
        10 + u16::from_le_bytes([head[8], head[9]]) as usize
    } else if n >= 12 && (head[6] == 2 || head[6] == 3) {
        12 + u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize
    } else {
        n
    };
    if need > n && need <= file_len {
        let mut rest = vec![0u8; need - n];
        f.read_exact(&mut rest).map_err(|e| Error::io(path, e))?;
        head.extend_from_slice(&rest);
    }
    let header = parse_header(&head, path)?;
    check_length(&header, file_len, path)?;
    Ok(header)
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Reads a float32 (or float64, converted) `.npy`: `(shape, data)` in C order.
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let a = read_array(path)?;
    let v = a.to_f32()?;
    Ok((a.shape, v))
}

/// Reads any integer `.npy` (int8..int64, uint8..uint64, bool) as i64: `(shape, data)`.
pub fn read_i64(path: &Path) -> Result<(Vec<usize>, Vec<i64>)> {
    let a = read_array(path)?;
    let v = a.to_i64()?;
    Ok((a.shape, v))
}

/// Memory-maps a float32 `.npy`: `(shape, buffer)`. A float64 file is read and converted instead
/// (it cannot be viewed as f32 in place).
pub fn mmap_f32(path: &Path) -> Result<(Vec<usize>, F32Buf)> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only; like numpy's mmap_mode='r', we assume the file is not
    // truncated by another process while mapped.
    let mmap = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
    let header = parse_header(&mmap, path)?;
    check_length(&header, mmap.len(), path)?;
    match header.dtype {
        Dtype::F32 => {
            let n = header.num_elements();
            Ok((
                header.shape,
                F32Buf::mapped(Arc::new(mmap), header.data_offset, n),
            ))
        }
        Dtype::F64 => {
            let v = bytes_to_f32(&mmap[header.data_offset..], Dtype::F64, path)?;
            Ok((header.shape, F32Buf::Owned(v)))
        }
        other => Err(Error::input(
            path,
            "header",
            format!(
                "dtype {} where float32 or float64 was expected",
                other.name()
            ),
        )),
    }
}

/// `<path>.tmp`: where atomic writers put data before the final rename.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Writes `bytes` to `path` atomically (`<path>.tmp`, fsync-free flush, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let res = (|| -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(File::create(&tmp)?);
        f.write_all(bytes)?;
        f.flush()?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn check_count(path: &Path, shape: &[usize], len: usize) -> Result<()> {
    let n: usize = shape.iter().product();
    if n != len {
        return Err(Error::Other(format!(
            "{}: shape {shape:?} has {n} elements but {len} values were given",
            path.display()
        )));
    }
    Ok(())
}

/// Writes a float32 `.npy` atomically. `data.len()` must equal the product of `shape`.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    check_count(path, shape, data.len())?;
    let mut bytes = header_bytes(Dtype::F32, shape);
    bytes.reserve(data.len() * 4);
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    write_atomic(path, &bytes)
}

/// Writes an int64 `.npy` atomically. `data.len()` must equal the product of `shape`.
pub fn write_i64(path: &Path, shape: &[usize], data: &[i64]) -> Result<()> {
    check_count(path, shape, data.len())?;
    let mut bytes = header_bytes(Dtype::I64, shape);
    bytes.reserve(data.len() * 8);
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    write_atomic(path, &bytes)
}

/// A float32 `.npy` of a fixed shape written in pieces, possibly from several threads at once:
/// the header is written first to `<path>.tmp`, rows (slices along axis 0) are written at their
/// positions with [`NpyRowWriter::write_row`], and [`NpyRowWriter::finish`] renames the file to
/// `path`. Dropping an unfinished writer deletes the `.tmp` file, so an interrupted run never
/// leaves a half-written file under the final name. Rows never written read back as zeros.
pub struct NpyRowWriter {
    file: File,
    path: PathBuf,
    tmp: PathBuf,
    data_offset: u64,
    row_len: usize,
    rows: usize,
    /// `shape[1..]`.
    shape_rest: Vec<usize>,
    finished: bool,
    #[cfg(not(unix))]
    lock: std::sync::Mutex<()>,
}

impl NpyRowWriter {
    /// Creates `<path>.tmp` of the final size for a float32 array of `shape` (rows = `shape[0]`).
    pub fn create(path: &Path, shape: &[usize]) -> Result<Self> {
        Self::create_at(path, tmp_path(path), shape)
    }

    fn create_at(path: &Path, tmp: PathBuf, shape: &[usize]) -> Result<Self> {
        if shape.is_empty() {
            return Err(Error::Other(format!(
                "{}: a row writer needs at least one axis",
                path.display()
            )));
        }
        let header = header_bytes(Dtype::F32, shape);
        let row_len: usize = shape[1..].iter().product();
        let total = header.len() as u64 + (shape[0] * row_len * 4) as u64;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        file.write_all(&header).map_err(|e| Error::io(&tmp, e))?;
        file.set_len(total).map_err(|e| Error::io(&tmp, e))?;
        Ok(NpyRowWriter {
            file,
            path: path.to_path_buf(),
            tmp,
            data_offset: header.len() as u64,
            row_len,
            rows: shape[0],
            shape_rest: shape[1..].to_vec(),
            finished: false,
            #[cfg(not(unix))]
            lock: std::sync::Mutex::new(()),
        })
    }

    /// Elements per row.
    pub fn row_len(&self) -> usize {
        self.row_len
    }

    /// Writes only the element ranges `segments` (`(start, len)` within the row) of row `index`;
    /// the rest of the row keeps what the file holds, zeros for a row not written before (the
    /// `.tmp` file is created sparse). Lets zero-padded data skip writing its padding.
    pub fn write_row_segments(
        &self,
        index: usize,
        row: &[f32],
        segments: &[(usize, usize)],
    ) -> Result<()> {
        if index >= self.rows
            || row.len() != self.row_len
            || segments.iter().any(|&(s, l)| s + l > self.row_len)
        {
            return Err(Error::Other(format!(
                "{}: bad segments of row {index} of {} ({} values, expected {})",
                self.tmp.display(),
                self.rows,
                row.len(),
                self.row_len
            )));
        }
        for &(start, len) in segments {
            if len > 0 {
                let offset = self.data_offset + ((index * self.row_len + start) * 4) as u64;
                self.write_f32_at(&row[start..start + len], offset)?;
            }
        }
        Ok(())
    }

    fn write_f32_at(&self, values: &[f32], offset: u64) -> Result<()> {
        #[cfg(target_endian = "little")]
        // SAFETY: any f32 is 4 plain bytes; u8 has no alignment requirement; the view lives only
        // during this call. On a little-endian machine these are the file's `<f4` bytes.
        let bytes: &[u8] =
            unsafe { std::slice::from_raw_parts(values.as_ptr() as *const u8, values.len() * 4) };
        #[cfg(not(target_endian = "little"))]
        let bytes: &[u8] = &values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>();
        self.write_at(bytes, offset)
            .map_err(|e| Error::io(&self.tmp, e))
    }

    /// Writes row `index` (`row_len` values). Safe to call from several threads for different rows.
    pub fn write_row(&self, index: usize, row: &[f32]) -> Result<()> {
        if index >= self.rows || row.len() != self.row_len {
            return Err(Error::Other(format!(
                "{}: row {index} of {} with {} values (expected {})",
                self.tmp.display(),
                self.rows,
                row.len(),
                self.row_len
            )));
        }
        self.write_f32_at(row, self.data_offset + (index * self.row_len * 4) as u64)
    }

    /// A writer holding only the rows `keep` (in that order) of this one, e.g. after some inputs
    /// failed. The new data goes to `<path>.compact.tmp`; this writer's `.tmp` is deleted.
    pub fn compact(self, keep: &[usize]) -> Result<NpyRowWriter> {
        let mut shape = vec![keep.len()];
        shape.extend_from_slice(&self.shape_rest);
        let mut staging = self.tmp.as_os_str().to_owned();
        staging.push(".compact");
        let out = Self::create_at(&self.path, PathBuf::from(staging), &shape)?;
        let mut buf = vec![0u8; self.row_len * 4];
        let mut row = vec![0f32; self.row_len];
        for (new, &old) in keep.iter().enumerate() {
            let offset = self.data_offset + (old * self.row_len * 4) as u64;
            self.read_at(&mut buf, offset)
                .map_err(|e| Error::io(&self.tmp, e))?;
            for (v, b) in row.iter_mut().zip(buf.chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            out.write_row(new, &row)?;
        }
        Ok(out)
    }

    #[cfg(unix)]
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, offset)
    }

    #[cfg(not(unix))]
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom};
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut f = &self.file;
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(buf)
    }

    #[cfg(unix)]
    fn write_at(&self, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(bytes, offset)
    }

    #[cfg(not(unix))]
    fn write_at(&self, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom};
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut f = &self.file;
        f.seek(SeekFrom::Start(offset))?;
        f.write_all(bytes)
    }

    /// Flushes and renames `<path>.tmp` to `path`.
    pub fn finish(mut self) -> Result<()> {
        self.file.flush().map_err(|e| Error::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        self.finished = true;
        Ok(())
    }
}

impl Drop for NpyRowWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Names of the arrays in an `.npz` (member names without the `.npy` suffix).
pub fn npz_members(path: &Path) -> Result<Vec<String>> {
    crate::data::limits::check_zip_tail(path)?;
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let zip = zip::ZipArchive::new(std::io::BufReader::new(f))
        .map_err(|e| Error::input(path, "zip", format!("not a readable .npz: {e}")))?;
    Ok(zip
        .file_names()
        .map(|n| n.strip_suffix(".npy").unwrap_or(n).to_string())
        .collect())
}

/// Opens member `name` (with or without `.npy`) of an `.npz` (stored or deflated) and calls `f`
/// with its validated header and a reader positioned at its first element. Lets callers stream
/// very large members without holding the raw bytes.
pub fn with_npz_member<T>(
    path: &Path,
    name: &str,
    f: impl FnOnce(&NpyHeader, &mut dyn Read, &Path) -> Result<T>,
) -> Result<T> {
    crate::data::limits::check_zip_tail(path)?;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| Error::input(path, "zip", format!("not a readable .npz: {e}")))?;
    let member = if name.ends_with(".npy") {
        name.to_string()
    } else {
        format!("{name}.npy")
    };
    let names: Vec<String> = zip.file_names().map(|s| s.to_string()).collect();
    let mut entry = zip.by_name(&member).map_err(|_| {
        Error::input(
            path,
            &member,
            format!("no such member (the archive has: {})", names.join(", ")),
        )
    })?;
    let place = PathBuf::from(format!("{}[{member}]", path.display()));
    let size = entry.size() as usize;
    // Header: read the fixed prefix, then the declared length.
    let mut head = vec![0u8; 12];
    let n = read_up_to(&mut entry, &mut head[..10]).map_err(|e| Error::io(&place, e))?;
    head.truncate(n);
    if n == 10 && (head[6] == 2 || head[6] == 3) {
        let mut b = [0u8; 2];
        entry.read_exact(&mut b).map_err(|e| Error::io(&place, e))?;
        head.extend_from_slice(&b);
    }
    let hlen = if head.len() >= 10 && head[6] == 1 {
        u16::from_le_bytes([head[8], head[9]]) as usize
    } else if head.len() >= 12 {
        u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize
    } else {
        0
    };
    let mut rest = vec![0u8; hlen.min(size.saturating_sub(head.len()))];
    entry
        .read_exact(&mut rest)
        .map_err(|e| Error::io(&place, e))?;
    head.extend_from_slice(&rest);
    let header = parse_header(&head, &place)?;
    check_length(&header, size, &place)?;
    f(&header, &mut entry, &place)
}

/// Reads member `name` of an `.npz` into an [`NpyArray`].
pub fn read_npz_array(path: &Path, name: &str) -> Result<NpyArray> {
    with_npz_member(path, name, |h, r, place| {
        let mut bytes = vec![0u8; h.data_bytes()];
        r.read_exact(&mut bytes).map_err(|e| Error::io(place, e))?;
        Ok(NpyArray {
            dtype: h.dtype,
            shape: h.shape.clone(),
            bytes,
            source: place.to_path_buf(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_alignment() {
        for shape in [vec![], vec![5], vec![2, 3, 4]] {
            let h = header_bytes(Dtype::F32, &shape);
            assert_eq!(h.len() % HEADER_ALIGN, 0);
            let p = parse_header(&h, Path::new("x.npy")).unwrap();
            assert_eq!(p.shape, shape);
            assert_eq!(p.dtype, Dtype::F32);
            assert_eq!(p.data_offset, h.len());
        }
    }

    #[test]
    fn header_rejects_fortran_and_bad_dtype() {
        let mk = |dict: &str| {
            let mut v = MAGIC.to_vec();
            v.extend_from_slice(&[1, 0]);
            v.extend_from_slice(&(dict.len() as u16).to_le_bytes());
            v.extend_from_slice(dict.as_bytes());
            v
        };
        let e = parse_header(
            &mk("{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }"),
            Path::new("a.npy"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("a.npy") && e.contains("header") && e.contains("fortran"),
            "{e}"
        );
        let e = parse_header(
            &mk("{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }"),
            Path::new("a.npy"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unsupported dtype"), "{e}");
        let e = parse_header(b"PK\x03\x04garbage...", Path::new("a.npy"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("magic"), "{e}");
    }
}
