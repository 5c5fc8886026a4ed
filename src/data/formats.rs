//! Dataset readers: ST-GCN npy+pkl, CrosSCLR frame50, CTR-GCN npz, MSR Action3D, generic
//! `data.npy + label.pkl + layout`, and our synthetic dataset. [`DatasetSpec`] names a dataset in
//! configs and on the command line; [`open`] reads it into a [`SkeletonDataset`].
use crate::data::dataset::{F32Buf, SkeletonDataset};
use crate::data::layout::Layout;
use crate::data::{msr, npy, pickle};
use crate::error::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub mod inspect;

/// Which reader to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetFormat {
    /// `data` = `*_data.npy` or `*_position.npy` (N,C,T,V,M float32), `label` = `*_label.pkl`.
    /// This covers the ST-GCN 300-frame files, CrosSCLR's frame50 files and the generic form.
    Npy,
    /// CTR-GCN / SGN `.npz` (`x_train`/`y_train` or `x_test`/`y_test`); `part` picks which.
    CtrgcnNpz,
    /// MSR Action3D folder of `aXX_sYY_eZZ_skeleton3D.txt`.
    Msr,
}

/// A dataset as named in a config (`train_feeder_args`-like) or on the command line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSpec {
    pub format: DatasetFormat,
    /// Data file (npy, npz) or folder (msr).
    pub data: PathBuf,
    /// Label file (`label.pkl`) where the format has one.
    #[serde(default)]
    pub label: Option<PathBuf>,
    /// Layout name (`ntu25`, `kinect20`, `msr20`) or layout file path.
    #[serde(default = "default_layout")]
    pub layout: String,
    /// `train` or `val`/`test` for formats that hold both parts in one file or folder.
    #[serde(default)]
    pub part: Option<String>,
    /// Memory-map the data instead of reading it (large files).
    #[serde(default = "yes")]
    pub mmap: bool,
}

fn default_layout() -> String {
    "ntu25".into()
}
fn yes() -> bool {
    true
}

/// Reads the dataset a spec names. Errors name the file, the place and the problem.
///
/// Checks: data of rank 5 `(N, C, T, V, M)` with `V` = the layout's joint count; as many labels as
/// samples; labels `>= 0` (`num_classes` = max label + 1, or the one-hot width for npz); no NaN
/// or infinite value (reported with the sample index).
pub fn open(spec: &DatasetSpec) -> Result<SkeletonDataset> {
    let layout = Layout::resolve(&spec.layout)?;
    let ds = match spec.format {
        DatasetFormat::Npy => open_npy(spec, layout)?,
        DatasetFormat::CtrgcnNpz => open_ctrgcn_npz(spec, layout)?,
        DatasetFormat::Msr => {
            let subjects = msr::subjects_of_part(spec.part.as_deref())?;
            let mut ds = msr::read_msr_dir(&spec.data, subjects.as_deref())?;
            if layout.num_joints() != msr::MSR_JOINTS {
                return Err(Error::input(
                    &spec.data,
                    "layout",
                    format!(
                        "MSR data has {} joints, layout {} has {}",
                        msr::MSR_JOINTS,
                        layout.name,
                        layout.num_joints()
                    ),
                ));
            }
            ds.layout = layout;
            ds
        }
    };
    check_finite(&ds)?;
    Ok(ds)
}

/// Shortcut for format `Npy`: `data` (`*_data.npy` / `*_position.npy`), `label` (`*_label.pkl`),
/// `layout` a layout name or file. Memory-maps the data.
pub fn open_generic(data: &Path, label: &Path, layout: &str) -> Result<SkeletonDataset> {
    open(&DatasetSpec {
        format: DatasetFormat::Npy,
        data: data.to_path_buf(),
        label: Some(label.to_path_buf()),
        layout: layout.to_string(),
        part: None,
        mmap: true,
    })
}

fn check_shape(file: &Path, shape: &[usize], layout: &Layout) -> Result<[usize; 5]> {
    if shape.len() != 5 {
        return Err(Error::input(
            file,
            "header",
            format!("data has shape {shape:?}; expected rank 5 (N, C, T, V, M)"),
        ));
    }
    if shape[3] != layout.num_joints() {
        return Err(Error::input(
            file,
            "header",
            format!(
                "data has V = {} joints (shape {shape:?}) but layout {} has {}",
                shape[3],
                layout.name,
                layout.num_joints()
            ),
        ));
    }
    Ok([shape[0], shape[1], shape[2], shape[3], shape[4]])
}

fn check_labels(file: &Path, labels: &[i64], n: usize) -> Result<usize> {
    if labels.len() != n {
        return Err(Error::input(
            file,
            "labels",
            format!("{} labels for {n} samples", labels.len()),
        ));
    }
    if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l < 0) {
        return Err(Error::input(
            file,
            format!("sample {i}"),
            format!("negative label {l}"),
        ));
    }
    Ok(labels.iter().max().map(|&m| m as usize + 1).unwrap_or(0))
}

fn open_npy(spec: &DatasetSpec, layout: Layout) -> Result<SkeletonDataset> {
    let label_path = spec.label.as_ref().ok_or_else(|| {
        Error::config(format!(
            "dataset {}: format npy needs a label file (label.pkl)",
            spec.data.display()
        ))
    })?;
    let (shape, data) = if spec.mmap {
        npy::mmap_f32(&spec.data)?
    } else {
        let (s, v) = npy::read_f32(&spec.data)?;
        (s, F32Buf::Owned(v))
    };
    let shape = check_shape(&spec.data, &shape, &layout)?;
    let (names, labels) = pickle::read_labels(label_path)?;
    let num_classes = check_labels(label_path, &labels, shape[0])?;
    Ok(SkeletonDataset {
        data,
        shape,
        labels,
        names,
        num_classes,
        layout,
        source: spec.data.clone(),
    })
}

/// CTR-GCN `.npz`: `x_<part>` (N, T, M*V*3) float32 laid out `[m][v][xyz]` per frame, `y_<part>`
/// one-hot (N, K) (argmax) or integer labels (N,). Returns (N, 3, T, V, M).
fn open_ctrgcn_npz(spec: &DatasetSpec, layout: Layout) -> Result<SkeletonDataset> {
    let path = &spec.data;
    let suffix = match spec.part.as_deref() {
        Some("train") => "train",
        Some("val") | Some("test") => "test",
        other => {
            return Err(Error::config(format!(
                "dataset {}: format ctrgcn_npz needs part = train | test (got {other:?})",
                path.display()
            )))
        }
    };
    let v_len = layout.num_joints();
    let (shape, data) = npy::with_npz_member(path, &format!("x_{suffix}"), |h, r, place| {
        if h.shape.len() != 3 || h.shape[2] % (3 * v_len) != 0 {
            return Err(Error::input(
                place,
                "header",
                format!(
                    "shape {:?}; expected (N, T, M*{v_len}*3) for layout {}",
                    h.shape, layout.name
                ),
            ));
        }
        if h.dtype != npy::Dtype::F32 && h.dtype != npy::Dtype::F64 {
            return Err(Error::input(
                place,
                "header",
                format!("dtype {}; expected float32", h.dtype.name()),
            ));
        }
        let (n, t, w) = (h.shape[0], h.shape[1], h.shape[2]);
        let m_len = w / (3 * v_len);
        let mut out = vec![0f32; n * 3 * t * v_len * m_len];
        let mut buf = vec![0u8; t * w * h.dtype.size()];
        let sample = 3 * t * v_len * m_len;
        for i in 0..n {
            r.read_exact(&mut buf).map_err(|e| Error::io(place, e))?;
            let vals: Vec<f32> = if h.dtype == npy::Dtype::F32 {
                buf.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            } else {
                buf.chunks_exact(8)
                    .map(|b| {
                        f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                    })
                    .collect()
            };
            let o = &mut out[i * sample..][..sample];
            for tt in 0..t {
                for m in 0..m_len {
                    for v in 0..v_len {
                        for c in 0..3 {
                            o[((c * t + tt) * v_len + v) * m_len + m] =
                                vals[tt * w + (m * v_len + v) * 3 + c];
                        }
                    }
                }
            }
        }
        Ok(([n, 3, t, v_len, m_len], out))
    })?;
    let y = npy::read_npz_array(path, &format!("y_{suffix}"))?;
    let place = PathBuf::from(format!("{}[y_{suffix}.npy]", path.display()));
    let (labels, known_classes) = match y.shape.len() {
        2 if !y.dtype.is_integer() || y.shape[1] > 1 => {
            let k = y.shape[1];
            let vals = y.to_f64();
            let labels = vals
                .chunks(k.max(1))
                .map(|row| {
                    row.iter()
                        .enumerate()
                        .fold((0usize, f64::NEG_INFINITY), |b, (j, &v)| {
                            if v > b.1 {
                                (j, v)
                            } else {
                                b
                            }
                        })
                        .0 as i64
                })
                .collect::<Vec<_>>();
            (labels, Some(k))
        }
        1 | 2 => (y.to_i64()?, None),
        _ => {
            return Err(Error::input(
                &place,
                "header",
                format!("labels of shape {:?}", y.shape),
            ))
        }
    };
    let max_classes = check_labels(&place, &labels, shape[0])?;
    let names = (0..shape[0]).map(|i| format!("{suffix}_{i}")).collect();
    Ok(SkeletonDataset {
        data: F32Buf::Owned(data),
        shape,
        labels,
        names,
        num_classes: known_classes.unwrap_or(max_classes).max(max_classes),
        layout,
        source: path.clone(),
    })
}

/// Errors with the first sample index holding a NaN or infinite value (scans in parallel).
pub fn check_finite(ds: &SkeletonDataset) -> Result<()> {
    let n = ds.sample_len();
    if n == 0 {
        return Ok(());
    }
    let data = ds.data.as_slice();
    let bad = data
        .par_chunks(n)
        .position_first(|s| s.iter().any(|v| !v.is_finite()));
    if let Some(i) = bad {
        let (j, v) = ds
            .sample(i)
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
            .map(|(j, v)| (j, *v))
            .unwrap_or((0, f32::NAN));
        return Err(Error::input(
            &ds.source,
            format!("sample {i}"),
            format!("non-finite value {v} at element {j} of the sample"),
        ));
    }
    Ok(())
}
