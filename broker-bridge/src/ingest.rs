//! Publish: the Push API served by broker-bridge. Each message gets its id,
//! goes to Kafka keyed by its target, and is acknowledged only once Kafka has
//! stored it; otherwise the caller gets UNAVAILABLE (retryable) within the
//! produce timeout.
//!
//! Idempotency keys: a publish or send with a key gets an id derived from
//! (method, from, key), so that a retry stored again by another bridge carries
//! the same id and gateways drop it by id; on this bridge, a retry within the
//! window is answered from the first call (or waits for it) and stored once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prost::Message;
use proto::bridge::v1::{Envelope, envelope};
use proto::presence::v1 as ppb;
use proto::presence::v1::presence_client::PresenceClient;
use proto::push::v1 as pb;
use proto::push::v1::push_server::Push;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Debug for the producer holder (librdkafka handles are opaque).
impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").field("generation", &self.current.read().0).finish()
    }
}
use kit::grpc::Authed;
use kit::idempotency::Idempotency;
use serde_json::value::RawValue;
use tonic::{Request, Response, Status};

use crate::metrics as m;

const PAGE_MAX: usize = 1000;

/// Unique message ids: bridge id, boot time, counter.
#[derive(Debug)]
pub struct Ids {
    prefix: String,
    next: AtomicU64,
}

impl Ids {
    pub fn new(bridge_id: &str) -> Self {
        let boot_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Self { prefix: format!("{bridge_id}-{boot_ms:x}"), next: AtomicU64::new(1) }
    }

    pub fn next(&self) -> String {
        format!("{}-{:x}", self.prefix, self.next.fetch_add(1, Ordering::Relaxed))
    }
}

/// The producer, replaced when librdkafka reports a fatal idempotence error
/// (e.g. the broker fenced our producer epoch after a timeout): such a producer
/// refuses every later message until it is recreated.
pub struct Producer {
    current: parking_lot::RwLock<(u64, FutureProducer)>,
    config: rdkafka::ClientConfig,
}

impl Producer {
    pub fn new(config: rdkafka::ClientConfig) -> rdkafka::error::KafkaResult<Self> {
        let p = config.create()?;
        Ok(Self { current: parking_lot::RwLock::new((0, p)), config })
    }

    fn get(&self) -> (u64, FutureProducer) {
        self.current.read().clone()
    }

    /// Recreates the producer unless another caller already did since `generation`.
    fn recreate(&self, generation: u64) {
        let mut cur = self.current.write();
        if cur.0 != generation {
            return;
        }
        match self.config.create() {
            Ok(p) => {
                tracing::warn!("kafka producer recreated after a fatal error");
                metrics::counter!(m::PRODUCER_RESETS).increment(1);
                *cur = (generation + 1, p);
            }
            Err(e) => tracing::error!(error = %e, "cannot recreate the kafka producer"),
        }
    }
}

/// Errors after which an idempotent producer cannot be used again.
impl Producer {
    /// Produces one record to `topic` keyed `key`; its offset once Kafka acknowledged it.
    pub async fn append(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<i64, crate::log::AppendError> {
        use crate::log::AppendError;
        let record = FutureRecord::to(topic).key(key).payload(payload);
        let (generation, producer) = self.get();
        // librdkafka bounds the wait with message.timeout.ms; the outer timeout is a safety net.
        let sent = tokio::time::timeout(timeout + Duration::from_secs(1), producer.send(record, timeout)).await;
        if let Ok(Err((e, _))) = &sent
            && is_fatal(e, &producer)
        {
            self.recreate(generation);
        }
        match sent {
            Ok(Ok(delivery)) => Ok(delivery.offset),
            Ok(Err((e, _))) => Err(AppendError::Failed("kafka", e.to_string())),
            Err(_) => Err(AppendError::TimedOut("kafka")),
        }
    }
}

fn is_fatal(e: &rdkafka::error::KafkaError, producer: &FutureProducer) -> bool {
    use rdkafka::error::RDKafkaErrorCode as C;
    use rdkafka::producer::Producer as _;
    producer.client().fatal_error().is_some()
        || matches!(
            e.rdkafka_error_code(),
            Some(
                C::ProducerFenced
                    | C::InvalidProducerEpoch
                    | C::OutOfOrderSequenceNumber
                    | C::UnknownProducerId
                    | C::Fatal
            )
        )
}

/// The Push service over Kafka.
#[derive(Clone)]
pub struct PushIngest {
    /// The backbone's log (appends).
    pub log: Arc<crate::log::Log>,
    pub topic: String,
    pub ids: Arc<Ids>,
    pub produce_timeout: Duration,
    pub max_message_bytes: usize,
    pub presence: Vec<PresenceClient<Authed>>,
    /// Answers by idempotency scope: (id, offset).
    pub idempotency: Arc<Idempotency<(String, i64)>>,
    /// Channel history (None: History answers UNIMPLEMENTED).
    pub history: Option<Arc<crate::history::History>>,
}

/// Whether the call says it repeats one whose answer was ambiguous.
fn is_retry<T>(req: &Request<T>) -> bool {
    req.metadata().get(kit::idempotency::RETRY_HEADER).is_some_and(|v| v.as_bytes() != b"0")
}

/// How long, and for how many keys, this bridge remembers an idempotency key.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(300);
pub const IDEMPOTENCY_KEYS: usize = 100_000;

/// The message id for an idempotency scope: the same on every bridge.
fn keyed_id(scope: &str) -> String {
    use sha1::{Digest, Sha1};
    let digest = Sha1::digest(scope.as_bytes());
    let mut id = String::with_capacity(2 + 32);
    id.push_str("k-");
    for b in &digest[..16] {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

impl std::fmt::Debug for PushIngest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushIngest").field("topic", &self.topic).finish_non_exhaustive()
    }
}

fn count(method: &'static str, outcome: &'static str) {
    metrics::counter!(m::PUSH_REQUESTS, "method" => method, "outcome" => outcome).increment(1);
}

fn invalid(method: &'static str, msg: impl Into<String>) -> Status {
    count(method, "invalid_argument");
    Status::invalid_argument(msg)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn valid_channel(c: &str) -> bool {
    !c.is_empty() && c.len() <= 128 && c.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fn valid_user(u: &str) -> bool {
    !u.is_empty() && u.len() <= 128 && !u.chars().any(char::is_control)
}

impl PushIngest {
    fn check_data(&self, method: &'static str, data: &str) -> Result<(), Status> {
        if data.len() > self.max_message_bytes {
            return Err(invalid(
                method,
                format!("data_json is {} bytes, the limit is {}", data.len(), self.max_message_bytes),
            ));
        }
        serde_json::from_str::<&RawValue>(data)
            .map(|_| ())
            .map_err(|e| invalid(method, format!("data_json is not valid JSON: {e}")))
    }

    /// Stores one envelope; returns (id, partition offset).
    async fn produce(&self, method: &'static str, key: String, env: Envelope) -> Result<(String, i64), Status> {
        let id = env.id.clone();
        let kind = match env.target {
            Some(envelope::Target::Channel(_)) => "channel",
            Some(envelope::Target::User(_)) => "user",
            _ => "broadcast",
        };
        let dedup = env.idempotent.then(|| env.id.clone());
        let payload = env.encode_to_vec();
        let started = Instant::now();
        match self.log.append(&key, payload, dedup.as_deref(), self.produce_timeout).await {
            Ok(offset) => {
                metrics::histogram!(m::PRODUCE_DURATION).record(started.elapsed().as_secs_f64());
                metrics::counter!(m::PRODUCED, "target" => kind).increment(1);
                count(method, "ok");
                Ok((id, offset))
            }
            Err(e) => {
                metrics::counter!(m::PRODUCE_ERRORS).increment(1);
                count(method, "unavailable");
                tracing::warn!(error = %e, "the backbone did not acknowledge a message");
                Err(Status::unavailable(format!(
                    "{e}; the message may have been stored: retry with the same idempotency_key"
                )))
            }
        }
    }

    fn envelope(&self, target: envelope::Target, from: &str, payload: Vec<u8>, kind: envelope::Kind) -> Envelope {
        Envelope {
            id: self.ids.next(),
            target: Some(target),
            from: if from.is_empty() { "system".into() } else { from.to_owned() },
            payload,
            published_at_ms: now_ms(),
            kind: kind as i32,
            idempotent: false,
            maybe_stored_before: false,
        }
    }

    /// Stores `env` once per idempotency key (`key` empty: no key); returns
    /// (id, offset, duplicate).
    async fn produce_once(
        &self,
        method: &'static str,
        kafka_key: String,
        mut env: Envelope,
        key: &str,
        retry: bool,
    ) -> Result<(String, i64, bool), Status> {
        if key.is_empty() {
            let (id, offset) = self.produce(method, kafka_key, env).await?;
            return Ok((id, offset, false));
        }
        if !kit::idempotency::valid_key(key) {
            return Err(invalid(method, "idempotency_key must be 1-128 printable ASCII bytes"));
        }
        let scope = format!("{method}\0{}\0{key}", env.from);
        env.id = keyed_id(&scope);
        env.idempotent = true;
        // Readers look back for an earlier copy of a message this bridge cannot vouch
        // was not stored before (docs/design.md "Keyed duplicates").
        env.maybe_stored_before = retry || self.idempotency.may_have_run(&scope);
        if env.maybe_stored_before {
            metrics::counter!(m::KEYED_UNSURE).increment(1);
        }
        let ((id, offset), duplicate) = self.idempotency.run(&scope, || self.produce(method, kafka_key, env)).await?;
        if duplicate {
            count(method, "duplicate");
        }
        Ok((id, offset, duplicate))
    }

    async fn presence<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: Fn(PresenceClient<Authed>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut last = Status::unavailable("no presence replica configured");
        for c in &self.presence {
            match tokio::time::timeout(Duration::from_secs(2), f(c.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(s))
                    if s.code() == tonic::Code::InvalidArgument || s.code() == tonic::Code::FailedPrecondition =>
                {
                    return Err(s);
                }
                Ok(Err(s)) => last = s,
                Err(_) => last = Status::unavailable("presence did not answer in time"),
            }
        }
        Err(Status::unavailable(format!("presence unavailable: {}", last.message())))
    }
}

#[tonic::async_trait]
impl Push for PushIngest {
    async fn send_to_user(&self, req: Request<pb::SendToUserRequest>) -> Result<Response<pb::SendResponse>, Status> {
        let retry = is_retry(&req);
        let r = req.into_inner();
        if !valid_user(&r.user) {
            return Err(invalid("send_to_user", "user must be 1-128 bytes without control characters"));
        }
        self.check_data("send_to_user", &r.data_json)?;
        let key = format!("u:{}", r.user);
        let env =
            self.envelope(envelope::Target::User(r.user), &r.from, r.data_json.into_bytes(), envelope::Kind::Message);
        let (id, _, duplicate) = self.produce_once("send_to_user", key, env, &r.idempotency_key, retry).await?;
        // Connections reached are not known when Kafka acknowledges: no `delivered`.
        Ok(Response::new(pb::SendResponse { id, delivered: None, duplicate }))
    }

    async fn publish(&self, req: Request<pb::PublishRequest>) -> Result<Response<pb::PublishResponse>, Status> {
        let retry = is_retry(&req);
        let r = req.into_inner();
        if !valid_channel(&r.channel) {
            return Err(invalid("publish", "channel must be 1-128 printable ASCII bytes without spaces"));
        }
        self.check_data("publish", &r.data_json)?;
        let key = format!("c:{}", r.channel);
        let env = self.envelope(
            envelope::Target::Channel(r.channel),
            &r.from,
            r.data_json.into_bytes(),
            envelope::Kind::Message,
        );
        let (id, offset, duplicate) = self.produce_once("publish", key, env, &r.idempotency_key, retry).await?;
        Ok(Response::new(pb::PublishResponse { id, seq: offset as u64 + 1, delivered: None, duplicate }))
    }

    async fn broadcast(&self, req: Request<pb::BroadcastRequest>) -> Result<Response<pb::SendResponse>, Status> {
        let r = req.into_inner();
        self.check_data("broadcast", &r.data_json)?;
        let env = self.envelope(
            envelope::Target::Broadcast(true),
            &r.from,
            r.data_json.into_bytes(),
            envelope::Kind::Message,
        );
        let (id, _) = self.produce("broadcast", "b".into(), env).await?;
        Ok(Response::new(pb::SendResponse { id, delivered: None, duplicate: false }))
    }

    async fn disconnect(
        &self,
        req: Request<pb::DisconnectRequest>,
    ) -> Result<Response<pb::DisconnectResponse>, Status> {
        let r = req.into_inner();
        if !valid_user(&r.user) {
            return Err(invalid("disconnect", "user must be 1-128 bytes without control characters"));
        }
        if r.reason.len() > 120 {
            return Err(invalid("disconnect", "reason must be at most 120 bytes"));
        }
        let reason = if r.reason.is_empty() { "disconnected".to_owned() } else { r.reason };
        let key = format!("u:{}", r.user);
        let env =
            self.envelope(envelope::Target::User(r.user), "system", reason.into_bytes(), envelope::Kind::Disconnect);
        self.produce("disconnect", key, env).await?;
        Ok(Response::new(pb::DisconnectResponse { closed: None }))
    }

    async fn is_online(&self, req: Request<pb::IsOnlineRequest>) -> Result<Response<pb::IsOnlineResponse>, Status> {
        let users = req.into_inner().users;
        if users.len() > PAGE_MAX {
            return Err(invalid("is_online", format!("at most {PAGE_MAX} users per call")));
        }
        let located = self
            .presence(|mut c| {
                let users = users.clone();
                async move { c.locate_users(ppb::LocateUsersRequest { users }).await.map(|r| r.into_inner()) }
            })
            .await?;
        count("is_online", "ok");
        let users = located
            .users
            .into_iter()
            .map(|u| pb::UserOnline {
                online: !u.connections.is_empty(),
                connections: u.connections.len() as u32,
                user: u.user,
            })
            .collect();
        Ok(Response::new(pb::IsOnlineResponse { users }))
    }

    async fn history(&self, req: Request<pb::HistoryRequest>) -> Result<Response<pb::HistoryResponse>, Status> {
        use crate::history::{DEFAULT_LIMIT, MAX_LIMIT};
        let r = req.into_inner();
        if !valid_channel(&r.channel) {
            return Err(invalid("history", "channel must be 1-128 printable ASCII bytes without spaces"));
        }
        let limit = match r.limit as usize {
            0 => DEFAULT_LIMIT,
            n if n <= MAX_LIMIT => n,
            _ => return Err(invalid("history", format!("limit must be at most {MAX_LIMIT}"))),
        };
        let Some(history) = &self.history else {
            return Err(Status::unimplemented("history is not configured on this bridge"));
        };
        match history.answer(&r.channel, r.since, limit, r.position_only).await {
            Ok(a) => {
                count("history", "ok");
                Ok(Response::new(a))
            }
            Err(e) => {
                count("history", "unavailable");
                Err(e)
            }
        }
    }

    async fn channel_members(
        &self,
        req: Request<pb::ChannelMembersRequest>,
    ) -> Result<Response<pb::ChannelMembersResponse>, Status> {
        let r = req.into_inner();
        if !valid_channel(&r.channel) {
            return Err(invalid("channel_members", "channel must be 1-128 printable ASCII bytes without spaces"));
        }
        if r.limit as usize > PAGE_MAX {
            return Err(invalid("channel_members", format!("limit must be at most {PAGE_MAX}")));
        }
        let page = self
            .presence(|mut c| {
                let req =
                    ppb::ChannelMembersRequest { channel: r.channel.clone(), after: r.after.clone(), limit: r.limit };
                async move { c.channel_members(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        count("channel_members", "ok");
        Ok(Response::new(pb::ChannelMembersResponse {
            users: page.users,
            total: page.total,
            next_after: page.next_after,
        }))
    }
}
