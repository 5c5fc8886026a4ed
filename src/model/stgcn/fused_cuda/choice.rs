//! Per-shape choice between the fused CUDA kernels and the tch ops, timed once per process (as
//! cuDNN's benchmark mode does for convolutions): the first time an op meets a shape outside a
//! graph capture, both implementations run forward + backward on scratch copies (1 warm-up + 3
//! timed runs each, device-synchronised), and the faster one is used for that shape from then on.
//! So a fused kernel that loses on some shape or card never slows a run down, and the timings
//! are reported ([`choices`], the `fused_cuda_ops` field of `crossclr bench --json`).
//!
//! `kernels.fused_cuda=on` skips the timing and always uses the fused kernels (when they passed
//! the self-check); `off` never uses them (`crate::model::kernels`).
//!
//! What the timing measures: device work, as
//! a CUDA-graph step runs it: each implementation's forward + backward is captured into a CUDA
//! graph (after two warm-up runs on the graph's stream) and replayed [`GRAPH_REPLAYS`] times
//! between two syncs; the graphs are dropped and the allocator's cache emptied afterwards, so the
//! timing leaves no reserved memory behind. If a capture fails, that shape falls back to the
//! wall-time timing: one eager forward + backward between two device syncs, which for these ops
//! (20-100 µs of device work) is mostly the host's launch and autograd overhead, so its choices
//! flip between runs (it was a switch until 2026-12-07, removed as losing): on an H100 (2026-11-27) the wall
//! timing picked the tch ops for a BN whose fused kernel takes 0.116 ms of device time against
//! 0.210 ms (it measured 4.3 ms of wall time for it once). Alone the graph timing moved the step by
//! less than 1 %; with the other 2026-11-27 levers (four-wide kernels, folded and in-product
//! biases) it is part of the measured set (docs/gpu.md).
use super::super::layers::BatchNorm;
use crate::error::Result;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Timed runs per implementation (after one warm-up run).
const TIMED_RUNS: usize = 3;
/// Replays per implementation in the CUDA-graph timing.
pub const GRAPH_REPLAYS: usize = 20;

/// Which fused op a choice is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum FusedOp {
    /// Training batch norm, with a fused ReLU when `relu`.
    BatchNorm { relu: bool },
    /// Block tail `relu(dropout_p(bn(y)) + r)`; `p_bits` = `p.to_bits()`.
    Tail { p_bits: u64, residual: bool },
}

impl FusedOp {
    fn name(&self) -> String {
        match *self {
            FusedOp::BatchNorm { relu: true } => "bn_relu".into(),
            FusedOp::BatchNorm { relu: false } => "bn".into(),
            FusedOp::Tail { p_bits, residual } => format!(
                "tail(p={}{})",
                f64::from_bits(p_bits),
                if residual { ", residual" } else { "" }
            ),
        }
    }
}

/// One timed choice (milliseconds per forward + backward, median of the timed runs).
#[derive(Clone, Debug, Serialize)]
pub struct FusedChoice {
    pub device: String,
    pub op: String,
    pub shape: Vec<i64>,
    pub fused_ms: f64,
    pub native_ms: f64,
    pub fused: bool,
    /// How the two were timed: `wall` (eager forward + backward between device syncs) or `graph`
    /// (device time of captured forward + backward replays).
    pub timing: &'static str,
}

type Key = (usize, FusedOp, Vec<i64>);

fn table() -> &'static Mutex<HashMap<Key, FusedChoice>> {
    static TABLE: OnceLock<Mutex<HashMap<Key, FusedChoice>>> = OnceLock::new();
    TABLE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Every choice made so far in this process, in no particular order.
pub fn choices() -> Vec<FusedChoice> {
    let t = table().lock().unwrap_or_else(|e| e.into_inner());
    let mut all: Vec<FusedChoice> = t.values().cloned().collect();
    all.sort_by(|a, b| (&a.op, &a.shape).cmp(&(&b.op, &b.shape)));
    all
}

/// Whether `op` on input `x` (CUDA, already known to fit and to have passed the self-check)
/// should run on the fused kernels. Times both implementations the first time the shape is seen
/// outside a capture; inside a capture an unseen shape gets the tch ops.
pub(crate) fn prefer_fused(op: FusedOp, x: &Tensor, bn: &BatchNorm, r: Option<&Tensor>) -> bool {
    let Device::Cuda(index) = x.device() else {
        return false;
    };
    let key: Key = (index, op, x.size());
    if let Some(c) = table().lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return c.fused;
    }
    if !matches!(super::capturing(index), Ok(false)) {
        return false;
    }
    let timed = match tch::with_grad(|| time_both_in_graphs(op, x, bn, r)) {
        Ok(t) => Ok((t, "graph")),
        Err(e) => {
            eprintln!(
                "crossclr: timing the fused CUDA {} in CUDA graphs failed ({e}); timing it eagerly",
                op.name()
            );
            tch::with_grad(|| time_both(op, x, bn, r)).map(|t| (t, "wall"))
        }
    };
    match timed {
        Ok(((fused_ms, native_ms), timing)) => {
            let choice = FusedChoice {
                device: format!("cuda:{index}"),
                op: op.name(),
                shape: x.size(),
                fused_ms,
                native_ms,
                // Ties go to the fused op: it keeps fewer tensors for backward.
                fused: fused_ms <= native_ms,
                timing,
            };
            let fused = choice.fused;
            table()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, choice);
            fused
        }
        Err(e) => {
            eprintln!(
                "crossclr: timing the fused CUDA {} failed ({e}); using the tch ops",
                op.name()
            );
            false
        }
    }
}

/// A batch norm with the values of `bn` in fresh variables (timing runs must not move the
/// model's running statistics).
fn scratch_bn(vs: &tch::nn::VarStore, bn: &BatchNorm) -> BatchNorm {
    let copy = BatchNorm::new(&vs.root(), bn.weight.size()[0]);
    tch::no_grad(|| {
        for (dst, src) in [
            (&copy.weight, &bn.weight),
            (&copy.bias, &bn.bias),
            (&copy.running_mean, &bn.running_mean),
            (&copy.running_var, &bn.running_var),
        ] {
            dst.shallow_clone().copy_(src);
        }
    });
    copy
}

/// Forward + backward of `op` on scratch leaves (fresh copies of `x`, `r`; `sbn` a scratch batch
/// norm), with the fused kernels or with the tch ops.
fn run_once(
    op: FusedOp,
    x: &Tensor,
    sbn: &BatchNorm,
    r: Option<&Tensor>,
    fused: bool,
) -> Result<()> {
    let xs = x.detach().set_requires_grad(true);
    let rs = r.map(|r| r.detach().set_requires_grad(true));
    let out = match (op, fused) {
        (FusedOp::BatchNorm { relu }, true) => super::bn_train(&xs, sbn, relu)?,
        (FusedOp::BatchNorm { relu }, false) => super::super::fused_entry::native(&xs, sbn, relu),
        (FusedOp::Tail { p_bits, .. }, true) => {
            super::tail(&xs, sbn, f64::from_bits(p_bits), rs.as_ref(), 0)?
        }
        (FusedOp::Tail { p_bits, .. }, false) => {
            super::native_tail(&xs, sbn, f64::from_bits(p_bits), rs.as_ref())
        }
    };
    out.sum(Kind::Float).f_backward()?;
    Ok(())
}

/// Milliseconds of device work per forward + backward of `op`, fused and tch, each captured into
/// a CUDA graph and replayed [`GRAPH_REPLAYS`] times (module docs).
fn time_both_in_graphs(
    op: FusedOp,
    x: &Tensor,
    bn: &BatchNorm,
    r: Option<&Tensor>,
) -> Result<(f64, f64)> {
    use crate::gpu::{CaptureMode, CudaGraph};
    let device = x.device();
    let time = |fused: bool| -> Result<f64> {
        let vs = tch::nn::VarStore::new(device);
        let sbn = scratch_bn(&vs, bn);
        let mut graph = CudaGraph::new(device)?;
        graph.on_side_stream(|| -> Result<()> {
            run_once(op, x, &sbn, r, fused)?;
            run_once(op, x, &sbn, r, fused)
        })??;
        // Thread-local: data-loader threads may allocate pinned memory meanwhile.
        graph.capture(CaptureMode::ThreadLocal, || run_once(op, x, &sbn, r, fused))?;
        graph.replay()?;
        synchronize(device);
        let t0 = Instant::now();
        for _ in 0..GRAPH_REPLAYS {
            graph.replay()?;
        }
        synchronize(device);
        Ok(t0.elapsed().as_secs_f64() * 1e3 / GRAPH_REPLAYS as f64)
    };
    let timed = time(true).and_then(|fused| Ok((fused, time(false)?)));
    // The graphs' private pools (and the scratch tensors) go back to the driver; also after a
    // failure, so that nothing stays reserved.
    synchronize(device);
    let emptied = crate::gpu::memory::empty_cache();
    let timed = timed?;
    emptied?;
    Ok(timed)
}

/// Device milliseconds per forward + backward of the training batch norm (+ ReLU) of `x` with
/// `bn`'s values, fused and tch, as the choice times them (for tests and
/// diagnostics; `bn` is not touched). Errors on the CPU or when a capture fails.
pub fn graph_timed_bn(x: &Tensor, bn: &BatchNorm, relu: bool) -> Result<(f64, f64)> {
    tch::with_grad(|| time_both_in_graphs(FusedOp::BatchNorm { relu }, x, bn, None))
}

/// Median milliseconds of forward + backward of `op` with the fused kernels and with the tch ops.
fn time_both(op: FusedOp, x: &Tensor, bn: &BatchNorm, r: Option<&Tensor>) -> Result<(f64, f64)> {
    let device = x.device();
    let vs = tch::nn::VarStore::new(device);
    let sbn = scratch_bn(&vs, bn);
    let run = |fused: bool| run_once(op, x, &sbn, r, fused);
    let time = |fused: bool| -> Result<f64> {
        run(fused)?;
        let mut ms = Vec::with_capacity(TIMED_RUNS);
        for _ in 0..TIMED_RUNS {
            synchronize(device);
            let t0 = Instant::now();
            run(fused)?;
            synchronize(device);
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        Ok(ms[ms.len() / 2])
    };
    let fused = time(true)?;
    let native = time(false)?;
    Ok((fused, native))
}

fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

#[cfg(all(test, not(crossclr_no_shim)))]
mod tests {
    use super::*;

    /// The timing runs both implementations (on the CPU: the host emulation and the tch ops)
    /// forward and backward on scratch copies: the model's batch norm is not touched.
    #[test]
    fn timing_leaves_the_model_untouched() {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let bn = BatchNorm::new(&vs.root(), 3);
        let x = Tensor::randn([1, 3, 4, 10, 25], (Kind::Float, Device::Cpu));
        let r = Tensor::randn([1, 3, 4, 10, 25], (Kind::Float, Device::Cpu));
        let before: Vec<Tensor> = [&bn.running_mean, &bn.running_var, &bn.weight]
            .iter()
            .map(|t| t.copy())
            .collect();
        for (op, res) in [
            (FusedOp::BatchNorm { relu: true }, None),
            (
                FusedOp::Tail {
                    p_bits: 0.5f64.to_bits(),
                    residual: true,
                },
                Some(&r),
            ),
        ] {
            let (fused, native) = tch::with_grad(|| time_both(op, &x, &bn, res)).unwrap();
            assert!(fused > 0.0 && native > 0.0, "{op:?}: {fused} {native}");
        }
        for (t, b) in [&bn.running_mean, &bn.running_var, &bn.weight]
            .iter()
            .zip(&before)
        {
            assert!(t.equal(b));
        }
        assert_eq!(bn.num_batches_tracked.int64_value(&[]), 0);
        assert!(
            !bn.weight.grad().defined()
                || bn.weight.grad().abs().sum(Kind::Float).double_value(&[]) == 0.0
        );
        // Graph timing needs CUDA: a clear error on the CPU, nothing moved.
        let e = graph_timed_bn(&x, &bn, true).expect_err("no CUDA graphs on the CPU");
        assert!(e.to_string().contains("CUDA"), "{e}");
        // CPU tensors never choose the CUDA kernels.
        assert!(!prefer_fused(
            FusedOp::BatchNorm { relu: true },
            &x,
            &bn,
            None
        ));
    }
}
