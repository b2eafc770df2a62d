//! `bench soak`: a bounded soak at steady load with connection churn. Samples
//! every service's RSS, open files and alive tokio tasks, and reports the RSS
//! slope after warm-up. Not part of CI (it runs for minutes); documented in
//! docs/operations.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use proto::push::v1 as pb;
use proto::push::v1::push_client::PushClient;
use switchboard_tests::cluster::Cluster;
use switchboard_tests::ws;

/// A child process killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `bench mock-kafka` with `topic`; returns it and its bootstrap servers.
fn mock_kafka(topic: &str) -> anyhow::Result<(Killed, String)> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["mock-kafka", "--topic", topic])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().ok_or_else(|| anyhow::anyhow!("stdout"))?).read_line(&mut line)?;
    let bootstrap = line.trim().strip_prefix("LISTENING ").ok_or_else(|| anyhow::anyhow!("mock-kafka: {line}"))?;
    Ok((Killed(child), bootstrap.to_owned()))
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at_s: f64,
    rss_kib: u64,
    fds: u64,
    tasks: f64,
}

fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

async fn tasks(admin: std::net::SocketAddr) -> f64 {
    let (_, page) = ws::http_get(admin, "/metrics").await;
    page.lines()
        .find(|l| l.contains("_runtime_alive_tasks ") && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Least-squares slope of y over x.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let num: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    num / den
}

pub(crate) async fn run(
    minutes: u64,
    subscribers: usize,
    rate: u64,
    churn_per_s: usize,
    bridge_args: &[String],
    kafka: &str,
) -> anyhow::Result<()> {
    let mock_topic = format!("soak.{}", std::process::id());
    let mut bridge_args: Vec<&str> = bridge_args.iter().map(String::as_str).collect();
    let mut builder = Cluster::builder();
    // The mock broker lives in a child process (killed on drop) so that its CPU and
    // memory are not counted as the load tool's.
    let mut _mock = None;
    match kafka {
        "tansu" => builder = builder.kafka(),
        "mock" => {
            let (child, bootstrap) = mock_kafka(&mock_topic)?;
            _mock = Some(child);
            builder = builder.external_kafka(&bootstrap);
            bridge_args.extend(["--create-topics", "false", "--topic", &mock_topic]);
        }
        other => anyhow::bail!("--kafka must be tansu or mock, not `{other}`"),
    }
    let mut c = builder
        .bridge_args(&bridge_args)
        .gateway_args(&["--publish-rate", "100000", "--publish-burst", "100000"])
        .presence(1)
        .bridges(1)
        .gateways(2)
        .start()
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let churned = Arc::new(AtomicU64::new(0));
    let gateways: Vec<_> = (0..2).map(|g| c.gateway(g)).collect();

    // Subscribers: each a task; churn closes random ones, which then reconnect.
    let mut subs = Vec::new();
    for i in 0..subscribers {
        let (stop, received, churned, gateways) = (stop.clone(), received.clone(), churned.clone(), gateways.clone());
        let churn_one_in = (subscribers / churn_per_s.max(1)).max(1) as u64;
        subs.push(tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let addr = gateways[(i + round as usize) % gateways.len()];
                let (mut s, _) = ws::connect(addr, &format!("soak{i}")).await;
                ws::call(&mut s, serde_json::json!({"op":"subscribe","channel":format!("soak{}", i % 20)})).await;
                // Stay about `churn_one_in` seconds (so that ~churn_per_s reconnect each second).
                let stay = Duration::from_millis(500 + (i as u64 * 7919 + round * 104_729) % (churn_one_in * 2000));
                let until = tokio::time::Instant::now() + stay;
                while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, s.next()).await {
                    if m.is_text() {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let _ = s.close(None).await;
                churned.fetch_add(1, Ordering::Relaxed);
                round += 1;
            }
        }));
    }

    // Publisher: `rate` messages/s over 20 channels through the bridge.
    let push = PushClient::new(tonic::transport::Endpoint::from_shared(c.bridge_url(0))?.connect().await?);
    let publisher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                for _ in 0..(rate / 100).max(1) {
                    let mut p = push.clone();
                    let req = pb::PublishRequest {
                        channel: format!("soak{}", n % 20),
                        data_json: format!("{{\"n\":{n}}}"),
                        from: "soak".into(),
                        ..Default::default()
                    };
                    tokio::spawn(async move { p.publish(req).await });
                    n += 1;
                }
            }
        })
    };

    let procs: Vec<(String, u32, std::net::SocketAddr)> = c
        .presence
        .iter()
        .chain(c.bridges.iter())
        .chain(c.gateways.iter())
        .map(|p| (p.name.clone(), p.pid(), p.addr("admin")))
        .collect();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); procs.len()];
    let started = Instant::now();
    let end = started + Duration::from_secs(minutes * 60);
    println!("minute  received  churned  {}", procs.iter().map(|p| format!("{:>22}", p.0)).collect::<String>());
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(15).min(end.saturating_duration_since(Instant::now()))).await;
        let mut row = String::new();
        for (i, (_, pid, admin)) in procs.iter().enumerate() {
            let s = Sample {
                at_s: started.elapsed().as_secs_f64(),
                rss_kib: crate::rss_kib(*pid).unwrap_or(0),
                fds: fds(*pid),
                tasks: tasks(*admin).await,
            };
            row.push_str(&format!("{:>9}K {:>4}fd {:>5}t", s.rss_kib, s.fds, s.tasks));
            samples[i].push(s);
        }
        println!(
            "{:>6.1}  {:>8}  {:>7}  {row}",
            started.elapsed().as_secs_f64() / 60.0,
            received.load(Ordering::Relaxed),
            churned.load(Ordering::Relaxed)
        );
    }
    stop.store(true, Ordering::Relaxed);
    publisher.abort();
    for s in subs {
        s.abort();
    }
    // Warm-up: the first fifth of the run is excluded from the slope.
    let mut report = Vec::new();
    for (i, (name, _, _)) in procs.iter().enumerate() {
        let s = &samples[i];
        let warm = s.len() / 5;
        let pts: Vec<(f64, f64)> = s[warm..].iter().map(|x| (x.at_s / 60.0, x.rss_kib as f64)).collect();
        let (first, last) = (s[warm], s[s.len() - 1]);
        let rss_slope = slope(&pts);
        println!(
            "{name}: RSS slope after warm-up {rss_slope:+.1} KiB/min ({} → {} KiB), open files {} → {}, tasks {} → {}",
            first.rss_kib, last.rss_kib, first.fds, last.fds, first.tasks, last.tasks
        );
        report.push(serde_json::json!({"service":name,"rss_slope_kib_per_min":rss_slope,"rss_kib_start":first.rss_kib,
            "rss_kib_end":last.rss_kib,"fds_start":first.fds,"fds_end":last.fds,"tasks_start":first.tasks,"tasks_end":last.tasks}));
    }
    println!(
        "{}",
        serde_json::json!({"scenario":"soak","minutes":minutes,"subscribers":subscribers,"rate":rate,
            "received":received.load(Ordering::Relaxed),"churned":churned.load(Ordering::Relaxed),"services":report})
    );
    c.gateways.clear();
    Ok(())
}
