//! The Rust client against a real standalone gateway (the binary beside this test), through
//! a TCP proxy that can cut every connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::json;
use switchboard_client::{Client, Error, Event, Options};
use switchboard_tests::cluster::{Cluster, free_port};
use switchboard_tests::kafka::Proxy;
use switchboard_tests::ws::{now, token};
use tokio::sync::mpsc::UnboundedReceiver;

const WAIT: Duration = Duration::from_secs(10);

/// A standalone gateway (no presence, no bridge), torn down on drop.
async fn gateway() -> Cluster {
    Cluster::builder().presence(0).gateways(1).start().await
}

fn options(addr: SocketAddr, user: &'static str, exp: u64, calls: Arc<AtomicU32>) -> Options {
    let mut o = Options::new(vec![format!("ws://{addr}/ws")], move || {
        calls.fetch_add(1, Ordering::Relaxed);
        async move { Ok(token(json!({"sub": user, "exp": now() + exp}))) }
    });
    o.backoff_min = Duration::from_millis(50);
    o.backoff_max = Duration::from_millis(500);
    o
}

/// The next event that is not a presence event, within [`WAIT`].
async fn next(events: &mut UnboundedReceiver<Event>) -> Event {
    loop {
        let e = tokio::time::timeout(WAIT, events.recv()).await.expect("an event in time").expect("the client runs");
        if !matches!(e, Event::Presence(_)) {
            return e;
        }
    }
}

async fn connected(events: &mut UnboundedReceiver<Event>) {
    match next(events).await {
        Event::Connected(w) => assert_eq!(w["type"], "welcome"),
        other => panic!("expected Connected, got {other:?}"),
    }
}

#[tokio::test]
async fn channels_direct_messages_presence_and_history() {
    let gw = gateway().await;
    let addr = gw.gateway(0);
    let (alice, mut a) = Client::connect(options(addr, "alice", 3600, Arc::default()));
    let (bob, mut b) = Client::connect(options(addr, "bob", 3600, Arc::default()));
    connected(&mut a).await;
    connected(&mut b).await;
    let sub = alice.subscribe("room:1").await.expect("subscribe");
    assert!(sub.position.is_some(), "a subscribe answers the channel's position");
    let p1 = bob.publish("room:1", json!({"n": 1})).await.expect("publish");
    let p2 = bob.publish("room:1", json!({"n": 2})).await.expect("publish");
    assert!(p2.seq > p1.seq && !p1.duplicate && !p2.duplicate);
    for (want, p) in [(1, &p1), (2, &p2)] {
        match next(&mut a).await {
            Event::Message(m) => {
                assert_eq!(
                    (m.channel.as_str(), m.from.as_str(), m.seq, m.data["n"].as_i64()),
                    ("room:1", "bob", p.seq, Some(want))
                );
            }
            other => panic!("expected a message, got {other:?}"),
        }
    }
    assert_eq!(alice.presence("room:1").await.expect("presence"), vec!["alice".to_owned()]);
    let h = bob.history("room:1", 10, None).await.expect("history");
    assert_eq!(h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![p1.seq, p2.seq]);
    let id = bob.send("alice", json!({"psst": true})).await.expect("send");
    match next(&mut a).await {
        Event::Direct { id: got, from, data } => {
            assert_eq!((got, from.as_str(), data), (id, "bob", json!({"psst": true})))
        }
        other => panic!("expected a direct message, got {other:?}"),
    }
    // A refused call names its code; the channel is not followed.
    match alice.subscribe("bad channel").await {
        Err(Error::Refused { code, .. }) => assert_eq!(code, "bad_channel"),
        other => panic!("expected bad_channel, got {other:?}"),
    }
    alice.unsubscribe("room:1").await.expect("unsubscribe");
    assert!(alice.presence("room:1").await.expect("presence").is_empty());
    alice.close();
    bob.close();
}

#[tokio::test]
async fn a_cut_connection_reconnects_and_recovers_what_it_missed_once() {
    let gw = gateway().await;
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], free_port())), gw.gateway(0)).await;
    let (sub, mut s) = Client::connect(options(proxy.addr, "sub", 3600, Arc::default()));
    let (publ, mut p) = Client::connect(options(gw.gateway(0), "pub", 3600, Arc::default()));
    connected(&mut s).await;
    connected(&mut p).await;
    sub.subscribe("news").await.expect("subscribe");
    let mut acked = Vec::new();
    for n in 0..5 {
        acked.push(publ.publish("news", json!({"n": n})).await.expect("publish").seq);
    }
    let mut shown = Vec::new();
    while shown.len() < 5 {
        if let Event::Message(m) = next(&mut s).await {
            shown.push(m.seq);
        }
    }
    proxy.cut();
    match next(&mut s).await {
        Event::Disconnected { code, .. } => assert_eq!(code, 1006),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    // Published while the subscriber is away.
    for n in 5..10 {
        acked.push(publ.publish("news", json!({"n": n})).await.expect("publish").seq);
    }
    proxy.restore();
    loop {
        match next(&mut s).await {
            Event::Connected(_) => break,
            Event::Disconnected { .. } => {}
            other => panic!("expected a reconnect, got {other:?}"),
        }
    }
    acked.push(publ.publish("news", json!({"n": 10})).await.expect("publish").seq);
    while shown.len() < acked.len() {
        match next(&mut s).await {
            Event::Message(m) => shown.push(m.seq),
            Event::Gap { .. } => panic!("the recovery must be complete"),
            _ => {}
        }
    }
    assert_eq!(shown, acked, "every message once, in order, across the cut");
    sub.close();
    publ.close();
}

#[tokio::test]
async fn the_token_is_refreshed_before_it_expires_and_the_session_stays() {
    let gw = gateway().await;
    let calls = Arc::new(AtomicU32::new(0));
    // Tokens live 4 s; the client refreshes 3 s before expiry.
    let mut o = options(gw.gateway(0), "carol", 4, calls.clone());
    o.refresh_before = Duration::from_secs(3);
    let (c, mut e) = Client::connect(o);
    connected(&mut e).await;
    c.subscribe("room:2").await.expect("subscribe");
    // Past the first token's expiry (4 s), the session is the same one: no Disconnected.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(ev)) = tokio::time::timeout_at(deadline, e.recv()).await {
            assert!(
                !matches!(ev, Event::Disconnected { .. } | Event::Connected(_)),
                "the session was interrupted: {ev:?}"
            );
        }
    }
    assert!(calls.load(Ordering::Relaxed) >= 2, "the token callback was asked again for the refresh");
    c.publish("room:2", json!({"still": "here"})).await.expect("publish after the first expiry");
    c.close();
}
