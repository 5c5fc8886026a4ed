//! Views (streams): joint, motion, bone, bone-motion, generic over the layout.
//!
//! As in the official CrosSCLR model (reference §2) the views are computed from the (augmented)
//! joint tensor `(N, C, T, V, M)`:
//! - joint: `x` itself;
//! - motion: `x[:, :, t+1] - x[:, :, t]`, with a zero last frame;
//! - bone: `x[:, :, :, v] - x[:, :, :, parent(v)]` with `parent = layout.bone_parent`
//!   (a joint that is its own parent, like NTU joint 21, gets a zero bone);
//! - bone-motion: the motion of the bone view (not used by the official code).
//!
//! Every view keeps the shape `(N, C, T, V, M)`, the dtype and the device of its input.
use crate::data::layout::Layout;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use tch::{Kind, Tensor};

/// One input stream of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum View {
    Joint,
    Motion,
    Bone,
    BoneMotion,
}

impl View {
    /// All views, in the order joint, motion, bone, bone-motion.
    pub const ALL: [View; 4] = [View::Joint, View::Motion, View::Bone, View::BoneMotion];

    /// The snake_case name (`joint`, `motion`, `bone`, `bone_motion`).
    pub fn name(&self) -> &'static str {
        match self {
            View::Joint => "joint",
            View::Motion => "motion",
            View::Bone => "bone",
            View::BoneMotion => "bone_motion",
        }
    }
}

impl std::fmt::Display for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for View {
    type Err = Error;
    /// Accepts `joint`, `motion`, `bone`, `bone_motion` (also `bone-motion`).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "joint" => Ok(View::Joint),
            "motion" => Ok(View::Motion),
            "bone" => Ok(View::Bone),
            "bone_motion" | "bone-motion" => Ok(View::BoneMotion),
            other => Err(Error::config(format!(
                "unknown view `{other}` (expected joint, motion, bone or bone_motion)"
            ))),
        }
    }
}

/// Computes `view` of the joint tensor `x` of shape `(N, C, T, V, M)` on any device.
/// Returns a tensor of the same shape, dtype and device. `V` must equal `layout.num_joints()`
/// for the bone views (panics otherwise: a shape mismatch is a programming error).
pub fn apply_view(view: View, x: &Tensor, layout: &Layout) -> Tensor {
    match view {
        View::Joint => x.shallow_clone(),
        View::Motion => motion(x),
        View::Bone => bone(x, layout),
        View::BoneMotion => motion(&bone(x, layout)),
    }
}

/// Temporal difference along dim 2 (T) of `(N, C, T, V, M)`; the last frame is zero.
pub fn motion(x: &Tensor) -> Tensor {
    const TIME_DIM: i64 = 2;
    let t = x.size()[TIME_DIM as usize];
    if t <= 1 {
        return x.zeros_like();
    }
    let diff = x.narrow(TIME_DIM, 1, t - 1) - x.narrow(TIME_DIM, 0, t - 1);
    let last = x.narrow(TIME_DIM, 0, 1).zeros_like();
    Tensor::cat(&[diff, last], TIME_DIM)
}

/// Bone vectors along dim 3 (V) of `(N, C, T, V, M)`: `x[v] - x[layout.bone_parent[v]]`.
pub fn bone(x: &Tensor, layout: &Layout) -> Tensor {
    const JOINT_DIM: i64 = 3;
    let v = x.size()[JOINT_DIM as usize] as usize;
    assert_eq!(
        v,
        layout.num_joints(),
        "bone view: tensor has {v} joints, layout `{}` has {}",
        layout.name,
        layout.num_joints()
    );
    let parents: Vec<i64> = layout.bone_parent.iter().map(|&p| p as i64).collect();
    let index = Tensor::from_slice(&parents).to_device(x.device());
    debug_assert_eq!(index.kind(), Kind::Int64);
    x - x.index_select(JOINT_DIM, &index)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A (N, C, T, V, M) tensor with distinct, non-linear values.
    fn sample(n: i64, t: i64, v: i64, m: i64) -> (Vec<f32>, Tensor) {
        let len = (n * 3 * t * v * m) as usize;
        let data: Vec<f32> = (0..len)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.01)
            .collect();
        let x = Tensor::from_slice(&data).view([n, 3, t, v, m]);
        (data, x)
    }

    #[test]
    fn views_keep_shape_and_parse() {
        let layout = Layout::ntu25();
        let (_, x) = sample(2, 6, 25, 2);
        for view in View::ALL {
            let y = apply_view(view, &x, &layout);
            assert_eq!(y.size(), vec![2, 3, 6, 25, 2], "{view}");
            assert_eq!(view.name().parse::<View>().unwrap(), view);
        }
        assert!("bones".parse::<View>().is_err());
        let json = serde_json::to_string(&View::BoneMotion).unwrap();
        assert_eq!(json, "\"bone_motion\"");
    }

    #[test]
    fn motion_is_difference_with_zero_last_frame() {
        let (data, x) = sample(1, 5, 25, 2);
        let m = apply_view(View::Motion, &x, &Layout::ntu25());
        let idx = |c: usize, t: usize, v: usize, b: usize| ((c * 5 + t) * 25 + v) * 2 + b;
        let out: Vec<f32> = Vec::try_from(m.flatten(0, -1)).unwrap();
        for c in 0..3 {
            for v in 0..25 {
                for b in 0..2 {
                    for t in 0..4 {
                        let want = data[idx(c, t + 1, v, b)] - data[idx(c, t, v, b)];
                        assert!((out[idx(c, t, v, b)] - want).abs() < 1e-6);
                    }
                    assert_eq!(out[idx(c, 4, v, b)], 0.0, "last frame is zero");
                }
            }
        }
    }

    #[test]
    fn bone_matches_hand_computation() {
        let layout = Layout::ntu25();
        let (data, x) = sample(2, 3, 25, 2);
        let b = apply_view(View::Bone, &x, &layout);
        let out: Vec<f32> = Vec::try_from(b.flatten(0, -1)).unwrap();
        let idx = |n: usize, c: usize, t: usize, v: usize, m: usize| {
            (((n * 3 + c) * 3 + t) * 25 + v) * 2 + m
        };
        for n in 0..2 {
            for c in 0..3 {
                for t in 0..3 {
                    for v in 0..25 {
                        for m in 0..2 {
                            let p = layout.bone_parent[v];
                            let want = data[idx(n, c, t, v, m)] - data[idx(n, c, t, p, m)];
                            assert!((out[idx(n, c, t, v, m)] - want).abs() < 1e-6);
                        }
                    }
                    // NTU joint 21 (index 20) is its own parent: a zero bone.
                    assert_eq!(out[idx(n, c, t, 20, 0)], 0.0);
                    assert_eq!(out[idx(n, c, t, 20, 1)], 0.0);
                }
            }
        }
        // Spot check against the 1-based official list: bone of joint 1 = x1 - x2.
        let j1 = data[idx(0, 0, 0, 0, 0)] - data[idx(0, 0, 0, 1, 0)];
        assert!((out[idx(0, 0, 0, 0, 0)] - j1).abs() < 1e-6);
    }

    #[test]
    fn bone_motion_is_motion_of_bone_on_other_layouts() {
        for layout in [Layout::kinect20(), Layout::msr20()] {
            let (_, x) = sample(1, 4, 20, 1);
            let bm = apply_view(View::BoneMotion, &x, &layout);
            let want = motion(&bone(&x, &layout));
            assert!(bm.allclose(&want, 1e-6, 1e-6, false));
            let last = bm.narrow(2, 3, 1);
            assert_eq!(last.abs().sum(Kind::Float).double_value(&[]), 0.0);
            // The centre of these layouts is the root of the bone tree: zero bone.
            let b = apply_view(View::Bone, &x, &layout);
            let centre = b.narrow(3, layout.center as i64, 1);
            assert_eq!(centre.abs().sum(Kind::Float).double_value(&[]), 0.0);
        }
    }
}
