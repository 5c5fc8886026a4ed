//! What every protocol writes into its work_dir: per-sample scores (`.npy`, `N x classes`, dataset
//! order) with `names.txt`, the confusion matrix (CSV + PNG), a t-SNE PNG of features, training
//! curves and `metrics.json`. All files are written atomically.
use crate::data::npy;
use crate::error::{Error, Result};
pub use crate::eval::files::{ensure_dir, write_json, write_lines, write_matrix};
use crate::eval::linear::EpochRecord;
use crate::eval::metrics::{self, Metrics};
use crate::eval::tsne::{self, TsneConfig};
use crate::plot;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// Classes shown in the t-SNE plot (the most frequent ones).
pub const TSNE_MAX_CLASSES: usize = 10;
/// Points embedded by t-SNE (exact t-SNE is O(N^2) per iteration).
pub const TSNE_MAX_POINTS: usize = 1000;

/// Class names from `classes.txt` (one name per line) in the folder of `data_path` (a file or a
/// folder); classes without a line (or without the file) are named by their index.
pub fn class_names_near(data_path: &Path, num_classes: usize) -> Vec<String> {
    let dir = if data_path.is_dir() {
        data_path.to_path_buf()
    } else {
        data_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    };
    let lines: Vec<String> = std::fs::read_to_string(dir.join("classes.txt"))
        .map(|s| s.lines().map(|l| l.trim().to_string()).collect())
        .unwrap_or_default();
    (0..num_classes)
        .map(|i| {
            lines
                .get(i)
                .filter(|l| !l.is_empty())
                .cloned()
                .unwrap_or_else(|| i.to_string())
        })
        .collect()
}

/// Files written for one score matrix.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScoreFiles {
    pub scores: PathBuf,
    pub names: PathBuf,
    pub confusion_csv: PathBuf,
    pub confusion_png: PathBuf,
}

/// Writes `scores<suffix>.npy` (`(N, K)` float32, dataset order), `names.txt` (N sample names),
/// `confusion<suffix>.csv` and `confusion<suffix>.png` (true classes as rows) into `dir`, and
/// returns the metrics of the scores.
pub fn write_scores(
    dir: &Path,
    suffix: &str,
    scores: &Tensor,
    labels: &[i64],
    names: &[String],
    class_names: &[String],
    title: &str,
) -> Result<(Metrics, ScoreFiles)> {
    ensure_dir(dir)?;
    let m = metrics::evaluate(scores, labels)?;
    let k = scores.size()[1] as usize;
    let conf = metrics::confusion_matrix(&metrics::predictions(scores), labels, k)?;
    let files = ScoreFiles {
        scores: dir.join(format!("scores{suffix}.npy")),
        names: dir.join("names.txt"),
        confusion_csv: dir.join(format!("confusion{suffix}.csv")),
        confusion_png: dir.join(format!("confusion{suffix}.png")),
    };
    write_matrix(&files.scores, scores)?;
    write_lines(&files.names, names)?;
    npy::write_atomic(
        &files.confusion_csv,
        metrics::confusion_csv(&conf, class_names).as_bytes(),
    )?;
    let matrix: Vec<Vec<f64>> = conf
        .iter()
        .map(|r| r.iter().map(|&v| v as f64).collect())
        .collect();
    let labels_k: Vec<String> = (0..k)
        .map(|i| class_names.get(i).cloned().unwrap_or_else(|| i.to_string()))
        .collect();
    plot::heatmap(
        &files.confusion_png,
        &format!(
            "{title}: top-1 {:.2}%, mean-class {:.2}% (rows: true, cols: predicted)",
            m.top1, m.mean_class
        ),
        &matrix,
        &labels_k,
        &labels_k,
    )?;
    Ok((m, files))
}

/// t-SNE of `features` (`(N, D)`; several streams are L2-normalised and concatenated by the
/// caller) for up to 10 classes and 1000 points, saved as a class-coloured scatter PNG.
pub fn write_tsne(
    path: &Path,
    features: &Tensor,
    labels: &[i64],
    class_names: &[String],
    title: &str,
    cfg: &TsneConfig,
) -> Result<()> {
    let idx = tsne::subsample(labels, TSNE_MAX_CLASSES, TSNE_MAX_POINTS, cfg.seed);
    if idx.len() < 3 {
        return Err(Error::Other(format!(
            "{}: too few points for t-SNE ({})",
            path.display(),
            idx.len()
        )));
    }
    let sel: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    let x = features
        .to_device(Device::Cpu)
        .index_select(0, &Tensor::from_slice(&sel));
    let y = tsne::tsne(&x, cfg)?;
    let ys: Vec<f64> = Vec::try_from(&y.contiguous().view([-1]))?;
    let points: Vec<(f64, f64, usize)> = idx
        .iter()
        .enumerate()
        .map(|(j, &i)| (ys[2 * j], ys[2 * j + 1], labels[i] as usize))
        .collect();
    plot::scatter(path, title, &points, class_names)
}

/// Per-stream features made comparable and joined: each `(N, D_s)` L2-normalised, concatenated.
pub fn joined_features(features: &[Tensor]) -> Tensor {
    let normed: Vec<Tensor> = features
        .iter()
        .map(crate::eval::knn::l2_normalize)
        .collect();
    Tensor::cat(&normed, 1)
}

/// Training curves of an epoch log: `curves.png` with loss, and accuracies (train batches,
/// validation, test) in percent on a second chart `accuracy.png`.
pub fn write_curves(dir: &Path, history: &[EpochRecord], title: &str) -> Result<()> {
    let pts = |f: &dyn Fn(&EpochRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        history
            .iter()
            .filter_map(|r| f(r).map(|v| (r.epoch as f64, v)))
            .collect()
    };
    plot::line_chart(
        &dir.join("curves.png"),
        &format!("{title}: training loss"),
        "epoch",
        "cross-entropy",
        &[("train loss", pts(&|r| Some(r.loss)))],
    )?;
    let mut series = vec![
        ("train (batches)", pts(&|r| Some(r.train_top1))),
        ("test", pts(&|r| r.test.map(|m| m.top1))),
    ];
    let val = pts(&|r| r.val.map(|m| m.top1));
    if !val.is_empty() {
        series.push(("validation", val));
    }
    plot::line_chart(
        &dir.join("accuracy.png"),
        &format!("{title}: top-1 accuracy"),
        "epoch",
        "top-1 (%)",
        &series,
    )
}
