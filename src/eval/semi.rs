//! Semi-supervised evaluation (reference §7.4): fine-tune on a class-balanced labelled subset of
//! the training set (`max(1, round(p * n_c))` samples of each class, seeded, as AimCLR's
//! `Feeder_semi`) and test on the full val split. The chosen indices are saved in the work_dir.
//! The training itself is [`crate::eval::finetune`].
use crate::error::{Error, Result};

/// The labelled fraction of `--percent` (e.g. 1 or 10), checked to be in (0, 100].
pub fn fraction_of_percent(percent: f64) -> Result<f64> {
    if percent > 0.0 && percent <= 100.0 {
        Ok(percent / 100.0)
    } else {
        Err(Error::config(format!(
            "--percent {percent}: must be in (0, 100]"
        )))
    }
}
