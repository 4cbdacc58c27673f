//! The Redis-mode command state machine under any bytes, in any chunking (the first byte picks
//! the read size, the second whether a password is required): it never panics, the same input
//! gives the same effects whole or in pieces, and after a `Close` nothing more comes out.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use replhub::resp::{Effect, RespLimits, Session, SessionConfig};

fn run(config: &Arc<SessionConfig>, data: &[u8], chunk: usize) -> Vec<Effect> {
    let mut s = Session::new(Arc::clone(config));
    let mut out = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        s.on_bytes(piece, &mut out);
    }
    out
}

fuzz_target!(|input: &[u8]| {
    let [chunk, auth, data @ ..] = input else { return };
    let config = Arc::new(SessionConfig {
        limits: RespLimits { max_args: 16, max_bulk_len: 4096, max_command_bytes: 8192 },
        password: (auth & 1 == 1).then(|| "pw".to_owned()),
        user: None,
    });
    let whole = run(&config, data, data.len());
    let split = run(&config, data, usize::from(*chunk));
    assert_eq!(whole, split, "chunking changed the effects");
    if let Some(i) = whole.iter().position(|e| *e == Effect::Close) {
        assert_eq!(i + 1, whole.len(), "effects after Close");
    }
});
