//! A round-robin TCP proxy, as a load balancer without affinity: each accepted
//! connection goes to the next backend of its list, whatever the client sent before,
//! and is piped both ways until either side ends. It counts the connections each
//! backend was given, holds at most [`MAX_OPEN`] connections at a time (further
//! clients wait to be accepted), and stops with every connection when dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Connections a proxy holds open at once.
pub const MAX_OPEN: usize = 256;

/// A round-robin proxy on a free loopback port; stops when dropped.
pub struct RoundRobin {
    pub addr: SocketAddr,
    backends: Vec<SocketAddr>,
    /// Connections given to each backend (in `backends` order).
    given: Arc<Vec<AtomicUsize>>,
    /// Connections whose backend refused or could not be reached.
    failed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RoundRobin {
    /// A proxy over `backends`, the first connection going to `backends[0]`.
    pub async fn start(backends: &[SocketAddr]) -> Self {
        Self::start_at(backends, 0).await
    }

    /// A proxy over `backends`, the first connection going to `backends[first % len]`.
    pub async fn start_at(backends: &[SocketAddr], first: usize) -> Self {
        assert!(!backends.is_empty(), "a round-robin proxy needs a backend");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the round-robin proxy");
        let addr = listener.local_addr().expect("proxy address");
        let given: Arc<Vec<AtomicUsize>> = Arc::new(backends.iter().map(|_| AtomicUsize::new(0)).collect());
        let failed = Arc::new(AtomicUsize::new(0));
        let (list, counts, fails) = (backends.to_vec(), given.clone(), failed.clone());
        let task = tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(MAX_OPEN));
            // Owned here: aborting this task drops the set, which aborts every connection.
            let mut open = JoinSet::new();
            let mut next = first;
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let Ok((client, _)) = listener.accept().await else { return };
                while open.try_join_next().is_some() {}
                let i = next % list.len();
                next += 1;
                counts[i].fetch_add(1, Ordering::Relaxed);
                let (target, fails) = (list[i], fails.clone());
                open.spawn(async move {
                    let _slot = slot;
                    let Ok(server) = TcpStream::connect(target).await else {
                        fails.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    // No Nagle delay that the direct connection this stands in for would not have.
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    // Either side's end (or error) ends the connection: both halves are dropped.
                    tokio::select! {
                        _ = tokio::io::copy(&mut cr, &mut sw) => {}
                        _ = tokio::io::copy(&mut sr, &mut cw) => {}
                    }
                });
            }
        });
        Self { addr, backends: backends.to_vec(), given, failed, task }
    }

    /// The backends, in the order connections are handed out.
    pub fn backends(&self) -> &[SocketAddr] {
        &self.backends
    }

    /// Connections given to each backend so far (in [`Self::backends`] order).
    pub fn counts(&self) -> Vec<usize> {
        self.given.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    /// Connections whose backend could not be reached.
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::Relaxed)
    }
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        self.task.abort();
    }
}
