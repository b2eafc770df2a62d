//! The distributed bus: publishes and direct messages go to broker-bridge's
//! Push API, which stores them in Kafka; they come back to every gateway that
//! needs them through the Delivery stream (see `crate::delivery`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kit::grpc::{Authed, Bearer};
use proto::push::v1 as pb;
use proto::push::v1::push_client::PushClient;

use std::sync::Arc;

use super::{Accepted, Bus, BusError, BusFuture, HistoryFuture};
use crate::history::{Item, ItemMeta, Lost, Page, Position};
use crate::{protocol, wire};

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

    /// Calls bridges in rotation. A bridge that could not be reached (the request
    /// never left) is skipped for the next one. Once a request may have reached a
    /// bridge, failing over would store the message twice, so the failure is
    /// ambiguous and stands, unless the call carries an idempotency key: then the
    /// next bridge is asked too, and the key makes the retry safe.
    ///
    /// A keyed call goes first to the bridge the key hashes to, so that a client's
    /// retry through this gateway meets the bridge that remembers the key.
    ///
    /// `f` gets whether the attempt repeats a keyed call that may have been stored
    /// (it then carries `switchboard-retry`, so the message is marked for readers to
    /// look back for an earlier copy: docs/design.md "Keyed duplicates").
    async fn call<T, F, Fut>(&self, key: Option<&str>, f: F) -> Result<T, BusError>
    where
        F: Fn(PushClient<Authed>, bool) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let n = self.clients.len();
        let keyed = key.is_some();
        let start = match key {
            // FNV-1a: stable across processes and releases (unlike the std hasher).
            Some(k) => {
                k.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
                    as usize
            }
            None => self.next.fetch_add(1, Ordering::Relaxed) as usize,
        };
        let mut last = BusError::Unavailable { message: "no broker-bridge configured".into(), ambiguous: false };
        for i in 0..n {
            let client = self.clients[(start + i) % n].clone();
            // Not the bridge the key hashes to: the one that may remember it failed.
            let retry = keyed && i > 0;
            let failure = match tokio::time::timeout(self.timeout, f(client, retry)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(s)) if s.code() == tonic::Code::InvalidArgument => {
                    return Err(BusError::Invalid(s.message().to_owned()));
                }
                Ok(Err(s)) if never_sent(&s) => BusError::Unavailable {
                    message: format!("no broker-bridge reachable: {}", s.message()),
                    ambiguous: false,
                },
                // The bridge took the request: it may have stored the message.
                Ok(Err(s)) => BusError::Unavailable { message: s.message().to_owned(), ambiguous: true },
                Err(_) => {
                    BusError::Unavailable { message: "broker-bridge did not answer in time".into(), ambiguous: true }
                }
            };
            let ambiguous = matches!(failure, BusError::Unavailable { ambiguous: true, .. });
            // An ambiguous failure stays ambiguous even if a later bridge cannot be reached.
            if !matches!(last, BusError::Unavailable { ambiguous: true, .. }) {
                last = failure;
            }
            if ambiguous && !keyed {
                break;
            }
        }
        Err(last)
    }
}

/// The request, with `switchboard-retry: 1` when it repeats a keyed call.
fn marked<T>(msg: T, retry: bool) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if retry {
        req.metadata_mut().insert(kit::idempotency::RETRY_HEADER, tonic::metadata::MetadataValue::from_static("1"));
    }
    req
}

/// Whether a call failed while connecting, before any request was sent.
fn never_sent(s: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    false
}

impl Bus for RemoteBus {
    fn publish<'a>(&'a self, channel: &'a str, from: &'a str, data: &'a str, key: Option<&'a str>) -> BusFuture<'a> {
        Box::pin(async move {
            let r = self
                .call(key, |mut c, retry| {
                    let req = marked(
                        pb::PublishRequest {
                            channel: channel.into(),
                            data_json: data.into(),
                            from: from.into(),
                            idempotency_key: key.unwrap_or_default().into(),
                        },
                        retry,
                    );
                    async move { c.publish(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            Ok(Accepted { id: r.id, seq: Some(r.seq), delivered: r.delivered, duplicate: r.duplicate })
        })
    }

    fn send<'a>(&'a self, to: &'a str, from: &'a str, data: &'a str, key: Option<&'a str>) -> BusFuture<'a> {
        Box::pin(async move {
            let r = self
                .call(key, |mut c, retry| {
                    let req = marked(
                        pb::SendToUserRequest {
                            user: to.into(),
                            data_json: data.into(),
                            from: from.into(),
                            idempotency_key: key.unwrap_or_default().into(),
                        },
                        retry,
                    );
                    async move { c.send_to_user(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            Ok(Accepted { id: r.id, seq: None, delivered: r.delivered, duplicate: r.duplicate })
        })
    }

    fn broadcast<'a>(&'a self, from: &'a str, data: &'a str) -> BusFuture<'a> {
        Box::pin(async move {
            let r = self
                .call(None, |mut c, _| {
                    let req = pb::BroadcastRequest { data_json: data.into(), from: from.into() };
                    async move { c.broadcast(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            Ok(Accepted { id: r.id, seq: None, delivered: r.delivered, duplicate: r.duplicate })
        })
    }

    fn disconnect<'a>(&'a self, user: &'a str, reason: &'a str) -> BusFuture<'a> {
        Box::pin(async move {
            let r = self
                .call(None, |mut c, _| {
                    let req = pb::DisconnectRequest { user: user.into(), reason: reason.into() };
                    async move { c.disconnect(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            Ok(Accepted { id: String::new(), seq: None, delivered: r.closed, duplicate: false })
        })
    }

    fn history<'a>(
        &'a self,
        channel: &'a str,
        since: Option<&'a Position>,
        limit: usize,
        position_only: bool,
    ) -> HistoryFuture<'a> {
        Box::pin(async move {
            // A read stores nothing: every bridge may be asked in turn.
            let r = self
                .call(Some(channel), |mut c, _| {
                    let req = pb::HistoryRequest {
                        channel: channel.into(),
                        since: since.map(|s| pb::Position { seq: s.seq, epoch: s.epoch.to_string() }),
                        limit: limit as u32,
                        position_only,
                    };
                    async move { c.history(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            Ok(page_of(channel, r))
        })
    }
}

/// A bridge's answer as the gateway's page: each message encoded as live subscribers get it.
fn page_of(channel: &str, r: pb::HistoryResponse) -> Page {
    let position = r.position.map(|p| Position { seq: p.seq, epoch: Arc::from(p.epoch) });
    let epoch = position.as_ref().map_or("", |p| &*p.epoch);
    let items = r
        .messages
        .into_iter()
        .map(|m| Item {
            seq: m.seq,
            frame: wire::text(&protocol::message(channel, &m.id, &m.from, m.seq, epoch, &m.data_json)),
            meta: Some(Arc::new(ItemMeta {
                id: m.id,
                from: m.from,
                data: m.data_json,
                published_at_ms: m.published_at_ms,
                idempotent: m.idempotent,
            })),
        })
        .collect();
    Page { items, position, more: r.more, lost: Lost::from_pb(r.lost) }
}
