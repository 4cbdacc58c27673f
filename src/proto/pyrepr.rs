//! Python `repr()` of `str`, `bytes` and single-argument exceptions, for the ERROR texts that
//! embed them (PROTOCOL.md §1.1 step 8: `failed to parse line for  'NAME': <exc> ('<rest>'):`).
//!
//! Printability follows Python's `str.isprintable()` for every character class that can be
//! decided without the Unicode database: controls (Cc), format characters (Cf), separators other
//! than the ASCII space (Zs, Zl, Zp), private use (Co) and noncharacters are escaped. Other
//! unassigned code points (Cn) are printed as they are, where Python would escape them; such a
//! difference can only show after the `': ` that peers are required to match.

use std::fmt::Write as _;

/// Python 3's `repr(s)`: `'...'`, or `"..."` if `s` contains `'` and no `"`.
pub fn py_repr(s: &str) -> String {
    let quote = choose_quote(s.as_bytes());
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        push_escaped(c, quote, &mut out);
    }
    out.push(quote);
    out
}

/// Like [`py_repr`], but at most `max` bytes long: if the full repr does not fit, the longest
/// prefix of `s` whose repr fits is kept and `...` is written before the closing quote
/// (`'aaaa...'`). `max` below 5 still yields `'...'`.
pub fn py_repr_truncated(s: &str, max: usize) -> String {
    let full = py_repr(s);
    if full.len() <= max {
        return full;
    }
    let quote = choose_quote(s.as_bytes());
    // Room for the escaped body: two quotes and the `...` marker.
    let budget = max.saturating_sub(5);
    let mut out = String::with_capacity(max);
    out.push(quote);
    let mut piece = String::with_capacity(10);
    for c in s.chars() {
        piece.clear();
        push_escaped(c, quote, &mut piece);
        if out.len() - 1 + piece.len() > budget {
            break;
        }
        out.push_str(&piece);
    }
    out.push_str("...");
    out.push(quote);
    out
}

/// Python's `repr(Exception(msg))` for an exception class `name`: `ValueError('msg')`.
pub fn py_exc(name: &str, msg: &str) -> String {
    let mut out = String::with_capacity(name.len() + msg.len() + 4);
    out.push_str(name);
    out.push('(');
    out.push_str(&py_repr(msg));
    out.push(')');
    out
}

/// Python 3's `repr(b)` of a `bytes` object: `b'...'` with the same quote rule as [`py_repr`];
/// printable ASCII as is, `\t` `\n` `\r` `\\` and the quote escaped, everything else `\xNN`.
pub fn py_bytes_repr(b: &[u8]) -> String {
    let quote = choose_quote(b);
    let mut out = String::with_capacity(b.len() + 3);
    out.push('b');
    out.push(quote);
    for &byte in b {
        match byte {
            b'\\' => out.push_str("\\\\"),
            b'\t' => out.push_str("\\t"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            _ if char::from(byte) == quote => {
                out.push('\\');
                out.push(quote);
            }
            0x20..=0x7e => out.push(char::from(byte)),
            _ => {
                let _ = write!(out, "\\x{byte:02x}");
            }
        }
    }
    out.push(quote);
    out
}

/// Python's choice: single quotes unless the text has a `'` and no `"`.
fn choose_quote(s: &[u8]) -> char {
    if memchr::memchr(b'\'', s).is_some() && memchr::memchr(b'"', s).is_none() {
        '"'
    } else {
        '\''
    }
}

/// Appends `c` as it appears inside a Python str repr delimited by `quote`.
fn push_escaped(c: char, quote: char, out: &mut String) {
    match c {
        '\\' => out.push_str("\\\\"),
        '\t' => out.push_str("\\t"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        _ if c == quote => {
            out.push('\\');
            out.push(c);
        }
        ' '..='~' => out.push(c),
        _ if is_printable(c) => out.push(c),
        _ => {
            let cp = u32::from(c);
            let _ = if cp <= 0xff {
                write!(out, "\\x{cp:02x}")
            } else if cp <= 0xffff {
                write!(out, "\\u{cp:04x}")
            } else {
                write!(out, "\\U{cp:08x}")
            };
        }
    }
}

/// Python's `str.isprintable()` for one non-ASCII-printable character, minus the Unicode
/// database (see the module docs).
fn is_printable(c: char) -> bool {
    let cp = u32::from(c);
    if c.is_control() {
        return false; // Cc
    }
    // Zs (other than U+0020), Zl, Zp.
    if matches!(cp, 0xa0 | 0x1680 | 0x2000..=0x200a | 0x2028 | 0x2029 | 0x202f | 0x205f | 0x3000) {
        return false;
    }
    // Cf.
    if matches!(
        cp,
        0xad | 0x600..=0x605
            | 0x61c
            | 0x6dd
            | 0x70f
            | 0x890..=0x891
            | 0x8e2
            | 0x180e
            | 0x200b..=0x200f
            | 0x202a..=0x202e
            | 0x2060..=0x2064
            | 0x2066..=0x206f
            | 0xfeff
            | 0xfff9..=0xfffb
            | 0x110bd
            | 0x110cd
            | 0x13430..=0x1343f
            | 0x1bca0..=0x1bca3
            | 0x1d173..=0x1d17a
            | 0xe0001
            | 0xe0020..=0xe007f
    ) {
        return false;
    }
    // Co (private use).
    if matches!(cp, 0xe000..=0xf8ff | 0xf0000..=0xffffd | 0x100000..=0x10fffd) {
        return false;
    }
    // Noncharacters (Cn): U+FDD0..U+FDEF and the last two code points of every plane.
    if matches!(cp, 0xfdd0..=0xfdef) || cp & 0xfffe == 0xfffe {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_like_python() {
        assert_eq!(py_repr("abc"), "'abc'");
        assert_eq!(py_repr(""), "''");
        assert_eq!(py_repr("it's"), "\"it's\"");
        assert_eq!(py_repr("say \"hi\""), "'say \"hi\"'");
        assert_eq!(py_repr("both ' and \""), "'both \\' and \"'");
    }

    #[test]
    fn escapes_like_python() {
        assert_eq!(py_repr("a\\b"), "'a\\\\b'");
        assert_eq!(py_repr("t\tn\nr\r"), "'t\\tn\\nr\\r'");
        assert_eq!(py_repr("\0\x1f\x7f"), "'\\x00\\x1f\\x7f'");
        assert_eq!(py_repr("\u{a0}\u{ad}"), "'\\xa0\\xad'");
        assert_eq!(py_repr("\u{2028}\u{feff}"), "'\\u2028\\ufeff'");
        assert_eq!(py_repr("\u{e0001}\u{10ffff}"), "'\\U000e0001\\U0010ffff'");
        // Printable non-ASCII stays as is.
        assert_eq!(py_repr("ünïcødé ☃ 😀"), "'ünïcødé ☃ 😀'");
        assert_eq!(py_repr("123\r"), "'123\\r'");
    }

    #[test]
    fn exception_reprs() {
        assert_eq!(
            py_exc("ValueError", "not enough values to unpack (expected 3, got 2)"),
            "ValueError('not enough values to unpack (expected 3, got 2)')"
        );
        assert_eq!(
            py_exc("ValueError", "invalid literal for int() with base 10: '5.0'"),
            "ValueError(\"invalid literal for int() with base 10: '5.0'\")"
        );
    }

    #[test]
    fn bytes_repr() {
        assert_eq!(py_bytes_repr(b"NAME \xff\xfe"), "b'NAME \\xff\\xfe'");
        assert_eq!(py_bytes_repr(b"it's"), "b\"it's\"");
        assert_eq!(py_bytes_repr(b"a\\\t\n\r\x7f"), "b'a\\\\\\t\\n\\r\\x7f'");
    }

    #[test]
    fn truncation_keeps_a_valid_repr() {
        assert_eq!(py_repr_truncated("abc", 5), "'abc'");
        assert_eq!(py_repr_truncated("abcdef", 7), "'ab...'");
        assert_eq!(py_repr_truncated("\n\n\n\n", 9), "'\\n\\n...'");
        assert_eq!(py_repr_truncated("\n\n\n\n", 8), "'\\n...'");
        assert_eq!(py_repr_truncated("abc", 0), "'...'");
        let long = "é".repeat(10_000);
        let r = py_repr_truncated(&long, 1000);
        assert!(r.len() <= 1000 && r.ends_with("...'"), "{}", r.len());
    }
}
