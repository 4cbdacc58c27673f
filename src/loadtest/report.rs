//! The result of a run: what it counts, and how it is printed (text, or one JSON object).
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::hist::Histogram;
use super::publisher::Published;
use super::subscriber::ThreadResult;
use super::{LoadtestOptions, Shared, MAX_ERRORS};
use crate::proto::StreamId;

/// Latency percentiles, nanoseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Latency {
    /// Lines measured.
    pub samples: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
    /// Mean.
    #[serde(serialize_with = "deci", deserialize_with = "nan_if_null")]
    pub mean: f64,
}

impl Latency {
    /// The percentiles, largest and mean of everything `hist` recorded.
    pub fn of(hist: &Histogram) -> Self {
        Self {
            samples: hist.len(),
            p50: hist.quantile(0.5),
            p99: hist.quantile(0.99),
            p999: hist.quantile(0.999),
            max: hist.max(),
            mean: hist.mean(),
        }
    }
}

/// The result of a run. Its JSON form ([`Report::to_json`]) has these fields as keys, in this
/// order (`latency` as `latency_ns`), with fractional numbers rounded to three decimals. It
/// reads back ([`Report::from_json`]) for `replhub loadtest plot`; keys missing from an older
/// report take their default.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    /// `replhub` or `redis`.
    pub target: String,
    /// `epoll` or `uring` for replhub; `redis` otherwise.
    pub backend: String,
    /// `in-process`, `process` or `external`.
    pub server: String,
    /// Server core threads (replhub).
    pub server_threads: usize,
    /// Client threads.
    pub client_threads: usize,
    /// Subscribing connections.
    pub subscribers: usize,
    /// Idle connections.
    pub idle: usize,
    /// `one`, `several` or `ALL`.
    pub streams: String,
    /// How subscribers checked what they got: `full` (every line) or `count` (see
    /// `loadtest::Check`).
    pub check: String,
    /// Bytes per line (with `\n`), as asked.
    pub message_size: usize,
    /// Lines per second asked (0 = max).
    pub rate: u64,
    /// The window, lines.
    pub window: u64,
    /// Lines published.
    pub published: u64,
    /// Deliveries due: published × subscribers.
    pub expected: u64,
    /// Lines received in order.
    pub delivered: u64,
    /// Lines a subscriber never got (gaps, or missing at the end): must be 0.
    pub lost: u64,
    /// Lines received out of order or twice.
    pub reordered: u64,
    /// RDATA that were not the load test's (should be 0).
    pub unexpected: u64,
    /// Subscribers whose connection ended before the end.
    pub disconnected: usize,
    /// Seconds spent publishing.
    #[serde(serialize_with = "milli", deserialize_with = "nan_if_null")]
    pub publish_seconds: f64,
    /// Seconds from the first line published to the last delivered.
    #[serde(serialize_with = "milli", deserialize_with = "nan_if_null")]
    pub elapsed_seconds: f64,
    /// Lines published per second.
    #[serde(serialize_with = "milli", deserialize_with = "nan_if_null")]
    pub publish_rate: f64,
    /// Deliveries per second.
    #[serde(serialize_with = "milli", deserialize_with = "nan_if_null")]
    pub deliveries_per_sec: f64,
    /// Delivered line bytes per second / 10^6.
    #[serde(serialize_with = "milli", deserialize_with = "nan_if_null")]
    pub mb_per_sec: f64,
    /// Publish → receive.
    #[serde(rename = "latency_ns")]
    pub latency: Latency,
    /// Server CPU seconds during the run (None if not measurable).
    #[serde(serialize_with = "opt_milli")]
    pub server_cpu_seconds: Option<f64>,
    /// Server CPU per delivered line.
    #[serde(serialize_with = "opt_milli")]
    pub server_cpu_ns_per_delivery: Option<f64>,
    /// Load generator CPU (`lt-*` threads) per delivered line.
    #[serde(serialize_with = "milli", deserialize_with = "nan_if_null")]
    pub loadgen_cpu_ns_per_delivery: f64,
    /// Whose memory the RSS figures are.
    pub rss_scope: String,
    /// VmRSS once every connection was ready (before publishing).
    pub rss_ready_bytes: Option<u64>,
    /// VmRSS at the end of the run.
    pub rss_end_bytes: Option<u64>,
    /// VmHWM (peak) at the end of the run.
    pub rss_peak_bytes: Option<u64>,
    /// For Redis: the sum of PUBLISH receiver counts (should be `expected`).
    pub publish_receivers: Option<u64>,
    /// The first few errors and disconnect reasons.
    pub errors: Vec<String>,
    /// The interval of `deliveries_per_interval`, milliseconds (100, doubled for runs so long
    /// that the series would pass 1000 points).
    pub deliveries_interval_ms: u64,
    /// Lines received by all subscribers in each interval, from the start of publishing to
    /// the last delivery (the last interval may be shorter): one number per interval, adding
    /// up to `delivered`.
    pub deliveries_per_interval: Vec<u64>,
    /// The latency distribution, thinned for a plot (see [`Histogram::cdf`]): `[ns, samples at
    /// or below]` pairs, ending at `[max, samples]`.
    pub latency_cdf_ns: Vec<(u64, u64)>,
}

/// Neighbouring points of the latency CDF in the report are at least 5% apart in latency:
/// about 50 points per decade, a few kilobytes of JSON.
const CDF_STEP: f64 = 1.05;

/// Adds up the client threads' accounting.
pub(super) fn build_report(
    opts: &LoadtestOptions,
    results: &[ThreadResult],
    published: &Published,
    streams: &[StreamId],
    done_ns: u64,
    window: u64,
) -> Report {
    let mut hist = Histogram::new();
    let mut r = Report {
        client_threads: opts.client_threads.max(1),
        subscribers: opts.subscribers,
        idle: opts.idle,
        streams: opts.streams.as_str().to_owned(),
        check: opts.check.as_str().to_owned(),
        message_size: opts.message_size,
        rate: opts.rate,
        window,
        published: published.lines,
        expected: published.lines * opts.subscribers as u64,
        ..Report::default()
    };
    let mut bytes = 0u64;
    for t in results {
        hist.merge(&t.hist);
        for s in &t.subs {
            r.delivered += s.received;
            bytes += s.bytes;
            r.reordered += s.reordered;
            r.unexpected += s.unexpected;
            if s.counted {
                // Every RDATA line was counted, so the count says what is missing (gaps seen
                // at read boundaries are part of it) or extra.
                r.lost += published.lines.saturating_sub(s.received);
                r.reordered += s.received.saturating_sub(published.lines);
            } else {
                let tail: u64 = streams
                    .iter()
                    .map(|st| {
                        let last = s.last[st.index()].max(0) as u64;
                        published.tokens[st.index()].saturating_sub(last)
                    })
                    .sum();
                r.lost += s.gaps + tail;
            }
            if let Some(why) = &s.ended {
                r.disconnected += 1;
                if r.errors.len() < MAX_ERRORS {
                    r.errors.push(format!("subscriber {} disconnected: {why}", s.id));
                }
            }
        }
    }
    r.publish_seconds = published.end_ns.saturating_sub(published.start_ns) as f64 / 1e9;
    r.elapsed_seconds = done_ns.saturating_sub(published.start_ns) as f64 / 1e9;
    if r.publish_seconds > 0.0 {
        r.publish_rate = published.lines as f64 / r.publish_seconds;
    }
    if r.elapsed_seconds > 0.0 {
        r.deliveries_per_sec = r.delivered as f64 / r.elapsed_seconds;
        r.mb_per_sec = bytes as f64 / r.elapsed_seconds / 1e6;
    }
    r.latency_cdf_ns = hist.cdf(CDF_STEP);
    r.latency = Latency::of(&hist);
    r
}

/// The once-a-second progress line on stderr.
pub(super) struct Progress {
    on: bool,
    tty: bool,
    start: Instant,
    last: Mutex<(Instant, u64, u64)>,
}

impl Progress {
    pub(super) fn new(on: bool) -> Self {
        let now = Instant::now();
        Self { on, tty: std::io::stderr().is_terminal(), start: now, last: Mutex::new((now, 0, 0)) }
    }

    pub(super) fn tick(&self, shared: &Shared) {
        if !self.on {
            return;
        }
        let (published, delivered) = (shared.published.load(Ordering::Relaxed), shared.total_received());
        let Ok(mut last) = self.last.lock() else { return };
        let dt = last.0.elapsed().as_secs_f64().max(1e-9);
        let pub_rate = (published - last.1) as f64 / dt;
        let del_rate = (delivered.saturating_sub(last.2)) as f64 / dt;
        *last = (Instant::now(), published, delivered);
        let line = format!(
            "loadtest {:5.1}s  published {} ({}/s)  delivered {} ({}/s)  subscribers alive {}",
            self.start.elapsed().as_secs_f64(),
            si(published as f64),
            si(pub_rate),
            si(delivered as f64),
            si(del_rate),
            shared.alive(),
        );
        if self.tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }

    pub(super) fn finish(&self) {
        if self.on && self.tty {
            eprintln!();
        }
    }
}

/// 1234567 → "1.23M".
fn si(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// Nanoseconds as µs or ms.
fn dur(ns: u64) -> String {
    if ns >= 10_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else {
        format!("{:.0} µs", ns as f64 / 1e3)
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

impl Report {
    /// Whether every line reached every subscriber, in order, with no disconnect and no error.
    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.reordered == 0
            && self.disconnected == 0
            && self.delivered == self.expected
            && self.errors.is_empty()
    }

    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let rate = if self.rate == 0 { "max".to_owned() } else { format!("{}/s", si(self.rate as f64)) };
        let _ = writeln!(
            s,
            "{} ({}, {}{}): {} subscribers{}, streams {}, {}-byte lines, rate {}, window {} lines, check {}",
            self.target,
            self.backend,
            self.server,
            if self.server_threads > 0 {
                format!(", {} core threads", self.server_threads)
            } else {
                String::new()
            },
            self.subscribers,
            if self.idle > 0 { format!(" + {} idle", self.idle) } else { String::new() },
            self.streams,
            self.message_size,
            rate,
            self.window,
            self.check,
        );
        let _ = writeln!(
            s,
            "  published    {} lines in {:.2} s ({}/s)",
            self.published,
            self.publish_seconds,
            si(self.publish_rate)
        );
        let _ = writeln!(
            s,
            "  delivered    {} of {} expected; lost {}, reordered {}, unexpected {}, disconnected {}",
            self.delivered, self.expected, self.lost, self.reordered, self.unexpected, self.disconnected
        );
        let _ = writeln!(
            s,
            "  throughput   {} deliveries/s, {:.1} MB/s (over {:.2} s)",
            si(self.deliveries_per_sec),
            self.mb_per_sec,
            self.elapsed_seconds
        );
        let l = &self.latency;
        let _ = writeln!(
            s,
            "  latency      p50 {}  p99 {}  p99.9 {}  max {}  ({} samples)",
            dur(l.p50),
            dur(l.p99),
            dur(l.p999),
            dur(l.max),
            l.samples
        );
        match (self.server_cpu_seconds, self.server_cpu_ns_per_delivery) {
            (Some(sec), Some(ns)) => {
                let _ = writeln!(
                    s,
                    "  CPU          server {sec:.2} s = {ns:.1} ns per delivered line; load generator {:.1} ns/line",
                    self.loadgen_cpu_ns_per_delivery
                );
            }
            _ => {
                let _ = writeln!(
                    s,
                    "  CPU          server not measured; load generator {:.1} ns/line",
                    self.loadgen_cpu_ns_per_delivery
                );
            }
        }
        if let (Some(ready), Some(end), Some(peak)) =
            (self.rss_ready_bytes, self.rss_end_bytes, self.rss_peak_bytes)
        {
            let _ = writeln!(
                s,
                "  memory       VmRSS {} when connected, {} max during the run, peak {} ({})",
                mib(ready),
                mib(end),
                mib(peak),
                self.rss_scope
            );
        }
        if let Some(n) = self.publish_receivers {
            let _ = writeln!(s, "  redis        PUBLISH reported {n} receivers in all");
        }
        for e in &self.errors {
            let _ = writeln!(s, "  error        {e}");
        }
        s
    }

    /// The report as one JSON object, on one line (`scripts/compare-redis` reads it with `sed`,
    /// so it stays compact: `"key":value`).
    pub fn to_json(&self) -> String {
        // Only strings, numbers and options: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A report from its JSON form ([`Report::to_json`], or a file written by `--report`).
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text.trim())
    }
}

/// `v` with `decimals` decimals (rounded as `format!` rounds), as an integer when it is whole,
/// `null` if not finite: numbers as a reader wants them, without the noise digits of a division.
fn rounded<S: Serializer>(v: f64, decimals: usize, s: S) -> Result<S::Ok, S::Error> {
    if !v.is_finite() {
        return s.serialize_none();
    }
    let r = format!("{v:.decimals$}").parse().unwrap_or(v);
    if r.fract() == 0.0 && r.abs() < 9e15 {
        s.serialize_i64(r as i64)
    } else {
        s.serialize_f64(r)
    }
}

/// Three decimals.
fn milli<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    rounded(*v, 3, s)
}

/// Three decimals, or `null`.
fn opt_milli<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => rounded(*v, 3, s),
        None => s.serialize_none(),
    }
}

/// A number, or NaN for `null` (what [`rounded`] writes for a value that is not finite).
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One decimal.
fn deci<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    rounded(*v, 1, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_valid() {
        let r = Report { target: "replhub".into(), errors: vec!["a \"b\"\n".into()], ..Report::default() };
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("valid JSON");
        assert_eq!(v["target"], "replhub");
        assert_eq!(v["errors"][0], "a \"b\"\n");
        assert!(v["server_cpu_ns_per_delivery"].is_null());
        assert_eq!(v["latency_ns"]["p99"], 0);
    }

    #[test]
    fn json_keys_and_numbers() {
        let r = Report {
            publish_seconds: 1.234_567,
            elapsed_seconds: 2.0,
            loadgen_cpu_ns_per_delivery: f64::NAN,
            server_cpu_seconds: Some(0.5),
            rss_ready_bytes: Some(1 << 20),
            latency: Latency { p999: 6_073_352_191, mean: 5.55, ..Latency::default() },
            ..Report::default()
        };
        let text = r.to_json();
        assert!(!text.contains(' ') && !text.contains('\n'), "one compact line: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "target",
                "backend",
                "server",
                "server_threads",
                "client_threads",
                "subscribers",
                "idle",
                "streams",
                "check",
                "message_size",
                "rate",
                "window",
                "published",
                "expected",
                "delivered",
                "lost",
                "reordered",
                "unexpected",
                "disconnected",
                "publish_seconds",
                "elapsed_seconds",
                "publish_rate",
                "deliveries_per_sec",
                "mb_per_sec",
                "latency_ns",
                "server_cpu_seconds",
                "server_cpu_ns_per_delivery",
                "loadgen_cpu_ns_per_delivery",
                "rss_scope",
                "rss_ready_bytes",
                "rss_end_bytes",
                "rss_peak_bytes",
                "publish_receivers",
                "errors",
                "deliveries_interval_ms",
                "deliveries_per_interval",
                "latency_cdf_ns",
            ]
        );
        let latency: Vec<&str> = v["latency_ns"].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(latency, ["samples", "p50", "p99", "p999", "max", "mean"]);
        assert!(text.contains("\"publish_seconds\":1.235,"), "{text}");
        assert!(text.contains("\"elapsed_seconds\":2,"), "{text}");
        assert!(text.contains("\"loadgen_cpu_ns_per_delivery\":null,"), "{text}");
        assert!(text.contains("\"server_cpu_seconds\":0.5,"), "{text}");
        assert!(text.contains("\"rss_ready_bytes\":1048576,"), "{text}");
        assert!(text.contains("\"p999\":6073352191,"), "{text}");
        assert!(text.contains("\"mean\":5.5}"), "{text}");
    }
}
