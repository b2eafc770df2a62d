//! Load against one WebSocket server, our protocol or a plain broadcast server:
//! idle connections (memory and connects/s) and pub/sub fanout (deliveries/s,
//! latency, lost and duplicated per subscriber, server CPU per delivery).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::httpclient::{self, Chunked};
use crate::wsclient::{self, CLOSE, PING, TEXT};

/// How long an idle long-poll waits: the gateway's longest (`--poll-timeout`, 25 s).
const POLL_WAIT_MS: u64 = 25_000;

/// What the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Switchboard: JWT in a header, `subscribe`, `publish` to a channel.
    Switchboard,
    /// A plain broadcast server: every text message goes to every client.
    Plain,
    /// Switchboard's Server-Sent Events: subscribers are `GET /sse` streams (the
    /// publisher a WebSocket session).
    Sse,
    /// Switchboard's long-polling (idle sessions only: a poll waiting for the next message).
    Poll,
}

/// The server under load.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) kind: Kind,
    pub(crate) addr: SocketAddr,
    /// Source addresses to spread connections over (each has ~28k ephemeral ports).
    pub(crate) sources: Vec<IpAddr>,
}

/// Connection tokens for Switchboard, made before any timing starts.
pub(crate) fn tokens(count: usize, prefix: &str) -> anyhow::Result<Vec<String>> {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 3600;
    let key = jsonwebtoken::EncodingKey::from_secret(crate::SECRET.as_bytes())?;
    (0..count)
        .map(|i| {
            let claims = serde_json::json!({"sub": format!("{prefix}{i}"), "exp": exp});
            Ok(jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key)?)
        })
        .collect()
}

/// A connected session, ready for traffic; `buf` holds bytes read past the last frame
/// (for an SSE stream, past the last whole chunk header: `sse` decodes the body).
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    sse: Option<Chunked>,
}

impl Conn {
    /// Splits what `buf` holds into text frames (or SSE events' data) for `on_text`;
    /// pings go to `pings`. True when the server closed the session.
    fn parse(&mut self, pings: &mut Vec<Vec<u8>>, mut on_text: impl FnMut(&[u8])) -> anyhow::Result<bool> {
        if let Some(body) = &mut self.sse {
            body.feed(&mut self.buf)?;
            body.events(on_text);
            return Ok(body.ended);
        }
        let mut closed = false;
        wsclient::parse(&mut self.buf, |op, p| match op {
            TEXT => on_text(p),
            PING => pings.push(p.to_vec()),
            CLOSE => closed = true,
            _ => {}
        })?;
        Ok(closed)
    }
}

/// Reads until a text frame satisfying `want` arrives (answering pings).
async fn read_until(c: &mut Conn, mut want: impl FnMut(&[u8]) -> bool) -> anyhow::Result<()> {
    loop {
        let mut found = false;
        let mut pings = Vec::new();
        let closed = c.parse(&mut pings, |p| {
            if !found {
                found = want(p);
            }
        })?;
        if closed && !found {
            bail!("closed by the server");
        }
        for p in pings {
            c.stream.write_all(&wsclient::frame(0xA, &p)).await?;
        }
        if found {
            return Ok(());
        }
        c.buf.reserve(4096);
        if c.stream.read_buf(&mut c.buf).await? == 0 {
            bail!("closed by the server");
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Opens one session; for Switchboard reads the welcome and, if `channel` is
/// set, subscribes and waits for the ack.
async fn open(t: &Target, i: usize, token: Option<&str>, channel: Option<&str>) -> anyhow::Result<Conn> {
    let source = (!t.sources.is_empty()).then(|| t.sources[i % t.sources.len()]);
    if t.kind == Kind::Poll {
        let token = token.context("a poll needs a token")?;
        let stream = httpclient::waiting_poll(t.addr, source, channel.unwrap_or("idle"), token, POLL_WAIT_MS).await?;
        return Ok(Conn { stream, buf: Vec::new(), sse: None });
    }
    if t.kind == Kind::Sse {
        let (stream, buf) = httpclient::sse(t.addr, source, channel, token).await?;
        let mut c = Conn { stream, buf, sse: Some(Chunked::default()) };
        // The welcome, then (one read may bring both) the subscribe ack.
        let want: &[u8] = if channel.is_some() { br#""type":"ack""# } else { br#""type":"welcome""# };
        read_until(&mut c, |p| contains(p, want)).await.context("welcome and subscribe ack")?;
        return Ok(c);
    }
    let path = if t.kind == Kind::Switchboard { "/ws" } else { "/" };
    let (stream, buf) = wsclient::connect(t.addr, source, path, token).await?;
    let mut c = Conn { stream, buf, sse: None };
    if t.kind == Kind::Switchboard {
        read_until(&mut c, |p| contains(p, br#""type":"welcome""#)).await.context("welcome")?;
        if let Some(ch) = channel {
            let cmd = format!(r#"{{"op":"subscribe","channel":"{ch}","ref":"s"}}"#);
            c.stream.write_all(&wsclient::frame(TEXT, cmd.as_bytes())).await?;
            read_until(&mut c, |p| contains(p, br#""type":"ack""#)).await.context("subscribe ack")?;
        }
    }
    Ok(c)
}

/// Opens `count` sessions with `concurrency` handshakes at a time.
/// Returns the sessions, the connects per second, and the failures.
async fn open_many(
    t: &Target,
    count: usize,
    concurrency: usize,
    tokens: &[String],
    channel: Option<&str>,
) -> (Vec<Conn>, f64, usize) {
    let permits = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let (t, permits) = (t.clone(), permits.clone());
        let token = tokens.get(i).cloned();
        let channel = channel.map(str::to_owned);
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            tokio::time::timeout(Duration::from_secs(30), open(&t, i, token.as_deref(), channel.as_deref())).await
        }));
    }
    let mut conns = Vec::with_capacity(count);
    let mut failed = 0;
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(Ok(Ok(c))) => conns.push(c),
            other => {
                failed += 1;
                first_error.get_or_insert_with(|| match other {
                    Ok(Ok(Err(e))) => format!("{e:#}"),
                    Ok(Err(_)) => "timed out".to_owned(),
                    Err(e) => e.to_string(),
                    Ok(Ok(Ok(_))) => unreachable!(),
                });
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("{failed} of {count} sessions failed to open, the first: {e}");
    }
    let rate = conns.len() as f64 / started.elapsed().as_secs_f64();
    (conns, rate, failed)
}

/// CPU seconds (user + system) a process has used so far.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return f64::NAN };
    // Fields after the command name, which is parenthesised and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    (ticks(11) + ticks(12)) / 100.0
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct IdleResult {
    pub(crate) connections: usize,
    pub(crate) failed: usize,
    pub(crate) connects_per_s: f64,
    pub(crate) server_cpu_s: f64,
    pub(crate) bytes_per_conn: f64,
}

/// Opens `count` idle sessions (Switchboard: authenticated, one subscription),
/// then reports the server's RSS growth per session and the connect rate.
pub(crate) async fn idle(t: &Target, pid: u32, count: usize, concurrency: usize) -> anyhow::Result<IdleResult> {
    let session_tokens = if t.kind == Kind::Plain { Vec::new() } else { tokens(count, "idle")? };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = crate::rss_kib(pid)?;
    let cpu0 = cpu_seconds(pid);
    let (conns, connects_per_s, failed) = open_many(t, count, concurrency, &session_tokens, Some("idle")).await;
    let cpu = cpu_seconds(pid) - cpu0;
    // Let allocations settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = crate::rss_kib(pid)?;
    let bytes_per_conn = after.saturating_sub(before) as f64 * 1024.0 / conns.len().max(1) as f64;
    drop(conns);
    Ok(IdleResult { connections: count, failed, connects_per_s, server_cpu_s: cpu, bytes_per_conn })
}

/// Latency histogram in microseconds: 16 linear steps per power of two (≤ 6 % error).
#[derive(Debug)]
pub(crate) struct Histogram {
    buckets: Vec<AtomicU64>,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { buckets: (0..40 * 16).map(|_| AtomicU64::new(0)).collect(), max: AtomicU64::new(0) }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        if v < 16 {
            return v as usize;
        }
        let log = 63 - v.leading_zeros() as usize;
        let mantissa = ((v >> (log - 4)) & 15) as usize;
        (log - 3) * 16 + mantissa
    }

    fn lower(i: usize) -> u64 {
        if i < 16 {
            return i as u64;
        }
        let (log, mantissa) = (i / 16 + 3, (i % 16) as u64);
        (16 + mantissa) << (log - 4)
    }

    pub(crate) fn record(&self, micros: u64) {
        self.buckets[Self::index(micros).min(self.buckets.len() - 1)].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(micros, Ordering::Relaxed);
    }

    /// The value at quantile `q` (0..=1), in microseconds.
    pub(crate) fn quantile(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::lower(i);
            }
        }
        self.max.load(Ordering::Relaxed)
    }

    pub(crate) fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct FanoutResult {
    pub(crate) subscribers: usize,
    /// Messages published per second asked for (0: as fast as the server keeps up).
    pub(crate) rate: u64,
    pub(crate) published: u64,
    pub(crate) deliveries: u64,
    pub(crate) deliveries_per_s: f64,
    pub(crate) server_cpu_s: f64,
    /// Deliveries per second of server CPU: deliveries/s on one saturated core.
    pub(crate) deliveries_per_cpu_s: f64,
    /// Share of one core the server used (1.0: saturated), and the load tool.
    pub(crate) server_cpu_util: f64,
    pub(crate) client_cpu_util: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) lost: u64,
    pub(crate) duplicated: u64,
    pub(crate) failed_connects: usize,
}

/// Per-subscriber accounting.
#[derive(Debug, Default)]
struct Seen {
    received: u64,
    duplicated: u64,
    last: Option<u64>,
}

async fn subscriber(
    c: Conn,
    hist: Arc<Histogram>,
    total: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
) -> Seen {
    let mut seen = Seen::default();
    drive(c, &stop, &wake, 16 * 1024, |p| {
        if let Some((at, seq)) = wsclient::unstamp(p) {
            hist.record((wsclient::now_nanos().saturating_sub(at) / 1000) as u64);
            if seen.last.is_some_and(|l| seq <= l) {
                seen.duplicated += 1;
            } else {
                seen.received += 1;
                seen.last = Some(seq);
            }
            total.fetch_add(1, Ordering::Relaxed);
        }
    })
    .await;
    seen
}

#[allow(clippy::too_many_arguments)]
/// Publisher: `rate` messages/s (or, with rate 0, as fast as deliveries keep up
/// with a window of messages in flight), each carrying its send time.
async fn publisher(
    mut c: Conn,
    kind: Kind,
    direct: bool,
    rate: u64,
    window: u64,
    subscribers: u64,
    total: Arc<AtomicU64>,
    payload: usize,
    seconds: f64,
) -> anyhow::Result<u64> {
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(seconds);
    let mut sent = 0u64;
    let mut out = Vec::new();
    let mut sink = vec![0u8; 64 * 1024];
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while Instant::now() < end {
        tick.tick().await;
        let due = if rate == 0 {
            // Messages fully delivered so far (a direct message has one recipient).
            let done = total.load(Ordering::Relaxed) / if direct { 1 } else { subscribers.max(1) };
            (done + window).saturating_sub(sent)
        } else {
            ((started.elapsed().as_secs_f64() * rate as f64) as u64).saturating_sub(sent)
        };
        out.clear();
        for _ in 0..due {
            let body = wsclient::stamped(sent, payload);
            let msg = match kind {
                Kind::Switchboard | Kind::Sse | Kind::Poll if direct => {
                    format!(r#"{{"op":"send","user":"fan{}","data":"{body}"}}"#, sent % subscribers.max(1))
                }
                Kind::Switchboard | Kind::Sse | Kind::Poll => {
                    format!(r#"{{"op":"publish","channel":"bench","data":"{body}"}}"#)
                }
                Kind::Plain => body,
            };
            out.extend_from_slice(&wsclient::frame(TEXT, msg.as_bytes()));
            sent += 1;
        }
        if !out.is_empty() {
            c.stream.write_all(&out).await?;
        }
        // Drain whatever the server sends back (acks, or our own broadcast).
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::ZERO, c.stream.read(&mut sink)).await {
            if n == 0 {
                bail!("publisher closed by the server");
            }
        }
    }
    // Keep reading (and discarding) in the background until the run ends.
    tokio::spawn(async move { while matches!(c.stream.read(&mut sink).await, Ok(n) if n > 0) {} });
    Ok(sent)
}

/// Pub/sub fanout: `subscribers` sessions on one channel, one publisher. With `direct`
/// (Switchboard only), each message is instead sent to one user (`fan<seq mod subscribers>`,
/// each subscriber session being one user), round robin.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn fanout(
    t: &Target,
    pid: u32,
    direct: bool,
    subscribers: usize,
    rate: u64,
    seconds: f64,
    payload: usize,
    window_deliveries: u64,
) -> anyhow::Result<FanoutResult> {
    if t.kind == Kind::Poll {
        bail!("fanout over long-polling is not measured");
    }
    let session_tokens = if t.kind == Kind::Plain { Vec::new() } else { tokens(subscribers + 1, "fan")? };
    // At most 48 connections in their handshake per source address, as for `idle`: the
    // gateway sheds an address's oldest half-open connection beyond 64.
    let concurrency = 48 * t.sources.len().max(1);
    let (mut conns, _, failed_connects) =
        open_many(t, subscribers + 1, concurrency, &session_tokens, Some("bench")).await;
    if conns.len() < subscribers + 1 {
        bail!("only {} of {} sessions opened", conns.len(), subscribers + 1);
    }
    // The publisher is a session that is not subscribed: for Switchboard a new one.
    let pub_conn = match t.kind {
        Kind::Plain => conns.pop().context("publisher")?,
        _ => {
            drop(conns.pop());
            let token = tokens(1, "publisher")?;
            open(&Target { kind: Kind::Switchboard, ..t.clone() }, 0, Some(&token[0]), None).await?
        }
    };
    let hist = Arc::new(Histogram::default());
    let total = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(tokio::sync::Notify::new());
    let subs: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(subscriber(c, hist.clone(), total.clone(), stop.clone(), wake.clone())))
        .collect();
    let window = if direct { window_deliveries.max(2) } else { (window_deliveries / subscribers as u64).max(2) };
    let cpu0 = cpu_seconds(pid);
    let own0 = cpu_seconds(std::process::id());
    let started = Instant::now();
    let published =
        publisher(pub_conn, t.kind, direct, rate, window, subscribers as u64, total.clone(), payload, seconds).await?;
    // Wait for the last deliveries (bounded), then stop the subscribers.
    let n = subscribers as u64;
    let expected = if direct { published } else { published * n };
    let drain_until = Instant::now() + Duration::from_secs(10);
    let mut last_total = total.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    while total.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now_total = total.load(Ordering::Relaxed);
        if now_total != last_total {
            (last_total, last_change) = (now_total, Instant::now());
        } else if last_change.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    let elapsed = started.elapsed().as_secs_f64().min(last_change.duration_since(started).as_secs_f64().max(1e-3));
    let server_cpu_s = cpu_seconds(pid) - cpu0;
    let client_cpu_s = cpu_seconds(std::process::id()) - own0;
    let wall = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    wake.notify_waiters();
    let (mut lost, mut duplicated, mut received) = (0, 0, 0);
    for (k, s) in subs.into_iter().enumerate() {
        let s = s.await?;
        // What this subscriber should have had: every message, or (direct) its share.
        let due = if direct { published / n + u64::from((k as u64) < published % n) } else { published };
        lost += due.saturating_sub(s.received);
        duplicated += s.duplicated;
        received += s.received;
    }
    let deliveries = received + duplicated;
    Ok(FanoutResult {
        subscribers,
        rate,
        published,
        deliveries,
        deliveries_per_s: deliveries as f64 / elapsed,
        server_cpu_s,
        deliveries_per_cpu_s: deliveries as f64 / server_cpu_s,
        server_cpu_util: server_cpu_s / wall,
        client_cpu_util: client_cpu_s / wall,
        p50_ms: hist.quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.quantile(0.99) as f64 / 1000.0,
        max_ms: hist.max() as f64 / 1000.0,
        lost,
        duplicated,
        failed_connects,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_within_bucket_error() {
        let h = Histogram::default();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        let p50 = h.quantile(0.5) as f64;
        let p99 = h.quantile(0.99) as f64;
        assert!((p50 - 5000.0).abs() / 5000.0 < 0.07, "p50 {p50}");
        assert!((p99 - 9900.0).abs() / 9900.0 < 0.07, "p99 {p99}");
        assert_eq!(h.max(), 10_000);
    }

    #[test]
    fn histogram_bucket_bounds_are_monotonic() {
        for i in 1..(40 * 16 - 1) {
            assert!(Histogram::lower(i) < Histogram::lower(i + 1), "bucket {i}");
            assert_eq!(Histogram::index(Histogram::lower(i)), i);
        }
    }
}

/// What happened to one held session.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Held {
    /// Closed by the server (or the connection failed) before the end.
    pub(crate) dropped: bool,
    pub(crate) pings: u64,
}

/// Reads a session until `stop` (or until the server ends it): answers pings, hands every
/// text frame to `on_text`, and keeps at most `keep` bytes of read buffer while waiting.
async fn drive(
    mut c: Conn,
    stop: &AtomicBool,
    wake: &tokio::sync::Notify,
    keep: usize,
    mut on_text: impl FnMut(&[u8]),
) -> Held {
    let mut held = Held::default();
    loop {
        let mut pings = Vec::new();
        let parsed = c.parse(&mut pings, &mut on_text);
        if !matches!(parsed, Ok(false)) {
            held.dropped = true;
            return held;
        }
        for p in pings {
            held.pings += 1;
            if c.stream.write_all(&wsclient::frame(0xA, &p)).await.is_err() {
                held.dropped = true;
                return held;
            }
        }
        if c.buf.is_empty() && c.buf.capacity() > keep {
            c.buf = Vec::new();
        }
        c.buf.reserve(keep);
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if stop.load(Ordering::Relaxed) {
            return held;
        }
        tokio::select! {
            r = c.stream.read_buf(&mut c.buf) => if !matches!(r, Ok(n) if n > 0) {
                held.dropped = !stop.load(Ordering::Relaxed);
                return held;
            },
            () = woken => return held,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct HoldResult {
    pub(crate) connections: usize,
    pub(crate) failed: usize,
    pub(crate) connect_s: f64,
    pub(crate) held_to_the_end: usize,
    pub(crate) dropped: usize,
    pub(crate) pings_answered: u64,
}

/// A worker of `bench capacity`: opens `count` Switchboard sessions (one subscription
/// each, 256 handshakes at a time), each answering heartbeats from the moment it is open;
/// prints `READY <opened> <failed>` once all were tried, holds them for `seconds`, then
/// returns the accounting.
pub(crate) async fn hold_many(t: &Target, count: usize, seconds: u64, prefix: &str) -> anyhow::Result<HoldResult> {
    let session_tokens = tokens(count, prefix)?;
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(256));
    let stop = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(tokio::sync::Notify::new());
    let (tried_tx, mut tried_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let mut tasks = Vec::with_capacity(count);
    for (i, token) in session_tokens.into_iter().enumerate() {
        let (t, permits, stop, wake, tried) =
            (t.clone(), permits.clone(), stop.clone(), wake.clone(), tried_tx.clone());
        tasks.push(tokio::spawn(async move {
            let permit = permits.acquire_owned().await;
            let opened = tokio::time::timeout(Duration::from_secs(30), open(&t, i, Some(&token), Some("cap"))).await;
            drop((permit, token));
            match opened {
                Ok(Ok(c)) => {
                    let _ = tried.send(true);
                    Some(drive(c, &stop, &wake, 256, |_| {}).await)
                }
                _ => {
                    let _ = tried.send(false);
                    None
                }
            }
        }));
    }
    drop(tried_tx);
    let (mut opened, mut failed) = (0, 0);
    // Each task keeps its sender while it holds its session: count the answers.
    for _ in 0..count {
        match tried_rx.recv().await {
            Some(true) => opened += 1,
            Some(false) | None => failed += 1,
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    println!("READY {opened} {failed}");
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    wake.notify_waiters();
    let (mut dropped, mut pings) = (0, 0);
    for t in tasks {
        if let Some(h) = t.await? {
            dropped += usize::from(h.dropped);
            pings += h.pings;
        }
    }
    Ok(HoldResult {
        connections: count,
        failed,
        connect_s,
        held_to_the_end: opened - dropped,
        dropped,
        pings_answered: pings,
    })
}
