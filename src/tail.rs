//! `replhub tail`: subscribe like a worker and print what arrives.
//!
//! Each received line is printed as it came (stdout is buffered and flushed once per read).
//! With `--decode`, RDATA rows are printed as JSON objects named after PROTOCOL.md §6 (the
//! names come from the row-shape table in `synthetic::shape`), e.g.
//! `{"stream":"events","token":5322,"row":{"kind":"ev","event_id":"$e1:example.com",...}}`
//! (`"token":"batch"` for a row whose group continues). A row whose shape does not match its
//! stream's is printed as the raw array (`"row":[...]`).
//!
//! Every generation is decoded (PROTOCOL.md §8): RDATA with an instance name (1.13+) get an
//! `"instance"` member, `ev` rows of 6, 8 or 9 fields and both `device_lists` layouts are
//! named by their length, and POSITION lines become
//! `{"position":{"stream":"events","instance":"master","prev":100,"token":100}}` (`instance`
//! from 1.13, `prev` from 1.22). The RDATA layout is learnt from the first POSITION, and
//! told per line before that.
//!
//! With `--resp ADDR` it subscribes to the Redis pub/sub channels of a Redis-based deployment
//! instead (Synapse 1.13+; replhub in Redis mode, or a real Redis) and prints each message's
//! payload, one replication command per line.
//!
//! Rows are parsed with simd-json (in a scratch copy: it parses in place), falling back to
//! replhub's own JSON parser for what simd-json refuses (NaN, integers beyond 64 bits).
use std::io::{self, Write};

use anyhow::Context as _;
use simd_json::BorrowedValue;

use crate::client::{Client, ClientError, ClientOptions};
use crate::proto::generation::{parse_any_position, parse_any_rdata, AnyPosition, RdataForm};
use crate::proto::{json, CommandWord, Line, StreamId, Token};
use crate::resp::reply::{take_reply, Reply};
use crate::synthetic::shape::{self, RowShape};

/// What `tail` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TailOptions {
    /// `HOST:PORT` of the replication server.
    pub connect: String,
    /// The stream to subscribe to, or `ALL`.
    pub stream: String,
    /// Print RDATA rows as named JSON objects.
    pub decode: bool,
    /// The `NAME` to announce.
    pub name: String,
    /// Exit after this many RDATA lines.
    pub count: Option<u64>,
}

impl Default for TailOptions {
    fn default() -> Self {
        Self {
            connect: "127.0.0.1:9092".to_owned(),
            stream: "ALL".to_owned(),
            decode: false,
            name: "replhub-tail".to_owned(),
            count: None,
        }
    }
}

/// Connects and prints to stdout until the server closes, `count` RDATA were printed, or
/// stdout is closed (e.g. `| head`).
pub async fn run(opts: TailOptions) -> anyhow::Result<()> {
    let mut out = io::BufWriter::with_capacity(1 << 16, io::stdout());
    match run_to(&opts, &mut out).await {
        Err(e) if is_broken_pipe(&e) => Ok(()),
        other => other,
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

/// [`run`] writing to `out`.
pub async fn run_to<W: Write>(opts: &TailOptions, out: &mut W) -> anyhow::Result<()> {
    let options = ClientOptions {
        name: opts.name.clone(),
        streams: vec![opts.stream.clone()],
        ..ClientOptions::default()
    };
    let mut client = Client::connect(opts.connect.as_str(), options)
        .await
        .with_context(|| format!("cannot connect to {}", opts.connect))?;
    let mut printer = Printer::new(opts.decode, opts.count);
    loop {
        // Everything one read brought, then one flush.
        loop {
            match client.try_next_raw() {
                Ok(Some(line)) => {
                    if printer.print(&line, out)? {
                        out.flush()?;
                        return Ok(());
                    }
                }
                Ok(None) => break,
                Err(e) => return fail(client, e).await,
            }
        }
        out.flush()?;
        match client.next_raw().await {
            Ok(Some(line)) => {
                if printer.print(&line, out)? {
                    out.flush()?;
                    return Ok(());
                }
            }
            Ok(None) => {
                out.flush()?;
                return Ok(());
            }
            Err(e) => return fail(client, e).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Redis mode: `tail --resp`

/// What `tail --resp` does: subscribe to a Redis-based deployment's replication channels (on
/// replhub in Redis mode, or on a real Redis) and print each message's payload (a replication
/// command line) as a line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RespTailOptions {
    /// `HOST:PORT` of the Redis server (or of replhub's `--resp-listen`).
    pub connect: String,
    /// TLS to it (`rediss://`), if any.
    pub tls: Option<crate::config::RedisTls>,
    /// Channels to subscribe to (Synapse's is the server name, plus `<name>/USER_IP`);
    /// empty: every channel that has subscribers (`PUBSUB CHANNELS`).
    pub channels: Vec<String>,
    /// `AUTH` with this password (and `user`, if given) first.
    pub password: Option<String>,
    /// The user for `AUTH`.
    pub user: Option<String>,
    /// Print RDATA rows as named JSON objects (with their writer's instance).
    pub decode: bool,
    /// Exit after this many RDATA messages.
    pub count: Option<u64>,
}

/// Connects and prints to stdout until the server closes, `count` RDATA were printed, or
/// stdout is closed.
pub async fn run_resp(opts: RespTailOptions) -> anyhow::Result<()> {
    let mut out = io::BufWriter::with_capacity(1 << 16, io::stdout());
    match run_resp_to(&opts, &mut out).await {
        Err(e) if is_broken_pipe(&e) => Ok(()),
        other => other,
    }
}

/// A RESP connection for `tail --resp`: commands out, replies in.
struct RespConn {
    stream: crate::tls::RedisStream,
    buf: bytes::BytesMut,
}

impl RespConn {
    async fn call(&mut self, args: &[&[u8]]) -> anyhow::Result<Reply> {
        self.send(args).await?;
        self.next().await?.context("the server closed the connection")
    }

    async fn send(&mut self, args: &[&[u8]]) -> anyhow::Result<()> {
        let mut b = bytes::BytesMut::new();
        crate::resp::codec::put_command(&mut b, args);
        crate::tls::write_out(&mut self.stream, &mut b).await?;
        Ok(())
    }

    /// The next reply; `None` once the server closed.
    async fn next(&mut self) -> anyhow::Result<Option<Reply>> {
        use tokio::io::AsyncReadExt as _;
        loop {
            if let Some(r) = take_reply(&mut self.buf)? {
                return Ok(Some(r));
            }
            self.buf.reserve(64 << 10);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Whether a reply is already buffered (so printing need not flush yet).
    fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }
}

/// [`run_resp`] writing to `out`.
pub async fn run_resp_to<W: Write>(opts: &RespTailOptions, out: &mut W) -> anyhow::Result<()> {
    let tls =
        opts.tls.as_ref().map(crate::tls::RedisTlsConnector::new).transpose().context("--resp (TLS)")?;
    let stream = crate::tls::connect(&opts.connect, tls.as_ref())
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", opts.connect))?;
    let mut conn = RespConn { stream, buf: bytes::BytesMut::new() };
    if let Some(password) = &opts.password {
        let reply = match &opts.user {
            Some(user) => conn.call(&[b"AUTH", user.as_bytes(), password.as_bytes()]).await?,
            None => conn.call(&[b"AUTH", password.as_bytes()]).await?,
        };
        expect_ok(&reply, "AUTH")?;
    }
    let mut channels: Vec<Vec<u8>> = opts.channels.iter().map(|c| c.as_bytes().to_vec()).collect();
    if channels.is_empty() {
        match conn.call(&[b"PUBSUB", b"CHANNELS"]).await? {
            Reply::Array(Some(items)) => {
                for item in items {
                    if let Reply::Bulk(Some(name)) = item {
                        channels.push(name.to_vec());
                    }
                }
            }
            other => anyhow::bail!("PUBSUB CHANNELS: unexpected reply {other:?}"),
        }
        if channels.is_empty() {
            anyhow::bail!("no channel has subscribers yet; give --channel (Synapse's is its server name)");
        }
    }
    let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
    args.extend(channels.iter().map(Vec::as_slice));
    conn.send(&args).await?;
    for _ in &channels {
        match conn.next().await? {
            Some(Reply::Array(Some(items)))
                if items.first() == Some(&Reply::Bulk(Some("subscribe".into()))) => {}
            other => anyhow::bail!("SUBSCRIBE: unexpected reply {other:?}"),
        }
    }
    let mut decoder = opts.decode.then(RowDecoder::default);
    let mut rdata = 0u64;
    while let Some(reply) = conn.next().await? {
        let Some((_, payload)) = reply.as_message() else { continue };
        let rdata_head = payload.strip_prefix(b"RDATA ").and_then(split_rdata_1_13);
        match (&mut decoder, rdata_head) {
            (Some(d), Some((stream, instance, token, row))) => {
                out.write_all(d.decode_with_instance(stream, Some(instance), token, row))?;
            }
            _ => out.write_all(payload)?,
        }
        out.write_all(b"\n")?;
        if payload.starts_with(b"RDATA ") {
            rdata += 1;
            if opts.count.is_some_and(|n| rdata >= n) {
                break;
            }
        }
        if !conn.has_buffered() {
            out.flush()?;
        }
    }
    out.flush()?;
    Ok(())
}

fn expect_ok(reply: &Reply, what: &str) -> anyhow::Result<()> {
    match reply {
        Reply::Simple(s) if s[..] == *b"OK" => Ok(()),
        Reply::Error(e) => anyhow::bail!("{what}: {}", String::from_utf8_lossy(e)),
        other => anyhow::bail!("{what}: unexpected reply {other:?}"),
    }
}

/// `<stream> <instance> <token> <row>`, the RDATA form Synapse sends over Redis (1.13+).
fn split_rdata_1_13(args: &[u8]) -> Option<(&str, &str, Token, &[u8])> {
    let mut parts = args.splitn(4, |&b| b == b' ');
    let stream = std::str::from_utf8(parts.next()?).ok()?;
    let instance = std::str::from_utf8(parts.next()?).ok()?;
    let token = match parts.next()? {
        b"batch" => Token::Batch,
        t => Token::Value(std::str::from_utf8(t).ok()?.parse().ok()?),
    };
    Some((stream, instance, token, parts.next()?))
}

/// Sends our ERROR (if any) before reporting `e`.
async fn fail(client: Client, e: ClientError) -> anyhow::Result<()> {
    let _ = client.close().await;
    Err(e.into())
}

struct Printer {
    decoder: Option<RowDecoder>,
    /// The RDATA layout: learnt from the first POSITION, sniffed per line until then.
    form: RdataForm,
    rdata: u64,
    count: Option<u64>,
}

impl Printer {
    fn new(decode: bool, count: Option<u64>) -> Self {
        Self { decoder: decode.then(RowDecoder::default), form: RdataForm::Sniff, rdata: 0, count }
    }

    /// Prints one line; true once `count` RDATA were printed.
    fn print<W: Write>(&mut self, line: &Line, out: &mut W) -> io::Result<bool> {
        let word = line.command();
        if word == Some(CommandWord::Position) {
            if let Ok(p) = parse_any_position(line.args(), None) {
                if self.form == RdataForm::Sniff {
                    self.form = RdataForm::of(Some(p.generation));
                }
                if let Some(decoder) = &mut self.decoder {
                    out.write_all(decoder.position(&p))?;
                    out.write_all(b"\n")?;
                    return Ok(false);
                }
            }
        }
        if word != Some(CommandWord::Rdata) {
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
            return Ok(false);
        }
        match (&mut self.decoder, parse_any_rdata(line.args(), self.form)) {
            (Some(decoder), Ok(r)) => {
                let text = decoder.decode_with_instance(r.stream, r.instance, r.token, r.row);
                out.write_all(text)?;
                out.write_all(b"\n")?;
            }
            _ => {
                out.write_all(line.as_bytes())?;
                out.write_all(b"\n")?;
            }
        }
        self.rdata += 1;
        Ok(self.count.is_some_and(|n| self.rdata >= n))
    }
}

/// The parts of a parsed JSON value the mapping needs, for both parsers.
trait JsonView {
    fn items(&self) -> Option<&[Self]>
    where
        Self: Sized;
    fn string(&self) -> Option<&str>;
    fn write_to(&self, out: &mut Vec<u8>);
}

impl JsonView for BorrowedValue<'_> {
    fn items(&self) -> Option<&[Self]> {
        match self {
            BorrowedValue::Array(a) => Some(a.as_slice()),
            _ => None,
        }
    }
    fn string(&self) -> Option<&str> {
        match self {
            BorrowedValue::String(s) => Some(s),
            _ => None,
        }
    }
    fn write_to(&self, out: &mut Vec<u8>) {
        use simd_json::prelude::Writable as _;
        // Writing into a Vec cannot fail.
        let _ = self.write(out);
    }
}

impl JsonView for json::Value {
    fn items(&self) -> Option<&[Self]> {
        self.as_array()
    }
    fn string(&self) -> Option<&str> {
        self.as_str()
    }
    fn write_to(&self, out: &mut Vec<u8>) {
        json::encode(self, out);
    }
}

/// Decodes RDATA rows into named JSON objects, reusing its buffers.
#[derive(Default)]
pub(crate) struct RowDecoder {
    scratch: Vec<u8>,
    out: Vec<u8>,
}

impl RowDecoder {
    /// `{"stream":..,"token":..,"row":..}` for one RDATA row (see the module docs). A row
    /// that is not JSON at all is given as a string under `"invalid_row"`.
    #[cfg(test)]
    pub(crate) fn decode(&mut self, stream: &str, token: Token, row: &[u8]) -> &[u8] {
        self.decode_with_instance(stream, None, token, row)
    }

    /// [`Self::decode`] for an RDATA that names its writer (Synapse 1.13+): an `"instance"`
    /// member after the stream.
    pub(crate) fn decode_with_instance(
        &mut self,
        stream: &str,
        instance: Option<&str>,
        token: Token,
        row: &[u8],
    ) -> &[u8] {
        self.out.clear();
        self.out.extend_from_slice(b"{\"stream\":");
        json::write_str(&mut self.out, stream);
        if let Some(instance) = instance {
            self.out.extend_from_slice(b",\"instance\":");
            json::write_str(&mut self.out, instance);
        }
        self.out.extend_from_slice(b",\"token\":");
        match token {
            Token::Batch => self.out.extend_from_slice(b"\"batch\""),
            Token::Value(v) => json::write_i64(&mut self.out, v),
        }
        let id = StreamId::from_name(stream.as_bytes());
        self.scratch.clear();
        self.scratch.extend_from_slice(row);
        if let Ok(value) = simd_json::to_borrowed_value(&mut self.scratch) {
            self.out.extend_from_slice(b",\"row\":");
            write_row(id, &value, &mut self.out);
        } else if let Ok(value) = json::parse(row) {
            self.out.extend_from_slice(b",\"row\":");
            write_row(id, &value, &mut self.out);
        } else {
            self.out.extend_from_slice(b",\"invalid_row\":");
            json::write_str(&mut self.out, &String::from_utf8_lossy(row));
        }
        self.out.push(b'}');
        &self.out
    }
}

impl RowDecoder {
    /// `{"position":{"stream":..,"instance":..,"prev":..,"token":..}}` for a POSITION of any
    /// generation (`instance` and `prev` only where the line has them).
    pub(crate) fn position(&mut self, p: &AnyPosition<'_>) -> &[u8] {
        self.out.clear();
        self.out.extend_from_slice(b"{\"position\":{\"stream\":");
        json::write_str(&mut self.out, p.stream);
        if let Some(instance) = p.instance {
            self.out.extend_from_slice(b",\"instance\":");
            json::write_str(&mut self.out, instance);
        }
        if let Some(prev) = p.prev {
            self.out.extend_from_slice(b",\"prev\":");
            json::write_i64(&mut self.out, prev);
        }
        self.out.extend_from_slice(b",\"token\":");
        json::write_i64(&mut self.out, p.token);
        self.out.extend_from_slice(b"}}");
        &self.out
    }
}

/// The row as an object with named fields, or as it is if its shape is unexpected. The names
/// come from the row-shape table ([`shape::row_shape`]), chosen by field count only: a field
/// of an unexpected type is still named.
fn write_row<V: JsonView>(stream: Option<StreamId>, row: &V, out: &mut Vec<u8>) {
    let (Some(stream), Some(items)) = (stream, row.items()) else {
        row.write_to(out);
        return;
    };
    let kind_and_data = match items {
        [kind, data] => kind.string().map(|k| (k, data)),
        _ => None,
    };
    match shape::row_shape(stream) {
        RowShape::KindFields(kinds) => {
            let named = kind_and_data.and_then(|(kind, data)| {
                let data = data.items()?;
                let k = kinds.iter().find(|k| k.kind == kind)?;
                Some((kind, data, shape::layout_of_len(k.data, data.len())?))
            });
            let Some((kind, data, layout)) = named else {
                row.write_to(out);
                return;
            };
            out.extend_from_slice(b"{\"kind\":");
            json::write_str(out, kind);
            for (field, value) in layout.iter().zip(data) {
                out.push(b',');
                json::write_str(out, field.name);
                out.push(b':');
                value.write_to(out);
            }
            out.push(b'}');
        }
        RowShape::KindValue(_) => {
            // Every kind is named, known or not: the data is one value, printed whole.
            let Some((kind, data)) = kind_and_data else {
                row.write_to(out);
                return;
            };
            out.extend_from_slice(b"{\"kind\":");
            json::write_str(out, kind);
            out.extend_from_slice(b",\"data\":");
            data.write_to(out);
            out.push(b'}');
        }
        RowShape::Flat(layouts) => {
            let Some(layout) = shape::layout_of_len(layouts, items.len()) else {
                row.write_to(out);
                return;
            };
            out.push(b'{');
            for (i, (field, value)) in layout.iter().zip(items).enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json::write_str(out, field.name);
                out.push(b':');
                value.write_to(out);
            }
            out.push(b'}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::fields::parse_rdata;

    fn decode(stream: &str, token: Token, row: &str) -> serde_json::Value {
        let mut d = RowDecoder::default();
        let text = d.decode(stream, token, row.as_bytes()).to_vec();
        serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&text)))
    }

    fn row_of(stream: &str, row: &str) -> serde_json::Value {
        let v = decode(stream, Token::Value(1), row);
        assert_eq!(v["stream"], stream);
        v["row"].clone()
    }

    fn keys(v: &serde_json::Value) -> Vec<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    #[test]
    fn envelope() {
        let v = decode("events", Token::Value(5322), r#"["state", ["!r:hs", "m.room.name", "", null]]"#);
        assert_eq!(v["token"], 5322);
        let v = decode("events", Token::Batch, r#"["state", ["!r:hs", "m.room.name", "", null]]"#);
        assert_eq!(v["token"], "batch");
        assert_eq!(keys(&v), ["stream", "token", "row"]);
    }

    #[test]
    fn events_rows() {
        let r = row_of("events", r#"["ev", ["$e1:hs", "!r:hs", "m.room.name", "", null, null]]"#);
        assert_eq!(keys(&r), ["kind", "event_id", "room_id", "type", "state_key", "redacts", "relates_to"]);
        assert_eq!(
            (r["kind"].as_str(), r["event_id"].as_str(), r["state_key"].as_str()),
            (Some("ev"), Some("$e1:hs"), Some(""))
        );
        assert!(r["redacts"].is_null());
        let r = row_of("events", r#"["state", ["!r:hs", "m.room.name", "", "$e1:hs"]]"#);
        assert_eq!(keys(&r), ["kind", "room_id", "type", "state_key", "event_id"]);
        let r = row_of("events", r#"["ev", ["$e", "!r", "t", null, null, null, "join", false, true]]"#);
        assert_eq!(r["outlier"], true);
        assert_eq!(r["membership"], "join");
        // Wrong shape: the raw array.
        let r = row_of("events", r#"["ev", ["$e", "!r"]]"#);
        assert!(r.is_array());
        let r = row_of("events", r#"["nope", []]"#);
        assert!(r.is_array());
    }

    #[test]
    fn flat_rows_of_every_stream() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "backfill",
                r#"["$e", "!r", "m.room.message", null, null, null]"#,
                &["event_id", "room_id", "type", "state_key", "redacts", "relates_to"],
            ),
            (
                "presence",
                r#"["@a:hs", "online", 1, 2, 3, null, true]"#,
                &[
                    "user_id",
                    "state",
                    "last_active_ts",
                    "last_federation_update_ts",
                    "last_user_sync_ts",
                    "status_msg",
                    "currently_active",
                ],
            ),
            ("typing", r#"["!r", ["@a:hs"]]"#, &["room_id", "user_ids"]),
            (
                "receipts",
                r#"["!r", "m.read", "@a:hs", "$e", {"ts": 1}]"#,
                &["room_id", "receipt_type", "user_id", "event_id", "data"],
            ),
            ("push_rules", r#"["@a:hs"]"#, &["user_id"]),
            ("pushers", r#"["@a:hs", "m.http", "k", false]"#, &["user_id", "app_id", "pushkey", "deleted"]),
            (
                "caches",
                r#"["get_user_by_id", ["@a:hs"], 1583254801000]"#,
                &["cache_func", "keys", "invalidation_ts"],
            ),
            (
                "public_rooms",
                r#"["!r", true, null, null]"#,
                &["room_id", "visibility", "appservice_id", "network_id"],
            ),
            ("device_lists", r#"["@a:hs"]"#, &["entity"]),
            ("device_lists", r#"["@a:hs", "remote.org"]"#, &["user_id", "destination"]),
            ("to_device", r#"["remote.org"]"#, &["entity"]),
            (
                "tag_account_data",
                r#"["@a:hs", "!r", "{\"m.favourite\": {}}"]"#,
                &["user_id", "room_id", "data"],
            ),
            ("account_data", r#"["@a:hs", null, "m.direct"]"#, &["user_id", "room_id", "data_type"]),
            (
                "groups",
                r#"["+g:hs", "@a:hs", "membership", {"membership": "join"}]"#,
                &["group_id", "user_id", "type", "content"],
            ),
            ("user_signature", r#"["@a:hs"]"#, &["user_id"]),
        ];
        for (stream, row, names) in cases {
            let r = row_of(stream, row);
            assert_eq!(keys(&r), *names, "{stream}");
            let raw: serde_json::Value = serde_json::from_str(row).unwrap();
            for (i, n) in names.iter().enumerate() {
                assert_eq!(r[*n], raw[i], "{stream}.{n}");
            }
        }
        // Wrong field count: the raw array.
        assert!(row_of("pushers", r#"["@a:hs"]"#).is_array());
        assert!(row_of("caches", r#"{"a": 1}"#).is_object());
    }

    #[test]
    fn federation_rows() {
        let r = row_of(
            "federation",
            r#"["e", {"edu_type": "m.typing", "content": {}, "origin": "a", "destination": "b"}]"#,
        );
        assert_eq!(keys(&r), ["kind", "data"]);
        assert_eq!(r["kind"], "e");
        assert_eq!(r["data"]["edu_type"], "m.typing");
        assert!(row_of("federation", r#"[1, 2]"#).is_array());
    }

    #[test]
    fn fallbacks() {
        // Unknown stream: the row as it is.
        assert_eq!(row_of("nosuch", r#"[1, "x"]"#), serde_json::json!([1, "x"]));
        // simd-json refuses NaN and huge integers; replhub's parser takes them.
        let mut d = RowDecoder::default();
        let text = String::from_utf8(
            d.decode("caches", Token::Value(1), b"[\"f\", [123456789012345678901234567890], 5]").to_vec(),
        )
        .unwrap();
        assert!(text.contains("\"keys\":[123456789012345678901234567890]"), "{text}");
        let text = String::from_utf8(
            d.decode("presence", Token::Value(1), b"[\"@a\", \"online\", NaN, 1, 1, null, true]").to_vec(),
        )
        .unwrap();
        assert!(text.contains("\"last_active_ts\":NaN"), "{text}");
        // Not JSON at all.
        let v = decode("caches", Token::Value(1), "[\"f\", ");
        assert_eq!(v["invalid_row"], "[\"f\", ");
    }

    #[test]
    fn every_sample_row_decodes_to_named_fields() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/vectors/stream-sample.txt");
        let data = std::fs::read(path).expect("shared/vectors/stream-sample.txt beside the repo");
        let mut d = RowDecoder::default();
        let mut n = 0;
        for line in data.split(|&b| b == b'\n').filter(|l| l.starts_with(b"RDATA ")) {
            let r = parse_rdata(&line[6..]).unwrap();
            let text = d.decode(r.stream, r.token, r.row).to_vec();
            let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
            assert!(v["row"].is_object(), "{}", String::from_utf8_lossy(&text));
            n += 1;
        }
        assert_eq!(n, 3460);
    }

    /// Every line of a release's vector through the printer with `--decode`, as JSON values
    /// (or the raw text for lines that are not decoded).
    fn decoded(release: &str) -> Vec<Result<serde_json::Value, String>> {
        let text = crate::synthetic::generations::vector(release);
        let mut printer = Printer::new(true, None);
        let mut out = Vec::new();
        for l in text.lines() {
            printer.print(&Line::new(bytes::Bytes::copy_from_slice(l.as_bytes())), &mut out).unwrap();
        }
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).map_err(|_| l.to_owned()))
            .collect()
    }

    #[test]
    fn every_generation_decodes() {
        for (release, position, ev_fields) in [
            ("1.13.0", serde_json::json!({"stream": "events", "instance": "master", "token": 100}), 6),
            (
                "1.22.1",
                serde_json::json!({"stream": "events", "instance": "master", "prev": 100, "token": 100}),
                6,
            ),
            (
                "1.66.0",
                serde_json::json!({"stream": "events", "instance": "master", "prev": 100, "token": 100}),
                9,
            ),
        ] {
            let lines = decoded(release);
            // SERVER and PING stay as they came.
            assert!(lines[0].as_ref().is_err_and(|l| l == "SERVER example.com"), "{release}");
            assert_eq!(lines[2].as_ref().ok().map(|v| &v["position"]), Some(&position), "{release}");
            let mut rdata = 0;
            for v in lines.iter().filter_map(|l| l.as_ref().ok()).filter(|v| v.get("row").is_some()) {
                assert_eq!(v["instance"], "master", "{release}: {v}");
                assert!(v["row"].is_object(), "{release}: every row named: {v}");
                let row = v["row"].as_object().unwrap();
                if v["stream"] == "events" && row["kind"] == "ev" {
                    assert_eq!(row.len(), 1 + ev_fields, "{release}: {v}");
                }
                if v["stream"] == "presence_federation" {
                    assert_eq!(row.keys().collect::<Vec<_>>(), ["destination", "user_id"]);
                }
                rdata += 1;
            }
            assert!(rdata > 100, "{release}: {rdata}");
        }
        let r66 = decoded("1.66.0");
        let ev = r66.iter().filter_map(|l| l.as_ref().ok()).find(|v| v["row"]["kind"] == "ev").unwrap();
        assert_eq!(
            (&ev["row"]["membership"], &ev["row"]["rejected"], &ev["row"]["outlier"]),
            (&serde_json::Value::Null, &serde_json::json!(false), &serde_json::json!(false))
        );
    }

    #[test]
    fn the_seed_form_still_decodes_after_sniffing() {
        let mut printer = Printer::new(true, None);
        let mut out = Vec::new();
        for l in ["RDATA device_lists 7 [\"@a:hs\", \"remote.org\"]", "POSITION typing 3"] {
            printer.print(&Line::new(bytes::Bytes::copy_from_slice(l.as_bytes())), &mut out).unwrap();
        }
        let text = String::from_utf8(out).unwrap();
        let v: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(v[0]["row"], serde_json::json!({"user_id": "@a:hs", "destination": "remote.org"}));
        assert!(v[0].get("instance").is_none());
        assert_eq!(v[1], serde_json::json!({"position": {"stream": "typing", "token": 3}}));
    }
}
