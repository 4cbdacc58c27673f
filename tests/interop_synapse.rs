//! replhub between released Synapse's own replication code: for each release, a real master
//! and two real workers (`interop/run_pair.py`, see interop/README.md) with replhub in the
//! middle, on each I/O backend. The verdict must be a pass: every row the master wrote reached
//! both workers' handlers exactly once, no ERROR or exception anywhere, and one worker's
//! REMOTE_SERVER_UP reached the other (and not its sender).
//!
//! For 1.12.4 (the 1.10–1.12 generation) the hub learns the generation from the master's
//! refusal of `REPLICATE ALL` (one expected ERROR, `--allow-probe`; none when pinned with
//! `--protocol 1.12`), its workers subscribe with `REPLICATE <stream> <token>` from an empty
//! database (`--prefill 0`: their tokens are the master's), and a third worker connecting late
//! from those tokens is caught up from the hub's history (`--late-worker`), then gets live rows.
//! With a history of 1 KiB and the master's prefilled rows (workers start behind the hub), every
//! worker's catch-up is fetched from the master over a connection of its own and spliced.
//!
//! With no Synapse master at all, Synapse 1.12.4's own workers follow `replhub serve --synthetic
//! --synapse-version 1.12` (`interop/run_synthetic.py`): they subscribe from tokens the hub's
//! history holds, are caught up from it, then get live rows; every row (federation rows through
//! 1.12's own federation sender parsing) must reach their handlers exactly as a reference reader
//! got it, and a worker from tokens below the history gets 1.12's `has fallen behind` ERROR.
//!
//! The releases' virtualenvs come from `scripts/interop-setup` (CI runs it before `cargo
//! test`). Without them these tests fail, saying how to create them: they never pass silently.
// Integration tests wait for real processes with real deadlines.
#![allow(clippy::disallowed_methods)]
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One pair at a time: each runs four processes, and the machine may have two cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// run_pair's own deadline for the rows, and ours for the whole run.
const PAIR_TIMEOUT_S: u64 = 60;
const RUN_LIMIT: Duration = Duration::from_secs(150);

fn venv_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("REPLHUB_INTEROP_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    Path::new(&home).join(".cache/replhub-interop")
}

/// Runs `interop/<script>` under python3 with `args` plus `--venv-dir` and `--log-dir`, kills it
/// if it is still running after RUN_LIMIT, and returns its exit status and its verdict (the last
/// line of its stdout, as JSON). `label` names the run in panic messages.
fn run_interop_script(
    script: &str,
    args: &[&str],
    log_dir: &Path,
    label: &str,
) -> (ExitStatus, serde_json::Value) {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut child = Command::new("python3")
        .arg(Path::new(root).join("interop").join(script))
        .args(args)
        .arg("--venv-dir")
        .arg(venv_dir())
        .arg("--log-dir")
        .arg(log_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("python3 runs interop/{script}: {e}"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the interop script") {
            break status;
        }
        if started.elapsed() > RUN_LIMIT {
            // The scripts stop their children within a second of their own exit.
            let _ = child.kill();
            let _ = child.wait();
            panic!("{label}: {script} still running after {RUN_LIMIT:?}; logs in {}", log_dir.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stdout = String::new();
    child.stdout.take().expect("piped").read_to_string(&mut stdout).expect("interop script output");
    let last = stdout.lines().last().unwrap_or_default();
    let verdict = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("{label}: no verdict ({e}) in {stdout:?}; logs in {}", log_dir.display()));
    (status, verdict)
}

fn run_pair(release: &str, io: &str, generation: &str) {
    run_pair_with(release, io, generation, &[], &[]);
}

/// `run_pair.py` with extra arguments for it and extra flags for the hub.
fn run_pair_with(release: &str, io: &str, generation: &str, pair_args: &[&str], hub_flags: &[&str]) {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let python = venv_dir().join(format!("venv-{release}/bin/python"));
    assert!(
        python.exists(),
        "no virtualenv for Synapse {release} at {}: run `scripts/interop-setup 1.12.4 1.13.0 1.22.1 1.66.0` \
         first (needs PyPI once; .ci/run does it)",
        python.display()
    );
    let log_dir = std::env::temp_dir().join(format!("replhub-interop-{release}-{io}-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).expect("log dir");
    let hub = format!(
        "{} serve --upstream {{upstream}} --listen {{listen}} --metrics-listen off --threads 1 --io {io} {}",
        env!("CARGO_BIN_EXE_replhub"),
        hub_flags.join(" ")
    );
    let timeout = PAIR_TIMEOUT_S.to_string();
    let mut args = vec!["--release", release, "--timeout", &timeout, "--hub-cmd", &hub];
    args.extend_from_slice(pair_args);
    let (status, verdict) = run_interop_script("run_pair.py", &args, &log_dir, &format!("{release}/{io}"));
    assert_eq!(verdict["event"], "verdict", "{release}/{io}: {verdict}");
    let failures = &verdict["failures"];
    assert_eq!(verdict["pass"], true, "{release}/{io}: {failures}; logs in {}", log_dir.display());
    assert!(status.success(), "{release}/{io}: run_pair exited with {status}");
    let late = pair_args.contains(&"--late-worker");
    for w in ["w1", "w2", "w3"].into_iter().take(if late { 3 } else { 2 }) {
        let worker = &verdict["workers"][w];
        assert!(worker["rows"].as_u64().is_some_and(|n| n > 0), "{release}/{io}: {w} got no rows: {worker}");
        for field in ["missing", "unexpected", "duplicates", "problems"] {
            assert_eq!(worker[field], 0, "{release}/{io}: {w} {field}: {worker}");
        }
    }
    if generation == "1.10" {
        // The 1.10–1.12 master sends REMOTE_SERVER_UP to every connection, its sender too.
        assert_eq!(verdict["workers"]["w1"]["remote_server_up"], serde_json::json!(["remote.example.org"]));
        let probes = verdict["probes"].as_u64().unwrap_or(0);
        let expected = u64::from(pair_args.contains(&"--allow-probe"));
        assert_eq!(probes, expected, "{release}/{io}: REPLICATE ALL refusals");
    } else {
        // Only w1 sent REMOTE_SERVER_UP; from 1.13 the master (so replhub) never echoes it back.
        assert_eq!(verdict["workers"]["w1"]["remote_server_up"], serde_json::json!([]), "{release}/{io}");
    }
    // The hub says which generation it learnt.
    let hub_log = ["hub.stdout", "hub.stderr"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(log_dir.join(f)).ok())
        .collect::<String>();
    assert!(
        hub_log.contains(&format!("protocol generation {generation}")),
        "{release}/{io}: the hub did not log generation {generation}; logs in {}",
        log_dir.display()
    );
    if hub_flags.contains(&"--history-bytes") {
        assert!(
            hub_log.contains("rows fetched from the master for a catch-up"),
            "{release}/{io}: no catch-up was fetched; logs in {}",
            log_dir.display()
        );
    }
    let _ = std::fs::remove_dir_all(&log_dir);
}

/// 1.12.4 with the generation learnt (one refused `REPLICATE ALL`) and a late worker.
const V1_12_AUTO: [&str; 4] = ["--prefill", "0", "--allow-probe", "--late-worker"];

#[test]
fn synapse_1_12_4_epoll() {
    run_pair_with("1.12.4", "epoll", "1.10", &V1_12_AUTO, &[]);
}

#[test]
fn synapse_1_12_4_uring() {
    run_pair_with("1.12.4", "uring", "1.10", &V1_12_AUTO, &[]);
}

/// 1.12.4 with workers behind a tiny history: their catch-ups come from the master.
const V1_12_FETCH: [&str; 2] = ["--allow-probe", "--late-worker"];

#[test]
fn synapse_1_12_4_fetch_epoll() {
    run_pair_with("1.12.4", "epoll", "1.10", &V1_12_FETCH, &["--history-bytes", "1KiB"]);
}

#[test]
fn synapse_1_12_4_fetch_uring() {
    run_pair_with("1.12.4", "uring", "1.10", &V1_12_FETCH, &["--history-bytes", "1KiB"]);
}

#[test]
fn synapse_1_12_4_pinned_epoll() {
    // Pinned, the hub greets as a 1.12 worker at once: no ERROR anywhere.
    run_pair_with("1.12.4", "epoll", "1.10", &["--prefill", "0", "--late-worker"], &["--protocol", "1.12"]);
}

#[test]
fn synapse_1_13_0_epoll() {
    run_pair("1.13.0", "epoll", "1.13");
}

#[test]
fn synapse_1_13_0_uring() {
    run_pair("1.13.0", "uring", "1.13");
}

#[test]
fn synapse_1_22_1_epoll() {
    run_pair("1.22.1", "epoll", "1.22");
}

#[test]
fn synapse_1_22_1_uring() {
    run_pair("1.22.1", "uring", "1.22");
}

#[test]
fn synapse_1_66_0_epoll() {
    run_pair("1.66.0", "epoll", "1.22");
}

#[test]
fn synapse_1_66_0_uring() {
    run_pair("1.66.0", "uring", "1.22");
}

/// `interop/run_synthetic.py`: Synapse 1.12.4's workers behind the synthetic 1.12 master.
fn run_synthetic(io: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let release = "1.12.4";
    let python = venv_dir().join(format!("venv-{release}/bin/python"));
    assert!(
        python.exists(),
        "no virtualenv for Synapse {release} at {}: run `scripts/interop-setup {release}` first",
        python.display()
    );
    let log_dir = std::env::temp_dir().join(format!("replhub-interop-synthetic-{io}-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).expect("log dir");
    // The workers check the SERVER name against theirs (example.com).
    let hub = format!(
        "{} serve --synthetic 500 --synapse-version 1.12 --server-name example.com --listen {{listen}} \
         --metrics-listen off --threads 1 --io {io}",
        env!("CARGO_BIN_EXE_replhub"),
    );
    let timeout = PAIR_TIMEOUT_S.to_string();
    let args = ["--release", release, "--timeout", &timeout, "--hub-cmd", &hub, "--behind-worker"];
    let (status, verdict) =
        run_interop_script("run_synthetic.py", &args, &log_dir, &format!("synthetic/{io}"));
    let failures = &verdict["failures"];
    assert_eq!(verdict["pass"], true, "synthetic/{io}: {failures}; logs in {}", log_dir.display());
    assert!(status.success(), "synthetic/{io}: run_synthetic exited with {status}");
    for w in ["w1", "w2"] {
        let worker = &verdict["workers"][w];
        for field in ["rows", "caught_up_rows"] {
            assert!(worker[field].as_u64().is_some_and(|n| n > 0), "synthetic/{io}: {w} {field}: {worker}");
        }
        for field in ["missing", "unexpected", "at_or_before_start", "problems"] {
            assert_eq!(worker[field], 0, "synthetic/{io}: {w} {field}: {worker}");
        }
        assert_eq!(worker["positions"], 16, "synthetic/{io}: {w}: every stream of 1.12.4's STREAMS_MAP");
        for stream in ["events", "device_lists", "federation"] {
            assert!(
                worker["streams"].as_array().is_some_and(|s| s.iter().any(|x| x == stream)),
                "synthetic/{io}: {w} got no {stream} rows: {worker}"
            );
        }
        // The 1.12 master echoes REMOTE_SERVER_UP to every connection, its sender (w1) too.
        assert_eq!(
            worker["remote_server_up"],
            serde_json::json!(["remote.example.org"]),
            "synthetic/{io}: {w}"
        );
    }
    let errors = &verdict["workers"]["w3"]["errors_received"];
    assert!(
        errors[0].as_str().is_some_and(|e| e.ends_with("has fallen behind')")),
        "synthetic/{io}: w3 {errors}"
    );
    let _ = std::fs::remove_dir_all(&log_dir);
}

#[test]
fn synthetic_1_12_master_to_synapse_1_12_4_workers_epoll() {
    run_synthetic("epoll");
}

#[test]
fn synthetic_1_12_master_to_synapse_1_12_4_workers_uring() {
    run_synthetic("uring");
}
