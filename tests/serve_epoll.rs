//! The server integration tests (tests/common/serve.rs) on the epoll (tokio) driver.
// Integration tests wait for real processes and sockets with real deadlines.
#![allow(clippy::disallowed_methods)]
#[macro_use]
mod common;

serve_tests!(replhub::config::IoBackend::Epoll);
