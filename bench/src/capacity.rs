//! `bench capacity`: many concurrent sessions on one machine. Several gateway
//! processes share one port through SO_REUSEPORT (`--reuse-port`; the
//! open-files limit is per process), and several worker processes open the
//! sessions from several 127.0.0.x source addresses and hold them, answering
//! heartbeats, for the whole run. Reports sessions dropped (must be 0), the
//! spread over gateways, and gateway RSS per session.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) connections: usize,
    pub(crate) gateways: usize,
    pub(crate) workers: usize,
    pub(crate) minutes: f64,
    pub(crate) sources: Vec<std::net::IpAddr>,
    pub(crate) heartbeat_interval: String,
}

pub(crate) async fn run(o: Options) -> anyhow::Result<()> {
    if o.connections / o.workers.max(1) > 19_000 {
        bail!("at most 19000 sessions per worker process here (open-files limit): use more --workers");
    }
    let port = free_port()?;
    let mut gateways = Vec::new();
    for g in 0..o.gateways {
        let mut child = Command::new("target/release/gateway")
            .args(["--listen", &format!("127.0.0.1:{port}"), "--reuse-port"])
            .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(["--jwt-hs256-secret", crate::SECRET, "--node-id", &format!("cap{g}")])
            .args(["--heartbeat-interval", &o.heartbeat_interval])
            .env("SWITCHBOARD_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .context("start target/release/gateway (cargo build --release -p gateway)")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let admin: SocketAddr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("admin="))
            .with_context(|| format!("gateway printed `{line}`"))?
            .parse()?;
        gateways.push((Proc(child), admin));
    }
    let sources = o.sources.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let per_worker = o.connections.div_ceil(o.workers);
    let hold_s = (o.minutes * 60.0).round() as u64;
    let started = Instant::now();
    let mut workers: Vec<(Proc, BufReader<ChildStdout>)> = Vec::new();
    for w in 0..o.workers {
        let n = per_worker.min(o.connections - w * per_worker);
        let mut child = Command::new(std::env::current_exe()?)
            .args(["hold", "--addr", &format!("127.0.0.1:{port}"), "--connections", &n.to_string()])
            .args(["--seconds", &hold_s.to_string(), "--prefix", &format!("w{w}-"), "--sources", &sources])
            .stdout(Stdio::piped())
            .spawn()?;
        let out = BufReader::new(child.stdout.take().context("stdout")?);
        workers.push((Proc(child), out));
    }
    let mut opened = 0;
    for (_, out) in &mut workers {
        let mut line = String::new();
        out.read_line(&mut line)?;
        let n: usize = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).with_context(|| line.clone())?;
        opened += n;
    }
    let connect_s = started.elapsed().as_secs_f64();
    println!("{opened} of {} sessions open in {connect_s:.1} s over {} gateways", o.connections, o.gateways);
    println!("minute  sessions (sum of gateways)  per gateway                          gateway RSS MiB");
    let end = Instant::now() + Duration::from_secs(hold_s);
    let mut min_active = f64::INFINITY;
    let last_rss = loop {
        let mut per = Vec::new();
        let mut rss = 0;
        for (p, admin) in &gateways {
            per.push(crate::metric(*admin, "switchboard_gateway_connections_active").await.unwrap_or(f64::NAN));
            rss += crate::rss_kib(p.0.id()).unwrap_or(0);
        }
        let total: f64 = per.iter().sum();
        min_active = min_active.min(total);
        println!(
            "{:>6.1}  {total:>26}  {:<36} {:>15.1}",
            started.elapsed().as_secs_f64() / 60.0,
            format!("{per:?}"),
            rss as f64 / 1024.0
        );
        if Instant::now() + Duration::from_secs(30) > end {
            break rss;
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    };
    let mut results = Vec::new();
    for (_, out) in &mut workers {
        let mut line = String::new();
        out.read_line(&mut line)?;
        let v: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("worker printed `{line}`"))?;
        results.push(v);
    }
    let sum = |k: &str| results.iter().map(|r| r[k].as_u64().unwrap_or(0)).sum::<u64>();
    let (held, dropped, failed, pings) = (sum("held_to_the_end"), sum("dropped"), sum("failed"), sum("pings_answered"));
    let bytes_per_session = last_rss as f64 * 1024.0 / opened.max(1) as f64;
    println!(
        "held to the end {held}, dropped {dropped}, failed to connect {failed}, pings answered {pings}; \
         gateway RSS {:.0} MiB in all ({bytes_per_session:.0} B per session incl. each process's baseline)",
        last_rss as f64 / 1024.0
    );
    println!(
        "{}",
        serde_json::json!({"scenario":"capacity","connections":o.connections,"gateways":o.gateways,
            "workers":o.workers,"minutes":o.minutes,"opened":opened,"connect_s":connect_s,
            "min_active_during_hold":min_active,"held_to_the_end":held,"dropped":dropped,"failed":failed,
            "pings_answered":pings,"gateway_rss_kib":last_rss,"bytes_per_session":bytes_per_session.round()})
    );
    if dropped > 0 || failed > 0 {
        bail!("{dropped} sessions dropped and {failed} failed to connect");
    }
    Ok(())
}
