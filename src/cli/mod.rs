//! Thin command-line handlers over the library: parse arguments, call the library, print.
pub mod bench;
pub mod demo;
pub mod embed;
pub mod ensemble;
pub mod finetune;
pub mod inspect;
pub mod knn;
pub mod launch;
pub mod linear;
pub mod prepare;
pub mod pretrain;
pub mod semi;
pub mod synth;

/// Installs the caching CPU allocator as `kernels` says (`kernels.cpu_cache*`; src/cpu_cache.rs),
/// before the command allocates its tensors. A failure is reported, and libtorch's default
/// allocator is used.
pub fn install_cpu_cache(kernels: &crossclr::model::kernels::Kernels) {
    let Some(cfg) = kernels.cpu_cache_config() else {
        return;
    };
    if let Err(e) = crossclr::cpu_cache::install(cfg) {
        eprintln!("warning: {e:#}; continuing with libtorch's default CPU allocator");
    }
}
