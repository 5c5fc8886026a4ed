//! PKU-MMD (v1) skeletons: one text file per video (`0002-L.txt`), one line per frame of 150
//! floats = 2 bodies x 25 joints x (x, y, z) (the second body all zero when absent; NTU joint
//! order, layout `pku25`), and a label file of the same name per video in the `--labels` folder,
//! one action interval per line: `action_id, start_frame, end_frame, confidence` (1-based action
//! ids, 51 classes). Each interval becomes one sample named `<video>_<k>` (k = 1-based line),
//! made of the file's frames `start..=end` (1-based, inclusive: lines `start` to `end`).
//!
//! Split: `--split xview` (default) is the paper's cross-view protocol read from the video
//! name: middle (`-M`) and right (`-R`) cameras train, left (`-L`) test; `--split xsub` needs
//! the dataset's `cross-subject.txt` as `--split-file` (any split list file works there:
//! `Training videos:` / `Validation videos:` sections of comma-separated video ids).
use crate::data::generic::{Entry, GenericConfig, Listing, Part, RawSample};
use crate::data::prepare::FileProblem;
use crate::data::readers::files_with_suffix;
use crate::error::{Error, Result};
use std::path::Path;
use std::sync::{Arc, OnceLock};

const VALUES_PER_FRAME: usize = 150;
const JOINTS: usize = 25;
const BODIES: usize = 2;

/// One labelled interval of a label file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    /// 0-based class.
    pub label: i64,
    /// First frame, 1-based.
    pub start: usize,
    /// Last frame, 1-based, inclusive.
    pub end: usize,
}

/// Reads a label file.
pub fn read_labels(path: &Path) -> Result<Vec<Interval>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let place = || format!("line {}", i + 1);
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() < 3 {
            return Err(Error::input(
                path,
                place(),
                format!(
                    "{} fields, expected action_id,start,end[,confidence]",
                    f.len()
                ),
            ));
        }
        let num = |s: &str| -> Result<i64> {
            s.parse::<i64>()
                .map_err(|_| Error::input(path, place(), format!("not an integer: {s:?}")))
        };
        let (a, s, e) = (num(f[0])?, num(f[1])?, num(f[2])?);
        if a < 1 || s < 1 || e < s {
            return Err(Error::input(
                path,
                place(),
                format!("bad interval: action {a}, frames {s}..{e}"),
            ));
        }
        out.push(Interval {
            label: a - 1,
            start: s as usize,
            end: e as usize,
        });
    }
    Ok(out)
}

/// Reads a skeleton file: `(3, T, 25, 2)` with T = its lines.
pub fn read_skeleton(path: &Path) -> Result<RawSample> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let rows: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let t_len = rows.len();
    let mut data = vec![0f32; 3 * t_len * JOINTS * BODIES];
    for (t, line) in rows.iter().enumerate() {
        let place = || format!("line {}", t + 1);
        let vals: Vec<&str> = line.split_ascii_whitespace().collect();
        if vals.len() != VALUES_PER_FRAME {
            return Err(Error::input(
                path,
                place(),
                format!(
                    "{} values, expected {VALUES_PER_FRAME} (2 bodies x 25 joints x xyz): not a PKU-MMD skeleton file",
                    vals.len()
                ),
            ));
        }
        for (k, s) in vals.iter().enumerate() {
            let x: f32 = s
                .parse()
                .map_err(|_| Error::input(path, place(), format!("not a number: {s:?}")))?;
            let (m, rest) = (k / (JOINTS * 3), k % (JOINTS * 3));
            let (v, c) = (rest / 3, rest % 3);
            data[((c * t_len + t) * JOINTS + v) * BODIES + m] = x;
        }
    }
    Ok(RawSample {
        data,
        shape: [3, t_len, JOINTS, BODIES],
        label: None,
    })
}

/// Cuts frames `[start, end)` of a `(C, T, V, M)` sample.
fn cut(s: &RawSample, start: usize, end: usize) -> RawSample {
    let [c, t, v, m] = s.shape;
    let len = end - start;
    let row = v * m;
    let mut data = Vec::with_capacity(c * len * row);
    for ci in 0..c {
        data.extend_from_slice(&s.data[(ci * t + start) * row..(ci * t + end) * row]);
    }
    RawSample {
        data,
        shape: [c, len, v, m],
        label: None,
    }
}

pub fn list(cfg: &GenericConfig) -> Result<Listing> {
    if cfg.score_channel {
        return Err(Error::config(
            "--score-channel: PKU-MMD skeletons have no scores",
        ));
    }
    let label_dir = cfg
        .labels
        .as_ref()
        .ok_or_else(|| Error::config("--format pku-mmd needs --labels <folder of label files>"))?;
    let xview = match (cfg.split.as_deref(), &cfg.split_file) {
        (_, Some(_)) => false,
        (None, None) | (Some("xview"), None) => true,
        (Some("xsub"), None) => {
            return Err(Error::config(
                "--split xsub: give the dataset's cross-subject.txt with --split-file",
            ))
        }
        (Some(o), None) => {
            return Err(Error::config(format!(
                "--split {o}: PKU-MMD knows xview (or a list with --split-file)"
            )))
        }
    };
    let files = files_with_suffix(&cfg.input, ".txt")?;
    if files.is_empty() {
        return Err(Error::input(
            &cfg.input,
            "folder",
            "no .txt skeleton file found",
        ));
    }
    let mut entries = Vec::new();
    let mut excluded = Vec::new();
    for path in files {
        let video = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let part = if xview {
            match video.rsplit('-').next() {
                Some("L") => Some(Part::Val),
                Some("M") | Some("R") => Some(Part::Train),
                _ => None,
            }
        } else {
            None
        };
        let label_path = label_dir.join(format!("{video}.txt"));
        if !label_path.is_file() {
            // One failing entry, so --on-error decides.
            let lp = label_path.clone();
            entries.push(Entry {
                name: video.clone(),
                file: path.clone(),
                label: None,
                part: part.or(Some(Part::Train)),
                load: Box::new(move || {
                    Err(Error::input(
                        &lp,
                        "label file",
                        "missing: no labels for this video",
                    ))
                }),
            });
            continue;
        }
        let intervals = match read_labels(&label_path) {
            Ok(i) => i,
            Err(e) => {
                excluded.push(FileProblem {
                    file: video.clone(),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        // The video is read once, by whichever of its intervals runs first; the others reuse it.
        let video_data: Arc<OnceLock<std::result::Result<RawSample, String>>> =
            Arc::new(OnceLock::new());
        for (k, iv) in intervals.into_iter().enumerate() {
            let p = path.clone();
            let name = format!("{video}_{}", k + 1);
            let lp = label_path.clone();
            let cache = Arc::clone(&video_data);
            entries.push(Entry {
                name,
                file: path.clone(),
                label: Some(iv.label),
                part,
                load: Box::new(move || {
                    let s = cache
                        .get_or_init(|| read_skeleton(&p).map_err(|e| e.to_string()))
                        .as_ref()
                        .map_err(|e| Error::Other(e.clone()))?;
                    if iv.end > s.shape[1] {
                        return Err(Error::input(
                            &lp,
                            format!("line {}", k + 1),
                            format!(
                                "interval {}..={} ends after the {} frames of {}",
                                iv.start,
                                iv.end,
                                s.shape[1],
                                p.display()
                            ),
                        ));
                    }
                    Ok(cut(s, iv.start - 1, iv.end))
                }),
            });
        }
    }
    Ok(Listing {
        entries,
        coords: 3,
        score_channel: false,
        excluded,
        class_names: Default::default(),
        split: if xview {
            "cross-view (-M, -R train / -L val)".into()
        } else {
            String::new()
        },
    })
}
