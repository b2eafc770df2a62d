//! The client protocol (docs/protocol.md): decoding commands and encoding
//! server frames. Pure functions; the payload `data` is kept as raw JSON text
//! and never re-serialised.

use std::borrow::Cow;
use std::io::Write;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::history::{Lost, Page, Position};

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_BYTES: usize = 128;

/// One decoded client command and the `ref` to echo.
#[derive(Debug)]
pub struct Request<'a> {
    pub reference: Option<&'a RawValue>,
    pub command: Command<'a>,
}

/// What a client asks for.
#[derive(Debug)]
pub enum Command<'a> {
    Subscribe {
        channel: Cow<'a, str>,
        since: Option<Since>,
    },
    Unsubscribe {
        channel: Cow<'a, str>,
    },
    Publish {
        channel: Cow<'a, str>,
        data: &'a RawValue,
        key: Option<Cow<'a, str>>,
    },
    Send {
        user: Cow<'a, str>,
        data: &'a RawValue,
        key: Option<Cow<'a, str>>,
    },
    Presence {
        channel: Cow<'a, str>,
    },
    History {
        channel: Cow<'a, str>,
        since: Option<Since>,
        limit: usize,
    },
    Ping,
    /// Authenticates a session opened without a token (its first command).
    Connect {
        token: Option<Cow<'a, str>>,
    },
    /// Replaces the session's token (same user): new expiry, new channel claims.
    Refresh {
        token: Cow<'a, str>,
    },
}

/// A client's `since`: the position of the last message it has of a channel.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Since {
    pub seq: u64,
    pub epoch: String,
}

/// Longest epoch accepted in a `since`.
pub const MAX_EPOCH_BYTES: usize = 64;

/// A command that could not be decoded, with the `ref` when it was readable.
#[derive(Debug)]
pub struct DecodeError<'a> {
    pub reference: Option<&'a RawValue>,
    pub code: ErrorCode,
    pub message: &'static str,
}

/// Stable, machine-readable error codes (docs/protocol.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadJson,
    UnknownOp,
    BadRequest,
    BadChannel,
    Forbidden,
    TooManySubscriptions,
    RateLimited,
    Unavailable,
    Unauthorized,
    /// HTTP transports: a request body over `limits.max_message_bytes`.
    TooBig,
    /// HTTP transports: `?stream=` names no stream of this user on this gateway.
    UnknownStream,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadJson => "bad_json",
            Self::UnknownOp => "unknown_op",
            Self::BadRequest => "bad_request",
            Self::BadChannel => "bad_channel",
            Self::Forbidden => "forbidden",
            Self::TooManySubscriptions => "too_many_subscriptions",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::Unauthorized => "unauthorized",
            Self::TooBig => "too_big",
            Self::UnknownStream => "unknown_stream",
        }
    }
}

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(borrow, default)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "ref")]
    reference: Option<&'a RawValue>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    idempotency_key: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
    #[serde(default)]
    limit: Option<serde_json::Number>,
    token: Option<Cow<'a, str>>,
}

/// Only the `ref` of a command, for answering one whose other fields are malformed.
#[derive(Deserialize)]
struct RefOnly<'a> {
    #[serde(borrow, default, rename = "ref")]
    reference: Option<&'a RawValue>,
}

/// A `ref` is a string or a number, at most 128 bytes.
fn valid_ref(r: &&RawValue) -> bool {
    let s = r.get();
    (s.starts_with('"') || s.starts_with('-') || s.as_bytes()[0].is_ascii_digit()) && s.len() <= 130
}

/// Decodes one text frame (already checked to be UTF-8).
pub fn decode(text: &str) -> Result<Request<'_>, DecodeError<'_>> {
    let err = |reference, code, message| DecodeError { reference, code, message };
    if !text.trim_start().starts_with('{') {
        return Err(err(None, ErrorCode::BadJson, "expected a JSON object"));
    }
    let raw: Raw<'_> = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            // Valid JSON with a field of the wrong type: the `ref` is still readable.
            let reference = serde_json::from_str::<RefOnly<'_>>(text).ok().and_then(|r| r.reference).filter(valid_ref);
            err(reference, ErrorCode::BadRequest, "a field has the wrong type")
        } else {
            err(None, ErrorCode::BadJson, "invalid JSON")
        }
    })?;
    let reference = raw.reference;
    if reference.is_some_and(|r| !valid_ref(&r)) {
        return Err(err(None, ErrorCode::BadRequest, "ref must be a string or number of at most 128 bytes"));
    }
    if raw.idempotency_key.as_deref().is_some_and(|k| !kit::idempotency::valid_key(k)) {
        return Err(err(reference, ErrorCode::BadRequest, "idempotency_key must be 1-128 printable ASCII bytes"));
    }
    let key = raw.idempotency_key;
    let since = match raw.since.map(since_of).transpose() {
        Ok(s) => s,
        Err(message) => return Err(err(reference, ErrorCode::BadRequest, message)),
    };
    let command = match raw.op.as_deref() {
        Some("subscribe") => need_channel(raw.channel).map(|channel| Command::Subscribe { channel, since }),
        Some("history") => need_channel(raw.channel).and_then(|channel| {
            let limit = match raw.limit {
                None => crate::history::PAGE_DEFAULT,
                Some(n) => match n.as_u64() {
                    Some(n @ 1..) if n as usize <= crate::history::PAGE_MAX => n as usize,
                    _ => return Err((ErrorCode::BadRequest, "limit must be an integer from 1 to 1000")),
                },
            };
            Ok(Command::History { channel, since, limit })
        }),
        Some("unsubscribe") => need_channel(raw.channel).map(|channel| Command::Unsubscribe { channel }),
        Some("presence") => need_channel(raw.channel).map(|channel| Command::Presence { channel }),
        Some("publish") => need_channel(raw.channel).and_then(|channel| match raw.data {
            Some(data) => Ok(Command::Publish { channel, data, key }),
            None => Err((ErrorCode::BadRequest, "missing field `data`")),
        }),
        Some("send") => match (raw.user, raw.data) {
            (Some(user), Some(data)) if crate::auth::valid_user_id(&user) => Ok(Command::Send { user, data, key }),
            (Some(_), Some(_)) => Err((ErrorCode::BadRequest, "user must be 1-128 bytes")),
            (None, _) => Err((ErrorCode::BadRequest, "missing field `user`")),
            (_, None) => Err((ErrorCode::BadRequest, "missing field `data`")),
        },
        Some("ping") => Ok(Command::Ping),
        Some("connect") => Ok(Command::Connect { token: raw.token }),
        Some("refresh") => match raw.token {
            Some(token) => Ok(Command::Refresh { token }),
            None => Err((ErrorCode::BadRequest, "missing field `token`")),
        },
        Some(_) => Err((ErrorCode::UnknownOp, "unknown op")),
        None => Err((ErrorCode::UnknownOp, "missing field `op`")),
    };
    command.map(|command| Request { reference, command }).map_err(|(code, message)| err(reference, code, message))
}

/// `since` must be `{"seq": <u64>, "epoch": <string>}` and nothing else.
fn since_of(raw: &RawValue) -> Result<Since, &'static str> {
    const SHAPE: &str = "since must be {\"seq\": integer >= 0, \"epoch\": string}";
    if !raw.get().starts_with('{') {
        return Err(SHAPE);
    }
    let s: Since = serde_json::from_str(raw.get()).map_err(|_| SHAPE)?;
    if s.epoch.len() > MAX_EPOCH_BYTES || !s.epoch.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err("since.epoch must be at most 64 printable ASCII bytes");
    }
    Ok(s)
}

fn need_channel(c: Option<Cow<'_, str>>) -> Result<Cow<'_, str>, (ErrorCode, &'static str)> {
    match c {
        None => Err((ErrorCode::BadRequest, "missing field `channel`")),
        Some(c) if !valid_channel(&c) => {
            Err((ErrorCode::BadChannel, "channel must be 1-128 printable ASCII bytes without spaces"))
        }
        Some(c) => Ok(c),
    }
}

/// Channel names: 1-128 bytes of printable ASCII, no spaces.
pub fn valid_channel(channel: &str) -> bool {
    !channel.is_empty() && channel.len() <= MAX_CHANNEL_BYTES && channel.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fn string(out: &mut Vec<u8>, s: &str) {
    // Writing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn reference(out: &mut Vec<u8>, r: Option<&RawValue>) {
    if let Some(r) = r {
        out.extend_from_slice(b",\"ref\":");
        out.extend_from_slice(r.get().as_bytes());
    }
}

/// `{"type":"message",...}`: a channel publication at its position.
pub fn message(channel: &str, id: &str, from: &str, seq: u64, epoch: &str, data: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(80 + channel.len() + id.len() + from.len() + epoch.len() + data.len());
    out.extend_from_slice(b"{\"type\":\"message\",\"channel\":");
    string(&mut out, channel);
    out.extend_from_slice(b",\"id\":");
    string(&mut out, id);
    out.extend_from_slice(b",\"from\":");
    string(&mut out, from);
    let _ = write!(out, ",\"seq\":{seq},\"epoch\":");
    string(&mut out, epoch);
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(data.as_bytes());
    out.push(b'}');
    out
}

fn position(out: &mut Vec<u8>, name: &str, p: &Position) {
    let _ = write!(out, ",\"{name}\":{{\"seq\":{},\"epoch\":", p.seq);
    string(out, &p.epoch);
    out.push(b'}');
}

/// The `ack` of a subscribe: the channel's position, and with `since`, whether
/// what was missed follows (`recovered`) or why not.
pub fn subscribed(
    r: Option<&RawValue>,
    channel: &str,
    at: Option<&Position>,
    recovery: Option<Option<Lost>>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"{\"type\":\"ack\"");
    reference(&mut out, r);
    out.extend_from_slice(b",\"channel\":");
    string(&mut out, channel);
    if let Some(p) = at {
        position(&mut out, "position", p);
    }
    match recovery {
        None => {}
        Some(None) => out.extend_from_slice(b",\"recovered\":true"),
        Some(Some(lost)) => {
            out.extend_from_slice(b",\"recovered\":false,\"reason\":");
            string(&mut out, lost.as_str());
        }
    }
    out.push(b'}');
    out
}

/// `{"type":"gap",...}`: messages of `channel` after `after` may be missing (a
/// recovery could not be completed); the stream goes on live.
pub fn gap(channel: &str, after: &Position, lost: Lost) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"{\"type\":\"gap\",\"channel\":");
    string(&mut out, channel);
    position(&mut out, "after", after);
    out.extend_from_slice(b",\"reason\":");
    string(&mut out, lost.as_str());
    out.push(b'}');
    out
}

/// The `history` reply: messages (as `message` objects), position, `more`, or `lost`.
pub fn history(r: Option<&RawValue>, channel: &str, page: &Page) -> Vec<u8> {
    let body: usize = page.items.iter().map(|i| i.frame.len()).sum();
    let mut out = Vec::with_capacity(128 + body);
    out.extend_from_slice(b"{\"type\":\"history\"");
    reference(&mut out, r);
    out.extend_from_slice(b",\"channel\":");
    string(&mut out, channel);
    out.extend_from_slice(b",\"messages\":[");
    for (i, item) in page.items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&crate::history::json_of(&item.frame));
    }
    out.push(b']');
    if let Some(p) = &page.position {
        position(&mut out, "position", p);
    }
    let _ = write!(out, ",\"more\":{}", page.more);
    if let Some(lost) = page.lost {
        out.extend_from_slice(b",\"lost\":");
        string(&mut out, lost.as_str());
    }
    out.push(b'}');
    out
}

/// `{"type":"direct",...}`: a message to a user.
pub fn direct(id: &str, from: &str, to: &str, data: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + id.len() + from.len() + to.len() + data.len());
    out.extend_from_slice(b"{\"type\":\"direct\",\"id\":");
    string(&mut out, id);
    out.extend_from_slice(b",\"from\":");
    string(&mut out, from);
    out.extend_from_slice(b",\"to\":");
    string(&mut out, to);
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(data.as_bytes());
    out.push(b'}');
    out
}

/// `{"type":"broadcast",...}`: a message to every session.
pub fn broadcast(id: &str, from: &str, data: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + id.len() + from.len() + data.len());
    out.extend_from_slice(b"{\"type\":\"broadcast\",\"id\":");
    string(&mut out, id);
    out.extend_from_slice(b",\"from\":");
    string(&mut out, from);
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(data.as_bytes());
    out.push(b'}');
    out
}

/// `{"type":"join"|"leave","channel":..,"user":..}`.
pub fn membership(joined: bool, channel: &str, user: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + channel.len() + user.len());
    out.extend_from_slice(if joined {
        b"{\"type\":\"join\",\"channel\":"
    } else {
        b"{\"type\":\"leave\",\"channel\":"
    });
    string(&mut out, channel);
    out.extend_from_slice(b",\"user\":");
    string(&mut out, user);
    out.push(b'}');
    out
}

/// `{"type":"presence_count","channel":..,"members":N}` for large rooms.
pub fn member_count(channel: &str, members: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + channel.len());
    out.extend_from_slice(b"{\"type\":\"presence_count\",\"channel\":");
    string(&mut out, channel);
    let _ = write!(out, ",\"members\":{members}}}");
    out
}

/// An `ack`, with the message id and sequence for publishes and sends.
pub fn ack(
    r: Option<&RawValue>,
    id: Option<&str>,
    seq: Option<u64>,
    delivered: Option<u64>,
    duplicate: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"{\"type\":\"ack\"");
    reference(&mut out, r);
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        string(&mut out, id);
    }
    if let Some(seq) = seq {
        let _ = write!(out, ",\"seq\":{seq}");
    }
    if let Some(d) = delivered {
        let _ = write!(out, ",\"delivered\":{d}");
    }
    if duplicate {
        out.extend_from_slice(b",\"duplicate\":true");
    }
    out.push(b'}');
    out
}

/// An `error` reply.
pub fn error(r: Option<&RawValue>, code: ErrorCode, message: &str, retry_after_ms: Option<u64>) -> Vec<u8> {
    error_with(r, code, message, retry_after_ms, false)
}

/// An `error` reply; `ambiguous`: the message may have been stored (see docs/protocol.md).
pub fn error_with(
    r: Option<&RawValue>,
    code: ErrorCode,
    message: &str,
    retry_after_ms: Option<u64>,
    ambiguous: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    out.extend_from_slice(b"{\"type\":\"error\"");
    reference(&mut out, r);
    out.extend_from_slice(b",\"code\":");
    string(&mut out, code.as_str());
    out.extend_from_slice(b",\"message\":");
    string(&mut out, message);
    if let Some(ms) = retry_after_ms {
        let _ = write!(out, ",\"retry_after_ms\":{ms}");
    }
    if ambiguous {
        out.extend_from_slice(b",\"ambiguous\":true");
    }
    out.push(b'}');
    out
}

/// A `presence` reply listing the users in a channel.
pub fn presence(r: Option<&RawValue>, channel: &str, users: &[std::sync::Arc<str>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + users.len() * 16);
    out.extend_from_slice(b"{\"type\":\"presence\"");
    reference(&mut out, r);
    out.extend_from_slice(b",\"channel\":");
    string(&mut out, channel);
    out.extend_from_slice(b",\"users\":[");
    for (i, u) in users.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(&mut out, u);
    }
    out.extend_from_slice(b"]}");
    out
}

/// The `ack` of a `refresh`: the new expiry, and the subscriptions the new token no longer allows.
pub fn refreshed(r: Option<&RawValue>, expires_at: u64, revoked: &[std::sync::Arc<str>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + revoked.iter().map(|c| c.len() + 3).sum::<usize>());
    out.extend_from_slice(b"{\"type\":\"ack\"");
    reference(&mut out, r);
    let _ = write!(out, ",\"expires_at\":{expires_at}");
    if !revoked.is_empty() {
        out.extend_from_slice(b",\"revoked\":[");
        for (i, c) in revoked.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            string(&mut out, c);
        }
        out.push(b']');
    }
    out.push(b'}');
    out
}

/// A `pong` reply to `{"op":"ping"}`.
pub fn pong(r: Option<&RawValue>) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(b"{\"type\":\"pong\"");
    reference(&mut out, r);
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_command() {
        let r = decode(r#"{"op":"publish","channel":"room:1","data":{"t":[1,2]},"ref":"a"}"#).unwrap();
        assert_eq!(r.reference.unwrap().get(), "\"a\"");
        match r.command {
            Command::Publish { channel, data, .. } => {
                assert_eq!(channel, "room:1");
                assert_eq!(data.get(), r#"{"t":[1,2]}"#);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(decode(r#"{"op":"subscribe","channel":"x"}"#).unwrap().command, Command::Subscribe { .. }));
        assert!(matches!(
            decode(r#"{"op":"send","user":"bob","data":1,"ref":7}"#).unwrap().command,
            Command::Send { .. }
        ));
        assert!(matches!(decode(r#"{"op":"ping"}"#).unwrap().command, Command::Ping));
        match decode(r#"{"op":"refresh","token":"a.b.c","ref":1}"#).unwrap().command {
            Command::Refresh { token } => assert_eq!(token, "a.b.c"),
            other => panic!("{other:?}"),
        }
        match decode(r#"{"op":"connect","token":"a.b.c"}"#).unwrap().command {
            Command::Connect { token } => assert_eq!(token.as_deref(), Some("a.b.c")),
            other => panic!("{other:?}"),
        }
        // A connect without a token decodes: the session answers it (unauthorized: missing token).
        assert!(matches!(decode(r#"{"op":"connect"}"#).unwrap().command, Command::Connect { token: None }));
        // Escaped channel names are unescaped.
        match decode(r#"{"op":"subscribe","channel":"a\u0062"}"#).unwrap().command {
            Command::Subscribe { channel, .. } => assert_eq!(channel, "ab"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn each_bad_command_has_its_code() {
        let code = |s: &str| decode(s).unwrap_err().code;
        assert_eq!(code("nope"), ErrorCode::BadJson);
        assert_eq!(code("[1]"), ErrorCode::BadJson);
        assert_eq!(code("{\"op\":"), ErrorCode::BadJson);
        assert_eq!(code(r#"{"op":"dance"}"#), ErrorCode::UnknownOp);
        assert_eq!(code(r#"{"channel":"x"}"#), ErrorCode::UnknownOp);
        assert_eq!(code(r#"{"op":"subscribe"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"op":"subscribe","channel":5}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"op":"subscribe","channel":"a b"}"#), ErrorCode::BadChannel);
        assert_eq!(code(r#"{"op":"subscribe","channel":""}"#), ErrorCode::BadChannel);
        assert_eq!(code(r#"{"op":"publish","channel":"x"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"op":"send","data":1}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"op":"ping","ref":{"a":1}}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"op":"refresh"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"op":"refresh","token":7}"#), ErrorCode::BadRequest);
        let e = decode(r#"{"op":"dance","ref":3}"#).unwrap_err();
        assert_eq!(e.reference.unwrap().get(), "3");
    }

    #[test]
    fn a_field_of_the_wrong_type_keeps_the_ref() {
        for s in [
            r#"{"op":"subscribe","channel":5,"ref":"a"}"#,
            r#"{"op":"publish","channel":["a"],"data":1,"ref":"a"}"#,
            r#"{"op":"send","user":7,"data":1,"ref":"a"}"#,
            r#"{"op":5,"ref":"a"}"#,
            r#"{"ref":"a","op":"subscribe","channel":{"x":1}}"#,
        ] {
            let e = decode(s).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{s}");
            assert_eq!(e.reference.map(|r| r.get()), Some("\"a\""), "{s}");
        }
        // An invalid ref is not echoed.
        assert!(decode(r#"{"op":5,"ref":{"a":1}}"#).unwrap_err().reference.is_none());
    }

    #[test]
    fn encodes_valid_json() {
        let data = RawValue::from_string("{\"x\":\"\\u00e9\"}".into()).unwrap();
        let frames = [
            message("c\"h", "id1", "al\nice", 9, "s1", data.get()),
            direct("id", "a", "b", data.get()),
            membership(true, "c", "u"),
            ack(Some(&RawValue::from_string("\"r\"".into()).unwrap()), Some("id"), Some(3), Some(2), true),
            error_with(None, ErrorCode::Unavailable, "x", Some(1000), true),
            error(None, ErrorCode::RateLimited, "slow \"down\"", Some(12)),
            presence(None, "c", &["a".into(), "b".into()]),
            pong(None),
            refreshed(None, 5, &["a\"b".into()]),
        ];
        for f in frames {
            let v: serde_json::Value = serde_json::from_slice(&f).unwrap();
            assert!(v["type"].is_string(), "{v}");
        }
        let v: serde_json::Value = serde_json::from_slice(&message("c\"h", "i", "a", 9, "s1", "[1]")).unwrap();
        assert_eq!(v["channel"], "c\"h");
        assert_eq!(v["seq"], 9);
        assert_eq!(v["data"][0], 1);
    }

    #[test]
    fn refresh_ack_lists_revoked_channels_only_when_there_are_some() {
        let r = RawValue::from_string("7".into()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&refreshed(Some(&r), 1767225600, &[])).unwrap();
        assert_eq!(v, serde_json::json!({"type":"ack","ref":7,"expires_at":1767225600u64}));
        let v: serde_json::Value =
            serde_json::from_slice(&refreshed(None, 9, &["room:1".into(), "admin".into()])).unwrap();
        assert_eq!(v, serde_json::json!({"type":"ack","expires_at":9,"revoked":["room:1","admin"]}));
    }
}
