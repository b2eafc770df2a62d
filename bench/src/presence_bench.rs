//! `bench presence`: memory per tracked connection and LocateUsers throughput.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use proto::presence::v1 as pb;
use proto::presence::v1::presence_client::PresenceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CHUNK: usize = 5000;

pub(crate) async fn run(
    connections: usize,
    nodes: usize,
    bin: PathBuf,
    concurrency: usize,
    batch: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(&bin)
        .args(["--listen", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--lease", "60s"])
        .args(["--max-concurrent", "100000"])
        .env("SWITCHBOARD_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let grpc = line.split_whitespace().find_map(|kv| kv.strip_prefix("grpc=")).context("LISTENING line")?.to_owned();
    let url = format!("http://{grpc}");
    let pid = child.id();
    let result = measure(&url, pid, connections, nodes, concurrency, batch, seconds).await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

async fn measure(
    url: &str,
    pid: u32,
    connections: usize,
    nodes: usize,
    concurrency: usize,
    batch: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?.connect().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = crate::rss_kib(pid)?;
    let per_node = connections / nodes;
    let loaded = Instant::now();
    // Each fake gateway keeps its stream open (holding its lease) until the end.
    let mut keep = Vec::new();
    for n in 0..nodes {
        let (tx, rx) = mpsc::channel::<pb::GatewayMessage>(4);
        let mut client = PresenceClient::new(channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let hello = pb::gateway_message::Msg::Hello(pb::Hello {
            node_id: format!("gw{n}"),
            delivery_addr: format!("127.0.0.1:{}", 7000 + n),
            boot_epoch: 1,
        });
        tx.send(pb::GatewayMessage { msg: Some(hello) }).await?;
        let mut acks = client.sync(ReceiverStream::new(rx)).await?.into_inner();
        acks.message().await?.context("hello ack")?;
        let mut sent = 0;
        while sent < per_node {
            let end = (sent + CHUNK).min(per_node);
            let conns = (sent..end)
                .map(|i| {
                    let k = n * per_node + i;
                    pb::Connection {
                        conn_id: i as u64,
                        user: format!("user{k}"),
                        connected_at_ms: 1_700_000_000_000 + k as u64,
                        client_info: String::new(),
                        channels: vec![format!("topic{}", k % 10_000)],
                    }
                })
                .collect();
            let msg = pb::gateway_message::Msg::Snapshot(pb::SnapshotChunk {
                connections: conns,
                last: end == per_node,
                seq: 1,
            });
            tx.send(pb::GatewayMessage { msg: Some(msg) }).await?;
            sent = end;
        }
        let ack = acks.message().await?.context("snapshot ack")?;
        if ack.seq != 1 {
            bail!("unexpected ack {ack:?}");
        }
        keep.push((tx, acks));
    }
    let load_secs = loaded.elapsed().as_secs_f64();
    let mut q = PresenceClient::new(channel.clone());
    let counts = q.online_counts(pb::OnlineCountsRequest {}).await?.into_inner();
    if counts.connections as usize != per_node * nodes {
        bail!("presence tracks {} connections, expected {}", counts.connections, per_node * nodes);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = crate::rss_kib(pid)?;
    let tracked = per_node * nodes;
    let per_conn = (after.saturating_sub(before) as f64 * 1024.0) / tracked as f64;

    // Queries: `concurrency` loops of LocateUsers over random users.
    let done = Arc::new(AtomicU64::new(0));
    let found = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let mut c = PresenceClient::new(channel.clone());
        let (done, found) = (done.clone(), found.clone());
        tasks.push(tokio::spawn(async move {
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ t as u64;
            while Instant::now() < deadline {
                let users = (0..batch)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        format!("user{}", x % tracked as u64)
                    })
                    .collect();
                let r = c.locate_users(pb::LocateUsersRequest { users }).await?.into_inner();
                done.fetch_add(1, Ordering::Relaxed);
                found.fetch_add(r.users.iter().filter(|u| !u.connections.is_empty()).count() as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let calls = done.load(Ordering::Relaxed);
    let located = found.load(Ordering::Relaxed);
    if located != calls * batch as u64 {
        bail!("{located} of {} users located", calls * batch as u64);
    }
    let qps = calls as f64 / seconds as f64;
    drop(keep);
    println!(
        "scenario   tracked  rss_before_kib  rss_after_kib  bytes_per_conn  load_s  locate_calls/s  users/s  batch  concurrency"
    );
    println!(
        "presence {tracked:>9}  {before:>14}  {after:>13}  {per_conn:>14.0}  {load_secs:>6.1}  {qps:>14.0}  {:>7.0}  {batch:>5}  {concurrency:>11}",
        qps * batch as f64
    );
    println!(
        "{}",
        serde_json::json!({"scenario":"presence","tracked":tracked,"rss_before_kib":before,"rss_after_kib":after,
            "bytes_per_conn":per_conn.round(),"load_s":load_secs,"locate_calls_per_s":qps.round(),
            "users_per_s":(qps*batch as f64).round(),"batch":batch,"concurrency":concurrency})
    );
    Ok(())
}
