//! The backend push examples (examples/push: Node with @grpc/grpc-js, Python with grpcio)
//! against a real standalone gateway's Push API: what each says it did is checked on a
//! subscribed WebSocket client and in its own output.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};
use switchboard_tests::cluster::Cluster;
use switchboard_tests::ws::*;

/// A standalone gateway (no presence, no bridge), torn down on drop.
async fn gateway() -> Cluster {
    Cluster::builder().presence(0).gateways(1).start().await
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("the repository").to_path_buf()
}

/// Runs an example to the end; its one JSON line of output.
fn run(program: &str, script: &str, grpc: &str) -> Value {
    let out = Command::new(program)
        .arg(repo().join(script))
        .args([grpc, "room:1", "alice"])
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("run {program} {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{script} failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{script} printed {stdout:?}: {e}"))
}

async fn example(program: &str, script: &str, lang: &str) {
    let gw = gateway().await;
    let (mut alice, _) = connect(gw.gateway(0), "alice").await;
    let ack = call(&mut alice, json!({"op":"subscribe","channel":"room:1","ref":"s"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let grpc = gw.gateways[0].addr("grpc").to_string();
    let said = tokio::task::spawn_blocking({
        let (p, s) = (program.to_owned(), script.to_owned());
        move || run(&p, &s, &grpc)
    })
    .await
    .unwrap();
    assert_eq!(said["online"], json!({"alice": true, "nobody": false}), "{said}");
    assert_eq!(said["members"], json!(["alice"]), "{said}");
    let m = recv_type(&mut alice, "message").await;
    assert_eq!((m["channel"].clone(), m["data"].clone()), (json!("room:1"), json!({"text": format!("from {lang}")})));
    assert_eq!(m["id"], said["published"]["id"], "{said}");
    assert_eq!(m["seq"], said["published"]["seq"], "{said}");
    assert_eq!(m["from"], format!("{lang}-backend"));
    let d = recv_type(&mut alice, "direct").await;
    assert_eq!(
        (d["data"].clone(), d["id"].clone()),
        (json!({"notice": format!("from {lang}")}), said["sent"]["id"].clone())
    );
}

#[tokio::test]
async fn the_node_example_publishes_sends_and_asks_presence() {
    example("node", "examples/push/push.mjs", "node").await;
}

#[tokio::test]
async fn the_python_example_publishes_sends_and_asks_presence() {
    example("python3", "examples/push/push.py", "python").await;
}
