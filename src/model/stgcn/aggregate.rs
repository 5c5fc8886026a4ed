//! The "aggregate first" graph product of a channel-major ST-GCN block:
//! `z[k] = x @ g[k]`, `x` `(R, V)`, `g = A ⊙ E` `(K, V, W)`, `z` `(K, R, W)`.
//!
//! Why: the plain formulation is one product `x @ [g_0 g_1 ..]` `(R, K·W)` followed by a permuting
//! copy into `(K, R, W)`, and the same copy back in backward. In a single-thread CPU profile of a
//! SkeletonCLR step those copies were most of `aten::copy_` (11% of the step). The op in
//! csrc/aggregate.cpp writes each partition's product straight into its slice of `z` (and
//! accumulates the input gradient over the partitions), so no copy is made; it uses libtorch's
//! products, on the CPU or CUDA. Switch: `CROSSCLR_AGG_OP=off` (read once per process) or a build
//! without the shim give the plain formulation.
use super::fused_bn::switched_off;
use std::sync::OnceLock;
use tch::Tensor;

/// Environment variable: `off` (or `0`, `false`) selects the plain product + copy.
pub const ENV_SWITCH: &str = "CROSSCLR_AGG_OP";

#[cfg(not(crossclr_no_shim))]
extern "C" {
    fn crossclr_aggregate_first(
        x: *mut std::ffi::c_void,
        g: *mut std::ffi::c_void,
        out: *mut *mut std::ffi::c_void,
        err: *mut *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
}

/// Whether the op is used (built with the shim, not switched off).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| cfg!(not(crossclr_no_shim)) && !switched_off(ENV_SWITCH))
}

/// `z` `(K, R, W)` with `z[k] = x @ g[k]`; `x` `(R, V)` contiguous, `g` `(K, V, W)`.
pub fn aggregate_first(x: &Tensor, g: &Tensor) -> Tensor {
    if enabled() {
        match run_op(x, g) {
            Ok(z) => return z,
            // Only a broken invariant gets here (shapes are checked before anything is computed).
            Err(msg) => warn_once(&msg),
        }
    }
    plain(x, g)
}

/// The C++ op (csrc/aggregate.cpp); its error message on failure.
fn run_op(x: &Tensor, g: &Tensor) -> Result<Tensor, String> {
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
        let _ = (x, g);
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

    /// Same values and gradients (input and graph) as the plain formulation.
    #[test]
    fn matches_the_plain_formulation() {
        tch::manual_seed(3);
        let opts = (Kind::Double, Device::Cpu);
        let x = Tensor::randn([37, 25], opts).set_requires_grad(true);
        let g = Tensor::randn([3, 25, 25], opts).set_requires_grad(true);
        let dz = Tensor::randn([3, 37, 25], opts);
        let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
            let (x, g) = (
                x.detach().set_requires_grad(true),
                g.detach().set_requires_grad(true),
            );
            let z = f(&x, &g);
            (&z * &dz).sum(Kind::Double).backward();
            (z.detach(), x.grad(), g.grad())
        };
        let (z1, dx1, dg1) = run(&|x, g| aggregate_first(x, g));
        let (z2, dx2, dg2) = run(&|x, g| plain(x, g));
        assert_eq!(z1.size(), vec![3, 37, 25]);
        for (a, b) in [(&z1, &z2), (&dx1, &dx2), (&dg1, &dg2)] {
            let d = (a - b).abs().max().double_value(&[]);
            assert!(d < 1e-10, "{d}");
        }
    }

    /// Mismatched shapes are an error from the op (and the plain path then reports libtorch's).
    #[test]
    fn bad_shapes_are_refused() {
        let x = Tensor::zeros([4, 25], (Kind::Float, Device::Cpu));
        let g = Tensor::zeros([3, 20, 25], (Kind::Float, Device::Cpu));
        let msg = run_op(&x, &g).expect_err("mismatched shapes must be refused");
        assert!(msg.contains("graph must be (K, 25, W)"), "{msg}");
    }
}
