//! The fallback transports in a cluster behind a load balancer without affinity: two
//! gateways (tansu, presence, one broker-bridge) behind round-robin TCP proxies
//! ([`switchboard_tests::rr`]), so that every new connection a client makes lands on
//! the other gateway. While a WebSocket publisher publishes acknowledged messages to two
//! channels, Server-Sent Events clients read a few events, drop the stream and reconnect
//! with `Last-Event-ID` (as a browser's `EventSource` does), and long-poll clients send
//! each poll on a new connection with the previous answer's cursor. Every client must be
//! shown every acknowledged message exactly once, in channel order, with no `gap`, no
//! `recovered: false` and no `close` (docs/protocol.md "Fallback transports").
//!
//! Each client has a proxy of its own: one shared by all would alternate connections
//! across clients, so one client's next connection could land on the gateway it just
//! left. Behind its own, a client's connections strictly alternate (the SSE welcomes'
//! `node` prove it), and every resume crosses gateways. Gateways run with the defaults
//! (publish rate, queues, poll timeout): the publisher keeps to the default rate.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use switchboard_tests::cluster::Cluster;
use switchboard_tests::http::{Sse, request};
use switchboard_tests::monitoring::url_encode as urlencode;
use switchboard_tests::resume::{self, Record, Shown};
use switchboard_tests::rr::RoundRobin;
use switchboard_tests::ws::*;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// Not `room:*`: those are presence channels by default, whose join/leave events are not the point here.
const CHANNELS: [&str; 2] = ["ticker:rr.a", "ticker:rr.b"];
/// Acknowledged messages published to each channel.
const PER_CHANNEL: usize = 100;
/// One publish every this long: 40/s, under the default `--publish-rate` of 50/s.
const PACE: Duration = Duration::from_millis(25);
const SSE_CLIENTS: usize = 3;
const POLL_CLIENTS: usize = 3;
/// Bound on one client's whole run.
const RUN: Duration = Duration::from_secs(90);
/// Bound on the connections one client makes.
const MAX_CONNECTIONS: usize = 2000;
/// Bound on the events one SSE session reads (heartbeats, acks and messages).
const MAX_EVENTS_PER_SESSION: usize = 100;

/// The last acked seq of each channel, once the publisher is done.
type Final = Option<HashMap<String, u64>>;

/// What a client was shown, and what it saw that it should not have.
#[derive(Debug, Default)]
struct Seen {
    record: Record,
    /// `gap`s, `recovered: false` acks, `close` events, errors, unexpected frames or ends.
    faults: Vec<String>,
    /// The `node` of each SSE session's welcome, in order.
    nodes: Vec<String>,
    /// Connections made (SSE streams or polls answered).
    connections: usize,
    /// The last seq shown per channel.
    last: HashMap<String, u64>,
    /// Messages per poll answer, or per SSE session.
    batches: Vec<usize>,
}

impl Seen {
    fn message(&mut self, v: &Value) {
        let shown = Shown {
            channel: v["channel"].as_str().unwrap_or_default().to_owned(),
            seq: v["seq"].as_u64().unwrap_or(0),
            epoch: v["epoch"].as_str().unwrap_or_default().to_owned(),
            id: v["id"].as_str().unwrap_or_default().to_owned(),
        };
        self.last.insert(shown.channel.clone(), shown.seq);
        self.record.shown.push(shown);
    }

    /// Whether every channel's last acked message was shown.
    fn done(&self, fin: &Final) -> bool {
        fin.as_ref().is_some_and(|f| f.iter().all(|(c, seq)| self.last.get(c).is_some_and(|s| s >= seq)))
    }
}

/// Resolves once `seen` has the last acked message of every channel.
async fn finished(fin: &mut watch::Receiver<Final>, seen: &Seen) {
    if fin.wait_for(|f| seen.done(f)).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Whether an event id names a position for every channel (none is `channel=-`).
fn names_every_channel(id: &str) -> bool {
    CHANNELS.iter().all(|c| id.split(',').any(|p| p.starts_with(&format!("{c}=")) && !p.ends_with("=-")))
}

/// An SSE client behind `proxy`: each session reads a few messages (1 to 5) and drops
/// the stream; the next one sends the last `id:` it got as `Last-Event-ID`. `ready` is
/// sent once its first session has both subscribe acks.
async fn sse_client(
    name: String,
    k: usize,
    proxy: SocketAddr,
    ready: oneshot::Sender<()>,
    mut fin: watch::Receiver<Final>,
) -> Seen {
    let auth = bearer(&name);
    let path = format!("/sse?channels={}", CHANNELS.join(","));
    let mut seen = Seen::default();
    let mut ready = Some(ready);
    let mut last_id: Option<String> = None;
    let deadline = Instant::now() + RUN;
    for session in 0..MAX_CONNECTIONS {
        if seen.done(&fin.borrow()) {
            return seen;
        }
        assert!(Instant::now() < deadline, "{name}: not done within {RUN:?} ({session} sessions)");
        let mut headers = vec![("Authorization", auth.as_str())];
        if let Some(id) = &last_id {
            headers.push(("Last-Event-ID", id.as_str()));
        }
        let mut s = Sse::open(proxy, &path, &headers)
            .await
            .unwrap_or_else(|r| panic!("{name}: session {session} refused: {} {}", r.status, r.body));
        seen.connections += 1;
        let budget = 1 + (session * 7 + k) % 5;
        let (mut read, mut acks) = (0, 0);
        for _ in 0..MAX_EVENTS_PER_SESSION {
            if read >= budget {
                break;
            }
            let ev = tokio::select! {
                ev = s.next_within(WAIT) => Some(ev),
                () = finished(&mut fin, &seen) => None,
            };
            let ev = match ev {
                None => break,
                Some(Err(())) => {
                    let fin = fin.borrow().clone();
                    seen.faults.push(format!(
                        "{name}: session {session} (on {:?}, Last-Event-ID {:?}) got no event within {WAIT:?} \
                         after {read} messages; last shown {:?}, last acked {fin:?}",
                        seen.nodes.last(),
                        headers.get(1).map(|h| h.1),
                        seen.last
                    ));
                    return seen;
                }
                Some(Ok(None)) => {
                    seen.faults.push(format!("{name}: session {session}: the stream ended without a close event"));
                    break;
                }
                Some(Ok(Some(ev))) if ev.comment && ev.data.is_empty() => continue,
                Some(Ok(Some(ev))) => ev,
            };
            let v = ev.json();
            match v["type"].as_str() {
                Some("welcome") => seen.nodes.push(v["node"].as_str().unwrap_or_default().to_owned()),
                Some("ack") => {
                    if v["recovered"] == false {
                        seen.faults.push(format!("{name}: session {session}: {v}"));
                    }
                    acks += 1;
                    if acks == CHANNELS.len()
                        && let Some(tx) = ready.take()
                    {
                        let id = s.last_id.clone().unwrap_or_default();
                        assert!(
                            names_every_channel(&id),
                            "{name}: the first acks' event id names both channels: {id:?}"
                        );
                        let _ = tx.send(());
                    }
                }
                Some("message") => {
                    if ev.id.is_none() {
                        seen.faults.push(format!("{name}: session {session}: a message without an id: {v}"));
                    }
                    seen.message(&v);
                    read += 1;
                }
                _ => {
                    seen.faults.push(format!("{name}: session {session}: {v}"));
                    if v["type"] == "close" {
                        break;
                    }
                }
            }
        }
        seen.batches.push(read);
        // What a browser's EventSource keeps: the last id received, over every session.
        if s.last_id.is_some() {
            last_id = s.last_id.clone();
        }
    }
    panic!("{name}: not done within {MAX_CONNECTIONS} sessions");
}

/// A long-poll client behind `proxy`: each poll on a new connection (`Connection:
/// close`) with the cursor of the previous answer. `ready` is sent once the first
/// poll answered with both subscribe acks.
async fn poll_client(
    name: String,
    proxy: SocketAddr,
    ready: oneshot::Sender<()>,
    mut fin: watch::Receiver<Final>,
) -> Seen {
    let auth = bearer(&name);
    let channels = CHANNELS.join(",");
    let mut seen = Seen::default();
    let mut ready = Some(ready);
    let mut cursor: Option<String> = None;
    let deadline = Instant::now() + RUN;
    for poll in 0..MAX_CONNECTIONS {
        if seen.done(&fin.borrow()) {
            return seen;
        }
        assert!(Instant::now() < deadline, "{name}: not done within {RUN:?} ({poll} polls)");
        let path = match &cursor {
            None => format!("/poll?channels={channels}"),
            Some(c) => format!("/poll?channels={channels}&cursor={}", urlencode(c)),
        };
        // A poll waiting when the last message is already shown is dropped (a client going away).
        let headers = [("Authorization", auth.as_str())];
        let reply = tokio::select! {
            r = request(proxy, "GET", &path, &headers, b"") => r,
            () = finished(&mut fin, &seen) => return seen,
        };
        seen.connections += 1;
        assert_eq!(reply.status, 200, "{name}: poll {poll}: {}", reply.body);
        let v = reply.json();
        assert_eq!(v["type"], "poll", "{name}: poll {poll}: {v}");
        let next = v["cursor"].as_str().unwrap_or_else(|| panic!("{name}: poll {poll} without a cursor: {v}"));
        let (mut acks, before) = (0, seen.record.shown.len());
        for e in v["events"].as_array().unwrap_or_else(|| panic!("{name}: poll {poll} without events: {v}")) {
            match e["type"].as_str() {
                Some("message") => seen.message(e),
                Some("ack") if e["recovered"] != false => acks += 1,
                _ => seen.faults.push(format!("{name}: poll {poll}: {e}")),
            }
        }
        if cursor.is_none() {
            assert_eq!(acks, CHANNELS.len(), "{name}: the first poll answers with both subscribe acks: {v}");
            assert!(names_every_channel(next), "{name}: the first cursor names both channels: {next:?}");
        }
        seen.batches.push(seen.record.shown.len() - before);
        cursor = Some(next.to_owned());
        if let Some(tx) = ready.take() {
            let _ = tx.send(());
        }
    }
    panic!("{name}: not done within {MAX_CONNECTIONS} polls");
}

/// Publishes `PER_CHANNEL` messages to each channel in turn over a WebSocket, at
/// [`PACE`]; returns the acks per channel: (seq, id), in publish order.
async fn publish(addr: SocketAddr) -> HashMap<String, Vec<(u64, String)>> {
    let (mut ws, _) = connect(addr, "publisher").await;
    let mut acked: HashMap<String, Vec<(u64, String)>> = HashMap::new();
    let mut tick = tokio::time::interval(PACE);
    for n in 0..PER_CHANNEL * CHANNELS.len() {
        tick.tick().await;
        let channel = CHANNELS[n % CHANNELS.len()];
        let cmd = json!({"op":"publish","channel":channel,"data":{"n":n},"idempotency_key":format!("rr-{n}")});
        // Refused now (rate limit, backend busy): retried with the same key, after the wait it names.
        let mut tries = 0;
        let ack = loop {
            let a = call(&mut ws, cmd.clone()).await;
            if a["type"] == "ack" {
                break a;
            }
            tries += 1;
            let retry = matches!(a["code"].as_str(), Some("rate_limited" | "unavailable"));
            assert!(retry && tries < 20, "publish {n}: {a}");
            tokio::time::sleep(Duration::from_millis(a["retry_after_ms"].as_u64().unwrap_or(100).min(2000))).await;
        };
        let (seq, id) = (ack["seq"].as_u64().expect("ack seq"), ack["id"].as_str().expect("ack id").to_owned());
        let list = acked.entry(channel.to_owned()).or_default();
        if !list.iter().any(|(_, i)| *i == id) {
            list.push((seq, id));
        }
    }
    acked
}

/// Waits until gateway `g` answers `/readyz` with 200.
async fn ready(c: &Cluster, g: usize) {
    let admin = c.gateways[g].addr("admin");
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(admin, "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "gateway {g} never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the cluster delivers across gateways (the bridge has been given its
/// partitions: until then a publish is stored, and delivered only later): a message
/// published on gateway 0 reaches a WebSocket subscriber on each gateway.
async fn warm(c: &Cluster) {
    let mut subs = Vec::new();
    for g in 0..2 {
        let (mut ws, _) = connect(c.gateway(g), "warm").await;
        assert_eq!(call(&mut ws, json!({"op":"subscribe","channel":"ticker:rr.warm"})).await["type"], "ack");
        subs.push(ws);
    }
    let (mut publisher, _) = connect(c.gateway(0), "warmer").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    for ws in &mut subs {
        loop {
            assert!(Instant::now() < deadline, "the cluster never delivered across gateways");
            let ack = call(&mut publisher, json!({"op":"publish","channel":"ticker:rr.warm","data":1})).await;
            assert_eq!(ack["type"], "ack", "{ack}");
            if tokio::time::timeout(Duration::from_millis(500), recv_type(ws, "message")).await.is_ok() {
                break;
            }
        }
    }
}

/// `seen`'s faults on `channel` against the acked ids in channel order: each shown once,
/// in order, nothing missing, nothing else, one epoch.
fn check(name: &str, seen: &Seen, channel: &str, want: &[String]) -> Vec<String> {
    let got = seen.record.ids(channel);
    if got == want {
        let epochs: HashSet<&str> =
            seen.record.shown.iter().filter(|s| s.channel == channel).map(|s| s.epoch.as_str()).collect();
        return if epochs.len() == 1 { Vec::new() } else { vec![format!("{name}: {channel}: epochs {epochs:?}")] };
    }
    let mut faults = resume::check(name, &seen.record, channel, want);
    let acked: HashSet<&String> = want.iter().collect();
    let extra: Vec<(u64, &str)> = seen
        .record
        .shown
        .iter()
        .filter(|s| s.channel == channel && !acked.contains(&s.id))
        .map(|s| (s.seq, s.id.as_str()))
        .collect();
    if !extra.is_empty() {
        faults.push(format!("{name}: {channel}: shown but never acked: {extra:?}"));
    }
    let seqs: Vec<u64> = seen.record.shown.iter().filter(|s| s.channel == channel).map(|s| s.seq).collect();
    faults.push(format!("{name}: {channel}: shown {} of {} (seqs {seqs:?})", got.len(), want.len()));
    faults
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_reconnects_and_polls_alternating_gateways_show_every_message_once_in_order() {
    let c = Cluster::builder().kafka().bridges(1).gateways(2).start().await;
    ready(&c, 0).await;
    ready(&c, 1).await;
    warm(&c).await;
    let gateways = [c.gateway(0), c.gateway(1)];
    let (fin_tx, fin_rx) = watch::channel::<Final>(None);
    let mut proxies = Vec::new();
    let mut sse = Vec::new();
    let mut polls = Vec::new();
    let mut readies = Vec::new();
    for i in 0..SSE_CLIENTS + POLL_CLIENTS {
        // Half the clients start on each gateway.
        let proxy = RoundRobin::start_at(&gateways, i).await;
        let (tx, rx) = oneshot::channel();
        readies.push(rx);
        if i < SSE_CLIENTS {
            sse.push(tokio::spawn(sse_client(format!("sse{i}"), i, proxy.addr, tx, fin_rx.clone())));
        } else {
            polls.push(tokio::spawn(poll_client(format!("poll{i}"), proxy.addr, tx, fin_rx.clone())));
        }
        proxies.push(proxy);
    }
    // Every client follows both channels before the first publish: all of it is theirs.
    for (i, rx) in readies.into_iter().enumerate() {
        tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .unwrap_or_else(|_| panic!("client {i} subscribed in time"))
            .unwrap_or_else(|_| panic!("client {i} failed before it subscribed"));
    }
    let started = Instant::now();
    let acked = publish(c.gateway(0)).await;
    let published = started.elapsed();
    let last: HashMap<String, u64> =
        acked.iter().map(|(c, l)| (c.clone(), l.iter().map(|(s, _)| *s).max().expect("acked"))).collect();
    fin_tx.send_replace(Some(last));
    let mut clients: Vec<(String, Seen)> = Vec::new();
    for (i, t) in sse.into_iter().chain(polls).enumerate() {
        let seen = tokio::time::timeout(RUN + Duration::from_secs(10), t)
            .await
            .unwrap_or_else(|_| panic!("client {i} finished in time"))
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        clients.push((if i < SSE_CLIENTS { format!("sse{i}") } else { format!("poll{i}") }, seen));
    }
    let caught_up = started.elapsed();

    // Channel order: the acked ids by seq (one publisher, so also publish order).
    let mut want: HashMap<&str, Vec<String>> = HashMap::new();
    for ch in CHANNELS {
        let mut l = acked[ch].clone();
        assert_eq!(l.len(), PER_CHANNEL, "{ch}: every publish acked once");
        assert!(l.windows(2).all(|w| w[0].0 < w[1].0), "{ch}: acked seqs increase in publish order: {l:?}");
        l.sort();
        want.insert(ch, l.into_iter().map(|(_, id)| id).collect());
    }
    let mut faults = Vec::new();
    for (name, seen) in &clients {
        faults.extend(seen.faults.iter().cloned());
        for ch in CHANNELS {
            faults.extend(check(name, seen, ch, &want[ch]));
        }
    }
    let summary: Vec<String> = clients
        .iter()
        .zip(&proxies)
        .map(|((name, seen), p)| {
            format!(
                "{name}: {} connections, per gateway {:?}, messages per connection {:?}",
                seen.connections,
                p.counts(),
                seen.batches
            )
        })
        .collect();
    println!(
        "{} messages published in {published:?}, every client caught up after {caught_up:?}\n{}",
        PER_CHANNEL * CHANNELS.len(),
        summary.join("\n")
    );
    assert!(faults.is_empty(), "{faults:#?}");

    // The proxies alternated: every client used both gateways, each connection the other
    // gateway than the one before (SSE welcomes name it). An SSE client reconnects every
    // few messages; a poll client polls again after every answer, and a waiting poll is
    // answered by the next message, whichever gateway it waits on.
    let nodes = [c.gateways[0].name.clone(), c.gateways[1].name.clone()];
    for ((name, seen), p) in clients.iter().zip(&proxies) {
        let counts = p.counts();
        assert_eq!(p.failed(), 0, "{name}: every proxied connection reached its gateway");
        let (min_connections, min_each) = (10, 5);
        assert!(
            seen.connections >= min_connections,
            "{name}: reconnected or polled ({} connections)",
            seen.connections
        );
        assert!(counts.iter().all(|&n| n >= min_each), "{name}: both gateways got connections: {counts:?}");
        assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1, "{name}: round robin: {counts:?}");
        if !seen.nodes.is_empty() {
            // The last session may have ended (all shown) before it read its welcome.
            assert!(seen.nodes.len() + 1 >= seen.connections, "{name}: a welcome per session: {:?}", seen.nodes);
            assert!(seen.nodes.iter().all(|n| nodes.contains(n)), "{name}: {:?}", seen.nodes);
            assert!(
                seen.nodes.windows(2).all(|w| w[0] != w[1]),
                "{name}: every reconnect landed on the other gateway: {:?}",
                seen.nodes
            );
        }
    }
    let total: Vec<usize> = (0..2).map(|g| proxies.iter().map(|p| p.counts()[g]).sum()).collect();
    assert!(total.iter().all(|&n| n > 0), "both gateways got connections: {total:?}");
}

/// A long-polling user in a cluster is known to presence like a WebSocket one: a poll
/// waiting on one gateway is answered by a message published on the other (the cluster
/// routes the channel to the poll's gateway), the user is a member of a presence channel
/// while it keeps polling — one `join`, no `leave` between polls, on whichever gateway
/// each poll lands — and leaves once it stops polling for as long as a silent WebSocket
/// session is kept (`heartbeat_interval + heartbeat_timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_polling_user_is_routed_to_and_present_between_polls() {
    const ROOM: &str = "room:pollers";
    let c = Cluster::builder().kafka().bridges(1).gateways(2).start().await;
    ready(&c, 0).await;
    ready(&c, 1).await;
    warm(&c).await;
    let (g0, g1) = (c.gateway(0), c.gateway(1));
    let (mut watcher, _) = connect(g0, "watcher").await;
    assert_eq!(call(&mut watcher, json!({"op":"subscribe","channel":ROOM})).await["type"], "ack");
    let (frames_tx, mut frames) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let (mut publisher, _) = connect(g0, "publisher").await;
    // Everything the watcher is sent, in order (the reader ends with the test).
    let reader = tokio::spawn(async move {
        loop {
            let v = recv_json_within(&mut watcher, RUN).await;
            if frames_tx.send(v).is_err() {
                break;
            }
        }
    });
    let auth = bearer("poller");
    let poll = |addr: SocketAddr, cursor: Option<String>, wait_ms: Option<u64>| {
        let mut path = format!("/poll?channels={}", urlencode(ROOM));
        if let Some(c) = cursor {
            path += &format!("&cursor={}", urlencode(&c));
        }
        if let Some(ms) = wait_ms {
            path += &format!("&timeout_ms={ms}");
        }
        let auth = auth.clone();
        async move {
            let reply = request(addr, "GET", &path, &[("Authorization", auth.as_str())], b"").await;
            assert_eq!(reply.status, 200, "{path}: {}", reply.body);
            reply.json()
        }
    };
    // The first poll, on gateway 1: the subscribe ack and a cursor.
    let first = poll(g1, None, None).await;
    assert_eq!(first["events"][0]["type"], "ack", "{first}");
    let mut cursor = first["cursor"].as_str().expect("cursor").to_owned();
    // The watcher on gateway 0 sees the poller join.
    let join = tokio::time::timeout(WAIT, async {
        loop {
            let v = frames.recv().await.expect("watcher frames");
            if v["type"] == "join" && v["user"] == "poller" {
                return v;
            }
        }
    })
    .await
    .expect("the poller's join reached the other gateway");
    assert_eq!(join["channel"], ROOM);

    // A poll waiting on gateway 1 (default wait, 25 s) is answered by a message published
    // on gateway 0: the cluster routes the room to gateway 1 for the poller.
    let waiting = tokio::spawn(poll(g1, Some(cursor.clone()), None));
    let admin = c.gateways[1].addr("admin");
    let deadline = Instant::now() + WAIT;
    loop {
        let page = http_get(admin, "/metrics").await.1;
        if metric(&page, "switchboard_gateway_transport_sessions_active", r#"transport="poll""#) >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the poll never waited on gateway 1");
        // A polling interval, not a synchronisation: the metric is what is waited for.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ack = call(&mut publisher, json!({"op":"publish","channel":ROOM,"data":"to the poller"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let answer = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiting poll was answered by the message, not by its timeout")
        .expect("poll task");
    let got: Vec<&Value> =
        answer["events"].as_array().expect("events").iter().filter(|e| e["type"] == "message").collect();
    assert_eq!(got.len(), 1, "the message, once: {answer}");
    assert_eq!(got[0]["seq"], ack["seq"], "{answer}");
    cursor = answer["cursor"].as_str().expect("cursor").to_owned();

    // Polls that return at once, alternating gateways: still a member, between them too.
    let rr = RoundRobin::start_at(&[g0, g1], 0).await;
    for _ in 0..6 {
        let a = poll(rr.addr, Some(cursor.clone()), Some(0)).await;
        cursor = a["cursor"].as_str().expect("cursor").to_owned();
        let members = call(&mut publisher, json!({"op":"presence","channel":ROOM})).await;
        assert!(
            members["users"].as_array().is_some_and(|u| u.iter().any(|u| u == "poller")),
            "the poller is a member between polls: {members}"
        );
    }
    assert_eq!(rr.counts(), vec![3, 3], "the polls alternated gateways");
    let last_poll = Instant::now();

    // It stops polling: after heartbeat_interval + heartbeat_timeout (25 + 10 s by default)
    // it leaves, once, with no other join or leave of it before.
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let v = frames.recv().await.expect("watcher frames");
            if v["user"] == "poller" {
                seen.push(v["type"].as_str().unwrap_or_default().to_owned());
                if v["type"] == "leave" {
                    return;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the poller never left: {seen:?}"));
    assert_eq!(seen, ["leave"], "one leave after the polling stopped, no flicker before it");
    // Measured from the end of the last poll as this client saw it, just after the gateway
    // ended it (1 s for that and the sweep's period).
    let after = last_poll.elapsed();
    assert!(after >= Duration::from_secs(34), "the leave came {after:?} after the last poll: too early");
    reader.abort();
}
