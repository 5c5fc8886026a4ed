//! Plain output files of the evaluation commands, each written atomically: folders, JSON, lines,
//! float32 matrices. The bottom of `eval`: features, reports and protocols all write through it.
use crate::data::npy;
use crate::error::{Error, Result};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Creates `dir` (and parents).
pub fn ensure_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// Writes `value` as pretty JSON to `path` atomically.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    npy::write_atomic(path, text.as_bytes())
}

/// Writes one line per name to `path` atomically.
pub fn write_lines(path: &Path, lines: &[String]) -> Result<()> {
    let mut text = lines.join("\n");
    if !lines.is_empty() {
        text.push('\n');
    }
    npy::write_atomic(path, text.as_bytes())
}

/// Writes a 2-D float tensor `(N, K)` as a float32 `.npy`.
pub fn write_matrix(path: &Path, t: &Tensor) -> Result<()> {
    let size = t.size();
    if size.len() != 2 {
        return Err(Error::Other(format!(
            "{}: expected a 2-D tensor, got {size:?}",
            path.display()
        )));
    }
    let flat: Vec<f32> = Vec::try_from(
        &t.to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous()
            .view([-1]),
    )?;
    npy::write_f32(path, &[size[0] as usize, size[1] as usize], &flat)
}
