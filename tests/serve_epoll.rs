//! The server integration tests (tests/common/serve.rs) on the epoll (tokio) driver.
#[macro_use]
mod common;

serve_tests!(replhub::config::IoBackend::Epoll);
