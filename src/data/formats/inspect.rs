//! Human-readable summaries of any file the tool reads (`crossclr inspect`): `.npy` (shape, dtype,
//! per-channel min/max/mean, non-finite values, all-zero bodies, frames in use), `.pkl` labels
//! (count, per-class counts), `.npz` members, raw NTU `.skeleton` and MSR `.txt` files, and dataset
//! folders (every `*_data.npy`/`*_position.npy` + `*_label.pkl` pair, recursively one level).
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
        inspect_pkl(path, &mut out)?;
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
    } else {
        return Err(Error::input(
            path,
            "file name",
            "unknown kind (expected .npy, .pkl, .npz, .skeleton, MSR .txt or a folder)",
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
                match crate::data::formats::open_generic(p, &label, layout.unwrap_or("ntu25")) {
                    Ok(ds) => {
                        let _ = writeln!(
                            out,
                            "dataset ok: {:?}, {} classes",
                            ds.shape, ds.num_classes
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
