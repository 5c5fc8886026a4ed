//! `--device cpu|cuda|cuda:N` parsing and checks.
use crate::error::{Error, Result};
use tch::Device;

/// Parses a device string; asking for CUDA where there is none is an error, not a panic.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let index = if s == "cuda" || s == "gpu" {
        0
    } else if let Some(i) = s.strip_prefix("cuda:") {
        i.parse::<usize>()
            .map_err(|_| Error::config(format!("device '{s}': expected cuda:<index>")))?
    } else {
        return Err(Error::config(format!(
            "unknown device '{s}' (use cpu, cuda or cuda:N)"
        )));
    };
    if !tch::Cuda::is_available() {
        return Err(Error::config(format!(
            "device '{s}' requested but CUDA is not available on this machine (libtorch sees no GPU)"
        )));
    }
    let count = tch::Cuda::device_count() as usize;
    if index >= count {
        return Err(Error::config(format!(
            "device '{s}': only {count} CUDA device(s) present"
        )));
    }
    Ok(Device::Cuda(index))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert!(parse_device("tpu").is_err());
        if !tch::Cuda::is_available() {
            let e = parse_device("cuda").unwrap_err().to_string();
            assert!(e.contains("not available"), "{e}");
        }
    }
}
