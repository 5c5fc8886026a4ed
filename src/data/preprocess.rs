//! The official 50-frame preprocessing (reference doc 1.4; `feeder/preprocess_ntu.py` with
//! `NTUMotionProcessor(data_type='relative', t_length=50, y_rotation=True, sampling='resize')`),
//! generic over the [`Layout`] (centre joint, shoulders, length joint) and the output length.
//!
//! For one sample `x` of shape `(C, T, V, M)` (float32):
//! 1. `L` = number of frames `t` with `sum_c |x[c, t, length_joint, 0]| != 0` (a count, not the last
//!    valid frame index).
//! 2. Centring: `x[:, t, v, m] -= x[:, t, center, m]` for every frame and body (float32).
//! 3. For each body, frames `[0, L)` are resized to `out_frames` rows with OpenCV's `INTER_LINEAR`
//!    rule (see [`resize_rows`] and [`ResizeRule`]: by default the arithmetic of the IPP path that
//!    the `opencv-python` wheels take, bit-exact to cv2).
//! 4. For each body, per-frame rotation about y putting the shoulder vector on +x, with one global
//!    sign per body (see [`rotate_y`]); needs C = 3.
//!
//! The float32/float64 mix follows what numpy does in the official code: the angles are computed in
//! float32 (`vec`, its norm, `arccos`, degree conversions, `cos`/`sin`), the rotation product in
//! float64 (`np.dot` of a float64 matrix with float32 points), stored back as float32.
use crate::data::layout::Layout;

/// Added to the shoulder-vector norm before dividing (official `l2_norm + 0.0001`).
const NORM_EPS: f32 = 1e-4;

/// Index of element `(c, t, v, m)` in a C-order `(C, T, V, M)` array.
#[inline]
fn idx(t_len: usize, v_len: usize, m_len: usize, c: usize, t: usize, v: usize, m: usize) -> usize {
    ((c * t_len + t) * v_len + v) * m_len + m
}

/// Step 1: frames where body 0's `joint` is non-zero (`(abs(x[:, :, joint, 0]).sum(0) != 0).sum()`).
/// `x` is `(C, T, V, M)`.
pub fn sequence_length(x: &[f32], shape: [usize; 4], joint: usize) -> usize {
    let [c_len, t_len, v_len, m_len] = shape;
    (0..t_len)
        .filter(|&t| {
            // float32 sum of |x| over channels, as numpy does (order c = 0, 1, 2).
            let s: f32 = (0..c_len)
                .map(|c| x[idx(t_len, v_len, m_len, c, t, joint, 0)].abs())
                .sum();
            s != 0.0
        })
        .count()
}

/// Step 2: subtracts joint `center` of the same frame and body from every joint, in place.
/// `x` is `(C, T, V, M)`.
pub fn center_on_joint(x: &mut [f32], shape: [usize; 4], center: usize) {
    let [c_len, t_len, v_len, m_len] = shape;
    for c in 0..c_len {
        for t in 0..t_len {
            let row = &mut x[idx(t_len, v_len, m_len, c, t, 0, 0)..][..v_len * m_len];
            for m in 0..m_len {
                let origin = row[center * m_len + m];
                for v in 0..v_len {
                    row[v * m_len + m] -= origin;
                }
            }
        }
    }
}

/// Which arithmetic of OpenCV's `cv::resize(..., INTER_LINEAR)` on float32 images to reproduce.
/// Both use the half-pixel mapping `s = (t + 0.5) * L / out - 0.5`, `i0 = floor(s)`, rows
/// `clamp(i0)` and `clamp(i0 + 1)` in `[0, L-1]` (so `s < 0` gives row 0 and `i0 >= L-1` row `L-1`),
/// no anti-aliasing; they differ in the last bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResizeRule {
    /// The Intel IPP path that the `opencv-python` wheels take on x86-64 by default (checked
    /// bit-exact against cv2 4.10 and 4.14): `s` in double, `w = (float)(s - i0)`,
    /// `out = fma(x[r1] - x[r0], w, x[r0])` in float32.
    #[default]
    OpencvIpp,
    /// OpenCV's own code (`cv2.ipp.setUseIPP(False)`; reference doc 1.4): `scale = 1 / (out / L)`,
    /// `s = (float)((t + 0.5) * scale - 0.5)`, `w = s - i0` in float,
    /// `out = x[r0] * (1 - w) + x[r1] * w` in float32 (no fused multiply-add).
    OpencvGeneric,
}

/// OpenCV `INTER_LINEAR` source rows and weight for resizing `src_len` rows to `dst_len` under
/// `rule` (the vertical pass; the horizontal pass is the identity when the width is unchanged).
/// Returns `(row0, row1, w)` per output row; see [`ResizeRule`] for how `w` is applied.
pub fn linear_taps(src_len: usize, dst_len: usize, rule: ResizeRule) -> Vec<(usize, usize, f32)> {
    let last = src_len as i64 - 1;
    (0..dst_len)
        .map(|t| {
            let (i0, w) = match rule {
                ResizeRule::OpencvIpp => {
                    let s = (t as f64 + 0.5) * (src_len as f64 / dst_len as f64) - 0.5;
                    let i0 = s.floor();
                    (i0 as i64, (s - i0) as f32)
                }
                ResizeRule::OpencvGeneric => {
                    let scale = 1.0 / (dst_len as f64 / src_len as f64);
                    let s = ((t as f64 + 0.5) * scale - 0.5) as f32;
                    let i0 = s.floor();
                    (i0 as i64, s - i0)
                }
            };
            (
                i0.clamp(0, last) as usize,
                (i0 + 1).clamp(0, last) as usize,
                w,
            )
        })
        .collect()
}

/// Step 3: resizes frames `[0, length)` of `x` `(C, T, V, M)` to `out_frames` frames, each body
/// separately, returning `(C, out_frames, V, M)` computed with `rule`. `length == out_frames` copies
/// (OpenCV returns a copy for an unchanged size); `length == 0` gives zeros (cv2 would fail).
pub fn resize_rows(
    x: &[f32],
    shape: [usize; 4],
    length: usize,
    out_frames: usize,
    rule: ResizeRule,
) -> Vec<f32> {
    let [c_len, t_len, v_len, m_len] = shape;
    let mut out = vec![0f32; c_len * out_frames * v_len * m_len];
    let length = length.min(t_len);
    if length == 0 {
        return out;
    }
    let row = v_len * m_len;
    if length == out_frames {
        for c in 0..c_len {
            out[c * out_frames * row..][..out_frames * row]
                .copy_from_slice(&x[c * t_len * row..][..out_frames * row]);
        }
        return out;
    }
    let taps = linear_taps(length, out_frames, rule);
    for c in 0..c_len {
        for (t, &(r0, r1, w)) in taps.iter().enumerate() {
            let a = &x[(c * t_len + r0) * row..][..row];
            let b = &x[(c * t_len + r1) * row..][..row];
            let o = &mut out[(c * out_frames + t) * row..][..row];
            match rule {
                ResizeRule::OpencvIpp => {
                    for i in 0..row {
                        o[i] = (b[i] - a[i]).mul_add(w, a[i]);
                    }
                }
                ResizeRule::OpencvGeneric => {
                    let w0 = 1.0 - w;
                    for i in 0..row {
                        o[i] = a[i] * w0 + b[i] * w;
                    }
                }
            }
        }
    }
    out
}

/// numpy's pairwise float32 summation (`np.sum` of a contiguous float32 vector), so the sign test
/// of [`rotate_y`] agrees with the official code even when the sum is close to zero.
pub fn numpy_sum_f32(a: &[f32]) -> f32 {
    /// numpy's `PW_BLOCKSIZE`.
    const BLOCK: usize = 128;
    let n = a.len();
    if n < 8 {
        a.iter().fold(0.0f32, |r, &x| r + x)
    } else if n <= BLOCK {
        let mut r = [0f32; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[i..] {
            res += x;
        }
        res
    } else {
        let n2 = n / 2;
        let n2 = n2 - n2 % 8;
        numpy_sum_f32(&a[..n2]) + numpy_sum_f32(&a[n2..])
    }
}

/// Step 4 (`parallel_skeleton` for each body): with `v_t = x[:, t, right] - x[:, t, left]`, `v_t.y = 0`,
/// `theta_t = arccos(v_t.x / (|v_t| + 1e-4))`, negated for all frames when `sum_t v_t.z >= 0`, every
/// joint of frame `t` becomes `R_y(theta_t) p` with `R_y = [[cos, 0, -sin], [0, 1, 0], [sin, 0, cos]]`.
/// `x` is `(3, T, V, M)`, changed in place. All-zero frames stay zero.
pub fn rotate_y(x: &mut [f32], shape: [usize; 4], shoulders: (usize, usize)) {
    let [c_len, t_len, v_len, m_len] = shape;
    assert_eq!(c_len, 3, "the y-rotation needs xyz coordinates");
    let (left, right) = shoulders;
    let rad_to_deg = (180.0 / std::f64::consts::PI) as f32;
    let pi = std::f64::consts::PI as f32;
    let mut vx = vec![0f32; t_len];
    let mut vz = vec![0f32; t_len];
    for m in 0..m_len {
        let at = |c: usize, t: usize, v: usize| idx(t_len, v_len, m_len, c, t, v, m);
        for t in 0..t_len {
            vx[t] = x[at(0, t, right)] - x[at(0, t, left)];
            vz[t] = x[at(2, t, right)] - x[at(2, t, left)];
        }
        let flip = numpy_sum_f32(&vz) >= 0.0;
        for t in 0..t_len {
            // np.sum(np.square(vec), axis=0) over (x, 0, z) in float32.
            let norm = ((vx[t] * vx[t] + 0.0) + vz[t] * vz[t]).sqrt();
            let cos_arg = vx[t] / (norm + NORM_EPS);
            let mut deg = cos_arg.acos() * rad_to_deg;
            if flip {
                deg = -deg;
            }
            let rad = deg * pi / 180.0;
            let (s, c) = (rad.sin() as f64, rad.cos() as f64);
            for v in 0..v_len {
                let px = x[at(0, t, v)] as f64;
                let pz = x[at(2, t, v)] as f64;
                x[at(0, t, v)] = (c * px + -s * pz) as f32;
                x[at(2, t, v)] = (s * px + c * pz) as f32;
            }
        }
    }
}

/// The whole official preprocessing of one sample `x` `(3, T, V, M)` -> `(3, out_frames, V, M)`,
/// with the default [`ResizeRule`]. Returns the output and the sequence length `L` used (0 gives
/// an all-zero output).
pub fn preprocess_sample(
    x: &[f32],
    shape: [usize; 4],
    layout: &Layout,
    out_frames: usize,
) -> (Vec<f32>, usize) {
    preprocess_sample_with(x, shape, layout, out_frames, ResizeRule::default())
}

/// [`preprocess_sample`] with an explicit resize arithmetic.
pub fn preprocess_sample_with(
    x: &[f32],
    shape: [usize; 4],
    layout: &Layout,
    out_frames: usize,
    rule: ResizeRule,
) -> (Vec<f32>, usize) {
    let length = sequence_length(x, shape, layout.length_joint);
    let mut centred = x.to_vec();
    center_on_joint(&mut centred, shape, layout.center);
    let mut out = resize_rows(&centred, shape, length, out_frames, rule);
    let out_shape = [shape[0], out_frames, shape[2], shape[3]];
    if length > 0 {
        rotate_y(&mut out, out_shape, layout.shoulders);
    }
    (out, length)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_match_opencv_rule_by_hand() {
        for rule in [ResizeRule::OpencvIpp, ResizeRule::OpencvGeneric] {
            // L = 100 -> 50: s = (t + 0.5) * 2 - 0.5 = 2t + 0.5 -> rows 2t, 2t+1, w = 0.5.
            let taps = linear_taps(100, 50, rule);
            assert_eq!(taps[0], (0, 1, 0.5));
            assert_eq!(taps[49], (98, 99, 0.5));
            // L = 10 -> 50: s = (t + 0.5) * 0.2 - 0.5; t = 0: s = -0.4 -> rows (0, 0).
            let taps = linear_taps(10, 50, rule);
            assert_eq!((taps[0].0, taps[0].1), (0, 0));
            // t = 3: s = 0.2 -> rows 0, 1; w = 0.2.
            assert_eq!((taps[3].0, taps[3].1), (0, 1));
            assert!((taps[3].2 - 0.2).abs() < 1e-6);
            // t = 49: s = 9.4 -> rows 9, clamp(10) = 9.
            assert_eq!((taps[49].0, taps[49].1), (9, 9));
        }
    }

    #[test]
    fn pairwise_sum_orders_like_numpy() {
        let a: Vec<f32> = (0..50).map(|i| i as f32 * 0.1).collect();
        assert!((numpy_sum_f32(&a) - 122.5).abs() < 1e-3);
        assert_eq!(numpy_sum_f32(&[1.0, 2.0]), 3.0);
    }
}
