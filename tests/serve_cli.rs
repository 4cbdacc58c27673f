//! The `replhub` binary: help, clear errors for bad flags and config files (never a panic),
//! the one backend log line, and a graceful stop on SIGTERM.
// Integration tests wait for real processes and sockets with real deadlines.
#![allow(clippy::disallowed_methods)]
mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{TestMaster, Worker, WAIT};

fn replhub() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_replhub"));
    cmd.env_remove("RUST_LOG");
    cmd
}

fn run(args: &[&str]) -> Output {
    replhub().args(args).output().expect("run replhub")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A scratch file under the target directory's temp dir.
fn scratch_file(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("replhub-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write scratch file");
    path
}

#[test]
fn help_documents_the_subcommands_and_flags() {
    let out = run(&["--help"]);
    assert!(out.status.success(), "{out:?}");
    let help = text(&out.stdout);
    for word in ["serve", "tail"] {
        assert!(help.contains(word), "top-level help mentions {word}: {help}");
    }
    let out = run(&["serve", "--help"]);
    assert!(out.status.success(), "{out:?}");
    let help = text(&out.stdout);
    for flag in [
        "--listen",
        "--upstream",
        "--synthetic",
        "--server-name",
        "--metrics-listen",
        "--threads",
        "--io",
        "--max-pending-bytes",
        "--write-timeout",
        "--config",
        "--log-level",
    ] {
        assert!(help.contains(flag), "serve --help documents {flag}");
    }
    assert!(help.contains("64MiB"), "defaults are documented");
    let out = run(&["tail", "--help"]);
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("--connect"));
}

#[test]
fn bad_flags_and_configs_are_clear_errors_not_panics() {
    let unknown_key = scratch_file("unknown-key.toml", "synthetic = 5\nlisten-address = \"x\"\n");
    let bad_toml = scratch_file("bad.toml", "synthetic = \n");
    let unknown_key = unknown_key.to_str().expect("utf-8 path");
    let bad_toml = bad_toml.to_str().expect("utf-8 path");
    let cases: &[(&[&str], &str)] = &[
        (&["serve", "--bogus"], "--bogus"),
        (&["serve"], "no data source"),
        (&["serve", "--synthetic", "10", "--upstream", "h:1"], "not both"),
        (&["serve", "--upstream", "no-port"], "HOST:PORT"),
        (&["serve", "--synthetic", "ten"], "invalid value"),
        (&["serve", "--synthetic", "10", "--max-pending-bytes", "12parsecs"], "--max-pending-bytes"),
        (&["serve", "--synthetic", "10", "--write-timeout", "soon"], "--write-timeout"),
        (&["serve", "--synthetic", "10", "--threads", "0"], "--threads"),
        (&["serve", "--synthetic", "10", "--io", "kqueue"], "kqueue"),
        (&["serve", "--synthetic", "10", "--listen", "300.1.1.1:5"], "--listen"),
        (&["serve", "--synthetic", "10", "--log-level", "info,=%"], "--log-level"),
        (&["serve", "--synthetic", "10", "--config", "/nonexistent/replhub.toml"], "cannot read config file"),
        (&["serve", "--config", unknown_key], "listen-address"),
        (&["serve", "--config", bad_toml], "bad.toml"),
        (&["frobnicate"], "frobnicate"),
    ];
    for (args, needle) in cases {
        let out = run(args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: the message names {needle:?}: {stderr}");
    }
}

#[test]
fn io_uring_demanded_but_unavailable_is_an_error() {
    let out = replhub()
        .args([
            "serve",
            "--upstream",
            "127.0.0.1:9",
            "--io",
            "uring",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
        ])
        .env("REPLHUB_DISABLE_URING", "1")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("io_uring is unavailable") && stderr.contains("REPLHUB_DISABLE_URING"),
        "{stderr}"
    );
}

/// Spawns the binary with stderr piped; returns the child and a channel of its stderr lines.
fn spawn(args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = replhub()
        .args(args)
        .env("REPLHUB_DISABLE_URING", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn replhub");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Reads stderr lines until one contains `needle`; returns every line read.
fn read_until(rx: &mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let done = l.contains(needle);
                lines.push(l);
                if done {
                    return lines;
                }
            }
            Err(_) => panic!("no log line with {needle:?}; got {lines:?}"),
        }
    }
}

fn wait_exit(mut child: Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("replhub did not exit after SIGTERM");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sigterm_says_goodbye_to_every_worker_and_exits_zero() {
    let master = TestMaster::start();
    let config = scratch_file(
        "serve.toml",
        &format!(
            "upstream = \"{}\"\nmetrics-listen = \"off\"\nthreads = 2\nlisten = \"127.0.0.1:1\"\n",
            master.addr()
        ),
    );
    // Flags win over the file (listen), the file supplies the rest.
    let (child, logs) = spawn(&[
        "serve",
        "--config",
        config.to_str().expect("utf-8 path"),
        "--listen",
        "127.0.0.1:0",
        "--io",
        "auto",
    ]);
    let lines = read_until(&logs, "replhub serving");
    let backend: Vec<&String> = lines.iter().filter(|l| l.contains("io backend")).collect();
    assert_eq!(backend.len(), 1, "exactly one backend line: {lines:?}");
    assert!(
        backend[0].contains("INFO")
            && backend[0].contains("epoll")
            && backend[0].contains("REPLHUB_DISABLE_URING"),
        "the fallback line says why and that epoll is used: {}",
        backend[0]
    );
    let serving = lines.last().expect("serving line");
    let addr: SocketAddr = serving
        .split_whitespace()
        .find_map(|w| w.strip_prefix("listen="))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no listen= in {serving}"));

    master.wait_handshakes(1);
    let mut workers: Vec<Worker> = (0..3).map(|_| Worker::connect(addr)).collect();
    for w in &mut workers {
        assert_eq!(w.greeting(), "example.com");
    }
    workers[0].send("REPLICATE ALL");
    for _ in 0..16 {
        assert!(workers[0].line_skip_ping().starts_with("POSITION "));
    }

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    for (i, mut w) in workers.into_iter().enumerate() {
        let rest = w.read_to_eof();
        assert_eq!(
            rest.last().map(String::as_str),
            Some("ERROR server shutting down"),
            "worker {i}: {rest:?}"
        );
    }
    let status = wait_exit(child);
    assert!(status.success(), "exit status {status:?}");
    master.wait_closed(1);
}
