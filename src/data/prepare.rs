//! `prepare ntu60|ntu120`: a raw `.skeleton` corpus -> the official files of `tools/ntu_gendata.py`
//! and `feeder/preprocess_ntu.py`, for several benchmarks at once:
//!
//! ```text
//! <out>/<benchmark>/{train,val}_data.npy      float32 (N, 3, 300, 25, 2), zero padded
//! <out>/<benchmark>/{train,val}_label.pkl     (names with ".skeleton", 0-based labels)
//! <out>/<benchmark>/{train,val}_position.npy  float32 (N, 3, 50, 25, 2), official preprocessing
//! ```
//!
//! Samples are in sorted file-name order; the official missing-skeleton list of the version is
//! skipped; for NTU-60 only setups S001-S017 are taken (so an NTU-120 folder can be used too). Each
//! file is parsed and preprocessed once, in parallel, and its rows are written straight into every
//! output at their precomputed positions (`.tmp` files, renamed only when everything succeeded).
//! With `OnError::Skip` a file that fails to parse is reported and left out (the outputs are then
//! compacted); with `OnError::Fail` the first failure stops the run and removes the `.tmp` files.
//!
//! Frames beyond `max_frames` (300): the official code would fail to copy such a file into its
//! 300-frame array; we keep the first 300 frames and count the file in the summary. NTU files
//! have at most 300 frames, so this only concerns other corpora in NTU format.
use crate::data::layout::Layout;
use crate::data::npy::NpyRowWriter;
use crate::data::ntu::{self, NtuName, NTU_JOINTS, NTU_MAX_BODIES};
use crate::data::pickle;
use crate::data::preprocess;
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Frames of the raw database (official `max_frame`).
pub const RAW_FRAMES: usize = 300;
/// Frames of the preprocessed training data (official `t_length`).
pub const DEFAULT_OUT_FRAMES: usize = 50;
/// Last setup of NTU RGB+D 60 (NTU-120 adds S018-S032).
const NTU60_LAST_SETUP: u32 = 17;

/// NTU-60 cross-subject training performers (`ntu_gendata.py`).
pub const NTU60_TRAIN_SUBJECTS: [u32; 20] = [
    1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38,
];
/// NTU-120 cross-subject training performers added to the NTU-60 ones (the standard protocol).
pub const NTU120_EXTRA_TRAIN_SUBJECTS: [u32; 33] = [
    45, 46, 47, 49, 50, 52, 53, 54, 55, 56, 57, 58, 59, 70, 74, 78, 80, 81, 82, 83, 84, 85, 86, 89,
    91, 92, 93, 94, 95, 97, 98, 100, 103,
];
/// Cross-view training cameras.
pub const XVIEW_TRAIN_CAMERAS: [u32; 2] = [2, 3];

/// Which NTU release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NtuVersion {
    Ntu60,
    Ntu120,
}

impl NtuVersion {
    pub fn name(self) -> &'static str {
        match self {
            NtuVersion::Ntu60 => "ntu60",
            NtuVersion::Ntu120 => "ntu120",
        }
    }
    /// The official benchmarks of this version.
    pub fn default_benchmarks(self) -> Vec<Benchmark> {
        match self {
            NtuVersion::Ntu60 => vec![Benchmark::Xsub, Benchmark::Xview],
            NtuVersion::Ntu120 => vec![Benchmark::Xsub, Benchmark::Xset],
        }
    }
    /// Sample ids of the official missing-skeleton list.
    pub fn missing_ids(self) -> Vec<String> {
        ntu::missing_ids(match self {
            NtuVersion::Ntu60 => ntu::NTU60_MISSING_LIST,
            NtuVersion::Ntu120 => ntu::NTU120_MISSING_LIST,
        })
    }
    /// Whether a sample belongs to this release.
    pub fn contains(self, n: &NtuName) -> bool {
        match self {
            NtuVersion::Ntu60 => n.setup >= 1 && n.setup <= NTU60_LAST_SETUP,
            NtuVersion::Ntu120 => true,
        }
    }
}

impl std::str::FromStr for NtuVersion {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ntu60" | "ntu" | "ntu-rgb+d" => Ok(NtuVersion::Ntu60),
            "ntu120" | "ntu-rgb+d120" => Ok(NtuVersion::Ntu120),
            o => Err(Error::config(format!(
                "unknown NTU version {o:?} (ntu60 | ntu120)"
            ))),
        }
    }
}

/// An evaluation benchmark (train/val split rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Benchmark {
    /// Cross-subject: training performers listed above.
    Xsub,
    /// Cross-view (NTU-60): cameras 2 and 3 train, camera 1 val.
    Xview,
    /// Cross-setup (NTU-120): even setup ids train.
    Xset,
}

impl Benchmark {
    pub fn name(self) -> &'static str {
        match self {
            Benchmark::Xsub => "xsub",
            Benchmark::Xview => "xview",
            Benchmark::Xset => "xset",
        }
    }
    /// Whether sample `n` is in the training part of this benchmark of `version`.
    pub fn is_train(self, version: NtuVersion, n: &NtuName) -> bool {
        match self {
            Benchmark::Xsub => {
                NTU60_TRAIN_SUBJECTS.contains(&n.performer)
                    || (version == NtuVersion::Ntu120
                        && NTU120_EXTRA_TRAIN_SUBJECTS.contains(&n.performer))
            }
            Benchmark::Xview => XVIEW_TRAIN_CAMERAS.contains(&n.camera),
            Benchmark::Xset => n.setup.is_multiple_of(2),
        }
    }
}

impl std::str::FromStr for Benchmark {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "xsub" | "x-sub" | "cs" => Ok(Benchmark::Xsub),
            "xview" | "x-view" | "cv" => Ok(Benchmark::Xview),
            "xset" | "x-set" => Ok(Benchmark::Xset),
            o => Err(Error::config(format!(
                "unknown benchmark {o:?} (xsub | xview | xset)"
            ))),
        }
    }
}

/// What to do with a file that fails to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Report it, leave it out, and go on (the default).
    Skip,
    /// Stop and fail the run (no output file is created).
    Fail,
}

impl std::str::FromStr for OnError {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "skip" => Ok(OnError::Skip),
            "fail" => Ok(OnError::Fail),
            o => Err(Error::config(format!(
                "unknown --on-error {o:?} (skip | fail)"
            ))),
        }
    }
}

/// Settings of [`prepare_ntu`].
#[derive(Debug, Clone)]
pub struct PrepareConfig {
    pub version: NtuVersion,
    /// Folder of raw `.skeleton` files.
    pub raw: PathBuf,
    /// Output root; one sub-folder per benchmark.
    pub out: PathBuf,
    pub benchmarks: Vec<Benchmark>,
    pub on_error: OnError,
    /// Worker threads (0 = rayon's default, all cores).
    pub threads: usize,
    /// Frames of `*_position.npy` (official 50).
    pub out_frames: usize,
    /// Frames of `*_data.npy` (official 300).
    pub max_frames: usize,
    /// Show a progress bar.
    pub progress: bool,
    /// Arithmetic of the linear time resize (default: bit-exact to the opencv-python wheels).
    pub resize: preprocess::ResizeRule,
}

impl PrepareConfig {
    /// Official settings for `version` (both benchmarks, skip bad files, 300 and 50 frames).
    pub fn new(version: NtuVersion, raw: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        PrepareConfig {
            version,
            raw: raw.into(),
            out: out.into(),
            benchmarks: version.default_benchmarks(),
            on_error: OnError::Skip,
            threads: 0,
            out_frames: DEFAULT_OUT_FRAMES,
            max_frames: RAW_FRAMES,
            progress: false,
            resize: preprocess::ResizeRule::default(),
        }
    }
}

/// One file left out, with the reason.
#[derive(Debug, Clone)]
pub struct FileProblem {
    pub file: String,
    pub reason: String,
}

/// Counts of one written split.
#[derive(Debug, Clone)]
pub struct SplitCount {
    pub benchmark: Benchmark,
    pub part: &'static str,
    pub samples: usize,
    pub dir: PathBuf,
}

/// What [`prepare_ntu`] did.
#[derive(Debug, Clone, Default)]
pub struct PrepareSummary {
    /// `.skeleton` files in the folder.
    pub listed: usize,
    /// Skipped because they are in the official missing-skeleton list.
    pub missing_list: usize,
    /// Skipped because they belong to another release (NTU-120 setups when preparing NTU-60).
    pub other_release: usize,
    /// Files read successfully (= samples in every benchmark's train + val).
    pub parsed: usize,
    /// Files left out: bad name or parse error.
    pub failed: Vec<FileProblem>,
    pub splits: Vec<SplitCount>,
    /// Files longer than `max_frames` (kept, cut to their first `max_frames` frames).
    pub truncated: Vec<String>,
    /// Files with a frame holding more than two bodies (the extra bodies are dropped).
    pub more_than_two_bodies: usize,
    /// Samples whose body 0 has no non-zero frame: their position rows are all zero.
    pub empty_sequences: Vec<String>,
    pub seconds: f64,
}

impl fmt::Display for PrepareSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} .skeleton files listed: {} in the missing-skeleton list, {} of another release, {} parsed, {} failed ({:.1} s)",
            self.listed,
            self.missing_list,
            self.other_release,
            self.parsed,
            self.failed.len(),
            self.seconds
        )?;
        for s in &self.splits {
            writeln!(
                f,
                "  {}/{}: {} samples -> {}",
                s.benchmark.name(),
                s.part,
                s.samples,
                s.dir.display()
            )?;
        }
        if self.more_than_two_bodies > 0 {
            writeln!(
                f,
                "  {} files have frames with more than 2 bodies (first two kept)",
                self.more_than_two_bodies
            )?;
        }
        for (what, list) in [
            ("longer than the raw frame limit (cut)", &self.truncated),
            (
                "with no frame of body 0 (all-zero position)",
                &self.empty_sequences,
            ),
        ] {
            if !list.is_empty() {
                writeln!(f, "  {} files {what}: {}", list.len(), preview(list))?;
            }
        }
        if !self.failed.is_empty() {
            writeln!(f, "  skipped files:")?;
            for p in self.failed.iter().take(20) {
                writeln!(f, "    {}", p.reason)?;
            }
            if self.failed.len() > 20 {
                writeln!(f, "    ... and {} more", self.failed.len() - 20)?;
            }
        }
        Ok(())
    }
}

fn preview(list: &[String]) -> String {
    let mut s = list.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if list.len() > 5 {
        s.push_str(", ...");
    }
    s
}

/// A file to read, with its row in every (benchmark, part) output.
struct Job {
    file_name: String,
    label: i64,
    /// For each output: (output index, row).
    slots: Vec<(usize, usize)>,
}

/// One output split being written.
struct SplitOut {
    benchmark: Benchmark,
    part: &'static str,
    dir: PathBuf,
    data: NpyRowWriter,
    position: NpyRowWriter,
    /// Job index of each row.
    jobs: Vec<usize>,
}

/// Lists the `.skeleton` files of `raw`, sorted by name.
pub fn list_skeleton_files(raw: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(raw).map_err(|e| Error::io(raw, e))?;
    let mut names = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(raw, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".skeleton") {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Runs the whole preparation (see the module doc). Returns the summary; the caller prints it.
pub fn prepare_ntu(cfg: &PrepareConfig) -> Result<PrepareSummary> {
    let start = std::time::Instant::now();
    if cfg.benchmarks.is_empty() {
        return Err(Error::config("no benchmark selected"));
    }
    for b in &cfg.benchmarks {
        if (cfg.version == NtuVersion::Ntu60 && *b == Benchmark::Xset)
            || (cfg.version == NtuVersion::Ntu120 && *b == Benchmark::Xview)
        {
            return Err(Error::config(format!(
                "benchmark {} is not defined for {} (use {})",
                b.name(),
                cfg.version.name(),
                cfg.version
                    .default_benchmarks()
                    .iter()
                    .map(|b| b.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    if cfg.out_frames == 0 || cfg.max_frames == 0 {
        return Err(Error::config("--frames must be at least 1"));
    }
    let mut summary = PrepareSummary::default();
    let names = list_skeleton_files(&cfg.raw)?;
    summary.listed = names.len();
    let missing: HashSet<String> = cfg.version.missing_ids().into_iter().collect();

    // Decide every file's rows before reading anything.
    let mut jobs: Vec<Job> = Vec::new();
    let mut split_rows: Vec<Vec<usize>> = vec![Vec::new(); cfg.benchmarks.len() * 2];
    for name in names {
        let id = name.strip_suffix(".skeleton").unwrap_or(&name);
        if missing.contains(id) {
            summary.missing_list += 1;
            continue;
        }
        let Some(parsed) = NtuName::parse_file_name(&name) else {
            let reason = format!(
                "{}: file name: not of the form SsssCcccPpppRrrrAaaa.skeleton",
                cfg.raw.join(&name).display()
            );
            if cfg.on_error == OnError::Fail {
                return Err(Error::input(
                    cfg.raw.join(&name),
                    "file name",
                    "not of the form SsssCcccPpppRrrrAaaa.skeleton",
                ));
            }
            summary.failed.push(FileProblem { file: name, reason });
            continue;
        };
        if !cfg.version.contains(&parsed) {
            summary.other_release += 1;
            continue;
        }
        let j = jobs.len();
        let mut slots = Vec::with_capacity(cfg.benchmarks.len());
        for (b, bench) in cfg.benchmarks.iter().enumerate() {
            let out = b * 2 + usize::from(!bench.is_train(cfg.version, &parsed));
            slots.push((out, split_rows[out].len()));
            split_rows[out].push(j);
        }
        jobs.push(Job {
            file_name: name,
            label: parsed.label(),
            slots,
        });
    }

    let raw_shape = |n: usize| [n, 3, cfg.max_frames, NTU_JOINTS, NTU_MAX_BODIES];
    let pos_shape = |n: usize| [n, 3, cfg.out_frames, NTU_JOINTS, NTU_MAX_BODIES];
    let mut outs = Vec::with_capacity(split_rows.len());
    for (o, rows) in split_rows.into_iter().enumerate() {
        let benchmark = cfg.benchmarks[o / 2];
        let part = if o % 2 == 0 { "train" } else { "val" };
        let dir = cfg.out.join(benchmark.name());
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let data = NpyRowWriter::create(
            &dir.join(format!("{part}_data.npy")),
            &raw_shape(rows.len()),
        )?;
        let position = NpyRowWriter::create(
            &dir.join(format!("{part}_position.npy")),
            &pos_shape(rows.len()),
        )?;
        outs.push(SplitOut {
            benchmark,
            part,
            dir,
            data,
            position,
            jobs: rows,
        });
    }

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.threads)
        .build()
        .map_err(|e| Error::Other(format!("thread pool: {e}")))?;
    let bar = if cfg.progress {
        indicatif::ProgressBar::new(jobs.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} files, {per_sec}, eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(format!("prepare {}", cfg.version.name()));
    let layout = Layout::ntu25();
    let stop = AtomicBool::new(false);
    let failed: Mutex<Vec<(usize, Error)>> = Mutex::new(Vec::new());
    let truncated: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    let empty: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    let many_bodies = AtomicUsize::new(0);
    let sample_len = 3 * cfg.max_frames * NTU_JOINTS * NTU_MAX_BODIES;
    let sample_shape = [3, cfg.max_frames, NTU_JOINTS, NTU_MAX_BODIES];

    pool.install(|| {
        jobs.par_iter().enumerate().for_each(|(j, job)| {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let result = (|| -> Result<()> {
                let sk = ntu::read_skeleton(&cfg.raw.join(&job.file_name))?;
                let mut padded = vec![0f32; sample_len];
                sk.fill_padded(cfg.max_frames, &mut padded);
                if sk.frames > cfg.max_frames {
                    lock(&truncated).push(j);
                }
                if sk.max_bodies > NTU_MAX_BODIES {
                    many_bodies.fetch_add(1, Ordering::Relaxed);
                }
                let (position, length) = preprocess::preprocess_sample_with(
                    &padded,
                    sample_shape,
                    &layout,
                    cfg.out_frames,
                    cfg.resize,
                );
                if length == 0 {
                    lock(&empty).push(j);
                }
                let frame_len = NTU_JOINTS * NTU_MAX_BODIES;
                let used = sk.frames.min(cfg.max_frames) * frame_len;
                let segments: Vec<(usize, usize)> = (0..3)
                    .map(|c| (c * cfg.max_frames * frame_len, used))
                    .collect();
                for &(o, row) in &job.slots {
                    // Only the frames the file has: the padding is already zero in the sparse .tmp.
                    outs[o].data.write_row_segments(row, &padded, &segments)?;
                    outs[o].position.write_row(row, &position)?;
                }
                Ok(())
            })();
            if let Err(e) = result {
                if cfg.on_error == OnError::Fail {
                    stop.store(true, Ordering::Relaxed);
                }
                lock(&failed).push((j, e));
            }
            bar.inc(1);
        })
    });
    bar.finish_and_clear();

    let mut failed = failed.into_inner().unwrap_or_else(|p| p.into_inner());
    failed.sort_by_key(|(j, _)| *j);
    if cfg.on_error == OnError::Fail && !failed.is_empty() {
        // Dropping `outs` removes every .tmp file.
        return Err(failed.swap_remove(0).1);
    }
    let bad: HashSet<usize> = failed.iter().map(|(j, _)| *j).collect();
    for (j, e) in failed {
        summary.failed.push(FileProblem {
            file: jobs[j].file_name.clone(),
            reason: e.to_string(),
        });
    }
    let names_of = |v: Vec<usize>| -> Vec<String> {
        let mut v = v;
        v.sort_unstable();
        v.into_iter()
            .filter(|j| !bad.contains(j))
            .map(|j| jobs[j].file_name.clone())
            .collect()
    };
    summary.truncated = names_of(truncated.into_inner().unwrap_or_else(|p| p.into_inner()));
    summary.empty_sequences = names_of(empty.into_inner().unwrap_or_else(|p| p.into_inner()));
    summary.more_than_two_bodies = many_bodies.into_inner();
    summary.parsed = jobs.len() - bad.len();

    for out in outs {
        let keep: Vec<usize> = (0..out.jobs.len())
            .filter(|&r| !bad.contains(&out.jobs[r]))
            .collect();
        let names: Vec<String> = keep
            .iter()
            .map(|&r| jobs[out.jobs[r]].file_name.clone())
            .collect();
        let labels: Vec<i64> = keep.iter().map(|&r| jobs[out.jobs[r]].label).collect();
        let (data, position) = if keep.len() == out.jobs.len() {
            (out.data, out.position)
        } else {
            (out.data.compact(&keep)?, out.position.compact(&keep)?)
        };
        pickle::write_labels(
            &out.dir.join(format!("{}_label.pkl", out.part)),
            &names,
            &labels,
        )?;
        data.finish()?;
        position.finish()?;
        summary.splits.push(SplitCount {
            benchmark: out.benchmark,
            part: out.part,
            samples: keep.len(),
            dir: out.dir,
        });
    }
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
