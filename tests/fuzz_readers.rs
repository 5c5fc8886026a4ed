//! Bounded, deterministic mutation fuzz of every reader of outside bytes (stable toolchain; the
//! deep runs are the `cargo fuzz` targets under `fuzz/`).
//!
//! For each target of [`crossclr::fuzz::TARGETS`], seeds (built in memory, the test fixtures,
//! and — when present — a few real files of `../shared/data`) are mutated a fixed number of
//! times ([`ITERS`] per seed; `CROSSCLR_FUZZ_ITERS` and `CROSSCLR_FUZZ_SEED` override) by a
//! seeded mutator. Property on
//! every input: the reader returns `Ok` or an `Err` naming the file; it never panics (caught
//! with `catch_unwind`), never hangs (a watchdog aborts with the input's id after 60 s) and never
//! asks the allocator for more than [`ALLOC_LIMIT`] bytes at once (a guard allocator aborts with
//! a message: that is how an allocation sized by an untrusted header shows up).
//!
//! Every input that once broke the property is kept under `tests/fixtures/fuzz/<target>/` and
//! replayed by `fuzz_regressions`.
use crossclr::fuzz::{run_on_file, run_target, seeds, Mutator, TARGETS};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// No single allocation of a reader may exceed this (inputs are at most a few MB).
const ALLOC_LIMIT: usize = 1 << 30;

/// Mutants per seed (per target there are 1 to 12 seeds).
const ITERS: usize = 500;

/// One input may take at most this long (a reader that is this slow on a small file is a hang
/// waiting for a bigger one).
const SLOW: Duration = Duration::from_secs(2);

static INPUT_ID: AtomicU64 = AtomicU64::new(0);

struct Guard;

unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_LIMIT {
            report_big(layout.size());
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_LIMIT {
            report_big(layout.size());
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOC_LIMIT {
            report_big(new_size);
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

/// Writes the offending input id to stderr without allocating.
fn report_big(size: usize) {
    use std::io::Write;
    let mut buf = [0u8; 160];
    let mut c = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(
        c,
        "\nFUZZ FINDING: allocation of {size} bytes (input id {:#x}, see CROSSCLR_FUZZ_KEEP)\n",
        INPUT_ID.load(Ordering::Relaxed)
    );
    let n = c.position() as usize;
    let _ = std::io::stderr().write_all(&buf[..n]);
}

#[global_allocator]
static GLOBAL: Guard = Guard;

fn iters() -> usize {
    std::env::var("CROSSCLR_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(ITERS)
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Files of `dir` with extension `ext` (sorted), at most `max`.
fn files(dir: &Path, ext: &str, max: usize) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == ext))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v.truncate(max);
    v
}

/// Seeds from the repository fixtures and, when present, `../shared/data` (small files only).
fn file_seeds(target: &str) -> Vec<Vec<u8>> {
    let fx = fixtures();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shared = root.join("../shared/data");
    let mut paths: Vec<PathBuf> = match target {
        "skeleton" => files(&fx.join("ntu"), "skeleton", 16),
        "npy" => vec![fx.join("official/stgcn_official_seed0_input.npy")],
        "npz" => vec![fx.join("step_parity/skeletonclr.npz")],
        "pyskl" => files(&fx.join("generic"), "pkl", 4),
        "config_yaml" => {
            let mut v = files(&root.join("configs/small"), "yaml", 4);
            v.extend(files(&root.join("configs/crossclr"), "yaml", 2));
            v
        }
        _ => Vec::new(),
    };
    match target {
        "skeleton" => paths.extend(files(&shared.join("ntu/samples"), "skeleton", 3)),
        "msr" => paths.extend(files(
            &shared.join("msr-action3d/real_world_coordinates"),
            "txt",
            2,
        )),
        _ => {}
    }
    paths
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .filter(|b| b.len() <= 1 << 20)
        .collect()
}

/// Runs one input under catch_unwind; `Err(description)` when the property is broken.
fn check(target: &str, bytes: &[u8], dir: &Path) -> Result<bool, String> {
    let r = std::panic::catch_unwind(|| run_target(target, bytes, dir));
    let path = crossclr::fuzz::input_path(target, dir);
    match r {
        Ok(Ok(())) => Ok(true),
        Ok(Err(e)) => {
            let msg = e.to_string();
            if crossclr::fuzz::names_file(&msg, &path) {
                Ok(false)
            } else {
                Err(format!("error does not name the file: {msg}"))
            }
        }
        Err(p) => {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("panic: {what}"))
        }
    }
}

/// A watchdog that aborts the process when one input runs longer than `limit`.
fn watchdog(limit: Duration) -> std::sync::Arc<AtomicBool> {
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let d = std::sync::Arc::clone(&done);
    std::thread::spawn(move || {
        let mut last = (INPUT_ID.load(Ordering::Relaxed), Instant::now());
        while !d.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            let id = INPUT_ID.load(Ordering::Relaxed);
            if id != last.0 {
                last = (id, Instant::now());
            } else if last.1.elapsed() > limit {
                eprintln!("FUZZ FINDING: input id {id:#x} ran over {limit:?} (hang)");
                std::process::abort();
            }
        }
    });
    done
}

#[test]
fn fuzz_every_reader_bounded() {
    // Panics are expected to be caught and reported here, not printed.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let done = watchdog(Duration::from_secs(60));
    let tmp = tempfile::tempdir().unwrap();
    let keep = std::env::var_os("CROSSCLR_FUZZ_KEEP").map(PathBuf::from);
    let n = iters();
    // `CROSSCLR_FUZZ_SEED` picks another deterministic stream (longer runs).
    let base: u64 = std::env::var("CROSSCLR_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xF022);
    let mut findings = Vec::new();
    let mut nfound = 0;
    let mut report = Vec::new();
    let started = Instant::now();
    for (ti, (target, _)) in TARGETS.iter().enumerate() {
        let t0 = Instant::now();
        let mut all = seeds::of(target, tmp.path());
        all.extend(file_seeds(target));
        let (mut execs, mut ok) = (0usize, 0usize);
        for (si, seed) in all.iter().enumerate() {
            // The unmutated seed must be accepted or refused with a clean error.
            let mut m = Mutator::new(base ^ ((ti as u64) << 32) ^ ((si as u64) << 16));
            for i in 0..=n {
                let input = if i == 0 { seed.clone() } else { m.mutate(seed) };
                let id = ((ti as u64) << 48) | ((si as u64) << 32) | i as u64;
                INPUT_ID.store(id, Ordering::Relaxed);
                if let Some(k) = &keep {
                    let _ = std::fs::create_dir_all(k);
                    let _ = std::fs::write(k.join(format!("{target}-{id:x}")), &input);
                }
                execs += 1;
                let t = Instant::now();
                match check(target, &input, tmp.path()) {
                    Ok(accepted) => ok += usize::from(accepted),
                    Err(e) => findings.push(format!("{target} input {id:#x}: {e}")),
                }
                if t.elapsed() > SLOW {
                    findings.push(format!(
                        "{target} input {id:#x}: took {:.1} s ({} bytes)",
                        t.elapsed().as_secs_f64(),
                        input.len()
                    ));
                }
                if findings.len() > nfound {
                    nfound = findings.len();
                    // Kept for a regression fixture.
                    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-findings");
                    let _ = std::fs::create_dir_all(&out);
                    let _ = std::fs::write(out.join(format!("{target}-{id:x}")), &input);
                }
                if let Some(k) = &keep {
                    let _ = std::fs::remove_file(k.join(format!("{target}-{id:x}")));
                }
            }
        }
        report.push(format!(
            "{target}: {} seeds, {execs} inputs, {} refused, {:.1} s",
            all.len(),
            execs - ok,
            t0.elapsed().as_secs_f64()
        ));
    }
    done.store(true, Ordering::Relaxed);
    std::panic::set_hook(hook);
    eprintln!(
        "fuzz ({n} mutants per seed, {:.1} s):\n  {}",
        started.elapsed().as_secs_f64(),
        report.join("\n  ")
    );
    assert!(
        findings.is_empty(),
        "{} findings:\n{}",
        findings.len(),
        findings.join("\n")
    );
}

/// Replays every kept finding: an `Err` naming the file (or `Ok`), no panic.
#[test]
fn fuzz_regressions() {
    let root = fixtures().join("fuzz");
    let tmp = tempfile::tempdir().unwrap();
    let mut n = 0;
    let mut bad = Vec::new();
    for (target, ext) in TARGETS {
        for p in files(&root.join(target), ext, usize::MAX) {
            n += 1;
            let bytes = std::fs::read(&p).unwrap();
            let r = check(target, &bytes, tmp.path());
            if let Err(e) = r.map(|_| ()) {
                bad.push(format!("{}: {e}", p.display()));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    eprintln!("{n} regression inputs replayed");
}

/// The hand-made hostile inputs of the issue: refused before any allocation, naming the file.
#[test]
fn hostile_headers_are_refused_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    // A .npy header claiming 10^12 float32 elements over 16 bytes of data.
    let mut npy =
        crossclr::data::npy::header_bytes(crossclr::data::npy::Dtype::F32, &[1_000_000, 1_000_000]);
    npy.extend_from_slice(&[0u8; 16]);
    let e = run_target("npy", &npy, tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("input_npy.npy") && e.contains("truncated"),
        "{e}"
    );
    let _ = run_on_file;

    let mut bad = Vec::new();
    let mut expect_err = |target: &str, name: &str, bytes: &[u8]| {
        let t = Instant::now();
        match check(target, bytes, tmp.path()) {
            Ok(false) => {}
            Ok(true) => bad.push(format!("{name}: accepted")),
            Err(e) => bad.push(format!("{name}: {e}")),
        }
        if t.elapsed() > SLOW {
            bad.push(format!("{name}: took {:?}", t.elapsed()));
        }
    };
    // Pickle nesting bomb inside a torch.save archive: 100k nested 1-tuples.
    let mut deep = vec![0x80, 2, b')'];
    deep.extend(std::iter::repeat_n(0x85u8, 100_000));
    deep.push(b'.');
    expect_err("torch_pt", "pt nesting bomb", &torch_pt_with(&deep));
    // Pickle "billion laughs": a list memoized and duplicated 64 times over.
    let mut laughs = vec![0x80, 2, b']', b'q', 0];
    for _ in 0..64 {
        laughs.extend_from_slice(&[b'h', 0, b'h', 0, 0x86, b'q', 0]);
    }
    laughs.push(b'.');
    expect_err("torch_pt", "pt billion laughs", &torch_pt_with(&laughs));
    // The same against the label reader (serde-pickle).
    expect_err("labels", "labels nesting bomb", &deep);
    expect_err("labels", "labels billion laughs", &laughs);
    let mut deep_list = vec![0x80, 3];
    deep_list.extend(std::iter::repeat_n(b']', 100_000));
    deep_list.extend(std::iter::repeat_n(b'a', 100_000));
    deep_list.push(b'.');
    expect_err("labels", "labels nested lists", &deep_list);
    // The same bombs against the pyskl reader's numpy-aware unpickler (src/data/pyobj.rs).
    expect_err("pyskl", "pyskl nesting bomb", &deep);
    expect_err("pyskl", "pyskl billion laughs", &laughs);
    expect_err("pyskl", "pyskl nested lists", &deep_list);
    // A zip member whose local/central sizes claim 2^40 bytes.
    let mut npz = seeds::npz(false);
    let (cd, member_size_at) = find_central_sizes(&npz);
    for at in member_size_at {
        npz[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        npz[at + 4..at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    }
    let _ = cd;
    expect_err("npz", "npz huge member size", &npz);
    // A zip full of end-of-central-directory signatures (the zip crate tries each one with a
    // forward search: quadratic; found by the long fuzz run).
    let mut eocds = seeds::npz(false);
    let tail = eocds.split_off(eocds.len() - 22);
    for _ in 0..200_000 {
        eocds.extend_from_slice(b"PK\x05\x06");
    }
    eocds.extend_from_slice(&tail[..tail.len() - 1]);
    expect_err("npz", "npz with 200k end records", &eocds);
    expect_err("torch_pt", "pt with 200k end records", &eocds);
    // YAML alias bomb.
    let mut y = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let p = i - 1;
        y.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    expect_err("config_yaml", "yaml alias bomb", y.as_bytes());
    expect_err("layout_yaml", "layout alias bomb", y.as_bytes());
    // A layout with 200k joints (an adjacency of V^2 would be 40e9 cells).
    let mut l = String::from("name = \"x\"\njoints = [");
    for i in 0..200_000 {
        l.push_str(&format!("\"j{i}\","));
    }
    l.push_str("]\nedges = [[1, 2]]\ncenter = 1\nshoulders = [1, 2]\n");
    let t = Instant::now();
    let r = check("layout_toml", l.as_bytes(), tmp.path());
    assert!(r.is_ok(), "{r:?}");
    assert!(t.elapsed() < SLOW * 5, "huge layout took {:?}", t.elapsed());
    // A safetensors header claiming a 2^62-byte header length.
    let mut st = seeds::safetensors(tmp.path());
    st[..8].copy_from_slice(&(1u64 << 62).to_le_bytes());
    expect_err("safetensors", "safetensors huge header", &st);
    // Deeply nested JSON in a checkpoint sidecar.
    let j = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    expect_err("checkpoint_json", "json nesting", j.as_bytes());
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// A torch.save archive around pickle program `pkl`.
fn torch_pt_with(pkl: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let o = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", o).unwrap();
        z.write_all(pkl).unwrap();
        z.finish().unwrap();
    }
    buf.into_inner()
}

/// Offsets of the (compressed, uncompressed) size fields of every central-directory entry and
/// local header of a zip.
fn find_central_sizes(z: &[u8]) -> (usize, Vec<usize>) {
    let mut out = Vec::new();
    let mut n = 0;
    for i in 0..z.len().saturating_sub(4) {
        if &z[i..i + 4] == b"PK\x01\x02" {
            out.push(i + 20);
            n += 1;
        } else if &z[i..i + 4] == b"PK\x03\x04" {
            out.push(i + 18);
        }
    }
    (n, out)
}

/// Writes the built-in seeds to `$CROSSCLR_FUZZ_SEEDS_OUT/<target>/` (for the cargo-fuzz
/// corpora; see fuzz/seed_corpus.sh).
#[test]
#[ignore]
fn write_seed_corpus() {
    let Some(out) = std::env::var_os("CROSSCLR_FUZZ_SEEDS_OUT") else {
        eprintln!("CROSSCLR_FUZZ_SEEDS_OUT not set: nothing written");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    for (target, _) in TARGETS {
        let dir = Path::new(&out).join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds::of(target, tmp.path()).iter().enumerate() {
            std::fs::write(dir.join(format!("seed{i}")), s).unwrap();
        }
    }
}
