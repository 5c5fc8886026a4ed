//! `prepare generic` and its readers (issue 15): pyskl pickles (fixtures written by
//! scripts/make_generic_fixtures.py with Python's own pickle), NW-UCLA JSON, PKU-MMD text and
//! Kinetics-skeleton JSON (written here from the formats' descriptions), the preprocessing
//! against an independent numpy implementation, the error cases, and for every reader the whole
//! path fixture -> prepare -> pretrain (one short epoch) -> knn through the CLI on the CPU.
use crossclr::data::generic::{prepare_generic, Format, GenericConfig, Normalize};
use crossclr::data::prepare::OnError;
use crossclr::data::{npy, pickle};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/generic")
        .join(name)
}

fn cfg(format: Format, input: &Path, out: &Path) -> GenericConfig {
    let mut c = GenericConfig::new(format, input, out);
    c.frames = 20;
    c.threads = 2;
    c
}

fn read_toml(dir: &Path) -> toml::Value {
    toml::from_str(&std::fs::read_to_string(dir.join("dataset.toml")).unwrap()).unwrap()
}

fn files_of(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn pyskl_2d_matches_an_independent_numpy_implementation() {
    let out = tempfile::tempdir().unwrap();
    let mut c = cfg(Format::Pyskl, &fixture("pyskl_2d_coco.pkl"), out.path());
    c.layout = Some("coco17".into());
    c.split = Some("xsub".into());
    let s = prepare_generic(&c).unwrap();
    assert_eq!((s.listed, s.written, s.failed.len()), (18, 18, 0), "{s}");
    let (shape, got) = npy::read_f32(&out.path().join("train_position.npy")).unwrap();
    assert_eq!(shape, vec![12, 2, 20, 17, 2]);
    let (eshape, want) = npy::read_f32(&fixture("pyskl_2d_expected_xsub_train.npy")).unwrap();
    assert_eq!(shape, eshape);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "max abs difference {worst}");
    let (names, labels) = pickle::read_labels(&out.path().join("train_label.pkl")).unwrap();
    assert_eq!(names[0], "S000");
    assert_eq!(names.len(), 12);
    assert_eq!(labels[..5], [0, 1, 2, 0, 0]);
    let (vnames, _) = pickle::read_labels(&out.path().join("val_label.pkl")).unwrap();
    assert_eq!(vnames[..3], ["S004", "S005", "S010"]);
    let t = read_toml(out.path());
    assert_eq!(t["layout"].as_str(), Some("coco17"));
    assert_eq!(t["channels"].as_integer(), Some(2));
    assert_eq!(t["num_classes"].as_integer(), Some(3));
    assert_eq!(
        files_of(out.path()),
        [
            "dataset.toml",
            "train_label.pkl",
            "train_position.npy",
            "val_label.pkl",
            "val_position.npy"
        ]
    );
    // inspect checks the folder with the layout of its dataset.toml.
    let d = crossclr::data::formats::inspect::inspect(out.path(), None).unwrap();
    assert!(
        d.contains("dataset ok: [12, 2, 20, 17, 2], 3 classes, layout coco17"),
        "{d}"
    );
    // The same data through the evaluation reader: the generic npy + pkl + layout.
    let ds = crossclr::data::formats::open_generic(
        &out.path().join("val_position.npy"),
        &out.path().join("val_label.pkl"),
        "coco17",
    )
    .unwrap();
    assert_eq!(ds.shape, [6, 2, 20, 17, 2]);
}

#[test]
fn pyskl_split_choice_score_channel_and_minmax() {
    let out = tempfile::tempdir().unwrap();
    let mut c = cfg(Format::Pyskl, &fixture("pyskl_2d_coco.pkl"), out.path());
    c.layout = Some("coco17".into());
    // Two benchmarks in the pickle: the split must be chosen.
    let e = prepare_generic(&c).unwrap_err().to_string();
    assert!(e.contains("--split") && e.contains("xview_train"), "{e}");
    c.split = Some("xview_train,xview_val".into());
    c.score_channel = true;
    c.normalize = Normalize::MinMax;
    let s = prepare_generic(&c).unwrap();
    assert_eq!(s.parts[0].shape, [12, 3, 20, 17, 2], "{s}");
    let (_, x) = npy::read_f32(&out.path().join("train_position.npy")).unwrap();
    let sample = 3 * 20 * 17 * 2;
    let plane = 20 * 17 * 2;
    for i in 0..12 {
        let s = &x[i * sample..(i + 1) * sample];
        // Coordinates in [-1, 1] reaching both ends; scores (float16 in [0.2, 1]) untouched.
        for c in 0..2 {
            let ch = &s[c * plane..(c + 1) * plane];
            let hi = ch.iter().cloned().fold(f32::MIN, f32::max);
            let lo = ch.iter().cloned().fold(f32::MAX, f32::min);
            assert!(
                (hi - 1.0).abs() < 1e-5 && (lo + 1.0).abs() < 1e-5,
                "{i} {c}"
            );
        }
        let body0_scores: Vec<f32> = (0..20 * 17).map(|k| s[2 * plane + k * 2]).collect();
        assert!(body0_scores.iter().all(|&v| (0.19..=1.0).contains(&v)));
    }
    // 3D pickles have no score channel to keep.
    let mut c3 = cfg(Format::Pyskl, &fixture("pyskl_3d_ntu.pkl"), out.path());
    c3.layout = Some("ntu25".into());
    c3.score_channel = true;
    let e = prepare_generic(&c3).unwrap_err().to_string();
    assert!(e.contains("--score-channel"), "{e}");
}

#[test]
fn pyskl_3d_is_centred_and_rotated() {
    let out = tempfile::tempdir().unwrap();
    let mut c = cfg(Format::Pyskl, &fixture("pyskl_3d_ntu.pkl"), out.path());
    c.layout = Some("ntu25".into());
    c.bodies = 1;
    let s = prepare_generic(&c).unwrap();
    assert_eq!(s.parts[0].shape, [12, 3, 20, 25, 1], "{s}");
    let (_, x) = npy::read_f32(&out.path().join("train_position.npy")).unwrap();
    let layout = crossclr::data::Layout::ntu25();
    let at = |i: usize, c: usize, t: usize, v: usize| x[((i * 3 + c) * 20 + t) * 25 + v];
    let mut aligned = 0;
    for i in 0..12 {
        for t in 0..20 {
            for c in 0..3 {
                assert_eq!(at(i, c, t, layout.center), 0.0, "centre joint");
            }
            let (l, r) = layout.shoulders;
            let dz = at(i, 2, t, r) - at(i, 2, t, l);
            let dx = at(i, 0, t, r) - at(i, 0, t, l);
            // Up to the official angle's float32 arccos and its +1e-4 in the norm; frames whose
            // shoulder z-difference has the other sign than the sequence's sum turn the wrong
            // way (the official single sign per body).
            if dz.abs() < 2e-2 * dx.abs().max(1e-3) {
                aligned += 1;
            }
        }
    }
    assert!(
        aligned > 12 * 20 / 2,
        "{aligned} of 240 frames have the shoulders on x"
    );
    assert_eq!(read_toml(out.path())["coordinates"].as_integer(), Some(3));
}

#[test]
fn pyskl_protocol_5_buffers() {
    let out = tempfile::tempdir().unwrap();
    let mut c = cfg(Format::Pyskl, &fixture("pyskl_p5.pkl"), out.path());
    c.layout = Some("coco17".into());
    let s = prepare_generic(&c).unwrap();
    assert_eq!((s.parts[0].samples, s.parts[1].samples), (1, 1), "{s}");
}

#[test]
fn errors_name_file_sample_and_problem() {
    let out = tempfile::tempdir().unwrap();
    let bad = fixture("pyskl_bad.pkl");
    let mut c = cfg(Format::Pyskl, &bad, out.path());
    c.layout = Some("coco17".into());
    // Skip: each bad sample reported, the good one written.
    let s = prepare_generic(&c).unwrap();
    assert_eq!(s.written, 1, "{s}");
    let text = s.to_string();
    for (sample, problem) in [
        (
            "nan",
            "non-finite keypoint NaN at frame 2, joint 5, body 0, channel 1",
        ),
        ("zero", "zero valid frames"),
        ("nolabel", "no label"),
        ("joints18", "18 joints per body, but layout coco17 has 17"),
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("sample {sample}")))
            .unwrap_or_else(|| panic!("{sample} not reported:\n{text}"));
        assert!(
            line.contains(problem) && line.contains("pyskl_bad.pkl"),
            "{line}"
        );
    }
    // Fail: the first problem is the error, and nothing is left under a final (or .tmp) name.
    let out2 = tempfile::tempdir().unwrap();
    let mut f = cfg(Format::Pyskl, &bad, out2.path());
    f.layout = Some("coco17".into());
    f.on_error = OnError::Fail;
    let e = prepare_generic(&f).unwrap_err().to_string();
    assert!(e.contains("pyskl_bad.pkl") && e.contains("sample "), "{e}");
    assert!(
        files_of(out2.path()).is_empty(),
        "{:?}",
        files_of(out2.path())
    );
    // A file in the wrong format for the reader.
    let mut w = cfg(
        Format::Pyskl,
        &fixture("../ntu/two_bodies.skeleton"),
        out2.path(),
    );
    w.layout = Some("coco17".into());
    let e = prepare_generic(&w).unwrap_err().to_string();
    assert!(
        e.contains("two_bodies.skeleton") && e.contains("not a readable pyskl"),
        "{e}"
    );
    let lbl = out.path().join("train_label.pkl");
    let mut w = cfg(Format::Pyskl, &lbl, out2.path());
    w.layout = Some("coco17".into());
    let e = prepare_generic(&w).unwrap_err().to_string();
    assert!(
        e.contains("train_label.pkl") && e.contains("not a pyskl"),
        "{e}"
    );
    // Joint count vs layout on a whole file.
    let mut j = cfg(Format::Pyskl, &fixture("pyskl_3d_ntu.pkl"), out2.path());
    j.layout = Some("kinect20".into());
    j.on_error = OnError::Fail;
    let e = prepare_generic(&j).unwrap_err().to_string();
    assert!(
        e.contains("25 joints per body, but layout kinect20 has 20"),
        "{e}"
    );
}

// ---------------------------------------------------------------- NW-UCLA JSON (CTR-GCN form)

/// 18 samples: actions 1-3 (labels 1-based in the files), views 1-3.
fn write_ucla(dir: &Path) {
    for i in 0..18 {
        let label = i % 3 + 1;
        let view = i / 6 + 1;
        let name = format!("a{label:02}_s{:02}_e00_v{view:02}", i % 6 + 1);
        let t = 10 + i % 7;
        let frames: Vec<Vec<[f64; 3]>> = (0..t)
            .map(|f| {
                (0..20)
                    .map(|v| {
                        let a = f as f64 * 0.3 * label as f64;
                        [
                            v as f64 * 0.05 + a.sin() * 0.1,
                            v as f64 * 0.1 + 1.0,
                            2.0 + (v % 3) as f64 * 0.02 + a.cos() * 0.05,
                        ]
                    })
                    .collect()
            })
            .collect();
        let json = serde_json::json!({"file_name": name, "skeletons": frames, "label": label});
        std::fs::write(dir.join(format!("{name}.json")), json.to_string()).unwrap();
    }
}

#[test]
fn ucla_json_cross_view_and_errors() {
    let raw = tempfile::tempdir().unwrap();
    write_ucla(raw.path());
    let out = tempfile::tempdir().unwrap();
    let s = prepare_generic(&cfg(Format::UclaJson, raw.path(), out.path())).unwrap();
    assert_eq!((s.parts[0].samples, s.parts[1].samples), (12, 6), "{s}");
    assert_eq!(s.parts[0].shape, [12, 3, 20, 20, 2]);
    let (names, labels) = pickle::read_labels(&out.path().join("val_label.pkl")).unwrap();
    assert!(names.iter().all(|n| n.ends_with("_v03")), "{names:?}");
    // Sorted by name: a01_s01, a01_s04, a02_s02, ...; labels 1-based in the files.
    assert_eq!(labels[..3], [0, 0, 1]);
    assert_eq!(read_toml(out.path())["layout"].as_str(), Some("kinect20"));

    // Missing label, a null (NaN) coordinate, a file that is no UCLA sample.
    std::fs::write(
        raw.path().join("a01_s09_e00_v01.json"),
        r#"{"file_name": "a01_s09_e00_v01", "skeletons": [[[0, 1, 2]]]}"#,
    )
    .unwrap();
    std::fs::write(
        raw.path().join("a01_s09_e01_v01.json"),
        r#"{"skeletons": [[[0, null, 2]]], "label": 1}"#,
    )
    .unwrap();
    std::fs::write(raw.path().join("a01_s09_e02_v01.json"), r#"{"data": []}"#).unwrap();
    let s = prepare_generic(&cfg(Format::UclaJson, raw.path(), out.path())).unwrap();
    let text = s.to_string();
    assert_eq!(s.failed.len(), 3, "{text}");
    assert!(
        text.contains("a01_s09_e00_v01") && text.contains("no label"),
        "{text}"
    );
    assert!(
        text.contains("skeletons[0][0][1]") && text.contains("NaN"),
        "{text}"
    );
    assert!(text.contains("not an NW-UCLA sample"), "{text}");
}

/// A layout file is copied next to the data and named by dataset.toml, so the folder stands alone.
#[test]
fn layout_file_travels_with_the_data() {
    let raw = tempfile::tempdir().unwrap();
    write_ucla(raw.path());
    let rig = raw.path().join("rig.toml");
    let joints: Vec<String> = (1..=20).map(|j| format!("\"j{j}\"")).collect();
    let edges: Vec<String> = (1..20).map(|j| format!("[{j}, {}]", j + 1)).collect();
    std::fs::write(
        &rig,
        format!(
            "name = \"chain20\"\njoints = [{}]\nedges = [{}]\ncenter = 2\nshoulders = [5, 9]\n",
            joints.join(", "),
            edges.join(", ")
        ),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut c = cfg(Format::UclaJson, raw.path(), out.path());
    c.layout = Some(rig.display().to_string());
    c.bodies = 1;
    prepare_generic(&c).unwrap();
    assert_eq!(
        read_toml(out.path())["layout"].as_str(),
        Some("layout.toml")
    );
    assert!(out.path().join("layout.toml").is_file());
    let d = crossclr::data::formats::inspect::inspect(out.path(), None).unwrap();
    assert!(d.contains("layout chain20"), "{d}");
    // Centre joint 2 (1-based) is the origin of every frame.
    let (_, x) = npy::read_f32(&out.path().join("train_position.npy")).unwrap();
    assert!((0..3 * 20).all(|ct| x[ct * 20 + 1] == 0.0));
}

// ---------------------------------------------------------------- PKU-MMD

fn pku_line(f: usize, second_body: bool) -> String {
    let mut vals = Vec::with_capacity(150);
    for m in 0..2 {
        for v in 0..25 {
            for c in 0..3 {
                let x = if m == 1 && !second_body {
                    0.0
                } else {
                    // Joint 0's y also carries the line number (to check the interval cut).
                    let mark = if v == 0 && c == 1 {
                        f as f64 * 0.01
                    } else {
                        0.0
                    };
                    v as f64 * 0.03 + c as f64 + m as f64 + (f as f64 * 0.2).sin() * 0.1 + mark
                };
                vals.push(format!("{x:.5}"));
            }
        }
    }
    vals.join(" ")
}

/// Videos 0002 and 0003 from the three cameras, 3 intervals each (actions 1-3).
fn write_pku(skel: &Path, labels: &Path) {
    for video in ["0002", "0003"] {
        for cam in ["L", "M", "R"] {
            let name = format!("{video}-{cam}");
            let lines: Vec<String> = (0..60).map(|f| pku_line(f, f % 2 == 0)).collect();
            std::fs::write(skel.join(format!("{name}.txt")), lines.join("\n") + "\n").unwrap();
            std::fs::write(
                labels.join(format!("{name}.txt")),
                "1,1,15,1\n2,16,35,2\n3,36,60,1\n",
            )
            .unwrap();
        }
    }
}

#[test]
fn pku_mmd_intervals_views_and_errors() {
    let root = tempfile::tempdir().unwrap();
    let (skel, labels) = (root.path().join("skel"), root.path().join("labels"));
    std::fs::create_dir_all(&skel).unwrap();
    std::fs::create_dir_all(&labels).unwrap();
    write_pku(&skel, &labels);
    let out = tempfile::tempdir().unwrap();
    let mut c = cfg(Format::PkuMmd, &skel, out.path());
    c.labels = Some(labels.clone());
    let s = prepare_generic(&c).unwrap();
    assert_eq!((s.parts[0].samples, s.parts[1].samples), (12, 6), "{s}");
    let (names, l) = pickle::read_labels(&out.path().join("val_label.pkl")).unwrap();
    assert_eq!(names[..3], ["0002-L_1", "0002-L_2", "0002-L_3"]);
    assert_eq!(l[..3], [0, 1, 2]);
    assert_eq!(read_toml(out.path())["layout"].as_str(), Some("pku25"));
    // Interval 1 of 0002-L is lines 1..=15 (1-based, inclusive): with 15 output frames the rows
    // are those lines, centred (y is untouched by the y-rotation): y0 - y20 = -0.6 + 0.01 line.
    let mut c15 = cfg(Format::PkuMmd, &skel, out.path());
    c15.labels = Some(labels.clone());
    c15.frames = 15;
    prepare_generic(&c15).unwrap();
    let (_, x) = npy::read_f32(&out.path().join("val_position.npy")).unwrap();
    for t in 0..15 {
        let y0 = x[((15 + t) * 25) * 2];
        assert!(
            (y0 - (-0.6 + 0.01 * t as f32)).abs() < 1e-4,
            "frame {t}: {y0}"
        );
    }
    // A cross-subject style list file.
    let list = root.path().join("cross-subject.txt");
    std::fs::write(
        &list,
        "Training videos: \n0002-L, 0002-M, 0002-R\nValidataion videos: \n0003-L, 0003-M, 0003-R\n",
    )
    .unwrap();
    c.split_file = Some(list);
    let s = prepare_generic(&c).unwrap();
    assert_eq!((s.parts[0].samples, s.parts[1].samples), (9, 9), "{s}");
    c.split_file = None;
    // Missing label file, wrong values per line, interval past the end.
    std::fs::write(skel.join("0004-M.txt"), pku_line(0, false) + "\n").unwrap();
    std::fs::write(skel.join("0005-M.txt"), "1 2 3\n").unwrap();
    std::fs::write(labels.join("0005-M.txt"), "4,1,1,1\n").unwrap();
    std::fs::write(skel.join("0006-M.txt"), pku_line(0, false) + "\n").unwrap();
    std::fs::write(labels.join("0006-M.txt"), "4,1,9,1\n").unwrap();
    let s = prepare_generic(&c).unwrap();
    let text = s.to_string();
    assert_eq!(s.failed.len(), 3, "{text}");
    assert!(text.contains("0004-M.txt: label file: missing"), "{text}");
    assert!(
        text.contains("0005-M.txt: line 1: 3 values, expected 150"),
        "{text}"
    );
    assert!(text.contains("ends after the 1 frames"), "{text}");
}

// ---------------------------------------------------------------- Kinetics-skeleton

fn kinetics_frame(index: usize, persons: &[(f64, f64)]) -> serde_json::Value {
    // persons: (offset, score)
    let skel: Vec<serde_json::Value> = persons
        .iter()
        .map(|&(off, score)| {
            let pose: Vec<f64> = (0..36)
                .map(|k| off + k as f64 * 0.01 + (index as f64 * 0.2).sin() * 0.02)
                .collect();
            let mut scores = vec![score; 18];
            scores[17] = 0.0; // joint 17 undetected: its x, y become 0
            serde_json::json!({"pose": pose, "score": scores})
        })
        .collect();
    serde_json::json!({"frame_index": index, "skeleton": skel})
}

/// 12 train + 6 val videos, 3 classes; frames numbered from 1; three persons, the second the
/// most confident; one video without skeleton in the label file.
fn write_kinetics(root: &Path) {
    for (part, n) in [("train", 12), ("val", 6)] {
        let dir = root.join(format!("kinetics_{part}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut labels = serde_json::Map::new();
        for i in 0..n {
            let vid = format!("{part}{i:02}");
            let frames: Vec<serde_json::Value> = (1..=15)
                .map(|f| kinetics_frame(f, &[(0.2, 0.5), (0.6, 0.9), (0.4, 0.1)]))
                .collect();
            let json = serde_json::json!({"data": frames, "label": "x", "label_index": i % 3});
            std::fs::write(dir.join(format!("{vid}.json")), json.to_string()).unwrap();
            let name = ["waving", "jumping", "clapping"][i % 3];
            labels.insert(
                vid,
                serde_json::json!({"has_skeleton": true, "label": name, "label_index": i % 3}),
            );
        }
        let extra = format!("{part}_empty");
        std::fs::write(dir.join(format!("{extra}.json")), r#"{"data": []}"#).unwrap();
        labels.insert(
            extra,
            serde_json::json!({"has_skeleton": false, "label_index": 0}),
        );
        std::fs::write(
            root.join(format!("kinetics_{part}_label.json")),
            serde_json::Value::Object(labels).to_string(),
        )
        .unwrap();
    }
}

#[test]
fn kinetics_keeps_the_most_confident_persons() {
    let root = tempfile::tempdir().unwrap();
    write_kinetics(root.path());
    let raw = crossclr::data::readers::kinetics::read_video(
        &root.path().join("kinetics_train/train00.json"),
        2,
        true,
    )
    .unwrap();
    assert_eq!(raw.shape, [3, 15, 18, 2]);
    let at = |c: usize, t: usize, v: usize, m: usize| raw.data[((c * 15 + t) * 18 + v) * 2 + m];
    assert!((at(0, 0, 0, 0) - (0.6 + (0.2f64).sin() * 0.02) as f32).abs() < 1e-6);
    assert!((at(2, 0, 0, 0) - 0.9).abs() < 1e-6 && (at(2, 0, 0, 1) - 0.5).abs() < 1e-6);
    assert_eq!((at(0, 0, 17, 0), at(1, 0, 17, 0)), (0.0, 0.0));
    let out = tempfile::tempdir().unwrap();
    let s = prepare_generic(&cfg(Format::KineticsJson, root.path(), out.path())).unwrap();
    assert_eq!((s.parts[0].samples, s.parts[1].samples), (12, 6), "{s}");
    assert_eq!(s.parts[0].shape, [12, 2, 20, 18, 2]);
    assert_eq!(s.excluded.len(), 2, "{s}");
    assert!(s.to_string().contains("has_skeleton is false"), "{s}");
    assert_eq!(read_toml(out.path())["layout"].as_str(), Some("openpose18"));
    assert_eq!(
        std::fs::read_to_string(out.path().join("classes.txt")).unwrap(),
        "waving\njumping\nclapping\n"
    );
}

// ---------------------------------------------------------------- inspect

#[test]
fn inspect_reports_every_reader_input() {
    use crossclr::data::formats::inspect::inspect;
    let d = inspect(&fixture("pyskl_2d_coco.pkl"), None).unwrap();
    assert!(d.contains("pyskl annotation pickle, 18 annotations"), "{d}");
    assert!(d.contains("xsub_train (12)") && d.contains("C=2"), "{d}");
    let raw = tempfile::tempdir().unwrap();
    write_ucla(raw.path());
    let d = inspect(&raw.path().join("a01_s01_e00_v01.json"), None).unwrap();
    assert!(
        d.contains("NW-UCLA sample") && d.contains("view Some(1)"),
        "{d}"
    );
    let d = inspect(raw.path(), None).unwrap();
    assert!(d.contains("18 .json files"), "{d}");
    let k = tempfile::tempdir().unwrap();
    write_kinetics(k.path());
    let d = inspect(&k.path().join("kinetics_train/train01.json"), None).unwrap();
    assert!(
        d.contains("Kinetics-skeleton video, 15 frames, up to 3 persons"),
        "{d}"
    );
    let d = inspect(&k.path().join("kinetics_train_label.json"), None).unwrap();
    assert!(d.contains("13 videos, 1 without skeleton"), "{d}");
    let p = tempfile::tempdir().unwrap();
    write_pku(p.path(), p.path());
    std::fs::create_dir_all(p.path().join("l")).unwrap();
    write_pku(&p.path().join("l"), &p.path().join("l"));
    let d = inspect(&p.path().join("0002-L.txt"), None).unwrap();
    assert!(d.contains("PKU-MMD label file, 3 action intervals"), "{d}");
    let s = tempfile::tempdir().unwrap();
    let l = tempfile::tempdir().unwrap();
    write_pku(s.path(), l.path());
    let d = inspect(&s.path().join("0002-L.txt"), None).unwrap();
    assert!(d.contains("PKU-MMD skeleton file, 60 frames"), "{d}");
}

// ---------------------------------------------------------------- the whole path, per reader

fn crossclr(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_crossclr"))
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "crossclr {args:?}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// prepare (CLI, as the README's command) -> pretrain (one epoch, tiny SkeletonCLR, config with
/// no layout and no in_channels: both come from the prepared folder) -> knn.
fn whole_path(prepare_args: &[&str], channels: usize) {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let data_s = data.display().to_string();
    let mut args = vec!["prepare", "generic", "--out", &data_s, "--frames", "16"];
    args.extend(prepare_args);
    let p = crossclr(&args);
    assert!(p.contains("written, 0 skipped"), "{p}");
    let run = work.path().join("run");
    let config = work.path().join("tiny.yaml");
    std::fs::write(
        &config,
        format!(
            "work_dir: {run}\nmodel: skeletonclr\nview: joint\ntrain_feeder_args:\n  data_path: {data}/train_position.npy\n  label_path: {data}/train_label.pkl\n  mmap: false\nmodel_args:\n  queue_size: 8\n  hidden_channels: 4\n  hidden_dim: 16\n  feature_dim: 8\nbatch_size: 4\nnum_epoch: 1\ndevice: cpu\nworkers: 1\nsave_interval: 1\nlog_interval: 0\n",
            run = run.display(),
            data = data.display()
        ),
    )
    .unwrap();
    let out = crossclr(&[
        "pretrain",
        "--config",
        &config.display().to_string(),
        "--quiet",
    ]);
    assert!(out.contains("pre-training done: epoch 1"), "{out}");
    assert!(
        out.contains(&format!("in_channels = {channels}")) || channels == 3,
        "{out}"
    );
    let weights = run.join("last.safetensors");
    assert!(weights.exists(), "{out}");
    let eval = work.path().join("knn");
    let k = crossclr(&[
        "knn",
        "--data-dir",
        &data_s,
        "--weights",
        &weights.display().to_string(),
        "--no-tsne",
        "--threads",
        "1",
        "--k",
        "3",
        "--work-dir",
        &eval.display().to_string(),
    ]);
    assert!(
        k.to_lowercase().contains("k=1") || k.contains("top-1"),
        "{k}"
    );
    assert!(eval.join("metrics.json").exists(), "{k}");
}

#[test]
fn whole_path_pyskl_2d() {
    let f = fixture("pyskl_2d_coco.pkl").display().to_string();
    whole_path(
        &[
            "--format", "pyskl", "--raw", &f, "--layout", "coco17", "--split", "xsub",
        ],
        2,
    );
}

#[test]
fn whole_path_pyskl_3d() {
    let f = fixture("pyskl_3d_ntu.pkl").display().to_string();
    whole_path(&["--format", "pyskl", "--raw", &f, "--layout", "ntu25"], 3);
}

#[test]
fn whole_path_ucla_json() {
    let raw = tempfile::tempdir().unwrap();
    write_ucla(raw.path());
    let r = raw.path().display().to_string();
    whole_path(
        &[
            "--format",
            "ucla-json",
            "--raw",
            &r,
            "--bodies",
            "1",
            "--normalize",
            "minmax",
        ],
        3,
    );
}

#[test]
fn whole_path_pku_mmd() {
    let root = tempfile::tempdir().unwrap();
    let (skel, labels) = (root.path().join("skel"), root.path().join("labels"));
    std::fs::create_dir_all(&skel).unwrap();
    std::fs::create_dir_all(&labels).unwrap();
    write_pku(&skel, &labels);
    let (s, l) = (skel.display().to_string(), labels.display().to_string());
    whole_path(&["--format", "pku-mmd", "--raw", &s, "--labels", &l], 3);
}

#[test]
fn whole_path_kinetics_with_scores() {
    let root = tempfile::tempdir().unwrap();
    write_kinetics(root.path());
    let r = root.path().display().to_string();
    whole_path(
        &["--format", "kinetics-json", "--raw", &r, "--score-channel"],
        3,
    );
}

// ---------------------------------------------------------------- real data, when present

/// MSR Action3D (../shared/data, not in the repo) rewritten as NW-UCLA JSON (odd subjects view 1,
/// even subjects view 3), prepared by the generic path with layout msr20, equals `prepare msr`
/// (the official preprocessing) value by value, except the sequences with an empty frame before
/// their last valid one (the generic path drops such frames, the official length rule keeps them
/// and cuts the tail instead).
#[test]
fn real_msr_through_the_json_reader_equals_prepare_msr() {
    use crossclr::data::msr;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/msr-action3d/real_world_coordinates");
    if !dir.exists() {
        eprintln!(
            "SKIP real_msr_through_the_json_reader_equals_prepare_msr: {} is absent",
            dir.display()
        );
        return;
    }
    let json = tempfile::tempdir().unwrap();
    let mut gaps = std::collections::HashSet::new();
    for (path, n) in msr::list_msr_files(&dir, None).unwrap() {
        let (t, data) = msr::read_msr_file(&path).unwrap();
        let hip_zero = |f: usize| (0..3).all(|c| data[(c * t + f) * 20 + 6] == 0.0);
        if let Some(last) = (0..t).rev().find(|&f| !hip_zero(f)) {
            if (0..last).any(hip_zero) {
                gaps.insert(format!("{}_skeleton3D.txt", n.id()));
            }
        }
        let frames: Vec<Vec<[f64; 3]>> = (0..t)
            .map(|f| {
                (0..20)
                    .map(|v| {
                        let at = |c: usize| data[(c * t + f) * 20 + v] as f64;
                        [at(0), at(1), at(2)]
                    })
                    .collect()
            })
            .collect();
        let view = if n.subject % 2 == 1 { 1 } else { 3 };
        let name = format!("{}_v{view:02}", n.id());
        let j = serde_json::json!({"file_name": name, "skeletons": frames, "label": n.action});
        std::fs::write(json.path().join(format!("{name}.json")), j.to_string()).unwrap();
    }
    let a = tempfile::tempdir().unwrap();
    msr::prepare_msr(&dir, a.path(), 50).unwrap();
    let b = tempfile::tempdir().unwrap();
    let mut c = GenericConfig::new(Format::UclaJson, json.path(), b.path());
    c.layout = Some("msr20".into());
    c.bodies = 1;
    let s = prepare_generic(&c).unwrap();
    assert_eq!((s.parts[0].samples, s.parts[1].samples), (284, 273), "{s}");
    let mut compared = 0;
    for part in ["train", "val"] {
        let (sa, xa) = npy::read_f32(&a.path().join(format!("{part}_position.npy"))).unwrap();
        let (sb, xb) = npy::read_f32(&b.path().join(format!("{part}_position.npy"))).unwrap();
        assert_eq!(sa, sb);
        let (names, _) = pickle::read_labels(&a.path().join(format!("{part}_label.pkl"))).unwrap();
        let per = 50 * 20 * 3;
        let differ: Vec<&String> = (0..sa[0])
            .filter(|&i| xa[i * per..(i + 1) * per] != xb[i * per..(i + 1) * per])
            .map(|i| &names[i])
            .collect();
        assert!(
            differ.iter().all(|n| gaps.contains(*n)),
            "{part}: {differ:?} differ, sequences with gaps: {gaps:?}"
        );
        compared += sa[0] - differ.len();
        let (_, la) = pickle::read_labels(&a.path().join(format!("{part}_label.pkl"))).unwrap();
        let (_, lb) = pickle::read_labels(&b.path().join(format!("{part}_label.pkl"))).unwrap();
        assert_eq!(la, lb);
    }
    assert_eq!(compared + gaps.len(), 557, "{gaps:?}");
}
