//! The public client library: see issue 4.
