//! ST-GCN's Kinetics-skeleton: `<root>/kinetics_{train,val}/<video>.json`, each
//! `{"data": [{"frame_index": i, "skeleton": [{"pose": [x0, y0, x1, y1, ... 18 joints],
//! "score": [s0 .. s17]}, ...]}, ...], "label": "...", "label_index": k}`, and optionally
//! `<root>/kinetics_{train,val}_label.json` = `{video: {"has_skeleton": bool, "label_index": k}}`
//! (videos with `has_skeleton: false` are left out and reported; its label wins over the file's).
//!
//! As ST-GCN's `Feeder_kinetics`: frame `t` = `frame_index - min(frame_index)` of the file
//! (frames without an entry are zero), the x, y of a joint whose score is 0 are set to 0, and in
//! every frame the persons are ranked by their summed joint score (descending, ties in file
//! order) and the first `--bodies` kept. Channels: x, y (+ score with `--score-channel`);
//! layout `openpose18`.
use crate::data::generic::{Entry, GenericConfig, Listing, Part, RawSample};
use crate::data::prepare::FileProblem;
use crate::data::readers::files_with_suffix;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

const JOINTS: usize = 18;

/// One person of a frame: pose `[x0, y0, x1, y1, ...]` and per-joint scores.
type Person = (Vec<f32>, Vec<f32>);

/// Label file entry.
#[derive(Debug, Clone)]
struct LabelInfo {
    has_skeleton: bool,
    label: Option<i64>,
    name: Option<String>,
}

fn read_label_file(path: &Path) -> Result<HashMap<String, LabelInfo>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::input(path, format!("line {}", e.line()), format!("not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| Error::input(path, "top level", "expected {video: {...}}"))?;
    Ok(obj
        .iter()
        .map(|(k, e)| {
            (
                k.clone(),
                LabelInfo {
                    has_skeleton: e
                        .get("has_skeleton")
                        .and_then(|b| b.as_bool())
                        .unwrap_or(true),
                    label: e.get("label_index").and_then(|l| l.as_i64()),
                    name: e.get("label").and_then(|l| l.as_str()).map(str::to_string),
                },
            )
        })
        .collect())
}

pub fn list(cfg: &GenericConfig) -> Result<Listing> {
    let root = &cfg.input;
    if let Some(o) = &cfg.split {
        return Err(Error::config(format!(
            "--split {o}: Kinetics-skeleton is split by its kinetics_train / kinetics_val folders"
        )));
    }
    let mut entries = Vec::new();
    let mut excluded = Vec::new();
    let mut class_names = std::collections::BTreeMap::new();
    let mut found = false;
    for (part, sub) in [(Part::Train, "train"), (Part::Val, "val")] {
        let dir = root.join(format!("kinetics_{sub}"));
        if !dir.is_dir() {
            continue;
        }
        found = true;
        let label_path = root.join(format!("kinetics_{sub}_label.json"));
        let labels = if label_path.is_file() {
            Some(read_label_file(&label_path)?)
        } else {
            None
        };
        for info in labels.iter().flat_map(|l| l.values()) {
            if let (Some(k), Some(n)) = (info.label, &info.name) {
                class_names.entry(k).or_insert_with(|| n.clone());
            }
        }
        for path in files_with_suffix(&dir, ".json")? {
            let video = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let info = labels.as_ref().and_then(|l| l.get(&video)).cloned();
            if let Some(LabelInfo {
                has_skeleton: false,
                ..
            }) = &info
            {
                excluded.push(FileProblem {
                    file: video.clone(),
                    reason: format!(
                        "{}: has_skeleton is false in {}",
                        path.display(),
                        label_path.display()
                    ),
                });
                continue;
            }
            let p = path.clone();
            let (bodies, score) = (cfg.bodies, cfg.score_channel);
            entries.push(Entry {
                name: video,
                file: path,
                label: info.and_then(|i| i.label),
                part: Some(part),
                load: Box::new(move || read_video(&p, bodies, score)),
            });
        }
    }
    if !found {
        return Err(Error::input(
            root,
            "folder",
            "no kinetics_train/ or kinetics_val/ folder: not a Kinetics-skeleton root",
        ));
    }
    Ok(Listing {
        entries,
        coords: 2,
        score_channel: cfg.score_channel,
        excluded,
        class_names,
        split: "kinetics_train / kinetics_val".into(),
    })
}

/// Reads one video: `(2 or 3, T, 18, bodies)`, persons ranked per frame by summed score.
pub fn read_video(path: &Path, bodies: usize, score_channel: bool) -> Result<RawSample> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::input(path, format!("line {}", e.line()), format!("not JSON: {e}")))?;
    let frames = v.get("data").and_then(|d| d.as_array()).ok_or_else(|| {
        Error::input(
            path,
            "top level",
            "no \"data\" list: not a Kinetics-skeleton video file",
        )
    })?;
    let label = v.get("label_index").and_then(|l| l.as_i64());
    // (frame_index, persons as (pose xy 36, score 18)).
    let mut parsed: Vec<(i64, Vec<Person>)> = Vec::with_capacity(frames.len());
    for (i, f) in frames.iter().enumerate() {
        let place = |w: &str| format!("data[{i}]{w}");
        let fi = f
            .get("frame_index")
            .and_then(|x| x.as_i64())
            .ok_or_else(|| Error::input(path, place(""), "no integer \"frame_index\""))?;
        let skel = f
            .get("skeleton")
            .and_then(|s| s.as_array())
            .ok_or_else(|| Error::input(path, place(""), "no \"skeleton\" list"))?;
        let mut persons = Vec::new();
        for (m, s) in skel.iter().enumerate() {
            let nums = |key: &str, n: usize| -> Result<Vec<f32>> {
                let a = s.get(key).and_then(|a| a.as_array()).ok_or_else(|| {
                    Error::input(
                        path,
                        place(&format!(".skeleton[{m}]")),
                        format!("no \"{key}\" list"),
                    )
                })?;
                if a.len() != n {
                    return Err(Error::input(
                        path,
                        place(&format!(".skeleton[{m}].{key}")),
                        format!(
                            "{} values, expected {n} ({JOINTS} OpenPose joints): joint count does not match openpose18",
                            a.len()
                        ),
                    ));
                }
                a.iter()
                    .enumerate()
                    .map(|(k, x)| {
                        x.as_f64().map(|x| x as f32).ok_or_else(|| {
                            Error::input(
                                path,
                                place(&format!(".skeleton[{m}].{key}[{k}]")),
                                format!("not a number: {x} (NaN keypoint?)"),
                            )
                        })
                    })
                    .collect()
            };
            persons.push((nums("pose", 2 * JOINTS)?, nums("score", JOINTS)?));
        }
        parsed.push((fi, persons));
    }
    let first = parsed.iter().map(|p| p.0).min().unwrap_or(0);
    let t_len = parsed
        .iter()
        .map(|p| (p.0 - first) as usize + 1)
        .max()
        .unwrap_or(0);
    let ch = 2 + usize::from(score_channel);
    let mut data = vec![0f32; ch * t_len * JOINTS * bodies];
    for (fi, persons) in &parsed {
        let t = (fi - first) as usize;
        let mut order: Vec<usize> = (0..persons.len()).collect();
        let total = |m: usize| -> f32 { persons[m].1.iter().sum() };
        order.sort_by(|&a, &b| {
            total(b)
                .partial_cmp(&total(a))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        for (slot, &m) in order.iter().take(bodies).enumerate() {
            let (pose, score) = &persons[m];
            for v in 0..JOINTS {
                let s = score[v];
                let (x, y) = if s == 0.0 {
                    (0.0, 0.0)
                } else {
                    (pose[2 * v], pose[2 * v + 1])
                };
                data[((t) * JOINTS + v) * bodies + slot] = x;
                data[((t_len + t) * JOINTS + v) * bodies + slot] = y;
                if score_channel {
                    data[((2 * t_len + t) * JOINTS + v) * bodies + slot] = s;
                }
            }
        }
    }
    Ok(RawSample {
        data,
        shape: [ch, t_len, JOINTS, bodies],
        label,
    })
}
