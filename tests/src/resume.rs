//! An independent resuming client (tungstenite, not the gateway's code and not the
//! JS client): follows channels over a list of gateways, moves to the next one
//! whenever its socket ends, and resubscribes with `since` = the last position it
//! has of each channel. It records everything it was shown, duplicates included,
//! so that tests judge what a user would see.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::ws::{Ws, now, token};

/// One message as a client was shown it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    pub channel: String,
    pub seq: u64,
    pub epoch: String,
    pub id: String,
}

/// What a resuming client saw.
#[derive(Debug, Default)]
pub struct Record {
    /// Every message frame, in arrival order.
    pub shown: Vec<Shown>,
    /// `recovered: false` acks and `gap` frames.
    pub gaps: Vec<Value>,
    /// Sessions opened (the first included).
    pub sessions: usize,
    /// Subscribe acks with `recovered: true`.
    pub recovered: usize,
    /// Close codes of the sessions that ended.
    pub closes: Vec<u16>,
}

impl Record {
    /// The ids of `channel`'s messages in arrival order.
    pub fn ids(&self, channel: &str) -> Vec<String> {
        self.shown.iter().filter(|s| s.channel == channel).map(|s| s.id.clone()).collect()
    }
}

/// Starts a client as `user` following `channels`, first on `addrs[first]`.
/// It runs until `stop` is cancelled. `ready` is notified once after its first
/// session has every subscribe acknowledged.
pub fn spawn(
    user: String,
    addrs: Vec<SocketAddr>,
    first: usize,
    channels: Vec<String>,
    stop: CancellationToken,
    ready: Arc<tokio::sync::Notify>,
) -> (Arc<Mutex<Record>>, tokio::task::JoinHandle<()>) {
    let record = Arc::new(Mutex::new(Record::default()));
    let rec = record.clone();
    let task = tokio::spawn(async move {
        let mut positions: HashMap<String, Value> = HashMap::new();
        let mut at = first;
        let mut announced = false;
        let mut backoff = Duration::from_millis(100);
        while !stop.is_cancelled() {
            let addr = addrs[at % addrs.len()];
            at += 1;
            let Some(mut ws) = open(addr, &user).await else {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            };
            backoff = Duration::from_millis(100);
            rec.lock().unwrap().sessions += 1;
            let mut pending = channels.len();
            for (i, c) in channels.iter().enumerate() {
                let mut cmd = json!({"op":"subscribe","channel":c,"ref":format!("s{i}")});
                if let Some(p) = positions.get(c) {
                    cmd["since"] = p.clone();
                }
                if ws.send(Message::text(cmd.to_string())).await.is_err() {
                    break;
                }
            }
            loop {
                let frame = tokio::select! {
                    () = stop.cancelled() => {
                        let _ = ws.close(None).await;
                        return;
                    }
                    f = ws.next() => f,
                };
                let v: Value = match frame {
                    Some(Ok(Message::Text(t))) => serde_json::from_str(&t).expect("JSON frame"),
                    Some(Ok(Message::Close(c))) => {
                        rec.lock().unwrap().closes.push(c.map_or(1005, |c| u16::from(c.code)));
                        break;
                    }
                    Some(Ok(_)) => continue,
                    _ => {
                        rec.lock().unwrap().closes.push(1006);
                        break;
                    }
                };
                match v["type"].as_str() {
                    Some("message") => {
                        let shown = Shown {
                            channel: v["channel"].as_str().unwrap_or_default().to_owned(),
                            seq: v["seq"].as_u64().unwrap_or(0),
                            epoch: v["epoch"].as_str().unwrap_or_default().to_owned(),
                            id: v["id"].as_str().unwrap_or_default().to_owned(),
                        };
                        positions.insert(shown.channel.clone(), json!({"seq": shown.seq, "epoch": shown.epoch}));
                        rec.lock().unwrap().shown.push(shown);
                    }
                    Some("ack") if v["channel"].is_string() => {
                        let c = v["channel"].as_str().unwrap_or_default().to_owned();
                        match v["recovered"].as_bool() {
                            Some(true) => rec.lock().unwrap().recovered += 1,
                            Some(false) => rec.lock().unwrap().gaps.push(v.clone()),
                            None => {}
                        }
                        // Without since, or when recovery was refused, follow on from the ack's position.
                        if v["recovered"] != true && v["position"].is_object() {
                            positions.insert(c, v["position"].clone());
                        }
                        pending = pending.saturating_sub(1);
                        if pending == 0 && !announced {
                            announced = true;
                            ready.notify_one();
                        }
                    }
                    Some("gap") => rec.lock().unwrap().gaps.push(v.clone()),
                    Some("error") => rec.lock().unwrap().gaps.push(v.clone()),
                    _ => {}
                }
            }
            // Reconnect after a short jittered pause, to the next gateway.
            let pause = Duration::from_millis(50 + u64::from(std::process::id() % 7) * 20);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    });
    (record, task)
}

/// A session as `user` (token in the URL), once welcomed; None when any step fails or
/// takes too long.
pub(crate) async fn open(addr: SocketAddr, user: &str) -> Option<Ws> {
    let stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await.ok()?.ok()?;
    let t = token(json!({"sub": user, "exp": now() + 3600}));
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::client_async(
            format!("ws://{addr}/ws?token={t}"),
            tokio_tungstenite::MaybeTlsStream::Plain(stream),
        ),
    )
    .await
    .ok()?
    .ok()?;
    let welcome = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.ok()??.ok()?;
    welcome.into_text().ok().filter(|t| t.contains("\"welcome\""))?;
    Some(ws)
}

/// Checks that `record` was shown exactly `acked` (ids, in channel order) of
/// `channel`: each once, in order, nothing else. Returns the faults found.
pub fn check(name: &str, record: &Record, channel: &str, acked: &[String]) -> Vec<String> {
    let got = record.ids(channel);
    let mut faults = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for id in &got {
        if !seen.insert(id) {
            let at: Vec<(u64, &str)> =
                record.shown.iter().filter(|s| s.id == *id).map(|s| (s.seq, s.epoch.as_str())).collect();
            faults.push(format!("{name}: {channel} {id} shown twice, at {at:?}"));
        }
    }
    let missing: Vec<(usize, &String)> = acked.iter().enumerate().filter(|(_, id)| !seen.contains(id)).collect();
    if !missing.is_empty() {
        // Where they fall in the channel's acked order, and where each session began.
        let at: Vec<usize> = missing.iter().map(|(i, _)| *i).take(20).collect();
        faults.push(format!(
            "{name}: {channel}: {} of {} acked messages never shown (first {:?}; at {at:?} of the acked order; \
             shown {} in {} sessions, closes {:?})",
            missing.len(),
            acked.len(),
            missing.first().map(|(_, id)| id),
            got.len(),
            record.sessions,
            record.closes,
        ));
    }
    let acked_set: std::collections::HashSet<&String> = acked.iter().collect();
    let order: Vec<&String> = got.iter().filter(|id| acked_set.contains(id)).collect();
    let want: Vec<&String> = acked.iter().filter(|id| seen.contains(id)).collect();
    if order != want {
        faults.push(format!("{name}: {channel}: shown out of channel order"));
    }
    faults
}
