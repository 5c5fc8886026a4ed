//! The caching CPU allocator (src/cpu_cache.rs): installed once per process, so it has its own test
//! binary.
use crossclr::cpu_cache::{self, CpuCacheConfig};
use tch::{Kind, Tensor};

#[test]
fn large_blocks_are_reused_and_tensors_stay_correct() {
    if crossclr::gpu::shim_status() == crossclr::gpu::ShimStatus::Missing {
        eprintln!("skipped: built without the C++ shim");
        return;
    }
    cpu_cache::install(CpuCacheConfig {
        min_bytes: 1 << 20,
        max_cached_bytes: 256 << 20,
        huge_pages: true,
    })
    .unwrap();
    assert!(cpu_cache::is_active());
    // A second install is a no-op, not an error.
    cpu_cache::install(CpuCacheConfig::default()).unwrap();

    const N: i64 = 3 << 20; // 12 MiB of f32
    let before = cpu_cache::stats();
    let a = Tensor::ones([N], (Kind::Float, tch::Device::Cpu));
    assert_eq!(a.sum(Kind::Double).double_value(&[]), N as f64);
    let after_alloc = cpu_cache::stats();
    assert!(after_alloc.misses > before.misses, "{after_alloc:?}");
    assert!(after_alloc.in_use_bytes >= N * 4);
    drop(a);
    let freed = cpu_cache::stats();
    assert!(freed.cached_bytes >= N * 4, "freed block cached: {freed:?}");

    // The same size again comes from the cache; zeros() must still be all zeros after reuse.
    let b = Tensor::zeros([N], (Kind::Float, tch::Device::Cpu));
    let reused = cpu_cache::stats();
    assert_eq!(reused.hits, freed.hits + 1, "{reused:?}");
    assert_eq!(b.abs().sum(Kind::Double).double_value(&[]), 0.0);

    // Real computation through cached blocks matches a small-tensor (default allocator) reference.
    let x = Tensor::randn([1024, 1024], (Kind::Float, tch::Device::Cpu));
    let y = x.matmul(&x.transpose(0, 1));
    let x_small = x.narrow(0, 0, 16).copy();
    let y_small = x_small.matmul(&x.transpose(0, 1));
    let diff = (y.narrow(0, 0, 16) - y_small).abs().max().double_value(&[]);
    assert!(
        diff < 1e-3,
        "matmul through cached blocks differs by {diff}"
    );

    // Small tensors bypass the cache.
    let small_before = cpu_cache::stats();
    let s = Tensor::ones([1000], (Kind::Float, tch::Device::Cpu));
    assert_eq!(cpu_cache::stats().misses, small_before.misses);
    assert_eq!(cpu_cache::stats().hits, small_before.hits);
    drop(s);

    // Past the cap, freed blocks are unmapped, not cached.
    let big = Tensor::ones([80 << 20], (Kind::Float, tch::Device::Cpu)); // 320 MiB > 256 MiB cap
    drop(big);
    assert!(cpu_cache::stats().cached_bytes <= 256 << 20);

    cpu_cache::release();
    assert_eq!(cpu_cache::stats().cached_bytes, 0);
}
