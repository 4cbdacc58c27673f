//! The client side of RESP2, sans-IO: parsing a server's replies (for `replhub tail --resp`).
use bytes::{Bytes, BytesMut};

/// A reply, owning its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+text`.
    Simple(Bytes),
    /// `-text`.
    Error(Bytes),
    /// `:n`.
    Int(i64),
    /// `$n` bytes; `None` for nil.
    Bulk(Option<Bytes>),
    /// `*n` replies; `None` for a nil array.
    Array(Option<Vec<Self>>),
}

/// Bytes that are not a RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a RESP reply: {0}")]
pub struct BadReply(&'static str);

/// Deepest nesting accepted (pub/sub replies are two levels deep).
const MAX_DEPTH: usize = 8;
/// Largest bulk accepted (a replication line is far smaller).
const MAX_BULK: usize = 512 << 20;

/// Takes one complete reply off the front of `buf`: `Ok(None)` if more bytes are needed.
pub fn take_reply(buf: &mut BytesMut) -> Result<Option<Reply>, BadReply> {
    match measure(buf)? {
        None => Ok(None),
        Some(len) => {
            let frame = buf.split_to(len).freeze();
            let (reply, _) = build(&frame, 0)?;
            Ok(Some(reply))
        }
    }
}

/// The length of the reply at the front of `buf`, if it is complete.
pub fn measure(buf: &[u8]) -> Result<Option<usize>, BadReply> {
    measure_at(buf, 0)
}

fn measure_at(buf: &[u8], depth: usize) -> Result<Option<usize>, BadReply> {
    if depth > MAX_DEPTH {
        return Err(BadReply("nested too deep"));
    }
    let Some(nl) = memchr::memchr(b'\n', buf) else { return Ok(None) };
    if nl == 0 || buf[nl - 1] != b'\r' {
        return Err(BadReply("a header line without \\r\\n"));
    }
    let head = &buf[1..nl - 1];
    let after = nl + 1;
    match buf[0] {
        b'+' | b'-' => Ok(Some(after)),
        b':' => super::codec::parse_i64(head).map(|_| Some(after)).ok_or(BadReply("bad integer")),
        b'$' => {
            let n = super::codec::parse_i64(head).ok_or(BadReply("bad bulk length"))?;
            if n < 0 {
                return Ok(Some(after));
            }
            let n = usize::try_from(n).ok().filter(|&n| n <= MAX_BULK).ok_or(BadReply("bulk too long"))?;
            Ok((buf.len() >= after + n + 2).then_some(after + n + 2))
        }
        b'*' => {
            let n = super::codec::parse_i64(head).ok_or(BadReply("bad array length"))?;
            let mut at = after;
            for _ in 0..n.max(0) {
                match measure_at(&buf[at..], depth + 1)? {
                    Some(len) => at += len,
                    None => return Ok(None),
                }
            }
            Ok(Some(at))
        }
        _ => Err(BadReply("unknown type byte")),
    }
}

/// Builds the reply at the front of a complete frame; returns it and its length.
fn build(frame: &Bytes, at: usize) -> Result<(Reply, usize), BadReply> {
    let rest = &frame[at..];
    let nl = memchr::memchr(b'\n', rest).ok_or(BadReply("truncated"))?;
    let head = &rest[1..nl - 1];
    let after = at + nl + 1;
    let text = || frame.slice(at + 1..at + nl - 1);
    Ok(match rest[0] {
        b'+' => (Reply::Simple(text()), after),
        b'-' => (Reply::Error(text()), after),
        b':' => (Reply::Int(super::codec::parse_i64(head).ok_or(BadReply("bad integer"))?), after),
        b'$' => match super::codec::parse_i64(head).ok_or(BadReply("bad bulk length"))? {
            n if n < 0 => (Reply::Bulk(None), after),
            n => {
                let n = n as usize;
                (Reply::Bulk(Some(frame.slice(after..after + n))), after + n + 2)
            }
        },
        b'*' => match super::codec::parse_i64(head).ok_or(BadReply("bad array length"))? {
            n if n < 0 => (Reply::Array(None), after),
            n => {
                let mut items = Vec::with_capacity((n as usize).min(64));
                let mut pos = after;
                for _ in 0..n {
                    let (r, next) = build(frame, pos)?;
                    items.push(r);
                    pos = next;
                }
                (Reply::Array(Some(items)), pos)
            }
        },
        _ => return Err(BadReply("unknown type byte")),
    })
}

impl Reply {
    /// A pub/sub `message` delivery's channel and payload.
    pub fn as_message(&self) -> Option<(&Bytes, &Bytes)> {
        match self {
            Self::Array(Some(items)) => match &items[..] {
                [Self::Bulk(Some(kind)), Self::Bulk(Some(ch)), Self::Bulk(Some(payload))]
                    if kind[..] == *b"message" =>
                {
                    Some((ch, payload))
                }
                _ => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_whole_or_wait_at_every_split() {
        let wire: &[u8] = b"+OK\r\n-ERR x\r\n:-5\r\n$-1\r\n$3\r\na\nb\r\n*3\r\n$7\r\nmessage\r\n$2\r\nsn\r\n$4\r\nPING\r\n*-1\r\n";
        let want = vec![
            Reply::Simple("OK".into()),
            Reply::Error("ERR x".into()),
            Reply::Int(-5),
            Reply::Bulk(None),
            Reply::Bulk(Some("a\nb".into())),
            Reply::Array(Some(vec![
                Reply::Bulk(Some("message".into())),
                Reply::Bulk(Some("sn".into())),
                Reply::Bulk(Some("PING".into())),
            ])),
            Reply::Array(None),
        ];
        for cut in 0..=wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(r) = take_reply(&mut buf).expect("valid") {
                got.push(r);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(r) = take_reply(&mut buf).expect("valid") {
                got.push(r);
            }
            assert_eq!(got, want, "cut at {cut}");
        }
        assert_eq!(want[5].as_message().map(|(c, p)| (&c[..], &p[..])), Some((&b"sn"[..], &b"PING"[..])));
        assert!(take_reply(&mut BytesMut::from(&b"?\r\n"[..])).is_err());
    }
}
