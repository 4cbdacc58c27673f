//! The line splitter against a byte-by-byte reference, under the chunking the input picks:
//! the first byte is the line limit, the second the read size; `next_line` and `next_chunk`
//! must both give the reference's lines and errors, and never hold more than the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replhub::proto::{LineSplitter, LineTooLong};

#[derive(Debug, PartialEq, Eq)]
enum Event {
    Line(Vec<u8>),
    TooLong,
}

fn reference(stream: &[u8], max: usize) -> Vec<Event> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for &b in stream {
        if b == b'\n' {
            if cur.len() > max {
                out.push(Event::TooLong);
            } else if !cur.is_empty() {
                out.push(Event::Line(std::mem::take(&mut cur)));
            }
            cur.clear();
        } else {
            cur.push(b);
        }
    }
    if cur.len() > max {
        out.push(Event::TooLong);
    }
    out
}

fn run(stream: &[u8], max: usize, read: usize, chunked: bool) -> Vec<Event> {
    let mut s = LineSplitter::new(max);
    let mut out = Vec::new();
    for piece in stream.chunks(read) {
        s.extend_from_slice(piece);
        loop {
            let r = if chunked { s.next_chunk() } else { s.next_line() };
            match r {
                Ok(None) => break,
                Ok(Some(b)) if chunked => {
                    assert_eq!(b.last(), Some(&b'\n'));
                    for l in b[..b.len() - 1].split(|&c| c == b'\n') {
                        assert!(!l.is_empty(), "a chunk holds no empty line");
                        out.push(Event::Line(l.to_vec()));
                    }
                }
                Ok(Some(b)) => out.push(Event::Line(b.to_vec())),
                Err(LineTooLong) => out.push(Event::TooLong),
            }
        }
        assert!(s.buffered_len() <= max);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [max, read, stream @ ..] = data else { return };
    let max = usize::from(*max);
    let read = usize::from(*read).max(1);
    let want = reference(stream, max);
    assert_eq!(run(stream, max, read, false), want);
    assert_eq!(run(stream, max, read, true), want);
});
