//! Chaos runs: a workload of independent clients on every gateway, a nemesis that injects
//! faults on a seeded schedule, and the [`checker`](crate::checker) that judges what the
//! clients were shown.
//!
//! - **Workload**: subscribers (one logical client each, following two channels, moving
//!   to the next gateway whenever its socket ends and resubscribing with `since`; now and
//!   then one unsubscribes and subscribes again); SSE clients (streams dropped now and
//!   then and reopened on the next gateway with `Last-Event-ID`) and long-pollers (each
//!   poll on the next gateway, with the last answer's cursor) on the same channels
//!   ([`fallback`]); and publishers (each publish and direct
//!   send carries an idempotency key; an `unavailable` answer or a lost connection is
//!   retried with the same key, on the next gateway when the socket is gone). Every
//!   command, its answer and every frame shown goes into the history.
//! - **Nemesis**: kill -9 and restart of a gateway, a bridge, the presence replica; a
//!   drain (SIGTERM) and restart of a gateway; a pause (SIGSTOP, then SIGCONT) of a
//!   gateway or of a bridge for longer than the consumer group's session; the broker path
//!   cut, then restored; and on any link between two services (gateway → bridge, bridges
//!   → gateway, gateway → presence, bridge → presence, each a [`Link`]), a partition
//!   (nothing passes, connections stay open: timeouts, not resets), a cut (resets), or
//!   added latency, then restored. Gateway 0 runs in a network namespace of its own
//!   ([`Netns`]), and a partition of it drops every packet on its veth pair both ways. The schedule comes from the seed alone ([`schedule`]), so a
//!   failing seed replays the same faults in the same order at the same offsets.
//! - At the end the faults stop, the workload waits until every subscriber has been
//!   shown the newest acknowledged message of its channels (or a bound passes), marks the
//!   quiet point, asks presence until it agrees with who is there (or a bound passes),
//!   and the checker reads the history.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::backbone::Backbone;
use crate::checker::{self, Event, Outcome, Pos, Report, SubOutcome};
use crate::cluster::{Cluster, free_port};
use crate::link::{Link, State};
use crate::netns::Netns;
use crate::resume::open;
use crate::ws::{Ws, http_get};

mod fallback;

/// The shape of a run.
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    /// How long faults are injected.
    pub duration: Duration,
    pub gateways: usize,
    pub bridges: usize,
    pub subscribers: usize,
    /// Clients on the fallback transports, following channels as the subscribers do:
    /// SSE streams that reconnect with `Last-Event-ID`, and long-pollers with a cursor.
    pub sse_clients: usize,
    pub pollers: usize,
    pub publishers: usize,
    pub channels: usize,
    /// Time between one publisher's operations.
    pub every: Duration,
    /// The bridges' backbone: tansu (Kafka protocol), or a nats-server or redis-server,
    /// which survive a kill -9 with their data and so are killed and restarted too.
    pub backbone: Backbone,
}

impl Config {
    pub fn new(seed: u64, duration: Duration) -> Config {
        Config {
            seed,
            duration,
            gateways: 3,
            bridges: 2,
            subscribers: 6,
            sse_clients: 2,
            pollers: 2,
            publishers: 2,
            channels: 4,
            every: Duration::from_millis(40),
            backbone: Backbone::Kafka,
        }
    }
}

/// One fault the nemesis injects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    KillGateway(usize),
    DrainGateway(usize),
    PauseGateway(usize, Duration),
    KillBridge(usize),
    PauseBridge(usize, Duration),
    KillPresence,
    CutBroker(Duration),
    /// kill -9 of the nats-server or redis-server, restarted on its data (tansu keeps its
    /// data in memory, so not on Kafka).
    KillBackbone,
    Partition(LinkId, Duration),
    /// Gateway 0's namespace drops every packet, both ways.
    IsolateGateway(Duration),
    CutLink(LinkId, Duration),
    SlowLink(LinkId, Duration, Duration),
}

/// A link between two services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkId {
    /// Gateway `g`'s calls to bridge `b` (publishes, history).
    GatewayToBridge(usize, usize),
    /// Every bridge's delivery streams to gateway `g`.
    BridgesToGateway(usize),
    /// Gateway `g`'s presence link (its connections, lease, Watch stream).
    GatewayToPresence(usize),
    /// Bridge `b`'s presence link (its routing).
    BridgeToPresence(usize),
}

/// How many kinds of fault [`schedule`] draws from on `backbone`: one more where the
/// backbone survives a restart.
pub fn fault_kinds(backbone: Backbone) -> usize {
    if backbone == Backbone::Kafka { 11 } else { 12 }
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::KillGateway(_) => "kill_gateway",
            Fault::DrainGateway(_) => "drain_gateway",
            Fault::PauseGateway(..) => "pause_gateway",
            Fault::KillBridge(_) => "kill_bridge",
            Fault::PauseBridge(..) => "pause_bridge",
            Fault::KillPresence => "kill_presence",
            Fault::CutBroker(_) => "cut_broker",
            Fault::KillBackbone => "kill_backbone",
            Fault::Partition(..) => "partition",
            Fault::IsolateGateway(_) => "isolate_gateway",
            Fault::CutLink(..) => "cut_link",
            Fault::SlowLink(..) => "slow_link",
        }
    }
}

/// The faults of a run and when each may start (offsets from the start of the faults),
/// from the seed alone: every kind once in a shuffled first round, then kinds at random,
/// each 2-6 s after the previous one may have ended. On Kafka (tansu) a seed gives the
/// schedule it gave before the backbone could be restarted.
pub fn schedule(
    seed: u64,
    duration: Duration,
    gateways: usize,
    bridges: usize,
    backbone: Backbone,
) -> Vec<(Duration, Fault)> {
    let kinds = fault_kinds(backbone);
    let mut rng = StdRng::seed_from_u64(seed);
    let link = |rng: &mut StdRng| match rng.random_range(0..4) {
        0 => LinkId::GatewayToBridge(rng.random_range(0..gateways), rng.random_range(0..bridges)),
        1 => LinkId::BridgesToGateway(rng.random_range(0..gateways)),
        2 => LinkId::GatewayToPresence(rng.random_range(0..gateways)),
        _ => LinkId::BridgeToPresence(rng.random_range(0..bridges)),
    };
    let pick = |rng: &mut StdRng, kind: usize| match kind {
        0 => Fault::KillGateway(rng.random_range(0..gateways)),
        1 => Fault::DrainGateway(rng.random_range(0..gateways)),
        2 => Fault::PauseGateway(rng.random_range(0..gateways), Duration::from_millis(rng.random_range(2000..8000))),
        3 => Fault::KillBridge(rng.random_range(0..bridges)),
        // Longer than the group's 10 s session, so the others take its partitions.
        4 => Fault::PauseBridge(rng.random_range(0..bridges), Duration::from_millis(rng.random_range(11_000..15_000))),
        5 => Fault::KillPresence,
        6 => Fault::CutBroker(Duration::from_millis(rng.random_range(1000..5000))),
        7 => Fault::Partition(link(rng), Duration::from_millis(rng.random_range(3000..12_000))),
        8 => Fault::CutLink(link(rng), Duration::from_millis(rng.random_range(1000..5000))),
        9 => Fault::IsolateGateway(Duration::from_millis(rng.random_range(3000..12_000))),
        11 => Fault::KillBackbone,
        _ => Fault::SlowLink(
            link(rng),
            Duration::from_millis(rng.random_range(20..200)),
            Duration::from_millis(rng.random_range(3000..8000)),
        ),
    };
    let mut first: Vec<usize> = (0..kinds).collect();
    for i in (1..first.len()).rev() {
        first.swap(i, rng.random_range(0..=i));
    }
    let (mut at, mut out) = (Duration::from_secs(2), Vec::new());
    let mut n = 0;
    while n < first.len() || at < duration {
        let kind = if n < first.len() { first[n] } else { rng.random_range(0..kinds) };
        let fault = pick(&mut rng, kind);
        let takes = match &fault {
            Fault::PauseGateway(_, d)
            | Fault::PauseBridge(_, d)
            | Fault::CutBroker(d)
            | Fault::Partition(_, d)
            | Fault::IsolateGateway(d)
            | Fault::CutLink(_, d)
            | Fault::SlowLink(_, _, d) => *d,
            _ => Duration::from_secs(2),
        };
        out.push((at, fault));
        at += takes + Duration::from_millis(rng.random_range(2000..6000));
        n += 1;
    }
    out
}

/// The history being written, shared by every actor.
#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    events: Arc<Mutex<Vec<Event>>>,
}

impl Recorder {
    fn new() -> Recorder {
        Recorder { start: Instant::now(), events: Arc::default() }
    }
    fn t(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
    fn push(&self, e: Event) {
        self.events.lock().unwrap().push(e);
    }
    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }
}

/// What a run did and found.
#[derive(Debug)]
pub struct Summary {
    pub seed: u64,
    pub backbone: Backbone,
    pub faults: BTreeMap<&'static str, u64>,
    pub report: Report,
    /// The history, one event per line.
    pub history: String,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let faults: Vec<String> = self.faults.iter().map(|(k, n)| format!("{k}={n}")).collect();
        writeln!(f, "seed {} on {:?}", self.seed, self.backbone)?;
        writeln!(f, "faults: {}", faults.join(" "))?;
        write!(f, "{}", self.report)
    }
}

/// The links of a chaos cluster, each between two services.
struct Links {
    gateway_bridge: Vec<Vec<Link>>,
    bridges_gateway: Vec<Link>,
    gateway_presence: Vec<Link>,
    bridge_presence: Vec<Link>,
}

impl Links {
    fn get(&self, id: LinkId) -> &Link {
        match id {
            LinkId::GatewayToBridge(g, b) => &self.gateway_bridge[g][b],
            LinkId::BridgesToGateway(g) => &self.bridges_gateway[g],
            LinkId::GatewayToPresence(g) => &self.gateway_presence[g],
            LinkId::BridgeToPresence(b) => &self.bridge_presence[b],
        }
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Starts a cluster (the backbone, one presence replica, `bridges` bridges, `gateways` gateways,
/// every service on a fixed port so that a restarted one is found where it was, every
/// internal connection through a [`Link`]), runs the workload and the nemesis, and judges
/// the history.
pub async fn run(cfg: &Config) -> Summary {
    let mut c = Cluster::builder().backbone(cfg.backbone).bridges(0).gateways(0).start().await;
    let presence = local(c.presence_ports[0]);
    let mut bridge_ports = Vec::new();
    let mut bridge_presence = Vec::new();
    for _ in 0..cfg.bridges {
        let (port, link) = (free_port(), Link::start(presence).await);
        c.start_bridge_with(&[
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--presence-addrs".into(),
            format!("http://{}", link.addr),
        ]);
        bridge_ports.push(port);
        bridge_presence.push(link);
    }
    let (mut addrs, mut gateway_bridge, mut bridges_gateway, mut gateway_presence) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // Gateway 0 lives in a namespace: it listens on the namespace's address, and its links
    // to the bridges and presence listen on this side's end of the veth pair.
    let netns = Netns::create();
    for g in 0..cfg.gateways {
        let (host, own) = if g == 0 {
            (netns.host_ip, netns.ns_ip)
        } else {
            (std::net::Ipv4Addr::LOCALHOST, std::net::Ipv4Addr::LOCALHOST)
        };
        let (port, grpc) = (free_port(), free_port());
        let mut to_bridges = Vec::new();
        for b in &bridge_ports {
            to_bridges.push(Link::start_on(host, local(*b)).await);
        }
        let delivery = Link::start(SocketAddr::from((own, grpc))).await;
        let to_presence = Link::start_on(host, presence).await;
        let urls: Vec<String> = to_bridges.iter().map(|l| format!("http://{}", l.addr)).collect();
        let args: Vec<String> = vec![
            "--listen".into(),
            format!("{own}:{port}"),
            "--grpc-addr".into(),
            format!("{own}:{grpc}"),
            "--admin-addr".into(),
            format!("{own}:0"),
            "--jwt-hs256-secret".into(),
            crate::ws::SECRET.into(),
            "--node-id".into(),
            format!("gw{g}"),
            "--delivery-addr".into(),
            format!("http://{}", delivery.addr),
            "--bridge-addrs".into(),
            urls.join(","),
            "--presence-addrs".into(),
            format!("http://{}", to_presence.addr),
        ];
        let wrap = if g == 0 { netns.exec() } else { Vec::new() };
        c.gateways.push(crate::cluster::Proc::spawn_wrapped(&format!("gw{g}"), &wrap, "gateway", &args));
        addrs.push(SocketAddr::from((own, port)));
        gateway_bridge.push(to_bridges);
        bridges_gateway.push(delivery);
        gateway_presence.push(to_presence);
    }
    let links = Links { gateway_bridge, bridges_gateway, gateway_presence, bridge_presence };
    for g in 0..cfg.gateways {
        ready(&c, g).await;
    }
    // Presence channels (`room:*`, the default `--presence-channels`): their members are
    // tracked cluster-wide, so the end can ask who follows them.
    let channels: Vec<String> = (0..cfg.channels).map(|i| format!("room:chaos{i}")).collect();
    let users: Vec<String> = (0..cfg.subscribers).map(|i| format!("u{i}")).collect();
    let rec = Recorder::new();
    let stop_pub = CancellationToken::new();
    let stop_sub = CancellationToken::new();
    let mut subs = Vec::new();
    for i in 0..cfg.subscribers {
        let follows = vec![channels[i % channels.len()].clone(), channels[(i + 1) % channels.len()].clone()];
        let actor = Subscriber {
            rec: rec.clone(),
            name: format!("s{i}"),
            user: users[i].clone(),
            addrs: addrs.clone(),
            channels: follows.clone(),
            rng: StdRng::seed_from_u64(cfg.seed ^ (0x5u64 << 32 | i as u64)),
            stop: stop_sub.clone(),
            calm: stop_pub.clone(),
            state: Arc::default(),
        };
        let state = actor.state.clone();
        subs.push((actor.name.clone(), actor.user.clone(), follows, state, tokio::spawn(actor.run(i))));
    }
    // The fallback transports follow the same channels, so that the checker compares what
    // each transport was shown of one stream.
    for i in 0..cfg.sse_clients + cfg.pollers {
        let follows = vec![channels[i % channels.len()].clone(), channels[(i + 2) % channels.len()].clone()];
        let state: Arc<Mutex<SubState>> = Arc::default();
        let task = if i < cfg.sse_clients {
            let actor = fallback::SseClient {
                rec: rec.clone(),
                name: format!("e{i}"),
                user: format!("ue{i}"),
                addrs: addrs.clone(),
                channels: follows.clone(),
                rng: StdRng::seed_from_u64(cfg.seed ^ (0xeu64 << 32 | i as u64)),
                stop: stop_sub.clone(),
                calm: stop_pub.clone(),
                state: state.clone(),
            };
            (actor.name.clone(), actor.user.clone(), tokio::spawn(actor.run(i)))
        } else {
            let actor = fallback::Poller {
                rec: rec.clone(),
                name: format!("q{i}"),
                user: format!("uq{i}"),
                addrs: addrs.clone(),
                channels: follows.clone(),
                stop: stop_sub.clone(),
                state: state.clone(),
            };
            (actor.name.clone(), actor.user.clone(), tokio::spawn(actor.run(i)))
        };
        subs.push((task.0, task.1, follows, state, task.2));
    }
    let mut pubs = Vec::new();
    for i in 0..cfg.publishers {
        let actor = Publisher {
            rec: rec.clone(),
            name: format!("p{i}"),
            addrs: addrs.clone(),
            channels: channels.clone(),
            users: users.clone(),
            rng: StdRng::seed_from_u64(cfg.seed ^ (0x9u64 << 32 | i as u64)),
            every: cfg.every,
            stop: stop_pub.clone(),
        };
        pubs.push(tokio::spawn(actor.run(i)));
    }

    // The nemesis, on the schedule.
    let plan = schedule(cfg.seed, cfg.duration, cfg.gateways, cfg.bridges, cfg.backbone);
    eprintln!("chaos seed {} on {:?}: {} faults: {plan:?}", cfg.seed, cfg.backbone, plan.len());
    let started = Instant::now();
    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();
    for (at, fault) in &plan {
        if let Some(wait) = at.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        eprintln!("chaos {:>6} ms: {fault:?}", rec.t());
        inject(&mut c, &links, &netns, fault).await;
        *faults.entry(fault.kind()).or_default() += 1;
    }
    for g in 0..cfg.gateways {
        ready(&c, g).await;
    }

    // Quiet: publishers stop, then every subscriber catches up (or the bound passes).
    stop_pub.cancel();
    for p in pubs {
        let _ = p.await;
    }
    let newest = newest_acked(&rec.events());
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let caught_up = subs.iter().all(|(_, _, follows, state, _)| {
            let s = state.lock().unwrap();
            follows.iter().all(|ch| {
                newest.get(ch).is_none_or(|(seq, m)| {
                    s.shown.get(ch).is_some_and(|seen| seen.contains(m)) || s.floor.get(ch).is_some_and(|f| f >= seq)
                })
            })
        });
        if caught_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rec.push(Event::Quiet { t: rec.t() });

    // Presence: asked on one gateway until it names who is connected and subscribed.
    let expected: HashMap<&String, Vec<String>> = channels
        .iter()
        .map(|ch| {
            let mut who: Vec<String> = subs
                .iter()
                .filter(|(_, _, follows, state, _)| follows.contains(ch) && state.lock().unwrap().connected)
                .map(|(_, user, _, _, _)| user.clone())
                .collect();
            who.sort();
            (ch, who)
        })
        .collect();
    // The observer is a client like the others: a gateway whose presence lease lapsed
    // during the last faults closes every session (1001 `resync`) once its link is back,
    // and the observer then opens a new one, as clients do. A gateway that does not answer
    // on any session still fails the check when the deadline passes.
    let mut observer = open(addrs[0], "observer").await;
    for ch in &channels {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let reply = match observer.as_mut() {
                Some(ws) => call(ws, json!({"op":"presence","channel":ch,"ref":"p"})).await,
                None => None,
            };
            let mut members: Vec<String> = reply
                .as_ref()
                .and_then(|r| r["users"].as_array())
                .map(|a| a.iter().filter_map(|u| u.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            members.sort();
            if members == expected[ch] || Instant::now() > deadline {
                eprintln!("chaos {:>6} ms: presence of {ch}: {members:?}, expected {:?}", rec.t(), expected[ch]);
                rec.push(Event::Presence { t: rec.t(), client: "observer".into(), channel: ch.clone(), members });
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            if reply.is_none() {
                observer = open(addrs[0], "observer").await;
            }
        }
    }
    stop_sub.cancel();
    for (_, _, _, _, task) in subs {
        let _ = task.await;
    }
    let events = rec.events();
    Summary {
        seed: cfg.seed,
        backbone: cfg.backbone,
        faults,
        report: checker::check(&events),
        history: checker::to_lines(&events),
    }
}

/// The newest acknowledged message per channel, with its seq.
fn newest_acked(events: &[Event]) -> HashMap<String, (u64, String)> {
    let mut newest: HashMap<String, (u64, String)> = HashMap::new();
    for e in events {
        if let Event::Publish { channel, msg, outcome: Outcome::Ack { pos: Some(p), .. }, .. } = e {
            let n = newest.entry(channel.clone()).or_insert((0, String::new()));
            if p.seq > n.0 {
                *n = (p.seq, msg.clone());
            }
        }
    }
    newest
}

async fn inject(c: &mut Cluster, links: &Links, netns: &Netns, fault: &Fault) {
    let pause = || tokio::time::sleep(Duration::from_millis(500));
    match fault {
        Fault::KillGateway(g) => {
            c.gateways[*g].kill();
            pause().await;
            c.gateways[*g].restart();
        }
        Fault::DrainGateway(g) => {
            c.gateways[*g].signal("-TERM");
            let deadline = Instant::now() + Duration::from_secs(60);
            while c.gateways[*g].child.try_wait().expect("try_wait").is_none() {
                assert!(Instant::now() < deadline, "gateway {g} did not finish its drain");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            c.gateways[*g].restart();
        }
        Fault::PauseGateway(g, d) => {
            c.gateways[*g].signal("-STOP");
            tokio::time::sleep(*d).await;
            c.gateways[*g].signal("-CONT");
        }
        Fault::KillBridge(b) => {
            c.bridges[*b].kill();
            pause().await;
            c.bridges[*b].restart();
        }
        Fault::PauseBridge(b, d) => {
            c.bridges[*b].signal("-STOP");
            tokio::time::sleep(*d).await;
            c.bridges[*b].signal("-CONT");
        }
        Fault::KillPresence => {
            c.presence[0].kill();
            pause().await;
            c.start_presence(0);
        }
        Fault::CutBroker(d) => {
            let proxy = c.backbone_proxy();
            proxy.cut();
            tokio::time::sleep(*d).await;
            proxy.restore();
        }
        Fault::KillBackbone => {
            let server = c.server.as_mut().expect("only a NATS or Redis backbone is restarted");
            server.kill();
            pause().await;
            server.restart();
        }
        Fault::Partition(l, d) => hold(links.get(*l), State::Blackhole, *d).await,
        Fault::CutLink(l, d) => hold(links.get(*l), State::Cut, *d).await,
        Fault::IsolateGateway(d) => {
            netns.partition();
            tokio::time::sleep(*d).await;
            netns.heal();
        }
        Fault::SlowLink(l, delay, d) => hold(links.get(*l), State::Slow(*delay), *d).await,
    }
}

/// Puts `link` in `state` for `d`, then opens it again.
async fn hold(link: &Link, state: State, d: Duration) {
    link.set(state);
    tokio::time::sleep(d).await;
    link.set(State::Open);
}

/// Waits until gateway `g` answers `/readyz` with 200.
async fn ready(c: &Cluster, g: usize) {
    let admin = c.gateways[g].addr("admin");
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(admin, "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "gateway {g} never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `cmd` and waits (at most 10 s) for the reply with its `ref`; None when the
/// socket ended or nothing came.
async fn call(ws: &mut Ws, cmd: Value) -> Option<Value> {
    let r = cmd["ref"].clone();
    ws.send(Message::text(cmd.to_string())).await.ok()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await.ok()? {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).ok()?;
                if v["ref"] == r {
                    return Some(v);
                }
            }
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
            Some(Ok(_)) => {}
        }
    }
}

fn pos_of(v: &Value) -> Option<Pos> {
    Some(Pos { seq: v["seq"].as_u64()?, epoch: v["epoch"].as_str()?.to_owned() })
}

/// What the run's end reads of a subscriber.
#[derive(Default)]
struct SubState {
    connected: bool,
    /// Messages shown, per channel.
    shown: HashMap<String, std::collections::HashSet<String>>,
    /// Where each channel's stream started again last (a subscribe not recovered).
    floor: HashMap<String, u64>,
}

struct Subscriber {
    rec: Recorder,
    name: String,
    user: String,
    addrs: Vec<SocketAddr>,
    channels: Vec<String>,
    rng: StdRng,
    stop: CancellationToken,
    /// Once cancelled (the quiet point nears), no more unsubscribes.
    calm: CancellationToken,
    state: Arc<Mutex<SubState>>,
}

impl Subscriber {
    async fn run(mut self, first: usize) {
        let mut positions: HashMap<String, Pos> = HashMap::new();
        let mut at = first;
        while !self.stop.is_cancelled() {
            let addr = self.addrs[at % self.addrs.len()];
            at += 1;
            let Some(mut ws) = open(addr, &self.user).await else {
                tokio::select! {
                    () = self.stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                }
            };
            self.rec.push(Event::Connected { t: self.rec.t(), client: self.name.clone(), user: self.user.clone() });
            self.state.lock().unwrap().connected = true;
            let code = self.session(&mut ws, &mut positions).await;
            self.state.lock().unwrap().connected = false;
            if let Some(code) = code {
                self.rec.push(Event::Closed { t: self.rec.t(), client: self.name.clone(), code });
            } else {
                let _ = ws.close(None).await;
                self.rec.push(Event::Closed { t: self.rec.t(), client: self.name.clone(), code: 1000 });
                return;
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(self.rng.random_range(50..300))) => {}
            }
        }
    }

    /// One session; the close code when it ended, None when told to stop.
    async fn session(&mut self, ws: &mut Ws, positions: &mut HashMap<String, Pos>) -> Option<u16> {
        // The `since` each subscribe in flight was sent with.
        let mut asked: HashMap<String, Option<Pos>> = HashMap::new();
        for ch in self.channels.clone() {
            let since = positions.get(&ch).cloned();
            if !self.subscribe(ws, &ch, since.clone()).await {
                return Some(1006);
            }
            asked.insert(ch, since);
        }
        let mut retry: Vec<(tokio::time::Instant, String)> = Vec::new();
        let mut churn = tokio::time::Instant::now() + Duration::from_millis(self.rng.random_range(4000..12000));
        loop {
            let next_retry = retry.iter().map(|(t, _)| *t).min().unwrap_or(churn);
            let frame = tokio::select! {
                () = self.stop.cancelled() => return None,
                () = tokio::time::sleep_until(next_retry.min(churn)) => {
                    let now = tokio::time::Instant::now();
                    if now >= churn && !self.calm.is_cancelled() {
                        churn = now + Duration::from_millis(self.rng.random_range(4000..12000));
                        // Unsubscribe and subscribe again, with no `since`: a new chain.
                        let ch = self.channels[self.rng.random_range(0..self.channels.len())].clone();
                        let cmd = json!({"op":"unsubscribe","channel":ch,"ref":format!("u:{ch}")});
                        if ws.send(Message::text(cmd.to_string())).await.is_err() {
                            return Some(1006);
                        }
                        self.rec.push(Event::Unsubscribe { t: self.rec.t(), client: self.name.clone(), channel: ch.clone() });
                        positions.remove(&ch);
                        if !self.subscribe(ws, &ch, None).await {
                            return Some(1006);
                        }
                        asked.insert(ch, None);
                    }
                    let due: Vec<String> = retry.iter().filter(|(t, _)| *t <= now).map(|(_, c)| c.clone()).collect();
                    retry.retain(|(t, _)| *t > now);
                    for ch in due {
                        let since = positions.get(&ch).cloned();
                        if !self.subscribe(ws, &ch, since.clone()).await {
                            return Some(1006);
                        }
                        asked.insert(ch, since);
                    }
                    continue;
                }
                f = ws.next() => f,
            };
            let v: Value = match frame {
                Some(Ok(Message::Text(t))) => match serde_json::from_str(&t) {
                    Ok(v) => v,
                    Err(_) => continue,
                },
                Some(Ok(Message::Close(c))) => return Some(c.map_or(1005, |c| u16::from(c.code))),
                Some(Ok(_)) => continue,
                _ => return Some(1006),
            };
            let t = self.rec.t();
            let channel = v["channel"].as_str().unwrap_or_default().to_owned();
            match v["type"].as_str() {
                Some("message") => {
                    let (Some(pos), Some(msg)) = (pos_of(&v), v["data"]["m"].as_str()) else { continue };
                    positions.insert(channel.clone(), pos.clone());
                    self.state.lock().unwrap().shown.entry(channel.clone()).or_default().insert(msg.to_owned());
                    self.rec.push(Event::Deliver { t, client: self.name.clone(), channel, pos, msg: msg.to_owned() });
                }
                Some("gap") => {
                    let Some(after) = pos_of(&v["after"]) else { continue };
                    let reason = v["reason"].as_str().unwrap_or_default().to_owned();
                    self.rec.push(Event::Gap { t, client: self.name.clone(), channel, after, reason });
                }
                Some("direct") => {
                    let msg = v["data"]["m"].as_str().unwrap_or_default().to_owned();
                    self.rec.push(Event::Direct { t, client: self.name.clone(), msg });
                }
                Some("ack") if v["ref"].as_str().is_some_and(|r| r.starts_with("s:")) => {
                    // No position: the gateway's bridge did not answer (a resume then says
                    // `recovered: false`, `unavailable`); recorded too, it excuses a hole.
                    let pos = pos_of(&v["position"]);
                    let recovered = v["recovered"].as_bool();
                    if recovered != Some(true)
                        && let Some(pos) = &pos
                    {
                        positions.insert(channel.clone(), pos.clone());
                        self.state.lock().unwrap().floor.insert(channel.clone(), pos.seq);
                    }
                    let since = asked.remove(&channel).flatten();
                    let reason = v["reason"].as_str().map(str::to_owned);
                    let outcome = SubOutcome::Ack { pos, recovered, reason };
                    self.rec.push(Event::Subscribe { t, client: self.name.clone(), channel, since, outcome });
                }
                Some("error") if v["ref"].as_str().is_some_and(|r| r.starts_with("s:")) => {
                    let ch = v["ref"].as_str().unwrap_or_default()[2..].to_owned();
                    let since = asked.remove(&ch).flatten();
                    let code = v["code"].as_str().unwrap_or_default().to_owned();
                    self.rec.push(Event::Subscribe {
                        t,
                        client: self.name.clone(),
                        channel: ch.clone(),
                        since,
                        outcome: SubOutcome::Error { code },
                    });
                    retry.push((tokio::time::Instant::now() + Duration::from_millis(500), ch));
                }
                _ => {}
            }
        }
    }

    async fn subscribe(&self, ws: &mut Ws, ch: &str, since: Option<Pos>) -> bool {
        let mut cmd = json!({"op":"subscribe","channel":ch,"ref":format!("s:{ch}")});
        if let Some(p) = since {
            cmd["since"] = json!({"seq": p.seq, "epoch": p.epoch});
        }
        ws.send(Message::text(cmd.to_string())).await.is_ok()
    }
}

struct Publisher {
    rec: Recorder,
    name: String,
    addrs: Vec<SocketAddr>,
    channels: Vec<String>,
    users: Vec<String>,
    rng: StdRng,
    every: Duration,
    stop: CancellationToken,
}

impl Publisher {
    async fn run(mut self, first: usize) {
        let mut at = first;
        let mut ws: Option<Ws> = None;
        let mut tick = tokio::time::interval(self.every);
        let user = format!("pub-{}", self.name);
        for n in 0u64.. {
            tokio::select! {
                () = self.stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let msg = format!("{}-{n}", self.name);
            let direct = self.rng.random_bool(0.1);
            let (channel, to) = if direct {
                (String::new(), self.users[self.rng.random_range(0..self.users.len())].clone())
            } else {
                (self.channels[self.rng.random_range(0..self.channels.len())].clone(), String::new())
            };
            // The same key for every attempt of this message.
            for attempt in 0..20 {
                if self.stop.is_cancelled() {
                    return;
                }
                if ws.is_none() {
                    ws = open(self.addrs[at % self.addrs.len()], &user).await;
                    at += 1;
                    if ws.is_none() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
                let socket = ws.as_mut().expect("connected above");
                let r = format!("{n}.{attempt}");
                let cmd = if direct {
                    json!({"op":"send","user":to,"data":{"m":msg},"idempotency_key":msg,"ref":r})
                } else {
                    json!({"op":"publish","channel":channel,"data":{"m":msg},"idempotency_key":msg,"ref":r})
                };
                let t = self.rec.t();
                let reply = call(socket, cmd).await;
                let done = self.rec.t();
                let (outcome, again) = match &reply {
                    Some(v) if v["type"] == "ack" => {
                        let pos = v["seq"].as_u64().map(|seq| Pos { seq, epoch: String::new() });
                        let id = v["id"].as_str().map(str::to_owned);
                        (Outcome::Ack { pos, id, duplicate: v["duplicate"] == true }, None)
                    }
                    Some(v) => {
                        let code = v["code"].as_str().unwrap_or_default().to_owned();
                        let wait = v["retry_after_ms"].as_u64().unwrap_or(200).clamp(50, 2000);
                        let retry = matches!(code.as_str(), "unavailable" | "rate_limited").then_some(wait);
                        (Outcome::Error { code, ambiguous: v["ambiguous"] == true }, retry)
                    }
                    None => {
                        ws = None;
                        (Outcome::Unknown, Some(100))
                    }
                };
                let client = self.name.clone();
                self.rec.push(if direct {
                    Event::Send { t, done, client, user: to.clone(), msg: msg.clone(), outcome }
                } else {
                    Event::Publish {
                        t,
                        done,
                        client,
                        channel: channel.clone(),
                        msg: msg.clone(),
                        key: Some(msg.clone()),
                        outcome,
                    }
                });
                match again {
                    None => break,
                    Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                }
            }
        }
        if let Some(mut s) = ws {
            let _ = s.close(None).await;
        }
    }
}
