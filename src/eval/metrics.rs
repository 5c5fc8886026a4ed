//! Classification metrics from score matrices: top-1, top-5, mean-class accuracy and the confusion
//! matrix. Accuracies are percentages in `[0, 100]`.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Accuracy summary of one score matrix.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Top-1 accuracy, percent.
    pub top1: f64,
    /// Top-5 accuracy, percent (top-k with k = number of classes when there are fewer than 5).
    pub top5: f64,
    /// Mean over classes (with at least one sample) of the per-class recall, percent.
    pub mean_class: f64,
    /// Number of samples evaluated.
    pub samples: usize,
}

/// Checks that `scores` is `(N, K)` and every label is in `0..K`; returns `(N, K)`.
fn check(scores: &Tensor, labels: &[i64]) -> Result<(usize, usize)> {
    let size = scores.size();
    if size.len() != 2 {
        return Err(Error::config(format!(
            "scores must be (N, classes); got shape {size:?}"
        )));
    }
    let (n, k) = (size[0] as usize, size[1] as usize);
    if n != labels.len() {
        return Err(Error::config(format!(
            "{n} score rows but {} labels",
            labels.len()
        )));
    }
    if let Some((i, &l)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l < 0 || l as usize >= k)
    {
        return Err(Error::config(format!(
            "label {l} of sample {i} is outside 0..{k}"
        )));
    }
    Ok((n, k))
}

/// Number of rows of `scores` `(N, K)` whose label is among the `k` highest scores.
pub fn topk_correct(scores: &Tensor, labels: &[i64], k: usize) -> Result<usize> {
    let (n, classes) = check(scores, labels)?;
    if n == 0 {
        return Ok(0);
    }
    let k = k.clamp(1, classes) as i64;
    let (_, idx) = scores.to_device(tch::Device::Cpu).topk(k, 1, true, true);
    let target = Tensor::from_slice(labels).unsqueeze(1);
    let hit = idx.eq_tensor(&target).any_dim(1, false);
    Ok(hit.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]) as usize)
}

/// Arg-max class of every row of `scores` `(N, K)` (the first maximum on ties).
pub fn predictions(scores: &Tensor) -> Vec<i64> {
    let idx = scores.to_device(tch::Device::Cpu).argmax(1, false);
    Vec::<i64>::try_from(&idx).unwrap_or_default()
}

/// Confusion matrix `m[true][predicted]` (counts), `num_classes x num_classes`. Labels and
/// predictions outside `0..num_classes` are an error.
pub fn confusion_matrix(
    predicted: &[i64],
    labels: &[i64],
    num_classes: usize,
) -> Result<Vec<Vec<u64>>> {
    if predicted.len() != labels.len() {
        return Err(Error::config(format!(
            "{} predictions but {} labels",
            predicted.len(),
            labels.len()
        )));
    }
    let mut m = vec![vec![0u64; num_classes]; num_classes];
    for (i, (&p, &l)) in predicted.iter().zip(labels).enumerate() {
        let ok = |c: i64| c >= 0 && (c as usize) < num_classes;
        if !ok(p) || !ok(l) {
            return Err(Error::config(format!(
                "sample {i}: class (label {l}, predicted {p}) outside 0..{num_classes}"
            )));
        }
        m[l as usize][p as usize] += 1;
    }
    Ok(m)
}

/// Mean per-class recall (percent) over the classes that have samples; 0 when there are none.
pub fn mean_class_accuracy(confusion: &[Vec<u64>]) -> f64 {
    let recalls: Vec<f64> = confusion
        .iter()
        .enumerate()
        .filter_map(|(c, row)| {
            let total: u64 = row.iter().sum();
            (total > 0).then(|| row[c] as f64 / total as f64)
        })
        .collect();
    if recalls.is_empty() {
        0.0
    } else {
        100.0 * recalls.iter().sum::<f64>() / recalls.len() as f64
    }
}

/// Top-1, top-5 and mean-class accuracy of `scores` `(N, K)` against `labels` (N, in `0..K`).
pub fn evaluate(scores: &Tensor, labels: &[i64]) -> Result<Metrics> {
    let (n, k) = check(scores, labels)?;
    if n == 0 {
        return Ok(Metrics {
            top1: 0.0,
            top5: 0.0,
            mean_class: 0.0,
            samples: 0,
        });
    }
    let pct = |c: usize| 100.0 * c as f64 / n as f64;
    let conf = confusion_matrix(&predictions(scores), labels, k)?;
    Ok(Metrics {
        top1: pct(topk_correct(scores, labels, 1)?),
        top5: pct(topk_correct(scores, labels, 5)?),
        mean_class: mean_class_accuracy(&conf),
        samples: n,
    })
}

/// Confusion matrix as CSV: a header `true\predicted,<class names>` then one row per true class.
pub fn confusion_csv(confusion: &[Vec<u64>], class_names: &[String]) -> String {
    let name = |i: usize| {
        let n = class_names.get(i).cloned().unwrap_or_else(|| i.to_string());
        if n.contains([',', '"', '\n']) {
            format!("\"{}\"", n.replace('"', "\"\""))
        } else {
            n
        }
    };
    let mut out = String::from("true\\predicted");
    for c in 0..confusion.len() {
        out.push(',');
        out.push_str(&name(c));
    }
    out.push('\n');
    for (r, row) in confusion.iter().enumerate() {
        out.push_str(&name(r));
        for v in row {
            out.push_str(&format!(",{v}"));
        }
        out.push('\n');
    }
    out
}
