//! Skeleton layouts as data: joints, edges, centre joint, bone parents, shoulders.
//!
//! Built in: `ntu25` (NTU RGB+D, Kinect v2), `kinect20` (Kinect v1 SDK order), `msr20` (MSR Action3D
//! order), `pku25` (PKU-MMD: the NTU order under its own name), and the 2D pose-estimator layouts
//! `coco17` (COCO keypoints, pyskl's `coco` graph) and `openpose18` (OpenPose COCO-18, ST-GCN's
//! `openpose` graph). A layout does not fix the coordinate count: 2D data (C = 2, or 3 with a
//! keypoint-score channel) use the same layout type; the y-rotation of `prepare` only runs on 3D data. Any other layout loads from a TOML or YAML file (see [`LayoutFile`]). Joint indices are
//! 0-based in memory; files use 1-based indices unless `index_base = 0`.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How the ST-GCN spatial partition is built from this layout (see `model::graph`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PartitionKind {
    /// The official `spatial` strategy with `max_hop = 1`, quirk included (what CrosSCLR trains with).
    #[default]
    OfficialSpatial,
    /// The spatial strategy with true hop distances to the centre (the "clean" alternative).
    TrueDistanceSpatial,
}

/// A skeleton layout. All indices are 0-based.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Layout {
    pub name: String,
    /// One name per joint; its length is the joint count V.
    pub joint_names: Vec<String>,
    /// Undirected edges (no self-loops), as in the official graph code's `neighbor_link`.
    pub edges: Vec<(usize, usize)>,
    /// Centre joint of the spatial partition and origin of the 50-frame preprocessing.
    pub center: usize,
    /// Bone view: bone of joint v = `x[v] - x[bone_parent[v]]` (parent == v gives a zero bone).
    pub bone_parent: Vec<usize>,
    /// (left, right) shoulder joints for the y-rotation of the preprocessing.
    pub shoulders: (usize, usize),
    /// Joint whose non-zero frames define a sequence's length in preprocessing (NTU: spine base).
    pub length_joint: usize,
    pub partition: PartitionKind,
}

const NTU25_NAMES: [&str; 25] = [
    "spine_base",
    "spine_mid",
    "neck",
    "head",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "left_hand",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "right_hand",
    "left_hip",
    "left_knee",
    "left_ankle",
    "left_foot",
    "right_hip",
    "right_knee",
    "right_ankle",
    "right_foot",
    "spine_shoulder",
    "left_hand_tip",
    "left_thumb",
    "right_hand_tip",
    "right_thumb",
];
/// Official `ntu-rgb+d` neighbour links, 1-based (graph.py / data-formats.md 1a).
const NTU25_EDGES: [(usize, usize); 24] = [
    (1, 2),
    (2, 21),
    (3, 21),
    (4, 3),
    (5, 21),
    (6, 5),
    (7, 6),
    (8, 7),
    (9, 21),
    (10, 9),
    (11, 10),
    (12, 11),
    (13, 1),
    (14, 13),
    (15, 14),
    (16, 15),
    (17, 1),
    (18, 17),
    (19, 18),
    (20, 19),
    (22, 23),
    (23, 8),
    (24, 25),
    (25, 12),
];
/// CrosSCLR bone list p(v) for v = 1..25, 1-based (joint 21 is its own parent: zero bone).
const NTU25_BONE_PARENT: [usize; 25] = [
    2, 21, 21, 3, 21, 5, 6, 7, 21, 9, 10, 11, 1, 13, 14, 15, 1, 17, 18, 19, 21, 23, 8, 25, 12,
];

const KINECT20_NAMES: [&str; 20] = [
    "hip_center",
    "spine",
    "shoulder_center",
    "head",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "left_hand",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "right_hand",
    "left_hip",
    "left_knee",
    "left_ankle",
    "left_foot",
    "right_hip",
    "right_knee",
    "right_ankle",
    "right_foot",
];
const KINECT20_EDGES: [(usize, usize); 19] = [
    (1, 2),
    (2, 3),
    (3, 4),
    (3, 5),
    (5, 6),
    (6, 7),
    (7, 8),
    (3, 9),
    (9, 10),
    (10, 11),
    (11, 12),
    (1, 13),
    (13, 14),
    (14, 15),
    (15, 16),
    (1, 17),
    (17, 18),
    (18, 19),
    (19, 20),
];

/// MSR Action3D joint order (1-based): 7 = hip centre, 3 = shoulder centre, 20 = head.
const MSR20_NAMES: [&str; 20] = [
    "left_shoulder",
    "right_shoulder",
    "shoulder_center",
    "spine",
    "left_hip",
    "right_hip",
    "hip_center",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hand",
    "right_hand",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
    "left_foot",
    "right_foot",
    "head",
];
/// Edges of MSR's `drawskt.m`, 1-based.
const MSR20_EDGES: [(usize, usize); 19] = [
    (20, 3),
    (1, 3),
    (2, 3),
    (1, 8),
    (8, 10),
    (10, 12),
    (2, 9),
    (9, 11),
    (11, 13),
    (3, 4),
    (4, 7),
    (7, 5),
    (7, 6),
    (5, 14),
    (6, 15),
    (14, 16),
    (15, 17),
    (16, 18),
    (17, 19),
];

/// COCO-17 keypoints (pyskl / mmpose order, 0-based in this list).
const COCO17_NAMES: [&str; 17] = [
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
];
/// pyskl's `coco` graph `inward` edges, 0-based (centre 0 = nose).
const COCO17_EDGES: [(usize, usize); 16] = [
    (15, 13),
    (13, 11),
    (16, 14),
    (14, 12),
    (11, 5),
    (12, 6),
    (9, 7),
    (7, 5),
    (10, 8),
    (8, 6),
    (5, 0),
    (6, 0),
    (1, 0),
    (3, 1),
    (2, 0),
    (4, 2),
];

/// OpenPose COCO-18 keypoints (ST-GCN's Kinetics-skeleton order, 0-based in this list).
const OPENPOSE18_NAMES: [&str; 18] = [
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
];
/// ST-GCN's `openpose` graph `neighbor_link`, 0-based (centre 1 = neck).
const OPENPOSE18_EDGES: [(usize, usize); 17] = [
    (4, 3),
    (3, 2),
    (7, 6),
    (6, 5),
    (13, 12),
    (12, 11),
    (10, 9),
    (9, 8),
    (11, 5),
    (8, 2),
    (5, 1),
    (2, 1),
    (0, 1),
    (15, 0),
    (14, 0),
    (17, 15),
    (16, 14),
];

fn zero_based(edges: &[(usize, usize)]) -> Vec<(usize, usize)> {
    edges.iter().map(|&(a, b)| (a - 1, b - 1)).collect()
}

impl Layout {
    /// Number of joints V.
    pub fn num_joints(&self) -> usize {
        self.joint_names.len()
    }

    /// NTU RGB+D 25 joints, official edges and CrosSCLR bone list.
    pub fn ntu25() -> Self {
        Layout {
            name: "ntu25".into(),
            joint_names: NTU25_NAMES.iter().map(|s| s.to_string()).collect(),
            edges: zero_based(&NTU25_EDGES),
            center: 20,
            bone_parent: NTU25_BONE_PARENT.iter().map(|p| p - 1).collect(),
            shoulders: (4, 8),
            length_joint: 0,
            partition: PartitionKind::OfficialSpatial,
        }
    }

    /// Kinect v1 (20 joints, SDK order); centre = shoulder centre.
    pub fn kinect20() -> Self {
        let edges = zero_based(&KINECT20_EDGES);
        let bone_parent = parents_towards(20, &edges, 2);
        Layout {
            name: "kinect20".into(),
            joint_names: KINECT20_NAMES.iter().map(|s| s.to_string()).collect(),
            edges,
            center: 2,
            bone_parent,
            shoulders: (4, 8),
            length_joint: 0,
            partition: PartitionKind::OfficialSpatial,
        }
    }

    /// MSR Action3D (20 joints, MSR order); centre = shoulder centre (joint 3).
    pub fn msr20() -> Self {
        let edges = zero_based(&MSR20_EDGES);
        let bone_parent = parents_towards(20, &edges, 2);
        Layout {
            name: "msr20".into(),
            joint_names: MSR20_NAMES.iter().map(|s| s.to_string()).collect(),
            edges,
            center: 2,
            bone_parent,
            shoulders: (0, 1),
            length_joint: 6,
            partition: PartitionKind::OfficialSpatial,
        }
    }

    /// PKU-MMD (Kinect v2, 25 joints in the NTU order): [`Layout::ntu25`] under the name `pku25`.
    pub fn pku25() -> Self {
        Layout {
            name: "pku25".into(),
            ..Self::ntu25()
        }
    }

    /// COCO-17 keypoints (2D pose estimators, pyskl): pyskl's `coco` graph, centre = nose (0),
    /// shoulders 5 / 6, bones towards the nose, length joint = nose.
    pub fn coco17() -> Self {
        let edges = COCO17_EDGES.to_vec();
        let bone_parent = parents_towards(17, &edges, 0);
        Layout {
            name: "coco17".into(),
            joint_names: COCO17_NAMES.iter().map(|s| s.to_string()).collect(),
            edges,
            center: 0,
            bone_parent,
            shoulders: (5, 6),
            length_joint: 0,
            partition: PartitionKind::OfficialSpatial,
        }
    }

    /// OpenPose COCO-18 (ST-GCN's Kinetics-skeleton): ST-GCN's `openpose` graph, centre = neck (1),
    /// shoulders 5 (left) / 2 (right), bones towards the neck, length joint = neck.
    pub fn openpose18() -> Self {
        let edges = OPENPOSE18_EDGES.to_vec();
        let bone_parent = parents_towards(18, &edges, 1);
        Layout {
            name: "openpose18".into(),
            joint_names: OPENPOSE18_NAMES.iter().map(|s| s.to_string()).collect(),
            edges,
            center: 1,
            bone_parent,
            shoulders: (5, 2),
            length_joint: 1,
            partition: PartitionKind::OfficialSpatial,
        }
    }

    /// Every built-in layout.
    pub fn builtins() -> Vec<Self> {
        vec![
            Self::ntu25(),
            Self::kinect20(),
            Self::msr20(),
            Self::pku25(),
            Self::coco17(),
            Self::openpose18(),
        ]
    }

    /// A built-in layout by name (`ntu25`/`ntu`/`ntu-rgb+d`, `kinect20`, `msr20`, `pku25`, `coco17`,
    /// `openpose18`), or a layout file.
    pub fn resolve(name_or_path: &str) -> Result<Self> {
        match name_or_path {
            "ntu25" | "ntu" | "ntu-rgb+d" | "ntu60" | "ntu120" => Ok(Self::ntu25()),
            "kinect20" | "kinect-v1" => Ok(Self::kinect20()),
            "msr20" | "msr" | "msr-action3d" => Ok(Self::msr20()),
            "pku25" | "pku-mmd" | "pkummd" => Ok(Self::pku25()),
            "coco17" | "coco" => Ok(Self::coco17()),
            "openpose18" | "openpose" | "kinetics" => Ok(Self::openpose18()),
            other => Self::from_file(Path::new(other)),
        }
    }

    /// Loads a layout from a TOML (`.toml`) or YAML (`.yaml`/`.yml`) file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        crate::data::limits::check_yaml_text(&text, path)?;
        let file: LayoutFile = match path.extension().and_then(|e| e.to_str()) {
            Some("yaml") | Some("yml") => serde_yaml::from_str(&text)
                .map_err(|e| Error::input(path, yaml_place(&e), e.to_string()))?,
            _ => toml::from_str(&text).map_err(|e| Error::input(path, "toml", e.to_string()))?,
        };
        file.into_layout(path)
    }

    /// Checks internal consistency; `source` names the file for errors.
    pub fn validate(&self, source: &Path) -> Result<()> {
        let v = self.num_joints();
        if v == 0 {
            return Err(Error::input(
                source,
                "joints",
                "a layout needs at least one joint",
            ));
        }
        let check = |j: usize, what: &str| -> Result<()> {
            if j >= v {
                Err(Error::input(
                    source,
                    what,
                    format!("unknown joint index {j} (layout has {v} joints)"),
                ))
            } else {
                Ok(())
            }
        };
        for (i, &(a, b)) in self.edges.iter().enumerate() {
            check(a, &format!("edges[{i}]"))?;
            check(b, &format!("edges[{i}]"))?;
        }
        check(self.center, "center")?;
        check(self.shoulders.0, "shoulders")?;
        check(self.shoulders.1, "shoulders")?;
        check(self.length_joint, "length_joint")?;
        if self.bone_parent.len() != v {
            return Err(Error::input(
                source,
                "bone_parents",
                format!("{} entries for {v} joints", self.bone_parent.len()),
            ));
        }
        for (i, &p) in self.bone_parent.iter().enumerate() {
            check(p, &format!("bone_parents[{i}]"))?;
        }
        Ok(())
    }
}

fn yaml_place(e: &serde_yaml::Error) -> String {
    e.location()
        .map(|l| format!("line {}", l.line()))
        .unwrap_or_else(|| "yaml".into())
}

/// For each joint, its neighbour one hop closer to `root` (root maps to itself), by BFS.
pub fn parents_towards(v: usize, edges: &[(usize, usize)], root: usize) -> Vec<usize> {
    let mut parent = vec![usize::MAX; v];
    parent[root] = root;
    let mut frontier = vec![root];
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for &u in &frontier {
            for &(a, b) in edges {
                let w = if a == u {
                    b
                } else if b == u {
                    a
                } else {
                    continue;
                };
                if parent[w] == usize::MAX {
                    parent[w] = u;
                    next.push(w);
                }
            }
        }
        frontier = next;
    }
    // Joints not connected to the root get a zero bone.
    parent
        .iter()
        .enumerate()
        .map(|(i, &p)| if p == usize::MAX { i } else { p })
        .collect()
}

/// On-disk layout description (TOML or YAML). Example (TOML):
/// ```toml
/// name = "my-rig"
/// joints = ["hip", "chest", "head", "l_hand", "r_hand"]
/// edges = [[1, 2], [2, 3], [2, 4], [2, 5]]   # 1-based unless index_base = 0
/// center = 2
/// shoulders = [4, 5]       # (left, right) joints used by the y-rotation
/// # bone_parents = [...]   # optional: default = the neighbour towards `center`
/// # length_joint = 1       # optional: default = first joint
/// # partition = "official_spatial" | "true_distance_spatial"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutFile {
    pub name: String,
    pub joints: Vec<String>,
    pub edges: Vec<[usize; 2]>,
    pub center: usize,
    pub shoulders: [usize; 2],
    #[serde(default)]
    pub bone_parents: Option<Vec<usize>>,
    #[serde(default)]
    pub length_joint: Option<usize>,
    #[serde(default = "one")]
    pub index_base: usize,
    #[serde(default)]
    pub partition: PartitionKind,
}

fn one() -> usize {
    1
}

impl LayoutFile {
    pub fn into_layout(self, source: &Path) -> Result<Layout> {
        if self.index_base > 1 {
            return Err(Error::input(source, "index_base", "must be 0 or 1"));
        }
        let base = self.index_base;
        let v = self.joints.len();
        let idx = |j: usize, what: String| -> Result<usize> {
            if j < base || j - base >= v {
                Err(Error::input(
                    source,
                    what,
                    format!(
                        "unknown joint {j} (joints are numbered {base}..{} here)",
                        v + base - 1
                    ),
                ))
            } else {
                Ok(j - base)
            }
        };
        let mut edges = Vec::with_capacity(self.edges.len());
        for (i, e) in self.edges.iter().enumerate() {
            edges.push((
                idx(e[0], format!("edges[{i}]"))?,
                idx(e[1], format!("edges[{i}]"))?,
            ));
        }
        let center = idx(self.center, "center".into())?;
        let shoulders = (
            idx(self.shoulders[0], "shoulders[0]".into())?,
            idx(self.shoulders[1], "shoulders[1]".into())?,
        );
        let bone_parent = match self.bone_parents {
            Some(p) => {
                if p.len() != v {
                    return Err(Error::input(
                        source,
                        "bone_parents",
                        format!("{} entries for {v} joints", p.len()),
                    ));
                }
                p.iter()
                    .enumerate()
                    .map(|(i, &j)| idx(j, format!("bone_parents[{i}]")))
                    .collect::<Result<Vec<_>>>()?
            }
            None => parents_towards(v, &edges, center),
        };
        let length_joint = match self.length_joint {
            Some(j) => idx(j, "length_joint".into())?,
            None => 0,
        };
        let layout = Layout {
            name: self.name,
            joint_names: self.joints,
            edges,
            center,
            bone_parent,
            shoulders,
            length_joint,
            partition: self.partition,
        };
        layout.validate(source)?;
        Ok(layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_consistent() {
        for l in Layout::builtins() {
            l.validate(Path::new("<builtin>")).unwrap();
            assert_eq!(l.edges.len(), l.num_joints() - 1, "{} is a tree", l.name);
        }
        let ntu = Layout::ntu25();
        assert_eq!(ntu.bone_parent[20], 20);
        assert_eq!(ntu.bone_parent[0], 1);
        let coco = Layout::coco17();
        assert_eq!(
            (coco.num_joints(), coco.center, coco.shoulders),
            (17, 0, (5, 6))
        );
        // left ankle -> left knee -> left hip -> left shoulder -> nose
        assert_eq!(coco.bone_parent[15], 13);
        assert_eq!(coco.bone_parent[11], 5);
        assert_eq!(coco.bone_parent[0], 0);
        let op = Layout::openpose18();
        assert_eq!((op.num_joints(), op.center, op.shoulders), (18, 1, (5, 2)));
        assert_eq!(op.bone_parent[4], 3);
        assert_eq!(op.bone_parent[1], 1);
        let pku = Layout::pku25();
        assert_eq!(pku.name, "pku25");
        assert_eq!(pku.edges, ntu.edges);
        for name in ["coco17", "openpose18", "pku25"] {
            assert_eq!(Layout::resolve(name).unwrap().name, name);
        }
    }

    #[test]
    fn file_layout_rejects_unknown_joint() {
        let f = LayoutFile {
            name: "x".into(),
            joints: vec!["a".into(), "b".into()],
            edges: vec![[1, 3]],
            center: 1,
            shoulders: [1, 2],
            bone_parents: None,
            length_joint: None,
            index_base: 1,
            partition: PartitionKind::OfficialSpatial,
        };
        let e = f
            .into_layout(Path::new("rig.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rig.toml") && e.contains("edges[0]") && e.contains("unknown joint 3"),
            "{e}"
        );
    }
}
