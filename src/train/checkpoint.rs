//! Pre-training checkpoints in a work_dir. A checkpoint `<name>` is three files:
//! - `<name>.safetensors`: every model tensor under its official state-dict name (`encoder_q.*`,
//!   `encoder_k.*`, `encoder_q_motion.*`, ..., `queue`, `queue_motion`, `queue_bone`,
//!   `queue_ptr`, `queue_ptr_motion`, `queue_ptr_bone`; see `SslModel::state_tensors`);
//! - `<name>.state.safetensors`: SGD momentum buffers, named by parameter;
//! - `<name>.json`: [`CheckpointMeta`] (epoch, step, pointer, seed, RNG scheme, file sizes).
//!
//! Saving (issue 18: kill -9 at any moment loses nothing): the weights and state go to
//! `<file>.tmp` and are fsynced; then the JSON, which records their byte sizes and checksums, is
//! written the same way and renamed into place (the commit point, directory fsynced); then the
//! two `.tmp` files are renamed into place. Loading checks sizes and checksums; a file that does
//! not match its JSON while its `.tmp` does (a kill between the commit and the last renames) is
//! rolled forward; anything else is refused as a torn checkpoint, naming the file. The RNG state is a pure
//! function of `(seed, epoch)`: the loader's order and augmentation and `tch::manual_seed` are
//! re-derived at the start of each epoch, so resuming at an epoch boundary is exact.
use crate::error::{Error, Result};
use crate::ssl::trainer::Pretrainer;
pub use crate::train::atomic::write_atomic;
use crate::train::atomic::{checksum_file, commit, sync_file, tmp_of};
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

/// The checksums the JSON also records (kept out of [`CheckpointMeta`] so older checkpoints,
/// which have none, still load: they are checked by size only).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Checksums {
    /// [`crate::train::atomic::checksum_file`] of the weights file.
    #[serde(default)]
    pub weights_checksum: String,
    /// The same for the state file.
    #[serde(default)]
    pub state_checksum: String,
}

/// Paths of checkpoint `name` in `dir`.
pub fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.safetensors")),
        dir.join(format!("{name}.state.safetensors")),
        dir.join(format!("{name}.json")),
    )
}

/// Writes `tensors` to `<path>.tmp` and fsyncs it: `(bytes, checksum)`. The caller renames it.
fn write_tensors_tmp(path: &Path, tensors: &[(String, Tensor)]) -> Result<(u64, String)> {
    let tmp = tmp_of(path);
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    if let Err(e) = Tensor::write_safetensors(&cpu, &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Other(format!("{}: {e}", tmp.display())));
    }
    sync_file(&tmp)?;
    crate::train::fault::point("ckpt.tmp_written");
    let bytes = std::fs::metadata(&tmp)
        .map_err(|e| Error::io(&tmp, e))?
        .len();
    Ok((bytes, checksum_file(&tmp)?))
}

/// Saves checkpoint `name` of `trainer` into `dir`. `meta`'s file fields are filled in here.
/// A failure (e.g. a full disk) leaves the previous checkpoint `name` intact and loadable.
pub fn save(
    dir: &Path,
    name: &str,
    trainer: &Pretrainer,
    mut meta: CheckpointMeta,
) -> Result<PathBuf> {
    let (wp, sp, jp) = paths(dir, name);
    meta.format = FORMAT.into();
    meta.queue_ptr = trainer.model.queue_ptr();
    let mut sums = Checksums::default();
    (meta.weights_bytes, sums.weights_checksum) =
        write_tensors_tmp(&wp, &trainer.model.state_tensors())?;
    let state: Vec<(String, Tensor)> = trainer
        .opt
        .state()
        .into_iter()
        .map(|(n, t)| (format!("momentum_buffer.{n}"), t))
        .collect();
    (meta.state_bytes, sums.state_checksum) = write_tensors_tmp(&sp, &state)?;
    meta.weights_file = file_name(&wp);
    meta.state_file = file_name(&sp);
    let mut value = serde_json::to_value(&meta).map_err(|e| Error::Other(e.to_string()))?;
    if let (Some(obj), serde_json::Value::Object(extra)) = (
        value.as_object_mut(),
        serde_json::to_value(&sums).map_err(|e| Error::Other(e.to_string()))?,
    ) {
        obj.extend(extra);
    }
    let json = serde_json::to_vec_pretty(&value).map_err(|e| Error::Other(e.to_string()))?;
    // The commit point: from here on the new checkpoint is the one that loads.
    write_atomic(&jp, &json)?;
    crate::train::fault::point("ckpt.committed");
    commit(&tmp_of(&wp), &wp)?;
    crate::train::fault::point("ckpt.weights_renamed");
    commit(&tmp_of(&sp), &sp)?;
    Ok(wp)
}

/// Whether the file at `p` is the one `meta` describes (size, and checksum when recorded).
fn matches(p: &Path, bytes: u64, checksum: &str) -> Result<bool> {
    let got = match std::fs::metadata(p) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(p, e)),
    };
    Ok(got == bytes && (checksum.is_empty() || checksum_file(p)? == checksum))
}

/// Makes the file at `p` the one the JSON `jp` describes: as is, or by rolling its `.tmp`
/// forward (a save interrupted after its commit point); otherwise a torn-checkpoint error.
fn settle(p: &Path, bytes: u64, checksum: &str, jp: &Path) -> Result<()> {
    if matches(p, bytes, checksum)? {
        return Ok(());
    }
    let tmp = tmp_of(p);
    if matches(&tmp, bytes, checksum)? {
        return commit(&tmp, p);
    }
    let got = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    Err(Error::input(
        p,
        "size/checksum",
        format!(
            "{got} bytes, {} says {bytes} bytes{}: torn checkpoint",
            jp.display(),
            if checksum.is_empty() {
                String::new()
            } else {
                format!(" with checksum {checksum}")
            }
        ),
    ))
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
    let sums: Checksums = std::fs::read_to_string(&jp)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    settle(&wp, meta.weights_bytes, &sums.weights_checksum, &jp)?;
    settle(&sp, meta.state_bytes, &sums.state_checksum, &jp)?;
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
