//! The server integration tests (tests/common/serve.rs) on the io_uring driver. `--io uring`
//! makes a failed probe fatal, so on a machine without io_uring these fail loudly instead of
//! quietly testing epoll twice.
// Integration tests wait for real processes and sockets with real deadlines.
#![allow(clippy::disallowed_methods)]
#[macro_use]
mod common;

serve_tests!(replhub::config::IoBackend::Uring);
