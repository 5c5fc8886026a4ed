//! Procedural, licence-free synthetic skeleton action dataset, deterministic from a seed.
//!
//! Every sample is built by forward kinematics over the layout's joint tree: a rest pose (from the
//! joint names for `ntu25` / `kinect20` / `msr20`, or a generic fan-shaped pose for any other
//! layout) is scaled per subject (body height and limb proportions), posed per frame by local bone
//! rotations that depend on the action, placed in the world (two-person actions add a partner
//! facing the performer), seen from a random camera (yaw around y, small tilt, distance,
//! translation), corrupted by Gaussian sensor noise and finally preprocessed in the official
//! 50-frame style ([`preprocess::center_on_joint`] on `layout.center` and the per-frame
//! [`preprocess::rotate_y`] on `layout.shoulders`; no time resize, the frames are generated at
//! the target length). Output convention: float32
//! `N x 3 x T x V x M`, y up, metres; a single-person sample has an all-zero second body.
//!
//! The classes come in pairs that use the **same set of poses** but differ in temporal order:
//! one class of a pair is the time reversal of the other (fast rise / slow fall vs slow rise /
//! fast fall, clockwise vs counter-clockwise circles). With a random cycle phase, speed and
//! amplitude drawn from the same distributions for both classes, a single static frame cannot
//! tell the two classes of a pair apart; only the motion can.
use crate::data::dataset::{F32Buf, SkeletonDataset};
use crate::data::layout::{parents_towards, Layout};
use crate::data::preprocess;
use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use serde::Serialize;
use std::f64::consts::PI;
use std::path::{Path, PathBuf};

/// Generation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// Number of classes, `2..=MAX_CLASSES`, taken in catalogue order ([`ACTIONS`]).
    pub num_classes: usize,
    pub train_per_class: usize,
    pub val_per_class: usize,
    /// Frames per sample T.
    pub frames: usize,
    /// Bodies per sample M (1 or 2; two-person classes need 2 to show the partner).
    pub max_bodies: usize,
    pub layout: Layout,
    pub seed: u64,
    /// Standard deviation of the per-coordinate sensor noise, metres.
    pub noise: f32,
    /// Apply the per-frame rotation about y that puts the shoulders on +x (the official 50-frame
    /// preprocessing). Off: the camera's viewpoint (three yaws, -45 / 0 / +45 degrees, +- 10) stays
    /// in the data, as in a cross-view setting without view normalisation.
    pub view_normalize: bool,
}

impl Default for SynthConfig {
    /// Demo size: 12 classes x (40 train, 20 val), 50 frames, ntu25, 2 bodies, 1 cm noise.
    fn default() -> Self {
        SynthConfig {
            num_classes: 12,
            train_per_class: 40,
            val_per_class: 20,
            frames: 50,
            max_bodies: 2,
            layout: Layout::ntu25(),
            seed: 0,
            noise: 0.01,
            view_normalize: true,
        }
    }
}

/// How an action's pose parameter evolves over one cycle `u in [0, 1)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Tempo {
    /// Profile rising 0 -> 1 during the first `rise` of the cycle, then falling back to 0 (smoothed).
    /// `rise` and `1 - rise` are time reversals of each other.
    Profile { rise: f64 },
    /// A full turn per cycle; `direction` +1 or -1 (reversal).
    Circle { direction: f64 },
}

/// Which body parts move and how (the pose as a function of the tempo value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Motion {
    /// Right arm raised sideways (up to about 150 degrees).
    RaiseArm,
    /// Both straight arms swing in full circles in the sagittal plane.
    ArmCircles,
    /// Squat: hips and knees bend, torso leans forward, arms go forward.
    Squat,
    /// Right leg kicks forward, knee bending through the kick.
    Kick,
    /// Both arms thrust forward from bent elbows (two-person: the partner reaches back).
    Push,
    /// Torso bows forward from the hips.
    Bow,
    /// Arms and legs abduct with a small hop.
    JumpingJack,
    /// Right forearm draws circles in front of the body.
    HandCircle,
}

/// One class of the catalogue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Action {
    pub name: &'static str,
    pub motion: Motion,
    pub tempo: Tempo,
    /// Body 1 (a partner) is present.
    pub two_person: bool,
}

/// Rise fraction of the "fast" half of a profile pair (the other class uses `1 - FAST_RISE`).
const FAST_RISE: f64 = 0.25;

const fn profile(name: &'static str, motion: Motion, rise: f64, two_person: bool) -> Action {
    Action {
        name,
        motion,
        tempo: Tempo::Profile { rise },
        two_person,
    }
}
const fn circle(name: &'static str, motion: Motion, direction: f64) -> Action {
    Action {
        name,
        motion,
        tempo: Tempo::Circle { direction },
        two_person: false,
    }
}

/// The class catalogue, in pairs (2k, 2k+1) that are time reversals of each other.
pub const ACTIONS: [Action; 16] = [
    profile(
        "raise_right_arm_fast_lower_slow",
        Motion::RaiseArm,
        FAST_RISE,
        false,
    ),
    profile(
        "raise_right_arm_slow_lower_fast",
        Motion::RaiseArm,
        1.0 - FAST_RISE,
        false,
    ),
    circle("arm_circles_forward", Motion::ArmCircles, 1.0),
    circle("arm_circles_backward", Motion::ArmCircles, -1.0),
    profile("squat_down_fast_up_slow", Motion::Squat, FAST_RISE, false),
    profile(
        "squat_down_slow_up_fast",
        Motion::Squat,
        1.0 - FAST_RISE,
        false,
    ),
    profile("kick_fast_return_slow", Motion::Kick, FAST_RISE, false),
    profile(
        "kick_slow_return_fast",
        Motion::Kick,
        1.0 - FAST_RISE,
        false,
    ),
    profile("push_partner", Motion::Push, FAST_RISE, true),
    profile("reach_to_partner", Motion::Push, 1.0 - FAST_RISE, true),
    profile("bow_down_fast_up_slow", Motion::Bow, FAST_RISE, false),
    profile("bow_down_slow_up_fast", Motion::Bow, 1.0 - FAST_RISE, false),
    profile(
        "jumping_jack_open_fast",
        Motion::JumpingJack,
        FAST_RISE,
        false,
    ),
    profile(
        "jumping_jack_open_slow",
        Motion::JumpingJack,
        1.0 - FAST_RISE,
        false,
    ),
    circle("hand_circles_clockwise", Motion::HandCircle, 1.0),
    circle("hand_circles_counterclockwise", Motion::HandCircle, -1.0),
];

/// Largest supported class count.
pub const MAX_CLASSES: usize = ACTIONS.len();

/// Names of the first `num_classes` classes.
pub fn class_names(num_classes: usize) -> Vec<String> {
    ACTIONS
        .iter()
        .take(num_classes)
        .map(|a| a.name.to_string())
        .collect()
}

/// The class that is the time reversal of `class` (same poses, other order), if generated.
pub fn paired_class(class: usize, num_classes: usize) -> Option<usize> {
    let other = class ^ 1;
    (class < num_classes && other < num_classes).then_some(other)
}

/// Whether `class` has a partner body.
pub fn is_two_person(class: usize) -> bool {
    ACTIONS.get(class).map(|a| a.two_person).unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// Small 3-D maths (f64).

type Vec3 = [f64; 3];
type Mat3 = [[f64; 3]; 3];

const IDENTITY: Mat3 = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];

fn mat_mul(a: &Mat3, b: &Mat3) -> Mat3 {
    let mut m = [[0.0; 3]; 3];
    for (i, row) in m.iter_mut().enumerate() {
        for (j, e) in row.iter_mut().enumerate() {
            *e = a[i][0] * b[0][j] + a[i][1] * b[1][j] + a[i][2] * b[2][j];
        }
    }
    m
}

fn mat_vec(a: &Mat3, v: &Vec3) -> Vec3 {
    [
        a[0][0] * v[0] + a[0][1] * v[1] + a[0][2] * v[2],
        a[1][0] * v[0] + a[1][1] * v[1] + a[1][2] * v[2],
        a[2][0] * v[0] + a[2][1] * v[1] + a[2][2] * v[2],
    ]
}

fn add(a: &Vec3, b: &Vec3) -> Vec3 {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

fn sub(a: &Vec3, b: &Vec3) -> Vec3 {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn rot_x(a: f64) -> Mat3 {
    let (s, c) = a.sin_cos();
    [[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]]
}

fn rot_y(a: f64) -> Mat3 {
    let (s, c) = a.sin_cos();
    [[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]
}

fn rot_z(a: f64) -> Mat3 {
    let (s, c) = a.sin_cos();
    [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
}

fn deg(d: f64) -> f64 {
    d * PI / 180.0
}

// ---------------------------------------------------------------------------------------------
// The rig: a layout turned into a kinematic tree with a rest pose and named roles.

/// Bone groups scaled together per subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Torso,
    Arm,
    Leg,
}

/// Bones (named by their child joint) that the motions rotate. `None` = not in this layout.
#[derive(Debug, Clone, Default)]
struct Roles {
    left_upper_arm: Option<usize>,
    left_forearm: Option<usize>,
    right_upper_arm: Option<usize>,
    right_forearm: Option<usize>,
    left_thigh: Option<usize>,
    left_shank: Option<usize>,
    right_thigh: Option<usize>,
    right_shank: Option<usize>,
    /// Bones whose rotation bends the upper body forward (the lower spine).
    spine: Vec<usize>,
}

/// A layout as a kinematic tree: the subject faces -z, its right side is +x, y is up, the floor
/// is y = 0.
#[derive(Debug, Clone)]
struct Rig {
    root: usize,
    /// Kinematic parent of each joint (the root is its own parent).
    parent: Vec<usize>,
    /// Joints in breadth-first order from the root (parents before children).
    order: Vec<usize>,
    /// Rest positions (metres).
    rest: Vec<Vec3>,
    group: Vec<Group>,
    roles: Roles,
    /// Joints that touch the floor (feet / lowest leaves).
    floor: Vec<usize>,
}

/// Rest position of a joint of the built-in layouts, by name (standing, arms hanging).
fn named_rest(name: &str) -> Option<Vec3> {
    let side = if name.starts_with("left_") {
        -1.0
    } else if name.starts_with("right_") {
        1.0
    } else {
        0.0
    };
    let part = name
        .trim_start_matches("left_")
        .trim_start_matches("right_");
    let (x, y, z) = match part {
        "spine_base" | "hip_center" => (0.0, 1.00, 0.0),
        "spine_mid" | "spine" => (0.0, 1.22, 0.0),
        "spine_shoulder" | "shoulder_center" => (0.0, 1.45, 0.0),
        "neck" => (0.0, 1.53, 0.0),
        "head" => (0.0, 1.66, -0.01),
        "shoulder" => (0.18, 1.43, 0.0),
        "elbow" => (0.22, 1.16, 0.01),
        "wrist" => (0.24, 0.92, 0.0),
        "hand" => (0.25, 0.85, -0.01),
        "hand_tip" => (0.25, 0.77, -0.02),
        "thumb" => (0.22, 0.84, -0.04),
        "hip" => (0.09, 0.97, 0.0),
        "knee" => (0.10, 0.54, -0.01),
        "ankle" => (0.10, 0.10, 0.02),
        "foot" => (0.10, 0.04, -0.09),
        _ => return None,
    };
    if side == 0.0 && x != 0.0 {
        return None; // a lateral part needs a side
    }
    Some([side * x, y, z])
}

fn named_group(name: &str) -> Group {
    let arm = ["elbow", "wrist", "hand", "thumb"];
    let leg = ["knee", "ankle", "foot"];
    if arm.iter().any(|p| name.contains(p)) {
        Group::Arm
    } else if leg.iter().any(|p| name.contains(p)) {
        Group::Leg
    } else {
        Group::Torso
    }
}

/// Breadth-first order of the tree `parent` from `root`; unreachable joints are appended.
fn bfs_order(parent: &[usize], root: usize) -> Vec<usize> {
    let v = parent.len();
    let mut order = vec![root];
    let mut seen = vec![false; v];
    seen[root] = true;
    let mut i = 0;
    while i < order.len() {
        let u = order[i];
        for c in 0..v {
            if !seen[c] && parent[c] == u && c != u {
                seen[c] = true;
                order.push(c);
            }
        }
        i += 1;
    }
    order.extend((0..v).filter(|&c| !seen[c]));
    order
}

impl Rig {
    fn new(layout: &Layout) -> Rig {
        let find = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| layout.joint_names.iter().position(|j| j == n))
        };
        let named: Option<Vec<Vec3>> = layout.joint_names.iter().map(|n| named_rest(n)).collect();
        match named {
            Some(rest) => {
                let root = find(&["spine_base", "hip_center"]).unwrap_or(layout.center);
                let parent = parents_towards(layout.num_joints(), &layout.edges, root);
                let order = bfs_order(&parent, root);
                let group = layout.joint_names.iter().map(|n| named_group(n)).collect();
                let roles = Roles {
                    left_upper_arm: find(&["left_elbow"]),
                    left_forearm: find(&["left_wrist"]),
                    right_upper_arm: find(&["right_elbow"]),
                    right_forearm: find(&["right_wrist"]),
                    left_thigh: find(&["left_knee"]),
                    left_shank: find(&["left_ankle"]),
                    right_thigh: find(&["right_knee"]),
                    right_shank: find(&["right_ankle"]),
                    spine: find(&["spine_mid", "spine"]).into_iter().collect(),
                };
                let floor = ["left_ankle", "right_ankle", "left_foot", "right_foot"]
                    .iter()
                    .filter_map(|n| find(&[n]))
                    .collect();
                Rig {
                    root,
                    parent,
                    order,
                    rest,
                    group,
                    roles,
                    floor,
                }
            }
            None => Rig::generic(layout),
        }
    }

    /// A rig for an unknown layout: the tree from `layout.center` fanned out in the x-y plane;
    /// leaves above the root act as arms, leaves below as legs.
    fn generic(layout: &Layout) -> Rig {
        /// Length of every generic bone, metres.
        const BONE: f64 = 0.2;
        /// Height of the generic root above the floor, metres.
        const ROOT_HEIGHT: f64 = 1.0;
        let v = layout.num_joints();
        let root = layout.center;
        let parent = parents_towards(v, &layout.edges, root);
        let order = bfs_order(&parent, root);
        let children = |u: usize| -> Vec<usize> {
            order
                .iter()
                .copied()
                .filter(|&c| c != u && parent[c] == u)
                .collect()
        };
        // Direction of each joint's bone (angle from +y in the x-y plane).
        let mut angle = vec![0.0f64; v];
        let mut rest = vec![[0.0, ROOT_HEIGHT, 0.0]; v];
        for &u in &order {
            let kids = children(u);
            let k = kids.len();
            for (i, &c) in kids.iter().enumerate() {
                angle[c] = if u == root {
                    // Fan the root's children over -150..150 degrees from straight up.
                    if k == 1 {
                        0.0
                    } else {
                        deg(-150.0 + 300.0 * i as f64 / (k - 1) as f64)
                    }
                } else {
                    // Continue the parent's direction, siblings spread by 25 degrees.
                    angle[u] + deg(25.0) * (i as f64 - (k as f64 - 1.0) / 2.0)
                };
                let p = rest[u];
                rest[c] = [
                    p[0] + BONE * angle[c].sin(),
                    p[1] + BONE * angle[c].cos(),
                    p[2],
                ];
            }
        }
        let min_y = rest.iter().map(|p| p[1]).fold(f64::INFINITY, f64::min);
        for p in rest.iter_mut() {
            p[1] -= min_y - 0.05; // lowest joint 5 cm above the floor
        }
        // Limbs: for each leaf, the first joint after the last branching node on its path.
        let leaves: Vec<usize> = (0..v)
            .filter(|&c| c != root && children(c).is_empty())
            .collect();
        let limb = |leaf: usize| -> (usize, Option<usize>) {
            let mut path = vec![leaf];
            let mut u = leaf;
            while parent[u] != u {
                u = parent[u];
                path.push(u);
            }
            path.reverse(); // root .. leaf
            let branch = path
                .iter()
                .rposition(|&j| j != leaf && (j == root || children(j).len() > 1))
                .unwrap_or(0);
            let proximal = path[(branch + 1).min(path.len() - 1)];
            let distal = path.get(branch + 2).copied();
            (proximal, distal)
        };
        let root_y = rest[root][1];
        let mut upper: Vec<usize> = leaves
            .iter()
            .copied()
            .filter(|&l| rest[l][1] >= root_y)
            .collect();
        let mut lower: Vec<usize> = leaves
            .iter()
            .copied()
            .filter(|&l| rest[l][1] < root_y)
            .collect();
        upper.sort_by(|a, b| rest[*a][0].total_cmp(&rest[*b][0]));
        lower.sort_by(|a, b| rest[*a][0].total_cmp(&rest[*b][0]));
        // The rightmost upper / lower leaf plays the right arm / leg (one-sided actions use the
        // right side); the leftmost plays the left one if it is another leaf.
        let mut roles = Roles::default();
        if let (Some(&l), Some(&r)) = (upper.first(), upper.last()) {
            let (rp, rd) = limb(r);
            roles.right_upper_arm = Some(rp);
            roles.right_forearm = rd;
            if r != l {
                let (lp, ld) = limb(l);
                roles.left_upper_arm = Some(lp);
                roles.left_forearm = ld;
            }
        }
        if let (Some(&l), Some(&r)) = (lower.first(), lower.last()) {
            let (rp, rd) = limb(r);
            roles.right_thigh = Some(rp);
            roles.right_shank = rd;
            if r != l {
                let (lp, ld) = limb(l);
                roles.left_thigh = Some(lp);
                roles.left_shank = ld;
            }
        }
        // The upper body: the root's children that point upwards.
        roles.spine = order
            .iter()
            .copied()
            .filter(|&c| c != root && parent[c] == root && rest[c][1] > rest[root][1])
            .collect();
        Rig {
            root,
            parent,
            order,
            rest,
            group: vec![Group::Torso; v],
            roles,
            floor: lower,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Subjects, cameras, poses.

/// Body proportions of one subject.
#[derive(Debug, Clone, Copy)]
struct Subject {
    height: f64,
    torso: f64,
    arm: f64,
    leg: f64,
}

/// Subjects in the pool; even ids perform in the training split, odd ids in validation.
const SUBJECTS: u64 = 40;

impl Subject {
    fn new(seed: u64, id: u64) -> Subject {
        let mut rng = ChaCha8Rng::from_seed(key(seed, SUBJECT_DOMAIN, id));
        Subject {
            height: rng.gen_range(0.88..1.12),
            torso: rng.gen_range(0.93..1.07),
            arm: rng.gen_range(0.92..1.08),
            leg: rng.gen_range(0.93..1.07),
        }
    }

    fn scale(&self, g: Group) -> f64 {
        self.height
            * match g {
                Group::Torso => self.torso,
                Group::Arm => self.arm,
                Group::Leg => self.leg,
            }
    }
}

/// Camera viewpoints: yaw of the three base cameras (like NTU's -45, 0, +45 degrees).
const CAMERA_YAWS_DEG: [f64; 3] = [-45.0, 0.0, 45.0];

/// World-to-camera transform.
#[derive(Debug, Clone, Copy)]
struct Camera {
    index: usize,
    rotation: Mat3,
    translation: Vec3,
}

impl Camera {
    fn sample(rng: &mut impl Rng) -> Camera {
        let index = rng.gen_range(0..CAMERA_YAWS_DEG.len());
        let yaw = deg(CAMERA_YAWS_DEG[index] + rng.gen_range(-10.0..10.0));
        let tilt = deg(rng.gen_range(-8.0..8.0));
        let distance = rng.gen_range(2.5..3.5);
        let height = rng.gen_range(0.8..1.2);
        let translation = [rng.gen_range(-0.4..0.4), -height, distance];
        Camera {
            index,
            rotation: mat_mul(&rot_x(tilt), &rot_y(yaw)),
            translation,
        }
    }

    fn apply(&self, p: &Vec3) -> Vec3 {
        add(&mat_vec(&self.rotation, p), &self.translation)
    }
}

/// Per-sample motion parameters; both classes of a pair draw them from the same distribution.
#[derive(Debug, Clone, Copy)]
struct Performance {
    /// Cycle phase at frame 0, in [0, 1).
    phase: f64,
    /// Cycles over the whole sequence (speed).
    cycles: f64,
    /// Amplitude factor.
    amplitude: f64,
}

impl Performance {
    fn sample(rng: &mut impl Rng) -> Performance {
        Performance {
            phase: rng.gen_range(0.0..1.0),
            cycles: rng.gen_range(1.0..2.0),
            amplitude: rng.gen_range(0.75..1.0),
        }
    }

    /// Position in the cycle of frame `t` of `frames`.
    fn cycle_position(&self, t: usize, frames: usize) -> f64 {
        (self.phase + self.cycles * t as f64 / frames as f64).rem_euclid(1.0)
    }
}

/// The tempo value at cycle position `u`: a profile value in [0, 1] or an angle in radians.
fn tempo_value(tempo: Tempo, u: f64) -> f64 {
    match tempo {
        Tempo::Profile { rise } => {
            let f = if u < rise {
                u / rise
            } else {
                (1.0 - u) / (1.0 - rise)
            };
            f * f * (3.0 - 2.0 * f) // smoothstep: no velocity jumps at the turning points
        }
        Tempo::Circle { direction } => direction * 2.0 * PI * u,
    }
}

/// Composes `r` into the local rotation of bone `j` (if the layout has it).
fn set(rot: &mut [Mat3], j: Option<usize>, r: Mat3) {
    if let Some(j) = j {
        rot[j] = mat_mul(&rot[j], &r);
    }
}

/// Composes `r` into the local rotations of all bones `js`.
fn set_all(rot: &mut [Mat3], js: &[usize], r: Mat3) {
    for &j in js {
        rot[j] = mat_mul(&rot[j], &r);
    }
}

/// Local bone rotations (`rot`, identity-initialised) and extra root lift for `motion` at tempo
/// value `s` with amplitude factor `amp`.
fn pose(motion: Motion, s: f64, amp: f64, roles: &Roles, rot: &mut [Mat3]) -> f64 {
    let mut lift = 0.0;
    match motion {
        Motion::RaiseArm => {
            set(rot, roles.right_upper_arm, rot_z(deg(150.0) * amp * s));
            set(rot, roles.right_forearm, rot_z(deg(20.0) * s));
        }
        Motion::ArmCircles => {
            // s is an angle; a slight abduction keeps the arms clear of the body.
            set(
                rot,
                roles.right_upper_arm,
                mat_mul(&rot_z(deg(12.0) * amp), &rot_x(s)),
            );
            set(
                rot,
                roles.left_upper_arm,
                mat_mul(&rot_z(-deg(12.0) * amp), &rot_x(s)),
            );
        }
        Motion::Squat => {
            let a = amp * s;
            set_all(rot, &roles.spine, rot_x(-deg(30.0) * a));
            set(rot, roles.left_thigh, rot_x(deg(100.0) * a));
            set(rot, roles.right_thigh, rot_x(deg(100.0) * a));
            set(rot, roles.left_shank, rot_x(-deg(110.0) * a));
            set(rot, roles.right_shank, rot_x(-deg(110.0) * a));
            set(rot, roles.left_upper_arm, rot_x(deg(80.0) * a));
            set(rot, roles.right_upper_arm, rot_x(deg(80.0) * a));
        }
        Motion::Kick => {
            set(rot, roles.right_thigh, rot_x(deg(80.0) * amp * s));
            set(rot, roles.right_shank, rot_x(-deg(60.0) * (PI * s).sin()));
            set(rot, roles.left_upper_arm, rot_x(deg(25.0) * s));
            set(rot, roles.right_upper_arm, rot_x(-deg(15.0) * s));
        }
        Motion::Push => {
            let upper = rot_x(deg(30.0) + deg(55.0) * amp * s);
            let fore = rot_x(deg(100.0) * (1.0 - s));
            set(rot, roles.left_upper_arm, upper);
            set(rot, roles.right_upper_arm, upper);
            set(rot, roles.left_forearm, fore);
            set(rot, roles.right_forearm, fore);
            set_all(rot, &roles.spine, rot_x(-deg(10.0) * s));
        }
        Motion::Bow => {
            set_all(rot, &roles.spine, rot_x(-deg(70.0) * amp * s));
        }
        Motion::JumpingJack => {
            let a = amp * s;
            set(rot, roles.right_upper_arm, rot_z(deg(150.0) * a));
            set(rot, roles.left_upper_arm, rot_z(-deg(150.0) * a));
            set(rot, roles.right_thigh, rot_z(deg(18.0) * a));
            set(rot, roles.left_thigh, rot_z(-deg(18.0) * a));
            set(rot, roles.right_shank, rot_z(-deg(18.0) * a));
            set(rot, roles.left_shank, rot_z(deg(18.0) * a));
            lift = 0.08 * amp * (PI * s).sin(); // the hop, metres
        }
        Motion::HandCircle => {
            set(rot, roles.right_upper_arm, rot_x(deg(60.0)));
            let r = deg(35.0) * amp;
            set(
                rot,
                roles.right_forearm,
                mat_mul(&rot_x(deg(40.0) + r * s.sin()), &rot_z(r * s.cos())),
            );
        }
    }
    lift
}

/// Forward kinematics of one body: joint positions (world, metres) for local rotations `rot`.
fn forward_kinematics(rig: &Rig, subject: &Subject, rot: &[Mat3], lift: f64, out: &mut [Vec3]) {
    let v = rig.rest.len();
    let mut global = vec![IDENTITY; v];
    let root_rest = rig.rest[rig.root];
    out[rig.root] = [
        root_rest[0],
        root_rest[1] * subject.scale(Group::Leg),
        root_rest[2],
    ];
    global[rig.root] = rot[rig.root];
    for &c in &rig.order {
        let p = rig.parent[c];
        if p == c {
            if c != rig.root {
                // Not connected to the root: keep its rest offset from the root.
                let off = sub(&rig.rest[c], &root_rest);
                out[c] = add(&out[rig.root], &off);
            }
            continue;
        }
        global[c] = mat_mul(&global[p], &rot[c]);
        let offset = sub(&rig.rest[c], &rig.rest[p]);
        let scaled = offset.map(|e| e * subject.scale(rig.group[c]));
        out[c] = add(&out[p], &mat_vec(&global[c], &scaled));
    }
    // Keep the lowest floor joint at its rest height, then add the hop.
    if !rig.floor.is_empty() {
        let rest_min = rig
            .floor
            .iter()
            .map(|&j| rig.rest[j][1])
            .fold(f64::INFINITY, f64::min);
        let now_min = rig
            .floor
            .iter()
            .map(|&j| out[j][1])
            .fold(f64::INFINITY, f64::min);
        let dy = rest_min * subject.height - now_min + lift;
        for p in out.iter_mut() {
            p[1] += dy;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Seeds.

const SAMPLE_DOMAIN: u64 = 0x5359_4e54_4853_4d50; // "SYNTHSMP"
const SUBJECT_DOMAIN: u64 = 0x5359_4e54_4853_554a; // "SYNTHSUJ"

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A ChaCha key from `(seed, domain, index)`.
fn key(seed: u64, domain: u64, index: u64) -> [u8; 32] {
    let mut k = [0u8; 32];
    let mut s = splitmix64(seed ^ splitmix64(domain ^ splitmix64(index)));
    for chunk in k.chunks_exact_mut(8) {
        s = splitmix64(s);
        chunk.copy_from_slice(&s.to_le_bytes());
    }
    k
}

// ---------------------------------------------------------------------------------------------
// Generation.

/// Checks the settings.
pub fn validate(cfg: &SynthConfig) -> Result<()> {
    if cfg.num_classes < 2 || cfg.num_classes > MAX_CLASSES {
        return Err(Error::config(format!(
            "synthetic classes must be 2..={MAX_CLASSES}, got {}",
            cfg.num_classes
        )));
    }
    if cfg.frames < 2 {
        return Err(Error::config(format!(
            "frames must be at least 2, got {}",
            cfg.frames
        )));
    }
    if !(1..=2).contains(&cfg.max_bodies) {
        return Err(Error::config(format!(
            "bodies must be 1 or 2, got {}",
            cfg.max_bodies
        )));
    }
    if !(cfg.noise.is_finite() && cfg.noise >= 0.0) {
        return Err(Error::config(format!(
            "noise must be >= 0, got {}",
            cfg.noise
        )));
    }
    if cfg.train_per_class == 0 && cfg.val_per_class == 0 {
        return Err(Error::config(
            "no samples requested (train and val per class are 0)",
        ));
    }
    cfg.layout.validate(Path::new("<synth layout>"))
}

/// Generates (train, val). Panics on an invalid config (see [`validate`], [`try_generate`]).
pub fn generate(cfg: &SynthConfig) -> (SkeletonDataset, SkeletonDataset) {
    try_generate(cfg).unwrap_or_else(|e| panic!("invalid synth config: {e}"))
}

/// Generates (train, val) after checking the config.
pub fn try_generate(cfg: &SynthConfig) -> Result<(SkeletonDataset, SkeletonDataset)> {
    validate(cfg)?;
    let rig = Rig::new(&cfg.layout);
    Ok((split(cfg, &rig, Split::Train), split(cfg, &rig, Split::Val)))
}

/// The demo dataset: 12 classes x (40 train, 20 val), 50 frames, ntu25, 2 bodies.
pub fn demo_dataset(seed: u64) -> (SkeletonDataset, SkeletonDataset) {
    generate(&SynthConfig {
        seed,
        ..SynthConfig::default()
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    Train,
    Val,
}

fn split(cfg: &SynthConfig, rig: &Rig, part: Split) -> SkeletonDataset {
    let per_class = match part {
        Split::Train => cfg.train_per_class,
        Split::Val => cfg.val_per_class,
    };
    let k = cfg.num_classes;
    let n = per_class * k;
    let (t, v, m) = (cfg.frames, cfg.layout.num_joints(), cfg.max_bodies);
    let sample_len = 3 * t * v * m;
    let mut data = vec![0.0f32; n * sample_len];
    // Sample i = repetition i / K of class i % K (classes interleaved, like NTU's name order).
    let names: Vec<String> = data
        .par_chunks_mut(sample_len.max(1))
        .enumerate()
        .map(|(i, out)| {
            let (rep, class) = (i / k, i % k);
            let index = (i as u64) << 1 | (part == Split::Val) as u64;
            let mut rng = ChaCha8Rng::from_seed(key(cfg.seed, SAMPLE_DOMAIN, index));
            sample(cfg, rig, part, class, rep, &mut rng, out)
        })
        .collect();
    let labels = (0..n).map(|i| (i % k) as i64).collect();
    let part_name = match part {
        Split::Train => "train",
        Split::Val => "val",
    };
    SkeletonDataset {
        data: F32Buf::Owned(data),
        shape: [n, 3, t, v, m],
        labels,
        names,
        num_classes: k,
        layout: cfg.layout.clone(),
        source: PathBuf::from(format!("<synthetic {part_name}, seed {}>", cfg.seed)),
    }
}

/// Writes one sample (`3 x T x V x M`) into `out`; returns its name.
fn sample(
    cfg: &SynthConfig,
    rig: &Rig,
    part: Split,
    class: usize,
    rep: usize,
    rng: &mut ChaCha8Rng,
    out: &mut [f32],
) -> String {
    let action = ACTIONS[class];
    let (t_len, v, m) = (cfg.frames, cfg.layout.num_joints(), cfg.max_bodies);
    // Cross-subject split: even subject ids train, odd ids validate.
    let parity = (part == Split::Val) as u64;
    let subject_id = 2 * rng.gen_range(0..SUBJECTS / 2) + parity;
    let subject = Subject::new(cfg.seed, subject_id);
    let camera = Camera::sample(rng);
    let perf = Performance::sample(rng);
    // Performer placement (world): small offset and facing jitter.
    let facing0 = rot_y(deg(rng.gen_range(-10.0..10.0)));
    let offset0 = [rng.gen_range(-0.2..0.2), 0.0, rng.gen_range(-0.2..0.2)];
    let partner = (action.two_person && m > 1).then(|| {
        let id = 2 * rng.gen_range(0..SUBJECTS / 2) + parity;
        let distance = rng.gen_range(0.8..1.1);
        let facing = rot_y(PI + deg(rng.gen_range(-10.0..10.0)));
        let amp = rng.gen_range(0.3..0.5);
        (
            Subject::new(cfg.seed, id),
            facing,
            [offset0[0], 0.0, offset0[2] - distance],
            amp,
        )
    });
    let noise = Normal::new(0.0, cfg.noise as f64).expect("noise validated");

    let mut rot = vec![IDENTITY; v];
    let mut joints = vec![[0.0; 3]; v];
    let bodies = if partner.is_some() { 2 } else { 1 };
    for body in 0..bodies {
        for t in 0..t_len {
            let u = perf.cycle_position(t, t_len);
            let s = tempo_value(action.tempo, u);
            rot.iter_mut().for_each(|r| *r = IDENTITY);
            let (subj, facing, offset, amp) = match (&partner, body) {
                (Some(p), 1) => (p.0, p.1, p.2, perf.amplitude * p.3),
                _ => (subject, facing0, offset0, perf.amplitude),
            };
            let lift = pose(action.motion, s, amp, &rig.roles, &mut rot);
            forward_kinematics(rig, &subj, &rot, lift, &mut joints);
            for (j, p) in joints.iter().enumerate() {
                let world = add(&mat_vec(&facing, p), &offset);
                let cam = camera.apply(&world);
                for (c, value) in cam.iter().enumerate() {
                    let noisy = value + noise.sample(rng);
                    out[((c * t_len + t) * v + j) * m + body] = noisy as f32;
                }
            }
        }
    }
    // The official 50-frame preprocessing style: per-frame centring on the centre joint, then the
    // per-frame rotation about y that puts each body's shoulder vector on +x.
    let shape = [3, t_len, v, m];
    preprocess::center_on_joint(out, shape, cfg.layout.center);
    if cfg.view_normalize {
        preprocess::rotate_y(out, shape, cfg.layout.shoulders);
    }
    format!(
        "S001C{:03}P{:03}R{:03}A{:03}",
        camera.index + 1,
        subject_id + 1,
        rep + 1,
        class + 1
    )
}

// ---------------------------------------------------------------------------------------------
// Writing.

/// `layout.toml` contents for a non-built-in layout (the [`crate::data::layout::LayoutFile`]
/// format, 1-based).
#[derive(Serialize)]
struct LayoutToml<'a> {
    name: &'a str,
    joints: &'a [String],
    edges: Vec<[usize; 2]>,
    center: usize,
    shoulders: [usize; 2],
    bone_parents: Vec<usize>,
    length_joint: usize,
    partition: crate::data::layout::PartitionKind,
}

fn is_builtin(layout: &Layout) -> bool {
    Layout::builtins().iter().any(|b| b == layout)
}

/// Writes `train_data.npy`, `train_label.pkl`, `val_data.npy`, `val_label.pkl` (generic format),
/// `classes.txt` (one class name per line), `dataset.toml` (layout name, shapes, class count)
/// and, for a non-built-in layout, `layout.toml`. Every file is written atomically.
pub fn write(out_dir: &Path, train: &SkeletonDataset, val: &SkeletonDataset) -> Result<()> {
    use crate::data::{npy, pickle};
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    for (part, ds) in [("train", train), ("val", val)] {
        npy::write_f32(
            &out_dir.join(format!("{part}_data.npy")),
            &ds.shape,
            ds.data.as_slice(),
        )?;
        pickle::write_labels(
            &out_dir.join(format!("{part}_label.pkl")),
            &ds.names,
            &ds.labels,
        )?;
    }
    let num_classes = train.num_classes.max(val.num_classes);
    let mut classes = class_names(num_classes).join("\n");
    classes.push('\n');
    npy::write_atomic(&out_dir.join("classes.txt"), classes.as_bytes())?;
    let layout = &train.layout;
    let builtin = is_builtin(layout);
    let layout_ref = if builtin {
        layout.name.clone()
    } else {
        "layout.toml".to_string()
    };
    if !builtin {
        let one = |j: usize| j + 1;
        let file = LayoutToml {
            name: &layout.name,
            joints: &layout.joint_names,
            edges: layout
                .edges
                .iter()
                .map(|&(a, b)| [one(a), one(b)])
                .collect(),
            center: one(layout.center),
            shoulders: [one(layout.shoulders.0), one(layout.shoulders.1)],
            bone_parents: layout.bone_parent.iter().map(|&p| one(p)).collect(),
            length_joint: one(layout.length_joint),
            partition: layout.partition,
        };
        let text = toml::to_string(&file).map_err(|e| Error::Other(format!("layout.toml: {e}")))?;
        npy::write_atomic(&out_dir.join("layout.toml"), text.as_bytes())?;
    }
    let info = format!(
        "# Procedurally generated synthetic skeleton actions (crossclr synth).\n\
         # Data: float32 N x C x T x V x M, y up, metres, centred per frame on joint {center}, shoulders rotated onto +x.\n\
         layout = \"{layout_ref}\"\n\
         num_classes = {num_classes}\n\
         train_shape = {train_shape:?}\n\
         val_shape = {val_shape:?}\n\
         source = \"{source}\"\n",
        center = layout.center + 1,
        train_shape = train.shape,
        val_shape = val.shape,
        source = train.source.display().to_string().replace('"', "'"),
    );
    npy::write_atomic(&out_dir.join("dataset.toml"), info.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(layout: Layout) -> SynthConfig {
        SynthConfig {
            num_classes: 12,
            train_per_class: 2,
            val_per_class: 1,
            frames: 20,
            max_bodies: 2,
            layout,
            seed: 5,
            noise: 0.0,
            view_normalize: true,
        }
    }

    #[test]
    fn view_normalization_puts_the_shoulders_on_x_and_can_be_left_out() {
        let layout = Layout::ntu25();
        let (l, r) = layout.shoulders;
        // Largest |z| of the shoulder vector over the first body's frames of every sample.
        let worst_z = |cfg: &SynthConfig| {
            let (train, _) = generate(cfg);
            let [n, _, t, v, m] = train.shape;
            let data = train.data.as_slice();
            let mut worst = 0.0f32;
            for i in 0..n {
                for f in 0..t {
                    let at = |c: usize, j: usize| data[(((i * 3 + c) * t + f) * v + j) * m];
                    worst = worst.max((at(2, r) - at(2, l)).abs());
                }
            }
            worst
        };
        let normalised = small(layout.clone());
        assert!(worst_z(&normalised) < 1e-2, "{}", worst_z(&normalised));
        let raw = SynthConfig {
            view_normalize: false,
            ..normalised
        };
        // Cameras at -45 / 0 / +45 degrees: shoulders ~0.35 m apart leave z spans of ~0.25 m.
        assert!(worst_z(&raw) > 0.1, "{}", worst_z(&raw));
    }

    #[test]
    fn rest_pose_is_plausible() {
        let rig = Rig::new(&Layout::ntu25());
        assert_eq!(rig.root, 0);
        assert!(rig.roles.left_upper_arm.is_some() && rig.roles.spine == vec![1]);
        // Zero rotation reproduces the rest pose (unit subject).
        let unit = Subject {
            height: 1.0,
            torso: 1.0,
            arm: 1.0,
            leg: 1.0,
        };
        let mut out = vec![[0.0; 3]; 25];
        forward_kinematics(&rig, &unit, &vec![IDENTITY; 25], 0.0, &mut out);
        for (a, b) in out.iter().zip(&rig.rest) {
            for c in 0..3 {
                assert!((a[c] - b[c]).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn raise_arm_moves_the_right_hand_up() {
        let rig = Rig::new(&Layout::ntu25());
        let unit = Subject {
            height: 1.0,
            torso: 1.0,
            arm: 1.0,
            leg: 1.0,
        };
        let mut rot = vec![IDENTITY; 25];
        pose(Motion::RaiseArm, 1.0, 1.0, &rig.roles, &mut rot);
        let mut out = vec![[0.0; 3]; 25];
        forward_kinematics(&rig, &unit, &rot, 0.0, &mut out);
        let right_hand = 11;
        let head = 3;
        assert!(
            out[right_hand][1] > out[head][1] - 0.1,
            "hand raised: {:?}",
            out[right_hand]
        );
        assert!(out[7][1] < 1.0, "left hand still down");
    }

    #[test]
    fn every_layout_generates_finite_data() {
        let custom = crate::data::layout::LayoutFile {
            name: "star".into(),
            joints: (0..7).map(|i| format!("j{i}")).collect(),
            edges: vec![[1, 2], [2, 3], [1, 4], [4, 5], [1, 6], [6, 7]],
            center: 1,
            shoulders: [3, 5],
            bone_parents: None,
            length_joint: None,
            index_base: 1,
            partition: Default::default(),
        }
        .into_layout(Path::new("<test>"))
        .unwrap();
        for layout in [Layout::ntu25(), Layout::kinect20(), Layout::msr20(), custom] {
            let name = layout.name.clone();
            let center = layout.center;
            let (train, val) = generate(&small(layout));
            assert_eq!(train.shape[0], 24, "{name}");
            assert_eq!(val.shape[0], 12, "{name}");
            assert!(train.data.as_slice().iter().all(|x| x.is_finite()));
            // Centre joint is exactly 0 after centring.
            let [_, _, t, v, m] = train.shape;
            for i in 0..train.len() {
                let s = train.sample(i);
                for c in 0..3 {
                    for f in 0..t {
                        assert_eq!(s[((c * t + f) * v + center) * m], 0.0, "{name}");
                    }
                }
            }
            // Frames move (the data is not static).
            let s = train.sample(0);
            let d: f32 = (0..v * m)
                .map(|k| (s[k] - s[(t - 1) * v * m + k]).abs())
                .sum();
            assert!(d > 0.0, "{name}");
        }
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let mut cfg = SynthConfig {
            num_classes: 17,
            ..SynthConfig::default()
        };
        assert!(try_generate(&cfg).is_err());
        cfg.num_classes = 12;
        cfg.max_bodies = 3;
        assert!(try_generate(&cfg).is_err());
        cfg.max_bodies = 1;
        cfg.noise = -1.0;
        assert!(try_generate(&cfg).is_err());
    }
}
