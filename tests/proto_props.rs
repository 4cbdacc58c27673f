//! Property tests for the codec: the splitter against an obviously-correct reference under any
//! chunking, its memory bound, and encode → parse → encode for every command kind.

use bytes::Bytes;
use proptest::prelude::*;
use replhub::proto::{
    parse_args, Command, CommandWord, FederationAck, InvalidateCache, Line, LineSplitter, LineTooLong,
    Position, Rdata, RemovePusher, ReplicateTarget, Role, StreamId, SyncState, Token, UserIp, UserSync,
};

// ---------------------------------------------------------------------------------------------
// Splitter

/// What the splitter reports, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Event {
    Line(Vec<u8>),
    TooLong,
}

/// The obvious byte-by-byte splitter over the whole stream: lines end at `\n`, empty ones are
/// skipped, one longer than `max` is an error, and so is a final unterminated tail over `max`.
fn reference(stream: &[u8], max: usize) -> Vec<Event> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for &b in stream {
        if b == b'\n' {
            if cur.len() > max {
                out.push(Event::TooLong);
            } else if !cur.is_empty() {
                out.push(Event::Line(cur.clone()));
            }
            cur.clear();
        } else {
            cur.push(b);
        }
    }
    if cur.len() > max {
        out.push(Event::TooLong);
    }
    out
}

/// Feeds `stream` in pieces of the given sizes (cycled), draining after each read, with
/// `next_line` or `next_chunk`. Also checks the memory bound after every drain.
fn split_in_pieces(stream: &[u8], sizes: &[usize], max: usize, chunked: bool) -> Vec<Event> {
    let mut s = LineSplitter::new(max);
    let mut out = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].clamp(1, rest.len());
        i += 1;
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        // Alternate between the two ways of feeding it.
        if i % 2 == 0 {
            s.extend_from_slice(piece);
        } else {
            s.buffer_mut().extend_from_slice(piece);
        }
        drain(&mut s, chunked, &mut out);
        assert!(s.buffered_len() <= max, "holding {} > {max}", s.buffered_len());
        assert!(s.buffered_len() <= max + piece.len());
    }
    out
}

fn drain(s: &mut LineSplitter, chunked: bool, out: &mut Vec<Event>) {
    loop {
        let got = if chunked { s.next_chunk() } else { s.next_line() };
        match got {
            Ok(None) => return,
            Ok(Some(bytes)) if chunked => {
                assert_eq!(bytes.last(), Some(&b'\n'), "a chunk ends with a newline");
                for l in bytes[..bytes.len() - 1].split(|&b| b == b'\n') {
                    assert!(!l.is_empty(), "a chunk holds no empty line");
                    out.push(Event::Line(l.to_vec()));
                }
            }
            Ok(Some(line)) => {
                assert!(!line.is_empty() && !line.contains(&b'\n'));
                out.push(Event::Line(line.to_vec()));
            }
            Err(LineTooLong) => out.push(Event::TooLong),
        }
    }
}

/// Byte streams rich in newlines, spaces and `\r`, with some long runs.
fn stream_strategy() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        4 => prop::collection::vec(prop_oneof![Just(b'a'), Just(b' '), Just(b'\r'), any::<u8>()], 0..12),
        2 => Just(b"\n".to_vec()),
        1 => (0usize..80).prop_map(|n| vec![b'x'; n]),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_chunking_gives_the_lines_of_the_whole(
        stream in stream_strategy(),
        sizes in prop::collection::vec(1usize..40, 1..8),
        max in 1usize..48,
    ) {
        let want = reference(&stream, max);
        prop_assert_eq!(&split_in_pieces(&stream, &sizes, max, false), &want);
        prop_assert_eq!(&split_in_pieces(&stream, &sizes, max, true), &want);
        // All at once, too.
        prop_assert_eq!(&split_in_pieces(&stream, &[stream.len().max(1)], max, false), &want);
    }

    #[test]
    fn splitter_survives_anything(
        ops in prop::collection::vec((prop::collection::vec(any::<u8>(), 0..100), 0u8..3), 0..30),
        max in 0usize..64,
    ) {
        let mut s = LineSplitter::new(max);
        for (data, how) in ops {
            s.extend_from_slice(&data);
            loop {
                let r = match how {
                    0 => s.next_line(),
                    1 => s.next_chunk(),
                    _ => break,
                };
                match r {
                    Ok(None) => break,
                    Ok(Some(b)) if how == 0 => {
                        prop_assert!(!b.is_empty() && b.len() <= max && !b.contains(&b'\n'));
                    }
                    Ok(Some(b)) => {
                        prop_assert_eq!(b.last(), Some(&b'\n'));
                        let mut lines = b[..b.len() - 1].split(|&c| c == b'\n');
                        prop_assert!(lines.all(|l| !l.is_empty() && l.len() <= max));
                    }
                    Err(LineTooLong) => {}
                }
            }
            if how < 2 {
                prop_assert!(s.buffered_len() <= max);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encode → parse → encode

/// An owned command, so that proptest can generate it; `as_command` borrows it back.
#[derive(Clone, Debug)]
enum Owned {
    Text(CommandWord, String),
    Rdata(String, Token, Vec<u8>),
    Position(String, i64),
    UserSync(String, SyncState, i64),
    FederationAck(i64),
    RemovePusher(String, String, String),
    InvalidateCache(String, Vec<u8>),
    UserIp(String, Vec<u8>),
}

impl Owned {
    fn as_command(&self) -> Command<'_> {
        match self {
            Self::Text(w, s) => match w {
                CommandWord::Server => Command::Server(s),
                CommandWord::Sync => Command::Sync(s),
                CommandWord::Name => Command::Name(s),
                CommandWord::Replicate => Command::Replicate(ReplicateTarget::from_name(s)),
                CommandWord::Ping => Command::Ping(s),
                CommandWord::Error => Command::Error(s),
                CommandWord::RemoteServerUp => Command::RemoteServerUp(s),
                _ => Command::ClearUserSync(s),
            },
            Self::Rdata(stream, token, row) => Command::Rdata(Rdata { stream, token: *token, row }),
            Self::Position(stream, token) => {
                Command::Position(Position { stream, instance: None, prev: None, token: *token })
            }
            Self::UserSync(user_id, state, ms) => {
                Command::UserSync(UserSync { user_id, state: *state, last_sync_ms: *ms })
            }
            Self::FederationAck(t) => Command::FederationAck(FederationAck { token: *t }),
            Self::RemovePusher(a, k, u) => {
                Command::RemovePusher(RemovePusher { app_id: a, push_key: k, user_id: u })
            }
            Self::InvalidateCache(f, keys) => {
                Command::InvalidateCache(InvalidateCache { cache_func: f, keys_json: keys })
            }
            Self::UserIp(u, json) => Command::UserIp(UserIp { user_id: u, json }),
        }
    }
}

/// Text without `\n` (which no command may contain); spaces, `\r`, non-ASCII allowed.
fn text() -> impl Strategy<Value = String> {
    "[a-z0-9 \\r@:.!$é☃😀'\"%\\\\]{0,24}"
}

/// A field that is not the last one: no spaces.
fn word() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_@:.!$é😀]{0,16}"
}

fn stream_name() -> impl Strategy<Value = String> {
    prop_oneof![prop::sample::select(StreamId::ALL.to_vec()).prop_map(|s| s.name().to_owned()), word(),]
}

/// Small JSON texts, in either separator style.
fn json_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[a-z @:!é\"\\\\]{0,8}".prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            (prop::collection::vec(inner.clone(), 0..5), any::<bool>())
                .prop_map(|(v, compact)| { format!("[{}]", v.join(if compact { "," } else { ", " })) }),
            prop::collection::vec(("[a-z]{1,4}", inner), 0..3).prop_map(|kv| {
                let items: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
                format!("{{{}}}", items.join(", "))
            }),
        ]
    })
}

fn user_ip_json() -> impl Strategy<Value = String> {
    (text(), text(), prop::option::of(text()), prop::option::of(text()), any::<i64>())
        .prop_map(|(tok, ip, ua, dev, ts)| serde_json::json!([tok, ip, ua, dev, ts]).to_string())
}

fn token() -> impl Strategy<Value = i64> {
    prop_oneof![any::<i64>(), 0i64..10_000]
}

fn command() -> impl Strategy<Value = Owned> {
    let text_words = prop::sample::select(vec![
        CommandWord::Server,
        CommandWord::Sync,
        CommandWord::Name,
        CommandWord::Replicate,
        CommandWord::Ping,
        CommandWord::Error,
        CommandWord::RemoteServerUp,
        CommandWord::ClearUserSync,
    ]);
    let state = prop_oneof![Just(SyncState::Start), Just(SyncState::End)];
    let rdata_token = prop_oneof![Just(Token::Batch), token().prop_map(Token::Value)];
    prop_oneof![
        (text_words, text()).prop_map(|(w, s)| Owned::Text(w, s)),
        (stream_name(), rdata_token, prop_oneof![json_text(), text()]).prop_map(|(s, t, r)| Owned::Rdata(
            s,
            t,
            r.into_bytes()
        )),
        (stream_name(), token()).prop_map(|(s, t)| Owned::Position(s, t)),
        (word(), state, token()).prop_map(|(u, s, t)| Owned::UserSync(u, s, t)),
        token().prop_map(Owned::FederationAck),
        (word(), word(), text()).prop_map(|(a, k, u)| Owned::RemovePusher(a, k, u)),
        (word(), json_text()).prop_map(|(f, j)| Owned::InvalidateCache(f, j.into_bytes())),
        (word(), user_ip_json()).prop_map(|(u, j)| Owned::UserIp(u, j.into_bytes())),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn encode_parse_encode_is_the_identity(owned in command()) {
        let cmd = owned.as_command();
        let wire = cmd.to_bytes().expect("generated commands are encodable");
        prop_assert_eq!(wire.last(), Some(&b'\n'));
        let line = Line::new(Bytes::copy_from_slice(&wire[..wire.len() - 1]));
        let word = cmd.word();
        prop_assert_eq!(line.command(), Some(word));
        let parsed = if word.accepted_by(Role::Server) || word.accepted_by(Role::Client) {
            let role = if word.accepted_by(Role::Server) { Role::Server } else { Role::Client };
            replhub::proto::parse_line(role, &line)
        } else {
            parse_args(word, &line)
        };
        let parsed = parsed.map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(parsed, cmd);
        prop_assert_eq!(parsed.to_bytes().ok(), Some(wire));
    }

    #[test]
    fn parsing_arbitrary_lines_never_panics(line in prop::collection::vec(any::<u8>(), 0..64)) {
        let line = Line::new(Bytes::from(line));
        for role in [Role::Server, Role::Client] {
            if let Err(e) = replhub::proto::parse_line_strict(role, &line) {
                let wire = e.to_line();
                prop_assert!(wire.ends_with(b"\n"));
                prop_assert_eq!(memchr::memchr(b'\n', &wire), Some(wire.len() - 1));
            }
        }
    }
}
