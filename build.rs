//! Link flags for libtorch (from the PyPI wheel, see scripts/setup.sh), and the C++ shim.
//!
//! * `--no-as-needed -ltorch_cuda -ltorch`: without it the linker drops libtorch_cuda (no symbol
//!   of it is referenced directly) and the binary never sees CUDA (tch-rs #980).
//! * an rpath to libtorch's lib folder, so that users need no LD_LIBRARY_PATH.
//! * `csrc/shim.cpp` (CUDA graphs, TF32 switches, fused EMA / SGD over parameter lists, CUDA memory
//!   statistics; see src/gpu/) and `csrc/cpu_cache.cpp` (the caching CPU tensor allocator, see
//!   src/cpu_cache.rs): compiled with the `cc` crate against libtorch's headers. Its CUDA
//!   half needs the CUDA runtime headers (the wheel ships them in `site-packages/nvidia/cu13/include`)
//!   and `libtorch_cuda.so`; without them the shim is built CPU-only (`CROSSCLR_SHIM_CUDA` undefined,
//!   the CUDA entry points then return "built without CUDA support"). Without libtorch headers, or
//!   if the compile fails, the crate is built with `--cfg crossclr_no_shim` and every shim call
//!   returns "built without the CUDA shim": the build never fails because of the shim.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=CROSSCLR_NO_SHIM");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-changed=csrc/shim.h");
    println!("cargo:rerun-if-changed=csrc/ffi_util.h");
    println!("cargo:rerun-if-changed=csrc/cpu_cache.cpp");
    println!("cargo:rerun-if-changed=csrc/fused_bn.cpp");
    println!("cargo:rerun-if-changed=csrc/profiler.cpp");
    println!("cargo:rerun-if-changed=csrc/cuda_kernels.cpp");
    println!("cargo:rerun-if-changed=csrc/aggregate.cpp");
    println!("cargo:rerun-if-changed=csrc/fused_kernels.cuh");
    println!("cargo:rustc-check-cfg=cfg(crossclr_no_shim)");
    println!("cargo:rustc-check-cfg=cfg(crossclr_dist)");
    println!("cargo:rerun-if-changed=csrc/dist.cpp");
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        println!("cargo:rustc-cfg=crossclr_no_shim");
        return;
    };
    let lib = PathBuf::from(&libtorch).join("lib");
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let has_torch_cuda = lib.join("libtorch_cuda.so").exists();
    if has_torch_cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-ltorch");
        if lib.join("libc10_cuda.so").exists() {
            // The shim calls c10::cuda (streams, caching-allocator statistics) directly.
            println!("cargo:rustc-link-arg=-lc10_cuda");
        }
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    build_shim(Path::new(&libtorch), has_torch_cuda);
}

/// Include folders for the CUDA runtime headers: the wheel's `nvidia/cu13/include` (or `cu12`), else
/// `$CUDA_HOME/include`, else `/usr/local/cuda/include`. The wheel's runtime package lacks the
/// `crt/` internals that `cuda_runtime.h` includes (they ship with nvcc); the CUDA headers that the
/// `triton` wheel (a dependency of torch) bundles provide them, searched after the runtime folder so
/// that only `crt/*` comes from there. `None` if no complete set is found.
fn cuda_includes(libtorch: &Path) -> Option<Vec<PathBuf>> {
    let root = libtorch
        .canonicalize()
        .unwrap_or_else(|_| libtorch.to_path_buf());
    let site = root.join("..");
    let mut system: Vec<PathBuf> = Vec::new();
    if let Ok(home) = std::env::var("CUDA_HOME") {
        system.push(PathBuf::from(home).join("include"));
    }
    system.push(PathBuf::from("/usr/local/cuda/include"));
    let mut runtime: Vec<PathBuf> = ["cu13", "cu12"]
        .iter()
        .map(|v| site.join("nvidia").join(v).join("include"))
        .collect();
    runtime.push(site.join("nvidia").join("cuda_runtime").join("include"));
    runtime.extend(system.iter().cloned());
    let runtime = runtime
        .into_iter()
        .find(|dir| dir.join("cuda_runtime_api.h").exists())?;
    let has_crt = |dir: &Path| dir.join("crt").join("host_config.h").exists();
    if has_crt(&runtime) {
        return Some(vec![runtime]);
    }
    let mut crt = vec![site
        .join("triton")
        .join("backends")
        .join("nvidia")
        .join("include")];
    crt.extend(system);
    let crt = crt.into_iter().find(|dir| has_crt(dir))?;
    Some(vec![runtime, crt])
}

fn build_shim(libtorch: &Path, has_torch_cuda: bool) {
    let include = libtorch.join("include");
    if std::env::var_os("CROSSCLR_NO_SHIM").is_some() || !include.join("ATen/ATen.h").exists() {
        println!("cargo:warning=crossclr: libtorch headers not found (or CROSSCLR_NO_SHIM set): building without the C++ shim");
        println!("cargo:rustc-cfg=crossclr_no_shim");
        return;
    }
    // csrc/cuda_kernels.cpp embeds the NVRTC source as a raw string literal.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernels = std::fs::read_to_string("csrc/fused_kernels.cuh")
        .expect("csrc/fused_kernels.cuh is part of the repository");
    std::fs::write(
        out_dir.join("fused_kernels_src.inc"),
        format!("R\"CROSSCLR_SRC({kernels})CROSSCLR_SRC\"\n"),
    )
    .expect("OUT_DIR is writable");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/shim.cpp")
        .file("csrc/cpu_cache.cpp")
        .file("csrc/fused_bn.cpp")
        .file("csrc/profiler.cpp")
        .file("csrc/cuda_kernels.cpp")
        .file("csrc/aggregate.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(&out_dir)
        .flag("-std=c++17")
        .flag("-O2")
        .flag(format!(
            "-D_GLIBCXX_USE_CXX11_ABI={}",
            std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into())
        ))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        // libtorch's headers are noisy with -Wall -Wextra (unused parameters, deprecated TF32 setters).
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        .opt_level(2)
        .debug(false);
    let cuda = if has_torch_cuda && include.join("ATen/cuda/CUDAGraph.h").exists() {
        cuda_includes(libtorch)
    } else {
        None
    };
    match &cuda {
        Some(dirs) => {
            build.includes(dirs).define("CROSSCLR_SHIM_CUDA", "1");
        }
        None => println!(
            "cargo:warning=crossclr: CUDA runtime headers or libtorch_cuda not found: the shim is CPU-only (no CUDA graphs)"
        ),
    }
    if let Err(e) = build.try_compile("crossclr_shim") {
        println!(
            "cargo:warning=crossclr: the C++ shim failed to compile ({e}); building without it"
        );
        println!("cargo:rustc-cfg=crossclr_no_shim");
        return;
    }
    build_dist(libtorch, &include, cuda.as_deref());
}

/// The NCCL headers of the wheel (`site-packages/nvidia/nccl/include`), else `$NCCL_HOME/include`,
/// else the system's.
fn nccl_include(libtorch: &Path) -> Option<PathBuf> {
    let root = libtorch
        .canonicalize()
        .unwrap_or_else(|_| libtorch.to_path_buf());
    let mut dirs = vec![root.join("..").join("nvidia").join("nccl").join("include")];
    if let Ok(home) = std::env::var("NCCL_HOME") {
        dirs.push(PathBuf::from(home).join("include"));
    }
    dirs.push(PathBuf::from("/usr/include"));
    dirs.into_iter().find(|d| d.join("nccl.h").exists())
}

/// `csrc/dist.cpp` (c10d Gloo collectives for data-parallel training), as its own library so
/// that a missing or unfitting Gloo header set disables only data parallelism: it needs the Gloo
/// headers, which the torch wheel does not ship (Debian's `libgloo-dev`, installed by
/// scripts/setup.sh, or a folder in `GLOO_INCLUDE`). Sets `--cfg crossclr_dist` when it builds.
fn build_dist(libtorch: &Path, include: &Path, cuda: Option<&[PathBuf]>) {
    println!("cargo:rerun-if-env-changed=NCCL_HOME");
    println!("cargo:rerun-if-env-changed=CROSSCLR_NO_NCCL");
    let gloo = std::env::var_os("GLOO_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/include"));
    if !gloo.join("gloo/config.h").exists() {
        println!(
            "cargo:warning=crossclr: Gloo headers not found in {} (apt-get install libgloo-dev, or set GLOO_INCLUDE): building without data parallelism",
            gloo.display()
        );
        return;
    }
    let build = |nccl: Option<(&[PathBuf], &Path)>| {
        let mut build = cc::Build::new();
        build
            .cpp(true)
            .file("csrc/dist.cpp")
            .include(include)
            .include(include.join("torch/csrc/api/include"))
            .include(&gloo)
            .flag("-std=c++17")
            .flag(format!(
                "-D_GLIBCXX_USE_CXX11_ABI={}",
                std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into())
            ))
            .flag("-DGLOG_USE_GLOG_EXPORT")
            .flag("-DUSE_C10D_GLOO")
            .flag_if_supported("-Wno-unused-parameter")
            .flag_if_supported("-Wno-deprecated-declarations")
            .warnings(false)
            .opt_level(2)
            .debug(false);
        if let Some((cuda, nccl)) = nccl {
            build
                .includes(cuda)
                .include(nccl)
                .define("USE_C10D_NCCL", None)
                .define("CROSSCLR_DIST_NCCL", "1");
        }
        build.try_compile("crossclr_dist")
    };
    // NCCL (GPU collectives) when the CUDA runtime and NCCL headers are there; if that does not
    // compile, Gloo alone (data parallelism on the CPU, and on CUDA through host staging).
    let nccl = match (cuda, nccl_include(libtorch)) {
        _ if std::env::var_os("CROSSCLR_NO_NCCL").is_some() => None,
        (Some(cuda), Some(nccl)) => Some((cuda, nccl)),
        _ => {
            println!(
                "cargo:warning=crossclr: CUDA runtime or NCCL headers not found: data parallelism without NCCL (Gloo only)"
            );
            None
        }
    };
    if let Some((cuda, dir)) = &nccl {
        match build(Some((cuda, dir))) {
            Ok(()) => {
                println!("cargo:rustc-cfg=crossclr_dist");
                return;
            }
            Err(e) => println!(
                "cargo:warning=crossclr: csrc/dist.cpp failed to compile with NCCL ({e}); building with Gloo only"
            ),
        }
    }
    match build(None) {
        Ok(()) => println!("cargo:rustc-cfg=crossclr_dist"),
        Err(e) => println!(
            "cargo:warning=crossclr: csrc/dist.cpp failed to compile ({e}); building without data parallelism"
        ),
    }
}
