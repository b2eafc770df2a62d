//! `bench history`: what standalone history costs and how fast a client recovers.
//!
//! 1. Memory: publishes one message to each of `channels` channels, then fills each to
//!    `messages`; the gateway's RSS growth and its own accounting
//!    (`switchboard_gateway_history_bytes`) give the bytes per entry and per channel.
//! 2. Recovery latency: a client subscribes (keeping the ack's position), N messages are
//!    published, and a second client subscribes with `since` = that position; the time
//!    from its subscribe to the last recovered message, median of `runs`.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(crate) struct Options {
    /// Also time recovery through broker-bridge (tansu, presence, bridge, gateway).
    pub cluster: bool,
    pub gateway_bin: PathBuf,
    pub channels: usize,
    pub messages: usize,
    pub body: usize,
    pub missed: Vec<usize>,
    pub runs: usize,
}

fn start(bin: &PathBuf, history: &str) -> anyhow::Result<(super::Gateway, std::net::SocketAddr)> {
    let extra = ["--history", history, "--history-memory", "4000000000", "--publish-rate", "1000000"];
    let gw = super::start_gateway_with(bin, &[&extra[..], &["--publish-burst", "1000000"]].concat())?;
    let client = gw.client;
    Ok((gw, client))
}

async fn connect(addr: std::net::SocketAddr, user: &str) -> anyhow::Result<Ws> {
    connect_with(addr, user, super::SECRET).await
}

/// Connects with a token signed by `secret` (the cluster harness has its own).
async fn connect_with(addr: std::net::SocketAddr, user: &str, secret: &str) -> anyhow::Result<Ws> {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())?;
    let token = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &json!({"sub": user, "exp": exp}), &key)?;
    let mut req = format!("ws://{addr}/ws").into_client_request()?;
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    next_json(&mut ws).await?;
    Ok(ws)
}

async fn next_json(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await.context("no frame in 30 s")? {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t)?),
            Some(Ok(_)) => {}
            other => bail!("connection ended: {other:?}"),
        }
    }
}

/// Publishes every (channel, count) pipelined, then waits for every ack.
async fn publish_pipelined(ws: &mut Ws, items: impl Iterator<Item = String>) -> anyhow::Result<usize> {
    let mut sent = 0;
    let mut acked = 0;
    for cmd in items {
        ws.feed(Message::text(cmd)).await?;
        sent += 1;
        if sent % 512 == 0 {
            ws.flush().await?;
            // Keep at most ~4k outstanding so replies never pile up in the gateway.
            while sent - acked > 4096 {
                if next_json(ws).await?["type"] == "ack" {
                    acked += 1;
                }
            }
        }
    }
    ws.flush().await?;
    while acked < sent {
        let v = next_json(ws).await?;
        match v["type"].as_str() {
            Some("ack") => acked += 1,
            Some("error") => bail!("publish refused: {v}"),
            _ => {}
        }
    }
    Ok(sent)
}

pub(crate) async fn run(o: Options) -> anyhow::Result<()> {
    let body = "x".repeat(o.body);
    // 1. Memory.
    let (gw, addr) = start(&o.gateway_bin, &format!("r*=20000/1h,*={}/1h", o.messages))?;
    let pid = gw.child.id();
    let mut p = connect(addr, "publisher").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = super::rss_kib(pid)?;
    let one = |c: usize| json!({"op":"publish","channel":format!("c{c}"),"data":{"b":body}}).to_string();
    publish_pipelined(&mut p, (0..o.channels).map(one)).await?;
    let rss_one = super::rss_kib(pid)?;
    let bytes_one = super::metric(gw.admin, "switchboard_gateway_history_bytes").await?;
    let rest = (1..o.messages).flat_map(|_| 0..o.channels).map(one);
    publish_pipelined(&mut p, rest).await?;
    // The sweeper publishes the gauge every 250 ms.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let rss_full = super::rss_kib(pid)?;
    let bytes_full = super::metric(gw.admin, "switchboard_gateway_history_bytes").await?;
    let entries = (o.channels * o.messages) as f64;
    let more = (o.channels * (o.messages - 1)) as f64;
    let rss_per_entry = (rss_full.saturating_sub(rss_one) as f64 * 1024.0) / more;
    let rss_per_channel_first = (rss_one.saturating_sub(base) as f64 * 1024.0) / o.channels as f64;
    let counted_per_entry = bytes_full / entries;
    let rss_per_channel_full = (rss_full.saturating_sub(base) as f64 * 1024.0) / o.channels as f64;
    println!("history memory: {} channels x {} messages of {} B bodies", o.channels, o.messages, o.body);
    println!("  RSS per entry (messages 2..{}):          {rss_per_entry:>8.0} B", o.messages);
    println!("  counted per entry (history_bytes):        {counted_per_entry:>8.0} B");
    println!("  RSS per channel with its first message:   {rss_per_channel_first:>8.0} B");
    println!("  RSS per channel with {} messages:        {rss_per_channel_full:>8.0} B", o.messages);
    let _ = bytes_one;

    // 2. Recovery latency on the same node.
    let mut latencies = Vec::new();
    for &n in &o.missed {
        let mut runs = Vec::new();
        for run in 0..o.runs {
            let channel = format!("r{n}-{run}");
            let mut a = connect(addr, "away").await?;
            a.send(Message::text(json!({"op":"subscribe","channel":channel,"ref":1}).to_string())).await?;
            let ack = next_json(&mut a).await?;
            let position = ack["position"].clone();
            drop(a);
            let msg = |i: usize| json!({"op":"publish","channel":channel,"data":{"i":i,"b":body}}).to_string();
            publish_pipelined(&mut p, (0..n).map(msg)).await?;
            let mut b = connect(addr, "back").await?;
            runs.push(time_recovery(&mut b, &channel, &position, n).await?);
        }
        runs.sort_by(f64::total_cmp);
        let median = runs[runs.len() / 2];
        println!("  recovery of {n:>6} missed messages (standalone): median {median:.2} ms of {} runs", o.runs);
        latencies.push(json!({"missed": n, "median_ms": median, "runs_ms": runs}));
    }
    drop(p);
    drop(gw);
    let through_bridge = if o.cluster { cluster(&o).await? } else { json!(null) };
    println!(
        "{}",
        json!({"scenario":"history","cluster":through_bridge,"channels":o.channels,"messages":o.messages,"body":o.body,
            "rss_per_entry":rss_per_entry.round(),"counted_per_entry":counted_per_entry.round(),
            "rss_per_channel_first":rss_per_channel_first.round(),"rss_per_channel_full":rss_per_channel_full.round(),
            "recovery":latencies})
    );
    Ok(())
}

/// Times one recovery of `n` messages published to a fresh channel through the
/// cluster; `restart` restarts the bridge between publishing and recovering, so the
/// history comes from Kafka rather than the hot window.
async fn recover_once(
    c: &mut switchboard_tests::cluster::Cluster,
    n: usize,
    channel: &str,
    body: &str,
    restart: bool,
) -> anyhow::Result<f64> {
    use proto::push::v1 as pb;
    let addr = c.gateway(0);
    let secret = switchboard_tests::ws::SECRET;
    let mut a = connect_with(addr, "away", secret).await?;
    a.send(Message::text(json!({"op":"subscribe","channel":channel,"ref":1}).to_string())).await?;
    let position = next_json(&mut a).await?["position"].clone();
    if !position.is_object() {
        bail!("no position in the subscribe ack");
    }
    drop(a);
    let push = proto::push::v1::push_client::PushClient::new(
        tonic::transport::Endpoint::from_shared(c.bridge_url(0))?.connect().await?,
    );
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (mut push, permit) = (push.clone(), permits.clone().acquire_owned().await?);
        let req = pb::PublishRequest {
            channel: channel.into(),
            data_json: json!({"i": i, "b": body}).to_string(),
            ..Default::default()
        };
        tasks.push(tokio::spawn(async move {
            let r = push.publish(req).await;
            drop(permit);
            r.map(|_| ())
        }));
    }
    for t in tasks {
        t.await??;
    }
    if restart {
        c.bridges[0].restart();
        // Wait until the restarted bridge owns the partitions again.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let assigned = super::metric(c.bridges[0].addr("admin"), "switchboard_bridge_assigned_partitions").await?;
            if assigned > 0.0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("the restarted bridge never got its partitions");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    } else {
        // The hot window holds a message once the owning bridge consumed it.
        let deadline = Instant::now() + Duration::from_secs(30);
        while super::metric(c.bridges[0].addr("admin"), "switchboard_bridge_consumed_total").await? < n as f64 {
            if Instant::now() > deadline {
                bail!("the bridge did not consume the burst");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut b = connect_with(addr, "back", secret).await?;
    time_recovery(&mut b, channel, &position, n).await
}

/// Subscribes with `since` = `position` and times the recovery of `n` messages, in ms.
async fn time_recovery(b: &mut Ws, channel: &str, position: &Value, n: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    b.send(Message::text(json!({"op":"subscribe","channel":channel,"since":position,"ref":2}).to_string())).await?;
    let ack = next_json(b).await?;
    if ack["recovered"] != true {
        bail!("not recovered: {ack}");
    }
    let mut got = 0;
    while got < n {
        if next_json(b).await?["type"] == "message" {
            got += 1;
        }
    }
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

/// Recovery latency through broker-bridge: from its hot window and from Kafka.
async fn cluster(o: &Options) -> anyhow::Result<Value> {
    let body = "x".repeat(o.body);
    let mut out = Vec::new();
    for (source, restart) in [("hot", false), ("kafka", true)] {
        for &n in &o.missed {
            let mut runs = Vec::new();
            for run in 0..o.runs {
                // A fresh cluster per run: consumed_total counts from zero, one topic per run.
                // The bridge keeps its port across the restart (the gateway was told it).
                let listen = format!("127.0.0.1:{}", switchboard_tests::cluster::free_port());
                let mut c = switchboard_tests::cluster::Cluster::builder()
                    .bridge_args(&["--listen", &listen])
                    .gateway_args(&["--publish-rate", "1000000", "--publish-burst", "1000000"])
                    .presence(1)
                    .kafka()
                    .bridges(1)
                    .gateways(1)
                    .start()
                    .await;
                let channel = format!("r{n}-{run}");
                runs.push(recover_once(&mut c, n, &channel, &body, restart).await?);
            }
            runs.sort_by(f64::total_cmp);
            let median = runs[runs.len() / 2];
            println!(
                "  recovery of {n:>6} missed messages through the bridge ({source}): median {median:.2} ms of {} runs",
                o.runs
            );
            out.push(json!({"source": source, "missed": n, "median_ms": median, "runs_ms": runs}));
        }
    }
    Ok(json!(out))
}
