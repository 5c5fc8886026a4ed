//! `cargo +nightly fuzz run pyskl`: the pyskl annotation reader (numpy-aware unpickler) on
//! arbitrary bytes (see crossclr::fuzz).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("crossclr-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    if let Err(e) = crossclr::fuzz::run_target("pyskl", data, &dir) {
        let path = crossclr::fuzz::input_path("pyskl", &dir);
        assert!(
            crossclr::fuzz::names_file(&e.to_string(), &path),
            "error does not name the file: {e}"
        );
    }
});
