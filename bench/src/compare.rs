//! `bench compare`: Switchboard and its peers side by side in one run, each
//! server pinned to one core (the load tool should be pinned to the other:
//! `taskset -c 1 bench compare`), every scenario on a fresh server process,
//! medians of `runs`, and ratios against each peer.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

use crate::load::{self, Kind, Target};

/// A server under test, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) const SERVERS: &[&str] =
    &["switchboard", "fastwebsockets", "tungstenite", "node-ws", "bun", "floor", "switchboard-sse", "switchboard-poll"];

/// Bun's binary, from the npm package the test command installs.
const BUN: &str = "node_modules/@oven/bun-linux-x64/bin/bun";

fn spawn(name: &str, core: &str, realtime: bool) -> anyhow::Result<(Server, Kind)> {
    // chrt and taskset exec the server, so the child's pid is the server's.
    let mut cmd = if realtime { Command::new("chrt") } else { Command::new("taskset") };
    if realtime {
        cmd.args(["-r", "1", "taskset"]);
    }
    cmd.args(["-c", core]);
    let kind = match name {
        "switchboard" | "switchboard-sse" | "switchboard-poll" => {
            cmd.args(["target/release/gateway", "--listen", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
                .args(["--admin-addr", "127.0.0.1:0", "--jwt-hs256-secret", crate::SECRET])
                .args(["--publish-rate", "1000000", "--publish-burst", "1000000"])
                .env("SWITCHBOARD_LOG", "warn");
            match name {
                "switchboard-sse" => Kind::Sse,
                "switchboard-poll" => Kind::Poll,
                _ => Kind::Switchboard,
            }
        }
        "fastwebsockets" | "tungstenite" | "floor" => {
            cmd.args(["target/release/peer", name, "0"]);
            Kind::Plain
        }
        "node-ws" => {
            cmd.args(["node", "bench/peers/ws-broadcast.mjs", "0"]);
            Kind::Plain
        }
        "bun" => {
            cmd.args([BUN, "bench/peers/bun-broadcast.mjs", "0"]);
            Kind::Plain
        }
        other => bail!("unknown server `{other}` (known: {})", SERVERS.join(", ")),
    };
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("cannot start {name}"))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    // `LISTENING <port>` (peers) or `LISTENING client=<addr> ...` (gateway).
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("client=").and_then(|a| a.parse().ok()))
        .or_else(|| line.split_whitespace().nth(1)?.parse::<u16>().ok().map(|p| SocketAddr::from(([127, 0, 0, 1], p))))
        .with_context(|| format!("{name} printed `{}`", line.trim()))?;
    Ok((Server { child, addr }, kind))
}

/// One measured figure of one scenario.
type Figures = BTreeMap<&'static str, f64>;

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) servers: Vec<String>,
    pub(crate) runs: usize,
    pub(crate) core: String,
    pub(crate) realtime: bool,
    pub(crate) idle_connections: usize,
    pub(crate) fanout_subscribers: Vec<usize>,
    pub(crate) direct_users: Vec<usize>,
    pub(crate) latency_deliveries_per_s: u64,
    pub(crate) seconds: f64,
    pub(crate) sources: Vec<IpAddr>,
    /// Scenario name prefixes to run (all when empty).
    pub(crate) only: Vec<String>,
}

/// Figures of a saturated run and of a run at a set rate.
const SATURATED: &[&str] =
    &["deliveries_per_s", "deliveries_per_cpu_s", "server_cpu_util", "client_cpu_util", "p99_ms", "lost", "duplicated"];
const AT_RATE: &[&str] =
    &["deliveries_per_s", "p50_ms", "p99_ms", "max_ms", "lost", "server_cpu_util", "client_cpu_util"];

/// The named numeric fields of a result.
fn pick(r: &load::FanoutResult, keys: &[&'static str]) -> anyhow::Result<Figures> {
    let v = serde_json::to_value(r)?;
    keys.iter().map(|k| Ok((*k, v[*k].as_f64().with_context(|| format!("no figure `{k}`"))?))).collect()
}

async fn scenario(name: &str, s: &str, o: &Options) -> anyhow::Result<Figures> {
    let (server, kind) = spawn(s, &o.core, o.realtime)?;
    let pid = server.child.id();
    let t = Target { kind, addr: server.addr, sources: o.sources.clone() };
    let mut f = Figures::new();
    if name == "idle" {
        // At most 48 connections in their handshake per source address: the gateway sheds an
        // address's oldest half-open connection beyond 64 (`--max-pending-per-ip`).
        let r = load::idle(&t, pid, o.idle_connections, 48 * o.sources.len().max(1)).await?;
        f.insert("bytes_per_conn", r.bytes_per_conn);
        f.insert("connects_per_s", r.connects_per_s);
        f.insert("connects_per_cpu_s", o.idle_connections as f64 / r.server_cpu_s);
        f.insert("failed", r.failed as f64);
    } else if let Some(n) = name.strip_prefix("fanout-") {
        let r = load::fanout(&t, pid, false, n.parse()?, 0, o.seconds, 64, 40_000).await?;
        f = pick(&r, SATURATED)?;
    } else if let Some(n) = name.strip_prefix("direct-") {
        // Direct messages to users, round robin, as fast as they are delivered; then at a set rate.
        let n: usize = n.parse()?;
        f = pick(&load::fanout(&t, pid, true, n, 0, o.seconds, 64, 4_000).await?, SATURATED)?;
        drop(server);
        let (server, _) = spawn(s, &o.core, o.realtime)?;
        let t = Target { kind, addr: server.addr, sources: o.sources.clone() };
        let r = load::fanout(&t, server.child.id(), true, n, 10_000, o.seconds, 64, 0).await?;
        f.insert("p99_ms_at_10k_per_s", r.p99_ms);
        f.insert("lost_at_10k_per_s", r.lost as f64);
    } else if let Some(n) = name.strip_prefix("latency-") {
        let n: usize = n.parse()?;
        let rate = (o.latency_deliveries_per_s / n as u64).max(1);
        f = pick(&load::fanout(&t, pid, false, n, rate, o.seconds, 64, 0).await?, AT_RATE)?;
        // Server CPU per delivery at this rate, in microseconds.
        f.insert("cpu_us_per_delivery", f["server_cpu_util"] / f["deliveries_per_s"] * 1e6);
    } else {
        bail!("unknown scenario `{name}`");
    }
    Ok(f)
}

pub(crate) async fn run(o: Options) -> anyhow::Result<()> {
    let mut scenarios = vec!["idle".to_owned()];
    scenarios.extend(o.fanout_subscribers.iter().map(|n| format!("fanout-{n}")));
    scenarios.extend(o.fanout_subscribers.iter().map(|n| format!("latency-{n}")));
    // Direct messages exist only in Switchboard (the peers have no addressing).
    scenarios.extend(o.direct_users.iter().map(|n| format!("direct-{n}")));
    if !o.only.is_empty() {
        scenarios.retain(|sc| o.only.iter().any(|p| sc.starts_with(p.as_str())));
    }
    // scenario → server → figure → values over runs
    let mut all: BTreeMap<String, BTreeMap<String, BTreeMap<&'static str, Vec<f64>>>> = BTreeMap::new();
    for run in 1..=o.runs {
        for sc in &scenarios {
            for s in &o.servers {
                if sc.starts_with("direct-") && s != "switchboard" {
                    continue;
                }
                // A waiting long-poll is measured idle only.
                if sc != "idle" && s == "switchboard-poll" {
                    continue;
                }
                let f = scenario(sc, s, &o).await.with_context(|| format!("{sc} on {s}, run {run}"))?;
                eprintln!("run {run} {sc:<14} {s:<15} {}", serde_json::to_string(&f)?);
                let slot = all.entry(sc.clone()).or_default().entry(s.clone()).or_default();
                for (k, v) in f {
                    slot.entry(k).or_default().push(v);
                }
            }
        }
    }
    let mut json = serde_json::Map::new();
    println!("\nmedians of {} runs, each server pinned to core {}", o.runs, o.core);
    for (sc, servers) in &all {
        println!("\n{sc}");
        let figures: Vec<&str> = servers.values().next().map(|m| m.keys().copied().collect()).unwrap_or_default();
        println!("  {:<15}{}", "server", figures.iter().map(|f| format!("{f:>22}")).collect::<String>());
        let mut medians: BTreeMap<&str, BTreeMap<&str, f64>> = BTreeMap::new();
        for (s, m) in servers {
            let row: BTreeMap<&str, f64> = m.iter().map(|(k, v)| (*k, median(v.clone()))).collect();
            println!("  {s:<15}{}", row.values().map(|v| format!("{v:>22.2}")).collect::<String>());
            medians.insert(s, row);
        }
        if let Some(sb) = medians.get("switchboard") {
            for (s, row) in &medians {
                if *s == "switchboard" {
                    continue;
                }
                let ratios: String = figures
                    .iter()
                    .map(|f| format!("{:>22.2}", sb.get(f).copied().unwrap_or(f64::NAN) / row[f]))
                    .collect();
                println!("  {:<15}{ratios}", format!("sb / {s}"));
            }
        }
        json.insert(sc.clone(), serde_json::to_value(&medians)?);
    }
    println!("{}", serde_json::json!({"scenario":"compare","runs":o.runs,"medians":json}));
    Ok(())
}
