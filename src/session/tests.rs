//! Session tests with a fake clock.
use super::*;

fn cfg() -> SessionConfig {
    SessionConfig::default()
}

fn drain(s: &mut Session) -> Vec<String> {
    std::iter::from_fn(|| s.poll_transmit())
        .map(|b| String::from_utf8_lossy(&b).trim_end_matches('\n').to_owned())
        .collect()
}

fn t(ms: u64) -> Now {
    Now::new(ms, 1_583_254_800_000 + ms as i64)
}

#[test]
fn server_opening_sequence() {
    let mut s = Session::new(Role::Server, cfg(), t(0));
    s.start("example.com", &[], t(0));
    assert_eq!(drain(&mut s), vec!["SERVER example.com", "PING 1583254800000"]);
    s.start("again", &[], t(1));
    assert!(drain(&mut s).is_empty(), "start is idempotent");
}

#[test]
fn client_opening_sequence() {
    let mut s = Session::new(Role::Client, cfg(), t(0));
    s.start("worker1", &["caches", "events"], t(4));
    assert_eq!(
        drain(&mut s),
        vec!["NAME worker1", "PING 1583254800004", "REPLICATE caches", "REPLICATE events"]
    );
}

#[test]
fn direction_check_comes_before_parsing() {
    let mut s = Session::new(Role::Server, cfg(), t(0));
    s.on_bytes(b"NAME w\nRDATA garbage\nUSER_SYNC x start 1\n");
    let (w, _) = s.poll_line(t(1)).unwrap().unwrap();
    assert_eq!(w, CommandWord::Name);
    let err = s.poll_line(t(1)).unwrap().unwrap_err();
    assert_eq!(err.to_string(), "invalid command: RDATA");
    assert!(s.poll_line(t(1)).is_none(), "nothing is read after an error");
    assert_eq!(drain(&mut s), vec!["ERROR invalid command: RDATA"]);
    assert!(s.is_closing());
}

#[test]
fn carriage_return_stays_data_and_blank_lines_are_skipped() {
    let mut s = Session::new(Role::Client, cfg(), t(0));
    s.on_bytes(b"\n\nPING 123\r\n");
    let (w, line) = s.poll_line(t(0)).unwrap().unwrap();
    assert_eq!(w, CommandWord::Ping);
    assert_eq!(line.args(), b"123\r");
}

#[test]
fn over_long_line_is_an_error() {
    let mut s = Session::new(Role::Server, cfg(), t(0));
    s.on_bytes(&vec![b'a'; 16385]);
    assert_eq!(s.poll_line(t(0)).unwrap().unwrap_err(), PeerError::LineTooLong);
    assert_eq!(drain(&mut s), vec!["ERROR Line length exceeded"]);
}

#[test]
fn a_line_of_exactly_the_limit_is_accepted() {
    let mut s = Session::new(Role::Server, cfg(), t(0));
    let mut line = b"PING ".to_vec();
    line.resize(16384, b'x');
    line.push(b'\n');
    s.on_bytes(&line);
    assert_eq!(s.poll_line(t(0)).unwrap().unwrap().0, CommandWord::Ping);
}

#[test]
fn pings_only_after_five_idle_seconds() {
    let mut s = Session::new(Role::Server, cfg(), t(0));
    s.start("hs", &[], t(0));
    drain(&mut s);
    s.on_sent(t(0));
    s.on_sent(t(3_000));
    assert_eq!(s.handle_timeout(t(5_000)), TimerAction::None);
    assert!(drain(&mut s).is_empty(), "something was written 2 s ago");
    s.handle_timeout(t(10_000));
    assert_eq!(drain(&mut s), vec!["PING 1583254810000"]);
}

#[test]
fn ping_timeout_only_once_the_peer_pinged() {
    let mut s = Session::new(Role::Server, cfg(), t(0));
    s.start("hs", &[], t(0));
    drain(&mut s);
    for k in 1..=12 {
        s.handle_timeout(t(k * 5_000));
    }
    assert!(!s.is_closing(), "a peer that never pings is never timed out");
    s.on_bytes(b"PING 1\n");
    s.poll_line(t(60_000)).unwrap().unwrap();
    s.handle_timeout(t(85_000));
    assert!(!s.is_closing(), "exactly 25 s is not more than 25 s");
    s.handle_timeout(t(90_000));
    assert!(s.is_closing());
    assert_eq!(drain(&mut s).last().map(String::as_str), Some("ERROR ping timeout"));
}

#[test]
fn close_linger_aborts_after_25_seconds() {
    let mut s = Session::new(Role::Server, cfg(), t(0));
    s.close(t(1_000));
    assert_eq!(s.handle_timeout(t(25_000)), TimerAction::None);
    assert_eq!(s.handle_timeout(t(30_000)), TimerAction::Abort);
}

#[test]
fn the_close_linger_ends_on_time_not_on_the_next_ping_tick() {
    let mut s = Session::new(Role::Server, cfg(), t(0));
    s.close(t(1_000));
    assert_eq!(s.poll_timeout(), 5_000, "the regular tick comes first");
    assert_eq!(s.handle_timeout(t(5_000)), TimerAction::None);
    assert_eq!(s.poll_timeout(), 10_000);
    for k in 2..=5 {
        assert_eq!(s.handle_timeout(t(k * 5_000)), TimerAction::None);
    }
    assert_eq!(s.poll_timeout(), 26_001, "the linger's end, not the 30 s tick");
    assert_eq!(s.handle_timeout(t(26_000)), TimerAction::None, "exactly 25 s is not more than 25 s");
    assert_eq!(s.handle_timeout(t(26_001)), TimerAction::Abort);
    assert!(s.poll_timeout() > 26_001, "an expired linger does not keep the timer due");
}

#[test]
fn nothing_is_sent_after_closing() {
    let mut s = Session::new(Role::Server, cfg(), t(0));
    s.fail(&PeerError::WrongRemote, t(0));
    assert!(!s.send(&Command::Ping("1")));
    assert_eq!(drain(&mut s), vec!["ERROR Wrong remote"]);
    assert_eq!(s.error(), Some(&PeerError::WrongRemote));
}

#[test]
fn chunks_share_the_read_buffer() {
    let mut s = Session::new(Role::Client, cfg(), t(0));
    let buf = s.read_buffer();
    buf.reserve(64);
    buf.extend_from_slice(b"\nSERVER hs\nRDATA caches 1 [1]\nPI");
    let base = s.read_buffer().as_ptr();
    let chunk = s.poll_chunk(t(1)).unwrap().unwrap();
    assert_eq!(&chunk[..], b"SERVER hs\nRDATA caches 1 [1]\n");
    assert_eq!(chunk.as_ptr(), base.wrapping_add(1), "a slice of the read buffer, not a copy");
    assert!(s.poll_chunk(t(1)).is_none(), "the tail is not a line yet");
    s.on_bytes(b"NG 5\n");
    assert_eq!(&s.poll_chunk(t(2)).unwrap().unwrap()[..], b"PING 5\n");
}

#[test]
fn chunks_defer_the_ping_timeout_and_check_line_arms_it() {
    let mut s = Session::new(Role::Client, cfg(), t(0));
    s.start("w", &[], t(0));
    drain(&mut s);
    s.on_bytes(b"PING 1\n");
    let chunk = s.poll_chunk(t(0)).unwrap().unwrap();
    for k in 1..=12 {
        s.handle_timeout(t(k * 5_000));
    }
    assert!(!s.is_closing(), "an unchecked PING does not arm the timeout");
    assert_eq!(s.check_line(&Line::new(chunk.slice(..6)), t(60_000)), Ok(CommandWord::Ping));
    // Relayed lines are not checked, but still count as received.
    s.on_bytes(b"RDATA caches 1 [1]\n");
    s.poll_chunk(t(80_000)).unwrap().unwrap();
    s.handle_timeout(t(105_000));
    assert!(!s.is_closing(), "25 s after the last chunk is not more than 25 s");
    s.handle_timeout(t(110_000));
    assert!(s.is_closing());
    assert_eq!(drain(&mut s).last().map(String::as_str), Some("ERROR ping timeout"));
}

#[test]
fn check_line_failures_close_and_later_chunks_are_dropped() {
    let mut s = Session::new(Role::Client, cfg(), t(0));
    s.on_bytes(b"NAME x\n");
    let chunk = s.poll_chunk(t(0)).unwrap().unwrap();
    let err = s.check_line(&Line::new(chunk.slice(..6)), t(0)).unwrap_err();
    assert_eq!(err.to_string(), "invalid command: NAME");
    assert_eq!(drain(&mut s), vec!["ERROR invalid command: NAME"]);
    s.read_buffer().extend_from_slice(b"SERVER hs\n");
    assert!(s.poll_chunk(t(0)).is_none(), "nothing is read after an error");
    assert!(s.read_buffer().is_empty(), "and what arrived is dropped");
}

#[test]
fn over_long_line_in_a_chunk_is_an_error() {
    let mut s = Session::new(Role::Client, cfg(), t(0));
    s.on_bytes(b"PING 1\n");
    s.on_bytes(&vec![b'a'; 16385]);
    assert_eq!(&s.poll_chunk(t(0)).unwrap().unwrap()[..], b"PING 1\n");
    assert_eq!(s.poll_chunk(t(0)).unwrap().unwrap_err(), PeerError::LineTooLong);
    assert_eq!(drain(&mut s), vec!["ERROR Line length exceeded"]);
    assert!(s.poll_chunk(t(0)).is_none());
}
