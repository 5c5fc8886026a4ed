//! One view's MoCo branch: query encoder, key encoder (ST-GCN + projection head each), key queue,
//! and the (query parameter, key parameter) pairs its momentum update walks.
//!
//! Variable names follow the official state dict: `encoder_q{suffix}.<st-gcn names>`,
//! `encoder_q{suffix}.fc.*`, `encoder_k{suffix}.*`, `queue{suffix}` with `suffix` = `""` (joint, and
//! every SkeletonCLR), `_motion`, `_bone`.
use crate::data::layout::Layout;
use crate::data::views::{apply_view, View};
use crate::dist::ProcessGroup;
use crate::model::head::{classifier, Mlp};
use crate::model::stgcn::{StGcn, StGcnConfig};
use crate::ssl::queue::{normalize_rows_or_cols, Queue};
use std::sync::Arc;
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

/// A projection head.
pub enum Head {
    /// `mlp: false`: one Linear(hidden_dim, feature_dim), named `fc.weight`, `fc.bias`.
    Linear(nn::Linear),
    /// `mlp: true`: Linear(hidden, hidden) -> ReLU -> Linear(hidden, feature), `fc.0.*`, `fc.2.*`.
    Mlp(Mlp),
    /// The official shared-head quirk: own Linear(hidden, hidden) (`fc.0.*`) -> ReLU -> the
    /// primary (joint) branch's whole MLP head, the very same variables.
    SharedTail(nn::Linear),
    /// `head_bn: true` (ours, MoCo v3 / SimCLR style): Linear(hidden, hidden) (`fc.0.*`) ->
    /// BatchNorm1d (`fc.1.*`, batch statistics: the head only runs in pre-training) -> ReLU ->
    /// Linear(hidden, feature) (`fc.2.*`).
    MlpBn {
        fc0: nn::Linear,
        bn: nn::BatchNorm,
        fc2: nn::Linear,
        /// SyncBatchNorm over this group (see [`crate::model::stgcn::StGcn::set_sync_bn`]).
        sync: Option<Arc<ProcessGroup>>,
    },
}

impl Head {
    /// `feat` (N, hidden_dim) -> (N, feature_dim). `primary` is the joint branch's head (used by
    /// `SharedTail`).
    pub fn forward(&self, feat: &Tensor, primary: Option<&Head>) -> Tensor {
        match self {
            Head::Linear(l) => l.forward(feat),
            Head::Mlp(m) => m.forward(feat),
            Head::MlpBn { fc0, bn, fc2, sync } => {
                let h = fc0.forward(feat);
                let h = match (sync, &bn.ws, &bn.bs) {
                    (Some(g), Some(w), Some(b)) => {
                        // Defaults of `nn::batch_norm1d`, as built in `build_encoder`.
                        let c = nn::BatchNormConfig::default();
                        g.sync_batch_norm(
                            &h,
                            w,
                            b,
                            &bn.running_mean,
                            &bn.running_var,
                            c.momentum,
                            c.eps,
                        )
                        .unwrap_or_else(|e| panic!("projection head: {e}"))
                    }
                    _ => bn.forward_t(&h, true),
                };
                fc2.forward(&h.relu())
            }
            Head::SharedTail(first) => {
                let h = first.forward(feat).relu();
                match primary {
                    Some(p @ (Head::Mlp(_) | Head::Linear(_) | Head::MlpBn { .. })) => {
                        p.forward(&h, None)
                    }
                    // Construction guarantees a primary MLP; this arm is unreachable in practice.
                    _ => panic!("shared projection head without a primary MLP head"),
                }
            }
        }
    }
}

impl Head {
    /// SyncBatchNorm for the head's batch norm (`head_bn: true`); other heads have none.
    pub fn set_sync_bn(&mut self, group: Option<Arc<ProcessGroup>>) {
        if let Head::MlpBn { sync, .. } = self {
            *sync = group;
        }
    }
}

/// The query- and key-side of one view.
pub struct Branch {
    pub view: View,
    /// Name suffix: `""`, `"_motion"`, `"_bone"`, `"_bone_motion"`.
    pub suffix: String,
    pub encoder_q: StGcn,
    pub encoder_k: StGcn,
    pub head_q: Head,
    pub head_k: Head,
    /// `(feature_dim, K)` keys; the tensor is the `queue{suffix}` variable of the key store.
    pub queue: Queue,
    /// `(query parameter, key parameter)` pairs updated by this branch's EMA, including the shared
    /// head layers when the quirk is on. BN running statistics are not parameters: not included.
    pub ema_pairs: Vec<(String, Tensor, Tensor)>,
}

/// The state-dict suffix of a view inside a multi-view model.
pub fn view_suffix(view: View) -> String {
    match view {
        View::Joint => String::new(),
        other => format!("_{}", other.name()),
    }
}

/// Builds the ST-GCN + head of one side under `p` (`p` = `encoder_q{suffix}` or `encoder_k{suffix}`).
/// `shared_tail`: build `SharedTail` (own first Linear only) instead of a full head.
pub fn build_encoder(
    p: &nn::Path,
    stgcn: &StGcnConfig,
    layout: &Layout,
    feature_dim: i64,
    mlp: bool,
    shared_tail: bool,
    head_bn: bool,
) -> (StGcn, Head) {
    let enc = StGcn::new(p, stgcn, layout);
    let hidden = stgcn.hidden_dim;
    let fc = p / "fc";
    let head = if shared_tail {
        Head::SharedTail(classifier(&(&fc / "0"), hidden, hidden))
    } else if mlp && head_bn {
        Head::MlpBn {
            fc0: classifier(&(&fc / "0"), hidden, hidden),
            bn: nn::batch_norm1d(&fc / "1", hidden, Default::default()),
            fc2: classifier(&(&fc / "2"), hidden, feature_dim),
            sync: None,
        }
    } else if mlp {
        Head::Mlp(Mlp::new(&fc, hidden, hidden, feature_dim))
    } else {
        Head::Linear(classifier(&fc, hidden, feature_dim))
    };
    (enc, head)
}

impl Branch {
    /// The view's input from augmented joints `x` (N, C, T, V, M).
    pub fn input(&self, x: &Tensor, layout: &Layout) -> Tensor {
        apply_view(self.view, x, layout)
    }

    /// L2-normalised query (N, feature_dim), train mode (batch-stat BN, dropout), with grad.
    pub fn query(&self, x_view: &Tensor, primary: Option<&Head>) -> Tensor {
        let f = self.encoder_q.forward(x_view, true);
        normalize_rows_or_cols(&self.head_q.forward(&f, primary), 1)
    }

    /// L2-normalised key (N, feature_dim), train mode as in the official code, no grad.
    pub fn key(&self, x_view: &Tensor, primary_k: Option<&Head>) -> Tensor {
        tch::no_grad(|| {
            let f = self.encoder_k.forward(x_view, true);
            normalize_rows_or_cols(&self.head_k.forward(&f, primary_k), 1)
        })
    }

    /// [`Branch::query`] with batch norm per group: the batch is split in order into `groups`
    /// equal chunks, each a separate forward (its own batch statistics). `groups <= 1` is
    /// [`Branch::query`].
    pub fn query_grouped(&self, x_view: &Tensor, primary: Option<&Head>, groups: usize) -> Tensor {
        if groups <= 1 {
            return self.query(x_view, primary);
        }
        let parts: Vec<Tensor> = x_view
            .chunk(groups as i64, 0)
            .iter()
            .map(|x| self.query(x, primary))
            .collect();
        Tensor::cat(&parts, 0)
    }

    /// Shuffle BN for the keys: the batch is permuted by `perm` (N,), split into `groups`
    /// chunks with their own batch statistics, and the keys are returned in the original
    /// order. With the queries grouped in order ([`Branch::query_grouped`]), a sample's query
    /// and key see different batch statistics (MoCo's shuffle BN, on one device).
    pub fn key_shuffled(
        &self,
        x_view: &Tensor,
        primary_k: Option<&Head>,
        groups: usize,
        perm: Option<&Tensor>,
    ) -> Tensor {
        let Some(perm) = perm.filter(|_| groups > 1) else {
            return self.key(x_view, primary_k);
        };
        let shuffled = x_view.index_select(0, perm);
        let parts: Vec<Tensor> = shuffled
            .chunk(groups as i64, 0)
            .iter()
            .map(|x| self.key(x, primary_k))
            .collect();
        let k = Tensor::cat(&parts, 0);
        // Undo the permutation: row perm[i] of the input is row i of k.
        let inverse = perm.argsort(0, false);
        k.index_select(0, &inverse)
    }

    /// `theta_k <- m * theta_k + (1 - m) * theta_q` over `ema_pairs` (official formula order).
    pub fn momentum_update(&self, m: f64) {
        momentum_update(&self.ema_pairs, m);
    }
}

/// EMA over `(name, query, key)` triples: `k = k * m + q * (1 - m)`, in place, no grad.
pub fn momentum_update(pairs: &[(String, Tensor, Tensor)], m: f64) {
    tch::no_grad(|| {
        for (_, q, k) in pairs {
            let mut k = k.shallow_clone();
            let new = &k * m + q * (1.0 - m);
            k.copy_(&new);
        }
    });
}
