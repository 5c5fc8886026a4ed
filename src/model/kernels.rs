//! Which code computes the encoder and the training step: one typed option per kernel lever.
//!
//! Every choice here gives the same function up to float rounding; the levers differ in speed and
//! memory only. A run resolves them once, at start-up, from the config's `kernels:` block (dotted
//! overrides such as `kernels.fold_bias=off` on the command line, as for every key; `crossclr
//! bench` takes the same keys), and passes the resolved set down explicitly: to the encoder
//! ([`crate::model::stgcn::StGcn::set_kernels`]), the fast step (side streams) and the caching CPU
//! allocator. The resolved set is written to the work_dir's `config.yaml`, so a run can be
//! repeated from its own files.
//!
//! `auto` means the measured best for the device (CPU or CUDA); [`Kernels::resolved`] turns each
//! `auto` into `on` / `off` for one device. The defaults and the figures behind them:
//!
//! | key | default | measured |
//! |---|---|---|
//! | `stgcn` | `agg_first` | CPU, batch 128 fwd+bwd: agg_first 8.9-10.1 s, auto 10.2, conv_first 10.8, reference 11.1-11.8; H200 SkeletonCLR step 26.8 vs 31.4 ms (reference) |
//! | `fold_bias` | on CUDA, off CPU | H100 SkeletonCLR 17.37 vs 18.19 ms; CPU no change (1512-1528 vs 1477-1536 ms) |
//! | `agg_op` | on | CPU profile: the permuting copies were 11 % of a step; 4-8 % off a CPU step |
//! | `agg_pack` | on CUDA, off CPU | cuBLAS aligned kernels on packed 25-joint rows (docs/gpu.md) |
//! | `fused_bn`, `fused_tail` | on | CPU single thread batch 128: 5.29-5.41 vs 5.50-5.68 s, peak RSS 3204 vs 3637 MiB |
//! | `fused_cuda` | `timed` | per op and shape the faster of fused kernels / tch, timed once in CUDA graphs |
//! | `view_streams` | `views` | H100 CrosSCLR-3: 41.27 / 43.70 ms and 7920 MiB (views) vs 40.34 / 42.89 ms and 8792 MiB (passes) |
//! | `cpu_cache` | on | docs/cpu.md (caching CPU allocator) |
//!
//! Levers that were measured losing or neutral on every device were removed with their code
//! (2026-12-07): the separate weight-gradient stream of the temporal convolutions (H200: no gain,
//! +2 % memory), the graph-convolution bias as a separate add (slower on the H100 and the CPU),
//! the scalar-only fused CUDA kernels (the four-wide ones are 3-6 % faster; the scalar bodies
//! remain for shapes the four-wide ones cannot take) and the eager wall-clock timing of the
//! fused-vs-tch choice (it remains the fallback when timing in a CUDA graph fails).
//!
//! What is not a lever: a build without the C++ shim, or tensors the fused ops cannot take
//! (float64, non-contiguous), run the plain libtorch ops whatever is asked here. The CUDA
//! allocator's own environment variables (`PYTORCH_CUDA_ALLOC_CONF`, `PYTORCH_ALLOC_CONF`) are
//! libtorch's and are passed through untouched (`crate::gpu::default_cuda_alloc_conf`).
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tch::Device;

/// `auto | on | off` (YAML booleans are accepted for on / off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Switch {
    /// The measured best for the device (see the module table).
    #[default]
    Auto,
    On,
    Off,
}

impl Switch {
    /// Whether it is on, `auto` meaning `default`.
    pub fn on_or(self, default: bool) -> bool {
        match self {
            Switch::Auto => default,
            Switch::On => true,
            Switch::Off => false,
        }
    }

    /// `auto` replaced by `default`.
    fn resolve(self, default: bool) -> Switch {
        if self.on_or(default) {
            Switch::On
        } else {
            Switch::Off
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Switch::Auto => "auto",
            Switch::On => "on",
            Switch::Off => "off",
        }
    }
}

impl Serialize for Switch {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Switch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum BoolOrStr {
            Bool(bool),
            Str(String),
        }
        match BoolOrStr::deserialize(d)? {
            BoolOrStr::Bool(true) => Ok(Switch::On),
            BoolOrStr::Bool(false) => Ok(Switch::Off),
            BoolOrStr::Str(s) => match s.trim() {
                "auto" => Ok(Switch::Auto),
                "on" | "true" => Ok(Switch::On),
                "off" | "false" => Ok(Switch::Off),
                other => Err(serde::de::Error::custom(format!(
                    "unknown value '{other}' (use auto, on or off)"
                ))),
            },
        }
    }
}

/// How an ST-GCN block is computed (`kernels.stgcn`). All give the same function to float
/// rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StGcnForm {
    /// The official layout `(N·M, C, T, V)`: 1×1 convolution, then
    /// `einsum("nkctv,kvw->nctw")`, `(9, 1)` convolutions. The readable reference.
    Reference,
    /// Channel-major activations `(1, C, N·M, T, V)`; aggregate the `C_in` input channels per
    /// partition first, then one `(C_out, K·C_in)` product with the bias inside it (the default:
    /// fewest passes over memory).
    #[default]
    AggFirst,
    /// Channel-major; `K` products `W_k x + b_k` first, then `Σ_k y_k @ (A_k ⊙ E_k)`.
    ConvFirst,
    /// Channel-major; aggregation first when `C_in < C_out`, convolution first otherwise.
    Auto,
}

impl StGcnForm {
    pub const ALL: [StGcnForm; 4] = [
        StGcnForm::Reference,
        StGcnForm::AggFirst,
        StGcnForm::ConvFirst,
        StGcnForm::Auto,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StGcnForm::Reference => "reference",
            StGcnForm::AggFirst => "agg_first",
            StGcnForm::ConvFirst => "conv_first",
            StGcnForm::Auto => "auto",
        }
    }
}

/// The fused CUDA kernels of batch norm (+ ReLU) and the block tail (`kernels.fused_cuda`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FusedCuda {
    /// Per op and shape, the faster of the fused kernels and the tch ops, timed once (default).
    #[default]
    Timed,
    /// Always the fused kernels (when they passed their self-check), no timing.
    On,
    /// Never (the tch ops).
    Off,
}

/// Side streams of the CUDA step for the independent encoder passes (`kernels.view_streams`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViewStreams {
    /// One side stream per view, shared by its query and key pass (at least 2; the default: the
    /// reserved memory stays below PyTorch's).
    #[default]
    Views,
    /// One side stream per pass (2 × views): about 2 % faster, about 10 % more reserved memory.
    Passes,
    /// Every pass on the caller's stream.
    Off,
}

impl ViewStreams {
    /// How many side streams a step over `views` views uses (0 = none).
    pub fn count(self, views: usize) -> usize {
        match self {
            ViewStreams::Views => views.max(2),
            ViewStreams::Passes => 2 * views,
            ViewStreams::Off => 0,
        }
    }
}

/// `auto` for the fused CPU batch norm and block tail: on where their AVX-512 paths run
/// ([`crate::gpu::cpu_avx512_kernels`]); their portable paths are slower than the tch ops
/// (1.17 s vs 0.94 s per SkeletonCLR step, batch 16, one thread, docs/cpu.md), so off elsewhere.
pub fn fused_cpu_default() -> bool {
    crate::gpu::cpu_avx512_kernels()
}

/// The kernel levers; see the module docs for what each does and the figures behind its default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Kernels {
    /// How a block is computed; see [`StGcnForm`].
    pub stgcn: StGcnForm,
    /// Fold the temporal and residual convolutions' biases into the train-mode batch norms that
    /// follow them (channel-major forms; `layers::BatchNorm::folding`). Auto: on CUDA.
    pub fold_bias: Switch,
    /// The graph aggregation as one op writing each partition's product into its slice (no
    /// permuting copy; csrc/aggregate.cpp). Off: product + copy. Auto: on.
    pub agg_op: Switch,
    /// Pack 4 rows of the graph product into one 16-byte-aligned row for cuBLAS
    /// (`aggregate::packed`). Auto: on CUDA.
    pub agg_pack: Switch,
    /// The fused CPU training batch norm (+ ReLU) (csrc/fused_bn.cpp). Auto: on where its AVX-512 path runs ([`fused_cpu_default`]).
    pub fused_bn: Switch,
    /// The fused CPU block tail `relu(dropout(bn(y)) + r)`. Auto: as `fused_bn`.
    pub fused_tail: Switch,
    /// The fused CUDA kernels; see [`FusedCuda`].
    pub fused_cuda: FusedCuda,
    /// Side streams of the CUDA step; see [`ViewStreams`].
    pub view_streams: ViewStreams,
    /// The caching CPU allocator (src/cpu_cache.rs), installed by the command at start-up.
    /// Auto: on.
    pub cpu_cache: Switch,
    /// Bytes the CPU cache keeps at most, in MiB; `null`: half of the machine's memory.
    pub cpu_cache_mb: Option<u64>,
    /// Map the CPU cache's blocks with transparent huge pages. Auto: on.
    pub cpu_huge_pages: Switch,
}

impl Default for Kernels {
    fn default() -> Self {
        Kernels {
            stgcn: StGcnForm::AggFirst,
            fold_bias: Switch::Auto,
            agg_op: Switch::Auto,
            agg_pack: Switch::Auto,
            fused_bn: Switch::Auto,
            fused_tail: Switch::Auto,
            fused_cuda: FusedCuda::Timed,
            view_streams: ViewStreams::Views,
            cpu_cache: Switch::Auto,
            cpu_cache_mb: None,
            cpu_huge_pages: Switch::Auto,
        }
    }
}

impl Kernels {
    /// The defaults resolved for `device`.
    pub fn for_device(device: Device) -> Kernels {
        Kernels::default().resolved(device)
    }

    /// Every `auto` replaced by the measured best for `device` (and the CPU cache's cap by its
    /// value), so that the set written to a work_dir says exactly what ran.
    pub fn resolved(&self, device: Device) -> Kernels {
        Kernels {
            fold_bias: self.fold_bias.resolve(device.is_cuda()),
            agg_op: self.agg_op.resolve(true),
            agg_pack: self.agg_pack.resolve(device.is_cuda()),
            fused_bn: self.fused_bn.resolve(fused_cpu_default()),
            fused_tail: self.fused_tail.resolve(fused_cpu_default()),
            cpu_cache: self.cpu_cache.resolve(true),
            cpu_cache_mb: Some(self.cpu_cache_mb.unwrap_or(
                (crate::cpu_cache::CpuCacheConfig::default().max_cached_bytes >> 20) as u64,
            )),
            cpu_huge_pages: self.cpu_huge_pages.resolve(true),
            ..*self
        }
    }

    /// Whether train-mode forwards on `device` fold convolution biases into batch norms.
    pub fn fold_bias_on(&self, device: Device) -> bool {
        self.fold_bias.on_or(device.is_cuda())
    }

    /// Whether the graph aggregation uses the copy-free op.
    pub fn agg_op_on(&self) -> bool {
        self.agg_op.on_or(true)
    }

    /// Whether graph products on `device` use packed rows.
    pub fn agg_pack_on(&self, device: Device) -> bool {
        self.agg_pack.on_or(device.is_cuda())
    }

    /// Whether the fused CPU batch norm may be used.
    pub fn fused_bn_on(&self) -> bool {
        self.fused_bn.on_or(fused_cpu_default())
    }

    /// Whether the fused CPU block tail may be used.
    pub fn fused_tail_on(&self) -> bool {
        self.fused_tail.on_or(fused_cpu_default())
    }

    /// The caching CPU allocator's settings, `None` when it is off.
    pub fn cpu_cache_config(&self) -> Option<crate::cpu_cache::CpuCacheConfig> {
        if !self.cpu_cache.on_or(true) {
            return None;
        }
        let mut cfg = crate::cpu_cache::CpuCacheConfig::default();
        if let Some(mb) = self.cpu_cache_mb {
            cfg.max_cached_bytes = (mb as usize) << 20;
        }
        cfg.huge_pages = self.cpu_huge_pages.on_or(true);
        Some(cfg)
    }

    /// One line for logs: `stgcn=agg_first fold_bias=off ...`.
    pub fn summary(&self) -> String {
        let mb = self
            .cpu_cache_mb
            .map_or_else(|| "auto".to_string(), |m| m.to_string());
        format!(
            "stgcn={} fold_bias={} agg_op={} agg_pack={} fused_bn={} fused_tail={} fused_cuda={} \
             view_streams={} cpu_cache={} cpu_cache_mb={mb} cpu_huge_pages={}",
            self.stgcn.name(),
            self.fold_bias.name(),
            self.agg_op.name(),
            self.agg_pack.name(),
            self.fused_bn.name(),
            self.fused_tail.name(),
            match self.fused_cuda {
                FusedCuda::Timed => "timed",
                FusedCuda::On => "on",
                FusedCuda::Off => "off",
            },
            match self.view_streams {
                ViewStreams::Views => "views",
                ViewStreams::Passes => "passes",
                ViewStreams::Off => "off",
            },
            self.cpu_cache.name(),
            self.cpu_huge_pages.name(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_resolves_to_the_measured_best_per_device() {
        let cpu = Kernels::for_device(Device::Cpu);
        assert_eq!(cpu.fold_bias, Switch::Off);
        assert_eq!(cpu.agg_pack, Switch::Off);
        assert_eq!(cpu.agg_op, Switch::On);
        // On where our fused CPU kernels have their AVX-512 paths (the portable ones lose to tch).
        let fused = if crate::gpu::cpu_avx512_kernels() {
            Switch::On
        } else {
            Switch::Off
        };
        assert_eq!(cpu.fused_bn, fused);
        assert_eq!(cpu.fused_tail, fused);
        assert!(cpu.cpu_cache_mb.is_some());
        let cuda = Kernels::for_device(Device::Cuda(0));
        assert_eq!(cuda.fold_bias, Switch::On);
        assert_eq!(cuda.agg_pack, Switch::On);
        // A forced choice survives resolution.
        let forced = Kernels {
            fold_bias: Switch::On,
            ..Kernels::default()
        };
        assert_eq!(forced.resolved(Device::Cpu).fold_bias, Switch::On);
    }

    #[test]
    fn yaml_round_trip_and_errors() {
        let k: Kernels =
            serde_yaml::from_str("stgcn: reference\nfold_bias: true\nfused_cuda: off\n").unwrap();
        assert_eq!(k.stgcn, StGcnForm::Reference);
        assert_eq!(k.fold_bias, Switch::On);
        assert_eq!(k.fused_cuda, FusedCuda::Off);
        assert_eq!(k.view_streams, ViewStreams::Views);
        let text = serde_yaml::to_string(&k).unwrap();
        assert_eq!(serde_yaml::from_str::<Kernels>(&text).unwrap(), k);
        let err = serde_yaml::from_str::<Kernels>("fold_bias: sometimes\n").unwrap_err();
        assert!(err.to_string().contains("use auto, on or off"), "{err}");
        assert!(serde_yaml::from_str::<Kernels>("wgrad_stream: on\n").is_err());
    }

    #[test]
    fn stream_counts() {
        assert_eq!(ViewStreams::Views.count(1), 2);
        assert_eq!(ViewStreams::Views.count(3), 3);
        assert_eq!(ViewStreams::Passes.count(3), 6);
        assert_eq!(ViewStreams::Off.count(3), 0);
    }
}
