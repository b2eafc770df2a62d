//! The internal gRPC APIs (presence, the Push API, gateway delivery) answer only
//! callers with the shared credential; health stays open for probes.

use std::time::Duration;

use proto::presence::v1 as ppb;
use proto::presence::v1::presence_client::PresenceClient;
use proto::push::v1 as pb;
use proto::push::v1::push_client::PushClient;
use serde_json::json;
use switchboard_tests::cluster::Cluster;
use switchboard_tests::eventually;
use switchboard_tests::ws::*;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

fn channel(url: String) -> Channel {
    Endpoint::from_shared(url).unwrap().connect_lazy()
}

fn with_token<T>(mut req: tonic::Request<T>, token: &str) -> tonic::Request<T> {
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_apis_need_the_credential_and_the_cluster_works_with_it() {
    let c = Cluster::builder().internal_token("t0ken").presence(1).kafka().bridges(1).gateways(1).start().await;

    // Presence: refused without the token or with a wrong one, answered with it.
    let mut presence = PresenceClient::new(channel(c.presence_url(0)));
    let anon = presence.online_counts(ppb::OnlineCountsRequest {}).await.unwrap_err();
    assert_eq!(anon.code(), Code::Unauthenticated);
    let wrong = presence.online_counts(with_token(tonic::Request::new(ppb::OnlineCountsRequest {}), "nope")).await;
    assert_eq!(wrong.unwrap_err().code(), Code::Unauthenticated);
    presence.online_counts(with_token(tonic::Request::new(ppb::OnlineCountsRequest {}), "t0ken")).await.unwrap();

    // Health stays open (Kubernetes gRPC probes send no credential).
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(c.presence_url(0)));
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();

    // The bridge's Push API and the gateway's gRPC port refuse anonymous calls.
    let req =
        || pb::PublishRequest { channel: "c".into(), data_json: "1".into(), from: String::new(), ..Default::default() };
    let mut bridge = PushClient::new(channel(c.bridge_url(0)));
    assert_eq!(bridge.publish(req()).await.unwrap_err().code(), Code::Unauthenticated);
    let mut gw_push = PushClient::new(channel(format!("http://{}", c.gateways[0].addr("grpc"))));
    assert_eq!(gw_push.publish(req()).await.unwrap_err().code(), Code::Unauthenticated);

    // With the credential configured everywhere, messages flow end to end.
    let (mut sub, _) = connect(c.gateway(0), "sub").await;
    call(&mut sub, json!({"op":"subscribe","channel":"c"})).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no message went through");
        bridge.publish(with_token(tonic::Request::new(req()), "t0ken")).await.unwrap();
        if tokio::time::timeout(Duration::from_millis(500), recv_type(&mut sub, "message")).await.is_ok() {
            break;
        }
    }
}

/// Mutual TLS on every internal API: a caller without a certificate, with one from
/// another CA, or speaking plain text is refused by presence, the bridge's Push API
/// and the gateway's gRPC port; with certificates from the cluster's CA everywhere,
/// messages flow end to end (gateway → bridge → Kafka → bridge → other gateway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_on_every_internal_api() {
    use switchboard_tests::tls::Pki;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let pki = std::sync::Arc::new(Pki::generate());
    let mut c = Cluster::builder().internal_tls(pki.clone()).presence(1).kafka().bridges(1).gateways(2).start().await;
    let check = || HealthCheckRequest { service: String::new() };
    for url in [c.presence_url(0), c.bridge_url(0), format!("https://{}", c.gateways[0].addr("grpc"))] {
        assert!(url.starts_with("https://"), "{url}");
        for identity in [None, Some("rogue")] {
            let refused = HealthClient::new(pki.channel(&url, identity)).check(check()).await;
            assert!(refused.is_err(), "{url} answered a caller with certificate {identity:?}");
        }
        let plain = HealthClient::new(channel(url.replacen("https", "http", 1))).check(check()).await;
        assert!(plain.is_err(), "{url} answered plain text");
        HealthClient::new(pki.channel(&url, Some("node"))).check(check()).await.expect("served with our certificate");
    }

    // A publish from a client of gateway 0 reaches a subscriber of gateway 1.
    let (mut sub, _) = connect(c.gateway(1), "sub").await;
    call(&mut sub, json!({"op":"subscribe","channel":"tls"})).await;
    let (mut publisher, _) = connect(c.gateway(0), "pub").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no message went through over mutual TLS");
        let ack = call(&mut publisher, json!({"op":"publish","channel":"tls","data":"over mTLS"})).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(500), recv_type(&mut sub, "message")).await {
            assert_eq!(m["data"], "over mTLS");
            break;
        }
    }
    // Replicas found through DNS are verified against the DNS name, not the address it
    // resolved to: the endpoint the gateway builds for them checks the name it is given.
    let tls = kit::grpc::InternalTls::load(
        Some(&pki.path("node.pem")),
        Some(&pki.path("node.key")),
        Some(&pki.path("ca.pem")),
    )
    .unwrap();
    let cred = kit::grpc::Bearer::new(None).unwrap().with_tls(tls.as_ref());
    let health_via = |name: &'static str| {
        let ep = cred.endpoint_named(&c.presence_url(0), Some(name)).unwrap();
        async move { HealthClient::new(ep.connect_lazy()).check(check()).await }
    };
    assert!(health_via("localhost").await.is_ok(), "the certificate names localhost");
    assert!(health_via("elsewhere.example").await.is_err(), "a name the certificate lacks must fail");
    let spec = format!("dns+https://localhost:{}", c.presence_ports[0]);
    let g = c.start_gateway_with(&["--presence-addrs".into(), spec]);
    let (_carol, _) = connect(c.gateway(g), "carol").await;
    let presence = PresenceClient::new(pki.channel(&c.presence_url(0), Some("node")));
    let found = || {
        let mut p = presence.clone();
        async move {
            let r = p.locate_users(ppb::LocateUsersRequest { users: vec!["carol".into()] }).await;
            r.map(|r| r.into_inner().users[0].connections.len()).unwrap_or(0)
        }
    };
    eventually!(found().await == 1, "the gateway did not feed the replica it found through dns+https");

    // And a push from an internal service holding a certificate.
    let mut push = PushClient::new(pki.channel(&c.bridge_url(0), Some("node")));
    let req = pb::PublishRequest {
        channel: "tls".into(),
        data_json: "\"pushed\"".into(),
        from: "ops".into(),
        ..Default::default()
    };
    push.publish(req).await.expect("push with our certificate");
    loop {
        let m = recv_type(&mut sub, "message").await;
        if m["data"] == "pushed" {
            break;
        }
    }
}
