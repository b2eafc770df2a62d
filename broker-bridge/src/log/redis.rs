//! Redis Streams as the log. Layout (`--topic T`; every key carries the hash tag
//! `{T}`, so a Redis Cluster keeps them on one node):
//!
//! - one stream per partition, `{T}:<p>`, entry id `<offset>-1` (assigned by a
//!   script: the last entry's offset + 1), one field `e` = the envelope, trimmed
//!   with `MAXLEN ~ --stream-max-len`;
//! - `{T}:meta`: a hash with `id` (the log's identity, in epochs) and `partitions`
//!   (fixed by the first bridge);
//! - `{T}:lease:<p>`: a hash with `rev` and `val` (owner, generation, committed
//!   offset), written only by a compare-and-set script;
//! - `{T}:members`: a sorted set of live bridges scored by the server's clock.
//!
//! An append is acknowledged when Redis answered it: with `appendonly yes` it is in
//! the AOF (written before the reply; fsynced every second by default).

use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionManager;

use super::AppendError;
use super::lease::{Lease, Stored};
use crate::config::Cli;
use crate::history::Collector;

const APPEND: &str = r"
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local n = 0
if #top > 0 then n = tonumber(string.match(top[1][1], '^(%d+)')) + 1 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], n .. '-1', 'e', ARGV[1])
return n
";

const CAS: &str = r"
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if rev ~= tonumber(ARGV[1]) then return -1 end
redis.call('HSET', KEYS[1], 'rev', rev + 1, 'val', ARGV[2])
return rev + 1
";

const BEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return redis.call('ZCARD', KEYS[1])
";

/// A Redis Streams log.
pub struct RedisLog {
    client: redis::Client,
    con: ConnectionManager,
    topic: String,
    pub partitions: i32,
    max_len: u64,
    lease_ms: u64,
    timeout: Duration,
    append: redis::Script,
    cas: redis::Script,
    beat: redis::Script,
    /// History reads running and waiting.
    pub reads: super::Reads,
}

impl std::fmt::Debug for RedisLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLog").field("topic", &self.topic).field("partitions", &self.partitions).finish()
    }
}

fn text(e: impl std::fmt::Display) -> String {
    format!("redis: {e}")
}

/// One entry as XRANGE / XREAD return it: id, then field-value pairs.
type Entry = (String, Vec<Vec<u8>>);

fn offset_of(id: &str) -> Option<i64> {
    id.split_once('-')?.0.parse().ok()
}

fn payload_of(fields: Vec<Vec<u8>>) -> Bytes {
    let mut it = fields.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if k == b"e" {
            return Bytes::from(v);
        }
    }
    Bytes::new()
}

async fn manager(client: &redis::Client, timeout: Duration) -> Result<ConnectionManager, String> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5).min(timeout.max(Duration::from_secs(1)))))
        .set_response_timeout(Some(timeout))
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    client.get_connection_manager_with_config(config).await.map_err(text)
}

impl RedisLog {
    pub async fn connect(url: &str, cli: &Cli) -> Result<Self, String> {
        let shown = super::redact(url);
        let client = redis::Client::open(url).map_err(|e| format!("redis {shown}: {e}"))?;
        // Reads block for up to a second: the response timeout is above that.
        let timeout = cli.produce_timeout.max(Duration::from_secs(2));
        let con = tokio::time::timeout(Duration::from_secs(10), manager(&client, timeout))
            .await
            .map_err(|_| format!("redis {shown}: no answer"))?
            .map_err(|e| format!("{e} ({shown})"))?;
        let mut log = Self {
            client,
            con,
            topic: cli.topic.clone(),
            partitions: 0,
            max_len: cli.stream_max_len,
            lease_ms: cli.lease.as_millis() as u64,
            timeout,
            append: redis::Script::new(APPEND),
            cas: redis::Script::new(CAS),
            beat: redis::Script::new(BEAT),
            reads: super::Reads::default(),
        };
        let (partitions, _) = log.ensure_meta(cli.partitions, cli.create_topics).await?;
        log.partitions = partitions;
        Ok(log)
    }

    fn key(&self, suffix: impl std::fmt::Display) -> String {
        format!("{{{}}}:{suffix}", self.topic)
    }

    async fn ensure_meta(&self, partitions: i32, create: bool) -> Result<(i32, [u8; 16]), String> {
        let mut con = self.con.clone();
        let meta = self.key("meta");
        if create {
            let fresh: [u8; 16] = rand::random();
            let hex: String = fresh.iter().map(|b| format!("{b:02x}")).collect();
            let _: () = redis::pipe()
                .hset_nx(&meta, "id", hex)
                .ignore()
                .hset_nx(&meta, "partitions", partitions)
                .ignore()
                .query_async(&mut con)
                .await
                .map_err(text)?;
        }
        let (id, p): (Option<String>, Option<i32>) =
            redis::cmd("HMGET").arg(&meta).arg("id").arg("partitions").query_async(&mut con).await.map_err(text)?;
        let (Some(id), Some(p)) = (id, p) else {
            return Err(format!("redis: {meta} is missing (start with --create-topics)"));
        };
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = id.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or("redis: bad log id")?;
        }
        Ok((p, out))
    }

    pub async fn append(&self, key: &str, payload: Vec<u8>, timeout: Duration) -> Result<i64, AppendError> {
        let p = super::partition_of(key, self.partitions);
        let mut con = self.con.clone();
        let stream = self.key(p);
        let mut call = self.append.key(&stream);
        call.arg(payload).arg(self.max_len);
        match tokio::time::timeout(timeout, call.invoke_async::<i64>(&mut con)).await {
            Ok(Ok(offset)) => Ok(offset),
            Ok(Err(e)) => Err(AppendError::Failed("redis", e.to_string())),
            Err(_) => Err(AppendError::TimedOut("redis")),
        }
    }

    pub async fn watermarks(&self, p: i32) -> Result<(i64, i64), String> {
        let mut con = self.con.clone();
        let stream = self.key(p);
        let (first, last): (Vec<Entry>, Vec<Entry>) = redis::pipe()
            .cmd("XRANGE")
            .arg(&stream)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("XREVRANGE")
            .arg(&stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut con)
            .await
            .map_err(text)?;
        let low = first.first().and_then(|e| offset_of(&e.0));
        let high = last.first().and_then(|e| offset_of(&e.0)).map(|o| o + 1);
        Ok(match (low, high) {
            (Some(l), Some(h)) => (l, h),
            _ => (0, 0),
        })
    }

    /// A reader of partition `p` from `from` on, on its own connection (reads block).
    pub async fn reader(&self, p: i32, from: i64) -> Result<Reader, String> {
        Ok(Reader { con: manager(&self.client, self.timeout).await?, stream: self.key(p), after: after(from) })
    }

    pub async fn scan(&self, p: i32, from: i64, to: i64, mut c: Collector) -> Result<Collector, String> {
        let mut con = self.con.clone();
        let stream = self.key(p);
        let mut start = format!("{from}-1");
        let mut first = true;
        let deadline = tokio::time::Instant::now() + crate::history::READ_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            let page: Vec<Entry> = redis::cmd("XRANGE")
                .arg(&stream)
                .arg(&start)
                .arg(format!("{}-1", to - 1))
                .arg("COUNT")
                .arg(512)
                .query_async(&mut con)
                .await
                .map_err(text)?;
            if page.is_empty() {
                return Ok(c);
            }
            for (id, fields) in page {
                let Some(offset) = offset_of(&id) else { continue };
                if first && offset > from {
                    c.too_old = true; // trimmed after the watermarks were taken
                    return Ok(c);
                }
                first = false;
                let go_on = match <proto::bridge::v1::Envelope as prost::Message>::decode(payload_of(fields)) {
                    Ok(env) => c.offer(offset, env),
                    Err(_) => true,
                };
                if !go_on || offset + 1 >= to {
                    return Ok(c);
                }
                start = format!("{}-1", offset + 1);
            }
        }
        Err("redis: read timed out".into())
    }

    pub async fn discover(&self) -> Result<(i32, [u8; 16]), String> {
        // After a restart that lost the data, a new identity (and new epochs).
        self.ensure_meta(self.partitions, true).await
    }

    pub async fn lease(&self, p: i32) -> Result<Option<Stored>, String> {
        let mut con = self.con.clone();
        let (rev, val): (Option<u64>, Option<String>) = redis::cmd("HMGET")
            .arg(self.key(format!("lease:{p}")))
            .arg("rev")
            .arg("val")
            .query_async(&mut con)
            .await
            .map_err(text)?;
        Ok(match (rev, val.as_deref().and_then(Lease::decode)) {
            (Some(revision), Some(lease)) => Some(Stored { revision, lease }),
            _ => None,
        })
    }

    /// Compare-and-set; `Ok(None)` when the record changed meanwhile.
    pub async fn cas(&self, p: i32, expect: Option<u64>, lease: &Lease) -> Result<Option<u64>, String> {
        let mut con = self.con.clone();
        let key = self.key(format!("lease:{p}"));
        let mut call = self.cas.key(&key);
        call.arg(expect.unwrap_or(0)).arg(lease.encode());
        let rev: i64 = call.invoke_async(&mut con).await.map_err(text)?;
        Ok(u64::try_from(rev).ok())
    }

    pub async fn beat(&self, me: &str) -> Result<usize, String> {
        let mut con = self.con.clone();
        let key = self.key("members");
        let mut call = self.beat.key(&key);
        call.arg(me).arg(self.lease_ms);
        let n: usize = call.invoke_async(&mut con).await.map_err(text)?;
        Ok(n.max(1))
    }
}

/// The stream id after which offset `from` comes.
fn after(from: i64) -> String {
    if from <= 0 { "0-0".into() } else { format!("{}-1", from - 1) }
}

/// Blocking reads of one partition's stream.
pub struct Reader {
    con: ConnectionManager,
    stream: String,
    after: String,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("redis::Reader").field("stream", &self.stream).finish_non_exhaustive()
    }
}

impl Reader {
    /// The next records (none after a second without any), in offset order.
    pub async fn next(&mut self) -> Result<Vec<(i64, Bytes)>, String> {
        type Reply = Option<Vec<(String, Vec<Entry>)>>;
        let reply: Reply = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(512)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(&self.after)
            .query_async(&mut self.con)
            .await
            .map_err(text)?;
        let mut out = Vec::new();
        for (_, entries) in reply.unwrap_or_default() {
            for (id, fields) in entries {
                if let Some(offset) = offset_of(&id) {
                    self.after = id;
                    out.push((offset, payload_of(fields)));
                }
            }
        }
        Ok(out)
    }
}
