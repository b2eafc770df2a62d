//! A bridge failover at the last hop: kill -9 the broker-bridge that consumes the
//! channel's partition while publishes flow; the surviving bridge takes the partition
//! after the consumer-group session timeout and replays the backlog in one burst.
//! Subscribers read as fast as they can with the gateways' default send queue and
//! must get every acknowledged message exactly once, in seq order: the burst is
//! paced by what their sessions absorb, not refused with 4002. Publishes carry
//! idempotency keys and one that fails on the dying bridge is retried on the other.
//! Ten runs on Kafka, each on a fresh cluster; two on NATS JetStream and two on Redis
//! Streams, where the partition moves when the dead bridge's lease expires.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use proto::push::v1 as pb;
use proto::push::v1::push_client::PushClient;
use serde_json::{Value, json};
use switchboard_tests::backbone::Backbone;
use switchboard_tests::cluster::Cluster;
use switchboard_tests::ws::*;
use tokio_tungstenite::tungstenite::Message;

const CHANNEL: &str = "ticker";
const RUNS: usize = 10;
/// Runs on each leased backbone (NATS, Redis).
const LEASED_RUNS: usize = 2;
const PER_RUN: usize = 3000;
const PUBLISHERS: usize = 3;

/// What one subscriber saw: ids in arrival order, and whatever went wrong.
#[derive(Default)]
struct Seen {
    ids: HashSet<String>,
    last_seq: u64,
    faults: Vec<String>,
}

/// Connects as `user` to `addr` and reads the welcome.
async fn connect_via(addr: SocketAddr, user: &str) -> Ws {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let t = token(json!({"sub": user, "exp": now() + 3600}));
    let (mut ws, _) = tokio_tungstenite::client_async(
        format!("ws://{addr}/ws?token={t}"),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .expect("upgrade");
    assert_eq!(recv_json(&mut ws).await["type"], "welcome");
    ws
}

/// Reads as fast as it can until the socket ends, recording every channel message.
fn spawn_reader(mut ws: Ws, name: String, seen: Arc<Mutex<Seen>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(frame) = ws.next().await {
            let text = match frame {
                Ok(Message::Text(t)) => t,
                Ok(Message::Close(c)) => {
                    seen.lock().unwrap().faults.push(format!("{name} closed: {c:?}"));
                    return;
                }
                Ok(_) => continue,
                Err(e) => {
                    seen.lock().unwrap().faults.push(format!("{name} lost its socket: {e}"));
                    return;
                }
            };
            let v: Value = serde_json::from_str(&text).expect("JSON frame");
            if v["type"] != "message" {
                continue;
            }
            let (id, seq) = (v["id"].as_str().unwrap().to_owned(), v["seq"].as_u64().unwrap());
            let mut s = seen.lock().unwrap();
            if seq <= s.last_seq {
                let last = s.last_seq;
                s.faults.push(format!("{name}: seq {seq} after {last}"));
            }
            s.last_seq = seq;
            if !s.ids.insert(id.clone()) {
                s.faults.push(format!("{name}: {id} twice"));
            }
        }
    })
}

async fn bridge_metric(c: &Cluster, bridge: usize, name: &str) -> f64 {
    let (_, page) = http_get(c.bridges[bridge].addr("admin"), "/metrics").await;
    metric(&page, name, "")
}

async fn consumed(c: &Cluster, bridge: usize) -> f64 {
    bridge_metric(c, bridge, "switchboard_bridge_consumed_total").await
}

/// Waits until both bridges have partitions (the group has settled after a restart).
async fn both_bridges_assigned(c: &Cluster) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let a = bridge_metric(c, 0, "switchboard_bridge_assigned_partitions").await;
        let b = bridge_metric(c, 1, "switchboard_bridge_assigned_partitions").await;
        if a > 0.0 && b > 0.0 && a + b == 4.0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the group never gave both bridges partitions ({a}, {b})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes one probe through `bridge` and waits until every subscriber has it.
async fn probe(c: &Cluster, bridge: usize, seen: &[Arc<Mutex<Seen>>], k: usize) -> bool {
    let mut push =
        PushClient::new(tonic::transport::Endpoint::from_shared(c.bridge_url(bridge)).unwrap().connect_lazy());
    let Ok(r) = push
        .publish(pb::PublishRequest {
            channel: CHANNEL.into(),
            data_json: json!({"probe": k}).to_string(),
            from: "probe".into(),
            ..Default::default()
        })
        .await
    else {
        return false;
    };
    let id = r.into_inner().id;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        if seen.iter().all(|s| s.lock().unwrap().ids.contains(&id)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// One run of the scenario on a fresh cluster: subscribers, load, kill -9 of the
/// partition's owner, then every acknowledged message must reach every subscriber
/// exactly once, in order. Returns how many were acknowledged.
async fn one_failover(run: usize, backbone: Backbone) -> usize {
    let mut c = Cluster::builder().presence(1).backbone(backbone).bridges(2).gateways(3).start().await;
    let mut seen = Vec::new();
    let mut readers = Vec::new();
    for g in 0..3 {
        let addr: SocketAddr = c.gateway(g);
        for k in 0..2 {
            let mut ws = connect_via(addr, &format!("s{g}{k}")).await;
            assert_eq!(call(&mut ws, json!({"op":"subscribe","channel":CHANNEL})).await["type"], "ack");
            let s = Arc::new(Mutex::new(Seen::default()));
            readers.push(spawn_reader(ws, format!("gateway {g} subscriber {k}"), s.clone()));
            seen.push(s);
        }
    }
    both_bridges_assigned(&c).await;
    // Every subscriber's gateway is routed to before the load starts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for k in 0.. {
        if probe(&c, k % 2, &seen, k).await {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "run {run}: probes never reached every subscriber");
    }
    let before = [consumed(&c, 0).await, consumed(&c, 1).await];
    let urls = [c.bridge_url(0), c.bridge_url(1)];
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let urls = urls.clone();
            let acked = acked.clone();
            tokio::spawn(async move {
                let clients: Vec<_> = urls
                    .iter()
                    .map(|u| {
                        PushClient::new(tonic::transport::Endpoint::from_shared(u.clone()).unwrap().connect_lazy())
                    })
                    .collect();
                for n in (p..PER_RUN).step_by(PUBLISHERS) {
                    let req = pb::PublishRequest {
                        channel: CHANNEL.into(),
                        data_json: json!({"run": run, "n": n}).to_string(),
                        from: "load".into(),
                        // A retry on the other bridge after a failure is safe with a key.
                        idempotency_key: format!("run{run}-{n}"),
                    };
                    for attempt in 0..2 {
                        let mut cl = clients[(n + attempt) % 2].clone();
                        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(10), cl.publish(req.clone())).await
                        {
                            acked.lock().unwrap().insert(r.into_inner().id);
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < PER_RUN / 10 {
        assert!(tokio::time::Instant::now() < deadline, "run {run}: load never reached a tenth");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The partition's owner is the bridge that has been consuming this load.
    let grown = [consumed(&c, 0).await - before[0], consumed(&c, 1).await - before[1]];
    assert!(grown[0] + grown[1] > 0.0, "run {run}: no bridge consumed any of the load");
    let owner = usize::from(grown[1] > grown[0]);
    c.bridges[owner].kill();
    for p in publishers {
        p.await.unwrap();
    }
    let want = acked.lock().unwrap().clone();
    // Every publish that failed on the dead bridge was retried on the live one.
    assert!(want.len() >= PER_RUN * 9 / 10, "run {run}: only {} acknowledged", want.len());
    let survivor = 1 - owner;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let missing: Vec<usize> = seen
            .iter()
            .map(|s| {
                let s = s.lock().unwrap();
                want.iter().filter(|id| !s.ids.contains(*id)).count()
            })
            .collect();
        let faults: Vec<String> = seen.iter().flat_map(|s| s.lock().unwrap().faults.clone()).collect();
        assert!(faults.is_empty(), "run {run} (bridge {owner} killed): {faults:?}");
        if missing.iter().all(|&m| m == 0) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let (_, page) = http_get(c.bridges[survivor].addr("admin"), "/metrics").await;
            let bridge: Vec<&str> =
                page.lines().filter(|l| !l.starts_with('#') && l.contains("switchboard_bridge_")).collect();
            panic!(
                "run {run} (bridge {owner} killed): acknowledged messages missing per subscriber: {missing:?}; surviving bridge: {bridge:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in readers {
        r.abort();
    }
    want.len()
}

/// `runs` failovers in a row on `backbone`, each on a fresh cluster.
async fn failovers(backbone: Backbone, runs: usize) {
    let mut acked = 0;
    for run in 0..runs {
        acked += one_failover(run, backbone).await;
    }
    assert!(acked >= runs * PER_RUN / 2, "{acked} acknowledged in all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_partition_owner_loses_nothing_at_default_send_queues_ten_times() {
    failovers(Backbone::Kafka, RUNS).await;
}

/// NATS and Redis: the survivor takes the partition when the dead bridge's lease
/// expires (10 s unrenewed), not through a consumer group. Two runs each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_partition_owner_loses_nothing_on_nats_jetstream() {
    failovers(Backbone::Nats, LEASED_RUNS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_partition_owner_loses_nothing_on_redis_streams() {
    failovers(Backbone::Redis, LEASED_RUNS).await;
}
