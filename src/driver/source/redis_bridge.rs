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
//!
//! TCP workers (`--listen`) behind the bridge are served as a Synapse process on that Redis
//! is (README, "TCP workers behind a shared Redis"): once one has sent REPLICATE
//! ([`UpstreamCmd::RedisReplicate`]), each read's messages on the server's channel also become
//! a second batch of TCP lines ([`TcpLines`]); their REPLICATEs are published there, paced
//! ([`ReplicatePacer`]), so that the writers answer with their POSITIONs; their commands
//! ([`UpstreamCmd::Forward`]) are published as Synapse publishes them (`USER_IP` on
//! `<server name>/USER_IP`, the rest on `<server name>`), queued while the link is down
//! (bounded, as Synapse's Redis client queues them).
use std::collections::HashMap;

use bytes::BytesMut;
use tokio::io::AsyncReadExt as _;

use super::*;
use crate::config::RedisUpstream;
use crate::hub::{Batch, LineMeta};
use crate::proto::Generation;
use crate::resp::reply::{take_reply, Reply};
use crate::resp::RespState;
use crate::tls::{write_out, RedisStream, RedisTlsConnector};
use crate::upstream::redis_lines::{ReplicatePacer, TcpLines};

/// The commands side of the bridge, for [`Source::drain`]: PUBLISHes queued for the real
/// Redis while connected; local clients' dropped (counted) otherwise, TCP workers' kept for
/// the next connection up to [`MAX_FORWARD_QUEUE`].
struct Bridge {
    connected: bool,
    /// The subscription is confirmed on the current connection: a REPLICATE published now
    /// reaches replhub's own subscribers too.
    subscribed: bool,
    out: VecDeque<Bytes>,
    /// TCP workers' commands waiting for the link, as PUBLISH commands.
    waiting: VecDeque<Bytes>,
    /// PUBLISHes dropped while the link was down (local clients'), or because `waiting` was
    /// full (TCP workers'), over the life of the process.
    dropped: u64,
    /// Worker commands published.
    forwarded: u64,
    /// Subscriptions on the real Redis that completed, over the life of the process.
    connects: u64,
    /// While down, since when (monotonic ms): the start, or when the last subscription went.
    down_since_ms: u64,
    /// `<server name>` and `<server name>/USER_IP`.
    channel: String,
    user_ip_channel: String,
    /// TCP lines, built once a TCP worker has sent REPLICATE (until then no TCP worker
    /// takes any, and pure Redis-mode deployments pay nothing for them).
    tcp: Option<TcpLines>,
    generation: Generation,
    pacer: ReplicatePacer,
}

impl Bridge {
    fn new(cfg: &RedisUpstream, generation: Generation, now: Now) -> Self {
        let channel = cfg.channels.first().cloned().unwrap_or_default();
        let user_ip_channel = cfg.channels.get(1).cloned().unwrap_or_else(|| format!("{channel}/USER_IP"));
        Self {
            connected: false,
            subscribed: false,
            out: VecDeque::new(),
            waiting: VecDeque::new(),
            dropped: 0,
            forwarded: 0,
            connects: 0,
            down_since_ms: now.mono_ms,
            channel,
            user_ip_channel,
            tcp: None,
            generation,
            pacer: ReplicatePacer::default(),
        }
    }

    /// Publishes `REPLICATE ` if one is due for the TCP workers (or `force`d, on a reconnect),
    /// once the subscription is in place.
    fn replicate_if_due(&mut self, force: bool, now_ms: u64) {
        if !self.subscribed {
            return;
        }
        if force {
            self.pacer.sent(now_ms);
        } else if !self.pacer.poll(now_ms) {
            return;
        }
        self.out.push_back(replicate_command(&self.channel));
    }
}

impl Upstream for Bridge {
    fn command(&mut self, _core: usize, cmd: UpstreamCmd, now: Now) {
        match cmd {
            UpstreamCmd::RedisPublish(bytes) => {
                if self.connected {
                    self.out.push_back(bytes);
                } else {
                    self.dropped += 1;
                }
            }
            UpstreamCmd::Forward(line) => {
                let payload = line.strip_suffix(b"\n").unwrap_or(&line);
                let channel =
                    if payload.starts_with(b"USER_IP ") { &self.user_ip_channel } else { &self.channel };
                let mut b = BytesMut::new();
                crate::resp::codec::put_command(&mut b, &[b"PUBLISH", channel.as_bytes(), payload]);
                self.forwarded += 1;
                // Once subscribed, so that replhub's own subscribers get the echo too.
                if self.subscribed {
                    self.out.push_back(b.freeze());
                } else {
                    if self.waiting.len() >= MAX_FORWARD_QUEUE {
                        self.waiting.pop_front();
                        self.dropped += 1;
                    }
                    self.waiting.push_back(b.freeze());
                }
            }
            UpstreamCmd::RedisReplicate => {
                if self.tcp.is_none() {
                    tracing::info!(
                        "a TCP worker replicates: relaying the redis channel's commands to TCP workers"
                    );
                    self.tcp = Some(TcpLines::new(self.generation));
                }
                self.pacer.request(now.mono_ms);
                self.replicate_if_due(false, now.mono_ms);
            }
            // In 1.13+ form (the hub's generation here) USER_SYNC goes upstream as received,
            // a `Forward`; nothing else is for a Redis.
            _ => {}
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
            forwarded: self.forwarded,
            rdata_dropped: self.tcp.as_ref().map_or(0, |t| t.dropped),
            generation: self.tcp.is_some().then(|| self.generation.label()),
            ..UpstreamSnapshot::default()
        }
    }
}

/// `PUBLISH <server name> "REPLICATE "`: what a Synapse process publishes when its Redis
/// connection (re)starts (with the trailing space, PROTOCOL.md §8.4.1), which every writer
/// answers with its POSITIONs.
fn replicate_command(channel: &str) -> Bytes {
    let mut b = BytesMut::new();
    crate::resp::codec::put_command(&mut b, &[b"PUBLISH", channel.as_bytes(), b"REPLICATE "]);
    b.freeze()
}

/// The channel and payload of a pub/sub `message` frame
/// (`*3\r\n$7\r\nmessage\r\n$<n>\r\n<channel>\r\n$<m>\r\n<payload>\r\n`).
fn message_parts(frame: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = frame.strip_prefix(b"*3\r\n$7\r\nmessage\r\n$")?;
    let (channel, rest) = bulk(rest)?;
    let (payload, _) = bulk(rest.strip_prefix(b"$")?)?;
    Some((channel, payload))
}

/// A bulk string's `<n>\r\n<bytes>\r\n` (after its `$`), and what follows it.
fn bulk(rest: &[u8]) -> Option<(&[u8], &[u8])> {
    let cr = memchr::memchr(b'\r', rest)?;
    let n: usize = std::str::from_utf8(&rest[..cr]).ok()?.parse().ok()?;
    let body = rest.get(cr + 2..cr + 2 + n)?;
    Some((body, rest.get(cr + 4 + n..).unwrap_or_default()))
}

/// Sends a command and reads its reply on a connection still in the request/reply phase.
async fn call(stream: &mut RedisStream, buf: &mut BytesMut, args: &[&[u8]]) -> Result<Reply, String> {
    let mut b = BytesMut::new();
    crate::resp::codec::put_command(&mut b, args);
    write_out(stream, &mut b).await.map_err(|e| format!("write failed: {e}"))?;
    loop {
        if let Some(r) = take_reply(buf).map_err(|e| e.to_string())? {
            return Ok(r);
        }
        if stream.read_buf(buf).await.map_err(|e| format!("read failed: {e}"))? == 0 {
            return Err("closed by the redis server".to_owned());
        }
    }
}

/// Dials (with the TLS handshake for `rediss://`) and authenticates one connection.
async fn dial(
    cfg: &RedisUpstream,
    tls: Option<&RedisTlsConnector>,
    buf: &mut BytesMut,
) -> Result<RedisStream, String> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, crate::tls::connect(&cfg.addr, tls))
        .await
        .map_err(|_| "connect timed out".to_owned())??;
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
        // Without `--resp-listen` there are no local RESP clients: only TCP workers.
        let state = self.ctx.resp.clone();
        let generation =
            self.ctx.hub.protocol.pinned().filter(|g| g.has_instance()).unwrap_or(Generation::V1_22);
        let mut bridge = Bridge::new(cfg, generation, self.ctx.clock.now());
        let seed = u64::from(std::process::id()) ^ self.ctx.clock.now().wall_ms.unsigned_abs();
        let mut backoff = Backoff::new(self.ctx.backoff.clone(), seed);
        let mut ids: HashMap<Bytes, u32> = HashMap::new();
        loop {
            self.drain(&mut bridge);
            if self.stopping() {
                return;
            }
            match self.redis_session(cfg, state.as_deref(), &mut bridge, &mut ids, &mut backoff).await {
                ConnEnd::Stop => return,
                ConnEnd::Lost(why) => {
                    tracing::warn!(
                        redis = cfg.addr, error = %why, dropped = bridge.dropped,
                        "redis upstream lost; clients and workers stay connected and get nothing until it is back"
                    );
                }
                ConnEnd::Unreachable(why) => self.connect_failed(&backoff, "redis upstream", &cfg.addr, &why),
                ConnEnd::Closed(_) => {}
            }
            if bridge.connected {
                bridge.down_since_ms = self.ctx.clock.now().mono_ms;
            }
            bridge.connected = false;
            bridge.subscribed = false;
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
        state: Option<&RespState>,
        bridge: &mut Bridge,
        ids: &mut HashMap<Bytes, u32>,
        backoff: &mut Backoff,
    ) -> ConnEnd {
        let mut pbuf = BytesMut::new();
        let mut sbuf = BytesMut::new();
        let tls = self.ctx.redis_tls.clone();
        let publ = match dial(cfg, tls.as_ref(), &mut pbuf).await {
            Ok(s) => s,
            Err(e) => return ConnEnd::Unreachable(e),
        };
        let mut sub = match dial(cfg, tls.as_ref(), &mut sbuf).await {
            Ok(s) => s,
            Err(e) => return ConnEnd::Unreachable(e),
        };
        let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
        args.extend(cfg.channels.iter().map(String::as_bytes));
        let mut b = BytesMut::new();
        crate::resp::codec::put_command(&mut b, &args);
        if let Err(e) = write_out(&mut sub, &mut b).await {
            return ConnEnd::Unreachable(format!("write failed: {e}"));
        }
        // The connection counts once Redis answers the SUBSCRIBE. A Redis that turns replhub
        // away after the handshake (no client certificate, a missing password) does it here,
        // and is retried with backoff like one that cannot be reached.
        sbuf.reserve(READ_RESERVE);
        match tokio::time::timeout(CONNECT_TIMEOUT, sub.read_buf(&mut sbuf)).await {
            Err(_) => return ConnEnd::Unreachable("no answer to SUBSCRIBE".to_owned()),
            Ok(Ok(0)) => return ConnEnd::Unreachable("closed by the redis server".to_owned()),
            Ok(Err(e)) => return ConnEnd::Unreachable(format!("read failed: {e}")),
            Ok(Ok(_)) if sbuf.first() == Some(&b'-') => {
                let why = match take_reply(&mut sbuf) {
                    Ok(Some(Reply::Error(e))) => String::from_utf8_lossy(&e).into_owned(),
                    _ => "an error".to_owned(),
                };
                return ConnEnd::Unreachable(format!("SUBSCRIBE refused: {why}"));
            }
            Ok(Ok(_)) => {}
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
        let reconnect = bridge.connects > 0;
        backoff.reset();
        bridge.connects += 1;
        bridge.connected = true;
        bridge.subscribed = true;
        // Sent now that the subscription is in place, so that replhub's own clients get it
        // too: on a reconnect always, otherwise if TCP workers asked for one meanwhile.
        bridge.replicate_if_due(reconnect, self.ctx.clock.now().mono_ms);
        // TCP workers' commands from while the link was down.
        bridge.out.extend(bridge.waiting.drain(..));
        if let Err(end) = self.on_subscription_data(bridge, &mut sbuf, state, ids).await {
            return end;
        }
        // The publishing connection is read (PUBLISH replies) and written at once: one half each.
        let (mut publ_rx, mut publ_tx) = tokio::io::split(publ);
        // PUBLISH commands on their way out, and whether some may still wait in the TLS layer.
        let mut wbuf = BytesMut::new();
        let mut unflushed = false;
        loop {
            for b in bridge.out.drain(..) {
                wbuf.extend_from_slice(&b);
                unflushed = true;
            }
            pbuf.reserve(4096);
            sbuf.reserve(READ_RESERVE);
            let retry = self.queued().then(|| tokio::time::Instant::now() + HOLD_RETRY);
            let replicate_at = bridge
                .pacer
                .due_ms()
                .filter(|_| bridge.subscribed)
                .map(|ms| tokio::time::Instant::from_std(self.ctx.clock.instant_at(ms)));
            tokio::select! {
                biased;
                () = self.ctx.wakeup.notified() => {
                    self.drain(bridge);
                    if self.stopping() {
                        return ConnEnd::Stop;
                    }
                }
                res = write_out(&mut publ_tx, &mut wbuf), if unflushed => match res {
                    Ok(()) => unflushed = false,
                    Err(e) => return ConnEnd::Lost(format!("write failed: {e}")),
                },
                res = publ_rx.read_buf(&mut pbuf) => match res {
                    Ok(0) => return ConnEnd::Lost("closed by the redis server".to_owned()),
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
                res = sub.read_buf(&mut sbuf) => match res {
                    Ok(0) => return ConnEnd::Lost("closed by the redis server".to_owned()),
                    Ok(_) => {
                        if let Err(end) = self.on_subscription_data(bridge, &mut sbuf, state, ids).await {
                            return end;
                        }
                    }
                    Err(e) => return ConnEnd::Lost(format!("read failed: {e}")),
                },
                () = sleep_opt(replicate_at) => bridge.replicate_if_due(false, self.ctx.clock.now().mono_ms),
                () = sleep_opt(retry) => self.flush(),
            }
        }
    }

    /// The complete replies a read of the subscription brought, to every core: the Redis-mode
    /// batch and, once TCP workers exist, the batch of their lines.
    async fn on_subscription_data(
        &mut self,
        bridge: &mut Bridge,
        sbuf: &mut BytesMut,
        state: Option<&RespState>,
        ids: &mut HashMap<Bytes, u32>,
    ) -> Result<(), ConnEnd> {
        let (pubsub, tcp) =
            index_messages(sbuf, state, ids, &bridge.channel, bridge.tcp.as_mut()).map_err(ConnEnd::Lost)?;
        for batch in [pubsub, tcp].into_iter().flatten() {
            let batch = Arc::new(batch);
            self.batches += 1;
            if !self.broadcast(bridge, || CoreMsg::Batch(Arc::clone(&batch))).await {
                return Err(ConnEnd::Stop);
            }
        }
        Ok(())
    }
}

/// Takes the complete replies off the front of `buf` as one batch over those bytes, with a
/// line per `message` for the local RESP subscribers (the other replies, subscription
/// confirmations, are left unindexed; none without Redis mode), and, once TCP workers exist
/// (`tcp`), a second batch of the TCP lines of the messages on `channel`.
fn index_messages(
    buf: &mut BytesMut,
    state: Option<&RespState>,
    ids: &mut HashMap<Bytes, u32>,
    channel: &str,
    mut tcp: Option<&mut TcpLines>,
) -> Result<(Option<Batch>, Option<Batch>), String> {
    let mut at = 0;
    let mut metas = Vec::new();
    while let Some(len) = crate::resp::reply::measure(&buf[at..]).map_err(|e| e.to_string())? {
        let frame = &buf[at..at + len];
        if let Some((name, payload)) = message_parts(frame) {
            if let Some(tcp) = tcp.as_deref_mut().filter(|_| name == channel.as_bytes()) {
                tcp.push(payload);
            }
            let id = match (ids.get(name), state) {
                (Some(&id), _) => Some(id),
                (None, Some(state)) => {
                    let name = Bytes::copy_from_slice(name);
                    let id = state.channels.get(&name, true).map(|c| c.id());
                    if let Some(id) = id {
                        ids.insert(name, id);
                    }
                    id
                }
                (None, None) => None,
            };
            if let (Some(id), Ok(start), Ok(end)) = (id, u32::try_from(at), u32::try_from(at + len)) {
                metas.push(LineMeta::pubsub(start, end, id));
            }
        }
        at += len;
    }
    let tcp = tcp.and_then(TcpLines::take_batch);
    if at == 0 {
        return Ok((None, tcp));
    }
    let data = buf.split_to(at).freeze();
    Ok(((!metas.is_empty()).then(|| Batch::new(data, metas)), tcp))
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
        let mut tcp = TcpLines::new(Generation::V1_22);
        let (batch, lines) =
            index_messages(&mut buf, Some(&state), &mut ids, "sn", Some(&mut tcp)).expect("valid");
        let batch = batch.expect("one message");
        assert!(lines.is_none(), "PING is no command a master relays");
        assert_eq!(batch.lines().len(), 1);
        assert_eq!(batch.line(0), b"*3\r\n$7\r\nmessage\r\n$2\r\nsn\r\n$4\r\nPING\r\n");
        assert_eq!(&buf[..], b"*3\r\n$7\r\nmessage\r\n$2\r\nsn\r\n$1", "the incomplete reply waits");
        assert_eq!(
            message_parts(b"*3\r\n$7\r\nmessage\r\n$5\r\nsn/IP\r\n$3\r\nA B\r\n"),
            Some((&b"sn/IP"[..], &b"A B"[..]))
        );
    }
}
