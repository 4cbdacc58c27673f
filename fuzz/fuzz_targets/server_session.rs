//! The server side of a worker connection, through the hub: arbitrary bytes in arbitrary
//! chunks from two workers, with writes that stall at random. Never panics; every line written
//! to a worker is one Synapse could have written (a known command word, at most 16384 bytes);
//! after an ERROR nothing more is written; the log stays within the eviction bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replhub::config::HubConfig;
use replhub::proto::{CommandWord, StreamId, Token, MAX_LINE_LEN};
use replhub::testing::hub::sim::{Capacity, Sim};

fuzz_target!(|data: &[u8]| {
    let config = HubConfig { max_pending_bytes: 16 * 1024, ..HubConfig::default() };
    let mut sim = Sim::new(config);
    sim.connect_upstream("example.com", Sim::positions());
    let a = sim.accept();
    let b = sim.accept();
    sim.send(b, "REPLICATE ALL");
    let mut token = 1_000;
    for (i, chunk) in data.chunks(7).enumerate() {
        let who = if chunk[0] & 1 == 0 { a } else { b };
        match chunk[0] >> 5 {
            0 => sim.set_capacity(who, Capacity::Stalled),
            1 => sim.set_capacity(who, Capacity::PerWrite(1 + usize::from(chunk[0] & 15))),
            2 => sim.set_capacity(who, Capacity::Unlimited),
            3 => {
                token += 1;
                let s = StreamId::ALL[usize::from(chunk[0]) % 16];
                let t = if chunk[0] & 2 == 0 { Token::Batch } else { Token::Value(token) };
                sim.batch(&[(s, t)]);
            }
            4 => sim.advance(u64::from(chunk[0] & 31) * 200),
            _ => sim.send_raw(who, &chunk[1..]),
        }
        assert!(sim.hub.log().held_bytes() <= 16 * 1024 + 4096, "step {i}");
    }
    for w in [a, b] {
        sim.set_capacity(w, Capacity::Unlimited);
        let mut errored = false;
        for line in sim.take_lines(w) {
            assert!(!errored, "a line after ERROR: {line}");
            assert!(line.len() <= MAX_LINE_LEN);
            let word = line.split(' ').next().unwrap_or("");
            assert!(CommandWord::parse(word.as_bytes()).is_some(), "unknown word in {line:?}");
            errored = word == "ERROR";
        }
    }
});
