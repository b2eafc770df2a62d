//! The `switchboard.presence.v1.Presence` gRPC service over a shared registry.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::Stream;
use parking_lot::RwLock;
use proto::presence::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics as m;
use crate::registry::{ConnIn, DeltaIn, Event, Registry, SyncError};

/// Largest number of connections one node may report.
pub const MAX_NODE_CONNECTIONS: usize = 4_000_000;
/// Largest snapshot chunk or delta batch.
pub const MAX_BATCH: usize = 50_000;
/// Largest query batch (users, channels) and member page.
pub const MAX_QUERY: usize = 1000;

/// State shared by every request.
#[derive(Debug)]
pub struct Shared {
    pub registry: RwLock<Registry>,
    pub events: broadcast::Sender<Arc<pb::WatchEvent>>,
    /// When this replica's state may first be complete: one lease after it started, by
    /// which time every gateway still alive has registered with it (or is down by the
    /// lease's own definition).
    complete_at: Instant,
    /// Set (before the `synced` event is broadcast) once `complete_at` has passed.
    complete: AtomicBool,
}

impl Shared {
    pub fn new(registry: Registry) -> Arc<Self> {
        let (events, _) = broadcast::channel(65_536);
        let complete_at = Instant::now() + registry.lease();
        Arc::new(Self { registry: RwLock::new(registry), events, complete_at, complete: AtomicBool::new(false) })
    }

    /// Whether this replica has been up for a lease (see [`pb::Synced`]).
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Marks the replica complete once its lease has passed since it started, and tells
    /// every watcher (`synced` with `complete: true`), once.
    fn check_complete(&self, now: Instant) {
        if now >= self.complete_at && !self.complete.swap(true, Ordering::AcqRel) {
            tracing::info!("presence complete: up for a lease");
            metrics::gauge!(m::COMPLETE).set(1.0);
            let ev = pb::WatchEvent { event: Some(pb::watch_event::Event::Synced(pb::Synced { complete: true })) };
            let _ = self.events.send(Arc::new(ev));
        }
    }

    /// Publishes registry events to watchers (none listening is fine).
    pub fn publish(&self, events: Vec<Event>) {
        for e in events {
            let kind = match &e {
                Event::NodeUp { .. } => "node_up",
                Event::NodeDown { .. } => "node_down",
                Event::Interest { .. } => "interest",
                Event::Join { .. } => "join",
                Event::Leave { .. } => "leave",
                Event::UserOnline { .. } => "user_online",
                Event::UserOffline { .. } => "user_offline",
            };
            metrics::counter!(m::EVENTS, "kind" => kind).increment(1);
            let _ = self.events.send(Arc::new(to_pb(e)));
        }
    }

    /// Publishes changed member counts of large rooms.
    pub fn publish_counts(&self) {
        let counts = self.registry.write().take_counts();
        for (channel, members) in counts {
            metrics::counter!(m::EVENTS, "kind" => "count").increment(1);
            let ev = pb::WatchEvent {
                event: Some(pb::watch_event::Event::Count(pb::MemberCount { channel: channel.to_string(), members })),
            };
            let _ = self.events.send(Arc::new(ev));
        }
    }

    /// Expires dead nodes and updates the gauges.
    pub fn tick(&self, now: Instant) {
        self.check_complete(now);
        let (events, counts) = {
            let mut r = self.registry.write();
            (r.expire(now), r.counts())
        };
        let downs = events.iter().filter(|e| matches!(e, Event::NodeDown { .. })).count();
        if downs > 0 {
            metrics::counter!(m::LEASES_EXPIRED).increment(downs as u64);
            tracing::info!(nodes = downs, "node leases expired");
        }
        self.publish(events);
        metrics::gauge!(m::NODES).set(counts.nodes as f64);
        metrics::gauge!(m::CONNECTIONS).set(counts.connections as f64);
        metrics::gauge!(m::USERS).set(counts.users as f64);
        metrics::gauge!(m::CHANNELS).set(counts.channels as f64);
    }
}

fn to_pb(e: Event) -> pb::WatchEvent {
    use pb::watch_event::Event as E;
    let event = match e {
        Event::NodeUp { node, delivery_addr, epoch } => E::NodeUp(pb::NodeInfo {
            node_id: node.to_string(),
            delivery_addr: delivery_addr.to_string(),
            boot_epoch: epoch,
            connections: 0,
            lease_left_ms: 0,
        }),
        Event::NodeDown { node } => E::NodeDown(node.to_string()),
        Event::Interest { channel, node, interested } => {
            E::Interest(pb::ChannelInterest { channel: channel.to_string(), node_id: node.to_string(), interested })
        }
        Event::Join { channel, user } => {
            E::Join(pb::Membership { channel: channel.to_string(), user: user.to_string() })
        }
        Event::UserOnline { user, node } => {
            E::UserOnline(pb::UserNode { user: user.to_string(), node_id: node.to_string() })
        }
        Event::UserOffline { user, node } => {
            E::UserOffline(pb::UserNode { user: user.to_string(), node_id: node.to_string() })
        }
        Event::Leave { channel, user } => {
            E::Leave(pb::Membership { channel: channel.to_string(), user: user.to_string() })
        }
    };
    pb::WatchEvent { event: Some(event) }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && !s.chars().any(char::is_control)
}

fn conn_in(c: pb::Connection) -> Result<ConnIn, Status> {
    if !valid_name(&c.user) {
        return Err(Status::invalid_argument("user must be 1-128 bytes without control characters"));
    }
    if c.client_info.len() > 256 {
        return Err(Status::invalid_argument("client_info is limited to 256 bytes"));
    }
    if c.channels.iter().any(|ch| !valid_name(ch)) {
        return Err(Status::invalid_argument("channel names must be 1-128 bytes"));
    }
    Ok(ConnIn {
        conn_id: c.conn_id,
        user: c.user,
        connected_at_ms: c.connected_at_ms,
        client_info: c.client_info,
        channels: c.channels,
    })
}

fn delta_in(d: pb::Delta) -> Result<DeltaIn, Status> {
    use pb::delta::Change;
    let check = |ch: &pb::ChannelChange| {
        if valid_name(&ch.channel) {
            Ok(())
        } else {
            Err(Status::invalid_argument("channel names must be 1-128 bytes"))
        }
    };
    match d.change {
        Some(Change::Connect(c)) => Ok(DeltaIn::Connect(conn_in(c)?)),
        Some(Change::Disconnect(id)) => Ok(DeltaIn::Disconnect(id)),
        Some(Change::Subscribe(c)) => check(&c).map(|()| DeltaIn::Subscribe(c.conn_id, c.channel)),
        Some(Change::Unsubscribe(c)) => check(&c).map(|()| DeltaIn::Unsubscribe(c.conn_id, c.channel)),
        None => Err(Status::invalid_argument("empty delta")),
    }
}

impl From<SyncError> for Status {
    fn from(e: SyncError) -> Self {
        match e {
            SyncError::StaleEpoch | SyncError::Superseded => Status::aborted(e.to_string()),
            SyncError::UnknownNode => Status::failed_precondition(e.to_string()),
        }
    }
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct PresenceService {
    pub shared: Arc<Shared>,
}

/// Runs one gateway's Sync stream until it ends or misbehaves.
async fn sync_stream(
    shared: Arc<Shared>,
    mut inbound: Streaming<pb::GatewayMessage>,
    acks: mpsc::Sender<Result<pb::SyncAck, Status>>,
) {
    use pb::gateway_message::Msg;
    let lease_ms = shared.registry.read().lease().as_millis() as u64;
    let hello = match inbound.message().await {
        Ok(Some(pb::GatewayMessage { msg: Some(Msg::Hello(h)) })) => h,
        Ok(_) => {
            let _ = acks.send(Err(Status::invalid_argument("the first message must be hello"))).await;
            return;
        }
        Err(_) => return,
    };
    if !valid_name(&hello.node_id) || hello.delivery_addr.len() > 256 {
        let _ =
            acks.send(Err(Status::invalid_argument("node_id must be 1-128 bytes, delivery_addr at most 256"))).await;
        return;
    }
    let node = hello.node_id;
    let registered = shared.registry.write().hello(&node, &hello.delivery_addr, hello.boot_epoch, Instant::now());
    let stream = match registered {
        Ok((stream, events)) => {
            shared.publish(events);
            stream
        }
        Err(e) => {
            let _ = acks.send(Err(e.into())).await;
            return;
        }
    };
    tracing::info!(node = %node, epoch = hello.boot_epoch, "gateway connected");
    metrics::counter!(m::SYNC_STREAMS).increment(1);
    if acks.send(Ok(pb::SyncAck { seq: 0, lease_ms })).await.is_err() {
        return;
    }
    let mut pending: Vec<ConnIn> = Vec::new();
    loop {
        let msg = match inbound.message().await {
            Ok(Some(pb::GatewayMessage { msg: Some(m) })) => m,
            Ok(Some(_)) => {
                let _ = acks.send(Err(Status::invalid_argument("empty message"))).await;
                return;
            }
            // Stream ended or broke: the node's state stays until its lease runs out.
            Ok(None) | Err(_) => {
                tracing::info!(node = %node, "gateway stream ended");
                return;
            }
        };
        let now = Instant::now();
        let result: Result<Option<u64>, Status> = match msg {
            Msg::Hello(_) => Err(Status::invalid_argument("hello was already sent on this stream")),
            Msg::Snapshot(chunk) => {
                if chunk.connections.len() > MAX_BATCH || pending.len() + chunk.connections.len() > MAX_NODE_CONNECTIONS
                {
                    Err(Status::resource_exhausted("snapshot too large"))
                } else {
                    match chunk.connections.into_iter().map(conn_in).collect::<Result<Vec<_>, _>>() {
                        Err(e) => Err(e),
                        Ok(mut conns) => {
                            pending.append(&mut conns);
                            if chunk.last {
                                let conns = std::mem::take(&mut pending);
                                let applied = shared.registry.write().snapshot(&node, stream, conns, now);
                                applied.map(|ev| shared.publish(ev)).map(|()| Some(chunk.seq)).map_err(Status::from)
                            } else {
                                shared.registry.write().renew(&node, stream, now).map(|()| None).map_err(Status::from)
                            }
                        }
                    }
                }
            }
            Msg::Deltas(batch) => {
                if batch.deltas.len() > MAX_BATCH {
                    Err(Status::resource_exhausted("delta batch too large"))
                } else {
                    match batch.deltas.into_iter().map(delta_in).collect::<Result<Vec<_>, _>>() {
                        Err(e) => Err(e),
                        Ok(deltas) if deltas.is_empty() => shared
                            .registry
                            .write()
                            .renew(&node, stream, now)
                            .map(|()| Some(batch.seq))
                            .map_err(Status::from),
                        Ok(deltas) => {
                            metrics::counter!(m::DELTAS).increment(deltas.len() as u64);
                            let applied = shared.registry.write().deltas(&node, stream, deltas, now);
                            applied.map(|ev| shared.publish(ev)).map(|()| Some(batch.seq)).map_err(Status::from)
                        }
                    }
                }
            }
            Msg::Goodbye(_) => {
                if let Ok(ev) = shared.registry.write().goodbye(&node, stream) {
                    shared.publish(ev);
                }
                tracing::info!(node = %node, "gateway said goodbye");
                return;
            }
        };
        match result {
            Ok(Some(seq)) => {
                if acks.send(Ok(pb::SyncAck { seq, lease_ms })).await.is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(status) => {
                tracing::warn!(node = %node, error = %status.message(), "gateway stream refused");
                let _ = acks.send(Err(status)).await;
                return;
            }
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::presence_server::Presence for PresenceService {
    type SyncStream = ReceiverStream<Result<pb::SyncAck, Status>>;
    type WatchStream = WatchStream;

    async fn sync(&self, req: Request<Streaming<pb::GatewayMessage>>) -> Result<Response<Self::SyncStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(sync_stream(self.shared.clone(), req.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn locate_users(
        &self,
        req: Request<pb::LocateUsersRequest>,
    ) -> Result<Response<pb::LocateUsersResponse>, Status> {
        let users = req.into_inner().users;
        if users.len() > MAX_QUERY {
            return Err(Status::invalid_argument(format!("at most {MAX_QUERY} users per call")));
        }
        metrics::counter!(m::QUERIES, "method" => "locate_users").increment(1);
        let r = self.shared.registry.read();
        let users = users
            .into_iter()
            .map(|user| {
                let connections = r
                    .locate(&user)
                    .into_iter()
                    .map(|l| pb::ConnectionAt {
                        node_id: l.node.to_string(),
                        conn_id: l.conn_id,
                        connected_at_ms: l.connected_at_ms,
                        client_info: l.client_info.into(),
                    })
                    .collect();
                pb::UserLocation { user, connections }
            })
            .collect();
        Ok(Response::new(pb::LocateUsersResponse { users }))
    }

    async fn channel_nodes(
        &self,
        req: Request<pb::ChannelNodesRequest>,
    ) -> Result<Response<pb::ChannelNodesResponse>, Status> {
        let channels = req.into_inner().channels;
        if channels.len() > MAX_QUERY {
            return Err(Status::invalid_argument(format!("at most {MAX_QUERY} channels per call")));
        }
        metrics::counter!(m::QUERIES, "method" => "channel_nodes").increment(1);
        let r = self.shared.registry.read();
        let channels = channels
            .into_iter()
            .map(|channel| {
                let node_ids = r.channel_nodes(&channel).iter().map(|n| n.to_string()).collect();
                pb::ChannelNodes { channel, node_ids }
            })
            .collect();
        Ok(Response::new(pb::ChannelNodesResponse { channels }))
    }

    async fn channel_members(
        &self,
        req: Request<pb::ChannelMembersRequest>,
    ) -> Result<Response<pb::ChannelMembersResponse>, Status> {
        let r = req.into_inner();
        let limit = match r.limit as usize {
            0 => 100,
            n if n > MAX_QUERY => {
                return Err(Status::invalid_argument(format!("limit must be at most {MAX_QUERY}")));
            }
            n => n,
        };
        if !valid_name(&r.channel) {
            return Err(Status::invalid_argument("channel must be 1-128 bytes"));
        }
        metrics::counter!(m::QUERIES, "method" => "channel_members").increment(1);
        let reg = self.shared.registry.read();
        if !reg.is_presence_channel(&r.channel) {
            return Err(Status::failed_precondition(
                "members are tracked only for presence channels (--presence-channels)",
            ));
        }
        let (page, total) = reg.channel_members(&r.channel, &r.after, limit);
        drop(reg);
        let next_after = if page.len() == limit && total > 0 {
            page.last().map(|u| u.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ChannelMembersResponse {
            users: page.iter().map(|u| u.to_string()).collect(),
            total: total as u64,
            next_after,
        }))
    }

    async fn online_counts(
        &self,
        _: Request<pb::OnlineCountsRequest>,
    ) -> Result<Response<pb::OnlineCountsResponse>, Status> {
        metrics::counter!(m::QUERIES, "method" => "online_counts").increment(1);
        let c = self.shared.registry.read().counts();
        Ok(Response::new(pb::OnlineCountsResponse {
            users: c.users as u64,
            connections: c.connections as u64,
            nodes: c.nodes as u64,
            channels: c.channels as u64,
        }))
    }

    async fn list_nodes(&self, _: Request<pb::ListNodesRequest>) -> Result<Response<pb::ListNodesResponse>, Status> {
        metrics::counter!(m::QUERIES, "method" => "list_nodes").increment(1);
        let nodes = self
            .shared
            .registry
            .read()
            .nodes(Instant::now())
            .into_iter()
            .map(|n| pb::NodeInfo {
                node_id: n.node.to_string(),
                delivery_addr: n.delivery_addr.to_string(),
                boot_epoch: n.epoch,
                connections: n.connections as u64,
                lease_left_ms: n.lease_left.as_millis() as u64,
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        // Subscribe before reading the initial state, so nothing falls in between
        // (an event may then appear twice; watchers apply them idempotently).
        let rx = self.shared.events.subscribe();
        let want = req.into_inner();
        let users = want.users;
        let initial: Vec<pb::WatchEvent> = if want.initial_state {
            let r = self.shared.registry.read();
            let mut ev = r.interest_events();
            if users {
                ev.extend(r.user_events());
            }
            let mut ev: Vec<pb::WatchEvent> = ev.into_iter().map(to_pb).collect();
            // Read after subscribing: if not complete yet, the later `synced` reaches `rx`.
            let complete = self.shared.is_complete();
            ev.push(pb::WatchEvent { event: Some(pb::watch_event::Event::Synced(pb::Synced { complete })) });
            ev
        } else {
            Vec::new()
        };
        let guard = WatcherGuard::new();
        let live = futures_util::stream::unfold((rx, guard, false), move |(mut rx, guard, done)| async move {
            if done {
                return None;
            }
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        let is_user = matches!(
                            ev.event,
                            Some(pb::watch_event::Event::UserOnline(_) | pb::watch_event::Event::UserOffline(_))
                        );
                        if is_user && !users {
                            continue;
                        }
                        return Some((Ok((*ev).clone()), (rx, guard, false)));
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let status = Status::data_loss(format!(
                            "watcher fell {n} events behind; watch again with initial_state"
                        ));
                        return Some((Err(status), (rx, guard, true)));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        let initial = futures_util::stream::iter(initial.into_iter().map(Ok));
        Ok(Response::new(Box::pin(futures_util::StreamExt::chain(initial, live))))
    }
}

/// Counts open Watch streams.
#[derive(Debug)]
struct WatcherGuard;

impl WatcherGuard {
    fn new() -> Self {
        metrics::gauge!(m::WATCHERS).increment(1.0);
        Self
    }
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        metrics::gauge!(m::WATCHERS).decrement(1.0);
    }
}

/// How often expiry runs, relative to the lease.
pub fn tick_interval(lease: Duration) -> Duration {
    (lease / 20).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use proto::presence::v1::presence_server::Presence;

    use super::*;

    async fn next(w: &mut <PresenceService as Presence>::WatchStream) -> pb::watch_event::Event {
        w.next().await.expect("stream open").expect("event").event.expect("an event")
    }

    fn synced(complete: bool) -> pb::watch_event::Event {
        pb::watch_event::Event::Synced(pb::Synced { complete })
    }

    #[tokio::test(start_paused = true)]
    async fn watch_ends_its_initial_state_with_synced_complete_only_once_up_for_a_lease() {
        let lease = Duration::from_secs(10);
        let shared = Shared::new(Registry::new(lease, vec!["room:*".into()], 1000));
        let svc = PresenceService { shared: shared.clone() };
        let want = || Request::new(pb::WatchRequest { initial_state: true, users: true });
        let mut early = svc.watch(want()).await.unwrap().into_inner();
        assert_eq!(next(&mut early).await, synced(false), "a replica younger than its lease");
        assert!(!shared.is_complete());
        tokio::time::advance(lease - Duration::from_millis(1)).await;
        shared.tick(Instant::now());
        assert!(!shared.is_complete(), "one lease has not passed yet");
        tokio::time::advance(Duration::from_millis(1)).await;
        shared.tick(Instant::now());
        assert!(shared.is_complete());
        assert_eq!(next(&mut early).await, synced(true), "told on the open stream");
        let mut late = svc.watch(want()).await.unwrap().into_inner();
        assert_eq!(next(&mut late).await, synced(true), "a later watcher in its initial state");
        // Once only: a further tick broadcasts nothing more.
        let mut rx = shared.events.subscribe();
        shared.tick(Instant::now());
        assert!(rx.try_recv().is_err(), "synced is broadcast once");
    }
}
