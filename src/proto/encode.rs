//! Encoding commands, byte-identical to Synapse (`NAME + " " + args + "\n"`).
use bytes::BytesMut;

use super::error::EncodeError;
use super::fields::{SyncState, Token};

/// A command to write.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Command<'a> {
    /// `SERVER <name>`
    Server(&'a str),
    /// `RDATA <stream> <token|batch> <row>`
    Rdata {
        /// Stream name.
        stream: &'a str,
        /// Token.
        token: Token,
        /// Row JSON (already encoded).
        row: &'a [u8],
    },
    /// `POSITION <stream> <token>`
    Position {
        /// Stream name.
        stream: &'a str,
        /// Token.
        token: i64,
    },
    /// `SYNC <data>`
    Sync(&'a str),
    /// `NAME <name>`
    Name(&'a str),
    /// `REPLICATE <stream|ALL>`
    Replicate(&'a str),
    /// `USER_SYNC <user> <start|end> <ms>`
    UserSync {
        /// User id.
        user_id: &'a str,
        /// State.
        state: SyncState,
        /// Last sync ms.
        last_sync_ms: i64,
    },
    /// `FEDERATION_ACK <token>`
    FederationAck(i64),
    /// `REMOVE_PUSHER <app_id> <push_key> <user_id>`
    RemovePusher {
        /// App id.
        app_id: &'a str,
        /// Push key.
        push_key: &'a str,
        /// User id.
        user_id: &'a str,
    },
    /// `INVALIDATE_CACHE <func> <keys_json>`
    InvalidateCache {
        /// Cache function.
        cache_func: &'a str,
        /// Keys JSON.
        keys_json: &'a [u8],
    },
    /// `USER_IP <user> <json>`
    UserIp {
        /// User id.
        user_id: &'a str,
        /// JSON array.
        json: &'a [u8],
    },
    /// `PING <data>`
    Ping(&'a str),
    /// `ERROR <text>`
    Error(&'a str),
    /// `REMOTE_SERVER_UP <server>`
    RemoteServerUp(&'a str),
    /// `CLEAR_USER_SYNC <instance_id>`
    ClearUserSync(&'a str),
}

impl Command<'_> {
    /// Appends the line and its `\n` to `out`; on error nothing is appended.
    pub fn encode_into(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        let _ = out;
        todo!()
    }
}
