//! Official PyTorch .pt state-dict import and safetensors checkpoints.
//!
//! [`read_state_dict`] reads, by content (not by extension):
//! - a `torch.save` zip archive (PyTorch >= 1.6): `<name>/data.pkl` is a pickle whose tensors
//!   point (persistent ids) at raw little-endian storages `<name>/data/<key>`; it is decoded by the
//!   small pickle machine in [`pickle`], without Python;
//! - a safetensors file.
//!
//! (libtorch's own loaders do not read these files: `Tensor::loadz_multi` fails with "Expected
//! GenericDict but got None" and `Tensor::load_multi` looks for TorchScript's `constants.pkl`.)
//!
//! [`load_into`] copies named tensors into a [`VarStore`], optionally stripping a prefix such as
//! `encoder_q.` (and `module.` from DataParallel checkpoints), and reports loaded, missing and
//! unexpected names; shape mismatches are errors naming both shapes.
use crate::error::{Error, Result};
use pickle::{TensorRef, Value};
use std::io::Read;
use std::path::Path;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

pub mod encoder;
pub mod pickle;
pub mod prefix;

pub use encoder::{EmbedLayer, LoadedEncoder};

/// What [`load_into`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Number of variables set.
    pub loaded: usize,
    /// Variables of the store that the weights did not set.
    pub missing: Vec<String>,
    /// Weights (after prefix stripping) with no variable of that name.
    pub unexpected: Vec<String>,
    /// Weights left alone: outside `strip_prefix` or under one of `skip_prefixes`.
    pub ignored: usize,
}

impl LoadReport {
    /// An error listing missing and unexpected names, if any.
    pub fn check_strict(&self, source: &str) -> Result<()> {
        if self.missing.is_empty() && self.unexpected.is_empty() {
            return Ok(());
        }
        Err(Error::Other(format!(
            "{source}: weights do not match the model: missing [{}], unexpected [{}]",
            self.missing.join(", "),
            self.unexpected.join(", ")
        )))
    }
}

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

/// Reads all tensors of `path` (a `torch.save` zip or a safetensors file), in file order.
/// Tensors come back contiguous on the CPU, in their stored dtype.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut head = [0u8; 9];
    let n = {
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        f.read(&mut head).map_err(|e| Error::io(path, e))?
    };
    if n >= 4 && &head[..4] == ZIP_MAGIC {
        read_torch_zip(path)
    } else if n == 9 && head[8] == b'{' {
        Tensor::read_safetensors(path).map_err(|e| Error::input(path, "safetensors", e.to_string()))
    } else if n >= 2 && head[0] == 0x80 {
        Err(Error::input(
            path,
            "header",
            "legacy (pre-1.6, non-zip) torch.save format is not supported; re-save it with a recent \
             PyTorch (torch.save(torch.load(f), f2)) or convert it to safetensors",
        ))
    } else {
        Err(Error::input(
            path,
            "header",
            "neither a torch.save zip archive nor a safetensors file",
        ))
    }
}

/// Element type of a `torch.<T>Storage`.
fn storage_kind(type_name: &str) -> Option<Kind> {
    Some(match type_name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

fn read_torch_zip(path: &Path) -> Result<Vec<(String, Tensor)>> {
    crate::data::limits::check_zip_tail(path)?;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let archive_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| Error::input(path, "zip", e.to_string()))?;
    let pkl_name = zip
        .file_names()
        .find(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .map(str::to_string)
        .ok_or_else(|| Error::input(path, "zip", "no data.pkl entry: not a torch.save archive"))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let read_entry = |zip: &mut zip::ZipArchive<std::fs::File>, name: &str| -> Result<Vec<u8>> {
        let mut e = zip
            .by_name(name)
            .map_err(|e| Error::input(path, name, e.to_string()))?;
        // The member's declared size is only a hint, capped by the archive's length: a header
        // claiming gigabytes must not size an allocation (found by tests/fuzz_readers.rs).
        let mut buf = Vec::with_capacity(e.size().min(archive_len) as usize);
        e.read_to_end(&mut buf)
            .map_err(|e| Error::input(path, name, e.to_string()))?;
        Ok(buf)
    };
    if let Ok(order) = read_entry(&mut zip, &format!("{prefix}byteorder")) {
        if order.trim_ascii() != b"little" {
            return Err(Error::input(
                path,
                "byteorder",
                format!(
                    "storages are {}; only little-endian is supported",
                    String::from_utf8_lossy(&order)
                ),
            ));
        }
    }
    let pkl = read_entry(&mut zip, &pkl_name)?;
    let value = pickle::unpickle(&pkl)
        .map_err(|e| Error::input(path, format!("{pkl_name} byte {}", e.offset), e.what))?;
    let entries = tensor_entries(&value).ok_or_else(|| {
        Error::input(
            path,
            &pkl_name,
            "no dict of tensors (state dict) found in the pickle",
        )
    })?;
    let mut out = Vec::with_capacity(entries.len());
    for (name, tref) in entries {
        let storage_name = format!("{prefix}data/{}", tref.storage.key);
        let bytes = read_entry(&mut zip, &storage_name)?;
        let t = build_tensor(&bytes, tref)
            .map_err(|what| Error::input(path, format!("key '{name}'"), what))?;
        out.push((name.clone(), t));
    }
    Ok(out)
}

/// The `(name, tensor)` entries of a state dict: the top-level dict, or the first nested dict of
/// tensors under `state_dict` / `model` / `model_state_dict` / `net`.
fn tensor_entries(v: &Value) -> Option<Vec<(&String, &TensorRef)>> {
    let Value::Dict(items) = v else { return None };
    let tensors: Vec<(&String, &TensorRef)> = items
        .iter()
        .filter_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Tensor(t)) => Some((k, t)),
            _ => None,
        })
        .collect();
    if !tensors.is_empty() {
        return Some(tensors);
    }
    for key in ["state_dict", "model", "model_state_dict", "net"] {
        for (k, v) in items {
            if matches!(k, Value::Str(s) if s == key) {
                if let Some(t) = tensor_entries(v) {
                    return Some(t);
                }
            }
        }
    }
    None
}

/// Materialises one tensor from its raw storage bytes, honouring offset and strides.
fn build_tensor(bytes: &[u8], t: &TensorRef) -> std::result::Result<Tensor, String> {
    let kind = storage_kind(&t.storage.type_name)
        .ok_or_else(|| format!("unsupported storage type torch.{}", t.storage.type_name))?;
    let elt = kind.elt_size_in_bytes();
    let numel = bytes.len() / elt;
    if !bytes.len().is_multiple_of(elt) || (numel as i64) < t.storage.numel {
        return Err(format!(
            "storage '{}' has {} bytes, expected {} elements of {elt} bytes",
            t.storage.key,
            bytes.len(),
            t.storage.numel
        ));
    }
    if t.size.iter().any(|&s| s < 0) || t.offset < 0 {
        return Err(format!("negative size {:?} or offset {}", t.size, t.offset));
    }
    // i128: sizes, strides and offsets come from the file and may overflow i64 arithmetic.
    let count: i128 = t.size.iter().map(|&s| s as i128).product();
    if count > 0 {
        let reach = |f: fn(i64) -> i64| -> i128 {
            t.offset as i128
                + t.size
                    .iter()
                    .zip(&t.stride)
                    .map(|(&s, &st)| (s as i128 - 1) * f(st) as i128)
                    .sum::<i128>()
        };
        let last = reach(|st| st);
        let first = reach(|st| st.min(0));
        if first < 0 || last >= numel as i128 {
            return Err(format!(
                "size {:?}, stride {:?}, offset {} reach outside the storage of {numel} elements",
                t.size, t.stride, t.offset
            ));
        }
    }
    let storage =
        Tensor::f_from_data_size(bytes, &[numel as i64], kind).map_err(|e| e.to_string())?;
    Ok(storage
        .as_strided(t.size.as_slice(), t.stride.as_slice(), t.offset)
        .contiguous())
}

/// Removes a DataParallel `module.` prefix.
fn strip_module(name: &str) -> &str {
    name.strip_prefix("module.").unwrap_or(name)
}

/// Copies `tensors` into the variables of `vs` with the same names (after removing `module.` and
/// then `strip_prefix`; names without `strip_prefix` are ignored). Names under `skip_prefixes`
/// (matched after stripping) are ignored. Values are converted to each variable's dtype and
/// device. A shape mismatch is an error naming both shapes.
pub fn load_into(
    vs: &mut VarStore,
    tensors: &[(String, Tensor)],
    strip_prefix: Option<&str>,
    skip_prefixes: &[&str],
) -> Result<LoadReport> {
    let vars = vs.variables();
    let mut report = LoadReport::default();
    let mut seen = std::collections::HashSet::new();
    for (full, t) in tensors {
        let name = strip_module(full);
        let name = match strip_prefix {
            Some(p) => match name.strip_prefix(p) {
                Some(n) => n,
                None => {
                    report.ignored += 1;
                    continue;
                }
            },
            None => name,
        };
        if skip_prefixes.iter().any(|p| name.starts_with(p)) {
            report.ignored += 1;
            continue;
        }
        let Some(var) = vars.get(name) else {
            report.unexpected.push(full.clone());
            continue;
        };
        if var.size() != t.size() {
            return Err(Error::Other(format!(
                "weight '{full}': shape {:?} in the weights but {:?} in the model (variable '{name}')",
                t.size(),
                var.size()
            )));
        }
        let mut var = var.shallow_clone();
        tch::no_grad(|| var.f_copy_(&t.to_device(var.device()).to_kind(var.kind())))?;
        seen.insert(name.to_string());
        report.loaded += 1;
    }
    let mut missing: Vec<String> = vars
        .keys()
        .filter(|k| !seen.contains(*k))
        .cloned()
        .collect();
    missing.sort();
    report.missing = missing;
    Ok(report)
}

/// [`load_into`] that fails when any variable is missing or any weight is unexpected.
pub fn load_into_strict(
    vs: &mut VarStore,
    tensors: &[(String, Tensor)],
    strip_prefix: Option<&str>,
    skip_prefixes: &[&str],
) -> Result<LoadReport> {
    let report = load_into(vs, tensors, strip_prefix, skip_prefixes)?;
    report.check_strict("weights")?;
    Ok(report)
}

/// Reads `path` and loads it into `vs` (see [`load_into`]); errors name the file.
pub fn load_file(
    vs: &mut VarStore,
    path: &Path,
    strip_prefix: Option<&str>,
    skip_prefixes: &[&str],
) -> Result<LoadReport> {
    let tensors = read_state_dict(path)?;
    load_into(vs, &tensors, strip_prefix, skip_prefixes)
        .map_err(|e| Error::input(path, "state dict", e.to_string()))
}

/// Writes all variables of `vs` (names as in the store) to a safetensors file, atomically.
pub fn save_safetensors(vs: &VarStore, path: &Path) -> Result<()> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    save_tensors(&named, path)
}

/// Writes named tensors to a safetensors file, atomically (`<path>.tmp` then rename).
pub fn save_tensors(named: &[(String, Tensor)], path: &Path) -> Result<()> {
    let cpu: Vec<(String, Tensor)> = named
        .iter()
        .map(|(n, t)| (n.clone(), t.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    Tensor::write_safetensors(&cpu, &tmp)
        .map_err(|e| Error::input(&tmp, "safetensors", e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::Init;

    #[test]
    fn load_into_strips_prefixes_and_reports_names() {
        let mut vs = VarStore::new(Device::Cpu);
        let a = vs.root() / "a";
        let _w = a.var("weight", &[2, 3], Init::Const(0.0));
        let _b = a.var("bias", &[2], Init::Const(0.0));
        let tensors = vec![
            (
                "module.encoder_q.a.weight".to_string(),
                Tensor::ones([2, 3], (Kind::Double, Device::Cpu)),
            ),
            (
                "module.encoder_q.extra".to_string(),
                Tensor::ones([1], (Kind::Float, Device::Cpu)),
            ),
            (
                "module.encoder_q.fc.weight".to_string(),
                Tensor::ones([1], (Kind::Float, Device::Cpu)),
            ),
            (
                "module.queue".to_string(),
                Tensor::ones([1], (Kind::Float, Device::Cpu)),
            ),
        ];
        let r = load_into(&mut vs, &tensors, Some("encoder_q."), &["fc."]).unwrap();
        assert_eq!(r.loaded, 1);
        assert_eq!(r.missing, vec!["a.bias".to_string()]);
        assert_eq!(r.unexpected, vec!["module.encoder_q.extra".to_string()]);
        assert_eq!(r.ignored, 2);
        let v = vs.variables()["a.weight"]
            .sum(Kind::Float)
            .double_value(&[]);
        assert_eq!(v, 6.0);
        assert_eq!(vs.variables()["a.weight"].kind(), Kind::Float);
        let e = r.check_strict("ckpt").unwrap_err().to_string();
        assert!(e.contains("a.bias") && e.contains("extra"), "{e}");

        let bad = vec![(
            "a.weight".to_string(),
            Tensor::ones([3, 2], (Kind::Float, Device::Cpu)),
        )];
        let e = load_into(&mut vs, &bad, None, &[]).unwrap_err().to_string();
        assert!(e.contains("[3, 2]") && e.contains("[2, 3]"), "{e}");
    }

    #[test]
    fn safetensors_round_trip_and_content_detection() {
        let dir = tempfile::tempdir().unwrap();
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var(
            "w",
            &[4, 5],
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        );
        let _n = vs
            .root()
            .add("n", Tensor::from_slice(&[7i64]).view([]), false);
        // No .safetensors extension: detection is by content.
        let path = dir.path().join("ckpt.bin");
        save_safetensors(&vs, &path).unwrap();
        let back = read_state_dict(&path).unwrap();
        assert_eq!(back.len(), 2);
        let mut vs2 = VarStore::new(Device::Cpu);
        let w2 = vs2.root().var("w", &[4, 5], Init::Const(0.0));
        let n2 = vs2
            .root()
            .add("n", Tensor::zeros([], (Kind::Int64, Device::Cpu)), false);
        let r = load_into(&mut vs2, &back, None, &[]).unwrap();
        assert_eq!(r.loaded, 2);
        assert!(r.missing.is_empty() && r.unexpected.is_empty());
        assert_eq!((&w - &w2).abs().max().double_value(&[]), 0.0);
        assert_eq!(n2.int64_value(&[]), 7);

        let junk = dir.path().join("junk.pt");
        std::fs::write(&junk, b"hello world").unwrap();
        let e = read_state_dict(&junk).unwrap_err().to_string();
        assert!(e.contains("junk.pt") && e.contains("neither"), "{e}");
    }

    #[test]
    fn strided_storage_is_honoured_and_bounds_checked() {
        let bytes: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let storage = pickle::StorageRef {
            type_name: "FloatStorage".into(),
            key: "0".into(),
            numel: 6,
        };
        // A transposed (3, 2) view of a (2, 3) storage, offset 0.
        let t = TensorRef {
            storage: storage.clone(),
            offset: 0,
            size: vec![3, 2],
            stride: vec![1, 3],
        };
        let x = build_tensor(&bytes, &t).unwrap();
        let v: Vec<f32> = Vec::try_from(x.flatten(0, -1)).unwrap();
        assert_eq!(v, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        let t = TensorRef {
            storage,
            offset: 2,
            size: vec![2, 3],
            stride: vec![3, 1],
        };
        let e = build_tensor(&bytes, &t).unwrap_err();
        assert!(e.contains("outside"), "{e}");
    }
}
