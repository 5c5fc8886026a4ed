//! A small exact t-SNE (van der Maaten & Hinton 2008) for feature plots of at most a few thousand
//! points: PCA to `pca_dims`, Gaussian affinities calibrated per point to the perplexity by a
//! (vectorised) bisection, symmetrised P, Student-t Q, gradient descent with momentum, gains and
//! early exaggeration. All O(N^2) work is done with dense tensor operations on the CPU.
use crate::error::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use tch::{Device, Kind, Tensor};

/// t-SNE settings (defaults: the usual perplexity 30, 1000 iterations, exaggeration 12 for 250).
#[derive(Debug, Clone)]
pub struct TsneConfig {
    pub perplexity: f64,
    pub iterations: usize,
    pub early_exaggeration: f64,
    /// Iterations with exaggerated P (and momentum 0.5); afterwards momentum 0.8.
    pub exaggeration_iterations: usize,
    /// Gradient-descent step; `None` = `max(N / early_exaggeration / 4, 50)` (scikit-learn's "auto").
    pub learning_rate: Option<f64>,
    /// Input is reduced to this many principal components first (when it has more dimensions).
    pub pca_dims: usize,
    pub seed: u64,
}

impl Default for TsneConfig {
    fn default() -> Self {
        TsneConfig {
            perplexity: 30.0,
            iterations: 1000,
            early_exaggeration: 12.0,
            exaggeration_iterations: 250,
            learning_rate: None,
            pca_dims: 50,
            seed: 0,
        }
    }
}

/// Bisection steps per point when calibrating the Gaussian precision to the perplexity.
const BISECTION_STEPS: usize = 64;
/// Smallest probability kept in P and Q (avoids log(0) and division by zero).
const MIN_PROB: f64 = 1e-12;
/// Lower bound of the per-coordinate adaptive gains.
const MIN_GAIN: f64 = 0.01;

/// Projects centred `x` `(N, D)` onto its first `dims` principal components (`(N, min(D, dims))`).
fn pca(x: &Tensor, dims: usize) -> Tensor {
    let centred = x - x.mean_dim([0i64].as_slice(), true, Kind::Double);
    let d = x.size()[1];
    if (dims as i64) >= d {
        return centred;
    }
    // svd(some = true): V is (D, min(N, D)); its first columns are the principal directions.
    let (_, _, v) = centred.svd(true, true);
    let k = (dims as i64).min(v.size()[1]);
    centred.matmul(&v.narrow(1, 0, k))
}

/// Squared Euclidean distances `(N, N)` between the rows of `x` `(N, D)`.
fn squared_distances(x: &Tensor) -> Tensor {
    let sq = (x * x).sum_dim_intlist([1i64].as_slice(), true, Kind::Double);
    (&sq + sq.tr() - x.matmul(&x.tr()) * 2.0).clamp_min(0.0)
}

/// Row-conditional affinities `P(j|i)` `(N, N)` with each row's entropy matched to
/// `ln(perplexity)` by bisection on the precision `beta_i`, done for all rows at once.
fn conditional_p(dist: &Tensor, perplexity: f64) -> Tensor {
    let n = dist.size()[0];
    let eye = Tensor::eye(n, (Kind::Double, Device::Cpu));
    // Shift each row by its smallest off-diagonal distance: exp stays in range, P is unchanged.
    let off = dist + &eye * 1e300;
    let d = (dist - off.amin([1i64].as_slice(), true)).clamp_min(0.0);
    let mask = 1.0 - &eye;
    let target = perplexity.ln();
    let mut beta = Tensor::ones([n, 1], (Kind::Double, Device::Cpu));
    let mut lo = Tensor::zeros([n, 1], (Kind::Double, Device::Cpu));
    let mut hi = Tensor::full([n, 1], f64::INFINITY, (Kind::Double, Device::Cpu));
    let mut p = Tensor::zeros([n, n], (Kind::Double, Device::Cpu));
    for _ in 0..BISECTION_STEPS {
        p = (-(&d * &beta)).exp() * &mask;
        let sum = p
            .sum_dim_intlist([1i64].as_slice(), true, Kind::Double)
            .clamp_min(MIN_PROB);
        let entropy = sum.log()
            + &beta * (&d * &p).sum_dim_intlist([1i64].as_slice(), true, Kind::Double) / &sum;
        // Entropy too high -> distribution too flat -> increase beta.
        let too_flat = entropy.gt(target);
        lo = beta.where_self(&too_flat, &lo);
        hi = hi.where_self(&too_flat, &beta);
        let up = (&beta * 2.0).where_self(&hi.isinf(), &((&beta + &hi) / 2.0));
        let down = (&beta + &lo) / 2.0;
        beta = up.where_self(&too_flat, &down);
    }
    let sum = p
        .sum_dim_intlist([1i64].as_slice(), true, Kind::Double)
        .clamp_min(MIN_PROB);
    p / sum
}

/// Embeds the rows of `x` `(N, D)` (any float kind, any device) into 2-D; returns `(N, 2)` f64 CPU.
/// Needs N >= 2 and `perplexity < N` (it is lowered to `(N - 1) / 3` when too large).
pub fn tsne(x: &Tensor, cfg: &TsneConfig) -> Result<Tensor> {
    let size = x.size();
    if size.len() != 2 || size[0] < 2 {
        return Err(Error::config(format!(
            "t-SNE needs (N >= 2, D) points; got shape {size:?}"
        )));
    }
    let n = size[0];
    let x = x.to_device(Device::Cpu).to_kind(Kind::Double);
    let x = pca(&x, cfg.pca_dims);
    // Scale so that distances are O(1) whatever the feature magnitude.
    let x = &x / x.abs().max().double_value(&[]).max(MIN_PROB);
    let perplexity = cfg.perplexity.min(((n - 1) as f64 / 3.0).max(1.0));
    let p_cond = conditional_p(&squared_distances(&x), perplexity);
    let p = ((&p_cond + p_cond.tr()) / (2.0 * n as f64)).clamp_min(MIN_PROB);

    let normal = Normal::new(0.0, 1e-4).map_err(|e| Error::Other(e.to_string()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let init: Vec<f64> = (0..n * 2).map(|_| normal.sample(&mut rng)).collect();
    let mut y = Tensor::from_slice(&init).view([n, 2]);
    let mut update = y.zeros_like();
    let mut gains = y.ones_like();
    let lr = cfg
        .learning_rate
        .unwrap_or((n as f64 / cfg.early_exaggeration.max(1.0) / 4.0).max(50.0));
    let eye = Tensor::eye(n, (Kind::Double, Device::Cpu));
    for it in 0..cfg.iterations {
        let exaggerate = it < cfg.exaggeration_iterations;
        let momentum = if exaggerate { 0.5 } else { 0.8 };
        let p_eff = if exaggerate {
            &p * cfg.early_exaggeration
        } else {
            p.shallow_clone()
        };
        let num: Tensor = (squared_distances(&y) + 1.0).reciprocal() * (1.0 - &eye);
        let q = (&num / num.sum(Kind::Double)).clamp_min(MIN_PROB);
        let w = (p_eff - q) * &num;
        // grad_i = 4 * sum_j w_ij (y_i - y_j)
        let grad =
            (&y * w.sum_dim_intlist([1i64].as_slice(), true, Kind::Double) - w.matmul(&y)) * 4.0;
        let same_sign = grad.sign().eq_tensor(&update.sign());
        gains = (&gains * 0.8)
            .where_self(&same_sign, &(&gains + 0.2))
            .clamp_min(MIN_GAIN);
        update = &update * momentum - &gains * &grad * lr;
        y = &y + &update;
        y = &y - y.mean_dim([0i64].as_slice(), true, Kind::Double);
    }
    Ok(y)
}

/// Picks the points to plot: the `max_classes` most frequent classes (ties: lower class first),
/// then at most `max_points` of their samples drawn at random (seeded). Returns sorted indices.
pub fn subsample(labels: &[i64], max_classes: usize, max_points: usize, seed: u64) -> Vec<usize> {
    let mut counts: std::collections::BTreeMap<i64, usize> = Default::default();
    for &l in labels {
        *counts.entry(l).or_default() += 1;
    }
    let mut classes: Vec<(i64, usize)> = counts.into_iter().collect();
    classes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let keep: std::collections::HashSet<i64> =
        classes.iter().take(max_classes).map(|c| c.0).collect();
    let mut idx: Vec<usize> = (0..labels.len())
        .filter(|&i| keep.contains(&labels[i]))
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    idx.shuffle(&mut rng);
    idx.truncate(max_points);
    idx.sort_unstable();
    idx
}
