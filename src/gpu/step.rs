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
use crate::error::{Error, Result};
use crate::ssl::model::SslModel;
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
        })
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
        let pass = |i: usize| -> Result<Tensor> {
            Ok(if i < n {
                let b = &branches[i];
                b.query_grouped(&self.view_input(b.view, x_q), Some(primary_q), groups)
            } else {
                let b = &branches[i - n];
                b.key_shuffled(
                    &self.view_input(b.view, x_k),
                    Some(primary_k),
                    groups,
                    perm.as_ref(),
                )
            })
        };
        // Queries then keys, in view order (the reference's issue order, so the same dropout draws),
        // each on its own side stream when the device has them.
        let mut passes = match &self.streams {
            Some(streams) => streams.fork_join(2 * n, &[x_q, x_k], pass)?,
            None => (0..2 * n).map(pass).collect::<Result<Vec<_>>>()?,
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
        loss.f_backward()?;
        if let Some(streams) = &self.streams {
            // Autograd ran each view's backward on its forward's stream; the update reads all grads.
            streams.join_all()?;
        }
        self.opt.step()?;
        tch::no_grad(|| -> Result<()> {
            let idx = (&self.ptr + &self.arange_b).remainder(self.queue_size);
            for (b, k) in branches.iter().zip(&ks) {
                let mut queue = b.queue.keys.shallow_clone();
                let _ = queue.f_index_copy_(1, &idx, &k.detach().transpose(0, 1))?;
            }
            let _ = self
                .ptr
                .f_add_scalar_(self.batch)?
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
