//! A scripted fault sequence under steady load, with one accounting client:
//! presence kill -9 + restart, a bridge kill -9 + restart, the broker path cut
//! and restored, a gateway kill -9 + restart. Every acknowledged publish must
//! reach every live subscriber exactly once, in channel order, and the system
//! must deliver again within RECOVERY after each fault.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use proto::push::v1 as pb;
use proto::push::v1::push_client::PushClient;
use serde_json::{Value, json};
use switchboard_tests::cluster::Cluster;
use switchboard_tests::ws::*;
use tokio::sync::{Mutex, mpsc};
use tokio_tungstenite::tungstenite::Message;

/// Stated in docs/design.md: delivery resumes within this after any single fault.
const RECOVERY: Duration = Duration::from_secs(30);
const CHANNEL: &str = "acct";

/// Reads one subscriber's socket into a channel of messages (None when the socket ends).
fn reader(mut ws: Ws) -> mpsc::UnboundedReceiver<Option<Value>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "message" && tx.send(Some(v)).is_err() {
                        return;
                    }
                }
                Ok(Message::Close(_)) | Err(_) => break,
                _ => {}
            }
        }
        let _ = tx.send(None);
    });
    rx
}

async fn subscribe(addr: SocketAddr, user: &str) -> mpsc::UnboundedReceiver<Option<Value>> {
    let (mut ws, _) = connect(addr, user).await;
    assert_eq!(call(&mut ws, json!({"op":"subscribe","channel":CHANNEL})).await["type"], "ack");
    reader(ws)
}

/// One subscriber's accounting: every message once, seq increasing.
#[derive(Default)]
struct Book {
    ids: HashSet<String>,
    last_seq: u64,
}

impl Book {
    fn take(&mut self, rx: &mut mpsc::UnboundedReceiver<Option<Value>>) -> bool {
        while let Ok(m) = rx.try_recv() {
            let Some(m) = m else { return false };
            let id = m["id"].as_str().unwrap().to_owned();
            let seq = m["seq"].as_u64().unwrap();
            assert!(self.ids.insert(id.clone()), "duplicate delivery of {id}");
            assert!(seq > self.last_seq, "seq went from {} to {seq}", self.last_seq);
            self.last_seq = seq;
        }
        true
    }
}

async fn publish_probe(c: &Cluster, k: u64) -> Option<String> {
    for b in 0..c.bridges.len() {
        let mut p = PushClient::new(tonic::transport::Endpoint::from_shared(c.bridge_url(b)).unwrap().connect_lazy());
        let req = pb::PublishRequest {
            channel: CHANNEL.into(),
            data_json: format!("{{\"probe\":{k}}}"),
            from: "probe".into(),
            ..Default::default()
        };
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(8), p.publish(req)).await {
            return Some(r.into_inner().id);
        }
    }
    None
}

/// Waits until a probe published now reaches every subscriber; returns how long it took.
async fn recovered(
    c: &Cluster,
    subs: &mut [(&mut Book, &mut mpsc::UnboundedReceiver<Option<Value>>)],
    k: &mut u64,
) -> Duration {
    let started = tokio::time::Instant::now();
    loop {
        if started.elapsed() >= RECOVERY {
            let got: Vec<usize> = subs.iter().map(|(b, _)| b.ids.len()).collect();
            panic!("no recovery within {RECOVERY:?} (probe {k}; messages per subscriber {got:?})");
        }
        *k += 1;
        if let Some(id) = publish_probe(c, *k).await {
            let until = tokio::time::Instant::now() + Duration::from_secs(2);
            loop {
                for (book, rx) in subs.iter_mut() {
                    assert!(book.take(rx), "a live subscriber's socket ended");
                }
                if subs.iter().all(|(b, _)| b.ids.contains(&id)) {
                    return started.elapsed();
                }
                if tokio::time::Instant::now() > until {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_sequence_under_load_loses_nothing_acknowledged() {
    let mut c = Cluster::builder()
        .gateway_args(&["--publish-rate", "100000", "--publish-burst", "100000"])
        .presence(1)
        .kafka()
        .bridges(2)
        .gateways(3)
        .start()
        .await;
    // Subscribers on gateways 0 and 2 stay connected through everything.
    let mut rx0 = subscribe(c.gateway(0), "s0").await;
    let mut rx2 = subscribe(c.gateway(2), "s2").await;
    let (mut b0, mut b2) = (Book::default(), Book::default());
    let mut k = 0;
    recovered(&c, &mut [(&mut b0, &mut rx0), (&mut b2, &mut rx2)], &mut k).await;

    // Steady load: 100 publishes/s through both bridges, acknowledged ids recorded.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let bridge_urls = Arc::new(Mutex::new((0..2).map(|b| c.bridge_url(b)).collect::<Vec<_>>()));
    let load = {
        let (acked, stop, urls) = (acked.clone(), stop.clone(), bridge_urls.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let url = { urls.lock().await[(n % 2) as usize].clone() };
                let mut p = PushClient::new(tonic::transport::Endpoint::from_shared(url).unwrap().connect_lazy());
                let req = pb::PublishRequest {
                    channel: CHANNEL.into(),
                    data_json: format!("{{\"n\":{n}}}"),
                    from: "load".into(),
                    ..Default::default()
                };
                if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(8), p.publish(req)).await {
                    acked.lock().await.push(r.into_inner().id);
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut times = Vec::new();
    let mut subs = [(&mut b0, &mut rx0), (&mut b2, &mut rx2)];

    eprintln!("fault 1: presence");
    // 1. presence kill -9 and restart.
    c.presence[0].kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.start_presence(0);
    times.push(("presence restart", recovered(&c, &mut subs, &mut k).await));

    eprintln!("fault 2: bridge");
    // 2. a bridge kill -9 and restart (new port: the load follows it).
    c.bridges[0].restart();
    bridge_urls.lock().await[0] = c.bridge_url(0);
    times.push(("bridge kill -9 + restart", recovered(&c, &mut subs, &mut k).await));

    eprintln!("fault 3: broker cut");
    // 3. the broker path cut for 3 s.
    c.broker.as_ref().unwrap().proxy.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.broker.as_ref().unwrap().proxy.restore();
    times.push(("broker cut 3 s", recovered(&c, &mut subs, &mut k).await));

    eprintln!("fault 4: gateway");
    // 4. gateway 1 kill -9 and restart; its subscriber comes back on it.
    let mut rx1 = subscribe(c.gateway(1), "s1").await;
    let mut b1 = Book::default();
    c.gateways[1].restart();
    let ended = tokio::time::timeout(RECOVERY, async {
        loop {
            match rx1.recv().await {
                Some(Some(_)) => continue,
                _ => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the killed gateway's client never noticed");
    let mut rx1 = subscribe(c.gateway(1), "s1").await;
    let after_gateway = {
        let mut all = [(&mut b0, &mut rx0), (&mut b2, &mut rx2), (&mut b1, &mut rx1)];
        let t = recovered(&c, &mut all, &mut k).await;
        times.push(("gateway kill -9 + restart", t));
        acked.lock().await.len()
    };

    // Stop the load; every acknowledged message reaches the subscribers that stayed, and
    // the restarted gateway's subscriber gets everything acknowledged after it was back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let acked = acked.lock().await.clone();
    // Not vacuous: the load kept publishing through the faults.
    assert!(acked.len() > 100, "only {} publishes acknowledged", acked.len());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        for (b, rx) in [(&mut b0, &mut rx0), (&mut b2, &mut rx2), (&mut b1, &mut rx1)] {
            assert!(b.take(rx), "a live subscriber's socket ended");
        }
        let missing0 = acked.iter().filter(|id| !b0.ids.contains(*id)).count();
        let missing2 = acked.iter().filter(|id| !b2.ids.contains(*id)).count();
        let missing1 = acked[after_gateway..].iter().filter(|id| !b1.ids.contains(*id)).count();
        if missing0 + missing1 + missing2 == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "acknowledged messages missing: s0 {missing0}, s2 {missing2}, s1 (after its return) {missing1}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (what, t) in &times {
        eprintln!("recovered from {what} in {t:?}");
    }
}
