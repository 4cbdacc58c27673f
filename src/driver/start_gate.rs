//! The start-up gate: no core accepts a connection before every thread of the server holds
//! the file descriptors it needs of its own (a core's ring or runtime, the source thread's
//! runtime) and the metrics endpoint is listening.
//!
//! Listeners are bound (so the kernel queues connections) before the threads start. Without
//! the gate, a crowd of workers reconnecting while replhub starts under a low `ulimit -n` was
//! accepted by the first core that ran, and took the descriptors a later thread still needed:
//! that thread failed to start and replhub exited (found by `scripts/chaos`). With it, the
//! threads take their descriptors first; a crowd then only meets the accept loop's own
//! handling of `EMFILE`, which waits and retries.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Where the start-up stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Threads are still taking their descriptors.
    Closed,
    /// Everything is ready: accept.
    Open,
    /// Start-up failed elsewhere: the waiting threads return without serving.
    Aborted,
}

#[derive(Debug)]
struct Gate {
    ready: usize,
    state: State,
}

/// Shared by the server and every thread it starts (clones share the gate).
#[derive(Clone, Debug)]
pub struct StartGate {
    inner: Arc<(Mutex<Gate>, Condvar)>,
}

impl StartGate {
    /// A closed gate: threads wait in [`StartGate::ready`] until [`StartGate::open`].
    pub(crate) fn new() -> Self {
        Self { inner: Arc::new((Mutex::new(Gate { ready: 0, state: State::Closed }), Condvar::new())) }
    }

    /// An open gate, for a core run on its own (tests): [`StartGate::ready`] returns at once.
    pub fn open_now() -> Self {
        let gate = Self::new();
        gate.open();
        gate
    }

    fn lock(&self) -> MutexGuard<'_, Gate> {
        // A panic while holding this lock cannot leave the counter half-updated.
        self.inner.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called by a thread once it holds its descriptors: waits for the gate to open. `false`
    /// means start-up was abandoned and the thread should return without serving.
    pub(crate) fn ready(&self) -> bool {
        let mut gate = self.lock();
        gate.ready += 1;
        self.inner.1.notify_all();
        loop {
            match gate.state {
                State::Open => return true,
                State::Aborted => return false,
                State::Closed => gate = self.inner.1.wait(gate).unwrap_or_else(PoisonError::into_inner),
            }
        }
    }

    /// Waits until `threads` threads are [`StartGate::ready`]; `false` as soon as `gave_up`
    /// says one of them ended instead (it failed to take its descriptors).
    pub(crate) fn wait_ready(&self, threads: usize, mut gave_up: impl FnMut() -> bool) -> bool {
        let mut gate = self.lock();
        loop {
            if gate.ready >= threads {
                return true;
            }
            if gave_up() {
                return false;
            }
            // A thread that fails does not come through the gate, so its end is polled for.
            gate = self
                .inner
                .1
                .wait_timeout(gate, Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Lets every waiting (and later) thread through.
    pub(crate) fn open(&self) {
        self.set(State::Open);
    }

    /// Sends every waiting (and later) thread home.
    pub(crate) fn abort(&self) {
        self.set(State::Aborted);
    }

    fn set(&self, state: State) {
        let mut gate = self.lock();
        if gate.state == State::Closed {
            gate.state = state;
        }
        self.inner.1.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_wait_until_the_gate_opens() {
        let gate = StartGate::new();
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let g = gate.clone();
                std::thread::spawn(move || g.ready())
            })
            .collect();
        assert!(gate.wait_ready(3, || false));
        assert!(threads.iter().all(|t| !t.is_finished()), "nobody passes a closed gate");
        gate.open();
        assert!(threads.into_iter().all(|t| t.join().unwrap()));
        assert!(gate.ready(), "an open gate lets a late thread through at once");
    }

    #[test]
    fn an_aborted_start_sends_the_waiting_threads_home() {
        let gate = StartGate::new();
        let g = gate.clone();
        let waiting = std::thread::spawn(move || g.ready());
        assert!(!gate.wait_ready(2, || true), "gives up when a thread ended instead");
        gate.abort();
        assert!(!waiting.join().unwrap());
        gate.open();
        assert!(!gate.ready(), "an aborted gate stays aborted");
    }
}
