//! Integer fields (PROTOCOL.md §1.2): tokens, timestamps, stream ids.
//!
//! Accepted: `[+-]?[0-9]+` with optional surrounding whitespace, like Python's `int(s)`, so
//! `5\r` (a CR before the LF) and ` 5` (a doubled separator) parse. Whitespace is the ASCII part
//! of Python's `str.isspace()`: space, `\t`, `\n`, `\v`, `\f`, `\r` and 0x1C–0x1F.
//!
//! Deliberately *not* copied from Python's `int()`: `_` digit separators (`1_000`) and non-ASCII
//! decimal digits (`١٢`). Synapse never writes either, they would let two peers disagree on
//! what a line means (a relay that compares tokens textually would see `1_000` ≠ `1000`), and
//! accepting them costs a slower path for every token. Values outside `i64` are rejected too
//! (Python ints are unbounded; Synapse's own tokens are database sequence values).
use super::error::FieldError;
use super::pyrepr::{py_exc, py_repr};

/// Python truncates the repr in `int()`'s error message to 200 characters (`%.200R`).
const PY_INT_REPR_MAX_CHARS: usize = 200;

/// Parses a decimal token, timestamp or id (see the module docs for what is accepted).
#[inline]
pub fn parse_i64(field: &[u8]) -> Result<i64, FieldError> {
    // Fast path: plain ASCII digits, no sign, short enough not to overflow.
    if !field.is_empty() && field.len() <= 18 && field.iter().all(u8::is_ascii_digit) {
        return Ok(field.iter().fold(0i64, |acc, &d| acc * 10 + i64::from(d - b'0')));
    }
    parse_slow(field)
}

fn parse_slow(field: &[u8]) -> Result<i64, FieldError> {
    let trimmed = trim_py_space(field);
    let (negative, digits) = match trimmed.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, trimmed),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(invalid_literal(field));
    }
    let mut magnitude: u64 = 0;
    for &d in digits {
        magnitude = match magnitude.checked_mul(10).and_then(|m| m.checked_add(u64::from(d - b'0'))) {
            Some(m) => m,
            None => return Err(too_large(field)),
        };
    }
    if negative {
        // i64::MIN's magnitude is one more than i64::MAX's.
        0i64.checked_sub_unsigned(magnitude).ok_or_else(|| too_large(field))
    } else {
        i64::try_from(magnitude).map_err(|_| too_large(field))
    }
}

fn is_py_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0x1c..=0x1f)
}

fn trim_py_space(mut s: &[u8]) -> &[u8] {
    while let Some((first, rest)) = s.split_first() {
        if !is_py_space(*first) {
            break;
        }
        s = rest;
    }
    while let Some((last, rest)) = s.split_last() {
        if !is_py_space(*last) {
            break;
        }
        s = rest;
    }
    s
}

/// The literal as Python shows it: `repr(s)` cut to 200 characters.
fn literal_repr(field: &[u8]) -> String {
    let repr = py_repr(&String::from_utf8_lossy(field));
    match repr.char_indices().nth(PY_INT_REPR_MAX_CHARS) {
        Some((i, _)) => repr[..i].to_owned(),
        None => repr,
    }
}

/// `ValueError("invalid literal for int() with base 10: '5.0'")`
fn invalid_literal(field: &[u8]) -> FieldError {
    let msg = format!("invalid literal for int() with base 10: {}", literal_repr(field));
    FieldError(py_exc("ValueError", &msg))
}

/// Not a Python error (its ints are unbounded): worded like Python's own overflow errors.
fn too_large(field: &[u8]) -> FieldError {
    let msg = format!("int too large to convert to a 64-bit integer: {}", literal_repr(field));
    FieldError(py_exc("OverflowError", &msg))
}

/// Writes `v` in decimal into `buf`, returning the digits (no allocation).
#[inline]
pub fn format_i64(v: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut n = v.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        // `n % 10` < 10, so the cast cannot truncate.
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_signed_and_padded() {
        assert_eq!(parse_i64(b"0"), Ok(0));
        assert_eq!(parse_i64(b"1583254800000"), Ok(1_583_254_800_000));
        assert_eq!(parse_i64(b"-5"), Ok(-5));
        assert_eq!(parse_i64(b"+12"), Ok(12));
        assert_eq!(parse_i64(b"00012"), Ok(12));
        assert_eq!(parse_i64(b"5\r"), Ok(5));
        assert_eq!(parse_i64(b" 5"), Ok(5));
        assert_eq!(parse_i64(b"\t 7 \x0b\x0c"), Ok(7));
        assert_eq!(parse_i64(b"9223372036854775807"), Ok(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Ok(i64::MIN));
        assert_eq!(parse_i64(b"000000000000000000000000001"), Ok(1));
    }

    #[test]
    fn rejects_like_python_with_python_text() {
        let err = |s: &[u8]| parse_i64(s).unwrap_err().0;
        assert_eq!(err(b"5.0"), "ValueError(\"invalid literal for int() with base 10: '5.0'\")");
        assert_eq!(err(b""), "ValueError(\"invalid literal for int() with base 10: ''\")");
        assert_eq!(err(b"master 5"), "ValueError(\"invalid literal for int() with base 10: 'master 5'\")");
        assert_eq!(err(b"BATCH"), "ValueError(\"invalid literal for int() with base 10: 'BATCH'\")");
        for bad in [&b"0x10"[..], b"-", b"+", b" ", b"1 2", b"--1", b"1e3", b"\xd9\xa1"] {
            assert!(parse_i64(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rejects_deliberately_unlike_python() {
        // Python accepts these; we do not (module docs).
        assert!(parse_i64(b"1_000").is_err());
        assert!(parse_i64("١٢".as_bytes()).is_err());
        assert!(parse_i64(b"9223372036854775808").unwrap_err().0.starts_with("OverflowError("));
        assert!(parse_i64(b"-9223372036854775809").is_err());
        assert!(parse_i64(b"99999999999999999999999").is_err());
    }

    #[test]
    fn long_literals_are_cut_like_python() {
        let long = vec![b'x'; 1000];
        let e = parse_i64(&long).unwrap_err().0;
        // ValueError("invalid literal for int() with base 10: '<199 x>")
        assert_eq!(e.matches('x').count(), 199);
    }

    #[test]
    fn formats_like_python_str_int() {
        let mut b = [0u8; 20];
        for v in [0, 7, -1, 10, 1_583_254_800_000, i64::MAX, i64::MIN] {
            assert_eq!(format_i64(v, &mut b), v.to_string().as_bytes());
        }
    }
}
