//! The work_dir log (`log.txt`, also echoed to stdout), per-epoch metrics (`metrics.jsonl`,
//! `metrics.csv`), per-step losses (`steps.csv`: fractional epoch, total loss), the loss curve
//! (`loss.png`: per-step total loss and per-epoch means) and, when the collapse diagnostics or the
//! k-NN monitor ran, their curves (`diagnostics.png`; see [`crate::train::diagnostics`]).
use crate::error::{Error, Result};
use crate::plot::LinePanel;
use crate::train::atomic::write_atomic;
use crate::train::diagnostics::{DiagRecord, ViewDiag};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One epoch's metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch.
    pub epoch: usize,
    /// 1 = MoCo, 2 = CVC-KM.
    pub phase: u8,
    pub lr: f64,
    /// Mean total loss over the epoch's steps.
    pub loss: f64,
    /// Mean loss per view, `(view name, loss)` in view order.
    pub view_losses: Vec<(String, f64)>,
    pub steps: usize,
    /// Wall time of the epoch's training steps (diagnostics excluded).
    pub seconds: f64,
    pub samples_per_second: f64,
    /// Collapse diagnostics per view, in view order, on the epochs they ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<Vec<ViewDiag>>,
    /// k-NN monitor top-1 (percent), k = 1, on the epochs it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knn1: Option<f64>,
    /// k-NN monitor top-1 (percent), weighted k = 20 (T 0.07).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knn20: Option<f64>,
    /// Wall time of the diagnostics and the monitor after the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diag_seconds: Option<f64>,
    /// Steps skipped for a non-finite loss or gradient (`numerics.non_finite: skip` runs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_steps: Option<usize>,
}

impl EpochRecord {
    /// Copies an epoch's diagnostics and k-NN monitor results into the record.
    pub fn set_diagnostics(&mut self, d: &DiagRecord) {
        if !d.views.is_empty() {
            self.diagnostics = Some(d.views.clone());
        }
        if let Some(k) = &d.knn {
            self.knn1 = Some(k.k1);
            self.knn20 = Some(k.k20);
        }
        self.diag_seconds = Some(d.seconds + d.knn.map_or(0.0, |k| k.seconds));
    }
}

/// The per-view diagnostic columns of `metrics.csv` (`<view>_<name>`), in this order.
pub const DIAG_COLUMNS: [&str; 7] = [
    "feat_rank",
    "feat_cos",
    "proj_rank",
    "proj_cos",
    "align",
    "uniform",
    "margin",
];

impl ViewDiag {
    /// The values in [`DIAG_COLUMNS`] order.
    pub fn values(&self) -> [f64; 7] {
        [
            self.feat_rank,
            self.feat_cos,
            self.proj_rank,
            self.proj_cos,
            self.align,
            self.uniform,
            self.margin,
        ]
    }
}

/// The optional columns of `metrics.csv` that the run plans (so they are present, empty where
/// not computed, from the first epoch on).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricColumns {
    /// Views with diagnostic columns.
    pub diag_views: Vec<String>,
    /// `knn1`, `knn20` columns.
    pub knn: bool,
}

/// Writes the log and the metric files of a run.
pub struct RunLogger {
    dir: PathBuf,
    log: std::fs::File,
    /// Lines are printed through the bar (so it is not garbled) when one is set.
    bar: Option<ProgressBar>,
    pub echo: bool,
    /// `(fractional epoch, total loss)` of every step so far (for the curve).
    steps: Vec<(f64, f64)>,
    steps_file: Option<std::fs::File>,
    /// The first failed `steps.csv` write (a full disk): reported by the next
    /// [`RunLogger::write_metrics`], so the run stops before a checkpoint that rows are missing from.
    steps_error: Option<std::io::Error>,
    /// Planned optional columns of `metrics.csv`.
    columns: MetricColumns,
}

/// `YYYY-MM-DD HH:MM:SS` UTC of the system clock.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl RunLogger {
    /// Opens (appends to) `dir/log.txt`.
    pub fn open(dir: &Path, echo: bool) -> Result<Self> {
        let path = dir.join("log.txt");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(RunLogger {
            dir: dir.to_path_buf(),
            log,
            bar: None,
            echo,
            steps: Vec::new(),
            steps_file: None,
            steps_error: None,
            columns: MetricColumns::default(),
        })
    }

    /// Loads `steps.csv` keeping the steps of epochs `<= up_to` (rewritten atomically), then
    /// appends to it. Call once before the first [`RunLogger::step`].
    pub fn open_steps(&mut self, up_to: usize) -> Result<()> {
        let path = self.dir.join("steps.csv");
        let mut kept = String::from("epoch_position,loss\n");
        self.steps.clear();
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines().skip(1) {
                let mut it = line.split(',');
                let (Some(x), Some(y)) = (it.next(), it.next()) else {
                    continue;
                };
                let (Ok(x), Ok(y)) = (x.parse::<f64>(), y.parse::<f64>()) else {
                    continue;
                };
                // Step s of epoch e sits at e - 1 + s / steps, in (e - 1, e].
                if x <= up_to as f64 {
                    self.steps.push((x, y));
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
        write_atomic(&path, kept.as_bytes())?;
        self.steps_file = Some(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?,
        );
        Ok(())
    }

    /// Records one step's total loss at fractional epoch `position`.
    pub fn step(&mut self, position: f64, loss: f64) {
        self.steps.push((position, loss));
        if let Some(f) = &mut self.steps_file {
            // One write per row: a kill leaves whole rows (a resume drops the unfinished epoch's).
            if let Err(e) = f.write_all(format!("{position},{loss}\n").as_bytes()) {
                self.steps_error.get_or_insert(e);
            }
        }
    }

    pub fn set_bar(&mut self, bar: Option<ProgressBar>) {
        self.bar = bar;
    }

    /// A timestamped line in the log (and on stdout).
    pub fn line(&mut self, msg: &str) {
        let text = format!("[{}] {msg}", utc_now());
        let _ = writeln!(self.log, "{text}");
        if self.echo {
            match &self.bar {
                Some(b) if !b.is_hidden() => b.println(&text),
                _ => println!("{text}"),
            }
        }
    }

    /// Sets the optional `metrics.csv` columns the run plans (call once before the first
    /// [`RunLogger::write_metrics`]); columns of records that hold more are added anyway.
    pub fn set_columns(&mut self, columns: MetricColumns) {
        self.columns = columns;
    }

    /// The optional columns for `records`: the planned ones plus those present in any record.
    fn columns_for(&self, records: &[EpochRecord]) -> MetricColumns {
        let mut c = self.columns.clone();
        for r in records {
            for v in r.diagnostics.iter().flatten() {
                if !c.diag_views.contains(&v.view) {
                    c.diag_views.push(v.view.clone());
                }
            }
            c.knn |= r.knn1.is_some() || r.knn20.is_some();
        }
        c
    }

    /// Rewrites `metrics.jsonl`, `metrics.csv`, `loss.png` and (when any record has diagnostics
    /// or k-NN values) `diagnostics.png` from all records so far.
    pub fn write_metrics(&self, records: &[EpochRecord]) -> Result<()> {
        let steps_path = self.dir.join("steps.csv");
        if let Some(e) = &self.steps_error {
            return Err(Error::io(
                &steps_path,
                std::io::Error::new(e.kind(), format!("writing a step row: {e}")),
            ));
        }
        if let Some(f) = &self.steps_file {
            f.sync_data().map_err(|e| Error::io(&steps_path, e))?;
        }
        let mut jsonl = String::new();
        for r in records {
            jsonl.push_str(&serde_json::to_string(r).map_err(|e| Error::Other(e.to_string()))?);
            jsonl.push('\n');
        }
        write_atomic(&self.dir.join("metrics.jsonl"), jsonl.as_bytes())?;
        let views: Vec<String> = records
            .first()
            .map(|r| r.view_losses.iter().map(|(v, _)| v.clone()).collect())
            .unwrap_or_default();
        let mut csv = String::from("epoch,phase,lr,loss");
        for v in &views {
            csv.push_str(&format!(",loss_{v}"));
        }
        csv.push_str(",steps,seconds,samples_per_second");
        let cols = self.columns_for(records);
        for v in &cols.diag_views {
            for c in DIAG_COLUMNS {
                csv.push_str(&format!(",{v}_{c}"));
            }
        }
        if cols.knn {
            csv.push_str(",knn1,knn20");
        }
        let diag_any = !cols.diag_views.is_empty() || cols.knn;
        if diag_any {
            csv.push_str(",diag_seconds");
        }
        let skips = records.iter().any(|r| r.skipped_steps.is_some());
        if skips {
            csv.push_str(",skipped_steps");
        }
        csv.push('\n');
        // Empty cell when absent or not finite.
        let cell = |v: Option<f64>| match v {
            Some(x) if x.is_finite() => format!(",{x}"),
            _ => ",".to_string(),
        };
        for r in records {
            csv.push_str(&format!("{},{},{},{}", r.epoch, r.phase, r.lr, r.loss));
            for (_, l) in &r.view_losses {
                csv.push_str(&format!(",{l}"));
            }
            csv.push_str(&format!(
                ",{},{:.3},{:.2}",
                r.steps, r.seconds, r.samples_per_second
            ));
            for v in &cols.diag_views {
                let d = r.diagnostics.iter().flatten().find(|d| &d.view == v);
                for i in 0..DIAG_COLUMNS.len() {
                    csv.push_str(&cell(d.map(|d| d.values()[i])));
                }
            }
            if cols.knn {
                csv.push_str(&cell(r.knn1));
                csv.push_str(&cell(r.knn20));
            }
            if diag_any {
                csv.push_str(&cell(r.diag_seconds.map(|s| (s * 1000.0).round() / 1000.0)));
            }
            if skips {
                csv.push_str(&cell(r.skipped_steps.map(|n| n as f64)));
            }
            csv.push('\n');
        }
        write_atomic(&self.dir.join("metrics.csv"), csv.as_bytes())?;
        let mut series: Vec<(String, Vec<(f64, f64)>)> = vec![
            ("total, per step".into(), self.steps.clone()),
            (
                "total, epoch mean".into(),
                records.iter().map(|r| (r.epoch as f64, r.loss)).collect(),
            ),
        ];
        if views.len() > 1 {
            for (i, v) in views.iter().enumerate() {
                series.push((
                    format!("{v}, epoch mean"),
                    records
                        .iter()
                        .filter_map(|r| r.view_losses.get(i).map(|x| (r.epoch as f64, x.1)))
                        .collect(),
                ));
            }
        }
        let series: Vec<(&str, Vec<(f64, f64)>)> = series
            .iter()
            .map(|(n, p)| (n.as_str(), p.clone()))
            .collect();
        crate::plot::line_chart(
            &self.dir.join("loss.png"),
            "pre-training loss",
            "epoch",
            "loss",
            &series,
        )?;
        if records
            .iter()
            .any(|r| r.diagnostics.is_some() || r.knn1.is_some())
        {
            crate::plot::line_panels(
                &self.dir.join("diagnostics.png"),
                "collapse diagnostics (fixed training subset, eval-mode encoders)",
                &diagnostic_panels(records, &cols.diag_views),
            )?;
        }
        Ok(())
    }
}

/// The panels of `diagnostics.png`: effective rank, mean pairwise cosine, alignment / uniformity /
/// margin (per view), and k-NN top-1.
fn diagnostic_panels(records: &[EpochRecord], views: &[String]) -> Vec<LinePanel> {
    let per_view = |view: &str, i: usize| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter_map(|r| {
                let d = r.diagnostics.as_ref()?.iter().find(|d| d.view == view)?;
                Some((r.epoch as f64, d.values()[i]))
            })
            .collect()
    };
    // (panel title, y label, [(series suffix, column index)]).
    type Spec<'a> = (&'a str, &'a str, &'a [(&'a str, usize)]);
    let specs: [Spec; 3] = [
        (
            "effective rank",
            "effective rank",
            &[("features", 0), ("projections", 2)],
        ),
        (
            "mean pairwise cosine",
            "cosine",
            &[("features", 1), ("projections", 3)],
        ),
        (
            "projections: alignment, uniformity, positive margin",
            "value",
            &[("align", 4), ("uniform", 5), ("margin", 6)],
        ),
    ];
    let mut panels: Vec<LinePanel> = specs
        .iter()
        .map(|(title, y, cols)| LinePanel {
            title: title.to_string(),
            x_label: "epoch".into(),
            y_label: y.to_string(),
            series: views
                .iter()
                .flat_map(|v| {
                    cols.iter()
                        .map(move |(name, i)| (format!("{v} {name}"), per_view(v, *i)))
                })
                .collect(),
        })
        .collect();
    let knn = |f: fn(&EpochRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter_map(|r| f(r).map(|v| (r.epoch as f64, v)))
            .collect()
    };
    panels.push(LinePanel {
        title: "k-NN monitor top-1 (held-out split)".into(),
        x_label: "epoch".into(),
        y_label: "top-1 (%)".into(),
        series: vec![
            ("k = 1".into(), knn(|r| r.knn1)),
            ("k = 20, weighted".into(), knn(|r| r.knn20)),
        ],
    });
    panels
}

/// Reads `metrics.jsonl` of `dir` (empty when absent), keeping epochs `<= up_to`.
pub fn read_records(dir: &Path, up_to: usize) -> Result<Vec<EpochRecord>> {
    let path = dir.join("metrics.jsonl");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: EpochRecord = serde_json::from_str(line)
            .map_err(|e| Error::input(&path, format!("line {}", i + 1), e.to_string()))?;
        if r.epoch <= up_to {
            out.push(r);
        }
    }
    Ok(out)
}
