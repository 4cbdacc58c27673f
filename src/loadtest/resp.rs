//! Just enough RESP (the Redis protocol) for the pub/sub side of the load test: commands are
//! written as arrays of bulk strings; replies are parsed in place from the read buffer without
//! copying (a message's payload is a slice of that buffer).

/// A parsed reply (borrowing the read buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Frame<'a> {
    /// `message <channel> <payload>` (pub/sub delivery).
    Message {
        /// The channel.
        channel: &'a [u8],
        /// The payload.
        payload: &'a [u8],
    },
    /// `subscribe <channel> <count>` (SUBSCRIBE confirmation).
    Subscribed {
        /// The channel.
        channel: &'a [u8],
    },
    /// An integer reply (PUBLISH: the number of receivers).
    Int(i64),
    /// Anything else that parsed (simple strings, other arrays).
    Other,
}

/// The server said something we cannot parse, or sent an error reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum RespError {
    /// An `-ERR ...` reply.
    #[error("redis error: {0}")]
    Server(String),
    /// Bytes that are not RESP.
    #[error("bad RESP: {0}")]
    Bad(&'static str),
}

/// Appends a command (an array of bulk strings).
pub(super) fn write_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    let mut itoa = itoa::Buffer::new();
    out.push(b'*');
    out.extend_from_slice(itoa.format(args.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    for a in args {
        write_bulk_header(out, a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Appends `*3 $7 PUBLISH $n <channel>` and the header of a bulk string of `payload_len`
/// bytes: the caller appends the payload, then `\r\n`.
pub(super) fn write_publish_head(out: &mut Vec<u8>, channel: &[u8], payload_len: usize) {
    out.extend_from_slice(b"*3\r\n$7\r\nPUBLISH\r\n");
    write_bulk_header(out, channel.len());
    out.extend_from_slice(channel);
    out.extend_from_slice(b"\r\n");
    write_bulk_header(out, payload_len);
}

fn write_bulk_header(out: &mut Vec<u8>, len: usize) {
    let mut itoa = itoa::Buffer::new();
    out.push(b'$');
    out.extend_from_slice(itoa.format(len).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// One element of an array reply.
#[derive(Clone, Copy)]
enum Elem<'a> {
    Bulk(&'a [u8]),
    Int(i64),
    Nil,
}

/// The line starting at `at` (without `\r\n`) and the offset after it; `None` if incomplete.
#[inline]
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, RespError> {
    let Some(rel) = memchr::memchr(b'\n', buf.get(at..).unwrap_or(&[])) else {
        return Ok(None);
    };
    let nl = at + rel;
    if nl == at || buf[nl - 1] != b'\r' {
        return Err(RespError::Bad("line without CRLF"));
    }
    Ok(Some((&buf[at..nl - 1], nl + 1)))
}

#[inline]
fn int(s: &[u8]) -> Result<i64, RespError> {
    crate::proto::number::parse_i64(s).map_err(|_| RespError::Bad("bad integer"))
}

/// One element (bulk string or integer) at `at`.
#[inline]
fn elem(buf: &[u8], at: usize) -> Result<Option<(Elem<'_>, usize)>, RespError> {
    let Some(&kind) = buf.get(at) else { return Ok(None) };
    let Some((head, next)) = line(buf, at + 1)? else { return Ok(None) };
    match kind {
        b'$' => {
            let len = int(head)?;
            if len < 0 {
                return Ok(Some((Elem::Nil, next)));
            }
            let end = next + len as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(RespError::Bad("bulk string without CRLF"));
            }
            Ok(Some((Elem::Bulk(&buf[next..end]), end + 2)))
        }
        b':' => Ok(Some((Elem::Int(int(head)?), next))),
        b'+' => Ok(Some((Elem::Nil, next))),
        b'-' => Err(RespError::Server(String::from_utf8_lossy(head).into_owned())),
        _ => Err(RespError::Bad("unexpected element type")),
    }
}

/// The bulk string whose `$` header starts at `at`, and the offset after it; `None` if it is
/// not one with a short plain length, or not complete yet (the general parse then decides).
#[inline]
fn fast_bulk(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    if *buf.get(at)? != b'$' {
        return None;
    }
    let mut len = 0usize;
    let mut p = at + 1;
    // At most 9 digits: no overflow, and a header that long is not worth a fast path.
    while p < at + 10 {
        match *buf.get(p)? {
            d @ b'0'..=b'9' => len = len * 10 + usize::from(d - b'0'),
            b'\r' if p > at + 1 => break,
            _ => return None,
        }
        p += 1;
    }
    if buf.get(p..p + 2)? != b"\r\n" {
        return None;
    }
    let start = p + 2;
    let end = start.checked_add(len)?;
    if buf.get(end..end + 2)? != b"\r\n" {
        return None;
    }
    Some((&buf[start..end], end + 2))
}

/// A complete `message` frame at the start of `buf`, framed by its lengths alone (no search
/// for line ends), for a message whose header [`Framer`] has not seen yet (it frames the
/// repeats). `None` for anything else, or an incomplete frame: [`parse`] then takes the
/// general way.
#[inline]
fn fast_message(buf: &[u8]) -> Option<(Frame<'_>, usize)> {
    const HEAD: &[u8] = b"*3\r\n$7\r\nmessage\r\n";
    if !buf.starts_with(HEAD) {
        return None;
    }
    let (channel, at) = fast_bulk(buf, HEAD.len())?;
    let (payload, end) = fast_bulk(buf, at)?;
    Some((Frame::Message { channel, payload }, end))
}

/// The first complete reply in `buf` and its length; `Ok(None)` if more bytes are needed.
pub(super) fn parse(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, RespError> {
    if let Some(done) = fast_message(buf) {
        return Ok(Some(done));
    }
    let Some(&kind) = buf.first() else { return Ok(None) };
    if kind != b'*' {
        return Ok(elem(buf, 0)?.map(|(e, n)| {
            let f = match e {
                Elem::Int(i) => Frame::Int(i),
                _ => Frame::Other,
            };
            (f, n)
        }));
    }
    let Some((head, mut at)) = line(buf, 1)? else { return Ok(None) };
    let n = int(head)?;
    let mut first = [Elem::Nil; 3];
    for i in 0..n.max(0) as usize {
        let Some((e, next)) = elem(buf, at)? else { return Ok(None) };
        if let Some(slot) = first.get_mut(i) {
            *slot = e;
        }
        at = next;
    }
    let frame = match (n, first) {
        (3, [Elem::Bulk(b"message"), Elem::Bulk(channel), Elem::Bulk(payload)]) => {
            Frame::Message { channel, payload }
        }
        (3, [Elem::Bulk(b"subscribe"), Elem::Bulk(channel), _]) => Frame::Subscribed { channel },
        _ => Frame::Other,
    };
    Ok(Some((frame, at)))
}

/// Frames a subscriber's replies one after another, remembering the last message's header
/// (everything before its payload: `*3`, `message`, the channel, the payload's length). A
/// subscriber gets the same header by the million (one channel, one payload size), so when the
/// next bytes start with it the message is framed by one comparison and its known length, with
/// nothing parsed; identical header bytes cannot parse differently. Anything else takes
/// [`parse`], and a message found there becomes the remembered header.
#[derive(Default)]
pub(super) struct Framer {
    /// The last message's bytes before its payload.
    head: Vec<u8>,
    /// Where its channel starts and how long it is, inside `head`.
    channel: (usize, usize),
    /// Its payload's length.
    len: usize,
}

impl Framer {
    /// The first complete reply in `buf` and its length, as [`parse`] gives it.
    #[inline]
    pub(super) fn next<'b>(&mut self, buf: &'b [u8]) -> Result<Option<(Frame<'b>, usize)>, RespError> {
        let (h, len) = (self.head.len(), self.len);
        if h > 0
            && buf.len() >= h + len + 2
            && buf[..h] == self.head[..]
            && buf[h + len..h + len + 2] == *b"\r\n"
        {
            let (at, n) = self.channel;
            return Ok(Some((
                Frame::Message { channel: &buf[at..at + n], payload: &buf[h..h + len] },
                h + len + 2,
            )));
        }
        let parsed = parse(buf)?;
        if let Some((Frame::Message { channel, payload }, n)) = parsed {
            let start = n - 2 - payload.len();
            let at = channel.as_ptr() as usize - buf.as_ptr() as usize;
            self.head.clear();
            self.head.extend_from_slice(&buf[..start]);
            self.channel = (at, channel.len());
            self.len = payload.len();
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_replies() {
        let mut out = Vec::new();
        write_command(&mut out, &[b"SUBSCRIBE", b"events"]);
        assert_eq!(out, b"*2\r\n$9\r\nSUBSCRIBE\r\n$6\r\nevents\r\n");
        out.clear();
        write_publish_head(&mut out, b"events", 3);
        out.extend_from_slice(b"abc\r\n");
        assert_eq!(out, b"*3\r\n$7\r\nPUBLISH\r\n$6\r\nevents\r\n$3\r\nabc\r\n");

        let wire = b"*3\r\n$9\r\nsubscribe\r\n$6\r\nevents\r\n:1\r\n*3\r\n$7\r\nmessage\r\n$6\r\nevents\r\n$5\r\nhe\r\no\r\n:42\r\n";
        let (f, n) = parse(wire).unwrap().unwrap();
        assert_eq!(f, Frame::Subscribed { channel: b"events" });
        let (f, m) = parse(&wire[n..]).unwrap().unwrap();
        assert_eq!(f, Frame::Message { channel: b"events", payload: b"he\r\no" });
        let (f, k) = parse(&wire[n + m..]).unwrap().unwrap();
        assert_eq!((f, n + m + k), (Frame::Int(42), wire.len()));
        // Every strict prefix is incomplete, never an error.
        for cut in 0..n + m {
            let mut at = 0;
            while let Some((_, used)) = parse(&wire[at..cut]).unwrap() {
                at += used;
            }
        }
        // The fast path agrees with the general one on every message, whole or cut anywhere.
        let msg = b"*3\r\n$7\r\nmessage\r\n$6\r\nevents\r\n$13\r\nRDATA x\r\n 1 2\r\n";
        assert_eq!(
            fast_message(msg),
            Some((Frame::Message { channel: b"events", payload: b"RDATA x\r\n 1 2" }, msg.len()))
        );
        for cut in 0..msg.len() {
            assert_eq!(fast_message(&msg[..cut]), None);
            assert_eq!(parse(&msg[..cut]), Ok(None));
        }
        // A length that does not match the bytes is left to the general parse, which rejects it.
        let bad = b"*3\r\n$7\r\nmessage\r\n$6\r\nevents\r\n$2\r\nabc\r\n";
        assert_eq!(fast_message(bad), None);
        assert!(parse(bad).is_err());
        assert_eq!(parse(b"-ERR no\r\n"), Err(RespError::Server("ERR no".into())));
        assert!(parse(b"*1\n").is_err());
    }

    #[test]
    fn the_framer_agrees_with_parse_byte_for_byte() {
        // Messages whose headers repeat, change channel, change length, and other replies
        // between them; framed whole, and fed in every split of the stream.
        let mut wire = Vec::new();
        let mut expect = Vec::new();
        for (channel, payload) in [
            (&b"events"[..], &b"RDATA 1"[..]),
            (b"events", b"RDATA 2"),
            (b"events", b"RDATA 33"),
            (b"typing", b"RDATA 4"),
            (b"events", b"RDATA 5"),
            (b"events", b"RDATA 6"),
        ] {
            let start = wire.len();
            wire.extend_from_slice(b"*3\r\n$7\r\nmessage\r\n");
            write_bulk_header(&mut wire, channel.len());
            wire.extend_from_slice(channel);
            wire.extend_from_slice(b"\r\n");
            write_bulk_header(&mut wire, payload.len());
            wire.extend_from_slice(payload);
            wire.extend_from_slice(b"\r\n");
            expect.push(wire[start..].to_vec());
            if payload.ends_with(b"33") {
                wire.extend_from_slice(b":7\r\n");
                expect.push(b":7\r\n".to_vec());
            }
        }
        // A repeat of the remembered header with a payload one byte longer than it says: the
        // general parse decides, and rejects it.
        let mut bad = expect[5].clone();
        bad.insert(bad.len() - 2, b'!');
        for split in 0..=wire.len() {
            let mut framer = Framer::default();
            let mut got = Vec::new();
            let (mut fed, mut at) = (split, 0);
            loop {
                match framer.next(&wire[at..fed]).unwrap() {
                    Some((frame, n)) => {
                        assert_eq!(parse(&wire[at..fed]).unwrap(), Some((frame, n)));
                        got.push(wire[at..at + n].to_vec());
                        at += n;
                    }
                    None if fed < wire.len() => fed = wire.len(),
                    None => break,
                }
            }
            assert_eq!(got, expect, "split at {split}");
            assert!(framer.next(&bad).is_err());
        }
    }
}
