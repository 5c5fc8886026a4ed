//! Seeded, class-stratified index selection: the labelled subset of semi-supervised evaluation and
//! the validation hold-out used for honest model selection.
use crate::error::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Sample indices per class (`0..num_classes`), in dataset order. Labels outside the range are an
/// error naming the sample.
pub fn indices_by_class(labels: &[i64], num_classes: usize) -> Result<Vec<Vec<usize>>> {
    let mut by_class = vec![Vec::new(); num_classes];
    for (i, &l) in labels.iter().enumerate() {
        if l < 0 || l as usize >= num_classes {
            return Err(Error::config(format!(
                "sample {i}: label {l} is outside 0..{num_classes}"
            )));
        }
        by_class[l as usize].push(i);
    }
    Ok(by_class)
}

/// A class-balanced labelled subset, as AimCLR's `Feeder_semi`: for every class with `n_c` samples,
/// `max(1, round(fraction * n_c))` of them (all when `n_c` is smaller), drawn at random with a
/// ChaCha8 generator seeded by `seed` (class by class in class order). Returns sorted indices.
/// `fraction` must be in `(0, 1]`.
pub fn balanced_subset(
    labels: &[i64],
    num_classes: usize,
    fraction: f64,
    seed: u64,
) -> Result<Vec<usize>> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(Error::config(format!(
            "labelled fraction {fraction} must be in (0, 1]"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut chosen = Vec::new();
    for mut members in indices_by_class(labels, num_classes)? {
        if members.is_empty() {
            continue;
        }
        let take = ((fraction * members.len() as f64).round() as usize).clamp(1, members.len());
        members.shuffle(&mut rng);
        chosen.extend_from_slice(&members[..take]);
    }
    chosen.sort_unstable();
    Ok(chosen)
}

/// Splits `0..labels.len()` into `(train, validation)`, stratified by class: `round(fraction * n_c)`
/// of each class go to validation, but at least one sample of every class with two or more samples
/// stays in training and classes with a single sample stay entirely in training. Seeded (ChaCha8);
/// both lists are sorted. `fraction` must be in `[0, 1)`.
pub fn stratified_split(
    labels: &[i64],
    num_classes: usize,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(Error::config(format!(
            "validation fraction {fraction} must be in [0, 1)"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for mut members in indices_by_class(labels, num_classes)? {
        let n = members.len();
        let n_val = if n < 2 {
            0
        } else {
            ((fraction * n as f64).round() as usize).min(n - 1)
        };
        members.shuffle(&mut rng);
        val.extend_from_slice(&members[..n_val]);
        train.extend_from_slice(&members[n_val..]);
    }
    train.sort_unstable();
    val.sort_unstable();
    Ok((train, val))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_disjoint_and_complete() {
        let labels: Vec<i64> = (0..100).map(|i| i % 4).collect();
        let (tr, va) = stratified_split(&labels, 4, 0.2, 3).unwrap();
        assert_eq!(va.len(), 20);
        let mut all: Vec<usize> = tr.iter().chain(&va).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        for c in 0..4 {
            assert_eq!(va.iter().filter(|&&i| labels[i] == c).count(), 5);
        }
    }

    #[test]
    fn rejects_bad_fraction_and_labels() {
        assert!(balanced_subset(&[0, 1], 2, 0.0, 0).is_err());
        assert!(stratified_split(&[0, 1], 2, 1.0, 0).is_err());
        assert!(balanced_subset(&[0, 5], 2, 0.5, 0).is_err());
    }
}
