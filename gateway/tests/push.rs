//! The gRPC Push API of a standalone gateway, with health and reflection.

mod common;

use common::*;
use proto::push::v1 as pb;
use proto::push::v1::push_client::PushClient;
use serde_json::json;
use tonic::Code;

async fn client(gw: &Gateway) -> PushClient<tonic::transport::Channel> {
    PushClient::connect(format!("http://{}", gw.grpc)).await.expect("grpc connect")
}

#[tokio::test]
async fn publish_send_broadcast_reach_the_right_sockets() {
    let gw = Gateway::start(&[]).await;
    let mut push = client(&gw).await;
    let (mut sub, _) = gw.ws("sub").await;
    call(&mut sub, json!({"op":"subscribe","channel":"alerts"})).await;
    let (mut bob1, _) = gw.ws("bob").await;
    let (mut bob2, _) = gw.ws("bob").await;

    let r = push
        .publish(pb::PublishRequest {
            channel: "alerts".into(),
            data_json: r#"{"level":"high"}"#.into(),
            from: "ops".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.delivered, Some(1));
    assert!(r.seq >= 1);
    let m = recv_type(&mut sub, "message").await;
    assert_eq!(
        (m["from"].as_str(), m["data"]["level"].as_str(), m["id"].as_str()),
        (Some("ops"), Some("high"), Some(&*r.id))
    );

    let r = push
        .send_to_user(pb::SendToUserRequest {
            user: "bob".into(),
            data_json: "[1,2]".into(),
            from: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.delivered, Some(2));
    for ws in [&mut bob1, &mut bob2] {
        let m = recv_type(ws, "direct").await;
        assert_eq!((m["from"].as_str(), m["to"].as_str()), (Some("system"), Some("bob")));
        assert_eq!(m["data"], json!([1, 2]));
    }
    // sub got no direct message: its next frame is the broadcast.
    let r = push
        .broadcast(pb::BroadcastRequest { data_json: "\"all\"".into(), from: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.delivered, Some(3));
    for ws in [&mut sub, &mut bob1, &mut bob2] {
        let m = recv_json(ws).await;
        assert_eq!((m["type"].as_str(), m["data"].as_str()), (Some("broadcast"), Some("all")));
    }
}

#[tokio::test]
async fn online_members_and_disconnect() {
    let gw = Gateway::start(&[]).await;
    let mut push = client(&gw).await;
    let mut users = Vec::new();
    for name in ["u1", "u2", "u3", "u4", "u5"] {
        let (mut ws, _) = gw.ws(name).await;
        call(&mut ws, json!({"op":"subscribe","channel":"room:big"})).await;
        users.push(ws);
    }
    let (mut u1_tab2, _) = gw.ws("u1").await;

    let r =
        push.is_online(pb::IsOnlineRequest { users: vec!["u1".into(), "ghost".into()] }).await.unwrap().into_inner();
    assert_eq!((r.users[0].online, r.users[0].connections), (true, 2));
    assert_eq!((r.users[1].online, r.users[1].connections), (false, 0));

    let page1 = push
        .channel_members(pb::ChannelMembersRequest { channel: "room:big".into(), after: String::new(), limit: 2 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (page1.users.clone(), page1.total, page1.next_after.as_str()),
        (vec!["u1".to_owned(), "u2".to_owned()], 5, "u2")
    );
    let page3 = push
        .channel_members(pb::ChannelMembersRequest { channel: "room:big".into(), after: "u4".into(), limit: 2 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((page3.users, page3.next_after), (vec!["u5".to_owned()], String::new()));

    let r = push
        .disconnect(pb::DisconnectRequest { user: "u1".into(), reason: "banned".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.closed, Some(2));
    for ws in [&mut users[0], &mut u1_tab2] {
        let c = expect_close(ws).await;
        assert_eq!((u16::from(c.code), c.reason.as_str()), (4004, "banned"));
    }
    eventually!(
        push.is_online(pb::IsOnlineRequest { users: vec!["u1".into()] }).await.unwrap().into_inner().users[0]
            .connections
            == 0,
        "u1 still online"
    );
}

#[tokio::test]
async fn bad_arguments_are_invalid_argument_with_a_message() {
    let gw = Gateway::start(&["--max-message-bytes", "100"]).await;
    let mut push = client(&gw).await;
    let publish = |channel: &str, data: String| pb::PublishRequest {
        channel: channel.into(),
        data_json: data,
        from: String::new(),
        ..Default::default()
    };
    let send =
        |user: String| pb::SendToUserRequest { user, data_json: "1".into(), from: String::new(), ..Default::default() };
    let cases = [
        push.publish(publish("", "1".into())).await.map(|_| ()),
        push.publish(publish("c", "{not json".into())).await.map(|_| ()),
        push.publish(publish("c", format!("\"{}\"", "x".repeat(200)))).await.map(|_| ()),
        push.send_to_user(send(String::new())).await.map(|_| ()),
        // Users exist only through tokens, so an "unknown" user is a malformed id: too long,
        // or with control characters. (A well-formed id nobody is connected as is accepted
        // with `delivered: 0`, checked below.)
        push.send_to_user(send("u".repeat(129))).await.map(|_| ()),
        push.send_to_user(send("bob\n".into())).await.map(|_| ()),
        push.channel_members(pb::ChannelMembersRequest { channel: "c".into(), after: String::new(), limit: 5000 })
            .await
            .map(|_| ()),
    ];
    for (i, r) in cases.into_iter().enumerate() {
        let status = r.expect_err("must be refused");
        assert_eq!(status.code(), Code::InvalidArgument, "case {i}: {status:?}");
        assert!(!status.message().is_empty());
    }
    let r = push
        .send_to_user(pb::SendToUserRequest {
            user: "nobody".into(),
            data_json: "1".into(),
            from: String::new(),
            ..Default::default()
        })
        .await
        .expect("a well-formed user id is accepted")
        .into_inner();
    assert_eq!(r.delivered, Some(0));
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let gw = Gateway::start(&[]).await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", gw.grpc)).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest { service: "switchboard.push.v1.Push".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(channel);
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("{resp:?}") };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"switchboard.push.v1.Push"), "{names:?}");
}

#[tokio::test]
async fn health_turns_not_serving_for_every_service_during_the_drain() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let gw = Gateway::start(&["--drain-window", "3s"]).await;
    // A session keeps the drain going for its window.
    let (_ws, _) = gw.ws("stays").await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", gw.grpc)).unwrap().connect().await.unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = |service: &'static str| {
        let mut h = health.clone();
        async move {
            h.check(tonic_health::pb::HealthCheckRequest { service: service.into() })
                .await
                .map(|r| r.into_inner().status())
        }
    };
    assert_eq!(status("").await.unwrap(), ServingStatus::Serving);
    gw.shutdown.cancel();
    eventually!(
        status("").await.is_ok_and(|s| s == ServingStatus::NotServing),
        "health of service \"\" still serving during the drain"
    );
    assert_eq!(status("switchboard.push.v1.Push").await.unwrap(), ServingStatus::NotServing);
}

#[tokio::test]
async fn push_api_idempotency_keys() {
    let gw = Gateway::start(&[]).await;
    let mut push = client(&gw).await;
    let req = || pb::PublishRequest {
        channel: "c".into(),
        data_json: "1".into(),
        from: "svc".into(),
        idempotency_key: "job-7".into(),
    };
    let a = push.publish(req()).await.unwrap().into_inner();
    let b = push.publish(req()).await.unwrap().into_inner();
    assert!(!a.duplicate && b.duplicate);
    assert_eq!((a.id, a.seq), (b.id, b.seq));
    let bad = push.publish(pb::PublishRequest { idempotency_key: "x".repeat(129), ..req() }).await;
    assert_eq!(bad.unwrap_err().code(), Code::InvalidArgument);
}
