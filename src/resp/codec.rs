//! RESP2 framing, sans-IO: the request decoder (multibulk and inline commands, as Redis 7
//! parses them) and the reply encoders.
//!
//! The decoder is incremental, like the line codecs of STYLE.md's models: it keeps where it
//! stopped (the multibulk count read so far, the arguments taken, the bulk length announced),
//! so bytes arriving one at a time cost no re-scan. "Need more bytes" is `Ok(None)`. Every
//! input is bounded: at most [`RespLimits::max_args`] arguments, a bulk of at most
//! [`RespLimits::max_bulk_len`] bytes, a command of at most [`RespLimits::max_command_bytes`]
//! in all, a count or inline line of at most [`INLINE_MAX`] bytes; before authentication Redis's
//! own tighter limits apply (10 arguments, 16 KiB bulks). Past a limit the error is the one
//! Redis gives, and the connection closes after it (as in Redis).
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Longest inline command, and longest `*<count>` / `$<len>` line, as Redis's
/// `PROTO_INLINE_MAX_SIZE` (64 KiB).
pub const INLINE_MAX: usize = 64 * 1024;
/// Most arguments before authentication (Redis 7's rule for unauthenticated clients).
pub const UNAUTH_MAX_ARGS: usize = 10;
/// Largest bulk before authentication (Redis 7's rule for unauthenticated clients).
pub const UNAUTH_MAX_BULK: usize = 16 * 1024;

/// Bounds on what one command may make the server hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RespLimits {
    /// Most arguments in one command (command name included).
    pub max_args: usize,
    /// Largest single argument, in bytes.
    pub max_bulk_len: usize,
    /// Largest command in all (sum of its arguments), in bytes.
    pub max_command_bytes: usize,
}

impl Default for RespLimits {
    /// 1024 arguments, 64 MiB per argument and per command: far above what Synapse sends (one
    /// replication line per PUBLISH, cache entries of kilobytes) and far below Redis's own
    /// 512 MiB / 1 GiB, so one client cannot make a core hold more than that.
    fn default() -> Self {
        Self { max_args: 1024, max_bulk_len: 64 << 20, max_command_bytes: 64 << 20 }
    }
}

/// Bad framing: the text after `-ERR Protocol error: `, worded as Redis 7 words it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// `*<count>` is not a number, or over the limit.
    #[error("invalid multibulk length")]
    MultibulkLength,
    /// `$<len>` is not a number, negative, or over the limit.
    #[error("invalid bulk length")]
    BulkLength,
    /// More than [`UNAUTH_MAX_ARGS`] arguments before AUTH.
    #[error("unauthenticated multibulk length")]
    UnauthMultibulk,
    /// A bulk over [`UNAUTH_MAX_BULK`] bytes before AUTH.
    #[error("unauthenticated bulk length")]
    UnauthBulk,
    /// Something other than `$` where a bulk string must start.
    #[error("expected '$', got '{}'", char::from(*.0))]
    ExpectedDollar(u8),
    /// A `*<count>` line longer than [`INLINE_MAX`].
    #[error("too big mbulk count string")]
    BigMultibulk,
    /// A `$<len>` line longer than [`INLINE_MAX`].
    #[error("too big bulk count string")]
    BigBulk,
    /// An inline command longer than [`INLINE_MAX`].
    #[error("too big inline request")]
    BigInline,
    /// An inline command with an open quote.
    #[error("unbalanced quotes in request")]
    UnbalancedQuotes,
}

impl ProtocolError {
    /// The whole reply: `-ERR Protocol error: <text>\r\n`.
    pub fn reply(&self) -> Bytes {
        error(&format!("ERR Protocol error: {self}"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between commands.
    Start,
    /// In a multibulk: this many arguments still to come.
    Args(usize),
    /// A bulk of this many bytes announced, then `remaining` more arguments.
    Bulk { len: usize, remaining: usize },
}

/// The incremental request decoder of one connection. See the [module docs](self).
#[derive(Debug)]
pub struct Decoder {
    limits: RespLimits,
    state: State,
    args: Vec<Bytes>,
    /// Bytes of the arguments taken so far in the current command.
    taken: usize,
}

impl Decoder {
    /// A decoder between commands.
    pub fn new(limits: RespLimits) -> Self {
        Self { limits, state: State::Start, args: Vec::new(), taken: 0 }
    }

    /// Takes the next complete command out of `buf`: `Ok(None)` when more bytes are needed,
    /// `Ok(Some(args))` with at least one argument, or the protocol error to answer before
    /// closing. `authed` selects Redis's limits for unauthenticated clients. Empty commands
    /// (`*0`, `*-1`, a blank inline line) are skipped, as Redis does.
    pub fn decode(&mut self, buf: &mut BytesMut, authed: bool) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        loop {
            match self.state {
                State::Start => {
                    let Some(&first) = buf.first() else { return Ok(None) };
                    if first != b'*' {
                        match inline(buf)? {
                            None => return Ok(None),
                            Some(args) if args.is_empty() => continue,
                            Some(args) => {
                                if args.len() > self.limits.max_args {
                                    return Err(ProtocolError::MultibulkLength);
                                }
                                // Within INLINE_MAX, and within the configured limits too
                                // (which, at their defaults, only a multibulk can reach).
                                let total: usize = args.iter().map(Bytes::len).sum();
                                if total > self.limits.max_command_bytes
                                    || args.iter().any(|a| a.len() > self.limits.max_bulk_len)
                                {
                                    return Err(ProtocolError::BigInline);
                                }
                                return Ok(Some(args));
                            }
                        }
                    }
                    let Some(n) = number_line(buf, ProtocolError::BigMultibulk)? else { return Ok(None) };
                    let Some(n) = n else { return Err(ProtocolError::MultibulkLength) };
                    if n <= 0 {
                        continue;
                    }
                    let n = usize::try_from(n).map_err(|_| ProtocolError::MultibulkLength)?;
                    if n > i32::MAX as usize || n > self.limits.max_args {
                        return Err(ProtocolError::MultibulkLength);
                    }
                    if !authed && n > UNAUTH_MAX_ARGS {
                        return Err(ProtocolError::UnauthMultibulk);
                    }
                    // Reserve for what is announced only up to a small bound: the count is the
                    // peer's word, not yet backed by bytes.
                    self.args = Vec::with_capacity(n.min(16));
                    self.taken = 0;
                    self.state = State::Args(n);
                }
                State::Args(remaining) => {
                    let Some(&first) = buf.first() else { return Ok(None) };
                    if first != b'$' {
                        return Err(ProtocolError::ExpectedDollar(first));
                    }
                    let Some(len) = number_line(buf, ProtocolError::BigBulk)? else { return Ok(None) };
                    let len = len.and_then(|l| usize::try_from(l).ok()).ok_or(ProtocolError::BulkLength)?;
                    if len > self.limits.max_bulk_len || self.taken + len > self.limits.max_command_bytes {
                        return Err(ProtocolError::BulkLength);
                    }
                    if !authed && len > UNAUTH_MAX_BULK {
                        return Err(ProtocolError::UnauthBulk);
                    }
                    self.state = State::Bulk { len, remaining };
                }
                State::Bulk { len, remaining } => {
                    // Like Redis, the two bytes after the bulk are skipped unread.
                    if buf.len() < len + 2 {
                        buf.reserve(len + 2 - buf.len());
                        return Ok(None);
                    }
                    let arg = buf.split_to(len).freeze();
                    buf.advance(2);
                    self.taken += len;
                    self.args.push(arg);
                    if remaining == 1 {
                        self.state = State::Start;
                        return Ok(Some(std::mem::take(&mut self.args)));
                    }
                    self.state = State::Args(remaining - 1);
                }
            }
        }
    }
}

/// Reads a `*<n>\r\n` or `$<n>\r\n` line: `Ok(None)` if incomplete, `Ok(Some(None))` if the
/// number does not parse (Redis's `string2ll`: optional `-`, digits, no leading zero).
#[allow(clippy::option_option)]
fn number_line(buf: &mut BytesMut, too_big: ProtocolError) -> Result<Option<Option<i64>>, ProtocolError> {
    let Some(cr) = memchr::memchr(b'\r', buf) else {
        if buf.len() > INLINE_MAX {
            return Err(too_big);
        }
        return Ok(None);
    };
    if cr > INLINE_MAX {
        return Err(too_big);
    }
    // The byte after `\r` must have arrived; like Redis it is skipped unread.
    if cr + 1 >= buf.len() {
        return Ok(None);
    }
    let n = parse_i64(&buf[1..cr]);
    buf.advance(cr + 2);
    Ok(Some(n))
}

/// Redis's `string2ll`: an optional `-`, then digits without a leading zero (but `0`), no
/// sign `+`, no spaces, fitting in an `i64`.
pub fn parse_i64(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || (digits[0] == b'0' && (digits.len() > 1 || neg)) {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let d = i64::from(d - b'0');
        v = if neg { v.checked_mul(10)?.checked_sub(d)? } else { v.checked_mul(10)?.checked_add(d)? };
    }
    Some(v)
}

/// An inline command line (`PING\r\n`, `SET k "a b"\n`): `Ok(None)` if incomplete.
fn inline(buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    // Redis looks for the newline with `strchr`, which stops at a NUL: a NUL before the
    // newline leaves the command incomplete until the buffer passes INLINE_MAX.
    let end = memchr::memchr(0, buf).unwrap_or(buf.len());
    let Some(nl) = memchr::memchr(b'\n', &buf[..end]) else {
        if buf.len() > INLINE_MAX {
            return Err(ProtocolError::BigInline);
        }
        return Ok(None);
    };
    if nl > INLINE_MAX {
        return Err(ProtocolError::BigInline);
    }
    let line = buf.split_to(nl + 1);
    let mut end = nl;
    if end > 0 && line[end - 1] == b'\r' {
        end -= 1;
    }
    split_args(&line[..end]).map(Some).ok_or(ProtocolError::UnbalancedQuotes)
}

/// Redis's `sdssplitargs`: words separated by spaces, `"double quotes"` with `\n \r \t \b \a
/// \xHH \"` escapes, `'single quotes'` with `\'`; a closing quote must be followed by a space or
/// the end. `None` for unbalanced quotes. As in C, a NUL byte ends the line.
pub fn split_args(line: &[u8]) -> Option<Vec<Bytes>> {
    let line = &line[..memchr::memchr(0, line).unwrap_or(line.len())];
    let mut out = Vec::new();
    let mut i = 0;
    let n = line.len();
    loop {
        while i < n && is_c_space(line[i]) {
            i += 1;
        }
        if i == n {
            return Some(out);
        }
        let mut cur = Vec::new();
        let (mut inq, mut insq) = (false, false);
        loop {
            if inq {
                if i == n {
                    return None;
                }
                let c = line[i];
                if c == b'\\'
                    && i + 3 < n
                    && line[i + 1] == b'x'
                    && hex(line[i + 2]).is_some()
                    && hex(line[i + 3]).is_some()
                {
                    cur.push(hex(line[i + 2])? * 16 + hex(line[i + 3])?);
                    i += 3;
                } else if c == b'\\' && i + 1 < n {
                    i += 1;
                    cur.push(match line[i] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        other => other,
                    });
                } else if c == b'"' {
                    if i + 1 < n && !is_c_space(line[i + 1]) {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                }
            } else if insq {
                if i == n {
                    return None;
                }
                let c = line[i];
                if c == b'\\' && i + 1 < n && line[i + 1] == b'\'' {
                    i += 1;
                    cur.push(b'\'');
                } else if c == b'\'' {
                    if i + 1 < n && !is_c_space(line[i + 1]) {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                }
            } else {
                if i == n {
                    break;
                }
                match line[i] {
                    // Every byte that ends a word is one the skip above passes over, so each
                    // turn of the outer loop consumes input.
                    b' ' | b'\n' | b'\r' | b'\t' => break,
                    b'"' => inq = true,
                    b'\'' => insq = true,
                    c => cur.push(c),
                }
            }
            i += 1;
        }
        out.push(Bytes::from(cur));
    }
}

/// C's `isspace`.
const fn is_c_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

// ---------------------------------------------------------------------------------------------
// Replies

/// `+<text>\r\n`.
pub fn simple(text: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(text.len() + 3);
    b.put_u8(b'+');
    b.put_slice(text.as_bytes());
    b.put_slice(b"\r\n");
    b.freeze()
}

/// `-<text>\r\n`, with any `\r` or `\n` in the text turned into spaces (as Redis does, so an
/// error quoting the peer's bytes stays one line).
pub fn error(text: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(text.len() + 3);
    b.put_u8(b'-');
    b.extend(text.bytes().map(|c| if c == b'\r' || c == b'\n' { b' ' } else { c }));
    b.put_slice(b"\r\n");
    b.freeze()
}

/// `:<n>\r\n`.
pub fn integer(n: i64) -> Bytes {
    let mut b = BytesMut::with_capacity(24);
    put_integer(&mut b, n);
    b.freeze()
}

/// Appends an integer reply.
pub fn put_integer(b: &mut BytesMut, n: i64) {
    put_prefixed(b, b':', n);
}

/// Appends `<prefix><n>\r\n`: an integer reply (`:`) or a bulk or array header (`$`, `*`).
fn put_prefixed<I: itoa::Integer>(b: &mut BytesMut, prefix: u8, n: I) {
    b.put_u8(prefix);
    b.put_slice(itoa::Buffer::new().format(n).as_bytes());
    b.put_slice(b"\r\n");
}

/// `$<len>\r\n<bytes>\r\n`.
pub fn bulk(data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(data.len() + 16);
    put_bulk(&mut b, data);
    b.freeze()
}

/// The nil bulk, `$-1\r\n`.
pub const NIL: &[u8] = b"$-1\r\n";

/// Appends `$<len>\r\n<bytes>\r\n`.
pub fn put_bulk(b: &mut BytesMut, data: &[u8]) {
    put_prefixed(b, b'$', data.len());
    b.put_slice(data);
    b.put_slice(b"\r\n");
}

/// A `subscribe`/`unsubscribe` confirmation: `*3 $<kind> $<channel>|$-1 :<count>`.
pub fn subscription(kind: &str, channel: Option<&[u8]>, count: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(48 + channel.map_or(0, <[u8]>::len));
    b.put_slice(b"*3\r\n");
    put_bulk(&mut b, kind.as_bytes());
    match channel {
        Some(c) => put_bulk(&mut b, c),
        None => b.put_slice(NIL),
    }
    put_prefixed(&mut b, b':', count);
    b.freeze()
}

/// The pub/sub-mode PING reply, `*2 $4 pong $<n> <msg>`.
pub fn pubsub_pong(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(msg.len() + 24);
    b.put_slice(b"*2\r\n$4\r\npong\r\n");
    put_bulk(&mut b, msg);
    b.freeze()
}

/// Appends one delivery, `*3 $7 message $<n> <channel> $<m> <payload>`: the bytes every
/// subscriber of the channel receives, framed once.
pub fn put_message(b: &mut BytesMut, channel: &[u8], payload: &[u8]) {
    b.put_slice(b"*3\r\n$7\r\nmessage\r\n");
    put_bulk(b, channel);
    put_bulk(b, payload);
}

/// Appends a command as an array of bulk strings (what a client sends).
pub fn put_command(b: &mut BytesMut, args: &[&[u8]]) {
    put_prefixed(b, b'*', args.len());
    for a in args {
        put_bulk(b, a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(
        input: &[u8],
        limits: RespLimits,
        authed: bool,
    ) -> (Vec<Vec<Bytes>>, Option<ProtocolError>) {
        let mut d = Decoder::new(limits);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match d.decode(&mut buf, authed) {
                Ok(Some(args)) => out.push(args),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    /// Feeds `input` in pieces cut at `cuts`, decoding after each piece.
    fn decode_split(input: &[u8], cuts: &[usize], authed: bool) -> (Vec<Vec<Bytes>>, Option<ProtocolError>) {
        let mut d = Decoder::new(RespLimits::default());
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain(std::iter::once(&input.len())) {
            buf.extend_from_slice(&input[from..to]);
            from = to;
            loop {
                match d.decode(&mut buf, authed) {
                    Ok(Some(args)) => out.push(args),
                    Ok(None) => break,
                    Err(e) => return (out, Some(e)),
                }
            }
        }
        (out, None)
    }

    fn strs(cmds: &[Vec<Bytes>]) -> Vec<Vec<&[u8]>> {
        cmds.iter().map(|c| c.iter().map(|a| &a[..]).collect()).collect()
    }

    const PIPELINE: &[u8] = b"*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nsn\r\nPING\r\n*3\r\n$7\r\nPUBLISH\r\n$2\r\nsn\r\n$10\r\nREPLICATE \r\n*0\r\n\r\n*1\r\n$4\r\nPING\r\n";

    #[test]
    fn pipelined_multibulk_and_inline_commands() {
        let (cmds, err) = decode_all(PIPELINE, RespLimits::default(), true);
        assert_eq!(err, None);
        assert_eq!(
            strs(&cmds),
            vec![
                vec![&b"SUBSCRIBE"[..], b"sn"],
                vec![b"PING"],
                vec![b"PUBLISH", b"sn", b"REPLICATE "],
                vec![b"PING"],
            ]
        );
    }

    #[test]
    fn a_split_at_every_byte_gives_the_same_commands() {
        let (whole, _) = decode_all(PIPELINE, RespLimits::default(), true);
        for cut in 0..=PIPELINE.len() {
            let (split, err) = decode_split(PIPELINE, &[cut], true);
            assert_eq!(err, None, "cut at {cut}");
            assert_eq!(split, whole, "cut at {cut}");
        }
        let every: Vec<usize> = (1..PIPELINE.len()).collect();
        assert_eq!(decode_split(PIPELINE, &every, true).0, whole);
    }

    #[test]
    fn incomplete_input_waits() {
        for partial in
            [&b"*"[..], b"*2\r", b"*2\r\n$4\r\nPI", b"*1\r\n$4\r\nPING\r", b"PING", b"PING\0\r\nPING\r\n"]
        {
            let (cmds, err) = decode_all(partial, RespLimits::default(), true);
            assert!(cmds.is_empty() && err.is_none(), "{partial:?}");
        }
    }

    #[test]
    fn framing_errors_are_worded_as_redis() {
        let cases: &[(&[u8], &str)] = &[
            (b"*x\r\n", "-ERR Protocol error: invalid multibulk length\r\n"),
            (b"*1\r\n$x\r\n", "-ERR Protocol error: invalid bulk length\r\n"),
            (b"*1\r\n$-1\r\n", "-ERR Protocol error: invalid bulk length\r\n"),
            (b"*1\r\nfoo\r\n", "-ERR Protocol error: expected '$', got 'f'\r\n"),
            (b"*01\r\n", "-ERR Protocol error: invalid multibulk length\r\n"),
            (b"*+1\r\n", "-ERR Protocol error: invalid multibulk length\r\n"),
            (b"PING \"a\r\n", "-ERR Protocol error: unbalanced quotes in request\r\n"),
            (b"PING \"a\"b\r\n", "-ERR Protocol error: unbalanced quotes in request\r\n"),
        ];
        for (input, reply) in cases {
            let (_, err) = decode_all(input, RespLimits::default(), true);
            assert_eq!(err.map(|e| e.reply()), Some(Bytes::from(*reply)), "{input:?}");
        }
    }

    #[test]
    fn limits_bound_every_input() {
        let small = RespLimits { max_args: 3, max_bulk_len: 10, max_command_bytes: 15 };
        assert_eq!(decode_all(b"*4\r\n", small, true).1, Some(ProtocolError::MultibulkLength));
        assert_eq!(decode_all(b"*1\r\n$11\r\n", small, true).1, Some(ProtocolError::BulkLength));
        assert_eq!(
            decode_all(b"*2\r\n$10\r\n0123456789\r\n$6\r\n", small, true).1,
            Some(ProtocolError::BulkLength)
        );
        assert_eq!(decode_all(b"a b c d\r\n", small, true).1, Some(ProtocolError::MultibulkLength));
        assert_eq!(
            decode_all(b"*11\r\n", RespLimits::default(), false).1,
            Some(ProtocolError::UnauthMultibulk)
        );
        assert_eq!(
            decode_all(b"*1\r\n$16385\r\n", RespLimits::default(), false).1,
            Some(ProtocolError::UnauthBulk)
        );
        let long = vec![b'a'; INLINE_MAX + 1];
        assert_eq!(decode_all(&long, RespLimits::default(), true).1, Some(ProtocolError::BigInline));
        let mut count = b"*".to_vec();
        count.extend(std::iter::repeat_n(b'1', INLINE_MAX + 1));
        assert_eq!(decode_all(&count, RespLimits::default(), true).1, Some(ProtocolError::BigMultibulk));
    }

    #[test]
    fn a_bulk_may_hold_any_bytes_and_its_trailer_is_skipped() {
        let (cmds, _) = decode_all(
            b"*2\r\n$4\r\nPING\r\n$4\r\na\r\nbXX*1\r\n$4\r\nPING\r\n",
            RespLimits::default(),
            true,
        );
        assert_eq!(strs(&cmds), vec![vec![&b"PING"[..], b"a\r\nb"], vec![b"PING"]]);
    }

    #[test]
    fn inline_quoting_follows_sdssplitargs() {
        let got = split_args(br#"SET "a b" 'c\'d' "\x41\n" e"#).expect("balanced");
        assert_eq!(
            got,
            vec![
                Bytes::from("SET"),
                Bytes::from("a b"),
                Bytes::from("c'd"),
                Bytes::from("A\n"),
                Bytes::from("e")
            ]
        );
        assert_eq!(split_args(b"   "), Some(vec![]));
        assert_eq!(split_args(b"PING\0x y"), Some(vec![Bytes::from("PING")]), "a NUL ends the line, as in C");
        assert_eq!(split_args(b"\0"), Some(vec![]));
        assert_eq!(split_args(b"'a"), None);
    }

    #[test]
    fn numbers_parse_as_string2ll() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-12"), Some(-12));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [&b""[..], b"-", b"-0", b"01", b"+1", b" 1", b"1 ", b"9223372036854775808", b"1x"] {
            assert_eq!(parse_i64(bad), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        /// Any commands, encoded and cut into any pieces, decode to themselves.
        #[test]
        fn encoded_commands_decode_whole_under_any_chunking(
            cmds in proptest::collection::vec(
                proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..40), 1..6),
                1..8,
            ),
            cuts in proptest::collection::vec(0usize..2000, 0..12),
        ) {
            let mut wire = BytesMut::new();
            for c in &cmds {
                put_command(&mut wire, &c.iter().map(Vec::as_slice).collect::<Vec<_>>());
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.sort_unstable();
            let (got, err) = decode_split(&wire, &cuts, true);
            proptest::prop_assert_eq!(err, None);
            let got: Vec<Vec<Vec<u8>>> = got.iter().map(|c| c.iter().map(|a| a.to_vec()).collect()).collect();
            proptest::prop_assert_eq!(got, cmds);
        }

        /// Any bytes at all: the decoder never panics, and never holds more than the limits.
        #[test]
        fn arbitrary_bytes_are_answered_or_awaited(data in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let limits = RespLimits { max_args: 4, max_bulk_len: 64, max_command_bytes: 128 };
            let (cmds, _) = decode_all(&data, limits, true);
            for c in cmds {
                proptest::prop_assert!(!c.is_empty() && c.len() <= 4 && c.iter().map(Bytes::len).sum::<usize>() <= 128);
            }
        }
    }

    #[test]
    fn replies_are_framed_as_redis() {
        assert_eq!(simple("PONG"), Bytes::from("+PONG\r\n"));
        assert_eq!(error("ERR a\r\nb"), Bytes::from("-ERR a  b\r\n"));
        assert_eq!(integer(-3), Bytes::from(":-3\r\n"));
        assert_eq!(bulk(b""), Bytes::from("$0\r\n\r\n"));
        assert_eq!(
            subscription("unsubscribe", None, 0),
            Bytes::from("*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n")
        );
        assert_eq!(pubsub_pong(b""), Bytes::from("*2\r\n$4\r\npong\r\n$0\r\n\r\n"));
        let mut m = BytesMut::new();
        put_message(&mut m, b"sn", b"REPLICATE ");
        assert_eq!(m.freeze(), Bytes::from("*3\r\n$7\r\nmessage\r\n$2\r\nsn\r\n$10\r\nREPLICATE \r\n"));
    }
}
