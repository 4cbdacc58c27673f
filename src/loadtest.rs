//! `replhub loadtest`.
