//! The "aggregate first" graph product of a channel-major ST-GCN block:
//! `z[k] = x @ g[k]`, `x` `(R, V)`, `g = A ⊙ E` `(K, V, W)`, `z` `(K, R, W)`.
//!
//! Why: the plain formulation is one product `x @ [g_0 g_1 ..]` `(R, K·W)` followed by a permuting
//! copy into `(K, R, W)`, and the same copy back in backward. In a single-thread CPU profile of a
//! SkeletonCLR step those copies were most of `aten::copy_` (11% of the step). The op in
//! csrc/aggregate.cpp writes each partition's product straight into its slice of `z` (and
//! accumulates the input gradient over the partitions), so no copy is made; it uses libtorch's
//! products, on the CPU or CUDA. `use_op = false` (the lever `kernels.agg_op=off`) or a build
//! without the shim give the plain formulation; `kernels.agg_pack` chooses the row packing.
use tch::Tensor;

#[cfg(not(crossclr_no_shim))]
extern "C" {
    fn crossclr_aggregate_first(
        x: *mut std::ffi::c_void,
        g: *mut std::ffi::c_void,
        tail_rows: i64,
        pad_blocks: i64,
        out: *mut *mut std::ffi::c_void,
        err: *mut *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
}

/// Whether the op exists in this build (the C++ shim was compiled).
pub fn available() -> bool {
    cfg!(not(crossclr_no_shim))
}

/// `z` `(K, R, W)` with `z[k] = x @ g[k]`; `x` `(R, V)` contiguous, `g` `(K, V, W)`. With
/// `use_op` (and [`available`]) through the copy-free op, else the plain product + copy.
pub fn aggregate_first(x: &Tensor, g: &Tensor, use_op: bool) -> Tensor {
    if use_op && available() {
        match run_op(x, g, 0, 0) {
            Ok(z) => return z,
            // Only a broken invariant gets here (shapes are checked before anything is computed).
            Err(msg) => warn_once(&msg),
        }
    }
    plain(x, g)
}

/// `[z; S; 0]` `(K·R + (K + pad)·T, W)`: the rows of [`aggregate_first`]'s `z`, then for each
/// partition `k`, `T = tail_rows` rows all equal to `colsum_k = Σ_v g[k, v, :]` (gradients flow to
/// `g` through them too), then `pad · T` rows of zeros (for aligned product operands). With the
/// 1×1 convolution's bias as `K` extra weight columns (and `pad` zero ones), one product then adds
/// the block's bias `Σ_k b[k, c] · colsum_k[w]` (see `Block::aggregate` in `stgcn.rs`).
pub fn aggregate_first_with_colsums(
    x: &Tensor,
    g: &Tensor,
    tail_rows: i64,
    pad: i64,
    use_op: bool,
) -> Tensor {
    if use_op && available() {
        match run_op(x, g, tail_rows, pad) {
            Ok(z) => return z,
            Err(msg) => warn_once(&msg),
        }
    }
    plain_with_colsums(x, g, tail_rows, pad)
}

/// [`aggregate_first_with_colsums`] from the plain formulation and a concatenation (the fallback
/// without the op, and the tests' reference).
pub fn plain_with_colsums(x: &Tensor, g: &Tensor, tail_rows: i64, pad: i64) -> Tensor {
    let (k, w) = (g.size()[0], g.size()[2]);
    let sums = g
        .sum_dim_intlist([1i64].as_slice(), true, None)
        .expand([k, tail_rows, w], false)
        .reshape([k * tail_rows, w]);
    let zeros = Tensor::zeros([pad * tail_rows, w], (g.kind(), g.device()));
    Tensor::cat(&[plain(x, g).view([-1, w]), sums, zeros], 0)
}

/// The block-diagonal `I_P ⊗ g[k]` `(K, P·V, P·W)` of `g` `(K, V, W)` for `P = pack` (see
/// [`packed`]).
fn block_diagonal(g: &Tensor, pack: i64) -> Tensor {
    let (k, v, w) = (g.size()[0], g.size()[1], g.size()[2]);
    let eye = Tensor::eye(pack, (g.kind(), g.device())).view([1, pack, 1, pack, 1]);
    (eye * g.view([k, 1, v, 1, w])).reshape([k, pack * v, pack * w])
}

/// [`aggregate_first_with_colsums`] on `pack` rows packed into one (as [`packed`]); falls back to
/// the unpacked op when `pack` does not divide both row counts.
pub fn packed_with_colsums(
    x: &Tensor,
    g: &Tensor,
    pack: i64,
    tail_rows: i64,
    pad: i64,
    use_op: bool,
) -> Tensor {
    let (v, w) = (g.size()[1], g.size()[2]);
    let r = x.size()[0];
    if pack <= 1 || r % pack != 0 || tail_rows % pack != 0 {
        return aggregate_first_with_colsums(x, g, tail_rows, pad, use_op);
    }
    let g_bd = block_diagonal(g, pack);
    // The column sums of the block-diagonal are `pack` copies of colsum_k: one packed tail row
    // is `pack` unpacked ones.
    aggregate_first_with_colsums(
        &x.view([r / pack, pack * v]),
        &g_bd,
        tail_rows / pack,
        pad,
        use_op,
    )
    .view([-1, w])
}

/// The same `z` `(K, R, W)` as [`aggregate_first`], computed on `P` rows packed into one:
/// `x` viewed as `(R/P, P·V)` times the block-diagonal `I_P ⊗ g[k]` `(P·V, P·W)`, whose result
/// `(R/P, P·W)` is the same memory as `z[k]` `(R, W)`.
///
/// Why: with V = 25 joints every row of `x` and `z` is 100 bytes, so cuBLAS can only use its
/// `align1` kernels (no vector loads); in an H200 profile of a SkeletonCLR step those products
/// took 3.2 of 17.5 ms. With P = 4 the rows are 400 bytes (16-byte aligned) and the products use
/// the vectorised kernels; the P-fold arithmetic of the zero blocks is cheap on tensor cores for
/// these memory-bound products. The gradient of `g` is the sum of the diagonal blocks of the
/// block-diagonal's gradient (autograd does it through the `I_P ⊗` product). `P` is the smallest
/// packing that makes `P·V` a multiple of 4 (1 when V already is): see [`packing`].
pub fn packed(x: &Tensor, g: &Tensor, pack: i64, use_op: bool) -> Tensor {
    let (k, v, w) = (g.size()[0], g.size()[1], g.size()[2]);
    let r = x.size()[0];
    if pack <= 1 || r % pack != 0 {
        return aggregate_first(x, g, use_op);
    }
    aggregate_first(
        &x.view([r / pack, pack * v]),
        &block_diagonal(g, pack),
        use_op,
    )
    .view([k, r, w])
}

/// The row packing [`packed`] uses for `V` joints: `4 / gcd(V, 4)` when `on` (the lever
/// `kernels.agg_pack`, by default on CUDA only: on the CPU the extra arithmetic of the zero blocks
/// costs more than aligned rows gain), else 1.
pub fn packing(v: i64, on: bool) -> i64 {
    if !on || v <= 0 {
        return 1;
    }
    let mut gcd = (v, 4i64);
    while gcd.1 != 0 {
        gcd = (gcd.1, gcd.0 % gcd.1);
    }
    4 / gcd.0
}

/// The C++ op (csrc/aggregate.cpp); its error message on failure.
fn run_op(x: &Tensor, g: &Tensor, tail_rows: i64, pad: i64) -> Result<Tensor, String> {
    #[cfg(not(crossclr_no_shim))]
    {
        let mut out: *mut std::ffi::c_void = std::ptr::null_mut();
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: live tch tensors borrowed for the call; the C side checks them and never lets
        // an exception escape; on success `out` is a fresh `at::Tensor*` that we own.
        let status = unsafe {
            crossclr_aggregate_first(
                x.as_ptr() as *mut _,
                g.as_ptr() as *mut _,
                tail_rows,
                pad,
                &mut out,
                &mut err,
            )
        };
        if status == 0 && !out.is_null() {
            return Ok(unsafe { Tensor::from_ptr(out as *mut _) });
        }
        Err(crate::gpu::ffi::take_message(err, "no output tensor"))
    }
    #[cfg(crossclr_no_shim)]
    {
        let _ = (x, g, tail_rows, pad);
        Err("built without the C++ shim".into())
    }
}

/// The plain formulation: one product with the concatenated partitions, then a permuting copy.
pub fn plain(x: &Tensor, g: &Tensor) -> Tensor {
    let (k, v, w) = (g.size()[0], g.size()[1], g.size()[2]);
    let r = x.size()[0];
    let g_cat = g.permute([1, 0, 2]).reshape([v, k * w]);
    x.mm(&g_cat).view([r, k, w]).permute([1, 0, 2]).contiguous()
}

fn warn_once(msg: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        eprintln!("crossclr: graph aggregation op failed ({msg}); using the plain product")
    });
}

#[cfg(all(test, not(crossclr_no_shim)))]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// `f(x, g)` with fresh leaves and the loss `sum(z * dz)`: (z, dx, dg).
    fn value_and_grads(
        f: &dyn Fn(&Tensor, &Tensor) -> Tensor,
        x: &Tensor,
        g: &Tensor,
        dz: &Tensor,
    ) -> (Tensor, Tensor, Tensor) {
        let (x, g) = (
            x.detach().set_requires_grad(true),
            g.detach().set_requires_grad(true),
        );
        let z = f(&x, &g);
        (&z * dz).sum(Kind::Double).backward();
        (z.detach(), x.grad(), g.grad())
    }

    /// Same values and gradients (input and graph) as the plain formulation.
    #[test]
    fn matches_the_plain_formulation() {
        tch::manual_seed(3);
        let opts = (Kind::Double, Device::Cpu);
        let x = Tensor::randn([37, 25], opts);
        let g = Tensor::randn([3, 25, 25], opts);
        let dz = Tensor::randn([3, 37, 25], opts);
        let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| value_and_grads(f, &x, &g, &dz);
        let (z1, dx1, dg1) = run(&|x, g| aggregate_first(x, g, true));
        let (z2, dx2, dg2) = run(&|x, g| plain(x, g));
        assert_eq!(z1.size(), vec![3, 37, 25]);
        for (a, b) in [(&z1, &z2), (&dx1, &dx2), (&dg1, &dg2)] {
            let d = (a - b).abs().max().double_value(&[]);
            assert!(d < 1e-10, "{d}");
        }
    }

    /// Packed rows: same values and gradients as the unpacked op, for V = 25 (P = 4) and a row
    /// count that does not divide (falls back), in float64.
    #[test]
    fn packed_matches_unpacked() {
        tch::manual_seed(5);
        let opts = (Kind::Double, Device::Cpu);
        for rows in [36i64, 37] {
            let x = Tensor::randn([rows, 25], opts);
            let g = Tensor::randn([3, 25, 25], opts);
            let dz = Tensor::randn([3, rows, 25], opts);
            let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| value_and_grads(f, &x, &g, &dz);
            let (z1, dx1, dg1) = run(&|x, g| packed(x, g, 4, true));
            let (z2, dx2, dg2) = run(&|x, g| aggregate_first(x, g, true));
            assert_eq!(z1.size(), vec![3, rows, 25]);
            for (a, b) in [(&z1, &z2), (&dx1, &dx2), (&dg1, &dg2)] {
                let d = (a - b).abs().max().double_value(&[]);
                assert!(d < 1e-10, "rows {rows}: {d}");
            }
        }
    }

    /// The column-sum rows: op, packed op and the plain fallback agree (values and both
    /// gradients, float64), the tail rows are the column sums of each partition, then zeros.
    #[test]
    fn colsum_rows_match_the_plain_formulation() {
        tch::manual_seed(8);
        let opts = (Kind::Double, Device::Cpu);
        let (rows, tail) = (48i64, 12i64);
        let x = Tensor::randn([rows, 25], opts);
        let g = Tensor::randn([3, 25, 25], opts);
        let pad = 1i64;
        let dz = Tensor::randn([3 * rows + (3 + pad) * tail, 25], opts);
        let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| value_and_grads(f, &x, &g, &dz);
        let want = run(&|x, g| plain_with_colsums(x, g, tail, pad));
        assert_eq!(want.0.size(), vec![3 * rows + (3 + pad) * tail, 25]);
        let colsum1 = g.get(1).sum_dim_intlist([0i64].as_slice(), false, None);
        let d = (want.0.get(3 * rows + tail + 5) - &colsum1).abs().max();
        assert!(d.double_value(&[]) < 1e-12);
        let last = want.0.get(3 * rows + (3 + pad) * tail - 1);
        assert_eq!(last.abs().max().double_value(&[]), 0.0);
        for (name, got) in [
            (
                "op",
                run(&|x, g| aggregate_first_with_colsums(x, g, tail, pad, true)),
            ),
            (
                "packed",
                run(&|x, g| packed_with_colsums(x, g, 4, tail, pad, true)),
            ),
        ] {
            for (a, b) in [(&got.0, &want.0), (&got.1, &want.1), (&got.2, &want.2)] {
                let d = (a - b).abs().max().double_value(&[]);
                assert!(d < 1e-10, "{name}: {d}");
            }
        }
    }

    #[test]
    fn packing_aligns_rows_to_16_bytes_on_cuda_only() {
        let on = |d| crate::model::kernels::Kernels::default().agg_pack_on(d);
        assert_eq!(packing(25, on(Device::Cuda(0))), 4);
        assert_eq!(packing(20, on(Device::Cuda(0))), 1);
        assert_eq!(packing(18, on(Device::Cuda(0))), 2);
        assert_eq!(packing(25, on(Device::Cpu)), 1);
    }

    /// Mismatched shapes are an error from the op (and the plain path then reports libtorch's).
    #[test]
    fn bad_shapes_are_refused() {
        let x = Tensor::zeros([4, 25], (Kind::Float, Device::Cpu));
        let g = Tensor::zeros([3, 20, 25], (Kind::Float, Device::Cpu));
        let msg = run_op(&x, &g, 0, 0).expect_err("mismatched shapes must be refused");
        assert!(msg.contains("graph must be (K, 25, W)"), "{msg}");
    }
}
