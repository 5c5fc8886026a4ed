//! `cargo +nightly fuzz run labels`: the labels reader on arbitrary bytes (see crossclr::fuzz).
//!
//! libfuzzer-sys installs a panic hook that aborts on every panic, even one the code under test
//! catches. `read_labels` deliberately catches the panics of the third-party `serde-pickle` decoder
//! (docs/reliability.md, finding 16) and turns them into an error naming the file, so this target
//! lets a panic raised by `serde-pickle` (its own code, or `core` code it called: the backtrace
//! holds its frames) through to that `catch_unwind`; any other panic still aborts and is reported.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::Once;

static HOOK: Once = Once::new();

fn tolerate_caught_decoder_panics() {
    HOOK.call_once(|| {
        let aborting = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // The panic may be raised in `core` (e.g. a sort whose comparison is not a total
            // order) on behalf of serde-pickle: look for its frames (panics are rare: the
            // backtrace's cost does not matter).
            let in_decoder = info.location().is_some_and(|l| l.file().contains("serde-pickle"))
                || std::backtrace::Backtrace::force_capture()
                    .to_string()
                    .contains("serde_pickle::");
            if !in_decoder {
                aborting(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    tolerate_caught_decoder_panics();
    let dir = std::env::temp_dir().join(format!("crossclr-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    if let Err(e) = crossclr::fuzz::run_target("labels", data, &dir) {
        let path = crossclr::fuzz::input_path("labels", &dir);
        assert!(
            crossclr::fuzz::names_file(&e.to_string(), &path),
            "error does not name the file: {e}"
        );
    }
});
