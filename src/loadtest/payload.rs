//! The load test's RDATA lines: the same bytes go to replhub (one line) and to Redis (the
//! line without its `\n` as the PUBLISH payload).
//!
//! ```text
//!   RDATA <stream> <token> ["lt","<publish time: 16 digits, ns>","<padding>"]\n
//! ```
//!
//! Tokens start at 1 and go up by exactly 1 per line of a stream, so a subscriber checks it got
//! every line in order by comparing each token with the previous one. The publish time sits at a
//! fixed offset of the row, so the subscriber reads it with two 8-byte SWAR steps (no JSON
//! parsing; 16 digits of nanoseconds since the load test started last 115 days).
//! The padding makes every line exactly the requested size (when that is above the minimum).
use crate::proto::StreamId;

/// What every row starts with; the timestamp follows.
const ROW_PREFIX: &[u8] = b"[\"lt\",\"";
/// Digits of the timestamp.
const TS_DIGITS: usize = 16;
/// Between the timestamp and the padding.
const ROW_MIDDLE: &[u8] = b"\",\"";
/// After the padding.
const ROW_SUFFIX: &[u8] = b"\"]";
/// Padding characters (valid inside a JSON string).
const FILLER: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// Decimal digits of `n`.
fn digits(mut n: u64) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// The length of the line (with its `\n`) for this stream and token when no padding is added.
pub(super) fn min_line_len(stream: StreamId, token: u64) -> usize {
    "RDATA ".len()
        + stream.name().len()
        + 1
        + digits(token)
        + 1
        + ROW_PREFIX.len()
        + TS_DIGITS
        + ROW_MIDDLE.len()
        + ROW_SUFFIX.len()
        + 1
}

/// The length of the line (with its `\n`) [`write_line`] writes.
#[cfg(test)]
pub(super) fn line_len(stream: StreamId, token: u64, size: usize) -> usize {
    size.max(min_line_len(stream, token))
}

/// Appends one line of about `size` bytes (exactly `size` if it is at least the minimum),
/// `\n` included, published at `ts_ns`.
pub(super) fn write_line(out: &mut Vec<u8>, stream: StreamId, token: u64, ts_ns: u64, size: usize) {
    let min = min_line_len(stream, token);
    let pad = size.saturating_sub(min);
    out.reserve(min + pad);
    out.extend_from_slice(b"RDATA ");
    out.extend_from_slice(stream.name().as_bytes());
    out.push(b' ');
    let mut itoa = itoa::Buffer::new();
    out.extend_from_slice(itoa.format(token).as_bytes());
    out.push(b' ');
    out.extend_from_slice(ROW_PREFIX);
    let mut ts = [b'0'; TS_DIGITS];
    let mut v = ts_ns;
    for d in ts.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out.extend_from_slice(&ts);
    out.extend_from_slice(ROW_MIDDLE);
    let mut left = pad;
    while left > 0 {
        let n = left.min(FILLER.len());
        out.extend_from_slice(&FILLER[..n]);
        left -= n;
    }
    out.extend_from_slice(ROW_SUFFIX);
    out.push(b'\n');
}

/// The publish time carried by a row written by [`write_line`]; `None` for any other row.
#[inline]
pub(super) fn publish_time(row: &[u8]) -> Option<u64> {
    let digits = row.get(ROW_PREFIX.len()..ROW_PREFIX.len() + TS_DIGITS)?;
    if !row.starts_with(ROW_PREFIX) {
        return None;
    }
    let (hi, lo) = digits.split_at(8);
    Some(parse8(hi.try_into().ok()?)? * 100_000_000 + parse8(lo.try_into().ok()?)?)
}

/// Eight ASCII digits (most significant first) to their value, combining pairs, then quads,
/// then halves inside one `u64` (SWAR); `None` if any byte is not a digit.
#[inline]
fn parse8(bytes: [u8; 8]) -> Option<u64> {
    const ZEROS: u64 = 0x3030_3030_3030_3030;
    const HIGH: u64 = 0xF0F0_F0F0_F0F0_F0F0;
    let v = u64::from_le_bytes(bytes);
    // Every byte is 0x30..=0x39: high nibble 3, and adding 6 does not carry out of it.
    if v & HIGH != ZEROS || v.wrapping_add(0x0606_0606_0606_0606) & HIGH != ZEROS {
        return None;
    }
    let d = v - ZEROS;
    // Byte 0 is the first (most significant) digit.
    let d = (d * 10 + (d >> 8)) & 0x00FF_00FF_00FF_00FF;
    let d = (d * 100 + (d >> 16)) & 0x0000_FFFF_0000_FFFF;
    Some((d * 10_000 + (d >> 32)) & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::fields::parse_rdata;
    use crate::proto::Token;

    #[test]
    fn lines_have_the_size_asked_and_round_trip() {
        for (size, token) in [(300, 1), (300, 123_456_789), (10, 7), (1000, 42)] {
            let mut out = Vec::new();
            write_line(&mut out, StreamId::Caches, token, 987_654_321, size);
            assert_eq!(out.len(), line_len(StreamId::Caches, token, size));
            if size >= min_line_len(StreamId::Caches, token) {
                assert_eq!(out.len(), size);
            }
            assert_eq!(out.last(), Some(&b'\n'));
            let r = parse_rdata(&out[6..out.len() - 1]).expect("valid RDATA");
            assert_eq!(r.stream, "caches");
            assert_eq!(r.token, Token::Value(token as i64));
            assert_eq!(publish_time(r.row), Some(987_654_321));
            crate::proto::fields::validate_rdata(&r).expect("the row is JSON");
        }
        assert_eq!(publish_time(b"[\"ev\", 1]"), None);
        assert_eq!(publish_time(b"[\"lt\",\"000000000000000x\",\"\"]"), None);
        assert_eq!(publish_time(b"[\"lt\",\"00000000/0000000\",\"\"]"), None);
        assert_eq!(publish_time(b"[\"lt\",\"9999999999999999\",\"\"]"), Some(9_999_999_999_999_999));
    }

    #[test]
    fn swar_matches_the_obvious_loop() {
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..10_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let v = x % 100_000_000;
            let text = format!("{v:08}");
            let bytes: [u8; 8] = text.as_bytes().try_into().unwrap();
            assert_eq!(parse8(bytes), Some(v), "{text}");
            let mut bad = bytes;
            bad[(x >> 60) as usize % 8] = b":/ a"[(x >> 40) as usize % 4];
            assert_eq!(parse8(bad), None, "{bad:?}");
        }
    }
}
