//! Pre-training configuration mirroring the official CrosSCLR YAML keys (`work_dir`, `base_lr`,
//! `step`, `num_epoch`, `batch_size`, `weight_decay`, `model_args`, `train_feeder_args`, `topk`,
//! `context`, `cross_epoch`, `save_interval`, `view`, ...) plus our own keys (`model`, `seed`,
//! `device`, `workers`, `layout`, `dataset`, the faithfulness flags and the step implementation /
//! numeric-mode switches `step_impl`, `tf32`, `cudnn_benchmark`).
//!
//! A config is read from YAML or TOML (by extension; YAML otherwise), then `key=value` overrides with
//! dotted paths (`model_args.queue_size=1024`) are applied, values parsed as YAML scalars or lists.
//! Unknown keys are an error naming the dotted key. Defaults are the official 3-view values
//! (`config/CrosSCLR/crossclr_3views_xview.yaml`), so an official YAML loads as is.
use crate::data::formats::{DatasetFormat, DatasetSpec};
use crate::data::views::View;
use crate::error::{Error, Result};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Which self-supervised model to pre-train. Also accepts the official class paths
/// (`net.skeletonclr.SkeletonCLR`, `net.crossclr.CrosSCLR`, `net.crossclr_3views.CrosSCLR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Single-view MoCo v2 on the view named by `view`.
    Skeletonclr,
    /// CrosSCLR with joint + motion (official `net/crossclr.py`).
    Crossclr2,
    /// CrosSCLR with joint + motion + bone (official `net/crossclr_3views.py`).
    Crossclr3,
}

impl ModelKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "skeletonclr" | "net.skeletonclr.SkeletonCLR" => Some(Self::Skeletonclr),
            "crossclr2" | "crossclr" | "net.crossclr.CrosSCLR" => Some(Self::Crossclr2),
            "crossclr3" | "net.crossclr_3views.CrosSCLR" => Some(Self::Crossclr3),
            _ => None,
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Self::Skeletonclr => "skeletonclr",
            Self::Crossclr2 => "crossclr2",
            Self::Crossclr3 => "crossclr3",
        }
    }
}

impl<'de> Deserialize<'de> for ModelKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ModelKind::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown model '{s}' (use skeletonclr, crossclr2, crossclr3 or an official class path)"
            ))
        })
    }
}

/// `step_impl`: which implementation of the training step the loop runs.
///
/// * `reference`: `ssl::trainer::Pretrainer::train_step` (eager; reads the loss on the host and
///   checks it every step; `train::sgd::Sgd`).
/// * `fast`: `gpu::FastStep` (capture-safe, multi-tensor EMA, fused SGD, device-side queue
///   pointer; losses stay on the device and are read every `log_interval` steps and at epoch end).
/// * `graph`: `fast` captured into a CUDA graph per phase and replayed (CUDA only).
/// * `auto`: `graph` on CUDA (`fast` when the shim was built without CUDA graphs), `reference` on
///   CPU (the fast step is not faster there: the cost is in the encoder).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepImpl {
    #[default]
    Auto,
    Reference,
    Fast,
    Graph,
}

impl StepImpl {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "auto" => Some(Self::Auto),
            "reference" => Some(Self::Reference),
            "fast" => Some(Self::Fast),
            "graph" => Some(Self::Graph),
            _ => None,
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Reference => "reference",
            Self::Fast => "fast",
            Self::Graph => "graph",
        }
    }
}

/// `dist_backend`: the c10d process group of a data-parallel run (docs/distributed.md). `auto`
/// (the default): NCCL on a CUDA device when the binary was built with it, else Gloo; `gloo`:
/// Gloo on any device (CUDA tensors staged through the host); `nccl`: NCCL (CUDA only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DistBackend {
    #[default]
    Auto,
    Gloo,
    Nccl,
}

impl DistBackend {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "auto" => Some(Self::Auto),
            "gloo" => Some(Self::Gloo),
            "nccl" => Some(Self::Nccl),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for DistBackend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DistBackend::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "dist_backend: unknown value '{s}' (use auto, gloo or nccl)"
            ))
        })
    }
}

/// `tf32`: TF32 for float32 matmuls and convolutions on CUDA. `default` leaves libtorch's defaults
/// (cuBLAS matmul off, cuDNN conv on); `on` / `off` force both; `auto` (the default) is `on` on
/// CUDA. Ignored on CPU.
///
/// Why `auto` = `on`: the official encoder's 1×1 convolutions run on cuDNN, which uses TF32 by
/// PyTorch's default; ours are matrix products (cuBLAS, TF32 off by default), so libtorch's
/// defaults would run them at full fp32 precision, 40 % slower than the official numerics need
/// (H200, graph step: 22.9 vs 16.3 ms with TF32 + cuDNN autotuning, docs/gpu.md). TF32 also
/// covers the graph aggregation and the queue logits, which the official code runs in fp32;
/// PyTorch 1.7-1.11 trained MoCo-style models with TF32 matmuls by default. The encoder matches
/// the official fixture to 4e-4 relative with TF32 on (3e-7 off). `tf32=default` gives
/// libtorch's defaults, `tf32=off` full fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tf32Mode {
    #[default]
    Auto,
    Default,
    On,
    Off,
}

impl Tf32Mode {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "auto" => Some(Self::Auto),
            "default" => Some(Self::Default),
            "on" | "true" => Some(Self::On),
            "off" | "false" => Some(Self::Off),
            _ => None,
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Default => "default",
            Self::On => "on",
            Self::Off => "off",
        }
    }
    /// What this mode means on a CUDA device (`Auto` is `On`).
    pub fn on_cuda(self) -> Self {
        match self {
            Self::Auto => Self::On,
            m => m,
        }
    }
}

/// `cudnn_benchmark`: cuDNN autotuning (`torch.backends.cudnn.benchmark`). `true` / `false` (the
/// official YAML's booleans, also `on` / `off`) or `auto` (the default): on on CUDA, where it picks
/// the fastest convolution algorithm per shape once per process (the step's shapes are fixed).
/// Ignored on CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CudnnBenchmark {
    #[default]
    Auto,
    On,
    Off,
}

impl CudnnBenchmark {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "auto" => Some(Self::Auto),
            "on" | "true" => Some(Self::On),
            "off" | "false" => Some(Self::Off),
            _ => None,
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::On => "true",
            Self::Off => "false",
        }
    }
    /// Whether autotuning is on for a CUDA device (`Auto` is on).
    pub fn on_cuda(self) -> bool {
        self != Self::Off
    }
}

impl Serialize for CudnnBenchmark {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Auto => s.serialize_str("auto"),
            Self::On => s.serialize_bool(true),
            Self::Off => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for CudnnBenchmark {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = match BoolOrStr::deserialize(d)? {
            BoolOrStr::Bool(b) => b.to_string(),
            BoolOrStr::Str(s) => s,
        };
        CudnnBenchmark::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "cudnn_benchmark: unknown value '{s}' (use auto, true or false)"
            ))
        })
    }
}

/// A YAML value that may be a boolean (YAML 1.1 writers emit `on` / `off` as booleans) or a word.
#[derive(Deserialize)]
#[serde(untagged)]
enum BoolOrStr {
    Bool(bool),
    Str(String),
}

impl<'de> Deserialize<'de> for StepImpl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        StepImpl::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "step_impl: unknown value '{s}' (use auto, reference, fast or graph)"
            ))
        })
    }
}

impl<'de> Deserialize<'de> for Tf32Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = match BoolOrStr::deserialize(d)? {
            BoolOrStr::Bool(b) => b.to_string(),
            BoolOrStr::Str(s) => s,
        };
        Tf32Mode::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "tf32: unknown value '{s}' (use auto, default, on or off)"
            ))
        })
    }
}

/// `device`: our `cpu | cuda | cuda:N`, or the official list of GPU indices (`[0]` = `cuda:0`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DeviceArg {
    Name(String),
    Gpus(Vec<usize>),
}

impl DeviceArg {
    /// The `--device` string this stands for. Only single-device training is supported (the
    /// official code is single-GPU too: its enqueue is wrong under DataParallel).
    pub fn as_device_string(&self) -> Result<String> {
        match self {
            DeviceArg::Name(s) => Ok(s.clone()),
            DeviceArg::Gpus(v) if v.len() == 1 => Ok(format!("cuda:{}", v[0])),
            DeviceArg::Gpus(v) => Err(Error::config(format!(
                "device: {v:?}: exactly one GPU index is supported (the MoCo queue is single-device)"
            ))),
        }
    }
}

/// `model_args.graph_args` (official names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GraphArgs {
    /// `ntu-rgb+d` (= our `ntu25`) or any layout name/file `Layout::resolve` accepts.
    pub layout: String,
    /// Only `spatial` is implemented.
    pub strategy: String,
    /// Official default 1; only 1 is implemented.
    pub max_hop: usize,
    /// Official default 1; only 1 is implemented.
    pub dilation: usize,
}

impl Default for GraphArgs {
    fn default() -> Self {
        Self {
            layout: "ntu-rgb+d".into(),
            strategy: "spatial".into(),
            max_hop: 1,
            dilation: 1,
        }
    }
}

/// `model_args` (official names; `Temperature` keeps its capital T).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelArgs {
    /// Official `net.st_gcn.Model`; informational.
    pub base_encoder: String,
    /// Must be true for pre-training.
    pub pretrain: bool,
    /// Projection output size (128).
    pub feature_dim: i64,
    /// MoCo queue length K (32768); must be divisible by `batch_size`.
    pub queue_size: i64,
    /// Key-encoder EMA momentum m (0.999).
    #[serde(deserialize_with = "de_f64")]
    pub momentum: f64,
    /// Softmax temperature tau (0.07).
    #[serde(rename = "Temperature", deserialize_with = "de_f64")]
    pub temperature: f64,
    /// Two-layer MLP projection head (MoCo v2) instead of one Linear.
    pub mlp: bool,
    pub in_channels: i64,
    /// ST-GCN base width (16 = 1/4 of the standard ST-GCN).
    pub hidden_channels: i64,
    /// Backbone output size (256).
    pub hidden_dim: i64,
    /// Unused in pre-training (the head is replaced); kept for the official key set.
    pub num_class: i64,
    #[serde(deserialize_with = "de_f64")]
    pub dropout: f64,
    pub graph_args: GraphArgs,
    pub edge_importance_weighting: bool,
    /// Ours (official: true): the encoder's input batch norm over the joint coordinates; `false`
    /// skips it in training (see `model::stgcn::StGcnConfig::data_bn`).
    pub data_bn: bool,
}

impl Default for ModelArgs {
    fn default() -> Self {
        Self {
            base_encoder: "net.st_gcn.Model".into(),
            pretrain: true,
            feature_dim: 128,
            queue_size: 32768,
            momentum: 0.999,
            temperature: 0.07,
            mlp: true,
            in_channels: 3,
            hidden_channels: 16,
            hidden_dim: 256,
            num_class: 60,
            dropout: 0.5,
            graph_args: GraphArgs::default(),
            edge_importance_weighting: true,
            data_bn: true,
        }
    }
}

/// `train_feeder_args` (official names, including the official spelling `temperal_padding_ratio`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeederArgs {
    /// `*_position.npy` / `*_data.npy`, N x C x T x V x M float32. Ignored when `dataset` is set.
    pub data_path: PathBuf,
    /// `*_label.pkl`. Ignored when `dataset` is set.
    pub label_path: PathBuf,
    /// Shear amplitude (0.5); negative disables shear.
    #[serde(deserialize_with = "de_f64")]
    pub shear_amplitude: f64,
    /// Temporal crop padding ratio (6, i.e. pad T/6 frames each side); 0 disables the crop.
    pub temperal_padding_ratio: usize,
    /// Memory-map the data file.
    pub mmap: bool,
    // --- extra augmentations (ours, AimCLR's set; all off by default = official) ---
    /// Random rotation about each axis, uniform in `[-rotation, rotation]` degrees; 0 = off.
    #[serde(deserialize_with = "de_f64")]
    pub rotation: f64,
    /// Random rotation about the vertical axis only (a viewpoint change), uniform in
    /// `[-yaw, yaw]` degrees, after `rotation`; 0 = off.
    #[serde(deserialize_with = "de_f64")]
    pub yaw: f64,
    /// Probability of mirroring the x coordinate; 0 = off.
    #[serde(deserialize_with = "de_f64")]
    pub flip: f64,
    /// Standard deviation of additive Gaussian noise on every coordinate; 0 = off.
    #[serde(deserialize_with = "de_f64")]
    pub gaussian_noise: f64,
    /// Probability of a temporal Gaussian blur (kernel 15, sigma in [0.1, 2]); 0 = off.
    #[serde(deserialize_with = "de_f64")]
    pub gaussian_blur: f64,
    /// Probability of zeroing one random coordinate axis; 0 = off.
    #[serde(deserialize_with = "de_f64")]
    pub axis_mask: f64,
    /// Fraction of joints zeroed (whole sequence), drawn per sample; 0 = off.
    #[serde(deserialize_with = "de_f64")]
    pub joint_mask: f64,
    /// Temporal crop-resize: keep a random window of `[crop_resize, 1]` of the frames and resize
    /// it back to T by linear interpolation; 0 = off.
    #[serde(deserialize_with = "de_f64")]
    pub crop_resize: f64,
    /// Bone-length jitter: every bone (joint to its parent towards the layout's centre) of a view
    /// is scaled by its own factor, uniform in `[1 - bone_length, 1 + bone_length]`, for the
    /// whole sequence, and the skeleton is rebuilt from the centre; changes the body proportions
    /// that tell instances apart without telling classes apart. 0 = off.
    #[serde(deserialize_with = "de_f64")]
    pub bone_length: f64,
}

impl Default for FeederArgs {
    fn default() -> Self {
        Self {
            data_path: PathBuf::from("data/NTU60_frame50/xview/train_position.npy"),
            label_path: PathBuf::from("data/NTU-RGB-D/xview/train_label.pkl"),
            shear_amplitude: 0.5,
            temperal_padding_ratio: 6,
            mmap: true,
            rotation: 0.0,
            yaw: 0.0,
            flip: 0.0,
            gaussian_noise: 0.0,
            gaussian_blur: 0.0,
            axis_mask: 0.0,
            joint_mask: 0.0,
            crop_resize: 0.0,
            bone_length: 0.0,
        }
    }
}

impl FeederArgs {
    /// The pre-training augmentation these arguments describe.
    pub fn augment(&self) -> crate::data::augment::AugmentConfig {
        crate::data::augment::AugmentConfig {
            shear_amplitude: self.shear_amplitude,
            temporal_padding_ratio: self.temperal_padding_ratio,
            rotation_degrees: self.rotation,
            yaw_degrees: self.yaw,
            flip: self.flip,
            gaussian_noise: self.gaussian_noise,
            gaussian_blur: self.gaussian_blur,
            axis_mask: self.axis_mask,
            joint_mask: self.joint_mask,
            crop_resize: self.crop_resize,
            bone_length: self.bone_length,
        }
    }
}

/// Where a query's negatives come from (`negatives`). Ours; official: `queue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Negatives {
    /// The MoCo queue of earlier batches' keys (official).
    #[default]
    Queue,
    /// The other samples' keys of the same batch (SimCLR / MoCo v3 style): every candidate is
    /// computed by the current key encoder on the current batch, so a stale queue or batch
    /// statistics cannot tell the positive apart, and the key encoder may follow the query fast
    /// (low `momentum`). CVC-KM mines its neighbours in the batch too. The queue is still filled
    /// (the diagnostics' positive margin reads it) but no loss reads it.
    Batch,
    /// The batch's keys and the queue together.
    Both,
}

/// `init`: how the query (and independent key) encoders and heads are initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitScheme {
    /// The official `weights_init`: conv / linear weights N(0, 0.02), biases 0, BN weights
    /// N(1, 0.02), BN biases 0.
    #[default]
    Official,
    /// PyTorch's module defaults: conv / linear weights and biases U(-1/sqrt(fan_in),
    /// 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)), BN weights 1, biases 0.
    Pytorch,
}

/// `lr_schedule`: the per-epoch learning rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// Official: `base_lr * 0.1^#{s in step : epoch > s}`.
    #[default]
    Step,
    /// Half-cosine from `base_lr` to 0 over the epochs after warm-up (`step` ignored).
    Cosine,
}

/// `diagnostics`: collapse diagnostics computed during pre-training (see `train::diagnostics`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiagnosticsArgs {
    /// Every this many epochs (and at the last one); 0 = off.
    pub interval: usize,
    /// Training samples (a fixed, seeded subset) the diagnostics are computed on.
    pub samples: usize,
    /// A feature effective rank below this is reported as a collapse warning in the log.
    #[serde(deserialize_with = "de_f64")]
    pub rank_warning: f64,
}

impl Default for DiagnosticsArgs {
    fn default() -> Self {
        Self {
            interval: 1,
            samples: 256,
            rank_warning: 4.0,
        }
    }
}

/// `numerics.non_finite`: what a non-finite loss or gradient does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonFinitePolicy {
    /// Stop the run, naming the epoch, the step and the first non-finite tensor; the checkpoints
    /// on disk are the last good ones and `--resume` continues from them.
    #[default]
    Stop,
    /// Skip the step (no SGD update, no enqueue; the key encoders and batch-norm statistics the
    /// forward pass changed are restored), log it and count it in the epoch's `skipped_steps`;
    /// the run stops anyway after `max_skipped_steps` skips. Needs the reference step.
    Skip,
}

/// `numerics.on_divergence`: what an epoch whose mean loss is above `numerics.max_loss` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DivergencePolicy {
    /// Log a warning and go on.
    #[default]
    Warn,
    /// Stop before the epoch's checkpoint (the previous one stays the last good one).
    Stop,
}

/// `numerics`: the guards against non-finite values and divergence (ours; see
/// `docs/reliability.md`). A non-finite loss always ends or skips the step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NumericsArgs {
    /// `stop | skip`; see [`NonFinitePolicy`].
    pub non_finite: NonFinitePolicy,
    /// Check every gradient for NaN / Inf before the SGD step (reference step; one host sync).
    pub check_grads: bool,
    /// With `non_finite: skip`, the run stops after this many skipped steps in one invocation.
    pub max_skipped_steps: usize,
    /// Divergence bound on an epoch's mean loss: 0 = auto (twice the chance loss, the sum over
    /// the views of ln(1 + negatives per query)); a negative value turns the check off.
    #[serde(deserialize_with = "de_f64")]
    pub max_loss: f64,
    /// `warn | stop`; see [`DivergencePolicy`].
    pub on_divergence: DivergencePolicy,
}

impl Default for NumericsArgs {
    fn default() -> Self {
        Self {
            non_finite: NonFinitePolicy::Stop,
            check_grads: true,
            max_skipped_steps: 100,
            max_loss: 0.0,
            on_divergence: DivergencePolicy::Warn,
        }
    }
}

/// The full pre-training configuration. See the module docs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    /// Output folder: resolved config, log, metrics, curve, checkpoints.
    pub work_dir: PathBuf,
    /// `skeletonclr | crossclr2 | crossclr3` (or an official class path).
    pub model: ModelKind,
    pub model_args: ModelArgs,
    /// Official feeder class; informational (`feeder.ntu_feeder.Feeder_dual`).
    pub train_feeder: String,
    pub train_feeder_args: FeederArgs,
    /// Our dataset description; when set it replaces `train_feeder_args.data_path/label_path`.
    pub dataset: Option<DatasetSpec>,
    /// Layout for `train_feeder_args` data (`ntu25`, ...). Default: from `model_args.graph_args`.
    pub layout: Option<String>,
    /// SkeletonCLR: the view to learn (`joint | motion | bone | bone_motion`). CrosSCLR: `all`.
    pub view: String,
    // --- optimisation (official names) ---
    /// Only `SGD`.
    pub optimizer: String,
    #[serde(deserialize_with = "de_f64")]
    pub base_lr: f64,
    /// 1-based epochs after which the lr is multiplied by 0.1 (`lr = base * 0.1^#{s : epoch > s}`).
    pub step: Vec<usize>,
    pub num_epoch: usize,
    /// Official key; must be 0 (use `--resume` to continue a run).
    pub start_epoch: usize,
    pub batch_size: usize,
    /// Official key; unused in pre-training.
    pub test_batch_size: usize,
    #[serde(deserialize_with = "de_f64")]
    pub weight_decay: f64,
    /// Must be false (the official config uses plain momentum).
    pub nesterov: bool,
    /// SGD momentum; the official code hard-codes 0.9 (not to be confused with `model_args.momentum`).
    #[serde(deserialize_with = "de_f64")]
    pub sgd_momentum: f64,
    // --- CrosSCLR ---
    /// Neighbours mined per sample in CVC-KM (1).
    pub topk: i64,
    /// Use the context block `s_u * s_v` in CVC-KM.
    pub context: bool,
    /// Phase 2 (CVC-KM) runs for 1-based epochs `> cross_epoch`.
    pub cross_epoch: usize,
    // --- faithfulness flags (defaults reproduce the official code) ---
    /// Motion/bone heads = own Linear(256,256)-ReLU followed by the joint head's two Linears, shared.
    pub shared_head: bool,
    /// In phase 2 only the motion key encoder is EMA-updated.
    pub phase2_motion_ema_only: bool,
    /// Key encoders get their own random init (the official `apply(weights_init)` runs after the copy).
    pub independent_key_init: bool,
    // --- logging and checkpoints ---
    /// Save `epoch<N>` checkpoints every this many epochs (and `last` every epoch); -1 disables.
    pub save_interval: i64,
    /// k-NN monitor on `monitor` every this many epochs (and at the last); -1 = off (official key).
    pub eval_interval: i64,
    /// Log a step line every this many steps.
    pub log_interval: usize,
    // --- our own ---
    pub seed: u64,
    /// `cpu | cuda | cuda:N` or the official `[0]`; `--device` overrides it.
    pub device: DeviceArg,
    /// Loader worker threads (official `num_worker`).
    #[serde(alias = "num_worker")]
    pub workers: usize,
    // --- speed switches (no effect on the math beyond float rounding; TF32 lowers precision) ---
    /// `auto | reference | fast | graph`; see [`StepImpl`].
    pub step_impl: StepImpl,
    /// `auto | default | on | off`; see [`Tf32Mode`] (CUDA only).
    pub tf32: Tf32Mode,
    // --- small-data recipe levers (ours; defaults are the official behaviour) ---
    /// `official | pytorch`; see [`InitScheme`].
    pub init: InitScheme,
    /// Projection MLP with batch norm after its hidden Linear (MoCo v3 / SimCLR style):
    /// Linear -> BN -> ReLU -> Linear (new variables `fc.1.*`); official: no BN.
    pub head_bn: bool,
    /// Shuffle BN on one device: the key batch is permuted and split into this many groups with
    /// their own batch statistics, the query batch into the same number of groups in order, so a
    /// query and its key never share BN statistics (MoCo's shuffle BN). 0 or 1 = off (official).
    pub shuffle_bn: usize,
    /// SyncBatchNorm in a data-parallel run (docs/distributed.md): every batch norm of the
    /// encoders and heads, query and key side, normalises with the statistics of the global
    /// batch (all ranks' samples together), forward and backward, as `torch.nn.SyncBatchNorm`;
    /// the running statistics then agree on every rank without averaging. Off (the default):
    /// each rank's batch norms see its own share of the batch. No effect in a single-process run.
    pub sync_bn: bool,
    /// Shuffle BN across the ranks of a data-parallel run (MoCo's): the key inputs of every
    /// rank are gathered, permuted (one permutation of the global batch per step, shared by the
    /// views), each rank encodes its slice of the permuted batch, and the keys are gathered and
    /// un-permuted, so a query and its key never share batch statistics. A 2-rank run equals a
    /// 1-process run with `shuffle_bn: 2`. Off by default; no effect in a single process.
    pub dist_shuffle_bn: bool,
    /// `auto | gloo | nccl`: the process group of a data-parallel run; see [`DistBackend`].
    pub dist_backend: DistBackend,
    /// Gradient averaging in a data-parallel run (DDP's `bucket_cap_mb`): above 0, the
    /// gradients are packed into buckets of about this many MiB (in reverse parameter order) and
    /// each bucket's all-reduce starts while backward is still running (`dist::GradBuckets`);
    /// 0 (the default): one coalesced all-reduce after backward. Both give the same gradients;
    /// the measured rates are in docs/distributed.md. Not with side streams on CUDA (those keep
    /// the coalesced all-reduce).
    pub bucket_cap_mb: f64,
    /// Ours (default false, official): replace `model_args.queue_size` and `model_args.momentum`
    /// by the small-data rule of `train::schedule::scaled_to_data`, from the training set's size
    /// and the run's total steps (resolved when the run starts, logged and written to the
    /// work_dir's config.yaml). The `configs/small` presets turn it on; set it false to choose
    /// the two yourself.
    pub scale_to_data: bool,
    /// Time-reversed keys as extra negatives: each query also meets the key encoder's embedding
    /// of its own sample played backwards (one negative per sample and view), so the
    /// representation must keep the direction of time (raise vs lower, sit down vs stand up).
    /// Ours; official: false.
    pub reverse_negatives: bool,
    /// Weight of a uniformity term (Wang & Isola, on each batch's L2-normalised queries) added to
    /// every view's loss; ours, 0 = off (official).
    #[serde(deserialize_with = "de_f64")]
    pub uniformity: f64,
    /// `queue | batch | both`; see [`Negatives`].
    pub negatives: Negatives,
    /// `step | cosine`; see [`LrSchedule`].
    pub lr_schedule: LrSchedule,
    /// Linear lr warm-up over this many epochs (from base_lr / warmup_epochs); 0 = off (official).
    pub warmup_epochs: usize,
    /// Collapse diagnostics; see [`DiagnosticsArgs`].
    pub diagnostics: DiagnosticsArgs,
    /// Non-finite and divergence guards; see [`NumericsArgs`].
    pub numerics: NumericsArgs,
    /// A labelled held-out split for the k-NN monitor, run every `eval_interval` epochs
    /// (official key; -1 = off).
    pub monitor: Option<DatasetSpec>,
    /// cuDNN autotuning: `auto | true | false`; see [`CudnnBenchmark`] (CUDA only).
    pub cudnn_benchmark: CudnnBenchmark,
    /// Which kernels compute the encoder and the step (`kernels: {fold_bias: off, ...}`); `auto`
    /// values are resolved for the run's device at start-up and written resolved to the
    /// work_dir's config.yaml. See [`crate::model::kernels`].
    pub kernels: crate::model::kernels::Kernels,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            work_dir: PathBuf::from("work_dirs/crossclr_3views"),
            model: ModelKind::Crossclr3,
            model_args: ModelArgs::default(),
            train_feeder: "feeder.ntu_feeder.Feeder_dual".into(),
            train_feeder_args: FeederArgs::default(),
            dataset: None,
            layout: None,
            view: "all".into(),
            optimizer: "SGD".into(),
            base_lr: 0.1,
            step: vec![250],
            num_epoch: 300,
            start_epoch: 0,
            batch_size: 128,
            test_batch_size: 128,
            weight_decay: 1e-4,
            nesterov: false,
            sgd_momentum: 0.9,
            topk: 1,
            context: true,
            cross_epoch: 150,
            shared_head: true,
            phase2_motion_ema_only: true,
            independent_key_init: true,
            save_interval: 5,
            eval_interval: -1,
            log_interval: 100,
            seed: 0,
            device: DeviceArg::Name("cpu".into()),
            workers: 4,
            step_impl: StepImpl::Auto,
            tf32: Tf32Mode::Auto,
            cudnn_benchmark: CudnnBenchmark::Auto,
            init: InitScheme::Official,
            head_bn: false,
            shuffle_bn: 0,
            sync_bn: false,
            dist_shuffle_bn: false,
            dist_backend: DistBackend::Auto,
            bucket_cap_mb: 0.0,
            scale_to_data: false,
            reverse_negatives: false,
            uniformity: 0.0,
            negatives: Negatives::Queue,
            lr_schedule: LrSchedule::Step,
            warmup_epochs: 0,
            diagnostics: DiagnosticsArgs::default(),
            numerics: NumericsArgs::default(),
            monitor: None,
            kernels: Default::default(),
        }
    }
}

/// The dotted key of the first leaf of `tree` whose value alone makes the config fail to
/// deserialize (tried in the otherwise valid `schema` config), for error messages: serde names
/// the problem ("unknown variant `x`") but not the key.
fn bad_key(tree: &Value, schema: &Value) -> Option<String> {
    fn leaves(v: &Value, prefix: &str, out: &mut Vec<(String, Value)>) {
        match v.as_object() {
            Some(map) => {
                for (k, child) in map {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaves(child, &path, out);
                }
            }
            None => out.push((prefix.to_string(), v.clone())),
        }
    }
    serde_json::from_value::<PretrainConfig>(schema.clone()).ok()?;
    let mut all = Vec::new();
    leaves(tree, "", &mut all);
    all.into_iter().find_map(|(path, value)| {
        let mut t = schema.clone();
        let mut node = &mut t;
        for part in path.split('.') {
            if !node.is_object() {
                *node = Value::Object(Default::default());
            }
            node = node.as_object_mut()?.entry(part).or_insert(Value::Null);
        }
        *node = value;
        serde_json::from_value::<PretrainConfig>(t)
            .is_err()
            .then_some(path)
    })
}

/// Accepts a number or a numeric string (PyYAML reads `1e-4` as a string; so may other tools).
fn de_f64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(f64),
        Str(String),
    }
    match NumOrStr::deserialize(d)? {
        NumOrStr::Num(x) => Ok(x),
        NumOrStr::Str(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| serde::de::Error::custom(format!("expected a number, got '{s}'"))),
    }
}

impl PretrainConfig {
    /// The official defaults for `model` (SkeletonCLR: joint view), e.g. for benchmarks.
    pub fn with_model(model: ModelKind) -> Self {
        let view = if model == ModelKind::Skeletonclr {
            "joint"
        } else {
            "all"
        };
        Self {
            model,
            view: view.into(),
            ..Self::default()
        }
    }

    /// Reads `path` (YAML, or TOML when the extension is `.toml`), applies `key=value` overrides
    /// and validates. Errors name the file and the offending key.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let is_toml = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("toml"));
        Self::from_text(&text, is_toml, path, overrides)
    }

    /// Whether the config file at `path` (YAML, or TOML by extension) or one of the `key=value`
    /// overrides sets the dotted `key` (e.g. `model_args.in_channels`): comments and values that
    /// merely contain the word do not count.
    pub fn sets_key(path: &Path, overrides: &[String], key: &str) -> Result<bool> {
        if overrides
            .iter()
            .any(|o| o.split_once('=').is_some_and(|(k, _)| k.trim() == key))
        {
            return Ok(true);
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        crate::data::limits::check_yaml_text(&text, path)?;
        let is_toml = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("toml"));
        let tree: Value = if is_toml {
            toml::from_str(&text).map_err(|e| Error::input(path, "toml", e.to_string()))?
        } else {
            serde_yaml::from_str(&text).map_err(|e| Error::input(path, "yaml", e.to_string()))?
        };
        let mut node = &tree;
        for part in key.split('.') {
            match node.get(part) {
                Some(child) if !child.is_null() => node = child,
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Parses config `text` (`is_toml` selects the syntax; `source` is for messages).
    pub fn from_text(
        text: &str,
        is_toml: bool,
        source: &Path,
        overrides: &[String],
    ) -> Result<Self> {
        crate::data::limits::check_yaml_text(text, source)?;
        let mut tree: Value = if is_toml {
            toml::from_str(text).map_err(|e| Error::input(source, "toml", e.to_string()))?
        } else {
            serde_yaml::from_str(text).map_err(|e| {
                let place = e
                    .location()
                    .map(|l| format!("line {}", l.line()))
                    .unwrap_or_else(|| "yaml".into());
                Error::input(source, place, e.to_string())
            })?
        };
        if tree.is_null() {
            tree = Value::Object(Default::default());
        }
        if !tree.is_object() {
            return Err(Error::input(
                source,
                "top level",
                "expected a mapping of keys",
            ));
        }
        for o in overrides {
            apply_override(&mut tree, o)?;
        }
        Self::from_tree(tree, source)
    }

    /// Builds the config from a parsed tree: checks for unknown keys, deserializes, validates.
    fn from_tree(tree: Value, source: &Path) -> Result<Self> {
        let schema = serde_json::to_value(Self::schema_example())
            .map_err(|e| Error::Other(format!("config schema: {e}")))?;
        check_known_keys(&tree, &schema, "", source)?;
        let cfg: Self = serde_json::from_value(tree.clone()).map_err(|e| {
            let place = match bad_key(&tree, &schema) {
                Some(key) => format!("config key '{key}'"),
                None => "config".to_string(),
            };
            Error::input(source, place, e.to_string())
        })?;
        // Range errors name the file too (the key is the first word of the message).
        cfg.validate().map_err(|e| match e {
            Error::Config(msg) => match msg.split_once(": ") {
                Some((key, what)) if !key.contains(' ') => {
                    Error::input(source, format!("config key '{key}'"), what)
                }
                _ => Error::input(source, "config", msg),
            },
            other => other,
        })?;
        Ok(cfg)
    }

    /// A config with every optional key present, used as the key schema.
    fn schema_example() -> Self {
        let spec = DatasetSpec {
            format: DatasetFormat::Npy,
            data: PathBuf::new(),
            label: Some(PathBuf::new()),
            layout: String::new(),
            part: Some(String::new()),
            mmap: true,
        };
        Self {
            dataset: Some(spec.clone()),
            layout: Some(String::new()),
            monitor: Some(spec),
            ..Self::default()
        }
    }

    /// Checks value ranges and cross-key constraints.
    pub fn validate(&self) -> Result<()> {
        let a = &self.model_args;
        let bad = |k: &str, what: String| Err(Error::config(format!("{k}: {what}")));
        if self.batch_size == 0 {
            return bad("batch_size", "must be > 0".into());
        }
        if a.queue_size <= 0 || a.queue_size % self.batch_size as i64 != 0 {
            return bad(
                "model_args.queue_size",
                format!(
                    "{} must be a positive multiple of batch_size {} (the queue is written in whole batches)",
                    a.queue_size, self.batch_size
                ),
            );
        }
        if self.shuffle_bn > 1 && !self.batch_size.is_multiple_of(self.shuffle_bn) {
            return bad(
                "shuffle_bn",
                format!(
                    "{} groups must divide batch_size {}",
                    self.shuffle_bn, self.batch_size
                ),
            );
        }
        if self.shuffle_bn > 1 && self.batch_size / self.shuffle_bn < 2 {
            return bad(
                "shuffle_bn",
                format!(
                    "{} groups leave fewer than 2 samples per batch-norm group at batch_size {}",
                    self.shuffle_bn, self.batch_size
                ),
            );
        }
        if self.sync_bn && self.shuffle_bn > 1 {
            return bad(
                "sync_bn",
                format!(
                    "SyncBatchNorm normalises over the global batch, shuffle_bn {} over groups of it: \
                     choose one",
                    self.shuffle_bn
                ),
            );
        }
        if !(self.bucket_cap_mb.is_finite() && self.bucket_cap_mb >= 0.0) {
            return bad(
                "bucket_cap_mb",
                format!(
                    "{} is not a size in MiB (0 = one all-reduce after backward)",
                    self.bucket_cap_mb
                ),
            );
        }
        if self.dist_shuffle_bn && (self.sync_bn || self.shuffle_bn > 1) {
            return bad(
                "dist_shuffle_bn",
                format!(
                    "shuffle BN across ranks goes with neither sync_bn ({}) nor shuffle_bn {} on \
                     one process: choose one",
                    self.sync_bn, self.shuffle_bn
                ),
            );
        }
        let f = &self.train_feeder_args;
        for (k, v) in [
            ("train_feeder_args.flip", f.flip),
            ("train_feeder_args.gaussian_blur", f.gaussian_blur),
            ("train_feeder_args.axis_mask", f.axis_mask),
            ("train_feeder_args.joint_mask", f.joint_mask),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(k, format!("{v} must be a probability in [0, 1]"));
            }
        }
        if !(0.0..1.0).contains(&f.bone_length) {
            return bad(
                "train_feeder_args.bone_length",
                format!("{} must be in [0, 1) (0 = off)", f.bone_length),
            );
        }
        if !(0.0..=1.0).contains(&f.crop_resize) {
            return bad(
                "train_feeder_args.crop_resize",
                format!("{} must be in [0, 1] (0 = off)", f.crop_resize),
            );
        }
        for (k, v) in [
            ("train_feeder_args.rotation", f.rotation),
            ("train_feeder_args.yaw", f.yaw),
            ("train_feeder_args.gaussian_noise", f.gaussian_noise),
        ] {
            if !v.is_finite() || v < 0.0 {
                return bad(k, format!("{v} must be >= 0 (0 = off)"));
            }
        }
        if a.temperature.is_nan() || a.temperature <= 0.0 {
            return bad(
                "model_args.Temperature",
                format!("{} must be > 0", a.temperature),
            );
        }
        if !(0.0..=1.0).contains(&a.momentum) {
            return bad(
                "model_args.momentum",
                format!("{} must be in [0, 1]", a.momentum),
            );
        }
        if !(0.0..1.0).contains(&a.dropout) {
            return bad(
                "model_args.dropout",
                format!("{} must be in [0, 1)", a.dropout),
            );
        }
        if a.feature_dim <= 0 || a.hidden_dim <= 0 || a.hidden_channels <= 0 || a.in_channels <= 0 {
            return bad(
                "model_args",
                "feature_dim, hidden_dim, hidden_channels, in_channels must be > 0".into(),
            );
        }
        if !a.pretrain {
            return bad(
                "model_args.pretrain",
                "must be true for pre-training".into(),
            );
        }
        if a.graph_args.strategy != "spatial"
            || a.graph_args.max_hop != 1
            || a.graph_args.dilation != 1
        {
            return bad(
                "model_args.graph_args",
                "only strategy 'spatial' with max_hop 1 and dilation 1 is implemented".into(),
            );
        }
        if self.topk < 1 || self.topk > a.queue_size {
            return bad("topk", format!("{} must be in 1..=queue_size", self.topk));
        }
        if self.num_epoch == 0 {
            return bad("num_epoch", "must be > 0".into());
        }
        if self.start_epoch != 0 {
            return bad(
                "start_epoch",
                "must be 0; use --resume to continue a run".into(),
            );
        }
        if !self.optimizer.eq_ignore_ascii_case("sgd") {
            return bad(
                "optimizer",
                format!("'{}': only SGD is implemented", self.optimizer),
            );
        }
        if self.nesterov {
            return bad(
                "nesterov",
                "Nesterov momentum is not implemented (the official config uses false)".into(),
            );
        }
        let lr_ok = self.base_lr.is_finite() && self.base_lr > 0.0;
        let wd_ok = self.weight_decay.is_finite() && self.weight_decay >= 0.0;
        if !lr_ok || !wd_ok || !(0.0..1.0).contains(&self.sgd_momentum) {
            return bad("base_lr/weight_decay/sgd_momentum", "out of range".into());
        }
        if self.save_interval == 0 {
            return bad("save_interval", "must be > 0, or -1 to disable".into());
        }
        if self.numerics.max_loss.is_nan() {
            return bad(
                "numerics.max_loss",
                "must be a number (0 = auto, negative = off)".into(),
            );
        }
        if self.numerics.non_finite == NonFinitePolicy::Skip
            && matches!(self.step_impl, StepImpl::Fast | StepImpl::Graph)
        {
            return bad(
                "numerics.non_finite",
                format!(
                    "skip needs the reference step (the {} step applies its steps before it reads \
                     their losses); use step_impl=reference or auto",
                    self.step_impl.name()
                ),
            );
        }
        self.views()?;
        self.device.as_device_string()?;
        Ok(())
    }

    /// The views the model learns, in official order (joint first: it owns the shared head).
    pub fn views(&self) -> Result<Vec<View>> {
        match self.model {
            ModelKind::Skeletonclr => {
                let v = if self.view == "all" {
                    "joint"
                } else {
                    self.view.as_str()
                };
                let view: View = v.parse().map_err(|_| {
                    Error::config(format!(
                        "view: '{v}' (use joint, motion, bone or bone_motion)"
                    ))
                })?;
                Ok(vec![view])
            }
            ModelKind::Crossclr2 | ModelKind::Crossclr3 => {
                if self.view != "all" {
                    return Err(Error::config(format!(
                        "view: '{}': CrosSCLR pre-trains all its views; use view: all",
                        self.view
                    )));
                }
                Ok(if self.model == ModelKind::Crossclr2 {
                    vec![View::Joint, View::Motion]
                } else {
                    vec![View::Joint, View::Motion, View::Bone]
                })
            }
        }
    }

    /// The layout name for `train_feeder_args` data: `layout`, else `graph_args.layout`
    /// (`ntu-rgb+d` -> `ntu25`).
    pub fn layout_name(&self) -> String {
        if let Some(l) = &self.layout {
            return l.clone();
        }
        match self.model_args.graph_args.layout.as_str() {
            "ntu-rgb+d" => "ntu25".into(),
            other => other.into(),
        }
    }

    /// The training dataset: `dataset` if set, else built from `train_feeder_args`.
    pub fn dataset_spec(&self) -> DatasetSpec {
        self.dataset.clone().unwrap_or_else(|| DatasetSpec {
            format: DatasetFormat::Npy,
            data: self.train_feeder_args.data_path.clone(),
            label: Some(self.train_feeder_args.label_path.clone()),
            layout: self.layout_name(),
            part: None,
            mmap: self.train_feeder_args.mmap,
        })
    }

    /// The resolved config as YAML (what `work_dir/config.yaml` holds).
    pub fn to_yaml(&self) -> Result<String> {
        serde_yaml::to_string(self).map_err(|e| Error::Other(format!("config to yaml: {e}")))
    }
}

/// Applies one `dotted.key=value` override to the tree; the value is parsed as YAML
/// (scalar, `[list]` or `{map}`), falling back to a plain string.
pub fn apply_override(tree: &mut Value, spec: &str) -> Result<()> {
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| Error::config(format!("override '{spec}': expected key=value")))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|p| p.is_empty()) {
        return Err(Error::config(format!("override '{spec}': empty key")));
    }
    let value: Value = serde_yaml::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    let mut node = tree;
    for (i, part) in parts.iter().enumerate() {
        if node.is_null() {
            *node = Value::Object(Default::default());
        }
        let map = node.as_object_mut().ok_or_else(|| {
            Error::config(format!(
                "override '{spec}': '{}' is not a mapping",
                parts[..i].join(".")
            ))
        })?;
        if i + 1 == parts.len() {
            map.insert(part.to_string(), value);
            return Ok(());
        }
        node = map.entry(part.to_string()).or_insert(Value::Null);
    }
    Ok(())
}

/// Recursively checks every key of `tree` exists in `schema`; the error names the dotted key.
fn check_known_keys(tree: &Value, schema: &Value, prefix: &str, source: &Path) -> Result<()> {
    let (Some(t), Some(s)) = (tree.as_object(), schema.as_object()) else {
        return Ok(());
    };
    for (k, v) in t {
        let dotted = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        // `num_worker` is the official alias of `workers`.
        let lookup = if prefix.is_empty() && k == "num_worker" {
            "workers"
        } else {
            k.as_str()
        };
        match s.get(lookup) {
            None => {
                let mut known: Vec<&String> = s.keys().collect();
                known.sort();
                let known: Vec<&str> = known.iter().map(|s| s.as_str()).collect();
                return Err(Error::input(
                    source,
                    format!("key '{dotted}'"),
                    format!("unknown key (known here: {})", known.join(", ")),
                ));
            }
            Some(sub) => check_known_keys(v, sub, &dotted, source)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, ov: &[&str]) -> Result<PretrainConfig> {
        let ov: Vec<String> = ov.iter().map(|s| s.to_string()).collect();
        PretrainConfig::from_text(text, false, Path::new("t.yaml"), &ov)
    }

    #[test]
    fn data_parallel_batch_norm_switches() {
        let c = parse("", &[]).unwrap();
        assert!(!c.sync_bn && !c.dist_shuffle_bn, "off by default");
        let c = parse("sync_bn: true\n", &[]).unwrap();
        assert!(c.sync_bn);
        assert!(c.to_yaml().unwrap().contains("sync_bn: true"));
        let c = parse("", &["dist_shuffle_bn=true"]).unwrap();
        assert!(c.dist_shuffle_bn);
        assert!(c.to_yaml().unwrap().contains("dist_shuffle_bn: true"));
        assert_eq!(parse("", &[]).unwrap().bucket_cap_mb, 0.0, "off by default");
        let c = parse("bucket_cap_mb: 25\n", &[]).unwrap();
        assert_eq!(c.bucket_cap_mb, 25.0);
        assert!(c.to_yaml().unwrap().contains("bucket_cap_mb: 25"));
        let e = parse("", &["bucket_cap_mb=-1"]).unwrap_err().to_string();
        assert!(e.contains("bucket_cap_mb"), "{e}");
        for ov in [
            &["sync_bn=true", "shuffle_bn=2"][..],
            &["dist_shuffle_bn=true", "sync_bn=true"],
            &["dist_shuffle_bn=true", "shuffle_bn=2"],
        ] {
            let e = parse("", ov).unwrap_err().to_string();
            assert!(
                e.contains("sync_bn") || e.contains("shuffle_bn"),
                "{ov:?}: {e}"
            );
        }
    }

    #[test]
    fn official_yaml_keys_load() {
        let text = "work_dir: w\ntrain_feeder: feeder.ntu_feeder.Feeder_dual\ntrain_feeder_args:\n  data_path: a.npy\n  label_path: b.pkl\n  shear_amplitude: 0.5\n  temperal_padding_ratio: 6\n  mmap: True\nmodel: net.crossclr_3views.CrosSCLR\nmodel_args:\n  base_encoder: net.st_gcn.Model\n  pretrain: True\n  feature_dim: 128\n  queue_size: 32768\n  momentum: 0.999\n  Temperature: 0.07\n  mlp: True\n  in_channels: 3\n  hidden_channels: 16\n  hidden_dim: 256\n  num_class: 60\n  dropout: 0.5\n  graph_args:\n    layout: 'ntu-rgb+d'\n    strategy: 'spatial'\n  edge_importance_weighting: True\nnesterov: False\nweight_decay: 1e-4\nbase_lr: 0.1\noptimizer: SGD\nstep: [250]\ndevice: [0]\nbatch_size: 128\ntest_batch_size: 128\nnum_epoch: 300\nstart_epoch: 0\ntopk: 1\nview: 'all'\ncross_epoch: 150\ncontext: True\nsave_interval: 5\neval_interval: -1\n";
        let c = parse(text, &[]).unwrap();
        assert_eq!(c.model, ModelKind::Crossclr3);
        assert!((c.weight_decay - 1e-4).abs() < 1e-12);
        assert_eq!(c.device.as_device_string().unwrap(), "cuda:0");
        assert_eq!(c.layout_name(), "ntu25");
        assert_eq!(c.views().unwrap().len(), 3);
    }

    #[test]
    fn overrides_and_unknown_keys() {
        let c = parse(
            "model: skeletonclr\nview: motion\n",
            &[
                "model_args.queue_size=1024",
                "step=[3, 5]",
                "base_lr=1e-2",
                "batch_size=32",
            ],
        )
        .unwrap();
        assert_eq!(c.model_args.queue_size, 1024);
        assert_eq!(c.step, vec![3, 5]);
        assert_eq!(c.base_lr, 0.01);
        assert_eq!(c.views().unwrap(), vec![View::Motion]);
        let e = parse("model_args:\n  queue_sise: 10\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_args.queue_sise"), "{e}");
        let e = parse("", &["foo.bar=1"]).unwrap_err().to_string();
        assert!(e.contains("'foo'"), "{e}");
        let e = parse("batch_size: 100\n", &[]).unwrap_err().to_string();
        assert!(e.contains("queue_size"), "{e}");
    }

    #[test]
    fn toml_and_roundtrip() {
        let c = PretrainConfig::from_text(
            "model = \"crossclr2\"\nbatch_size = 8\n[model_args]\nqueue_size = 64\n",
            true,
            Path::new("t.toml"),
            &[],
        )
        .unwrap();
        assert_eq!(c.model_args.queue_size, 64);
        let y = c.to_yaml().unwrap();
        let back = PretrainConfig::from_text(&y, false, Path::new("r.yaml"), &[]).unwrap();
        assert_eq!(back, c);
    }
}

#[cfg(test)]
mod sets_key_tests {
    use super::*;

    #[test]
    fn sets_key_reads_keys_not_words() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("c.yaml");
        std::fs::write(
            &yaml,
            "# the layout and in_channels follow the data\nmodel_args:\n  graph_args:\n    layout: ntu25\nview: joint\n",
        )
        .unwrap();
        let none: Vec<String> = Vec::new();
        assert!(PretrainConfig::sets_key(&yaml, &none, "model_args.graph_args.layout").unwrap());
        assert!(!PretrainConfig::sets_key(&yaml, &none, "model_args.in_channels").unwrap());
        assert!(!PretrainConfig::sets_key(&yaml, &none, "layout").unwrap());
        let ov = vec!["model_args.in_channels=2".to_string()];
        assert!(PretrainConfig::sets_key(&yaml, &ov, "model_args.in_channels").unwrap());
        let toml = dir.path().join("c.toml");
        std::fs::write(&toml, "layout = \"coco17\" # in_channels\n").unwrap();
        assert!(PretrainConfig::sets_key(&toml, &none, "layout").unwrap());
        assert!(!PretrainConfig::sets_key(&toml, &none, "model_args.in_channels").unwrap());
        let e = PretrainConfig::sets_key(&dir.path().join("missing.yaml"), &none, "layout");
        assert!(e.unwrap_err().to_string().contains("missing.yaml"));
    }
}
