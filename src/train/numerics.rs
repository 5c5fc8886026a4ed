//! Guards against non-finite values and divergence (config block `numerics`, see
//! [`NumericsArgs`](crate::train::config::NumericsArgs)).
//!
//! * a non-finite loss (always checked) or gradient (`check_grads`) stops the run, or with
//!   `non_finite: skip` skips the step; either way the message names the first non-finite tensor
//!   ([`locate`]): the input batch, a parameter, a key parameter or queue, a key, or none of them
//!   (then the loss computation itself overflowed);
//! * a skipped step leaves the model as it was before it ([`StepSnapshot`]): the forward pass
//!   already moved the key encoders (EMA) and the batch-norm running statistics, both restored;
//! * an epoch whose mean loss is above a bound ([`divergence_bound`]) is reported as diverging.
use crate::error::Error;
use crate::ssl::model::SslModel;
use crate::train::config::Negatives;
use tch::{Kind, Tensor};

/// Start of the error text of a non-finite loss.
pub const NON_FINITE_LOSS: &str = "non-finite loss";
/// Start of the error text of a non-finite gradient.
pub const NON_FINITE_GRAD: &str = "non-finite gradient";

/// Whether `e` is the error of a non-finite loss or gradient (the run stops with its epoch and step).
pub fn is_non_finite(e: &Error) -> bool {
    let text = e.to_string();
    text.starts_with(NON_FINITE_LOSS) || text.starts_with(NON_FINITE_GRAD)
}

/// Number of NaN / Inf values of a floating tensor (0 for integer tensors). One host sync.
pub fn count_non_finite(t: &Tensor) -> i64 {
    if !t.defined()
        || !matches!(
            t.kind(),
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
        )
    {
        return 0;
    }
    t.isfinite().logical_not().sum(Kind::Int64).int64_value(&[])
}

/// Per row of `x` (N, ...): whether it holds a NaN or Inf. One host sync.
pub fn non_finite_rows(x: &Tensor) -> Vec<bool> {
    let rows = x.isfinite().logical_not().flatten(1, -1).any_dim(1, false);
    Vec::<bool>::try_from(&rows).unwrap_or_default()
}

/// `"<name> (n of N values NaN or Inf)"` for the first of `named` holding a non-finite value.
pub fn first_non_finite<'a>(
    named: impl IntoIterator<Item = (String, &'a Tensor)>,
) -> Option<String> {
    named.into_iter().find_map(|(name, t)| {
        let n = count_non_finite(t);
        (n > 0).then(|| format!("{name} ({n} of {} values NaN or Inf)", t.numel()))
    })
}

/// Whether every tensor of `ts` is finite, with one host sync for all of them (the sum of their
/// sums is non-finite exactly when one of them holds a NaN or an Inf, or when the sums overflow
/// float64, which finite float32 gradients cannot do).
pub fn all_finite(ts: &[Tensor]) -> bool {
    let sums: Vec<Tensor> = ts
        .iter()
        .filter(|t| t.defined())
        .map(|t| t.sum(Kind::Double))
        .collect();
    if sums.is_empty() {
        return true;
    }
    Tensor::stack(&sums, 0)
        .sum(Kind::Double)
        .double_value(&[])
        .is_finite()
}

/// Which tensor of a step that went non-finite is the first culprit, in data-flow order: the
/// input batch (`x_q`, `x_k`: the data), the query parameters and statistics, the key encoders
/// and queues, the keys the step computed. `None` when all are finite (the loss computation
/// itself overflowed, e.g. a huge logit over a small temperature).
pub fn locate(model: &SslModel, inputs: &[(&str, &Tensor)], keys: &[Tensor]) -> Option<String> {
    let batch = inputs.iter().find_map(|(name, x)| {
        let n = count_non_finite(x);
        (n > 0).then(|| {
            let samples: Vec<usize> = non_finite_rows(x)
                .iter()
                .enumerate()
                .filter_map(|(i, bad)| bad.then_some(i))
                .collect();
            let shown: Vec<String> = samples.iter().take(8).map(|i| i.to_string()).collect();
            format!(
                "the input batch {name} ({n} values NaN or Inf, in batch positions [{}{}]: the data \
                 holds them)",
                shown.join(", "),
                if samples.len() > 8 { ", ..." } else { "" }
            )
        })
    });
    if batch.is_some() {
        return batch;
    }
    let sorted = |vs: &tch::nn::VarStore| {
        let mut v = vs.variables().into_iter().collect::<Vec<_>>();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    for vars in [sorted(&model.vs_q), sorted(&model.vs_k)] {
        if let Some(found) =
            first_non_finite(vars.iter().map(|(n, t)| (format!("variable {n}"), t)))
        {
            return Some(found);
        }
    }
    first_non_finite(
        model
            .branches
            .iter()
            .zip(keys)
            .map(|(b, k)| (format!("the keys of view {}", b.view), k)),
    )
}

/// The copies a skipped step restores: every variable the forward pass may change before the
/// loss is known (the key encoders' EMA and every batch-norm running statistic). The queues are
/// only written after the checks, and the query parameters only by the SGD step.
pub struct StepSnapshot {
    saved: Vec<(Tensor, Tensor)>,
}

impl StepSnapshot {
    /// Copies the key store's variables and the query store's non-trainable ones.
    pub fn take(model: &SslModel) -> Self {
        let _guard = tch::no_grad_guard();
        let mut saved = Vec::new();
        for (_, t) in model.vs_k.variables() {
            saved.push((t.shallow_clone(), t.copy()));
        }
        for (_, t) in model.vs_q.variables() {
            if !t.requires_grad() {
                saved.push((t.shallow_clone(), t.copy()));
            }
        }
        StepSnapshot { saved }
    }

    /// Writes the copies back (in place: the tensors the model holds stay the same objects).
    pub fn restore(self) {
        let _guard = tch::no_grad_guard();
        for (mut live, copy) in self.saved {
            live.copy_(&copy);
        }
    }
}

/// The chance value of one view's InfoNCE loss: ln(1 + negatives per query), the loss of a model
/// whose logits are all equal. `queue_size` K, `batch` B (the global batch of a step).
pub fn chance_loss(negatives: Negatives, queue_size: i64, batch: usize, reverse: bool) -> f64 {
    let per_query = match negatives {
        Negatives::Queue => queue_size as f64,
        Negatives::Batch => batch as f64 - 1.0,
        Negatives::Both => queue_size as f64 + batch as f64 - 1.0,
    } + if reverse { 1.0 } else { 0.0 };
    (1.0 + per_query.max(0.0)).ln()
}

/// The divergence bound for a model: `max_loss` when positive, otherwise (0 = auto) twice the
/// sum over the views of [`chance_loss`]; `None` when `max_loss` is negative (check off). Returns
/// the bound and how it was chosen, for the log.
pub fn divergence_bound(
    max_loss: f64,
    negatives: Negatives,
    queue_size: i64,
    batch: usize,
    reverse: bool,
    views: usize,
) -> Option<(f64, String)> {
    if max_loss < 0.0 {
        return None;
    }
    if max_loss > 0.0 {
        return Some((max_loss, "numerics.max_loss".into()));
    }
    let chance = chance_loss(negatives, queue_size, batch, reverse) * views as f64;
    Some((
        2.0 * chance,
        format!("auto: twice the chance loss {chance:.3} of {views} view(s)"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_finds_non_finite_values() {
        let good = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let bad = Tensor::from_slice(&[1.0f32, f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
        let ints = Tensor::from_slice(&[1i64, 2]);
        assert_eq!(count_non_finite(&good), 0);
        assert_eq!(count_non_finite(&bad), 3);
        assert_eq!(count_non_finite(&ints), 0);
        assert!(all_finite(&[good.shallow_clone(), ints.shallow_clone()]));
        assert!(!all_finite(&[good.shallow_clone(), bad.shallow_clone()]));
        assert!(all_finite(&[]));
        let found = first_non_finite([("a".to_string(), &good), ("b".to_string(), &bad)]);
        assert_eq!(found.as_deref(), Some("b (3 of 4 values NaN or Inf)"));
        assert_eq!(first_non_finite([("a".to_string(), &good)]), None);
    }

    #[test]
    fn chance_and_bound() {
        assert!((chance_loss(Negatives::Queue, 128, 16, false) - 129f64.ln()).abs() < 1e-12);
        assert!((chance_loss(Negatives::Batch, 128, 16, false) - 16f64.ln()).abs() < 1e-12);
        assert!((chance_loss(Negatives::Both, 128, 16, true) - 145f64.ln()).abs() < 1e-12);
        let (b, why) = divergence_bound(0.0, Negatives::Queue, 128, 16, false, 3).unwrap();
        assert!((b - 6.0 * 129f64.ln()).abs() < 1e-12, "{why}");
        assert_eq!(
            divergence_bound(7.5, Negatives::Queue, 128, 16, false, 3)
                .unwrap()
                .0,
            7.5
        );
        assert!(divergence_bound(-1.0, Negatives::Queue, 128, 16, false, 3).is_none());
    }
}
