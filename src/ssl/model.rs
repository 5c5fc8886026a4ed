//! The multi-view MoCo model behind SkeletonCLR (one view) and CrosSCLR (2 or 3 views, views as
//! data: one [`Branch`] per view, no per-view copies of code).
//!
//! Two VarStores: `vs_q` holds the query encoders and heads (the only trainable variables, plus
//! their BN buffers); `vs_k` holds the key encoders and the queues (frozen). Names follow the
//! official state dict (see [`crate::ssl::branch`]). Shared-head quirk: the motion/bone heads'
//! shared layers exist once, as `encoder_q.fc.0/2` (`encoder_k.fc.0/2` on the key side); the
//! checkpoint writer adds the official duplicate names `encoder_q_motion.fc.2.0.weight`, ... (see
//! [`SslModel::state_tensors`]), so checkpoints carry exactly the official 3-view key set.
use crate::data::layout::Layout;
use crate::data::views::View;
use crate::dist::ProcessGroup;
use crate::error::{Error, Result};
use crate::model::kernels::Kernels;
use crate::model::stgcn::StGcnConfig;
use crate::ssl::branch::{build_encoder, view_suffix, Branch, Head};
use crate::ssl::loss::{
    cvc_km_losses_with, info_nce, mask_queue_logits, moco_logits_with, uniformity,
};
use crate::ssl::queue::Queue;
use crate::train::config::{InitScheme, ModelKind, PretrainConfig};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tch::{nn, Device, Kind, Tensor};

/// CrosSCLR's phase-2 settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossSpec {
    /// Phase 2 for 1-based epochs `> cross_epoch`.
    pub cross_epoch: usize,
    pub topk: i64,
    pub context: bool,
    /// Official quirk: in phase 2 only the motion key encoder gets the EMA update.
    pub phase2_motion_ema_only: bool,
}

/// Everything needed to build an [`SslModel`].
#[derive(Debug, Clone, PartialEq)]
pub struct SslSpec {
    /// Views in official order; the first owns the shared head.
    pub views: Vec<View>,
    /// `true`: CrosSCLR naming (`encoder_q_motion`, ...); `false`: SkeletonCLR (always `encoder_q`).
    pub per_view_names: bool,
    pub stgcn: StGcnConfig,
    pub feature_dim: i64,
    pub mlp: bool,
    pub queue_size: i64,
    /// EMA momentum m.
    pub momentum: f64,
    pub temperature: f64,
    /// `None` for SkeletonCLR.
    pub cross: Option<CrossSpec>,
    /// Official quirk: non-primary heads end in the primary head's layers (shared).
    pub shared_head: bool,
    /// Official quirk: key encoders are randomly initialised independently of the queries.
    pub independent_key_init: bool,
    /// The small-data levers (defaults: the official behaviour).
    pub recipe: Recipe,
}

/// Model-side levers of the small-data recipe (see `configs/small/`); `Default` is official.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Recipe {
    /// How the encoders and heads are initialised.
    pub init: InitScheme,
    /// Batch norm inside the projection MLP (`fc.1.*`).
    pub head_bn: bool,
    /// Shuffle-BN groups (0 or 1 = off).
    pub shuffle_bn: usize,
    /// Time-reversed keys as extra negatives (one per sample and view).
    pub reverse_negatives: bool,
    /// Weight of the uniformity term added to each view's loss (0 = off).
    pub uniformity: f64,
    /// Where the negatives come from.
    pub negatives: Negatives,
}

pub use crate::train::config::Negatives;

impl SslSpec {
    /// From a pre-training config.
    pub fn from_config(cfg: &PretrainConfig) -> Result<Self> {
        let a = &cfg.model_args;
        let views = cfg.views()?;
        let cross = match cfg.model {
            ModelKind::Skeletonclr => None,
            _ => Some(CrossSpec {
                cross_epoch: cfg.cross_epoch,
                topk: cfg.topk,
                context: cfg.context,
                phase2_motion_ema_only: cfg.phase2_motion_ema_only,
            }),
        };
        Ok(SslSpec {
            per_view_names: cfg.model != ModelKind::Skeletonclr,
            views,
            stgcn: StGcnConfig {
                in_channels: a.in_channels,
                hidden_channels: a.hidden_channels,
                hidden_dim: a.hidden_dim,
                dropout: a.dropout,
                edge_importance: a.edge_importance_weighting,
                data_bn: a.data_bn,
                ..StGcnConfig::default()
            },
            feature_dim: a.feature_dim,
            mlp: a.mlp,
            queue_size: a.queue_size,
            momentum: a.momentum,
            temperature: a.temperature,
            cross,
            shared_head: cfg.shared_head,
            independent_key_init: cfg.independent_key_init,
            recipe: Recipe {
                init: cfg.init,
                head_bn: cfg.head_bn,
                shuffle_bn: cfg.shuffle_bn,
                reverse_negatives: cfg.reverse_negatives,
                uniformity: cfg.uniformity,
                negatives: cfg.negatives,
            },
        })
    }
}

/// The output of one forward pass.
pub struct StepOutput {
    /// Total loss (scalar, with grad).
    pub loss: Tensor,
    /// Per-view losses (scalars) in view order.
    pub view_losses: Vec<Tensor>,
    /// Per-view keys (B, feature_dim) to enqueue after the loss has been used.
    pub keys: Vec<Tensor>,
    /// 1 = independent MoCo losses, 2 = CVC-KM.
    pub phase: u8,
}

/// SkeletonCLR / CrosSCLR model. See the module docs.
pub struct SslModel {
    pub spec: SslSpec,
    pub layout: Layout,
    pub vs_q: nn::VarStore,
    pub vs_k: nn::VarStore,
    pub branches: Vec<Branch>,
    /// Which code computes the encoders and the fast step's streams (default: the measured best
    /// for the device; [`SslModel::set_kernels`]).
    pub kernels: Kernels,
    /// Shuffle BN across the ranks of this group (`dist_shuffle_bn`; `None`: off); see
    /// [`SslModel::forward`].
    pub shuffle_group: Option<Arc<ProcessGroup>>,
}

impl SslModel {
    /// Builds the model on `device`: query encoders, key encoders (independent random init or a
    /// copy), queues (randn, column-normalised). Seed torch (`tch::manual_seed`) before for
    /// reproducible weights.
    pub fn new(spec: &SslSpec, layout: &Layout, device: Device) -> Result<Self> {
        if spec.views.is_empty() {
            return Err(Error::config("model needs at least one view"));
        }
        if !spec.per_view_names && spec.views.len() != 1 {
            return Err(Error::config("SkeletonCLR naming needs exactly one view"));
        }
        let sharing = spec.shared_head && spec.mlp && spec.views.len() > 1;
        let vs_q = nn::VarStore::new(device);
        let mut vs_k = nn::VarStore::new(device);
        let mut branches = Vec::with_capacity(spec.views.len());
        for (i, &view) in spec.views.iter().enumerate() {
            let suffix = if spec.per_view_names {
                view_suffix(view)
            } else {
                String::new()
            };
            let shared_tail = sharing && i > 0;
            let (encoder_q, head_q) = build_encoder(
                &(vs_q.root() / format!("encoder_q{suffix}")),
                &spec.stgcn,
                layout,
                spec.feature_dim,
                spec.mlp,
                shared_tail,
                spec.recipe.head_bn,
            );
            let (encoder_k, head_k) = build_encoder(
                &(vs_k.root() / format!("encoder_k{suffix}")),
                &spec.stgcn,
                layout,
                spec.feature_dim,
                spec.mlp,
                shared_tail,
                spec.recipe.head_bn,
            );
            let q = Queue::new(spec.feature_dim, spec.queue_size, device);
            let keys = vs_k.root().add(&format!("queue{suffix}"), q.keys, false);
            branches.push(Branch {
                view,
                suffix,
                encoder_q,
                encoder_k,
                head_q,
                head_k,
                queue: Queue::from_tensor(keys, 0),
                ema_pairs: Vec::new(),
            });
        }
        if spec.recipe.init == InitScheme::Pytorch {
            pytorch_init(&vs_q);
            pytorch_init(&vs_k);
        }
        vs_k.freeze();
        // EMA pairs by name: a branch walks its own `encoder_q{suffix}.*` parameters and, when its
        // head is a shared tail, the primary head's `encoder_q.fc.*` (official `parameters()`).
        let q_vars = vs_q.variables();
        let k_vars = vs_k.variables();
        let mut param_names: Vec<&String> = q_vars
            .iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(n, _)| n)
            .collect();
        param_names.sort();
        let primary_fc = format!("encoder_q{}.fc.", branches[0].suffix);
        for b in &mut branches {
            let own = format!("encoder_q{}.", b.suffix);
            let shared = matches!(b.head_q, Head::SharedTail(_));
            for name in &param_names {
                if name.starts_with(&own) || (shared && name.starts_with(&primary_fc)) {
                    let key_name = format!("encoder_k{}", &name["encoder_q".len()..]);
                    let k = k_vars.get(&key_name).ok_or_else(|| {
                        Error::Other(format!("key encoder lacks '{key_name}' for '{name}'"))
                    })?;
                    b.ema_pairs.push((
                        (*name).clone(),
                        q_vars[*name].shallow_clone(),
                        k.shallow_clone(),
                    ));
                }
            }
        }
        if !spec.independent_key_init {
            tch::no_grad(|| {
                for b in &branches {
                    for (_, q, k) in &b.ema_pairs {
                        k.shallow_clone().copy_(q);
                    }
                }
            });
        }
        Ok(SslModel {
            spec: spec.clone(),
            layout: layout.clone(),
            vs_q,
            vs_k,
            branches,
            kernels: Kernels::for_device(device),
            shuffle_group: None,
        })
    }

    /// Sets the kernel choices of every encoder (query and key) and of the fast step.
    pub fn set_kernels(&mut self, kernels: Kernels) {
        for b in &mut self.branches {
            b.encoder_q.set_kernels(kernels);
            b.encoder_k.set_kernels(kernels);
        }
        self.kernels = kernels;
    }

    /// The batch-norm running means and variances of the query and key sides (shallow clones
    /// sharing storage), in name order: what a data-parallel step averages over the ranks when
    /// each rank's batch norms saw only its share of the batch.
    pub fn running_statistics(&self) -> Vec<Tensor> {
        let mut out = Vec::new();
        for vs in [&self.vs_q, &self.vs_k] {
            let mut vars: Vec<(String, Tensor)> = vs
                .variables()
                .into_iter()
                .filter(|(n, _)| n.ends_with("running_mean") || n.ends_with("running_var"))
                .collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            out.extend(vars.into_iter().map(|(_, t)| t));
        }
        out
    }

    /// Data parallelism: this rank's rows of the global batch, for every encoder's dropout masks
    /// (see [`crate::model::stgcn::StGcn::set_rank_rows`]).
    pub fn set_rank_rows(&mut self, rows: Option<crate::model::stgcn::RankRows>) {
        for b in &mut self.branches {
            b.encoder_q.set_rank_rows(rows);
            b.encoder_k.set_rank_rows(rows);
        }
    }

    /// SyncBatchNorm over `group` for every batch norm of every encoder and head, query and key
    /// side (`None`: each process's own batch); see [`crate::model::stgcn::StGcn::set_sync_bn`].
    pub fn set_sync_bn(&mut self, group: Option<std::sync::Arc<crate::dist::ProcessGroup>>) {
        for b in &mut self.branches {
            b.encoder_q.set_sync_bn(group.clone());
            b.encoder_k.set_sync_bn(group.clone());
            b.head_q.set_sync_bn(group.clone());
            b.head_k.set_sync_bn(group.clone());
        }
    }

    /// Whether 1-based `epoch` runs CVC-KM (phase 2).
    pub fn is_cross_epoch(&self, epoch: usize) -> bool {
        self.spec
            .cross
            .as_ref()
            .is_some_and(|c| epoch > c.cross_epoch)
    }

    /// Forward pass of one step on augmented joint batches `x_q`, `x_k` (B, C, T, V, M) already on
    /// the model's device: queries, EMA of the key encoders (before the key forward), keys, loss.
    /// The queues are NOT written: call [`SslModel::enqueue`] with `out.keys` after the loss has
    /// been used (backward): the logits read the pre-step queues exactly as the official code,
    /// which clones them, does.
    pub fn forward(&self, x_q: &Tensor, x_k: &Tensor, epoch: usize) -> StepOutput {
        let cross = self.is_cross_epoch(epoch);
        let primary_q = &self.branches[0].head_q;
        let primary_k = &self.branches[0].head_k;
        let groups = self.spec.recipe.shuffle_bn;
        // Shuffle BN: one key permutation per step, shared by the views, drawn from torch's
        // generator before any dropout mask (the fast step draws it at the same point).
        let perm =
            (groups > 1).then(|| Tensor::randperm(x_k.size()[0], (Kind::Int64, x_k.device())));
        // Shuffle BN across ranks: the permutation of the global batch, drawn at the same point
        // (every rank draws, rank 0's is used).
        let rank_perm = self.shuffle_group.as_ref().map(|g| {
            let n = x_k.size()[0] * g.world_size() as i64;
            let p = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
            g.broadcast_(&p, 0)
                .unwrap_or_else(|e| panic!("shuffle BN permutation: {e}"));
            p.to_device(x_k.device())
        });
        let qs: Vec<Tensor> = self
            .branches
            .iter()
            .map(|b| b.query_grouped(&b.input(x_q, &self.layout), Some(primary_q), groups))
            .collect();
        for b in &self.branches {
            let motion_only = cross
                && self
                    .spec
                    .cross
                    .as_ref()
                    .is_some_and(|c| c.phase2_motion_ema_only);
            if !motion_only || b.view == View::Motion {
                b.momentum_update(self.spec.momentum);
            }
        }
        let ks: Vec<Tensor> = self
            .branches
            .iter()
            .map(|b| {
                let x_view = b.input(x_k, &self.layout);
                match (&self.shuffle_group, &rank_perm) {
                    (Some(g), Some(p)) => shuffled_key_across_ranks(b, &x_view, primary_k, g, p)
                        .unwrap_or_else(|e| panic!("shuffle BN across ranks: {e}")),
                    _ => b.key_shuffled(&x_view, Some(primary_k), groups, perm.as_ref()),
                }
            })
            .collect();
        let reversed = self.reversed_keys(x_k, primary_k);
        let view_losses = self.view_losses(&qs, &ks, reversed.as_deref(), cross);
        let loss = view_losses
            .iter()
            .skip(1)
            .fold(view_losses[0].shallow_clone(), |acc, l| acc + l);
        StepOutput {
            loss,
            view_losses,
            keys: ks,
            phase: if cross { 2 } else { 1 },
        }
    }

    /// Shuffle BN across ranks for `dist_shuffle_bn` (see [`shuffled_key_across_ranks`]).
    pub fn set_shuffle_group(&mut self, group: Option<Arc<ProcessGroup>>) {
        self.shuffle_group = group;
    }

    /// `reverse_negatives`: per view, the keys (N, feature_dim) of the time-reversed key batch (`x_k` flipped along T), computed like the
    /// keys (key encoder, train mode, no grad). `None` when the lever is off.
    pub fn reversed_keys(
        &self,
        x_k: &Tensor,
        primary_k: &crate::ssl::branch::Head,
    ) -> Option<Vec<Tensor>> {
        if !self.spec.recipe.reverse_negatives {
            return None;
        }
        let x_rev = x_k.flip([2]);
        Some(
            self.branches
                .iter()
                .map(|b| b.key(&b.input(&x_rev, &self.layout), Some(primary_k)))
                .collect(),
        )
    }

    /// Per view, the pool the negatives (and CVC-KM's mined positives) come from, `(D, P)`, and
    /// the `(N, P)` mask of the entries that are the query's own positive, per [`Negatives`]: the
    /// queue (`P = K`, no mask: the official loss), this batch's keys (`P = N`, the diagonal
    /// masked), or both (`P = N + K`).
    pub fn negative_pools(&self, ks: &[Tensor]) -> (Vec<Tensor>, Option<Tensor>) {
        let queues = || self.branches.iter().map(|b| b.queue.keys.shallow_clone());
        let batch_keys = || ks.iter().map(|k| k.detach().tr());
        let n = ks[0].size()[0];
        let device = ks[0].device();
        let eye = || Tensor::eye(n, (Kind::Bool, device));
        match self.spec.recipe.negatives {
            Negatives::Queue => (queues().collect(), None),
            Negatives::Batch => (batch_keys().collect(), Some(eye())),
            Negatives::Both => {
                let pools = batch_keys()
                    .zip(queues())
                    .map(|(b, q)| Tensor::cat(&[b, q.to_kind(ks[0].kind())], 1))
                    .collect();
                let queue_part = Tensor::zeros([n, self.spec.queue_size], (Kind::Bool, device));
                (pools, Some(Tensor::cat(&[eye(), queue_part], 1)))
            }
        }
    }

    /// Per-view losses from queries `qs`, keys `ks` (N, D each, view order) against the
    /// negatives' pools ([`SslModel::negative_pools`]; the current queues by default): MoCo
    /// InfoNCE in phase 1, CVC-KM (`cross`) in phase 2. With `reversed` keys
    /// ([`SslModel::reversed_keys`]) each query also gets `q . k_rev` as one extra negative.
    pub fn view_losses(
        &self,
        qs: &[Tensor],
        ks: &[Tensor],
        reversed: Option<&[Tensor]>,
        cross: bool,
    ) -> Vec<Tensor> {
        let tau = self.spec.temperature;
        let extra: Option<Vec<Tensor>> = reversed.map(|r| {
            qs.iter()
                .zip(r)
                .map(|(q, kr)| (q * kr).sum_dim_intlist(&[1i64][..], true, q.kind()))
                .collect()
        });
        // The negatives' pool of each view, (D, P), and which entries are the query's own
        // sample, (N, P) bool (`None`: nothing masked, the official loss).
        let (memories, own) = self.negative_pools(ks);
        let losses: Vec<Tensor> = match (&self.spec.cross, cross) {
            (Some(c), true) => cvc_km_losses_with(
                qs,
                ks,
                &memories,
                tau,
                c.topk,
                c.context,
                extra.as_deref(),
                own.as_ref(),
            ),
            _ => (0..self.branches.len())
                .map(|i| {
                    let e = extra.as_ref().map(|e| &e[i]);
                    let logits = moco_logits_with(&qs[i], &ks[i], &memories[i], tau, e);
                    info_nce(&match &own {
                        Some(m) => mask_queue_logits(&logits, m),
                        None => logits,
                    })
                })
                .collect(),
        };
        let w = self.spec.recipe.uniformity;
        if w == 0.0 {
            return losses;
        }
        losses
            .into_iter()
            .zip(qs)
            .map(|(l, q)| l + uniformity(q) * w)
            .collect()
    }

    /// Writes each view's keys at the same slots of its queue (aligned queues) and advances the
    /// pointers together.
    pub fn enqueue(&mut self, keys: &[Tensor]) -> Result<()> {
        for (b, k) in self.branches.iter_mut().zip(keys) {
            b.queue.enqueue(k)?;
        }
        Ok(())
    }

    /// The common queue pointer.
    pub fn queue_ptr(&self) -> usize {
        self.branches[0].queue.ptr
    }

    /// Trainable `(name, tensor)` pairs (query side only).
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .vs_q
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Every tensor of the model under its official state-dict name, on the CPU: query and key
    /// variables, queues, `queue_ptr{suffix}` (i64, shape `[1]`) and, with the shared head, the
    /// official duplicate names of the shared layers (`encoder_q_motion.fc.2.0.weight` = a copy
    /// of `encoder_q.fc.0.weight`, ...).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut all: BTreeMap<String, Tensor> = BTreeMap::new();
        for vs in [&self.vs_q, &self.vs_k] {
            for (n, t) in vs.variables() {
                all.insert(n, t.detach().to_device(Device::Cpu).contiguous());
            }
        }
        for b in &self.branches {
            let ptr = Tensor::from_slice(&[b.queue.ptr as i64]);
            all.insert(format!("queue_ptr{}", b.suffix), ptr);
        }
        let aliases: Vec<(String, String)> = self.shared_aliases();
        for (alias, target) in aliases {
            if let Some(t) = all.get(&target) {
                let t = t.copy();
                all.insert(alias, t);
            }
        }
        all.into_iter().collect()
    }

    /// `(official duplicate name, our name)` for the shared head layers.
    pub fn shared_aliases(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let p = &self.branches[0].suffix;
        for b in self.branches.iter().skip(1) {
            if !matches!(b.head_q, Head::SharedTail(_)) {
                continue;
            }
            for side in ["q", "k"] {
                for layer in ["0", "2"] {
                    for w in ["weight", "bias"] {
                        out.push((
                            format!("encoder_{side}{}.fc.2.{layer}.{w}", b.suffix),
                            format!("encoder_{side}{p}.fc.{layer}.{w}"),
                        ));
                    }
                }
            }
        }
        out
    }

    /// Loads tensors written by [`SslModel::state_tensors`] (or an official state dict with the
    /// same names). Every variable must be present with the same shape; the shared-head duplicate
    /// names are accepted and ignored; other unknown names are an error.
    pub fn load_state_tensors(
        &mut self,
        tensors: &[(String, Tensor)],
        source: &std::path::Path,
    ) -> Result<()> {
        let given: HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let aliases: Vec<String> = self.shared_aliases().into_iter().map(|(a, _)| a).collect();
        let mut known: Vec<String> = aliases;
        for vs in [&self.vs_q, &self.vs_k] {
            for (name, var) in vs.variables() {
                let t = given
                    .get(name.as_str())
                    .ok_or_else(|| Error::input(source, format!("tensor '{name}'"), "missing"))?;
                if t.size() != var.size() {
                    return Err(Error::input(
                        source,
                        format!("tensor '{name}'"),
                        format!("shape {:?}, model has {:?}", t.size(), var.size()),
                    ));
                }
                tch::no_grad(|| var.shallow_clone().copy_(&t.to_kind(var.kind())));
                known.push(name);
            }
        }
        for b in &mut self.branches {
            let name = format!("queue_ptr{}", b.suffix);
            let t = given
                .get(name.as_str())
                .ok_or_else(|| Error::input(source, format!("tensor '{name}'"), "missing"))?;
            let ptr = t.int64_value(&[0]);
            if ptr < 0 || ptr as usize >= b.queue.len() {
                return Err(Error::input(
                    source,
                    format!("tensor '{name}'"),
                    format!("pointer {ptr} out of range"),
                ));
            }
            b.queue.ptr = ptr as usize;
            known.push(name);
        }
        // The official state dict also has per-view pointers we already read; anything else is unknown.
        for (n, _) in tensors {
            if !known.iter().any(|k| k == n) {
                return Err(Error::input(
                    source,
                    format!("tensor '{n}'"),
                    "not a variable of this model",
                ));
            }
        }
        Ok(())
    }

    /// Number of trainable scalars.
    pub fn num_trainable(&self) -> i64 {
        self.trainable().iter().map(|(_, t)| t.numel() as i64).sum()
    }
}

/// PyTorch's module defaults on every conv / linear / batch-norm variable of `vs` (queues,
/// running statistics and edge importances untouched): weights of rank >= 2 and their biases
/// U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = numel / out (`kaiming_uniform_(a=sqrt(5))`
/// and the bias rule of `nn.Conv2d` / `nn.Linear`), rank-1 (batch-norm) weights 1, biases 0.
pub fn pytorch_init(vs: &nn::VarStore) {
    let vars = vs.variables();
    // Name order: `variables()` is a HashMap whose iteration order changes from process to
    // process, and the draws below come from torch's one generator.
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    tch::no_grad(|| {
        for name in names {
            let t = &vars[name];
            let mut t = t.shallow_clone();
            if let Some(stem) = name.strip_suffix(".weight") {
                if t.dim() >= 2 {
                    let fan_in = (t.numel() as i64 / t.size()[0]).max(1) as f64;
                    let bound = 1.0 / fan_in.sqrt();
                    let _ = t.uniform_(-bound, bound);
                    if let Some(b) = vars.get(&format!("{stem}.bias")) {
                        let _ = b.shallow_clone().uniform_(-bound, bound);
                    }
                } else if t.dim() == 1 {
                    let _ = t.fill_(1.0);
                    if let Some(b) = vars.get(&format!("{stem}.bias")) {
                        let _ = b.shallow_clone().fill_(0.0);
                    }
                }
            }
        }
    });
}

/// MoCo's shuffle BN across ranks for one view: every rank's key inputs `x_view` `(B, ...)` are
/// gathered into the global batch (rank order), permuted by `perm` `(B · W,)` (the same on every
/// rank), and rank `r` encodes rows `r·B .. (r+1)·B` of the permuted batch (its batch norms see a
/// random share of the global batch, not its own queries' samples); the keys are gathered again,
/// un-permuted, and this rank's own rows `(B, D)` returned. With the queries encoded per rank,
/// this is [`Branch::key_shuffled`] / [`Branch::query_grouped`] with `W` groups on one process.
pub fn shuffled_key_across_ranks(
    b: &Branch,
    x_view: &Tensor,
    primary_k: &Head,
    group: &ProcessGroup,
    perm: &Tensor,
) -> Result<Tensor> {
    let n = x_view.size()[0];
    let rank = group.rank() as i64;
    let all = group.all_gather(x_view)?;
    let mine = all.index_select(0, perm).narrow(0, rank * n, n);
    let k = b.key(&mine, Some(primary_k));
    let keys = group.all_gather(&k)?;
    let inverse = perm.argsort(0, false);
    Ok(keys.index_select(0, &inverse).narrow(0, rank * n, n))
}

/// Moves a CPU batch to `device` as f32.
pub fn to_device(x: &Tensor, device: Device) -> Tensor {
    x.to_kind(Kind::Float).to_device(device)
}
