//! Data-parallel collectives (src/dist.rs) with 2 real processes over Gloo on 127.0.0.1: the test
//! starts this test binary twice more as rank 0 and rank 1 (`dist_rank_worker`), which meet over a
//! FileStore in a temp folder (no port to race for), one thread each, with a timeout so that a
//! hang fails the test.
use crossclr::dist::{self, ProcessGroup, Rendezvous, Store};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const RANK_VAR: &str = "CROSSCLR_TEST_DIST_RANK";
const STORE_VAR: &str = "CROSSCLR_TEST_DIST_STORE";

#[test]
fn two_processes_agree_after_broadcast_all_reduce_and_all_gather() {
    if !dist::available() {
        eprintln!("skipping: built without the Gloo headers (apt-get install libgloo-dev)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(&exe)
                .args([
                    "dist_rank_worker",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(RANK_VAR, rank.to_string())
                .env(STORE_VAR, &store)
                .env("OMP_NUM_THREADS", "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let started = Instant::now();
    let mut outputs = Vec::new();
    for (rank, child) in children.iter_mut().enumerate() {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                outputs.push((rank, status));
                break;
            }
            if started.elapsed() > Duration::from_secs(120) {
                for c in children.iter_mut() {
                    let _ = c.kill();
                }
                panic!("rank {rank} hung (no exit after 120 s)");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for (child, (rank, status)) in children.into_iter().zip(outputs) {
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(status.success(), "rank {rank} failed:\n{text}");
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
