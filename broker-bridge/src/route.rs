//! Route: which gateway nodes need a message. A cache of presence kept fresh by
//! its Watch stream (initial state + changes), never a query per message.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kit::grpc::{Authed, Bearer};
use parking_lot::RwLock;
use proto::bridge::v1::Envelope;
use proto::bridge::v1::envelope::Target;
use proto::presence::v1 as pb;
use proto::presence::v1::presence_client::PresenceClient;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// A node joined, moved or left: what the delivery side must know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeChange {
    Up { node: Arc<str>, delivery_addr: String },
    Down { node: Arc<str> },
}

#[derive(Debug, Default)]
struct State {
    nodes: HashMap<Arc<str>, String>,
    channels: HashMap<String, HashSet<Arc<str>>>,
    users: HashMap<String, HashSet<Arc<str>>>,
}

/// The routing cache.
#[derive(Debug)]
pub struct Routes {
    state: RwLock<State>,
    /// Whether the cache holds everything presence knows from a replica that is complete
    /// (`synced` with `complete: true`): before that, "no node needs this record" may only
    /// mean "not told yet", and a record routed to nobody would be committed and lost for
    /// the subscribers presence has not reported.
    complete: tokio::sync::watch::Sender<bool>,
}

impl Default for Routes {
    fn default() -> Self {
        Self { state: RwLock::default(), complete: tokio::sync::watch::Sender::new(false) }
    }
}

impl Routes {
    /// Whether the cache is complete (see the field).
    pub fn is_complete(&self) -> bool {
        *self.complete.borrow()
    }

    /// Waits until the cache is complete; consumption starts only then.
    pub async fn wait_complete(&self) {
        let mut rx = self.complete.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    fn mark_complete(&self, why: &str) {
        if !self.complete.send_replace(true) {
            tracing::info!(why, "routing cache complete");
            metrics::gauge!(m::ROUTES_COMPLETE).set(1.0);
        }
    }

    /// Gateway nodes that need `env`, with their delivery addresses.
    pub fn resolve(&self, env: &Envelope) -> Vec<(Arc<str>, String)> {
        let s = self.state.read();
        let nodes: Vec<&Arc<str>> = match &env.target {
            Some(Target::Channel(c)) => s.channels.get(c).map_or_else(Vec::new, |n| n.iter().collect()),
            Some(Target::User(u)) => s.users.get(u).map_or_else(Vec::new, |n| n.iter().collect()),
            Some(Target::Broadcast(_)) => s.nodes.keys().collect(),
            None => Vec::new(),
        };
        nodes.into_iter().filter_map(|n| s.nodes.get(n).map(|addr| (n.clone(), addr.clone()))).collect()
    }

    /// Applies one Watch event; returns a node change for the delivery side.
    pub fn apply(&self, ev: pb::watch_event::Event) -> Option<NodeChange> {
        use pb::watch_event::Event as E;
        let mut s = self.state.write();
        let change = match ev {
            E::NodeUp(n) => {
                let node: Arc<str> = n.node_id.into();
                let changed = s.nodes.get(&node) != Some(&n.delivery_addr);
                s.nodes.insert(node.clone(), n.delivery_addr.clone());
                changed.then_some(NodeChange::Up { node, delivery_addr: n.delivery_addr })
            }
            E::NodeDown(id) => {
                let node: Arc<str> = id.into();
                s.nodes.remove(&node);
                let s = &mut *s;
                for set in s.channels.values_mut().chain(s.users.values_mut()) {
                    set.remove(&node);
                }
                s.channels.retain(|_, v| !v.is_empty());
                s.users.retain(|_, v| !v.is_empty());
                Some(NodeChange::Down { node })
            }
            E::Interest(i) => {
                let node = intern(&s, &i.node_id);
                if i.interested {
                    s.channels.entry(i.channel).or_default().insert(node);
                } else if let Some(set) = s.channels.get_mut(&i.channel) {
                    set.remove(&node);
                    if set.is_empty() {
                        s.channels.remove(&i.channel);
                    }
                }
                None
            }
            E::UserOnline(u) => {
                let node = intern(&s, &u.node_id);
                s.users.entry(u.user).or_default().insert(node);
                None
            }
            E::UserOffline(u) => {
                if let Some(set) = s.users.get_mut(&u.user) {
                    set.remove(u.node_id.as_str());
                    if set.is_empty() {
                        s.users.remove(&u.user);
                    }
                }
                None
            }
            E::Synced(synced) => {
                if synced.complete {
                    drop(s);
                    self.mark_complete("presence is complete");
                    return None;
                }
                None
            }
            E::Join(_) | E::Leave(_) | E::Count(_) => None,
        };
        metrics::gauge!(m::ROUTE_NODES).set(s.nodes.len() as f64);
        change
    }

    /// Forgets nodes not in `alive` (after a Watch reconnection, events may have been missed).
    pub fn retain_nodes(&self, alive: &HashSet<String>) -> Vec<NodeChange> {
        let gone: Vec<Arc<str>> = self.state.read().nodes.keys().filter(|n| !alive.contains(&***n)).cloned().collect();
        gone.into_iter().filter_map(|n| self.apply(pb::watch_event::Event::NodeDown(n.to_string()))).collect()
    }
}

fn intern(s: &State, node: &str) -> Arc<str> {
    s.nodes.get_key_value(node).map_or_else(|| Arc::from(node), |(k, _)| k.clone())
}

fn client(addr: &str, bearer: &Bearer) -> Result<PresenceClient<Authed>, tonic::transport::Error> {
    let ep = bearer.endpoint(addr)?.connect_timeout(Duration::from_secs(2));
    Ok(PresenceClient::new(bearer.channel(ep.connect_lazy())).max_decoding_message_size(256 << 20))
}

/// Keeps `routes` fresh from presence until `stop`; node changes go to `changes`.
/// After a reconnection, nodes presence does not list are dropped only if they are still
/// missing `grace` later (a restarted presence starts empty until gateways re-feed it).
pub async fn watch(
    addrs: Vec<String>,
    grace: Duration,
    bearer: Bearer,
    routes: Arc<Routes>,
    changes: tokio::sync::mpsc::UnboundedSender<NodeChange>,
    stop: CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    let mut i = 0usize;
    let mut sweep: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let addr = &addrs[i % addrs.len()];
        i += 1;
        if let Ok(mut c) = client(addr, &bearer) {
            let opened = tokio::select! {
                () = stop.cancelled() => return,
                r = c.watch(pb::WatchRequest { initial_state: true, users: true }) => r,
            };
            if let Ok(resp) = opened {
                // Events may have been missed while disconnected: drop nodes that are gone,
                // but only once a restarted presence has had time to be re-fed. Until then a
                // missing node keeps its routes (routing to a node that lost interest is
                // harmless; not routing to one that has it loses messages).
                if let Some(old) = sweep.take() {
                    old.abort();
                }
                let (mut sc, s_routes, s_changes, s_stop) = (c.clone(), routes.clone(), changes.clone(), stop.clone());
                sweep = Some(tokio::spawn(async move {
                    tokio::select! {
                        () = s_stop.cancelled() => return,
                        () = tokio::time::sleep(grace) => {}
                    }
                    if let Ok(list) = sc.list_nodes(pb::ListNodesRequest {}).await {
                        let alive: HashSet<String> = list.into_inner().nodes.into_iter().map(|n| n.node_id).collect();
                        for ch in s_routes.retain_nodes(&alive) {
                            tracing::info!(change = ?ch, "node gone from presence after the grace");
                            let _ = s_changes.send(ch);
                        }
                    }
                }));
                tracing::info!(presence = %addr, "routing cache following presence");
                let mut stream = resp.into_inner();
                // A replica that never says `synced` (older than this bridge) is taken as
                // complete after the grace, the same assumption as the sweep above.
                let legacy = tokio::time::sleep(grace);
                tokio::pin!(legacy);
                let mut synced = false;
                loop {
                    let next = tokio::select! {
                        () = stop.cancelled() => return,
                        () = &mut legacy, if !synced && !routes.is_complete() => {
                            tracing::warn!(presence = %addr, "presence sends no `synced` (older version?): routing taken as complete after the grace");
                            routes.mark_complete("grace without synced");
                            continue;
                        }
                        m = stream.message() => m,
                    };
                    match next {
                        Ok(Some(pb::WatchEvent { event: Some(ev) })) => {
                            delay = Duration::from_millis(100);
                            synced |= matches!(ev, pb::watch_event::Event::Synced(_));
                            if let Some(ch) = routes.apply(ev) {
                                let _ = changes.send(ch);
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
                tracing::warn!(presence = %addr, "presence watch ended, reconnecting");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay.mul_f64(rand::random_range(0.5..1.5))) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::watch_event::Event as E;

    fn env(target: Target) -> Envelope {
        Envelope { target: Some(target), ..Default::default() }
    }

    fn names(v: Vec<(Arc<str>, String)>) -> Vec<String> {
        let mut v: Vec<String> = v.into_iter().map(|(n, a)| format!("{n}@{a}")).collect();
        v.sort();
        v
    }

    #[test]
    fn resolves_channels_users_and_broadcasts_from_watch_events() {
        let r = Routes::default();
        let up = |n: &str| {
            E::NodeUp(pb::NodeInfo { node_id: n.into(), delivery_addr: format!("a{n}"), ..Default::default() })
        };
        assert!(r.apply(up("g1")).is_some());
        assert!(r.apply(up("g1")).is_none(), "same address: no change");
        r.apply(up("g2"));
        r.apply(E::Interest(pb::ChannelInterest { channel: "c".into(), node_id: "g1".into(), interested: true }));
        r.apply(E::Interest(pb::ChannelInterest { channel: "c".into(), node_id: "g2".into(), interested: true }));
        r.apply(E::UserOnline(pb::UserNode { user: "u".into(), node_id: "g2".into() }));
        assert_eq!(names(r.resolve(&env(Target::Channel("c".into())))), ["g1@ag1", "g2@ag2"]);
        assert_eq!(names(r.resolve(&env(Target::User("u".into())))), ["g2@ag2"]);
        assert_eq!(names(r.resolve(&env(Target::Broadcast(true)))).len(), 2);
        assert!(r.resolve(&env(Target::Channel("none".into()))).is_empty());
        r.apply(E::Interest(pb::ChannelInterest { channel: "c".into(), node_id: "g1".into(), interested: false }));
        assert_eq!(names(r.resolve(&env(Target::Channel("c".into())))), ["g2@ag2"]);
        assert_eq!(r.apply(E::NodeDown("g2".into())), Some(NodeChange::Down { node: "g2".into() }));
        assert!(r.resolve(&env(Target::Channel("c".into()))).is_empty());
        assert!(r.resolve(&env(Target::User("u".into()))).is_empty());
        let alive: HashSet<String> = HashSet::new();
        assert_eq!(r.retain_nodes(&alive), vec![NodeChange::Down { node: "g1".into() }]);
    }

    #[test]
    fn routes_are_complete_only_after_a_complete_synced() {
        let r = Routes::default();
        assert!(!r.is_complete());
        assert!(r.apply(E::Synced(pb::Synced { complete: false })).is_none());
        assert!(!r.is_complete(), "a replica younger than its lease");
        r.apply(E::Synced(pb::Synced { complete: true }));
        assert!(r.is_complete());
        r.apply(E::Synced(pb::Synced { complete: false }));
        assert!(r.is_complete(), "complete once: a later young replica adds to what is known");
    }
}
