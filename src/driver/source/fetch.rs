//! Catch-up fetches from a 1.10–1.12 master, each on a connection of its own.

use std::sync::mpsc::TrySendError;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{Source, HOLD_RETRY};
use crate::config::SourceConfig;
use crate::driver::CoreMsg;
use crate::proto::StreamId;
use crate::upstream::fetch::{Fetch, FetchResult};

/// At most this many catch-up fetches from a 1.10–1.12 master at once.
pub(super) const MAX_FETCHES: usize = 4;
/// A catch-up fetch that has not ended after this long fails.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// One catch-up fetch from a 1.10–1.12 master (see `upstream::fetch`): connect, ask, read the
/// rows until the stream's POSITION, close.
async fn fetch(addr: &str, stream: StreamId, from: i64) -> FetchResult {
    use tokio::io::AsyncBufReadExt;
    let run = async {
        let mut sock = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let _ = sock.set_nodelay(true);
        let (mut state, lines) = Fetch::new(stream, from);
        for line in lines {
            sock.write_all(&line).await.map_err(|e| format!("write: {e}"))?;
        }
        let mut reader = tokio::io::BufReader::new(sock);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 || line.last() != Some(&b'\n') {
                return Err("the master closed the catch-up connection before its POSITION".to_owned());
            }
            line.pop();
            if let Some(done) = state.on_line(&line) {
                return done;
            }
        }
    };
    tokio::time::timeout(FETCH_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| Err("catch-up fetch timed out".to_owned()))
}

impl Source {
    /// Fetches a stream's rows after `from` from the master on a connection of its own (a
    /// task beside the main connection), and sends them to core `core` as
    /// [`CoreMsg::Fetched`]. At most [`MAX_FETCHES`] run at once; the others wait.
    pub(super) fn start_fetch(&mut self, core: usize, id: u64, stream: StreamId, from: i64) {
        let Some(inbox) = self.ctx.cores.get(core).cloned() else { return };
        let addr = match &self.ctx.source {
            SourceConfig::Upstream { addr, .. } => Some(addr.clone()),
            SourceConfig::Synthetic { .. } | SourceConfig::Redis(_) | SourceConfig::None => None,
        };
        let permits = Arc::clone(&self.fetch_permits);
        tokio::spawn(async move {
            let result = match addr {
                Some(addr) => {
                    let _permit = permits.acquire().await;
                    fetch(&addr, stream, from).await
                }
                None => Err("no 1.10-1.12 master to fetch from".to_owned()),
            };
            let mut msg = CoreMsg::Fetched { id, result };
            // The core's mailbox may be full: retry, as the source does for batches.
            loop {
                match inbox.try_send(msg) {
                    Ok(()) | Err(TrySendError::Disconnected(_)) => return,
                    Err(TrySendError::Full(m)) => {
                        msg = m;
                        tokio::time::sleep(HOLD_RETRY).await;
                    }
                }
            }
        });
    }
}
