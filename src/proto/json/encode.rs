//! Encoding exactly as simplejson 3.17 does: separators, `ensure_ascii` string escaping and
//! the `write_*` primitives that row writers build on.

use bytes::BufMut;

use super::float::write_f64;
use super::value::{Number, Value};

/// Appends `value` encoded exactly as simplejson 3.17 would (PROTOCOL.md §2.3).
pub fn encode<B: BufMut + ?Sized>(value: &Value, out: &mut B) {
    match value {
        Value::Null => write_null(out),
        Value::Bool(b) => write_bool(out, *b),
        Value::Number(Number::Int(digits)) => out.put_slice(digits.as_bytes()),
        Value::Number(Number::Float(f)) => write_f64(out, *f),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.put_u8(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    write_sep(out);
                }
                encode(v, out);
            }
            out.put_u8(b']');
        }
        Value::Object(members) => {
            out.put_u8(b'{');
            for (i, (k, v)) in members.iter().enumerate() {
                if i > 0 {
                    write_sep(out);
                }
                write_key(out, k);
                encode(v, out);
            }
            out.put_u8(b'}');
        }
    }
}

/// `value` encoded as simplejson would, in a new `Vec`.
pub fn to_vec(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    encode(value, &mut out);
    out
}

/// `null`
#[inline]
pub fn write_null<B: BufMut + ?Sized>(out: &mut B) {
    out.put_slice(b"null");
}

/// `true` / `false`
#[inline]
pub fn write_bool<B: BufMut + ?Sized>(out: &mut B, b: bool) {
    out.put_slice(if b { b"true" } else { b"false" });
}

/// The item separator, `", "`.
#[inline]
pub fn write_sep<B: BufMut + ?Sized>(out: &mut B) {
    out.put_slice(b", ");
}

/// An object key and its separator: `"key": `.
#[inline]
pub fn write_key<B: BufMut + ?Sized>(out: &mut B, key: &str) {
    write_str(out, key);
    out.put_slice(b": ");
}

/// A decimal integer.
#[inline]
pub fn write_i64<B: BufMut + ?Sized>(out: &mut B, v: i64) {
    if v < 0 {
        out.put_u8(b'-');
    }
    write_u64(out, v.unsigned_abs());
}

/// A decimal integer.
#[inline]
pub fn write_u64<B: BufMut + ?Sized>(out: &mut B, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.put_slice(&buf[i..]);
}

/// Whether byte `b` cannot be copied into an encoded string as it is: controls, DEL,
/// non-ASCII, `"` and `\`.
#[inline(always)]
fn needs_escape(b: u8) -> bool {
    b.wrapping_sub(0x20) >= 0x5f || b == b'"' || b == b'\\'
}

/// Whether any of 16 bytes needs escaping; no early exit, so it compiles to SIMD compares.
#[inline(always)]
fn block_needs_escape(block: &[u8; 16]) -> bool {
    let mut any = false;
    for &b in block {
        any |= needs_escape(b);
    }
    any
}

/// Length of the prefix of `bytes` that can be copied verbatim: 16-byte blocks, then one
/// overlapping block for the tail, then bytewise only inside the block that needs escaping.
#[inline]
fn plain_prefix_len(bytes: &[u8]) -> usize {
    let n = bytes.len();
    let mut i = 0;
    while let Some(block) = bytes.get(i..i + 16).and_then(|b| <&[u8; 16]>::try_from(b).ok()) {
        if block_needs_escape(block) {
            break;
        }
        i += 16;
    }
    if i < n && i + 16 > n && n >= 16 {
        if let Ok(tail) = <&[u8; 16]>::try_from(&bytes[n - 16..]) {
            if !block_needs_escape(tail) {
                return n;
            }
        }
    }
    i + bytes[i..].iter().position(|&b| needs_escape(b)).unwrap_or(n - i)
}

/// A string, quoted and escaped as simplejson's `ensure_ascii` encoder does.
#[inline]
pub fn write_str<B: BufMut + ?Sized>(out: &mut B, s: &str) {
    out.put_u8(b'"');
    write_str_contents(out, s);
    out.put_u8(b'"');
}

/// The escaped body of a string without the quotes, for writers that build one string from
/// parts (a caller may splice plain ASCII between two calls).
pub fn write_str_contents<B: BufMut + ?Sized>(out: &mut B, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    loop {
        let i = start + plain_prefix_len(&bytes[start..]);
        if i > start {
            out.put_slice(&bytes[start..i]);
        }
        let Some(&b) = bytes.get(i) else {
            return;
        };
        if b < 0x80 {
            match b {
                b'"' => out.put_slice(b"\\\""),
                b'\\' => out.put_slice(b"\\\\"),
                b'\n' => out.put_slice(b"\\n"),
                b'\r' => out.put_slice(b"\\r"),
                b'\t' => out.put_slice(b"\\t"),
                0x08 => out.put_slice(b"\\b"),
                0x0c => out.put_slice(b"\\f"),
                _ => write_u_escape(out, u32::from(b)),
            }
            start = i + 1;
        } else {
            // `i` follows only ASCII since the last boundary, so it is a char boundary.
            let Some(ch) = s[i..].chars().next() else {
                return;
            };
            let cp = ch as u32;
            if cp >= 0x10000 {
                let v = cp - 0x10000;
                write_u_escape(out, 0xd800 | (v >> 10));
                write_u_escape(out, 0xdc00 | (v & 0x3ff));
            } else {
                write_u_escape(out, cp);
            }
            start = i + ch.len_utf8();
        }
    }
}

#[inline]
fn write_u_escape<B: BufMut + ?Sized>(out: &mut B, cp: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let h = |shift: u32| HEX[((cp >> shift) & 0xf) as usize];
    out.put_slice(&[b'\\', b'u', h(12), h(8), h(4), h(0)]);
}
