//! One RESP connection's command state machine, sans-IO: bytes in, [`Effect`]s out.
//!
//! It answers what it can answer alone (PING, ECHO, AUTH, SELECT, CLIENT, QUIT, RESET, every
//! error) and hands the hub what needs shared state: channel registrations, PUBLISH (whose
//! reply is the receiver count), GET and SET. The order of checks is Redis 7's
//! `processCommand`: unknown command, then arity, then authentication, then the pub/sub
//! context rule; the error texts are Redis's, byte for byte.
use bytes::{Bytes, BytesMut};

use super::codec::{self, Decoder, RespLimits};

/// Databases `SELECT` accepts (Redis's default `databases 16`).
pub const DATABASES: i64 = 16;

/// What a RESP connection is allowed and bounded to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionConfig {
    /// Framing limits.
    pub limits: RespLimits,
    /// The password (`--resp-password`); `None`: no authentication, as Redis without
    /// `requirepass`.
    pub password: Option<String>,
    /// The user name AUTH accepts with the password (`--resp-user`, default `default`).
    pub user: Option<String>,
}

impl SessionConfig {
    fn user(&self) -> &str {
        self.user.as_deref().unwrap_or("default")
    }
}

/// What the hub must do for a connection, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Queue these reply bytes.
    Reply(Bytes),
    /// Deliver this channel's messages from now on (the confirmation follows as a `Reply`).
    Subscribe(Bytes),
    /// Stop delivering this channel's messages.
    Unsubscribe(Bytes),
    /// Publish; the reply is the integer count of receivers.
    Publish {
        /// The channel.
        channel: Bytes,
        /// The message.
        payload: Bytes,
    },
    /// Look a key up; the reply is a bulk string or nil.
    Get {
        /// The selected database.
        db: u8,
        /// The key.
        key: Bytes,
    },
    /// Store a key; the reply is `+OK` (or an out-of-memory error).
    Set {
        /// The selected database.
        db: u8,
        /// The key.
        key: Bytes,
        /// The value.
        value: Bytes,
        /// Expiry, if given (`PX` / `EX`).
        ttl_ms: Option<u64>,
    },
    /// List the channels with subscribers (`PUBSUB CHANNELS [pattern]`); the reply is an
    /// array of their names.
    Channels {
        /// Only names matching this glob (`*`, `?`, `[...]`, `\x`), if given.
        pattern: Option<Bytes>,
    },
    /// The connection's name changed (`CLIENT SETNAME`; `None` clears it).
    Name(Option<Bytes>),
    /// Close once the replies queued so far are written; nothing more is read.
    Close,
}

/// Commands replhub knows, with Redis's arity (negative: at least that many).
const COMMANDS: &[(&str, i32)] = &[
    ("ping", -1),
    ("echo", 2),
    ("subscribe", -2),
    ("unsubscribe", -1),
    ("publish", 3),
    ("auth", -2),
    ("select", 2),
    ("set", -3),
    ("get", 2),
    ("client", -2),
    ("quit", -1),
    ("reset", 1),
    ("pubsub", -2),
];

/// Subcommands replhub knows, by container command, with their arity.
const SUBCOMMANDS: &[(&str, &[(&str, i32)])] =
    &[("client", &[("setname", 3), ("getname", 2)]), ("pubsub", &[("channels", -2)])];

/// Commands allowed while subscribed (RESP2).
const PUBSUB_ALLOWED: &[&str] = &["ping", "subscribe", "unsubscribe", "quit", "reset"];

/// One connection's RESP state. See the [module docs](self).
#[derive(Debug)]
pub struct Session {
    config: std::sync::Arc<SessionConfig>,
    decoder: Decoder,
    buf: BytesMut,
    authed: bool,
    /// Subscribed channels, each with its subscription's sequence number (for the order of
    /// `UNSUBSCRIBE` with no argument): constant time per SUBSCRIBE and UNSUBSCRIBE.
    channels: std::collections::HashMap<Bytes, u64>,
    /// Sequence number of the next subscription.
    next_sub: u64,
    name: Option<Bytes>,
    db: u8,
    closed: bool,
}

impl Session {
    /// A fresh connection.
    pub fn new(config: std::sync::Arc<SessionConfig>) -> Self {
        Self {
            decoder: Decoder::new(config.limits),
            authed: config.password.is_none(),
            config,
            buf: BytesMut::new(),
            channels: std::collections::HashMap::new(),
            next_sub: 0,
            name: None,
            db: 0,
            closed: false,
        }
    }

    /// Channels subscribed, in subscription order.
    pub fn channels(&self) -> Vec<Bytes> {
        let mut chs: Vec<(&Bytes, &u64)> = self.channels.iter().collect();
        chs.sort_by_key(|&(_, seq)| *seq);
        chs.into_iter().map(|(c, _)| c.clone()).collect()
    }

    /// The `CLIENT SETNAME` name.
    pub fn name(&self) -> Option<&Bytes> {
        self.name.as_ref()
    }

    /// Whether the connection closes (after QUIT or a protocol error): input is ignored.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Bytes received: every complete command is handled, its effects appended to `out`.
    pub fn on_bytes(&mut self, data: &[u8], out: &mut Vec<Effect>) {
        if self.closed {
            return;
        }
        self.buf.extend_from_slice(data);
        loop {
            match self.decoder.decode(&mut self.buf, self.authed) {
                Ok(Some(args)) => {
                    self.command(&args, out);
                    if self.closed {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    out.push(Effect::Reply(e.reply()));
                    self.close(out);
                    break;
                }
            }
        }
        if self.closed {
            self.buf = BytesMut::new();
        }
    }

    fn close(&mut self, out: &mut Vec<Effect>) {
        self.closed = true;
        out.push(Effect::Close);
    }

    fn command(&mut self, args: &[Bytes], out: &mut Vec<Effect>) {
        let Some(&(name, arity)) = COMMANDS.iter().find(|(n, _)| args[0].eq_ignore_ascii_case(n.as_bytes()))
        else {
            out.push(Effect::Reply(unknown_command(args)));
            return;
        };
        let mut fullname = name.to_owned();
        let mut arity = arity;
        let subs = SUBCOMMANDS.iter().find(|(c, _)| *c == name).map(|(_, s)| *s);
        if let (Some(subs), true) = (subs, args.len() >= 2) {
            match subs.iter().find(|(n, _)| args[1].eq_ignore_ascii_case(n.as_bytes())) {
                Some(&(sub, a)) => {
                    fullname = format!("{name}|{sub}");
                    arity = a;
                }
                None => {
                    let mut text = b"ERR unknown subcommand '".to_vec();
                    text.extend_from_slice(&args[1][..args[1].len().min(128)]);
                    text.extend_from_slice(format!("'. Try {} HELP.", name.to_ascii_uppercase()).as_bytes());
                    out.push(Effect::Reply(error_bytes(&text)));
                    return;
                }
            }
        }
        let argc = args.len() as i32;
        if (arity > 0 && argc != arity) || argc < -arity {
            out.push(Effect::Reply(codec::error(&format!(
                "ERR wrong number of arguments for '{fullname}' command"
            ))));
            return;
        }
        if !self.authed && !matches!(name, "auth" | "quit" | "reset") {
            out.push(Effect::Reply(codec::error("NOAUTH Authentication required.")));
            return;
        }
        if !self.channels.is_empty() && !PUBSUB_ALLOWED.contains(&name) {
            out.push(Effect::Reply(codec::error(&format!(
                "ERR Can't execute '{fullname}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / \
                 RESET are allowed in this context"
            ))));
            return;
        }
        let reply = |b: Bytes| Effect::Reply(b);
        match fullname.as_str() {
            "ping" => out.push(reply(match (args.len(), self.channels.is_empty()) {
                (n, _) if n > 2 => codec::error("ERR wrong number of arguments for 'ping' command"),
                (_, false) => codec::pubsub_pong(args.get(1).map_or(&b""[..], |a| &a[..])),
                (1, true) => codec::simple("PONG"),
                (_, true) => codec::bulk(&args[1]),
            })),
            "echo" => out.push(reply(codec::bulk(&args[1]))),
            "subscribe" => {
                for ch in &args[1..] {
                    if !self.channels.contains_key(ch) {
                        self.channels.insert(ch.clone(), self.next_sub);
                        self.next_sub += 1;
                        out.push(Effect::Subscribe(ch.clone()));
                    }
                    out.push(reply(codec::subscription("subscribe", Some(ch), self.channels.len())));
                }
            }
            "unsubscribe" => {
                if args.len() == 1 {
                    self.unsubscribe_all(out);
                } else {
                    for ch in &args[1..] {
                        if self.channels.remove(ch).is_some() {
                            out.push(Effect::Unsubscribe(ch.clone()));
                        }
                        out.push(reply(codec::subscription("unsubscribe", Some(ch), self.channels.len())));
                    }
                }
            }
            "publish" => out.push(Effect::Publish { channel: args[1].clone(), payload: args[2].clone() }),
            "auth" => out.push(reply(self.auth(args))),
            "select" => out.push(reply(match codec::parse_i64(&args[1]) {
                None => codec::error("ERR value is not an integer or out of range"),
                Some(n) if !(0..DATABASES).contains(&n) => codec::error("ERR DB index is out of range"),
                Some(n) => {
                    self.db = n as u8;
                    codec::simple("OK")
                }
            })),
            "get" => out.push(Effect::Get { db: self.db, key: args[1].clone() }),
            "set" => match set_options(&args[3..]) {
                Ok(ttl_ms) => {
                    out.push(Effect::Set {
                        db: self.db,
                        key: args[1].clone(),
                        value: args[2].clone(),
                        ttl_ms,
                    });
                }
                Err(e) => out.push(reply(e)),
            },
            "pubsub|channels" if args.len() > 3 => {
                out.push(reply(codec::error("ERR wrong number of arguments for 'pubsub|channels' command")));
            }
            "pubsub|channels" => out.push(Effect::Channels { pattern: args.get(2).cloned() }),
            "client|getname" => out.push(reply(match &self.name {
                Some(n) => codec::bulk(n),
                None => Bytes::from_static(codec::NIL),
            })),
            "client|setname" => {
                let name = &args[2];
                if name.iter().any(|&c| !(b'!'..=b'~').contains(&c)) {
                    out.push(reply(codec::error(
                        "ERR Client names cannot contain spaces, newlines or special characters.",
                    )));
                } else {
                    self.name = (!name.is_empty()).then(|| name.clone());
                    out.push(Effect::Name(self.name.clone()));
                    out.push(reply(codec::simple("OK")));
                }
            }
            "quit" => {
                out.push(reply(codec::simple("OK")));
                self.close(out);
            }
            "reset" => {
                self.unsubscribe_all_silently(out);
                if self.name.take().is_some() {
                    out.push(Effect::Name(None));
                }
                self.db = 0;
                self.authed = self.config.password.is_none();
                out.push(reply(codec::simple("RESET")));
            }
            _ => out.push(reply(unknown_command(args))),
        }
    }

    /// `UNSUBSCRIBE` with no channel: one confirmation per channel, or one with a nil
    /// channel when there were none.
    fn unsubscribe_all(&mut self, out: &mut Vec<Effect>) {
        if self.channels.is_empty() {
            out.push(Effect::Reply(codec::subscription("unsubscribe", None, 0)));
            return;
        }
        let all = self.channels();
        self.channels.clear();
        for (i, ch) in all.iter().enumerate() {
            out.push(Effect::Unsubscribe(ch.clone()));
            out.push(Effect::Reply(codec::subscription("unsubscribe", Some(ch), all.len() - i - 1)));
        }
    }

    fn unsubscribe_all_silently(&mut self, out: &mut Vec<Effect>) {
        for ch in self.channels() {
            out.push(Effect::Unsubscribe(ch));
        }
        self.channels.clear();
    }

    fn auth(&mut self, args: &[Bytes]) -> Bytes {
        let (user, pass) = match args.len() {
            2 => (None, &args[1]),
            3 => (Some(&args[1]), &args[2]),
            _ => return codec::error("ERR syntax error"),
        };
        let ok = match (&self.config.password, user) {
            (None, None) => {
                return codec::error(
                    "ERR AUTH <password> called without any password configured for the default user. \
                     Are you sure your configuration is correct?",
                )
            }
            // Without a password the default user takes any password, as Redis's `nopass`.
            (None, Some(u)) => u[..] == *b"default",
            (Some(p), None) => self.config.user() == "default" && constant_time_eq(pass, p.as_bytes()),
            (Some(p), Some(u)) => {
                u[..] == *self.config.user().as_bytes() && constant_time_eq(pass, p.as_bytes())
            }
        };
        if ok {
            self.authed = true;
            codec::simple("OK")
        } else {
            codec::error("WRONGPASS invalid username-password pair or user is disabled.")
        }
    }
}

/// Redis's `stringmatchlen` glob: `*`, `?`, `[abc]`, `[^a-z]`, `\\x`. Iterative, with one
/// backtracking point (the last `*`), so a hostile pattern costs at most pattern × text steps.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if pattern.get(p) == Some(&b'*') {
            star = Some((p + 1, t));
            p += 1;
            continue;
        }
        if let Some(next) = match_one(pattern, p, text[t]) {
            p = next;
            t += 1;
            continue;
        }
        match star {
            // Let the last `*` take one more byte and retry from there.
            Some((sp, st)) => {
                star = Some((sp, st + 1));
                p = sp;
                t = st + 1;
            }
            None => return false,
        }
    }
    while pattern.get(p) == Some(&b'*') {
        p += 1;
    }
    p == pattern.len()
}

/// Whether the pattern element at `p` (not `*`) matches `c`; where the next element starts.
fn match_one(pattern: &[u8], p: usize, c: u8) -> Option<usize> {
    match pattern.get(p)? {
        b'?' => Some(p + 1),
        b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == c).then_some(p + 2),
        b'[' => {
            let mut i = p + 1;
            let negate = pattern.get(i) == Some(&b'^');
            if negate {
                i += 1;
            }
            let mut matched = false;
            while i < pattern.len() && pattern[i] != b']' {
                if pattern[i] == b'\\' && i + 1 < pattern.len() {
                    matched |= pattern[i + 1] == c;
                    i += 2;
                } else if i + 2 < pattern.len() && pattern[i + 1] == b'-' && pattern[i + 2] != b']' {
                    let (a, z) = (pattern[i], pattern[i + 2]);
                    let (lo, hi) = if a <= z { (a, z) } else { (z, a) };
                    matched |= (lo..=hi).contains(&c);
                    i += 3;
                } else {
                    matched |= pattern[i] == c;
                    i += 1;
                }
            }
            // Past the `]` (or at the end of an unclosed class).
            (matched != negate).then_some((i + 1).min(pattern.len()))
        }
        &lit => (lit == c).then_some(p + 1),
    }
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `SET` options after the value: `EX s` or `PX ms`, once. NX, XX, GET, KEEPTTL, EXAT and PXAT
/// are not supported (a syntax error, as an unknown option is in Redis).
fn set_options(opts: &[Bytes]) -> Result<Option<u64>, Bytes> {
    let mut ttl = None;
    let mut i = 0;
    while i < opts.len() {
        let scale = if opts[i].eq_ignore_ascii_case(b"PX") {
            1
        } else if opts[i].eq_ignore_ascii_case(b"EX") {
            1000
        } else {
            return Err(codec::error("ERR syntax error"));
        };
        if ttl.is_some() || i + 1 >= opts.len() {
            return Err(codec::error("ERR syntax error"));
        }
        let n = codec::parse_i64(&opts[i + 1])
            .ok_or_else(|| codec::error("ERR value is not an integer or out of range"))?;
        let ms = u64::try_from(n)
            .ok()
            .filter(|&n| n > 0)
            .and_then(|n| n.checked_mul(scale))
            .ok_or_else(|| codec::error("ERR invalid expire time in 'set' command"))?;
        ttl = Some(ms);
        i += 2;
    }
    Ok(ttl)
}

/// `-ERR unknown command '<name>', with args beginning with: '<a>' '<b>' ` as Redis 7 words
/// it: the name cut at 128 bytes, arguments quoted while the list is under 128 bytes.
fn unknown_command(args: &[Bytes]) -> Bytes {
    let mut text = b"ERR unknown command '".to_vec();
    text.extend_from_slice(&args[0][..args[0].len().min(128)]);
    text.extend_from_slice(b"', with args beginning with: ");
    let mut list: Vec<u8> = Vec::new();
    for a in &args[1..] {
        if list.len() >= 128 {
            break;
        }
        let room = 128 - list.len();
        list.push(b'\'');
        list.extend_from_slice(&a[..a.len().min(room)]);
        list.extend_from_slice(b"' ");
    }
    text.extend_from_slice(&list);
    error_bytes(&text)
}

/// `-<text>\r\n` from bytes, `\r` and `\n` turned into spaces.
fn error_bytes(text: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(text.len() + 3);
    b.push(b'-');
    b.extend(text.iter().map(|&c| if c == b'\r' || c == b'\n' { b' ' } else { c }));
    b.extend_from_slice(b"\r\n");
    Bytes::from(b)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn session(password: Option<&str>) -> Session {
        Session::new(Arc::new(SessionConfig {
            password: password.map(str::to_owned),
            ..SessionConfig::default()
        }))
    }

    fn cmd(args: &[&str]) -> Vec<u8> {
        let mut b = BytesMut::new();
        codec::put_command(&mut b, &args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>());
        b.to_vec()
    }

    /// The replies only, concatenated.
    fn replies(s: &mut Session, input: &[u8]) -> String {
        let mut out = Vec::new();
        s.on_bytes(input, &mut out);
        out.iter()
            .filter_map(|e| match e {
                Effect::Reply(b) => Some(String::from_utf8_lossy(b).into_owned()),
                Effect::Close => Some("<close>".to_owned()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn ping_echo_and_unknown_commands_as_redis() {
        let mut s = session(None);
        assert_eq!(replies(&mut s, b"PING\r\n"), "+PONG\r\n");
        assert_eq!(replies(&mut s, &cmd(&["ping", "hi"])), "$2\r\nhi\r\n");
        assert_eq!(
            replies(&mut s, &cmd(&["PING", "a", "b"])),
            "-ERR wrong number of arguments for 'ping' command\r\n"
        );
        assert_eq!(
            replies(&mut s, &cmd(&["FOO"])),
            "-ERR unknown command 'FOO', with args beginning with: \r\n"
        );
        assert_eq!(
            replies(&mut s, &cmd(&["FOO", "a\nb", "c"])),
            "-ERR unknown command 'FOO', with args beginning with: 'a b' 'c' \r\n"
        );
        let long = "a".repeat(200);
        assert_eq!(
            replies(&mut s, &cmd(&["FOO", &long, "x"])),
            format!("-ERR unknown command 'FOO', with args beginning with: '{}' \r\n", "a".repeat(128))
        );
        assert_eq!(replies(&mut s, &cmd(&["echo", "x"])), "$1\r\nx\r\n");
    }

    #[test]
    fn subscribed_context_allows_only_pubsub_commands() {
        let mut s = session(None);
        let mut out = Vec::new();
        s.on_bytes(&cmd(&["SUBSCRIBE", "sn/USER_IP", "sn", "sn"]), &mut out);
        assert_eq!(
            out,
            vec![
                Effect::Subscribe(Bytes::from("sn/USER_IP")),
                Effect::Reply(codec::subscription("subscribe", Some(b"sn/USER_IP"), 1)),
                Effect::Subscribe(Bytes::from("sn")),
                Effect::Reply(codec::subscription("subscribe", Some(b"sn"), 2)),
                Effect::Reply(codec::subscription("subscribe", Some(b"sn"), 2)),
            ]
        );
        assert_eq!(replies(&mut s, &cmd(&["PING"])), "*2\r\n$4\r\npong\r\n$0\r\n\r\n");
        assert_eq!(
            replies(&mut s, &cmd(&["GET", "k"])),
            "-ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n"
        );
        assert_eq!(
            replies(&mut s, &cmd(&["CLIENT", "SETNAME", "x"])),
            "-ERR Can't execute 'client|setname': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n"
        );
        assert_eq!(
            replies(&mut s, &cmd(&["UNSUBSCRIBE", "x"])),
            "*3\r\n$11\r\nunsubscribe\r\n$1\r\nx\r\n:2\r\n"
        );
        assert_eq!(
            replies(&mut s, &cmd(&["UNSUBSCRIBE"])),
            "*3\r\n$11\r\nunsubscribe\r\n$10\r\nsn/USER_IP\r\n:1\r\n*3\r\n$11\r\nunsubscribe\r\n$2\r\nsn\r\n:0\r\n"
        );
        assert_eq!(replies(&mut s, &cmd(&["UNSUBSCRIBE"])), "*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n");
        assert_eq!(replies(&mut s, &cmd(&["PING"])), "+PONG\r\n");
    }

    #[test]
    fn auth_without_a_password() {
        let mut s = session(None);
        assert_eq!(
            replies(&mut s, &cmd(&["AUTH", "p"])),
            "-ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?\r\n"
        );
        assert_eq!(
            replies(&mut s, &cmd(&["AUTH", "u", "p"])),
            "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
        );
        assert_eq!(replies(&mut s, &cmd(&["AUTH", "default", "p"])), "+OK\r\n");
        assert_eq!(replies(&mut s, &cmd(&["AUTH", "a", "b", "c"])), "-ERR syntax error\r\n");
    }

    #[test]
    fn auth_with_a_password() {
        let mut s = session(Some("sekret"));
        assert_eq!(replies(&mut s, &cmd(&["PING"])), "-NOAUTH Authentication required.\r\n");
        assert_eq!(replies(&mut s, &cmd(&["SUBSCRIBE", "a"])), "-NOAUTH Authentication required.\r\n");
        assert_eq!(
            replies(&mut s, &cmd(&["FOO"])),
            "-ERR unknown command 'FOO', with args beginning with: \r\n"
        );
        assert_eq!(
            replies(&mut s, b"*11\r\n"),
            "-ERR Protocol error: unauthenticated multibulk length\r\n<close>"
        );
        let mut s = session(Some("sekret"));
        assert_eq!(
            replies(&mut s, &cmd(&["AUTH", "x"])),
            "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
        );
        assert_eq!(
            replies(&mut s, &cmd(&["AUTH", "u", "sekret"])),
            "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
        );
        assert_eq!(replies(&mut s, &cmd(&["AUTH", "default", "sekret"])), "+OK\r\n");
        assert_eq!(replies(&mut s, &cmd(&["PING"])), "+PONG\r\n");
        assert_eq!(replies(&mut s, &cmd(&["RESET"])), "+RESET\r\n");
        assert_eq!(replies(&mut s, &cmd(&["PING"])), "-NOAUTH Authentication required.\r\n");
        assert_eq!(replies(&mut s, &cmd(&["AUTH", "sekret"])), "+OK\r\n");
    }

    #[test]
    fn select_set_and_client() {
        let mut s = session(None);
        assert_eq!(
            replies(&mut s, &cmd(&["SELECT", "x"])),
            "-ERR value is not an integer or out of range\r\n"
        );
        assert_eq!(replies(&mut s, &cmd(&["SELECT", "16"])), "-ERR DB index is out of range\r\n");
        assert_eq!(replies(&mut s, &cmd(&["SELECT", "3"])), "+OK\r\n");
        let mut out = Vec::new();
        s.on_bytes(&cmd(&["SET", "k", "v", "px", "1500"]), &mut out);
        assert_eq!(out, vec![Effect::Set { db: 3, key: "k".into(), value: "v".into(), ttl_ms: Some(1500) }]);
        for (args, reply) in [
            (&["SET", "k", "v", "PX"][..], "-ERR syntax error\r\n"),
            (&["SET", "k", "v", "ZZ", "1"], "-ERR syntax error\r\n"),
            (&["SET", "k", "v", "PX", "1", "EX", "1"], "-ERR syntax error\r\n"),
            (&["SET", "k", "v", "PX", "x"], "-ERR value is not an integer or out of range\r\n"),
            (&["SET", "k", "v", "EX", "0"], "-ERR invalid expire time in 'set' command\r\n"),
            (&["GET", "a", "b"], "-ERR wrong number of arguments for 'get' command\r\n"),
            (&["CLIENT"], "-ERR wrong number of arguments for 'client' command\r\n"),
            (&["CLIENT", "FOO"], "-ERR unknown subcommand 'FOO'. Try CLIENT HELP.\r\n"),
            (&["CLIENT", "GETNAME"], "$-1\r\n"),
            (
                &["CLIENT", "SETNAME", "a b"],
                "-ERR Client names cannot contain spaces, newlines or special characters.\r\n",
            ),
            (&["CLIENT", "SETNAME"], "-ERR wrong number of arguments for 'client|setname' command\r\n"),
            (&["CLIENT", "SETNAME", "w1"], "+OK\r\n"),
            (&["CLIENT", "GETNAME"], "$2\r\nw1\r\n"),
        ] {
            assert_eq!(replies(&mut s, &cmd(args)), reply, "{args:?}");
        }
        assert_eq!(s.name().map(|n| &n[..]), Some(&b"w1"[..]));
    }

    #[test]
    fn pubsub_channels_and_globs() {
        let mut s = session(None);
        let mut out = Vec::new();
        s.on_bytes(&cmd(&["PUBSUB", "channels", "sn*"]), &mut out);
        assert_eq!(out, vec![Effect::Channels { pattern: Some(Bytes::from("sn*")) }]);
        assert_eq!(
            replies(&mut s, &cmd(&["PUBSUB", "FOO"])),
            "-ERR unknown subcommand 'FOO'. Try PUBSUB HELP.\r\n"
        );
        assert_eq!(
            replies(&mut s, &cmd(&["PUBSUB"])),
            "-ERR wrong number of arguments for 'pubsub' command\r\n"
        );
        for (p, t, m) in [
            ("*", "sn/USER_IP", true),
            ("sn", "sn", true),
            ("sn", "sn/USER_IP", false),
            ("s?/*", "sn/USER_IP", true),
            ("[a-s]n", "sn", true),
            ("[^s]n", "sn", false),
            ("a\\*", "a*", true),
            ("a\\*", "ab", false),
            ("*a*a*a*a*a*a*a*a*b", &"a".repeat(4000), false),
            ("*", "", true),
            ("a*", "", false),
            ("*x*", "axb", true),
        ] {
            assert_eq!(glob_match(p.as_bytes(), t.as_bytes()), m, "{p} {t}");
        }
    }

    #[test]
    fn quit_and_protocol_errors_close_and_ignore_the_rest() {
        let mut s = session(None);
        assert_eq!(replies(&mut s, b"*1\r\n$4\r\nQUIT\r\n*1\r\n$4\r\nPING\r\n"), "+OK\r\n<close>");
        assert!(s.is_closed());
        assert_eq!(replies(&mut s, b"PING\r\n"), "");
        let mut s = session(None);
        assert_eq!(
            replies(&mut s, b"PING\r\n*1\r\nx\r\nPING\r\n"),
            "+PONG\r\n-ERR Protocol error: expected '$', got 'x'\r\n<close>"
        );
    }
}
