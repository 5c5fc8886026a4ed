//! `crossclr launch --nproc N [--dist-timeout S] -- pretrain <args>`: a small torchrun. Starts N
//! ranks of this binary with torchrun's variables (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`,
//! `LOCAL_WORLD_SIZE`, `GROUP_RANK`, `MASTER_ADDR=127.0.0.1`, `MASTER_PORT` = a free port; rank 0
//! hosts the TCPStore). On several machines, one launch per machine with `--nnodes M
//! --node-rank R --master-addr <node 0's address> --master-port P` (static rendezvous, as
//! `torchrun --nnodes M --node-rank R --master-addr .. --master-port ..`): machine R runs the
//! global ranks `R·N .. R·N + N - 1`. It prefixes every line of their output with `[rank r]`, and
//! when a rank fails, gives the others a grace period to end on their own (they notice the dead
//! rank in their next collective and say which rank stopped answering), then kills them; the
//! launch then fails naming the first rank that failed and its exit status.
use anyhow::{bail, Context};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Ranks to start on this machine.
    #[arg(long)]
    pub nproc: usize,
    /// Machines in the job (one launch on each, every one with the same --nproc).
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This machine's place among them, 0..nnodes (node 0 runs rank 0, which hosts the store).
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0, reachable from every machine (default 127.0.0.1: one machine).
    #[arg(long)]
    pub master_addr: Option<String>,
    /// Port of the rendezvous store on node 0 (default: a free port; required with --nnodes > 1).
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Passed to every rank's `pretrain --dist-timeout` (seconds a rank waits for the others).
    #[arg(long)]
    pub dist_timeout: Option<u64>,
    /// Seconds the other ranks get to end on their own after one failed, before they are killed.
    #[arg(long, default_value_t = 15)]
    pub grace: u64,
    /// The command every rank runs: `pretrain <args>`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// A free TCP port on 127.0.0.1 (asked from the OS, released for rank 0 to bind).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Copies `from` line by line to stdout or stderr, each line prefixed with `[rank r] `.
fn forward(
    from: impl Read + Send + 'static,
    rank: usize,
    to_stderr: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches(['\n', '\r']);
                    // A progress bar's carriage returns: keep the last state of the line.
                    let text = text.rsplit('\r').next().unwrap_or("");
                    let out = format!("[rank {rank}] {text}\n");
                    if to_stderr {
                        let _ = std::io::stderr().lock().write_all(out.as_bytes());
                    } else {
                        let _ = std::io::stdout().lock().write_all(out.as_bytes());
                    }
                }
            }
        }
    })
}

/// How a rank ended, in words (`exit status 1`, `killed by signal 9 (SIGKILL)`).
fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            let name = match sig {
                9 => " (SIGKILL)",
                15 => " (SIGTERM)",
                6 => " (SIGABRT)",
                11 => " (SIGSEGV)",
                2 => " (SIGINT)",
                _ => "",
            };
            return format!("killed by signal {sig}{name}");
        }
    }
    match status.code() {
        Some(c) => format!("exit status {c}"),
        None => status.to_string(),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.nproc == 0 {
        bail!("--nproc must be at least 1");
    }
    if args.command.first().map(String::as_str) != Some("pretrain") {
        bail!(
            "launch runs `pretrain` (the data-parallel command): crossclr launch --nproc {} -- pretrain -c <config> [...], got {:?}",
            args.nproc,
            args.command
        );
    }
    if args.node_rank >= args.nnodes {
        bail!(
            "--node-rank {} is not in 0..{} (--nnodes {})",
            args.node_rank,
            args.nnodes,
            args.nnodes
        );
    }
    let port = match (args.master_port, args.nnodes) {
        (Some(p), _) => p,
        (None, 1) => free_port()?,
        (None, _) => bail!(
            "--nnodes {} needs --master-port (and --master-addr, node 0's address): every machine \
             must name the same rendezvous",
            args.nnodes
        ),
    };
    let master = args
        .master_addr
        .clone()
        .unwrap_or_else(|| "127.0.0.1".to_string());
    if args.nnodes > 1 && args.master_addr.is_none() {
        bail!(
            "--nnodes {} needs --master-addr (node 0's address, reachable from every machine)",
            args.nnodes
        );
    }
    let world = args.nnodes * args.nproc;
    let first_rank = args.node_rank * args.nproc;
    let exe = std::env::current_exe().context("locating the crossclr binary")?;
    let mut cmd_args = vec![args.command[0].clone()];
    if let Some(t) = args.dist_timeout {
        cmd_args.push("--dist-timeout".into());
        cmd_args.push(t.to_string());
    }
    cmd_args.extend(args.command[1..].iter().cloned());
    // As torchrun: one thread per rank unless the user chose (here: the cores shared out).
    let threads = std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / args.nproc).max(1).to_string()
    });
    eprintln!(
        "launch: ranks {}..{} of {world} (node {} of {}) of {} {} (MASTER_ADDR {master}, MASTER_PORT \
         {port}, OMP_NUM_THREADS {threads})",
        first_rank,
        first_rank + args.nproc - 1,
        args.node_rank,
        args.nnodes,
        exe.display(),
        cmd_args.join(" ")
    );
    let mut children: Vec<Option<Child>> = Vec::with_capacity(args.nproc);
    let mut pumps = Vec::new();
    for local in 0..args.nproc {
        let rank = first_rank + local;
        let spawned = Command::new(&exe)
            .args(&cmd_args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", args.nproc.to_string())
            .env("GROUP_RANK", args.node_rank.to_string())
            .env("MASTER_ADDR", &master)
            .env("MASTER_PORT", port.to_string())
            .env("OMP_NUM_THREADS", &threads)
            .env_remove("TORCHELASTIC_USE_AGENT_STORE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                for c in children.iter_mut().flatten() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                bail!("starting rank {rank} ({}): {e}", exe.display());
            }
        };
        eprintln!("launch: rank {rank} is pid {}", child.id());
        if let Some(out) = child.stdout.take() {
            pumps.push(forward(out, rank, false));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(forward(err, rank, true));
        }
        children.push(Some(child));
    }
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; args.nproc];
    let mut first_failure: Option<(usize, ExitStatus)> = None;
    let mut failed_at: Option<Instant> = None;
    let mut killed = Vec::new();
    loop {
        for (local, slot) in children.iter_mut().enumerate() {
            let rank = first_rank + local;
            if let Some(child) = slot {
                if let Some(status) = child.try_wait().context("waiting for a rank")? {
                    statuses[local] = Some(status);
                    *slot = None;
                    if !status.success() && first_failure.is_none() {
                        eprintln!(
                            "launch: rank {rank} failed ({}); the other ranks get {} s to end",
                            describe(status),
                            args.grace
                        );
                        first_failure = Some((rank, status));
                        failed_at = Some(Instant::now());
                    }
                }
            }
        }
        if children.iter().all(Option::is_none) {
            break;
        }
        if failed_at.is_some_and(|t| t.elapsed() > Duration::from_secs(args.grace)) {
            for (local, slot) in children.iter_mut().enumerate() {
                let rank = first_rank + local;
                if let Some(child) = slot {
                    eprintln!("launch: killing rank {rank} (pid {})", child.id());
                    let _ = child.kill();
                    statuses[local] = child.wait().ok();
                    killed.push(rank);
                    *slot = None;
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in pumps {
        let _ = p.join();
    }
    match first_failure {
        None => {
            if args.nnodes == 1 {
                eprintln!("launch: all {} ranks succeeded", args.nproc);
            } else {
                eprintln!(
                    "launch: all {} ranks of node {} succeeded",
                    args.nproc, args.node_rank
                );
            }
            Ok(())
        }
        Some((rank, status)) => {
            let others: Vec<String> = statuses
                .iter()
                .enumerate()
                .map(|(local, s)| (first_rank + local, s))
                .filter(|(r, _)| *r != rank)
                .map(|(r, s)| {
                    let how = s.map_or("unknown".to_string(), describe);
                    if killed.contains(&r) {
                        format!("rank {r} killed by the launcher")
                    } else {
                        format!("rank {r} {how}")
                    }
                })
                .collect();
            bail!(
                "rank {rank} of {world} failed first ({}); {}",
                describe(status),
                if others.is_empty() {
                    "no other rank".to_string()
                } else {
                    others.join(", ")
                }
            )
        }
    }
}
