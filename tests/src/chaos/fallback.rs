//! The chaos workload's clients on the fallback transports, against the wire
//! ([`crate::http`], not the gateway's code): an SSE client that reconnects with
//! `Last-Event-ID` as a browser's EventSource does, and a long-poll client that carries
//! its cursor from poll to poll, each moving to the next gateway when one fails.
//!
//! Both write the same history as the WebSocket subscribers ([`Event`]): an SSE stream is
//! a connection whose subscribe acks say what the `Last-Event-ID` recovered; a poller is
//! one connection from its first answer to the end, its subscriptions one chain each
//! (later polls resume at the cursor; only a `recovered: false` ack, which a poll answer
//! carries, starts a new one), since that is what its user sees: one stream of messages.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{Recorder, SubState, pos_of};
use crate::checker::{Event, Pos, SubOutcome};
use crate::http::{Sse, try_request};
use crate::monitoring::url_encode;
use crate::ws::bearer;

/// How long an SSE stream may stay silent (the gateway sends a heartbeat comment far
/// more often) before the client takes it for dead, as after a partition.
const SSE_SILENCE: Duration = Duration::from_secs(45);
/// How long one poll waits for news (`timeout_ms`), and the slack on top of it before
/// the client gives the request up.
const POLL_WAIT_MS: u64 = 2000;
const POLL_SLACK: Duration = Duration::from_secs(10);

/// The positions a `Last-Event-ID` or cursor names (docs/protocol.md): `channel=seq@epoch`
/// per channel, joined by `,`; `channel=-` for none; `%`, `,`, `=`, `@` percent-encoded.
pub(super) fn positions(id: &str) -> HashMap<String, Pos> {
    fn decode(s: &str) -> String {
        s.replace("%2C", ",").replace("%3D", "=").replace("%40", "@").replace("%25", "%")
    }
    id.split(',')
        .filter_map(|part| {
            let (ch, at) = part.split_once('=')?;
            let (seq, epoch) = at.split_once('@')?;
            Some((decode(ch), Pos { seq: seq.parse().ok()?, epoch: decode(epoch) }))
        })
        .collect()
}

/// What one frame of a channel shows, recorded for `client` (shared by both clients).
fn record_frame(
    rec: &Recorder,
    state: &Mutex<SubState>,
    client: &str,
    v: &Value,
    asked: &HashMap<String, Pos>,
) -> Option<()> {
    let t = rec.t();
    let channel = v["channel"].as_str().unwrap_or_default().to_owned();
    match v["type"].as_str()? {
        "message" => {
            let (pos, msg) = (pos_of(v)?, v["data"]["m"].as_str()?.to_owned());
            state.lock().unwrap().shown.entry(channel.clone()).or_default().insert(msg.clone());
            rec.push(Event::Deliver { t, client: client.to_owned(), channel, pos, msg });
        }
        "gap" => {
            let after = pos_of(&v["after"])?;
            let reason = v["reason"].as_str().unwrap_or_default().to_owned();
            rec.push(Event::Gap { t, client: client.to_owned(), channel, after, reason });
        }
        "direct" => {
            let msg = v["data"]["m"].as_str().unwrap_or_default().to_owned();
            rec.push(Event::Direct { t, client: client.to_owned(), msg });
        }
        "ack" => {
            // No position when the gateway's bridge did not answer; recorded too.
            let pos = pos_of(&v["position"]);
            let recovered = v["recovered"].as_bool();
            if recovered != Some(true)
                && let Some(pos) = &pos
            {
                state.lock().unwrap().floor.insert(channel.clone(), pos.seq);
            }
            let reason = v["reason"].as_str().map(str::to_owned);
            let since = asked.get(&channel).cloned();
            let outcome = SubOutcome::Ack { pos, recovered, reason };
            rec.push(Event::Subscribe { t, client: client.to_owned(), channel, since, outcome });
        }
        _ => {}
    }
    Some(())
}

/// An SSE client: one stream at a time on `/sse?channels=…`, dropped now and then (a
/// network blip), and opened again on the next gateway with the last event id it got.
pub(super) struct SseClient {
    pub(super) rec: Recorder,
    pub(super) name: String,
    pub(super) user: String,
    pub(super) addrs: Vec<SocketAddr>,
    pub(super) channels: Vec<String>,
    pub(super) rng: StdRng,
    pub(super) stop: CancellationToken,
    /// Once cancelled (the quiet point nears), streams are no longer dropped on purpose.
    pub(super) calm: CancellationToken,
    pub(super) state: Arc<Mutex<SubState>>,
}

impl SseClient {
    pub(super) async fn run(mut self, first: usize) {
        let path = format!("/sse?channels={}", self.channels.join(","));
        let auth = bearer(&self.user);
        let mut last_id: Option<String> = None;
        let mut at = first;
        while !self.stop.is_cancelled() {
            let addr = self.addrs[at % self.addrs.len()];
            at += 1;
            let mut headers = vec![("Authorization", auth.as_str())];
            if let Some(id) = &last_id {
                headers.push(("Last-Event-ID", id.as_str()));
            }
            let opened = tokio::select! {
                () = self.stop.cancelled() => return,
                o = Sse::try_open(addr, &path, &headers, Duration::from_secs(5)) => o,
            };
            let Some(Ok(mut stream)) = opened else {
                // Refused (503 draining or shedding, 429) or unreachable: the next gateway.
                tokio::select! {
                    () = self.stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                }
            };
            let asked = last_id.as_deref().map(positions).unwrap_or_default();
            let life = tokio::time::Instant::now() + Duration::from_millis(self.rng.random_range(3000..15000));
            let mut welcomed = false;
            let code = loop {
                let next = tokio::select! {
                    () = self.stop.cancelled() => break None,
                    () = tokio::time::sleep_until(life), if !self.calm.is_cancelled() => break Some(1000),
                    e = stream.next_within(SSE_SILENCE) => e,
                };
                let ev = match next {
                    Err(()) | Ok(None) => break Some(1006),
                    Ok(Some(ev)) if ev.comment && ev.data.is_empty() => continue,
                    Ok(Some(ev)) => ev,
                };
                let Ok(v) = serde_json::from_str::<Value>(&ev.data) else { continue };
                match v["type"].as_str() {
                    Some("welcome") => {
                        welcomed = true;
                        let (client, user) = (self.name.clone(), self.user.clone());
                        self.rec.push(Event::Connected { t: self.rec.t(), client, user });
                        self.state.lock().unwrap().connected = true;
                    }
                    Some("close") => break Some(v["code"].as_u64().unwrap_or(1000) as u16),
                    // A subscribe refused in the stream: start over (the id resumes it).
                    Some("error") => break Some(1011),
                    _ => {
                        let _ = record_frame(&self.rec, &self.state, &self.name, &v, &asked);
                    }
                }
            };
            // What a browser's EventSource keeps: the last id received, over every stream.
            if stream.last_id.is_some() {
                last_id = stream.last_id.clone();
            }
            if welcomed {
                self.state.lock().unwrap().connected = false;
                let (t, client) = (self.rec.t(), self.name.clone());
                self.rec.push(Event::Closed { t, client, code: code.unwrap_or(1000) });
            }
            if code.is_none() {
                return;
            }
        }
    }
}

/// A long-poll client: `/poll?channels=…&cursor=…` on the next gateway each time, so
/// that every poll is a new short session somewhere in the cluster.
pub(super) struct Poller {
    pub(super) rec: Recorder,
    pub(super) name: String,
    pub(super) user: String,
    pub(super) addrs: Vec<SocketAddr>,
    pub(super) channels: Vec<String>,
    pub(super) stop: CancellationToken,
    pub(super) state: Arc<Mutex<SubState>>,
}

impl Poller {
    pub(super) async fn run(self, first: usize) {
        let auth = bearer(&self.user);
        let headers = [("Authorization", auth.as_str())];
        let mut cursor: Option<String> = None;
        let mut connected = false;
        let mut last_refusal: Option<String> = None;
        for at in first.. {
            let addr = self.addrs[at % self.addrs.len()];
            let mut path = format!("/poll?channels={}&timeout_ms={POLL_WAIT_MS}", self.channels.join(","));
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={}", url_encode(c)));
            }
            let limit = Duration::from_millis(POLL_WAIT_MS) + POLL_SLACK;
            let reply = tokio::select! {
                () = self.stop.cancelled() => break,
                r = try_request(addr, "GET", &path, &headers, b"", limit) => r,
            };
            // A refusal is told in the run's log once per kind in a row (the history keeps
            // what clients were shown, not how a request failed).
            let why = match &reply {
                None => Some("no answer".to_owned()),
                Some(r) if r.status != 200 => {
                    Some(format!("{} {}", r.status, r.body.chars().take(160).collect::<String>()))
                }
                Some(_) => None,
            };
            if let Some(w) = why.as_deref().filter(|_| why != last_refusal) {
                eprintln!("chaos {:>6} ms: poller {} on {addr}: {w}", self.rec.t(), self.name);
            }
            last_refusal = why;
            let answer = reply.filter(|r| r.status == 200).and_then(|r| serde_json::from_str::<Value>(&r.body).ok());
            let Some(v) = answer.filter(|v| v["type"] == "poll" && v["cursor"].is_string()) else {
                self.state.lock().unwrap().connected = false;
                tokio::select! {
                    () = self.stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                }
            };
            if !connected {
                connected = true;
                let (client, user) = (self.name.clone(), self.user.clone());
                self.rec.push(Event::Connected { t: self.rec.t(), client, user });
            }
            self.state.lock().unwrap().connected = true;
            let asked = cursor.as_deref().map(positions).unwrap_or_default();
            for e in v["events"].as_array().into_iter().flatten() {
                let _ = record_frame(&self.rec, &self.state, &self.name, e, &asked);
            }
            cursor = v["cursor"].as_str().map(str::to_owned);
        }
        if connected {
            self.state.lock().unwrap().connected = false;
            self.rec.push(Event::Closed { t: self.rec.t(), client: self.name.clone(), code: 1000 });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_positions_of_an_event_id() {
        let p = positions("room:a=12@k.0,b%2Cc=-,d=3@e%40f");
        assert_eq!(p["room:a"], Pos { seq: 12, epoch: "k.0".into() });
        assert!(!p.contains_key("b,c"), "no position yet");
        assert_eq!(p["d"], Pos { seq: 3, epoch: "e@f".into() });
    }
}
