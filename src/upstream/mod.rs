//! The upstream: where replication data comes from (ARCHITECTURE.md §1, §3 item 1), sans-IO.
//!
//! ```text
//!   master ──TCP──► driver ──bytes──► UpstreamLink ──LinkEvent──► driver ──► every core's inbox
//!                      ▲                  │ ▲                              (Up / Batch / Down)
//!                      └──poll_transmit───┘ └── on_command(core, UpstreamCmd) ◄── cores
//! ```
//!
//! Two sources share one event interface ([`LinkEvent`]):
//! - [`UpstreamLink`]: the client-role connection to a Synapse master (or another replhub):
//!   handshake (`NAME`, `PING`, `REPLICATE ALL`), batches of relayable lines indexed without
//!   copying ([`batch::index_chunk`]), keep-alive, USER_SYNC merged across cores and
//!   re-announced after a reconnect (invariant 6), forwarded worker commands.
//! - [`SyntheticSource`]: the built-in synthetic master, for demos and load tests. It lives in
//!   [`crate::synthetic`] with its generator and is re-exported here beside the link.
//!
//! Neither does I/O nor reads the clock: time comes in as [`Now`](crate::time::Now).
//! Reconnecting is the driver's job, paced by [`Backoff`]: after `Down`, wait
//! `backoff.next_delay_ms()`, dial, call `on_connected`; reset the backoff on `Up`.
//!
//! A driver loop for the link, in outline:
//!
//! ```text
//!   loop {
//!       while let Some(ev) = link.poll_event() { fan out; if Up { backoff.reset() } }
//!       while let Some(line) = link.poll_transmit() { write it; link.on_sent(now) }
//!       if let Some(how) = link.wants_close() { close(how); link.on_disconnected(..) }
//!       wait for: readable (read into link.read_buffer(), then link.on_read(now)),
//!                 link.poll_timeout() (link.handle_timeout(now)),
//!                 a core's command (link.on_command(core, cmd, now)), EOF/error.
//!   }
//! ```

pub(crate) mod backoff;
pub(crate) mod batch;
pub(crate) mod fetch;
pub(crate) mod link;
pub(crate) mod redis_lines;
mod runs;

pub(crate) use crate::synthetic::SyntheticSource;
pub use backoff::BackoffConfig;
pub use batch::index_chunk;
pub(crate) use link::LinkEvent;
