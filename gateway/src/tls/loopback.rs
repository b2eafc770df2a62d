//! Connected pairs of loopback TCP sockets, made by the gateway for itself: the
//! plaintext of a TLS connection runs through one, so that the session core keeps
//! its `TcpStream` (writev and `try_read` on the raw socket, see `outbox.rs`).
//!
//! A private listener on 127.0.0.1:0 accepts only connections the gateway announced:
//! the connecting socket is bound first, its port registered, then it connects; the
//! accepted socket whose peer port is registered goes to the one waiting for it.
//! Anything else (another local process found the port) is closed unread: a
//! registered port is bound by us, so nobody else can connect from it.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// How long a pair may take (a loopback connect is immediate unless the backlog is full).
const PAIR_TIMEOUT: Duration = Duration::from_secs(5);

/// The pair maker: its listener's address and the connections it waits for.
#[derive(Debug)]
pub struct Loopback {
    addr: SocketAddr,
    waiting: parking_lot::Mutex<HashMap<u16, oneshot::Sender<TcpStream>>>,
}

/// Takes a registration back when the pair was made or abandoned.
struct Registered<'a>(&'a Loopback, u16);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.waiting.lock().remove(&self.1);
    }
}

impl Loopback {
    /// Binds the private listener; `backlog` as deep as the client port's.
    pub fn bind(backlog: u32) -> io::Result<(Arc<Self>, TcpListener)> {
        let socket = TcpSocket::new_v4()?;
        socket.bind((Ipv4Addr::LOCALHOST, 0).into())?;
        let listener = socket.listen(backlog.max(1024))?;
        let addr = listener.local_addr()?;
        Ok((Arc::new(Self { addr, waiting: Default::default() }), listener))
    }

    /// Hands accepted connections to whoever registered their port, until `stop`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        loop {
            let (stream, peer) = tokio::select! {
                () = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(a) => a,
                    Err(e) => {
                        metrics::counter!(crate::metrics::ACCEPT_ERRORS).increment(1);
                        tracing::warn!(error = %e, "loopback accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let waiting = peer.ip().is_loopback().then(|| self.waiting.lock().remove(&peer.port())).flatten();
            match waiting {
                // The waiter gave up (timeout): the stream is dropped, its peer sees EOF.
                Some(tx) => drop(tx.send(stream)),
                None => tracing::warn!(%peer, "unannounced connection to the TLS loopback listener closed"),
            }
        }
    }

    /// A connected pair: (the end the TLS task writes plaintext into, the end hyper
    /// and the session read). Two file descriptors.
    pub async fn pair(&self) -> io::Result<(TcpStream, TcpStream)> {
        let socket = TcpSocket::new_v4()?;
        socket.bind((Ipv4Addr::LOCALHOST, 0).into())?;
        let port = socket.local_addr()?.port();
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().insert(port, tx);
        let _registered = Registered(self, port);
        let made = tokio::time::timeout(PAIR_TIMEOUT, async {
            let front = socket.connect(self.addr).await?;
            let back = rx.await.map_err(|_| io::Error::other("loopback listener stopped"))?;
            Ok::<_, io::Error>((front, back))
        })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "loopback pair timed out"))??;
        // Small writes (frames, TLS records' plaintext) go through at once on both ends.
        made.0.set_nodelay(true)?;
        made.1.set_nodelay(true)?;
        Ok(made)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn pairs_are_connected_and_strangers_are_closed() {
        let (lo, listener) = Loopback::bind(16).unwrap();
        let stop = CancellationToken::new();
        let serving = tokio::spawn(lo.clone().serve(listener, stop.clone()));
        let (mut a, mut b) = lo.pair().await.unwrap();
        a.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        assert_eq!(a.local_addr().unwrap(), b.peer_addr().unwrap());

        let mut stranger = TcpStream::connect(lo.addr).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), stranger.read(&mut buf)).await.unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "a stranger is closed: {n:?}");
        assert!(lo.waiting.lock().is_empty());
        stop.cancel();
        serving.await.unwrap();
    }
}
