//! Collectives for data-parallel training on libtorch's own c10d (csrc/dist.cpp): a Gloo process
//! group (CPU tensors, and CUDA tensors through host staging), rendezvous over a FileStore or
//! torchrun's TCPStore, and the operations a data-parallel step needs: broadcast (parameters,
//! buffers and queues from rank 0 at start), all-reduce (gradients, averaged and coalesced into
//! one buffer) and all-gather (every rank's keys before the enqueue).
//!
//! The process group is built only when the Gloo headers were found at build time (Debian's
//! `libgloo-dev`, installed by scripts/setup.sh; the torch wheel ships the Gloo library inside
//! libtorch_cpu but not its headers). Without them every call returns an error that says so.
//!
//! `crossclr pretrain` uses it when started with torchrun's variables (docs/distributed.md;
//! `crossclr launch` starts such ranks locally): `ssl::Pretrainer::join_group` for the step,
//! `data::loader::Shard` for the batches, [`ProcessGroup::sync_batch_norm`] for `sync_bn: true`.
//! A failed collective names the ranks whose heartbeat stopped (dead, killed or stopped). Not
//! The eager fast step joins the same collectives (`gpu::FastStep::join_group`). Not built yet:
//! NCCL, collectives in the CUDA-graph step.
use crate::error::{Error, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tch::Tensor;

/// Where the ranks meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// A file every rank can open (one machine, or a shared file system); no port to pick.
    File(PathBuf),
    /// torchrun's TCPStore at `host:port`. `host_here`: this process hosts the store (rank 0
    /// when no torchrun agent hosts it).
    Tcp {
        host: String,
        port: u16,
        host_here: bool,
    },
}

/// One rank's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    pub rank: usize,
    pub world_size: usize,
    pub store: Store,
}

impl Rendezvous {
    /// The rendezvous torchrun (or Slurm with the same variables) describes: `RANK`,
    /// `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`; with `TORCHELASTIC_USE_AGENT_STORE=True` the
    /// agent hosts the TCPStore and every rank connects as a client, else rank 0 hosts it.
    /// `None` when `WORLD_SIZE` is unset (a single-process run). `var` reads one variable (the
    /// process environment in the CLI, a map in tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(world) = var("WORLD_SIZE") else {
            return Ok(None);
        };
        let number = |name: &str, text: &str| -> Result<usize> {
            text.trim().parse().map_err(|_| {
                Error::config(format!(
                    "environment variable {name}={text:?} is not a whole number"
                ))
            })
        };
        let world_size = number("WORLD_SIZE", &world)?;
        let rank_text =
            var("RANK").ok_or_else(|| Error::config("WORLD_SIZE is set but RANK is not"))?;
        let rank = number("RANK", &rank_text)?;
        if world_size == 0 || rank >= world_size {
            return Err(Error::config(format!(
                "RANK {rank} is not in a world of WORLD_SIZE {world_size}"
            )));
        }
        let host = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port_text = var("MASTER_PORT")
            .ok_or_else(|| Error::config("WORLD_SIZE is set but MASTER_PORT is not"))?;
        let port = number("MASTER_PORT", &port_text)?;
        let port = u16::try_from(port)
            .map_err(|_| Error::config(format!("MASTER_PORT {port} is not a port number")))?;
        let agent = var("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        Ok(Some(Rendezvous {
            rank,
            world_size,
            store: Store::Tcp {
                host,
                port,
                host_here: rank == 0 && !agent,
            },
        }))
    }
}

#[cfg(crossclr_dist)]
extern "C" {
    fn crossclr_dist_has_nccl() -> std::ffi::c_int;
    /// Gloo when `cuda_index` < 0, else NCCL on that CUDA device.
    #[allow(clippy::too_many_arguments)]
    fn crossclr_dist_new(
        file: *const std::ffi::c_char,
        host: *const std::ffi::c_char,
        port: std::ffi::c_int,
        host_store: std::ffi::c_int,
        rank: std::ffi::c_int,
        world: std::ffi::c_int,
        cuda_index: std::ffi::c_int,
        timeout_ms: i64,
        out: *mut *mut std::ffi::c_void,
        err: *mut *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
    fn crossclr_dist_free(pg: *mut std::ffi::c_void);
    fn crossclr_dist_broadcast(
        pg: *mut std::ffi::c_void,
        t: *mut std::ffi::c_void,
        root: std::ffi::c_int,
        err: *mut *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
    fn crossclr_dist_all_reduce_sum(
        pg: *mut std::ffi::c_void,
        t: *mut std::ffi::c_void,
        err: *mut *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
    fn crossclr_dist_all_gather(
        pg: *mut std::ffi::c_void,
        out: *mut std::ffi::c_void,
        input: *mut std::ffi::c_void,
        err: *mut *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
    fn crossclr_dist_barrier(
        pg: *mut std::ffi::c_void,
        err: *mut *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
    fn crossclr_dist_buckets_new(
        pg: *mut std::ffi::c_void,
        params: *mut *mut std::ffi::c_void,
        n: i64,
        cap_bytes: i64,
        out: *mut *mut std::ffi::c_void,
        err: *mut *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
    fn crossclr_dist_buckets_count(b: *mut std::ffi::c_void) -> i64;
    fn crossclr_dist_buckets_arm(
        b: *mut std::ffi::c_void,
        err: *mut *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
    fn crossclr_dist_buckets_finish(
        b: *mut std::ffi::c_void,
        err: *mut *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
    fn crossclr_dist_buckets_free(b: *mut std::ffi::c_void);
    fn crossclr_dist_sync_bn(
        pg: *mut std::ffi::c_void,
        x: *mut std::ffi::c_void,
        w: *mut std::ffi::c_void,
        b: *mut std::ffi::c_void,
        running_mean: *mut std::ffi::c_void,
        running_var: *mut std::ffi::c_void,
        momentum: f64,
        eps: f64,
        out: *mut *mut std::ffi::c_void,
        err: *mut *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
}

/// Whether this build has the c10d Gloo process group.
pub fn available() -> bool {
    cfg!(crossclr_dist)
}

/// Whether this build also has c10d's NCCL process group (CUDA tensors; build.rs compiles it
/// when the CUDA runtime, CCCL and NCCL headers of the wheel are found).
pub fn nccl_available() -> bool {
    #[cfg(crossclr_dist)]
    {
        // SAFETY: a constant query without arguments.
        unsafe { crossclr_dist_has_nccl() != 0 }
    }
    #[cfg(not(crossclr_dist))]
    false
}

/// Which c10d process group carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Gloo: CPU tensors, and CUDA tensors through host staging.
    Gloo,
    /// NCCL on CUDA device `cuda_index` (one GPU per rank; host tensors are staged through it).
    Nccl { cuda_index: usize },
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Gloo => "Gloo",
            Backend::Nccl { .. } => "NCCL",
        }
    }
}

/// A c10d Gloo process group; dropped, it leaves the group. Every rank beats a heartbeat into
/// the rendezvous store (once a second, from a thread of the C++ side): a collective that fails
/// (a peer closed its connection, or the timeout passed) names the ranks whose heartbeat stopped.
pub struct ProcessGroup {
    #[cfg_attr(not(crossclr_dist), allow(dead_code))]
    raw: *mut std::ffi::c_void,
    rank: usize,
    world_size: usize,
    backend: Backend,
}

// SAFETY: a c10d process group may be used from any thread: its collectives enqueue work on the
// group's own worker threads under its internal locks (PyTorch calls them from many threads).
unsafe impl Send for ProcessGroup {}
// SAFETY: as above; the Rust side holds no state of its own besides the immutable rank and size.
unsafe impl Sync for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ProcessGroup({}, rank {} of {})",
            self.backend.name(),
            self.rank,
            self.world_size
        )
    }
}

#[cfg(not(crossclr_dist))]
fn unavailable<T>(what: &str) -> Result<T> {
    Err(Error::Other(format!(
        "{what}: this build has no data parallelism (the Gloo headers were not found at build \
         time: apt-get install libgloo-dev, or set GLOO_INCLUDE, and rebuild)"
    )))
}

impl ProcessGroup {
    /// Joins the Gloo process group of `rendezvous` (blocks until every rank has joined, or
    /// `timeout`). Collectives that wait longer than `timeout` fail with an error naming the
    /// operation: a dead or hung rank ends the job instead of hanging it.
    pub fn gloo(rendezvous: &Rendezvous, timeout: Duration) -> Result<Self> {
        Self::join(rendezvous, timeout, Backend::Gloo)
    }

    /// Joins the process group of `rendezvous` on `backend` (see [`ProcessGroup::gloo`]). NCCL
    /// makes `cuda_index` the current CUDA device; its collectives take CUDA tensors, host
    /// tensors are staged through that device.
    pub fn join(rendezvous: &Rendezvous, timeout: Duration, backend: Backend) -> Result<Self> {
        let what = format!("joining the {} process group", backend.name());
        #[cfg(crossclr_dist)]
        {
            use std::ffi::CString;
            let cstr = |s: &str, what: &str| {
                CString::new(s).map_err(|_| Error::config(format!("{what} {s:?} contains a NUL")))
            };
            let (file, host, port, host_here) = match &rendezvous.store {
                Store::File(p) => (
                    Some(cstr(&p.display().to_string(), "store file")?),
                    None,
                    0,
                    false,
                ),
                Store::Tcp {
                    host,
                    port,
                    host_here,
                } => (None, Some(cstr(host, "MASTER_ADDR")?), *port, *host_here),
            };
            let file = file.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
            let host = host.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
            let (port, host_here) = (
                std::ffi::c_int::from(port),
                std::ffi::c_int::from(host_here),
            );
            let (rank, world) = (
                rendezvous.rank as std::ffi::c_int,
                rendezvous.world_size as std::ffi::c_int,
            );
            let mut raw = std::ptr::null_mut();
            let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
            let cuda_index = match backend {
                Backend::Gloo => -1,
                Backend::Nccl { cuda_index } => cuda_index as std::ffi::c_int,
            };
            // SAFETY: the C strings live across the call; `raw` is a valid out-pointer.
            crate::gpu::ffi::call(&what, |err| unsafe {
                crossclr_dist_new(
                    file, host, port, host_here, rank, world, cuda_index, timeout_ms, &mut raw, err,
                )
            })
            .map_err(|e| {
                Error::Other(format!(
                    "rank {} of {}: {e}",
                    rendezvous.rank, rendezvous.world_size
                ))
            })?;
            Ok(ProcessGroup {
                raw,
                rank: rendezvous.rank,
                world_size: rendezvous.world_size,
                backend,
            })
        }
        #[cfg(not(crossclr_dist))]
        {
            let _ = (rendezvous, timeout);
            unavailable(&what)
        }
    }

    /// The backend carrying the collectives.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The device NCCL needs host tensors staged through (`None` for Gloo).
    #[cfg(crossclr_dist)]
    fn staging(&self, t: &Tensor) -> Option<tch::Device> {
        match self.backend {
            Backend::Nccl { cuda_index } => {
                let dev = tch::Device::Cuda(cuda_index);
                (t.device() != dev).then_some(dev)
            }
            Backend::Gloo => None,
        }
    }

    /// Runs the in-place collective `op` on `t`; with NCCL and `t` off its device, on a copy
    /// there, then copied back into `t`.
    #[cfg(crossclr_dist)]
    fn in_place(&self, t: &Tensor, op: impl FnOnce(&Tensor) -> Result<()>) -> Result<()> {
        match self.staging(t) {
            None => op(t),
            Some(dev) => {
                let staged = t.detach().to_device(dev).contiguous();
                op(&staged)?;
                tch::no_grad(|| t.shallow_clone().copy_(&staged));
                Ok(())
            }
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Runs one collective, naming it and this rank in the error.
    #[cfg(crossclr_dist)]
    fn collective(
        &self,
        what: &str,
        f: impl FnOnce(*mut *mut std::ffi::c_char) -> std::ffi::c_int,
    ) -> Result<()> {
        crate::gpu::ffi::call(what, f)
            .map_err(|e| Error::Other(format!("rank {} of {}: {e}", self.rank, self.world_size)))
    }

    /// Overwrites `t` on every rank with rank `root`'s values (`t` contiguous).
    pub fn broadcast_(&self, t: &Tensor, root: usize) -> Result<()> {
        #[cfg(crossclr_dist)]
        {
            self.in_place(t, |t| {
                // SAFETY: a live tch tensor borrowed for the call; the C side checks it.
                self.collective("broadcast", |err| unsafe {
                    crossclr_dist_broadcast(self.raw, t.as_ptr() as *mut _, root as i32, err)
                })
            })
        }
        #[cfg(not(crossclr_dist))]
        {
            let _ = (t, root);
            unavailable("broadcast")
        }
    }

    /// Sums `t` over the ranks, in place (`t` contiguous).
    pub fn all_reduce_sum_(&self, t: &Tensor) -> Result<()> {
        #[cfg(crossclr_dist)]
        {
            self.in_place(t, |t| {
                // SAFETY: as in `broadcast_`.
                self.collective("all_reduce", |err| unsafe {
                    crossclr_dist_all_reduce_sum(self.raw, t.as_ptr() as *mut _, err)
                })
            })
        }
        #[cfg(not(crossclr_dist))]
        {
            let _ = t;
            unavailable("all_reduce")
        }
    }

    /// Every rank's `t` `(N, ...)` stacked in rank order: `(world · N, ...)`.
    pub fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.contiguous();
        let mut shape = t.size();
        if shape.is_empty() {
            return Err(Error::Other(
                "all_gather: a scalar has no rows to gather".into(),
            ));
        }
        shape[0] *= self.world_size as i64;
        #[cfg(crossclr_dist)]
        {
            let home = t.device();
            let (t, device) = match self.staging(&t) {
                Some(dev) => (t.to_device(dev), dev),
                None => (t, home),
            };
            let out = Tensor::empty(shape.as_slice(), (t.kind(), device));
            // SAFETY: two live tch tensors borrowed for the call.
            self.collective("all_gather", |err| unsafe {
                crossclr_dist_all_gather(
                    self.raw,
                    out.as_ptr() as *mut _,
                    t.as_ptr() as *mut _,
                    err,
                )
            })?;
            Ok(out.to_device(home))
        }
        #[cfg(not(crossclr_dist))]
        {
            let _ = shape;
            unavailable("all_gather")
        }
    }

    /// Waits for every rank.
    pub fn barrier(&self) -> Result<()> {
        #[cfg(crossclr_dist)]
        {
            // SAFETY: plain call on the live group.
            self.collective("barrier", |err| unsafe {
                crossclr_dist_barrier(self.raw, err)
            })
        }
        #[cfg(not(crossclr_dist))]
        unavailable("barrier")
    }

    /// Training-mode SyncBatchNorm over channel dim 1 of `x` `(N, C, ...)` (any floating dtype,
    /// CPU or CUDA; `weight`, `bias`, `running_mean`, `running_var` `(C,)`), as
    /// `torch.nn.SyncBatchNorm`: normalises with the mean and biased variance of every rank's `x`
    /// together (the global batch), moves the running statistics (momentum `momentum`) towards
    /// the global mean and the unbiased global variance, and differentiates as the batch norm of
    /// the global batch: backward all-reduces `sum(dy)` and `sum(dy · (x - mean))` and returns
    /// the global input gradient; the weight and bias gradients are this rank's own terms (the
    /// caller averages parameter gradients over the ranks, as DDP does). Every rank must call it
    /// in the same order with the same `C`; the batch may differ in size between ranks.
    /// `num_batches_tracked` is the caller's.
    #[allow(clippy::too_many_arguments)]
    pub fn sync_batch_norm(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
        momentum: f64,
        eps: f64,
    ) -> Result<Tensor> {
        #[cfg(crossclr_dist)]
        {
            let mut out: *mut std::ffi::c_void = std::ptr::null_mut();
            // SAFETY: live tch tensors borrowed for the call; `out` receives a fresh
            // `at::Tensor*` that we own.
            self.collective("sync batch norm", |err| unsafe {
                crossclr_dist_sync_bn(
                    self.raw,
                    x.as_ptr() as *mut _,
                    weight.as_ptr() as *mut _,
                    bias.as_ptr() as *mut _,
                    running_mean.as_ptr() as *mut _,
                    running_var.as_ptr() as *mut _,
                    momentum,
                    eps,
                    &mut out,
                    err,
                )
            })?;
            if out.is_null() {
                return Err(Error::Other("sync batch norm: no output tensor".into()));
            }
            // SAFETY: `out` is a fresh `at::Tensor*` owned by us; tch's drop deletes it.
            Ok(unsafe { Tensor::from_ptr(out as *mut _) })
        }
        #[cfg(not(crossclr_dist))]
        {
            let _ = (x, weight, bias, running_mean, running_var, momentum, eps);
            unavailable("sync batch norm")
        }
    }

    /// Averages `tensors` (e.g. every parameter's gradient) over the ranks, coalesced: one
    /// flat buffer per dtype and device, one all-reduce, then each tensor gets its slice back.
    pub fn all_reduce_mean_(&self, tensors: &[Tensor]) -> Result<()> {
        if tensors.is_empty() {
            return Ok(());
        }
        let flat = Tensor::cat(
            &tensors
                .iter()
                .map(|t| t.detach().reshape([-1]))
                .collect::<Vec<_>>(),
            0,
        );
        self.all_reduce_sum_(&flat)?;
        let flat = flat / self.world_size as f64;
        let mut offset = 0i64;
        tch::no_grad(|| {
            for t in tensors {
                let n = t.numel() as i64;
                let mut dst = t.shallow_clone();
                dst.copy_(&flat.narrow(0, offset, n).view(t.size().as_slice()));
                offset += n;
            }
        });
        Ok(())
    }

    /// Makes every variable of `vs` (parameters and buffers: batch-norm statistics, queues)
    /// equal to rank 0's, in name order.
    pub fn broadcast_vars(&self, vs: &tch::nn::VarStore) -> Result<()> {
        let vars = vs.variables();
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        for name in names {
            let t = &vars[name];
            let buf = t.detach().contiguous();
            self.broadcast_(&buf, 0)
                .map_err(|e| Error::Other(format!("variable {name}: {e}")))?;
            if buf.data_ptr() != t.data_ptr() {
                tch::no_grad(|| t.shallow_clone().copy_(&buf));
            }
        }
        Ok(())
    }
}

/// Gradient averaging overlapped with backward (DDP's bucketing, on this group's c10d backend):
/// the parameters are packed into buckets of about `bucket_cap_mb` in reverse order, and a hook
/// on every parameter copies its gradient into its bucket as soon as autograd produces it; a
/// complete bucket starts its all-reduce while backward goes on (buckets start in bucket order,
/// the same on every rank). Use: [`GradBuckets::arm`] before `backward`, [`GradBuckets::finish`]
/// after it (waits, averages, writes every `.grad`; a parameter that got no gradient in this pass
/// keeps none). The result equals [`ProcessGroup::all_reduce_mean_`] of the same gradients.
pub struct GradBuckets {
    #[cfg_attr(not(crossclr_dist), allow(dead_code))]
    raw: *mut std::ffi::c_void,
    group: Arc<ProcessGroup>,
    buckets: usize,
}

// SAFETY: the C++ side guards its state with a mutex; the hooks run on autograd's threads.
unsafe impl Send for GradBuckets {}

impl GradBuckets {
    /// Buckets over `params` (leaves that require grad, in optimiser order) of about
    /// `cap_bytes` each. `None` when the group would have to stage the parameters through another
    /// device (NCCL with parameters off its GPU): those keep the coalesced all-reduce.
    pub fn new(
        group: &Arc<ProcessGroup>,
        params: &[Tensor],
        cap_bytes: usize,
    ) -> Result<Option<GradBuckets>> {
        #[cfg(crossclr_dist)]
        {
            if params.iter().any(|p| group.staging(p).is_some()) {
                return Ok(None);
            }
            let mut ptrs: Vec<*mut std::ffi::c_void> =
                params.iter().map(|p| p.as_ptr() as *mut _).collect();
            let mut raw = std::ptr::null_mut();
            // SAFETY: live tch tensors borrowed for the call (the C side keeps its own
            // references); `raw` receives a new bucketer owned by the returned value.
            group.collective("gradient buckets", |err| unsafe {
                crossclr_dist_buckets_new(
                    group.raw,
                    ptrs.as_mut_ptr(),
                    ptrs.len() as i64,
                    cap_bytes.max(1) as i64,
                    &mut raw,
                    err,
                )
            })?;
            // SAFETY: `raw` is the live bucketer just made.
            let buckets = unsafe { crossclr_dist_buckets_count(raw) } as usize;
            Ok(Some(GradBuckets {
                raw,
                group: Arc::clone(group),
                buckets,
            }))
        }
        #[cfg(not(crossclr_dist))]
        {
            let _ = (group, params, cap_bytes);
            unavailable("gradient buckets")
        }
    }

    /// How many buckets (all-reduces per step).
    pub fn len(&self) -> usize {
        self.buckets
    }

    pub fn is_empty(&self) -> bool {
        self.buckets == 0
    }

    /// Arms the hooks for the next backward.
    pub fn arm(&self) -> Result<()> {
        #[cfg(crossclr_dist)]
        {
            // SAFETY: `raw` is live for `self`'s lifetime.
            self.group.collective("gradient buckets", |err| unsafe {
                crossclr_dist_buckets_arm(self.raw, err)
            })
        }
        #[cfg(not(crossclr_dist))]
        unavailable("gradient buckets")
    }

    /// After backward: waits for every bucket's all-reduce and writes the averaged gradients.
    pub fn finish(&self) -> Result<()> {
        #[cfg(crossclr_dist)]
        {
            // SAFETY: as in `arm`.
            self.group.collective("gradient all-reduce", |err| unsafe {
                crossclr_dist_buckets_finish(self.raw, err)
            })
        }
        #[cfg(not(crossclr_dist))]
        unavailable("gradient buckets")
    }
}

impl Drop for GradBuckets {
    fn drop(&mut self) {
        #[cfg(crossclr_dist)]
        // SAFETY: `raw` came from crossclr_dist_buckets_new and is freed once (hooks removed).
        unsafe {
            crossclr_dist_buckets_free(self.raw)
        };
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        #[cfg(crossclr_dist)]
        // SAFETY: `raw` came from crossclr_dist_new and is freed once.
        unsafe {
            crossclr_dist_free(self.raw)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn torchrun_variables_give_the_rendezvous() {
        assert_eq!(Rendezvous::from_vars(vars(&[])).unwrap(), None);
        let r = Rendezvous::from_vars(vars(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            r.store,
            Store::Tcp {
                host: "10.0.0.1".into(),
                port: 29500,
                host_here: true
            }
        );
        // torchrun's agent hosts the store: rank 0 connects as a client.
        let r = Rendezvous::from_vars(vars(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ]))
        .unwrap()
        .unwrap();
        assert!(matches!(
            r.store,
            Store::Tcp {
                host_here: false,
                ..
            }
        ));
        for bad in [
            vec![("WORLD_SIZE", "2")],
            vec![("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")],
            vec![("WORLD_SIZE", "x"), ("RANK", "0"), ("MASTER_PORT", "1")],
            vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "70000")],
        ] {
            let e = Rendezvous::from_vars(vars(&bad)).unwrap_err().to_string();
            assert!(
                e.contains("RANK") || e.contains("WORLD_SIZE") || e.contains("MASTER_PORT"),
                "{e}"
            );
        }
    }
}
