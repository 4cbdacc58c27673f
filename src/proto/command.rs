//! Command words, which side may send them (PROTOCOL.md §2.1, §8), and [`Command`]: one
//! command with its arguments, the parser's result and the encoder's input alike.
use super::fields::{
    FederationAck, InvalidateCache, Position, Rdata, RemovePusher, ReplicateTarget, UserIp, UserSync,
};

/// Which end of a connection we are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The listening side (Synapse's master; replhub towards workers).
    Server,
    /// The connecting side (a worker; replhub towards the master).
    Client,
}

/// Every command word replhub knows: the 14 of the seed plus the later `CLEAR_USER_SYNC`
/// (PROTOCOL.md §8), so that each is handled deliberately rather than as "unknown".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CommandWord {
    /// `SERVER <server_name>`, S→C.
    Server,
    /// `RDATA <stream> <token|batch> <row_json>`, S→C.
    Rdata,
    /// `POSITION <stream> <token>`, S→C.
    Position,
    /// `SYNC <data>`, S→C (test hook).
    Sync,
    /// `NAME <client_name>`, C→S.
    Name,
    /// `REPLICATE <stream|ALL>`, C→S.
    Replicate,
    /// `USER_SYNC <user_id> <start|end> <last_sync_ms>`, C→S.
    UserSync,
    /// `FEDERATION_ACK <token>`, C→S.
    FederationAck,
    /// `REMOVE_PUSHER <app_id> <push_key> <user_id>`, C→S.
    RemovePusher,
    /// `INVALIDATE_CACHE <cache_func> <keys_json>`, C→S.
    InvalidateCache,
    /// `USER_IP <user_id> <json_array_5>`, C→S.
    UserIp,
    /// `PING <data>`, both.
    Ping,
    /// `ERROR <text>`, both.
    Error,
    /// `REMOTE_SERVER_UP <server_name>`, both.
    RemoteServerUp,
    /// `CLEAR_USER_SYNC <instance_id>`, C→S, Synapse 1.13+ only: not in the seed's inbound
    /// set, so a seed server answers it with `ERROR invalid command`.
    ClearUserSync,
}

impl CommandWord {
    /// Every known word.
    pub const ALL: [Self; 15] = [
        Self::Server,
        Self::Rdata,
        Self::Position,
        Self::Sync,
        Self::Name,
        Self::Replicate,
        Self::UserSync,
        Self::FederationAck,
        Self::RemovePusher,
        Self::InvalidateCache,
        Self::UserIp,
        Self::Ping,
        Self::Error,
        Self::RemoteServerUp,
        Self::ClearUserSync,
    ];

    /// Recognises a command word: exact, case-sensitive, no allocation.
    #[inline]
    pub fn parse(word: &[u8]) -> Option<Self> {
        Some(match word {
            b"RDATA" => Self::Rdata,
            b"PING" => Self::Ping,
            b"POSITION" => Self::Position,
            b"SERVER" => Self::Server,
            b"SYNC" => Self::Sync,
            b"NAME" => Self::Name,
            b"REPLICATE" => Self::Replicate,
            b"USER_SYNC" => Self::UserSync,
            b"FEDERATION_ACK" => Self::FederationAck,
            b"REMOVE_PUSHER" => Self::RemovePusher,
            b"INVALIDATE_CACHE" => Self::InvalidateCache,
            b"USER_IP" => Self::UserIp,
            b"ERROR" => Self::Error,
            b"REMOTE_SERVER_UP" => Self::RemoteServerUp,
            b"CLEAR_USER_SYNC" => Self::ClearUserSync,
            _ => return None,
        })
    }

    /// The wire spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Server => "SERVER",
            Self::Rdata => "RDATA",
            Self::Position => "POSITION",
            Self::Sync => "SYNC",
            Self::Name => "NAME",
            Self::Replicate => "REPLICATE",
            Self::UserSync => "USER_SYNC",
            Self::FederationAck => "FEDERATION_ACK",
            Self::RemovePusher => "REMOVE_PUSHER",
            Self::InvalidateCache => "INVALIDATE_CACHE",
            Self::UserIp => "USER_IP",
            Self::Ping => "PING",
            Self::Error => "ERROR",
            Self::RemoteServerUp => "REMOTE_SERVER_UP",
            Self::ClearUserSync => "CLEAR_USER_SYNC",
        }
    }

    /// Whether a peer in `role` accepts this word: the seed's inbound set (PROTOCOL.md §2.1)
    /// plus `CLEAR_USER_SYNC`, which replhub's hub accepts from Synapse 1.13+ workers and
    /// refuses from seed ones with the same `ERROR invalid command` a seed server sends.
    pub const fn accepted_by(self, role: Role) -> bool {
        match role {
            Role::Server => matches!(
                self,
                Self::Name
                    | Self::Replicate
                    | Self::Ping
                    | Self::UserSync
                    | Self::FederationAck
                    | Self::RemovePusher
                    | Self::InvalidateCache
                    | Self::UserIp
                    | Self::Error
                    | Self::RemoteServerUp
                    | Self::ClearUserSync
            ),
            Role::Client => matches!(
                self,
                Self::Server
                    | Self::Rdata
                    | Self::Position
                    | Self::Error
                    | Self::Ping
                    | Self::Sync
                    | Self::RemoteServerUp
            ),
        }
    }

    /// Whether a peer in `role` may send this word (the other side's inbound set).
    pub const fn sent_by(self, role: Role) -> bool {
        match role {
            Role::Server => self.accepted_by(Role::Client),
            Role::Client => self.accepted_by(Role::Server),
        }
    }
}

/// One command with its arguments, borrowed: what [`super::inbound::parse_args`] returns for a
/// received line (borrowing from the [`super::Line`]) and what [`Command::encode_into`] writes.
/// A variant with several arguments holds the same struct its `parse_*` function in
/// [`super::fields`] returns, so a parsed command re-encodes as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// `SERVER <server_name>`, S→C.
    Server(&'a str),
    /// `RDATA <stream> <token|batch> <row_json>`, S→C; the row is not parsed.
    Rdata(Rdata<'a>),
    /// `POSITION <stream> <token>`, S→C.
    Position(Position<'a>),
    /// `SYNC <data>`, S→C.
    Sync(&'a str),
    /// `NAME <client_name>`, C→S.
    Name(&'a str),
    /// `REPLICATE <stream|ALL>`, C→S.
    Replicate(ReplicateTarget<'a>),
    /// `USER_SYNC <user_id> <start|end> <last_sync_ms>`, C→S.
    UserSync(UserSync<'a>),
    /// `FEDERATION_ACK <token>`, C→S.
    FederationAck(FederationAck),
    /// `REMOVE_PUSHER <app_id> <push_key> <user_id>`, C→S.
    RemovePusher(RemovePusher<'a>),
    /// `INVALIDATE_CACHE <cache_func> <keys_json>`, C→S; when parsed, the JSON was validated.
    InvalidateCache(InvalidateCache<'a>),
    /// `USER_IP <user_id> <json_array_5>`, C→S; when parsed, the JSON was validated.
    UserIp(UserIp<'a>),
    /// `PING <data>`, both.
    Ping(&'a str),
    /// `ERROR <text>`, both.
    Error(&'a str),
    /// `REMOTE_SERVER_UP <server_name>`, both.
    RemoteServerUp(&'a str),
    /// `CLEAR_USER_SYNC <instance_id>` (1.13+; not accepted by a seed peer).
    ClearUserSync(&'a str),
}

impl Command<'_> {
    /// The command word.
    pub const fn word(&self) -> CommandWord {
        match self {
            Self::Server(_) => CommandWord::Server,
            Self::Rdata(_) => CommandWord::Rdata,
            Self::Position(_) => CommandWord::Position,
            Self::Sync(_) => CommandWord::Sync,
            Self::Name(_) => CommandWord::Name,
            Self::Replicate(_) => CommandWord::Replicate,
            Self::UserSync(_) => CommandWord::UserSync,
            Self::FederationAck(_) => CommandWord::FederationAck,
            Self::RemovePusher(_) => CommandWord::RemovePusher,
            Self::InvalidateCache(_) => CommandWord::InvalidateCache,
            Self::UserIp(_) => CommandWord::UserIp,
            Self::Ping(_) => CommandWord::Ping,
            Self::Error(_) => CommandWord::Error,
            Self::RemoteServerUp(_) => CommandWord::RemoteServerUp,
            Self::ClearUserSync(_) => CommandWord::ClearUserSync,
        }
    }
}

impl std::fmt::Display for CommandWord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_round_trips() {
        for w in CommandWord::ALL {
            assert_eq!(CommandWord::parse(w.as_str().as_bytes()), Some(w));
        }
        assert_eq!(CommandWord::parse(b"name"), None);
        assert_eq!(CommandWord::parse(b""), None);
        assert_eq!(CommandWord::parse(b"RDATA "), None);
    }

    #[test]
    fn inbound_tables_match_the_seed() {
        let server: Vec<_> = CommandWord::ALL.into_iter().filter(|w| w.accepted_by(Role::Server)).collect();
        assert_eq!(server.len(), 11, "the seed's 10 and CLEAR_USER_SYNC (1.13+)");
        let client: Vec<_> = CommandWord::ALL.into_iter().filter(|w| w.accepted_by(Role::Client)).collect();
        assert_eq!(client.len(), 7);
        assert!(CommandWord::ClearUserSync.accepted_by(Role::Server));
        assert!(!CommandWord::ClearUserSync.accepted_by(Role::Client));
        assert!(CommandWord::Rdata.sent_by(Role::Server));
        assert!(CommandWord::Ping.sent_by(Role::Client) && CommandWord::Ping.sent_by(Role::Server));
    }
}
