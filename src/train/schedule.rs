//! Step learning-rate schedule (official `adjust_lr`): set at the start of every epoch to
//! `base_lr * 0.1^#{s in step : epoch > s}` with a 1-based `epoch`; no warm-up. Also the
//! small-data rule for the queue size and the key momentum ([`scaled_to_data`]).

use crate::train::config::LrSchedule;

/// Decay factor applied at each milestone.
pub const STEP_GAMMA: f64 = 0.1;

/// The learning rate of 1-based `epoch`. With `step = [250]`: epochs 1..=250 get `base_lr`,
/// 251.. get `base_lr * 0.1`.
pub fn step_lr(base_lr: f64, step: &[usize], epoch: usize) -> f64 {
    let decays = step.iter().filter(|&&s| epoch > s).count() as i32;
    base_lr * STEP_GAMMA.powi(decays)
}

/// The learning rate of 1-based `epoch` of `num_epoch` under `schedule`, with a linear warm-up
/// over the first `warmup` epochs (`base_lr * epoch / warmup`; none when 0, the official setting).
/// `Cosine` decays as `base_lr * 0.5 * (1 + cos(pi * e / E))` over the post-warm-up epochs
/// (`e` = epochs done after warm-up, `E` = post-warm-up epochs), so the last epoch's lr is small
/// but not 0; `Step` is [`step_lr`].
pub fn epoch_lr(
    schedule: LrSchedule,
    base_lr: f64,
    step: &[usize],
    warmup: usize,
    num_epoch: usize,
    epoch: usize,
) -> f64 {
    if warmup > 0 && epoch <= warmup {
        return base_lr * epoch as f64 / warmup as f64;
    }
    match schedule {
        LrSchedule::Step => step_lr(base_lr, step, epoch),
        LrSchedule::Cosine => {
            let total = num_epoch.saturating_sub(warmup).max(1) as f64;
            let done = epoch.saturating_sub(warmup + 1) as f64;
            base_lr * 0.5 * (1.0 + (std::f64::consts::PI * done / total).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn official_schedule() {
        assert_eq!(step_lr(0.1, &[250], 1), 0.1);
        assert_eq!(step_lr(0.1, &[250], 250), 0.1);
        assert!((step_lr(0.1, &[250], 251) - 0.01).abs() < 1e-15);
        assert!((step_lr(1.0, &[2, 4], 5) - 0.01).abs() < 1e-15);
        assert_eq!(step_lr(0.3, &[], 300), 0.3);
    }

    #[test]
    fn warmup_and_cosine() {
        // No warm-up, step schedule: the official lr.
        assert_eq!(
            epoch_lr(LrSchedule::Step, 0.1, &[250], 0, 300, 251),
            step_lr(0.1, &[250], 251)
        );
        // Warm-up 4: 0.25, 0.5, 0.75, 1.0 of base, then the schedule.
        let lrs: Vec<f64> = (1..=6)
            .map(|e| epoch_lr(LrSchedule::Cosine, 1.0, &[], 4, 14, e))
            .collect();
        assert_eq!(&lrs[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert_eq!(lrs[4], 1.0); // first post-warm-up epoch starts at base
        assert!(lrs[5] < 1.0 && lrs[5] > 0.9);
        let last = epoch_lr(LrSchedule::Cosine, 1.0, &[], 4, 14, 14);
        assert!(last > 0.0 && last < 0.05, "{last}");
    }
}

/// The queue size and key momentum that `scale_to_data: true` gives (docs/small-data.md, "What to
/// use on a small dataset"), for `samples` training sequences, global batch `batch` and
/// `total_steps` optimiser steps:
///
/// * queue K: the largest multiple of `batch` not above `samples / 4` (at least one batch), so a
///   sample's own older keys do not sit in the queue as negatives;
/// * momentum m = 1 - 1 / tau, tau = clamp(total_steps / 100, 100, 1000) steps (official NTU:
///   ~94k steps give 0.999; 1,000-10,000 steps give 0.99).
pub fn scaled_to_data(samples: usize, batch: usize, total_steps: usize) -> (usize, f64) {
    let batch = batch.max(1);
    let queue = ((samples / 4) / batch).max(1) * batch;
    let tau = (total_steps as f64 / 100.0).clamp(100.0, 1000.0);
    (queue, 1.0 - 1.0 / tau)
}

#[cfg(test)]
mod scaled_tests {
    use super::scaled_to_data;

    #[test]
    fn queue_and_momentum_follow_the_data() {
        // MSR Action3D: 284 sequences, batch 16, 100 epochs of 17 steps.
        assert_eq!(scaled_to_data(284, 16, 1_700), (64, 0.99));
        // ~1,000 sequences, batch 64, 100 epochs of 15 steps.
        let (k, m) = scaled_to_data(1_020, 64, 1_500);
        assert_eq!(k, 192);
        assert!((m - 0.99).abs() < 1e-12);
        // NTU-60 scale: 40k sequences, batch 128, 300 epochs -> the official momentum.
        let (k, m) = scaled_to_data(40_091, 128, 93_900);
        assert_eq!(k, 9_984);
        assert!((m - 0.999).abs() < 1e-3);
        // Fewer samples than 4 batches: one batch.
        assert_eq!(scaled_to_data(20, 16, 10).0, 16);
    }
}
