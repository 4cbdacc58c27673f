//! The receive pipeline on arbitrary lines, in both roles: never panics, every error has a
//! sendable ERROR line, and whatever parses re-encodes and parses back to the same command.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use replhub::proto::{parse_line, parse_line_strict, Line, Role, MAX_LINE_LEN};

fuzz_target!(|data: &[u8]| {
    // Lines never contain `\n` once split.
    let end = memchr_newline(data);
    let line = Line::new(Bytes::copy_from_slice(&data[..end]));
    for role in [Role::Server, Role::Client] {
        let _ = parse_line(role, &line);
        match parse_line_strict(role, &line) {
            Err(e) => {
                let wire = e.to_line();
                assert!(wire.len() <= MAX_LINE_LEN + 1);
                assert_eq!(wire.iter().position(|&b| b == b'\n'), Some(wire.len() - 1));
            }
            Ok(parsed) => {
                let Ok(encoded) = parsed.to_bytes() else { continue };
                let again = Line::new(encoded.slice(..encoded.len() - 1));
                let reparsed = parse_line(role, &again).expect("re-encoded command parses");
                assert_eq!(reparsed, parsed);
            }
        }
    }
});

fn memchr_newline(data: &[u8]) -> usize {
    data.iter().position(|&b| b == b'\n').unwrap_or(data.len())
}
