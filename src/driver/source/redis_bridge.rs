//! `--upstream-redis`: the source thread as a bridge between Redis mode and a real Redis.
//!
//! Two connections to the real Redis, as Synapse opens them: one SUBSCRIBEd once to the
//! Synapse channels (`<server name>` and `<server name>/USER_IP`), one for PUBLISH. Every
//! `message` the subscription brings is already the frame replhub's subscribers receive
//! (`*3 $7 message $<n> <channel> $<m> <payload>`, byte for byte), so each read becomes one
//! batch over the read buffer itself, indexed by channel id, and goes to every core like a
//! master's batch (same back-pressure). Local clients' PUBLISHes on those channels arrive here
//! as ready-made PUBLISH commands ([`UpstreamCmd::RedisPublish`]) and are written to the
//! publishing connection; they come back through the subscription like everyone else's, so
//! every subscriber, local or on the real Redis, gets each message once and in the order the
//! real Redis saw them. Messages published locally while the link is down are dropped (and
//! counted in the log), as Redis drops messages nobody is subscribed to.
use std::collections::HashMap;

use bytes::BytesMut;

use super::*;
use crate::config::RedisUpstream;
use crate::hub::{Batch, LineMeta};
use crate::resp::reply::{take_reply, Reply};
use crate::resp::RespState;

/// The commands side of the bridge, for [`Source::drain`]: PUBLISHes queued for the real
/// Redis while connected, dropped (counted) otherwise.
#[derive(Default)]
struct Bridge {
    connected: bool,
    out: VecDeque<Bytes>,
    /// Local PUBLISHes dropped while the link was down, over the life of the process.
    dropped: u64,
    /// Subscriptions on the real Redis that completed, over the life of the process.
    connects: u64,
    /// While down, since when (monotonic ms): the start, or when the last subscription went.
    down_since_ms: u64,
}

impl Upstream for Bridge {
    fn command(&mut self, _core: usize, cmd: UpstreamCmd, _now: Now) {
        if let UpstreamCmd::RedisPublish(bytes) = cmd {
            if self.connected {
                self.out.push_back(bytes);
            } else {
                self.dropped += 1;
            }
        }
    }
    fn snapshot(&self) -> UpstreamSnapshot {
        // The gap is visible in /metrics as for a master: `replhub_upstream_connected`,
        // `replhub_upstream_reconnects_total`, and (`/healthz`) the downtime; the local
        // PUBLISHes it cost are `replhub_upstream_forwards_dropped_total`.
        UpstreamSnapshot {
            mode: "redis",
            connected: self.connected,
            down_since_ms: (!self.connected).then_some(self.down_since_ms),
            reconnects: self.connects.saturating_sub(1),
            forwards_dropped: self.dropped,
            ..UpstreamSnapshot::default()
        }
    }
}

/// `PUBLISH <server name> REPLICATE`: what a Synapse process publishes when its Redis
/// connection (re)starts, which every other process answers with its POSITIONs.
fn replicate_command(channel: &str) -> Bytes {
    let mut b = BytesMut::new();
    crate::resp::codec::put_command(&mut b, &[b"PUBLISH", channel.as_bytes(), b"REPLICATE"]);
    b.freeze()
}

/// The channel of a pub/sub `message` frame (`*3\r\n$7\r\nmessage\r\n$<n>\r\n<channel>\r\n...`).
fn message_channel(frame: &[u8]) -> Option<&[u8]> {
    let rest = frame.strip_prefix(b"*3\r\n$7\r\nmessage\r\n$")?;
    let cr = memchr::memchr(b'\r', rest)?;
    let n: usize = std::str::from_utf8(&rest[..cr]).ok()?.parse().ok()?;
    rest.get(cr + 2..cr + 2 + n)
}

/// Sends a command and reads its reply on a connection still in the request/reply phase.
async fn call(stream: &mut TcpStream, buf: &mut BytesMut, args: &[&[u8]]) -> Result<Reply, String> {
    use tokio::io::AsyncReadExt as _;
    let mut b = BytesMut::new();
    crate::resp::codec::put_command(&mut b, args);
    stream.write_all(&b).await.map_err(|e| format!("write failed: {e}"))?;
    loop {
        if let Some(r) = take_reply(buf).map_err(|e| e.to_string())? {
            return Ok(r);
        }
        if stream.read_buf(buf).await.map_err(|e| format!("read failed: {e}"))? == 0 {
            return Err("closed by the redis server".to_owned());
        }
    }
}

/// Dials and authenticates one connection.
async fn dial(cfg: &RedisUpstream, buf: &mut BytesMut) -> Result<TcpStream, String> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(cfg.addr.as_str()))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    if let Some(password) = &cfg.password {
        let reply = match &cfg.user {
            Some(user) => call(&mut stream, buf, &[b"AUTH", user.as_bytes(), password.as_bytes()]).await?,
            None => call(&mut stream, buf, &[b"AUTH", password.as_bytes()]).await?,
        };
        if !matches!(&reply, Reply::Simple(s) if s[..] == *b"OK") {
            return Err(format!("AUTH refused: {reply:?}"));
        }
    }
    Ok(stream)
}

impl Source {
    /// Runs the bridge until stopped, reconnecting with backoff.
    pub(super) async fn run_redis(&mut self, cfg: &RedisUpstream) {
        let Some(state) = self.ctx.resp.clone() else {
            tracing::error!("--upstream-redis without Redis mode; nothing to bridge");
            return self.run_broker().await;
        };
        let mut bridge = Bridge { down_since_ms: self.ctx.clock.now().mono_ms, ..Bridge::default() };
        let seed = u64::from(std::process::id()) ^ self.ctx.clock.now().wall_ms.unsigned_abs();
        let mut backoff = Backoff::new(self.ctx.backoff.clone(), seed);
        let mut ids: HashMap<Bytes, u32> = HashMap::new();
        loop {
            self.drain(&mut bridge);
            if self.stopping() {
                return;
            }
            match self.redis_session(cfg, &state, &mut bridge, &mut ids, &mut backoff).await {
                ConnEnd::Stop => return,
                ConnEnd::Lost(why) => {
                    tracing::warn!(redis = cfg.addr, error = %why, dropped = bridge.dropped, "redis upstream lost");
                }
                ConnEnd::Closed(_) => {}
            }
            if bridge.connected {
                bridge.down_since_ms = self.ctx.clock.now().mono_ms;
            }
            bridge.connected = false;
            bridge.out.clear();
            let until = self.ctx.clock.now().mono_ms + backoff.next_delay_ms();
            while self.ctx.clock.now().mono_ms < until {
                if !self.idle_until(&mut bridge, Some(until)).await {
                    return;
                }
            }
        }
    }

    /// One connected period: returns why it ended.
    async fn redis_session(
        &mut self,
        cfg: &RedisUpstream,
        state: &RespState,
        bridge: &mut Bridge,
        ids: &mut HashMap<Bytes, u32>,
        backoff: &mut Backoff,
    ) -> ConnEnd {
        let mut pbuf = BytesMut::new();
        let mut sbuf = BytesMut::new();
        let publ = match dial(cfg, &mut pbuf).await {
            Ok(s) => s,
            Err(e) => return ConnEnd::Lost(e),
        };
        let mut sub = match dial(cfg, &mut sbuf).await {
            Ok(s) => s,
            Err(e) => return ConnEnd::Lost(e),
        };
        let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
        args.extend(cfg.channels.iter().map(String::as_bytes));
        let mut b = BytesMut::new();
        crate::resp::codec::put_command(&mut b, &args);
        if let Err(e) = sub.write_all(&b).await {
            return ConnEnd::Lost(format!("write failed: {e}"));
        }
        if bridge.connects == 0 {
            tracing::info!(redis = cfg.addr, channels = ?cfg.channels, "subscribed on the redis upstream");
        } else {
            // What was published during the gap is lost on both sides (pub/sub keeps nothing).
            // Synapse repairs such a gap itself when its own Redis connection comes back: it
            // publishes REPLICATE, every process answers with POSITION, and whoever is behind
            // fetches the missing rows over HTTP. Its connection to replhub never broke, so
            // replhub does the same on its behalf.
            let down_ms = self.ctx.clock.now().mono_ms.saturating_sub(bridge.down_since_ms);
            tracing::warn!(
                redis = cfg.addr, down_ms, dropped = bridge.dropped,
                "resubscribed on the redis upstream after a gap; publishing REPLICATE so that Synapse catches up"
            );
        }
        // Sent once the subscription is confirmed, so that replhub's own clients get it too.
        let mut replicate =
            cfg.channels.first().filter(|_| bridge.connects > 0).map(|c| replicate_command(c));
        backoff.reset();
        bridge.connects += 1;
        bridge.connected = true;
        let mut out_off = 0usize;
        loop {
            if !bridge.out.is_empty() {
                if let Err(e) = write_some(&publ, &mut bridge.out, &mut out_off) {
                    return ConnEnd::Lost(format!("write failed: {e}"));
                }
            }
            let retry = self.queued().then(|| tokio::time::Instant::now() + HOLD_RETRY);
            tokio::select! {
                biased;
                () = self.ctx.wakeup.notified() => {
                    self.drain(bridge);
                    if self.stopping() {
                        return ConnEnd::Stop;
                    }
                }
                res = publ.writable(), if !bridge.out.is_empty() => {
                    if let Err(e) = res {
                        return ConnEnd::Lost(format!("write failed: {e}"));
                    }
                }
                res = publ.readable() => match res.and_then(|()| { pbuf.reserve(4096); publ.try_read_buf(&mut pbuf) }) {
                    Ok(0) => return ConnEnd::Lost("closed by the redis server".to_owned()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Ok(_) => loop {
                        match take_reply(&mut pbuf) {
                            Ok(Some(Reply::Error(e))) => {
                                tracing::warn!(error = %String::from_utf8_lossy(&e), "the redis upstream refused a PUBLISH");
                            }
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(e) => return ConnEnd::Lost(e.to_string()),
                        }
                    },
                    Err(e) => return ConnEnd::Lost(format!("read failed: {e}")),
                },
                res = sub.readable() => match res.and_then(|()| { sbuf.reserve(READ_RESERVE); sub.try_read_buf(&mut sbuf) }) {
                    Ok(0) => return ConnEnd::Lost("closed by the redis server".to_owned()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Ok(_) => {
                        // Any reply on this connection follows the whole SUBSCRIBE's effect.
                        if let Some(cmd) = replicate.take() {
                            bridge.out.push_back(cmd);
                        }
                        match index_messages(&mut sbuf, state, ids) {
                            Ok(Some(batch)) => {
                                let batch = Arc::new(batch);
                                self.batches += 1;
                                if !self.broadcast(bridge, || CoreMsg::Batch(Arc::clone(&batch))).await {
                                    return ConnEnd::Stop;
                                }
                            }
                            Ok(None) => {}
                            Err(e) => return ConnEnd::Lost(e),
                        }
                    }
                    Err(e) => return ConnEnd::Lost(format!("read failed: {e}")),
                },
                () = sleep_opt(retry) => self.flush(),
            }
        }
    }
}

/// Takes the complete replies off the front of `buf` as one batch over those bytes, with a
/// line per `message` (the other replies, subscription confirmations, are left unindexed).
fn index_messages(
    buf: &mut BytesMut,
    state: &RespState,
    ids: &mut HashMap<Bytes, u32>,
) -> Result<Option<Batch>, String> {
    let mut at = 0;
    let mut metas = Vec::new();
    while let Some(len) = crate::resp::reply::measure(&buf[at..]).map_err(|e| e.to_string())? {
        let frame = &buf[at..at + len];
        if let Some(channel) = message_channel(frame) {
            let id = match ids.get(channel) {
                Some(&id) => Some(id),
                None => {
                    let name = Bytes::copy_from_slice(channel);
                    let id = state.channels.get(&name, true).map(|c| c.id());
                    if let Some(id) = id {
                        ids.insert(name, id);
                    }
                    id
                }
            };
            if let (Some(id), Ok(start), Ok(end)) = (id, u32::try_from(at), u32::try_from(at + len)) {
                metas.push(LineMeta::pubsub(start, end, id));
            }
        }
        at += len;
    }
    if at == 0 {
        return Ok(None);
    }
    let data = buf.split_to(at).freeze();
    Ok((!metas.is_empty()).then(|| Batch::new(data, metas)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_of_messages_is_one_batch_over_its_own_bytes() {
        let state = RespState::new(&crate::resp::RespConfig::default());
        let mut ids = HashMap::new();
        let wire = b"*3\r\n$9\r\nsubscribe\r\n$2\r\nsn\r\n:1\r\n*3\r\n$7\r\nmessage\r\n$2\r\nsn\r\n$4\r\nPING\r\n*3\r\n$7\r\nmessage\r\n$2\r\nsn\r\n$1";
        let mut buf = BytesMut::from(&wire[..]);
        let batch = index_messages(&mut buf, &state, &mut ids).expect("valid").expect("one message");
        assert_eq!(batch.lines().len(), 1);
        assert_eq!(batch.line(0), b"*3\r\n$7\r\nmessage\r\n$2\r\nsn\r\n$4\r\nPING\r\n");
        assert_eq!(&buf[..], b"*3\r\n$7\r\nmessage\r\n$2\r\nsn\r\n$1", "the incomplete reply waits");
        assert_eq!(message_channel(b"*3\r\n$7\r\nmessage\r\n$5\r\nsn/IP\r\n$0\r\n\r\n"), Some(&b"sn/IP"[..]));
    }
}
