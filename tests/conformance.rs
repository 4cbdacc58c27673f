//! The conformance vectors of `shared/vectors/commands.json` (produced by running Synapse's own
//! code at the seed) against replhub's codec: parsing in the receiving role, the parsed fields,
//! byte-exact re-encoding, and the ERROR texts. Every vector is handled explicitly; a vector
//! this file does not know makes it fail.
//!
//! Where replhub deliberately differs from the reference, the test says so and why.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use replhub::proto::{
    inbound, json, parse_args, parse_line, parse_line_strict, Command, InvalidateCache, Line, LineSplitter,
    LineTooLong, PeerError, Rdata, ReplicateTarget, Role, SyncState, Token, UserIp, MAX_LINE_LEN,
};
use serde_json::{json as j, Value};

// ---------------------------------------------------------------------------------------------
// Loading

fn vectors() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors/commands.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "conformance vectors missing: cannot read {}: {e}. They live in the shared/ folder \
             next to the repository (shared/vectors/commands.json).",
            path.display()
        )
    });
    serde_json::from_str(&sanitize_non_finite(&text))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Python's `json` writes (and Synapse's rows contain) bare `NaN`, `Infinity`, `-Infinity`,
/// which serde_json rejects: outside strings, turn them into marker strings so that both sides
/// of a comparison agree.
fn sanitize_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else {
            let mut replaced = false;
            for word in ["-Infinity", "Infinity", "NaN"] {
                if let Some(after) = rest.strip_prefix(word) {
                    out.push_str(&format!("\"<{word}>\""));
                    rest = after;
                    replaced = true;
                    break;
                }
            }
            if replaced {
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// A JSON text received on the wire, as a comparable value.
fn wire_json(bytes: &[u8]) -> Value {
    let text = std::str::from_utf8(bytes).expect("JSON on the wire is UTF-8");
    serde_json::from_str(&sanitize_non_finite(text)).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("vector field {key:?} missing in {v}"))
}

/// The line's bytes: `line`, or `line_full` for long ones, or `line_hex` for non-UTF-8 ones.
fn line_bytes(v: &Value) -> Vec<u8> {
    if let Some(hex) = v["line_hex"].as_str() {
        return (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
    }
    if let Some(full) = v["line_full"].as_str() {
        return full.as_bytes().to_vec();
    }
    s(v, "line").as_bytes().to_vec()
}

fn role_of(receiver: &str) -> Role {
    match receiver {
        "server" => Role::Server,
        "client" => Role::Client,
        other => panic!("unknown receiver {other:?}"),
    }
}

fn receiving_role(direction: &str) -> Role {
    match direction {
        "server->client" => Role::Client,
        "client->server" => Role::Server,
        other => panic!("unknown direction {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Parsed commands in the vectors' `fields` shape

fn fields_of(p: &Command<'_>) -> Value {
    match p {
        Command::Server(d)
        | Command::Sync(d)
        | Command::Name(d)
        | Command::Ping(d)
        | Command::Error(d)
        | Command::RemoteServerUp(d)
        | Command::ClearUserSync(d) => j!({ "data": d }),
        Command::Rdata(r) => j!({
            "row": wire_json(r.row),
            "stream_name": r.stream,
            "token": r.token.value(),
        }),
        Command::Position(pos) => j!({ "stream_name": pos.stream, "token": pos.token }),
        Command::Replicate(t) => j!({ "stream_name": t.as_str() }),
        Command::UserSync(u) => j!({
            "is_syncing": u.state == SyncState::Start,
            "last_sync_ms": u.last_sync_ms,
            "user_id": u.user_id,
        }),
        Command::FederationAck(a) => j!({ "token": a.token }),
        Command::RemovePusher(r) => j!({
            "app_id": r.app_id, "push_key": r.push_key, "user_id": r.user_id,
        }),
        Command::InvalidateCache(c) => j!({
            "cache_func": c.cache_func, "keys": wire_json(c.keys_json),
        }),
        Command::UserIp(u) => {
            let items = wire_json(u.json);
            let items = items.as_array().expect("USER_IP validated as an array");
            j!({
                "access_token": items[0],
                "ip": items[1],
                "user_agent": items[2],
                "device_id": items[3],
                "last_seen": items[4],
                "user_id": u.user_id,
            })
        }
    }
}

/// Key order does not matter in `fields` (Python sorted them); compare as maps.
fn assert_fields(id: &str, got: &Value, want: &Value) {
    let as_map = |v: &Value| -> BTreeMap<String, Value> {
        v.as_object()
            .unwrap_or_else(|| panic!("{id}: fields are not an object: {v}"))
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    assert_eq!(as_map(got), as_map(want), "{id}: parsed fields differ");
}

fn with_newline(line: &[u8]) -> Vec<u8> {
    let mut v = line.to_vec();
    v.push(b'\n');
    v
}

/// Re-encodes a parsed command as Synapse would write it: JSON arguments are decoded and
/// re-encoded with replhub's Synapse-compatible encoder (for non-canonical input such as
/// compact separators); everything else as parsed.
fn canonical_encoding(p: &Command<'_>) -> Bytes {
    let reencode = |raw: &[u8]| -> Vec<u8> {
        let value = json::parse(raw).unwrap_or_else(|e| panic!("{}", e.python_repr()));
        json::to_vec(&value)
    };
    let fixed;
    let cmd = match *p {
        Command::Rdata(r) => {
            fixed = reencode(r.row);
            Command::Rdata(Rdata { row: &fixed, ..r })
        }
        Command::InvalidateCache(c) => {
            fixed = reencode(c.keys_json);
            Command::InvalidateCache(InvalidateCache { keys_json: &fixed, ..c })
        }
        Command::UserIp(u) => {
            fixed = reencode(u.json);
            Command::UserIp(UserIp { json: &fixed, ..u })
        }
        other => other,
    };
    cmd.to_bytes().unwrap_or_else(|e| panic!("cannot encode {cmd:?}: {e}"))
}

/// The text after `ERROR `.
fn error_text(sent: &Value) -> &str {
    let line = sent[0].as_str().expect("sent_by_synapse[0]");
    line.strip_prefix("ERROR ").unwrap_or_else(|| panic!("not an ERROR line: {line:?}"))
}

/// The part of a parse ERROR that implementations must match exactly (PROTOCOL.md §1.1
/// step 8): up to and including `': `.
fn parse_error_prefix(text: &str) -> &str {
    let end = text.find("': ").unwrap_or_else(|| panic!("no `': ` in {text:?}")) + 3;
    &text[..end]
}

#[derive(Default)]
struct Tally(BTreeMap<&'static str, usize>);

impl Tally {
    fn add(&mut self, what: &'static str) {
        *self.0.entry(what).or_default() += 1;
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn valid_vectors_parse_and_reencode_byte_for_byte() {
    let v = vectors();
    let valid = v["valid"].as_array().expect("valid[]");
    let mut tally = Tally::default();
    for vec in valid {
        let id = s(vec, "id");
        let raw = line_bytes(vec);
        assert_eq!(raw.len() as u64, vec["line_utf8_bytes"].as_u64().unwrap_or(raw.len() as u64));
        // Through the splitter first: a valid line (up to exactly 16384 bytes) comes out whole.
        let mut splitter = LineSplitter::new(MAX_LINE_LEN);
        splitter.extend_from_slice(&with_newline(&raw));
        let from_splitter = splitter.next_line().unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(from_splitter.as_deref(), Some(&raw[..]), "{id}: splitter");
        let line = Line::new(Bytes::from(raw.clone()));
        let directions = vec["direction"].as_array().expect("direction[]");
        assert!(!directions.is_empty(), "{id}: no direction");
        for dir in directions {
            let role = receiving_role(dir.as_str().expect("direction"));
            let parsed = parse_line_strict(role, &line).unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(parse_line(role, &line).as_ref(), Ok(&parsed), "{id}: strict vs relay");
            assert_fields(id, &fields_of(&parsed), &vec["fields"]);
            // Synapse wrote this line: we must write exactly the same bytes.
            let encoded = parsed.to_bytes().unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(encoded, with_newline(&raw), "{id}: re-encoding differs");
            assert_eq!(canonical_encoding(&parsed), encoded, "{id}: JSON re-encoding differs");
            // The other side must refuse it unless it is accepted both ways.
            let other = if role == Role::Server { Role::Client } else { Role::Server };
            if directions.len() == 1 {
                assert_eq!(
                    parse_line(other, &line),
                    Err(PeerError::InvalidCommand(s(vec, "command").to_owned())),
                    "{id}: wrong direction accepted"
                );
            }
            tally.add(if role == Role::Server { "parsed as server" } else { "parsed as client" });
        }
        tally.add("valid vectors");
    }
    println!("valid: {:?}", tally.0);
    assert_eq!(tally.0["valid vectors"], valid.len());
}

#[test]
fn noncanonical_vectors_parse_and_encode_canonically() {
    let v = vectors();
    let entries = v["accepted_noncanonical"].as_array().expect("accepted_noncanonical[]");
    let mut tally = Tally::default();
    for vec in entries {
        let id = s(vec, "id");
        let role = role_of(s(vec, "receiver"));
        let line = Line::new(Bytes::from(line_bytes(vec)));
        match id {
            // Deliberate differences (src/proto/number.rs): Python's int() leniencies that
            // replhub does not copy. `1_000` and Arabic-Indic digits: Synapse never writes
            // them, and accepting them would let peers disagree about a token's spelling.
            // A token beyond i64: Synapse's tokens are database sequence values (i64), so a
            // larger one is garbage that a relay must not pass on as a number.
            "position-underscore" | "position-unicode-digits" | "rdata-token-huge" => {
                let err = parse_line_strict(role, &line).expect_err(id).to_string();
                let want = format!("failed to parse line for  '{}': ", s(vec, "command"));
                assert!(err.starts_with(&want), "{id}: {err}");
                tally.add("rejected on purpose (int() leniency)");
            }
            _ => {
                let parsed = parse_line_strict(role, &line).unwrap_or_else(|e| panic!("{id}: {e}"));
                assert_fields(id, &fields_of(&parsed), &vec["fields"]);
                let canonical = with_newline(s(vec, "canonical_line").as_bytes());
                assert_eq!(canonical_encoding(&parsed), canonical, "{id}: canonical encoding");
                // The relay path forwards a received command as it came; only JSON arguments
                // (and integer spellings) can differ from the canonical form.
                let as_parsed = parsed.to_bytes().unwrap_or_else(|e| panic!("{id}: {e}"));
                if as_parsed == canonical {
                    tally.add("canonical without JSON re-encoding");
                } else {
                    assert!(
                        matches!(parsed, Command::Rdata(_) | Command::UserIp(_)),
                        "{id}: only JSON rows should need re-encoding"
                    );
                    tally.add("canonical after JSON re-encoding");
                }
            }
        }
    }
    println!("accepted_noncanonical: {:?}", tally.0);
    assert_eq!(tally.0.values().sum::<usize>(), entries.len());
}

#[test]
fn invalid_vectors_get_the_reference_errors_or_a_documented_policy() {
    let v = vectors();
    let entries = v["invalid"].as_array().expect("invalid[]");
    let mut tally = Tally::default();
    for vec in entries {
        let id = s(vec, "id");
        let receiver = s(vec, "receiver");
        let role = role_of(receiver);
        let raw = line_bytes(vec);
        let reaction = &vec[format!("received_by_synapse_{receiver}").as_str()];
        let outcome = s(reaction, "outcome");
        let sent = &reaction["sent_by_synapse"];
        let line = Line::new(Bytes::from(raw.clone()));

        // What the command class alone does (Synapse's `from_line`), without the direction
        // check: our parse_args must agree on success and on the fields.
        check_from_line(id, &vec["from_line"], &line);

        match (id, outcome) {
            // ---- framing: decided by the splitter -------------------------------------------
            ("line-too-long" | "line-too-long-client", "error_and_close") => {
                let mut splitter = LineSplitter::new(MAX_LINE_LEN);
                splitter.extend_from_slice(&with_newline(&raw));
                assert_eq!(splitter.next_line(), Err(LineTooLong), "{id}");
                assert_eq!(PeerError::LineTooLong.to_string(), error_text(sent), "{id}");
                // Without its `\n` too: the unterminated tail is already over the limit.
                let mut splitter = LineSplitter::new(MAX_LINE_LEN);
                splitter.extend_from_slice(&raw);
                assert_eq!(splitter.next_line(), Err(LineTooLong), "{id}: tail");
                tally.add("line too long (splitter)");
            }
            // replhub policy (ARCHITECTURE.md §4): blank lines are ignored. The reference
            // means to ignore them too, but a bytes/str comparison bug drops the connection.
            ("blank-line" | "blank-line-client", "connection_dropped") => {
                let mut splitter = LineSplitter::new(MAX_LINE_LEN);
                splitter.extend_from_slice(b"\n\n");
                assert_eq!(splitter.next_line(), Ok(None), "{id}");
                assert_eq!(splitter.buffered_len(), 0, "{id}");
                tally.add("blank line ignored (policy)");
            }
            // ---- one-word lines: replhub policy, empty arguments ----------------------------
            // The reference crashes on a line without a space and drops the connection. For
            // replhub a one-word line is the command with empty arguments, which Synapse would
            // accept written as `PING ` / `NAME ` (see the ping-empty and name-empty vectors).
            ("ping-no-space" | "name-no-space", "connection_dropped") => {
                let parsed = parse_line(role, &line).unwrap_or_else(|e| panic!("{id}: {e}"));
                assert!(matches!(parsed, Command::Ping("") | Command::Name("")), "{id}");
                tally.add("one-word line accepted (policy)");
            }
            // `REPLICATE` alone is REPLICATE of '': behind a seed upstream the hub answers the
            // unknown-stream ERROR; otherwise it is Synapse 1.13+'s handshake (hub/subscribe.rs).
            ("replicate-bare", "connection_dropped") => {
                let parsed = parse_line(role, &line).unwrap_or_else(|e| panic!("{id}: {e}"));
                assert_eq!(parsed, Command::Replicate(ReplicateTarget::Unknown("")), "{id}");
                assert_eq!(
                    PeerError::UnknownStream(String::new()).to_string(),
                    "failed to handle replicate: Exception('unknown stream %s', '')"
                );
                tally.add("one-word line -> hub error (policy)");
            }
            // `SERVER` alone is SERVER '': the client session compares it with the configured
            // server name and answers `ERROR Wrong remote`.
            ("server-bare", "connection_dropped") => {
                assert_eq!(parse_line(role, &line), Ok(Command::Server("")), "{id}");
                tally.add("one-word line -> session error (policy)");
            }
            // ---- decided above the codec ----------------------------------------------------
            ("replicate-1.12-style" | "replicate-all-now", "error_and_close") => {
                let Ok(Command::Replicate(ReplicateTarget::Unknown(name))) = parse_line(role, &line) else {
                    panic!("{id}: expected an unknown REPLICATE target");
                };
                assert_eq!(PeerError::UnknownStream(name.to_owned()).to_string(), error_text(sent));
                tally.add("unknown stream (hub)");
            }
            ("wrong-server-name", "error_and_close") => {
                assert!(matches!(parse_line(role, &line), Ok(Command::Server(_))), "{id}");
                assert_eq!(PeerError::WrongRemote.to_string(), error_text(sent), "{id}");
                tally.add("wrong remote (session)");
            }
            // ---- the reference drops; replhub sends a parse ERROR, then closes --------------
            ("invalid-utf8", "connection_dropped") => {
                let err = parse_line(role, &line).expect_err(id);
                let text = err.to_string();
                assert!(
                    text.starts_with("failed to parse line for  'NAME': UnicodeDecodeError('utf-8', "),
                    "{id}: {text}"
                );
                // Python's own repr of the exception, as in the vector.
                assert!(text.contains(s(reaction, "exception")), "{id}: {text}");
                tally.add("dropped -> parse ERROR (policy)");
            }
            // A parse error whose ERROR would exceed 16384 bytes: the reference fails to send
            // it and drops the connection; replhub cuts the embedded line so it always fits.
            ("bad-json-near-limit", "connection_dropped") => {
                assert!(parse_line(role, &line).is_ok(), "{id}: the relay path does not parse rows");
                let err = parse_line_strict(role, &line).expect_err(id);
                let wire = err.to_line();
                assert!(wire.len() - 1 <= MAX_LINE_LEN, "{id}: ERROR line is {} bytes", wire.len());
                assert!(wire.starts_with(b"ERROR failed to parse line for  'RDATA': JSONDecodeError("));
                assert!(wire.ends_with(b"...'):\n"), "{id}");
                assert!(err.to_string().len() + "ERROR ".len() > MAX_LINE_LEN, "{id}: not near the limit");
                tally.add("dropped -> truncated parse ERROR (policy)");
            }
            // ---- direction check and unknown words: exact text ------------------------------
            (_, "error_and_close") if error_text(sent).starts_with("invalid command: ") => {
                assert_eq!(parse_line(role, &line).map(|_| ()), Err(invalid_command(sent)), "{id}");
                assert_eq!(inbound::check_command(role, &line).map(|_| ()), Err(invalid_command(sent)));
                tally.add("invalid command (exact)");
            }
            // ---- argument parse errors: prefix exact, and the detail where we can -----------
            (_, "error_and_close") if error_text(sent).starts_with("failed to parse line for  ") => {
                let want = error_text(sent);
                let err = match parse_line(role, &line) {
                    Err(e) => e,
                    // RDATA rows are not parsed on the relay path (ARCHITECTURE.md §3): the
                    // master is trusted to send JSON. Strict mode (clients that decode rows)
                    // reports the error as Synapse does.
                    Ok(Command::Rdata(_)) => {
                        tally.add("bad RDATA JSON accepted on the relay path");
                        parse_line_strict(role, &line).expect_err(id)
                    }
                    Ok(p) => panic!("{id}: accepted as {p:?}"),
                };
                let got = err.to_string();
                assert_eq!(parse_error_prefix(&got), parse_error_prefix(want), "{id}");
                if got == want {
                    tally.add("parse error (exact text)");
                } else {
                    // Only JSON decoder messages may differ in detail.
                    assert!(got.contains("JSONDecodeError("), "{id}:\n got {got}\nwant {want}");
                    tally.add("parse error (prefix; JSON detail differs)");
                }
                assert_eq!(&err.to_line()[..], format!("ERROR {got}\n").as_bytes(), "{id}");
            }
            // ---- handler-level failures are not protocol errors -----------------------------
            (_, "handler_exception_logged") => {
                let parsed = parse_line_strict(role, &line).unwrap_or_else(|e| panic!("{id}: {e}"));
                assert!(matches!(parsed, Command::Rdata(_)), "{id}");
                tally.add("parses; handler-level failure");
            }
            (id, outcome) => panic!("vector {id:?} with outcome {outcome:?} is not handled here"),
        }
    }
    println!("invalid: {:?}", tally.0);
    let relay_notes = tally.0.get("bad RDATA JSON accepted on the relay path").copied().unwrap_or(0);
    assert_eq!(tally.0.values().sum::<usize>() - relay_notes, entries.len());
}

fn invalid_command(sent: &Value) -> PeerError {
    let text = error_text(sent);
    PeerError::InvalidCommand(text["invalid command: ".len()..].to_owned())
}

/// Compares `parse_args` (no direction check) with what Synapse's command class did.
fn check_from_line(id: &str, from_line: &Value, line: &Line) {
    let Some(word) = line.command() else {
        // Unknown words never reach argument parsing.
        assert!(from_line.get("unknown_command").is_some() || from_line.get("raises").is_some(), "{id}");
        return;
    };
    let ours = parse_args(word, line);
    if from_line["ok"] == Value::Bool(true) {
        let parsed = ours.unwrap_or_else(|e| panic!("{id}: from_line accepts, we do not: {e}"));
        if from_line["fields"].is_object() {
            assert_fields(id, &fields_of(&parsed), &from_line["fields"]);
        }
    }
}

#[test]
fn error_lines_are_always_sendable() {
    // An over-long parse error built from a maximal line still fits.
    let mut row = BytesMut::new();
    row.extend_from_slice(b"RDATA caches 1 [\"");
    row.resize(MAX_LINE_LEN, b'\'');
    let line = Line::new(row.freeze());
    let err = parse_line_strict(Role::Client, &line).expect_err("unterminated string");
    assert!(err.to_line().len() <= MAX_LINE_LEN + 1);
    let token = Token::Value(1);
    assert!(Command::Rdata(Rdata { stream: "caches", token, row: &[b'1'; MAX_LINE_LEN] })
        .to_bytes()
        .is_err());
}
