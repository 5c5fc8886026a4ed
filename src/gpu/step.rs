//! A capture-safe, launch-lean pre-training step over an [`SslModel`] (the project's SkeletonCLR /
//! CrosSCLR model): the same computation as `ssl::trainer::Pretrainer::train_step`, rearranged to
//! follow the rules of [`crate::gpu`]:
//!
//! * no host syncs: the loss stays on the device (returned detached), no non-finite check inside;
//! * the queue pointer is a device `i64` tensor; keys are written with `index_copy_` at
//!   `(ptr + arange(B)) % K` and the pointer advanced in place;
//! * the bone-parent index is created on the device once (not per call from host memory);
//! * EMA: one [`ema_`] call (two multi-tensor kernels) per branch, in the official branch order,
//!   motion-only in phase 2 when the spec says so;
//! * SGD: [`FusedSgd`] (one fused kernel over all parameters; device-resident lr, so a schedule
//!   change needs no recapture); gradients are dropped, not zeroed, before backward.
//!
//! For the training loop (`train::pretrain`, `step_impl: fast | graph`):
//! [`FastStep::step_with_views`] also returns the per-view losses (stacked on the device), and
//! [`FastStep::momentum_state`] / [`FastStep::load_momentum_state`] exchange the momentum buffers
//! with `train::sgd::Sgd`'s checkpoint format (the state carries over exactly both ways: a zero
//! buffer is SGD's "not stepped yet").
//!
//! Numerically it matches `train_step` (same ops in the same order for the forward and the loss,
//! the same SGD formula; tested on CPU in tests/gpu_step.rs).
use super::ops::{ema_, FusedSgd, SgdConfig};
use super::streams::SideStreams;
use crate::data::views::{motion, View};
use crate::dist::{GradBuckets, ProcessGroup};
use crate::error::{Error, Result};
use crate::ssl::model::{shuffled_key_across_ranks, SslModel};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// See the module docs. Built for one batch size (the queue pointer advances by it).
pub struct FastStep {
    device: Device,
    batch: i64,
    queue_size: i64,
    /// (V,) i64 bone parents on the device (for the bone views).
    bone_index: Tensor,
    /// (1,) i64 queue pointer on the device.
    ptr: Tensor,
    /// (B,) i64 `0..B` on the device.
    arange_b: Tensor,
    /// Per branch: (key parameters, query parameters) in EMA order.
    ema: Vec<(Vec<Tensor>, Vec<Tensor>)>,
    opt: FusedSgd,
    params: Vec<Tensor>,
    /// Names of `params` (the model's `trainable()` names, sorted: `train::sgd::Sgd`'s order).
    names: Vec<String>,
    /// Side streams for the query and key passes of each view (CUDA only; [`SideStreams`], as
    /// many as the model's `kernels.view_streams` asks).
    streams: Option<SideStreams>,
    /// Data parallelism ([`FastStep::join_group`]); `None` in a single-process run.
    data_parallel: Option<DataParallel>,
}

/// What a data-parallel [`FastStep`] adds to the step: the same collectives, in the same places,
/// as the reference step (`ssl::trainer::Pretrainer::train_step`).
struct DataParallel {
    group: Arc<ProcessGroup>,
    /// (B x world,) i64 `0..B x world` on the device: the gathered keys' queue offsets.
    arange_global: Tensor,
    /// The batch-norm running statistics (query and key encoders, name order) averaged over the
    /// ranks after every step; empty with SyncBatchNorm (whose statistics agree already).
    running_statistics: Vec<Tensor>,
    /// Shuffle BN across the ranks (`dist_shuffle_bn`): the key passes run on a permutation of
    /// the global batch ([`shuffled_key_across_ranks`]).
    shuffle: bool,
    /// Gradient buckets all-reduced during backward (`bucket_cap_mb` > 0, no side streams).
    buckets: Option<GradBuckets>,
}

/// The losses of one step, detached, on the model's device (no host sync).
pub struct StepLosses {
    /// () f32: the total loss (the left fold `v0 + v1 + ...` of the view losses, as the reference).
    pub total: Tensor,
    /// (V,) f32: the per-view losses in view order.
    pub views: Tensor,
}

impl FastStep {
    /// Prepares the step for `model` with batches of `batch` samples, SGD `lr` / `sgd`. The queue
    /// pointer starts at the model's.
    pub fn new(model: &SslModel, batch: i64, lr: f64, sgd: SgdConfig) -> Result<Self> {
        let device = model.vs_q.device();
        let queue_size = model.spec.queue_size;
        if batch <= 0 || queue_size % batch != 0 {
            return Err(Error::config(format!(
                "batch {batch} must divide the queue size {queue_size}"
            )));
        }
        let parents: Vec<i64> = model.layout.bone_parent.iter().map(|&p| p as i64).collect();
        let bone_index = Tensor::from_slice(&parents).to_device(device);
        let ptr = Tensor::from_slice(&[model.queue_ptr() as i64]).to_device(device);
        let arange_b = Tensor::arange(batch, (Kind::Int64, device));
        let ema = model
            .branches
            .iter()
            .map(|b| {
                let keys = b
                    .ema_pairs
                    .iter()
                    .map(|(_, _, k)| k.shallow_clone())
                    .collect();
                let queries = b
                    .ema_pairs
                    .iter()
                    .map(|(_, q, _)| q.shallow_clone())
                    .collect();
                (keys, queries)
            })
            .collect();
        let (names, params): (Vec<String>, Vec<Tensor>) = model.trainable().into_iter().unzip();
        let opt = FusedSgd::new(&params, lr, sgd)?;
        let streams = SideStreams::new(
            device,
            model.kernels.view_streams.count(model.branches.len()),
        )?;
        Ok(FastStep {
            device,
            batch,
            queue_size,
            bone_index,
            ptr,
            arange_b,
            ema,
            opt,
            params,
            names,
            streams,
            data_parallel: None,
        })
    }

    /// Makes this step one rank of a data-parallel job, as `Pretrainer::join_group` does for the
    /// reference step (call that first: it broadcasts rank 0's variables and installs
    /// SyncBatchNorm). Every step then averages the gradients over the ranks before the SGD
    /// update (one coalesced all-reduce), all-gathers every view's keys before the enqueue (the
    /// queue advances by B x world, identically on every rank) and, without `sync_bn`, averages
    /// the batch-norm running statistics after the update. `dist_shuffle_bn`: the key passes see
    /// a permutation of the global batch, drawn at the reference step's point.
    ///
    /// The collectives need the host (Gloo stages CUDA tensors through it): a data-parallel step
    /// is not capture-safe, so the training loop runs it eagerly (`step_impl: fast`).
    pub fn join_group(
        &mut self,
        model: &SslModel,
        group: Arc<ProcessGroup>,
        sync_bn: bool,
        shuffle: bool,
        bucket_cap_mb: f64,
    ) -> Result<()> {
        let global = self.batch * group.world_size() as i64;
        if self.queue_size % global != 0 {
            return Err(Error::config(format!(
                "queue_size {} must be a multiple of the global batch {global} ({} per rank x {} \
                 ranks): every rank enqueues the keys of all ranks",
                self.queue_size,
                self.batch,
                group.world_size()
            )));
        }
        let running_statistics = if sync_bn {
            Vec::new()
        } else {
            model.running_statistics()
        };
        // Side streams run each view's backward on its own stream: a bucket spanning two views
        // would start its all-reduce ordered after one of them only, so they keep the coalesced
        // all-reduce after backward.
        let buckets = if bucket_cap_mb > 0.0 && self.streams.is_none() {
            let cap = (bucket_cap_mb * 1024.0 * 1024.0) as usize;
            GradBuckets::new(&group, &self.params, cap)?
        } else {
            None
        };
        self.data_parallel = Some(DataParallel {
            arange_global: Tensor::arange(global, (Kind::Int64, self.device)),
            group,
            running_statistics,
            shuffle,
            buckets,
        });
        Ok(())
    }

    /// The data-parallel group this step is a rank of, if any.
    pub fn group(&self) -> Option<&Arc<ProcessGroup>> {
        self.data_parallel.as_ref().map(|d| &d.group)
    }

    /// Sets the learning rate (device-side; valid across graph replays).
    pub fn set_lr(&mut self, lr: f64) {
        self.opt.set_lr(lr);
    }

    /// The optimiser (momentum buffers for checkpoints).
    pub fn optimizer(&self) -> &FusedSgd {
        &self.opt
    }

    /// The momentum buffers as `(parameter name, copy of the buffer)`, every parameter, in the
    /// format of `train::sgd::Sgd::state` / `load_state` (a buffer never stepped is zeros, which
    /// `Sgd` continues exactly: `0.9 * 0 + g = g`).
    pub fn momentum_state(&self) -> Vec<(String, Tensor)> {
        tch::no_grad(|| {
            self.names
                .iter()
                .zip(self.opt.momentum_buffers())
                .map(|(n, b)| (n.clone(), b.copy()))
                .collect()
        })
    }

    /// Loads momentum buffers by parameter name (e.g. `Sgd::state()` after a checkpoint load),
    /// in place; parameters without an entry get zeros (= not stepped yet, exact). Unknown names
    /// are an error.
    pub fn load_momentum_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let mut bufs: Vec<Option<&Tensor>> = vec![None; self.names.len()];
        for (name, t) in state {
            let i = self.names.iter().position(|n| n == name).ok_or_else(|| {
                Error::Other(format!(
                    "FastStep: momentum state names unknown parameter '{name}'"
                ))
            })?;
            bufs[i] = Some(t);
        }
        self.opt.load_momentum(&bufs)
    }

    /// The device queue pointer, (1,) i64.
    pub fn queue_ptr(&self) -> &Tensor {
        &self.ptr
    }

    /// Copies the device pointer back into the model's host-side queues (a host sync; call after
    /// the timed / captured region, e.g. before a checkpoint).
    pub fn write_back_ptr(&self, model: &mut SslModel) {
        let p = self.ptr.int64_value(&[0]) as usize;
        for b in &mut model.branches {
            b.queue.ptr = p;
        }
    }

    fn view_input(&self, view: View, x: &Tensor) -> Tensor {
        const JOINT_DIM: i64 = 3;
        match view {
            View::Joint => x.shallow_clone(),
            View::Motion => motion(x),
            View::Bone => x - x.index_select(JOINT_DIM, &self.bone_index),
            View::BoneMotion => motion(&(x - x.index_select(JOINT_DIM, &self.bone_index))),
        }
    }

    /// One training step on augmented joint batches `x_q`, `x_k` (B, C, T, V, M), already on the
    /// model's device, in phase 2 (CVC-KM) when `cross`. Returns the total loss (detached scalar on
    /// the device). Queues are written and the pointer advanced on the device.
    pub fn step(
        &mut self,
        model: &SslModel,
        x_q: &Tensor,
        x_k: &Tensor,
        cross: bool,
    ) -> Result<Tensor> {
        let (loss, _) = self.step_inner(model, x_q, x_k, cross)?;
        Ok(loss.detach())
    }

    /// [`FastStep::step`] that also returns the per-view losses, stacked on the device (one more
    /// small kernel; still no host sync, capture-safe).
    pub fn step_with_views(
        &mut self,
        model: &SslModel,
        x_q: &Tensor,
        x_k: &Tensor,
        cross: bool,
    ) -> Result<StepLosses> {
        let (loss, view_losses) = self.step_inner(model, x_q, x_k, cross)?;
        let detached: Vec<Tensor> = view_losses.iter().map(|l| l.detach()).collect();
        Ok(StepLosses {
            total: loss.detach(),
            views: Tensor::f_stack(&detached, 0)?,
        })
    }

    /// The step; returns the total loss and the per-view losses (scalars, still in the graph).
    fn step_inner(
        &mut self,
        model: &SslModel,
        x_q: &Tensor,
        x_k: &Tensor,
        cross: bool,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        if x_q.size().first() != Some(&self.batch) || x_q.size() != x_k.size() {
            return Err(Error::Other(format!(
                "FastStep: batches of shape {:?} / {:?}, built for batch {}",
                x_q.size(),
                x_k.size(),
                self.batch
            )));
        }
        if x_q.device() != self.device || x_k.device() != self.device {
            return Err(Error::Other(format!(
                "FastStep: inputs must be on {:?}",
                self.device
            )));
        }
        let cross = cross && model.spec.cross.is_some();
        let branches = &model.branches;
        let primary_q = &branches[0].head_q;
        let primary_k = &branches[0].head_k;
        let motion_only = cross
            && model
                .spec
                .cross
                .as_ref()
                .is_some_and(|c| c.phase2_motion_ema_only);
        // EMA before the query passes (the reference updates between queries and keys): it reads
        // the query parameters, which a forward pass does not change, and writes only the key
        // parameters, so the result is the same and the query and key passes become independent.
        for (b, (keys, queries)) in branches.iter().zip(&self.ema) {
            if !motion_only || b.view == View::Motion {
                ema_(keys, queries, model.spec.momentum)?;
            }
        }
        let n = branches.len();
        // Shuffle BN (`shuffle_bn` groups): one key permutation per step, shared by the views.
        let groups = model.spec.recipe.shuffle_bn;
        let perm =
            (groups > 1).then(|| Tensor::randperm(x_k.size()[0], (tch::Kind::Int64, x_k.device())));
        // Shuffle BN across ranks: a permutation of the global batch, drawn at the same point as
        // the reference step's (every rank draws, rank 0's is used).
        let rank_perm = match &self.data_parallel {
            Some(dp) if dp.shuffle => {
                let global = x_k.size()[0] * dp.group.world_size() as i64;
                let p = Tensor::randperm(global, (Kind::Int64, Device::Cpu));
                dp.group.broadcast_(&p, 0)?;
                Some((&dp.group, p.to_device(self.device)))
            }
            _ => None,
        };
        let pass = |i: usize| -> Result<Tensor> {
            Ok(if i < n {
                let b = &branches[i];
                b.query_grouped(&self.view_input(b.view, x_q), Some(primary_q), groups)
            } else {
                let b = &branches[i - n];
                let x_view = self.view_input(b.view, x_k);
                match &rank_perm {
                    Some((g, p)) => shuffled_key_across_ranks(b, &x_view, primary_k, g, p)?,
                    None => b.key_shuffled(&x_view, Some(primary_k), groups, perm.as_ref()),
                }
            })
        };
        // Queries then keys, in view order (the reference's issue order, so the same dropout draws),
        // each on its own side stream when the device has them (not with collectives in the key
        // passes: those run in order on the current stream).
        let mut passes = match &self.streams {
            Some(streams) if rank_perm.is_none() => streams.fork_join(2 * n, &[x_q, x_k], pass)?,
            _ => (0..2 * n).map(pass).collect::<Result<Vec<_>>>()?,
        };
        let ks = passes.split_off(n);
        let qs = passes;
        let reversed = model.reversed_keys(x_k, primary_k);
        let view_losses = model.view_losses(&qs, &ks, reversed.as_deref(), cross);
        let loss = view_losses
            .iter()
            .skip(1)
            .fold(view_losses[0].shallow_clone(), |acc, l| acc + l);
        self.opt.zero_grad(true)?;
        let buckets = self
            .data_parallel
            .as_ref()
            .and_then(|dp| dp.buckets.as_ref());
        if let Some(b) = buckets {
            b.arm()?;
        }
        loss.f_backward()?;
        if let Some(streams) = &self.streams {
            // Autograd ran each view's backward on its forward's stream; the update reads all grads.
            streams.join_all()?;
        }
        if let Some(b) = buckets {
            b.finish()?;
        } else if let Some(dp) = &self.data_parallel {
            // The parameters that took part (a phase may leave some without a gradient).
            let grads: Vec<Tensor> = self
                .params
                .iter()
                .map(Tensor::grad)
                .filter(Tensor::defined)
                .collect();
            dp.group.all_reduce_mean_(&grads)?;
        }
        self.opt.step()?;
        if let Some(dp) = &self.data_parallel {
            if !dp.running_statistics.is_empty() {
                dp.group.all_reduce_mean_(&dp.running_statistics)?;
            }
        }
        tch::no_grad(|| -> Result<()> {
            let (arange, advance) = match &self.data_parallel {
                Some(dp) => (&dp.arange_global, self.batch * dp.group.world_size() as i64),
                None => (&self.arange_b, self.batch),
            };
            let idx = (&self.ptr + arange).remainder(self.queue_size);
            for (b, k) in branches.iter().zip(&ks) {
                let keys = match &self.data_parallel {
                    Some(dp) => dp.group.all_gather(&k.detach())?,
                    None => k.detach(),
                };
                let mut queue = b.queue.keys.shallow_clone();
                let _ = queue.f_index_copy_(1, &idx, &keys.transpose(0, 1))?;
            }
            let _ = self
                .ptr
                .f_add_scalar_(advance)?
                .f_remainder_(self.queue_size)?;
            Ok(())
        })?;
        Ok((loss, view_losses))
    }

    /// True when the query and key passes run on side streams ([`SideStreams`]).
    pub fn uses_side_streams(&self) -> bool {
        self.streams.is_some()
    }

    /// Number of side streams the passes run on (0 without; `kernels.view_streams`).
    pub fn side_stream_count(&self) -> usize {
        self.streams.as_ref().map_or(0, SideStreams::len)
    }

    /// The trainable parameters, in optimiser order.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }
}
