//! The 1/4-width ST-GCN encoder (official `net/st_gcn.py` `Model` without its `fc`).
//!
//! Variables carry the official names under the given [`tch::nn::Path`], so an official state
//! dict maps 1:1: `A` (buffer), `data_bn.*`, `st_gcn_networks.{i}.gcn.conv.*`,
//! `st_gcn_networks.{i}.tcn.{0,2,3}.*`, `st_gcn_networks.{i}.residual.{0,1}.*`,
//! `edge_importance.{i}`; batch-norm running statistics and `num_batches_tracked` are
//! non-trainable variables (saved and loaded, never optimised).
//!
//! Which code computes a forward is the encoder's [`Kernels`] (set once, [`StGcn::set_kernels`];
//! default: the measured best for the variables' device). Its forms compute the same function
//! (to float rounding):
//! - [`StGcnForm::Reference`]: the official data layout `(N·M, C, T, V)`, 1×1 convolution then
//!   `einsum("nkctv,kvw->nctw")`, `(9,1)` convolutions.
//! - the channel-major forms (default [`StGcnForm::AggFirst`], faster on the CPU and CUDA):
//!   activations are kept as `(1, C, N·M, T, V)`. Every 1×1 convolution is then one matrix
//!   product `(C_out, C_in) @ (C_in, N·M·T·V)` without any permute, batch norm works on the same
//!   tensor, and the temporal convolution is a `(1, 9, 1)` 3-D convolution over it. The graph
//!   aggregation multiplies the joint axis by `A ⊙ E`, before or after the 1×1 product.
use crate::data::layout::Layout;
use crate::model::graph;
pub use crate::model::kernels::{Kernels, StGcnForm};
use serde::{Deserialize, Serialize};
use tch::nn::Path;
use tch::Tensor;

pub mod aggregate;
mod dropout;
mod fused_bn;
pub mod fused_cuda;
mod fused_entry;
pub mod layers;

pub use dropout::{dropout, dropout_rows, RankRows};
use layers::{BatchNorm, Conv};

/// Encoder hyper-parameters (official names). Default = the CrosSCLR 1/4-width ST-GCN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StGcnConfig {
    pub in_channels: i64,
    pub hidden_channels: i64,
    pub hidden_dim: i64,
    /// Dropout of blocks 2-10 (block 1 has none).
    pub dropout: f64,
    pub edge_importance: bool,
    pub temporal_kernel: i64,
    /// The input batch norm over the V·C joint coordinates (`data_bn`; official: on). Off (ours,
    /// `model_args.data_bn: false`): training skips it, so it keeps its initial identity
    /// statistics and affine and eval-mode forwards pass the coordinates through unscaled (up to
    /// `1/sqrt(1 + eps)`); the checkpoint keeps the official key set.
    #[serde(default = "default_true")]
    pub data_bn: bool,
}

fn default_true() -> bool {
    true
}

impl Default for StGcnConfig {
    fn default() -> Self {
        StGcnConfig {
            in_channels: 3,
            hidden_channels: 16,
            hidden_dim: 256,
            dropout: 0.5,
            edge_importance: true,
            temporal_kernel: 9,
            data_bn: true,
        }
    }
}

/// Residual branch of a block.
#[derive(Debug)]
enum Residual {
    /// Block 1: no residual.
    None,
    /// `C_in == C_out` and stride 1.
    Identity,
    /// `residual.0` 1×1 conv with stride (s, 1), then `residual.1` batch norm.
    Conv(Conv, BatchNorm),
}

/// One `st_gcn` block.
#[derive(Debug)]
struct Block {
    /// `gcn.conv`: 1×1 conv `C_in -> K·C_out` (weight `(K·C_out, C_in, 1, 1)`).
    gcn: Conv,
    /// `tcn.0`, `tcn.2` (`(C_out, C_out, kt, 1)`, stride (s, 1)), `tcn.3`.
    bn1: BatchNorm,
    conv: Conv,
    bn2: BatchNorm,
    residual: Residual,
    stride: i64,
    dropout: f64,
    /// Spatial kernel size K.
    k: i64,
    /// This rank's rows of the global batch (data parallelism), for the dropout masks.
    rows: Option<RankRows>,
}

/// The ST-GCN encoder: `(N, C, T, V, M) -> (N, hidden_dim)` pooled features.
#[derive(Debug)]
pub struct StGcn {
    cfg: StGcnConfig,
    /// Buffer `A` `(K, V, V)`, index order `[k][source][destination]`.
    a: Tensor,
    data_bn: BatchNorm,
    blocks: Vec<Block>,
    /// `edge_importance.{i}` `(K, V, V)`, ones at init; empty when disabled.
    edge_importance: Vec<Tensor>,
    /// Which code computes the forward (resolved for the variables' device at construction).
    kernels: Kernels,
}

/// (C_in, C_out, stride, residual?) of the 10 blocks, as in the official `Model`.
fn block_plan(cfg: &StGcnConfig) -> Vec<(i64, i64, i64, bool)> {
    let h = cfg.hidden_channels;
    vec![
        (cfg.in_channels, h, 1, false),
        (h, h, 1, true),
        (h, h, 1, true),
        (h, h, 1, true),
        (h, 2 * h, 2, true),
        (2 * h, 2 * h, 1, true),
        (2 * h, 2 * h, 1, true),
        (2 * h, 4 * h, 2, true),
        (4 * h, 4 * h, 1, true),
        (4 * h, cfg.hidden_dim, 1, true),
    ]
}

impl StGcn {
    /// Creates the variables under `p` with the official names and the official initialisation
    /// (conv weights N(0, 0.02), biases 0, BN weights N(1, 0.02), edge importance 1).
    pub fn new(p: &Path, cfg: &StGcnConfig, layout: &Layout) -> StGcn {
        assert!(cfg.temporal_kernel % 2 == 1, "temporal_kernel must be odd");
        let a_init = graph::partition(layout).to_device(p.device());
        let a = p.add("A", a_init.to_kind(p.kind()), false);
        let (k, v) = (a.size()[0], a.size()[1]);
        let data_bn = BatchNorm::new(&(p / "data_bn"), cfg.in_channels * v);
        let nets = p / "st_gcn_networks";
        let blocks = block_plan(cfg)
            .into_iter()
            .enumerate()
            .map(|(i, (c_in, c_out, stride, has_residual))| {
                let bp = &nets / i;
                let gcn = Conv::new(&(&bp / "gcn" / "conv"), c_in, k * c_out, 1);
                let tcn = &bp / "tcn";
                let bn1 = BatchNorm::new(&(&tcn / 0), c_out);
                let conv = Conv::new(&(&tcn / 2), c_out, c_out, cfg.temporal_kernel);
                let bn2 = BatchNorm::new(&(&tcn / 3), c_out);
                let residual = if !has_residual {
                    Residual::None
                } else if c_in == c_out && stride == 1 {
                    Residual::Identity
                } else {
                    let rp = &bp / "residual";
                    Residual::Conv(
                        Conv::new(&(&rp / 0), c_in, c_out, 1),
                        BatchNorm::new(&(&rp / 1), c_out),
                    )
                };
                // Official: block 1 gets no dropout argument.
                let dropout = if i == 0 { 0.0 } else { cfg.dropout };
                Block {
                    gcn,
                    bn1,
                    conv,
                    bn2,
                    residual,
                    stride,
                    dropout,
                    k,
                    rows: None,
                }
            })
            .collect::<Vec<_>>();
        let edge_importance = if cfg.edge_importance {
            let ep = p / "edge_importance";
            (0..blocks.len())
                .map(|i| ep.var(&i.to_string(), &[k, v, v], tch::nn::Init::Const(1.0)))
                .collect()
        } else {
            Vec::new()
        };
        StGcn {
            cfg: cfg.clone(),
            a,
            data_bn,
            blocks,
            edge_importance,
            kernels: Kernels::for_device(p.device()),
        }
    }

    /// Feature dimension of [`StGcn::forward`] (`hidden_dim`).
    pub fn out_dim(&self) -> i64 {
        self.cfg.hidden_dim
    }

    pub fn config(&self) -> &StGcnConfig {
        &self.cfg
    }

    /// Chooses the code that computes forwards (see [`Kernels`]; the default is
    /// [`Kernels::for_device`] of the variables' device).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// SyncBatchNorm: with a group, every batch norm of a train-mode forward uses the statistics
    /// of all ranks' batches together (`crate::dist::ProcessGroup::sync_batch_norm`); `None`
    /// (the default): this process's batch. Eval-mode forwards use the running statistics
    /// either way.
    pub fn set_sync_bn(&mut self, group: Option<std::sync::Arc<crate::dist::ProcessGroup>>) {
        self.data_bn.sync = group.clone();
        for b in &mut self.blocks {
            b.bn1.sync = group.clone();
            b.bn2.sync = group.clone();
            if let Residual::Conv(_, bn) = &mut b.residual {
                bn.sync = group.clone();
            }
        }
    }

    /// Data parallelism: this process's rows of the global batch, so that the dropout masks are
    /// the ranks' shares of one global draw (see [`dropout_rows`]) instead of the same mask on
    /// every rank (the ranks' torch generators are in the same state). `None`: one process.
    pub fn set_rank_rows(&mut self, rows: Option<RankRows>) {
        for b in &mut self.blocks {
            b.rows = rows;
        }
    }

    /// The kernel choices forwards use.
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// `A ⊙ E_i` for block `i`, `(K, V, V)`.
    fn graph_of(&self, i: usize) -> Tensor {
        match self.edge_importance.get(i) {
            Some(e) => &self.a * e,
            None => self.a.shallow_clone(),
        }
    }

    /// `x`: `(N, C, T, V, M)` -> `(N, hidden_dim)`: pooled features (mean over T', V, then over
    /// the M bodies, absent all-zero bodies included). `train`: batch-statistics batch norm
    /// (running statistics updated) and dropout.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let s = x.size();
        assert_eq!(
            s.len(),
            5,
            "StGcn::forward expects (N, C, T, V, M), got {s:?}"
        );
        let (n, c, t, v, m) = (s[0], s[1], s[2], s[3], s[4]);
        // data_bn over V·C channels, channel index v·C + c; rows are the N·M bodies.
        let xb = x
            .permute([0, 4, 3, 1, 2])
            .contiguous()
            .view([n * m, v * c, t]);
        let kernels = &self.kernels;
        let xb = if train && !self.cfg.data_bn {
            xb.view([n * m, v, c, t])
        } else {
            self.data_bn
                .forward(&xb, train, kernels)
                .view([n * m, v, c, t])
        };
        match kernels.stgcn {
            StGcnForm::Reference => {
                let mut h = xb.permute([0, 2, 3, 1]).contiguous(); // (N·M, C, T, V)
                for (i, b) in self.blocks.iter().enumerate() {
                    h = b.forward_reference(&h, &self.graph_of(i), train, kernels);
                }
                // avg-pool over (T', V), then mean over M.
                h.mean_dim([2i64, 3].as_slice(), false, None)
                    .view([n, m, -1])
                    .mean_dim([1i64].as_slice(), false, None)
            }
            StGcnForm::AggFirst | StGcnForm::ConvFirst | StGcnForm::Auto => {
                let mut h = xb.permute([2, 0, 3, 1]).contiguous().unsqueeze(0); // (1, C, N·M, T, V)
                for (i, b) in self.blocks.iter().enumerate() {
                    h = b.forward_channel_major(&h, &self.graph_of(i), train, kernels);
                }
                let ch = h.size()[1];
                // (1, C, N·M, T', V) -> mean over (T', V) -> (C, N, M) -> mean over M -> (N, C)
                h.mean_dim([3i64, 4].as_slice(), false, None)
                    .view([ch, n, m])
                    .mean_dim([2i64].as_slice(), false, None)
                    .transpose(0, 1)
            }
        }
    }
}

impl Block {
    fn c_out(&self) -> i64 {
        self.conv.c_out()
    }

    // ---- Reference formulation: x (N·M, C, T, V) ----

    fn forward_reference(&self, x: &Tensor, g: &Tensor, train: bool, kernels: &Kernels) -> Tensor {
        let res = match &self.residual {
            Residual::None => None,
            Residual::Identity => Some(x.shallow_clone()),
            Residual::Conv(conv, bn) => {
                let r = x.conv2d(
                    &conv.weight,
                    Some(&conv.bias),
                    [self.stride, 1],
                    [0, 0],
                    [1, 1],
                    1,
                );
                Some(bn.forward(&r, train, kernels))
            }
        };
        let s = x.size();
        let y = x.conv2d(
            &self.gcn.weight,
            Some(&self.gcn.bias),
            [1, 1],
            [0, 0],
            [1, 1],
            1,
        );
        let y = y.view([s[0], self.k, self.c_out(), s[2], s[3]]);
        let y = Tensor::einsum("nkctv,kvw->nctw", &[&y, g], None::<i64>);
        let y = self.bn1.forward(&y, train, kernels).relu();
        let pad = (self.conv.weight.size()[2] - 1) / 2;
        let y = y.conv2d(
            &self.conv.weight,
            Some(&self.conv.bias),
            [self.stride, 1],
            [pad, 0],
            [1, 1],
            1,
        );
        // Rows of the (N·M, C, T, V) layout are dim 0.
        let y = dropout_rows(
            &self.bn2.forward(&y, train, kernels),
            self.dropout,
            train,
            self.rows,
            0,
        );
        match res {
            Some(r) => (y + r).relu(),
            None => y.relu(),
        }
    }

    // ---- Channel-major formulation: x (1, C, N·M, T, V) ----

    fn forward_channel_major(
        &self,
        x: &Tensor,
        g: &Tensor,
        train: bool,
        kernels: &Kernels,
    ) -> Tensor {
        // With `fold` (train mode) the biases of the temporal and the residual convolutions are
        // folded into the batch norms that follow them (`BatchNorm::folding`): same outputs,
        // running statistics and parameter updates, two passes over the activation fewer per
        // convolution.
        let fold = train && kernels.fold_bias_on(x.device());
        let y = self.aggregate(x, g, kernels);
        let y = self.tcn(&y, train, fold, kernels);
        self.add_residual(y, x, train, fold, kernels)
    }

    /// `gcn`: 1×1 conv to K·C_out channels and graph aggregation with `g = A ⊙ E` `(K, V, W)`.
    /// `(1, C_in, N·M, T, V) -> (1, C_out, N·M, T, V)`.
    ///
    /// Only 2-D matrix products on contiguous views: their backward passes need no copies
    /// (batched or broadcast products copy their transposed operands on the CPU).
    fn aggregate(&self, x: &Tensor, g: &Tensor, kernels: &Kernels) -> Tensor {
        let s = x.size();
        let (c_in, rows, t, v) = (s[1], s[2] * s[3], s[3], s[4]);
        let (k, c) = (self.k, self.c_out());
        let agg_first = match kernels.stgcn {
            StGcnForm::ConvFirst => false,
            StGcnForm::Auto => c_in < c,
            StGcnForm::AggFirst | StGcnForm::Reference => true,
        };
        let w = self.gcn.matrix(); // (K·C, C_in), rows k·C + c
        let x2 = x.view([c_in * rows, v]);
        if agg_first {
            // z = [x g_0; x g_1; ...] (K·C_in, R·W): K products x (C_in·R, V) @ g_k written into
            // the slices of z (`aggregate::aggregate_first`; no permuting copy either way, 4-8%
            // off a CPU SkeletonCLR step at batch 128);
            // out = W_c (C, K·C_in) @ z with W_c[c, (k, ci)] = weight[k·C + c, ci].
            // On CUDA, 4 rows of 25 joints are packed into one so that cuBLAS gets 16-byte
            // aligned rows (`aggregate::packed`).
            // The bias goes inside the product: z gets K rows of column sums per row block,
            // [colsum_k[w] for each (row, w)], and W_c gets the bias b[k, c] as K more columns,
            // so out = [W_c b] @ [z; S] without a pass over the output for the add nor one over
            // its gradient for the bias gradient (a separate broadcast add was measured slower:
            // H100 SkeletonCLR 18.19 vs 17.80 ms, CPU 1.03x the wall time).
            // With packed rows (CUDA) `pad` zero rows / columns keep the weight operand's rows a
            // multiple of 4 floats long (16-byte aligned for cuBLAS).
            let pack = aggregate::packing(v, kernels.agg_pack_on(x.device()));
            let wc = w
                .view([k, c, c_in])
                .permute([1, 0, 2])
                .reshape([c, k * c_in]);
            let inner = k * c_in + k;
            let pad = if pack > 1 { (4 - inner % 4) % 4 } else { 0 };
            let z = aggregate::packed_with_colsums(&x2, g, pack, rows, pad, kernels.agg_op_on())
                .view([inner + pad, rows * v]);
            let bias_cols = self.gcn.bias.view([k, c]).transpose(0, 1);
            let wb = if pad > 0 {
                let zeros = Tensor::zeros([c, pad], (wc.kind(), wc.device()));
                Tensor::cat(&[wc, bias_cols, zeros], 1)
            } else {
                Tensor::cat(&[wc, bias_cols], 1)
            };
            wb.mm(&z).view([1, c, s[2], t, v])
        } else {
            // y_k = W_k x + b_k (C, R·V) as K separate products (slicing one big product would
            // cost K full-size zero-filled gradients in backward); out = sum_k y_k @ g_k.
            let bias = self.gcn.bias.view([k * c, 1]);
            let x2 = x.view([c_in, rows * v]);
            let mut out: Option<Tensor> = None;
            for kk in 0..k {
                let yk = bias
                    .narrow(0, kk * c, c)
                    .addmm(&w.narrow(0, kk * c, c), &x2)
                    .view([c * rows, v]);
                let gk = g.get(kk);
                out = Some(match out {
                    None => yk.mm(&gk),
                    Some(o) => o.addmm(&yk, &gk),
                });
            }
            out.expect("K >= 1").view([1, c, s[2], t, v])
        }
    }

    /// `tcn` up to its convolution: BN -> ReLU -> (kt, 1) conv with stride (s, 1) (the second BN
    /// and the dropout are fused with the residual sum in [`Block::add_residual`]).
    /// `(1, C, N·M, T, V) -> (1, C, N·M, T', V)`.
    /// With `fold`, the convolution has no bias: [`Block::add_residual`] folds it into `bn2`.
    fn tcn(&self, y: &Tensor, train: bool, fold: bool, kernels: &Kernels) -> Tensor {
        let y = self.bn1.forward_relu(y, train, kernels);
        let w = &self.conv.weight;
        let pad = (w.size()[2] - 1) / 2;
        let bias = (!fold).then_some(&self.conv.bias);
        // (kt, 1) as a (1, kt, 1) 3-D convolution over (1, C, N·M, T, V).
        y.conv3d(
            &w.unsqueeze(2),
            bias,
            [1, self.stride, 1],
            [0, pad, 0],
            [1, 1, 1],
            1,
        )
    }

    /// `relu(dropout(bn2(y)) + residual(x))`; `x` `(1, C_in, N·M, T, V)`, `y` the temporal
    /// convolution output `(1, C_out, N·M, T', V)`. The residual is computed first, then the tail
    /// runs as one fused op on the CPU in train mode (see `stgcn/fused_bn.rs`
    /// `bn_dropout_add_relu`), else as BN -> dropout -> in-place add -> in-place ReLU.
    /// With `fold` (train mode only), `y` comes without the temporal convolution's bias and the
    /// residual convolution runs without its bias; both are folded into their batch norms.
    fn add_residual(
        &self,
        y: Tensor,
        x: &Tensor,
        train: bool,
        fold: bool,
        kernels: &Kernels,
    ) -> Tensor {
        let r = match &self.residual {
            Residual::None => None,
            Residual::Identity => Some(x.shallow_clone()),
            Residual::Conv(conv, bn) => {
                let xs = if self.stride > 1 {
                    x.slice(3, 0, None, self.stride).contiguous()
                } else {
                    x.shallow_clone()
                };
                let s = xs.size();
                let shape = [1, conv.c_out(), s[2], s[3], s[4]];
                let xm = xs.view([s[1], -1]);
                Some(if fold {
                    let r = conv.matrix().mm(&xm).view(shape);
                    bn.folding(&conv.bias).forward(&r, train, kernels)
                } else {
                    let r = conv.bias.view([-1, 1]).addmm(&conv.matrix(), &xm);
                    bn.forward(&r.view(shape), train, kernels)
                })
            }
        };
        if fold {
            let bn2 = self.bn2.folding(&self.conv.bias);
            fused_bn::bn_dropout_add_relu(
                &y,
                &bn2,
                self.dropout,
                r.as_ref(),
                train,
                kernels,
                self.rows,
            )
        } else {
            fused_bn::bn_dropout_add_relu(
                &y,
                &self.bn2,
                self.dropout,
                r.as_ref(),
                train,
                kernels,
                self.rows,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::Switch;
    use tch::nn::VarStore;
    use tch::{Device, Kind};

    fn tiny_cfg() -> StGcnConfig {
        StGcnConfig {
            hidden_channels: 4,
            hidden_dim: 16,
            dropout: 0.0,
            ..Default::default()
        }
    }

    #[test]
    fn default_has_official_parameter_count_and_names() {
        let vs = VarStore::new(Device::Cpu);
        let _net = StGcn::new(&vs.root(), &StGcnConfig::default(), &Layout::ntu25());
        let vars = vs.variables();
        let trainable: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        assert_eq!(trainable, 821_380);
        for name in [
            "A",
            "data_bn.running_var",
            "data_bn.num_batches_tracked",
            "st_gcn_networks.0.gcn.conv.weight",
            "st_gcn_networks.4.residual.0.weight",
            "st_gcn_networks.9.residual.1.running_mean",
            "st_gcn_networks.3.tcn.2.weight",
            "edge_importance.3",
        ] {
            assert!(vars.contains_key(name), "missing {name}");
        }
        assert!(!vars.contains_key("st_gcn_networks.1.residual.0.weight"));
        assert_eq!(
            vars["st_gcn_networks.9.gcn.conv.weight"].size(),
            vec![768, 64, 1, 1]
        );
        assert_eq!(vars["data_bn.num_batches_tracked"].kind(), Kind::Int64);
    }

    #[test]
    fn data_bn_off_skips_the_input_batch_norm() {
        let layout = Layout::ntu25();
        let x = Tensor::randn([4, 3, 12, 25, 2], (Kind::Float, Device::Cpu)) * 0.3 + 0.1;
        let run = |data_bn: bool| {
            tch::manual_seed(3);
            let vs = VarStore::new(Device::Cpu);
            let cfg = StGcnConfig {
                data_bn,
                ..tiny_cfg()
            };
            let net = StGcn::new(&vs.root(), &cfg, &layout);
            let y = net.forward(&x, true);
            y.sum(Kind::Float).backward();
            let vars = vs.variables();
            let stats = vars["data_bn.running_mean"].abs().max().double_value(&[]);
            let weight_grad = vars["data_bn.weight"].grad();
            (y, stats, weight_grad.defined())
        };
        let (on, stats_on, grad_on) = run(true);
        let (off, stats_off, grad_off) = run(false);
        assert!(
            stats_on > 0.0 && grad_on,
            "data_bn on: statistics move, weights learn"
        );
        // Off: statistics and affine stay at their identity init (no gradient), so an eval
        // forward passes the coordinates through data_bn unchanged (up to 1/sqrt(1 + eps)).
        assert_eq!(stats_off, 0.0);
        assert!(!grad_off);
        assert!(!on.allclose(&off, 1e-5, 1e-6, false));
    }

    #[test]
    fn formulations_agree_in_train_and_eval() {
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let mut net = StGcn::new(&vs.root(), &tiny_cfg(), &Layout::ntu25());
        let x = Tensor::randn([2, 3, 12, 25, 2], (Kind::Float, Device::Cpu));
        let with_form = |stgcn| Kernels {
            stgcn,
            ..Kernels::for_device(Device::Cpu)
        };
        // Eval first (train mode updates the running statistics).
        let mut evals = Vec::new();
        for form in StGcnForm::ALL {
            net.set_kernels(with_form(form));
            let y = net.forward(&x, false);
            assert_eq!(y.size(), vec![2, 16]);
            evals.push(y);
        }
        let mut outs = Vec::new();
        for (form, y) in StGcnForm::ALL.into_iter().zip(evals) {
            net.set_kernels(with_form(form));
            let yt = tch::no_grad(|| net.forward(&x, true));
            outs.push((y, yt));
        }
        for (y, yt) in &outs[1..] {
            let d = (y - &outs[0].0).abs().max().double_value(&[]);
            let dt = (yt - &outs[0].1).abs().max().double_value(&[]);
            assert!(d < 1e-5 && dt < 1e-5, "eval diff {d}, train diff {dt}");
        }
    }

    /// A tiny encoder whose variables are copied from `src` (the same values in every call, without
    /// depending on libtorch's global generator, which tests running in parallel share).
    fn copy_of(src: &VarStore, kind: Kind) -> (VarStore, StGcn) {
        let mut vs = VarStore::new(Device::Cpu);
        let net = StGcn::new(&vs.root(), &tiny_cfg(), &Layout::ntu25());
        if kind == Kind::Double {
            vs.double();
        }
        vs.copy(src).unwrap();
        (vs, net)
    }

    /// A tiny encoder's variables with those that `pick` selects set to N(`mean`, 0.5²) draws.
    fn randomized(mean: f64, pick: impl Fn(&str) -> bool) -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        let _net = StGcn::new(&vs.root(), &tiny_cfg(), &Layout::ntu25());
        tch::no_grad(|| {
            for (name, mut t) in vs.variables() {
                if pick(&name) {
                    t.copy_(&(Tensor::randn_like(&t) * 0.5 + mean));
                }
            }
        });
        vs
    }

    /// The graph-convolution bias inside the 1×1 product (column-sum rows, aggregate first)
    /// gives the same outputs and gradients as the convolution-first form's separate biases, with
    /// non-zero biases and edge importance, in float64 (unpacked rows on the CPU; aggregate.rs
    /// compares the packed op with the unpacked).
    #[test]
    fn gcn_bias_in_the_product_matches_the_add() {
        let src = randomized(1.0, |name| {
            name.ends_with(".bias") || name.starts_with("edge_importance")
        });
        let x = Tensor::randn([2, 3, 12, 25, 2], (Kind::Double, Device::Cpu));
        let w = Tensor::randn([2, 16], (Kind::Double, Device::Cpu));
        let run = |in_product: bool| {
            let (vs, mut net) = copy_of(&src, Kind::Double);
            net.set_kernels(Kernels {
                stgcn: if in_product {
                    StGcnForm::AggFirst
                } else {
                    StGcnForm::ConvFirst
                },
                ..Kernels::for_device(Device::Cpu)
            });
            let y = net.forward(&x, true);
            (&y * &w).sum(Kind::Double).backward();
            let mut grads: Vec<(String, Tensor)> = vs
                .trainable_variables()
                .iter()
                .map(|t| t.grad())
                .enumerate()
                .map(|(i, g)| (i.to_string(), g))
                .collect();
            grads.push(("out".into(), y.detach()));
            grads.push(("eval".into(), tch::no_grad(|| net.forward(&x, false))));
            grads
        };
        let (want, got) = (run(false), run(true));
        for ((name, a), (_, b)) in want.iter().zip(&got) {
            let scale = a.abs().max().double_value(&[]).max(1.0);
            let d = (a - b).abs().max().double_value(&[]);
            assert!(d < 1e-10 * scale, "{name}: {d}");
        }
    }

    /// Folding the conv biases into the batch norms changes nothing but float rounding: train
    /// outputs, running statistics, every gradient (the folded biases' exactly zero, PyTorch's
    /// float noise) and the eval outputs after training, with non-zero biases: to 1e-10 in float64
    /// (tch ops) and to float32 rounding through the fused CPU batch-norm ops (outputs and
    /// statistics 1e-3 absolute, gradients 0.1 relative L2). Why the float32 gradients get a
    /// loose bound: a ReLU input within rounding of 0 can fall on the other side in the other
    /// form, which moves the gradients behind it; in 40 runs on random inputs the largest
    /// relative difference was below 4e-5 in 38 and 5e-3 / 1.9e-2 in two (one such flip), while a
    /// wrong gradient path differs by O(1); float64 checks the gradients to 1e-10.
    #[test]
    fn folded_biases_give_the_same_training() {
        folded_vs_plain(Kind::Double, 1e-10, 1e-10);
        folded_vs_plain(Kind::Float, 1e-3, 0.1);
    }

    fn folded_vs_plain(kind: Kind, tol: f64, grad_tol: f64) {
        let src = randomized(0.3, |name| name.ends_with(".bias"));
        let x = Tensor::randn([3, 3, 12, 25, 2], (kind, Device::Cpu));
        let w = Tensor::randn([3, 16], (kind, Device::Cpu));
        let run = |fold: bool| {
            let (vs, mut net) = copy_of(&src, kind);
            net.set_kernels(Kernels {
                fold_bias: if fold { Switch::On } else { Switch::Off },
                ..Kernels::for_device(Device::Cpu)
            });
            let mut outs = Vec::new();
            for _ in 0..2 {
                let y = net.forward(&x, true);
                (&y * &w).sum(kind).backward();
                outs.push(y.detach());
            }
            outs.push(tch::no_grad(|| net.forward(&x, false)));
            (vs, outs)
        };
        let (vs_plain, plain) = run(false);
        let (vs_fold, folded) = run(true);
        for (a, b) in plain.iter().zip(&folded) {
            let d = (a - b).abs().max().double_value(&[]);
            assert!(d < tol, "{kind:?}: outputs differ by {d}");
        }
        let folded_vars = vs_fold.variables();
        let mut zero_grads = 0;
        for (name, a) in vs_plain.variables() {
            let b = &folded_vars[&name];
            let d = (&a - b).abs().max().double_value(&[]);
            assert!(d < tol, "{kind:?}: {name} differs by {d}");
            if !a.requires_grad() {
                continue;
            }
            let (ga, gb) = (a.grad(), b.grad());
            assert!(gb.defined(), "{name}: no gradient with folding");
            // Relative L2 (floor 1): float32 sums over thousands of terms differ by rounding.
            let scale = ga.norm().double_value(&[]).max(1.0);
            let dg = (&ga - &gb).norm().double_value(&[]) / scale;
            assert!(
                dg < grad_tol,
                "{kind:?}: {name}: gradient differs by {dg} (relative L2)"
            );
            let folded_bias = name.ends_with("tcn.2.bias") || name.ends_with("residual.0.bias");
            if folded_bias {
                assert_eq!(gb.abs().max().double_value(&[]), 0.0, "{name}");
                zero_grads += 1;
            }
        }
        // 10 temporal convolutions and the 2 residual convolutions (blocks 5 and 8).
        assert_eq!(zero_grads, 12);
    }
}
