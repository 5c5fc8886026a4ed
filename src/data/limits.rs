//! Bounds on inputs that are parsed by third-party parsers (zip archives: [`check_zip_tail`]).
//! Text (YAML configs, layout files, eval
//! configs): the YAML parser is quadratic in the nesting depth of flow collections and keeps the
//! whole event stream, so a small hostile file can stall it for minutes (found by the fuzz of
//! tests/fuzz_readers.rs). Configs and layouts are small and shallow; these limits are far above
//! any real one.
use crate::error::{Error, Result};
use std::path::Path;

/// Largest accepted YAML/TOML config or layout file.
pub const MAX_TEXT_BYTES: usize = 4 << 20;
/// Deepest accepted nesting of `[`/`{` (flow) or of block indicators on one line.
pub const MAX_YAML_DEPTH: usize = 64;

/// Checks `text` (from `file`) against [`MAX_TEXT_BYTES`] and [`MAX_YAML_DEPTH`] before it is
/// handed to a YAML parser. Brackets inside quotes are counted too (a conservative bound).
pub fn check_yaml_text(text: &str, file: &Path) -> Result<()> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(Error::input(
            file,
            "file",
            format!(
                "{} bytes: larger than the {MAX_TEXT_BYTES} accepted for a config or layout file",
                text.len()
            ),
        ));
    }
    let mut depth = 0usize;
    for (i, line) in text.lines().enumerate() {
        // Block nesting written on one line: `- - - x` or `a: b: c:` chains.
        let indicators = line
            .split_ascii_whitespace()
            .take_while(|w| *w == "-" || w.ends_with(':'))
            .count();
        if indicators > MAX_YAML_DEPTH {
            return Err(Error::input(
                file,
                format!("line {}", i + 1),
                format!("more than {MAX_YAML_DEPTH} nested block collections on one line"),
            ));
        }
        for c in line.bytes() {
            match c {
                b'[' | b'{' => {
                    depth += 1;
                    if depth > MAX_YAML_DEPTH {
                        return Err(Error::input(
                            file,
                            format!("line {}", i + 1),
                            format!("nesting deeper than {MAX_YAML_DEPTH} levels"),
                        ));
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Checks that the zip archive at `path` ends with a well-formed end-of-central-directory record
/// (in its last 64 KiB, pointing at a central directory header, or at a zip64 locator) before
/// the `zip` crate opens it: the crate tries every `PK\x05\x06` in the file from the end,
/// each with a forward search, which is quadratic on a file full of them (a 1 MB fuzzed `.npz`
/// took seconds; found by tests/fuzz_readers.rs). Reads at most 64 KiB + 22 bytes.
pub fn check_zip_tail(path: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let bad = |what: &str| {
        Err(Error::input(
            path,
            "zip end record",
            format!("{what}: not a complete zip archive (truncated download?)"),
        ))
    };
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let window = len.min(22 + 65_535);
    if window < 22 {
        return bad("shorter than an end record");
    }
    let start = len - window;
    f.seek(SeekFrom::Start(start))
        .map_err(|e| Error::io(path, e))?;
    let mut tail = vec![0u8; window as usize];
    f.read_exact(&mut tail).map_err(|e| Error::io(path, e))?;
    // The last end record whose comment fits in the file (the one the crate tries first).
    let Some(at) = (0..=tail.len() - 22)
        .rev()
        .find(|&i| tail[i..i + 4] == *b"PK\x05\x06")
    else {
        return bad("no end-of-central-directory record in the last 64 KiB");
    };
    let u16_at = |i: usize| u16::from_le_bytes([tail[i], tail[i + 1]]) as u64;
    let u32_at = |i: usize| u32::from_le_bytes([tail[i], tail[i + 1], tail[i + 2], tail[i + 3]]);
    let eocd = start + at as u64;
    if eocd + 22 + u16_at(at + 20) > len {
        return bad("the end record's comment runs past the end of the file");
    }
    let files = u16_at(at + 10);
    let cd = u32_at(at + 16);
    if files == 0 {
        return Ok(());
    }
    if files == 0xFFFF || cd == u32::MAX {
        // zip64: the locator sits right before the end record.
        let ok = at >= 20 && tail[at - 20..at - 16] == *b"PK\x06\x07";
        return if ok || eocd < 20 {
            Ok(())
        } else {
            bad("zip64 end record without its locator")
        };
    }
    if u64::from(cd) >= eocd {
        return bad("the central directory offset points past the end record");
    }
    let mut sig = [0u8; 4];
    f.seek(SeekFrom::Start(u64::from(cd)))
        .and_then(|_| f.read_exact(&mut sig))
        .map_err(|e| Error::io(path, e))?;
    if sig != *b"PK\x01\x02" {
        return bad("no central directory header where the end record points");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_flow_nesting_is_refused_naming_the_line() {
        let ok = "a: [1, [2, {b: 3}]]\n- - x\n";
        check_yaml_text(ok, Path::new("c.yaml")).unwrap();
        let deep = format!("x: {}", "[".repeat(65));
        let e = check_yaml_text(&deep, Path::new("c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.yaml") && e.contains("line 1") && e.contains("nesting"),
            "{e}"
        );
        let block = format!("{}x\n", "- ".repeat(100));
        assert!(check_yaml_text(&block, Path::new("c.yaml")).is_err());
    }
}
