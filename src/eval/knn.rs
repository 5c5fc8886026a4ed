//! k-nearest-neighbour evaluation on pooled features (a project-defined protocol; see the reference
//! §7.3): cosine similarity against the training features as the bank, top-k neighbours, each
//! neighbour votes for its class with weight `exp(similarity / temperature)` (or 1 when unweighted),
//! and the class score is the sum of the votes. Computed in batches of queries with one matmul each.
use crate::error::{Error, Result};
use crate::eval::metrics::{self, Metrics};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Query rows per similarity matmul (bounds memory: `batch x bank` floats).
pub const QUERY_BATCH: i64 = 1024;

/// One k-NN setting.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KnnConfig {
    /// Number of neighbours.
    pub k: usize,
    /// `Some(t)`: votes weighted by `exp(sim / t)`; `None`: every neighbour votes 1.
    pub temperature: Option<f64>,
}

impl KnnConfig {
    /// The nearest neighbour (k = 1).
    pub fn nearest() -> Self {
        KnnConfig {
            k: 1,
            temperature: None,
        }
    }
    /// The InstDisc-style weighted k = 20, t = 0.07.
    pub fn weighted20() -> Self {
        KnnConfig {
            k: 20,
            temperature: Some(0.07),
        }
    }
    /// A short label such as `k1` or `k20_t0.07`.
    pub fn label(&self) -> String {
        match self.temperature {
            Some(t) => format!("k{}_t{t}", self.k),
            None => format!("k{}", self.k),
        }
    }
}

/// L2-normalises the rows of `x` `(N, D)` (zero rows stay zero).
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let norm = x
        .to_kind(Kind::Float)
        .norm_scalaropt_dim(2.0, [1i64].as_slice(), true);
    x.to_kind(Kind::Float) / norm.clamp_min(1e-12)
}

/// Cosine similarities `(M, N)` of queries `(M, D)` against a bank `(N, D)`, both given as lists
/// of per-stream features; with several streams the similarity is the mean of the per-stream cosine
/// similarities (= the cosine of the concatenated, per-stream normalised features).
fn similarity(bank: &[Tensor], query: &[Tensor]) -> Tensor {
    let sims: Vec<Tensor> = bank
        .iter()
        .zip(query)
        .map(|(b, q)| l2_normalize(q).matmul(&l2_normalize(b).tr()))
        .collect();
    Tensor::stack(&sims, 0).mean_dim([0i64].as_slice(), false, Kind::Float)
}

/// k-NN class scores `(M, num_classes)` for the queries. `bank` and `query` hold one feature tensor
/// per stream (`(N, D_s)` and `(M, D_s)`, same streams in the same order, on the same device);
/// `bank_labels` has N entries in `0..num_classes`.
pub fn knn_scores(
    bank: &[Tensor],
    bank_labels: &[i64],
    query: &[Tensor],
    num_classes: usize,
    cfg: &KnnConfig,
) -> Result<Tensor> {
    if bank.is_empty() || bank.len() != query.len() {
        return Err(Error::config(
            "k-NN: bank and query must have the same non-zero number of streams",
        ));
    }
    let n = bank[0].size()[0];
    if n as usize != bank_labels.len() || bank.iter().any(|b| b.size()[0] != n) {
        return Err(Error::config(format!(
            "k-NN: bank of {n} rows but {} labels",
            bank_labels.len()
        )));
    }
    if n == 0 || cfg.k == 0 {
        return Err(Error::config("k-NN: the bank is empty or k is 0"));
    }
    if let Some(&l) = bank_labels
        .iter()
        .find(|&&l| l < 0 || l as usize >= num_classes)
    {
        return Err(Error::config(format!(
            "k-NN: bank label {l} outside 0..{num_classes}"
        )));
    }
    let device = bank[0].device();
    let labels = Tensor::from_slice(bank_labels).to_device(device);
    let k = (cfg.k as i64).min(n);
    let m = query[0].size()[0];
    let mut out = Vec::new();
    let mut start = 0;
    while start < m {
        let len = QUERY_BATCH.min(m - start);
        let q: Vec<Tensor> = query.iter().map(|t| t.narrow(0, start, len)).collect();
        let sim = similarity(bank, &q);
        let (top_sim, top_idx) = sim.topk(k, 1, true, true);
        let votes = match cfg.temperature {
            Some(t) => (top_sim / t).exp(),
            None => top_sim.ones_like(),
        };
        let neighbour_labels = labels
            .index_select(0, &top_idx.flatten(0, 1))
            .view([len, k]);
        let scores = Tensor::zeros([len, num_classes as i64], (Kind::Float, device));
        out.push(scores.scatter_add(1, &neighbour_labels, &votes));
        start += len;
    }
    if out.is_empty() {
        return Ok(Tensor::zeros(
            [0, num_classes as i64],
            (Kind::Float, device),
        ));
    }
    Ok(Tensor::cat(&out, 0))
}

/// Result of one k-NN setting on a query set.
pub struct KnnOutcome {
    pub config: KnnConfig,
    pub metrics: Metrics,
    /// Class scores `(M, num_classes)`, CPU.
    pub scores: Tensor,
}

/// Runs every setting in `configs` and scores the queries against `query_labels`.
pub fn evaluate(
    bank: &[Tensor],
    bank_labels: &[i64],
    query: &[Tensor],
    query_labels: &[i64],
    num_classes: usize,
    configs: &[KnnConfig],
) -> Result<Vec<KnnOutcome>> {
    configs
        .iter()
        .map(|cfg| {
            let scores =
                knn_scores(bank, bank_labels, query, num_classes, cfg)?.to_device(tch::Device::Cpu);
            let metrics = metrics::evaluate(&scores, query_labels)?;
            Ok(KnnOutcome {
                config: *cfg,
                metrics,
                scores,
            })
        })
        .collect()
}
