//! The internal gRPC APIs (presence, the Push API, gateway delivery) answer only
//! callers with the shared credential; health stays open for probes.

use std::time::Duration;

use proto::presence::v1 as ppb;
use proto::presence::v1::presence_client::PresenceClient;
use proto::push::v1 as pb;
use proto::push::v1::push_client::PushClient;
use serde_json::json;
use switchboard_tests::cluster::Cluster;
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
    let req = || pb::PublishRequest { channel: "c".into(), data_json: "1".into(), from: String::new() };
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
