//! The real `gateway` binary with TLS on the client port: SIGHUP reloads the pair
//! without touching sessions; bad TLS flags exit 64 with one line.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::tls::*;
use common::*;
use serde_json::json;

/// The gateway binary as a child process; killed on drop.
struct Proc {
    child: Child,
    client: SocketAddr,
    admin: SocketAddr,
}

fn command(args: &[String]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.args(["--listen", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(["--jwt-hs256-secret", SECRET])
        .args(args)
        .env("SWITCHBOARD_LOG", "warn");
    cmd
}

impl Proc {
    fn start(args: &[String]) -> Self {
        let mut child = command(args).stdout(Stdio::piped()).spawn().expect("spawn gateway");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("LISTENING line");
        let field = |k: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k))
                .unwrap_or_else(|| panic!("{line}"))
                .parse()
                .unwrap()
        };
        Self { client: field("client="), admin: field("admin="), child }
    }

    fn hangup(&self) {
        let ok = Command::new("kill").args(["-HUP", &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill -HUP failed");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary with bad flags: its exit code and what it wrote to stderr.
fn refused(args: &[String]) -> (Option<i32>, String) {
    let mut child = command(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn gateway");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "gateway did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status.code(), err)
}

#[tokio::test]
async fn sighup_loads_the_new_pair_and_keeps_established_sessions() {
    let pki = Pki::new();
    let (a, a_key) = pki.leaf("cert A", (2040, 1, 1));
    pki.install(&a, &a_key);
    let mut args = pki.args();
    // No file watch: only the signal can reload.
    args.extend(["--tls-reload-interval".into(), "0s".into()]);
    let mut gw = Proc::start(&args);
    let (mut old, _) = wss(&pki, gw.client, "old").await;
    assert_eq!(call_tls(&mut old, json!({"op":"subscribe","channel":"news"})).await["type"], "ack");
    assert_eq!(peer_leaf(&pki.connect(gw.client, &[b"http/1.1"]).await), der(&a));

    let (b, b_key) = pki.leaf("cert B", (2041, 6, 1));
    pki.install(&b, &b_key);
    gw.hangup();
    eventually!(peer_leaf(&pki.connect(gw.client, &[b"http/1.1"]).await) == der(&b), "after SIGHUP, B");
    assert!(gw.child.try_wait().unwrap().is_none(), "SIGHUP does not stop the gateway");
    let (mut new, _) = wss(&pki, gw.client, "new").await;
    assert_eq!(call_tls(&mut new, json!({"op":"publish","channel":"news","data":"m"})).await["type"], "ack");
    assert_eq!(next_of(&mut old, "message").await["data"], "m", "the session made with A still receives");

    // A key that is not B's: refused and reported, B stays.
    pki.install(&b, &a_key);
    gw.hangup();
    let failed = async || {
        let page = http_get(gw.admin, "/metrics").await.1;
        metric(&page, "switchboard_gateway_tls_cert_reloads_total", "outcome=\"failed\"")
    };
    eventually!(failed().await == 1.0, "the mismatched pair is reported");
    assert_eq!(peer_leaf(&pki.connect(gw.client, &[b"http/1.1"]).await), der(&b));
    assert_eq!(call_tls(&mut new, json!({"op":"publish","channel":"news","data":"n"})).await["type"], "ack");
    assert_eq!(next_of(&mut old, "message").await["data"], "n");
}

#[test]
fn bad_tls_flags_exit_64_with_one_line() {
    let pki = Pki::new();
    let (a, a_key) = pki.leaf("cert A", (2040, 1, 1));
    let (_, b_key) = pki.leaf("cert B", (2040, 1, 1));
    pki.install(&a, &b_key);
    let missing = pki.dir.join("missing.pem").display().to_string();
    let cases: [(Vec<String>, &str); 3] = [
        (vec!["--tls-cert".into(), pki.cert_path()], "--tls-cert and --tls-key go together"),
        (vec!["--tls-cert".into(), missing, "--tls-key".into(), pki.key_path()], "cannot read "),
        (pki.args(), "are not a pair"),
    ];
    for (args, want) in cases {
        let (code, err) = refused(&args);
        assert_eq!(code, Some(64), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("gateway: ") && err.contains(want), "{args:?}: {err}");
    }
    // The matching pair starts.
    pki.install(&a, &a_key);
    drop(Proc::start(&pki.args()));
}
