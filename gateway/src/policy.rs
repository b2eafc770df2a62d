//! Pure session policy: close reasons and their codes, the publish token bucket,
//! heartbeat deadlines and the movable authentication deadline. No I/O; callers pass `now`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Why the server ends a session. One mapping to close codes: [`CloseReason::code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The client closed, or the server ended the session normally.
    Normal,
    /// The gateway is draining; reconnect elsewhere.
    Drain,
    /// Invalid WebSocket framing.
    Protocol,
    /// A binary frame.
    Binary,
    /// A text frame that is not UTF-8.
    InvalidUtf8,
    /// A message over the size limit.
    TooBig,
    /// A server failure.
    Internal,
    /// No pong or traffic within the heartbeat window.
    HeartbeatTimeout,
    /// The token expired during the session.
    TokenExpired,
    /// The send queue overflowed.
    SlowConsumer,
    /// Kept sending while rate-limited.
    Flood,
    /// Disconnected through the Push API.
    Kicked,
    /// The peer vanished without a close frame (reset, EOF).
    Gone,
    /// This gateway was stalled long enough for the cluster to drop it (cluster mode):
    /// messages may have been missed; reconnect and re-fetch.
    Stalled,
    /// A session opened without a token did not authenticate with `connect`
    /// (a bad token, another first command, or none before the deadline).
    Unauthenticated,
    /// A session authenticated by `connect` names a user who already holds
    /// `--max-connections-per-user` sessions on this node: try again later (elsewhere).
    UserLimit,
}

impl CloseReason {
    /// All reasons, for describing metrics.
    pub const ALL: [CloseReason; 16] = [
        Self::Normal,
        Self::Drain,
        Self::Protocol,
        Self::Binary,
        Self::InvalidUtf8,
        Self::TooBig,
        Self::Internal,
        Self::HeartbeatTimeout,
        Self::TokenExpired,
        Self::SlowConsumer,
        Self::Flood,
        Self::Kicked,
        Self::Gone,
        Self::Stalled,
        Self::Unauthenticated,
        Self::UserLimit,
    ];

    /// The WebSocket close code sent for this reason (docs/protocol.md).
    pub fn code(self) -> u16 {
        match self {
            Self::Normal | Self::Gone => 1000,
            Self::Drain | Self::Stalled => 1001,
            Self::Protocol => 1002,
            Self::Binary => 1003,
            Self::InvalidUtf8 => 1007,
            Self::TooBig => 1009,
            Self::Internal => 1011,
            Self::HeartbeatTimeout => 4000,
            Self::TokenExpired => 4001,
            Self::SlowConsumer => 4002,
            Self::Flood => 4003,
            Self::Kicked => 4004,
            Self::Unauthenticated => 4005,
            Self::UserLimit => 1013,
        }
    }

    /// Closed label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Drain => "drain",
            Self::Protocol => "protocol_error",
            Self::Binary => "binary_frame",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::TooBig => "too_big",
            Self::Internal => "internal",
            Self::HeartbeatTimeout => "heartbeat_timeout",
            Self::TokenExpired => "token_expired",
            Self::SlowConsumer => "slow_consumer",
            Self::Flood => "flood",
            Self::Kicked => "kicked",
            Self::Gone => "gone",
            Self::Stalled => "stalled",
            Self::Unauthenticated => "unauthenticated",
            Self::UserLimit => "user_limit",
        }
    }

    /// Compact encoding for an atomic.
    pub fn to_u8(self) -> u8 {
        Self::ALL.iter().position(|r| *r == self).map_or(0, |i| i as u8 + 1)
    }

    /// Inverse of [`CloseReason::to_u8`]; 0 is "none".
    pub fn from_u8(v: u8) -> Option<Self> {
        v.checked_sub(1).and_then(|i| Self::ALL.get(usize::from(i)).copied())
    }
}

/// Publish rate limit: a token bucket refilled continuously.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    /// Commands refused in a row; reset by an accepted one.
    refused_in_row: u32,
}

/// What the bucket says about one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    Allow,
    /// Refuse it; a token is back after this long.
    Refuse {
        retry_after: Duration,
    },
    /// Refused too many times in a row: close the session.
    Flood,
}

impl TokenBucket {
    pub fn new(rate_per_sec: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate_per_sec: f64::from(rate_per_sec),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
            refused_in_row: 0,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> RateDecision {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate_per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused_in_row = 0;
            return RateDecision::Allow;
        }
        self.refused_in_row += 1;
        if f64::from(self.refused_in_row) > self.burst {
            return RateDecision::Flood;
        }
        let missing = 1.0 - self.tokens;
        RateDecision::Refuse { retry_after: Duration::from_secs_f64(missing / self.rate_per_sec) }
    }

    /// Refilled to its burst by `now`, nothing refused since: the same as a new bucket.
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate_per_sec >= self.burst && self.refused_in_row == 0
    }
}

/// Heartbeat state of one session: when to ping, when to give up.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    last_seen: Instant,
    next_ping: Instant,
}

/// What the heartbeat wants done now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatAction {
    /// Nothing until this instant.
    Wait(Instant),
    /// Send a ping now.
    Ping,
    /// The peer is dead.
    Timeout,
}

impl Heartbeat {
    pub fn new(interval: Duration, timeout: Duration, now: Instant) -> Self {
        Self { interval, timeout, last_seen: now, next_ping: now + interval }
    }

    /// The peer sent something at `seen` (any frame counts, a pong too).
    pub fn seen(&mut self, seen: Instant) {
        if seen > self.last_seen {
            self.last_seen = seen;
        }
    }

    /// Decides what to do at `now`.
    pub fn poll(&mut self, now: Instant) -> HeartbeatAction {
        let dead_at = self.last_seen + self.interval + self.timeout;
        if now >= dead_at {
            return HeartbeatAction::Timeout;
        }
        if now >= self.next_ping {
            self.next_ping = now + self.interval;
            return HeartbeatAction::Ping;
        }
        HeartbeatAction::Wait(self.next_ping.min(dead_at))
    }
}

/// What a session's authentication deadline stands for, as an offset from the session's
/// start (the same clock as the heartbeat's `last_seen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthLimit {
    /// Nothing runs out (anonymous sessions).
    Never,
    /// The token expires then: close with 4001.
    Token(Duration),
    /// `connect` must have arrived by then: close with 4005.
    Connect(Duration),
}

impl AuthLimit {
    /// The deadline as an instant, for a session started at `started`.
    pub fn at(self, started: Instant) -> Option<Instant> {
        match self {
            Self::Never => None,
            Self::Token(d) | Self::Connect(d) => Some(started + d),
        }
    }

    /// Whether the deadline has passed at `now`.
    pub fn due(self, started: Instant, now: Instant) -> bool {
        self.at(started).is_some_and(|at| now >= at)
    }

    /// The limit for a token expiring at `exp` (unix seconds), when the wall clock says
    /// `now_unix` and the session started `elapsed` ago.
    pub fn token(exp: u64, now_unix: Duration, elapsed: Duration) -> Self {
        Self::Token(elapsed.saturating_add(Duration::from_secs(exp).saturating_sub(now_unix)))
    }
}

/// A session's [`AuthLimit`], moved by the ingress loop (`connect`, `refresh`) and read
/// by the egress loop, whose one timer serves it and the heartbeat: no timer of its own.
/// Milliseconds since the session started in the low 62 bits; the top bits say which limit.
#[derive(Debug)]
pub struct AuthDeadline(AtomicU64);

const NEVER: u64 = 0;
const TOKEN: u64 = 1 << 62;
const CONNECT: u64 = 2 << 62;
const KIND: u64 = 3 << 62;

impl AuthDeadline {
    pub fn new(limit: AuthLimit) -> Self {
        Self(AtomicU64::new(Self::encode(limit)))
    }

    pub fn set(&self, limit: AuthLimit) {
        self.0.store(Self::encode(limit), Ordering::Release);
    }

    /// Whether the session still has to authenticate with `connect`.
    pub fn awaiting_connect(&self) -> bool {
        matches!(self.get(), AuthLimit::Connect(_))
    }

    pub fn get(&self) -> AuthLimit {
        let v = self.0.load(Ordering::Acquire);
        let at = Duration::from_millis(v & !KIND);
        match v & KIND {
            TOKEN => AuthLimit::Token(at),
            CONNECT => AuthLimit::Connect(at),
            _ => AuthLimit::Never,
        }
    }

    fn encode(limit: AuthLimit) -> u64 {
        // Rounded up: a deadline never fires before its time. Clamped far beyond any session.
        let ms = |d: Duration| d.as_micros().div_ceil(1000).min(u128::from(!KIND)) as u64;
        match limit {
            AuthLimit::Never => NEVER,
            AuthLimit::Token(d) => TOKEN | ms(d),
            AuthLimit::Connect(d) => CONNECT | ms(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_round_trip_and_are_distinct_where_documented() {
        for r in CloseReason::ALL {
            assert_eq!(CloseReason::from_u8(r.to_u8()), Some(r));
        }
        assert_eq!(CloseReason::from_u8(0), None);
        assert_eq!(CloseReason::SlowConsumer.code(), 4002);
        assert_eq!(CloseReason::TooBig.code(), 1009);
        assert_eq!(CloseReason::Drain.code(), 1001);
        assert_eq!(CloseReason::Unauthenticated.code(), 4005);
    }

    #[test]
    fn auth_deadline_moves_and_keeps_its_kind() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let d = AuthDeadline::new(AuthLimit::Connect(5 * s));
        assert_eq!(d.get(), AuthLimit::Connect(5 * s));
        assert!(!d.get().due(t0, t0 + 4 * s));
        assert!(d.get().due(t0, t0 + 5 * s));
        // `connect` replaces the connect deadline with the token's expiry...
        d.set(AuthLimit::Token(60 * s));
        assert_eq!(d.get().at(t0), Some(t0 + 60 * s));
        assert!(!d.get().due(t0, t0 + 59 * s));
        // ...and a refresh moves it, later or earlier.
        d.set(AuthLimit::Token(3600 * s));
        assert!(!d.get().due(t0, t0 + 60 * s));
        d.set(AuthLimit::Token(10 * s));
        assert!(d.get().due(t0, t0 + 10 * s));
        d.set(AuthLimit::Never);
        assert_eq!(d.get().at(t0), None);
        assert!(!d.get().due(t0, t0 + 1_000_000 * s));
        // Sub-millisecond parts round up, never down.
        d.set(AuthLimit::Token(Duration::from_micros(1500)));
        assert_eq!(d.get(), AuthLimit::Token(Duration::from_millis(2)));
        // An absurd exp is far away (clamped), never wrapped around to a near deadline.
        d.set(AuthLimit::token(u64::MAX, 1000 * s, 7 * s));
        assert!(!d.get().due(t0, t0 + 100 * 365 * 24 * 3600 * s));
        assert!(!d.awaiting_connect());
        d.set(AuthLimit::Connect(s));
        assert!(d.awaiting_connect());
    }

    #[test]
    fn token_limit_is_the_exp_on_the_session_clock() {
        let s = Duration::from_secs(1);
        // Session started 7 s ago; the wall clock says 1000 s; exp at 1030 s: 37 s after the start.
        assert_eq!(AuthLimit::token(1030, 1000 * s, 7 * s), AuthLimit::Token(37 * s));
        // An exp already past (within the verifier's leeway) is due at once.
        assert_eq!(AuthLimit::token(990, 1000 * s, 7 * s), AuthLimit::Token(7 * s));
        // Fractions of the current second count: exp 1030 at 1000.4 s is 29.6 s away.
        assert_eq!(
            AuthLimit::token(1030, Duration::from_millis(1_000_400), Duration::ZERO),
            AuthLimit::Token(29_600 * s / 1000)
        );
    }

    #[test]
    fn bucket_allows_burst_then_refuses_then_floods() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3, t0);
        for _ in 0..3 {
            assert_eq!(b.take(t0), RateDecision::Allow);
        }
        match b.take(t0) {
            RateDecision::Refuse { retry_after } => {
                assert!(retry_after <= Duration::from_millis(100), "{retry_after:?}")
            }
            other => panic!("expected refuse, got {other:?}"),
        }
        // 100 ms later one token is back.
        assert_eq!(b.take(t0 + Duration::from_millis(100)), RateDecision::Allow);
        let t1 = t0 + Duration::from_millis(100);
        for _ in 0..3 {
            assert!(matches!(b.take(t1), RateDecision::Refuse { .. }));
        }
        assert_eq!(b.take(t1), RateDecision::Flood);
    }

    #[test]
    fn heartbeat_pings_then_times_out_unless_seen() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut h = Heartbeat::new(10 * s, 5 * s, t0);
        assert_eq!(h.poll(t0), HeartbeatAction::Wait(t0 + 10 * s));
        assert_eq!(h.poll(t0 + 10 * s), HeartbeatAction::Ping);
        assert_eq!(h.poll(t0 + 11 * s), HeartbeatAction::Wait(t0 + 15 * s));
        // A pong at 12 s pushes the deadline to 27 s.
        h.seen(t0 + 12 * s);
        assert_eq!(h.poll(t0 + 16 * s), HeartbeatAction::Wait(t0 + 20 * s));
        assert_eq!(h.poll(t0 + 20 * s), HeartbeatAction::Ping);
        assert_eq!(h.poll(t0 + 27 * s), HeartbeatAction::Timeout);
    }
}
