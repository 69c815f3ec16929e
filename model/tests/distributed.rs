//! Two-process tests of `droppos_model::distributed` over Gloo on loopback. The test binary
//! re-executes itself: `worker` does nothing unless DD_TEST_ROLE is set, in which case it is
//! one rank of a job started by the other tests.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use droppos_model::distributed::{
    launch_local, GradSync, GradSyncMode, GradSyncOptions, GroupOptions, LaunchSpec, ProcessGroup,
    ReduceOp,
};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

const ROLE: &str = "DD_TEST_ROLE";
const OUT: &str = "DD_TEST_OUT";

fn worker_args() -> Vec<OsString> {
    ["worker", "--exact", "--nocapture", "--test-threads=1"]
        .iter()
        .map(OsString::from)
        .collect()
}

fn options(timeout_s: u64) -> GroupOptions {
    GroupOptions {
        timeout: Duration::from_secs(timeout_s),
        ..GroupOptions::default()
    }
}

// ---------------------------------------------------------------- the worker side

#[test]
fn worker() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    tch::set_num_threads(1);
    let out = PathBuf::from(std::env::var(OUT).expect("DD_TEST_OUT"));
    let result = match role.as_str() {
        "collectives" => collectives(),
        r if r.starts_with("train:") => train(r, &out),
        "die" => die(&out),
        "hang" => hang(&out),
        "alone" => alone(),
        other => panic!("unknown role {other}"),
    };
    if let Err(e) = result {
        eprintln!("RANK-ERROR: {e}");
        std::process::exit(17);
    }
}

type R = Result<(), Box<dyn std::error::Error>>;

fn collectives() -> R {
    let pg = ProcessGroup::from_env(&options(30))?.expect("launched");
    let r = pg.rank() as f64;
    let t = Tensor::from_slice(&[r + 1.0, 10.0 * r]);
    pg.all_reduce(&[&t], ReduceOp::Sum)?;
    assert_eq!(Vec::<f64>::try_from(&t)?, vec![3.0, 10.0]);
    let m = Tensor::from_slice(&[r as f32]);
    pg.all_reduce(&[&m], ReduceOp::Max)?;
    assert_eq!(Vec::<f32>::try_from(&m)?, vec![1.0]);
    let mean = Tensor::from_slice(&[r as f32 * 4.0]);
    pg.all_reduce_mean(&[&mean])?;
    assert_eq!(Vec::<f32>::try_from(&mean)?, vec![2.0]);
    // Broadcast from rank 1, then a coalesced broadcast of parameter-like tensors from 0.
    let b = Tensor::full([3], r, (Kind::Float, Device::Cpu));
    pg.broadcast(&[&b], 1)?;
    assert_eq!(Vec::<f32>::try_from(&b)?, vec![1.0; 3]);
    let vs = nn::VarStore::new(Device::Cpu);
    tch::manual_seed(100 + pg.rank() as i64);
    let _l = nn::linear(vs.root() / "l", 3, 2, Default::default());
    pg.broadcast_var_store(&vs)?;
    let w = vs.variables()["l.weight"].copy();
    let gathered = w.copy();
    pg.all_reduce(&[&gathered], ReduceOp::Sum)?;
    assert!(
        gathered.allclose(&(&w * 2.0), 0.0, 0.0, false),
        "weights differ after broadcast"
    );
    pg.barrier()?;
    Ok(())
}

fn mlp(vs: &nn::Path) -> impl Module {
    nn::seq()
        .add(nn::linear(vs / "fc1", 6, 16, Default::default()))
        .add_fn(|x| x.gelu("none"))
        .add(nn::linear(vs / "fc2", 16, 16, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(vs / "fc3", 16, 3, Default::default()))
}

/// The global batch of step `s`: 8 samples, the same on every rank.
fn batch(step: i64) -> (Tensor, Tensor) {
    let g = Tensor::arange(8 * 6, (Kind::Float, Device::Cpu)).view([8, 6]);
    let x = ((&g * (0.37 + step as f64 * 0.11)).sin() * 2.0).to_kind(Kind::Float);
    let y = Tensor::from_slice(&[0i64, 1, 2, 1, 0, 2, 2, 1]).roll([step], [0]);
    (x, y)
}

const STEPS: i64 = 4;

/// "train:<reducer|flat>:<micro-steps>": data-parallel steps of a small MLP on half the global
/// batch each; rank 0 also runs the same steps alone on the whole batch. Writes the weights.
fn train(role: &str, out: &Path) -> R {
    let mut parts = role.split(':').skip(1);
    let mode: GradSyncMode = parts.next().unwrap().parse()?;
    let micro: i64 = parts.next().unwrap().parse()?;
    let pg = ProcessGroup::from_env(&options(30))?.expect("launched");
    let (rank, world) = (pg.rank() as i64, pg.world_size() as i64);

    // Different initial weights per rank: the broadcast must make them rank 0's.
    tch::manual_seed(7 + rank);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = mlp(&vs.root());
    pg.broadcast_var_store(&vs)?;
    let mut opt = nn::Sgd::default().build(&vs, 0.1)?;
    let sync_opts = GradSyncOptions {
        mode,
        // Tiny buckets so that the model spans several (after the Reducer's rebuild).
        bucket_bytes: 256,
        first_bucket_bytes: 128,
        ..GradSyncOptions::default()
    };
    let mut sync = GradSync::new(&pg, &vs.trainable_variables(), &sync_opts)?;

    let mut reference = None;
    if rank == 0 {
        let mut rvs = nn::VarStore::new(Device::Cpu);
        let rmodel = mlp(&rvs.root());
        rvs.copy(&vs)?;
        let ropt = nn::Sgd::default().build(&rvs, 0.1)?;
        reference = Some((rvs, rmodel, ropt));
    }

    let local = 8 / world;
    for step in 0..STEPS {
        let (x, y) = batch(step);
        let (x, y) = (
            x.narrow(0, rank * local, local),
            y.narrow(0, rank * local, local),
        );
        opt.zero_grad();
        let per = local / micro;
        for m in 0..micro {
            let xm = x.narrow(0, m * per, per);
            let ym = y.narrow(0, m * per, per);
            let loss = model.forward(&xm).cross_entropy_for_logits(&ym) / micro as f64;
            sync.backward(&loss, m == micro - 1)?;
        }
        opt.step();
        if let Some((_, rmodel, ropt)) = reference.as_mut() {
            let (x, y) = batch(step);
            ropt.zero_grad();
            rmodel.forward(&x).cross_entropy_for_logits(&y).backward();
            ropt.step();
        }
    }
    save(&vs, &out.join(format!("rank{rank}.pt")))?;
    if let Some((rvs, _, _)) = reference {
        save(&rvs, &out.join("reference.pt"))?;
    }
    pg.barrier()?;
    Ok(())
}

fn save(vs: &nn::VarStore, path: &Path) -> R {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::save_multi(&named, path)?;
    Ok(())
}

/// Both ranks take a data-parallel step; then rank 1 stops (and is killed by the test) while
/// rank 0 keeps stepping: the failure surfaces inside backward, from the Reducer's all-reduce.
fn die(out: &Path) -> R {
    let pg = ProcessGroup::from_env(&options(20))?.expect("launched");
    let vs = nn::VarStore::new(Device::Cpu);
    let model = mlp(&vs.root());
    let mut sync = GradSync::new(&pg, &vs.trainable_variables(), &GradSyncOptions::default())?;
    let (x, y) = batch(0);
    sync.backward(&model.forward(&x).cross_entropy_for_logits(&y), true)?;
    if pg.rank() == 1 {
        std::fs::write(out.join("ready"), b"")?;
        std::thread::sleep(Duration::from_secs(120));
        return Ok(());
    }
    loop {
        sync.backward(&model.forward(&x).cross_entropy_for_logits(&y), true)?;
    }
}

/// Rank 1 joins, then stops taking part; rank 0's next collective must time out.
fn hang(out: &Path) -> R {
    let pg = ProcessGroup::from_env(&options(3))?.expect("launched");
    if pg.rank() == 1 {
        std::fs::write(out.join("ready"), b"")?;
        std::thread::sleep(Duration::from_secs(120));
        return Ok(());
    }
    let t = Tensor::ones([4], (Kind::Float, Device::Cpu));
    pg.all_reduce(&[&t], ReduceOp::Sum)?;
    Ok(())
}

/// World size 2, but rank 1 is never started.
fn alone() -> R {
    ProcessGroup::from_env(&options(2))?;
    Ok(())
}

// ---------------------------------------------------------------- the test side

fn out_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn launch(role: &str, out: &Path) -> droppos_model::distributed::Result<()> {
    let mut spec = LaunchSpec::new(2, worker_args(), Duration::from_secs(30));
    spec.envs = vec![
        (ROLE.into(), role.into()),
        (OUT.into(), out.display().to_string()),
        ("OMP_NUM_THREADS".into(), "1".into()),
    ];
    launch_local(&spec)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts one rank by hand (rank 0 hosts the store: torchrun without its agent, or Slurm).
fn spawn_rank(role: &str, out: &Path, rank: usize, world: usize, port: u16) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(worker_args())
        .env(ROLE, role)
        .env(OUT, out)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a child with a safety limit, returning (exit code, stderr).
fn finish(mut child: Child, limit: Duration) -> (Option<i32>, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (
                status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "rank still running after {limit:?} (it hangs): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for(path: &Path, limit: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < limit, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_clean_error(stderr: &str, expect_any: &[&str]) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("RANK-ERROR: "))
        .unwrap_or_else(|| panic!("no error line in: {stderr}"));
    assert!(
        expect_any
            .iter()
            .any(|w| line.to_lowercase().contains(&w.to_lowercase())),
        "unexpected error: {line}"
    );
    assert!(!stderr.contains("frame #"), "C++ backtrace in: {stderr}");
    assert!(
        !stderr.contains("Exception raised from"),
        "C++ backtrace in: {stderr}"
    );
}

#[test]
fn collectives_over_gloo() {
    let dir = out_dir();
    launch("collectives", dir.path()).unwrap();
}

fn load(path: &Path) -> Vec<(String, Tensor)> {
    let mut v = Tensor::load_multi(path).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn check_equivalence(role: &str) {
    let dir = out_dir();
    launch(role, dir.path()).unwrap();
    let r0 = load(&dir.path().join("rank0.pt"));
    let r1 = load(&dir.path().join("rank1.pt"));
    let reference = load(&dir.path().join("reference.pt"));
    assert_eq!(r0.len(), 6);
    for ((n0, a), ((n1, b), (nr, c))) in r0.iter().zip(r1.iter().zip(reference.iter())) {
        assert_eq!((n0, n1), (nr, nr));
        // Both ranks apply the same averaged gradient to the same weights: bitwise equal.
        assert!(a.equal(b), "{role}: {n0} differs between the ranks");
        let diff = (a - c).abs().max().double_value(&[]);
        assert!(
            diff < 1e-5,
            "{role}: {n0} differs from the single-process run by {diff}"
        );
        // And training moved the weights: the test would be vacuous otherwise.
    }
    let start_moved = r0
        .iter()
        .any(|(_, a)| a.abs().sum(Kind::Double).double_value(&[]) > 0.0);
    assert!(start_moved);
}

#[test]
fn reducer_matches_one_process_with_the_combined_batch() {
    check_equivalence("train:reducer:1");
}

#[test]
fn reducer_skips_sync_on_accumulation_micro_steps() {
    check_equivalence("train:reducer:2");
}

#[test]
fn flat_buckets_match_one_process_with_the_combined_batch() {
    check_equivalence("train:flat:2");
}

#[test]
fn a_killed_peer_gives_a_clear_error() {
    let dir = out_dir();
    let port = free_port();
    let r0 = spawn_rank("die", dir.path(), 0, 2, port);
    let mut r1 = spawn_rank("die", dir.path(), 1, 2, port);
    wait_for(&dir.path().join("ready"), Duration::from_secs(60));
    r1.kill().unwrap();
    let _ = r1.wait();
    let (code, stderr) = finish(r0, Duration::from_secs(60));
    assert_eq!(code, Some(17), "{stderr}");
    assert_clean_error(&stderr, &["rank 0/2"]);
}

#[test]
fn a_hung_peer_times_out() {
    let dir = out_dir();
    let port = free_port();
    let r0 = spawn_rank("hang", dir.path(), 0, 2, port);
    let mut r1 = spawn_rank("hang", dir.path(), 1, 2, port);
    let (code, stderr) = finish(r0, Duration::from_secs(60));
    let _ = r1.kill();
    let _ = r1.wait();
    assert_eq!(code, Some(17), "{stderr}");
    assert_clean_error(&stderr, &["timed out", "timeout"]);
}

#[test]
fn a_peer_that_never_joins_times_out() {
    let dir = out_dir();
    let r0 = spawn_rank("alone", dir.path(), 0, 2, free_port());
    let (code, stderr) = finish(r0, Duration::from_secs(60));
    assert_eq!(code, Some(17), "{stderr}");
    assert_clean_error(&stderr, &["rendezvous"]);
}
