//! Contrastive losses: the MoCo InfoNCE (cross-entropy with target 0) and CrosSCLR's CVC-KM
//! (cross-view consistent knowledge mining), exactly as the official processors compute them.
//!
//! Notation (per view u): `q_u` (N, D) L2-normalised queries, `k_u` (N, D) keys, `Q_u` (D, K) the
//! queue *before* this step's enqueue, `tau` the temperature. Every reduction runs in the inputs'
//! kind (float32 in training, float64 in the step-parity test).
use tch::Tensor;

/// MoCo logits `[q.k, q.Q] / tau`, shape (N, 1+K). The queue gets no gradient.
pub fn moco_logits(q: &Tensor, k: &Tensor, queue: &Tensor, tau: f64) -> Tensor {
    let l_pos = (q * k).sum_dim_intlist(&[1i64][..], true, q.kind());
    let l_neg = q.matmul(&queue.detach());
    Tensor::cat(&[l_pos, l_neg], 1) / tau
}

/// [`moco_logits`] with extra negatives `extra` (N, E) raw cosine similarities appended (divided
/// by `tau` like the rest): shape (N, 1+K+E).
pub fn moco_logits_with(
    q: &Tensor,
    k: &Tensor,
    queue: &Tensor,
    tau: f64,
    extra: Option<&Tensor>,
) -> Tensor {
    let l = moco_logits(q, k, queue, tau);
    match extra {
        Some(e) => Tensor::cat(&[l, e / tau], 1),
        None => l,
    }
}

/// Logit given to a masked-out queue entry (after the division by tau): finite, so that a
/// zero mask weight times its log-probability stays 0 in [`multi_positive`], and far below any
/// real logit (|cosine| / tau <= 1 / 0.01 = 100 for any sane temperature).
pub const MASKED_LOGIT: f64 = -1.0e4;

/// The (N, 1 + blocks * K + extra) bool mask of logits laid out as `[l_pos, blocks x pool,
/// extra]` that marks the pool entries in `own` (N, K).
fn masked_columns(own: &Tensor, blocks: usize, extra: i64) -> Tensor {
    let n = own.size()[0];
    let opts = (tch::Kind::Bool, own.device());
    let mut parts = vec![Tensor::zeros([n, 1], opts)];
    parts.extend((0..blocks).map(|_| own.shallow_clone()));
    parts.push(Tensor::zeros([n, extra], opts));
    Tensor::cat(&parts, 1)
}

/// Drops pool entries from a query's logits: `logits` (N, 1+K+E) with the pool in columns
/// `1..=K`, `own` (N, K) bool; masked entries get [`MASKED_LOGIT`] (no gradient through them).
pub fn mask_queue_logits(logits: &Tensor, own: &Tensor) -> Tensor {
    let extra = logits.size()[1] - 1 - own.size()[1];
    logits.masked_fill(&masked_columns(own, 1, extra), MASKED_LOGIT)
}

/// Uniformity (Wang & Isola 2020, t = 2) of L2-normalised rows `z` (N, D): `log` of the mean
/// over pairs `i != j` of `exp(-2 |z_i - z_j|^2)`, a scalar in `z`'s kind with grad (0 at most,
/// lower = more uniform; NaN for N < 2). The `uniformity` lever adds it to each view's loss; the
/// collapse diagnostics report it.
pub fn uniformity(z: &Tensor) -> Tensor {
    let n = z.size()[0];
    let sq = z
        .square()
        .sum_dim_intlist([1i64].as_slice(), true, z.kind());
    let d2 = (&sq + sq.tr() - z.matmul(&z.tr()) * 2.0).clamp_min(0.0);
    let diagonal = Tensor::eye(n, (tch::Kind::Bool, z.device()));
    let e = (d2 * -2.0).masked_fill(&diagonal, f64::NEG_INFINITY);
    e.flatten(0, 1).logsumexp([0i64].as_slice(), false) - ((n * (n - 1)) as f64).ln()
}

/// Cross-entropy with target 0 (the positive), mean over the batch: `-mean_n log_softmax(l)[n, 0]`.
pub fn info_nce(logits: &Tensor) -> Tensor {
    -logits
        .log_softmax(1, logits.kind())
        .select(1, 0)
        .mean(logits.kind())
}

/// Multi-positive loss per sample: `-(sum_j M_j log_softmax(logits)_j) / sum_j M_j`, shape (N,).
/// `logits`, `mask`: (N, L); the mask is 0/1.
pub fn multi_positive(logits: &Tensor, mask: &Tensor) -> Tensor {
    let kind = logits.kind();
    let lp = logits.log_softmax(1, kind);
    -(lp * mask).sum_dim_intlist(&[1i64][..], false, kind)
        / mask.sum_dim_intlist(&[1i64][..], false, kind)
}

/// One-hot (N, K) of the `topk` largest entries of each row of `s` (no gradient).
pub fn topk_onehot(s: &Tensor, topk: i64) -> Tensor {
    let (_, idx) = s.detach().topk(topk, 1, true, true);
    s.zeros_like().scatter_value(1, &idx, 1.0)
}

/// CVC-KM per-view losses (scalars), official phase 2.
///
/// For each view u: `l_pos = q_u.k_u` (N,1), `s_u = q_u.Q_u` (N,K) (raw cosine similarities).
/// For each other view v: positives `P_v` = top-k of `s_v` (mined in the *other* view);
/// with `context`: logits `[l_pos, s_u, s_u*s_v] / tau` and mask `[1, onehot(P_v), onehot(P_v)]`;
/// without: logits `[l_pos, s_u] / tau`, mask `[1, onehot(P_v)]`. `L^{u<-v}` = [`multi_positive`].
/// The loss of view u is `mean_n` of the average of `L^{u<-v}` over its partners v (1/2 for three
/// views, no factor for two: the official 2- and 3-view processors). The total is their sum.
pub fn cvc_km_losses(
    q: &[Tensor],
    k: &[Tensor],
    queues: &[Tensor],
    tau: f64,
    topk: i64,
    context: bool,
) -> Vec<Tensor> {
    cvc_km_losses_with(q, k, queues, tau, topk, context, None, None)
}

/// [`cvc_km_losses`] with two options, both `None` in the official loss:
/// * `extra[u]` (N, E): raw cosine similarities appended to every logit set of view u with mask 0
///   (e.g. the time-reversed keys of `reverse_negatives`);
/// * `own` (N, K) bool: pool entries dropped, never mined as positives, their logits (plain and
///   context) set to [`MASKED_LOGIT`] with mask 0 (the in-batch negatives mask each query's own
///   key).
#[allow(clippy::too_many_arguments)]
pub fn cvc_km_losses_with(
    q: &[Tensor],
    k: &[Tensor],
    queues: &[Tensor],
    tau: f64,
    topk: i64,
    context: bool,
    extra: Option<&[Tensor]>,
    own: Option<&Tensor>,
) -> Vec<Tensor> {
    let n_views = q.len();
    let l_pos: Vec<Tensor> = q
        .iter()
        .zip(k)
        .map(|(q, k)| (q * k).sum_dim_intlist(&[1i64][..], true, q.kind()))
        .collect();
    let sim: Vec<Tensor> = q
        .iter()
        .zip(queues)
        .map(|(q, qu)| q.matmul(&qu.detach()))
        .collect();
    // Cosines are >= -1: a masked entry at -3 is mined only if fewer than topk remain.
    let mined: Vec<Tensor> = sim
        .iter()
        .map(|s| match own {
            Some(own) => topk_onehot(&s.masked_fill(own, -3.0), topk).masked_fill(own, 0.0),
            None => topk_onehot(s, topk),
        })
        .collect();
    (0..n_views)
        .map(|u| {
            let ones = l_pos[u].ones_like();
            let partners: Vec<usize> = (0..n_views).filter(|&v| v != u).collect();
            let e_width = extra.map_or(0, |e| e[u].size()[1]);
            let per_pair: Vec<Tensor> = partners
                .iter()
                .map(|&v| {
                    let (mut logits, mut mask, blocks) = if context {
                        let ctx = &sim[u] * &sim[v];
                        (
                            Tensor::cat(&[&l_pos[u], &sim[u], &ctx], 1),
                            Tensor::cat(&[&ones, &mined[v], &mined[v]], 1),
                            2,
                        )
                    } else {
                        (
                            Tensor::cat(&[&l_pos[u], &sim[u]], 1),
                            Tensor::cat(&[&ones, &mined[v]], 1),
                            1,
                        )
                    };
                    if let Some(e) = extra {
                        logits = Tensor::cat(&[&logits, &e[u]], 1);
                        mask = Tensor::cat(&[&mask, &e[u].zeros_like()], 1);
                    }
                    let logits = match own {
                        Some(own) => (logits / tau)
                            .masked_fill(&masked_columns(own, blocks, e_width), MASKED_LOGIT),
                        None => logits / tau,
                    };
                    multi_positive(&logits, &mask)
                })
                .collect();
            let sum = per_pair
                .iter()
                .skip(1)
                .fold(per_pair[0].shallow_clone(), |a, b| a + b);
            let kind = sum.kind();
            (sum / partners.len() as f64).mean(kind)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn t(v: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).view(shape)
    }

    #[test]
    fn info_nce_matches_cross_entropy() {
        let l = t(&[2.0, 0.5, -1.0, 0.0, 1.0, 3.0], &[2, 3]);
        let want = l.cross_entropy_for_logits(&Tensor::zeros([2], (Kind::Int64, Device::Cpu)));
        assert!((info_nce(&l).double_value(&[]) - want.double_value(&[])).abs() < 1e-6);
    }

    /// A hand-computed 2-view example: N = 1, D = 2, K = 3.
    #[test]
    fn cvc_km_hand_example() {
        let s2 = std::f32::consts::FRAC_1_SQRT_2;
        let qj = t(&[1.0, 0.0], &[1, 2]);
        let qm = t(&[0.0, 1.0], &[1, 2]);
        let kj = t(&[s2, s2], &[1, 2]);
        let km = t(&[0.0, 1.0], &[1, 2]);
        // Queue columns: e1, e2, (s2, s2).
        let queue = t(&[1.0, 0.0, s2, 0.0, 1.0, s2], &[2, 3]);
        let tau = 0.5;
        // s_j = [1, 0, s2], s_m = [0, 1, s2]; top-1 of s_m is slot 1, of s_j slot 0.
        // j<-m: logits [s2, 1, 0, s2, 0, 0, 0.5]/tau; positives {0, 1+1, 1+3+1}.
        let lj = [s2, 1.0, 0.0, s2, 0.0, 0.0, 0.5].map(|x| x as f64 / tau);
        let lm = [1.0, 0.0, 1.0, s2, 0.0, 0.0, 0.5].map(|x| x as f64 / tau);
        let lse = |l: &[f64]| l.iter().map(|x| x.exp()).sum::<f64>().ln();
        let want_j = -((lj[0] + lj[2] + lj[5]) / 3.0 - lse(&lj));
        // m<-j: positives {0, 1+0, 1+3+0}.
        let want_m = -((lm[0] + lm[1] + lm[4]) / 3.0 - lse(&lm));
        let queues = [queue.shallow_clone(), queue.shallow_clone()];
        let got = cvc_km_losses(
            &[qj.shallow_clone(), qm.shallow_clone()],
            &[kj.shallow_clone(), km.shallow_clone()],
            &queues,
            tau,
            1,
            true,
        );
        assert!(
            (got[0].double_value(&[]) - want_j).abs() < 1e-5,
            "{} vs {want_j}",
            got[0].double_value(&[])
        );
        assert!((got[1].double_value(&[]) - want_m).abs() < 1e-5);
        // Without context: logits [l_pos, s_u], mask [1, onehot].
        let lj2 = &lj[..4];
        let want_j2 = -((lj2[0] + lj2[2]) / 2.0 - lse(lj2));
        let got = cvc_km_losses(&[qj, qm], &[kj, km], &queues, tau, 1, false);
        assert!((got[0].double_value(&[]) - want_j2).abs() < 1e-5);
    }

    /// Three views: each view's loss is the mean of its two pair losses.
    #[test]
    fn cvc_km_three_views_halves() {
        tch::manual_seed(1);
        let mk = |n: i64, d: i64| {
            let x = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
            &x / x.norm_scalaropt_dim(2, [1], true)
        };
        let q: Vec<Tensor> = (0..3).map(|_| mk(4, 3)).collect();
        let k: Vec<Tensor> = (0..3).map(|_| mk(4, 3)).collect();
        let qs: Vec<Tensor> = (0..3)
            .map(|_| mk(8, 3).transpose(0, 1).contiguous())
            .collect();
        let all = cvc_km_losses(&q, &k, &qs, 0.1, 2, true);
        // Pair j<-m alone = the 2-view loss of (j, m) for view j.
        let jm = cvc_km_losses(&q[..2], &k[..2], &qs[..2], 0.1, 2, true);
        let jb = cvc_km_losses(
            &[q[0].shallow_clone(), q[2].shallow_clone()],
            &[k[0].shallow_clone(), k[2].shallow_clone()],
            &[qs[0].shallow_clone(), qs[2].shallow_clone()],
            0.1,
            2,
            true,
        );
        let want = (jm[0].double_value(&[]) + jb[0].double_value(&[])) / 2.0;
        assert!((all[0].double_value(&[]) - want).abs() < 1e-5);
    }

    /// Nothing masked: the masked CVC-KM is the official one.
    #[test]
    fn cvc_km_masked_without_mask_is_official() {
        tch::manual_seed(11);
        let unit = |n: i64, d: i64| {
            let x = Tensor::randn([n, d], (Kind::Double, Device::Cpu));
            &x / x.norm_scalaropt_dim(2, [1i64], true)
        };
        let (q, k): (Vec<Tensor>, Vec<Tensor>) = (0..3).map(|_| (unit(4, 5), unit(4, 5))).unzip();
        let queues: Vec<Tensor> = (0..3).map(|_| unit(6, 5).tr()).collect();
        let none = Tensor::zeros([4, 6], (Kind::Bool, Device::Cpu));
        for context in [true, false] {
            let a = cvc_km_losses(&q, &k, &queues, 0.1, 2, context);
            let b = cvc_km_losses_with(&q, &k, &queues, 0.1, 2, context, None, Some(&none));
            for (a, b) in a.iter().zip(&b) {
                assert!((a - b).abs().double_value(&[]) < 1e-12);
            }
        }
    }

    /// A masked pool entry is as if it were not there: row by row, the masked loss equals the
    /// official loss on the pool without that row's masked columns.
    #[test]
    fn cvc_km_masked_drops_the_masked_entries() {
        tch::manual_seed(12);
        let unit = |n: i64, d: i64| {
            let x = Tensor::randn([n, d], (Kind::Double, Device::Cpu));
            &x / x.norm_scalaropt_dim(2, [1i64], true)
        };
        let n = 4;
        let (q, k): (Vec<Tensor>, Vec<Tensor>) = (0..2).map(|_| (unit(n, 5), unit(n, 5))).unzip();
        // In-batch pools: the keys themselves, each row's own key masked.
        let pools: Vec<Tensor> = k.iter().map(|k| k.tr()).collect();
        let eye = Tensor::eye(n, (Kind::Bool, Device::Cpu));
        let masked = cvc_km_losses_with(&q, &k, &pools, 0.2, 1, true, None, Some(&eye));
        for (u, got) in masked.iter().enumerate() {
            let mut sum = 0.0;
            for i in 0..n {
                let keep: Vec<i64> = (0..n).filter(|&j| j != i).collect();
                let keep = Tensor::from_slice(&keep);
                let row = |t: &Tensor| t.narrow(0, i, 1);
                let qi: Vec<Tensor> = q.iter().map(row).collect();
                let ki: Vec<Tensor> = k.iter().map(row).collect();
                let pool_i: Vec<Tensor> = pools.iter().map(|p| p.index_select(1, &keep)).collect();
                let l = cvc_km_losses(&qi, &ki, &pool_i, 0.2, 1, true);
                sum += l[u].double_value(&[]);
            }
            let want = sum / n as f64;
            assert!((got.double_value(&[]) - want).abs() < 1e-10, "view {u}");
        }
    }

    #[test]
    fn masked_queue_logits_keep_the_positive_and_extras() {
        let l = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], &[2, 4]);
        let own = Tensor::from_slice(&[true, false, false, true]).view([2, 2]);
        let m = mask_queue_logits(&l, &own);
        let got: Vec<f64> = Vec::<f64>::try_from(m.to_kind(Kind::Double).flatten(0, 1)).unwrap();
        assert_eq!(
            got,
            vec![1.0, MASKED_LOGIT, 3.0, 4.0, 5.0, 6.0, MASKED_LOGIT, 8.0]
        );
    }
}
