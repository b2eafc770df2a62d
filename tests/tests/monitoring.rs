//! The monitoring against the live services: every metric docs/metrics.md lists is
//! exported from start with exactly its documented type and label values, histograms
//! are histograms, and a real Prometheus scraping a standalone gateway and a cluster
//! that carry traffic answers every dashboard panel and every alert expression.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use switchboard_tests::cluster::{Cluster, Proc, free_port};
use switchboard_tests::monitoring::*;
use switchboard_tests::ws::*;

const LONG: Duration = Duration::from_secs(90);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap()
}

fn docs() -> Vec<DocMetric> {
    let metrics = documented_metrics(&read("docs/metrics.md")).unwrap_or_else(|e| panic!("docs/metrics.md: {e}"));
    assert!(metrics.len() >= 40, "only {} metrics parsed from docs/metrics.md", metrics.len());
    metrics
}

/// The services of a cluster by their docs/metrics.md section.
fn services(c: &Cluster) -> Vec<(&'static str, &Proc)> {
    let mut out: Vec<(&'static str, &Proc)> = c.gateways.iter().map(|p| ("gateway", p)).collect();
    out.extend(c.presence.iter().map(|p| ("presence", p)));
    out.extend(c.bridges.iter().map(|p| ("broker-bridge", p)));
    out
}

async fn scrape(p: &Proc) -> Exposition {
    let (status, body) = http_get(p.addr("admin"), "/metrics").await;
    assert_eq!(status, 200, "{}: /metrics answered {status}", p.name);
    Exposition::parse(&body)
}

/// Every client op, a direct message and channel messages through gateway `gw`, until a
/// subscriber received a publication (in a cluster: through broker-bridge and Kafka, so
/// the delivery and end-to-end histograms have samples). Returns the sessions: the
/// caller keeps them open.
async fn traffic(gw: SocketAddr, tag: &str) -> Vec<Ws> {
    let channel = format!("{tag}-room");
    let (mut sub, _) = connect(gw, &format!("{tag}-sub")).await;
    assert_eq!(call(&mut sub, json!({"op":"subscribe","channel":channel})).await["type"], "ack");
    let (mut publisher, _) = connect(gw, &format!("{tag}-pub")).await;
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "{tag}: no message went through");
        call(&mut publisher, json!({"op":"publish","channel":channel,"data":1})).await;
        if tokio::time::timeout(Duration::from_millis(500), recv_type(&mut sub, "message")).await.is_ok() {
            break;
        }
    }
    call(&mut publisher, json!({"op":"send","user":format!("{tag}-sub"),"data":2})).await;
    call(&mut publisher, json!({"op":"presence","channel":channel})).await;
    call(&mut publisher, json!({"op":"ping"})).await;
    let err = call(&mut publisher, json!({"op":"dance"})).await;
    assert_eq!(err["type"], "error", "{err}");
    call(&mut sub, json!({"op":"unsubscribe","channel":channel})).await;
    assert_eq!(call(&mut sub, json!({"op":"subscribe","channel":channel})).await["type"], "ack");
    vec![sub, publisher]
}

/// Compares one service's export with its docs/metrics.md section. `from_start`: every
/// documented series must be there with every documented label value (registered at
/// zero); otherwise exported label values must be documented ones.
fn check_against_docs(service: &str, e: &Exposition, docs: &[DocMetric], from_start: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let ours: Vec<&DocMetric> = docs.iter().filter(|d| d.service == service).collect();
    let documented: BTreeSet<&str> = ours.iter().map(|d| d.name.as_str()).collect();
    let families: BTreeSet<&str> =
        e.samples.iter().map(|s| family_of(&s.name, &e.types)).filter(|f| f.starts_with("switchboard_")).collect();
    for f in families.difference(&documented) {
        problems.push(format!("{service}: exports {f}, which docs/metrics.md does not list under `## {service}`"));
    }
    for d in ours {
        let Some(kind) = e.types.get(&d.name) else {
            problems.push(format!("{service}: {} (documented) is not exported", d.name));
            continue;
        };
        if kind != &d.kind {
            problems.push(format!("{service}: {} is exported as a {kind}, documented as a {}", d.name, d.kind));
        }
        if d.kind == "histogram" {
            let bucket = format!("{}_bucket", d.name);
            if !e.samples.iter().any(|s| s.name == bucket && s.labels.contains_key("le")) {
                problems.push(format!("{service}: histogram {} has no {bucket} series", d.name));
            }
        }
        let exported = e.label_values(&d.name);
        let doc_labels: BTreeMap<&str, BTreeSet<&str>> =
            d.labels.iter().map(|(l, vs)| (l.as_str(), vs.iter().map(String::as_str).collect())).collect();
        for (label, values) in &exported {
            let Some(listed) = doc_labels.get(label.as_str()) else {
                problems
                    .push(format!("{service}: {} has label `{label}`, which docs/metrics.md does not list", d.name));
                continue;
            };
            let extra: Vec<&String> = values.iter().filter(|v| !listed.contains(v.as_str())).collect();
            if !extra.is_empty() {
                problems.push(format!("{service}: {}{{{label}}} exports undocumented values {extra:?}", d.name));
            }
        }
        if from_start {
            for (label, listed) in &doc_labels {
                let got: BTreeSet<&str> =
                    exported.get(*label).map(|v| v.iter().map(String::as_str).collect()).unwrap_or_default();
                let missing: Vec<&&str> = listed.difference(&got).collect();
                if !missing.is_empty() {
                    problems.push(format!("{service}: {}{{{label}}} lacks {missing:?} at start", d.name));
                }
            }
        }
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_exported_as_documented_from_start_and_after_traffic() {
    let docs = docs();
    let c = Cluster::builder().presence(1).kafka().bridges(1).gateways(1).start().await;
    let mut problems = Vec::new();
    for (service, p) in services(&c) {
        problems.extend(check_against_docs(service, &scrape(p).await, &docs, true));
    }
    assert!(problems.is_empty(), "before any traffic:\n{}", problems.join("\n"));

    let _sessions = traffic(c.gateway(0), "docs").await;
    for (service, p) in services(&c) {
        let e = scrape(p).await;
        problems.extend(check_against_docs(service, &e, &docs, false));
        assert!(!e.samples.iter().any(|s| s.labels.contains_key("quantile")), "{service} exports a summary");
    }
    assert!(problems.is_empty(), "after traffic:\n{}", problems.join("\n"));
    // The cluster path recorded real latencies into the histogram the alert reads.
    let gw = scrape(&c.gateways[0]).await;
    let count = gw.samples.iter().find(|s| s.name == "switchboard_gateway_end_to_end_latency_seconds_count");
    assert!(count.is_some_and(|s| s.value >= 1.0), "no end-to-end latency recorded: {count:?}");
}

/// A real Prometheus, killed and its data removed on drop.
struct Prometheus {
    child: std::process::Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Prometheus {
    /// Scrapes every second; `jobs` are (job, [(target, pod)]), the labels the PodMonitor
    /// gives (job = the pod's app.kubernetes.io/name, pod).
    fn start(jobs: &[(&str, Vec<(SocketAddr, String)>)]) -> Self {
        let dir = std::env::temp_dir().join(format!("switchboard-prom-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = String::from("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n");
        for (job, targets) in jobs {
            config.push_str(&format!("  - job_name: {job}\n    static_configs:\n"));
            for (addr, pod) in targets {
                config.push_str(&format!("      - targets: ['{addr}']\n        labels: {{pod: {pod}}}\n"));
            }
        }
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus (Debian package) must be installed; ./scripts/test.sh installs it");
        Self { child, dir, addr: ([127, 0, 0, 1], port).into() }
    }

    /// The series an instant query returns (empty while Prometheus is not up yet).
    async fn query(&self, expr: &str) -> (Vec<Value>, String) {
        if tokio::net::TcpStream::connect(self.addr).await.is_err() {
            return (Vec::new(), "not listening yet".into());
        }
        let (status, body) = http_get(self.addr, &format!("/api/v1/query?query={}", url_encode(expr))).await;
        let result = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["data"]["result"].as_array().cloned())
            .filter(|_| status == 200)
            .unwrap_or_default();
        (result, format!("{status} {body}"))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every panel query of the dashboard, with Grafana's variables filled in.
fn dashboard_queries() -> Vec<(String, String)> {
    let d: Value = serde_json::from_str(&read("k8s/monitoring/dashboard.json")).unwrap();
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |t| (format!("panel {title:?}"), without_grafana_variables(t["expr"].as_str().unwrap())))
        })
        .collect()
}

/// Every alert of the PrometheusRule: (name, expression).
fn alert_exprs() -> Vec<(String, String)> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, json, yaml\n\
             d = yaml.safe_load(open(sys.argv[1]))\n\
             print(json.dumps([[r['alert'], r['expr']] for g in d['spec']['groups'] for r in g['rules'] if 'alert' in r]))",
        )
        .arg(root().join("k8s/monitoring/prometheusrules.yaml"))
        .output()
        .expect("python3 with PyYAML (./scripts/test.sh installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Metric names the dashboard, the alerts and the HPA use, exactly as written.
fn used_names(exprs: &[String]) -> BTreeSet<String> {
    let mut text = exprs.join("\n");
    text.push_str(&read("k8s/base/horizontalpodautoscalers.yaml"));
    text.match_indices("switchboard_")
        .map(|(i, _)| text[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_answers_every_dashboard_panel_and_alert() {
    let standalone = Cluster::builder().presence(0).gateways(1).start().await;
    let c = Cluster::builder().presence(1).kafka().bridges(1).gateways(1).start().await;
    let prom = Prometheus::start(&[
        (
            "gateway",
            vec![
                (standalone.gateways[0].addr("admin"), "gateway-standalone".into()),
                (c.gateways[0].addr("admin"), "gateway-0".into()),
            ],
        ),
        ("presence", vec![(c.presence[0].addr("admin"), "presence-0".into())]),
        ("broker-bridge", vec![(c.bridges[0].addr("admin"), "broker-bridge-0".into())]),
    ]);
    let mut sessions = traffic(standalone.gateway(0), "alone").await;
    sessions.extend(traffic(c.gateway(0), "cluster").await);

    let mut queries = dashboard_queries();
    assert!(queries.len() >= 10, "{queries:?}");
    let alerts = alert_exprs();
    assert!(alerts.len() >= 9, "{alerts:?}");
    // Exact names: a dashboard or alert reading `x_bucket` needs `x_bucket` exported.
    let mut exported = BTreeSet::new();
    for p in standalone.gateways.iter().chain(&c.gateways).chain(&c.presence).chain(&c.bridges) {
        exported.extend(scrape(p).await.names().into_iter().map(str::to_owned));
    }
    let all: Vec<String> =
        queries.iter().map(|(_, q)| q.clone()).chain(alerts.iter().map(|(_, e)| e.clone())).collect();
    let missing: Vec<String> = used_names(&all).into_iter().filter(|n| !exported.contains(n)).collect();
    assert!(missing.is_empty(), "used by the dashboard, alerts or HPA but not exported: {missing:?}");

    // An alert's threshold does not hold in a healthy test: query what it compares.
    queries.extend(alerts.iter().map(|(name, expr)| (format!("alert {name}"), alert_operand(expr))));
    // The alerts name services by job, as the PodMonitor's jobLabel sets it.
    for job in ["gateway", "presence", "broker-bridge"] {
        queries.push((format!("job {job} up"), format!("up{{job=\"{job}\"}} == 1")));
    }
    queries.push((
        "standalone sessions".into(),
        "switchboard_gateway_connections_active{pod=\"gateway-standalone\"} == 2".into(),
    ));

    // rate() and increase() need two scrapes after the traffic; Prometheus itself takes
    // a few seconds to start on a busy machine.
    let deadline = tokio::time::Instant::now() + LONG;
    let mut pending = queries;
    loop {
        let mut still = Vec::new();
        for (what, q) in pending {
            let (series, raw) = prom.query(&q).await;
            if series.is_empty() {
                still.push((what, q, raw));
            }
        }
        if still.is_empty() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let report: Vec<String> = still.iter().map(|(w, q, raw)| format!("{w}: {q}\n    -> {raw}")).collect();
            panic!("Prometheus returned no series for:\n{}", report.join("\n"));
        }
        pending = still.into_iter().map(|(w, q, _)| (w, q)).collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(sessions);
}
