//! Continuity across reconnects in a cluster (tansu, presence, broker-bridge, three
//! gateways): clients resume with `since` on whichever gateway they reach and must
//! be shown every acknowledged message of their channels exactly once, in channel
//! order, with no gap: through a rolling deploy of every gateway, and after a kill -9
//! of the gateway a client is on, mid-burst (that one on every backbone).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::push::v1 as pb;
use proto::push::v1::push_client::PushClient;
use serde_json::json;
use switchboard_tests::backbone::Backbone;
use switchboard_tests::cluster::{Cluster, free_port};
use switchboard_tests::per_backbone;
use switchboard_tests::resume::{self, Record};
use switchboard_tests::ws::*;
use tokio_util::sync::CancellationToken;

/// A cluster whose three gateways listen on fixed ports, so a restarted gateway is
/// found where it was.
async fn cluster(backbone: Backbone) -> (Cluster, Vec<SocketAddr>) {
    let mut c = Cluster::builder().backbone(backbone).bridges(1).gateways(0).start().await;
    let mut addrs = Vec::new();
    for _ in 0..3 {
        let port = free_port();
        c.start_gateway_with(&["--listen".into(), format!("127.0.0.1:{port}")]);
        addrs.push(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    for g in 0..3 {
        ready(&c, g).await;
    }
    (c, addrs)
}

/// Waits until gateway `g` answers `/readyz` with 200.
async fn ready(c: &Cluster, g: usize) {
    let admin = c.gateways[g].addr("admin");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while http_get(admin, "/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "gateway {g} never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn push(c: &Cluster) -> PushClient<tonic::transport::Channel> {
    PushClient::new(tonic::transport::Endpoint::from_shared(c.bridge_url(0)).unwrap().connect_lazy())
}

/// Acknowledged publishes per channel: (seq, id).
type Acked = Arc<Mutex<Vec<(String, u64, String)>>>;

/// Publishes to `channels` in turn every `every` until `stop`; records every ack.
fn publisher(
    c: &Cluster,
    channels: Vec<String>,
    every: Duration,
    stop: CancellationToken,
) -> (Acked, tokio::task::JoinHandle<()>) {
    let acked: Acked = Arc::default();
    let (mut client, out) = (push(c), acked.clone());
    let task = tokio::spawn(async move {
        let mut n = 0u64;
        let mut tick = tokio::time::interval(every);
        while !stop.is_cancelled() {
            tick.tick().await;
            let channel = channels[n as usize % channels.len()].clone();
            let req = pb::PublishRequest {
                channel: channel.clone(),
                data_json: json!({"n": n}).to_string(),
                from: "publisher".into(),
                idempotency_key: format!("k{n}"),
            };
            n += 1;
            // A publish refused (e.g. the bridge busy) is retried with its key, so every
            // acked message is stored once.
            for _ in 0..20 {
                if let Ok(r) = client.publish(req.clone()).await {
                    let r = r.into_inner();
                    if !r.duplicate || !out.lock().unwrap().iter().any(|(_, _, id)| *id == r.id) {
                        out.lock().unwrap().push((channel.clone(), r.seq, r.id));
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    (acked, task)
}

/// A client: its name, the channels it follows, what it was shown.
type Client = (String, Vec<String>, Arc<Mutex<Record>>);

/// The acked ids of `channel` in channel (seq) order.
fn in_order(acked: &Acked, channel: &str) -> Vec<String> {
    let mut v: Vec<(u64, String)> =
        acked.lock().unwrap().iter().filter(|(c, _, _)| c == channel).map(|(_, s, id)| (*s, id.clone())).collect();
    v.sort();
    v.into_iter().map(|(_, id)| id).collect()
}

/// Waits until every client was shown the last acked message of each of its channels.
async fn caught_up(clients: &[Client], acked: &Acked) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let behind: Vec<&String> = clients
            .iter()
            .filter(|(_, channels, rec)| {
                channels.iter().any(|c| {
                    let want = in_order(acked, c);
                    want.last().is_some_and(|last| !rec.lock().unwrap().ids(c).contains(last))
                })
            })
            .map(|(name, _, _)| name)
            .collect();
        if behind.is_empty() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "clients never caught up: {behind:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn verdict(clients: &[Client], acked: &Acked) -> Vec<String> {
    let mut faults = Vec::new();
    for (name, channels, rec) in clients {
        let rec = rec.lock().unwrap();
        for c in channels {
            faults.extend(resume::check(name, &rec, c, &in_order(acked, c)));
        }
        for g in &rec.gaps {
            faults.push(format!("{name}: gap {g}"));
        }
    }
    faults
}

/// The JS client (gateway/static/switchboard.js) in headless Chromium pages and in Node,
/// driven by tests/browser/clients.mjs: `report` asks every client for what it was shown.
struct JsClients {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    count: usize,
}

impl JsClients {
    async fn start(addrs: &[SocketAddr], channels: &[String], pages: usize, node: usize) -> Self {
        use tokio::io::AsyncBufReadExt;
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let urls: Vec<String> = addrs.iter().map(|a| format!("ws://{a}/ws")).collect();
        let mut child = tokio::process::Command::new("node")
            .arg("tests/browser/clients.mjs")
            .args(["--urls", &urls.join(","), "--channels", &channels.join(",")])
            .args(["--pages", &pages.to_string(), "--node-clients", &node.to_string(), "--token-secret", SECRET])
            .current_dir(root)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node (the test command installs it, with playwright-core and chromium)");
        let stdin = child.stdin.take().unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .expect("JS clients ready in time")
            .unwrap()
            .expect("a line from clients.mjs");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&first).unwrap()["ready"], true, "{first}");
        Self { child, stdin, lines, count: pages + node }
    }

    /// One report per client: (name, channels, what it was shown).
    async fn report(&mut self, last: bool) -> Vec<Client> {
        use tokio::io::AsyncWriteExt;
        self.stdin.write_all(if last { b"stop\n" } else { b"report\n" }).await.unwrap();
        let mut out = Vec::new();
        for _ in 0..self.count {
            let line = tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
                .await
                .expect("a report line in time")
                .unwrap()
                .expect("a report line");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert!(v["error"].is_null(), "a JS client could not report: {v}");
            let channels: Vec<String> =
                v["channels"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned()).collect();
            let mut rec = Record::default();
            for m in v["received"].as_array().unwrap() {
                rec.shown.push(resume::Shown {
                    channel: m[0].as_str().unwrap().to_owned(),
                    seq: m[1].as_u64().unwrap(),
                    epoch: m[2].as_str().unwrap().to_owned(),
                    id: m[3].as_str().unwrap().to_owned(),
                });
            }
            rec.gaps = v["gaps"].as_array().cloned().unwrap_or_default();
            rec.sessions = v["reconnects"].as_u64().unwrap_or(0) as usize + 1;
            out.push((v["client"].as_str().unwrap().to_owned(), channels, Arc::new(Mutex::new(rec))));
        }
        if last {
            let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.unwrap().unwrap();
            assert!(status.success(), "clients.mjs exited with {status}");
        }
        out
    }
}

/// Whether every client was shown the last acked message of each of its channels.
fn all_caught_up(clients: &[Client], acked: &Acked) -> bool {
    clients.iter().all(|(_, channels, rec)| {
        channels.iter().all(|c| in_order(acked, c).last().is_none_or(|last| rec.lock().unwrap().ids(c).contains(last)))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_deploy_of_every_gateway_loses_nothing_and_shows_nothing_twice() {
    let (mut c, addrs) = cluster(Backbone::Kafka).await;
    let channels: Vec<String> = (0..3).map(|i| format!("room:deploy{i}")).collect();
    // 30 clients: 6 Chromium pages and 6 Node clients running switchboard.js, 18 independent ones.
    let mut js = JsClients::start(&addrs, &channels, 6, 6).await;
    let stop_clients = CancellationToken::new();
    let mut clients = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..18 {
        let ready = Arc::new(tokio::sync::Notify::new());
        let follows = vec![channels[i % 3].clone(), channels[(i + 1) % 3].clone()];
        let (rec, task) =
            resume::spawn(format!("u{i}"), addrs.clone(), i % 3, follows.clone(), stop_clients.clone(), ready.clone());
        tokio::time::timeout(Duration::from_secs(30), ready.notified()).await.expect("client subscribed");
        clients.push((format!("u{i}"), follows, rec));
        tasks.push(task);
    }
    let stop_publisher = CancellationToken::new();
    let (acked, publishing) = publisher(&c, channels.clone(), Duration::from_millis(20), stop_publisher.clone());
    // Drain and restart every gateway in turn, as a deploy does, while publishes flow.
    for g in 0..3 {
        c.gateways[g].signal("-TERM");
        let status = c.gateways[g].wait_exit(Duration::from_secs(40));
        assert!(status.success(), "gateway {g} drained and exited: {status:?}");
        c.gateways[g].restart();
        ready(&c, g).await;
    }
    stop_publisher.cancel();
    publishing.await.unwrap();
    caught_up(&clients, &acked).await;
    stop_clients.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !all_caught_up(&js.report(false).await, &acked) {
        assert!(tokio::time::Instant::now() < deadline, "the JS clients never caught up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let js_clients = js.report(true).await;
    let total = acked.lock().unwrap().len();
    assert!(total > 500, "the publisher kept publishing through the deploy ({total} acked)");
    let mut faults = verdict(&clients, &acked);
    faults.extend(verdict(&js_clients, &acked));
    let js_sessions: usize = js_clients.iter().map(|(_, _, r)| r.lock().unwrap().sessions).sum();
    assert!(js_sessions >= 2 * js_clients.len(), "every JS client reconnected at least once ({js_sessions} sessions)");
    let sessions: usize = clients.iter().map(|(_, _, r)| r.lock().unwrap().sessions).sum();
    let drains =
        clients.iter().map(|(_, _, r)| r.lock().unwrap().closes.iter().filter(|&&c| c == 1001).count()).sum::<usize>();
    println!("rolling deploy: {total} acked, {sessions} sessions, {drains} drain closes, faults: {}", faults.len());
    assert!(drains >= 18, "every independent client was drained at least once ({drains})");
    assert!(faults.is_empty(), "{faults:#?}");
}

/// On every backbone (`per_backbone!`): recovery reads the backbone's log.
async fn kill_9_of_a_clients_gateway_mid_burst_is_recovered_on_another(backbone: Backbone) {
    let (mut c, addrs) = cluster(backbone).await;
    let channel = "room:burst".to_owned();
    let stop_clients = CancellationToken::new();
    let ready = Arc::new(tokio::sync::Notify::new());
    // The client starts on gateway 0; the list moves it to gateway 1 when 0 dies.
    let (rec, task) =
        resume::spawn("victim".into(), addrs.clone(), 0, vec![channel.clone()], stop_clients.clone(), ready.clone());
    tokio::time::timeout(Duration::from_secs(30), ready.notified()).await.expect("client subscribed");
    let stop_publisher = CancellationToken::new();
    let (acked, publishing) = publisher(&c, vec![channel.clone()], Duration::from_millis(2), stop_publisher.clone());
    // Mid-burst: once the client has been shown some of it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while rec.lock().unwrap().shown.len() < 200 {
        assert!(tokio::time::Instant::now() < deadline, "the burst never reached the client");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.gateways[0].kill();
    // The burst goes on while the client reconnects elsewhere and recovers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while rec.lock().unwrap().sessions < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the client never reconnected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let more = acked.lock().unwrap().len() + 300;
    while acked.lock().unwrap().len() < more {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_publisher.cancel();
    publishing.await.unwrap();
    let clients = vec![("victim".to_owned(), vec![channel.clone()], rec.clone())];
    caught_up(&clients, &acked).await;
    stop_clients.cancel();
    task.await.unwrap();
    let r = rec.lock().unwrap();
    assert!(r.recovered >= 1, "the second session recovered ({} sessions)", r.sessions);
    assert_eq!(r.closes.first(), Some(&1006), "the first session died with its gateway");
    drop(r);
    let faults = verdict(&clients, &acked);
    assert!(faults.is_empty(), "{faults:#?}");
}

per_backbone!(kill_9_of_a_clients_gateway_mid_burst_is_recovered_on_another);
