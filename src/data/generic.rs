//! `prepare generic`: any supported skeleton format in, the training files out, with the official
//! 50-frame preprocessing generalised by the layout (reference doc 1.4 for NTU):
//!
//! ```text
//! <out>/{train,val}_position.npy   float32 (N, C, frames, V, M), preprocessed (below)
//! <out>/{train,val}_label.pkl      (names, 0-based labels), as the official label pickles
//! <out>/dataset.toml               layout, class count, shapes, reader, preprocessing settings
//! <out>/classes.txt                class names, one per line, where the format has them (Kinetics)
//! ```
//!
//! Each sample `x` of shape `(C, T, V, M_in)` as the reader returns it (`T` = the frames the source
//! holds for it, no padding; `C` = 2 or 3 coordinates, plus the keypoint score as the last channel
//! with `--score-channel`) becomes one row:
//! 1. **checks**: `V` must equal the layout's joint count; every value must be finite (NaN or
//!    infinite keypoints are an error naming the frame, joint and body);
//! 2. **bodies**: the first `M` bodies are kept in the reader's order (missing ones are zeros);
//! 3. **true length**: a frame is valid when any coordinate of any kept body is non-zero; invalid
//!    frames (padding, and dropped frames inside the sequence) are removed, the `L` valid frames
//!    keep their order; no valid frame at all is an error ("zero valid frames");
//! 4. **centring**: in every frame and body, the layout's centre joint is subtracted from every
//!    joint (coordinate channels only); a joint whose coordinates are all exactly 0 (a missing
//!    keypoint, or a body absent from the frame) stays 0. On NTU-like data this is the official
//!    centring (a real joint is never exactly at the origin);
//! 5. **resize**: the `L` kept frames are resized to `frames` rows with OpenCV's `INTER_LINEAR`
//!    rule ([`preprocess::resize_rows`], default arithmetic bit-exact to the opencv-python wheels);
//! 6. **y-rotation** (3D data only, skipped for 2D): per frame and body, the shoulder vector of
//!    the layout is rotated onto +x ([`preprocess::rotate_y`], the official rule and sign);
//! 7. **normalisation** (`--normalize minmax`, the P&C / CTR-GCN NW-UCLA scaling): per sample
//!    and coordinate channel, `x' = 2 (x - min) / (max - min) - 1` with min / max over all frames,
//!    joints and bodies present in that frame (a body's all-zero frames are left at zero); a
//!    channel with `max == min` becomes 0.
//!
//! The score channel is resized with the coordinates but neither centred, rotated nor normalised.
//! Samples are read and preprocessed in parallel and written straight to their rows of `.tmp`
//! outputs, renamed only when everything succeeded; with `--on-error skip` a sample that fails is
//! reported (file, sample, problem) and left out, with `fail` the first failure stops the run and
//! removes every `.tmp` file.
use crate::data::layout::Layout;
use crate::data::npy::{self, NpyRowWriter};
use crate::data::pickle;
use crate::data::prepare::{FileProblem, OnError};
use crate::data::preprocess::{self, ResizeRule};
use crate::data::readers;
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The readers `prepare generic` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// pyskl / mmaction2 annotation pickle (one file).
    Pyskl,
    /// NW-UCLA per-sample JSON as distributed by CTR-GCN (a folder of `aXX_sYY_eZZ_vWW.json`).
    UclaJson,
    /// PKU-MMD skeleton text files + label files of action intervals.
    PkuMmd,
    /// ST-GCN's Kinetics-skeleton per-video JSON (OpenPose-18 + scores).
    KineticsJson,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Pyskl => "pyskl",
            Format::UclaJson => "ucla-json",
            Format::PkuMmd => "pku-mmd",
            Format::KineticsJson => "kinetics-json",
        }
    }
    /// The layout a format's data follow unless told otherwise.
    pub fn default_layout(self) -> Option<&'static str> {
        match self {
            Format::Pyskl => None,
            Format::UclaJson => Some("kinect20"),
            Format::PkuMmd => Some("pku25"),
            Format::KineticsJson => Some("openpose18"),
        }
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pyskl" | "pyskl-pickle" => Ok(Format::Pyskl),
            "ucla-json" | "ucla" | "nw-ucla" | "json" => Ok(Format::UclaJson),
            "pku-mmd" | "pkummd" | "pku" => Ok(Format::PkuMmd),
            "kinetics-json" | "kinetics" | "kinetics-skeleton" => Ok(Format::KineticsJson),
            o => Err(Error::config(format!(
                "unknown --format {o:?} (pyskl | ucla-json | pku-mmd | kinetics-json)"
            ))),
        }
    }
}

/// Per-sample scaling after the preprocessing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Normalize {
    #[default]
    None,
    /// Per sample and coordinate channel to [-1, 1].
    MinMax,
}

impl std::str::FromStr for Normalize {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Normalize::None),
            "minmax" => Ok(Normalize::MinMax),
            o => Err(Error::config(format!(
                "unknown --normalize {o:?} (none | minmax)"
            ))),
        }
    }
}

/// Training or validation part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Train,
    Val,
}

/// One sample as a reader returns it.
#[derive(Debug, Clone)]
pub struct RawSample {
    /// `(C, T, V, M)` float32, C order; `T` = frames of the source, no padding.
    pub data: Vec<f32>,
    pub shape: [usize; 4],
    /// Label found while reading (0-based), when the listing did not know it.
    pub label: Option<i64>,
}

/// Reads one sample (runs on a worker thread).
pub type Loader = Box<dyn FnOnce() -> Result<RawSample> + Send>;

/// One sample of a listing: its name, where it comes from, what is known before reading it.
pub struct Entry {
    pub name: String,
    /// File to name in errors.
    pub file: PathBuf,
    pub label: Option<i64>,
    pub part: Option<Part>,
    pub load: Loader,
}

/// What a reader lists before any sample is read.
pub struct Listing {
    pub entries: Vec<Entry>,
    /// Coordinates per joint (2 or 3), not counting a score channel.
    pub coords: usize,
    /// Whether each sample carries the keypoint score as a last channel.
    pub score_channel: bool,
    /// Samples the reader left out on purpose (e.g. Kinetics videos without skeleton).
    pub excluded: Vec<FileProblem>,
    /// How the split was decided (for the summary).
    pub split: String,
    /// Class names by label, where the format has them (written to `classes.txt`).
    pub class_names: std::collections::BTreeMap<i64, String>,
}

/// Settings of [`prepare_generic`].
#[derive(Debug, Clone)]
pub struct GenericConfig {
    pub format: Format,
    /// Input file or folder of the format.
    pub input: PathBuf,
    /// Label file or folder where the format keeps labels apart (PKU-MMD).
    pub labels: Option<PathBuf>,
    pub out: PathBuf,
    /// Layout name or file (None: the format's default).
    pub layout: Option<String>,
    /// Output frames (official 50).
    pub frames: usize,
    /// Bodies kept (M).
    pub bodies: usize,
    pub normalize: Normalize,
    /// Split: a protocol name of the dataset (pyskl split names, `xview`, `xsub`) or None
    /// for the dataset's default.
    pub split: Option<String>,
    /// A list file naming the training (and optionally validation) samples.
    pub split_file: Option<PathBuf>,
    /// Keep keypoint scores as an extra channel (2D data).
    pub score_channel: bool,
    pub on_error: OnError,
    pub threads: usize,
    pub progress: bool,
    pub resize: ResizeRule,
}

impl GenericConfig {
    pub fn new(format: Format, input: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        GenericConfig {
            format,
            input: input.into(),
            labels: None,
            out: out.into(),
            layout: None,
            frames: crate::data::prepare::DEFAULT_OUT_FRAMES,
            bodies: 2,
            normalize: Normalize::None,
            split: None,
            split_file: None,
            score_channel: false,
            on_error: OnError::Skip,
            threads: 0,
            progress: false,
            resize: ResizeRule::default(),
        }
    }
}

/// Counts of one written part.
#[derive(Debug, Clone)]
pub struct PartCount {
    pub part: &'static str,
    pub samples: usize,
    pub shape: [usize; 5],
}

/// What [`prepare_generic`] did.
#[derive(Debug, Clone, Default)]
pub struct GenericSummary {
    pub format: String,
    pub layout: String,
    pub listed: usize,
    pub written: usize,
    pub num_classes: usize,
    pub split: String,
    pub parts: Vec<PartCount>,
    /// Left out by the reader on purpose.
    pub excluded: Vec<FileProblem>,
    /// Samples that failed (skipped with `--on-error skip`).
    pub failed: Vec<FileProblem>,
    pub out: PathBuf,
    pub seconds: f64,
}

impl fmt::Display for GenericSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} samples listed ({} reader, layout {}, split {}): {} written, {} skipped, {} excluded by the reader ({:.1} s)",
            self.listed,
            self.format,
            self.layout,
            self.split,
            self.written,
            self.failed.len(),
            self.excluded.len(),
            self.seconds
        )?;
        for p in &self.parts {
            writeln!(
                f,
                "  {}: {} samples {:?} -> {}",
                p.part,
                p.samples,
                p.shape,
                self.out.join(format!("{}_position.npy", p.part)).display()
            )?;
        }
        writeln!(
            f,
            "  {} classes; dataset.toml names the layout",
            self.num_classes
        )?;
        for (what, list) in [
            ("skipped samples", &self.failed),
            ("excluded by the reader", &self.excluded),
        ] {
            if !list.is_empty() {
                writeln!(f, "  {what}:")?;
                for p in list.iter().take(20) {
                    writeln!(f, "    {}", p.reason)?;
                }
                if list.len() > 20 {
                    writeln!(f, "    ... and {} more", list.len() - 20)?;
                }
            }
        }
        Ok(())
    }
}

/// The preprocessing of one sample (module doc, steps 1-7): `(C, T, V, M_in)` ->
/// `(C, frames, V, bodies)`. `coords` = coordinate channels (the rest, if any, is the score).
pub fn preprocess_generic(
    raw: &RawSample,
    coords: usize,
    layout: &Layout,
    frames: usize,
    bodies: usize,
    normalize: Normalize,
    rule: ResizeRule,
) -> std::result::Result<Vec<f32>, String> {
    let [c_len, t_len, v_len, m_in] = raw.shape;
    if raw.data.len() != c_len * t_len * v_len * m_in {
        return Err(format!(
            "{} values for shape {:?}",
            raw.data.len(),
            raw.shape
        ));
    }
    if c_len < coords {
        return Err(format!("{c_len} channels, expected {coords} coordinates"));
    }
    if v_len != layout.num_joints() {
        return Err(format!(
            "{v_len} joints per body, but layout {} has {} (choose the layout with --layout)",
            layout.name,
            layout.num_joints()
        ));
    }
    let at = |c: usize, t: usize, v: usize, m: usize| ((c * t_len + t) * v_len + v) * m_in + m;
    if let Some(i) = raw.data.iter().position(|x| !x.is_finite()) {
        let m = i % m_in;
        let v = (i / m_in) % v_len;
        let t = (i / (m_in * v_len)) % t_len;
        let c = i / (m_in * v_len * t_len);
        return Err(format!(
            "non-finite keypoint {} at frame {t}, joint {v}, body {m}, channel {c}",
            raw.data[i]
        ));
    }
    let m_keep = m_in.min(bodies);
    let present = |t: usize, m: usize| -> bool {
        (0..coords).any(|c| (0..v_len).any(|v| raw.data[at(c, t, v, m)] != 0.0))
    };
    let valid = |t: usize| (0..m_keep).any(|m| present(t, m));
    let kept: Vec<usize> = (0..t_len).filter(|&t| valid(t)).collect();
    if kept.is_empty() {
        return Err(format!(
            "zero valid frames: all {t_len} frames are zero in the kept bodies"
        ));
    }
    let len = kept.len();
    // (C, len, V, bodies), centred.
    let shape = [c_len, len, v_len, bodies];
    let mut x = vec![0f32; c_len * len * v_len * bodies];
    let ix = |c: usize, t: usize, v: usize, m: usize| ((c * len + t) * v_len + v) * bodies + m;
    for c in 0..c_len {
        for t in 0..len {
            for m in 0..m_keep {
                let origin = if c < coords {
                    raw.data[at(c, kept[t], layout.center, m)]
                } else {
                    0.0
                };
                for v in 0..v_len {
                    // A missing joint (all coordinates exactly 0) stays 0.
                    let missing = (0..coords).all(|k| raw.data[at(k, kept[t], v, m)] == 0.0);
                    let y = raw.data[at(c, kept[t], v, m)];
                    x[ix(c, t, v, m)] = if missing && c < coords {
                        0.0
                    } else {
                        y - origin
                    };
                }
            }
        }
    }
    let mut out = preprocess::resize_rows(&x, shape, len, frames, rule);
    if coords == 3 {
        let out_shape = [3, frames, v_len, bodies];
        if c_len != 3 {
            return Err(format!(
                "3D data with {c_len} channels: the score channel is for 2D data only"
            ));
        }
        preprocess::rotate_y(&mut out, out_shape, layout.shoulders);
    }
    if normalize == Normalize::MinMax {
        let ox =
            |c: usize, t: usize, v: usize, m: usize| ((c * frames + t) * v_len + v) * bodies + m;
        // A body is present in an output frame when any of its coordinates is non-zero before
        // centring; after centring the centre joint is 0, so test the resized raw frames instead.
        let mask: Vec<bool> = {
            let mut pres = vec![0f32; len * bodies];
            for t in 0..len {
                for m in 0..m_keep {
                    pres[t * bodies + m] = if present(kept[t], m) { 1.0 } else { 0.0 };
                }
            }
            let r = preprocess::resize_rows(&pres, [1, len, 1, bodies], len, frames, rule);
            r.iter().map(|&p| p > 0.0).collect()
        };
        for c in 0..coords {
            let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
            for t in 0..frames {
                for m in 0..bodies {
                    if mask[t * bodies + m] {
                        for v in 0..v_len {
                            let y = out[ox(c, t, v, m)];
                            lo = lo.min(y);
                            hi = hi.max(y);
                        }
                    }
                }
            }
            let range = hi - lo;
            for t in 0..frames {
                for m in 0..bodies {
                    for v in 0..v_len {
                        let y = &mut out[ox(c, t, v, m)];
                        *y = if !mask[t * bodies + m]
                            || range.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
                        {
                            0.0
                        } else {
                            2.0 * (*y - lo) / range - 1.0
                        };
                    }
                }
            }
        }
    }
    Ok(out)
}

/// A split file, one of: a split column (`name,train` / `name,val` per line, optional header);
/// plain names (one per line or comma-separated: the training set, everything else is
/// validation); or sections whose header line contains `train` or `val`/`test` (e.g. PKU-MMD's
/// `cross-subject.txt`: `Training videos:` then the names).
pub fn read_split_file(path: &Path) -> Result<HashMap<String, Part>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut map = HashMap::new();
    // A split column: every line `name,part` (or tab / space separated), part = train | val |
    // test (a header line `name,split` is allowed).
    let rows: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split([',', '\t', ' '])
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .collect()
        })
        .collect();
    let part_of = |f: &str| match f.to_ascii_lowercase().as_str() {
        "train" | "training" => Some(Part::Train),
        "val" | "valid" | "validation" | "test" => Some(Part::Val),
        _ => None,
    };
    let body = match rows.first() {
        Some(h) if h.len() == 2 && part_of(h[1]).is_none() => &rows[1..],
        _ => &rows[..],
    };
    if !body.is_empty() && body.iter().all(|r| r.len() == 2 && part_of(r[1]).is_some()) {
        for r in body {
            map.insert(r[0].to_string(), part_of(r[1]).unwrap_or(Part::Val));
        }
        return Ok(map);
    }
    let mut current = Part::Train;
    let mut headers = 0;
    for line in text.lines() {
        let lower = line.to_ascii_lowercase();
        let mut rest = line;
        let header = lower.trim_end().ends_with(':')
            || (!lower.contains(',') && (lower.contains("video") || lower.contains(':')));
        if header {
            current = if lower.contains("train") {
                Part::Train
            } else if lower.contains("val") || lower.contains("test") {
                Part::Val
            } else if headers == 0 {
                Part::Train
            } else {
                Part::Val
            };
            headers += 1;
            rest = line.split_once(':').map(|(_, r)| r).unwrap_or("");
        }
        for name in rest.split([',', ' ', '\t']).map(str::trim) {
            if !name.is_empty() {
                map.insert(name.to_string(), current);
            }
        }
    }
    if map.is_empty() {
        return Err(Error::input(path, "split file", "no sample name in it"));
    }
    Ok(map)
}

/// Runs the whole preparation (module doc). Returns the summary; the caller prints it.
pub fn prepare_generic(cfg: &GenericConfig) -> Result<GenericSummary> {
    let start = std::time::Instant::now();
    if cfg.frames == 0 {
        return Err(Error::config("--frames must be at least 1"));
    }
    if cfg.bodies == 0 {
        return Err(Error::config("--bodies must be at least 1"));
    }
    let layout_name = cfg
        .layout
        .clone()
        .or_else(|| cfg.format.default_layout().map(str::to_string))
        .ok_or_else(|| {
            Error::config(format!(
                "--format {} needs --layout (e.g. coco17 for 2D pyskl pickles, ntu25 for 3D)",
                cfg.format.name()
            ))
        })?;
    let layout = Layout::resolve(&layout_name)?;
    if cfg.labels.is_some() && cfg.format != Format::PkuMmd {
        return Err(Error::config(format!(
            "--labels is for --format pku-mmd; {} keeps its labels in the samples",
            cfg.format.name()
        )));
    }
    let listing = readers::list(cfg)?;
    if listing.coords != 2 && listing.coords != 3 {
        return Err(Error::input(
            &cfg.input,
            "data",
            format!("{} coordinates per joint (expected 2 or 3)", listing.coords),
        ));
    }
    let channels = listing.coords + usize::from(listing.score_channel);
    let split_map = match &cfg.split_file {
        Some(p) => Some(read_split_file(p)?),
        None => None,
    };
    let split_desc = match &cfg.split_file {
        Some(p) => format!("list {}", p.display()),
        None => listing.split.clone(),
    };
    let mut summary = GenericSummary {
        format: cfg.format.name().into(),
        layout: layout.name.clone(),
        listed: listing.entries.len(),
        split: split_desc.clone(),
        excluded: listing.excluded,
        out: cfg.out.clone(),
        ..Default::default()
    };

    // Rows of every part, decided before reading.
    struct Meta {
        name: String,
        file: PathBuf,
        label: Option<i64>,
        part: usize,
        row: usize,
    }
    let mut metas = Vec::with_capacity(listing.entries.len());
    let mut loaders = Vec::with_capacity(listing.entries.len());
    let mut counts = [0usize; 2];
    let mut failed: Vec<(usize, String)> = Vec::new();
    for e in listing.entries {
        let part = match &split_map {
            Some(m) => m
                .get(&e.name)
                .or_else(|| {
                    // PKU-MMD samples `<video>_<k>` match their video id.
                    let (video, k) = e.name.rsplit_once('_')?;
                    k.bytes()
                        .all(|b| b.is_ascii_digit())
                        .then(|| m.get(video))?
                })
                .copied()
                .or(if m.values().any(|p| *p == Part::Val) {
                    None
                } else {
                    Some(Part::Val)
                }),
            None => e.part,
        };
        let j = metas.len();
        let part_idx = match part {
            Some(Part::Train) => 0,
            Some(Part::Val) => 1,
            None => {
                failed.push((
                    j,
                    format!(
                        "{}: sample {}: in no split ({split_desc})",
                        e.file.display(),
                        e.name
                    ),
                ));
                2
            }
        };
        let row = if part_idx < 2 {
            counts[part_idx] += 1;
            counts[part_idx] - 1
        } else {
            0
        };
        metas.push(Meta {
            name: e.name,
            file: e.file,
            label: e.label,
            part: part_idx,
            row,
        });
        loaders.push(Some(e.load));
    }
    if cfg.on_error == OnError::Fail {
        if let Some((_, reason)) = failed.first() {
            return Err(Error::Other(reason.clone()));
        }
    }

    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, e))?;
    let parts = ["train", "val"];
    let shape = |n: usize| [n, channels, cfg.frames, layout.num_joints(), cfg.bodies];
    let mut writers = Vec::new();
    for (p, name) in parts.iter().enumerate() {
        writers.push(NpyRowWriter::create(
            &cfg.out.join(format!("{name}_position.npy")),
            &shape(counts[p]),
        )?);
    }

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.threads)
        .build()
        .map_err(|e| Error::Other(format!("thread pool: {e}")))?;
    let bar = if cfg.progress {
        indicatif::ProgressBar::new(metas.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} samples, {per_sec}, eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(format!("prepare {}", cfg.format.name()));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let found_labels: Mutex<Vec<(usize, i64)>> = Mutex::new(Vec::new());
    let errors: Mutex<Vec<(usize, String)>> = Mutex::new(Vec::new());
    let skip_now: std::collections::HashSet<usize> = failed.iter().map(|(j, _)| *j).collect();
    let jobs: Vec<(usize, Loader)> = loaders
        .into_iter()
        .enumerate()
        .filter(|(j, _)| !skip_now.contains(j))
        .filter_map(|(j, l)| l.map(|l| (j, l)))
        .collect();
    pool.install(|| {
        jobs.into_par_iter().for_each(|(j, load)| {
            use std::sync::atomic::Ordering;
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let m = &metas[j];
            let result = (|| -> std::result::Result<(), String> {
                let raw = load().map_err(|e| e.to_string())?;
                let label = m.label.or(raw.label).ok_or_else(|| {
                    format!(
                        "{}: sample {}: no label for this sample",
                        m.file.display(),
                        m.name
                    )
                })?;
                if label < 0 {
                    return Err(format!(
                        "{}: sample {}: negative label {label}",
                        m.file.display(),
                        m.name
                    ));
                }
                let row = preprocess_generic(
                    &raw,
                    listing.coords,
                    &layout,
                    cfg.frames,
                    cfg.bodies,
                    cfg.normalize,
                    cfg.resize,
                )
                .map_err(|e| format!("{}: sample {}: {e}", m.file.display(), m.name))?;
                if row.len() != writers[m.part].row_len() {
                    return Err(format!(
                        "{}: sample {}: {} channels, the first sample had {channels}",
                        m.file.display(),
                        m.name,
                        raw.shape[0]
                    ));
                }
                writers[m.part]
                    .write_row(m.row, &row)
                    .map_err(|e| e.to_string())?;
                lock(&found_labels).push((j, label));
                Ok(())
            })();
            if let Err(e) = result {
                if cfg.on_error == OnError::Fail {
                    stop.store(true, Ordering::Relaxed);
                }
                lock(&errors).push((j, e));
            }
            bar.inc(1);
        })
    });
    bar.finish_and_clear();
    failed.extend(errors.into_inner().unwrap_or_else(|p| p.into_inner()));
    failed.sort_by_key(|(j, _)| *j);
    if cfg.on_error == OnError::Fail && !failed.is_empty() {
        // Dropping the writers removes the .tmp files.
        return Err(Error::Other(failed.swap_remove(0).1));
    }
    let mut labels: Vec<Option<i64>> = vec![None; metas.len()];
    for (j, l) in found_labels.into_inner().unwrap_or_else(|p| p.into_inner()) {
        labels[j] = Some(l);
    }
    let bad: std::collections::HashSet<usize> = failed.iter().map(|(j, _)| *j).collect();
    for (j, reason) in failed {
        summary.failed.push(FileProblem {
            file: metas[j].name.clone(),
            reason,
        });
    }
    let num_classes = labels
        .iter()
        .flatten()
        .max()
        .map(|&m| m as usize + 1)
        .unwrap_or(0);
    let mut written = 0;
    for (p, writer) in writers.into_iter().enumerate() {
        // Job index of each row of this part.
        let mut rows: Vec<usize> = vec![usize::MAX; counts[p]];
        for (j, m) in metas.iter().enumerate() {
            if m.part == p {
                rows[m.row] = j;
            }
        }
        let keep: Vec<usize> = (0..rows.len())
            .filter(|&r| !bad.contains(&rows[r]))
            .collect();
        let names: Vec<String> = keep.iter().map(|&r| metas[rows[r]].name.clone()).collect();
        let labs: Vec<i64> = keep.iter().map(|&r| labels[rows[r]].unwrap_or(0)).collect();
        let writer = if keep.len() == rows.len() {
            writer
        } else {
            writer.compact(&keep)?
        };
        pickle::write_labels(
            &cfg.out.join(format!("{}_label.pkl", parts[p])),
            &names,
            &labs,
        )?;
        writer.finish()?;
        written += keep.len();
        summary.parts.push(PartCount {
            part: parts[p],
            samples: keep.len(),
            shape: shape(keep.len()),
        });
    }
    summary.written = written;
    summary.num_classes = num_classes;
    let builtin = Layout::builtins().contains(&layout);
    let layout_ref = if builtin {
        layout.name.clone()
    } else {
        // A layout file: copy it next to the data so the folder is self-contained.
        let src = PathBuf::from(&layout_name);
        let dst_name = format!(
            "layout.{}",
            src.extension().and_then(|e| e.to_str()).unwrap_or("toml")
        );
        let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
        npy::write_atomic(&cfg.out.join(&dst_name), &bytes)?;
        dst_name
    };
    let info = format!(
        "# Written by `crossclr prepare generic` ({reader} reader).\n\
         # Data: float32 N x C x T x V x M; per-frame centred on joint {center} ({center_name}), true length resized to {frames} frames{rot}{norm}.\n\
         layout = \"{layout_ref}\"\n\
         num_classes = {num_classes}\n\
         channels = {channels}\n\
         coordinates = {coords}\n\
         score_channel = {score}\n\
         frames = {frames}\n\
         bodies = {bodies}\n\
         normalize = \"{normalize}\"\n\
         split = \"{split}\"\n\
         train_shape = {train_shape:?}\n\
         val_shape = {val_shape:?}\n\
         source = \"{source}\"\n",
        reader = cfg.format.name(),
        center = layout.center + 1,
        center_name = layout.joint_names[layout.center],
        frames = cfg.frames,
        rot = if listing.coords == 3 {
            ", shoulders rotated onto +x about y"
        } else {
            " (2D: no rotation)"
        },
        norm = if cfg.normalize == Normalize::MinMax {
            ", min-max scaled to [-1, 1] per sample"
        } else {
            ""
        },
        coords = listing.coords,
        score = listing.score_channel,
        bodies = cfg.bodies,
        normalize = match cfg.normalize {
            Normalize::None => "none",
            Normalize::MinMax => "minmax",
        },
        split = split_desc.replace('"', "'"),
        train_shape = summary.parts[0].shape,
        val_shape = summary.parts[1].shape,
        source = cfg.input.display().to_string().replace('"', "'"),
    );
    if !listing.class_names.is_empty() {
        let mut text: String = (0..num_classes as i64)
            .map(|k| {
                listing
                    .class_names
                    .get(&k)
                    .cloned()
                    .unwrap_or_else(|| k.to_string())
            })
            .collect::<Vec<_>>()
            .join("\n");
        text.push('\n');
        npy::write_atomic(&cfg.out.join("classes.txt"), text.as_bytes())?;
    }
    npy::write_atomic(&cfg.out.join("dataset.toml"), info.as_bytes())?;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(
        c: usize,
        t: usize,
        v: usize,
        m: usize,
        f: impl Fn(usize, usize, usize, usize) -> f32,
    ) -> RawSample {
        let mut data = vec![0f32; c * t * v * m];
        for ci in 0..c {
            for ti in 0..t {
                for vi in 0..v {
                    for mi in 0..m {
                        data[((ci * t + ti) * v + vi) * m + mi] = f(ci, ti, vi, mi);
                    }
                }
            }
        }
        RawSample {
            data,
            shape: [c, t, v, m],
            label: None,
        }
    }

    #[test]
    fn trims_padding_centres_and_resizes_2d() {
        let layout = Layout::coco17();
        // 6 frames, the last two all zero (padding), 2D, 1 body.
        let r = raw(2, 6, 17, 1, |c, t, v, _| {
            if t >= 4 {
                0.0
            } else {
                (t * 10 + v) as f32 + c as f32 * 100.0
            }
        });
        let out = preprocess_generic(&r, 2, &layout, 4, 2, Normalize::None, ResizeRule::default())
            .unwrap();
        assert_eq!(out.len(), 2 * 4 * 17 * 2);
        // L = 4 = frames: a copy; joint v minus nose (v = 0) = v; second body zero.
        for c in 0..2 {
            for t in 0..4 {
                for v in 0..17 {
                    assert_eq!(out[((c * 4 + t) * 17 + v) * 2], v as f32);
                    assert_eq!(out[((c * 4 + t) * 17 + v) * 2 + 1], 0.0);
                }
            }
        }
    }

    #[test]
    fn split_files_in_three_forms() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.txt");
        std::fs::write(&p, "name,split\na,train\nb,val\nc,test\n").unwrap();
        let m = read_split_file(&p).unwrap();
        assert_eq!(
            (m["a"], m["b"], m["c"]),
            (Part::Train, Part::Val, Part::Val)
        );
        std::fs::write(&p, "a\nb, c\n").unwrap();
        let m = read_split_file(&p).unwrap();
        assert_eq!((m.len(), m["c"]), (3, Part::Train));
        std::fs::write(&p, "Training videos: \na, b\nValidataion videos: \nc\n").unwrap();
        let m = read_split_file(&p).unwrap();
        assert_eq!((m["b"], m["c"]), (Part::Train, Part::Val));
    }

    #[test]
    fn missing_joints_stay_zero() {
        let layout = Layout::coco17();
        let r = raw(2, 4, 17, 1, |_, t, v, _| {
            if v == 3 && t == 1 {
                0.0
            } else {
                10.0 + v as f32
            }
        });
        let out = preprocess_generic(&r, 2, &layout, 4, 1, Normalize::None, ResizeRule::default())
            .unwrap();
        for c in 0..2 {
            assert_eq!(out[(c * 4 + 1) * 17 + 3], 0.0);
            assert_eq!(out[(c * 4 + 2) * 17 + 3], 3.0);
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let layout = Layout::coco17();
        let zero = raw(2, 3, 17, 1, |_, _, _, _| 0.0);
        let e = preprocess_generic(
            &zero,
            2,
            &layout,
            4,
            1,
            Normalize::None,
            ResizeRule::default(),
        )
        .unwrap_err();
        assert!(e.contains("zero valid frames"), "{e}");
        let joints = raw(2, 3, 18, 1, |_, _, _, _| 1.0);
        let e = preprocess_generic(
            &joints,
            2,
            &layout,
            4,
            1,
            Normalize::None,
            ResizeRule::default(),
        )
        .unwrap_err();
        assert!(e.contains("18 joints") && e.contains("coco17"), "{e}");
        let nan = raw(2, 3, 17, 1, |c, t, v, _| {
            if (c, t, v) == (1, 2, 5) {
                f32::NAN
            } else {
                1.0
            }
        });
        let e = preprocess_generic(
            &nan,
            2,
            &layout,
            4,
            1,
            Normalize::None,
            ResizeRule::default(),
        )
        .unwrap_err();
        assert!(e.contains("frame 2, joint 5, body 0, channel 1"), "{e}");
    }

    #[test]
    fn minmax_scales_each_channel_to_unit_range() {
        let layout = Layout::kinect20();
        let r = raw(3, 5, 20, 1, |c, t, v, _| {
            (v as f32 * 0.1 + t as f32) * (c + 1) as f32 + 1.0
        });
        let out = preprocess_generic(
            &r,
            3,
            &layout,
            5,
            1,
            Normalize::MinMax,
            ResizeRule::default(),
        )
        .unwrap();
        for c in 0..3 {
            let ch = &out[c * 100..(c + 1) * 100];
            let lo = ch.iter().cloned().fold(f32::INFINITY, f32::min);
            let hi = ch.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert!(
                (lo + 1.0).abs() < 1e-6 && (hi - 1.0).abs() < 1e-6,
                "{c}: {lo} {hi}"
            );
        }
    }
}
