//! A client that unsubscribes and subscribes again on the same gateway of a cluster is not
//! shown again what it was shown before (found by a chaos run: the bridge's position for a
//! plain subscribe is a watermark up to 250 ms old, and the gateway's hand-over used to
//! read the log from there, showing the last messages a second time).

use std::time::Duration;

use serde_json::json;
use switchboard_tests::cluster::Cluster;
use switchboard_tests::ws::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubscribe_starts_after_what_was_shown_before() {
    let c = Cluster::builder().presence(1).kafka().bridges(1).gateways(1).start().await;
    let (mut publisher, _) = connect(c.gateway(0), "pub").await;
    let (mut sub, _) = connect(c.gateway(0), "sub").await;
    let ack = call(&mut sub, json!({"op":"subscribe","channel":"room:re"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    // Until the route to this gateway is known, probes may go unseen.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last = loop {
        assert!(tokio::time::Instant::now() < deadline, "the subscriber never got a probe");
        let ack = call(&mut publisher, json!({"op":"publish","channel":"room:re","data":{"probe":true}})).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(500), recv_type(&mut sub, "message")).await {
            break m["seq"].as_u64().expect("seq");
        }
    };
    // Drain probes that arrive late.
    while let Ok(m) = tokio::time::timeout(Duration::from_millis(300), recv_type(&mut sub, "message")).await {
        last = m["seq"].as_u64().expect("seq");
    }
    for round in 0..10 {
        for n in 0..5 {
            let ack =
                call(&mut publisher, json!({"op":"publish","channel":"room:re","data":{"round":round,"n":n}})).await;
            assert_eq!(ack["type"], "ack", "{ack}");
        }
        for _ in 0..5 {
            let m = recv_type(&mut sub, "message").await;
            let seq = m["seq"].as_u64().expect("seq");
            assert!(seq > last, "round {round}: seq {seq} after {last}: {m}");
            last = seq;
        }
        let ack = call(&mut sub, json!({"op":"unsubscribe","channel":"room:re"})).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let ack = call(&mut sub, json!({"op":"subscribe","channel":"room:re"})).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let at = ack["position"]["seq"].as_u64().expect("a position");
        assert!(at >= last, "round {round}: the new subscription's position {at} is before what was shown ({last})");
        let next =
            call(&mut publisher, json!({"op":"publish","channel":"room:re","data":{"round":round,"after":true}})).await;
        let m = recv_type(&mut sub, "message").await;
        assert_eq!(m["seq"], next["seq"], "round {round}: the first message after the resubscribe is the new one: {m}");
        last = m["seq"].as_u64().expect("seq");
    }
}
