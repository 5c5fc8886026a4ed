//! Crash points for the fault-injection tests (tests/kill_resume.rs): armed with [`arm`] (the
//! binary's hidden `--crash-at <point>:<n>` option; nothing else arms them), the process aborts
//! (no destructor, no flush: as abrupt as `kill -9`) the n-th time it reaches `<point>`. Unarmed,
//! a point costs one atomic load. Points: `atomic.tmp_synced` (an atomic write's temp file is
//! complete, not yet renamed: metrics, config, checkpoint JSON), `ckpt.tmp_written` (a checkpoint
//! tensor file is complete under its temp name), `ckpt.committed` (the checkpoint JSON is renamed
//! into place, the tensor files not yet), `ckpt.weights_renamed` (between the two tensor renames).
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

static HITS: AtomicUsize = AtomicUsize::new(0);
static TARGET: OnceLock<(String, usize)> = OnceLock::new();

/// Arms the crash point `spec` = `<point>:<n>` for the rest of the process (once).
pub fn arm(spec: &str) -> Result<()> {
    let parsed = spec
        .rsplit_once(':')
        .and_then(|(p, n)| Some((p.to_string(), n.parse::<usize>().ok()?)))
        .ok_or_else(|| Error::config(format!("--crash-at {spec:?}: expected <point>:<n>")))?;
    TARGET
        .set(parsed)
        .map_err(|_| Error::config("--crash-at: a crash point is already armed"))
}

/// A crash point named `name` (see the module doc).
pub fn point(name: &str) {
    if let Some((p, n)) = TARGET.get() {
        if p == name && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *n {
            eprintln!("--crash-at: aborting at {name} (hit {n})");
            std::process::abort();
        }
    }
}
