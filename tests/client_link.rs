//! The client library against a tiny in-test master on a real loopback socket.
use std::time::Duration;

use bytes::Bytes;
use replhub::client::{Client, ClientError, ClientOptions, Event};
use replhub::proto::fields::parse_rdata;
use replhub::proto::{Command, CommandWord, PeerError, SyncState, Token, UserSync};
use replhub::session::SessionConfig;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpListener;

/// A failure guard only: every test finishes in milliseconds when things work.
const GUARD: Duration = Duration::from_secs(20);

fn sample() -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/vectors/stream-sample.txt");
    std::fs::read(path).expect("shared/vectors/stream-sample.txt beside the repo")
}

/// The in-test master's side of one connection.
struct Master {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
}

impl Master {
    async fn accept(listener: &TcpListener) -> Self {
        let (sock, _) = listener.accept().await.unwrap();
        let (rd, wr) = sock.into_split();
        Self { rd: BufReader::new(rd), wr }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.wr.write_all(bytes).await.unwrap();
    }

    /// The next line the client sent (with its `\n`), or `None` at EOF.
    async fn line(&mut self) -> Option<String> {
        let mut s = String::new();
        let n = tokio::time::timeout(GUARD, self.rd.read_line(&mut s)).await.expect("guard").unwrap();
        (n > 0).then_some(s)
    }

    /// Everything the client sends until it closes.
    async fn rest(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(l) = self.line().await {
            out.push(l);
        }
        out
    }
}

async fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

fn options(name: &str) -> ClientOptions {
    ClientOptions { name: name.into(), ..ClientOptions::default() }
}

async fn next(client: &mut Client) -> Result<Option<Event>, ClientError> {
    tokio::time::timeout(GUARD, client.next()).await.expect("guard")
}

#[tokio::test]
async fn handshake_events_and_byte_identical_rows() {
    let (l, addr) = listener().await;
    let data = sample();
    let lines: Vec<&[u8]> = data.split_inclusive(|&b| b == b'\n').collect();
    let head: Vec<u8> = lines[..200].concat();
    let connect = Client::connect(addr.as_str(), options("test-worker"));
    let (client, mut master) = tokio::join!(connect, Master::accept(&l));
    let mut client = client.unwrap();
    assert_eq!(client.local_addr().unwrap(), master.wr.peer_addr().unwrap());

    // What the client sent, exactly.
    assert_eq!(master.line().await.unwrap(), "NAME test-worker\n");
    let ping = master.line().await.unwrap();
    assert!(
        ping.starts_with("PING ") && ping[5..ping.len() - 1].bytes().all(|b| b.is_ascii_digit()),
        "{ping:?}"
    );
    assert_eq!(master.line().await.unwrap(), "REPLICATE ALL\n");

    master.write(&head).await;
    assert_eq!(next(&mut client).await.unwrap(), Some(Event::Server("example.com".into())));
    assert_eq!(client.server_name(), Some("example.com"));
    assert!(matches!(next(&mut client).await.unwrap(), Some(Event::Ping(p)) if p == "1795803865043"));
    assert_eq!(
        next(&mut client).await.unwrap(),
        Some(Event::Position { stream: "events".into(), token: 100 })
    );
    for _ in 0..15 {
        assert!(matches!(next(&mut client).await.unwrap(), Some(Event::Position { .. })));
    }
    for want in &lines[18..200] {
        let Some(Event::Rdata { stream, token, row }) = next(&mut client).await.unwrap() else {
            panic!("expected RDATA for {}", String::from_utf8_lossy(want));
        };
        let rebuilt = match token {
            Token::Batch => format!("RDATA {stream} batch "),
            Token::Value(t) => format!("RDATA {stream} {t} "),
        };
        let mut got = rebuilt.into_bytes();
        got.extend_from_slice(&row);
        got.push(b'\n');
        assert_eq!(got, *want);
    }

    // The raw path, and the server closing.
    master.write(b"REMOTE_SERVER_UP other.org\nRDATA caches 251 [\"f\", null, 1]\nSYNC s1\n").await;
    let line = tokio::time::timeout(GUARD, client.next_raw()).await.unwrap().unwrap().unwrap();
    assert_eq!(
        (line.command(), line.as_bytes()),
        (Some(CommandWord::RemoteServerUp), &b"REMOTE_SERVER_UP other.org"[..])
    );
    let line = tokio::time::timeout(GUARD, client.next_raw()).await.unwrap().unwrap().unwrap();
    assert_eq!(parse_rdata(line.args()).unwrap().token, Token::Value(251));
    assert_eq!(next(&mut client).await.unwrap(), Some(Event::Sync("s1".into())));

    // Commands from the caller reach the master verbatim.
    client
        .send(Command::UserSync(UserSync { user_id: "@a:hs", state: SyncState::Start, last_sync_ms: 17 }))
        .await
        .unwrap();
    assert_eq!(master.line().await.unwrap(), "USER_SYNC @a:hs start 17\n");
    let err = client.send(Command::Ping("a\nb")).await.unwrap_err();
    assert!(matches!(err, ClientError::Encode(_)), "{err}");

    master.write(b"ERROR server shutting down\n").await;
    drop(master);
    assert_eq!(next(&mut client).await.unwrap(), Some(Event::Error("server shutting down".into())));
    assert_eq!(next(&mut client).await.unwrap(), None);
    assert_eq!(next(&mut client).await.unwrap(), None);
}

#[tokio::test]
async fn rows_are_split_across_reads_and_subscriptions_are_sent() {
    let (l, addr) = listener().await;
    let opts =
        ClientOptions { streams: vec!["events".into(), "caches".into()], read_buffer: 1024, ..options("w2") };
    let (client, mut master) = tokio::join!(Client::connect(addr.as_str(), opts), Master::accept(&l));
    let mut client = client.unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(master.line().await.unwrap());
    }
    assert_eq!(got[0], "NAME w2\n");
    assert_eq!(&got[2..], ["REPLICATE events\n", "REPLICATE caches\n"]);
    // One RDATA written a byte at a time.
    let line = b"RDATA events 5 [\"ev\", [\"$e\", \"!r\", \"m.room.message\", null, null, null]]\n";
    let writer = async {
        for b in line {
            master.write(&[*b]).await;
            tokio::task::yield_now().await;
        }
        master
    };
    let (ev, _master) = tokio::join!(next(&mut client), writer);
    let Some(Event::Rdata { row, .. }) = ev.unwrap() else { panic!() };
    assert_eq!(row, Bytes::from_static(&line[15..line.len() - 1]));
}

#[tokio::test]
async fn wrong_server_name_sends_error_wrong_remote() {
    let (l, addr) = listener().await;
    let opts = ClientOptions { expected_server_name: Some("example.org".into()), ..options("w") };
    let (client, mut master) = tokio::join!(Client::connect(addr.as_str(), opts), Master::accept(&l));
    let mut client = client.unwrap();
    master.write(b"SERVER example.com\nPING 1\nPOSITION events 1\n").await;
    let err = next(&mut client).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::WrongRemote { expected, got } if expected == "example.org" && got == "example.com"),
        "{err}"
    );
    // Nothing more is read; the next call reports the closed session.
    let again = next(&mut client).await.unwrap_err();
    assert!(matches!(again, ClientError::Protocol(PeerError::WrongRemote)), "{again}");
    drop(client);
    let sent = master.rest().await;
    assert_eq!(sent.len(), 4, "{sent:?}");
    assert_eq!(sent[3], "ERROR Wrong remote\n");
}

#[tokio::test]
async fn right_server_name_is_accepted() {
    let (l, addr) = listener().await;
    let opts = ClientOptions { expected_server_name: Some("example.com".into()), ..options("w") };
    let (client, mut master) = tokio::join!(Client::connect(addr.as_str(), opts), Master::accept(&l));
    let mut client = client.unwrap();
    master.write(b"SERVER example.com\n").await;
    assert_eq!(next(&mut client).await.unwrap(), Some(Event::Server("example.com".into())));
}

#[tokio::test]
async fn wrong_direction_lines_are_refused() {
    let (l, addr) = listener().await;
    let (client, mut master) = tokio::join!(Client::connect(addr.as_str(), options("w")), Master::accept(&l));
    let mut client = client.unwrap();
    master.write(b"SERVER hs\nNAME x\nPING 1\n").await;
    assert_eq!(next(&mut client).await.unwrap(), Some(Event::Server("hs".into())));
    let err = next(&mut client).await.unwrap_err();
    assert!(matches!(&err, ClientError::Protocol(PeerError::InvalidCommand(w)) if w == "NAME"), "{err}");
    drop(client);
    let sent = master.rest().await;
    assert_eq!(sent.last().map(String::as_str), Some("ERROR invalid command: NAME\n"));
}

fn fast_session() -> SessionConfig {
    SessionConfig {
        ping_interval_ms: 40,
        ping_timeout_ms: 200,
        close_timeout_ms: 200,
        ..SessionConfig::default()
    }
}

#[tokio::test]
async fn keepalive_pings_while_the_caller_waits() {
    let (l, addr) = listener().await;
    let opts = ClientOptions { session: fast_session(), ..options("w") };
    let (client, mut master) = tokio::join!(Client::connect(addr.as_str(), opts), Master::accept(&l));
    let mut client = client.unwrap();
    // The caller waits in next(); the master stays silent (and never pings, so no timeout).
    let waiting = tokio::spawn(async move {
        let r = client.next().await;
        (client, r)
    });
    for _ in 0..3 {
        master.line().await.unwrap();
    }
    for _ in 0..3 {
        let l = master.line().await.unwrap();
        assert!(l.starts_with("PING "), "{l:?}");
    }
    master.write(b"SERVER hs\n").await;
    let (_client, r) = tokio::time::timeout(GUARD, waiting).await.unwrap().unwrap();
    assert_eq!(r.unwrap(), Some(Event::Server("hs".into())));
}

#[tokio::test]
async fn silent_pinging_server_times_out() {
    let (l, addr) = listener().await;
    let opts = ClientOptions { session: fast_session(), ..options("w") };
    let (client, mut master) = tokio::join!(Client::connect(addr.as_str(), opts), Master::accept(&l));
    let mut client = client.unwrap();
    master.write(b"SERVER hs\nPING 1\n").await;
    assert_eq!(next(&mut client).await.unwrap(), Some(Event::Server("hs".into())));
    assert!(matches!(next(&mut client).await.unwrap(), Some(Event::Ping(_))));
    let err = next(&mut client).await.unwrap_err();
    assert!(matches!(err, ClientError::Protocol(PeerError::PingTimeout)), "{err}");
    drop(client);
    let sent = master.rest().await;
    assert_eq!(sent.last().map(String::as_str), Some("ERROR ping timeout\n"));
}

#[tokio::test]
async fn no_keepalive_when_disabled() {
    let (l, addr) = listener().await;
    let opts = ClientOptions { session: fast_session(), ping: false, ..options("w") };
    let (client, mut master) = tokio::join!(Client::connect(addr.as_str(), opts), Master::accept(&l));
    let mut client = client.unwrap();
    master.write(b"SERVER hs\nPING 1\n").await;
    assert_eq!(next(&mut client).await.unwrap(), Some(Event::Server("hs".into())));
    assert!(matches!(next(&mut client).await.unwrap(), Some(Event::Ping(_))));
    // Ten ping intervals of silence (the period under test, not a synchronisation): the
    // caller's wait neither PINGs nor times out.
    let waited = tokio::time::timeout(Duration::from_millis(400), client.next()).await;
    assert!(waited.is_err(), "{waited:?}");
    drop(client);
    let sent = master.rest().await;
    assert_eq!(sent.len(), 3, "only NAME, PING, REPLICATE: {sent:?}");
}

#[tokio::test]
async fn connect_refused_is_an_io_error() {
    let (l, addr) = listener().await;
    drop(l);
    let err = Client::connect(addr.as_str(), options("w")).await.err().unwrap();
    assert!(matches!(err, ClientError::Io(_)), "{err}");
    let err = Client::connect(addr.as_str(), options("bad\nname")).await.err().unwrap();
    assert!(matches!(err, ClientError::Encode(_)), "{err}");
}

#[tokio::test]
async fn tail_prints_lines_as_they_came() {
    let (l, addr) = listener().await;
    let data = sample();
    let lines: Vec<&[u8]> = data.split_inclusive(|&b| b == b'\n').collect();
    let opts = replhub::tail::TailOptions { connect: addr, count: Some(30), ..Default::default() };
    let mut out = Vec::new();
    let tail = replhub::tail::run_to(&opts, &mut out);
    let master = async {
        let mut m = Master::accept(&l).await;
        m.write(&lines[..100].concat()).await;
        m
    };
    let (r, mut master) = tokio::join!(tail, master);
    r.unwrap();
    // SERVER, PING, 16 POSITION, then 30 RDATA.
    assert_eq!(out, lines[..48].concat());
    let sent = master.rest().await;
    assert_eq!(sent[0], "NAME replhub-tail\n");
    assert_eq!(sent[2], "REPLICATE ALL\n");
}

#[tokio::test]
async fn tail_decodes_rows() {
    let (l, addr) = listener().await;
    let opts = replhub::tail::TailOptions {
        connect: addr,
        stream: "events".into(),
        decode: true,
        ..Default::default()
    };
    let mut out = Vec::new();
    let tail = replhub::tail::run_to(&opts, &mut out);
    let master = async {
        let mut m = Master::accept(&l).await;
        m.write(b"SERVER hs\nPOSITION events 4\nRDATA events batch [\"ev\", [\"$e\", \"!r\", \"m.room.name\", \"\", null, null]]\nRDATA events 5 [\"state\", [\"!r\", \"m.room.name\", \"\", \"$e\"]]\n").await;
        m.wr.shutdown().await.unwrap();
        m
    };
    let (r, mut master) = tokio::join!(tail, master);
    r.unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "SERVER hs\n{\"position\":{\"stream\":\"events\",\"token\":4}}\n\
         {\"stream\":\"events\",\"token\":\"batch\",\"row\":{\"kind\":\"ev\",\"event_id\":\"$e\",\"room_id\":\"!r\",\"type\":\"m.room.name\",\"state_key\":\"\",\"redacts\":null,\"relates_to\":null}}\n\
         {\"stream\":\"events\",\"token\":5,\"row\":{\"kind\":\"state\",\"room_id\":\"!r\",\"type\":\"m.room.name\",\"state_key\":\"\",\"event_id\":\"$e\"}}\n"
    );
    assert_eq!(master.line().await.unwrap(), "NAME replhub-tail\n");
}
