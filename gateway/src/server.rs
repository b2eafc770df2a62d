//! Accept: the client listener, the socket and session caps, hyper's HTTP/1 or
//! HTTP/2 (cleartext, prior knowledge: chosen by the connection's first bytes)
//! connection with a header-read timeout (slowloris), TLS in front when configured
//! (`tls/mod.rs`), and the drain.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::handshake;
use crate::metrics as m;
use crate::pending::HalfOpen;
use crate::policy::CloseReason;
use crate::session::{self, Node};

/// File descriptors kept back for everything that is not a client socket.
pub const FD_RESERVE: u64 = 128;
/// Sockets kept back above the session cap, so that refusals (503) can still be answered.
pub const HANDSHAKE_HEADROOM: u64 = 512;

/// The session cap and the cap on not-yet-upgraded HTTP connections derived
/// from an open-files limit: together with [`FD_RESERVE`] they never exceed it.
pub fn caps_from_nofile(nofile: u64) -> (usize, usize) {
    caps_for_fds(nofile, 1)
}

/// [`caps_from_nofile`] for connections that hold `fds` descriptors each (3 with TLS:
/// the client's socket and a loopback pair, see `tls/mod.rs`).
pub fn caps_for_fds(nofile: u64, fds: u64) -> (usize, usize) {
    let fds = fds.max(1);
    let pending = HANDSHAKE_HEADROOM.min(nofile / fds / 8).max(4);
    let sessions = (nofile.saturating_sub(FD_RESERVE) / fds).saturating_sub(pending).max(4);
    (sessions as usize, pending as usize)
}

/// Everything the client port needs to serve.
#[derive(Debug)]
pub struct Server {
    pub node: Arc<Node>,
    pub verifier: Verifier,
    pub anonymous: bool,
    pub allowed_origins: Vec<String>,
    pub echo_route: bool,
    pub handshake_timeout: Duration,
    pub max_sessions: usize,
    /// Slots of `max_sessions` an SSE stream or a waiting poll takes (see `Settings`).
    pub http_session_weight: usize,
    pub max_pending: usize,
    pub sessions: AtomicUsize,
    /// Sessions per client address, when `max_per_ip` is set (0: no per-address cap).
    pub max_per_ip: u32,
    per_ip: parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>,
    pub pending: AtomicUsize,
    /// Connections that have not sent a complete request yet (see `pending.rs`).
    half_open: parking_lot::Mutex<HalfOpen>,
    socket_freed: Notify,
    pub next_conn_id: AtomicU64,
    /// Cancelled when the drain starts: no new sessions.
    pub draining: CancellationToken,
    /// Cancelled at the end of the drain window: every remaining session closes.
    pub stop_sessions: CancellationToken,
    pub tracker: TaskTracker,
    /// Open SSE streams, for `POST /command?stream=`.
    pub streams: crate::transport::sse::Streams,
    /// Publish buckets of commands sent without a stream, per user.
    pub buckets: crate::transport::http::Buckets,
    /// Users long-polling this node, as presence knows them.
    pub pollers: crate::transport::poll::Pollers,
    /// TLS on this port (`--tls-cert`): every connection goes through its front first.
    pub tls: Option<crate::tls::Front>,
}

/// A reserved session slot (global and per client address), released on drop.
#[derive(Debug)]
pub struct SessionSlot(Arc<Server>, Option<std::net::IpAddr>, usize);

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(self.2, Ordering::AcqRel);
        if let Some(ip) = self.1 {
            let mut per_ip = self.0.per_ip.lock();
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
    }
}

/// Why no session slot was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// The node's connection cap.
    Full,
    /// The per-address cap.
    PerIp,
}

/// A client connection's place in the budgets. A connection in plain HTTP counts
/// against the pending budget; while it carries sessions (SSE streams, waiting
/// polls: [`Conn::hold`]) each holds a session slot and the socket leaves the pending
/// budget, as an upgraded WebSocket's does.
#[derive(Debug)]
pub struct Conn {
    server: Arc<Server>,
    /// Sessions held on this connection; the connection's task has ended.
    state: parking_lot::Mutex<(usize, bool)>,
    /// Cancelled to drop an HTTP/1 connection whose client stopped reading.
    abort: CancellationToken,
    h2: bool,
}

/// A session slot held by a request on a connection; released on drop.
#[derive(Debug)]
pub struct Held {
    conn: Arc<Conn>,
    _slot: SessionSlot,
}

impl Conn {
    /// Reserves a session slot for a request of this connection.
    pub fn hold(self: &Arc<Self>, ip: std::net::IpAddr) -> Result<Held, NoSlot> {
        // hyper's buffers are per connection: further streams of an HTTP/2 connection that
        // already holds one take one slot each.
        let weight = if self.h2 && self.state.lock().0 > 0 { 1 } else { self.server.http_session_weight };
        let slot = self.server.try_reserve_slots(ip, weight)?;
        let mut st = self.state.lock();
        st.0 += 1;
        if st.0 == 1 && !st.1 {
            self.server.pending.fetch_sub(1, Ordering::AcqRel);
            self.server.socket_freed.notify_one();
        }
        Ok(Held { conn: self.clone(), _slot: slot })
    }

    /// A stream's client stopped reading: drop its HTTP/1 connection (an HTTP/2 one
    /// carries other streams; its flow control stops that stream alone).
    pub fn abort_stalled(&self) {
        if !self.h2 {
            self.abort.cancel();
        }
    }

    fn gone(&self) {
        let mut st = self.state.lock();
        st.1 = true;
        if st.0 == 0 {
            self.server.pending.fetch_sub(1, Ordering::AcqRel);
            self.server.socket_freed.notify_one();
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut st = self.conn.state.lock();
        st.0 -= 1;
        if st.0 == 0 && !st.1 {
            // Plain HTTP again (keep-alive): back in the pending budget.
            self.conn.server.pending.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// Ends a connection's place in the budgets when its task ends.
struct ConnGuard(Arc<Conn>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.gone();
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the client opens with the HTTP/2 preface (prior knowledge, h2c). Peeks:
/// nothing is consumed.
async fn is_h2(stream: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 24];
    loop {
        let n = match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        if buf[..n] != H2_PREFACE[..n] {
            return false;
        }
        if n == H2_PREFACE.len() {
            return true;
        }
        // A preface split across packets (rare): look again shortly.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Default for `--max-pending-per-ip`: half-open connections one address may hold.
pub const DEFAULT_PENDING_PER_IP: usize = 64;

/// Takes a connection out of the half-open set when dropped (its task ended).
struct HalfOpenSlot(Arc<Server>, u64);

impl Drop for HalfOpenSlot {
    fn drop(&mut self) {
        self.0.half_open.lock().done(self.1);
    }
}

/// Drain pacing and its timings.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    pub window: Duration,
    pub grace: Duration,
}

impl Server {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: Arc<Node>,
        verifier: Verifier,
        anonymous: bool,
        allowed_origins: Vec<String>,
        echo_route: bool,
        handshake_timeout: Duration,
        max_sessions: usize,
        max_pending: usize,
    ) -> Self {
        metrics::gauge!(m::CONNECTIONS_LIMIT).set(max_sessions as f64);
        Self {
            node,
            verifier,
            anonymous,
            allowed_origins,
            echo_route,
            handshake_timeout,
            max_sessions,
            http_session_weight: 1,
            max_pending,
            sessions: AtomicUsize::new(0),
            max_per_ip: 0,
            per_ip: parking_lot::Mutex::new(std::collections::HashMap::new()),
            pending: AtomicUsize::new(0),
            half_open: parking_lot::Mutex::new(HalfOpen::new(DEFAULT_PENDING_PER_IP)),
            socket_freed: Notify::new(),
            next_conn_id: AtomicU64::new(1),
            draining: CancellationToken::new(),
            stop_sessions: CancellationToken::new(),
            tracker: TaskTracker::new(),
            streams: Default::default(),
            buckets: Default::default(),
            pollers: Default::default(),
            tls: None,
        }
    }

    /// Half-open connections one address may hold before its oldest is shed.
    pub fn set_max_pending_per_ip(&mut self, n: usize) {
        self.half_open = parking_lot::Mutex::new(HalfOpen::new(n));
    }

    /// Reserves a session slot if the cap allows.
    pub fn try_reserve_session(self: &Arc<Self>, ip: std::net::IpAddr) -> Result<SessionSlot, NoSlot> {
        self.try_reserve_slots(ip, 1)
    }

    /// Reserves `weight` slots of the connection cap (and one of the address's).
    fn try_reserve_slots(self: &Arc<Self>, ip: std::net::IpAddr, weight: usize) -> Result<SessionSlot, NoSlot> {
        let weight = weight.clamp(1, self.max_sessions.max(1));
        // Taken only when it fits: a refused reservation of several slots must not make a
        // concurrent one of one slot fail.
        let fits = |n: usize| (n + weight <= self.max_sessions).then_some(n + weight);
        if self.sessions.fetch_update(Ordering::AcqRel, Ordering::Acquire, fits).is_err() {
            return Err(NoSlot::Full);
        }
        let slot = SessionSlot(self.clone(), None, weight);
        if self.max_per_ip == 0 {
            return Ok(slot);
        }
        let mut per_ip = self.per_ip.lock();
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(NoSlot::PerIp);
        }
        *n += 1;
        drop(per_ip);
        let mut slot = slot;
        slot.1 = Some(ip);
        Ok(slot)
    }

    /// Accepts clients until `draining` is cancelled.
    pub async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        // A backlog that holds at least the budget of connections in HTTP (listen()
        // again only changes the backlog; the kernel caps it at somaxconn).
        let backlog = self.max_pending.max(1024).min(i32::MAX as usize) as i32;
        if let Err(e) = socket2::SockRef::from(&listener).listen(backlog) {
            tracing::warn!(error = %e, "cannot set the listen backlog");
        }
        loop {
            // With the budget of connections in HTTP used up and none of them
            // half-open (none can be shed), stop accepting (the kernel backlog
            // holds new clients) rather than run into EMFILE.
            while self.pending.load(Ordering::Acquire) >= self.max_pending && self.half_open.lock().is_empty() {
                tokio::select! {
                    () = self.draining.cancelled() => return,
                    () = self.socket_freed.notified() => {}
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            let (stream, peer) = tokio::select! {
                () = self.draining.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE/ENFILE/ECONNABORTED: back off, never crash.
                        metrics::counter!(m::ACCEPT_ERRORS).increment(1);
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let node_full = self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending;
            let shed_me = CancellationToken::new();
            let (half_open_id, shed) = self.half_open.lock().admit(peer.ip(), shed_me.clone(), node_full);
            if let Some(shed) = shed {
                metrics::counter!(m::HALF_OPEN_SHED, "reason" => shed.label()).increment(1);
            }
            let half_open = HalfOpenSlot(self.clone(), half_open_id);
            let server = self.clone();
            self.tracker.spawn(async move {
                // With TLS: the plaintext end of its loopback pair from here on (tls/mod.rs).
                let tls = async {
                    match &server.tls {
                        None => Some((stream, None)),
                        Some(front) => front.accept(stream, server.handshake_timeout, &server.tracker).await,
                    }
                };
                let opened = tokio::select! {
                    opened = tls => opened,
                    () = shed_me.cancelled() => None,
                };
                let Some((stream, alpn_h2)) = opened else {
                    server.pending.fetch_sub(1, Ordering::AcqRel);
                    server.socket_freed.notify_one();
                    return;
                };
                let h2 = match alpn_h2 {
                    Some(h2) => h2,
                    None => tokio::select! {
                        h2 = tokio::time::timeout(server.handshake_timeout, is_h2(&stream)) => h2.unwrap_or_default(),
                        () = shed_me.cancelled() => {
                            server.pending.fetch_sub(1, Ordering::AcqRel);
                            server.socket_freed.notify_one();
                            return;
                        }
                    },
                };
                let conn = Arc::new(Conn {
                    server: server.clone(),
                    state: parking_lot::Mutex::new((0, false)),
                    abort: CancellationToken::new(),
                    h2,
                });
                let _guard = ConnGuard(conn.clone());
                let svc_server = server.clone();
                let half_open = Arc::new(half_open);
                let svc_conn = conn.clone();
                let service = service_fn(move |req| {
                    let s = svc_server.clone();
                    let c = svc_conn.clone();
                    // A complete request: no longer half-open (no longer sheddable).
                    s.half_open.lock().done(half_open.1);
                    async move { Ok::<_, Infallible>(handshake::handle(s, req, peer.ip(), &c).await) }
                });
                let io = TokioIo::new(stream);
                if h2 {
                    let serve = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .max_concurrent_streams(256)
                        .max_header_list_size(64 * 1024)
                        .serve_connection(io, service);
                    tokio::select! {
                        r = serve => if let Err(e) = r {
                            tracing::debug!(error = %e, "http/2 connection ended");
                        },
                        () = shed_me.cancelled() => tracing::debug!("half-open connection shed"),
                    }
                    return;
                }
                let serve = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(server.handshake_timeout)
                    .max_buf_size(64 * 1024)
                    .serve_connection(io, service)
                    .with_upgrades();
                tokio::select! {
                    r = serve => if let Err(e) = r {
                        tracing::debug!(error = %e, "http connection ended");
                    },
                    () = shed_me.cancelled() => tracing::debug!("half-open connection shed"),
                    () = conn.abort.cancelled() => tracing::debug!("stalled stream's connection dropped"),
                }
                // Once upgraded, the socket counts against the session slot instead.
            });
        }
    }

    /// Closes every session at a bounded pace spread over `window`, then sweeps
    /// the rest and waits for all tasks, at most `grace` longer.
    pub async fn drain(&self, drain: Drain) {
        let sessions = self.node.hub.sessions();
        let n = sessions.len().max(1);
        let tick = (drain.window / n as u32).max(Duration::from_millis(1));
        let per_tick =
            ((n as f64) * tick.as_secs_f64() / drain.window.as_secs_f64().max(1e-3)).ceil().max(1.0) as usize;
        tracing::info!(sessions = sessions.len(), window = ?drain.window, "draining sessions");
        let mut interval = tokio::time::interval(tick);
        for chunk in sessions.chunks(per_tick) {
            interval.tick().await;
            for s in chunk {
                s.ctl.close(CloseReason::Drain, Some(&session::drain_reason()));
            }
        }
        self.stop_sessions.cancel();
        self.tracker.close();
        if tokio::time::timeout(drain.grace, self.tracker.wait()).await.is_err() {
            tracing::warn!(left = self.tracker.len(), "drain grace period over, exiting with tasks left");
        }
    }
}
