//! Data formats: raw NTU `.skeleton` parsing, npy/npz/pkl, dataset opening, the official
//! preprocessing, `prepare` end to end, MSR Action3D.
use crossclr::data::formats::{self, DatasetFormat, DatasetSpec};
use crossclr::data::layout::Layout;
use crossclr::data::ntu::{self, NtuName};
use crossclr::data::prepare::{self, Benchmark, NtuVersion, OnError, PrepareConfig};
use crossclr::data::preprocess::ResizeRule;
use crossclr::data::{msr, npy, pickle, preprocess};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ntu")
        .join(name)
}

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

/// Value of (c, t, v, m) in a `(3, T, 25, 2)` array.
fn at(data: &[f32], frames: usize, c: usize, t: usize, v: usize, m: usize) -> f32 {
    data[((c * frames + t) * 25 + v) * 2 + m]
}

// ---------------------------------------------------------------- .skeleton parsing

#[test]
fn skeleton_two_bodies_and_empty_frame() {
    let sk = ntu::read_skeleton(&fixture("two_bodies.skeleton")).unwrap();
    assert_eq!((sk.frames, sk.max_bodies, sk.empty_frames), (3, 2, 1));
    assert_eq!(sk.data.len(), 3 * 3 * 25 * 2);
    // Fixture values: x = t + v/100, y = m + 0.5, z = 3 + v/1000.
    assert_eq!(at(&sk.data, 3, 0, 0, 7, 0), 0.07);
    assert_eq!(at(&sk.data, 3, 1, 0, 7, 1), 1.5);
    assert_eq!(at(&sk.data, 3, 2, 2, 24, 0), 3.024);
    // Frame 1 has no body: all zero; frame 2 has one body: slot 1 zero.
    assert!((0..3).all(|c| (0..25)
        .all(|v| at(&sk.data, 3, c, 1, v, 0) == 0.0 && at(&sk.data, 3, c, 1, v, 1) == 0.0)));
    assert!((0..3).all(|c| (0..25).all(|v| at(&sk.data, 3, c, 2, v, 1) == 0.0)));
}

#[test]
fn skeleton_crlf_and_trailing_spaces_parse_identically() {
    let lf = ntu::read_skeleton(&fixture("two_bodies.skeleton")).unwrap();
    let crlf = ntu::read_skeleton(&fixture("crlf.skeleton")).unwrap();
    assert_eq!(lf, crlf);
}

#[test]
fn skeleton_three_bodies_keeps_first_two_in_file_order() {
    let sk = ntu::read_skeleton(&fixture("three_bodies.skeleton")).unwrap();
    assert_eq!((sk.frames, sk.max_bodies), (2, 3));
    assert_eq!(at(&sk.data, 2, 1, 1, 0, 0), 0.5);
    assert_eq!(at(&sk.data, 2, 1, 1, 0, 1), 1.5); // body 3 (y = 2.5) is dropped
}

#[test]
fn skeleton_zero_bodies() {
    let sk = ntu::read_skeleton(&fixture("zero_bodies.skeleton")).unwrap();
    assert_eq!((sk.frames, sk.max_bodies, sk.empty_frames), (2, 0, 2));
    assert!(sk.data.iter().all(|&v| v == 0.0));
}

fn err_of(name: &str) -> String {
    ntu::read_skeleton(&fixture(name)).unwrap_err().to_string()
}

#[test]
fn skeleton_errors_name_file_line_and_problem() {
    let cases = [
        ("truncated.skeleton", "line 41", "file ends early"),
        ("wrong_joint_count.skeleton", "line 4", "joint count 24"),
        ("non_number.skeleton", "line 7", "x is not a number"),
        ("nan.skeleton", "line 10", "NaN"),
        (
            "extra_frames.skeleton",
            "line 30",
            "data after the 1 frames",
        ),
    ];
    for (file, line, what) in cases {
        let e = err_of(file);
        assert!(
            e.contains(file) && e.contains(&format!("{line}:")) && e.contains(what),
            "{file}: {e}"
        );
    }
    let e = ntu::parse_skeleton(b"2\n1\n123 0 1\n", Path::new("x.skeleton"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 3") && e.contains("has 3 fields"), "{e}");
    let e = ntu::parse_skeleton(b"2\n-1\n", Path::new("x.skeleton"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 2") && e.contains("body count"), "{e}");
    let e = ntu::parse_skeleton(
        b"1\n1\n1.5 0 1 1 1 1 0 0 0 2\n25\n",
        Path::new("x.skeleton"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("line 3") && e.contains("bodyID"), "{e}");
}

#[test]
fn real_ntu_sample() {
    let p = shared().join("data/ntu/samples/S001C001P001R001A001.skeleton");
    if !p.exists() {
        eprintln!("SKIP real_ntu_sample: {} is absent", p.display());
        return;
    }
    let sk = ntu::read_skeleton(&p).unwrap();
    assert_eq!((sk.frames, sk.max_bodies, sk.empty_frames), (103, 1, 0));
    // First joint line of the file: 0.2181153 0.1725972 3.785547 ...
    assert_eq!(at(&sk.data, 103, 0, 0, 0, 0), 0.2181153);
    assert_eq!(at(&sk.data, 103, 1, 0, 0, 0), 0.1725972);
    assert_eq!(at(&sk.data, 103, 2, 0, 0, 0), 3.785547);
    assert!((0..3).all(|c| (0..103).all(|t| (0..25).all(|v| at(&sk.data, 103, c, t, v, 1) == 0.0))));
    // Preprocessing invariants on real data.
    let mut padded = vec![0f32; 3 * 300 * 50];
    sk.fill_padded(300, &mut padded);
    let (pos, len) = preprocess::preprocess_sample(&padded, [3, 300, 25, 2], &Layout::ntu25(), 50);
    assert_eq!(len, 103);
    check_preprocessed(&pos, 50, &Layout::ntu25());
}

// ---------------------------------------------------------------- names and splits

#[test]
fn split_sizes_from_official_metadata() {
    for (version, dir, expect) in [
        (
            NtuVersion::Ntu60,
            "ntu60",
            [
                (Benchmark::Xsub, 40_091, 16_487),
                (Benchmark::Xview, 37_646, 18_932),
            ],
        ),
        (
            NtuVersion::Ntu120,
            "ntu120",
            [
                (Benchmark::Xsub, 63_026, 50_919),
                (Benchmark::Xset, 54_468, 59_477),
            ],
        ),
    ] {
        let p = shared()
            .join("data/ntu/metadata")
            .join(dir)
            .join("skes_available_name.txt");
        if !p.exists() {
            eprintln!(
                "SKIP split_sizes_from_official_metadata: {} is absent",
                p.display()
            );
            return;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let missing: std::collections::HashSet<String> =
            version.missing_ids().into_iter().collect();
        let names: Vec<NtuName> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !missing.contains(*l))
            .map(|l| NtuName::parse_id(l).unwrap())
            .filter(|n| version.contains(n))
            .collect();
        for (b, train, val) in expect {
            let t = names.iter().filter(|n| b.is_train(version, n)).count();
            assert_eq!(
                (t, names.len() - t),
                (train, val),
                "{} {}",
                version.name(),
                b.name()
            );
        }
    }
}

// ---------------------------------------------------------------- npy / npz / pkl

#[test]
fn npy_roundtrip_mmap_and_python_layout() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.npy");
    let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5).collect();
    npy::write_f32(&p, &[2, 3, 4], &data).unwrap();
    assert_eq!(npy::read_f32(&p).unwrap(), (vec![2, 3, 4], data.clone()));
    let (shape, buf) = npy::mmap_f32(&p).unwrap();
    assert_eq!((shape, buf.as_slice()), (vec![2, 3, 4], data.as_slice()));
    let q = dir.path().join("b.npy");
    npy::write_i64(&q, &[3], &[1, -2, 3]).unwrap();
    assert_eq!(npy::read_i64(&q).unwrap(), (vec![3], vec![1, -2, 3]));
    assert!(!dir.path().join("a.npy.tmp").exists());
}

#[test]
fn npy_rejects_truncated_and_wrong_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.npy");
    npy::write_f32(&p, &[4, 5], &[0.0; 20]).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
    let e = npy::read_f32(&p).unwrap_err().to_string();
    assert!(e.contains("t.npy") && e.contains("truncated"), "{e}");
    let e = npy::mmap_f32(&p).err().unwrap().to_string();
    assert!(e.contains("truncated"), "{e}");
    let q = dir.path().join("i.npy");
    npy::write_i64(&q, &[2], &[1, 2]).unwrap();
    let e = npy::read_f32(&q).unwrap_err().to_string();
    assert!(e.contains("i.npy") && e.contains("int64"), "{e}");
    let e = npy::read_i64(&p).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn row_writer_is_atomic_and_compacts() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rows.npy");
    {
        let w = npy::NpyRowWriter::create(&p, &[3, 2]).unwrap();
        w.write_row(0, &[1.0, 2.0]).unwrap();
        assert!(!p.exists() && npy::tmp_path(&p).exists());
        // dropped unfinished: the .tmp goes away, nothing under the final name
    }
    assert!(!p.exists() && !npy::tmp_path(&p).exists());
    let w = npy::NpyRowWriter::create(&p, &[3, 2]).unwrap();
    for r in 0..3 {
        w.write_row(r, &[r as f32, 10.0 + r as f32]).unwrap();
    }
    w.compact(&[0, 2]).unwrap().finish().unwrap();
    assert_eq!(
        npy::read_f32(&p).unwrap(),
        (vec![2, 2], vec![0.0, 10.0, 2.0, 12.0])
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn labels_mismatch_and_layout_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("train_data.npy");
    let l = dir.path().join("train_label.pkl");
    npy::write_f32(&d, &[2, 3, 4, 25, 2], &vec![0.5; 2 * 3 * 4 * 25 * 2]).unwrap();
    pickle::write_labels(&l, &["a".into(), "b".into(), "c".into()], &[0, 1, 2]).unwrap();
    let e = formats::open_generic(&d, &l, "ntu25")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("train_label.pkl") && e.contains("3 labels for 2 samples"),
        "{e}"
    );
    pickle::write_labels(&l, &["a".into(), "b".into()], &[0, 4]).unwrap();
    let ds = formats::open_generic(&d, &l, "ntu25").unwrap();
    assert_eq!((ds.shape, ds.num_classes), ([2, 3, 4, 25, 2], 5));
    let e = formats::open_generic(&d, &l, "msr20")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("train_data.npy") && e.contains("V = 25") && e.contains("msr20"),
        "{e}"
    );
    // A layout file naming a joint that does not exist.
    let lf = dir.path().join("rig.toml");
    std::fs::write(
        &lf,
        "name='r'\njoints=['a','b']\nedges=[[1,3]]\ncenter=1\nshoulders=[1,2]\n",
    )
    .unwrap();
    let e = formats::open_generic(&d, &l, lf.to_str().unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("rig.toml") && e.contains("unknown joint 3"),
        "{e}"
    );
    // Wrong rank.
    npy::write_f32(&d, &[2, 3, 4, 25], &vec![0.5; 2 * 3 * 4 * 25]).unwrap();
    let e = formats::open_generic(&d, &l, "ntu25")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("rank 5"), "{e}");
    // NaN reported with the sample index.
    let mut v = vec![0.5f32; 2 * 3 * 4 * 25 * 2];
    v[3 * 4 * 25 * 2 + 7] = f32::NAN;
    npy::write_f32(&d, &[2, 3, 4, 25, 2], &v).unwrap();
    let e = formats::open_generic(&d, &l, "ntu25")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("sample 1") && e.contains("non-finite"), "{e}");
}

/// Builds an uncompressed npz (zip "stored") from (name, npy bytes).
fn write_npz(path: &Path, members: &[(&str, Vec<u8>)]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in members {
        z.start_file(format!("{name}.npy"), opts).unwrap();
        std::io::Write::write_all(&mut z, bytes).unwrap();
    }
    z.finish().unwrap();
}

fn npy_bytes_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let mut b = npy::header_bytes(npy::Dtype::F32, shape);
    data.iter()
        .for_each(|v| b.extend_from_slice(&v.to_le_bytes()));
    b
}

fn npy_bytes_f64(shape: &[usize], data: &[f64]) -> Vec<u8> {
    let mut b = npy::header_bytes(npy::Dtype::F64, shape);
    data.iter()
        .for_each(|v| b.extend_from_slice(&v.to_le_bytes()));
    b
}

#[test]
fn ctrgcn_npz_transposes_and_takes_argmax() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("NTU60_CS.npz");
    let (n, t) = (2, 3);
    // x[n][t][m*75 + v*3 + c] = 1000 n + 100 t + 10 m + c + v / 100
    let mut x = Vec::new();
    for i in 0..n {
        for tt in 0..t {
            for m in 0..2 {
                for v in 0..25 {
                    for c in 0..3 {
                        x.push((1000 * i + 100 * tt + 10 * m + c) as f32 + v as f32 / 100.0);
                    }
                }
            }
        }
    }
    let y = vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.0]; // (2, 3) one-hot: classes 2, 0
    write_npz(
        &p,
        &[
            ("x_test", npy_bytes_f32(&[n, t, 150], &x)),
            ("y_test", npy_bytes_f64(&[n, 3], &y)),
        ],
    );
    let spec = DatasetSpec {
        format: DatasetFormat::CtrgcnNpz,
        data: p.clone(),
        label: None,
        layout: "ntu25".into(),
        part: Some("test".into()),
        mmap: false,
    };
    let ds = formats::open(&spec).unwrap();
    assert_eq!(ds.shape, [2, 3, 3, 25, 2]);
    assert_eq!((ds.labels.clone(), ds.num_classes), (vec![2, 0], 3));
    let s = ds.sample(1);
    // (c=2, t=1, v=4, m=1) of sample 1
    assert_eq!(
        s[((2 * 3 + 1) * 25 + 4) * 2 + 1],
        1000.0 + 100.0 + 10.0 + 2.0 + 0.04
    );
    let spec = DatasetSpec {
        part: Some("train".into()),
        ..spec
    };
    let e = formats::open(&spec).err().unwrap().to_string();
    assert!(e.contains("x_train") && e.contains("no such member"), "{e}");
}

fn python() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let ok = p.exists()
        && std::process::Command::new(&p)
            .args(["-c", "import numpy"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
    if !ok {
        eprintln!("SKIP python check: {} with numpy is absent", p.display());
    }
    ok.then_some(p)
}

#[test]
fn label_pickle_is_a_python_tuple_of_two_lists() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.pkl");
    pickle::write_labels(
        &p,
        &["S001C001P001R001A001.skeleton".into(), "ü".into()],
        &[0, 59],
    )
    .unwrap();
    let out = std::process::Command::new(py)
        .args(["-c", "import pickle,sys; v=pickle.load(open(sys.argv[1],'rb')); print(type(v).__name__, [type(x).__name__ for x in v], v)"])
        .arg(&p)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        s.trim(),
        "tuple ['list', 'list'] (['S001C001P001R001A001.skeleton', 'ü'], [0, 59])",
        "{out:?}"
    );
}

// ---------------------------------------------------------------- preprocessing

/// Centre joint zero; shoulders on +x (z ~ 0, x > 0) in every frame with a body.
fn check_preprocessed(pos: &[f32], frames: usize, layout: &Layout) {
    let (l, r) = layout.shoulders;
    for t in 0..frames {
        for c in 0..3 {
            assert_eq!(
                at(pos, frames, c, t, layout.center, 0),
                0.0,
                "centre at t={t}"
            );
        }
        let dx = at(pos, frames, 0, t, r, 0) - at(pos, frames, 0, t, l, 0);
        let dz = at(pos, frames, 2, t, r, 0) - at(pos, frames, 2, t, l, 0);
        assert!(
            dx > 0.0 && dz.abs() < 1e-3 * dx.max(1e-3),
            "t={t}: dx {dx} dz {dz}"
        );
    }
}

#[test]
fn preprocessing_invariants_on_rotated_walker() {
    // A body turning slowly (shoulder z-difference always negative), 2nd body absent, 80 frames.
    let (t_len, layout) = (80, Layout::ntu25());
    let mut x = vec![0f32; 3 * 300 * 25 * 2];
    for t in 0..t_len {
        let yaw = 0.3 + 0.01 * t as f32;
        for v in 0..25 {
            let (bx, by) = (((v * 7) % 5) as f32 * 0.1 - 0.2, v as f32 * 0.05);
            let bx = if v == 4 {
                -0.2
            } else if v == 8 {
                0.2
            } else {
                bx
            };
            let (sx, sz) = (bx * yaw.cos(), -bx * yaw.sin());
            let i = |c: usize| ((c * 300 + t) * 25 + v) * 2;
            x[i(0)] = 1.0 + 0.01 * t as f32 + sx;
            x[i(1)] = by;
            x[i(2)] = 3.0 + sz;
        }
    }
    let (pos, len) = preprocess::preprocess_sample(&x, [3, 300, 25, 2], &layout, 50);
    assert_eq!(len, t_len);
    check_preprocessed(&pos, 50, &layout);
    assert!(
        (0..3).all(|c| (0..50).all(|t| (0..25).all(|v| at(&pos, 50, c, t, v, 1) == 0.0))),
        "absent body stays zero"
    );
}

#[test]
fn resize_matches_opencv_rule_on_hand_example() {
    // L = 3 rows [0, 10, 20] -> 5 rows. scale = 1/(5/3) = 0.6; s = (t+0.5)*0.6-0.5 =
    // -0.2, 0.4, 1.0, 1.6, 2.2 -> rows (0,0) (0,1 w .4) (1,2 w 0) (1,2 w .6) (2,2)
    // -> [0, 4, 10, 16, 20].
    let x: Vec<f32> = vec![0.0, 10.0, 20.0];
    for rule in [ResizeRule::OpencvIpp, ResizeRule::OpencvGeneric] {
        let out = preprocess::resize_rows(&x, [1, 3, 1, 1], 3, 5, rule);
        let expect = [0.0, 4.0, 10.0, 16.0, 20.0];
        for (a, b) in out.iter().zip(expect) {
            assert!((a - b).abs() < 1e-5, "{rule:?}: {out:?}");
        }
        // Same length: a copy; length 0: zeros.
        assert_eq!(preprocess::resize_rows(&x, [1, 3, 1, 1], 3, 3, rule), x);
        assert_eq!(
            preprocess::resize_rows(&x, [1, 3, 1, 1], 0, 2, rule),
            vec![0.0, 0.0]
        );
    }
    // The IPP rule is x0 + (x1 - x0) * w with a single rounding.
    let y: Vec<f32> = vec![0.1, 0.7, 0.3];
    let ipp = preprocess::resize_rows(&y, [1, 3, 1, 1], 3, 7, ResizeRule::OpencvIpp);
    let taps = preprocess::linear_taps(3, 7, ResizeRule::OpencvIpp);
    for (o, (r0, r1, w)) in ipp.iter().zip(taps) {
        let exact = y[r0] as f64 + (y[r1] - y[r0]) as f64 * w as f64;
        assert_eq!(*o, exact as f32, "row ({r0}, {r1}, {w})");
    }
}

// ---------------------------------------------------------------- prepare end to end

/// A valid synthetic `.skeleton` text: `frames` frames, `bodies` bodies, smooth motion.
fn synth_skeleton(frames: usize, bodies: usize, seed: f32) -> String {
    let mut s = format!("{frames}\n");
    for t in 0..frames {
        s += &format!("{bodies}\n");
        for m in 0..bodies {
            s += &format!(
                "{} 0 1 1 1 1 0 0.1 0.1 2\n25\n",
                72057594037931101u64 + m as u64
            );
            for v in 0..25 {
                let a = seed + 0.05 * t as f32 + v as f32 * 0.3;
                let side = if v == 4 {
                    -0.2
                } else if v == 8 {
                    0.2
                } else {
                    0.0
                };
                s += &format!(
                    "{:.6} {:.6} {:.6} 1 2 3 4 0 0 0 0 2\n",
                    0.5 * m as f32 + side + 0.05 * a.sin(),
                    v as f32 * 0.05 + 0.02 * a.cos(),
                    3.0 + 0.05 * a.cos() - side * 0.1
                );
            }
        }
    }
    s
}

fn tiny_corpus(dir: &Path) -> Vec<&'static str> {
    let names = [
        "S001C001P001R001A001", // xsub train, xview val
        "S001C002P003R001A002", // xsub val, xview train
        "S001C003P002R002A060", // train, train
        "S002C001P006R001A010", // val, val
        "S001C002P040R001A050",
        "S017C003P008R001A013",
    ];
    for (i, n) in names.iter().enumerate() {
        let frames = [40, 75, 50, 120, 33, 300][i];
        std::fs::write(
            dir.join(format!("{n}.skeleton")),
            synth_skeleton(frames, 1 + i % 2, i as f32),
        )
        .unwrap();
    }
    // In the official missing list: skipped even though it is valid.
    std::fs::write(
        dir.join("S001C002P005R002A008.skeleton"),
        synth_skeleton(10, 1, 0.0),
    )
    .unwrap();
    // NTU-120 setup: not part of NTU-60.
    std::fs::write(
        dir.join("S018C001P008R001A061.skeleton"),
        synth_skeleton(10, 1, 0.0),
    )
    .unwrap();
    // Corrupt file.
    std::fs::write(dir.join("S001C001P004R001A003.skeleton"), "5\n1\n1 2 3\n").unwrap();
    std::fs::write(dir.join("README.txt"), "not a skeleton").unwrap();
    names.to_vec()
}

#[test]
fn prepare_end_to_end_with_python_readback() {
    let raw = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    tiny_corpus(raw.path());
    let mut cfg = PrepareConfig::new(NtuVersion::Ntu60, raw.path(), out.path());
    cfg.threads = 2;
    let s = prepare::prepare_ntu(&cfg).unwrap();
    assert_eq!(
        (
            s.listed,
            s.missing_list,
            s.other_release,
            s.parsed,
            s.failed.len()
        ),
        (9, 1, 1, 6, 1)
    );
    assert!(
        s.failed[0].reason.contains("S001C001P004R001A003.skeleton")
            && s.failed[0].reason.contains("line 3")
    );
    let text = s.to_string();
    assert!(
        text.contains("xsub/train: 3 samples") && text.contains("xview/val: 2 samples"),
        "{text}"
    );

    let xsub = out.path().join("xsub");
    let (names, labels) = pickle::read_labels(&xsub.join("train_label.pkl")).unwrap();
    assert_eq!(
        names,
        vec![
            "S001C001P001R001A001.skeleton",
            "S001C003P002R002A060.skeleton",
            "S017C003P008R001A013.skeleton"
        ]
    );
    assert_eq!(labels, vec![0, 59, 12]);
    let (shape, data) = npy::read_f32(&xsub.join("train_data.npy")).unwrap();
    assert_eq!(shape, vec![3, 3, 300, 25, 2]);
    let sk = ntu::read_skeleton(&raw.path().join("S001C003P002R002A060.skeleton")).unwrap();
    let mut padded = vec![0f32; 3 * 300 * 50];
    sk.fill_padded(300, &mut padded);
    assert_eq!(&data[45_000..90_000], &padded[..]);
    let (pshape, pos) = npy::read_f32(&xsub.join("train_position.npy")).unwrap();
    assert_eq!(pshape, vec![3, 3, 50, 25, 2]);
    let (expect, _) = preprocess::preprocess_sample(&padded, [3, 300, 25, 2], &Layout::ntu25(), 50);
    assert_eq!(&pos[7_500..15_000], &expect[..]);
    // Only final names in the output folders.
    for b in ["xsub", "xview"] {
        let mut files: Vec<String> = std::fs::read_dir(out.path().join(b))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "train_data.npy",
                "train_label.pkl",
                "train_position.npy",
                "val_data.npy",
                "val_label.pkl",
                "val_position.npy"
            ]
        );
    }
    // The dataset opens (memory-mapped) with our reader...
    let ds = formats::open_generic(
        &xsub.join("val_position.npy"),
        &xsub.join("val_label.pkl"),
        "ntu25",
    )
    .unwrap();
    assert_eq!(ds.shape, [3, 3, 50, 25, 2]);
    // ... and with numpy/pickle.
    let Some(py) = python() else { return };
    let script = "import numpy as np, pickle, sys\n\
        d = sys.argv[1]\n\
        x = np.load(d + '/train_data.npy', mmap_mode='r'); p = np.load(d + '/train_position.npy')\n\
        n, l = pickle.load(open(d + '/train_label.pkl', 'rb'))\n\
        print(x.dtype, x.shape, p.shape, len(n), l, '%.4f' % float(np.abs(x).astype(np.float64).sum()), '%.4f' % float(np.abs(p).astype(np.float64).sum()))";
    let o = std::process::Command::new(py)
        .args(["-c", script])
        .arg(&xsub)
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&o.stdout);
    let abs_sum = |v: &[f32]| v.iter().map(|&a| a.abs() as f64).sum::<f64>();
    let want = format!(
        "float32 (3, 3, 300, 25, 2) (3, 3, 50, 25, 2) 3 [0, 59, 12] {:.4} {:.4}",
        abs_sum(&data),
        abs_sum(&pos)
    );
    assert_eq!(got.trim(), want, "{o:?}");
}

#[test]
fn prepare_cuts_files_longer_than_the_raw_frame_limit() {
    let raw = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let p = raw.path().join("S001C002P001R001A001.skeleton");
    std::fs::write(&p, synth_skeleton(12, 1, 0.0)).unwrap();
    let mut cfg = PrepareConfig::new(NtuVersion::Ntu60, raw.path(), out.path());
    cfg.benchmarks = vec![Benchmark::Xview];
    cfg.max_frames = 10;
    cfg.out_frames = 4;
    let s = prepare::prepare_ntu(&cfg).unwrap();
    assert_eq!(
        s.truncated,
        vec!["S001C002P001R001A001.skeleton".to_string()]
    );
    assert!(
        s.to_string().contains("longer than the raw frame limit"),
        "{s}"
    );
    let (shape, data) = npy::read_f32(&out.path().join("xview/train_data.npy")).unwrap();
    assert_eq!(shape, vec![1, 3, 10, 25, 2]);
    let sk = ntu::read_skeleton(&p).unwrap();
    let mut first10 = vec![0f32; 3 * 10 * 50];
    sk.fill_padded(10, &mut first10);
    assert_eq!(data, first10);
    let (pshape, _) = npy::read_f32(&out.path().join("xview/train_position.npy")).unwrap();
    assert_eq!(pshape, vec![1, 3, 4, 25, 2]);
}

#[test]
fn prepare_fail_mode_leaves_no_output_files() {
    let raw = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    tiny_corpus(raw.path());
    let mut cfg = PrepareConfig::new(NtuVersion::Ntu60, raw.path(), out.path());
    cfg.on_error = OnError::Fail;
    cfg.benchmarks = vec![Benchmark::Xview];
    cfg.threads = 1;
    let e = prepare::prepare_ntu(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("S001C001P004R001A003.skeleton") && e.contains("line 3"),
        "{e}"
    );
    let left: Vec<_> = std::fs::read_dir(out.path().join("xview"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    cfg.benchmarks = vec![Benchmark::Xset];
    assert!(prepare::prepare_ntu(&cfg)
        .unwrap_err()
        .to_string()
        .contains("not defined for ntu60"));
}

// ---------------------------------------------------------------- MSR Action3D

#[test]
fn msr_cross_subject_split_on_real_data() {
    let dir = shared().join("data/msr-action3d/real_world_coordinates");
    if !dir.exists() {
        eprintln!(
            "SKIP msr_cross_subject_split_on_real_data: {} is absent",
            dir.display()
        );
        return;
    }
    let (train, test) = msr::msr_cross_subject(&dir, 50).unwrap();
    assert_eq!((train.len(), test.len()), (284, 273));
    assert_eq!(train.shape, [284, 3, 50, 20, 1]);
    assert_eq!(
        (train.num_classes, train.layout.name.as_str()),
        (20, "msr20")
    );
    assert!(train
        .names
        .iter()
        .all(|n| MSR_ODD.iter().any(|s| n.contains(s))));
    let layout = Layout::msr20();
    for i in [0, 100, 283] {
        let s = train.sample(i);
        for t in 0..50 {
            assert_eq!(s[(t * 20) + layout.center], 0.0);
            let dx = s[t * 20 + layout.shoulders.1] - s[t * 20 + layout.shoulders.0];
            assert!(dx > 0.0, "sample {i} frame {t}: shoulders not on +x");
        }
    }
    let spec = DatasetSpec {
        format: DatasetFormat::Msr,
        data: dir,
        label: None,
        layout: "msr20".into(),
        part: Some("test".into()),
        mmap: false,
    };
    assert_eq!(formats::open(&spec).unwrap().len(), 273);
    // `prepare msr` writes the generic format, readable with layout msr20.
    let out = tempfile::tempdir().unwrap();
    assert_eq!(
        msr::prepare_msr(&spec.data, out.path(), 50).unwrap(),
        (284, 273)
    );
    let ds = formats::open_generic(
        &out.path().join("val_position.npy"),
        &out.path().join("val_label.pkl"),
        "msr20",
    )
    .unwrap();
    assert_eq!((ds.shape, ds.num_classes), ([273, 3, 50, 20, 1], 20));
    assert_eq!(ds.sample(5), test.sample(5));
}

#[test]
fn inspect_describes_files_and_folders() {
    let raw = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    tiny_corpus(raw.path());
    let mut cfg = PrepareConfig::new(NtuVersion::Ntu60, raw.path(), out.path());
    cfg.benchmarks = vec![Benchmark::Xsub];
    prepare::prepare_ntu(&cfg).unwrap();
    let xsub = out.path().join("xsub");
    let r = formats::inspect::inspect(&xsub.join("train_position.npy"), None).unwrap();
    assert!(
        r.contains("float32 [3, 3, 50, 25, 2]") && r.contains("channel 2"),
        "{r}"
    );
    // Two of the three training samples have one body: 2 all-zero bodies of 6.
    assert!(r.contains("all-zero bodies: 2 of 6"), "{r}");
    let r = formats::inspect::inspect(&xsub.join("train_label.pkl"), None).unwrap();
    assert!(r.contains("3 samples") && r.contains("60 classes"), "{r}");
    let r = formats::inspect::inspect(out.path(), None).unwrap();
    assert!(r.contains("dataset ok: [3, 3, 300, 25, 2]"), "{r}");
    let r = formats::inspect::inspect(&fixture("three_bodies.skeleton"), None).unwrap();
    assert!(r.contains("2 frames, up to 3 bodies"), "{r}");
    let e = formats::inspect::inspect(&fixture("nan.skeleton"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 10"), "{e}");
}

const MSR_ODD: [&str; 5] = ["_s01_", "_s03_", "_s05_", "_s07_", "_s09_"];
