//! NW-UCLA per-sample JSON as distributed with the CTR-GCN code: one file per sample,
//! `{"file_name": "a01_s01_e00_v01", "skeletons": [[[x, y, z] x 20 joints] x T frames],
//! "label": 1}` (labels 1-based in the files, 0-based in the output). Split: that code's
//! cross-view protocol, read from the `vXX` suffix of the name: views 1 and 2 train, view 3 test
//! (`--split-file` overrides it). One body; joints in the Kinect v1 order (layout `kinect20`).
use crate::data::generic::{Entry, GenericConfig, Listing, Part, RawSample};
use crate::data::readers::files_with_suffix;
use crate::error::{Error, Result};
use std::path::Path;

/// View number of a `..._vXX` name.
pub fn view_of(name: &str) -> Option<u32> {
    let tail = name.rsplit('_').next()?;
    tail.strip_prefix('v')?.parse().ok()
}

pub fn list(cfg: &GenericConfig) -> Result<Listing> {
    if cfg.score_channel {
        return Err(Error::config(
            "--score-channel: NW-UCLA JSON has no keypoint scores",
        ));
    }
    if let Some(o) = cfg.split.as_deref().filter(|s| *s != "xview") {
        return Err(Error::config(format!(
            "--split {o}: NW-UCLA JSON knows xview (views 1+2 / 3), or a list with --split-file"
        )));
    }
    let files = files_with_suffix(&cfg.input, ".json")?;
    if files.is_empty() {
        return Err(Error::input(
            &cfg.input,
            "folder",
            "no .json sample file found",
        ));
    }
    let mut entries = Vec::with_capacity(files.len());
    for path in files {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let part = match view_of(&name) {
            Some(1) | Some(2) => Some(Part::Train),
            Some(3) => Some(Part::Val),
            _ => None,
        };
        let p = path.clone();
        entries.push(Entry {
            name,
            file: path,
            label: None,
            part,
            load: Box::new(move || read_sample(&p)),
        });
    }
    Ok(Listing {
        entries,
        coords: 3,
        score_channel: false,
        excluded: Vec::new(),
        class_names: Default::default(),
        split: "cross-view (v01, v02 train / v03 val)".into(),
    })
}

/// Reads one sample file: `(3, T, V, 1)` and its 0-based label.
pub fn read_sample(path: &Path) -> Result<RawSample> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::input(path, format!("line {}", e.line()), format!("not JSON: {e}")))?;
    let skel = v
        .get("skeletons")
        .and_then(|s| s.as_array())
        .ok_or_else(|| {
            Error::input(
                path,
                "top level",
                "no \"skeletons\" list: not an NW-UCLA sample file (CTR-GCN form)",
            )
        })?;
    let label = match v.get("label") {
        Some(l) => {
            let l = l.as_i64().ok_or_else(|| {
                Error::input(path, "label", format!("expected an integer, found {l}"))
            })?;
            if l < 1 {
                return Err(Error::input(
                    path,
                    "label",
                    format!("label {l}: NW-UCLA labels are 1-based"),
                ));
            }
            Some(l - 1)
        }
        None => None,
    };
    let t_len = skel.len();
    let v_len = skel
        .first()
        .and_then(|f| f.as_array())
        .map(|f| f.len())
        .unwrap_or(0);
    let mut data = vec![0f32; 3 * t_len * v_len];
    for (t, frame) in skel.iter().enumerate() {
        let joints = frame.as_array().ok_or_else(|| {
            Error::input(path, format!("skeletons[{t}]"), "expected a list of joints")
        })?;
        if joints.len() != v_len {
            return Err(Error::input(
                path,
                format!("skeletons[{t}]"),
                format!("{} joints, frame 0 has {v_len}", joints.len()),
            ));
        }
        for (j, p) in joints.iter().enumerate() {
            let xyz = p.as_array().filter(|a| a.len() == 3).ok_or_else(|| {
                Error::input(path, format!("skeletons[{t}][{j}]"), "expected [x, y, z]")
            })?;
            for (c, x) in xyz.iter().enumerate() {
                // JSON has no NaN; a null (how NaN is often dumped) is reported as such.
                let x = x.as_f64().ok_or_else(|| {
                    Error::input(
                        path,
                        format!("skeletons[{t}][{j}][{c}]"),
                        format!("not a number: {x} (NaN keypoint?)"),
                    )
                })?;
                data[(c * t_len + t) * v_len + j] = x as f32;
            }
        }
    }
    Ok(RawSample {
        data,
        shape: [3, t_len, v_len, 1],
        label,
    })
}
