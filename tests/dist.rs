//! Data-parallel collectives (src/dist.rs) with 2 real processes over Gloo on 127.0.0.1: the test
//! starts this test binary twice more as rank 0 and rank 1 (`dist_rank_worker`), which meet over a
//! FileStore in a temp folder (no port to race for), one thread each, with a timeout so that a
//! hang fails the test.
mod common;
use crossclr::data::loader::{try_epoch_shard_in, HostMemory, Shard};
use crossclr::dist::{self, ProcessGroup, Rendezvous, Store};
use crossclr::gpu::{FastStep, SgdConfig};
use crossclr::model::kernels::Switch;
use crossclr::ssl::Pretrainer;
use crossclr::train::config::PretrainConfig;
use crossclr::train::pretrain::loader_config;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const RANK_VAR: &str = "CROSSCLR_TEST_DIST_RANK";
const STORE_VAR: &str = "CROSSCLR_TEST_DIST_STORE";

#[test]
fn two_processes_agree_after_broadcast_all_reduce_and_all_gather() {
    run_two_ranks("dist_rank_worker");
}

/// Two ranks of data-parallel CrosSCLR-2 on the tiny synthetic set (batch 4 each, global 8)
/// start from different random models, then after the broadcast and 4 steps (phase 1 and CVC-KM)
/// hold identical parameters, batch-norm statistics, key encoders and queues, and the queues have
/// advanced by the global batch per step.
#[test]
fn two_ranks_train_in_lockstep() {
    run_two_ranks("dist_train_worker");
}

/// SyncBatchNorm itself: 2 ranks holding 3 and 5 samples of a batch of 8 (uneven on purpose)
/// give, on their rows, the output and input gradient of one plain batch norm over the whole
/// batch; their weight and bias gradients sum to the whole batch's; the running statistics
/// equal the whole batch's (global mean, unbiased global variance). Float64, 1e-10; rank-4
/// (convolution) and rank-2 (projection head) inputs.
#[test]
fn sync_batch_norm_of_two_ranks_is_the_batch_norm_of_the_whole_batch() {
    run_two_ranks("dist_sync_bn_worker");
}

/// One SkeletonCLR step with `sync_bn` on: 2 ranks x 4 samples equal 1 process x 8 samples
/// (float64, dropout 0) to 1e-6 in the loss, every parameter, key parameter, batch-norm buffer
/// and the queue. The loader's shards are the single-process batch draw for draw (the
/// augmentation of a sample does not depend on how the batch is split; see
/// `data::loader::Shard`), so augmentation stays on.
#[test]
fn two_rank_sync_bn_step_equals_the_one_process_step() {
    run_two_ranks("dist_step_equality_worker");
}

/// Two epochs (4 steps, phase 1 and CVC-KM) of CrosSCLR-2 on the tiny config with `sync_bn` on
/// (dropout 0): 2 ranks x 4 end where 1 process x 8 ends. Float64: losses and every variable to
/// 1e-6 relative. Float32 (default kernels): the largest relative variable difference is at most
/// 10 times the one between two 1-process runs that differ only in the batch-norm kernel (fused
/// CPU op vs libtorch's), i.e. float32 rounding and nothing else.
#[test]
fn two_rank_sync_bn_epochs_equal_the_one_process_epochs() {
    run_two_ranks("dist_epoch_equality_worker");
}

/// Shuffle BN across ranks (`dist_shuffle_bn`, MoCo's): two epochs of CrosSCLR-2 (float64,
/// dropout 0) on 2 ranks x 4 equal 1 process x 8 with `shuffle_bn: 2` (the same permutation
/// of the global batch, drawn by rank 0 from the same torch generator state), to 1e-6 relative
/// in the losses, every parameter, key parameter and the queues; and differ from the run without
/// shuffling. The batch-norm buffers differ by design: the 1-process run's two groups move the
/// running statistics twice per step, in turn (and count two forwards), the ranks once each and
/// then average them.
#[test]
fn two_rank_shuffle_bn_equals_one_process_shuffle_bn_in_two_groups() {
    run_two_ranks("dist_shuffle_bn_worker");
}

/// The fast step (`gpu::FastStep`, `step_impl: fast`) under data parallelism: on 2 ranks it
/// trains exactly as the reference step does on 2 ranks (float64, 2 epochs of CrosSCLR-2 across
/// the phase switch, dropout on, the same torch seed per step): losses (the mean over the ranks),
/// every parameter, key parameter and batch-norm buffer, the queues and their pointer, to 1e-10;
/// with the running statistics averaged (default), with `sync_bn` and with `dist_shuffle_bn`.
/// The queues are identical on both ranks.
#[test]
fn two_rank_fast_step_equals_two_rank_reference_step() {
    run_two_ranks("dist_fast_step_worker");
}

/// NCCL, where the binary has it: asking for a CUDA device the machine does not have is an error
/// that names the device (never a crash or a hang); on a machine with a GPU, a 1-rank NCCL group
/// on cuda:0 all-reduces, broadcasts and all-gathers CUDA tensors and host tensors (staged).
#[test]
fn nccl_group_names_a_missing_device_or_runs_on_one_gpu() {
    if !dist::nccl_available() {
        eprintln!("skipping: built without NCCL (no CUDA runtime, CCCL or NCCL headers)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rendezvous = Rendezvous {
        rank: 0,
        world_size: 1,
        store: Store::File(dir.path().join("store")),
    };
    let devices = tch::Cuda::device_count() as usize;
    let missing = dist::Backend::Nccl {
        cuda_index: devices,
    };
    let e = ProcessGroup::join(&rendezvous, Duration::from_secs(30), missing).unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("CUDA device {devices} does not exist")),
        "{e}"
    );
    if devices == 0 {
        return;
    }
    let pg = ProcessGroup::join(
        &rendezvous,
        Duration::from_secs(60),
        dist::Backend::Nccl { cuda_index: 0 },
    )
    .unwrap();
    for device in [Device::Cuda(0), Device::Cpu] {
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).to_device(device);
        pg.all_reduce_sum_(&t).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(&t.to_device(Device::Cpu)).unwrap(),
            [1.0, 2.0, 3.0]
        );
        pg.broadcast_(&t, 0).unwrap();
        let g = pg.all_gather(&t.reshape([3, 1])).unwrap();
        assert_eq!(g.device(), device);
        assert_eq!(g.size(), [3, 1]);
    }
    pg.barrier().unwrap();
}

/// Dropout under data parallelism: each rank's masks are its rows of the mask one process draws
/// for the global batch. Two epochs of CrosSCLR-2 with `sync_bn` and dropout 0.5 (the demo's),
/// float64: 2 ranks x 4 end where 1 process x 8 ends (losses and every variable to 1e-6
/// relative; the 1-process run with the unfused block tail, whose mask stream the ranks share).
/// Before, every rank drew the same mask for its rows (the ranks' generators are in step).
#[test]
fn two_rank_dropout_masks_are_the_one_process_masks() {
    run_two_ranks("dist_dropout_worker");
}

/// Starts this test binary as rank 0 and rank 1 of `worker` and checks both succeed in time.
fn run_two_ranks(worker: &str) {
    if !dist::available() {
        eprintln!("skipping: built without the Gloo headers (apt-get install libgloo-dev)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(&exe)
                .args([worker, "--exact", "--nocapture", "--test-threads=1"])
                .env(RANK_VAR, rank.to_string())
                .env(STORE_VAR, &store)
                .env("OMP_NUM_THREADS", "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let limit = Duration::from_secs(300);
    for (rank, (ok, text)) in wait_all(children, limit).into_iter().enumerate() {
        assert!(ok, "rank {rank} failed:\n{text}");
        assert!(text.contains("rank worker ok"), "rank {rank}:\n{text}");
        println!("--- rank {rank} ---\n{text}"); // shown with --nocapture
    }
}

/// One rank of the test above (does nothing when not started by it).
#[test]
fn dist_rank_worker() {
    let (Ok(rank), Ok(store)) = (std::env::var(RANK_VAR), std::env::var(STORE_VAR)) else {
        return;
    };
    let rank: usize = rank.parse().unwrap();
    tch::set_num_threads(1);
    let pg = ProcessGroup::gloo(
        &Rendezvous {
            rank,
            world_size: 2,
            store: Store::File(store.into()),
        },
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!((pg.rank(), pg.world_size()), (rank, 2));

    // Parameters and buffers: each rank starts from its own random init; after the broadcast all
    // equal rank 0's (checked by gathering a fingerprint of every variable).
    tch::manual_seed(100 + rank as i64);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let _w = root.randn("w", &[5, 3], 0.0, 1.0);
    let _q = root.var(
        "queue",
        &[4, 8],
        tch::nn::Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        },
    );
    pg.broadcast_vars(&vs).unwrap();
    let mut names: Vec<String> = vs.variables().keys().cloned().collect();
    names.sort();
    for name in &names {
        let t = vs.variables()[name].detach().reshape([1, -1]);
        let all = pg.all_gather(&t).unwrap();
        let d = (all.get(0) - all.get(1)).abs().max().double_value(&[]);
        assert_eq!(d, 0.0, "{name} differs across ranks after the broadcast");
    }

    // Gradients: the coalesced mean of per-rank values.
    let a = Tensor::full([3, 2], (rank + 1) as f64, (Kind::Float, Device::Cpu));
    let b = Tensor::full([4], 10.0 * (rank + 1) as f64, (Kind::Float, Device::Cpu));
    pg.all_reduce_mean_(&[a.shallow_clone(), b.shallow_clone()])
        .unwrap();
    assert_eq!(a.mean(Kind::Float).double_value(&[]), 1.5);
    assert_eq!(b.mean(Kind::Float).double_value(&[]), 15.0);

    // Keys before the enqueue: rank order, every rank the same result.
    let keys = Tensor::full([2, 3], rank as f64, (Kind::Float, Device::Cpu));
    let all = pg.all_gather(&keys).unwrap();
    assert_eq!(all.size(), vec![4, 3]);
    let rows: Vec<f32> = Vec::try_from(all.select(1, 0)).unwrap();
    assert_eq!(rows, vec![0.0, 0.0, 1.0, 1.0]);
    pg.barrier().unwrap();
    println!("rank worker ok (rank {rank})");
}

/// One rank of [`two_ranks_train_in_lockstep`] (does nothing when not started by it).
#[test]
fn dist_train_worker() {
    let (Ok(rank), Ok(store)) = (std::env::var(RANK_VAR), std::env::var(STORE_VAR)) else {
        return;
    };
    let rank: usize = rank.parse().unwrap();
    tch::set_num_threads(1);
    let pg = Arc::new(
        ProcessGroup::gloo(
            &Rendezvous {
                rank,
                world_size: 2,
                store: Store::File(store.into()),
            },
            Duration::from_secs(60),
        )
        .unwrap(),
    );
    let ds = common::tiny_data();
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::tiny_config("crossclr2", dir.path(), &[]);
    tch::manual_seed(50 + rank as i64); // a different model per rank before the broadcast
    let mut t = Pretrainer::from_config(&cfg, &ds.layout, Device::Cpu).unwrap();
    t.join_group(Arc::clone(&pg)).unwrap();
    let mut loader = loader_config(&cfg);
    loader.batch_size = cfg.batch_size / 2;
    let shard = Shard { rank, world: 2 };
    let mut steps = 0;
    for epoch in 1..=2 {
        tch::manual_seed(epoch as i64);
        let batches =
            try_epoch_shard_in(Arc::clone(&ds), &loader, epoch, shard, HostMemory::Pageable)
                .unwrap();
        for b in batches {
            let s = t.train_step(&b.views[0], &b.views[1], epoch).unwrap();
            assert!(s.loss.is_finite());
            assert_eq!(s.phase, if epoch > cfg.cross_epoch { 2 } else { 1 });
            steps += 1;
        }
    }
    assert_eq!(steps, 4, "16 samples, global batch 8, 2 epochs");
    // The queues advanced by the global batch (8) per step: 32 mod 64.
    assert_eq!(t.model.queue_ptr(), 32);
    for vs in [&t.model.vs_q, &t.model.vs_k] {
        let vars = vs.variables();
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        for name in names {
            let v = vars[name].detach().to_kind(Kind::Double).reshape([1, -1]);
            let all = pg.all_gather(&v).unwrap();
            let d = (all.get(0) - all.get(1)).abs().max().double_value(&[]);
            assert_eq!(d, 0.0, "{name} differs across ranks after training");
        }
    }
    pg.barrier().unwrap();
    println!("rank worker ok (rank {rank})");
}

/// The process group of a test worker (rank and store from the parent test), or `None` when the
/// test runs on its own.
fn worker_group() -> Option<Arc<ProcessGroup>> {
    let (Ok(rank), Ok(store)) = (std::env::var(RANK_VAR), std::env::var(STORE_VAR)) else {
        return None;
    };
    tch::set_num_threads(1);
    Some(Arc::new(
        ProcessGroup::gloo(
            &Rendezvous {
                rank: rank.parse().unwrap(),
                world_size: 2,
                store: Store::File(store.into()),
            },
            Duration::from_secs(60),
        )
        .unwrap(),
    ))
}

/// One rank of [`sync_batch_norm_of_two_ranks_is_the_batch_norm_of_the_whole_batch`].
#[test]
fn dist_sync_bn_worker() {
    let Some(pg) = worker_group() else { return };
    let rank = pg.rank();
    let opts = (Kind::Double, Device::Cpu);
    // Rows of the batch of 8 each rank holds.
    let (start, len) = if rank == 0 { (0, 3) } else { (3, 5) };
    for shape in [vec![8i64, 6, 5, 3], vec![8, 6]] {
        // The same data on both ranks.
        tch::manual_seed(11);
        let x = Tensor::randn(shape.as_slice(), opts) * 3.0 + 1.5;
        let v = Tensor::randn(shape.as_slice(), opts);
        let w0 = Tensor::randn([6], opts);
        let b0 = Tensor::randn([6], opts);
        let (rm0, rv0) = (Tensor::randn([6], opts), Tensor::rand([6], opts) + 0.5);

        // The whole batch on one process: plain batch norm.
        let x_ref = x.copy().set_requires_grad(true);
        let w_ref = w0.copy().set_requires_grad(true);
        let b_ref = b0.copy().set_requires_grad(true);
        let (rm_ref, rv_ref) = (rm0.copy(), rv0.copy());
        let y_ref = x_ref.batch_norm(
            Some(&w_ref),
            Some(&b_ref),
            Some(&rm_ref),
            Some(&rv_ref),
            true,
            0.1,
            1e-5,
            false,
        );
        (&y_ref * &v).sum(Kind::Double).backward();

        // This rank's rows through SyncBatchNorm.
        let x_r = x.narrow(0, start, len).copy().set_requires_grad(true);
        let w_r = w0.copy().set_requires_grad(true);
        let b_r = b0.copy().set_requires_grad(true);
        let (rm_r, rv_r) = (rm0.copy(), rv0.copy());
        let y_r = pg
            .sync_batch_norm(&x_r, &w_r, &b_r, &rm_r, &rv_r, 0.1, 1e-5)
            .unwrap();
        (&y_r * v.narrow(0, start, len))
            .sum(Kind::Double)
            .backward();

        let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        let what = format!("rank {rank}, shape {shape:?}");
        assert!(
            diff(&y_r, &y_ref.narrow(0, start, len)) < 1e-10,
            "{what}: output"
        );
        assert!(
            diff(&x_r.grad(), &x_ref.grad().narrow(0, start, len)) < 1e-10,
            "{what}: input gradient"
        );
        let (gw, gb) = (w_r.grad().contiguous(), b_r.grad().contiguous());
        pg.all_reduce_sum_(&gw).unwrap();
        pg.all_reduce_sum_(&gb).unwrap();
        assert!(diff(&gw, &w_ref.grad()) < 1e-10, "{what}: weight gradient");
        assert!(diff(&gb, &b_ref.grad()) < 1e-10, "{what}: bias gradient");
        assert!(diff(&rm_r, &rm_ref) < 1e-12, "{what}: running mean");
        assert!(diff(&rv_r, &rv_ref) < 1e-12, "{what}: running variance");
        // The cross-rank terms matter: the local batch norm of the rank's rows differs.
        let local = x_r.detach().batch_norm(
            Some(&w0),
            Some(&b0),
            None::<&Tensor>,
            None::<&Tensor>,
            true,
            0.1,
            1e-5,
            false,
        );
        assert!(
            diff(&local, &y_r) > 1e-3,
            "{what}: the local statistics agree?"
        );
    }
    pg.barrier().unwrap();
    println!("rank worker ok (rank {rank})");
}

/// Largest absolute difference per variable of two stores of the same names; the first
/// `(name, difference, scale)` whose difference exceeds `tol` times `max(1, scale)`.
fn first_difference(
    a: &tch::nn::VarStore,
    b: &tch::nn::VarStore,
    tol: f64,
) -> Option<(String, f64, f64)> {
    let (va, vb) = (a.variables(), b.variables());
    assert_eq!(va.len(), vb.len(), "different variable sets");
    let mut names: Vec<&String> = va.keys().collect();
    names.sort();
    for name in names {
        let x = va[name].detach().to_kind(Kind::Double);
        let y = vb[name].detach().to_kind(Kind::Double);
        let d = (&x - &y).abs().max().double_value(&[]);
        let scale = x.abs().max().double_value(&[]);
        if d > tol * scale.max(1.0) || d.is_nan() {
            return Some((name.clone(), d, scale));
        }
    }
    None
}

/// Panics naming `what`, the side and the variable when `a` and `b` differ in any query- or
/// key-side variable by more than `tol` (relative, see [`first_difference`]).
fn assert_same_sides(
    what: &str,
    a: &crossclr::ssl::model::SslModel,
    b: &crossclr::ssl::model::SslModel,
    tol: f64,
) {
    for (side, x, y) in [("query", &a.vs_q, &b.vs_q), ("key", &a.vs_k, &b.vs_k)] {
        if let Some((name, d, scale)) = first_difference(x, y, tol) {
            panic!("{what}: {side} side {name} differs by {d:e} (scale {scale})");
        }
    }
}

/// The tiny config of the equality tests: `model`, SyncBatchNorm on, dropout 0.
fn equality_config(model: &str, dir: &std::path::Path) -> PretrainConfig {
    common::tiny_config(
        model,
        dir,
        &[
            "sync_bn=true",
            "model_args.dropout=0",
            "step_impl=reference",
        ],
    )
}

/// One rank of [`two_rank_sync_bn_step_equals_the_one_process_step`]: computes the 1-process
/// step itself, then its share of the 2-rank step, and compares.
#[test]
fn dist_step_equality_worker() {
    let Some(pg) = worker_group() else { return };
    let rank = pg.rank();
    let ds = common::tiny_data();
    let dir = tempfile::tempdir().unwrap();
    let cfg = equality_config("skeletonclr", dir.path());
    let double = |t: &mut Pretrainer| {
        t.model.vs_q.double();
        t.model.vs_k.double();
    };
    let first_batch = |shard: Shard, batch: usize| {
        let mut loader = loader_config(&cfg);
        loader.batch_size = batch;
        let mut it =
            try_epoch_shard_in(Arc::clone(&ds), &loader, 1, shard, HostMemory::Pageable).unwrap();
        let b = it.next().unwrap();
        (
            b.views[0].to_kind(Kind::Double),
            b.views[1].to_kind(Kind::Double),
        )
    };

    // 1 process x 8.
    tch::manual_seed(7);
    let mut one = Pretrainer::from_config(&cfg, &ds.layout, Device::Cpu).unwrap();
    double(&mut one);
    let (q, k) = first_batch(Shard::WHOLE, 8);
    let s1 = one.train_step(&q, &k, 1).unwrap();

    // 2 ranks x 4 (rank 1 starts from another init: the broadcast makes it rank 0's).
    tch::manual_seed(7 + rank as i64);
    let mut two = Pretrainer::from_config(&cfg, &ds.layout, Device::Cpu).unwrap();
    double(&mut two);
    two.join_group(Arc::clone(&pg)).unwrap();
    let (q, k) = first_batch(Shard { rank, world: 2 }, 4);
    let s2 = two.train_step(&q, &k, 1).unwrap();

    let dl = (s1.loss - s2.loss).abs();
    println!(
        "rank {rank}: loss 1 process {} vs 2 ranks {} (|d| {dl:e})",
        s1.loss, s2.loss
    );
    assert!(dl < 1e-6, "loss: {} vs {}", s1.loss, s2.loss);
    assert_eq!(one.model.queue_ptr(), two.model.queue_ptr());
    assert_same_sides(&format!("rank {rank}"), &one.model, &two.model, 1e-6);
    pg.barrier().unwrap();
    println!("rank worker ok (rank {rank})");
}

/// One rank of [`two_rank_sync_bn_epochs_equal_the_one_process_epochs`]: float64 (to 1e-6
/// relative), then float32 with the default kernels (within [`F32_EPOCH_FACTOR`] times the
/// float32 drift of a change of batch-norm kernel).
#[test]
fn dist_epoch_equality_worker() {
    let Some(pg) = worker_group() else { return };
    let rank = pg.rank();
    let ds = common::tiny_data();
    let dir = tempfile::tempdir().unwrap();
    let cfg = equality_config("crossclr2", dir.path());
    let run = |t: &mut Pretrainer, shard: Shard| -> Vec<f64> {
        let mut loader = loader_config(&cfg);
        loader.batch_size = cfg.batch_size / shard.world;
        let mut losses = Vec::new();
        for epoch in 1..=2 {
            let batches =
                try_epoch_shard_in(Arc::clone(&ds), &loader, epoch, shard, HostMemory::Pageable)
                    .unwrap();
            for b in batches {
                losses.push(t.train_step(&b.views[0], &b.views[1], epoch).unwrap().loss);
            }
        }
        losses
    };
    let build = |seed: i64, kind: Kind, cfg: &PretrainConfig| {
        tch::manual_seed(seed);
        let mut t = Pretrainer::from_config(cfg, &ds.layout, Device::Cpu).unwrap();
        if kind == Kind::Double {
            t.model.vs_q.double();
            t.model.vs_k.double();
        }
        t
    };
    // Largest relative variable difference of two trainers (query and key side).
    let worst = |a: &Pretrainer, b: &Pretrainer| {
        let mut w = (String::new(), 0.0f64);
        for (x, y) in [
            (&a.model.vs_q, &b.model.vs_q),
            (&a.model.vs_k, &b.model.vs_k),
        ] {
            for (name, d) in differences(x, y) {
                if d > w.1 || d.is_nan() {
                    w = (name, d);
                }
            }
        }
        w
    };
    for kind in [Kind::Double, Kind::Float] {
        let mut one = build(3, kind, &cfg);
        let l1 = run(&mut one, Shard::WHOLE);
        let mut two = build(3 + rank as i64, kind, &cfg);
        two.join_group(Arc::clone(&pg)).unwrap();
        let l2 = run(&mut two, Shard { rank, world: 2 });
        println!("rank {rank} {kind:?}: losses 1 process {l1:?}, 2 ranks {l2:?}");
        assert_eq!(l1.len(), 4, "16 samples, global batch 8, 2 epochs");
        assert_eq!(l1.len(), l2.len());
        assert_eq!(one.model.queue_ptr(), two.model.queue_ptr());
        let (name, d) = worst(&one, &two);
        println!("rank {rank} {kind:?}: largest relative variable difference {d:e} ({name})");
        if kind == Kind::Double {
            for (a, b) in l1.iter().zip(&l2) {
                assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "loss {a} vs {b}");
            }
            assert!(d <= 1e-6, "rank {rank}: {name} differs by {d:e} (relative)");
        } else {
            // The float32 yardstick: the same 1-process run with the plain libtorch batch norm
            // and with the fused CPU one (nothing but float32 summation order changes; forced
            // both ways, since `auto` picks one of them by the CPU's features).
            let with_kernels = |fused: Switch| {
                let mut c = cfg.clone();
                c.kernels.fused_bn = fused;
                c.kernels.fused_tail = fused;
                let mut t = build(3, kind, &c);
                run(&mut t, Shard::WHOLE);
                t
            };
            let (plain, fused) = (with_kernels(Switch::Off), with_kernels(Switch::On));
            let (pname, pd) = worst(&fused, &plain);
            println!(
                "rank {rank} {kind:?}: fused vs plain batch norm, 1 process: {pd:e} ({pname})"
            );
            assert!(
                d <= F32_EPOCH_FACTOR * pd.max(1e-6),
                "rank {rank}: 2 ranks differ by {d:e} ({name}), the batch-norm kernels by {pd:e}"
            );
        }
    }
    pg.barrier().unwrap();
    println!("rank worker ok (rank {rank})");
}

/// One rank of [`two_rank_shuffle_bn_equals_one_process_shuffle_bn_in_two_groups`].
#[test]
fn dist_shuffle_bn_worker() {
    let Some(pg) = worker_group() else { return };
    let rank = pg.rank();
    let ds = common::tiny_data();
    let dir = tempfile::tempdir().unwrap();
    let config = |extra: &str| {
        common::tiny_config(
            "crossclr2",
            dir.path(),
            &["model_args.dropout=0", "step_impl=reference", extra],
        )
    };
    let run = |cfg: &PretrainConfig, seed: i64, shard: Shard, group: Option<&Arc<ProcessGroup>>| {
        tch::manual_seed(seed);
        let mut t = Pretrainer::from_config(cfg, &ds.layout, Device::Cpu).unwrap();
        t.model.vs_q.double();
        t.model.vs_k.double();
        if let Some(g) = group {
            t.join_group(Arc::clone(g)).unwrap();
        }
        let mut loader = loader_config(cfg);
        loader.batch_size = cfg.batch_size / shard.world;
        let mut losses = Vec::new();
        for epoch in 1..=2 {
            let batches =
                try_epoch_shard_in(Arc::clone(&ds), &loader, epoch, shard, HostMemory::Pageable)
                    .unwrap();
            for b in batches {
                losses.push(t.train_step(&b.views[0], &b.views[1], epoch).unwrap().loss);
            }
        }
        (t, losses)
    };
    let (one, l1) = run(&config("shuffle_bn=2"), 5, Shard::WHOLE, None);
    let (_, l0) = run(&config("shuffle_bn=0"), 5, Shard::WHOLE, None);
    let (two, l2) = run(
        &config("dist_shuffle_bn=true"),
        5 + rank as i64,
        Shard { rank, world: 2 },
        Some(&pg),
    );
    println!("rank {rank}: losses shuffle_bn 2 {l1:?}, 2 ranks {l2:?}, no shuffle {l0:?}");
    assert_eq!(l1.len(), 4);
    for (a, b) in l1.iter().zip(&l2) {
        assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "loss {a} vs {b}");
    }
    assert!(
        l1.iter().zip(&l0).any(|(a, b)| (a - b).abs() > 1e-3),
        "shuffling changed nothing"
    );
    for (a, b) in [
        (&one.model.vs_q, &two.model.vs_q),
        (&one.model.vs_k, &two.model.vs_k),
    ] {
        for (name, d) in differences(a, b) {
            let (x, y) = (&a.variables()[&name], &b.variables()[&name]);
            if name.ends_with("num_batches_tracked") {
                // A batch counter counts forwards: the 1-process run's 2 groups are 2 per step.
                let (x, y) = (x.int64_value(&[]), y.int64_value(&[]));
                assert_eq!(x, 2 * y, "rank {rank}: {name}");
            } else if name.ends_with("running_mean") || name.ends_with("running_var") {
                // Not the same by design (and unused in training): one process moves them once
                // per group, in turn; the ranks once each, then average them.
            } else {
                assert!(d <= 1e-6, "rank {rank}: {name} differs by {d:e} (relative)");
            }
        }
    }
    pg.barrier().unwrap();
    println!("rank worker ok (rank {rank})");
}

/// How much further the float32 2-rank run may drift from the 1-process run than the 1-process
/// run drifts when only its batch-norm kernel changes: float32 rounding, amplified by 4 SGD
/// steps at lr 0.1 with momentum, is all that differs (float64 agrees to 1e-13).
const F32_EPOCH_FACTOR: f64 = 10.0;

/// Per variable, `max |a - b| / max(1, max |a|)`.
fn differences(a: &tch::nn::VarStore, b: &tch::nn::VarStore) -> Vec<(String, f64)> {
    let (va, vb) = (a.variables(), b.variables());
    va.iter()
        .map(|(name, x)| {
            let x = x.detach().to_kind(Kind::Double);
            let y = vb[name].detach().to_kind(Kind::Double);
            let d = (&x - &y).abs().max().double_value(&[]);
            (name.clone(), d / x.abs().max().double_value(&[]).max(1.0))
        })
        .collect()
}

/// Waits for every child (killing them all and failing when one is still running after
/// `limit`); returns each one's (success, stdout + stderr) in order.
fn wait_all(mut children: Vec<std::process::Child>, limit: Duration) -> Vec<(bool, String)> {
    let started = Instant::now();
    while children.iter_mut().any(|c| c.try_wait().unwrap().is_none()) {
        if started.elapsed() > limit {
            for c in children.iter_mut() {
                let _ = c.kill();
            }
            panic!("a rank hung (no exit after {} s)", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.success(), text)
        })
        .collect()
}

/// A free TCP port on 127.0.0.1 (asked from the OS; released just before the ranks bind it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `crossclr pretrain` as `world` ranks with torchrun's variables; returns each rank's
/// (success, stdout + stderr).
fn pretrain_ranks(world: usize, args: &[String]) -> Vec<(bool, String)> {
    let port = free_port().to_string();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(env!("CARGO_BIN_EXE_crossclr"))
                .arg("pretrain")
                .args(args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("OMP_NUM_THREADS", "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_all(children, Duration::from_secs(300))
}

/// `crossclr pretrain` launched as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):
/// one epoch on one process, then `--resume` on 2 ranks for the second; only rank 0 writes the
/// work_dir, the metrics have one row per epoch, and the checkpoint's queue pointer counts the
/// global batch.
#[test]
fn pretrain_resumes_a_one_process_run_on_two_ranks() {
    if !dist::available() {
        eprintln!("skipping: built without the Gloo headers (apt-get install libgloo-dev)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("synth");
    let synth = Command::new(env!("CARGO_BIN_EXE_crossclr"))
        .args(["synth", "--out"])
        .arg(&data)
        .args([
            "--classes",
            "2",
            "--train-per-class",
            "8",
            "--val-per-class",
            "1",
            "--frames",
            "20",
        ])
        .output()
        .unwrap();
    assert!(
        synth.status.success(),
        "{}",
        String::from_utf8_lossy(&synth.stderr)
    );
    let work = dir.path().join("work");
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "model: skeletonclr\nview: joint\nwork_dir: {}\nbatch_size: 8\nnum_epoch: 2\n\
             workers: 1\nsave_interval: -1\nlog_interval: 1\nmodel_args:\n  queue_size: 32\n\
             dataset:\n  format: npy\n  data: {}\n  label: {}\n  layout: ntu25\n",
            work.display(),
            data.join("train_data.npy").display(),
            data.join("train_label.pkl").display()
        ),
    )
    .unwrap();
    let base = vec![
        "--quiet".to_string(),
        "--device".into(),
        "cpu".into(),
        "-c".into(),
        config.display().to_string(),
    ];
    // Epoch 1 on one process (no torchrun variables).
    let one = Command::new(env!("CARGO_BIN_EXE_crossclr"))
        .arg("pretrain")
        .args(&base)
        .arg("num_epoch=1")
        .output()
        .unwrap();
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    // Epoch 2 on two ranks.
    let mut args = base.clone();
    args.push("--resume".into());
    let ranks = pretrain_ranks(2, &args);
    for (rank, (ok, text)) in ranks.iter().enumerate() {
        assert!(ok, "rank {rank} failed:\n{text}");
    }
    let log = std::fs::read_to_string(work.join("log.txt")).unwrap();
    assert!(
        log.contains("data parallel: rank 0 of 2 (Gloo), 4 samples per rank"),
        "{log}"
    );
    assert!(
        !log.contains("rank 1 of 2"),
        "rank 1 must not write the work_dir: {log}"
    );
    let csv = std::fs::read_to_string(work.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "header + 2 epochs: {csv}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("last.json")).unwrap()).unwrap();
    assert_eq!(meta["epoch"], 2);
    // 16 samples, global batch 8: 2 steps per epoch, 4 in all.
    assert_eq!(meta["global_step"], 4);
}

/// The other direction, with the fast step: one epoch of `crossclr launch --nproc 2 -- pretrain
/// step_impl=fast`, then `--resume` on one process (reference step) for the second; the
/// checkpoint's queue pointer and step count are those of the global batch, and the resumed run
/// ends at epoch 2 with 4 steps in all.
#[test]
fn pretrain_resumes_a_two_rank_fast_run_on_one_process() {
    if !dist::available() || crossclr::gpu::shim_status() == crossclr::gpu::ShimStatus::Missing {
        eprintln!("skipping: built without the Gloo headers or the C++ shim");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (config, work) = synth_run(dir.path(), 2, "");
    let (ok, text) = run_launch(
        &["--nproc", "2"],
        &config,
        &["num_epoch=1", "step_impl=fast"],
    );
    assert!(ok, "launch failed:\n{text}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("last.json")).unwrap()).unwrap();
    assert_eq!(meta["global_step"], 2, "16 samples, global batch 8: {meta}");
    // The fast step's device pointer, written back: 2 steps of the global batch 8 (queue 32).
    assert_eq!(meta["queue_ptr"], 16, "{meta}");
    let one = Command::new(env!("CARGO_BIN_EXE_crossclr"))
        .args(["pretrain", "--quiet", "--device", "cpu", "--resume", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("last.json")).unwrap()).unwrap();
    assert_eq!(meta["epoch"], 2);
    assert_eq!(meta["global_step"], 4);
    assert_eq!(meta["queue_ptr"], 0, "4 x 8 into a queue of 32: {meta}");
    let csv = std::fs::read_to_string(work.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "header + 2 epochs: {csv}");
}

/// A 1-process job forms a group only when a backend is named: `WORLD_SIZE=1` with
/// `dist_backend=gloo` trains as rank 0 of 1 (the path a world-size-1 NCCL job takes on a GPU);
/// without the key it is a plain run; `dist_backend=nccl` on the CPU is refused with a message.
#[test]
fn a_named_backend_forms_a_one_rank_group() {
    if !dist::available() {
        eprintln!("skipping: built without the Gloo headers (apt-get install libgloo-dev)");
        return;
    }
    for (extra, want) in [
        (
            "dist_backend: gloo\n",
            Some("data parallel: rank 0 of 1 (Gloo)"),
        ),
        ("", None),
        ("dist_backend: nccl\n", None),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (config, work) = synth_run(dir.path(), 1, extra);
        let args = vec![
            "--quiet".to_string(),
            "--device".into(),
            "cpu".into(),
            "-c".into(),
            config.display().to_string(),
        ];
        let (ok, text) = pretrain_ranks(1, &args).pop().unwrap();
        if extra.contains("nccl") {
            assert!(!ok, "{text}");
            assert!(text.contains("nccl needs a CUDA device"), "{text}");
            continue;
        }
        assert!(ok, "{extra}: {text}");
        let log = std::fs::read_to_string(work.join("log.txt")).unwrap();
        match want {
            Some(line) => assert!(log.contains(line), "{log}"),
            None => assert!(!log.contains("data parallel"), "{log}"),
        }
    }
}

/// Synthetic data (2 classes x 8 training samples, 20 frames) and a SkeletonCLR config on it
/// (batch 8, queue 32, `num_epoch` epochs, a log line every step, no epoch checkpoints) in `dir`;
/// `extra` is appended to the YAML. Returns (config file, work_dir).
fn synth_run(
    dir: &std::path::Path,
    num_epoch: usize,
    extra: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = dir.join("synth");
    let synth = Command::new(env!("CARGO_BIN_EXE_crossclr"))
        .args(["synth", "--out"])
        .arg(&data)
        .args([
            "--classes",
            "2",
            "--train-per-class",
            "8",
            "--val-per-class",
            "1",
            "--frames",
            "20",
        ])
        .output()
        .unwrap();
    assert!(
        synth.status.success(),
        "{}",
        String::from_utf8_lossy(&synth.stderr)
    );
    let work = dir.join("work");
    let config = dir.join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "model: skeletonclr\nview: joint\nwork_dir: {}\nbatch_size: 8\nnum_epoch: {num_epoch}\n\
             workers: 1\nsave_interval: -1\nlog_interval: 1\nmodel_args:\n  queue_size: 32\n\
             dataset:\n  format: npy\n  data: {}\n  label: {}\n  layout: ntu25\n{extra}",
            work.display(),
            data.join("train_data.npy").display(),
            data.join("train_label.pkl").display()
        ),
    )
    .unwrap();
    (config, work)
}

/// Starts `crossclr launch <launch> --dist-timeout 60 -- pretrain --quiet --device cpu -c
/// <config> <extra>` with its output piped.
fn spawn_launch(launch: &[&str], config: &std::path::Path, extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_crossclr"))
        .arg("launch")
        .args(launch)
        .args(["--dist-timeout", "60", "--"])
        .args(["pretrain", "--quiet", "--device", "cpu", "-c"])
        .arg(config)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// [`spawn_launch`] run to the end (5 minutes at most): (success, stdout + stderr).
fn run_launch(launch: &[&str], config: &std::path::Path, extra: &[&str]) -> (bool, String) {
    let child = spawn_launch(launch, config, extra);
    wait_all(vec![child], Duration::from_secs(300))
        .pop()
        .unwrap()
}

/// Waits until `file` contains `text` (or panics after `limit`).
fn wait_for_text(file: &std::path::Path, text: &str, limit: Duration) {
    let started = Instant::now();
    loop {
        if std::fs::read_to_string(file).is_ok_and(|t| t.contains(text)) {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{} never contained {text:?}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts the 2 ranks of a `crossclr pretrain` of `config` on the CPU (torchrun variables, a free
/// TCP port, 1 thread each, `--dist-timeout` seconds), their output piped.
fn spawn_two_ranks(config: &std::path::Path, dist_timeout: u64) -> Vec<std::process::Child> {
    let port = free_port().to_string();
    (0..2)
        .map(|rank| {
            Command::new(env!("CARGO_BIN_EXE_crossclr"))
                .args(["pretrain", "--quiet", "--device", "cpu", "--dist-timeout"])
                .arg(dist_timeout.to_string())
                .arg("-c")
                .arg(config)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("OMP_NUM_THREADS", "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// A rank killed (SIGKILL) in the middle of a 2-rank `crossclr pretrain` ends the job: the other
/// rank exits non-zero within seconds (far below `--dist-timeout`) with an error that names the
/// dead rank, instead of hanging.
#[test]
fn a_killed_rank_ends_the_job_with_an_error_naming_it() {
    if !dist::available() {
        eprintln!("skipping: built without the Gloo headers (apt-get install libgloo-dev)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // With gradient buckets on (all-reduces started from autograd hooks, waited for after
    // backward: more places where the dead peer can surface); the launch test below runs the
    // coalesced path.
    let (config, work) = synth_run(dir.path(), 1000, "bucket_cap_mb: 0.01\n");
    let mut children = spawn_two_ranks(&config, 120);
    // Mid-run: rank 0 has logged a step of epoch 2.
    wait_for_text(
        &work.join("log.txt"),
        "epoch 2 step 1/",
        Duration::from_secs(120),
    );
    let mut dead = children.pop().unwrap();
    dead.kill().unwrap(); // SIGKILL
    dead.wait().unwrap();
    let killed_at = Instant::now();
    let (ok, text) = wait_all(children, Duration::from_secs(60)).pop().unwrap();
    let took = killed_at.elapsed();
    println!("rank 0 ended {took:?} after rank 1 was killed:\n{text}");
    assert!(!ok, "rank 0 succeeded without rank 1:\n{text}");
    assert!(
        text.contains("rank 1 of 2 stopped answering"),
        "the error does not name the dead rank:\n{text}"
    );
    assert!(took < Duration::from_secs(30), "rank 0 took {took:?}");
}

/// `crossclr launch --nproc 2 -- pretrain ...` on the tiny synthetic set with `sync_bn`: both
/// ranks succeed, their output comes back prefixed, rank 0 alone writes the work_dir, and the
/// resolved config says `sync_bn: true`.
#[test]
fn launch_runs_two_ranks_of_pretrain() {
    if !dist::available() {
        eprintln!("skipping: built without the Gloo headers (apt-get install libgloo-dev)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (config, work) = synth_run(dir.path(), 1, "sync_bn: true\n");
    let (ok, text) = run_launch(&["--nproc", "2"], &config, &[]);
    assert!(ok, "launch failed:\n{text}");
    assert!(text.contains("[rank 0] pre-training done"), "{text}");
    assert!(text.contains("launch: all 2 ranks succeeded"), "{text}");
    let log = std::fs::read_to_string(work.join("log.txt")).unwrap();
    assert!(
        log.contains("data parallel: rank 0 of 2 (Gloo), 4 samples per rank"),
        "{log}"
    );
    let resolved = std::fs::read_to_string(work.join("config.yaml")).unwrap();
    assert!(resolved.contains("sync_bn: true"), "{resolved}");
}

/// `crossclr launch --nproc 2 -- pretrain` with `step_impl: fast` (the eager fast step with its
/// collectives) trains as the same launch with the reference step: the log names the fast step,
/// and the epoch losses in metrics.jsonl agree to float32 rounding (1e-4 relative; the two steps
/// differ only in float32 summation order).
#[test]
fn launch_trains_two_ranks_with_the_fast_step() {
    if !dist::available() || crossclr::gpu::shim_status() == crossclr::gpu::ShimStatus::Missing {
        eprintln!("skipping: built without the Gloo headers or the C++ shim");
        return;
    }
    let losses = |step_impl: &str| -> (Vec<f64>, String) {
        let dir = tempfile::tempdir().unwrap();
        let (config, work) = synth_run(dir.path(), 2, &format!("step_impl: {step_impl}\n"));
        let (ok, text) = run_launch(&["--nproc", "2"], &config, &[]);
        assert!(ok, "launch ({step_impl}) failed:\n{text}");
        let jsonl = std::fs::read_to_string(work.join("metrics.jsonl")).unwrap();
        let losses = jsonl
            .lines()
            .map(|l| {
                let row: serde_json::Value = serde_json::from_str(l).unwrap();
                row["loss"].as_f64().unwrap()
            })
            .collect();
        (
            losses,
            std::fs::read_to_string(work.join("log.txt")).unwrap(),
        )
    };
    let (fast, log) = losses("fast");
    let (reference, _) = losses("reference");
    assert!(log.contains("step fast"), "{log}");
    assert_eq!(fast.len(), 2, "{log}");
    assert_eq!(fast.len(), reference.len());
    for (a, b) in fast.iter().zip(&reference) {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs(),
            "fast {fast:?} vs reference {reference:?}"
        );
    }
}

/// `crossclr launch` on "two machines" (two launches on this one, `--nnodes 2 --node-rank 0|1
/// --master-addr 127.0.0.1 --master-port P`, one rank each): together they form one 2-rank job
/// that trains, node 0's rank 0 writes the work_dir, and each launch names its global ranks.
/// Without --master-port, --nnodes 2 is refused with a message.
#[test]
fn launch_on_two_nodes_forms_one_job() {
    if !dist::available() {
        eprintln!("skipping: built without the Gloo headers (apt-get install libgloo-dev)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (config, work) = synth_run(dir.path(), 1, "");
    let port = free_port().to_string();
    let node = |rank: &str| {
        let launch = ["--nproc", "1", "--nnodes", "2", "--node-rank", rank];
        let master = ["--master-addr", "127.0.0.1", "--master-port", &port];
        spawn_launch(&[&launch[..], &master[..]].concat(), &config, &[])
    };
    let nodes = vec![node("0"), node("1")];
    let results = wait_all(nodes, Duration::from_secs(300));
    for (n, (ok, text)) in results.iter().enumerate() {
        assert!(ok, "node {n} failed:\n{text}");
        assert!(
            text.contains(&format!("launch: ranks {n}..{n} of 2 (node {n} of 2)")),
            "{text}"
        );
    }
    assert!(
        results[0].1.contains("[rank 0] pre-training done"),
        "{}",
        results[0].1
    );
    let log = std::fs::read_to_string(work.join("log.txt")).unwrap();
    assert!(log.contains("data parallel: rank 0 of 2 (Gloo)"), "{log}");
    let refused = Command::new(env!("CARGO_BIN_EXE_crossclr"))
        .args([
            "launch", "--nproc", "1", "--nnodes", "2", "--", "pretrain", "-c",
        ])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(text.contains("--nnodes 2 needs --master-port"), "{text}");
}

/// A rank of `crossclr launch` killed mid-run (SIGKILL): the launch exits non-zero within the
/// grace period, naming the rank and how it ended; the surviving rank's own error (forwarded with
/// its prefix) names the dead rank too.
#[test]
fn launch_fails_naming_a_killed_rank() {
    if !dist::available() {
        eprintln!("skipping: built without the Gloo headers (apt-get install libgloo-dev)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (config, work) = synth_run(dir.path(), 1000, "sync_bn: true\n");
    let mut child = Command::new(env!("CARGO_BIN_EXE_crossclr"))
        .args([
            "launch",
            "--nproc",
            "2",
            "--dist-timeout",
            "120",
            "--grace",
            "30",
            "--",
        ])
        .args(["pretrain", "--quiet", "--device", "cpu", "-c"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The launcher's stderr, line by line, collected by a thread.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let mut pid = None;
    let started = Instant::now();
    while pid.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("launch said nothing");
        if let Some(p) = line.strip_prefix("launch: rank 1 is pid ") {
            pid = Some(p.trim().to_string());
        }
        lines.push(line);
        assert!(started.elapsed() < Duration::from_secs(60));
    }
    wait_for_text(
        &work.join("log.txt"),
        "epoch 2 step 1/",
        Duration::from_secs(120),
    );
    let pid = pid.unwrap();
    let kill = Command::new("kill").args(["-9", &pid]).status().unwrap();
    assert!(kill.success(), "kill -9 {pid}");
    let killed_at = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if killed_at.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("launch still running 60 s after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    let text = lines.join("\n");
    println!(
        "launch ended {:?} after the kill:\n{text}",
        killed_at.elapsed()
    );
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("rank 1 of 2 failed first (killed by signal 9 (SIGKILL))"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("[rank 0]") && l.contains("rank 1 of 2 stopped answering")),
        "rank 0 did not name the dead rank:\n{text}"
    );
}

/// A rank that hangs (SIGSTOP) in the middle of a 2-rank `crossclr pretrain`: the other rank's
/// next collective times out after `--dist-timeout` (10 s) and it exits non-zero with an error
/// naming the silent rank.
#[test]
fn a_stopped_rank_ends_the_job_after_the_timeout_naming_it() {
    if !dist::available() {
        eprintln!("skipping: built without the Gloo headers (apt-get install libgloo-dev)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (config, work) = synth_run(dir.path(), 1000, "");
    let mut children = spawn_two_ranks(&config, 10);
    wait_for_text(
        &work.join("log.txt"),
        "epoch 2 step 1/",
        Duration::from_secs(120),
    );
    let mut hung = children.pop().unwrap();
    let pid = hung.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let stopped_at = Instant::now();
    let (ok, text) = wait_all(children, Duration::from_secs(90)).pop().unwrap();
    let took = stopped_at.elapsed();
    hung.kill().unwrap(); // SIGKILL ends a stopped process too
    hung.wait().unwrap();
    println!("rank 0 ended {took:?} after rank 1 was stopped:\n{text}");
    assert!(!ok, "rank 0 succeeded without rank 1:\n{text}");
    assert!(
        text.contains("rank 1 of 2 stopped answering"),
        "the error does not name the hung rank:\n{text}"
    );
    assert!(
        took >= Duration::from_secs(5),
        "no timeout was waited for: {took:?}"
    );
}

/// One rank of [`two_rank_fast_step_equals_two_rank_reference_step`].
#[test]
fn dist_fast_step_worker() {
    let Some(pg) = worker_group() else { return };
    if crossclr::gpu::shim_status() == crossclr::gpu::ShimStatus::Missing {
        // Both ranks see the same binary: both skip.
        println!("skipping: built without the C++ shim; rank worker ok");
        return;
    }
    let rank = pg.rank();
    let shard = Shard { rank, world: 2 };
    let ds = common::tiny_data();
    let dir = tempfile::tempdir().unwrap();
    for extra in ["sync_bn=false", "sync_bn=true", "dist_shuffle_bn=true"] {
        let cfg = common::tiny_config("crossclr2", dir.path(), &[extra]);
        // `bucket_cap_mb`: 0 = one all-reduce after backward; 0.01 MiB = dozens of buckets
        // all-reduced during backward (dist::GradBuckets).
        let build = |bucket_cap_mb: f64| {
            tch::manual_seed(11 + rank as i64);
            let mut t = Pretrainer::from_config(&cfg, &ds.layout, Device::Cpu).unwrap();
            t.model.vs_q.double();
            t.model.vs_k.double();
            t.bucket_cap_mb = bucket_cap_mb;
            t.join_group(Arc::clone(&pg)).unwrap();
            t
        };
        let batches = |epoch: usize| {
            let mut loader = loader_config(&cfg);
            loader.batch_size = cfg.batch_size / 2;
            try_epoch_shard_in(Arc::clone(&ds), &loader, epoch, shard, HostMemory::Pageable)
                .unwrap()
                .map(|b| {
                    (
                        b.views[0].to_kind(Kind::Double),
                        b.views[1].to_kind(Kind::Double),
                    )
                })
                .collect::<Vec<_>>()
        };
        // Reference step, 2 ranks, without and with gradient buckets.
        let reference_run = |bucket_cap_mb: f64| {
            let mut reference = build(bucket_cap_mb);
            let mut losses = Vec::new();
            for epoch in 1..=2 {
                for (i, (q, k)) in batches(epoch).iter().enumerate() {
                    tch::manual_seed(1000 * epoch as i64 + i as i64);
                    losses.push(reference.train_step(q, k, epoch).unwrap().loss);
                }
            }
            (reference, losses)
        };
        let (reference, want) = reference_run(0.0);
        let (bucketed, bucketed_losses) = reference_run(0.01);
        assert_eq!(reference.gradient_buckets(), 0);
        assert!(
            bucketed.gradient_buckets() > 10,
            "{extra}: {} gradient buckets of 0.01 MiB",
            bucketed.gradient_buckets()
        );
        assert_eq!(
            want, bucketed_losses,
            "{extra}: losses with gradient buckets"
        );
        assert_same_sides(
            &format!("rank {rank} {extra}: buckets"),
            &reference.model,
            &bucketed.model,
            1e-14,
        );
        // Fast step, 2 ranks, with gradient buckets in the sync_bn case (its backward runs
        // SyncBatchNorm's all-reduces between the buckets').
        let fast_cap = if extra == "sync_bn=true" { 0.01 } else { 0.0 };
        let trainer = build(fast_cap);
        let sgd = SgdConfig {
            momentum: cfg.sgd_momentum,
            weight_decay: cfg.weight_decay,
        };
        let local = (cfg.batch_size / 2) as i64;
        let mut fast = FastStep::new(&trainer.model, local, cfg.base_lr, sgd).unwrap();
        fast.join_group(
            &trainer.model,
            Arc::clone(&pg),
            trainer.sync_bn,
            trainer.dist_shuffle_bn,
            fast_cap,
        )
        .unwrap();
        let mut got = Vec::new();
        for epoch in 1..=2 {
            let cross = trainer.model.is_cross_epoch(epoch);
            for (i, (q, k)) in batches(epoch).iter().enumerate() {
                tch::manual_seed(1000 * epoch as i64 + i as i64);
                let l = fast.step_with_views(&trainer.model, q, k, cross).unwrap();
                let total = l.total.to_kind(Kind::Double).reshape([1]);
                pg.all_reduce_mean_(std::slice::from_ref(&total)).unwrap();
                got.push(total.double_value(&[0]));
            }
        }
        println!("rank {rank} {extra}: reference {want:?}, fast {got:?}");
        assert_eq!(want.len(), 4, "16 samples, global batch 8, 2 epochs");
        assert_eq!(want.len(), got.len());
        for (a, b) in want.iter().zip(&got) {
            assert!(
                (a - b).abs() <= 1e-10 * a.abs().max(1.0),
                "{extra}: loss {a} vs {b}"
            );
        }
        assert_same_sides(
            &format!("rank {rank} {extra}"),
            &reference.model,
            &trainer.model,
            1e-10,
        );
        let ptr = fast.queue_ptr().int64_value(&[0]) as usize;
        assert_eq!(ptr, reference.model.queue_ptr(), "{extra}: queue pointer");
        // 4 steps of the global batch 8 into a queue of 64 (a local batch of 4 would give 16).
        let (steps, global, queue) = (4, 8, cfg.model_args.queue_size as usize);
        assert_eq!(
            ptr,
            steps * global % queue,
            "{extra}: the queue advances by the global batch"
        );
        for (a, b) in reference.model.branches.iter().zip(&trainer.model.branches) {
            let d = (&a.queue.keys - &b.queue.keys)
                .abs()
                .max()
                .double_value(&[]);
            assert!(
                d <= 1e-10,
                "rank {rank} {extra}: {} queue differs by {d:e}",
                a.view
            );
            // Identical on both ranks.
            let both = pg.all_gather(&b.queue.keys.unsqueeze(0)).unwrap();
            let across = (both.get(0) - both.get(1)).abs().max().double_value(&[]);
            assert_eq!(
                across, 0.0,
                "{extra}: {} queues differ across ranks",
                a.view
            );
        }
    }
    pg.barrier().unwrap();
    println!("rank worker ok (rank {rank})");
}

/// One rank of [`two_rank_dropout_masks_are_the_one_process_masks`].
#[test]
fn dist_dropout_worker() {
    let Some(pg) = worker_group() else { return };
    let rank = pg.rank();
    let ds = common::tiny_data();
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::tiny_config(
        "crossclr2",
        dir.path(),
        &[
            "sync_bn=true",
            "model_args.dropout=0.5",
            "step_impl=reference",
        ],
    );
    let run = |t: &mut Pretrainer, shard: Shard| -> Vec<f64> {
        let mut loader = loader_config(&cfg);
        loader.batch_size = cfg.batch_size / shard.world;
        let mut losses = Vec::new();
        for epoch in 1..=2 {
            tch::manual_seed(100 + epoch as i64);
            let batches =
                try_epoch_shard_in(Arc::clone(&ds), &loader, epoch, shard, HostMemory::Pageable)
                    .unwrap();
            for b in batches {
                losses.push(t.train_step(&b.views[0], &b.views[1], epoch).unwrap().loss);
            }
        }
        losses
    };
    let build = |seed: i64, cfg: &PretrainConfig| {
        tch::manual_seed(seed);
        let mut t = Pretrainer::from_config(cfg, &ds.layout, Device::Cpu).unwrap();
        t.model.vs_q.double();
        t.model.vs_k.double();
        t
    };
    let mut unfused = cfg.clone();
    unfused.kernels.fused_tail = Switch::Off;
    let mut one = build(3, &unfused);
    let l1 = run(&mut one, Shard::WHOLE);
    let mut two = build(3 + rank as i64, &cfg);
    two.join_group(Arc::clone(&pg)).unwrap();
    let l2 = run(&mut two, Shard { rank, world: 2 });
    println!("rank {rank}: losses 1 process {l1:?}, 2 ranks {l2:?}");
    assert_eq!(l1.len(), 4);
    for (a, b) in l1.iter().zip(&l2) {
        assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "loss {a} vs {b}");
    }
    for (a, b) in [
        (&one.model.vs_q, &two.model.vs_q),
        (&one.model.vs_k, &two.model.vs_k),
    ] {
        for (name, d) in differences(a, b) {
            assert!(d <= 1e-6, "rank {rank}: {name} differs by {d:e} (relative)");
        }
    }
    pg.barrier().unwrap();
    println!("rank worker ok (rank {rank})");
}
