//! The Push API (`switchboard.push.v1.Push`) served by a standalone gateway:
//! internal services reach clients through the same bus and hub as client publishes.

use std::sync::Arc;

use proto::push::v1 as pb;
use proto::push::v1::push_server::Push;
use serde_json::value::RawValue;
use tonic::{Request, Response, Status};

use crate::bus::{Bus, BusError};
use crate::hub::Hub;
use crate::metrics as m;
use crate::presence::PresenceBackend;
use crate::protocol::valid_channel;

/// Default and largest page of `ChannelMembers`.
const PAGE_DEFAULT: usize = 100;
const PAGE_MAX: usize = 1000;

/// The Push service over a bus and the local hub.
#[derive(Debug, Clone)]
pub struct PushService {
    pub hub: Arc<Hub>,
    pub bus: Arc<dyn Bus>,
    pub presence: Arc<dyn PresenceBackend>,
    pub max_message_bytes: usize,
}

fn invalid(method: &'static str, msg: impl Into<String>) -> Status {
    metrics::counter!(m::PUSH_REQUESTS, "method" => method, "outcome" => "invalid_argument").increment(1);
    Status::invalid_argument(msg)
}

fn ok(method: &'static str) {
    metrics::counter!(m::PUSH_REQUESTS, "method" => method, "outcome" => "ok").increment(1);
}

impl From<BusError> for Status {
    fn from(e: BusError) -> Self {
        match e {
            BusError::Unavailable { message, ambiguous: false } => {
                Status::unavailable(format!("{message}; nothing was stored, retry"))
            }
            BusError::Unavailable { message, ambiguous: true } => Status::unavailable(format!(
                "{message}; the message may have been stored: retry with the same idempotency_key"
            )),
            BusError::Invalid(m) => Status::invalid_argument(m),
        }
    }
}

impl PushService {
    fn check_data(&self, method: &'static str, data: &str) -> Result<(), Status> {
        if data.len() > self.max_message_bytes {
            return Err(invalid(
                method,
                format!("data_json is {} bytes, the limit is {}", data.len(), self.max_message_bytes),
            ));
        }
        serde_json::from_str::<&RawValue>(data)
            .map_err(|e| invalid(method, format!("data_json is not valid JSON: {e}")))?;
        Ok(())
    }

    fn check_user(method: &'static str, user: &str) -> Result<(), Status> {
        if crate::auth::valid_user_id(user) {
            Ok(())
        } else {
            Err(invalid(method, "user must be 1-128 bytes without control characters"))
        }
    }

    /// `None` for an empty key (none given).
    fn check_key<'k>(method: &'static str, key: &'k str) -> Result<Option<&'k str>, Status> {
        match key {
            "" => Ok(None),
            k if kit::idempotency::valid_key(k) => Ok(Some(k)),
            _ => Err(invalid(method, "idempotency_key must be 1-128 printable ASCII bytes")),
        }
    }

    fn from_or_system(from: &str) -> &str {
        if from.is_empty() { "system" } else { from }
    }
}

#[tonic::async_trait]
impl Push for PushService {
    async fn send_to_user(&self, req: Request<pb::SendToUserRequest>) -> Result<Response<pb::SendResponse>, Status> {
        let r = req.into_inner();
        Self::check_user("send_to_user", &r.user)?;
        self.check_data("send_to_user", &r.data_json)?;
        let key = Self::check_key("send_to_user", &r.idempotency_key)?;
        let a = self.bus.send(&r.user, Self::from_or_system(&r.from), &r.data_json, key).await?;
        ok("send_to_user");
        Ok(Response::new(pb::SendResponse { id: a.id, delivered: a.delivered, duplicate: a.duplicate }))
    }

    async fn publish(&self, req: Request<pb::PublishRequest>) -> Result<Response<pb::PublishResponse>, Status> {
        let r = req.into_inner();
        if !valid_channel(&r.channel) {
            return Err(invalid("publish", "channel must be 1-128 printable ASCII bytes without spaces"));
        }
        self.check_data("publish", &r.data_json)?;
        let key = Self::check_key("publish", &r.idempotency_key)?;
        let a = self.bus.publish(&r.channel, Self::from_or_system(&r.from), &r.data_json, key).await?;
        ok("publish");
        Ok(Response::new(pb::PublishResponse {
            id: a.id,
            seq: a.seq.unwrap_or(0),
            delivered: a.delivered,
            duplicate: a.duplicate,
        }))
    }

    async fn broadcast(&self, req: Request<pb::BroadcastRequest>) -> Result<Response<pb::SendResponse>, Status> {
        let r = req.into_inner();
        self.check_data("broadcast", &r.data_json)?;
        let a = self.bus.broadcast(Self::from_or_system(&r.from), &r.data_json).await?;
        ok("broadcast");
        Ok(Response::new(pb::SendResponse { id: a.id, delivered: a.delivered, duplicate: a.duplicate }))
    }

    async fn disconnect(
        &self,
        req: Request<pb::DisconnectRequest>,
    ) -> Result<Response<pb::DisconnectResponse>, Status> {
        let r = req.into_inner();
        Self::check_user("disconnect", &r.user)?;
        if r.reason.len() > 120 {
            return Err(invalid("disconnect", "reason must be at most 120 bytes"));
        }
        let reason = if r.reason.is_empty() { "disconnected" } else { &r.reason };
        let closed = self.bus.disconnect(&r.user, reason).await?.delivered;
        ok("disconnect");
        Ok(Response::new(pb::DisconnectResponse { closed }))
    }

    async fn is_online(&self, req: Request<pb::IsOnlineRequest>) -> Result<Response<pb::IsOnlineResponse>, Status> {
        let r = req.into_inner();
        if r.users.len() > PAGE_MAX {
            return Err(invalid("is_online", format!("at most {PAGE_MAX} users per call")));
        }
        let counts = self.presence.connections(&r.users).await;
        let users = r
            .users
            .into_iter()
            .zip(counts)
            .map(|(user, connections)| pb::UserOnline { user, online: connections > 0, connections })
            .collect();
        ok("is_online");
        Ok(Response::new(pb::IsOnlineResponse { users }))
    }

    async fn history(&self, req: Request<pb::HistoryRequest>) -> Result<Response<pb::HistoryResponse>, Status> {
        let r = req.into_inner();
        if !valid_channel(&r.channel) {
            return Err(invalid("history", "channel must be 1-128 printable ASCII bytes without spaces"));
        }
        let limit = match r.limit as usize {
            0 => crate::history::PAGE_DEFAULT,
            n if n <= crate::history::PAGE_MAX => n,
            n => {
                return Err(invalid("history", format!("limit is {n}, at most {} per page", crate::history::PAGE_MAX)));
            }
        };
        let since = r.since.map(|p| crate::history::Position { seq: p.seq, epoch: p.epoch.into() });
        let page = self.bus.history(&r.channel, since.as_ref(), limit, r.position_only).await?;
        ok("history");
        Ok(Response::new(history_response(page)))
    }

    async fn channel_members(
        &self,
        req: Request<pb::ChannelMembersRequest>,
    ) -> Result<Response<pb::ChannelMembersResponse>, Status> {
        let r = req.into_inner();
        if !valid_channel(&r.channel) {
            return Err(invalid("channel_members", "channel must be 1-128 printable ASCII bytes without spaces"));
        }
        let limit = match r.limit as usize {
            0 => PAGE_DEFAULT,
            n if n > PAGE_MAX => {
                return Err(invalid("channel_members", format!("limit must be at most {PAGE_MAX}")));
            }
            n => n,
        };
        let page = self.presence.members(&r.channel, &r.after, limit).await;
        ok("channel_members");
        Ok(Response::new(pb::ChannelMembersResponse {
            users: page.users,
            total: page.total,
            next_after: page.next_after,
        }))
    }
}

/// A page as the Push API answers it: each message's fields read back from its frame.
fn history_response(page: crate::history::Page) -> pb::HistoryResponse {
    #[derive(serde::Deserialize)]
    struct Frame<'a> {
        id: String,
        from: String,
        seq: u64,
        #[serde(borrow)]
        data: &'a RawValue,
    }
    let messages = page
        .items
        .iter()
        .filter_map(|item| {
            if let Some(m) = &item.meta {
                return Some(pb::HistoryMessage {
                    id: m.id.clone(),
                    from: m.from.clone(),
                    seq: item.seq,
                    data_json: m.data.clone(),
                    published_at_ms: m.published_at_ms,
                    idempotent: m.idempotent,
                });
            }
            let json = crate::history::json_of(&item.frame);
            let f: Frame<'_> = serde_json::from_slice(&json).ok()?;
            Some(pb::HistoryMessage {
                id: f.id,
                from: f.from,
                seq: f.seq,
                data_json: f.data.get().to_owned(),
                published_at_ms: 0,
                idempotent: false,
            })
        })
        .collect();
    pb::HistoryResponse {
        messages,
        position: page.position.map(|p| pb::Position { seq: p.seq, epoch: p.epoch.to_string() }),
        more: page.more,
        lost: page.lost.map_or(0, |l| l.to_pb() as i32),
    }
}
