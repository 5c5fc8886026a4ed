//! Fuzzing support for every reader of outside bytes: one entry point per format
//! ([`run_target`]), a deterministic mutator ([`Mutator`]) and small seed inputs ([`seeds`]).
//!
//! Used by the bounded mutation fuzz of `cargo test` (`tests/fuzz_readers.rs`) and by the
//! `cargo fuzz` targets under `fuzz/`. The property every reader must keep on any input: it
//! returns `Ok` or an `Err` whose message names the file; it never panics, aborts, hangs or
//! allocates a buffer sized by an untrusted header (see docs/reliability.md).
use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// The fuzz targets: `(name, file extension)`.
pub const TARGETS: &[(&str, &str)] = &[
    ("skeleton", "skeleton"),
    ("msr", "txt"),
    ("npy", "npy"),
    ("npz", "npz"),
    ("labels", "pkl"),
    ("pyskl", "pkl"),
    ("torch_pt", "pt"),
    ("safetensors", "safetensors"),
    ("config_yaml", "yaml"),
    ("config_toml", "toml"),
    ("layout_yaml", "yaml"),
    ("layout_toml", "toml"),
    ("checkpoint_json", "json"),
];

/// The file a target's input is written to inside `dir`.
pub fn input_path(target: &str, dir: &Path) -> PathBuf {
    let ext = TARGETS
        .iter()
        .find(|(n, _)| *n == target)
        .map(|(_, e)| *e)
        .unwrap_or("bin");
    dir.join(format!("input_{target}.{ext}"))
}

/// Writes `bytes` to the target's input file in `dir` and runs the reader(s) of that format on
/// it (and, when the read succeeds, the conversions a command would do next). `Ok(())` when the
/// input was accepted, the reader's error otherwise.
pub fn run_target(target: &str, bytes: &[u8], dir: &Path) -> Result<()> {
    let path = input_path(target, dir);
    std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    run_on_file(target, &path)
}

/// Runs the reader(s) of `target` on `path`.
pub fn run_on_file(target: &str, path: &Path) -> Result<()> {
    use crate::data::{msr, npy, ntu, pickle};
    match target {
        "skeleton" => {
            let s = ntu::read_skeleton(path)?;
            let mut out = vec![0f32; 3 * 8 * 25 * 2];
            s.fill_padded(8, &mut out);
            Ok(())
        }
        "msr" => msr::read_msr_file(path).map(|_| ()),
        "npy" => {
            let h = npy::read_header(path);
            let a = npy::read_array(path);
            match (&h, &a) {
                (Ok(_), Err(e)) | (Err(e), Ok(_)) => {
                    return Err(Error::Other(format!(
                        "{}: read_header and read_array disagree: {e}",
                        path.display()
                    )))
                }
                _ => {}
            }
            let a = a?;
            if a.dtype.is_integer() {
                a.to_i64()?;
            } else {
                a.to_f32()?;
            }
            let (_, buf) = npy::mmap_f32(path)?;
            let _ = buf.as_slice().iter().take(4).sum::<f32>();
            Ok(())
        }
        "npz" => {
            let members = npy::npz_members(path)?;
            for m in members.iter().take(16) {
                let a = npy::read_npz_array(path, m)?;
                if a.dtype.is_integer() {
                    a.to_i64()?;
                } else {
                    a.to_f32()?;
                }
            }
            Ok(())
        }
        "labels" => pickle::read_labels(path).map(|_| ()),
        "pyskl" => {
            // The numpy-aware unpickler and the pyskl listing, then every sample's decoding.
            use crate::data::generic::{Format, GenericConfig};
            let cfg = GenericConfig::new(Format::Pyskl, path, path.with_extension("out"));
            let listing = crate::data::readers::pyskl::list(&cfg)?;
            for entry in listing.entries {
                (entry.load)()?;
            }
            Ok(())
        }
        "torch_pt" | "safetensors" => crate::model::weights::read_state_dict(path).map(|_| ()),
        "config_yaml" | "config_toml" => {
            crate::train::config::PretrainConfig::load(path, &[]).map(|_| ())
        }
        "layout_yaml" | "layout_toml" => crate::data::layout::Layout::from_file(path).map(|_| ()),
        "checkpoint_json" => {
            let dir = path.parent().unwrap_or(Path::new("."));
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            crate::train::checkpoint::read_meta(dir, &name).map(|_| ())
        }
        other => Err(Error::Other(format!("unknown fuzz target {other}"))),
    }
}

/// Whether an error message keeps the property: it names the input file.
pub fn names_file(msg: &str, path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    msg.contains(&name)
}

/// Integers that break length and shape arithmetic.
const INTERESTING_INTS: &[u64] = &[
    0,
    1,
    0x7f,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1_000_000_000_000,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// Replacements for a number in a text format.
const INTERESTING_NUMBERS: &[&str] = &[
    "0",
    "-1",
    "999999999999",
    "1000000000000",
    "18446744073709551616",
    "-9223372036854775809",
    "1e308",
    "1e999",
    "nan",
    "NaN",
    "inf",
    "-inf",
    ".nan",
    ".inf",
    "0x10",
    "1.5",
    "",
];

/// Replacements for a word (dtype strings, type names, keywords).
const INTERESTING_WORDS: &[&str] = &[
    "<f8", ">f4", "<c8", "|b1", "<i8", "<u8", "|O", "<U10", "V8", "True", "None", "null", "~",
    "&a", "*a", "!!binary", "[]", "{}", "''",
];

/// A deterministic mutator of byte strings (bit flips, truncations, huge integers, number and
/// word substitutions, NaN/Inf, repeated chunks and nesting bombs).
pub struct Mutator {
    rng: ChaCha8Rng,
    /// Mutants never grow beyond this many bytes.
    pub max_len: usize,
}

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Mutator {
            rng: ChaCha8Rng::seed_from_u64(seed),
            max_len: 1 << 20,
        }
    }

    /// A mutant of `input`: 1 to 4 mutations.
    pub fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
        let mut v = input.to_vec();
        let n = self.rng.gen_range(1..=4);
        for _ in 0..n {
            self.mutate_once(&mut v);
        }
        v.truncate(self.max_len);
        v
    }

    fn pos(&mut self, len: usize) -> usize {
        if len == 0 {
            0
        } else if self.rng.gen_bool(0.5) {
            // Headers live at the start: favour it.
            self.rng.gen_range(0..len.min(256))
        } else {
            self.rng.gen_range(0..len)
        }
    }

    fn mutate_once(&mut self, v: &mut Vec<u8>) {
        let len = v.len();
        match self.rng.gen_range(0..11) {
            0 if len > 0 => {
                let p = self.pos(len);
                v[p] ^= 1 << self.rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let p = self.pos(len);
                v[p] = [0u8, 0xff, 0x7f, 0x80, b'\n', b'\'', b'(', b'}'][self.rng.gen_range(0..8)];
            }
            2 if len > 0 => {
                let p = self.rng.gen_range(0..len);
                v.truncate(p);
            }
            3 if len >= 8 => {
                let x = INTERESTING_INTS[self.rng.gen_range(0..INTERESTING_INTS.len())];
                let width = [1usize, 2, 4, 8][self.rng.gen_range(0..4)];
                let p = self.pos(len - width + 1).min(len - width);
                v[p..p + width].copy_from_slice(&x.to_le_bytes()[..width]);
            }
            4 => self.replace_run(v, |b| b.is_ascii_digit(), INTERESTING_NUMBERS),
            5 => self.replace_run(
                v,
                |b| b.is_ascii_alphanumeric() || b == b'<' || b == b'|',
                INTERESTING_WORDS,
            ),
            6 if len > 0 => {
                // Repeat a chunk: long lists, nested brackets, repeated opcodes.
                let a = self.pos(len);
                let l = self.rng.gen_range(1..=16.min(len - a));
                let chunk = v[a..a + l].to_vec();
                let times = [2usize, 16, 1000, 100_000][self.rng.gen_range(0..4)];
                let mut ins = Vec::new();
                for _ in 0..times {
                    if ins.len() + chunk.len() > self.max_len {
                        break;
                    }
                    ins.extend_from_slice(&chunk);
                }
                v.splice(a..a, ins);
            }
            7 if len > 0 => {
                let a = self.rng.gen_range(0..len);
                let l = self.rng.gen_range(1..=64.min(len - a));
                v.drain(a..a + l);
            }
            8 => {
                let p = self.pos(len + 1).min(len);
                let n = self.rng.gen_range(1..=16);
                let ins: Vec<u8> = (0..n).map(|_| self.rng.gen()).collect();
                v.splice(p..p, ins);
            }
            9 => {
                // A nesting bomb at a random place.
                let p = self.pos(len + 1).min(len);
                let opener: &[u8] = [&b"["[..], b"{a: ", b"(", b"- ", b"]\x85", b"(]", b"}("]
                    [self.rng.gen_range(0..7)];
                let times = self.rng.gen_range(100..50_000);
                let mut ins = Vec::with_capacity(times * opener.len());
                for _ in 0..times {
                    ins.extend_from_slice(opener);
                }
                v.splice(p..p, ins);
            }
            _ if len > 8 => {
                // Overwrite 4 bytes with a NaN / Inf float32 or a float64 NaN.
                let cands: [&[u8]; 4] = [
                    &f32::NAN.to_le_bytes(),
                    &f32::INFINITY.to_le_bytes(),
                    &f32::NEG_INFINITY.to_le_bytes(),
                    &f64::NAN.to_le_bytes(),
                ];
                let c = cands[self.rng.gen_range(0..4)];
                let p = self.rng.gen_range(0..len - c.len());
                v[p..p + c.len()].copy_from_slice(c);
            }
            _ => v.push(self.rng.gen()),
        }
    }

    /// Replaces one run of bytes matching `class` with one of `with`.
    fn replace_run(&mut self, v: &mut Vec<u8>, class: fn(u8) -> bool, with: &[&str]) {
        let starts: Vec<usize> = (0..v.len())
            .filter(|&i| class(v[i]) && (i == 0 || !class(v[i - 1])))
            .take(4096)
            .collect();
        if starts.is_empty() {
            return;
        }
        // Favour the first runs (headers, first keys).
        let k = if self.rng.gen_bool(0.5) {
            self.rng.gen_range(0..starts.len().min(16))
        } else {
            self.rng.gen_range(0..starts.len())
        };
        let a = starts[k];
        let mut b = a;
        while b < v.len() && class(v[b]) {
            b += 1;
        }
        let w = with[self.rng.gen_range(0..with.len())].as_bytes().to_vec();
        v.splice(a..b, w);
    }
}

/// Small valid inputs of every target, built in memory (so the fuzz needs no data files).
pub mod seeds {
    use crate::data::npy;
    use std::io::Write;
    use std::path::Path;

    /// A 2-frame, 1-body `.skeleton` (the NTU RGB+D text format).
    pub fn skeleton() -> Vec<u8> {
        let mut s = String::from("2\n");
        for f in 0..2 {
            s.push_str("1\n72057594037931101 0 1 1 1 1 0 0.1 0.2 2\n25\n");
            for j in 0..25 {
                s.push_str(&format!(
                    "{:.3} {:.3} {:.3} 250.1 120.5 1000.2 500.3 -0.2 0.1 0.9 0.3 2\n",
                    0.01 * j as f32,
                    0.1 * f as f32,
                    3.0
                ));
            }
        }
        s.into_bytes()
    }

    /// One MSR Action3D frame (20 lines of `x y z c`).
    pub fn msr() -> Vec<u8> {
        let mut s = String::new();
        for j in 0..40 {
            s.push_str(&format!("{} {} {} 1\n", 100 + j, 200 - j, 1500.5));
        }
        s.into_bytes()
    }

    fn npy_of(dtype: npy::Dtype, shape: &[usize], elem: &[u8]) -> Vec<u8> {
        let mut b = npy::header_bytes(dtype, shape);
        let n: usize = shape.iter().product();
        for _ in 0..n {
            b.extend_from_slice(elem);
        }
        b
    }

    /// A float32 `(2, 3, 4)` `.npy`.
    pub fn npy() -> Vec<u8> {
        npy_of(npy::Dtype::F32, &[2, 3, 4], &1.5f32.to_le_bytes())
    }

    /// An int64 `.npy`.
    pub fn npy_i64() -> Vec<u8> {
        npy_of(npy::Dtype::I64, &[5], &7i64.to_le_bytes())
    }

    fn zip_of(entries: &[(&str, Vec<u8>)], deflate: bool) -> Vec<u8> {
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut buf);
            let method = if deflate {
                zip::CompressionMethod::Deflated
            } else {
                zip::CompressionMethod::Stored
            };
            let opts = zip::write::SimpleFileOptions::default().compression_method(method);
            for (name, bytes) in entries {
                z.start_file(*name, opts).expect("zip in memory");
                z.write_all(bytes).expect("zip in memory");
            }
            z.finish().expect("zip in memory");
        }
        buf.into_inner()
    }

    /// An `.npz` with a float32 and an int64 member (stored, or deflated).
    pub fn npz(deflate: bool) -> Vec<u8> {
        zip_of(&[("x.npy", npy()), ("y.npy", npy_i64())], deflate)
    }

    /// A `label.pkl` (protocol 3) with 3 samples.
    pub fn labels(dir: &Path) -> Vec<u8> {
        let p = dir.join("seed_labels.pkl");
        let names: Vec<String> = (0..3).map(|i| format!("S001C001P001R001A00{i}")).collect();
        crate::data::pickle::write_labels(&p, &names, &[0, 1, 2]).expect("write seed labels");
        let b = std::fs::read(&p).expect("read seed labels");
        let _ = std::fs::remove_file(&p);
        b
    }

    /// The pickle program of `OrderedDict([('w', <2x3 float tensor>)])` as `torch.save` writes it.
    pub fn state_dict_pickle() -> Vec<u8> {
        let mut p: Vec<u8> = vec![0x80, 2];
        p.extend(b"ccollections\nOrderedDict\nq\x00)Rq\x01(");
        p.extend(b"X\x01\x00\x00\x00w");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x02(");
        p.extend(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        p.extend(b"K\x00K\x02K\x03\x86K\x03K\x01\x86\x89h\x00)Rtq\x03R");
        p.extend(b"u}b.");
        p
    }

    /// A tiny `torch.save` zip archive holding [`state_dict_pickle`].
    pub fn torch_pt() -> Vec<u8> {
        let storage: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        zip_of(
            &[
                ("archive/data.pkl", state_dict_pickle()),
                ("archive/byteorder", b"little".to_vec()),
                ("archive/data/0", storage),
                ("archive/version", b"3\n".to_vec()),
            ],
            false,
        )
    }

    /// A safetensors file with two small tensors.
    pub fn safetensors(dir: &Path) -> Vec<u8> {
        let p = dir.join("seed.safetensors");
        let a = tch::Tensor::from_slice(&[1f32, 2., 3., 4., 5., 6.]).reshape([2, 3]);
        let b = tch::Tensor::from_slice(&[7i64, 8]);
        tch::Tensor::write_safetensors(&[("a", a), ("queue_ptr", b)], &p)
            .expect("write seed safetensors");
        let bytes = std::fs::read(&p).expect("read seed safetensors");
        let _ = std::fs::remove_file(&p);
        bytes
    }

    /// A pre-training config (YAML).
    pub fn config_yaml() -> Vec<u8> {
        b"model: crossclr3\nwork_dir: ./work/x\nfeeder: synthetic\nbatch_size: 8\nbase_lr: 0.1\n\
step: [50, 70]\nnum_epoch: 3\nmodel_args:\n  queue_size: 64\n  hidden_channels: 16\n\
train_feeder_args:\n  shear_amplitude: 0.5\n  temperal_padding_ratio: 6\n"
            .to_vec()
    }

    /// The same config in TOML.
    pub fn config_toml() -> Vec<u8> {
        b"model = \"skeletonclr\"\nwork_dir = \"./work/x\"\nbatch_size = 8\nbase_lr = 0.1\n\
step = [50, 70]\nnum_epoch = 3\n[model_args]\nqueue_size = 64\n[train_feeder_args]\n\
shear_amplitude = 0.5\n"
            .to_vec()
    }

    /// A 5-joint layout (TOML).
    pub fn layout_toml() -> Vec<u8> {
        b"name = \"rig\"\njoints = [\"hip\", \"chest\", \"head\", \"l_hand\", \"r_hand\"]\n\
edges = [[1, 2], [2, 3], [2, 4], [2, 5]]\ncenter = 2\nshoulders = [4, 5]\n"
            .to_vec()
    }

    /// The same layout in YAML.
    pub fn layout_yaml() -> Vec<u8> {
        b"name: rig\njoints: [hip, chest, head, l_hand, r_hand]\n\
edges: [[1, 2], [2, 3], [2, 4], [2, 5]]\ncenter: 2\nshoulders: [4, 5]\nindex_base: 1\n"
            .to_vec()
    }

    /// A checkpoint JSON sidecar.
    pub fn checkpoint_json() -> Vec<u8> {
        format!(
            "{{\"format\": \"{}\", \"epoch\": 3, \"global_step\": 6, \"queue_ptr\": 48, \
\"model\": \"skeletonclr\", \"seed\": 1, \"rng\": \"x\", \"lr\": 0.1, \
\"weights_file\": \"last.safetensors\", \"weights_bytes\": 100, \
\"state_file\": \"last.state.safetensors\", \"state_bytes\": 50}}",
            crate::train::checkpoint::FORMAT
        )
        .into_bytes()
    }

    /// The built-in seeds of `target` (`dir` is scratch space for formats written by a writer).
    pub fn of(target: &str, dir: &Path) -> Vec<Vec<u8>> {
        match target {
            "skeleton" => vec![skeleton()],
            "msr" => vec![msr()],
            "npy" => vec![npy(), npy_i64()],
            "npz" => vec![npz(false), npz(true)],
            "labels" => vec![labels(dir)],
            // Seeds: the pyskl fixtures under tests/fixtures/generic (tests/fuzz_readers.rs).
            "torch_pt" => vec![torch_pt()],
            "safetensors" => vec![safetensors(dir)],
            "config_yaml" => vec![config_yaml()],
            "config_toml" => vec![config_toml()],
            "layout_yaml" => vec![layout_yaml()],
            "layout_toml" => vec![layout_toml()],
            "checkpoint_json" => vec![checkpoint_json()],
            _ => Vec::new(),
        }
    }
}
