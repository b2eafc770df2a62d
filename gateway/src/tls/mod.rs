//! TLS on the client port (`--tls-cert`, `--tls-key`), terminated in front of the
//! plain connection handler so that the session core is unchanged.
//!
//! Per connection: `accept` (server.rs) admits the TCP socket into the budgets as
//! for a plain one → the TLS handshake (rustls, ring; TLS 1.2 and 1.3; ALPN `h2`,
//! `http/1.1`) within `--handshake-timeout` → a loopback pair ([`loopback`]) → a pump
//! task copies between the TLS stream and one end, hyper (and, after an upgrade, the
//! WebSocket session with its writev) serves the other end, a plain `TcpStream`,
//! with the client's real address. Three descriptors per connection instead of one:
//! the caps count them ([`FDS_PER_CONNECTION`]). [`certs`]: the pair and its reload.
//! docs/design.md "TLS on the client port" has the costs and the kTLS follow-up.

pub mod certs;
pub mod loopback;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use certs::{Certs, Reload};
pub use loopback::Loopback;

use crate::metrics as m;

/// File descriptors a TLS connection holds: the client's socket and the loopback pair.
pub const FDS_PER_CONNECTION: u64 = 3;
/// Memory a TLS connection holds beyond a plain one's (rustls state and its record
/// buffer, the pump's two 8 KiB copy buffers); measured in docs/performance.md.
pub const CONNECTION_BYTES: u64 = 48 << 10;
/// How long the pump waits for the client's close once the session side has ended
/// (and close_notify was sent).
const LINGER: Duration = Duration::from_secs(2);

/// The rustls configuration of the client port: the ring provider, TLS 1.3 and 1.2,
/// ALPN h2 then http/1.1, the certificate from `certs` at each handshake.
pub fn server_config(certs: Arc<Certs>) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The client port's TLS, resolved from the flags at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub certs: Arc<Certs>,
    pub config: Arc<rustls::ServerConfig>,
    /// How often the files are compared with what was loaded (zero: SIGHUP only).
    pub reload_interval: Duration,
}

impl Settings {
    /// `--tls-cert` and `--tls-key`: both or neither; the pair must load. The error is one line.
    pub fn from_flags(
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
        reload_interval: Duration,
    ) -> Result<Option<Self>, String> {
        let (cert, key) = match (cert, key) {
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            _ => return Err("--tls-cert and --tls-key go together".into()),
        };
        let certs = Arc::new(Certs::load(cert, key, provider())?);
        let config = server_config(certs.clone()).map_err(|e| format!("TLS configuration: {e}"))?;
        Ok(Some(Self { certs, config: Arc::new(config), reload_interval }))
    }
}

/// The crypto provider (ring: already in the tree through tonic).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS front of the client port.
#[derive(Debug)]
pub struct Front {
    config: Arc<rustls::ServerConfig>,
    loopback: Arc<Loopback>,
}

impl Front {
    pub fn new(config: Arc<rustls::ServerConfig>, loopback: Arc<Loopback>) -> Self {
        Self { config, loopback }
    }

    /// Terminates TLS on `stream`: after the handshake (within `timeout`) a pump task
    /// (in `tracker`) carries the plaintext; returns the plain end to serve and whether
    /// the client chose HTTP/2 (`None`: no ALPN, look at its first bytes).
    pub async fn accept(
        &self,
        stream: TcpStream,
        timeout: Duration,
        tracker: &TaskTracker,
    ) -> Option<(TcpStream, Option<bool>)> {
        let _ = stream.set_nodelay(true);
        let tls = match tokio::time::timeout(timeout, TlsAcceptor::from(self.config.clone()).accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                metrics::counter!(m::TLS_HANDSHAKES, "outcome" => "failed").increment(1);
                tracing::debug!(error = %e, "tls handshake failed");
                return None;
            }
            Err(_) => {
                metrics::counter!(m::TLS_HANDSHAKES, "outcome" => "timeout").increment(1);
                tracing::debug!("tls handshake timed out");
                return None;
            }
        };
        metrics::counter!(m::TLS_HANDSHAKES, "outcome" => "ok").increment(1);
        let h2 = tls.get_ref().1.alpn_protocol().map(|p| p == b"h2");
        let (front, back) = match self.loopback.pair().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "no loopback pair for a tls connection");
                return None;
            }
        };
        tracker.spawn(pump(tls, front));
        Some((back, h2))
    }
}

/// Copies both ways between the client's TLS stream and the plaintext end, each way
/// through one bounded buffer (a side that does not read stops the other from being
/// read: backpressure). The client's close (close_notify or EOF) half-closes the
/// plaintext end, so the session reads EOF; the session's close sends close_notify,
/// then waits [`LINGER`] at most for the client's. Any error drops both.
async fn pump<T: AsyncRead + AsyncWrite>(tls: T, plain: TcpStream) {
    let (mut tls_r, mut tls_w) = tokio::io::split(tls);
    let (mut plain_r, mut plain_w) = plain.into_split();
    let up = async {
        tokio::io::copy(&mut tls_r, &mut plain_w).await?;
        plain_w.shutdown().await
    };
    let down = async {
        tokio::io::copy(&mut plain_r, &mut tls_w).await?;
        tls_w.shutdown().await
    };
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let linger = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(linger);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "tls connection: client side ended");
                    return;
                }
                up_done = true;
            }
            r = &mut down, if !down_done => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "tls connection: session side ended");
                    return;
                }
                down_done = true;
                linger.as_mut().reset(tokio::time::Instant::now() + LINGER);
            }
            () = &mut linger => return,
        }
    }
}

/// The SIGHUP stream for [`watch`], installed before the port serves: from then on
/// SIGHUP reloads instead of ending the process.
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    signal(SignalKind::hangup())
        .inspect_err(|e| tracing::warn!(error = %e, "no SIGHUP handler: the certificate reloads on file changes only"))
        .ok()
}

/// Reloads the certificate on SIGHUP and, every `every` (zero: never), when the
/// files changed; until `stop`.
pub async fn watch(
    certs: Arc<Certs>,
    every: Duration,
    mut hup: Option<tokio::signal::unix::Signal>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(if every.is_zero() { Duration::from_secs(3600) } else { every });
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let hangup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            _ = hangup => {
                tracing::info!("SIGHUP: reloading the client-port certificate");
                certs.reload(true);
            }
            _ = tick.tick(), if !every.is_zero() => {
                certs.reload(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn caps_leave_room_for_three_descriptors_per_tls_connection() {
        for nofile in [1024u64, 4096, 65_536, 1 << 20] {
            let (sessions, pending) = crate::server::caps_for_fds(nofile, FDS_PER_CONNECTION);
            let used = (sessions + pending) as u64 * FDS_PER_CONNECTION + crate::server::FD_RESERVE;
            assert!(used <= nofile, "nofile {nofile}: {sessions} sessions + {pending} pending use {used}");
            assert_eq!(crate::server::caps_for_fds(nofile, 1), crate::server::caps_from_nofile(nofile));
        }
    }

    /// The pump with a plain duplex as the "TLS" side: data both ways, the client's
    /// close reaches the session as EOF, the session's close reaches the client.
    #[tokio::test]
    async fn pump_carries_both_ways_and_closes_both_ways() {
        let (lo, listener) = Loopback::bind(16).unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(lo.clone().serve(listener, stop.clone()));
        let (front, mut back) = lo.pair().await.unwrap();
        let (mut client, tls) = tokio::io::duplex(1024);
        let pumping = tokio::spawn(pump(tls, front));
        // More than both buffers in flight: backpressure, not loss.
        let big = vec![7u8; 256 << 10];
        let writer = {
            let big = big.clone();
            tokio::spawn(async move {
                client.write_all(&big).await.unwrap();
                client.shutdown().await.unwrap();
                client
            })
        };
        let mut got = Vec::new();
        back.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big, "the client's bytes, then EOF at its close");
        let mut client = writer.await.unwrap();
        back.write_all(b"bye").await.unwrap();
        drop(back);
        let mut tail = Vec::new();
        client.read_to_end(&mut tail).await.unwrap();
        assert_eq!(tail, b"bye");
        tokio::time::timeout(Duration::from_secs(5), pumping).await.expect("pump ends").unwrap();
        stop.cancel();
    }
}
