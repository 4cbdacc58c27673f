//! Codec throughput, each next to a naive baseline in the same group.
//!
//! * `split+word`: a realistic upstream byte stream (Synapse's own output,
//!   `shared/vectors/stream-sample.txt`, with PING/POSITION/USER_SYNC lines interleaved,
//!   repeated to ~4 MiB) fed in 64 KiB reads. replhub's relay path: [`LineSplitter`] +
//!   [`Line::new`] + command-word recognition, by line and by chunk. Baseline: byte-by-byte
//!   split into a `Vec<u8>` per line, `String` conversion and a full parse of every field,
//!   JSON included (serde_json).
//! * `rdata encode`: [`Command::Rdata`] `encode_into` a reused buffer vs. `format!` per line.
use std::hint::black_box;
use std::path::PathBuf;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use replhub::proto::fields::parse_rdata;
use replhub::proto::{Command, CommandWord, Line, LineSplitter, Rdata, Token, MAX_LINE_LEN};

const TARGET_BYTES: usize = 4 << 20;
const READ_SIZE: usize = 64 << 10;

/// The sample stream's lines, or a generated stand-in if `shared/` is not there.
fn sample_lines() -> Vec<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors/stream-sample.txt");
    match std::fs::read_to_string(&path) {
        Ok(text) => text.lines().map(str::to_owned).collect(),
        Err(e) => {
            eprintln!("{}: {e}; using a generated stream", path.display());
            (0..3000)
                .map(|i| {
                    format!(
                        "RDATA events {} [\"ev\", [\"$event{i:08}:example.com\", \"!room{}:example.com\", \
                         \"m.room.message\", null, null, null]]",
                        100 + i,
                        i % 17
                    )
                })
                .collect()
        }
    }
}

/// ~4 MiB of lines: the sample with a PING, POSITION or USER_SYNC after every 20th line.
fn stream() -> Vec<u8> {
    let lines = sample_lines();
    let mut out = Vec::with_capacity(TARGET_BYTES + 64 * 1024);
    let mut n = 0u64;
    while out.len() < TARGET_BYTES {
        for line in &lines {
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
            n += 1;
            if n % 20 == 0 {
                let extra = match n % 3 {
                    0 => format!("PING {}", 1_583_254_800_000 + n),
                    1 => format!("POSITION events {n}"),
                    _ => format!("USER_SYNC @user{n}:example.com start {}", 1_583_254_800_000 + n),
                };
                out.extend_from_slice(extra.as_bytes());
                out.push(b'\n');
            }
        }
    }
    out
}

/// replhub, line by line: read into the splitter's buffer, split, locate the word, recognise it.
fn split_and_word(input: &[u8]) -> u64 {
    let mut s = LineSplitter::new(MAX_LINE_LEN);
    let mut acc = 0u64;
    for read in input.chunks(READ_SIZE) {
        let buf = s.buffer_mut();
        buf.reserve(READ_SIZE);
        buf.extend_from_slice(read);
        while let Ok(Some(bytes)) = s.next_line() {
            let line = Line::new(bytes);
            acc += line.command().map_or(99, |w| w as u64);
        }
    }
    acc
}

/// replhub, chunk by chunk (the relay): one `Bytes` per read, words recognised in place.
fn split_chunks_and_word(input: &[u8]) -> u64 {
    let mut s = LineSplitter::new(MAX_LINE_LEN);
    let mut acc = 0u64;
    for read in input.chunks(READ_SIZE) {
        let buf = s.buffer_mut();
        buf.reserve(READ_SIZE);
        buf.extend_from_slice(read);
        while let Ok(Some(chunk)) = s.next_chunk() {
            let mut start = 0;
            for nl in memchr::memchr_iter(b'\n', &chunk) {
                let line = &chunk[start..nl];
                start = nl + 1;
                let word_end = memchr::memchr(b' ', line).unwrap_or(line.len());
                acc += CommandWord::parse(&line[..word_end]).map_or(99, |w| w as u64);
            }
        }
    }
    acc
}

/// The obvious way: a `Vec` per line, a `String`, every field parsed, JSON into a tree.
fn naive_full_parse(input: &[u8]) -> u64 {
    let mut acc = 0u64;
    let mut cur: Vec<u8> = Vec::new();
    let mut lines = Vec::new();
    for read in input.chunks(READ_SIZE) {
        for &b in read {
            if b == b'\n' {
                lines.push(std::mem::take(&mut cur));
            } else {
                cur.push(b);
            }
        }
        for raw in lines.drain(..) {
            let Ok(line) = String::from_utf8(raw) else {
                continue;
            };
            let Some((word, rest)) = line.split_once(' ') else {
                continue;
            };
            acc += match word {
                "RDATA" => {
                    let mut it = rest.splitn(3, ' ');
                    let (Some(stream), Some(token), Some(row)) = (it.next(), it.next(), it.next()) else {
                        continue;
                    };
                    let token: Option<i64> = if token == "batch" { None } else { token.parse().ok() };
                    let row: serde_json::Value = serde_json::from_str(row).unwrap_or(serde_json::Value::Null);
                    stream.len() as u64 + token.unwrap_or(0) as u64 + u64::from(row.is_array())
                }
                "POSITION" => {
                    let (stream, token) = rest.split_once(' ').unwrap_or((rest, "0"));
                    stream.len() as u64 + token.parse::<i64>().unwrap_or(0) as u64
                }
                "USER_SYNC" => {
                    let mut it = rest.splitn(3, ' ');
                    let user = it.next().unwrap_or_default().to_owned();
                    let state = it.next().unwrap_or_default() == "start";
                    let ms: i64 = it.next().unwrap_or_default().parse().unwrap_or(0);
                    user.len() as u64 + u64::from(state) + ms as u64
                }
                other => other.len() as u64 + rest.to_owned().len() as u64,
            };
        }
    }
    acc
}

fn bench_split(c: &mut Criterion) {
    let input = stream();
    assert_eq!(split_and_word(&input), split_chunks_and_word(&input));
    let mut g = c.benchmark_group("split+word");
    g.throughput(Throughput::Bytes(input.len() as u64));
    g.bench_function("LineSplitter next_line + Line + CommandWord", |b| {
        b.iter(|| split_and_word(black_box(&input)))
    });
    g.bench_function("LineSplitter next_chunk + memchr + CommandWord", |b| {
        b.iter(|| split_chunks_and_word(black_box(&input)))
    });
    g.bench_function("naive baseline: Vec per line + full parse (serde_json)", |b| {
        b.iter(|| naive_full_parse(black_box(&input)))
    });
    g.finish();
}

fn bench_encode(c: &mut Criterion) {
    let lines = sample_lines();
    let rows: Vec<(String, Token, String)> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("RDATA "))
        .filter_map(|args| parse_rdata(args.as_bytes()).ok())
        .map(|r| (r.stream.to_owned(), r.token, String::from_utf8_lossy(r.row).into_owned()))
        .collect();
    assert!(!rows.is_empty(), "no RDATA lines in the sample");
    let mut out = BytesMut::new();
    for (stream, token, row) in &rows {
        let cmd = Command::Rdata(Rdata { stream, token: *token, row: row.as_bytes() });
        cmd.encode_into(&mut out).expect("sample rows are encodable");
    }
    let total = out.len();
    let mut g = c.benchmark_group("rdata encode");
    g.throughput(Throughput::Bytes(total as u64));
    g.bench_function("Command::Rdata encode_into", |b| {
        b.iter(|| {
            out.clear();
            for (stream, token, row) in &rows {
                let cmd = Command::Rdata(Rdata { stream, token: *token, row: row.as_bytes() });
                let _ = black_box(cmd.encode_into(&mut out));
            }
            out.len()
        })
    });
    g.bench_function("naive baseline: format! per line", |b| {
        b.iter(|| {
            let mut n = 0;
            for (stream, token, row) in &rows {
                let token = match token {
                    Token::Batch => "batch".to_owned(),
                    Token::Value(v) => v.to_string(),
                };
                let line = format!("RDATA {stream} {token} {row}\n");
                n += black_box(line).len();
            }
            n
        })
    });
    g.finish();
}

criterion_group!(benches, bench_split, bench_encode);
criterion_main!(benches);
