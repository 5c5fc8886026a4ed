//! Human-readable summaries of any file the tool reads (`crossclr inspect`): `.npy` (shape, dtype,
//! per-channel min/max/mean, non-finite values, all-zero bodies, frames in use), `.pkl` labels
//! (count, per-class counts), `.npz` members, raw NTU `.skeleton` and MSR `.txt` files, the inputs
//! of `prepare generic` (pyskl annotation `.pkl`, NW-UCLA and Kinetics-skeleton `.json`, PKU-MMD
//! skeleton and label `.txt`), and dataset folders (every `*_data.npy`/`*_position.npy` +
//! `*_label.pkl` pair, recursively one level; counts of `.json` / `.txt` sample files).
use crate::data::dataset::F32Buf;
use crate::data::{msr, npy, ntu, pickle};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::fmt::Write as _;
use std::path::Path;

/// Describes `path` (file or folder). `layout` is used for dataset checks when given.
pub fn inspect(path: &Path, layout: Option<&str>) -> Result<String> {
    let mut out = String::new();
    if path.is_dir() {
        inspect_dir(path, layout, &mut out, 0)?;
        return Ok(out);
    }
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.ends_with(".npy") {
        inspect_npy(path, &mut out)?;
    } else if name.ends_with(".pkl") {
        if let Err(e) = inspect_pkl(path, &mut out) {
            if !inspect_pyskl(path, &mut out)? {
                return Err(e);
            }
        }
    } else if name.ends_with(".json") {
        inspect_json(path, &mut out)?;
    } else if name.ends_with(".npz") {
        inspect_npz(path, &mut out)?;
    } else if name.ends_with(".skeleton") {
        inspect_skeleton(path, &mut out)?;
    } else if msr::MsrName::parse(&name).is_some() {
        let (t, data) = msr::read_msr_file(path)?;
        let _ = writeln!(
            out,
            "{}: MSR Action3D sequence, {t} frames x {} joints",
            path.display(),
            msr::MSR_JOINTS
        );
        channel_stats(&data, [1, 3, t, msr::MSR_JOINTS, 1], &mut out);
    } else if name.ends_with(".txt") {
        inspect_pku_txt(path, &mut out)?;
    } else {
        return Err(Error::input(
            path,
            "file name",
            "unknown kind (expected .npy, .pkl, .npz, .skeleton, .json, .txt or a folder)",
        ));
    }
    Ok(out)
}

fn inspect_dir(dir: &Path, layout: Option<&str>, out: &mut String, depth: usize) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    let file_names: Vec<String> = entries
        .iter()
        .filter_map(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    let skeletons = file_names
        .iter()
        .filter(|n| n.ends_with(".skeleton"))
        .count();
    let msr_files = file_names
        .iter()
        .filter(|n| msr::MsrName::parse(n).is_some())
        .count();
    let _ = writeln!(out, "== {}", dir.display());
    for ext in [".json", ".txt"] {
        let files: Vec<&String> = file_names.iter().filter(|n| n.ends_with(ext)).collect();
        if !files.is_empty() && msr_files == 0 {
            let first = dir.join(files[0]);
            let mut d = String::new();
            let kind = if ext == ".json" {
                inspect_json(&first, &mut d)
            } else {
                inspect_pku_txt(&first, &mut d)
            };
            let _ = writeln!(
                out,
                "{} {ext} files; the first, {}: {}",
                files.len(),
                files[0],
                match kind {
                    Ok(()) => d.lines().next().unwrap_or("").to_string(),
                    Err(e) => format!("not readable: {e}"),
                }
            );
        }
    }
    if skeletons > 0 {
        let bad = file_names
            .iter()
            .filter(|n| n.ends_with(".skeleton") && ntu::NtuName::parse_file_name(n).is_none())
            .count();
        let _ = writeln!(out, "{skeletons} raw NTU .skeleton files ({bad} with a name not of the form SsssCcccPpppRrrrAaaa)");
    }
    if msr_files > 0 {
        let ds = msr::read_msr_dir(dir, None)?;
        let _ = writeln!(
            out,
            "{msr_files} MSR Action3D sequences ({} in the standard used list), as read: {:?}",
            ds.len(),
            ds.shape
        );
        label_counts(&ds.labels, out);
    }
    for (p, n) in entries.iter().zip(&file_names) {
        let part = n
            .strip_suffix("_data.npy")
            .or_else(|| n.strip_suffix("_position.npy"));
        if let Some(part) = part {
            let label = dir.join(format!("{part}_label.pkl"));
            let _ = writeln!(out, "-- {n} (+ {part}_label.pkl)");
            if label.exists() {
                let declared = dataset_toml_layout(dir);
                let layout = layout.or(declared.as_deref()).unwrap_or("ntu25");
                match crate::data::formats::open_generic(p, &label, layout) {
                    Ok(ds) => {
                        let _ = writeln!(
                            out,
                            "dataset ok: {:?}, {} classes, layout {}",
                            ds.shape, ds.num_classes, ds.layout.name
                        );
                    }
                    Err(e) => {
                        let _ = writeln!(out, "dataset check FAILED: {e}");
                    }
                }
            }
            inspect_npy(p, out)?;
        } else if n.ends_with(".pkl") {
            let _ = writeln!(out, "-- {n}");
            inspect_pkl(p, out)?;
        } else if n.ends_with(".npz") {
            let _ = writeln!(out, "-- {n}");
            inspect_npz(p, out)?;
        } else if p.is_dir() && depth == 0 {
            inspect_dir(p, layout, out, depth + 1)?;
        }
    }
    Ok(())
}

fn inspect_npy(path: &Path, out: &mut String) -> Result<()> {
    let h = npy::read_header(path)?;
    let _ = writeln!(
        out,
        "{}: {} {:?} (header {} bytes)",
        path.display(),
        h.dtype.name(),
        h.shape,
        h.data_offset
    );
    if h.dtype.is_integer() {
        let (_, v) = npy::read_i64(path)?;
        let (min, max) = v
            .iter()
            .fold((i64::MAX, i64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        if !v.is_empty() {
            let _ = writeln!(out, "values: min {min}, max {max}");
        }
        if !v.is_empty() && max - min < 1000 && min >= 0 {
            label_counts(&v, out);
        }
        return Ok(());
    }
    let (shape, buf) = npy::mmap_f32(path)?;
    let data = match &buf {
        F32Buf::Owned(v) => v.as_slice(),
        b => b.as_slice(),
    };
    if shape.len() == 5 {
        channel_stats(
            data,
            [shape[0], shape[1], shape[2], shape[3], shape[4]],
            out,
        );
    } else {
        let (min, max, sum, bad) = stats(data);
        let _ = writeln!(
            out,
            "values: min {min:.6}, max {max:.6}, mean {:.6}, non-finite {bad}",
            sum / data.len().max(1) as f64
        );
    }
    Ok(())
}

fn stats(v: &[f32]) -> (f32, f32, f64, usize) {
    v.par_chunks(1 << 16)
        .map(|c| {
            let mut r = (f32::INFINITY, f32::NEG_INFINITY, 0f64, 0usize);
            for &x in c {
                if x.is_finite() {
                    r.0 = r.0.min(x);
                    r.1 = r.1.max(x);
                    r.2 += x as f64;
                } else {
                    r.3 += 1;
                }
            }
            r
        })
        .reduce(
            || (f32::INFINITY, f32::NEG_INFINITY, 0f64, 0usize),
            |a, b| (a.0.min(b.0), a.1.max(b.1), a.2 + b.2, a.3 + b.3),
        )
}

/// Per-channel min/max/mean, non-finite count, all-zero bodies and frames in use of `(N, C, T, V, M)`.
fn channel_stats(data: &[f32], shape: [usize; 5], out: &mut String) {
    let [n, c_len, t_len, v_len, m_len] = shape;
    let sample = c_len * t_len * v_len * m_len;
    if n == 0 || sample == 0 {
        let _ = writeln!(out, "empty");
        return;
    }
    let plane = t_len * v_len * m_len;
    for c in 0..c_len {
        let chans: Vec<&[f32]> = (0..n)
            .map(|i| &data[i * sample + c * plane..][..plane])
            .collect();
        let parts: Vec<_> = chans.par_iter().map(|s| stats(s)).collect();
        let (min, max, sum, bad) = parts
            .into_iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY, 0f64, 0usize), |a, b| {
                (a.0.min(b.0), a.1.max(b.1), a.2 + b.2, a.3 + b.3)
            });
        let _ = writeln!(
            out,
            "channel {c}: min {min:.4}, max {max:.4}, mean {:.4}, non-finite {bad}",
            sum / (n * plane) as f64
        );
    }
    // Per sample: all-zero bodies and frames with any non-zero value.
    let per: Vec<(usize, usize)> = (0..n)
        .into_par_iter()
        .map(|i| {
            let s = &data[i * sample..][..sample];
            let zero_bodies = (0..m_len)
                .filter(|&m| (0..c_len * t_len * v_len).all(|k| s[k * m_len + m] == 0.0))
                .count();
            let frames = (0..t_len)
                .filter(|&t| {
                    (0..c_len).any(|c| {
                        s[(c * t_len + t) * v_len * m_len..][..v_len * m_len]
                            .iter()
                            .any(|&x| x != 0.0)
                    })
                })
                .count();
            (zero_bodies, frames)
        })
        .collect();
    let zero_bodies: usize = per.iter().map(|p| p.0).sum();
    let zero_samples = per.iter().filter(|p| p.0 == m_len).count();
    let (fmin, fmax) = per
        .iter()
        .fold((usize::MAX, 0), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    let fmean = per.iter().map(|p| p.1).sum::<usize>() as f64 / n as f64;
    let _ = writeln!(
        out,
        "all-zero bodies: {zero_bodies} of {} ({zero_samples} all-zero samples); non-zero frames per sample: min {fmin}, mean {fmean:.1}, max {fmax}",
        n * m_len
    );
}

fn label_counts(labels: &[i64], out: &mut String) {
    let max = labels.iter().copied().max().unwrap_or(-1);
    if max < 0 {
        return;
    }
    let mut counts = vec![0usize; max as usize + 1];
    for &l in labels {
        if l >= 0 {
            counts[l as usize] += 1;
        }
    }
    let (cmin, cmax) = counts
        .iter()
        .fold((usize::MAX, 0), |a, &c| (a.0.min(c), a.1.max(c)));
    let _ = writeln!(
        out,
        "labels: {} samples, {} classes (0..={max}), per class min {cmin} max {cmax}; counts {:?}",
        labels.len(),
        counts.len(),
        counts
    );
}

fn inspect_pkl(path: &Path, out: &mut String) -> Result<()> {
    let (names, labels) = pickle::read_labels(path)?;
    let _ = writeln!(
        out,
        "{}: (names, labels) with {} samples; first names: {:?}",
        path.display(),
        names.len(),
        names.iter().take(3).collect::<Vec<_>>()
    );
    label_counts(&labels, out);
    Ok(())
}

fn inspect_npz(path: &Path, out: &mut String) -> Result<()> {
    let _ = writeln!(out, "{}: npz", path.display());
    for m in npy::npz_members(path)? {
        let desc = npy::with_npz_member(path, &m, |h, _, _| {
            Ok(format!("{} {:?}", h.dtype.name(), h.shape))
        })?;
        let _ = writeln!(out, "  {m}: {desc}");
    }
    Ok(())
}

fn inspect_skeleton(path: &Path, out: &mut String) -> Result<()> {
    let sk = ntu::read_skeleton(path)?;
    let name =
        ntu::NtuName::parse_file_name(&path.file_name().unwrap_or_default().to_string_lossy());
    let _ = writeln!(
        out,
        "{}: NTU .skeleton, {} frames, up to {} bodies per frame, {} frames without a body{}",
        path.display(),
        sk.frames,
        sk.max_bodies,
        sk.empty_frames,
        name.map(|n| format!(
            "; setup {} camera {} performer {} replication {} action {} (label {})",
            n.setup,
            n.camera,
            n.performer,
            n.replication,
            n.action,
            n.label()
        ))
        .unwrap_or_default()
    );
    channel_stats(
        &sk.data,
        [1, 3, sk.frames, ntu::NTU_JOINTS, ntu::NTU_MAX_BODIES],
        out,
    );
    Ok(())
}

/// A pyskl annotation pickle; `Ok(false)` when the file is not one.
fn inspect_pyskl(path: &Path, out: &mut String) -> Result<bool> {
    use crate::data::pyobj::{self, Value};
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let Ok(root) = pyobj::unpickle(&bytes) else {
        return Ok(false);
    };
    let Some(ann) = root.get("annotations").and_then(|a| a.items()) else {
        return Ok(false);
    };
    let _ = writeln!(
        out,
        "{}: pyskl annotation pickle, {} annotations",
        path.display(),
        ann.len()
    );
    if let Some(Value::Dict(ref d)) = root.get("split") {
        let splits: Vec<String> = d
            .borrow()
            .iter()
            .map(|(k, v)| {
                format!(
                    "{} ({})",
                    k.as_str().unwrap_or_default(),
                    v.items().map(|i| i.len()).unwrap_or(0)
                )
            })
            .collect();
        let _ = writeln!(out, "splits: {}", splits.join(", "));
    } else {
        let _ = writeln!(out, "no 'split' dict (prepare needs --split-file)");
    }
    let mut labels = Vec::new();
    let (mut tmin, mut tmax, mut tsum) = (usize::MAX, 0usize, 0usize);
    let mut shapes = std::collections::BTreeMap::new();
    let mut scores = 0;
    for a in &ann {
        if let Some(l) = a.get("label").and_then(|l| l.as_i64()) {
            labels.push(l);
        }
        if let Some(Value::Array(ref k)) = a.get("keypoint") {
            let k = k.borrow();
            if k.shape.len() == 4 {
                let t = k.shape[1];
                tmin = tmin.min(t);
                tmax = tmax.max(t);
                tsum += t;
                *shapes
                    .entry(format!(
                        "M={} V={} C={} {}",
                        k.shape[0], k.shape[2], k.shape[3], k.dtype
                    ))
                    .or_insert(0usize) += 1;
            }
        }
        if matches!(a.get("keypoint_score"), Some(Value::Array(_))) {
            scores += 1;
        }
    }
    let _ = writeln!(
        out,
        "keypoint (M, T, V, C): {shapes:?}; frames min {}, mean {:.1}, max {tmax}; keypoint_score in {scores}",
        if tmin == usize::MAX { 0 } else { tmin },
        tsum as f64 / ann.len().max(1) as f64
    );
    label_counts(&labels, out);
    Ok(true)
}

/// NW-UCLA sample, Kinetics-skeleton video or Kinetics label file.
fn inspect_json(path: &Path, out: &mut String) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::input(path, format!("line {}", e.line()), format!("not JSON: {e}")))?;
    if v.get("skeletons").is_some() {
        let s = crate::data::readers::ucla::read_sample(path)?;
        let name = path.file_stem().unwrap_or_default().to_string_lossy();
        let _ = writeln!(
            out,
            "{}: NW-UCLA sample (CTR-GCN JSON), {} frames x {} joints, label {:?} (0-based), view {:?}",
            path.display(),
            s.shape[1],
            s.shape[2],
            s.label,
            crate::data::readers::ucla::view_of(&name)
        );
        channel_stats(&s.data, [1, s.shape[0], s.shape[1], s.shape[2], 1], out);
    } else if v.get("data").is_some() {
        let s = crate::data::readers::kinetics::read_video(path, 5, true)?;
        let persons = v["data"]
            .as_array()
            .map(|f| {
                f.iter()
                    .map(|x| x["skeleton"].as_array().map(|a| a.len()).unwrap_or(0))
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "{}: Kinetics-skeleton video, {} frames, up to {persons} persons per frame, label_index {:?}",
            path.display(),
            s.shape[1],
            s.label
        );
        channel_stats(
            &s.data,
            [1, s.shape[0], s.shape[1], s.shape[2], s.shape[3]],
            out,
        );
    } else if let Some(o) = v.as_object() {
        let no_skel = o
            .values()
            .filter(|e| e.get("has_skeleton").and_then(|b| b.as_bool()) == Some(false))
            .count();
        let labels: Vec<i64> = o
            .values()
            .filter_map(|e| e.get("label_index").and_then(|l| l.as_i64()))
            .collect();
        let _ = writeln!(
            out,
            "{}: Kinetics-skeleton label file, {} videos, {no_skel} without skeleton",
            path.display(),
            o.len()
        );
        label_counts(&labels, out);
    } else {
        return Err(Error::input(
            path,
            "top level",
            "not an NW-UCLA sample, Kinetics-skeleton video or label file",
        ));
    }
    Ok(())
}

/// PKU-MMD skeleton (150 values per line) or label file (`action,start,end,confidence`).
fn inspect_pku_txt(path: &Path, out: &mut String) -> Result<()> {
    use crate::data::readers::pkummd;
    let head = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let first = head.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    if first.contains(',') {
        let iv = pkummd::read_labels(path)?;
        let labels: Vec<i64> = iv.iter().map(|i| i.label).collect();
        let _ = writeln!(
            out,
            "{}: PKU-MMD label file, {} action intervals, lengths {:?}",
            path.display(),
            iv.len(),
            iv.iter().map(|i| i.end + 1 - i.start).collect::<Vec<_>>()
        );
        label_counts(&labels, out);
    } else {
        let s = pkummd::read_skeleton(path)?;
        let _ = writeln!(
            out,
            "{}: PKU-MMD skeleton file, {} frames x 25 joints x 2 bodies",
            path.display(),
            s.shape[1]
        );
        channel_stats(&s.data, [1, 3, s.shape[1], 25, 2], out);
    }
    Ok(())
}

/// The layout `<dir>/dataset.toml` names (a file name resolved against `dir`).
fn dataset_toml_layout(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("dataset.toml")).ok()?;
    let v: toml::Value = toml::from_str(&text).ok()?;
    let l = v.get("layout")?.as_str()?;
    let f = dir.join(l);
    Some(if f.is_file() {
        f.display().to_string()
    } else {
        l.to_string()
    })
}
