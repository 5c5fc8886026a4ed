//! A caching allocator for libtorch's CPU tensors (csrc/cpu_cache.cpp, built with the shim).
//!
//! Why: libtorch allocates CPU tensors with `posix_memalign` and frees them at once. glibc maps
//! every block above its mmap threshold (32 MiB at most) afresh and unmaps it on free, so the large
//! activations of each training step are page-faulted in and zeroed by the kernel again on every
//! step. Measured on the 2-core dev VM (SkeletonCLR step, batch 128): about 1.3 million minor page
//! faults per step, roughly a fifth of the step's time. PyTorch on the CPU has the same cost.
//!
//! What: freed blocks of at least [`CpuCacheConfig::min_bytes`] are kept in size-keyed free lists
//! and reused (best fit within 1/8 of the request); new blocks are mapped 2 MiB-aligned with
//! `MADV_HUGEPAGE` (transparent huge pages, when the kernel allows them); once the cached bytes
//! would exceed [`CpuCacheConfig::max_cached_bytes`], blocks are returned to the system instead.
//! Smaller blocks stay with glibc, whose trim threshold is raised so its heap is kept too. The
//! process's resident memory therefore stays near its peak (like PyTorch's CUDA caching allocator).
//!
//! The binary installs it at start ([`install`]) as the command's kernel options say
//! (`crate::model::kernels::Kernels`): `kernels.cpu_cache=off` disables it, `kernels.cpu_cache_mb`
//! caps the cached bytes, `kernels.cpu_huge_pages=off` disables huge pages.
use crate::error::{Error, Result};

/// Settings of the caching CPU allocator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuCacheConfig {
    /// Requests below this size go to libtorch's default allocator.
    pub min_bytes: usize,
    /// Free bytes kept for reuse at most; beyond, freed blocks are unmapped.
    pub max_cached_bytes: usize,
    /// Map blocks 2 MiB-aligned with `MADV_HUGEPAGE`.
    pub huge_pages: bool,
}

impl Default for CpuCacheConfig {
    fn default() -> Self {
        CpuCacheConfig {
            min_bytes: 1 << 20,
            max_cached_bytes: default_cap(),
            huge_pages: true,
        }
    }
}

/// Half of the machine's memory (from /proc/meminfo, read once per process), or 8 GiB when it
/// cannot be read.
fn default_cap() -> usize {
    static CAP: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CAP.get_or_init(read_default_cap)
}

fn read_default_cap() -> usize {
    const FALLBACK: usize = 8 << 30;
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return FALLBACK;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<usize>()
                .ok()
        })
        .map(|kib| kib * 1024 / 2)
        .unwrap_or(FALLBACK)
}

/// Counters of the caching allocator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuCacheStats {
    /// Free bytes held for reuse.
    pub cached_bytes: i64,
    /// Bytes of live tensors served by the cache.
    pub in_use_bytes: i64,
    /// Requests served from the free lists.
    pub hits: i64,
    /// Requests that mapped new memory.
    pub misses: i64,
}

#[cfg(not(crossclr_no_shim))]
extern "C" {
    fn crossclr_cpu_cache_install(
        min_bytes: usize,
        max_cached_bytes: usize,
        huge_pages: std::ffi::c_int,
        err: *mut *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
    fn crossclr_cpu_cache_active() -> std::ffi::c_int;
    fn crossclr_cpu_cache_stats(
        cached: *mut i64,
        in_use: *mut i64,
        hits: *mut i64,
        misses: *mut i64,
    );
    fn crossclr_cpu_cache_release();
}

/// Installs the caching allocator as libtorch's CPU allocator. Only the first call in a process
/// takes effect. Tensors allocated before keep their own deleter.
pub fn install(cfg: CpuCacheConfig) -> Result<()> {
    #[cfg(not(crossclr_no_shim))]
    {
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: plain values in, an owned C string out on failure (freed below).
        let status = unsafe {
            crossclr_cpu_cache_install(
                cfg.min_bytes,
                cfg.max_cached_bytes,
                cfg.huge_pages as std::ffi::c_int,
                &mut err,
            )
        };
        if status == 0 {
            return Ok(());
        }
        let msg = crate::gpu::ffi::take_message(err, "unknown error");
        Err(Error::Other(format!(
            "installing the caching CPU allocator: {msg}"
        )))
    }
    #[cfg(crossclr_no_shim)]
    {
        let _ = cfg;
        Err(Error::Other(
            "the caching CPU allocator needs the C++ shim, which this build lacks".into(),
        ))
    }
}

/// True when the caching allocator is libtorch's current CPU allocator.
pub fn is_active() -> bool {
    #[cfg(not(crossclr_no_shim))]
    {
        // SAFETY: no arguments.
        unsafe { crossclr_cpu_cache_active() != 0 }
    }
    #[cfg(crossclr_no_shim)]
    {
        false
    }
}

/// The allocator's counters (all zero when it is not installed).
pub fn stats() -> CpuCacheStats {
    #[cfg_attr(crossclr_no_shim, allow(unused_mut))]
    let mut s = CpuCacheStats::default();
    #[cfg(not(crossclr_no_shim))]
    // SAFETY: four valid out-pointers.
    unsafe {
        crossclr_cpu_cache_stats(
            &mut s.cached_bytes,
            &mut s.in_use_bytes,
            &mut s.hits,
            &mut s.misses,
        );
    }
    s
}

/// Returns every cached free block to the system (e.g. between pre-training and evaluation).
pub fn release() {
    #[cfg(not(crossclr_no_shim))]
    // SAFETY: no arguments.
    unsafe {
        crossclr_cpu_cache_release()
    };
}
