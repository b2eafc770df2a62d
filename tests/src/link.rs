//! A network link between two services for fault tests: a TCP proxy whose traffic can be
//! cut (every connection reset, new ones refused), black-holed (connections stay open and
//! new ones are accepted, but no byte moves either way, so the peers see timeouts rather
//! than resets, as in a partition), or slowed (each chunk held for a delay in each
//! direction), and restored.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What a link does with its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Open,
    /// Each chunk waits this long before it is passed on.
    Slow(Duration),
    /// Nothing passes; connections stay open.
    Blackhole,
    /// Connections are dropped and new ones refused.
    Cut,
}

/// A link from its listening address to `target`; stops when dropped.
pub struct Link {
    pub addr: SocketAddr,
    state: watch::Sender<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// A link on a free loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Link {
        Link::start_on(std::net::Ipv4Addr::LOCALHOST, target).await
    }

    /// A link on a free port of `ip` (e.g. a veth end, for a service in a namespace).
    pub async fn start_on(ip: std::net::Ipv4Addr, target: SocketAddr) -> Link {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind a link");
        let addr = listener.local_addr().expect("link address");
        let (state, _) = watch::channel(State::Open);
        let states = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *states.borrow() == State::Cut {
                    drop(client);
                    continue;
                }
                let rx = states.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let mut cut = rx.clone();
                    tokio::select! {
                        () = pump(cr, sw, rx.clone()) => {}
                        () = pump(sr, cw, rx) => {}
                        _ = cut.wait_for(|s| *s == State::Cut) => {}
                    }
                });
            }
        });
        Link { addr, state, task }
    }

    pub fn set(&self, state: State) {
        self.state.send_replace(state);
    }

    pub fn state(&self) -> State {
        *self.state.borrow()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` chunk by chunk, as the link's state allows.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<State>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let now = *state.borrow_and_update();
            match now {
                State::Open => break,
                State::Slow(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                State::Cut => return,
                State::Blackhole => {
                    if state.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
