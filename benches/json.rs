//! JSON and synthetic-master throughput, each next to a naive baseline in the same run.
//!
//! * `json/encode`: re-encoding the 3,460 rows of `shared/vectors/stream-sample.txt` with our
//!   simplejson-exact encoder, against serde_json's (compact, so not the wire format) encoder.
//! * `json/decode`: `parse` (Python semantics, owned values) and `validate` (simd-json first)
//!   against serde_json's decoder.
//! * `json/write_str`: the escaping fast path on a typical all-ASCII id, against escaping one
//!   `char` at a time.
//! * `synthetic/generate`: whole `RDATA` lines from the synthetic master.
use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use replhub::proto::json::{self, Value};
use replhub::proto::StreamMask;
use replhub::testing::synthetic::{Synthetic, SyntheticConfig};
use replhub::time::Now;

fn sample_rows() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/vectors/stream-sample.txt");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| l.starts_with("RDATA "))
        .filter_map(|l| l.splitn(4, ' ').nth(3).map(str::to_owned))
        .collect()
}

/// The obvious escaper: one `char` at a time, formatting every escape.
fn naive_write_str(out: &mut Vec<u8>, s: &str) {
    use std::io::Write;
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            ' '..='~' => out.push(c as u8),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04x}");
                }
            }
        }
    }
    out.push(b'"');
}

fn bench_json(c: &mut Criterion) {
    let rows = sample_rows();
    let bytes: usize = rows.iter().map(String::len).sum();
    let values: Vec<Value> = rows.iter().map(|r| json::parse(r.as_bytes()).expect("row")).collect();
    let serde_values: Vec<serde_json::Value> =
        rows.iter().map(|r| serde_json::from_str(r).expect("row")).collect();

    let mut g = c.benchmark_group("json/encode");
    g.throughput(Throughput::Bytes(bytes as u64));
    let mut out = Vec::with_capacity(bytes * 2);
    g.bench_function("replhub", |b| {
        b.iter(|| {
            out.clear();
            for v in &values {
                json::encode(v, &mut out);
            }
            black_box(out.len())
        })
    });
    g.bench_function("serde_json_baseline", |b| {
        b.iter(|| {
            out.clear();
            for v in &serde_values {
                serde_json::to_writer(&mut out, v).expect("write");
            }
            black_box(out.len())
        })
    });
    g.finish();

    let mut g = c.benchmark_group("json/decode");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("parse", |b| {
        b.iter(|| rows.iter().filter(|r| json::parse(r.as_bytes()).is_ok()).count())
    });
    g.bench_function("validate", |b| {
        b.iter(|| rows.iter().filter(|r| json::validate(r.as_bytes()).is_ok()).count())
    });
    g.bench_function("serde_json_baseline", |b| {
        b.iter(|| rows.iter().filter(|r| serde_json::from_str::<serde_json::Value>(r).is_ok()).count())
    });
    g.finish();

    let id = "$qo3XOxC3lgaDosYmaw9nWgLR7P3Y_rgAwyNhrzswaLY";
    let mut g = c.benchmark_group("json/write_str");
    g.throughput(Throughput::Bytes(id.len() as u64));
    g.bench_function("replhub", |b| {
        b.iter(|| {
            out.clear();
            json::write_str(&mut out, black_box(id));
            black_box(out.len())
        })
    });
    g.bench_function("naive_baseline", |b| {
        b.iter(|| {
            out.clear();
            naive_write_str(&mut out, black_box(id));
            black_box(out.len())
        })
    });
    g.finish();
}

fn bench_synthetic(c: &mut Criterion) {
    const LINES: usize = 10_000;
    let mut g = c.benchmark_group("synthetic/generate");
    g.throughput(Throughput::Elements(LINES as u64));
    let cfg = SyntheticConfig { rate: 0, seed: 1, streams: StreamMask::SEED, pad_to: None, release: None };
    let mut gen = Synthetic::new(cfg);
    let mut buf = BytesMut::with_capacity(LINES * 400);
    let now = Now::new(0, 1_583_254_800_000);
    g.bench_function("natural", |b| {
        b.iter(|| {
            buf.clear();
            gen.generate(now, LINES, &mut buf, |_, _, _, _| {})
        })
    });
    let mut padded = Synthetic::new(SyntheticConfig { pad_to: Some(1024), ..cfg });
    g.bench_function("pad_to_1024", |b| {
        b.iter(|| {
            buf.clear();
            padded.generate(now, LINES, &mut buf, |_, _, _, _| {})
        })
    });
    g.finish();
}

criterion_group!(benches, bench_json, bench_synthetic);
criterion_main!(benches);
