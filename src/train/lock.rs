//! One writer per work_dir, and resuming only with a compatible config.
//!
//! [`WorkDirLock`]: an advisory `flock` on `<work_dir>/.lock`, taken before a run writes anything
//! and held until the process ends. The kernel drops it on any exit (error, panic, SIGKILL), so
//! a lock left by a killed run is never stale: the file stays, the lock does not. The file
//! holds the pid and start time of the holder, for the message a second run gets.
//!
//! [`check_resume_config`]: `--resume` compares the config against the `config.yaml` the run
//! wrote when it started, and refuses naming the first key that differs among those that change
//! the model, its state or the random streams ([`RESUME_KEYS`]).
use crate::error::{Error, Result};
use crate::train::config::PretrainConfig;
use serde_json::Value;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Name of the lock file inside a work_dir.
pub const LOCK_FILE: &str = ".lock";

/// An exclusive advisory lock on a work_dir (released when dropped or when the process ends).
#[derive(Debug)]
pub struct WorkDirLock {
    _file: File,
    path: PathBuf,
}

impl WorkDirLock {
    /// Takes the lock of `dir` (which must exist) without waiting; a second holder gets an error
    /// naming the work_dir and the pid that holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                return Err(Error::config(format!(
                    "{} is in use by another run ({}); wait for it to finish or choose another work_dir",
                    dir.display(),
                    if holder.is_empty() { "holder unknown" } else { holder }
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        let info = format!(
            "pid {} since {} UTC",
            std::process::id(),
            crate::train::logger::utc_now()
        );
        // Best effort: the lock is what matters, the text is for the message.
        let _ = file
            .set_len(0)
            .and_then(|()| file.write_all(info.as_bytes()));
        Ok(WorkDirLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Config keys a resumed run must share with the run it continues (dotted; a key names its
/// whole subtree). Others (epochs, lr schedule, device, workers, logging, diagnostics, the
/// dataset's path: data may move) may change on resume.
pub const RESUME_KEYS: &[&str] = &[
    "model",
    "view",
    "model_args",
    "batch_size",
    "seed",
    "layout",
    "shared_head",
    "context",
    "topk",
    "cross_epoch",
    "negatives",
    "independent_key_init",
    "head_bn",
    "shuffle_bn",
];

/// First differing leaf under `key` of `old` vs `new`: `(dotted key, old, new)`.
fn first_diff(
    key: &str,
    old: Option<&Value>,
    new: Option<&Value>,
) -> Option<(String, String, String)> {
    let show = |v: Option<&Value>| v.map(|v| v.to_string()).unwrap_or_default();
    match (old, new) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .find_map(|k| first_diff(&format!("{key}.{k}"), a.get(k), b.get(k)))
        }
        (a, b) if a == b => None,
        // A key the older config.yaml did not have yet (or this version no longer has): the
        // checkpoint's own checks decide.
        (None, _) | (_, None) => None,
        // A number written as 64 and read back as 64.0 is the same value.
        (Some(Value::Number(x)), Some(Value::Number(y))) if x.as_f64() == y.as_f64() => None,
        (a, b) => Some((key.to_string(), show(a), show(b))),
    }
}

/// Refuses `--resume` of `cfg` when `<work_dir>/config.yaml` (written when the run started)
/// differs in one of [`RESUME_KEYS`]; the error names the key, both values and the file. A
/// work_dir without `config.yaml` passes (the checkpoint's own checks still apply).
pub fn check_resume_config(dir: &Path, cfg: &PretrainConfig) -> Result<()> {
    let path = dir.join("config.yaml");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(&path, e)),
    };
    crate::data::limits::check_yaml_text(&text, &path)?;
    let old: Value =
        serde_yaml::from_str(&text).map_err(|e| Error::input(&path, "yaml", e.to_string()))?;
    let new = serde_json::to_value(cfg).map_err(|e| Error::Other(format!("config: {e}")))?;
    for key in RESUME_KEYS {
        if let Some((k, was, now)) = first_diff(key, old.get(key), new.get(key)) {
            return Err(Error::config(format!(
                "--resume: key '{k}' is {now} but the run in {} was started with {was} ({}); \
                 a resumed run must keep it (start a new work_dir to change it)",
                dir.display(),
                path.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_and_released_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let a = WorkDirLock::acquire(tmp.path()).unwrap();
        let e = WorkDirLock::acquire(tmp.path()).unwrap_err().to_string();
        assert!(
            e.contains("in use by another run") && e.contains("pid"),
            "{e}"
        );
        drop(a);
        WorkDirLock::acquire(tmp.path()).unwrap();
    }

    #[test]
    fn resume_config_differences_name_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        let mk = |ov: &[&str]| {
            let ov: Vec<String> = ov.iter().map(|s| s.to_string()).collect();
            PretrainConfig::from_text("", false, Path::new("<t>"), &ov).unwrap()
        };
        let a = mk(&[
            "model=skeletonclr",
            "view=joint",
            "model_args.queue_size=64",
            "batch_size=8",
        ]);
        std::fs::write(tmp.path().join("config.yaml"), a.to_yaml().unwrap()).unwrap();
        check_resume_config(tmp.path(), &a).unwrap();
        // More epochs and another lr: fine.
        let more = [
            "model=skeletonclr",
            "view=joint",
            "model_args.queue_size=64",
            "batch_size=8",
            "num_epoch=9",
            "base_lr=0.5",
        ];
        check_resume_config(tmp.path(), &mk(&more)).unwrap();
        for (ov, key) in [
            (
                [
                    "model=skeletonclr",
                    "view=joint",
                    "model_args.queue_size=128",
                    "batch_size=8",
                ],
                "model_args.queue_size",
            ),
            (
                [
                    "model=crossclr3",
                    "view=all",
                    "model_args.queue_size=64",
                    "batch_size=8",
                ],
                "model",
            ),
            (
                [
                    "model=skeletonclr",
                    "view=motion",
                    "model_args.queue_size=64",
                    "batch_size=8",
                ],
                "view",
            ),
        ] {
            let e = check_resume_config(tmp.path(), &mk(&ov))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("'{key}'")) && e.contains("config.yaml"),
                "{e}"
            );
        }
    }
}
