//! Positions and history pages (docs/protocol.md "Positions and recovery"): what
//! the bus answers when a session recovers or a client asks for `history`,
//! whichever mode keeps the history (the hub's rings standalone, broker-bridge
//! in a cluster).

use std::sync::Arc;

use bytes::Bytes;

/// A point in a channel's stream: later messages have a greater `seq` in the same `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub seq: u64,
    pub epoch: Arc<str>,
}

/// Why a request for the messages after a position cannot be answered completely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// The position's epoch is not the channel's current one.
    EpochChanged,
    /// A message after the position is no longer retained.
    TooOld,
    /// More lies after the position than one recovery (or read) may return.
    TooMany,
    /// The position is beyond the channel's current one.
    Ahead,
    /// The channel keeps no history.
    NoHistory,
    /// The history could not be read now (a cluster's bridges did not answer).
    Unavailable,
}

impl Lost {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EpochChanged => "epoch_changed",
            Self::TooOld => "too_old",
            Self::TooMany => "too_many",
            Self::Ahead => "ahead",
            Self::NoHistory => "no_history",
            Self::Unavailable => "unavailable",
        }
    }

    pub fn from_pb(lost: i32) -> Option<Self> {
        use proto::push::v1::history_response::Lost as L;
        match L::try_from(lost).unwrap_or(L::TooOld) {
            L::None => None,
            L::EpochChanged => Some(Self::EpochChanged),
            L::TooOld => Some(Self::TooOld),
            L::TooMany => Some(Self::TooMany),
            L::Ahead => Some(Self::Ahead),
            L::NoHistory => Some(Self::NoHistory),
        }
    }

    pub fn to_pb(self) -> proto::push::v1::history_response::Lost {
        use proto::push::v1::history_response::Lost as L;
        match self {
            Self::EpochChanged => L::EpochChanged,
            Self::TooOld | Self::Unavailable => L::TooOld,
            Self::TooMany => L::TooMany,
            Self::Ahead => L::Ahead,
            Self::NoHistory => L::NoHistory,
        }
    }
}

/// One retained message: its seq and its encoded `message` frame (as live
/// subscribers get it, WebSocket header included).
#[derive(Debug, Clone)]
pub struct Item {
    pub seq: u64,
    pub frame: Bytes,
    /// For the Push API: id, from, data and when it was accepted.
    pub meta: Option<Arc<ItemMeta>>,
}

#[derive(Debug)]
pub struct ItemMeta {
    pub id: String,
    pub from: String,
    pub data: String,
    pub published_at_ms: u64,
    pub idempotent: bool,
}

/// An answer to a history read.
#[derive(Debug, Clone)]
pub struct Page {
    /// Oldest first; empty when `lost` is set.
    pub items: Vec<Item>,
    /// The stream position the answer is complete through (`None`: not known).
    pub position: Option<Position>,
    /// The read stopped at its limit: more follows the last item.
    pub more: bool,
    pub lost: Option<Lost>,
}

impl Page {
    pub fn lost(lost: Lost, position: Option<Position>) -> Self {
        Self { items: Vec::new(), position, more: false, lost: Some(lost) }
    }
}

/// Most messages one `history` command or Push API call returns.
pub const PAGE_MAX: usize = 1000;
/// Messages a `history` command returns without a `limit`.
pub const PAGE_DEFAULT: usize = 100;

/// The JSON text of an encoded server frame (its WebSocket header skipped).
pub fn json_of(frame: &Bytes) -> Bytes {
    let header = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.slice(header.min(frame.len())..)
}
