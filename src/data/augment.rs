//! Pre-training augmentations (reference §3): temporal crop with mirrored padding, then shear.
//!
//! One augmentation of a sample `x` (`C x T x V x M`, C = 3) is, in this order:
//! 1. **temporal crop**: with `P = floor(T / temporal_padding_ratio)`, the sequence is padded
//!    symmetrically (`x[P-1], .., x[0], x[0], .., x[T-1], x[T-1], .., x[T-P]`: mirrored, edge frame
//!    duplicated) to `T + 2P` frames and the window `[start, start + T)` is kept, with
//!    `start ~ UniformInt[0, 2P]`;
//! 2. **shear**: six uniforms `a1, a2, a3, b1, b2, b3` in `[-amplitude, amplitude]` (drawn in that
//!    order) build `S = [[1, a1, b1], [a2, 1, b2], [a3, b3, 1]]`, and every 3-vector `p` (every
//!    joint, frame and body, zeros included) becomes `S p` (computed in f64, stored as f32). On 2D
//!    data (C = 2) the same six draws are made and the upper-left 2 x 2 block `[[1, a1], [a2, 1]]`
//!    shears the (x, y) plane.
//!
//! All randomness comes from the `rng` passed in, so a seeded rng (e.g. `rand_chacha`) gives
//! reproducible augmentations.
use crate::error::{Error, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Official defaults (`Feeder_dual`): shear amplitude 0.5, temporal padding ratio 6.
const OFFICIAL_SHEAR_AMPLITUDE: f64 = 0.5;
const OFFICIAL_PADDING_RATIO: usize = 6;

/// Augmentation settings. A non-positive `shear_amplitude` or a `temporal_padding_ratio` of 0
/// disables that step (the official feeder tests `> 0` for both).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AugmentConfig {
    pub shear_amplitude: f64,
    pub temporal_padding_ratio: usize,
    /// Extra (AimCLR-style) augmentations, applied after crop and shear in this order; each is
    /// off at 0 and draws nothing from the rng when off, so the official stream is unchanged.
    /// Random rotation about x, y, z, each uniform in `[-rotation_degrees, rotation_degrees]`.
    #[serde(default)]
    pub rotation_degrees: f64,
    /// Random rotation about the vertical axis y only (a camera viewpoint change), uniform in
    /// `[-yaw_degrees, yaw_degrees]`, applied after `rotation_degrees`.
    #[serde(default)]
    pub yaw_degrees: f64,
    /// Probability of mirroring the x coordinate.
    #[serde(default)]
    pub flip: f64,
    /// Probability of a temporal Gaussian blur (kernel 15, sigma uniform in [0.1, 2]).
    #[serde(default)]
    pub gaussian_blur: f64,
    /// Standard deviation of additive Gaussian noise (bodies that are present only).
    #[serde(default)]
    pub gaussian_noise: f64,
    /// Probability of zeroing one random coordinate axis.
    #[serde(default)]
    pub axis_mask: f64,
    /// Fraction of joints zeroed over the whole sequence.
    #[serde(default)]
    pub joint_mask: f64,
    /// Temporal crop-resize: a window of a random fraction in `[crop_resize, 1]` of the frames,
    /// resized to T by linear interpolation (applied first among the extras).
    #[serde(default)]
    pub crop_resize: f64,
    /// Bone-length jitter amplitude (applied by the loader, which knows the skeleton: see
    /// [`BoneTree`] and [`apply_bone_length`]).
    #[serde(default)]
    pub bone_length: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            shear_amplitude: OFFICIAL_SHEAR_AMPLITUDE,
            temporal_padding_ratio: OFFICIAL_PADDING_RATIO,
            rotation_degrees: 0.0,
            yaw_degrees: 0.0,
            flip: 0.0,
            gaussian_blur: 0.0,
            gaussian_noise: 0.0,
            axis_mask: 0.0,
            joint_mask: 0.0,
            crop_resize: 0.0,
            bone_length: 0.0,
        }
    }
}

impl AugmentConfig {
    /// No augmentation at all (the official evaluation setting, both values -1).
    pub fn none() -> Self {
        AugmentConfig {
            shear_amplitude: -1.0,
            temporal_padding_ratio: 0,
            ..AugmentConfig::default()
        }
    }

    /// Whether any of the extra (non-official) augmentations is on.
    pub fn extras_enabled(&self) -> bool {
        self.rotation_degrees > 0.0
            || self.yaw_degrees > 0.0
            || self.flip > 0.0
            || self.gaussian_blur > 0.0
            || self.gaussian_noise > 0.0
            || self.axis_mask > 0.0
            || self.joint_mask > 0.0
            || self.crop_resize > 0.0
            || self.bone_length > 0.0
    }

    /// Whether the shear step runs.
    pub fn shear_enabled(&self) -> bool {
        self.shear_amplitude > 0.0
    }

    /// Whether the temporal crop runs.
    pub fn crop_enabled(&self) -> bool {
        self.temporal_padding_ratio > 0
    }

    /// Checks the settings against a sample shape `[C, T, V, M]`: the shear needs C == 2 or 3 and
    /// a finite amplitude.
    pub fn validate(&self, sample_shape: [usize; 4]) -> Result<()> {
        if !self.shear_amplitude.is_finite() {
            return Err(Error::config(format!(
                "shear amplitude must be finite, got {}",
                self.shear_amplitude
            )));
        }
        if (self.rotation_degrees > 0.0 || self.yaw_degrees > 0.0) && sample_shape[0] != 3 {
            return Err(Error::config(format!(
                "rotation needs 3 coordinates per joint, the data has C = {} (shape {:?})",
                sample_shape[0], sample_shape
            )));
        }
        if self.shear_enabled() && !(2..=3).contains(&sample_shape[0]) {
            return Err(Error::config(format!(
                "shear needs 2 or 3 coordinates per joint, the data has C = {} (shape {:?})",
                sample_shape[0], sample_shape
            )));
        }
        Ok(())
    }
}

/// The random draws of one augmentation: crop start (in padded frames) and shear matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentDraw {
    /// Padding `P` on each side; the window starts at padded frame `start` (`0..=2P`).
    pub padding: usize,
    pub start: usize,
    /// Row-major `S`, or `None` when the shear is disabled.
    pub shear: Option<[[f64; 3]; 3]>,
}

impl AugmentDraw {
    /// Draws crop start then shear (the official order) for a sequence of `frames` frames.
    pub fn sample(frames: usize, cfg: &AugmentConfig, rng: &mut impl Rng) -> Self {
        let (padding, start) = if cfg.crop_enabled() {
            let p = frames / cfg.temporal_padding_ratio;
            (p, rng.gen_range(0..=2 * p))
        } else {
            (0, 0)
        };
        let shear = if cfg.shear_enabled() {
            let r = cfg.shear_amplitude;
            // Python's random.uniform(-r, r) = -r + 2r * U[0, 1).
            let mut u = || -r + 2.0 * r * rng.gen::<f64>();
            let (a1, a2, a3) = (u(), u(), u());
            let (b1, b2, b3) = (u(), u(), u());
            Some([[1.0, a1, b1], [a2, 1.0, b2], [a3, b3, 1.0]])
        } else {
            None
        };
        AugmentDraw {
            padding,
            start,
            shear,
        }
    }

    /// Source frame of output frame `t` (`0..frames`) in the original sequence.
    pub fn source_frame(&self, t: usize, frames: usize) -> usize {
        padded_to_source(self.start + t, self.padding, frames)
    }
}

/// Maps frame `j` of the symmetrically padded sequence (`T + 2P` frames) to its source frame.
pub fn padded_to_source(j: usize, padding: usize, frames: usize) -> usize {
    if j < padding {
        padding - 1 - j
    } else if j < padding + frames {
        j - padding
    } else {
        // Mirrored tail: padded frame P + T + k is x[T - 1 - k].
        2 * frames + padding - 1 - j
    }
}

/// One augmentation of sample `x` (`C x T x V x M`, flat) with draws from `rng`; returns a new
/// `C x T x V x M` sample. Panics if the shear is enabled and C is not 2 or 3 (check the config with
/// [`AugmentConfig::validate`] first).
pub fn augment(x: &[f32], shape: [usize; 4], cfg: &AugmentConfig, rng: &mut impl Rng) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    augment_into(x, shape, cfg, rng, &mut out);
    out
}

/// As [`augment`], writing into `out` (same length as `x`).
pub fn augment_into(
    x: &[f32],
    shape: [usize; 4],
    cfg: &AugmentConfig,
    rng: &mut impl Rng,
    out: &mut [f32],
) {
    let draw = AugmentDraw::sample(shape[1], cfg, rng);
    apply_draw(x, shape, &draw, out);
    if cfg.extras_enabled() {
        apply_extras(out, shape, cfg, rng);
    }
}

/// The extra augmentations of `cfg` on `out` (`C x T x V x M`, flat), in place: crop-resize,
/// rotation, yaw, flip, blur, noise, axis mask, joint mask. Draws only for the enabled ones.
pub fn apply_extras(out: &mut [f32], shape: [usize; 4], cfg: &AugmentConfig, rng: &mut impl Rng) {
    let [c, t, v, m] = shape;
    let idx = |ch: usize, f: usize, j: usize, b: usize| ((ch * t + f) * v + j) * m + b;
    if cfg.crop_resize > 0.0 && t > 1 {
        let ratio = cfg.crop_resize + (1.0 - cfg.crop_resize) * rng.gen::<f64>();
        let len = ((ratio * t as f64).round() as usize).clamp(2, t);
        let start = rng.gen_range(0..=t - len);
        let src = out.to_vec();
        for f in 0..t {
            let pos = start as f64 + f as f64 * (len - 1) as f64 / (t - 1) as f64;
            let lo = (pos.floor() as usize).min(t - 1);
            let hi = (lo + 1).min(t - 1);
            let w = (pos - lo as f64) as f32;
            for ch in 0..c {
                for j in 0..v {
                    for b in 0..m {
                        out[idx(ch, f, j, b)] =
                            src[idx(ch, lo, j, b)] * (1.0 - w) + src[idx(ch, hi, j, b)] * w;
                    }
                }
            }
        }
    }
    if cfg.rotation_degrees > 0.0 && c == 3 {
        let r = cfg.rotation_degrees.to_radians();
        let mut a = || -r + 2.0 * r * rng.gen::<f64>();
        let (ax, ay, az) = (a(), a(), a());
        let rx = [
            [1.0, 0.0, 0.0],
            [0.0, ax.cos(), ax.sin()],
            [0.0, -ax.sin(), ax.cos()],
        ];
        let ry = [
            [ay.cos(), 0.0, -ay.sin()],
            [0.0, 1.0, 0.0],
            [ay.sin(), 0.0, ay.cos()],
        ];
        let rz = [
            [az.cos(), az.sin(), 0.0],
            [-az.sin(), az.cos(), 0.0],
            [0.0, 0.0, 1.0],
        ];
        let rot = mat3(&rz, &mat3(&ry, &rx));
        let plane = t * v * m;
        for k in 0..plane {
            let p = [
                out[k] as f64,
                out[plane + k] as f64,
                out[2 * plane + k] as f64,
            ];
            for (row, r) in rot.iter().enumerate() {
                out[row * plane + k] = (r[0] * p[0] + r[1] * p[1] + r[2] * p[2]) as f32;
            }
        }
    }
    if cfg.yaw_degrees > 0.0 && c == 3 {
        let r = cfg.yaw_degrees.to_radians();
        let ay = -r + 2.0 * r * rng.gen::<f64>();
        let (sin, cos) = ay.sin_cos();
        let plane = t * v * m;
        for k in 0..plane {
            let (x, z) = (out[k] as f64, out[2 * plane + k] as f64);
            out[k] = (cos * x - sin * z) as f32;
            out[2 * plane + k] = (sin * x + cos * z) as f32;
        }
    }
    if cfg.flip > 0.0 && rng.gen::<f64>() < cfg.flip {
        for x in &mut out[..t * v * m] {
            *x = -*x;
        }
    }
    if cfg.gaussian_blur > 0.0 && rng.gen::<f64>() < cfg.gaussian_blur && t > 1 {
        let sigma = 0.1 + 1.9 * rng.gen::<f64>();
        let half = 7i64;
        let kernel: Vec<f64> = (-half..=half)
            .map(|d| (-((d * d) as f64) / (2.0 * sigma * sigma)).exp())
            .collect();
        let norm: f64 = kernel.iter().sum();
        let src = out.to_vec();
        for ch in 0..c {
            for j in 0..v {
                for b in 0..m {
                    for f in 0..t {
                        let mut acc = 0.0f64;
                        for (ki, w) in kernel.iter().enumerate() {
                            let g = (f as i64 + ki as i64 - half).clamp(0, t as i64 - 1) as usize;
                            acc += w * src[idx(ch, g, j, b)] as f64;
                        }
                        out[idx(ch, f, j, b)] = (acc / norm) as f32;
                    }
                }
            }
        }
    }
    if cfg.gaussian_noise > 0.0 {
        let present: Vec<bool> = (0..m)
            .map(|b| (0..c).any(|ch| (0..t).any(|f| (0..v).any(|j| out[idx(ch, f, j, b)] != 0.0))))
            .collect();
        let normal = rand_distr::Normal::new(0.0, cfg.gaussian_noise).expect("finite std");
        for ch in 0..c {
            for f in 0..t {
                for j in 0..v {
                    for (b, &on) in present.iter().enumerate() {
                        let n: f64 = rand_distr::Distribution::sample(&normal, rng);
                        if on {
                            out[idx(ch, f, j, b)] += n as f32;
                        }
                    }
                }
            }
        }
    }
    if cfg.axis_mask > 0.0 && rng.gen::<f64>() < cfg.axis_mask {
        let axis = rng.gen_range(0..c);
        let plane = t * v * m;
        out[axis * plane..(axis + 1) * plane].fill(0.0);
    }
    if cfg.joint_mask > 0.0 {
        let count = ((cfg.joint_mask * v as f64).round() as usize).min(v);
        let joints = rand::seq::index::sample(rng, v, count);
        for j in joints.iter() {
            for ch in 0..c {
                for f in 0..t {
                    for b in 0..m {
                        out[idx(ch, f, j, b)] = 0.0;
                    }
                }
            }
        }
    }
}

/// A layout's joints as a tree hanging from its centre joint, for [`apply_bone_length`].
#[derive(Debug, Clone, PartialEq)]
pub struct BoneTree {
    /// Parent of each joint towards the centre (the centre is its own parent; a joint the edges
    /// do not reach also maps to itself and keeps its position).
    pub parent: Vec<usize>,
    /// The joints in breadth-first order from the centre (parents before children).
    pub order: Vec<usize>,
}

impl BoneTree {
    /// The tree of `num_joints` joints with `edges`, rooted at `center`.
    pub fn new(num_joints: usize, edges: &[(usize, usize)], center: usize) -> Self {
        let mut parent: Vec<usize> =
            crate::data::layout::parents_towards(num_joints, edges, center);
        let mut depth = vec![usize::MAX; num_joints];
        for (j, p) in parent.iter_mut().enumerate() {
            if *p == usize::MAX {
                *p = j;
            }
        }
        let mut order = vec![center];
        depth[center] = 0;
        let mut i = 0;
        while i < order.len() {
            let u = order[i];
            for (w, &p) in parent.iter().enumerate() {
                if p == u && w != u && depth[w] == usize::MAX {
                    depth[w] = depth[u] + 1;
                    order.push(w);
                }
            }
            i += 1;
        }
        BoneTree { parent, order }
    }
}

/// Bone-length jitter of one augmented view `out` (`C x T x V x M`): each bone `j -> parent(j)`
/// gets a factor uniform in `[1 - amplitude, 1 + amplitude]` (one draw per joint, in joint order,
/// shared by every frame and body), and every frame of every body is rebuilt from the centre
/// outwards: `p'(j) = p'(parent) + factor_j (p(j) - p(parent))`. An absent (all-zero) body stays
/// zero. Draws nothing when `amplitude` is 0.
pub fn apply_bone_length(
    out: &mut [f32],
    shape: [usize; 4],
    tree: &BoneTree,
    amplitude: f64,
    rng: &mut impl Rng,
) {
    if amplitude <= 0.0 {
        return;
    }
    let [c, t, v, m] = shape;
    let factor: Vec<f32> = (0..v)
        .map(|_| (1.0 - amplitude + 2.0 * amplitude * rng.gen::<f64>()) as f32)
        .collect();
    let idx = |ch: usize, f: usize, j: usize, b: usize| ((ch * t + f) * v + j) * m + b;
    let mut old = vec![0f32; v];
    for ch in 0..c {
        for f in 0..t {
            for b in 0..m {
                for (j, o) in old.iter_mut().enumerate() {
                    *o = out[idx(ch, f, j, b)];
                }
                for &j in tree.order.iter().skip(1) {
                    let p = tree.parent[j];
                    out[idx(ch, f, j, b)] = out[idx(ch, f, p, b)] + factor[j] * (old[j] - old[p]);
                }
            }
        }
    }
}

fn mat3(a: &[[f64; 3]; 3], b: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut o = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            o[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    o
}

/// Applies a fixed draw: crop then shear, fused in one pass over the data.
pub fn apply_draw(x: &[f32], shape: [usize; 4], draw: &AugmentDraw, out: &mut [f32]) {
    let [c, t, v, m] = shape;
    let block = v * m; // one (coordinate, frame) slab
    let plane = t * block; // one coordinate
    assert_eq!(
        x.len(),
        c * plane,
        "sample length does not match shape {shape:?}"
    );
    assert_eq!(
        out.len(),
        x.len(),
        "output length does not match shape {shape:?}"
    );
    for frame in 0..t {
        let src = draw.source_frame(frame, t);
        match draw.shear {
            None => {
                for ch in 0..c {
                    let from = ch * plane + src * block;
                    let to = ch * plane + frame * block;
                    out[to..to + block].copy_from_slice(&x[from..from + block]);
                }
            }
            Some(s) if c == 2 => {
                let (from, to) = (src * block, frame * block);
                let px = &x[from..from + block];
                let py = &x[plane + from..plane + from + block];
                let (o0, o1) = out.split_at_mut(plane);
                let (qx, qy) = (&mut o0[to..to + block], &mut o1[to..to + block]);
                for k in 0..block {
                    let p = [px[k] as f64, py[k] as f64];
                    qx[k] = (s[0][0] * p[0] + s[0][1] * p[1]) as f32;
                    qy[k] = (s[1][0] * p[0] + s[1][1] * p[1]) as f32;
                }
            }
            Some(s) => {
                assert_eq!(c, 3, "shear needs C == 2 or 3, got shape {shape:?}");
                let (from, to) = (src * block, frame * block);
                let px = &x[from..from + block];
                let py = &x[plane + from..plane + from + block];
                let pz = &x[2 * plane + from..2 * plane + from + block];
                let (o0, rest) = out.split_at_mut(plane);
                let (o1, o2) = rest.split_at_mut(plane);
                let (qx, qy, qz) = (
                    &mut o0[to..to + block],
                    &mut o1[to..to + block],
                    &mut o2[to..to + block],
                );
                for k in 0..block {
                    let p = [px[k] as f64, py[k] as f64, pz[k] as f64];
                    qx[k] = (s[0][0] * p[0] + s[0][1] * p[1] + s[0][2] * p[2]) as f32;
                    qy[k] = (s[1][0] * p[0] + s[1][1] * p[1] + s[1][2] * p[2]) as f32;
                    qz[k] = (s[2][0] * p[0] + s[2][1] * p[1] + s[2][2] * p[2]) as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    const SHAPE: [usize; 4] = [3, 12, 4, 2];

    fn sample() -> Vec<f32> {
        let n: usize = SHAPE.iter().product();
        (0..n)
            .map(|i| ((i * 37) % 101) as f32 * 0.1 - 5.0)
            .collect()
    }

    fn at(x: &[f32], c: usize, t: usize, v: usize, m: usize) -> f32 {
        let [_, tt, vv, mm] = SHAPE;
        x[((c * tt + t) * vv + v) * mm + m]
    }

    #[test]
    fn crop_is_a_window_of_the_symmetric_padding() {
        let x = sample();
        let cfg = AugmentConfig {
            shear_amplitude: -1.0,
            temporal_padding_ratio: 6,
            ..AugmentConfig::default()
        };
        let [c, t, v, m] = SHAPE;
        let p = t / 6;
        // Build the padded sequence explicitly (frame list): reversed head, x, reversed tail.
        let mut frames: Vec<usize> = (0..p).rev().collect();
        frames.extend(0..t);
        frames.extend((t - p..t).rev());
        assert_eq!(frames.len(), t + 2 * p);
        let mut starts = std::collections::BTreeSet::new();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..200 {
            let y = augment(&x, SHAPE, &cfg, &mut rng);
            let start = (0..=2 * p)
                .find(|&s| {
                    (0..c).all(|ci| {
                        (0..t).all(|ti| {
                            (0..v).all(|vi| {
                                (0..m).all(|mi| {
                                    at(&y, ci, ti, vi, mi) == at(&x, ci, frames[s + ti], vi, mi)
                                })
                            })
                        })
                    })
                })
                .expect("output is a contiguous window of the padded sequence");
            starts.insert(start);
        }
        // Every start in 0..=2P occurs.
        assert_eq!(starts.len(), 2 * p + 1);
    }

    #[test]
    fn zero_amplitude_shear_is_identity_and_zeros_stay_zero() {
        let x = sample();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let id = AugmentConfig {
            shear_amplitude: 0.0,
            temporal_padding_ratio: 0,
            ..AugmentConfig::default()
        };
        assert_eq!(augment(&x, SHAPE, &id, &mut rng), x);
        // An explicit zero shear matrix is also the identity.
        let draw = AugmentDraw {
            padding: 0,
            start: 0,
            shear: Some([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
        };
        let mut out = vec![0.0; x.len()];
        apply_draw(&x, SHAPE, &draw, &mut out);
        assert_eq!(out, x);

        // Body 1 all zero, a zero joint of body 0: both stay zero after crop + shear.
        let mut z = sample();
        let [c, t, v, m] = SHAPE;
        for ci in 0..c {
            for ti in 0..t {
                for vi in 0..v {
                    z[((ci * t + ti) * v + vi) * m + 1] = 0.0;
                }
                z[((ci * t + ti) * v + 2) * m] = 0.0;
            }
        }
        let y = augment(&z, SHAPE, &AugmentConfig::default(), &mut rng);
        for ci in 0..c {
            for ti in 0..t {
                for vi in 0..v {
                    assert_eq!(y[((ci * t + ti) * v + vi) * m + 1], 0.0);
                }
                assert_eq!(y[((ci * t + ti) * v + 2) * m], 0.0);
            }
        }
        assert_ne!(y, z, "the default augmentation changes non-zero data");
    }

    #[test]
    fn shear_matches_matrix_product() {
        let x = sample();
        let cfg = AugmentConfig {
            shear_amplitude: 0.5,
            temporal_padding_ratio: 0,
            ..AugmentConfig::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let draw = AugmentDraw::sample(SHAPE[1], &cfg, &mut rng.clone());
        let y = augment(&x, SHAPE, &cfg, &mut rng);
        let s = draw.shear.unwrap();
        for (i, row) in s.iter().enumerate() {
            for (j, &e) in row.iter().enumerate() {
                if i == j {
                    assert_eq!(e, 1.0);
                } else {
                    assert!(e.abs() <= 0.5);
                }
            }
        }
        let p = [at(&x, 0, 5, 1, 0), at(&x, 1, 5, 1, 0), at(&x, 2, 5, 1, 0)];
        for (c, sr) in s.iter().enumerate() {
            let want = (sr[0] * p[0] as f64 + sr[1] * p[1] as f64 + sr[2] * p[2] as f64) as f32;
            assert_eq!(at(&y, c, 5, 1, 0), want);
        }
    }

    #[test]
    fn same_seed_same_output() {
        let x = sample();
        let cfg = AugmentConfig::default();
        let a = augment(&x, SHAPE, &cfg, &mut ChaCha8Rng::seed_from_u64(42));
        let b = augment(&x, SHAPE, &cfg, &mut ChaCha8Rng::seed_from_u64(42));
        let c = augment(&x, SHAPE, &cfg, &mut ChaCha8Rng::seed_from_u64(43));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn validate_rejects_data_without_2_or_3_coordinates() {
        let cfg = AugmentConfig::default();
        assert!(cfg.validate([3, 50, 25, 2]).is_ok());
        assert!(cfg.validate([2, 50, 25, 2]).is_ok());
        let e = cfg.validate([4, 50, 25, 2]).unwrap_err().to_string();
        assert!(e.contains("C = 4"), "{e}");
        // Without shear any C is fine.
        let crop_only = AugmentConfig {
            shear_amplitude: -1.0,
            temporal_padding_ratio: 6,
            ..AugmentConfig::default()
        };
        assert!(crop_only.validate([2, 50, 25, 2]).is_ok());
    }

    #[test]
    fn shear_on_2d_data_uses_the_xy_block() {
        let shape = [2, 4, 3, 1];
        let x: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        let cfg = AugmentConfig {
            temporal_padding_ratio: 0,
            ..AugmentConfig::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let draw = AugmentDraw::sample(4, &cfg, &mut rng.clone());
        let s = draw.shear.unwrap();
        let y = augment(&x, shape, &cfg, &mut rng);
        let plane = 12;
        for k in 0..plane {
            let (px, py) = (x[k] as f64, x[plane + k] as f64);
            assert_eq!(y[k], (s[0][0] * px + s[0][1] * py) as f32);
            assert_eq!(y[plane + k], (s[1][0] * px + s[1][1] * py) as f32);
        }
    }

    #[test]
    fn short_sequences_have_no_padding() {
        // T = 5 < ratio 6: P = 0, the crop keeps the sequence (as numpy's start = randint(0, 1)).
        let shape = [3, 5, 2, 1];
        let x: Vec<f32> = (0..30).map(|i| i as f32).collect();
        let cfg = AugmentConfig {
            shear_amplitude: -1.0,
            temporal_padding_ratio: 6,
            ..AugmentConfig::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..10 {
            assert_eq!(augment(&x, shape, &cfg, &mut rng), x);
        }
    }

    #[test]
    fn padded_index_map() {
        // T = 6, P = 2: padded = [x1, x0, x0..x5, x5, x4].
        let src: Vec<usize> = (0..10).map(|j| padded_to_source(j, 2, 6)).collect();
        assert_eq!(src, vec![1, 0, 0, 1, 2, 3, 4, 5, 5, 4]);
    }

    #[test]
    fn extras_off_leave_the_official_stream_and_result_unchanged() {
        let x = sample();
        let official = AugmentConfig::default();
        let mut r1 = ChaCha8Rng::seed_from_u64(11);
        let mut r2 = ChaCha8Rng::seed_from_u64(11);
        let a = augment(&x, SHAPE, &official, &mut r1);
        let b = augment(&x, SHAPE, &AugmentConfig { ..official }, &mut r2);
        assert_eq!(a, b);
        assert_eq!(r1.gen::<u64>(), r2.gen::<u64>());
    }

    #[test]
    fn yaw_rotates_about_y_only() {
        let x = sample();
        let yaw = AugmentConfig {
            yaw_degrees: 90.0,
            ..AugmentConfig::none()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let y = augment(&x, SHAPE, &yaw, &mut rng);
        let [_, t, v, m] = SHAPE;
        let mut moved = false;
        for f in 0..t {
            for j in 0..v {
                for b in 0..m {
                    // y untouched, the horizontal length kept.
                    assert_eq!(at(&x, 1, f, j, b), at(&y, 1, f, j, b));
                    let h0 = at(&x, 0, f, j, b).hypot(at(&x, 2, f, j, b));
                    let h1 = at(&y, 0, f, j, b).hypot(at(&y, 2, f, j, b));
                    assert!((h0 - h1).abs() < 1e-4 * h0.max(1.0), "{h0} vs {h1}");
                    moved |= (at(&x, 0, f, j, b) - at(&y, 0, f, j, b)).abs() > 1e-3;
                }
            }
        }
        assert!(moved, "a draw of +-90 degrees moves x");
    }

    #[test]
    fn rotation_keeps_lengths_and_masks_zero_what_they_say() {
        let x = sample();
        let none = AugmentConfig::none();
        let rot = AugmentConfig {
            rotation_degrees: 30.0,
            ..none
        };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let y = augment(&x, SHAPE, &rot, &mut rng);
        let [_, t, v, m] = SHAPE;
        for f in 0..t {
            for j in 0..v {
                for b in 0..m {
                    let n0: f32 = (0..3).map(|c| at(&x, c, f, j, b).powi(2)).sum();
                    let n1: f32 = (0..3).map(|c| at(&y, c, f, j, b).powi(2)).sum();
                    assert!((n0 - n1).abs() < 1e-3 * n0.max(1.0), "{n0} vs {n1}");
                }
            }
        }
        assert_ne!(x, y);
        let masked = AugmentConfig {
            joint_mask: 0.5,
            axis_mask: 1.0,
            ..none
        };
        let y = augment(&x, SHAPE, &masked, &mut rng);
        let zero_axes = (0..3)
            .filter(|&c| (0..t).all(|f| (0..v).all(|j| (0..m).all(|b| at(&y, c, f, j, b) == 0.0))))
            .count();
        assert_eq!(zero_axes, 1);
        let zero_joints = (0..v)
            .filter(|&j| (0..3).all(|c| (0..t).all(|f| (0..m).all(|b| at(&y, c, f, j, b) == 0.0))))
            .count();
        assert_eq!(zero_joints, v / 2);
    }

    #[test]
    fn noise_spares_absent_bodies_and_crop_resize_of_one_is_identity() {
        let [c, t, v, m] = SHAPE;
        let mut x = sample();
        // Body 1 absent.
        for ch in 0..c {
            for f in 0..t {
                for j in 0..v {
                    x[((ch * t + f) * v + j) * m + 1] = 0.0;
                }
            }
        }
        let none = AugmentConfig::none();
        let noisy = AugmentConfig {
            gaussian_noise: 0.1,
            ..none
        };
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let y = augment(&x, SHAPE, &noisy, &mut rng);
        for ch in 0..c {
            for f in 0..t {
                for j in 0..v {
                    assert_eq!(at(&y, ch, f, j, 1), 0.0);
                }
            }
        }
        assert_ne!(x, y);
        let resize = AugmentConfig {
            crop_resize: 1.0,
            ..none
        };
        assert_eq!(augment(&x, SHAPE, &resize, &mut rng), x);
        let blur = AugmentConfig {
            gaussian_blur: 1.0,
            ..none
        };
        let y = augment(&x, SHAPE, &blur, &mut rng);
        assert!(y.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn bone_length_scales_each_bone_and_keeps_the_centre() {
        use crate::data::layout::Layout;
        let layout = Layout::ntu25();
        let tree = BoneTree::new(25, &layout.edges, layout.center);
        assert_eq!(tree.order.len(), 25);
        assert_eq!(tree.order[0], layout.center);
        // Parents come before their children.
        for (i, &j) in tree.order.iter().enumerate() {
            let p = tree.parent[j];
            assert!(j == layout.center || tree.order[..i].contains(&p));
        }
        let shape = [3, 4, 25, 2];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut x: Vec<f32> = (0..3 * 4 * 25 * 2)
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        // Body 1 absent.
        let idx = |ch: usize, f: usize, j: usize, b: usize| ((ch * 4 + f) * 25 + j) * 2 + b;
        for ch in 0..3 {
            for f in 0..4 {
                for j in 0..25 {
                    x[idx(ch, f, j, 1)] = 0.0;
                }
            }
        }
        let mut same = x.clone();
        apply_bone_length(&mut same, shape, &tree, 0.0, &mut rng.clone());
        assert_eq!(same, x);
        let mut y = x.clone();
        apply_bone_length(&mut y, shape, &tree, 0.3, &mut rng);
        let bone = |d: &[f32], f: usize, j: usize| -> [f32; 3] {
            let p = tree.parent[j];
            [0, 1, 2].map(|ch| d[idx(ch, f, j, 0)] - d[idx(ch, f, p, 0)])
        };
        for j in 0..25 {
            if j == layout.center {
                for ch in 0..3 {
                    assert_eq!(y[idx(ch, 0, j, 0)], x[idx(ch, 0, j, 0)]);
                }
                continue;
            }
            // One factor per bone, the same in every frame, in [0.7, 1.3]; direction kept.
            let k0 = bone(&y, 0, j)[0] / bone(&x, 0, j)[0];
            assert!((0.7..=1.3).contains(&k0), "{k0}");
            for f in 0..4 {
                let (a, b) = (bone(&x, f, j), bone(&y, f, j));
                for ch in 0..3 {
                    assert!((b[ch] - k0 * a[ch]).abs() < 1e-4, "joint {j} frame {f}");
                }
            }
        }
        assert!(
            (0..3 * 4 * 25).all(|i| y[2 * i + 1] == 0.0),
            "absent body stays zero"
        );
    }
}
