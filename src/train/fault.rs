//! Crash points for the fault-injection tests (tests/kill_resume.rs): with
//! `CROSSCLR_CRASH_AT=<point>:<n>` in the environment, the process aborts (no destructor, no
//! flush: as abrupt as `kill -9`) the n-th time it reaches `<point>`. Without the variable a
//! point costs one relaxed atomic load. Points: `atomic.tmp_synced` (an atomic write's temp file
//! is complete, not yet renamed: metrics, config, checkpoint JSON), `ckpt.tmp_written` (a
//! checkpoint tensor file is complete under its temp name), `ckpt.committed` (the checkpoint
//! JSON is renamed into place, the tensor files not yet), `ckpt.weights_renamed` (between the
//! two tensor renames).
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

static HITS: AtomicUsize = AtomicUsize::new(0);

fn target() -> &'static Option<(String, usize)> {
    static T: OnceLock<Option<(String, usize)>> = OnceLock::new();
    T.get_or_init(|| {
        let v = std::env::var("CROSSCLR_CRASH_AT").ok()?;
        let (p, n) = v.rsplit_once(':')?;
        Some((p.to_string(), n.parse().ok()?))
    })
}

/// A crash point named `name` (see the module doc).
pub fn point(name: &str) {
    if let Some((p, n)) = target() {
        if p == name && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *n {
            eprintln!("CROSSCLR_CRASH_AT: aborting at {name} (hit {n})");
            std::process::abort();
        }
    }
}
