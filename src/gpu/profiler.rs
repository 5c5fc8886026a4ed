//! Profiling of training steps with libtorch's Kineto profiler (csrc/profiler.cpp): which ATen ops
//! and which CUDA kernels a step spends its time in (`crossclr bench --profile`).
//!
//! ```no_run
//! # fn step() {}
//! use crossclr::gpu::profiler::Profiler;
//! let prof = Profiler::start(tch::Cuda::is_available())?;
//! for _ in 0..10 {
//!     step();
//! }
//! let summary = prof.stop(Some(std::path::Path::new("trace.json")))?;
//! print!("{}", summary.table(30, 10));
//! # Ok::<(), crossclr::error::Error>(())
//! ```
//!
//! One session at a time per process, started and stopped on the same thread ([`Profiler`] is not
//! `Send`). CPU ops run by autograd's worker threads (the backward pass on CUDA) are recorded too:
//! they inherit the profiler state. With `cuda`, kernels, copies and memsets come from CUPTI
//! (`libcupti`, which libtorch_cuda links); if CUPTI cannot trace (no permission, driver mismatch)
//! the session still works but records no device events, and [`ProfileSummary::table`] says so.
#![cfg_attr(crossclr_no_shim, allow(unused_imports, dead_code))]
use super::ffi;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::ffi::{c_char, c_int};
use std::marker::PhantomData;
use std::path::Path;

#[cfg(not(crossclr_no_shim))]
extern "C" {
    fn crossclr_profiler_active() -> c_int;
    fn crossclr_profiler_start(cuda: c_int, err: *mut *mut c_char) -> c_int;
    fn crossclr_profiler_stop(
        trace_path: *const c_char,
        table: *mut *mut c_char,
        err: *mut *mut c_char,
    ) -> c_int;
}

/// Width of the shortened kernel names in [`ProfileSummary::table`] (full names stay in the JSON).
const TABLE_NAME_WIDTH: usize = 100;

/// A running profiling session. Stop it with [`Profiler::stop`]; dropping it stops it and discards
/// the results.
#[derive(Debug)]
pub struct Profiler {
    cuda: bool,
    stopped: bool,
    /// The profiler state is thread-local in libtorch: stop on the starting thread.
    _not_send: PhantomData<*const ()>,
}

/// One aggregated row: all events of one `name` on one `device` of one `kind`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileRow {
    /// Full event name: an ATen op (`aten::convolution`) or a CUDA kernel's demangled name.
    pub name: String,
    /// `"cpu"` for host events (ops, CUDA runtime calls), `"cuda"` for device events.
    pub device: String,
    /// `"op"`, `"kernel"`, `"memcpy"`, `"memset"`, `"runtime"`, `"driver"`, `"sync"`,
    /// `"annotation"` or `"other"`.
    pub kind: String,
    /// Number of events.
    pub calls: u64,
    /// Summed durations (ns).
    pub total_ns: u64,
    /// Host events: total minus the nested events on the same thread (key_averages' self CPU
    /// time); device events: = `total_ns`.
    pub self_ns: u64,
    /// Ops: summed duration of the device work (kernels, copies, memsets) that the op launched
    /// itself, not through nested ops (key_averages' self device time); 0 for other rows.
    pub device_ns: u64,
}

impl ProfileRow {
    /// True for events on an accelerator's timeline (work, sync spans, GPU annotations).
    pub fn on_device(&self) -> bool {
        self.device != "cpu"
    }

    /// True for the device's work: kernels, copies and memsets (what device totals add up).
    pub fn is_device_work(&self) -> bool {
        self.on_device() && matches!(self.kind.as_str(), "kernel" | "memcpy" | "memset")
    }
}

/// The result of one profiling session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileSummary {
    /// Whether CUDA activities were recorded (the session was started with `cuda`).
    pub cuda: bool,
    /// One row per (device, kind, name), in no particular order.
    pub rows: Vec<ProfileRow>,
}

impl Profiler {
    /// Starts libtorch's Kineto profiler on this thread: CPU ops, and with `cuda` also CUDA kernels,
    /// copies and memsets. Errors if a session is already running, if `cuda` is set without a CUDA
    /// device, or without the shim.
    pub fn start(cuda: bool) -> Result<Profiler> {
        #[cfg(not(crossclr_no_shim))]
        {
            // SAFETY: `err` is a valid out-pointer for the call.
            ffi::call("profiler start", |err| unsafe {
                crossclr_profiler_start(c_int::from(cuda), err)
            })?;
            Ok(Profiler {
                cuda,
                stopped: false,
                _not_send: PhantomData,
            })
        }
        #[cfg(crossclr_no_shim)]
        {
            let _ = cuda;
            Err(ffi::no_shim("profiler start"))
        }
    }

    /// True while a session (of this process) is running.
    pub fn is_active() -> bool {
        #[cfg(not(crossclr_no_shim))]
        {
            // SAFETY: no arguments.
            unsafe { crossclr_profiler_active() != 0 }
        }
        #[cfg(crossclr_no_shim)]
        {
            false
        }
    }

    /// Whether this session records CUDA activities.
    pub fn cuda(&self) -> bool {
        self.cuda
    }

    /// Stops the session (after synchronising the CUDA devices, so that no kernel is lost), writes
    /// the Chrome trace JSON to `trace` (atomically: `<trace>.tmp`, then rename) when given, and
    /// returns the aggregated events. The session ends even when this fails.
    pub fn stop(mut self, trace: Option<&Path>) -> Result<ProfileSummary> {
        self.stopped = true;
        if let Some(dir) = trace.and_then(Path::parent) {
            if !dir.as_os_str().is_empty() && !dir.is_dir() {
                let _ = stop_raw(None, false);
                return Err(Error::config(format!(
                    "profile trace folder {} does not exist",
                    dir.display()
                )));
            }
        }
        if self.cuda {
            for device in 0..tch::Cuda::device_count() {
                tch::Cuda::synchronize(device);
            }
        }
        let text = stop_raw(trace, true)?.unwrap_or_default();
        Ok(ProfileSummary {
            cuda: self.cuda,
            rows: parse_rows(&text)?,
        })
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        if !self.stopped {
            // Ends the session, discarding its events; an error here has nowhere to go.
            let _ = stop_raw(None, false);
        }
    }
}

/// Stops the running session; returns the table text when `want_table`.
#[cfg(not(crossclr_no_shim))]
fn stop_raw(trace: Option<&Path>, want_table: bool) -> Result<Option<String>> {
    use crate::train::atomic::tmp_of;
    let tmp = trace.map(tmp_of);
    let trace_c = match tmp.as_deref().map(c_path).transpose() {
        Ok(c) => c,
        Err(e) => {
            // Still end the session, then report the bad path.
            let _ = stop_raw(None, false);
            return Err(e);
        }
    };
    let mut table: *mut c_char = std::ptr::null_mut();
    let table_out: *mut *mut c_char = if want_table {
        &mut table
    } else {
        std::ptr::null_mut()
    };
    // SAFETY: the path is a valid C string or null; `table_out` is null or a valid out-pointer.
    ffi::call("profiler stop", |err| unsafe {
        crossclr_profiler_stop(
            trace_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            table_out,
            err,
        )
    })?;
    let text = want_table.then(|| ffi::take_message(table, ""));
    if let (Some(tmp), Some(path)) = (&tmp, trace) {
        if !tmp.exists() {
            return Err(Error::Other(format!(
                "profiler stop: libtorch did not write the trace {} (does the folder exist?)",
                tmp.display()
            )));
        }
        std::fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
    }
    Ok(text)
}

/// `path` as a C string for the shim.
#[cfg(not(crossclr_no_shim))]
fn c_path(path: &Path) -> Result<std::ffi::CString> {
    let s = path.to_str().ok_or_else(|| {
        Error::config(format!(
            "profile trace path {} is not UTF-8",
            path.display()
        ))
    })?;
    std::ffi::CString::new(s).map_err(|_| {
        Error::config(format!(
            "profile trace path {} contains a NUL",
            path.display()
        ))
    })
}

#[cfg(crossclr_no_shim)]
fn stop_raw(_trace: Option<&Path>, _want_table: bool) -> Result<Option<String>> {
    Err(ffi::no_shim("profiler stop"))
}

/// Parses the shim's rows: `device \t kind \t calls \t total_ns \t self_ns \t device_ns \t name`.
fn parse_rows(text: &str) -> Result<Vec<ProfileRow>> {
    let bad = |line: usize, what: String| {
        Error::Other(format!(
            "profiler stop: malformed row {} of the shim's table: {what}",
            line + 1
        ))
    };
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let fields: Vec<&str> = line.splitn(7, '\t').collect();
        if fields.len() != 7 {
            return Err(bad(i, format!("{} fields instead of 7", fields.len())));
        }
        let num = |k: usize| {
            fields[k]
                .parse::<u64>()
                .map_err(|e| bad(i, format!("field {}: {:?}: {e}", k + 1, fields[k])))
        };
        rows.push(ProfileRow {
            device: fields[0].to_string(),
            kind: fields[1].to_string(),
            calls: num(2)?,
            total_ns: num(3)?,
            self_ns: num(4)?,
            device_ns: num(5)?,
            name: fields[6].to_string(),
        });
    }
    Ok(rows)
}

impl ProfileSummary {
    /// Device work rows (kernels, copies, memsets), longest total first.
    pub fn device_rows(&self) -> Vec<&ProfileRow> {
        let mut rows: Vec<&ProfileRow> = self.rows.iter().filter(|r| r.is_device_work()).collect();
        rows.sort_by(|a, b| b.total_ns.cmp(&a.total_ns).then(a.name.cmp(&b.name)));
        rows
    }

    /// Host op rows (`kind == "op"`), sorted by `key` descending.
    fn op_rows(&self, key: impl Fn(&ProfileRow) -> u64) -> Vec<&ProfileRow> {
        let mut rows: Vec<&ProfileRow> = self.rows.iter().filter(|r| r.kind == "op").collect();
        rows.sort_by(|a, b| key(b).cmp(&key(a)).then(a.name.cmp(&b.name)));
        rows
    }

    /// Total device time (ns) over all device work rows (kernels, copies, memsets).
    pub fn device_total_ns(&self) -> u64 {
        self.rows
            .iter()
            .filter(|r| r.is_device_work())
            .map(|r| r.total_ns)
            .sum()
    }

    /// The rows whose name contains `pattern`.
    pub fn find(&self, pattern: &str) -> Vec<&ProfileRow> {
        self.rows
            .iter()
            .filter(|r| r.name.contains(pattern))
            .collect()
    }

    /// A text table of the `top` rows, per step over `steps` profiled steps (0 is taken as 1):
    /// device work by total time (percent of the device total, ms and calls per step, shortened
    /// kernel name), then ATen ops by the device time of the work they launched. Without device
    /// events: ATen ops by self CPU time (with a warning when CUDA was profiled).
    pub fn table(&self, top: usize, steps: usize) -> String {
        let per_step = PerStep(steps.max(1) as f64);
        if !self.device_rows().is_empty() {
            return self.device_table(top, per_step) + &self.launch_table(top, per_step);
        }
        let mut out = String::new();
        if self.cuda {
            out.push_str(
                "warning: CUDA was profiled but no device event was recorded (CUPTI missing, not \
                 permitted, or no kernel ran)\n",
            );
        }
        out + &self.cpu_table(top, per_step)
    }

    /// Device work by total time.
    fn device_table(&self, top: usize, per_step: PerStep) -> String {
        let rows = self.device_rows();
        let total = self.device_total_ns();
        let items: u64 = rows.iter().map(|r| r.calls).sum();
        let mut out = format!(
            "device time: {:.3} ms/step in {:.1} kernels / copies / memsets per step ({} steps)\n\
             {:>6} {:>9} {:>8} {:>7}  name\n",
            per_step.ms(total),
            per_step.count(items),
            per_step.0,
            "%",
            "ms/step",
            "calls",
            "kind"
        );
        for r in rows.iter().take(top) {
            out.push_str(&format!(
                "{:>6.2} {:>9.3} {:>8.1} {:>7}  {}\n",
                percent(r.total_ns, total),
                per_step.ms(r.total_ns),
                per_step.count(r.calls),
                r.kind,
                shorten_kernel_name(&r.name, TABLE_NAME_WIDTH)
            ));
        }
        out
    }

    /// ATen ops by the device time of the work they launched themselves, and the rest.
    fn launch_table(&self, top: usize, per_step: PerStep) -> String {
        let total = self.device_total_ns();
        let ops = self.op_rows(|r| r.device_ns);
        let mut out = format!(
            "\nATen ops by the device time of the work they launched:\n\
             {:>6} {:>9} {:>8} {:>11}  name\n",
            "%", "ms/step", "calls", "cpu self ms"
        );
        for r in ops.iter().filter(|r| r.device_ns > 0).take(top) {
            out.push_str(&format!(
                "{:>6.2} {:>9.3} {:>8.1} {:>11.3}  {}\n",
                percent(r.device_ns, total),
                per_step.ms(r.device_ns),
                per_step.count(r.calls),
                per_step.ms(r.self_ns),
                r.name
            ));
        }
        let orphan = total.saturating_sub(ops.iter().map(|r| r.device_ns).sum());
        out.push_str(&format!(
            "{:>6.2} {:>9.3} {:>8} {:>11}  (launched by no op: CUDA-graph replays, other threads)\n",
            percent(orphan, total),
            per_step.ms(orphan),
            "",
            ""
        ));
        out
    }

    /// ATen ops by self CPU time.
    fn cpu_table(&self, top: usize, per_step: PerStep) -> String {
        let ops = self.op_rows(|r| r.self_ns);
        let total: u64 = ops.iter().map(|r| r.self_ns).sum();
        let mut out = format!(
            "no device events: ATen ops by self CPU time ({:.3} ms/step, {} steps)\n\
             {:>6} {:>9} {:>8} {:>10}  name\n",
            per_step.ms(total),
            per_step.0,
            "%",
            "self ms",
            "calls",
            "total ms"
        );
        for r in ops.iter().take(top) {
            out.push_str(&format!(
                "{:>6.2} {:>9.3} {:>8.1} {:>10.3}  {}\n",
                percent(r.self_ns, total),
                per_step.ms(r.self_ns),
                per_step.count(r.calls),
                per_step.ms(r.total_ns),
                r.name
            ));
        }
        out
    }

    /// One JSON object per row and line (full names), device rows first by total time.
    pub fn to_jsonl(&self) -> Result<String> {
        let mut rows: Vec<&ProfileRow> = self.rows.iter().collect();
        rows.sort_by(|a, b| {
            b.on_device()
                .cmp(&a.on_device())
                .then(b.total_ns.cmp(&a.total_ns))
                .then(a.name.cmp(&b.name))
        });
        let mut out = String::new();
        for r in rows {
            out.push_str(
                &serde_json::to_string(r)
                    .map_err(|e| Error::Other(format!("profile row to JSON: {e}")))?,
            );
            out.push('\n');
        }
        Ok(out)
    }

    /// Writes [`ProfileSummary::to_jsonl`] to `path` atomically.
    pub fn write_jsonl(&self, path: &Path) -> Result<()> {
        crate::train::atomic::write_atomic(path, self.to_jsonl()?.as_bytes())
    }
}

/// Converts totals over the profiled steps into per-step values.
#[derive(Clone, Copy)]
struct PerStep(f64);

impl PerStep {
    fn ms(self, ns: u64) -> f64 {
        ns as f64 / 1e6 / self.0
    }
    fn count(self, n: u64) -> f64 {
        n as f64 / self.0
    }
}

/// `part` as a percentage of `whole` (0 when `whole` is 0).
fn percent(part: u64, whole: u64) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

/// A CUDA kernel's demangled name made readable in `max` characters: no leading `void `, no
/// parameter list, template arguments nested deeper than one level replaced by `<...>`, and a
/// `...` cut when still too long. Short names are returned unchanged.
pub fn shorten_kernel_name(name: &str, max: usize) -> String {
    if name.chars().count() <= max {
        return name.to_string();
    }
    let mut s = name.strip_prefix("void ").unwrap_or(name);
    // Drop the trailing parameter list `(...)` (not a leading `(anonymous namespace)`).
    if s.ends_with(')') {
        let mut depth = 0i32;
        for (i, c) in s.char_indices().rev() {
            match c {
                ')' => depth += 1,
                '(' => {
                    depth -= 1;
                    if depth == 0 {
                        if i > 0 {
                            s = s[..i].trim_end();
                        }
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    let mut out = String::with_capacity(s.len());
    let mut depth = 0usize;
    for c in s.chars() {
        match c {
            '<' => {
                depth += 1;
                if depth == 2 {
                    out.push_str("<...");
                } else if depth < 2 {
                    out.push('<');
                }
            }
            '>' => {
                if depth <= 2 {
                    out.push('>');
                }
                depth = depth.saturating_sub(1);
            }
            _ if depth < 2 => out.push(c),
            _ => {}
        }
    }
    if out.chars().count() > max {
        let keep = max.saturating_sub(3);
        out = out.chars().take(keep).collect::<String>() + "...";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shim's own check, which the [`Profiler`] type makes unreachable from safe code.
    #[test]
    fn stopping_without_a_session_is_an_error() {
        if !ffi::SHIM_BUILT {
            return;
        }
        assert!(!Profiler::is_active());
        let err = stop_raw(None, true).unwrap_err().to_string();
        assert!(err.contains("not running"), "{err}");
    }

    #[test]
    fn parses_rows_and_rejects_malformed_ones() {
        let rows = parse_rows("cuda\tkernel\t4\t100\t100\t0\tvoid k<int>(int, float)\n").unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].name, "void k<int>(int, float)");
        assert_eq!((rows[0].calls, rows[0].total_ns), (4, 100));
        assert!(parse_rows("cpu\top\tx\t1\t1\t0\taten::mm\n").is_err());
        assert!(parse_rows("cpu\top\t1\t1\n").is_err());
        assert!(parse_rows("").unwrap().is_empty());
    }

    #[test]
    fn shortens_template_kernel_names() {
        let name = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, \
                    std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)";
        let short = shorten_kernel_name(name, 80);
        assert_eq!(
            short,
            "at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<...>, std::array<...> >"
                .chars()
                .take(77)
                .collect::<String>()
                + "..."
        );
        assert!(short.chars().count() <= 80);
        assert_eq!(shorten_kernel_name("aten::mm", 80), "aten::mm");
        let anon = "void (anonymous namespace)::softmax_warp_forward<float, float, float, 7, false, false>(float*, float const*, int, int, int)";
        assert_eq!(
            shorten_kernel_name(anon, 90),
            "(anonymous namespace)::softmax_warp_forward<float, float, float, 7, false, false>"
        );
    }

    #[test]
    fn table_ranks_device_rows_per_step() {
        let row = |name: &str, device: &str, kind: &str, calls, total, device_ns| ProfileRow {
            name: name.into(),
            device: device.into(),
            kind: kind.into(),
            calls,
            total_ns: total,
            self_ns: total,
            device_ns,
        };
        let s = ProfileSummary {
            cuda: true,
            rows: vec![
                row("small_kernel", "cuda", "kernel", 20, 2_000_000, 0),
                row("big_kernel", "cuda", "kernel", 10, 6_000_000, 0),
                row("aten::mm", "cpu", "op", 10, 1_000_000, 6_000_000),
            ],
        };
        let t = s.table(10, 2);
        let big = t.find("big_kernel").unwrap();
        assert!(big < t.find("small_kernel").unwrap(), "{t}");
        // 6 ms over 2 steps = 3 ms/step, 75 % of 8 ms, 5 calls/step.
        assert!(
            t.contains(" 75.00     3.000      5.0  kernel  big_kernel"),
            "{t}"
        );
        assert!(t.contains("aten::mm"), "{t}");
        let lines: Vec<ProfileRow> = s
            .to_jsonl()
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0].name, "big_kernel");
        assert_eq!(lines.len(), 3);
        let empty = ProfileSummary {
            cuda: true,
            rows: vec![row("aten::mm", "cpu", "op", 1, 5, 0)],
        };
        assert!(empty.table(5, 1).starts_with("warning: CUDA was profiled"));
    }
}
