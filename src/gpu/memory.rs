//! Device names and peak-memory statistics (CUDA caching allocator, or the process's peak RSS).
use super::ffi;
use crate::error::{Error, Result};
use tch::Device;

/// Caching-allocator statistics of one CUDA device, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaMemory {
    /// Peak bytes held by tensors since the last [`reset_peak`] (`torch.cuda.max_memory_allocated`).
    pub peak_allocated: i64,
    /// Bytes held by tensors now (`torch.cuda.memory_allocated`).
    pub current_allocated: i64,
    /// Peak bytes reserved from the driver (`torch.cuda.max_memory_reserved`).
    pub peak_reserved: i64,
}

fn cuda_index(device: Device) -> Result<i32> {
    match device {
        Device::Cuda(i) => Ok(i as i32),
        other => Err(Error::config(format!("{other:?} is not a CUDA device"))),
    }
}

/// Statistics of the CUDA caching allocator for `device`.
pub fn cuda_memory(device: Device) -> Result<CudaMemory> {
    let index = cuda_index(device)?;
    #[cfg(not(crossclr_no_shim))]
    {
        let mut m = CudaMemory::default();
        // SAFETY: the out-pointers are valid for the call.
        ffi::call("cuda_memory", |err| unsafe {
            ffi::crossclr_cuda_memory_stats(
                index,
                &mut m.peak_allocated,
                &mut m.current_allocated,
                &mut m.peak_reserved,
                err,
            )
        })?;
        Ok(m)
    }
    #[cfg(crossclr_no_shim)]
    {
        let _ = index;
        Err(ffi::no_shim("cuda_memory"))
    }
}

/// Resets the peak statistics of `device` (`torch.cuda.reset_peak_memory_stats`).
pub fn reset_peak(device: Device) -> Result<()> {
    let index = cuda_index(device)?;
    #[cfg(not(crossclr_no_shim))]
    {
        // SAFETY: no pointers.
        ffi::call("reset_peak", |err| unsafe {
            ffi::crossclr_cuda_reset_peak(index, err)
        })
    }
    #[cfg(crossclr_no_shim)]
    {
        let _ = index;
        Err(ffi::no_shim("reset_peak"))
    }
}

/// Returns the CUDA caching allocator's unused cached blocks to the driver
/// (`torch.cuda.empty_cache()`). Used after a CUDA-graph capture: the warm-up steps leave a full
/// step's worth of activations cached in the regular pool, which the graph (with its own private
/// pool) never uses again.
pub fn empty_cache() -> Result<()> {
    #[cfg(not(crossclr_no_shim))]
    {
        // SAFETY: no pointers.
        ffi::call("empty_cache", |err| unsafe {
            ffi::crossclr_cuda_empty_cache(err)
        })
    }
    #[cfg(crossclr_no_shim)]
    {
        Err(ffi::no_shim("empty_cache"))
    }
}

/// The device's name: the CUDA device name (e.g. "NVIDIA H100 80GB HBM3"), or `"cpu: <model>"`
/// from /proc/cpuinfo.
pub fn device_name(device: Device) -> Result<String> {
    match device {
        Device::Cuda(i) => cuda_name(i as i32),
        _ => Ok(cpu_name()),
    }
}

fn cuda_name(index: i32) -> Result<String> {
    #[cfg(not(crossclr_no_shim))]
    {
        // Room for cudaDeviceProp::name (256 bytes).
        let mut buf = vec![0u8; 257];
        // SAFETY: buf is valid for buf.len() bytes; the shim NUL-terminates.
        ffi::call("device_name", |err| unsafe {
            ffi::crossclr_cuda_device_name(index, buf.as_mut_ptr().cast(), buf.len(), err)
        })?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }
    #[cfg(crossclr_no_shim)]
    {
        let _ = index;
        Err(ffi::no_shim("device_name"))
    }
}

#[cfg(not(crossclr_no_shim))]
extern "C" {
    fn crossclr_fused_bn_uses_avx512() -> std::ffi::c_int;
}

/// Whether our fused CPU kernels (csrc/fused_bn.cpp) run their AVX-512 paths here: the CPU has
/// AVX-512F (and FMA) and `ATEN_CPU_CAPABILITY` does not cap it. Their portable paths lose to
/// the tch ops (measured in docs/cpu.md), so `kernels.fused_bn` / `fused_tail: auto` follow this.
pub fn cpu_avx512_kernels() -> bool {
    #[cfg(not(crossclr_no_shim))]
    {
        // SAFETY: a query without arguments (reads a cached CPU-feature flag).
        unsafe { crossclr_fused_bn_uses_avx512() != 0 }
    }
    #[cfg(crossclr_no_shim)]
    false
}

/// Which CPU kernels this process runs: `"AVX-512"` when our fused CPU kernels
/// (csrc/fused_bn.cpp) use their AVX-512 paths, else `"portable"`; with `ATEN_CPU_CAPABILITY`
/// set (libtorch's switch, which also caps ours: `avx2` or `default` make an AVX-512 machine
/// run the paths of one without it), its value is appended.
pub fn cpu_kernels() -> String {
    let ours = if cfg!(crossclr_no_shim) {
        "no shim"
    } else if cpu_avx512_kernels() {
        "AVX-512"
    } else {
        "portable"
    };
    match std::env::var("ATEN_CPU_CAPABILITY") {
        Ok(cap) if !cap.is_empty() => format!("{ours} kernels, ATEN_CPU_CAPABILITY={cap}"),
        _ => format!("{ours} kernels"),
    }
}

/// `"cpu: <model name> (<n> threads, <kernels>)"` from /proc/cpuinfo (see [`cpu_kernels`]), or
/// `"cpu (<kernels>)"`.
pub fn cpu_name() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    });
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let kernels = cpu_kernels();
    match model {
        Some(m) => format!("cpu: {m} ({threads} threads, {kernels})"),
        None => format!("cpu ({kernels})"),
    }
}

/// Peak resident set size of this process in bytes (`VmHWM` of /proc/self/status), if readable.
pub fn peak_rss_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resets the kernel's peak-RSS counter (`VmHWM`) by writing "5" to /proc/self/clear_refs
/// (Linux >= 4.0); returns false where that is not allowed.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
