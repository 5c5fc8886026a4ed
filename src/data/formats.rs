//! Dataset readers: ST-GCN npy+pkl, CrosSCLR frame50, CTR-GCN npz, MSR Action3D, generic
//! `data.npy + label.pkl + layout`, and our synthetic dataset. [`DatasetSpec`] names a dataset in
//! configs and on the command line; [`open`] reads it into a [`SkeletonDataset`].
use crate::data::dataset::SkeletonDataset;
use crate::error::Result;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
pub fn open(spec: &DatasetSpec) -> Result<SkeletonDataset> {
    let _ = spec;
    Err(crate::error::Error::Other("data::formats::open is not implemented yet".into()))
}
