//! Backbone faults and configuration, per backbone:
//! - NATS JetStream (file storage) and Redis (AOF on) killed (-9) and restarted under
//!   load: publishes during the outage are refused `unavailable` with a retry hint,
//!   no acknowledged message is lost or shown twice, and delivery resumes without
//!   restarting any Switchboard process. (Kafka's broker faults are in
//!   `broker-bridge/tests/mock_cluster.rs` and the cluster tests' cut proxy: tansu on
//!   memory storage cannot be restarted under live clients.)
//! - Bad configuration: a wrong URL or scheme, an unreachable server, a missing
//!   stream, credentials refused or without permissions: one line on stderr and exit
//!   64, never a hang.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use switchboard_tests::backbone::{Backbone, Server};
use switchboard_tests::cluster::{Cluster, binary, free_port};
use switchboard_tests::ws::*;

const FAST: &[&str] = &["--publish-rate", "100000", "--publish-burst", "100000"];
const LONG: Duration = Duration::from_secs(60);

/// Publishes probes until the subscriber gets one (routing includes its gateway).
async fn settle(publisher: &mut Ws, sub: &mut Ws, channel: &str) {
    let deadline = tokio::time::Instant::now() + LONG;
    for k in 0u64.. {
        assert!(tokio::time::Instant::now() < deadline, "the subscriber never received a probe");
        let ack = call(publisher, json!({"op":"publish","channel":channel,"data":{"probe":k}})).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let got = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                if recv_type(sub, "message").await["data"]["probe"] == k {
                    return;
                }
            }
        })
        .await;
        if got.is_ok() {
            return;
        }
    }
}

async fn restarted_under_load_loses_nothing_acknowledged(backbone: Backbone) {
    let mut c = Cluster::builder()
        .gateway_args(FAST)
        .presence(1)
        .backbone(backbone)
        .bridges(1)
        .bridge_args(&["--produce-timeout", "2s"])
        .gateways(1)
        .start()
        .await;
    let (mut sub, _) = connect(c.gateway(0), "sub").await;
    assert_eq!(call(&mut sub, json!({"op":"subscribe","channel":"feed"})).await["type"], "ack");
    let (mut publisher, _) = connect(c.gateway(0), "pub").await;
    settle(&mut publisher, &mut sub, "feed").await;
    let mut acked = HashSet::new();
    for n in 0..200 {
        let a = call(&mut publisher, json!({"op":"publish","channel":"feed","data":{"n":n}})).await;
        assert_eq!(a["type"], "ack", "{a}");
        acked.insert(a["id"].as_str().unwrap().to_owned());
    }
    c.server.as_mut().unwrap().kill();
    let started = tokio::time::Instant::now();
    let e = call(&mut publisher, json!({"op":"publish","channel":"feed","data":{"during":"outage"}})).await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("unavailable")), "{e}");
    assert!(e["retry_after_ms"].as_u64().is_some(), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10), "the refusal took {:?}", started.elapsed());
    c.server.as_mut().unwrap().restart();
    // The same bridge and gateway take publishes again and deliver them.
    let deadline = tokio::time::Instant::now() + LONG;
    let mut after = 0;
    for n in 1000.. {
        assert!(tokio::time::Instant::now() < deadline, "publishes never recovered after the restart");
        let a = call(&mut publisher, json!({"op":"publish","channel":"feed","data":{"n":n}})).await;
        if a["type"] == "ack" {
            acked.insert(a["id"].as_str().unwrap().to_owned());
            after += 1;
            if after == 50 {
                break;
            }
        }
    }
    // Every acknowledged message arrives once (the outage's refused one may arrive or not).
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + LONG;
    while !acked.is_subset(&seen) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(m) = tokio::time::timeout(left, recv_type(&mut sub, "message")).await else {
            let missing = acked.difference(&seen).count();
            panic!("{missing} of {} acknowledged messages never arrived after the restart", acked.len());
        };
        if m["data"]["probe"].is_null() && m["data"]["during"].is_null() {
            let id = m["id"].as_str().unwrap().to_owned();
            assert!(seen.insert(id.clone()), "{id} shown twice");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_jetstream_restarted_under_load_loses_nothing_acknowledged() {
    restarted_under_load_loses_nothing_acknowledged(Backbone::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_under_load_loses_nothing_acknowledged() {
    restarted_under_load_loses_nothing_acknowledged(Backbone::Redis).await;
}

/// broker-bridge on free loopback ports, no presence replica, errors only in its log, with `args`.
fn spawn_bridge(args: &[&str], stdout: Stdio, stderr: Stdio) -> std::process::Child {
    let mut all =
        vec!["--listen", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--presence-addrs", "http://127.0.0.1:1"];
    all.extend_from_slice(args);
    Command::new(binary("broker-bridge"))
        .args(&all)
        .env("SWITCHBOARD_LOG", "error")
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("spawn broker-bridge")
}

/// Runs broker-bridge with `args`; its exit code and stderr (bounded wait).
fn bridge_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut child = spawn_bridge(args, Stdio::null(), Stdio::piped());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("broker-bridge {args:?} hung instead of exiting");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code(), err)
}

fn exits_64_with_one_line(args: &[&str], mentions: &str) {
    let (code, err) = bridge_exit(args);
    assert_eq!(code, Some(64), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line, got {err:?}");
    assert!(lines[0].contains(mentions), "{args:?}: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_backbone_configuration_exits_64_with_one_line() {
    exits_64_with_one_line(&["--backbone", "amqp://127.0.0.1:5672"], "unknown scheme");
    exits_64_with_one_line(&["--backbone", "nats://127.0.0.1"], "host:port");
    exits_64_with_one_line(&["--backbone", "redis//127.0.0.1:6379"], "--backbone");
    // Nothing listens there: refused at start, within the connect timeout.
    let closed = free_port();
    exits_64_with_one_line(&["--backbone", &format!("nats://127.0.0.1:{closed}")], "nats");
    exits_64_with_one_line(&["--backbone", &format!("redis://127.0.0.1:{closed}")], "redis");
    // A server without the log, and a bridge told not to create it.
    for kind in [Backbone::Nats, Backbone::Redis] {
        let server = Server::start(kind).await;
        let url = server.url();
        exits_64_with_one_line(
            &["--backbone", &url, "--create-topics", "false", "--topic", "missing"],
            "--create-topics",
        );
    }
}

/// Starts a bridge with `args` and waits (bounded) until its `/readyz` answers 200; then
/// stops it.
async fn bridge_becomes_ready(args: &[&str]) {
    use std::io::BufRead;
    let mut child = spawn_bridge(args, Stdio::piped(), Stdio::inherit());
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let admin: std::net::SocketAddr = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("admin="))
        .unwrap_or_else(|| panic!("LISTENING line: {line}"))
        .parse()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if http_get(admin, "/readyz").await.0 == 200 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "broker-bridge {args:?} exited instead of becoming ready");
        assert!(tokio::time::Instant::now() < deadline, "broker-bridge {args:?} never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// One Redis command over RESP on a fresh connection; its reply's first line.
async fn redis_command(addr: std::net::SocketAddr, args: &[&str]) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut s = tokio::io::BufStream::new(tokio::net::TcpStream::connect(addr).await.expect("connect to redis"));
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd += &format!("${}\r\n{a}\r\n", a.len());
    }
    s.write_all(cmd.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    let mut line = String::new();
    s.read_line(&mut line).await.unwrap();
    line.trim_end().to_owned()
}

/// Credentials the backbone refuses what the bridge needs with: a one-line error and exit
/// 64, never a hang. Redis: an ACL user that may read but not write streams; NATS: a user
/// that may not publish (so not use JetStream's API).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_backbone_permissions_exit_64_with_one_line() {
    let redis = Server::start(Backbone::Redis).await;
    let addr = redis.proxy.addr;
    let ok =
        redis_command(addr, &["ACL", "SETUSER", "reader", "on", ">pw", "~*", "&*", "+@read", "+@connection"]).await;
    assert_eq!(ok, "+OK");
    exits_64_with_one_line(&["--backbone", &format!("redis://reader:pw@{addr}")], "redis");
    // Wrong password: refused as well, and the password is not repeated in the message.
    exits_64_with_one_line(&["--backbone", &format!("redis://reader:nope@{addr}")], "redis");
    let (_, err) = bridge_exit(&["--backbone", &format!("redis://reader:nope@{addr}")]);
    assert!(!err.contains("nope"), "{err}");

    let conf = std::env::temp_dir().join(format!("sb-nats-perm-{}.conf", std::process::id()));
    std::fs::write(
        &conf,
        "authorization { users = [ { user: reader, password: pw, permissions: { publish: { deny: \">\" } } }, \
         { user: writer, password: \"p@ss\" } ] }\n",
    )
    .unwrap();
    let nats = Server::start_with(Backbone::Nats, &["-c", conf.to_str().unwrap()]).await;
    let addr = nats.proxy.addr;
    exits_64_with_one_line(&["--backbone", &format!("nats://reader:pw@{addr}")], "nats");
    // The user with the permissions (its password percent-encoded in the URL) gets a bridge
    // that becomes ready: the credentials in the URL are the ones used.
    bridge_becomes_ready(&["--backbone", &format!("nats://writer:p%40ss@{addr}")]).await;
    let redis_writer =
        redis_command(redis.proxy.addr, &["ACL", "SETUSER", "writer", "on", ">w", "~*", "&*", "+@all"]).await;
    assert_eq!(redis_writer, "+OK");
    bridge_becomes_ready(&["--backbone", &format!("redis://writer:w@{}", redis.proxy.addr)]).await;
    exits_64_with_one_line(&["--backbone", &format!("nats://reader:nope@{addr}")], "nats");
    let (_, err) = bridge_exit(&["--backbone", &format!("nats://reader:nope@{addr}")]);
    assert!(!err.contains("nope"), "{err}");
    std::fs::remove_file(&conf).unwrap();
}
