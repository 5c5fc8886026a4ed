//! A structural pre-scan of a pickle program that bounds what unpickling it would build, before
//! `serde-pickle` (which has no nesting or size limit: a 200 kB pickle of nested tuples overflows
//! the stack, and memo references can expand exponentially) sees it. Found by
//! tests/fuzz_readers.rs. The scan follows the stack machine with only `(depth, size)` per
//! value; it never allocates per byte of a length field. Memo references to containers are
//! refused (they share the container, whose later growth the scan cannot bound).
use crate::error::{Error, Result};
use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;

/// Deepest accepted nesting (a label pickle is 2 levels deep).
pub const MAX_DEPTH: u32 = 100;
/// Most values one pickle may expand to (memo references included).
pub const MAX_VALUES: u64 = 50_000_000;

#[derive(Clone, Copy)]
enum Slot {
    Mark,
    /// `container`: a list/tuple/dict/set or the result of a call (it may be mutated later).
    V {
        depth: u32,
        size: u64,
        container: bool,
    },
}

const LEAF: Slot = Slot::V {
    depth: 0,
    size: 1,
    container: false,
};
const EMPTY: Slot = Slot::V {
    depth: 0,
    size: 1,
    container: true,
};

/// Checks `bytes` (a pickle from `file`) against [`MAX_DEPTH`] and [`MAX_VALUES`]. Programs it
/// cannot follow (unknown opcode, stack underflow, truncation) pass: the real decoder then
/// reports them with its own message.
pub fn check(bytes: &[u8], file: &Path) -> Result<()> {
    let mut stack: Vec<Slot> = Vec::new();
    let mut memo: HashMap<u64, Slot> = HashMap::new();
    let mut pos = 0usize;
    let fail =
        |pos: usize, what: String| Err(Error::input(file, format!("pickle byte {pos}"), what));
    // Folds children into one container value.
    fn combine(children: &[Slot]) -> Slot {
        let (mut d, mut s) = (0u32, 1u64);
        for c in children {
            if let Slot::V { depth, size, .. } = c {
                d = d.max(depth + 1);
                s = s.saturating_add(*size);
            }
        }
        Slot::V {
            depth: d.max(1),
            size: s,
            container: true,
        }
    }
    fn is_container(v: &Slot) -> bool {
        matches!(
            v,
            Slot::V {
                container: true,
                ..
            }
        )
    }
    // `marks` counts the marks on the stack (each open mark costs the real decoder a fresh stack).
    fn pop_mark(stack: &mut Vec<Slot>, marks: &Cell<usize>) -> Option<Vec<Slot>> {
        let at = stack.iter().rposition(|s| matches!(s, Slot::Mark))?;
        let items = stack.split_off(at + 1);
        stack.pop();
        marks.set(marks.get() - 1);
        Some(items)
    }
    fn pop_n(stack: &mut Vec<Slot>, n: usize, marks: &Cell<usize>) -> Option<Vec<Slot>> {
        if stack.len() < n {
            return None;
        }
        let items = stack.split_off(stack.len() - n);
        let gone = items.iter().filter(|s| matches!(s, Slot::Mark)).count();
        marks.set(marks.get() - gone);
        Some(items)
    }
    let marks = Cell::new(0usize);
    let rd = |pos: usize, n: usize| -> Option<&[u8]> { bytes.get(pos..pos.checked_add(n)?) };
    // Little-endian value of the first (up to) 8 bytes.
    let le = |b: &[u8]| -> u64 {
        let mut a = [0u8; 8];
        let n = b.len().min(8);
        a[..n].copy_from_slice(&b[..n]);
        u64::from_le_bytes(a)
    };
    loop {
        let Some(&op) = bytes.get(pos) else {
            return Ok(());
        };
        let at = pos;
        pos += 1;
        // Skip the argument; None = truncated (left to the decoder).
        let mut fixed = |n: usize| -> Option<u64> {
            let b = rd(pos, n)?;
            pos += n;
            Some(le(b))
        };
        let arg: Option<u64> = match op {
            b'K' | b'q' | b'h' | 0x80 | 0x82 => fixed(1),
            b'M' | 0x83 => fixed(2),
            b'J' | b'r' | b'j' | 0x84 => fixed(4),
            b'G' | 0x95 => fixed(8),
            b'U' | b'C' | 0x8c | 0x8a => fixed(1).and_then(|n| fixed(n as usize).map(|_| n)),
            b'X' | b'T' | b'B' | 0x8b => fixed(4).and_then(|n| {
                let n = usize::try_from(n).ok()?;
                rd(pos, n)?;
                pos += n;
                Some(0)
            }),
            0x8d | 0x8e | 0x96 => fixed(8).and_then(|n| {
                let n = usize::try_from(n).ok()?;
                rd(pos, n)?;
                pos += n;
                Some(0)
            }),
            b'I' | b'L' | b'F' | b'S' | b'V' | b'P' | b'g' | b'p' | b'c' | b'i' => {
                let lines = if op == b'c' || op == b'i' { 2 } else { 1 };
                let mut v = Some(0u64);
                for _ in 0..lines {
                    match bytes[pos..].iter().position(|&b| b == b'\n') {
                        Some(n) => {
                            if op == b'g' || op == b'p' {
                                let t = String::from_utf8_lossy(&bytes[pos..pos + n]);
                                v = t.trim().parse().ok();
                            }
                            pos += n + 1;
                        }
                        None => return Ok(()),
                    }
                }
                v
            }
            _ => Some(0),
        };
        let Some(arg) = arg else { return Ok(()) };
        // A memo reference (or DUP) to a container shares it: a later append grows every
        // reference at once (found by cargo fuzz: a 271-byte pickle took more than 3 GB), which
        // this scan cannot bound. Label files never share a container.
        let mut shared = false;
        let ok: Option<()> = (|| {
            match op {
                b'.' => return None,
                b'(' => {
                    marks.set(marks.get() + 1);
                    stack.push(Slot::Mark)
                }
                b'K' | b'M' | b'J' | b'G' | b'I' | b'L' | b'F' | b'S' | b'V' | b'X' | b'T'
                | b'B' | b'U' | b'C' | 0x8c | 0x8d | 0x8e | 0x96 | 0x8a | 0x8b | b'N' | 0x88
                | 0x89 | b'c' | 0x82 | 0x83 | 0x84 | b'P' | 0x97 => stack.push(LEAF),
                b']' | b')' | b'}' | 0x8f => stack.push(EMPTY),
                b't' | b'l' | b'd' | 0x91 | b'o' | b'i' => {
                    let items = pop_mark(&mut stack, &marks)?;
                    stack.push(combine(&items));
                }
                0x85..=0x87 => {
                    let items = pop_n(&mut stack, (op - 0x84) as usize, &marks)?;
                    stack.push(combine(&items));
                }
                b'R' | 0x81 | b'Q' | 0x92 => {
                    let n = match op {
                        b'Q' => 1,
                        0x92 => 3,
                        _ => 2,
                    };
                    let items = pop_n(&mut stack, n, &marks)?;
                    stack.push(combine(&items));
                }
                0x93 => {
                    pop_n(&mut stack, 2, &marks)?;
                    stack.push(LEAF);
                }
                b'a' | b's' | b'b' | b'e' | b'u' | 0x90 => {
                    let items = match op {
                        b'a' | b'b' => pop_n(&mut stack, 1, &marks)?,
                        b's' => pop_n(&mut stack, 2, &marks)?,
                        _ => pop_mark(&mut stack, &marks)?,
                    };
                    let top = stack.last_mut()?;
                    let mut all = vec![*top];
                    all.extend(items);
                    // The container keeps its own depth/size and gains the children.
                    if let (
                        Slot::V { depth, size, .. },
                        Slot::V {
                            depth: d2,
                            size: s2,
                            ..
                        },
                    ) = (all[0], combine(&all[1..]))
                    {
                        *top = Slot::V {
                            depth: depth.max(d2),
                            size: size.saturating_add(s2 - 1),
                            container: true,
                        };
                    } else {
                        return None;
                    }
                }
                b'0' => {
                    if matches!(stack.pop()?, Slot::Mark) {
                        marks.set(marks.get() - 1);
                    }
                }
                b'1' => {
                    pop_mark(&mut stack, &marks)?;
                }
                b'2' => {
                    let v = *stack.last()?;
                    if is_container(&v) {
                        shared = true;
                    }
                    stack.push(v)
                }
                b'p' | b'q' | b'r' | 0x94 => {
                    let key = if op == 0x94 { memo.len() as u64 } else { arg };
                    memo.insert(key, *stack.last()?);
                }
                b'g' | b'h' | b'j' => {
                    let v = *memo.get(&arg)?;
                    if is_container(&v) {
                        shared = true;
                    }
                    stack.push(v)
                }
                0x80 | 0x95 | 0x98 => {}
                _ => return None,
            }
            Some(())
        })();
        if shared {
            return fail(
                at,
                "a memo reference to a list, tuple or dict (shared containers are not \
                 supported in a label file)"
                    .into(),
            );
        }
        if ok.is_none() {
            return Ok(());
        }
        if marks.get() > MAX_DEPTH as usize {
            return fail(
                at,
                format!("more than {MAX_DEPTH} marks open at once (a nesting bomb?)"),
            );
        }
        if let Some(Slot::V { depth, size, .. }) = stack.last() {
            if *depth > MAX_DEPTH {
                return fail(at, format!("values nested deeper than {MAX_DEPTH} levels"));
            }
            if *size > MAX_VALUES {
                return fail(
                    at,
                    format!("expands to more than {MAX_VALUES} values (memo references: a pickle bomb?)"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_and_memo_bombs_are_refused() {
        let p = Path::new("l.pkl");
        let mut deep = vec![0x80, 2, b')'];
        deep.extend(std::iter::repeat_n(0x85u8, 1000));
        deep.push(b'.');
        let e = check(&deep, p).unwrap_err().to_string();
        assert!(e.contains("l.pkl") && e.contains("deeper"), "{e}");
        let mut laughs = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..64 {
            laughs.extend_from_slice(&[b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        laughs.push(b'.');
        let e = check(&laughs, p).unwrap_err().to_string();
        assert!(e.contains("shared"), "{e}");
        // cargo fuzz finding: 271 bytes that made serde-pickle use more than 3 GB.
        let oom = include_bytes!("../../tests/fixtures/fuzz/labels/oom_shared_list_growth.pkl");
        let e = check(oom, p).unwrap_err().to_string();
        assert!(e.contains("shared"), "{e}");
        // Bounded-fuzz finding: 1 MB of MARK opcodes made serde-pickle allocate a fresh stack per
        // mark (2.5-4.5 GB, 2-3 s); the scan refuses the 101st open mark. Closed marks do not count.
        let mut marks = vec![0x80, 2];
        marks.extend(std::iter::repeat_n(b'(', 1 << 20));
        let e = check(&marks, p).unwrap_err().to_string();
        assert!(e.contains("byte 102") && e.contains("marks open"), "{e}");
        let mut many = vec![0x80, 2, b']'];
        for _ in 0..10_000 {
            many.extend_from_slice(&[b'(', b'K', 1, b'K', 2, b'e']);
        }
        many.push(b'.');
        check(&many, p).unwrap();
    }
}
