//! Transports: how a session's frames travel. The session core (`crate::session`)
//! does not care; each transport only reads the client's commands and frames what
//! the session queues for it.
//!
//! - [`ws`]: WebSocket (`GET /ws`), both directions on one socket;
//! - [`sse`]: Server-Sent Events (`GET /sse`), the server's half, with the client's
//!   commands over plain HTTP ([`http`]: `POST /command`);
//! - [`poll`]: HTTP long-polling (`GET`/`POST /poll`), stateless between requests;
//! - [`event_id`]: the positions an SSE event id or a poll cursor carries.

pub mod event_id;
pub mod http;
pub mod poll;
pub mod sse;
pub mod ws;

use crate::metrics as m;

/// Which transport carries a session (the `transport` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Sse,
    Poll,
}

impl Transport {
    pub const ALL: [Transport; 3] = [Self::WebSocket, Self::Sse, Self::Poll];

    pub fn label(self) -> &'static str {
        match self {
            Self::WebSocket => "websocket",
            Self::Sse => "sse",
            Self::Poll => "poll",
        }
    }
}

/// Counts a session of one transport while it lives (opened, active).
#[derive(Debug)]
pub(crate) struct Opened(Transport);

impl Opened {
    pub(crate) fn new(t: Transport) -> Self {
        metrics::counter!(m::TRANSPORT_SESSIONS_OPENED, "transport" => t.label()).increment(1);
        metrics::gauge!(m::TRANSPORT_SESSIONS_ACTIVE, "transport" => t.label()).increment(1.0);
        Self(t)
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        metrics::gauge!(m::TRANSPORT_SESSIONS_ACTIVE, "transport" => self.0.label()).decrement(1.0);
    }
}
