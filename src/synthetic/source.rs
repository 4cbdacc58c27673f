//! The synthetic master behind the same event interface as
//! [`UpstreamLink`](crate::upstream::UpstreamLink).
//!
//! [`SyntheticSource::start`] reports `Up` with the generator's positions; then each
//! [`SyntheticSource::tick`] writes the lines due at that time into one buffer and reports them
//! as one [`LinkEvent::Batch`], indexed from the generator's own line callbacks (no re-parsing).
//! Commands from the cores get what a master would do with them: `REMOTE_SERVER_UP x` is echoed
//! to every worker (seed and 1.10–1.12 behaviour, the originator included; a 1.13+ master has
//! no other connection to relay it to), `USER_SYNC` is merged and counted, everything else is counted
//! and dropped. Playing a released master, `Up` carries that release's generation, so the hub
//! answers REPLICATE with that release's POSITIONs.
use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::{Synthetic, SyntheticConfig, UNPACED_BATCH};
use crate::hub::{Batch, LineMeta, UpstreamCmd, UpstreamEvent, UserSyncMerger, BROADCAST};
use crate::metrics::snapshot::UpstreamSnapshot;
use crate::proto::{Generation, StreamId, SynapseRelease, SyncState};
use crate::time::Now;
use crate::upstream::LinkEvent;

/// At most this many generated lines per tick (and per batch); a backlog of due lines is
/// taken over the following ticks.
pub(crate) const MAX_LINES_PER_TICK: usize = UNPACED_BATCH;

/// The synthetic master as an upstream. See the module docs.
pub(crate) struct SyntheticSource {
    gen: Synthetic,
    server_name: String,
    events: VecDeque<LinkEvent>,
    /// `REMOTE_SERVER_UP` lines to broadcast in the next batch.
    echo: Vec<Bytes>,
    user_sync: UserSyncMerger<usize>,
    /// Monotonic ms of the last `start`/`tick`; `None` before `start`.
    last_tick_ms: Option<u64>,
    stream_updates: [u64; StreamId::COUNT],
    commands: u64,
    dropped_commands: u64,
}

impl SyntheticSource {
    /// A source generating per `config`, announcing `server_name` in `SERVER`.
    pub(crate) fn new(config: SyntheticConfig, server_name: String) -> Self {
        Self {
            gen: Synthetic::new(config),
            server_name,
            events: VecDeque::new(),
            echo: Vec::new(),
            user_sync: UserSyncMerger::new(),
            last_tick_ms: None,
            stream_updates: [0; StreamId::COUNT],
            commands: 0,
            dropped_commands: 0,
        }
    }

    /// The current token of every generated stream (`None` for streams not generated).
    pub(crate) fn positions(&self) -> [Option<i64>; StreamId::COUNT] {
        let mask = self.gen.config().streams;
        let tokens = self.gen.positions();
        std::array::from_fn(|i| StreamId::from_index(i).filter(|s| mask.contains(*s)).map(|_| tokens[i]))
    }

    /// The wire generation of the master this source plays.
    fn generation(&self) -> Generation {
        self.gen.config().release.map_or(Generation::Seed, SynapseRelease::generation)
    }

    /// Starts the clock and reports `Up` with the position of every generated stream.
    pub(crate) fn start(&mut self, now: Now) {
        if self.last_tick_ms.is_some() {
            return;
        }
        // The first `due` starts the generator's token bucket.
        self.gen.due(now);
        self.last_tick_ms = Some(now.mono_ms);
        self.events.push_back(LinkEvent::Up(UpstreamEvent::Connected {
            server_name: self.server_name.clone(),
            positions: self.positions(),
            generation: self.generation(),
            instance: super::line::MASTER_INSTANCE.to_owned(),
        }));
    }

    /// Generates the lines due at `now` (at most [`MAX_LINES_PER_TICK`]), plus any echoed
    /// `REMOTE_SERVER_UP` first, as one batch. Does nothing before [`Self::start`].
    pub(crate) fn tick(&mut self, now: Now) {
        if self.last_tick_ms.is_none() {
            return;
        }
        self.last_tick_ms = Some(now.mono_ms);
        let due = self.gen.due(now).min(MAX_LINES_PER_TICK);
        if due == 0 && self.echo.is_empty() {
            return;
        }
        let mut buf = BytesMut::new();
        let mut metas = Vec::with_capacity(due + self.echo.len() + 8);
        for line in self.echo.drain(..) {
            let start = buf.len() as u32;
            buf.extend_from_slice(&line);
            metas.push(LineMeta { start, end: buf.len() as u32, stream: BROADCAST, token: None });
        }
        if due > 0 {
            let updates = &mut self.stream_updates;
            self.gen.generate(now, due, &mut buf, |stream, token, start, end| {
                updates[stream.index()] += 1;
                metas.push(LineMeta {
                    start: start as u32,
                    end: end as u32,
                    stream: stream as u8,
                    token: token.value(),
                });
            });
        }
        if metas.is_empty() {
            return;
        }
        self.events.push_back(LinkEvent::Batch(Arc::new(Batch::new(buf.freeze(), metas))));
    }

    /// A command from core `core`.
    pub(crate) fn on_command(&mut self, core: usize, cmd: UpstreamCmd, _now: Now) {
        self.commands += 1;
        match cmd {
            // Redis-mode messages go to the cores, not to the master (the source thread routes
            // them before commands reach a source).
            UpstreamCmd::Publish(_) | UpstreamCmd::RedisPublish(_) | UpstreamCmd::RedisReplicate => {}
            UpstreamCmd::UserSync { user_id, state, .. } => {
                match state {
                    SyncState::Start => self.user_sync.start(core, &user_id),
                    SyncState::End => self.user_sync.end(core, &user_id),
                };
            }
            // Only a 1.10–1.12 master serves these (the source answers them itself).
            UpstreamCmd::Fetch { .. } => {}
            UpstreamCmd::Forward(line) => {
                // A 1.13+ master relays REMOTE_SERVER_UP to its other connections only, and
                // replhub is its one connection (PROTOCOL.md §8.3.1); the seed and 1.10–1.12
                // echo it to every connection, the sender included.
                let echoes = self.gen.config().release.is_none_or(|r| !r.has_instance_names());
                let relayable = echoes
                    && line.starts_with(b"REMOTE_SERVER_UP ")
                    && line.ends_with(b"\n")
                    && memchr::memchr(b'\n', &line) == Some(line.len() - 1);
                if relayable {
                    self.echo.push(line);
                } else {
                    self.dropped_commands += 1;
                    tracing::trace!(line = %String::from_utf8_lossy(&line).trim_end(), "synthetic master ignores a forwarded command");
                }
            }
        }
    }

    /// The next event.
    pub(crate) fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// When lines are next due (monotonic ms): at least 1 ms after the last tick, about one
    /// line's worth of time at low rates; at once if an echo waits. `None` before `start`.
    pub(crate) fn poll_timeout(&self) -> Option<u64> {
        let last = self.last_tick_ms?;
        if !self.echo.is_empty() {
            return Some(last);
        }
        let rate = self.gen.config().rate;
        let step = 1000u64.checked_div(rate).unwrap_or(1).max(1);
        Some(last + step)
    }

    /// Forwarded commands the synthetic master dropped (everything but `REMOTE_SERVER_UP`).
    #[cfg(test)]
    pub(crate) fn dropped_commands(&self) -> u64 {
        self.dropped_commands
    }

    /// Metrics.
    pub(crate) fn snapshot(&self) -> UpstreamSnapshot {
        UpstreamSnapshot {
            mode: "synthetic",
            connected: self.last_tick_ms.is_some(),
            down_since_ms: None,
            reconnects: 0,
            connect_failures: 0,
            generation: Some(self.generation().label()),
            tokens: self.positions(),
            stream_updates: self.stream_updates,
            inbound_rdata: self.stream_updates,
            syncing_users: self.user_sync.len() as u64,
            forwarded: self.commands,
            rdata_dropped: 0,
            forwards_dropped: self.dropped_commands,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::fields::parse_rdata;
    use crate::proto::StreamMask;

    const T0: Now = Now::new(10_000, 1_583_254_800_000);

    fn source(rate: u64) -> SyntheticSource {
        SyntheticSource::new(
            SyntheticConfig { rate, ..SyntheticConfig::default() },
            "synthetic.example".into(),
        )
    }

    fn batches(s: &mut SyntheticSource) -> Vec<Arc<Batch>> {
        std::iter::from_fn(|| s.poll_event())
            .map(|e| match e {
                LinkEvent::Batch(b) => b,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn up_first_with_every_position() {
        let mut s = source(1000);
        assert!(s.poll_timeout().is_none());
        s.tick(T0);
        assert!(s.poll_event().is_none(), "nothing before start");
        s.start(T0);
        let Some(LinkEvent::Up(UpstreamEvent::Connected { server_name, positions, .. })) = s.poll_event()
        else {
            panic!("Up first");
        };
        assert_eq!(server_name, "synthetic.example");
        assert!(StreamId::SEED.iter().all(|s| positions[s.index()].is_some()), "every seed stream");
        assert_eq!(positions, s.positions());
        s.start(T0);
        assert!(s.poll_event().is_none(), "start is idempotent");
        assert!(s.snapshot().connected);
    }

    #[test]
    fn ticks_emit_indexed_batches_at_the_rate() {
        let mut s = source(1000);
        s.start(T0);
        s.poll_event();
        assert_eq!(s.poll_timeout(), Some(T0.mono_ms + 1));
        let mut now = T0;
        let mut lines = 0;
        for _ in 0..100 {
            now = now.plus_ms(10);
            s.tick(now);
            for b in batches(&mut s) {
                for (i, m) in b.lines().iter().enumerate() {
                    let line = b.line(i);
                    assert!(line.starts_with(b"RDATA ") && line.ends_with(b"\n"));
                    let r = parse_rdata(&line[6..line.len() - 1]).unwrap();
                    assert_eq!(r.stream, m.stream_id().unwrap().name());
                    assert_eq!(r.token.value(), m.token);
                    lines += 1;
                }
                // Generated lines are contiguous.
                assert_eq!(b.run_end(0), b.lines().len());
                assert_eq!(b.lines().last().unwrap().end as usize, b.data().len());
            }
        }
        // One second at 1000 lines/s (runs may add a few).
        assert!((990..=1100).contains(&lines), "{lines}");
        let snap = s.snapshot();
        assert_eq!(snap.mode, "synthetic");
        assert_eq!(snap.stream_updates.iter().sum::<u64>(), lines);
        assert_eq!(snap.tokens, s.positions());
    }

    #[test]
    fn unpaced_ticks_are_capped_chunks() {
        let mut s = source(0);
        s.start(T0);
        s.poll_event();
        s.tick(T0.plus_ms(1));
        let b = batches(&mut s);
        assert_eq!(b.len(), 1);
        assert!(b[0].lines().len() >= MAX_LINES_PER_TICK);
        assert_eq!(s.poll_timeout(), Some(T0.mono_ms + 2));
    }

    #[test]
    fn remote_server_up_is_echoed_to_everyone() {
        let mut s = source(1);
        s.start(T0);
        s.poll_event();
        s.on_command(3, UpstreamCmd::Forward(Bytes::from_static(b"REMOTE_SERVER_UP other.org\n")), T0);
        s.on_command(3, UpstreamCmd::Forward(Bytes::from_static(b"FEDERATION_ACK 5\n")), T0);
        assert_eq!(s.poll_timeout(), Some(T0.mono_ms), "an echo is due at once");
        s.tick(T0);
        let b = batches(&mut s);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].lines().len(), 1);
        assert_eq!(b[0].line(0), b"REMOTE_SERVER_UP other.org\n");
        assert_eq!(b[0].lines()[0].stream, BROADCAST);
        assert_eq!(s.dropped_commands(), 1);
        assert_eq!(s.snapshot().forwarded, 2);
    }

    #[test]
    fn user_sync_is_merged_and_counted() {
        let mut s = source(1);
        let us = |user: &str, state| UpstreamCmd::UserSync { user_id: user.into(), state, last_sync_ms: 1 };
        s.on_command(0, us("@a:hs", SyncState::Start), T0);
        s.on_command(1, us("@a:hs", SyncState::Start), T0);
        s.on_command(1, us("@b:hs", SyncState::Start), T0);
        assert_eq!(s.snapshot().syncing_users, 2);
        s.on_command(0, us("@a:hs", SyncState::End), T0);
        assert_eq!(s.snapshot().syncing_users, 2);
        s.on_command(1, us("@a:hs", SyncState::End), T0);
        assert_eq!(s.snapshot().syncing_users, 1);
    }

    #[test]
    fn only_masked_streams_are_served() {
        let mut mask = StreamMask::NONE;
        mask.insert(StreamId::Caches);
        mask.insert(StreamId::Typing);
        let cfg = SyntheticConfig { rate: 0, streams: mask, ..SyntheticConfig::default() };
        let mut s = SyntheticSource::new(cfg, "hs".into());
        s.start(T0);
        let Some(LinkEvent::Up(UpstreamEvent::Connected { positions, .. })) = s.poll_event() else {
            panic!();
        };
        let served: Vec<usize> = (0..16).filter(|i| positions[*i].is_some()).collect();
        assert_eq!(served, vec![StreamId::Typing.index(), StreamId::Caches.index()]);
        s.tick(T0.plus_ms(1));
        for b in batches(&mut s) {
            assert!(b.lines().iter().all(|m| mask.contains(m.stream_id().unwrap())));
        }
    }
}
