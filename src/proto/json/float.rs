//! Floats in Python `repr` form (shortest round-trip digits, Python's exponent and tie rules).

use std::fmt::Write as _;

use bytes::BufMut;

use super::encode::write_u64;

/// A fixed-size stack buffer for `core::fmt` output.
struct StackBuf {
    buf: [u8; 32],
    len: usize,
}

impl std::fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// A float as Python's `repr` writes it: the shortest digits that round-trip, fixed notation
/// for 1e-4 <= |x| < 1e16 (with `.0` when integral), otherwise `d.ddde±XX`; `-0.0`, `NaN`,
/// `Infinity`, `-Infinity`.
pub fn write_f64<B: BufMut + ?Sized>(out: &mut B, x: f64) {
    if x.is_nan() {
        return out.put_slice(b"NaN");
    }
    if x.is_infinite() {
        return out.put_slice(if x > 0.0 { b"Infinity" } else { b"-Infinity" });
    }
    if x == 0.0 {
        return out.put_slice(if x.is_sign_negative() { b"-0.0" } else { b"0.0" });
    }
    // `{:e}` gives the shortest round-trip digits: `-1.2345e-7`, `5e-324`, `1e16`.
    let mut sci = StackBuf { buf: [0; 32], len: 0 };
    if write!(sci, "{:e}", x.abs()).is_err() {
        // Cannot happen (at most 24 bytes); fall back to Rust's own shortest form.
        return out.put_slice(x.to_string().as_bytes());
    }
    let sci = &sci.buf[..sci.len];
    let e_pos = sci.iter().position(|&b| b == b'e').unwrap_or(sci.len());
    let mut digits = [0u8; 20];
    let mut n = 0;
    for &b in &sci[..e_pos] {
        if b.is_ascii_digit() && n < digits.len() {
            digits[n] = b;
            n += 1;
        }
    }
    let exp: i32 = std::str::from_utf8(&sci[(e_pos + 1).min(sci.len())..])
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    round_half_even(x.abs(), &mut digits[..n], exp);
    let digits = &digits[..n];
    if x.is_sign_negative() {
        out.put_u8(b'-');
    }
    if (-4..16).contains(&exp) {
        if exp < 0 {
            out.put_slice(b"0.");
            for _ in 0..(-exp - 1) {
                out.put_u8(b'0');
            }
            out.put_slice(digits);
        } else {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.put_slice(digits);
                for _ in digits.len()..int_len {
                    out.put_u8(b'0');
                }
                out.put_slice(b".0");
            } else {
                out.put_slice(&digits[..int_len]);
                out.put_u8(b'.');
                out.put_slice(&digits[int_len..]);
            }
        }
    } else {
        out.put_slice(&digits[..1]);
        if digits.len() > 1 {
            out.put_u8(b'.');
            out.put_slice(&digits[1..]);
        }
        out.put_slice(if exp < 0 { b"e-" } else { b"e+" });
        let a = exp.unsigned_abs();
        if a < 10 {
            out.put_u8(b'0');
        }
        write_u64(out, u64::from(a));
    }
}

/// Python (David Gay's dtoa) and Rust agree on the shortest round-trip digit count and pick
/// the candidate nearest to the exact value, but break an exact tie differently: Rust rounds
/// half up, Python half to even (`996219154410990.25` is `…990.2` in Python). A tie needs the
/// float to equal, exactly, the decimal halfway between two candidates, so check that with
/// integer arithmetic and switch to the even neighbour when it also round-trips.
fn round_half_even(x: f64, digits: &mut [u8], exp: i32) {
    let n = digits.len();
    let Some(&last) = digits.last() else {
        return;
    };
    if (last - b'0') % 2 == 0 || n > 19 {
        return;
    }
    let dint = digits.iter().fold(0u64, |a, &d| a * 10 + u64::from(d - b'0'));
    // x ~ dint * 10^(exp - n + 1); the halfway points are (10 * dint -+ 5) * 10^(exp - n).
    let q = exp - n as i32;
    for (cand, half) in [(dint - 1, 10 * dint - 5), (dint + 1, 10 * dint + 5)] {
        if !exactly_equals(x, half, q) {
            continue;
        }
        let mut buf = StackBuf { buf: [0; 32], len: 0 };
        let text = write!(buf, "{cand}e{}", q + 1).ok().map(|()| &buf.buf[..buf.len]);
        let round_trips = text
            .and_then(|t| std::str::from_utf8(t).ok())
            .and_then(|t| t.parse::<f64>().ok())
            .is_some_and(|y| y == x);
        let mut c = cand;
        let mut tmp = [0u8; 20];
        let mut len = 0;
        while c > 0 && len < tmp.len() {
            tmp[len] = b'0' + (c % 10) as u8;
            c /= 10;
            len += 1;
        }
        if round_trips && len == n {
            for (d, t) in digits.iter_mut().zip(tmp[..n].iter().rev()) {
                *d = *t;
            }
        }
        return;
    }
}

/// Whether positive finite `x` equals `p * 10^q` exactly.
fn exactly_equals(x: f64, p: u64, q: i32) -> bool {
    let bits = x.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i64;
    let frac = bits & ((1 << 52) - 1);
    let (mut mant, mut e2) = if biased == 0 { (frac, -1074i64) } else { (frac | (1 << 52), biased - 1075) };
    if mant == 0 || p == 0 {
        return false;
    }
    let tz = mant.trailing_zeros();
    mant >>= tz;
    e2 += i64::from(tz);
    let ptz = p.trailing_zeros();
    let p_odd = u128::from(p >> ptz);
    let ptz = i64::from(ptz);
    let mant = u128::from(mant);
    let pow5 = |k: u32| 5u128.checked_pow(k);
    if q >= 0 {
        // x = mant * 2^e2, p * 10^q = p_odd * 5^q * 2^(ptz + q)
        e2 == ptz + i64::from(q) && pow5(q.unsigned_abs()).and_then(|f| p_odd.checked_mul(f)) == Some(mant)
    } else {
        // mant * 2^e2 * 2^a * 5^a = p_odd * 2^ptz, with a = -q
        let a = q.unsigned_abs();
        ptz == e2 + i64::from(a) && pow5(a).and_then(|f| mant.checked_mul(f)) == Some(p_odd)
    }
}
