//! The real binaries as child processes on loopback, killed on drop.
//!
//! Binaries are taken from the cargo target directory of the running test
//! (`target/<profile>/`); `cargo test --workspace` / `cargo nextest run
//! --workspace` build them. A missing binary fails the test with instructions.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary next to the running test executable.
pub fn binary(name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(format!("SWITCHBOARD_{}_BIN", name.to_uppercase().replace('-', "_"))) {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-exe> or target/<profile>/<bench> → target/<profile>/<name>
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build it first (`cargo build -p {name}`, or run the suite with `cargo nextest run --workspace`)",
        path.display()
    );
    path
}

/// Where a child's stderr goes: `$SWITCHBOARD_TEST_LOGDIR/<name>.log` when set, else inherited.
fn log_file(name: &str) -> Stdio {
    match std::env::var("SWITCHBOARD_TEST_LOGDIR") {
        Ok(dir) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("{dir}/{}-{name}.log", std::process::id()))
            .map_or_else(|_| Stdio::inherit(), Stdio::from),
        Err(_) => Stdio::inherit(),
    }
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// One child process; killed (SIGKILL) on drop.
pub struct Proc {
    pub name: String,
    bin: String,
    args: Vec<String>,
    /// A command the binary runs under (e.g. `ip netns exec <ns>`), empty for none.
    wrap: Vec<String>,
    pub child: Child,
    /// Fields of its `LISTENING k=v ...` line.
    pub addrs: Vec<(String, SocketAddr)>,
}

impl Proc {
    /// Starts `bin` with `args` and waits for its `LISTENING` line.
    pub fn spawn(name: &str, bin: &str, args: &[String]) -> Self {
        Self::spawn_wrapped(name, &[], bin, args)
    }

    /// Starts `bin` under `wrap` (a command that execs it, such as `ip netns exec <ns>`).
    pub fn spawn_wrapped(name: &str, wrap: &[String], bin: &str, args: &[String]) -> Self {
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(binary(bin));
                c
            }
            None => Command::new(binary(bin)),
        };
        let mut child = cmd
            .args(args)
            .env("SWITCHBOARD_LOG", std::env::var("SWITCHBOARD_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(log_file(name))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read LISTENING");
        assert!(line.starts_with("LISTENING"), "{name} did not start: {line:?}");
        let addrs = line
            .split_whitespace()
            .skip(1)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.parse().expect("socket address")))
            .collect();
        Self { name: name.to_owned(), bin: bin.to_owned(), args: args.to_vec(), wrap: wrap.to_vec(), child, addrs }
    }

    /// kill -9, then start again with the same arguments (ports given as 0 change).
    pub fn restart(&mut self) {
        self.kill();
        *self = Proc::spawn_wrapped(&self.name.clone(), &self.wrap.clone(), &self.bin.clone(), &self.args.clone());
    }

    pub fn addr(&self, key: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("{} has no {key}", self.name))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`-TERM`, `-KILL`, `-STOP`, `-CONT`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.pid().to_string()]).status().map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "kill {sig} {} failed", self.name);
    }

    /// kill -9 and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "{} did not exit within {limit:?}", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits (at most 60 s) until `p` answers `/readyz` on its admin port with 200.
/// Blocks the calling thread (the harness's start functions are not async): a test whose
/// cluster has an in-process broker proxy needs a multi-thread runtime, or the proxy cannot
/// run meanwhile and the bridge never reaches its broker.
fn wait_ready(p: &Proc) {
    use std::io::{Read, Write};
    let admin = p.addr("admin");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(1)).is_ok_and(|mut s| {
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let mut head = [0u8; 12];
            s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n").is_ok()
                && s.read_exact(&mut head).is_ok()
                && head.ends_with(b"200")
        });
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "{} never became ready", p.name);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Builder for a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    presence: usize,
    gateways: usize,
    kafka: bool,
    /// The bridges' backbone (Kafka unless `.backbone(..)`).
    backbone: crate::backbone::Backbone,
    /// A broker started elsewhere (e.g. `bench mock-kafka`), used instead of tansu.
    external_kafka: Option<String>,
    bridges: usize,
    bridge_args: Vec<String>,
    lease: String,
    large_room: usize,
    gateway_args: Vec<String>,
    internal_token: Option<String>,
    tls: Option<std::sync::Arc<crate::tls::Pki>>,
}

/// Presence replicas and gateways wired together.
pub struct Cluster {
    pub presence: Vec<Proc>,
    pub presence_ports: Vec<u16>,
    pub bridges: Vec<Proc>,
    pub gateways: Vec<Proc>,
    pub broker: Option<crate::kafka::Broker>,
    /// The NATS or Redis server of a cluster on that backbone.
    pub server: Option<crate::backbone::Server>,
    /// Topic and consumer group of this cluster (unique per cluster: tansu cannot delete topics).
    pub topic: String,
    builder: ClusterBuilder,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            presence: 1,
            gateways: 2,
            kafka: false,
            backbone: crate::backbone::Backbone::Kafka,
            external_kafka: None,
            bridges: 0,
            bridge_args: Vec::new(),
            lease: "10s".into(),
            large_room: 1000,
            gateway_args: Vec::new(),
            internal_token: None,
            tls: None,
        }
    }

    /// The proxy in front of the backbone (tansu, nats-server or redis-server): cut it to
    /// make the backbone unreachable.
    pub fn backbone_proxy(&self) -> &crate::kafka::Proxy {
        match (&self.broker, &self.server) {
            (Some(b), _) => &b.proxy,
            (None, Some(s)) => &s.proxy,
            (None, None) => panic!("this cluster has no backbone"),
        }
    }

    /// Client address of gateway `i`.
    pub fn gateway(&self, i: usize) -> SocketAddr {
        self.gateways[i].addr("client")
    }

    /// gRPC URL of presence replica `i`.
    pub fn presence_url(&self, i: usize) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.presence_ports[i])
    }

    /// `https` when the cluster runs mutual TLS.
    fn scheme(&self) -> &'static str {
        if self.builder.tls.is_some() { "https" } else { "http" }
    }

    /// `--internal-token` and `--internal-tls-*` for every service, when the cluster has them.
    fn token_args(&self) -> Vec<String> {
        let mut args: Vec<String> =
            self.builder.internal_token.iter().flat_map(|t| ["--internal-token".to_owned(), t.clone()]).collect();
        args.extend(self.builder.tls.iter().flat_map(|pki| pki.args()));
        args
    }

    fn presence_args(&self, port: u16) -> Vec<String> {
        let tokens = self.token_args();
        let mut args = vec![
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
            "--lease".into(),
            self.builder.lease.clone(),
            "--large-room".into(),
            self.builder.large_room.to_string(),
        ];
        args.extend(tokens);
        args
    }

    /// Starts (again) presence replica `i` on its port.
    pub fn start_presence(&mut self, i: usize) {
        let args = self.presence_args(self.presence_ports[i]);
        let p = Proc::spawn(&format!("presence{i}"), "presence", &args);
        if i < self.presence.len() {
            self.presence[i] = p;
        } else {
            self.presence.push(p);
        }
    }

    /// gRPC URL of bridge `i`'s Push API.
    pub fn bridge_url(&self, i: usize) -> String {
        format!("{}://{}", self.scheme(), self.bridges[i].addr("grpc"))
    }

    /// Starts one more broker-bridge and returns its index.
    pub fn start_bridge(&mut self) -> usize {
        self.start_bridge_with(&[])
    }

    /// Starts one more broker-bridge with extra flags (later flags win) and returns its index.
    pub fn start_bridge_with(&mut self, extra: &[String]) -> usize {
        let i = self.bridges.len();
        let (flag, bootstrap) = match (&self.builder.external_kafka, &self.broker, &self.server) {
            (_, _, Some(server)) => ("--backbone", server.url()),
            (Some(b), _, _) => ("--brokers", b.clone()),
            (None, Some(broker), _) => ("--brokers", broker.bootstrap()),
            (None, None, None) => panic!("bridges need .kafka(), .backbone(..) or .external_kafka()"),
        };
        let urls: Vec<String> = (0..self.presence_ports.len()).map(|p| self.presence_url(p)).collect();
        let mut args: Vec<String> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
            "--bridge-id".into(),
            format!("br{i}"),
            flag.into(),
            bootstrap,
            "--topic".into(),
            self.topic.clone(),
            "--group".into(),
            format!("{}.group", self.topic),
            "--partitions".into(),
            "4".into(),
            "--presence-addrs".into(),
            urls.join(","),
            "--kafka-option".into(),
            "fetch.wait.max.ms=10".into(),
        ];
        args.extend(self.builder.bridge_args.iter().cloned());
        args.extend(self.token_args());
        args.extend(extra.iter().cloned());
        let bridge = Proc::spawn(&format!("br{i}"), "broker-bridge", &args);
        // It binds before it reaches its backbone: wait until it serves, so that a gateway
        // started next finds it (a subscribe asks it for the channel's position).
        wait_ready(&bridge);
        self.bridges.push(bridge);
        i
    }

    /// Starts one more gateway and returns its index.
    pub fn start_gateway(&mut self) -> usize {
        self.start_gateway_with(&[])
    }

    /// Starts one more gateway with extra flags (later flags win) and returns its index.
    pub fn start_gateway_with(&mut self, extra: &[String]) -> usize {
        let i = self.gateways.len();
        let urls: Vec<String> = (0..self.presence_ports.len()).map(|p| self.presence_url(p)).collect();
        let mut args: Vec<String> = [
            "--listen",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--jwt-hs256-secret",
            crate::ws::SECRET,
            "--node-id",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.push(format!("gw{i}"));
        if !urls.is_empty() {
            args.push("--presence-addrs".into());
            args.push(urls.join(","));
        }
        if !self.bridges.is_empty() {
            let bridges: Vec<String> = (0..self.bridges.len()).map(|b| self.bridge_url(b)).collect();
            args.push("--bridge-addrs".into());
            args.push(bridges.join(","));
        }
        args.extend(self.builder.gateway_args.iter().cloned());
        args.extend(self.token_args());
        args.extend(extra.iter().cloned());
        self.gateways.push(Proc::spawn(&format!("gw{i}"), "gateway", &args));
        i
    }
}

impl ClusterBuilder {
    pub fn presence(mut self, n: usize) -> Self {
        self.presence = n;
        self
    }
    pub fn gateways(mut self, n: usize) -> Self {
        self.gateways = n;
        self
    }
    /// Presence lease (default 10s, as in production; a short lease under CPU load
    /// expires live gateways).
    pub fn lease(mut self, lease: &str) -> Self {
        self.lease = lease.to_owned();
        self
    }
    /// The internal gRPC credential every service requires and sends.
    pub fn internal_token(mut self, token: &str) -> Self {
        self.internal_token = Some(token.to_owned());
        self
    }
    /// Mutual TLS on every internal gRPC API, with certificates from `pki`.
    pub fn internal_tls(mut self, pki: std::sync::Arc<crate::tls::Pki>) -> Self {
        self.tls = Some(pki);
        self
    }
    /// Start a Kafka-protocol broker (tansu) behind a cuttable proxy.
    pub fn kafka(mut self) -> Self {
        self.kafka = true;
        self
    }
    /// Run the bridges on `backbone`: tansu for Kafka, else a nats-server or redis-server of
    /// this cluster's own.
    pub fn backbone(mut self, backbone: crate::backbone::Backbone) -> Self {
        self.backbone = backbone;
        self.kafka = backbone == crate::backbone::Backbone::Kafka;
        self
    }
    /// Use a broker already running at `bootstrap` instead of starting tansu.
    pub fn external_kafka(mut self, bootstrap: &str) -> Self {
        self.external_kafka = Some(bootstrap.to_owned());
        self
    }
    pub fn bridges(mut self, n: usize) -> Self {
        self.bridges = n;
        self
    }
    /// Extra flags for every bridge.
    pub fn bridge_args(mut self, args: &[&str]) -> Self {
        self.bridge_args = args.iter().map(|s| (*s).to_owned()).collect();
        self
    }
    pub fn large_room(mut self, n: usize) -> Self {
        self.large_room = n;
        self
    }
    /// Extra flags for every gateway.
    pub fn gateway_args(mut self, args: &[&str]) -> Self {
        self.gateway_args = args.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    pub async fn start(self) -> Cluster {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let presence_ports = (0..self.presence).map(|_| free_port()).collect();
        let (gateways, bridges, kafka, backbone) = (self.gateways, self.bridges, self.kafka, self.backbone);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let topic = format!(
            "sb.test.{}.{}.{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut c = Cluster {
            presence: Vec::new(),
            presence_ports,
            bridges: Vec::new(),
            gateways: Vec::new(),
            broker: None,
            server: None,
            topic,
            builder: self,
        };
        // Presence first: a replica routes for bridges only once it has been up for a lease
        // (every gateway alive has registered with it by then), so its lease runs while the
        // backbone starts.
        for i in 0..c.presence_ports.len() {
            c.start_presence(i);
        }
        if kafka {
            c.broker = Some(crate::kafka::Broker::start().await);
        }
        c.server = match backbone {
            crate::backbone::Backbone::Kafka => None,
            other => Some(crate::backbone::Server::start(other).await),
        };
        for _ in 0..bridges {
            c.start_bridge();
        }
        for _ in 0..gateways {
            c.start_gateway();
        }
        c
    }
}
