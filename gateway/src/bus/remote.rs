//! The distributed bus: publishes and direct messages go to broker-bridge's
//! Push API, which stores them in Kafka; they come back to every gateway that
//! needs them through the Delivery stream (see `crate::delivery`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kit::grpc::{Authed, Bearer};
use proto::push::v1 as pb;
use proto::push::v1::push_client::PushClient;

use super::{Accepted, Bus, BusError, BusFuture};

/// Push API clients of every configured bridge.
#[derive(Debug)]
pub struct RemoteBus {
    clients: Vec<PushClient<Authed>>,
    next: AtomicU64,
    timeout: Duration,
}

impl RemoteBus {
    /// `timeout` bounds one call (the bridge's produce timeout plus margin).
    pub fn new(addrs: &[String], timeout: Duration, bearer: &Bearer) -> Result<Self, tonic::transport::Error> {
        let clients = addrs
            .iter()
            .map(|a| {
                let ep = bearer
                    .endpoint(a)?
                    .connect_timeout(Duration::from_secs(1))
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(5));
                Ok(PushClient::new(bearer.channel(ep.connect_lazy())))
            })
            .collect::<Result<Vec<_>, tonic::transport::Error>>()?;
        Ok(Self { clients, next: AtomicU64::new(0), timeout })
    }

    /// Calls bridges in rotation. Fails over only when a bridge could not be
    /// reached at all: once one has answered, its answer stands (retrying a
    /// message another bridge may have stored would duplicate it).
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, BusError>
    where
        F: Fn(PushClient<Authed>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let n = self.clients.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        let mut last = String::from("no broker-bridge configured");
        for i in 0..n {
            let client = self.clients[(start + i) % n].clone();
            match tokio::time::timeout(self.timeout, f(client)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(s)) if s.code() == tonic::Code::InvalidArgument => {
                    return Err(BusError::Invalid(s.message().to_owned()));
                }
                Ok(Err(s)) if s.code() == tonic::Code::Unavailable && !s.message().starts_with("kafka") => {
                    last = s.message().to_owned();
                }
                Ok(Err(s)) => return Err(BusError::Unavailable(s.message().to_owned())),
                Err(_) => return Err(BusError::Unavailable("broker-bridge did not answer in time".into())),
            }
        }
        Err(BusError::Unavailable(format!("no broker-bridge reachable: {last}")))
    }
}

impl Bus for RemoteBus {
    fn publish<'a>(&'a self, channel: &'a str, from: &'a str, data: &'a str) -> BusFuture<'a> {
        Box::pin(async move {
            let r = self
                .call(|mut c| {
                    let req = pb::PublishRequest { channel: channel.into(), data_json: data.into(), from: from.into() };
                    async move { c.publish(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            Ok(Accepted { id: r.id, seq: Some(r.seq), delivered: r.delivered })
        })
    }

    fn send<'a>(&'a self, to: &'a str, from: &'a str, data: &'a str) -> BusFuture<'a> {
        Box::pin(async move {
            let r = self
                .call(|mut c| {
                    let req = pb::SendToUserRequest { user: to.into(), data_json: data.into(), from: from.into() };
                    async move { c.send_to_user(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            Ok(Accepted { id: r.id, seq: None, delivered: r.delivered })
        })
    }

    fn broadcast<'a>(&'a self, from: &'a str, data: &'a str) -> BusFuture<'a> {
        Box::pin(async move {
            let r = self
                .call(|mut c| {
                    let req = pb::BroadcastRequest { data_json: data.into(), from: from.into() };
                    async move { c.broadcast(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            Ok(Accepted { id: r.id, seq: None, delivered: r.delivered })
        })
    }

    fn disconnect<'a>(&'a self, user: &'a str, reason: &'a str) -> BusFuture<'a> {
        Box::pin(async move {
            let r = self
                .call(|mut c| {
                    let req = pb::DisconnectRequest { user: user.into(), reason: reason.into() };
                    async move { c.disconnect(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            Ok(Accepted { id: String::new(), seq: None, delivered: r.closed })
        })
    }
}
