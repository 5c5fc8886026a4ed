//! Data-parallel collectives (src/dist.rs) with 2 real processes over Gloo on 127.0.0.1: the test
//! starts this test binary twice more as rank 0 and rank 1 (`dist_rank_worker`), which meet over a
//! FileStore in a temp folder (no port to race for), one thread each, with a timeout so that a
//! hang fails the test.
mod common;
use crossclr::data::loader::{try_epoch_shard_in, HostMemory, Shard};
use crossclr::dist::{self, ProcessGroup, Rendezvous, Store};
use crossclr::ssl::Pretrainer;
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
    let limit = Duration::from_secs(120);
    for (rank, (ok, text)) in wait_all(children, limit).into_iter().enumerate() {
        assert!(ok, "rank {rank} failed:\n{text}");
        assert!(text.contains("rank worker ok"), "rank {rank}:\n{text}");
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
