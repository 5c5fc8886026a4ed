//! pyskl / mmaction2 skeleton annotation pickle:
//! `{'split': {name: [frame_dir, ...]}, 'annotations': [{'frame_dir', 'label', 'keypoint'
//! (M, T, V, C) float, optional 'keypoint_score' (M, T, V), 'total_frames', ...}]}`, C = 2 or 3.
//!
//! The split is chosen with `--split`: a benchmark prefix (`xsub` = `xsub_train` / `xsub_val`,
//! or `_test` when there is no `_val`), or two names `TRAIN,VAL`; without it, the pickle's only
//! `*_train` / `*_val` pair. Samples are listed in annotation order; `keypoint` becomes
//! `(C, T, V, M)`; with `--score-channel` (2D only) `keypoint_score` is appended as channel C.
use crate::data::generic::{Entry, GenericConfig, Listing, Part, RawSample};
use crate::data::prepare::FileProblem;
use crate::data::pyobj::{self, Value};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// Reads the pickle and lists its samples (arrays moved out of the tree; decoded to float32 by
/// the loaders, in parallel).
pub fn list(cfg: &GenericConfig) -> Result<Listing> {
    let path = &cfg.input;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let root = pyobj::unpickle(&bytes).map_err(|e| {
        Error::input(
            path,
            format!("byte {}", e.offset),
            format!("not a readable pyskl annotation pickle: {}", e.what),
        )
    })?;
    drop(bytes);
    let (split, annotations) = match &root {
        Value::Dict(_) => (
            root.get("split"),
            root.get("annotations").ok_or_else(|| {
                Error::input(
                    path,
                    "top level",
                    "not a pyskl annotation pickle: a dict without 'annotations'",
                )
            })?,
        ),
        Value::List(_) => (None, root.clone()),
        other => {
            return Err(Error::input(
                path,
                "top level",
                format!(
                "{}: not a pyskl annotation pickle (expected a dict {{'split', 'annotations'}})",
                other.kind()
            ),
            ))
        }
    };
    let annotations = annotations
        .items()
        .ok_or_else(|| Error::input(path, "annotations", "expected a list of dicts"))?;
    let (parts, split_desc, mut excluded) = choose_split(path, split.as_ref(), cfg)?;

    // Coordinates from the first annotation with a keypoint array.
    let coords = annotations
        .iter()
        .find_map(|a| match a.get("keypoint") {
            Some(Value::Array(ref k)) => k.borrow().shape.get(3).copied(),
            _ => None,
        })
        .unwrap_or(2);
    if cfg.score_channel && coords != 2 {
        return Err(Error::config(format!(
            "{}: --score-channel is for 2D keypoints; this pickle has {coords} coordinates",
            path.display()
        )));
    }
    let mut entries = Vec::new();
    let mut seen: HashMap<String, ()> = HashMap::new();
    for (i, a) in annotations.iter().enumerate() {
        let name = a
            .get("frame_dir")
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| format!("annotations[{i}]"));
        let part = match &parts {
            Some(p) => match p.get(&name) {
                Some(part) => Some(*part),
                None => continue,
            },
            None => None,
        };
        seen.insert(name.clone(), ());
        let label = a.get("label").and_then(|v| v.as_i64());
        let place = format!("sample {name} (annotations[{i}])");
        let extracted = extract(a, coords, cfg.score_channel);
        let file = path.clone();
        entries.push(Entry {
            name,
            file: path.clone(),
            label,
            part,
            load: Box::new(move || {
                extracted
                    .and_then(decode)
                    .map_err(|what| Error::input(&file, place, what))
            }),
        });
    }
    if let Some(p) = &parts {
        let mut missing: Vec<&String> = p.keys().filter(|n| !seen.contains_key(*n)).collect();
        missing.sort();
        for n in missing {
            excluded.push(FileProblem {
                file: n.clone(),
                reason: format!(
                    "{}: sample {n}: listed in the split but has no annotation",
                    path.display()
                ),
            });
        }
    }
    Ok(Listing {
        entries,
        coords,
        score_channel: cfg.score_channel,
        excluded,
        class_names: Default::default(),
        split: split_desc,
    })
}

type Chosen = (Option<HashMap<String, Part>>, String, Vec<FileProblem>);

fn choose_split(path: &Path, split: Option<&Value>, cfg: &GenericConfig) -> Result<Chosen> {
    if cfg.split_file.is_some() {
        return Ok((None, String::new(), Vec::new()));
    }
    let Some(Value::Dict(d)) = split else {
        return Err(Error::input(
            path,
            "split",
            "the pickle has no 'split' dict: give the training samples with --split-file",
        ));
    };
    let names: Vec<String> = d.borrow().iter().filter_map(|(k, _)| k.as_str()).collect();
    let has = |n: &str| names.iter().any(|x| x == n);
    let val_of = |prefix: &str| -> Option<String> {
        [format!("{prefix}_val"), format!("{prefix}_test")]
            .into_iter()
            .find(|n| has(n))
    };
    let (train, val) = match cfg.split.as_deref() {
        Some(s) if s.contains(',') => {
            let (a, b) = s.split_once(',').unwrap_or((s, ""));
            (a.trim().to_string(), b.trim().to_string())
        }
        Some(prefix) => (
            format!("{prefix}_train"),
            val_of(prefix).unwrap_or_else(|| format!("{prefix}_val")),
        ),
        None => {
            let pairs: Vec<(String, String)> = names
                .iter()
                .filter_map(|n| {
                    let p = n.strip_suffix("_train")?;
                    Some((n.clone(), val_of(p)?))
                })
                .collect();
            if pairs.len() != 1 {
                return Err(Error::config(format!(
                    "{}: choose the split with --split (the pickle has {}; e.g. --split {} or --split TRAIN,VAL)",
                    path.display(),
                    names.join(", "),
                    pairs
                        .first()
                        .and_then(|p| p.0.strip_suffix("_train"))
                        .unwrap_or("xsub")
                )));
            }
            pairs[0].clone()
        }
    };
    let mut parts = HashMap::new();
    for (name, part) in [(&train, Part::Train), (&val, Part::Val)] {
        let list = d
            .borrow()
            .iter()
            .find(|(k, _)| k.as_str().as_deref() == Some(name.as_str()))
            .map(|(_, v)| v.clone())
            .ok_or_else(|| {
                Error::config(format!(
                    "{}: no split named {name:?} (the pickle has {})",
                    path.display(),
                    names.join(", ")
                ))
            })?;
        let items = list.items().ok_or_else(|| {
            Error::input(path, format!("split[{name:?}]"), "expected a list of names")
        })?;
        for it in items {
            if let Some(s) = it.as_str() {
                parts.insert(s, part);
            }
        }
    }
    Ok((Some(parts), format!("{train} / {val}"), Vec::new()))
}

/// One annotation's arrays, checked and moved out of the pickle's tree (decoded later, on a
/// worker thread, by [`decode`]).
struct Extracted {
    keypoint: pyobj::RawArray,
    score: Option<pyobj::RawArray>,
}

fn extract(a: &Value, coords: usize, score: bool) -> std::result::Result<Extracted, String> {
    // The arrays' bytes are moved out (not copied) and the tree is dropped after listing.
    let kp = match a.get("keypoint") {
        Some(Value::Array(ref k)) => take_array(k),
        Some(other) => {
            return Err(format!(
                "'keypoint' is {}, expected a numpy array",
                other.kind()
            ))
        }
        None => return Err("no 'keypoint' array".into()),
    };
    if kp.shape.len() != 4 {
        return Err(format!(
            "'keypoint' has shape {:?}, expected (M, T, V, C)",
            kp.shape
        ));
    }
    let [m, t, v, c] = [kp.shape[0], kp.shape[1], kp.shape[2], kp.shape[3]];
    if c != coords {
        return Err(format!(
            "'keypoint' has {c} coordinates, the first sample had {coords}"
        ));
    }
    let score = if score {
        let s = match a.get("keypoint_score") {
            Some(Value::Array(ref s)) => take_array(s),
            _ => return Err("--score-channel: no 'keypoint_score' array".into()),
        };
        if s.shape != [m, t, v] {
            return Err(format!(
                "'keypoint_score' has shape {:?}, expected {:?}",
                s.shape,
                [m, t, v]
            ));
        }
        Some(s.into_raw())
    } else {
        None
    };
    Ok(Extracted {
        keypoint: kp.into_raw(),
        score,
    })
}

/// `keypoint` (M, T, V, C) (+ `keypoint_score` (M, T, V)) -> `(C [+1], T, V, M)` float32.
fn decode(e: Extracted) -> std::result::Result<RawSample, String> {
    let kp = &e.keypoint;
    let [m, t, v, c] = [kp.shape[0], kp.shape[1], kp.shape[2], kp.shape[3]];
    let vals = kp.to_f64().map_err(|e| format!("'keypoint': {e}"))?;
    let scores = match &e.score {
        Some(s) => Some(s.to_f64().map_err(|e| format!("'keypoint_score': {e}"))?),
        None => None,
    };
    let score = scores.is_some();
    let ch = c + usize::from(score);
    let mut data = vec![0f32; ch * t * v * m];
    for mi in 0..m {
        for ti in 0..t {
            for vi in 0..v {
                let src = ((mi * t + ti) * v + vi) * c;
                for ci in 0..c {
                    data[((ci * t + ti) * v + vi) * m + mi] = vals[src + ci] as f32;
                }
                if let Some(s) = &scores {
                    data[((c * t + ti) * v + vi) * m + mi] = s[(mi * t + ti) * v + vi] as f32;
                }
            }
        }
    }
    Ok(RawSample {
        data,
        shape: [ch, t, v, m],
        label: None,
    })
}

/// Moves an array out of the tree, or copies it when another place of the pickle shares it
/// (`get` holds one reference, the annotation dict another).
fn take_array(a: &std::rc::Rc<std::cell::RefCell<pyobj::NdArray>>) -> pyobj::NdArray {
    if std::rc::Rc::strong_count(a) > 2 {
        a.borrow().clone()
    } else {
        std::mem::take(&mut *a.borrow_mut())
    }
}
