//! NATS JetStream as the log. Layout (`--topic T`, `--partitions N`):
//!
//! - one stream per partition, `<T'>_<p>` (T' = T with every character outside
//!   `[A-Za-z0-9_-]` as `_`), subject `<T>.<p>`, file storage, `--replication`
//!   replicas, `--retention` max age, `--stream-max-bytes`; offset = sequence − 1;
//! - a KV bucket `<T'>_bridge`: `id` (the log's identity, in epochs), `partitions`
//!   (fixed by the first bridge), `lease_<p>` (owner, generation, committed offset);
//! - a KV bucket `<T'>_members` whose entries expire after the lease: live bridges.
//!
//! A keyed publish carries `Nats-Msg-Id` = its message id, so a retry within the
//! stream's duplicate window (2 min) is stored once.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;

use super::lease::{Lease, Stored};
use super::{AppendError, safe_name};
use crate::config::Cli;
use crate::history::Collector;

/// A NATS JetStream log.
pub struct NatsLog {
    js: jetstream::Context,
    topic: String,
    name: String,
    pub partitions: i32,
    meta: kv::Store,
    members: kv::Store,
    id: [u8; 16],
    read_timeout: Duration,
    /// History reads running and waiting.
    pub reads: super::Reads,
}

impl std::fmt::Debug for NatsLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsLog").field("topic", &self.topic).field("partitions", &self.partitions).finish()
    }
}

fn text(e: impl std::fmt::Display) -> String {
    format!("nats: {e}")
}

fn id_from(b: &[u8]) -> Option<[u8; 16]> {
    let s = std::str::from_utf8(b).ok()?;
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// A KV bucket, its stream created here when missing: async-nats's own `create_key_value`
/// first asks for the account info in a form nats-server 2.9 does not answer.
async fn bucket(
    js: &jetstream::Context,
    bucket: String,
    max_age: Duration,
    replicas: usize,
    create: bool,
) -> Result<kv::Store, String> {
    if let Ok(kv) = js.get_key_value(&bucket).await {
        return Ok(kv);
    }
    if !create {
        return Err(format!("nats: bucket {bucket} is missing (start with --create-topics)"));
    }
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        max_age,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_bytes: -1,
        max_messages: -1,
        max_message_size: -1,
        ..Default::default()
    };
    if let Err(e) = js.create_stream(config).await {
        // Another bridge may have created it meanwhile.
        if js.get_key_value(&bucket).await.is_err() {
            return Err(format!("nats: create bucket {bucket}: {e}"));
        }
    }
    js.get_key_value(&bucket).await.map_err(|e| format!("nats: bucket {bucket}: {e}"))
}

/// `nats://user:pass@host:port` → (`nats://host:port`, user and password); `nats://token@…`
/// → a token. Percent-escapes in them are decoded.
fn split_credentials(url: &str) -> (String, Option<(String, Option<String>)>) {
    let Some((scheme, rest)) = url.split_once("://") else { return (url.to_owned(), None) };
    let Some((info, host)) = rest.rsplit_once('@') else { return (url.to_owned(), None) };
    let decode = |s: &str| kit::percent_decode(s, false).into_owned();
    let credentials = match info.split_once(':') {
        Some((user, pass)) => (decode(user), Some(decode(pass))),
        None => (decode(info), None),
    };
    (format!("{scheme}://{host}"), Some(credentials))
}

impl NatsLog {
    /// Connects, creates the buckets (and, with `--create-topics`, the streams) when missing.
    pub async fn connect(url: &str, cli: &Cli) -> Result<Self, String> {
        // async-nats ignores credentials in the URL: they go in the options.
        let (url, credentials) = split_credentials(url);
        let options = match credentials {
            Some((user, Some(pass))) => async_nats::ConnectOptions::with_user_and_password(user, pass),
            Some((token, None)) => async_nats::ConnectOptions::with_token(token),
            None => async_nats::ConnectOptions::new(),
        };
        let url = url.as_str();
        let client = options
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    event => tracing::warn!(%event, "nats"),
                }
            })
            .name("switchboard-bridge")
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(cli.produce_timeout))
            // Back within a fraction of a second once the server is.
            .reconnect_delay_callback(|n| Duration::from_millis((50 * n as u64).min(500)))
            .connect(url)
            .await
            .map_err(|e| format!("nats {url}: {e}"))?;
        let js = jetstream::new(client);
        let name = safe_name(&cli.topic);
        let replicas = cli.replication.max(1) as usize;
        let meta = bucket(&js, format!("{name}_bridge"), Duration::ZERO, replicas, cli.create_topics).await?;
        let members = bucket(&js, format!("{name}_members"), cli.lease, replicas, true).await?;
        let mut log = Self {
            js,
            topic: cli.topic.clone(),
            name,
            partitions: 0,
            meta,
            members,
            id: [0; 16],
            read_timeout: crate::history::READ_TIMEOUT,
            reads: super::Reads::default(),
        };
        let (partitions, id) = log.ensure_meta(cli.partitions).await?;
        log.partitions = partitions;
        log.id = id;
        for p in 0..partitions {
            let config = stream::Config {
                name: log.stream(p),
                subjects: vec![log.subject(p)],
                storage: stream::StorageType::File,
                num_replicas: cli.replication.max(1) as usize,
                max_age: cli.retention,
                max_bytes: cli.stream_max_bytes,
                discard: stream::DiscardPolicy::Old,
                allow_direct: true,
                ..Default::default()
            };
            let found = log.js.get_stream(log.stream(p)).await;
            match found {
                Ok(_) => {}
                Err(_) if cli.create_topics => {
                    log.js
                        .create_stream(config)
                        .await
                        .map_err(|e| format!("nats: create stream {}: {e}", log.stream(p)))?;
                }
                Err(_) => {
                    return Err(format!("nats: stream {} is missing (start with --create-topics)", log.stream(p)));
                }
            }
        }
        Ok(log)
    }

    /// The identity and partition count, written by the first bridge (create is atomic).
    async fn ensure_meta(&self, partitions: i32) -> Result<(i32, [u8; 16]), String> {
        let fresh: [u8; 16] = rand::random();
        let hex: String = fresh.iter().map(|b| format!("{b:02x}")).collect();
        let _ = self.meta.create("id", Bytes::from(hex)).await;
        let _ = self.meta.create("partitions", Bytes::from(partitions.to_string())).await;
        let id = self.meta.get("id").await.map_err(text)?.and_then(|b| id_from(&b)).ok_or("nats: no log id")?;
        let p = self
            .meta
            .get("partitions")
            .await
            .map_err(text)?
            .and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok())
            .ok_or("nats: no partition count")?;
        Ok((p, id))
    }

    fn stream(&self, p: i32) -> String {
        format!("{}_{p}", self.name)
    }

    fn subject(&self, p: i32) -> String {
        format!("{}.{p}", self.topic)
    }

    pub async fn append(
        &self,
        key: &str,
        payload: Vec<u8>,
        dedup_id: Option<&str>,
        timeout: Duration,
    ) -> Result<i64, AppendError> {
        let p = super::partition_of(key, self.partitions);
        let send = async {
            let mut headers = async_nats::HeaderMap::new();
            if let Some(id) = dedup_id {
                headers.insert("Nats-Msg-Id", id);
            }
            let ack =
                self.js.publish_with_headers(self.subject(p), headers, Bytes::from(payload)).await.map_err(text)?;
            ack.await.map_err(text)
        };
        match tokio::time::timeout(timeout, send).await {
            Ok(Ok(ack)) => Ok(ack.sequence as i64 - 1),
            Ok(Err(e)) => Err(AppendError::Failed("nats", e)),
            Err(_) => Err(AppendError::TimedOut("nats")),
        }
    }

    pub async fn watermarks(&self, p: i32) -> Result<(i64, i64), String> {
        let s = tokio::time::timeout(self.read_timeout, self.js.get_stream(self.stream(p)))
            .await
            .map_err(|_| "nats: no answer".to_owned())?
            .map_err(text)?;
        let state = &s.cached_info().state;
        let high = state.last_sequence as i64;
        let low = if state.messages == 0 { high } else { state.first_sequence as i64 - 1 };
        Ok((low, high))
    }

    /// A reader of partition `p` from `from` on.
    pub async fn reader(&self, p: i32, from: i64) -> Result<Reader, String> {
        let s = self.js.get_stream_no_info(self.stream(p)).await.map_err(text)?;
        let consumer = s
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: from.max(0) as u64 + 1 },
                ..Default::default()
            })
            .await
            .map_err(text)?;
        Ok(Reader {
            messages: consumer.messages().await.map_err(text)?,
            js: self.js.clone(),
            stream: self.stream(p),
            next: from.max(0),
        })
    }

    pub async fn scan(&self, p: i32, from: i64, to: i64, mut c: Collector) -> Result<Collector, String> {
        if from >= to {
            return Ok(c);
        }
        let read = async {
            let mut r = self.reader(p, from).await?;
            let mut first = true;
            loop {
                for (offset, payload) in r.next().await? {
                    if first && offset > from {
                        c.too_old = true; // retention removed `from` after the watermarks were taken
                        return Ok(c);
                    }
                    first = false;
                    if offset >= to {
                        return Ok(c);
                    }
                    let go_on = match <proto::bridge::v1::Envelope as prost::Message>::decode(payload) {
                        Ok(env) => c.offer(offset, env),
                        Err(_) => true,
                    };
                    if !go_on || offset + 1 >= to {
                        return Ok(c);
                    }
                }
            }
        };
        tokio::time::timeout(self.read_timeout, read).await.map_err(|_| "nats: read timed out".to_owned())?
    }

    pub async fn discover(&self) -> Result<(i32, [u8; 16]), String> {
        let (p, id) = self.ensure_meta(self.partitions).await?;
        Ok((p, id))
    }

    pub async fn lease(&self, p: i32) -> Result<Option<Stored>, String> {
        let entry = self.meta.entry(format!("lease_{p}")).await.map_err(text)?;
        Ok(entry.filter(|e| e.operation == kv::Operation::Put).and_then(|e| {
            let lease = Lease::decode(std::str::from_utf8(&e.value).ok()?)?;
            Some(Stored { revision: e.revision, lease })
        }))
    }

    /// Compare-and-set; `Ok(None)` when the record changed meanwhile (someone else wrote it).
    pub async fn cas(&self, p: i32, expect: Option<u64>, lease: &Lease) -> Result<Option<u64>, String> {
        let key = format!("lease_{p}");
        let value = Bytes::from(lease.encode());
        let written = match expect {
            None => self.meta.create(&key, value).await.map_err(text),
            Some(rev) => self.meta.update(&key, value, rev).await.map_err(text),
        };
        match written {
            Ok(rev) => Ok(Some(rev)),
            Err(e) => match self.lease(p).await {
                Ok(now) if now.as_ref().map(|s| s.revision) != expect => Ok(None),
                _ => Err(e),
            },
        }
    }

    /// Renews this bridge's membership; the number of live bridges.
    pub async fn beat(&self, me: &str) -> Result<usize, String> {
        self.members.put(format!("m_{}", safe_name(me)), Bytes::from_static(b"1")).await.map_err(text)?;
        let mut keys = self.members.keys().await.map_err(text)?;
        let mut n = 0;
        while let Some(k) = keys.next().await {
            k.map_err(text)?;
            n += 1;
        }
        Ok(n.max(1))
    }
}

/// An ordered consumer of one partition.
pub struct Reader {
    messages: consumer::pull::Ordered,
    js: jetstream::Context,
    stream: String,
    /// The next offset expected.
    next: i64,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("nats::Reader").finish_non_exhaustive()
    }
}

impl Reader {
    /// The next records (none after a second without any), in offset order. A consumer
    /// that delivers nothing for a second while the stream holds more (it did not come
    /// back after the server restarted) is an error: the caller opens a new one.
    pub async fn next(&mut self) -> Result<Vec<(i64, Bytes)>, String> {
        match tokio::time::timeout(Duration::from_secs(1), self.messages.next()).await {
            Ok(Some(Ok(m))) => {
                let seq = m.info().map_err(text)?.stream_sequence;
                self.next = seq as i64;
                Ok(vec![(seq as i64 - 1, m.message.payload.clone())])
            }
            Ok(Some(Err(e))) => Err(text(e)),
            Ok(None) => Err("nats: the consumer ended".into()),
            Err(_) => {
                let s = self.js.get_stream(&self.stream).await.map_err(text)?;
                if s.cached_info().state.last_sequence as i64 > self.next {
                    return Err("nats: the consumer stalled".into());
                }
                Ok(Vec::new())
            }
        }
    }
}

#[cfg(test)]
mod credential_tests {
    use super::split_credentials;

    #[test]
    fn credentials_come_out_of_the_url() {
        assert_eq!(split_credentials("nats://h:4222"), ("nats://h:4222".into(), None));
        assert_eq!(
            split_credentials("nats://bob:p%40ss@h:4222"),
            ("nats://h:4222".into(), Some(("bob".into(), Some("p@ss".into()))))
        );
        assert_eq!(split_credentials("nats://s3cret@h:4222"), ("nats://h:4222".into(), Some(("s3cret".into(), None))));
    }
}
