//! Score-level fusion of separately evaluated streams (AimCLR's ensemble: weighted sum of the
//! per-stream score matrices, default weights joint 0.6, bone 0.6, motion 0.4). Note that this is
//! not the CrosSCLR `view: all` procedure, which trains the heads jointly on averaged logits.
use crate::data::npy;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Default fusion weight of the joint stream (AimCLR `ensemble_ntu_cs.py`).
pub const JOINT_WEIGHT: f64 = 0.6;
/// Default fusion weight of the bone stream.
pub const BONE_WEIGHT: f64 = 0.6;
/// Default fusion weight of the motion stream.
pub const MOTION_WEIGHT: f64 = 0.4;

/// One score file with its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedScores {
    pub path: PathBuf,
    pub weight: f64,
}

impl std::str::FromStr for WeightedScores {
    type Err = Error;
    /// `path.npy:0.6` (weight after the last `:`), or `path.npy` (weight 1).
    fn from_str(s: &str) -> Result<Self> {
        if let Some((path, w)) = s.rsplit_once(':') {
            if let Ok(weight) = w.parse::<f64>() {
                if !weight.is_finite() {
                    return Err(Error::config(format!(
                        "--scores {s}: the weight must be finite"
                    )));
                }
                return Ok(WeightedScores {
                    path: PathBuf::from(path),
                    weight,
                });
            }
        }
        Ok(WeightedScores {
            path: PathBuf::from(s),
            weight: 1.0,
        })
    }
}

/// Reads an `(N, K)` score matrix from a float32/float64 `.npy` as a CPU f32 tensor.
pub fn read_scores(path: &Path) -> Result<Tensor> {
    let (shape, data) = npy::read_f32(path)?;
    if shape.len() != 2 {
        return Err(Error::input(
            path,
            "header",
            format!("scores must be (N, classes); shape is {shape:?}"),
        ));
    }
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(Error::input(
            path,
            format!("sample {}", i / shape[1].max(1)),
            "non-finite score",
        ));
    }
    Ok(Tensor::from_slice(&data).view([shape[0] as i64, shape[1] as i64]))
}

/// `sum_i w_i * s_i` of score matrices of identical shape `(N, K)`.
pub fn fuse(parts: &[(Tensor, f64)]) -> Result<Tensor> {
    let (first, _) = parts
        .first()
        .ok_or_else(|| Error::config("ensemble: no score files"))?;
    let shape = first.size();
    let mut sum = first.zeros_like();
    for (i, (s, w)) in parts.iter().enumerate() {
        if s.size() != shape {
            return Err(Error::config(format!(
                "ensemble: score matrix {} has shape {:?}, the first has {shape:?}",
                i + 1,
                s.size()
            )));
        }
        sum += s * *w;
    }
    Ok(sum)
}

/// Reads and fuses weighted score files; when a `names.txt` lies next to a score file it must list
/// `expected_names` (same samples, same order), otherwise the rows would be silently misaligned.
pub fn fuse_files(files: &[WeightedScores], expected_names: Option<&[String]>) -> Result<Tensor> {
    let mut parts = Vec::new();
    for f in files {
        let s = read_scores(&f.path)?;
        if let (Some(expected), Some(dir)) = (expected_names, f.path.parent()) {
            let names_file = dir.join("names.txt");
            if let Ok(text) = std::fs::read_to_string(&names_file) {
                let names: Vec<&str> = text.lines().collect();
                if names.len() != expected.len() {
                    return Err(Error::input(
                        &names_file,
                        "line count",
                        format!(
                            "{} names, the label file has {}",
                            names.len(),
                            expected.len()
                        ),
                    ));
                }
                if let Some(i) = names
                    .iter()
                    .zip(expected)
                    .position(|(a, b)| *a != b.as_str())
                {
                    return Err(Error::input(
                        &names_file,
                        format!("line {}", i + 1),
                        format!(
                            "sample {} but the label file has {} there",
                            names[i], expected[i]
                        ),
                    ));
                }
            }
        }
        parts.push((s, f.weight));
    }
    fuse(&parts)
}
