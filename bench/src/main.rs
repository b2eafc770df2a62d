//! `bench`: measures a gateway from the outside, as a separate process.
//!
//! `bench idle`: starts the gateway binary, opens N authenticated connections
//! (each subscribed to one channel), and reports the gateway's RSS per idle
//! connection. Prints a human table and one JSON line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[derive(Debug, Parser)]
#[command(name = "bench", about = "Switchboard load tool")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Judges a history file (one event per line, as `chaos` writes) with the checker.
    CheckHistory { path: PathBuf },
    /// Chaos: a seeded workload and nemesis over a whole cluster (tansu, presence, two
    /// bridges, three gateways, the binaries beside this one), judged by the history
    /// checker; fails when it finds a violation. A seed replays its schedule.
    Chaos {
        #[arg(long, default_value = "60")]
        minutes: u64,
        #[arg(long, default_value = "1")]
        seed: u64,
        /// Where the history goes (one event per line).
        #[arg(long, default_value = "target/chaos-history.jsonl")]
        history: PathBuf,
        /// The bridges' backbone: kafka (tansu), nats (JetStream) or redis (Streams); the
        /// last two are also killed and restarted by the nemesis.
        #[arg(long, default_value = "kafka", value_parser = ["kafka", "nats", "redis"])]
        backbone: String,
        /// SSE clients in the workload (reconnecting with Last-Event-ID).
        #[arg(long, default_value = "2")]
        sse_clients: usize,
        /// Long-poll clients in the workload (each poll on the next gateway).
        #[arg(long, default_value = "2")]
        pollers: usize,
    },
    /// RSS per idle authenticated connection with one subscription.
    Idle {
        /// Connections to open (one process holds at most ~19.9k sockets here).
        #[arg(long, default_value = "10000")]
        connections: usize,
        /// The gateway binary (build it with `cargo build --release -p gateway`).
        #[arg(long, default_value = "target/release/gateway")]
        gateway_bin: PathBuf,
        /// Connections opened concurrently (below the gateway's 64 half-open connections per
        /// address, `--max-pending-per-ip`, beyond which it sheds the oldest).
        #[arg(long, default_value = "50")]
        concurrency: usize,
    },
    /// permessage-deflate: bytes on the wire and gateway CPU per delivery of a typical JSON
    /// chat message, plain and compressed (one gateway run each).
    Deflate {
        #[arg(long, default_value = "target/release/gateway")]
        gateway_bin: PathBuf,
        #[arg(long, default_value = "200")]
        subscribers: usize,
        #[arg(long, default_value = "2000")]
        messages: usize,
    },
    /// Standalone history: memory per entry and per channel, recovery latency.
    History {
        #[arg(long, default_value = "target/release/gateway")]
        gateway_bin: PathBuf,
        #[arg(long, default_value = "10000")]
        channels: usize,
        /// Messages kept per channel.
        #[arg(long, default_value = "100")]
        messages: usize,
        /// Bytes of each message's body.
        #[arg(long, default_value = "64")]
        body: usize,
        /// Missed-message counts to time recovery for, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "100,10000")]
        missed: Vec<usize>,
        #[arg(long, default_value = "5")]
        runs: usize,
        /// Also time recovery through broker-bridge (needs tansu: SWITCHBOARD_TANSU).
        #[arg(long)]
        cluster: bool,
    },
    /// Cluster: a backbone + presence + 1 bridge + 3 gateways; publish-to-socket latency at
    /// set rates, then the publish rate one bridge sustains.
    Cluster {
        /// Subscribers per gateway (all on one channel).
        #[arg(long, default_value = "10")]
        subscribers_per_gateway: usize,
        /// Publish rates to measure latency at (messages/s), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        rates: Vec<u64>,
        /// Seconds per rate.
        #[arg(long, default_value = "10")]
        seconds: u64,
        /// Concurrent publishes in flight for the throughput run.
        #[arg(long, default_value = "512")]
        concurrency: usize,
        /// Extra librdkafka settings for the bridge, `key=value` (repeatable).
        #[arg(long = "kafka-option")]
        kafka_options: Vec<String>,
        /// A Kafka to use instead of starting tansu (e.g. `bench mock-kafka`'s bootstrap).
        #[arg(long)]
        brokers: Option<String>,
        /// The backbones the bridge runs on, in turn, comma-separated: kafka (tansu, or
        /// `--brokers`), nats (a nats-server with JetStream) or redis (a redis-server with
        /// the AOF on); their figures are printed side by side at the end.
        #[arg(long, value_delimiter = ',', default_value = "kafka", value_parser = ["kafka", "nats", "redis"])]
        backbone: Vec<String>,
    },
    /// A bounded soak: steady load with connection churn; RSS slope, open files, tasks.
    Soak {
        #[arg(long, default_value = "30")]
        minutes: u64,
        #[arg(long, default_value = "200")]
        subscribers: usize,
        /// Publishes per second.
        #[arg(long, default_value = "200")]
        rate: u64,
        /// Reconnections per second (churn).
        #[arg(long, default_value = "5")]
        churn_per_s: usize,
        /// Extra broker-bridge flag (repeatable), e.g. `--bridge-arg=--kafka-option=debug=fetch`.
        #[arg(long = "bridge-arg", allow_hyphen_values = true)]
        bridge_args: Vec<String>,
        /// Kafka for the run: `tansu` (the test broker) or `mock` (librdkafka's mock
        /// cluster in a child process; bounded retention, 5 MB per partition).
        #[arg(long, default_value = "mock")]
        kafka: String,
    },
    /// Switchboard and its peers (Node `ws`, bare fastwebsockets, tokio-tungstenite) side
    /// by side: idle memory and connects/s, fanout deliveries per CPU-second, latency at a
    /// set rate. Run it pinned to the other core: `taskset -c 1 bench compare`.
    Compare {
        /// Servers to run (switchboard, fastwebsockets, tungstenite, node-ws, bun, and `floor`: one
        /// write per delivery straight from the reading task, the kernel's cost; also
        /// `switchboard-sse`, the gateway's subscribers on Server-Sent Events streams, and
        /// `switchboard-poll`, idle sessions as waiting long-polls), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "switchboard,fastwebsockets,tungstenite,node-ws,bun,floor")]
        servers: Vec<String>,
        #[arg(long, default_value = "3")]
        runs: usize,
        /// The core every server is pinned to (taskset list).
        #[arg(long, default_value = "0")]
        core: String,
        /// Run servers at real-time priority (`chrt -r 1`): steadier figures on a shared machine.
        #[arg(long)]
        realtime: bool,
        #[arg(long, default_value = "19000")]
        idle_connections: usize,
        /// Subscriber counts for the fanout and latency scenarios.
        #[arg(long, value_delimiter = ',', default_value = "10000,1000")]
        subscribers: Vec<usize>,
        /// Users for the direct-message scenario (Switchboard only), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "10000")]
        direct_users: Vec<usize>,
        /// Deliveries per second of the latency scenarios (publish rate × subscribers).
        #[arg(long, default_value = "50000")]
        latency_rate: u64,
        /// Seconds of publishing per fanout/latency run.
        #[arg(long, default_value = "5")]
        seconds: f64,
        /// Source addresses connections are spread over, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4")]
        sources: Vec<std::net::IpAddr>,
        /// Only the scenarios whose name starts with one of these (idle, fanout, latency,
        /// direct; e.g. `latency-1000`), comma-separated; all when empty.
        #[arg(long, value_delimiter = ',')]
        scenarios: Vec<String>,
    },
    /// Many concurrent sessions on this machine: several gateways share one port
    /// (SO_REUSEPORT), several worker processes hold the sessions from several source
    /// addresses, answering heartbeats; none may be dropped.
    Capacity {
        #[arg(long, default_value = "100000")]
        connections: usize,
        /// Gateway processes sharing the port (each holds at most ~19.3k sessions here).
        #[arg(long, default_value = "6")]
        gateways: usize,
        /// Client worker processes (each holds at most 19k sockets here).
        #[arg(long, default_value = "6")]
        workers: usize,
        /// How long the sessions are held.
        #[arg(long, default_value = "5")]
        minutes: f64,
        #[arg(long, default_value = "25s")]
        heartbeat_interval: String,
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7,127.0.0.8"
        )]
        sources: Vec<std::net::IpAddr>,
    },
    /// A worker of `capacity` (prints READY, then a JSON result).
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        prefix: String,
        #[arg(long, value_delimiter = ',')]
        sources: Vec<std::net::IpAddr>,
    },
    /// Hosts librdkafka's mock cluster (1 broker) with one topic; prints
    /// `LISTENING <bootstrap>` and serves until killed. Used by `soak --kafka mock`.
    MockKafka {
        #[arg(long)]
        topic: String,
        #[arg(long, default_value = "4")]
        partitions: i32,
    },
    /// presence: RSS per tracked connection, then LocateUsers queries per second.
    Presence {
        /// Tracked connections in total (spread over `nodes` fake gateways).
        #[arg(long, default_value = "1000000")]
        connections: usize,
        #[arg(long, default_value = "10")]
        nodes: usize,
        /// The presence binary.
        #[arg(long, default_value = "target/release/presence")]
        presence_bin: PathBuf,
        /// Concurrent query streams.
        #[arg(long, default_value = "32")]
        concurrency: usize,
        /// Users per LocateUsers call.
        #[arg(long, default_value = "1")]
        batch: usize,
        /// How long to run queries.
        #[arg(long, default_value = "5")]
        seconds: u64,
    },
}

const SECRET: &str = "bench-secret";

/// A token for `user` signed with [`SECRET`], valid for an hour.
fn bench_token(user: &str) -> anyhow::Result<String> {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes())?;
    Ok(jsonwebtoken::encode(&jsonwebtoken::Header::default(), &serde_json::json!({"sub": user, "exp": exp}), &key)?)
}

struct Gateway {
    child: Child,
    client: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_gateway(bin: &PathBuf) -> anyhow::Result<Gateway> {
    start_gateway_with(bin, &[])
}

/// Starts the gateway binary on loopback with the bench's secret and `extra` flags.
fn start_gateway_with(bin: &PathBuf, extra: &[&str]) -> anyhow::Result<Gateway> {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(["--jwt-hs256-secret", SECRET])
        .args(extra)
        .env("SWITCHBOARD_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let field = |k: &str| -> anyhow::Result<SocketAddr> {
        Ok(line.split_whitespace().find_map(|kv| kv.strip_prefix(k)).context("LISTENING line")?.parse()?)
    };
    Ok(Gateway { client: field("client=")?, admin: field("admin=")?, child })
}

pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

pub(crate) async fn metric(admin: SocketAddr, name: &str) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    Ok(buf
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0))
}

async fn idle(connections: usize, bin: PathBuf, concurrency: usize) -> anyhow::Result<()> {
    let gw = start_gateway(&bin)?;
    let pid = gw.child.id();
    // Let the runtime settle, then take the baseline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid)?;
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes())?;
    let started = Instant::now();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<anyhow::Result<()>>(connections);
    let hold = std::sync::Arc::new(tokio::sync::Notify::new());
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    for i in 0..connections {
        let claims = serde_json::json!({"sub": format!("user{i}"), "exp": exp});
        let token = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key)?;
        let url = format!("ws://{}/ws", gw.client);
        let (done_tx, hold, permits) = (done_tx.clone(), hold.clone(), permits.clone());
        tokio::spawn(async move {
            let permit = permits.acquire_owned().await;
            let r = async {
                let mut req = url.into_client_request()?;
                req.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
                let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
                ws.next().await.context("welcome")??;
                ws.send(Message::text(format!(r#"{{"op":"subscribe","channel":"c{}","ref":1}}"#, i % 1000))).await?;
                ws.next().await.context("ack")??;
                anyhow::Ok(ws)
            }
            .await;
            drop(permit);
            match r {
                Ok(mut ws) => {
                    let _ = done_tx.send(Ok(())).await;
                    // Stay connected (answering pings) until told to stop.
                    let wait = hold.notified();
                    tokio::pin!(wait);
                    loop {
                        tokio::select! {
                            () = &mut wait => break,
                            m = ws.next() => if m.is_none() { break },
                        }
                    }
                }
                Err(e) => {
                    let _ = done_tx.send(Err(e)).await;
                }
            }
        });
    }
    drop(done_tx);
    for n in 0..connections {
        match tokio::time::timeout(Duration::from_secs(60), done_rx.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => bail!("connection {n} failed: {e:#}"),
            Ok(None) | Err(_) => bail!("only {n} of {connections} connections opened"),
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let active = metric(gw.admin, "switchboard_gateway_connections_active").await?;
    if active as usize != connections {
        bail!("gateway reports {active} active connections, expected {connections}");
    }
    // Let allocations settle (first heartbeat tick excluded: default interval is 25 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid)?;
    let per_conn = (after.saturating_sub(before) as f64 * 1024.0) / connections as f64;
    hold.notify_waiters();
    println!("scenario      connections  rss_before_kib  rss_after_kib  bytes_per_conn  connect_s");
    println!("idle          {connections:>11}  {before:>14}  {after:>13}  {per_conn:>14.0}  {connect_secs:>9.2}");
    println!(
        "{}",
        serde_json::json!({"scenario":"idle","connections":connections,"rss_before_kib":before,
            "rss_after_kib":after,"bytes_per_conn":per_conn.round(),"connect_s":connect_secs})
    );
    Ok(())
}

mod capacity;
mod cluster_bench;
mod compare;
mod deflate_bench;
mod history_bench;
mod httpclient;
mod load;
mod presence_bench;
mod soak;
mod wsclient;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Load runs hold up to ~19.9k sockets: raise the soft open-files limit to the hard one.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.scenario {
        Scenario::CheckHistory { path } => {
            use switchboard_tests::checker;
            let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
            let report = checker::check(&checker::parse(&text).map_err(anyhow::Error::msg)?);
            print!("{report}");
            anyhow::ensure!(report.is_clean(), "{} violations", report.violations.len());
            Ok(())
        }
        Scenario::Chaos { minutes, seed, history, backbone, sse_clients, pollers } => rt.block_on(async {
            use switchboard_tests::{backbone::Backbone, chaos};
            let mut cfg = chaos::Config::new(seed, std::time::Duration::from_secs(minutes * 60));
            cfg.sse_clients = sse_clients;
            cfg.pollers = pollers;
            cfg.backbone = match backbone.as_str() {
                "nats" => Backbone::Nats,
                "redis" => Backbone::Redis,
                _ => Backbone::Kafka,
            };
            let summary = chaos::run(&cfg).await;
            std::fs::write(&history, &summary.history).with_context(|| format!("write {}", history.display()))?;
            println!("{summary}history: {}", history.display());
            anyhow::ensure!(summary.report.is_clean(), "seed {seed}: {} violations", summary.report.violations.len());
            Ok(())
        }),
        Scenario::Idle { connections, gateway_bin, concurrency } => {
            rt.block_on(idle(connections, gateway_bin, concurrency))
        }
        Scenario::History { gateway_bin, channels, messages, body, missed, runs, cluster } => {
            rt.block_on(history_bench::run(history_bench::Options {
                cluster,
                gateway_bin,
                channels,
                messages,
                body,
                missed,
                runs,
            }))
        }
        Scenario::Deflate { gateway_bin, subscribers, messages } => {
            rt.block_on(deflate_bench::run(deflate_bench::Options { gateway_bin, subscribers, messages }))
        }
        Scenario::Soak { minutes, subscribers, rate, churn_per_s, bridge_args, kafka } => {
            rt.block_on(soak::run(minutes, subscribers, rate, churn_per_s, &bridge_args, &kafka))
        }
        Scenario::Compare {
            servers,
            runs,
            core,
            realtime,
            idle_connections,
            subscribers,
            direct_users,
            latency_rate,
            seconds,
            sources,
            scenarios,
        } => rt.block_on(compare::run(compare::Options {
            servers,
            runs,
            core,
            realtime,
            idle_connections,
            fanout_subscribers: subscribers,
            direct_users,
            latency_deliveries_per_s: latency_rate,
            seconds,
            sources,
            only: scenarios,
        })),
        Scenario::Capacity { connections, gateways, workers, minutes, heartbeat_interval, sources } => {
            rt.block_on(capacity::run(capacity::Options {
                connections,
                gateways,
                workers,
                minutes,
                sources,
                heartbeat_interval,
            }))
        }
        Scenario::Hold { addr, connections, seconds, prefix, sources } => rt.block_on(async {
            let t = load::Target { kind: load::Kind::Switchboard, addr, sources };
            let r = load::hold_many(&t, connections, seconds, &prefix).await?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }),
        Scenario::MockKafka { topic, partitions } => {
            let mock = rdkafka::mocking::MockCluster::new(1)?;
            mock.create_topic(&topic, partitions, 1)?;
            println!("LISTENING {}", mock.bootstrap_servers());
            loop {
                std::thread::park();
            }
        }
        Scenario::Cluster {
            subscribers_per_gateway,
            rates,
            seconds,
            concurrency,
            kafka_options,
            brokers,
            backbone,
        } => rt.block_on(cluster_bench::run(
            subscribers_per_gateway,
            rates,
            seconds,
            concurrency,
            kafka_options,
            brokers,
            &backbone,
        )),
        Scenario::Presence { connections, nodes, presence_bin, concurrency, batch, seconds } => {
            rt.block_on(presence_bench::run(connections, nodes, presence_bin, concurrency, batch, seconds))
        }
    }
}
