//! Pre-training checkpoints in a work_dir. A checkpoint `<name>` is three files:
//! - `<name>.safetensors`: every model tensor under its official state-dict name (`encoder_q.*`,
//!   `encoder_k.*`, `encoder_q_motion.*`, ..., `queue`, `queue_motion`, `queue_bone`,
//!   `queue_ptr`, `queue_ptr_motion`, `queue_ptr_bone`; see `SslModel::state_tensors`);
//! - `<name>.state.safetensors`: SGD momentum buffers, named by parameter;
//! - `<name>.json`: [`CheckpointMeta`] (epoch, step, pointer, seed, RNG scheme, file sizes).
//!
//! Every file is written to `<file>.tmp` and renamed; the JSON is renamed last and records the
//! byte sizes of the other two, so a torn write is detected on load. The RNG state is a pure
//! function of `(seed, epoch)`: the loader's order and augmentation and `tch::manual_seed` are
//! re-derived at the start of each epoch, so resuming at an epoch boundary is exact.
use crate::error::{Error, Result};
use crate::ssl::trainer::Pretrainer;
use crate::train::atomic::tmp_of;
pub use crate::train::atomic::write_atomic;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// Format tag written into every checkpoint JSON.
pub const FORMAT: &str = "crossclr-pretrain-checkpoint/1";

/// The JSON sidecar of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: String,
    /// Last completed 1-based epoch.
    pub epoch: usize,
    /// Optimizer steps done so far.
    pub global_step: u64,
    /// The common queue pointer after `epoch` (also in the weights file as `queue_ptr*`).
    pub queue_ptr: usize,
    /// `skeletonclr | crossclr2 | crossclr3`.
    pub model: String,
    /// Run seed; the RNG of epoch e is derived from (seed, e).
    pub seed: u64,
    /// How the RNG state is derived (documentation for readers of the file).
    pub rng: String,
    /// Learning rate used in `epoch`.
    pub lr: f64,
    pub weights_file: String,
    pub weights_bytes: u64,
    pub state_file: String,
    pub state_bytes: u64,
}

/// Paths of checkpoint `name` in `dir`.
pub fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.safetensors")),
        dir.join(format!("{name}.state.safetensors")),
        dir.join(format!("{name}.json")),
    )
}

fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<u64> {
    let tmp = tmp_of(path);
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&cpu, &tmp)
        .map_err(|e| Error::Other(format!("{}: {e}", tmp.display())))?;
    let bytes = std::fs::metadata(&tmp)
        .map_err(|e| Error::io(&tmp, e))?
        .len();
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// Saves checkpoint `name` of `trainer` into `dir`. `meta`'s file fields are filled in here.
pub fn save(
    dir: &Path,
    name: &str,
    trainer: &Pretrainer,
    mut meta: CheckpointMeta,
) -> Result<PathBuf> {
    let (wp, sp, jp) = paths(dir, name);
    meta.format = FORMAT.into();
    meta.queue_ptr = trainer.model.queue_ptr();
    meta.weights_bytes = write_tensors(&wp, &trainer.model.state_tensors())?;
    let state: Vec<(String, Tensor)> = trainer
        .opt
        .state()
        .into_iter()
        .map(|(n, t)| (format!("momentum_buffer.{n}"), t))
        .collect();
    meta.state_bytes = write_tensors(&sp, &state)?;
    meta.weights_file = file_name(&wp);
    meta.state_file = file_name(&sp);
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| Error::Other(e.to_string()))?;
    write_atomic(&jp, &json)?;
    Ok(wp)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads the JSON of checkpoint `name` in `dir` (None when there is none).
pub fn read_meta(dir: &Path, name: &str) -> Result<Option<CheckpointMeta>> {
    let (_, _, jp) = paths(dir, name);
    if !jp.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&jp).map_err(|e| Error::io(&jp, e))?;
    let meta: CheckpointMeta =
        serde_json::from_str(&text).map_err(|e| Error::input(&jp, "json", e.to_string()))?;
    if meta.format != FORMAT {
        return Err(Error::input(
            &jp,
            "format",
            format!("'{}', expected '{FORMAT}'", meta.format),
        ));
    }
    Ok(Some(meta))
}

/// Loads checkpoint `name` from `dir` into `trainer` (weights, queues, pointers, momentum
/// buffers) and returns its metadata. Torn or mismatching files are errors naming the file.
pub fn load(dir: &Path, name: &str, trainer: &mut Pretrainer) -> Result<CheckpointMeta> {
    let (_, _, jp) = paths(dir, name);
    let meta = read_meta(dir, name)?
        .ok_or_else(|| Error::input(&jp, "file", "no checkpoint to resume from"))?;
    let wp = dir.join(&meta.weights_file);
    let sp = dir.join(&meta.state_file);
    for (p, want) in [(&wp, meta.weights_bytes), (&sp, meta.state_bytes)] {
        let got = std::fs::metadata(p).map_err(|e| Error::io(p, e))?.len();
        if got != want {
            return Err(Error::input(
                p,
                "size",
                format!("{got} bytes, {} says {want}: torn checkpoint", jp.display()),
            ));
        }
    }
    let weights = Tensor::read_safetensors(&wp)
        .map_err(|e| Error::input(&wp, "safetensors", e.to_string()))?;
    trainer.model.load_state_tensors(&weights, &wp)?;
    let state = Tensor::read_safetensors(&sp)
        .map_err(|e| Error::input(&sp, "safetensors", e.to_string()))?;
    let mut buffers = Vec::with_capacity(state.len());
    for (n, t) in state {
        let p = n.strip_prefix("momentum_buffer.").ok_or_else(|| {
            Error::input(
                &sp,
                format!("tensor '{n}'"),
                "expected momentum_buffer.<name>",
            )
        })?;
        buffers.push((p.to_string(), t));
    }
    trainer
        .opt
        .load_state(&buffers)
        .map_err(|e| Error::input(&sp, "optimizer state", e.to_string()))?;
    if trainer.model.queue_ptr() != meta.queue_ptr {
        return Err(Error::input(
            &jp,
            "queue_ptr",
            "differs from the weights file",
        ));
    }
    Ok(meta)
}
