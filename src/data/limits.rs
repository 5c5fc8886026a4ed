//! Bounds on text inputs that are parsed by third-party parsers (YAML configs, layout files, eval
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
        assert!(e.contains("c.yaml") && e.contains("line 1") && e.contains("nesting"), "{e}");
        let block = format!("{}x\n", "- ".repeat(100));
        assert!(check_yaml_text(&block, Path::new("c.yaml")).is_err());
    }
}
