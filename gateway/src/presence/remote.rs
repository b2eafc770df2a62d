//! Presence over gRPC: one Sync stream per presence replica (hello, snapshot,
//! delta batches, keepalives), queries with failover, and one Watch stream that
//! turns remote joins, leaves and counts into frames for local subscribers.
//!
//! While a replica is unreachable its deltas are dropped, not buffered: every
//! (re)connection starts with a fresh snapshot of the hub, which supersedes
//! them. A full delta queue (presence too slow) triggers the same resync.
//!
//! A replica that has acknowledged nothing for longer than its lease may have expired
//! this node (a partition, not a crash: the stream stays open and nothing comes back), and
//! then the bridges stop routing here: every session is closed with 1001 `resync
//! retry_ms=…` (clients resume elsewhere, recovering with `since`), and again once the
//! link is back and the replica has this node's snapshot, for sessions opened meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kit::grpc::{Authed, Bearer};
use proto::presence::v1 as pb;
use proto::presence::v1::presence_client::PresenceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use super::local::page;
use super::{Members, PresenceBackend, QueryFuture};
use crate::hub::{ConnRecord, Hub};
use crate::metrics as m;
use crate::{protocol, wire};

/// Deltas queued per replica before a resync is forced.
const DELTA_QUEUE: usize = 65_536;
/// Connections per snapshot chunk.
const CHUNK: usize = 2000;
/// Deltas per batch.
const BATCH: usize = 1000;
/// Time limit of one query to one replica.
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);

/// How to reach presence and who we are.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    pub addrs: Vec<String>,
    pub node_id: String,
    pub delivery_addr: String,
    pub boot_epoch: u64,
    /// Credential sent to presence.
    pub bearer: Bearer,
}

#[derive(Debug)]
struct Link {
    addr: String,
    deltas: mpsc::Sender<pb::Delta>,
    resync: Arc<AtomicBool>,
    cancel: CancellationToken,
    client: PresenceClient<Authed>,
}

/// The replicas known now: fixed ones, plus those a `dns+` address resolves to.
#[derive(Debug)]
struct Replicas {
    hub: Arc<Hub>,
    cfg: RemoteConfig,
    stop: CancellationToken,
    links: parking_lot::RwLock<Vec<Link>>,
}

impl Replicas {
    /// Starts streaming to one more replica (its link begins with a snapshot).
    /// `server_name`: the name the replica's certificate carries, when not the address's host.
    fn add(&self, addr: &str, server_name: Option<&str>) -> Result<(), tonic::transport::Error> {
        let client =
            PresenceClient::new(self.cfg.bearer.channel(endpoint(&self.cfg, addr, server_name)?.connect_lazy()));
        let (tx, rx) = mpsc::channel(DELTA_QUEUE);
        let resync = Arc::new(AtomicBool::new(false));
        let cancel = self.stop.child_token();
        tokio::spawn(link_task(
            addr.to_owned(),
            server_name.map(str::to_owned),
            self.hub.clone(),
            self.cfg.clone(),
            rx,
            resync.clone(),
            cancel.clone(),
        ));
        self.links.write().push(Link { addr: addr.to_owned(), deltas: tx, resync, cancel, client });
        tracing::info!(presence = %addr, "presence replica added");
        Ok(())
    }

    fn remove(&self, addr: &str) {
        self.links.write().retain(|l| {
            let keep = l.addr != addr;
            if !keep {
                l.cancel.cancel();
                tracing::info!(presence = %addr, "presence replica removed");
            }
            keep
        });
    }

    fn clients(&self) -> Vec<PresenceClient<Authed>> {
        self.links.read().iter().map(|l| l.client.clone()).collect()
    }
}

/// Follows `dns+http://name:port` (or `dns+https://`): one replica per address the name
/// resolves to (a headless Service), re-resolved every 10 s.
async fn discover(spec: String, replicas: Arc<Replicas>) {
    let Some((scheme, rest)) = spec.split_once("://") else { return };
    let hostport = rest.trim_end_matches('/').to_owned();
    // With TLS, replicas are certified for the DNS name, not for their addresses.
    let server_name = (scheme == "https").then(|| hostport.rsplit_once(':').map_or(hostport.as_str(), |(h, _)| h));
    let mut current: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    loop {
        match tokio::net::lookup_host(hostport.as_str()).await {
            Ok(found) => {
                let now: std::collections::BTreeSet<String> = found.map(|a| format!("{scheme}://{a}")).collect();
                for gone in current.difference(&now) {
                    replicas.remove(gone);
                }
                for new in now.difference(&current) {
                    if let Err(e) = replicas.add(new, server_name) {
                        tracing::warn!(presence = %new, error = %e, "bad presence address");
                    }
                }
                current = now;
            }
            Err(e) => tracing::warn!(name = %hostport, error = %e, "cannot resolve presence replicas"),
        }
        tokio::select! {
            () = replicas.stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}

/// Presence held by remote replicas.
#[derive(Debug)]
pub struct RemotePresence {
    hub: Arc<Hub>,
    replicas: Arc<Replicas>,
    next: AtomicU64,
}

fn endpoint(cfg: &RemoteConfig, addr: &str, server_name: Option<&str>) -> Result<Endpoint, tonic::transport::Error> {
    Ok(cfg
        .bearer
        .endpoint_named(addr, server_name)?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5)))
}

fn conn_pb(c: &ConnRecord) -> pb::Connection {
    pb::Connection {
        conn_id: c.conn_id,
        user: c.user.to_string(),
        connected_at_ms: c.connected_at_ms,
        client_info: c.client_info.to_string(),
        channels: c.channels.iter().map(|ch| ch.to_string()).collect(),
    }
}

/// Reconnect delays: 100 ms doubling to 5 s, each scaled by a random factor in [0.5, 1.5].
#[derive(Debug)]
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_millis(100))
    }
    fn next(&mut self) -> Duration {
        let d = self.0.mul_f64(rand::random_range(0.5..1.5));
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        d
    }
    fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }
}

impl RemotePresence {
    /// Starts a Sync link per replica and the Watch task; they run until `stop`.
    /// An address `dns+http://name:port` stands for every address `name` resolves to.
    pub fn start(
        hub: Arc<Hub>,
        cfg: RemoteConfig,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, tonic::transport::Error> {
        let replicas = Arc::new(Replicas {
            hub: hub.clone(),
            cfg: cfg.clone(),
            stop: stop.clone(),
            links: parking_lot::RwLock::new(Vec::new()),
        });
        for addr in &cfg.addrs {
            match addr.strip_prefix("dns+") {
                Some(spec) => {
                    tokio::spawn(discover(spec.to_owned(), replicas.clone()));
                }
                None => replicas.add(addr, None)?,
            }
        }
        tokio::spawn(watch_task(replicas.clone(), hub.clone(), stop));
        Ok(Arc::new(Self { hub, replicas, next: AtomicU64::new(0) }))
    }

    fn push(&self, change: pb::delta::Change) {
        let delta = pb::Delta { change: Some(change) };
        for link in self.replicas.links.read().iter() {
            if link.resync.load(Ordering::Relaxed) {
                continue;
            }
            if let Err(mpsc::error::TrySendError::Full(_)) = link.deltas.try_send(delta.clone()) {
                tracing::warn!(presence = %link.addr, "presence delta queue full, resyncing");
                link.resync.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Clients in failover order, starting from a rotating replica.
    fn rotation(&self) -> impl Iterator<Item = PresenceClient<Authed>> + '_ {
        let clients = self.replicas.clients();
        let n = clients.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        (0..n).map(move |i| clients[(start + i) % n].clone())
    }
}

impl PresenceBackend for RemotePresence {
    fn connected(&self, conn: &ConnRecord) {
        self.push(pb::delta::Change::Connect(conn_pb(conn)));
    }

    fn disconnected(&self, conn_id: u64) {
        self.push(pb::delta::Change::Disconnect(conn_id));
    }

    fn subscribed(&self, conn_id: u64, channel: &Arc<str>) {
        self.push(pb::delta::Change::Subscribe(pb::ChannelChange { conn_id, channel: channel.to_string() }));
    }

    fn unsubscribed(&self, conn_id: u64, channel: &str) {
        self.push(pb::delta::Change::Unsubscribe(pb::ChannelChange { conn_id, channel: channel.to_owned() }));
    }

    fn members<'a>(&'a self, channel: &'a str, after: &'a str, limit: usize) -> QueryFuture<'a, Members> {
        Box::pin(async move {
            for mut client in self.rotation() {
                let req = pb::ChannelMembersRequest {
                    channel: channel.to_owned(),
                    after: after.to_owned(),
                    limit: limit as u32,
                };
                match tokio::time::timeout(QUERY_TIMEOUT, client.channel_members(req)).await {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        return Members { users: r.users, total: r.total, next_after: r.next_after };
                    }
                    Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
                        // Not a presence channel there: members are not tracked cluster-wide.
                        break;
                    }
                    _ => continue,
                }
            }
            metrics::counter!(m::PRESENCE_FALLBACKS).increment(1);
            page(&self.hub.channel_users(channel), after, limit)
        })
    }

    fn connections<'a>(&'a self, users: &'a [String]) -> QueryFuture<'a, Vec<u32>> {
        Box::pin(async move {
            for mut client in self.rotation() {
                let req = pb::LocateUsersRequest { users: users.to_vec() };
                if let Ok(Ok(r)) = tokio::time::timeout(QUERY_TIMEOUT, client.locate_users(req)).await {
                    return r.into_inner().users.iter().map(|u| u.connections.len() as u32).collect();
                }
            }
            metrics::counter!(m::PRESENCE_FALLBACKS).increment(1);
            users.iter().map(|u| self.hub.user_connections(u)).collect()
        })
    }
}

/// Why a link session ended.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("presence refused: {0}")]
    Status(#[from] tonic::Status),
    #[error("stream closed")]
    Closed,
    #[error("nothing acknowledged for most of a lease")]
    Stale,
}

/// The lease assumed until a replica names its own (presence's default).
const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// What a link knows of its replica's view of this node across reconnects.
struct LeaseWatch {
    /// The last acknowledgement from the replica (or the link's start).
    last_ack: tokio::time::Instant,
    lease: Duration,
    /// The replica may have expired this node: sessions were told to resync, and are
    /// told again once the replica has this node's snapshot.
    lapsed: bool,
}

impl LeaseWatch {
    /// Silence after which the replica may have expired this node: it expires a node that
    /// sent it nothing for a lease, and this node sends every third of one, so a gap of
    /// acknowledgements this long (a margin below the lease) may hide one.
    fn lapse(&self) -> Duration {
        self.lease * 4 / 5
    }

    fn silent(&self) -> bool {
        self.last_ack.elapsed() > self.lapse()
    }

    /// Tells every session to resync, once per lapse (and once more after it).
    fn check(&mut self, hub: &Hub, addr: &str) {
        if !self.lapsed && self.silent() {
            self.lapsed = true;
            tracing::warn!(presence = %addr, lease = ?self.lease, "presence acknowledged nothing for a lease; asking clients to reconnect");
            resync_sessions(hub);
        }
    }

    fn acked(&mut self, hub: &Hub, snapshot_sent: bool) {
        self.last_ack = tokio::time::Instant::now();
        if self.lapsed && snapshot_sent {
            self.lapsed = false;
            tracing::warn!("presence link back after a lapsed lease; asking clients to reconnect");
            resync_sessions(hub);
        }
    }
}

/// Closes every session and long-poll with 1001 `resync retry_ms=…` (as after a stall).
fn resync_sessions(hub: &Hub) {
    metrics::counter!(m::STALLS).increment(1);
    hub.resync_all();
}

async fn link_task(
    addr: String,
    server_name: Option<String>,
    hub: Arc<Hub>,
    cfg: RemoteConfig,
    mut deltas: mpsc::Receiver<pb::Delta>,
    resync: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new();
    let mut seq = 0u64;
    let mut watch = LeaseWatch { last_ack: tokio::time::Instant::now(), lease: DEFAULT_LEASE, lapsed: false };
    loop {
        let result = link_session(
            (&addr, server_name.as_deref()),
            &hub,
            &cfg,
            &mut deltas,
            &resync,
            &stop,
            (&mut seq, &mut backoff, &mut watch),
        )
        .await;
        watch.check(&hub, &addr);
        metrics::gauge!(m::PRESENCE_LINKS_UP).decrement(1.0);
        match result {
            Ok(()) => return,
            Err(e) => {
                metrics::counter!(m::PRESENCE_RECONNECTS).increment(1);
                tracing::warn!(presence = %addr, error = %e, "presence link down, reconnecting");
            }
        }
        // Deltas while disconnected are superseded by the next snapshot.
        resync.store(true, Ordering::Relaxed);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff.next()) => {}
        }
        watch.check(&hub, &addr);
    }
}

async fn link_session(
    (addr, server_name): (&str, Option<&str>),
    hub: &Hub,
    cfg: &RemoteConfig,
    deltas: &mut mpsc::Receiver<pb::Delta>,
    resync: &AtomicBool,
    stop: &CancellationToken,
    (seq, backoff, watch): (&mut u64, &mut Backoff, &mut LeaseWatch),
) -> Result<(), LinkError> {
    use pb::gateway_message::Msg;
    metrics::gauge!(m::PRESENCE_LINKS_UP).increment(1.0);
    let channel = endpoint(cfg, addr, server_name)?.connect().await?;
    let mut client = PresenceClient::new(cfg.bearer.channel(channel));
    let (out, out_rx) = mpsc::channel::<pb::GatewayMessage>(8);
    let send = |msg: Msg| {
        let out = out.clone();
        async move { out.send(pb::GatewayMessage { msg: Some(msg) }).await.map_err(|_| LinkError::Closed) }
    };
    send(Msg::Hello(pb::Hello {
        node_id: cfg.node_id.clone(),
        delivery_addr: cfg.delivery_addr.clone(),
        boot_epoch: cfg.boot_epoch,
    }))
    .await?;
    let mut acks = client.sync(ReceiverStream::new(out_rx)).await?.into_inner();
    let first = acks.message().await?.ok_or(LinkError::Closed)?;
    let lease = Duration::from_millis(first.lease_ms.max(300));
    watch.lease = lease;
    // The hello's answer says the replica is there, not that it has this node's state.
    watch.check(hub, addr);
    watch.acked(hub, false);
    let mut keepalive = tokio::time::interval(lease / 3);
    let mut batch: Vec<pb::Delta> = Vec::new();
    let mut need_snapshot = true;
    // The seq of the last snapshot: an ack of it or later means the replica has this node.
    let mut snapshot_seq = u64::MAX;
    loop {
        if need_snapshot || resync.load(Ordering::Relaxed) {
            // Drop queued deltas first: the snapshot taken after covers them, and
            // a change racing with it is applied twice, which presence ignores.
            while deltas.try_recv().is_ok() {}
            resync.store(false, Ordering::Relaxed);
            let snapshot = hub.presence_snapshot();
            *seq += 1;
            let chunks: Vec<&[ConnRecord]> =
                if snapshot.is_empty() { vec![&[]] } else { snapshot.chunks(CHUNK).collect() };
            let last = chunks.len() - 1;
            for (i, chunk) in chunks.into_iter().enumerate() {
                let connections = chunk.iter().map(conn_pb).collect();
                send(Msg::Snapshot(pb::SnapshotChunk { connections, last: i == last, seq: *seq })).await?;
            }
            snapshot_seq = *seq;
            tracing::info!(presence = %addr, connections = snapshot.len(), "snapshot sent");
            if !need_snapshot {
                metrics::counter!(m::PRESENCE_RESYNCS).increment(1);
            }
            need_snapshot = false;
            backoff.reset();
        }
        tokio::select! {
            () = stop.cancelled() => {
                let _ = send(Msg::Goodbye(pb::Goodbye {})).await;
                drop(out);
                // Give presence a moment to read the goodbye before the stream closes.
                let _ = tokio::time::timeout(Duration::from_millis(500), acks.message()).await;
                return Ok(());
            }
            ack = acks.message() => match ack? {
                Some(a) => {
                    metrics::gauge!(m::PRESENCE_ACKED_SEQ).set(a.seq as f64);
                    if watch.silent() {
                        // Back after a silence the replica may have expired this node in:
                        // start over with a fresh link and snapshot.
                        watch.check(hub, addr);
                        return Err(LinkError::Stale);
                    }
                    watch.acked(hub, a.seq >= snapshot_seq);
                }
                None => return Err(LinkError::Closed),
            },
            n = deltas.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    return Ok(());
                }
                if resync.load(Ordering::Relaxed) {
                    batch.clear();
                    continue;
                }
                *seq += 1;
                let deltas = std::mem::take(&mut batch);
                send(Msg::Deltas(pb::DeltaBatch { seq: *seq, deltas })).await?;
                metrics::gauge!(m::PRESENCE_SENT_SEQ).set(*seq as f64);
            }
            _ = keepalive.tick() => {
                if watch.silent() {
                    return Err(LinkError::Stale);
                }
                *seq += 1;
                send(Msg::Deltas(pb::DeltaBatch { seq: *seq, deltas: Vec::new() })).await?;
            }
        }
    }
}

/// Follows one replica's Watch stream (failing over between replicas) and
/// delivers joins, leaves and counts to local subscribers.
async fn watch_task(replicas: Arc<Replicas>, hub: Arc<Hub>, stop: CancellationToken) {
    use pb::watch_event::Event;
    let mut backoff = Backoff::new();
    let mut i = 0usize;
    loop {
        let clients = replicas.clients();
        if clients.is_empty() {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff.next()) => continue,
            }
        }
        let mut client = clients[i % clients.len()].clone();
        i += 1;
        let opened = tokio::select! {
            () = stop.cancelled() => return,
            r = client.watch(pb::WatchRequest { initial_state: false, users: false }) => r,
        };
        if let Ok(resp) = opened {
            let mut stream = resp.into_inner();
            loop {
                let next = tokio::select! {
                    () = stop.cancelled() => return,
                    m = stream.message() => m,
                };
                let Ok(Some(ev)) = next else { break };
                backoff.reset();
                let (channel, frame) = match ev.event {
                    Some(Event::Join(j)) => (j.channel.clone(), protocol::membership(true, &j.channel, &j.user)),
                    Some(Event::Leave(l)) => (l.channel.clone(), protocol::membership(false, &l.channel, &l.user)),
                    Some(Event::Count(c)) => (c.channel.clone(), protocol::member_count(&c.channel, c.members)),
                    _ => continue,
                };
                if hub.has_subscribers(&channel) {
                    hub.deliver_to_channel(&channel, &wire::text(&frame));
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff.next()) => {}
        }
    }
}
