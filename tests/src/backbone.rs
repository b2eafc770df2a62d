//! The backbones a cluster test can run on, and real NATS / Redis servers for them:
//! each on a free loopback port with its own temporary directory, behind a TCP
//! proxy of ours (cut and restore the path), stopped on drop. `restart` keeps the
//! port and the data (JetStream file storage; Redis with the AOF on).
//!
//! [`per_backbone!`](crate::per_backbone) turns one test body into a test per backbone.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::cluster::free_port;
use crate::kafka::Proxy;

/// Which backbone a cluster's bridges use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backbone {
    /// tansu, a Kafka-protocol broker ([`crate::kafka`]).
    Kafka,
    /// nats-server with JetStream (file storage).
    Nats,
    /// redis-server with `appendonly yes`.
    Redis,
}

/// A running nats-server or redis-server and the proxy in front of it.
pub struct Server {
    pub kind: Backbone,
    child: Option<Child>,
    port: u16,
    /// More arguments of the server (e.g. a configuration file).
    extra: Vec<String>,
    dir: PathBuf,
    pub proxy: Proxy,
}

fn binary(kind: Backbone) -> &'static str {
    match kind {
        Backbone::Nats => "nats-server",
        Backbone::Redis => "redis-server",
        Backbone::Kafka => unreachable!("tansu is started by crate::kafka"),
    }
}

impl Server {
    /// Starts the server for `kind` (Nats or Redis).
    pub async fn start(kind: Backbone) -> Self {
        Self::start_with(kind, &[]).await
    }

    /// Starts the server for `kind` with `extra` arguments after ours.
    pub async fn start_with(kind: Backbone, extra: &[&str]) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "switchboard-{}-{}-{}",
            binary(kind),
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let (port, proxy_port) = (free_port(), free_port());
        let mut s = Self {
            kind,
            child: None,
            port,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            dir,
            proxy: Proxy::start(([127, 0, 0, 1], proxy_port).into(), ([127, 0, 0, 1], port).into()).await,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let dir = self.dir.to_string_lossy().into_owned();
        let (mut args, ready): (Vec<&str>, &str) = match self.kind {
            Backbone::Nats => (vec!["-a", "127.0.0.1", "-p", &port, "-js", "-sd", &dir], "Server is ready"),
            Backbone::Redis => (
                vec![
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    &dir,
                    "--appendonly",
                    "yes",
                    "--save",
                    "",
                    "--daemonize",
                    "no",
                    "--logfile",
                    "",
                ],
                "Ready to accept connections",
            ),
            Backbone::Kafka => unreachable!(),
        };
        args.extend(self.extra.iter().map(String::as_str));
        let mut child = Command::new(binary(self.kind))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (run ./scripts/test.sh, or `apt-get install nats-server redis-server`)",
                    binary(self.kind)
                )
            });
        // nats-server logs to stderr, redis-server to stdout: wait for the ready line on either.
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        for pipe in [Box::new(out) as Box<dyn std::io::Read + Send>, Box::new(err)] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(ready) => break,
                Ok(line) => seen.push(line),
                Err(_) => panic!("{} did not become ready: {seen:#?}", binary(self.kind)),
            }
        }
        self.child = Some(child);
    }

    /// The URL bridges connect to (through the proxy).
    pub fn url(&self) -> String {
        let scheme = if self.kind == Backbone::Nats { "nats" } else { "redis" };
        format!("{scheme}://{}", self.proxy.addr)
    }

    /// kill -9 (the data stays in its directory).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Turns `async fn name(backbone: Backbone)` into a module `name` with the tests
/// `kafka`, `nats` and `redis`, each calling it with its backbone.
#[macro_export]
macro_rules! per_backbone {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kafka() {
                super::$name($crate::backbone::Backbone::Kafka).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nats() {
                super::$name($crate::backbone::Backbone::Nats).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$name($crate::backbone::Backbone::Redis).await
            }
        }
    )+};
}
