//! Step learning-rate schedule (official `adjust_lr`): set at the start of every epoch to
//! `base_lr * 0.1^#{s in step : epoch > s}` with a 1-based `epoch`; no warm-up.

/// Decay factor applied at each milestone.
pub const STEP_GAMMA: f64 = 0.1;

/// The learning rate of 1-based `epoch`. With `step = [250]`: epochs 1..=250 get `base_lr`,
/// 251.. get `base_lr * 0.1`.
pub fn step_lr(base_lr: f64, step: &[usize], epoch: usize) -> f64 {
    let decays = step.iter().filter(|&&s| epoch > s).count() as i32;
    base_lr * STEP_GAMMA.powi(decays)
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
}
