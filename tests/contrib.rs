//! The operator's kit in `contrib/`: the Grafana dashboard queries only metrics that a real
//! replhub exports, and the example config of the service unit is one the real parser accepts.
// Integration tests wait for real processes and sockets with real deadlines.
#![allow(clippy::disallowed_methods)]
mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{Worker, WAIT};

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib").join(path)
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(contrib("grafana/replhub.json")).expect("read the dashboard");
    serde_json::from_str(&text).expect("the dashboard is valid JSON")
}

// ---------------------------------------------------------------------------------------------
// Metric names out of PromQL

/// PromQL's functions and aggregation operators: an identifier followed by `(` must be one.
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "avg",
    "avg_over_time",
    "bottomk",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "cos",
    "cosh",
    "count",
    "count_over_time",
    "count_values",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "deg",
    "delta",
    "deriv",
    "exp",
    "floor",
    "group",
    "histogram_quantile",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "max",
    "max_over_time",
    "min",
    "min_over_time",
    "minute",
    "month",
    "predict_linear",
    "present_over_time",
    "quantile",
    "quantile_over_time",
    "rad",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sin",
    "sinh",
    "sort",
    "sort_desc",
    "sqrt",
    "stddev",
    "stddev_over_time",
    "stdvar",
    "stdvar_over_time",
    "sum",
    "sum_over_time",
    "tan",
    "tanh",
    "time",
    "timestamp",
    "topk",
    "vector",
    "year",
];

/// Aggregation operators, which may take `by (…)`/`without (…)` before their `(`.
const AGGREGATIONS: &[&str] = &[
    "avg",
    "bottomk",
    "count",
    "count_values",
    "group",
    "max",
    "min",
    "quantile",
    "stddev",
    "stdvar",
    "sum",
    "topk",
];

/// Keywords that take a parenthesised list of label names.
const LABEL_LIST_KEYWORDS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// Binary operators, modifiers and literals spelled as identifiers.
const KEYWORDS: &[&str] =
    &["and", "or", "unless", "bool", "offset", "atan2", "group_left", "group_right", "inf", "nan"];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The index just past the string literal that opens at `chars[i]` (`"`, `'` or a backtick;
/// backslash escapes in the first two).
fn skip_string(chars: &[char], i: usize) -> Result<usize, String> {
    let quote = chars[i];
    let mut j = i + 1;
    while j < chars.len() {
        match chars[j] {
            '\\' if quote != '`' => j += 2,
            c if c == quote => return Ok(j + 1),
            _ => j += 1,
        }
    }
    Err("unterminated string".to_owned())
}

/// The index just past the bracket that closes the one at `chars[i]`, skipping strings inside.
fn skip_group(chars: &[char], i: usize, close: char) -> Result<usize, String> {
    let mut j = i + 1;
    while j < chars.len() {
        match chars[j] {
            '"' | '\'' | '`' => j = skip_string(chars, j)?,
            c if c == close => return Ok(j + 1),
            _ => j += 1,
        }
    }
    Err(format!("no closing {close:?}"))
}

/// The metric names a PromQL expression selects, in order. Label matchers (`{…}`), ranges and
/// subqueries (`[…]`), label lists after `by`/`without`/`on`/`ignoring`/`group_*`, strings,
/// numbers, durations and Grafana variables (`$x`, `${x}`, `$__rate_interval`) are skipped;
/// an identifier followed by `(` must be a PromQL function, any other identifier that is not a
/// keyword is a metric name. Names are returned exactly as written: `foo_total` is `foo_total`
/// and `foo_bucket` is `foo_bucket`, so each must exist under that very name in a scrape.
fn promql_metric_names(expr: &str) -> Result<Vec<String>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i)?;
        } else if c == '{' {
            i = skip_group(&chars, i, '}')?;
        } else if c == '[' {
            i = skip_group(&chars, i, ']')?;
        } else if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                i = skip_group(&chars, i, '}')?;
            } else {
                while i < chars.len() && is_ident_char(chars[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // Numbers and durations (1.5, 1e3, 0x1f, 5m, 1h30m) end at the first character that
            // cannot be part of one.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident_char(chars[i]) {
                i += 1;
            }
            let ident: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let grouped = ["by", "without"].iter().any(|kw| {
                let word: String = chars[next..].iter().take_while(|c| is_ident_char(**c)).collect();
                word == *kw
            });
            let called = chars.get(next) == Some(&'(') || (grouped && AGGREGATIONS.contains(&ident.as_str()));
            if LABEL_LIST_KEYWORDS.contains(&ident.as_str()) {
                if called {
                    i = skip_group(&chars, next, ')')?;
                }
            } else if called {
                if !FUNCTIONS.contains(&ident.as_str()) {
                    return Err(format!("{ident}( is not a PromQL function"));
                }
            } else if !KEYWORDS.contains(&ident.to_ascii_lowercase().as_str()) {
                names.push(ident);
            }
        } else {
            i += 1;
        }
    }
    Ok(names)
}

/// The metric names a Grafana Prometheus variable query selects: `label_values(selector, label)`
/// (the selector's), `label_values(label)` (none) or `query_result(expr)`.
fn variable_query_metric_names(query: &str) -> Result<Vec<String>, String> {
    let q = query.trim();
    let inner = |prefix: &str| q.strip_prefix(prefix).and_then(|r| r.strip_suffix(')'));
    if let Some(args) = inner("label_values(") {
        // The label is the last argument; a selector before it may itself contain commas.
        return match args.rsplit_once(',') {
            Some((selector, _label)) => promql_metric_names(selector),
            None => Ok(Vec::new()),
        };
    }
    if let Some(expr) = inner("query_result(") {
        return promql_metric_names(expr);
    }
    Err(format!("unsupported variable query {query:?}"))
}

/// Every `expr` string anywhere in `v`, with a JSON path for messages.
fn collect_exprs(v: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let p = format!("{path}.{k}");
                match (k.as_str(), child) {
                    ("expr", Value::String(s)) => out.push((p, s.clone())),
                    _ => collect_exprs(child, &p, out),
                }
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                collect_exprs(child, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Every metric name the dashboard queries (panels' targets and template variables), each with
/// where it is used.
fn dashboard_metric_names(dash: &Value) -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    collect_exprs(dash, "$", &mut exprs);
    let mut names = Vec::new();
    for (path, expr) in exprs {
        let found = promql_metric_names(&expr).unwrap_or_else(|e| panic!("{path}: {expr:?}: {e}"));
        assert!(!found.is_empty(), "{path}: {expr:?} queries no metric");
        names.extend(found.into_iter().map(|n| (n, path.clone())));
    }
    let vars = dash["templating"]["list"].as_array().expect("templating.list");
    for (i, var) in vars.iter().enumerate().filter(|(_, v)| v["type"] == "query") {
        let q = &var["query"];
        let query = q.as_str().or_else(|| q["query"].as_str()).expect("a query variable has a query");
        let path = format!("$.templating.list[{i}] ({})", var["name"]);
        let found = variable_query_metric_names(query).unwrap_or_else(|e| panic!("{path}: {e}"));
        names.extend(found.into_iter().map(|n| (n, path.clone())));
    }
    names
}

#[test]
fn promql_names_are_extracted_without_labels_functions_or_ranges() {
    let cases: &[(&str, &[&str])] = &[
        ("up", &["up"]),
        (r#"sum by (instance) (rate(foo_total{job=~"$job",x="a{b}"}[$__rate_interval]))"#, &["foo_total"]),
        ("sum(rate(a_total[5m])) by (le) / ignoring(code) group_left(x) b", &["a_total", "b"]),
        ("histogram_quantile(0.99, sum by (le) (rate(lat_bucket[1m])))", &["lat_bucket"]),
        ("max(a / b) > bool 0.5 and on (instance) c offset 1h30m", &["a", "b", "c"]),
        (r#"label_replace(x, "dst", "$1", "src", "(.*)") or vector(0)"#, &["x"]),
        ("deriv(tok{a=\"1\"}[${__rate_interval}]) * 1e3 - inf", &["tok"]),
        ("rate(x[5m:1m]) unless namespace:rule:sum", &["x", "namespace:rule:sum"]),
    ];
    for (expr, want) in cases {
        let got = promql_metric_names(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
        assert_eq!(got, *want, "{expr}");
    }
    assert!(promql_metric_names("rat(x[1m])").is_err(), "a misspelt function is an error");
    assert!(promql_metric_names("x{a=\"b}").is_err(), "an unterminated matcher is an error");
    assert_eq!(
        variable_query_metric_names("label_values(a{j=~\"$j\",k=\"v\"}, instance)"),
        Ok(vec!["a".into()])
    );
    assert_eq!(variable_query_metric_names("label_values(job)"), Ok(vec![]));
}

// ---------------------------------------------------------------------------------------------
// A real server's scrape

/// `replhub serve --synthetic` on loopback ports, io_uring disabled so that the fallback series
/// exists too; killed on drop.
struct ServerProcess {
    child: Child,
    listen: SocketAddr,
    metrics: SocketAddr,
}

impl ServerProcess {
    fn start() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_replhub"))
            .args([
                "serve",
                "--synthetic",
                "2000",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--threads",
                "2",
                "--log-level",
                "info",
            ])
            .env("REPLHUB_DISABLE_URING", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn replhub");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            // Drained to the end, so that the server's log never blocks or fails.
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + WAIT;
        let serving = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).expect("replhub logs `replhub serving`");
            if line.contains("replhub serving") {
                break line;
            }
        };
        let field = |key: &str| -> SocketAddr {
            serving
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {serving}"))
        };
        Self { listen: field("listen="), metrics: field("metrics="), child }
    }

    fn scrape(&self) -> String {
        let mut http = TcpStream::connect(self.metrics).expect("connect to /metrics");
        http.set_read_timeout(Some(WAIT)).expect("timeout");
        http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("request");
        let mut raw = String::new();
        http.read_to_string(&mut raw).expect("response");
        let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        body.to_owned()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The names a scrape has samples for. A `# TYPE` line alone does not make a name queryable:
/// a histogram `x` is stored as `x_bucket`, `x_sum` and `x_count`, never as `x`, so only sample
/// names count, each checked against the `# TYPE` of the family it is printed under.
fn exported_names(scrape: &str) -> BTreeSet<String> {
    let mut family: Option<(&str, &str)> = None;
    let mut samples = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            family = Some((parts.next().expect("name"), parts.next().expect("type")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = &line[..line.find(['{', ' ']).expect("a sample has a value")];
            let (fam, kind) = family.unwrap_or_else(|| panic!("sample {name} before any # TYPE line"));
            let suffix = name.strip_prefix(fam).unwrap_or_else(|| panic!("sample {name} under # TYPE {fam}"));
            let ok = match kind {
                "histogram" => ["_bucket", "_sum", "_count"].contains(&suffix),
                "summary" => ["", "_sum", "_count"].contains(&suffix),
                _ => suffix.is_empty(),
            };
            assert!(ok, "sample {name} does not belong to its family {fam} ({kind})");
            samples.insert(name.to_owned());
        }
    }
    samples
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let queried = dashboard_metric_names(&dashboard());
    assert!(queried.len() > 20, "the dashboard queries many series: {queried:?}");

    let server = ServerProcess::start();
    // A named, subscribed worker that has read some rows and sent a command, so that the
    // per-worker (`name`) and per-command series exist.
    let mut worker = Worker::connect(server.listen);
    worker.subscribe("dashboard-test", &["ALL"]);
    worker.rdata(50);
    worker.send("PING 1");
    let deadline = Instant::now() + WAIT;
    let exported = loop {
        let scrape = server.scrape();
        let names = exported_names(&scrape);
        let ready = scrape.contains(r#"outbound_commands{command="RDATA",name="dashboard-test"}"#)
            && scrape.contains(r#"inbound_commands{command="PING",name="dashboard-test"}"#);
        if ready {
            break names;
        }
        assert!(Instant::now() < deadline, "the worker's series never appeared:\n{scrape}");
        thread::sleep(Duration::from_millis(20));
    };

    let missing: Vec<String> = queried
        .iter()
        .filter(|(name, _)| !exported.contains(name))
        .map(|(name, path)| format!("{name} (at {path})"))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics replhub does not export:\n{}",
        missing.join("\n")
    );

    // The panels the operator's kit promises.
    let queried: BTreeSet<&str> = queried.iter().map(|(n, _)| n.as_str()).collect();
    for name in [
        "replhub_lines_delivered_total",
        "replhub_bytes_delivered_total",
        "synapse_replication_tcp_protocol_transport_send_buffer",
        "synapse_replication_tcp_protocol_transport_kernel_send_buffer",
        "synapse_replication_tcp_protocol_transport_kernel_read_buffer",
        "replhub_slow_consumer_disconnects_total",
        "replhub_upstream_reconnects_total",
        "replhub_upstream_connected",
        "replhub_connections",
        "synapse_replication_tcp_resource_stream_updates_total",
        "replhub_io_backend",
    ] {
        assert!(queried.contains(name), "the dashboard has a panel on {name}");
    }
    worker.close();
}

#[test]
fn dashboard_is_importable_with_a_datasource_variable() {
    let dash = dashboard();
    assert!(dash["uid"].is_string() && dash["title"].is_string() && dash["schemaVersion"].is_u64());
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let ds = vars.iter().find(|v| v["type"] == "datasource").expect("a datasource variable");
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().expect("name"));
    let mut ids = BTreeSet::new();
    for p in dash["panels"].as_array().expect("panels") {
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "panel ids are unique: {}", p["id"]);
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().expect("x"), g["w"].as_u64().expect("w"));
        assert!(x + w <= 24, "{} fits the 24-column grid", p["title"]);
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], ds_ref.as_str(), "{} uses the datasource variable", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has a query", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], ds_ref.as_str(), "{} targets use the variable", p["title"]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The service unit and its example config

#[test]
fn example_config_is_accepted_by_the_real_parser() {
    use replhub::config::{IoBackend, ServeConfig, ServeOptions, SourceConfig};

    let path = contrib("systemd/replhub.toml");
    let opts = ServeOptions::from_file(&path).expect("the example config parses");
    let config = ServeConfig::from_options(&opts).expect("the example config is valid");
    assert!(matches!(config.source, SourceConfig::Upstream { .. }), "it serves from an upstream master");
    assert_eq!(config.io, IoBackend::Auto);
    assert!(config.metrics_listen.is_some(), "metrics are on");
    assert!(opts.log_level.is_some(), "it shows the log level key");

    // The unit runs the binary with this file at its documented path.
    let unit = std::fs::read_to_string(contrib("systemd/replhub.service")).expect("read the unit");
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart");
    assert_eq!(exec, "/usr/local/bin/replhub serve --config /etc/replhub/replhub.toml");
    // io_uring needs its syscalls past the filter, and the startup probe's self-test uses a
    // Unix socket pair: without either, `--io auto` would silently run on epoll.
    for needed in ["io_uring_setup", "io_uring_enter", "io_uring_register", "AF_UNIX"] {
        assert!(unit.contains(needed), "the unit allows {needed}");
    }
}

/// A child process that a failing test does not leave running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Under systemd, stderr is a stream to journald, which can go away (a journald restart): log
/// writes then fail with EPIPE, and serving must go on regardless.
#[test]
fn serving_goes_on_when_stderr_is_closed() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_replhub"))
        .args(["serve", "--synthetic", "1000", "--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .args(["--threads", "2", "--log-level", "info"])
        .env("REPLHUB_DISABLE_URING", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn replhub");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut child = KillOnDrop(child);
    let mut serving = String::new();
    while !serving.contains("replhub serving") {
        serving.clear();
        assert!(stderr.read_line(&mut serving).expect("read stderr") > 0, "replhub exited before serving");
    }
    // Close the read end: from here on every log line the server writes fails.
    drop(stderr);
    let listen: SocketAddr = serving
        .split_whitespace()
        .find_map(|w| w.strip_prefix("listen="))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no listen= in {serving}"));

    // Each step below logs at info (accept, NAME, REPLICATE): the worker is still served.
    let mut worker = Worker::connect(listen);
    assert_eq!(worker.greeting(), "localhost");
    worker.send("NAME after-stderr");
    worker.send("REPLICATE events");
    let deadline = Instant::now() + WAIT;
    let first = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match worker.line_within(left) {
            Some(l) if l.starts_with("PING ") => continue,
            Some(l) => break l,
            None => panic!("no answer to REPLICATE once stderr was closed"),
        }
    };
    assert!(first.starts_with("POSITION events "), "{first}");
    assert_eq!(worker.rdata(20).len(), 20);

    let status = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let rest = worker.read_to_eof();
    assert_eq!(rest.last().map(String::as_str), Some("ERROR server shutting down"), "{rest:?}");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "replhub did not exit after SIGTERM");
        thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status:?}");
}
