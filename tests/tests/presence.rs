//! presence with real gateways: locate, restart, node death, joins and leaves, replicas.

use std::time::Duration;

use proto::presence::v1 as pb;
use proto::presence::v1::presence_client::PresenceClient;
use serde_json::json;
use switchboard_tests::cluster::Cluster;
use switchboard_tests::eventually;
use switchboard_tests::ws::*;
use tonic::transport::Channel;

async fn client(c: &Cluster, i: usize) -> PresenceClient<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(c.presence_url(i)).unwrap().connect_lazy();
    PresenceClient::new(ch)
}

/// (node, conn count) per user, sorted by node.
async fn locate(p: &mut PresenceClient<Channel>, user: &str) -> Vec<String> {
    match p.locate_users(pb::LocateUsersRequest { users: vec![user.into()] }).await {
        Ok(r) => {
            let mut nodes: Vec<String> =
                r.into_inner().users[0].connections.iter().map(|c| c.node_id.clone()).collect();
            nodes.sort();
            nodes
        }
        Err(_) => vec!["<unreachable>".into()],
    }
}

async fn channel_nodes(p: &mut PresenceClient<Channel>, channel: &str) -> Vec<String> {
    match p.channel_nodes(pb::ChannelNodesRequest { channels: vec![channel.into()] }).await {
        Ok(r) => r.into_inner().channels[0].node_ids.clone(),
        Err(_) => vec!["<unreachable>".into()],
    }
}

#[tokio::test]
async fn locate_finds_users_on_the_right_nodes() {
    let c = Cluster::builder().presence(1).gateways(2).start().await;
    let mut p = client(&c, 0).await;
    let (mut a0, _) = connect(c.gateway(0), "alice").await;
    let (_a1, _) = connect(c.gateway(1), "alice").await;
    let (_b, _) = connect(c.gateway(1), "bob").await;
    call(&mut a0, json!({"op":"subscribe","channel":"news"})).await;
    eventually!(locate(&mut p, "alice").await == ["gw0", "gw1"], "alice not on gw0+gw1");
    eventually!(locate(&mut p, "bob").await == ["gw1"], "bob not on gw1");
    eventually!(channel_nodes(&mut p, "news").await == ["gw0"], "news interest missing");
    let nodes = p.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
    assert_eq!(nodes.iter().map(|n| n.node_id.as_str()).collect::<Vec<_>>(), vec!["gw0", "gw1"]);
    // Closing a session removes it.
    a0.close(None).await.unwrap();
    eventually!(locate(&mut p, "alice").await == ["gw1"], "alice's gw0 session still tracked");
    eventually!(channel_nodes(&mut p, "news").await.is_empty(), "interest outlived the session");
}

#[tokio::test]
async fn presence_restart_is_rebuilt_from_the_gateways_and_no_session_drops() {
    let mut c = Cluster::builder().presence(1).gateways(2).start().await;
    let (mut a, _) = connect(c.gateway(0), "alice").await;
    let (mut b, _) = connect(c.gateway(1), "bob").await;
    call(&mut b, json!({"op":"subscribe","channel":"room:r"})).await;
    let mut p = client(&c, 0).await;
    eventually!(locate(&mut p, "bob").await == ["gw1"], "bob not tracked");

    c.presence[0].kill();
    // Gateways keep serving their clients while presence is down.
    assert_eq!(call(&mut a, json!({"op":"ping"})).await["type"], "pong");
    c.start_presence(0);
    let mut p = client(&c, 0).await;
    eventually!(locate(&mut p, "alice").await == ["gw0"], "alice not re-sent after restart");
    eventually!(locate(&mut p, "bob").await == ["gw1"], "bob not re-sent after restart");
    eventually!(channel_nodes(&mut p, "room:r").await == ["gw1"], "interest not re-sent");
    // Both sessions are still the same open sockets.
    assert_eq!(call(&mut a, json!({"op":"ping"})).await["type"], "pong");
    assert_eq!(call(&mut b, json!({"op":"ping"})).await["type"], "pong");
}

#[tokio::test]
async fn a_killed_gateway_vanishes_within_the_lease_and_watch_reports_it() {
    let mut c = Cluster::builder().presence(1).gateways(2).lease("1s").start().await;
    let mut p = client(&c, 0).await;
    let (_a, _) = connect(c.gateway(0), "alice").await;
    let (mut v, _) = connect(c.gateway(1), "victim").await;
    call(&mut v, json!({"op":"subscribe","channel":"room:x"})).await;
    eventually!(locate(&mut p, "victim").await == ["gw1"], "victim not tracked");
    let mut watch = p.watch(pb::WatchRequest { initial_state: false, users: false }).await.unwrap().into_inner();

    let killed = std::time::Instant::now();
    c.gateways[1].kill();
    let down = tokio::time::timeout(WAIT, async {
        loop {
            let ev = watch.message().await.unwrap().expect("watch ended");
            if let Some(pb::watch_event::Event::NodeDown(node)) = ev.event {
                return node;
            }
        }
    })
    .await
    .expect("no node_down event");
    assert_eq!(down, "gw1");
    // Lease 1s plus the expiry tick: well within 3 s.
    assert!(killed.elapsed() < Duration::from_secs(3), "took {:?}", killed.elapsed());
    assert!(locate(&mut p, "victim").await.is_empty());
    assert!(channel_nodes(&mut p, "room:x").await.is_empty());
    assert_eq!(locate(&mut p, "alice").await, ["gw0"]);
}

#[tokio::test]
async fn clients_on_different_gateways_see_join_and_leave_once() {
    let c = Cluster::builder().presence(1).gateways(2).start().await;
    let (mut alice, _) = connect(c.gateway(0), "alice").await;
    call(&mut alice, json!({"op":"subscribe","channel":"room:lobby"})).await;
    assert_eq!(recv_type(&mut alice, "join").await["user"], "alice");
    let (mut bob1, _) = connect(c.gateway(1), "bob").await;
    let (mut bob2, _) = connect(c.gateway(0), "bob").await;
    call(&mut bob1, json!({"op":"subscribe","channel":"room:lobby"})).await;
    let j = recv_type(&mut alice, "join").await;
    assert_eq!(j["user"], "bob");
    call(&mut bob2, json!({"op":"subscribe","channel":"room:lobby"})).await;
    // The presence op answers cluster-wide.
    let mut p = client(&c, 0).await;
    eventually!(
        p.channel_members(pb::ChannelMembersRequest { channel: "room:lobby".into(), after: String::new(), limit: 10 })
            .await
            .map(|r| r.into_inner().total)
            .unwrap_or(0)
            == 2,
        "members not tracked"
    );
    let members = call(&mut alice, json!({"op":"presence","channel":"room:lobby"})).await;
    assert_eq!(members["users"], json!(["alice", "bob"]));
    // bob's first tab leaving is not a leave; the second is.
    bob1.close(None).await.unwrap();
    bob2.close(None).await.unwrap();
    let l = recv_type(&mut alice, "leave").await;
    assert_eq!(l["user"], "bob");
    // Exactly one join and one leave for bob reached alice: nothing else is pending before a pong.
    send_json(&mut alice, json!({"op":"ping","ref":"end"})).await;
    loop {
        let v = recv_json(&mut alice).await;
        assert!(v["type"] != "join" && v["type"] != "leave", "extra presence event {v}");
        if v["ref"] == "end" {
            break;
        }
    }
}

#[tokio::test]
async fn large_rooms_send_counts() {
    let c = Cluster::builder().presence(1).gateways(2).large_room(2).start().await;
    let (mut watcher, _) = connect(c.gateway(0), "watcher").await;
    call(&mut watcher, json!({"op":"subscribe","channel":"room:big"})).await;
    let mut others = Vec::new();
    for i in 0..4 {
        let (mut ws, _) = connect(c.gateway(i % 2), &format!("u{i}")).await;
        call(&mut ws, json!({"op":"subscribe","channel":"room:big"})).await;
        others.push(ws);
    }
    // 5 members: the count frame eventually says 5.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = tokio::time::timeout_at(deadline, recv_type(&mut watcher, "presence_count")).await.expect("no count");
        if v["members"] == 5 {
            break;
        }
    }
}

#[tokio::test]
async fn two_replicas_each_answer_and_a_gateway_started_before_presence_catches_up() {
    let mut c = Cluster::builder().presence(2).gateways(0).start().await;
    // A gateway that cannot reach replica 1 yet still serves and feeds replica 0.
    c.presence[1].kill();
    c.start_gateway();
    let (mut a, _) = connect(c.gateway(0), "alice").await;
    assert_eq!(call(&mut a, json!({"op":"ping"})).await["type"], "pong");
    let mut p0 = client(&c, 0).await;
    eventually!(locate(&mut p0, "alice").await == ["gw0"], "replica 0 not fed");
    c.start_presence(1);
    let mut p1 = client(&c, 1).await;
    eventually!(locate(&mut p1, "alice").await == ["gw0"], "replica 1 did not catch up");
    let (_b, _) = connect(c.gateway(0), "bob").await;
    for p in [&mut p0, &mut p1] {
        eventually!(locate(p, "bob").await == ["gw0"], "a replica missed bob");
    }
}

#[tokio::test]
async fn gateways_discover_replicas_through_dns() {
    // `dns+http://localhost:PORT`: one link per address the name resolves to.
    let mut c = Cluster::builder().presence(1).gateways(0).start().await;
    let spec = format!("dns+http://localhost:{}", c.presence_ports[0]);
    c.start_gateway_with(&["--presence-addrs".into(), spec]);
    let (_a, _) = connect(c.gateway(0), "alice").await;
    let mut p = client(&c, 0).await;
    eventually!(locate(&mut p, "alice").await == ["gw0"], "gateway did not feed the discovered replica");
}
