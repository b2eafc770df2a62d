//! `bench cluster`: end-to-end latency and bridge throughput through the backbone.
//!
//! Starts the backbone (`--backbone`: tansu, nats-server or redis-server, behind the harness proxy), presence, one broker-bridge and three
//! gateways (release binaries next to this one), puts subscribers on one channel
//! spread over the gateways, publishes through the bridge's Push API with a send
//! timestamp, and measures at each subscriber: latency, lost, duplicated.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use futures_util::StreamExt;
use proto::push::v1 as pb;
use proto::push::v1::push_client::PushClient;
use switchboard_tests::cluster::Cluster;
use switchboard_tests::ws;
use tokio::sync::{Mutex, Semaphore};
use tokio_tungstenite::tungstenite::Message;

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    seen: std::collections::HashSet<u64>,
    dups: u64,
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Every backbone of `backbones` in turn (each a fresh cluster), then their figures side
/// by side.
pub(crate) async fn run(
    per_gw: usize,
    rates: Vec<u64>,
    seconds: u64,
    concurrency: usize,
    kafka_options: Vec<String>,
    brokers: Option<String>,
    backbones: &[String],
) -> anyhow::Result<()> {
    let mut all = Vec::new();
    for backbone in backbones {
        let rows = one(per_gw, &rates, seconds, concurrency, &kafka_options, &brokers, backbone).await?;
        all.push((backbone.clone(), rows));
    }
    println!("\nside by side (3 gateways x {per_gw} subscribers, one bridge)");
    println!(
        "{:<8} {:<16} {:>11} {:>12} {:>8} {:>8} {:>6} {:>6} {:>11}",
        "backbone", "scenario", "rate_target", "acked/s", "p50_ms", "p99_ms", "lost", "dups", "ack_p99_ms"
    );
    for (backbone, rows) in &all {
        for r in rows {
            let target = match r["rate_target"].as_u64() {
                Some(0) | None => "max".to_owned(),
                Some(n) => n.to_string(),
            };
            println!(
                "{backbone:<8} {:<16} {target:>11} {:>12.0} {:>8.1} {:>8.1} {:>6} {:>6} {:>11.1}",
                r["scenario"].as_str().unwrap_or(""),
                r["acked_per_s"].as_f64().unwrap_or(f64::NAN),
                r["p50_ms"].as_f64().unwrap_or(f64::NAN),
                r["p99_ms"].as_f64().unwrap_or(f64::NAN),
                r["lost"].as_u64().unwrap_or(0),
                r["dups"].as_u64().unwrap_or(0),
                r["ack_p99_ms"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    let json: serde_json::Map<String, serde_json::Value> =
        all.into_iter().map(|(b, rows)| (b, serde_json::Value::Array(rows))).collect();
    println!("{}", serde_json::json!({"scenario":"cluster","backbones":json}));
    Ok(())
}

async fn one(
    per_gw: usize,
    rates: &[u64],
    seconds: u64,
    concurrency: usize,
    kafka_options: &[String],
    brokers: &Option<String>,
    backbone: &str,
) -> anyhow::Result<Vec<serde_json::Value>> {
    use switchboard_tests::backbone::Backbone;
    let bridge_args: Vec<String> =
        kafka_options.iter().flat_map(|o| ["--kafka-option".to_owned(), o.clone()]).collect();
    let bridge_args: Vec<&str> = bridge_args.iter().map(String::as_str).collect();
    let builder = Cluster::builder().bridge_args(&bridge_args);
    let builder = match (backbone, brokers) {
        ("nats", _) => builder.backbone(Backbone::Nats),
        ("redis", _) => builder.backbone(Backbone::Redis),
        (_, Some(b)) => builder.external_kafka(b),
        (_, None) => builder.kafka(),
    };
    println!("backbone: {backbone}");
    let c = builder
        .gateway_args(&["--publish-rate", "1000000", "--publish-burst", "1000000", "--send-queue", "65536"])
        .presence(1)
        .bridges(1)
        .gateways(3)
        .start()
        .await;
    let channel = "bench";
    let mut tallies = Vec::new();
    let mut readers = Vec::new();
    for g in 0..3 {
        for k in 0..per_gw {
            let (mut s, _) = ws::connect(c.gateway(g), &format!("sub{g}-{k}")).await;
            let ack = ws::call(&mut s, serde_json::json!({"op":"subscribe","channel":channel})).await;
            if ack["type"] != "ack" {
                bail!("subscribe failed: {ack}");
            }
            let tally = Arc::new(Mutex::new(Tally::default()));
            tallies.push(tally.clone());
            readers.push(tokio::spawn(async move {
                while let Some(Ok(m)) = s.next().await {
                    let Message::Text(t) = m else { continue };
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) else { continue };
                    if v["type"] != "message" {
                        continue;
                    }
                    let (Some(n), Some(ts)) = (v["data"]["n"].as_u64(), v["data"]["t"].as_u64()) else { continue };
                    let lat = now_us().saturating_sub(ts);
                    let mut t = tally.lock().await;
                    if t.seen.insert(n) {
                        t.latencies_us.push(lat);
                    } else {
                        t.dups += 1;
                    }
                }
            }));
        }
    }
    let push = PushClient::new(tonic::transport::Endpoint::from_shared(c.bridge_url(0))?.connect().await?);
    // Routing warm-up: publish probes until every subscriber has one.
    let next = Arc::new(AtomicU64::new(1_000_000_000));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        let mut p = push.clone();
        p.publish(pb::PublishRequest {
            channel: channel.into(),
            data_json: format!("{{\"n\":{n},\"t\":{}}}", now_us()),
            from: "bench".into(),
            ..Default::default()
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut all = true;
        for t in &tallies {
            all &= !t.lock().await.seen.is_empty();
        }
        if all {
            break;
        }
        if Instant::now() > deadline {
            bail!("subscribers never all received a probe");
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let subs = tallies.len();
    println!(
        "scenario          rate_target  sent   acked  deliveries  lost  dups  p50_ms  p99_ms  max_ms  subscribers  ack_p50_ms  ack_p99_ms"
    );
    let mut json_rows = Vec::new();
    let mut base = 0u64;
    for rate in rates.iter().copied().chain(std::iter::once(0)) {
        for t in &tallies {
            let mut t = t.lock().await;
            *t = Tally::default();
        }
        let total = if rate == 0 { u64::MAX } else { rate * seconds };
        let started = Instant::now();
        let stop_at = started + Duration::from_secs(seconds);
        let sem = Arc::new(Semaphore::new(if rate == 0 { concurrency } else { 4096 }));
        let acked = Arc::new(AtomicU64::new(0));
        let ack_us = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut sent = 0u64;
        let tick = Duration::from_millis(5);
        let mut ticker = tokio::time::interval(tick);
        while Instant::now() < stop_at && sent < total {
            let burst = if rate == 0 { concurrency as u64 } else { (rate * tick.as_millis() as u64 / 1000).max(1) };
            if rate != 0 {
                ticker.tick().await;
            }
            for _ in 0..burst {
                let permit = sem.clone().acquire_owned().await?;
                let n = base + sent;
                sent += 1;
                let mut p = push.clone();
                let acked = acked.clone();
                let ack_us = ack_us.clone();
                tokio::spawn(async move {
                    let t0 = Instant::now();
                    let req = pb::PublishRequest {
                        channel: "bench".into(),
                        data_json: format!("{{\"n\":{n},\"t\":{}}}", now_us()),
                        from: "bench".into(),
                        ..Default::default()
                    };
                    if p.publish(req).await.is_ok() {
                        acked.fetch_add(1, Ordering::Relaxed);
                        ack_us.lock().unwrap_or_else(|e| e.into_inner()).push(t0.elapsed().as_micros() as u64);
                    }
                    drop(permit);
                });
            }
        }
        // Wait for in-flight publishes, then for deliveries to settle.
        let _ = sem.acquire_many(if rate == 0 { concurrency as u32 } else { 4096 }).await?;
        let elapsed = started.elapsed().as_secs_f64();
        let acked_n = acked.load(Ordering::Relaxed);
        let settle = Instant::now() + Duration::from_secs(30);
        loop {
            let mut done = true;
            for t in &tallies {
                done &= t.lock().await.seen.len() as u64 >= acked_n;
            }
            if done || Instant::now() > settle {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut all = Vec::new();
        let (mut lost, mut dups, mut deliveries) = (0u64, 0u64, 0u64);
        for t in &tallies {
            let t = t.lock().await;
            lost += acked_n.saturating_sub(t.seen.len() as u64);
            dups += t.dups;
            deliveries += t.seen.len() as u64;
            all.extend_from_slice(&t.latencies_us);
        }
        all.sort_unstable();
        let (p50, p99, max) = (pct(&all, 0.5), pct(&all, 0.99), all.last().map_or(f64::NAN, |m| *m as f64 / 1000.0));
        let mut acks = std::mem::take(&mut *ack_us.lock().unwrap_or_else(|e| e.into_inner()));
        acks.sort_unstable();
        let (ack_p50, ack_p99) = (pct(&acks, 0.5), pct(&acks, 0.99));
        let name = if rate == 0 { "max-throughput" } else { "fixed-rate" };
        let target = if rate == 0 { "max".to_owned() } else { rate.to_string() };
        println!(
            "{name:<16}  {target:>11}  {sent:>5}  {acked_n:>6}  {deliveries:>10}  {lost:>4}  {dups:>4}  {p50:>6.1}  {p99:>6.1}  {max:>6.1}  {subs:>11}  {ack_p50:>10.1}  {ack_p99:>10.1}"
        );
        json_rows.push(serde_json::json!({"scenario":name,"rate_target":rate,"sent":sent,"acked":acked_n,
            "acked_per_s": acked_n as f64 / elapsed, "deliveries":deliveries,"lost":lost,"dups":dups,
            "p50_ms":p50,"p99_ms":p99,"max_ms":max,"subscribers":subs,
            "ack_p50_ms":ack_p50,"ack_p99_ms":ack_p99}));
        if rate == 0 {
            println!(
                "bridge sustained {:.0} publishes/s ({:.0} socket deliveries/s)",
                acked_n as f64 / elapsed,
                deliveries as f64 / elapsed
            );
        }
        base += sent;
    }
    for r in readers {
        r.abort();
    }
    drop(c);
    Ok(json_rows)
}
