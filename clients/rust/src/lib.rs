//! A Switchboard client for Rust services and bots, on tokio.
//!
//! ```no_run
//! # async fn demo() -> Result<(), switchboard_client::Error> {
//! use switchboard_client::{Client, Event, Options};
//! let (client, mut events) = Client::connect(Options::new(
//!     vec!["ws://127.0.0.1:8080/ws".into()],
//!     || async { Ok("a token".to_owned()) },
//! ));
//! client.subscribe("room:1").await?;
//! client.publish("room:1", serde_json::json!({"text": "hi"})).await?;
//! while let Some(event) = events.recv().await {
//!     if let Event::Message(m) = event {
//!         println!("{} #{}: {}", m.channel, m.seq, m.data);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! What it does for you (docs/protocol.md describes the wire):
//! - **Reconnects** with exponential backoff and full jitter, moving through `urls` in turn;
//!   gets the token from your callback at every connect and again before it expires
//!   (`refresh`, without reconnecting).
//! - **Recovers** every subscribed channel on every reconnect: it resubscribes with `since`
//!   = the last position it showed you, drops anything at or below that position (so you
//!   never see a message twice), and tells you with [`Event::Gap`] when the gateway could
//!   not recover (`recovered: false`, or a `gap` frame), with the reason.
//! - **Retries publishes and sends safely**: each call gets an idempotency key; an
//!   `unavailable` answer or a connection lost before the answer is retried with the same
//!   key (after `retry_after_ms`, or the backoff), so a message is stored once.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// A position in a channel's stream (docs/protocol.md "Positions and recovery").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    pub seq: u64,
    pub epoch: String,
}

impl Position {
    fn from_json(v: &Value) -> Option<Position> {
        Some(Position { seq: v["seq"].as_u64()?, epoch: v["epoch"].as_str()?.to_owned() })
    }
}

/// A channel message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub channel: String,
    pub id: String,
    pub from: String,
    pub seq: u64,
    pub epoch: String,
    pub data: Value,
}

/// What the client tells the application.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A session was welcomed (the first, or after a reconnect); the welcome frame.
    Connected(Value),
    /// The session ended; the client reconnects unless closed. `code` 1006: no close frame.
    Disconnected {
        code: u16,
        reason: String,
    },
    Message(Message),
    /// A direct message to this user.
    Direct {
        id: String,
        from: String,
        data: Value,
    },
    /// Messages of `channel` after `after` may be missing (recovery refused or cut short):
    /// reload the channel's state. `after` is None when the client had no position yet.
    Gap {
        channel: String,
        after: Option<Position>,
        reason: String,
    },
    /// A `presence` event (join or leave) on a presence channel, as sent.
    Presence(Value),
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The gateway answered with an error (docs/protocol.md "Error codes").
    #[error("{code}: {message}")]
    Refused { code: String, message: String },
    /// No answer within the request timeout, or every retry failed on the connection.
    #[error("no answer: {0}")]
    NoAnswer(String),
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
}

type TokenFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// How to connect.
#[derive(Clone)]
pub struct Options {
    /// WebSocket URLs (`ws://host:port/ws`), tried in turn.
    pub urls: Vec<String>,
    token: Arc<dyn Fn() -> TokenFuture + Send + Sync>,
    /// Backoff between reconnects: from `backoff_min`, doubling up to `backoff_max`, each
    /// wait drawn uniformly below the current bound (full jitter).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long a call waits for its answer on one connection.
    pub request_timeout: Duration,
    /// How many times a publish or send is tried (same idempotency key each time).
    pub attempts: u32,
    /// Refresh the token this long before it expires.
    pub refresh_before: Duration,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options").field("urls", &self.urls).finish_non_exhaustive()
    }
}

impl Options {
    /// `token` is called at every connect and before the token expires.
    pub fn new<F, Fut>(urls: Vec<String>, token: F) -> Options
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        Options {
            urls,
            token: Arc::new(move || Box::pin(token())),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            attempts: 8,
            refresh_before: Duration::from_secs(30),
        }
    }
}

enum Cmd {
    /// A command frame; the answer (ack, error, history, presence frame) goes to the sender,
    /// or Err when the connection ended before it.
    Call(Value, oneshot::Sender<Result<Value, String>>),
    Follow(String),
    Unfollow(String),
    Close,
}

/// A connected client; cheap to clone. Dropping every clone closes the connection.
#[derive(Clone, Debug)]
pub struct Client {
    tx: mpsc::UnboundedSender<Cmd>,
    opts: Arc<OptionsView>,
    next_key: Arc<AtomicU64>,
    key_prefix: Arc<str>,
}

#[derive(Debug)]
struct OptionsView {
    request_timeout: Duration,
    attempts: u32,
    backoff_min: Duration,
    backoff_max: Duration,
}

/// A subscribe's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscribed {
    pub position: Option<Position>,
}

/// A publish's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: String,
    pub seq: u64,
    /// The gateway had this key already: this is the first call's answer.
    pub duplicate: bool,
}

/// A page of history.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    pub messages: Vec<Message>,
    pub position: Option<Position>,
    pub more: bool,
    /// Why the page is empty when `since` could not be answered completely.
    pub lost: Option<String>,
}

impl Client {
    /// Starts connecting in the background; events arrive on the receiver.
    pub fn connect(opts: Options) -> (Client, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (etx, erx) = mpsc::unbounded_channel();
        let view = OptionsView {
            request_timeout: opts.request_timeout,
            attempts: opts.attempts,
            backoff_min: opts.backoff_min,
            backoff_max: opts.backoff_max,
        };
        let prefix: String = {
            let mut r = rand::rng();
            (0..12).map(|_| char::from(b"0123456789abcdefghijklmnopqrstuvwxyz"[r.random_range(0..36)])).collect()
        };
        tokio::spawn(Driver::new(opts, rx, etx).run());
        (Client { tx, opts: Arc::new(view), next_key: Arc::default(), key_prefix: prefix.into() }, erx)
    }

    async fn call(&self, cmd: Value) -> Result<Value, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Cmd::Call(cmd, tx)).map_err(|_| Error::Closed)?;
        match tokio::time::timeout(self.opts.request_timeout, rx).await {
            Ok(Ok(Ok(v))) if v["type"] == "error" => Err(Error::Refused {
                code: v["code"].as_str().unwrap_or_default().to_owned(),
                message: v["message"].as_str().unwrap_or_default().to_owned(),
            }),
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(why))) => Err(Error::NoAnswer(why)),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::NoAnswer("timed out".into())),
        }
    }

    /// A call with an idempotency key, retried on `unavailable` and on a lost connection.
    async fn call_keyed(&self, mut cmd: Value) -> Result<Value, Error> {
        let n = self.next_key.fetch_add(1, Ordering::Relaxed);
        cmd["idempotency_key"] = json!(format!("{}-{n}", self.key_prefix));
        let mut wait = self.opts.backoff_min;
        let mut last = Error::NoAnswer("not tried".into());
        for _ in 0..self.opts.attempts.max(1) {
            match self.call(cmd.clone()).await {
                Err(Error::Refused { code, .. }) if code == "unavailable" || code == "rate_limited" => {
                    last = Error::Refused { code, message: "retried".into() };
                }
                Err(e @ Error::NoAnswer(_)) => last = e,
                other => return other,
            }
            tokio::time::sleep(jitter(wait)).await;
            wait = (wait * 2).min(self.opts.backoff_max);
        }
        Err(last)
    }

    /// Follows `channel`: its messages arrive as [`Event::Message`], recovered across
    /// reconnects. Errors (e.g. `forbidden`) are answered here and the channel is not kept.
    pub async fn subscribe(&self, channel: &str) -> Result<Subscribed, Error> {
        self.tx.send(Cmd::Follow(channel.to_owned())).map_err(|_| Error::Closed)?;
        match self.call(json!({"op":"subscribe","channel":channel,"sb_follow":true})).await {
            Ok(v) => Ok(Subscribed { position: Position::from_json(&v["position"]) }),
            // Refused: not followed. No answer: still followed, subscribed on the next
            // connection.
            Err(e @ Error::Refused { .. }) => {
                let _ = self.tx.send(Cmd::Unfollow(channel.to_owned()));
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    pub async fn unsubscribe(&self, channel: &str) -> Result<(), Error> {
        self.tx.send(Cmd::Unfollow(channel.to_owned())).map_err(|_| Error::Closed)?;
        self.call(json!({"op":"unsubscribe","channel":channel})).await.map(|_| ())
    }

    /// Publishes `data` to `channel`, stored once whatever the retries.
    pub async fn publish(&self, channel: &str, data: Value) -> Result<Published, Error> {
        let v = self.call_keyed(json!({"op":"publish","channel":channel,"data":data})).await?;
        Ok(Published {
            id: v["id"].as_str().unwrap_or_default().to_owned(),
            seq: v["seq"].as_u64().unwrap_or(0),
            duplicate: v["duplicate"] == true,
        })
    }

    /// Sends `data` to every connection of `user`; returns the message id.
    pub async fn send(&self, user: &str, data: Value) -> Result<String, Error> {
        let v = self.call_keyed(json!({"op":"send","user":user,"data":data})).await?;
        Ok(v["id"].as_str().unwrap_or_default().to_owned())
    }

    /// The users subscribed to `channel`, on every node.
    pub async fn presence(&self, channel: &str) -> Result<Vec<String>, Error> {
        let v = self.call(json!({"op":"presence","channel":channel})).await?;
        Ok(v["users"]
            .as_array()
            .map(|a| a.iter().filter_map(|u| u.as_str().map(str::to_owned)).collect())
            .unwrap_or_default())
    }

    /// The newest `limit` messages, or the first `limit` after `since`.
    pub async fn history(&self, channel: &str, limit: u32, since: Option<&Position>) -> Result<History, Error> {
        let mut cmd = json!({"op":"history","channel":channel,"limit":limit});
        if let Some(p) = since {
            cmd["since"] = json!({"seq": p.seq, "epoch": p.epoch});
        }
        let v = self.call(cmd).await?;
        Ok(History {
            messages: v["messages"].as_array().into_iter().flatten().filter_map(message).collect(),
            position: Position::from_json(&v["position"]),
            more: v["more"] == true,
            lost: v["lost"].as_str().map(str::to_owned),
        })
    }

    /// Closes the connection and stops reconnecting.
    pub fn close(&self) {
        let _ = self.tx.send(Cmd::Close);
    }
}

fn jitter(bound: Duration) -> Duration {
    let ms = bound.as_millis().max(1) as u64;
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

fn message(v: &Value) -> Option<Message> {
    Some(Message {
        channel: v["channel"].as_str()?.to_owned(),
        id: v["id"].as_str().unwrap_or_default().to_owned(),
        from: v["from"].as_str().unwrap_or_default().to_owned(),
        seq: v["seq"].as_u64()?,
        epoch: v["epoch"].as_str().unwrap_or_default().to_owned(),
        data: v["data"].clone(),
    })
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The background task: one connection at a time, the followed channels and their
/// positions, the calls waiting for answers.
struct Driver {
    opts: Options,
    rx: mpsc::UnboundedReceiver<Cmd>,
    events: mpsc::UnboundedSender<Event>,
    /// Followed channels and the last position shown of each.
    follows: HashMap<String, Option<Position>>,
    pending: HashMap<String, oneshot::Sender<Result<Value, String>>>,
    next_ref: u64,
    at: usize,
}

enum End {
    /// Reconnect.
    Lost(u16, String),
    /// Closed by the application, or every handle dropped.
    Stop,
}

impl Driver {
    fn new(opts: Options, rx: mpsc::UnboundedReceiver<Cmd>, events: mpsc::UnboundedSender<Event>) -> Driver {
        Driver { opts, rx, events, follows: HashMap::new(), pending: HashMap::new(), next_ref: 0, at: 0 }
    }

    async fn run(mut self) {
        let mut wait = self.opts.backoff_min;
        loop {
            let url = self.opts.urls[self.at % self.opts.urls.len().max(1)].clone();
            self.at += 1;
            match self.open(&url).await {
                Some((ws, welcome)) => {
                    wait = self.opts.backoff_min;
                    let expires = welcome["expires_at"].as_u64();
                    let _ = self.events.send(Event::Connected(welcome));
                    match self.session(ws, expires).await {
                        End::Stop => return,
                        End::Lost(code, reason) => {
                            for (_, tx) in self.pending.drain() {
                                let _ = tx.send(Err(format!("connection lost ({code})")));
                            }
                            let _ = self.events.send(Event::Disconnected { code, reason });
                        }
                    }
                }
                None => {
                    // Calls made while no connection is up wait for the next one; only
                    // a close ends the driver.
                    if self.drain_while_down().await {
                        return;
                    }
                }
            }
            let pause = jitter(wait);
            wait = (wait * 2).min(self.opts.backoff_max);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                stop = self.idle_commands() => if stop { return },
            }
        }
    }

    /// Handles follow/unfollow while disconnected; true when told to stop.
    async fn idle_commands(&mut self) -> bool {
        loop {
            match self.rx.recv().await {
                None | Some(Cmd::Close) => return true,
                Some(Cmd::Follow(c)) => {
                    self.follows.entry(c).or_insert(None);
                }
                Some(Cmd::Unfollow(c)) => {
                    self.follows.remove(&c);
                }
                Some(Cmd::Call(_, tx)) => {
                    let _ = tx.send(Err("not connected".into()));
                }
            }
        }
    }

    async fn drain_while_down(&mut self) -> bool {
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Cmd::Close => return true,
                Cmd::Follow(c) => {
                    self.follows.entry(c).or_insert(None);
                }
                Cmd::Unfollow(c) => {
                    self.follows.remove(&c);
                }
                Cmd::Call(_, tx) => {
                    let _ = tx.send(Err("not connected".into()));
                }
            }
        }
        false
    }

    async fn open(&self, url: &str) -> Option<(Ws, Value)> {
        let token = (self.opts.token)().await.ok()?;
        let (mut ws, _) =
            tokio::time::timeout(self.opts.request_timeout, tokio_tungstenite::connect_async(url)).await.ok()?.ok()?;
        // The token in the first message, not the URL (kept out of access logs).
        let connect = json!({"op":"connect","token":token,"ref":"connect"});
        ws.send(WsMessage::text(connect.to_string())).await.ok()?;
        let welcome = tokio::time::timeout(self.opts.request_timeout, ws.next()).await.ok()??.ok()?;
        let v: Value = serde_json::from_str(welcome.to_text().ok()?).ok()?;
        (v["type"] == "welcome").then_some((ws, v))
    }

    fn ref_for(&mut self) -> String {
        self.next_ref += 1;
        format!("r{}", self.next_ref)
    }

    async fn session(&mut self, mut ws: Ws, expires: Option<u64>) -> End {
        // Resubscribe every followed channel from its last position.
        let follows: Vec<(String, Option<Position>)> =
            self.follows.iter().map(|(c, p)| (c.clone(), p.clone())).collect();
        let mut resuming: HashMap<String, String> = HashMap::new();
        for (channel, since) in follows {
            let r = self.ref_for();
            let mut cmd = json!({"op":"subscribe","channel":channel,"ref":r});
            if let Some(p) = &since {
                cmd["since"] = json!({"seq": p.seq, "epoch": p.epoch});
            }
            if ws.send(WsMessage::text(cmd.to_string())).await.is_err() {
                return End::Lost(1006, "send failed".into());
            }
            resuming.insert(r, channel);
        }
        let mut refresh_at = expires.map(|e| refresh_instant(e, self.opts.refresh_before));
        loop {
            let refresh = async {
                match refresh_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    None | Some(Cmd::Close) => {
                        let _ = ws.close(None).await;
                        return End::Stop;
                    }
                    Some(Cmd::Follow(c)) => {
                        self.follows.entry(c).or_insert(None);
                    }
                    Some(Cmd::Unfollow(c)) => {
                        self.follows.remove(&c);
                    }
                    Some(Cmd::Call(mut cmd, tx)) => {
                        let r = self.ref_for();
                        cmd["ref"] = json!(r);
                        if let Some(o) = cmd.as_object_mut() {
                            o.remove("sb_follow");
                        }
                        if ws.send(WsMessage::text(cmd.to_string())).await.is_err() {
                            let _ = tx.send(Err("connection lost".into()));
                            return End::Lost(1006, "send failed".into());
                        }
                        self.pending.insert(r, tx);
                    }
                },
                () = refresh => {
                    refresh_at = None;
                    if let Ok(token) = (self.opts.token)().await {
                        let r = self.ref_for();
                        let cmd = json!({"op":"refresh","token":token,"ref":r});
                        if ws.send(WsMessage::text(cmd.to_string())).await.is_err() {
                            return End::Lost(1006, "send failed".into());
                        }
                        let (tx, _) = oneshot::channel();
                        self.pending.insert(r, tx);
                    }
                }
                frame = ws.next() => {
                    let v: Value = match frame {
                        Some(Ok(WsMessage::Text(t))) => match serde_json::from_str(&t) {
                            Ok(v) => v,
                            Err(_) => continue,
                        },
                        Some(Ok(WsMessage::Close(c))) => {
                            let (code, reason) = c.map_or((1005, String::new()), |c| (u16::from(c.code), c.reason.to_string()));
                            return End::Lost(code, reason);
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return End::Lost(1006, e.to_string()),
                        None => return End::Lost(1006, "connection ended".into()),
                    };
                    if let Some(at) = self.frame(v, &mut resuming) {
                        refresh_at = Some(refresh_instant(at, self.opts.refresh_before));
                    }
                }
            }
        }
    }

    /// Handles one frame from the gateway; returns a new expiry when a refresh moved it.
    fn frame(&mut self, v: Value, resuming: &mut HashMap<String, String>) -> Option<u64> {
        let r = v["ref"].as_str().map(str::to_owned);
        match v["type"].as_str() {
            Some("message") => {
                let m = message(&v)?;
                let last = self.follows.get_mut(&m.channel)?;
                // Drop what was already shown (a redelivery or a recovery overlap).
                if last.as_ref().is_some_and(|p| p.epoch == m.epoch && m.seq <= p.seq) {
                    return None;
                }
                *last = Some(Position { seq: m.seq, epoch: m.epoch.clone() });
                let _ = self.events.send(Event::Message(m));
            }
            Some("direct") => {
                let _ = self.events.send(Event::Direct {
                    id: v["id"].as_str().unwrap_or_default().to_owned(),
                    from: v["from"].as_str().unwrap_or_default().to_owned(),
                    data: v["data"].clone(),
                });
            }
            Some("gap") => {
                let channel = v["channel"].as_str()?.to_owned();
                let after = Position::from_json(&v["after"]);
                let reason = v["reason"].as_str().unwrap_or_default().to_owned();
                let _ = self.events.send(Event::Gap { channel, after, reason });
            }
            Some("presence") if r.is_none() => {
                let _ = self.events.send(Event::Presence(v));
            }
            _ => {
                let r = r?;
                if let Some(channel) = resuming.remove(&r) {
                    self.resumed(&channel, &v);
                    return None;
                }
                let expiry = (v["type"] == "ack").then(|| v["expires_at"].as_u64()).flatten();
                if v["type"] == "ack"
                    && let Some(channel) = v["channel"].as_str()
                    && let Some(p) = Position::from_json(&v["position"])
                    && let Some(last @ None) = self.follows.get_mut(channel)
                {
                    *last = Some(p);
                }
                if let Some(tx) = self.pending.remove(&r) {
                    let _ = tx.send(Ok(v));
                }
                return expiry;
            }
        }
        None
    }

    /// The answer to a resubscribe after a reconnect.
    fn resumed(&mut self, channel: &str, v: &Value) {
        let Some(last) = self.follows.get_mut(channel) else { return };
        if v["type"] == "error" {
            let reason = v["code"].as_str().unwrap_or_default().to_owned();
            let _ = self.events.send(Event::Gap { channel: channel.to_owned(), after: last.clone(), reason });
            self.follows.remove(channel);
            return;
        }
        let position = Position::from_json(&v["position"]);
        match v["recovered"].as_bool() {
            Some(true) => {}
            Some(false) => {
                let reason = v["reason"].as_str().unwrap_or_default().to_owned();
                let _ = self.events.send(Event::Gap { channel: channel.to_owned(), after: last.clone(), reason });
                *last = position;
            }
            None => *last = position,
        }
    }
}

/// When to refresh a token that expires at `exp` (unix seconds).
fn refresh_instant(exp: u64, before: Duration) -> tokio::time::Instant {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let left = Duration::from_secs(exp.saturating_sub(now)).saturating_sub(before);
    tokio::time::Instant::now() + left
}
