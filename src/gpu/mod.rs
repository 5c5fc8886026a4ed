//! GPU acceleration through a small C++ shim over libtorch (csrc/shim.cpp, built by build.rs):
//! CUDA-graph capture of whole training steps, side streams for the independent encoder passes
//! ([`streams`]), TF32 / cuDNN-autotuning switches, multi-tensor EMA and fused SGD updates, and
//! CUDA memory statistics.
//!
//! The shim is optional: without libtorch headers the crate is built with `--cfg crossclr_no_shim`
//! and every function here returns an error saying so; without CUDA headers it is built CPU-only
//! (the foreach updates work, graphs and CUDA statistics return an error). [`shim_status`] says
//! which. See docs/gpu.md for measurements.
//!
//! # Capture-safety rules for a training step
//!
//! A CUDA graph records the kernels a step launches, with their *addresses and scalar arguments
//! frozen*; a replay re-runs exactly those kernels. A step is capture-safe when:
//!
//! 1. **No host syncs inside the step**: no `.double_value()`, `.int64_value()`, `f64::try_from`,
//!    `.to(Device::Cpu)`, `.print()`, `nonzero()`, boolean-mask indexing (dynamic shapes), and no
//!    host -> device copies from pageable memory (`Tensor::from_slice(..).to_device(cuda)`): create
//!    such constants once on the device, outside the step. Read the loss *after* a replay, from the
//!    static output tensor (ideally accumulated on the device and read once per epoch).
//! 2. **Everything the step reads or writes persists across replays**: parameters, gradients,
//!    momentum buffers, BN running statistics, queues, and the queue pointer. Gradients are either
//!    dropped before the capture and never touched outside it, or zeroed in place inside it;
//!    momentum buffers exist before the capture (zeros, see [`FusedSgd`]).
//! 3. **Host-side state is frozen**: a queue pointer kept as a Rust `usize` would make every replay
//!    write the same slots. Keep it as a device `i64` tensor: `idx = (ptr + arange(B)) % K`,
//!    `queue.index_copy_(1, &idx, &k.t())`, `ptr.add_(B).remainder_(K)` (all device ops, in place).
//!    Likewise branches on the epoch (phase 1 / phase 2) and a learning rate passed as a plain
//!    number are baked in: **recapture** when they change, or keep the lr as a device tensor
//!    ([`Lr::Tensor`], [`FusedSgd::set_lr`]).
//! 4. **Random numbers**: dropout draws from the default CUDA generator, whose state libtorch
//!    registers with the graph at capture; each replay advances it, so masks differ per step.
//!    Do not create new generators inside the step.
//! 5. **Static shapes**: batch shape fixed (drop_last), top-k with a fixed k, masks built with
//!    `scatter_` / `index_copy_`, not with data-dependent sizes.
//! 6. Warm up (>= 3 steps) on the graph's side stream before capturing ([`CapturedStep`] does),
//!    so that cuBLAS workspaces, cuDNN autotuning (`--cudnn-benchmark on`) and autograd state
//!    exist before the capture; shared-module EMA updates stay in separate [`ema_`] calls.
pub(crate) mod ffi;
pub mod graph;
pub mod memory;
pub mod ops;
pub mod profiler;
pub mod step;
pub mod streams;

pub use graph::{CaptureMode, CapturedStep, CudaGraph};
pub use memory::{
    cpu_avx512_kernels, cpu_kernels, cpu_name, cuda_memory, device_name, empty_cache,
    peak_rss_bytes, reset_peak, reset_peak_rss, CudaMemory,
};
pub use ops::{
    ema_, fused_sgd_, set_cudnn_benchmark, set_tf32, tf32_state, zero_grad_, FusedSgd, Lr,
    SgdConfig,
};
pub use step::FastStep;

/// The CUDA caching-allocator setting this tool uses unless the user sets one:
/// `expandable_segments:True`. Measured on an H200 (graph step, batch 128, 2026-11-27): peak
/// reserved memory 3448 -> 2956 MiB for SkeletonCLR and 10744 -> 8960 MiB for CrosSCLR-3 phase 2
/// (the side streams of [`streams`] keep separate block caches, which fragment without it), at the
/// same speed (17.31 / 17.24 ms, 46.96 / 46.75 ms).
pub const DEFAULT_CUDA_ALLOC_CONF: &str = "expandable_segments:True";

/// Sets `PYTORCH_CUDA_ALLOC_CONF` to [`DEFAULT_CUDA_ALLOC_CONF`] when neither it nor
/// `PYTORCH_ALLOC_CONF` is set. libtorch reads the variable when the CUDA allocator first starts,
/// so call this at the start of `main`, before any CUDA tensor exists and before other threads
/// start (it changes the process environment). Returns the setting now in force, if any.
pub fn default_cuda_alloc_conf() -> Option<String> {
    let cuda = std::env::var("PYTORCH_CUDA_ALLOC_CONF").ok();
    let generic = std::env::var("PYTORCH_ALLOC_CONF").ok();
    let (in_force, set) = alloc_conf_choice(cuda, generic);
    if set {
        std::env::set_var("PYTORCH_CUDA_ALLOC_CONF", DEFAULT_CUDA_ALLOC_CONF);
    }
    Some(in_force)
}

/// The allocator setting in force given the user's `PYTORCH_CUDA_ALLOC_CONF` and
/// `PYTORCH_ALLOC_CONF`, and whether [`DEFAULT_CUDA_ALLOC_CONF`] must be set (neither was).
fn alloc_conf_choice(cuda: Option<String>, generic: Option<String>) -> (String, bool) {
    match cuda.or(generic) {
        Some(user) => (user, false),
        None => (DEFAULT_CUDA_ALLOC_CONF.to_string(), true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_allocator_settings_win_over_the_default() {
        let s = |v: &str| Some(v.to_string());
        assert_eq!(
            alloc_conf_choice(None, None),
            (DEFAULT_CUDA_ALLOC_CONF.to_string(), true)
        );
        assert_eq!(
            alloc_conf_choice(s("max_split_size_mb:128"), None),
            ("max_split_size_mb:128".to_string(), false)
        );
        assert_eq!(
            alloc_conf_choice(None, s("expandable_segments:False")),
            ("expandable_segments:False".to_string(), false)
        );
        assert_eq!(
            alloc_conf_choice(s("a:1"), s("b:2")),
            ("a:1".to_string(), false)
        );
    }

    #[test]
    fn no_side_streams_on_the_cpu() {
        assert!(streams::SideStreams::new(tch::Device::Cpu, 6)
            .unwrap()
            .is_none());
    }
}

/// What the shim was built with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShimStatus {
    /// Built without the shim (`crossclr_no_shim`): every function here returns an error.
    Missing,
    /// Built without CUDA headers: foreach / fused updates work, graphs and CUDA statistics do not.
    CpuOnly,
    /// Fully built.
    Cuda,
}

/// Which shim this binary carries.
pub fn shim_status() -> ShimStatus {
    if !ffi::SHIM_BUILT {
        return ShimStatus::Missing;
    }
    #[cfg(not(crossclr_no_shim))]
    {
        // SAFETY: no arguments.
        if unsafe { ffi::crossclr_shim_has_cuda() } != 0 {
            return ShimStatus::Cuda;
        }
    }
    ShimStatus::CpuOnly
}
