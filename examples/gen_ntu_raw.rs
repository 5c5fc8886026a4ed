//! Generates an NTU-60-shaped raw corpus for testing and timing `crossclr prepare`: the real file
//! names (the 56,578 usable names of `ntu60/skes_available_name.txt` from the NTU metadata plus the
//! 302 names of the official missing-skeleton list = 56,880 files), in the NTU `.skeleton` text
//! format, with synthetic motion: 40-300 frames (skewed towards short, mean about 105), one body
//! (two for the interaction classes A050-A060), a few files with empty frames or a third body.
//!
//! ```text
//! cargo run --release --example gen_ntu_raw -- <out_dir> [--metadata <ntu metadata dir>]
//!     [--every K] [--limit N] [--seed S]
//! ```
//! `--every K` keeps every K-th name (sorted), which keeps the split proportions; `--limit N` stops
//! after N files. Full size is about 19 GB of text; see docs/prepare-benchmark.md.
use crossclr::data::ntu;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Rough standing pose (metres, camera space, person ~3 m in front of the sensor), NTU joint order.
const TEMPLATE: [[f32; 3]; 25] = [
    [0.00, 0.00, 0.00],    // 1 spine base
    [0.00, 0.27, -0.02],   // 2 spine mid
    [0.00, 0.52, -0.04],   // 3 neck
    [0.00, 0.63, -0.04],   // 4 head
    [-0.17, 0.45, -0.03],  // 5 left shoulder
    [-0.22, 0.20, -0.02],  // 6 left elbow
    [-0.24, -0.02, -0.05], // 7 left wrist
    [-0.24, -0.08, -0.06], // 8 left hand
    [0.17, 0.45, -0.03],   // 9 right shoulder
    [0.22, 0.20, -0.02],   // 10 right elbow
    [0.24, -0.02, -0.05],  // 11 right wrist
    [0.24, -0.08, -0.06],  // 12 right hand
    [-0.08, -0.02, 0.00],  // 13 left hip
    [-0.09, -0.42, 0.02],  // 14 left knee
    [-0.09, -0.80, 0.06],  // 15 left ankle
    [-0.09, -0.86, 0.00],  // 16 left foot
    [0.08, -0.02, 0.00],   // 17 right hip
    [0.09, -0.42, 0.02],   // 18 right knee
    [0.09, -0.80, 0.06],   // 19 right ankle
    [0.09, -0.86, 0.00],   // 20 right foot
    [0.00, 0.46, -0.03],   // 21 spine shoulder
    [-0.24, -0.15, -0.07], // 22 left hand tip
    [-0.21, -0.08, -0.08], // 23 left thumb
    [0.24, -0.15, -0.07],  // 24 right hand tip
    [0.21, -0.08, -0.08],  // 25 right thumb
];
/// Arm joints moved by the synthetic "action" (elbow to thumb, both sides).
const ARM_JOINTS: [usize; 14] = [5, 6, 7, 9, 10, 11, 21, 22, 23, 24, 4, 8, 13, 17];
const MIN_FRAMES: usize = 40;
const MAX_FRAMES: usize = 300;
/// First interaction (two-person) class of NTU-60.
const FIRST_MUTUAL_ACTION: u32 = 50;

struct Args {
    out: PathBuf,
    metadata: PathBuf,
    every: usize,
    limit: usize,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut out = None;
    let mut args = Args {
        out: PathBuf::new(),
        metadata: Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/ntu/metadata"),
        every: 1,
        limit: usize::MAX,
        seed: 0,
    };
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--metadata" => args.metadata = PathBuf::from(val("--metadata")?),
            "--every" => {
                args.every = val("--every")?
                    .parse()
                    .map_err(|e| format!("--every: {e}"))?
            }
            "--limit" => {
                args.limit = val("--limit")?
                    .parse()
                    .map_err(|e| format!("--limit: {e}"))?
            }
            "--seed" => args.seed = val("--seed")?.parse().map_err(|e| format!("--seed: {e}"))?,
            s if !s.starts_with("--") && out.is_none() => out = Some(PathBuf::from(s)),
            s => return Err(format!("unknown argument {s}")),
        }
    }
    args.out = out.ok_or(
        "usage: gen_ntu_raw <out_dir> [--metadata DIR] [--every K] [--limit N] [--seed S]",
    )?;
    args.every = args.every.max(1);
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let list = args.metadata.join("ntu60/skes_available_name.txt");
    let text = match std::fs::read_to_string(&list) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "error: {}: {e} (pass --metadata <dir with ntu60/skes_available_name.txt>)",
                list.display()
            );
            std::process::exit(1);
        }
    };
    let mut names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    names.extend(ntu::missing_ids(ntu::NTU60_MISSING_LIST));
    names.sort();
    names.dedup();
    let chosen: Vec<(usize, String)> = names
        .into_iter()
        .enumerate()
        .step_by(args.every)
        .take(args.limit)
        .collect();
    std::fs::create_dir_all(&args.out).expect("create the output folder");
    let bytes: u64 = chosen
        .par_iter()
        .map(|(i, name)| {
            let mut rng = ChaCha8Rng::seed_from_u64(
                args.seed.wrapping_mul(1_000_003).wrapping_add(*i as u64),
            );
            let action = ntu::NtuName::parse_id(name).map(|n| n.action).unwrap_or(1);
            let text = synth_file(&mut rng, action);
            let path = args.out.join(format!("{name}.skeleton"));
            let mut f =
                std::io::BufWriter::new(std::fs::File::create(&path).expect("create a file"));
            f.write_all(text.as_bytes()).expect("write a file");
            text.len() as u64
        })
        .sum();
    println!(
        "wrote {} files, {:.2} GB, to {}",
        chosen.len(),
        bytes as f64 / 1e9,
        args.out.display()
    );
}

/// One file's text.
fn synth_file(rng: &mut ChaCha8Rng, action: u32) -> String {
    let u: f64 = rng.gen();
    let frames = MIN_FRAMES + ((MAX_FRAMES - MIN_FRAMES) as f64 * u * u * u).round() as usize;
    let bodies = if action >= FIRST_MUTUAL_ACTION { 2 } else { 1 };
    // Some files start with frames where nobody is detected, some have a third body for a while.
    let empty_lead = if rng.gen_bool(0.03) {
        rng.gen_range(1..6)
    } else {
        0
    };
    let third_body = if rng.gen_bool(0.01) {
        Some(rng.gen_range(0..frames))
    } else {
        None
    };
    let speed = rng.gen_range(0.05f32..0.25) * (1.0 + action as f32 / 60.0);
    let phase: f32 = rng.gen_range(0.0..std::f32::consts::TAU);
    let mut s = String::with_capacity(frames * bodies * 25 * 110 + 64);
    s.push_str(&format!("{frames}\n"));
    let mut bases: Vec<([f32; 3], f32, u64)> = (0..3)
        .map(|m| {
            (
                [
                    rng.gen_range(-0.6..0.6) + 0.7 * m as f32,
                    rng.gen_range(-0.2..0.2),
                    rng.gen_range(2.5..4.0),
                ],
                rng.gen_range(-0.6f32..0.6),
                72057594037927936 + rng.gen_range(0..100_000u64),
            )
        })
        .collect();
    for t in 0..frames {
        let present = if t < empty_lead {
            0
        } else if third_body.is_some_and(|b| t >= b && t < b + 10) {
            3
        } else {
            bodies
        };
        s.push_str(&format!("{present}\n"));
        for (m, base) in bases.iter_mut().enumerate().take(present) {
            base.0[0] += rng.gen_range(-0.002..0.002);
            base.1 += rng.gen_range(-0.003..0.003);
            let (origin, yaw, id) = (base.0, base.1, base.2);
            s.push_str(&format!(
                "{id} 0 1 1 1 1 0 {:.7} {:.7} 2\n25\n",
                rng.gen_range(-0.1f32..0.1),
                rng.gen_range(-0.1f32..0.1)
            ));
            let swing = ((t as f32) * speed + phase + m as f32).sin();
            for (v, p) in TEMPLATE.iter().enumerate() {
                let mut q = *p;
                if ARM_JOINTS.contains(&v) {
                    q[1] += 0.15 * swing * (1.0 + (v % 4) as f32 * 0.2);
                    q[2] -= 0.10 * swing;
                }
                let (sy, cy) = yaw.sin_cos();
                let x = origin[0] + cy * q[0] + sy * q[2] + rng.gen_range(-0.004..0.004);
                let y = origin[1] + q[1] + rng.gen_range(-0.004..0.004);
                let z = origin[2] - sy * q[0] + cy * q[2] + rng.gen_range(-0.004..0.004);
                // depth/colour pixel coordinates from a pinhole model, orientation, tracking state
                let (dx, dy) = (256.0 + 365.0 * x / z, 212.0 - 365.0 * y / z);
                let (cx, cyy) = (960.0 + 1060.0 * x / z, 540.0 - 1060.0 * y / z);
                let state = if rng.gen_bool(0.05) { 1 } else { 2 };
                s.push_str(&format!(
                    "{x:.7} {y:.7} {z:.6} {dx:.4} {dy:.4} {cx:.3} {cyy:.3} {:.7} {:.7} {:.7} {:.7} {state}\n",
                    cy * 0.9,
                    0.05,
                    sy * 0.9,
                    -0.1
                ));
            }
        }
    }
    s
}
