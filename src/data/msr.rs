//! MSR Action3D skeleton text reader (`aXX_sYY_eZZ_skeleton3D.txt`, "real world coordinates").
//!
//! Each line is `x y z c`; 20 lines (joints in MSR order, layout `msr20`) make a frame. The
//! coordinates are kept as read: metres in the Kinect v1 camera frame, column 2 (y) vertical and
//! pointing up, column 3 (z) the depth away from the sensor, the subject's right shoulder at larger
//! x than the left one - the same convention as NTU's camera-space xyz. The confidence column `c` is
//! dropped.
//!
//! Sequences are converted to the training-input convention of the NTU data: the official 50-frame
//! preprocessing of [`crate::data::preprocess`] with the `msr20` layout (length from the hip-centre
//! joint, per-frame centring on the shoulder centre, linear resize to `frames`, y-rotation putting
//! the shoulders on +x), giving `N x 3 x frames x 20 x 1` tensors.
//!
//! The standard "used" list (`files_used_in_cvpr12_paper.txt`, 557 of the 567 sequences) is applied
//! by leaving out the 10 sequences it omits ([`MSR_EXCLUDED`]).
use crate::data::dataset::{F32Buf, SkeletonDataset};
use crate::data::layout::Layout;
use crate::data::preprocess;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Joints per frame.
pub const MSR_JOINTS: usize = 20;
/// Number of action classes (a01..a20).
pub const MSR_CLASSES: usize = 20;
/// Sequences of the folder that the standard 557-sequence list (`files_used_in_cvpr12_paper.txt`)
/// omits (a13_s09_e02 is all zeros).
pub const MSR_EXCLUDED: [&str; 10] = [
    "a02_s03_e02",
    "a04_s03_e01",
    "a07_s04_e01",
    "a13_s09_e01",
    "a13_s09_e02",
    "a13_s09_e03",
    "a14_s03_e01",
    "a20_s07_e01",
    "a20_s07_e03",
    "a20_s10_e03",
];
/// Cross-subject protocol: training subjects (the others, 2,4,6,8,10, are the test set).
pub const MSR_TRAIN_SUBJECTS: [u32; 5] = [1, 3, 5, 7, 9];
/// Default output frames (as the NTU training input).
pub const MSR_DEFAULT_FRAMES: usize = 50;

/// Action, subject and repetition of an `aXX_sYY_eZZ_skeleton3D.txt` name (all 1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsrName {
    pub action: u32,
    pub subject: u32,
    pub repetition: u32,
}

impl MsrName {
    pub fn parse(file_name: &str) -> Option<MsrName> {
        let id = file_name.strip_suffix("_skeleton3D.txt")?;
        let b = id.as_bytes();
        if b.len() != 11
            || b[0] != b'a'
            || b[3] != b'_'
            || b[4] != b's'
            || b[7] != b'_'
            || b[8] != b'e'
        {
            return None;
        }
        let num = |s: &[u8]| -> Option<u32> {
            s.iter()
                .all(u8::is_ascii_digit)
                .then(|| s.iter().fold(0, |a, &d| a * 10 + (d - b'0') as u32))
        };
        Some(MsrName {
            action: num(&b[1..3])?,
            subject: num(&b[5..7])?,
            repetition: num(&b[9..11])?,
        })
    }
    /// `aXX_sYY_eZZ`.
    pub fn id(&self) -> String {
        format!(
            "a{:02}_s{:02}_e{:02}",
            self.action, self.subject, self.repetition
        )
    }
}

/// Reads one sequence: `(frames, data)` with data `(3, frames, 20, 1)` float32.
pub fn read_msr_file(path: &Path) -> Result<(usize, Vec<f32>)> {
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut rows: Vec<[f32; 3]> = Vec::new();
    for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
        let line = std::str::from_utf8(raw)
            .map_err(|_| Error::input(path, format!("line {}", i + 1), "not text"))?
            .trim();
        if line.is_empty() {
            continue;
        }
        let place = || format!("line {}", i + 1);
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        if fields.len() != 4 {
            return Err(Error::input(
                path,
                place(),
                format!("{} fields, expected 4 (x y z c)", fields.len()),
            ));
        }
        let mut xyz = [0f32; 3];
        for (k, f) in fields.iter().enumerate() {
            let v: f64 = f
                .parse()
                .map_err(|_| Error::input(path, place(), format!("not a number: {f:?}")))?;
            if !v.is_finite() {
                return Err(Error::input(
                    path,
                    place(),
                    format!("NaN or infinite value {f:?}"),
                ));
            }
            if k < 3 {
                xyz[k] = v as f32;
            }
        }
        rows.push(xyz);
    }
    if !rows.len().is_multiple_of(MSR_JOINTS) {
        return Err(Error::input(
            path,
            format!("line {}", rows.len()),
            format!("{} joint lines is not a whole number of {MSR_JOINTS}-joint frames (truncated file?)", rows.len()),
        ));
    }
    let frames = rows.len() / MSR_JOINTS;
    let mut data = vec![0f32; 3 * frames * MSR_JOINTS];
    for (r, xyz) in rows.iter().enumerate() {
        let (t, v) = (r / MSR_JOINTS, r % MSR_JOINTS);
        for c in 0..3 {
            data[(c * frames + t) * MSR_JOINTS + v] = xyz[c];
        }
    }
    Ok((frames, data))
}

/// The used sequence files of `dir` (sorted), optionally only of `subjects`.
pub fn list_msr_files(dir: &Path, subjects: Option<&[u32]>) -> Result<Vec<(PathBuf, MsrName)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(n) = MsrName::parse(&name) else {
            continue;
        };
        if MSR_EXCLUDED.contains(&n.id().as_str()) {
            continue;
        }
        if subjects.is_some_and(|s| !s.contains(&n.subject)) {
            continue;
        }
        out.push((e.path(), n));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    if out.is_empty() {
        return Err(Error::input(
            dir,
            "folder",
            "no aXX_sYY_eZZ_skeleton3D.txt sequence found",
        ));
    }
    Ok(out)
}

/// Reads the used sequences of `dir` (optionally only `subjects`) into an `N x 3 x frames x 20 x 1`
/// dataset preprocessed as the NTU training input (see the module doc). Labels are `action - 1`.
pub fn read_msr_dir_frames(
    dir: &Path,
    subjects: Option<&[u32]>,
    frames: usize,
) -> Result<SkeletonDataset> {
    let layout = Layout::msr20();
    let files = list_msr_files(dir, subjects)?;
    let per = 3 * frames * MSR_JOINTS;
    let mut data = Vec::with_capacity(files.len() * per);
    let mut labels = Vec::with_capacity(files.len());
    let mut names = Vec::with_capacity(files.len());
    for (path, n) in &files {
        let (t, raw) = read_msr_file(path)?;
        let (pos, length) =
            preprocess::preprocess_sample(&raw, [3, t, MSR_JOINTS, 1], &layout, frames);
        if length == 0 {
            return Err(Error::input(
                path,
                "data",
                "the hip-centre joint is zero in every frame",
            ));
        }
        data.extend_from_slice(&pos);
        labels.push(n.action as i64 - 1);
        names.push(
            path.file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    }
    Ok(SkeletonDataset {
        data: F32Buf::Owned(data),
        shape: [files.len(), 3, frames, MSR_JOINTS, 1],
        labels,
        names,
        num_classes: MSR_CLASSES,
        layout,
        source: dir.to_path_buf(),
    })
}

/// [`read_msr_dir_frames`] with the default 50 frames.
pub fn read_msr_dir(dir: &Path, subjects: Option<&[u32]>) -> Result<SkeletonDataset> {
    read_msr_dir_frames(dir, subjects, MSR_DEFAULT_FRAMES)
}

/// Subjects of the cross-subject part `part` (`train`; `val`/`test`; `all`/None = every subject).
pub fn subjects_of_part(part: Option<&str>) -> Result<Option<Vec<u32>>> {
    match part {
        None | Some("all") => Ok(None),
        Some("train") => Ok(Some(MSR_TRAIN_SUBJECTS.to_vec())),
        Some("val") | Some("test") => Ok(Some(
            (1..=10)
                .filter(|s| !MSR_TRAIN_SUBJECTS.contains(s))
                .collect(),
        )),
        Some(o) => Err(Error::config(format!(
            "unknown MSR part {o:?} (train | val | test | all)"
        ))),
    }
}

/// The standard cross-subject split: (train = subjects 1,3,5,7,9; test = 2,4,6,8,10).
pub fn msr_cross_subject(dir: &Path, frames: usize) -> Result<(SkeletonDataset, SkeletonDataset)> {
    let train = read_msr_dir_frames(dir, subjects_of_part(Some("train"))?.as_deref(), frames)?;
    let test = read_msr_dir_frames(dir, subjects_of_part(Some("test"))?.as_deref(), frames)?;
    Ok((train, test))
}

/// `prepare msr`: writes the cross-subject split in the generic format:
/// `<out>/{train,val}_position.npy` (N, 3, frames, 20, 1) and `<out>/{train,val}_label.pkl`.
/// Returns the (train, val) sample counts. Read back with layout `msr20`.
pub fn prepare_msr(raw: &Path, out: &Path, frames: usize) -> Result<(usize, usize)> {
    let (train, val) = msr_cross_subject(raw, frames)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    for (part, ds) in [("train", &train), ("val", &val)] {
        crate::data::npy::write_f32(
            &out.join(format!("{part}_position.npy")),
            &ds.shape,
            ds.data.as_slice(),
        )?;
        crate::data::pickle::write_labels(
            &out.join(format!("{part}_label.pkl")),
            &ds.names,
            &ds.labels,
        )?;
    }
    Ok((train.len(), val.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let n = MsrName::parse("a02_s10_e03_skeleton3D.txt").unwrap();
        assert_eq!((n.action, n.subject, n.repetition), (2, 10, 3));
        assert_eq!(n.id(), "a02_s10_e03");
        assert!(MsrName::parse("a2_s10_e03_skeleton3D.txt").is_none());
    }

    #[test]
    fn truncated_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a01_s01_e01_skeleton3D.txt");
        std::fs::write(&p, "0 0 0 1\n".repeat(21)).unwrap();
        let e = read_msr_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("a01_s01_e01") && e.contains("whole number"),
            "{e}"
        );
        std::fs::write(&p, "0 0 x 1\n").unwrap();
        let e = read_msr_file(&p).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("not a number"), "{e}");
    }
}
