//! Raw NTU RGB+D `.skeleton` parser (Kinect v2, 25 joints), file names and the official
//! missing-skeleton lists.
//!
//! The reader fills the array the way the official `read_xyz` does (reference doc 1.2): a zeroed
//! `(3, numFrame, 25, 2)` float32 array; in frame `t` the `m`-th body **in file order** goes to slot
//! `m` when `m < 2` (further bodies are validated, then dropped; bodies are not tracked by bodyID);
//! a frame with 0 bodies stays zero. Coordinates are parsed as f64 and rounded to f32, as
//! `np.float32(float(token))` does.
//!
//! The parser works on bytes (no regex, no per-line allocation), accepts LF and CRLF line ends,
//! leading/trailing spaces and tabs, and a missing final newline. It rejects, naming the file and
//! the 1-based line: a file that ends early, a count line that is not one non-negative integer, a
//! joint count other than 25, a body line without 10 fields or with a bodyID that is not a u64, a
//! joint line without 12 numeric fields, NaN or infinite coordinates, and non-blank data after the
//! last announced frame.
use crate::error::{Error, Result};
use std::path::Path;

/// Joints per body in NTU RGB+D.
pub const NTU_JOINTS: usize = 25;
/// Bodies kept per frame (official `max_body`).
pub const NTU_MAX_BODIES: usize = 2;
/// Fields of a body-info line (bodyID, clipedEdges, ..., trackingState).
const BODY_FIELDS: usize = 10;
/// Fields of a joint line (x y z depthX depthY colorX colorY orientation WXYZ trackingState).
const JOINT_FIELDS: usize = 12;

/// The official NTU-60 list of 302 samples with missing skeletons (shahroudy/NTURGB-D).
pub const NTU60_MISSING_LIST: &str =
    include_str!("../../resources/ntu/NTU_RGBD_samples_with_missing_skeletons.txt");
/// The official NTU-120 list of 535 samples with missing skeletons (shahroudy/NTURGB-D).
pub const NTU120_MISSING_LIST: &str =
    include_str!("../../resources/ntu/NTU_RGBD120_samples_with_missing_skeletons.txt");

/// Sample ids (`SsssCcccPpppRrrrAaaa`, no suffix) of a missing-skeleton list: the lines that are a
/// valid NTU name (the official files start with 2-3 header lines).
pub fn missing_ids(list: &str) -> Vec<String> {
    list.lines()
        .map(str::trim)
        .filter(|l| NtuName::parse_id(l).is_some())
        .map(str::to_string)
        .collect()
}

/// The fields of an NTU file name `SsssCcccPpppRrrrAaaa[.skeleton]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NtuName {
    pub setup: u32,
    pub camera: u32,
    pub performer: u32,
    pub replication: u32,
    /// 1-based action class (label = action - 1).
    pub action: u32,
}

impl NtuName {
    /// Parses an id of exactly the form `SsssCcccPpppRrrrAaaa` (3 digits each).
    pub fn parse_id(id: &str) -> Option<NtuName> {
        let b = id.as_bytes();
        if b.len() != 20 {
            return None;
        }
        let mut vals = [0u32; 5];
        for (k, letter) in [b'S', b'C', b'P', b'R', b'A'].iter().enumerate() {
            let o = k * 4;
            if b[o] != *letter || !b[o + 1..o + 4].iter().all(u8::is_ascii_digit) {
                return None;
            }
            vals[k] = b[o + 1..o + 4]
                .iter()
                .fold(0, |a, &d| a * 10 + (d - b'0') as u32);
        }
        Some(NtuName {
            setup: vals[0],
            camera: vals[1],
            performer: vals[2],
            replication: vals[3],
            action: vals[4],
        })
    }

    /// Parses a file name `SsssCcccPpppRrrrAaaa.skeleton` (the suffix is optional).
    pub fn parse_file_name(name: &str) -> Option<NtuName> {
        Self::parse_id(name.strip_suffix(".skeleton").unwrap_or(name))
    }

    /// 0-based class label (`action - 1`).
    pub fn label(&self) -> i64 {
        self.action as i64 - 1
    }
}

/// One parsed `.skeleton` file.
#[derive(Debug, Clone, PartialEq)]
pub struct NtuSkeleton {
    /// numFrame as announced in the file (= frames parsed).
    pub frames: usize,
    /// `(3, frames, 25, 2)` float32, C order: xyz of the first two bodies of each frame.
    pub data: Vec<f32>,
    /// Largest body count of any frame (bodies beyond 2 are dropped from `data`).
    pub max_bodies: usize,
    /// Frames with no body.
    pub empty_frames: usize,
}

impl NtuSkeleton {
    /// Copies the first `min(frames, t_max)` frames into `out`, a zeroed `(3, t_max, 25, 2)` buffer
    /// (frames beyond `t_max` are dropped). Returns the number of frames copied.
    pub fn fill_padded(&self, t_max: usize, out: &mut [f32]) -> usize {
        let per_frame = NTU_JOINTS * NTU_MAX_BODIES;
        let t = self.frames.min(t_max);
        for c in 0..3 {
            let src = &self.data[c * self.frames * per_frame..][..t * per_frame];
            out[c * t_max * per_frame..][..t * per_frame].copy_from_slice(src);
        }
        t
    }
}

/// Reads and parses a `.skeleton` file.
pub fn read_skeleton(path: &Path) -> Result<NtuSkeleton> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_skeleton(&bytes, path)
}

/// Line cursor over the file bytes; lines are numbered from 1.
struct Lines<'a> {
    bytes: &'a [u8],
    pos: usize,
    line: usize,
    file: &'a Path,
}

impl<'a> Lines<'a> {
    /// The next line with `\r` and surrounding spaces/tabs removed, or an error "file ends early".
    fn next(&mut self, what: &str) -> Result<&'a [u8]> {
        if self.pos >= self.bytes.len() {
            return Err(Error::input(
                self.file,
                format!("line {}", self.line + 1),
                format!("file ends early: expected {what}"),
            ));
        }
        let rest = &self.bytes[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        self.pos += end + 1;
        self.line += 1;
        Ok(trim(&rest[..end]))
    }

    /// The next line split on spaces/tabs in one pass: stores up to `N` fields in `out` and returns
    /// `(field count, mask, line)`, where bit `i` of `mask` says field `i` has a digit and only
    /// digits, signs, points and exponent letters (a decimal number's shape; others need
    /// [`looks_numeric`]).
    fn next_fields<const N: usize>(
        &mut self,
        what: &str,
        out: &mut [&'a [u8]; N],
    ) -> Result<(usize, u32, &'a [u8])> {
        if self.pos >= self.bytes.len() {
            return Err(Error::input(
                self.file,
                format!("line {}", self.line + 1),
                format!("file ends early: expected {what}"),
            ));
        }
        let rest = &self.bytes[self.pos..];
        let (mut i, len) = (0, rest.len());
        let (mut n, mut mask) = (0usize, 0u32);
        loop {
            while i < len && (rest[i] == b' ' || rest[i] == b'\t' || rest[i] == b'\r') {
                i += 1;
            }
            if i >= len || rest[i] == b'\n' {
                break;
            }
            let start = i;
            let (mut plain, mut digit) = (true, false);
            while i < len {
                match CLASS[rest[i] as usize] {
                    DIGIT => digit = true,
                    NUMERIC => {}
                    SEPARATOR => break,
                    _ => plain = false,
                }
                i += 1;
            }
            if n < N {
                out[n] = &rest[start..i];
                if plain && digit && n < 32 {
                    mask |= 1 << n;
                }
            }
            n += 1;
        }
        let line = trim(&rest[..i]);
        self.pos += (i + 1).min(len);
        self.line += 1;
        Ok((n, mask, line))
    }

    fn err(&self, what: impl Into<String>) -> Error {
        Error::input(self.file, format!("line {}", self.line), what)
    }

    /// A line holding exactly one non-negative integer.
    fn count(&mut self, what: &str) -> Result<usize> {
        let line = self.next(what)?;
        parse_uint(line)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| {
                self.err(format!(
                    "expected {what} (one non-negative integer), found {:?}",
                    show(line)
                ))
            })
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if matches!(first, b' ' | b'\t' | b'\r') {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if matches!(last, b' ' | b'\t' | b'\r') {
            s = rest;
        } else {
            break;
        }
    }
    s
}

fn show(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(line);
    if s.len() > 80 {
        format!(
            "{}...",
            &s[..s.char_indices().nth(77).map(|(i, _)| i).unwrap_or(s.len())]
        )
    } else {
        s.into_owned()
    }
}

fn parse_uint(tok: &[u8]) -> Option<u64> {
    if tok.is_empty() || tok.len() > 20 || !tok.iter().all(u8::is_ascii_digit) {
        return None;
    }
    tok.iter().try_fold(0u64, |a, &d| {
        a.checked_mul(10)?.checked_add((d - b'0') as u64)
    })
}

/// Splits on runs of spaces/tabs into at most `N` tokens; returns the number of tokens seen
/// (which may exceed `N`).
fn split_fields<'a, const N: usize>(line: &'a [u8], out: &mut [&'a [u8]; N]) -> usize {
    let mut n = 0;
    let mut i = 0;
    let len = line.len();
    while i < len {
        while i < len && (line[i] == b' ' || line[i] == b'\t') {
            i += 1;
        }
        if i >= len {
            break;
        }
        let start = i;
        while i < len && line[i] != b' ' && line[i] != b'\t' {
            i += 1;
        }
        if n < N {
            out[n] = &line[start..i];
        }
        n += 1;
    }
    n
}

/// Byte classes of the field scanner.
const OTHER: u8 = 0;
const NUMERIC: u8 = 1;
const SEPARATOR: u8 = 2;
const DIGIT: u8 = 3;
static CLASS: [u8; 256] = {
    let mut t = [OTHER; 256];
    let mut d = b'0';
    while d <= b'9' {
        t[d as usize] = DIGIT;
        d += 1;
    }
    t[b'.' as usize] = NUMERIC;
    t[b'-' as usize] = NUMERIC;
    t[b'+' as usize] = NUMERIC;
    t[b'e' as usize] = NUMERIC;
    t[b'E' as usize] = NUMERIC;
    t[b' ' as usize] = SEPARATOR;
    t[b'\t' as usize] = SEPARATOR;
    t[b'\r' as usize] = SEPARATOR;
    t[b'\n' as usize] = SEPARATOR;
    t
};

/// Exact powers of ten representable in f64 (10^0 ..= 10^22).
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// Clinger's fast path: a decimal `[+-]digits[.digits][(e|E)[+-]digits]` whose digits form an
/// integer `m <= 2^53` scaled by `10^k` with `|k| <= 22` is `m * 10^k` or `m / 10^-k`, one exactly
/// rounded IEEE operation on exact operands, so the result equals a correctly rounded parse (what
/// Python's `float()` and Rust's `str::parse` return). Anything else returns None (use the slow path).
fn fast_f64(tok: &[u8]) -> Option<f64> {
    let (neg, digits) = match tok.first()? {
        b'-' => (true, &tok[1..]),
        b'+' => (false, &tok[1..]),
        _ => (false, tok),
    };
    let (mut mant, mut count, mut frac, mut seen_dot, mut i) = (0u64, 0u32, 0i32, false, 0usize);
    while i < digits.len() {
        let b = digits[i];
        if b.is_ascii_digit() {
            if count >= 19 {
                return None;
            }
            mant = mant * 10 + (b - b'0') as u64;
            count += 1;
            frac += seen_dot as i32;
        } else if b == b'.' && !seen_dot {
            seen_dot = true;
        } else {
            break;
        }
        i += 1;
    }
    if count == 0 {
        return None;
    }
    let mut exp = -frac;
    if i < digits.len() {
        if digits[i] != b'e' && digits[i] != b'E' {
            return None;
        }
        let e = &digits[i + 1..];
        let (eneg, e) = match e.first()? {
            b'-' => (true, &e[1..]),
            b'+' => (false, &e[1..]),
            _ => (false, e),
        };
        if e.is_empty() || e.len() > 3 || !e.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let ev = e.iter().fold(0i32, |a, &d| a * 10 + (d - b'0') as i32);
        exp += if eneg { -ev } else { ev };
    }
    if mant > 1 << 53 || exp.unsigned_abs() > 22 {
        return None;
    }
    let v = mant as f64;
    let v = if exp >= 0 {
        v * POW10[exp as usize]
    } else {
        v / POW10[(-exp) as usize]
    };
    Some(if neg { -v } else { v })
}

/// Whether a token can be a decimal number (digits, sign, point, exponent) or nan/inf as Python's
/// `float()` would accept it. Used for the fields we do not keep.
fn looks_numeric(tok: &[u8]) -> bool {
    tok.iter()
        .all(|b| matches!(b, b'0'..=b'9' | b'.' | b'-' | b'+' | b'e' | b'E'))
        && tok.iter().any(u8::is_ascii_digit)
        || {
            let t = tok
                .strip_prefix(b"-")
                .or_else(|| tok.strip_prefix(b"+"))
                .unwrap_or(tok);
            t.eq_ignore_ascii_case(b"nan")
                || t.eq_ignore_ascii_case(b"inf")
                || t.eq_ignore_ascii_case(b"infinity")
        }
}

fn parse_coord(tok: &[u8], lines: &Lines, name: &str) -> Result<f32> {
    if let Some(v) = fast_f64(tok) {
        return Ok(v as f32);
    }
    let s = std::str::from_utf8(tok)
        .map_err(|_| lines.err(format!("{name} is not a number: {:?}", show(tok))))?;
    let v: f64 = s
        .parse()
        .map_err(|_| lines.err(format!("{name} is not a number: {s:?}")))?;
    if !v.is_finite() {
        return Err(lines.err(format!("{name} is {s} (NaN or infinite coordinate)")));
    }
    Ok(v as f32)
}

/// Parses the bytes of a `.skeleton` file; `file` names it in errors.
pub fn parse_skeleton(bytes: &[u8], file: &Path) -> Result<NtuSkeleton> {
    let mut lines = Lines {
        bytes,
        pos: 0,
        line: 0,
        file,
    };
    let frames = lines.count("the frame count")?;
    let per_frame = NTU_JOINTS * NTU_MAX_BODIES;
    // Guard against absurd counts before allocating: every frame needs at least 2 bytes.
    if frames > bytes.len() / 2 {
        return Err(lines.err(format!(
            "frame count {frames} is larger than the file can hold"
        )));
    }
    let mut data = vec![0f32; 3 * frames * per_frame];
    let plane = frames * per_frame;
    let mut max_bodies = 0;
    let mut empty_frames = 0;
    let mut body_fields: [&[u8]; BODY_FIELDS] = [&[]; BODY_FIELDS];
    let mut joint_fields: [&[u8]; JOINT_FIELDS] = [&[]; JOINT_FIELDS];
    for t in 0..frames {
        let bodies = lines.count(&format!("the body count of frame {}", t + 1))?;
        max_bodies = max_bodies.max(bodies);
        if bodies == 0 {
            empty_frames += 1;
        }
        for m in 0..bodies {
            let line = lines.next("a body-info line")?;
            let n = split_fields(line, &mut body_fields);
            if n != BODY_FIELDS {
                return Err(lines.err(format!(
                    "body-info line of frame {} body {} has {n} fields, expected {BODY_FIELDS}: {:?}",
                    t + 1,
                    m + 1,
                    show(line)
                )));
            }
            if parse_uint(body_fields[0]).is_none() {
                return Err(lines.err(format!(
                    "bodyID {:?} is not an unsigned 64-bit integer",
                    show(body_fields[0])
                )));
            }
            if let Some(bad) = body_fields[1..].iter().find(|f| !looks_numeric(f)) {
                return Err(lines.err(format!("body-info field {:?} is not a number", show(bad))));
            }
            let joints = lines.count("the joint count")?;
            if joints != NTU_JOINTS {
                return Err(lines.err(format!("joint count {joints}, expected {NTU_JOINTS}")));
            }
            for v in 0..NTU_JOINTS {
                let (n, plain, line) = lines.next_fields("a joint line", &mut joint_fields)?;
                if n != JOINT_FIELDS {
                    return Err(lines.err(format!(
                        "joint line has {n} fields, expected {JOINT_FIELDS}: {:?}",
                        show(line)
                    )));
                }
                let x = parse_coord(joint_fields[0], &lines, "x")?;
                let y = parse_coord(joint_fields[1], &lines, "y")?;
                let z = parse_coord(joint_fields[2], &lines, "z")?;
                /// Bits of the 12 joint fields.
                const ALL_FIELDS: u32 = (1 << JOINT_FIELDS) - 1;
                if plain & ALL_FIELDS != ALL_FIELDS {
                    let bad = joint_fields[3..].iter().find(|f| !looks_numeric(f));
                    if let Some(bad) = bad {
                        return Err(
                            lines.err(format!("joint field {:?} is not a number", show(bad)))
                        );
                    }
                }
                if m < NTU_MAX_BODIES {
                    let o = t * per_frame + v * NTU_MAX_BODIES + m;
                    data[o] = x;
                    data[plane + o] = y;
                    data[2 * plane + o] = z;
                }
            }
        }
    }
    // Only blank lines may follow the last frame.
    while lines.pos < bytes.len() {
        let line = lines.next("")?;
        if !line.is_empty() {
            return Err(lines.err(format!(
                "data after the {frames} frames the header announces (wrong frame count?): {:?}",
                show(line)
            )));
        }
    }
    Ok(NtuSkeleton {
        frames,
        data,
        max_bodies,
        empty_frames,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_missing_lists() {
        let n = NtuName::parse_file_name("S001C002P003R002A013.skeleton").unwrap();
        assert_eq!(
            (n.setup, n.camera, n.performer, n.replication, n.action),
            (1, 2, 3, 2, 13)
        );
        assert_eq!(n.label(), 12);
        assert!(NtuName::parse_file_name("S001C002P003R002A13.skeleton").is_none());
        assert_eq!(missing_ids(NTU60_MISSING_LIST).len(), 302);
        assert_eq!(missing_ids(NTU120_MISSING_LIST).len(), 535);
    }

    #[test]
    fn fast_float_path_equals_std_parse() {
        for t in [
            "0.2181153",
            "-0.1239193",
            "3.785547",
            "1036.233",
            "0",
            "-0",
            "2",
            "1e-3",
            "-1.5E+2",
            "123456789012345678",
            "0.000000000000000000000001",
            "9007199254740993",
            ".5",
            "5.",
        ] {
            let want: f64 = t.parse().unwrap();
            if let Some(v) = fast_f64(t.as_bytes()) {
                assert_eq!(v.to_bits(), want.to_bits(), "{t}");
            }
        }
        assert!(fast_f64(b"0.2181153").is_some());
        assert!(fast_f64(b"9007199254740993").is_none()); // > 2^53: slow path
        for bad in ["", "-", ".", "1.2.3", "1e", "abc", "1-2", "nan"] {
            assert!(fast_f64(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    #[test]
    fn numeric_tokens() {
        assert!(looks_numeric(b"-1.5e-3") && looks_numeric(b"2") && looks_numeric(b"NaN"));
        assert!(!looks_numeric(b"abc") && !looks_numeric(b"-") && !looks_numeric(b"1,5"));
    }
}
