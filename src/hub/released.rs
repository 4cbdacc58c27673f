//! What a released Synapse master (1.13–1.66) does for its workers that the seed did not
//! (PROTOCOL.md §8.2, §8.3.1), for workers of that generation:
//!
//! * `USER_SYNC <instance_id> <user> start|end <ms>` and `CLEAR_USER_SYNC <instance_id>`: the
//!   master keys presence syncs by the worker's instance id (not by connection), so they go
//!   upstream as received; a lost worker connection clears nothing there, as with Synapse.
//! * `FEDERATION_ACK <instance> <token>` (1.18+) besides `FEDERATION_ACK <token>`, forwarded
//!   as received.
//! * `REMOTE_SERVER_UP` from a worker: the master relays it to every other connection but
//!   never back to its sender, and replhub is one connection: so besides going upstream it is
//!   delivered here to every other greeted worker, never to its sender.
//!
//! * `INVALIDATE_CACHE` (gone in 1.14) and `REMOVE_PUSHER` (gone in 1.29): a master that does
//!   not know a command answers `ERROR failed to parse line: KeyError(...)` and closes the
//!   connection, and replhub's one connection is every worker's feed. So they go upstream
//!   only when the upstream's release knows them: with the release pinned
//!   (`--synapse-version`) a worker gets that release's answer instead, as if connected to it;
//!   with only the generation learnt, a command that some release of it lacks is dropped
//!   (WARN once a minute, `replhub_withheld_commands_total`). See [`upstream_verdict`].
//!
//! * Once a worker sent a bare `REPLICATE`, its lines are checked in a 1.13+ master's order
//!   and with its error texts ([`crate::proto::release::check_released_line`]).
//!
//! A worker is of a released generation when the upstream is (learnt or pinned), or, while
//! that is not known, when it greeted with a bare `REPLICATE`.
use bytes::{BufMut, BytesMut};

use super::stats::CloseReason;
use super::{ConnId, Hub};
use crate::proto::fields::not_enough_values;
use crate::proto::generation::{parse_any_federation_ack, parse_instance_user_sync};
use crate::proto::number::parse_i64;
use crate::proto::release::ReleasedParse;
use crate::proto::{CommandWord, Generation, Line, PeerError, SynapseRelease};
use crate::time::Now;

/// At most one WARN per this many ms about commands withheld from the upstream.
const WITHHELD_WARN_INTERVAL_MS: u64 = 60_000;

/// What to do with a worker command that only some releases' masters know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum UpstreamVerdict {
    /// The upstream knows it (or is the seed, or not known yet): forward it.
    Forward,
    /// The upstream's pinned release does not know it: answer the worker as it would.
    Answer,
    /// The upstream's generation includes releases that do not know it: drop it.
    Withhold,
}

/// Whether `word` may go to an upstream of `release` (pinned) or `generation` (learnt).
pub(super) fn upstream_verdict(
    word: CommandWord,
    release: Option<SynapseRelease>,
    generation: Option<Generation>,
) -> UpstreamVerdict {
    match (release, generation) {
        (Some(r), _) if r.knows_command(word) => UpstreamVerdict::Forward,
        (Some(_), _) => UpstreamVerdict::Answer,
        (None, Some(g)) if g.has_instance() => {
            if SynapseRelease::of_generation(g).all(|r| r.knows_command(word)) {
                UpstreamVerdict::Forward
            } else {
                UpstreamVerdict::Withhold
            }
        }
        // The seed knows every command; before the first handshake nothing is known, and
        // the worker's own command is the best hint of what its master speaks.
        (None, _) => UpstreamVerdict::Forward,
    }
}

/// Whether a `FEDERATION_ACK` with (`has_instance`) or without an instance name may go to an
/// upstream of `release` (pinned) or `generation` (learnt): 1.18+ masters parse only
/// `<instance> <token>`, older ones only `<token>`, and either closes the connection on the
/// other. Learnt 1.13 covers both, and a worker of its master's release sends the right one,
/// so only a form no release of the generation takes is withheld (a token alone to 1.22+).
pub(super) fn federation_ack_verdict(
    has_instance: bool,
    release: Option<SynapseRelease>,
    generation: Option<Generation>,
) -> UpstreamVerdict {
    match (release, generation) {
        (Some(r), _) if r.federation_ack_has_instance() == has_instance => UpstreamVerdict::Forward,
        (Some(_), _) => UpstreamVerdict::Answer,
        (None, Some(g))
            if g.has_instance()
                && SynapseRelease::of_generation(g)
                    .all(|r| r.federation_ack_has_instance() != has_instance) =>
        {
            UpstreamVerdict::Withhold
        }
        (None, _) => UpstreamVerdict::Forward,
    }
}

impl Hub {
    /// Whether `id` speaks a released generation (1.13+) rather than the seed.
    pub(super) fn is_released(&self, id: ConnId) -> bool {
        match self.generation {
            Some(g) => g.has_instance(),
            None => self.conn(id).is_some_and(|c| c.subs.bare),
        }
    }

    /// Handles the worker commands whose released form the seed parser refuses. Returns
    /// whether the line was handled here; otherwise the seed's handling applies.
    pub(super) fn handle_released_command(
        &mut self,
        id: ConnId,
        word: CommandWord,
        line: &Line,
        now: Now,
    ) -> bool {
        let args = line.args();
        let result = match word {
            // Only the four-field form: a seed-form line forwarded to a 1.13+ master would make
            // it close replhub's connection, so it gets that master's parse error instead.
            CommandWord::UserSync if self.is_released(id) => {
                parse_instance_user_sync(args).map(|_| self.stats.user_sync += 1)
            }
            CommandWord::FederationAck if self.is_released(id) => match parse_any_federation_ack(args) {
                Ok(_) => {
                    self.stats.federation_ack += 1;
                    self.forward_federation_ack(id, line, now);
                    return true;
                }
                Err(e) => Err(e),
            },
            CommandWord::ClearUserSync if self.is_released(id) => {
                crate::proto::fields::utf8_field(args).map(|_| ())
            }
            // A seed server does not know it (PROTOCOL.md §2.1).
            CommandWord::ClearUserSync => {
                let err = PeerError::InvalidCommand(word.as_str().to_owned());
                self.fail(id, &err, CloseReason::ProtocolError, now);
                return true;
            }
            // Behind a shared Redis every process gets it back from there, its sender included
            // (as Synapse's own processes on that Redis do): delivering it here too would be twice.
            CommandWord::RemoteServerUp if self.is_released(id) => {
                if std::str::from_utf8(args).is_ok() && !self.config.redis_bridge {
                    self.deliver_to_others(id, line, now);
                }
                return false;
            }
            _ => return false,
        };
        match result {
            Ok(()) => self.forward(line),
            Err(e) => {
                let err = PeerError::parse(word.as_str().as_bytes(), args, e);
                let name = self.conn(id).map(|c| c.display_name().to_owned()).unwrap_or_default();
                tracing::info!(conn = %id, name, error = %err, "bad command, closing");
                self.fail(id, &err, CloseReason::ProtocolError, now);
            }
        }
        true
    }

    /// Once `id` is known to be a 1.13+ worker (it sent a bare `REPLICATE`), its later lines
    /// are checked as a 1.13+ master checks them: looked up, parsed, then the direction, with
    /// that master's error texts (PROTOCOL.md §8.2).
    pub(super) fn adopt_released_parse(&mut self, id: ConnId) {
        let release = self.config.release;
        let generation = self
            .generation
            .filter(|g| g.has_instance())
            .or(release.map(SynapseRelease::generation))
            .unwrap_or(Generation::V1_22);
        let Some(c) = self.conn_mut(id) else { return };
        if c.subs.bare {
            c.session.set_released_parse(ReleasedParse { generation, release });
        }
    }

    /// Forwards `line` (`INVALIDATE_CACHE`, `REMOVE_PUSHER`) unless the upstream's release
    /// does not know `word` (see [`upstream_verdict`]).
    pub(super) fn forward_if_known_upstream(&mut self, id: ConnId, word: CommandWord, line: &Line, now: Now) {
        let verdict = upstream_verdict(word, self.config.release, self.generation);
        self.apply_verdict(id, word, line, verdict, PeerError::unknown_command, now);
    }

    /// Forwards a `FEDERATION_ACK` unless the upstream's release wants the other form (see
    /// [`federation_ack_verdict`]); a pinned release's parse error is the answer.
    fn forward_federation_ack(&mut self, id: ConnId, line: &Line, now: Now) {
        let has_instance = line.args().contains(&b' ');
        let verdict = federation_ack_verdict(has_instance, self.config.release, self.generation);
        let answer = |line: &[u8]| {
            let args = line.get("FEDERATION_ACK ".len()..).unwrap_or_default();
            let detail = if has_instance {
                // `int(line)` of a 1.13-1.17 master.
                parse_i64(args).err().map_or_else(String::new, |e| e.0)
            } else {
                // `instance_name, token = line.split(" ")` of a 1.18+ master.
                not_enough_values(2, 1).0
            };
            PeerError::LineParse { detail, line: String::from_utf8_lossy(line).into_owned() }
        };
        self.apply_verdict(id, CommandWord::FederationAck, line, verdict, answer, now);
    }

    /// Forwards `line`, answers the worker with `answer(line)` and closes it, or withholds the
    /// line (counted, WARN at most once a minute), as `verdict` says.
    fn apply_verdict(
        &mut self,
        id: ConnId,
        word: CommandWord,
        line: &Line,
        verdict: UpstreamVerdict,
        answer: impl FnOnce(&[u8]) -> PeerError,
        now: Now,
    ) {
        match verdict {
            UpstreamVerdict::Forward => self.forward(line),
            UpstreamVerdict::Answer => {
                let err = answer(line.as_bytes());
                let name = self.conn(id).map(|c| c.display_name().to_owned()).unwrap_or_default();
                let release = self.config.release.map(|r| r.to_string()).unwrap_or_default();
                tracing::info!(conn = %id, name, word = word.as_str(), release, "command the master's release would refuse, closing");
                self.fail(id, &err, CloseReason::ProtocolError, now);
            }
            UpstreamVerdict::Withhold => {
                self.stats.withheld_commands += 1;
                let due =
                    self.withheld_warned_ms.is_none_or(|t| now.mono_ms >= t + WITHHELD_WARN_INTERVAL_MS);
                if due {
                    self.withheld_warned_ms = Some(now.mono_ms);
                    let name = self.conn(id).map(|c| c.display_name().to_owned()).unwrap_or_default();
                    tracing::warn!(
                        conn = %id,
                        name,
                        word = word.as_str(),
                        generation = %self.generation.map_or("?", Generation::label),
                        withheld = self.stats.withheld_commands,
                        "not forwarding a command (or form) some releases of the upstream's protocol \
                         refuse (they would drop replhub's connection); give --synapse-version to decide exactly"
                    );
                }
            }
        }
    }

    /// Queues `line` to every greeted, open connection but `from`, after what each has queued.
    fn deliver_to_others(&mut self, from: ConnId, line: &Line, now: Now) {
        let mut buf = BytesMut::with_capacity(line.as_bytes().len() + 1);
        buf.put_slice(line.as_bytes());
        buf.put_u8(b'\n');
        let bytes = buf.freeze();
        let head = self.log.head();
        let others: Vec<ConnId> = self
            .conns
            .ids()
            .filter(|&o| o != from)
            .filter(|&o| self.conn(o).is_some_and(|c| c.session.is_started() && !c.close.is_closing()))
            .collect();
        for o in others {
            if let Some(c) = self.conn_mut(o) {
                c.outbox.push_private(head, bytes.clone(), CommandWord::RemoteServerUp);
            }
            self.wake(o, head, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::sim::Sim;
    use super::super::{HubConfig, UpstreamCmd};
    use crate::proto::{Generation, StreamId, SynapseRelease, Token};

    fn positions() -> [Option<i64>; StreamId::COUNT] {
        let mut p = Sim::positions();
        p[StreamId::Groups.index()] = None;
        p
    }

    fn sim(generation: Generation) -> Sim {
        sim_with(generation, None)
    }

    fn sim_with(generation: Generation, release: Option<SynapseRelease>) -> Sim {
        let mut sim = Sim::new(HubConfig { release, ..HubConfig::default() });
        sim.connect_upstream_as("example.com", positions(), generation);
        sim
    }

    fn forwarded(sim: &mut Sim) -> Vec<String> {
        sim.take_upstream()
            .into_iter()
            .map(|c| match c {
                UpstreamCmd::Forward(b) => String::from_utf8_lossy(&b).into_owned(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn positions_of(lines: &[String]) -> Vec<&str> {
        lines.iter().filter(|l| l.starts_with("POSITION")).map(String::as_str).collect()
    }

    #[test]
    fn a_bare_replicate_gets_every_served_stream_in_the_masters_form() {
        for (generation, events) in [
            (Generation::V1_13, "POSITION events master 100"),
            (Generation::V1_22, "POSITION events master 100 100"),
        ] {
            let mut sim = sim(generation);
            let w = sim.accept();
            sim.send(w, "NAME w\nREPLICATE ");
            let lines = sim.take_lines(w);
            let p = positions_of(&lines);
            assert_eq!(p.len(), StreamId::COUNT - 1, "{generation}: every served stream, not groups: {p:?}");
            assert_eq!(p[0], events);
            assert!(sim.closed(w).is_none());
            // Rows follow, as relayed.
            sim.batch(&[(StreamId::Typing, Token::Value(200))]);
            assert!(sim.take_lines(w).iter().any(|l| l.starts_with("RDATA typing")), "{generation}");
        }
    }

    #[test]
    fn the_positions_answering_a_replicate_go_to_every_worker_that_replicated() {
        let mut sim = sim(Generation::V1_22);
        let (a, b, idle) = (sim.accept(), sim.accept(), sim.accept());
        sim.send(a, "REPLICATE");
        sim.batch(&[(StreamId::Typing, Token::Value(150))]);
        sim.take_lines(a);
        sim.send(b, "REPLICATE ");
        // `a` holds typing 150 already, so its fresh POSITION says 150 (prev = new).
        let again = sim.take_lines(a);
        assert_eq!(positions_of(&again).len(), StreamId::COUNT - 1, "{again:?}");
        assert!(again.contains(&"POSITION typing master 150 150".to_owned()), "{again:?}");
        assert_eq!(positions_of(&sim.take_lines(b)).len(), StreamId::COUNT - 1);
        assert!(positions_of(&sim.take_lines(idle)).is_empty(), "not to a worker that never replicated");
    }

    #[test]
    fn a_seed_upstream_keeps_the_seed_answer_to_a_bare_replicate() {
        let mut sim = sim(Generation::Seed);
        let w = sim.accept();
        sim.send(w, "REPLICATE");
        let lines = sim.take_lines(w);
        assert!(lines.iter().any(|l| l.starts_with("ERROR failed to handle replicate")), "{lines:?}");
        let w = sim.accept();
        sim.send(w, "CLEAR_USER_SYNC abcde");
        assert!(sim.take_lines(w).contains(&"ERROR invalid command: CLEAR_USER_SYNC".to_owned()));
    }

    #[test]
    fn released_worker_commands_go_upstream_as_received() {
        let mut sim = sim(Generation::V1_22);
        let w = sim.accept();
        sim.send(
            w,
            "REPLICATE \nUSER_SYNC AbCdE @a:hs start 15\nUSER_SYNC AbCdE @a:hs end 16\n\
             FEDERATION_ACK federation_sender 7\nFEDERATION_ACK 8\nCLEAR_USER_SYNC AbCdE",
        );
        assert_eq!(
            forwarded(&mut sim),
            vec![
                "USER_SYNC AbCdE @a:hs start 15\n",
                "USER_SYNC AbCdE @a:hs end 16\n",
                "FEDERATION_ACK federation_sender 7\n",
                // `FEDERATION_ACK 8`: no 1.22+ master takes a token alone; withheld.
                "CLEAR_USER_SYNC AbCdE\n",
            ]
        );
        assert!(sim.closed(w).is_none());
        sim.send(w, "USER_SYNC @a:hs start 16");
        assert!(sim.take_lines(w).contains(
            &"ERROR failed to parse line: ValueError('not enough values to unpack (expected 4, got 3)') ('USER_SYNC @a:hs start 16'):".to_owned()
        ));
        assert!(forwarded(&mut sim).is_empty(), "the seed form never reaches a 1.13+ master");
        let w = sim.accept();
        sim.send(w, "REPLICATE");
        sim.send(w, "USER_SYNC AbCdE @a:hs stop 16");
        assert!(sim
            .take_lines(w)
            .contains(&"ERROR failed to parse line: Exception(\"Invalid USER_SYNC state 'stop'\") ('USER_SYNC AbCdE @a:hs stop 16'):".to_owned()));
    }

    #[test]
    fn a_blank_line_from_a_released_worker_is_refused_as_its_master_does() {
        // 1.13–1.66 compare the received bytes with the str `""` (never equal), so a blank line
        // is parsed: `COMMAND_MAP[""]`. Before the worker is known to be 1.13+, blank lines are
        // skipped as the seed means to.
        let mut sim = sim(Generation::V1_22);
        let w = sim.accept();
        sim.send(w, "NAME w\n\nREPLICATE ");
        assert!(sim.closed(w).is_none(), "a blank line before the bare REPLICATE is skipped");
        sim.take_lines(w);
        sim.send(w, "");
        assert_eq!(sim.take_lines(w), vec!["ERROR failed to parse line: KeyError('') (''):"]);
        assert!(sim.closed(w).is_some());
    }

    #[test]
    fn remote_server_up_reaches_the_other_workers_never_its_sender() {
        let mut sim = sim(Generation::V1_13);
        let (a, b, c) = (sim.accept(), sim.accept(), sim.accept());
        sim.send(a, "REPLICATE");
        sim.send(b, "REPLICATE");
        for w in [a, b, c] {
            sim.take_lines(w);
        }
        sim.send(a, "REMOTE_SERVER_UP other.example");
        assert_eq!(forwarded(&mut sim), vec!["REMOTE_SERVER_UP other.example\n"]);
        assert!(
            !sim.take_lines(a).iter().any(|l| l.starts_with("REMOTE_SERVER_UP")),
            "never back to its sender"
        );
        for w in [b, c] {
            assert_eq!(sim.take_lines(w), vec!["REMOTE_SERVER_UP other.example"]);
        }
    }

    /// A hub behind `--upstream-redis`: nothing connects upstream; the server name is fixed.
    fn bridged() -> Sim {
        let protocol = crate::proto::ProtocolChoice::Pinned(Generation::V1_22);
        Sim::new(HubConfig {
            server_name: Some("sn".into()),
            protocol,
            redis_bridge: true,
            ..HubConfig::default()
        })
    }

    /// Relayed lines from the Redis channel as the bridge indexes them: RDATA by stream and
    /// token, the rest to everyone.
    fn relay(sim: &mut Sim, lines: &[&str]) {
        use super::super::{Batch, LineMeta, BROADCAST};
        let mut data = String::new();
        let mut metas = Vec::new();
        for l in lines {
            let start = data.len() as u32;
            data.push_str(l);
            data.push('\n');
            let (stream, token) = match l.split(' ').collect::<Vec<_>>()[..] {
                ["RDATA", s, _, t, ..] => {
                    (StreamId::from_name(s.as_bytes()).expect("known") as u8, t.parse().ok())
                }
                _ => (BROADCAST, None),
            };
            metas.push(LineMeta { start, end: data.len() as u32, stream, token });
        }
        sim.hub.on_batch(std::sync::Arc::new(Batch::new(bytes::Bytes::from(data), metas)), sim.now);
        sim.flush();
    }

    #[test]
    fn behind_a_shared_redis_replicate_asks_the_writers_and_relays_their_positions() {
        let mut sim = bridged();
        let (a, b) = (sim.accept(), sim.accept());
        assert_eq!(sim.take_lines(a)[0], "SERVER sn", "greeted at once with the configured name");
        sim.send(a, "NAME a\nREPLICATE");
        assert!(positions_of(&sim.take_lines(a)).is_empty(), "no POSITION of the hub's own");
        assert_eq!(sim.take_upstream(), vec![UpstreamCmd::RedisReplicate]);
        relay(
            &mut sim,
            &[
                "RDATA events persister 7 [\"$a\"]",
                "POSITION events persister 7 7",
                "POSITION caches master 3 3",
            ],
        );
        assert_eq!(
            sim.take_lines(a),
            vec![
                "RDATA events persister 7 [\"$a\"]",
                "POSITION events persister 7 7",
                "POSITION caches master 3 3"
            ],
            "every writer's POSITION, as it published it"
        );
        assert_eq!(
            sim.take_lines(b)[2..].to_vec(),
            vec!["POSITION events persister 7 7", "POSITION caches master 3 3"],
            "POSITIONs go to every worker, as a master's answers to a REPLICATE do; RDATA only after REPLICATE"
        );
        sim.send(b, "REPLICATE");
        assert_eq!(sim.take_upstream(), vec![UpstreamCmd::RedisReplicate]);
        relay(&mut sim, &["RDATA typing master batch [\"!r\"]", "RDATA typing master 9 [\"!s\"]"]);
        for w in [a, b] {
            assert_eq!(
                sim.take_lines(w),
                vec!["RDATA typing master batch [\"!r\"]", "RDATA typing master 9 [\"!s\"]"]
            );
        }
    }

    #[test]
    fn behind_a_shared_redis_worker_commands_go_upstream_once() {
        let mut sim = bridged();
        let (a, b) = (sim.accept(), sim.accept());
        sim.send(a, "REPLICATE");
        sim.send(b, "REPLICATE");
        sim.take_upstream();
        for w in [a, b] {
            sim.take_lines(w);
        }
        sim.send(
            a,
            "USER_SYNC AbCdE @a:hs start 15\nFEDERATION_ACK federation_sender 7\nCLEAR_USER_SYNC AbCdE\n\
             USER_IP @a:hs [\"tok\",\"1.2.3.4\",\"ua\",\"dev\",1]\nREMOTE_SERVER_UP other.example",
        );
        assert_eq!(
            forwarded(&mut sim),
            vec![
                "USER_SYNC AbCdE @a:hs start 15\n",
                "FEDERATION_ACK federation_sender 7\n",
                "CLEAR_USER_SYNC AbCdE\n",
                "USER_IP @a:hs [\"tok\",\"1.2.3.4\",\"ua\",\"dev\",1]\n",
                "REMOTE_SERVER_UP other.example\n",
            ]
        );
        // REMOTE_SERVER_UP comes back from the Redis to everyone; not delivered here as well.
        assert!(sim.take_lines(b).is_empty());
        assert!(sim.closed(a).is_none());
        // No release writes streams over TCP: a 1.22–1.66 master refuses RDATA from a worker.
        sim.send(b, "RDATA events w 5 [\"$e\"]");
        assert_eq!(sim.take_lines(b), vec!["ERROR invalid command: RDATA"]);
        assert!(forwarded(&mut sim).is_empty());
    }

    #[test]
    fn which_commands_may_reach_which_upstream() {
        use super::{upstream_verdict, UpstreamVerdict::*};
        use crate::proto::{CommandWord::*, SynapseRelease};
        let r = |m| SynapseRelease::new(m);
        let cases = [
            // (word, pinned release, learnt generation, verdict)
            (InvalidateCache, None, None, Forward),
            (InvalidateCache, None, Some(Generation::Seed), Forward),
            (InvalidateCache, None, Some(Generation::V1_13), Withhold),
            (InvalidateCache, None, Some(Generation::V1_22), Withhold),
            (InvalidateCache, r(13), Some(Generation::V1_13), Forward),
            (InvalidateCache, r(14), Some(Generation::V1_13), Answer),
            (RemovePusher, None, Some(Generation::V1_13), Forward),
            (RemovePusher, None, Some(Generation::V1_22), Withhold),
            (RemovePusher, r(28), Some(Generation::V1_22), Forward),
            (RemovePusher, r(29), Some(Generation::V1_22), Answer),
            (RemovePusher, r(66), None, Answer),
            // 1.10–1.12 know every seed command.
            (InvalidateCache, r(12), Some(Generation::V1_10), Forward),
            (RemovePusher, r(10), None, Forward),
        ];
        for (word, release, generation, want) in cases {
            assert_eq!(
                upstream_verdict(word, release, generation),
                want,
                "{word:?} {release:?} {generation:?}"
            );
        }
    }

    #[test]
    fn commands_a_learnt_upstream_may_not_know_are_withheld_not_forwarded() {
        let mut sim = sim(Generation::V1_22);
        let w = sim.accept();
        sim.send(
            w,
            "REPLICATE\nINVALIDATE_CACHE f [\"a\"]\nREMOVE_PUSHER m.http k @a:hs\nFEDERATION_ACK 3\n\
             FEDERATION_ACK fs 4",
        );
        assert_eq!(forwarded(&mut sim), vec!["FEDERATION_ACK fs 4\n"], "only what every 1.22+ master knows");
        assert!(sim.closed(w).is_none(), "the worker is not punished for it");
        assert_eq!(sim.hub.stats().withheld_commands, 3);
        // A 1.13-1.21 master: every one has REMOVE_PUSHER, only 1.13 has INVALIDATE_CACHE.
        let mut sim = sim_with(Generation::V1_13, None);
        let w = sim.accept();
        sim.send(
            w,
            "REPLICATE\nINVALIDATE_CACHE f [\"a\"]\nREMOVE_PUSHER m.http k @a:hs\nFEDERATION_ACK 5\nFEDERATION_ACK fs 6",
        );
        assert_eq!(
            forwarded(&mut sim),
            vec!["REMOVE_PUSHER m.http k @a:hs\n", "FEDERATION_ACK 5\n", "FEDERATION_ACK fs 6\n"],
            "1.13-1.17 take a token alone, 1.18-1.21 an instance and a token: the worker knows"
        );
        assert_eq!(sim.hub.stats().withheld_commands, 1);
    }

    #[test]
    fn a_pinned_release_answers_what_it_does_not_know_as_its_master_would() {
        let mut sim = sim_with(Generation::V1_22, SynapseRelease::new(22));
        let w = sim.accept();
        sim.send(w, "REPLICATE\nREMOVE_PUSHER m.http k @a:hs");
        assert_eq!(forwarded(&mut sim), vec!["REMOVE_PUSHER m.http k @a:hs\n"], "1.22 still knows it");
        sim.take_lines(w);
        sim.send(w, "INVALIDATE_CACHE get_user_by_id [\"@a:hs\"]");
        assert_eq!(
            sim.take_lines(w).last().map(String::as_str),
            Some("ERROR failed to parse line: KeyError('INVALIDATE_CACHE') ('INVALIDATE_CACHE get_user_by_id [\"@a:hs\"]'):")
        );
        assert!(sim.closed(w).is_some());
        assert!(forwarded(&mut sim).is_empty(), "never upstream");
        assert_eq!(sim.hub.stats().withheld_commands, 0);

        let mut sim = sim_with(Generation::V1_22, SynapseRelease::new(66));
        let w = sim.accept();
        sim.send(w, "REPLICATE\nREMOVE_PUSHER m.http k @a:hs");
        assert!(sim.take_lines(w).contains(
            &"ERROR failed to parse line: KeyError('REMOVE_PUSHER') ('REMOVE_PUSHER m.http k @a:hs'):"
                .to_owned()
        ));
        assert!(forwarded(&mut sim).is_empty());
    }

    #[test]
    fn a_worker_that_sent_a_bare_replicate_is_parsed_as_a_released_master_would() {
        let mut sim = sim(Generation::V1_22);
        // Before its bare REPLICATE, the seed's checks and texts.
        let w = sim.accept();
        sim.send(w, "FOO bar");
        assert_eq!(sim.take_lines(w).last().map(String::as_str), Some("ERROR invalid command: FOO"));
        let lines = |sim: &mut Sim, text: &str| {
            let w = sim.accept();
            sim.send(w, "REPLICATE");
            sim.take_lines(w);
            sim.send(w, text);
            let last = sim.take_lines(w).last().cloned();
            (last, sim.closed(w).is_some())
        };
        assert_eq!(
            lines(&mut sim, "FOO bar"),
            (Some("ERROR failed to parse line: KeyError('FOO') ('FOO bar'):".to_owned()), true)
        );
        assert_eq!(
            lines(&mut sim, "POSITION events master 1"),
            (
                Some(
                    "ERROR failed to parse line: ValueError('not enough values to unpack (expected 4, got 3)') \
                     ('POSITION events master 1'):"
                        .to_owned()
                ),
                true
            ),
            "parsed before the direction check"
        );
        assert_eq!(
            lines(&mut sim, "POSITION events master 1 1"),
            (Some("ERROR invalid command: POSITION".to_owned()), true)
        );
        let (_, closed) = lines(&mut sim, "USER_SYNC AbCdE @a:hs start 1");
        assert!(!closed, "its own commands still pass");
    }

    #[test]
    fn federation_acks_go_upstream_only_in_the_form_its_release_parses() {
        use super::{federation_ack_verdict, UpstreamVerdict::*};
        let r = SynapseRelease::new;
        assert_eq!(federation_ack_verdict(false, r(17), None), Forward);
        assert_eq!(federation_ack_verdict(true, r(17), None), Answer);
        assert_eq!(federation_ack_verdict(true, r(18), None), Forward);
        assert_eq!(federation_ack_verdict(false, r(18), None), Answer);
        assert_eq!(federation_ack_verdict(false, None, Some(Generation::V1_22)), Withhold);
        assert_eq!(federation_ack_verdict(true, None, Some(Generation::V1_22)), Forward);
        assert_eq!(federation_ack_verdict(false, None, Some(Generation::V1_13)), Forward);
        assert_eq!(federation_ack_verdict(false, None, Some(Generation::Seed)), Forward);

        let answer = |release: u16, generation, text: &str| {
            let mut sim = sim_with(generation, SynapseRelease::new(release));
            let w = sim.accept();
            sim.send(w, "REPLICATE");
            sim.take_lines(w);
            sim.send(w, text);
            assert!(forwarded(&mut sim).is_empty(), "{text}: not upstream");
            assert!(sim.closed(w).is_some());
            sim.take_lines(w).last().cloned().unwrap_or_default()
        };
        assert_eq!(
            answer(66, Generation::V1_22, "FEDERATION_ACK 5"),
            "ERROR failed to parse line: ValueError('not enough values to unpack (expected 2, got 1)') \
             ('FEDERATION_ACK 5'):"
        );
        assert_eq!(
            answer(17, Generation::V1_13, "FEDERATION_ACK federation_sender 5"),
            "ERROR failed to parse line: ValueError(\"invalid literal for int() with base 10: \
             'federation_sender 5'\") ('FEDERATION_ACK federation_sender 5'):"
        );
    }
}
