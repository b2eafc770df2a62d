//! Plain HTTP/1.1 clients for the fallback transports, written against the wire
//! (not the gateway's code): one-shot requests, and a Server-Sent Events reader
//! (chunked transfer coding, `id:`/`data:`/`retry:` fields, comment lines).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ws::WAIT;

/// A response: status, head (lower-cased header names), body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<String> {
        header_of(&self.head, name)
    }
}

fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

/// The response head, or None when the connection failed or closed before it.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).into_owned();
            buf.drain(..i + 4);
            return Some(head);
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Decodes a chunked body from `raw` into `out`; true when the last chunk was seen.
fn dechunk(raw: &mut Vec<u8>, out: &mut Vec<u8>) -> bool {
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else { return false };
        let size_line = String::from_utf8_lossy(&raw[..eol]).into_owned();
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16).expect("chunk size");
        if raw.len() < eol + 2 + size + 2 {
            return false;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw.drain(..eol + 2 + size + 2);
        if size == 0 {
            return true;
        }
    }
}

/// One request on a fresh connection (`Connection: close`), the whole response.
pub async fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    try_request(addr, method, path, headers, body, WAIT * 3).await.expect("a response in time")
}

/// [`request`] that gives up: None when the connection fails, or ends or `limit` passes
/// before the response is whole (what a client sees of a cut or a partition).
pub async fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    limit: Duration,
) -> Option<Reply> {
    tokio::time::timeout(limit, async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        // The server may answer (413) before it read everything: a failed write is fine.
        let _ = s.write_all(&bytes).await;
        let mut buf = Vec::new();
        let head = read_head(&mut s, &mut buf).await?;
        let status = head.split(' ').nth(1).and_then(|c| c.parse().ok())?;
        // A reset after the whole response (a server answering before it read the
        // body) is fine: what was read is judged by its framing below.
        let _ = s.read_to_end(&mut buf).await;
        let body = if header_of(&head, "transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            let mut out = Vec::new();
            if !dechunk(&mut buf, &mut out) {
                return None;
            }
            out
        } else {
            let len: Option<usize> = header_of(&head, "content-length").and_then(|l| l.parse().ok());
            if len.is_some_and(|l| buf.len() < l) {
                return None;
            }
            buf
        };
        Some(Reply { status, head, body: String::from_utf8_lossy(&body).into_owned() })
    })
    .await
    .ok()
    .flatten()
}

/// One Server-Sent Event (or comment line, `comment`).
#[derive(Debug, Clone, Default)]
pub struct Event {
    pub id: Option<String>,
    pub data: String,
    pub retry: Option<u64>,
    pub comment: bool,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("event data is not JSON ({e}): {}", self.data))
    }
}

/// An open `text/event-stream` response.
#[derive(Debug)]
pub struct Sse {
    s: TcpStream,
    raw: Vec<u8>,
    body: Vec<u8>,
    ended: bool,
    pub head: String,
    /// The last `id:` seen (what a browser would send as `Last-Event-ID`).
    pub last_id: Option<String>,
}

impl Sse {
    /// GETs `path`; `Err` with the response when it is not a 200 event stream.
    pub async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Sse, Reply> {
        Sse::try_open(addr, path, headers, WAIT).await.expect("connected, and the response head in time")
    }

    /// [`Sse::open`] that gives up: None when the connection fails, or ends or `limit`
    /// passes before the head (or a refusal's whole body).
    pub async fn try_open(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        limit: Duration,
    ) -> Option<Result<Sse, Reply>> {
        tokio::time::timeout(limit, async {
            let mut s = TcpStream::connect(addr).await.ok()?;
            let mut req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n");
            for (k, v) in headers {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
            req.push_str("\r\n");
            s.write_all(req.as_bytes()).await.ok()?;
            let mut raw = Vec::new();
            let head = read_head(&mut s, &mut raw).await?;
            let status: u16 = head.split(' ').nth(1).and_then(|c| c.parse().ok())?;
            if status != 200 {
                let len: usize = header_of(&head, "content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
                while raw.len() < len {
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    raw.extend_from_slice(&chunk[..n]);
                }
                return Some(Err(Reply { status, head, body: String::from_utf8_lossy(&raw).into_owned() }));
            }
            assert_eq!(header_of(&head, "content-type").as_deref(), Some("text/event-stream"), "{head}");
            Some(Ok(Sse { s, raw, body: Vec::new(), ended: false, head, last_id: None }))
        })
        .await
        .ok()
        .flatten()
    }

    /// The next event or comment; `None` at the end of the stream.
    pub async fn next_any(&mut self) -> Option<Event> {
        self.next_within(WAIT).await.expect("an event in time")
    }

    /// The next event or comment within `limit`; `Err` on timeout, `Ok(None)` at the end.
    pub async fn next_within(&mut self, limit: Duration) -> Result<Option<Event>, ()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(i) = self.body.windows(2).position(|w| w == b"\n\n") {
                let block = String::from_utf8_lossy(&self.body[..i]).into_owned();
                self.body.drain(..i + 2);
                let mut ev = Event::default();
                let mut data: Vec<&str> = Vec::new();
                for line in block.lines() {
                    if line.starts_with(':') {
                        ev.comment = true;
                    } else if let Some(v) = line.strip_prefix("id:") {
                        ev.id = Some(v.trim_start().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v));
                    } else if let Some(v) = line.strip_prefix("retry:") {
                        ev.retry = v.trim().parse().ok();
                    }
                }
                ev.data = data.join("\n");
                if ev.id.is_some() {
                    self.last_id = ev.id.clone();
                }
                return Ok(Some(ev));
            }
            if self.ended {
                return Ok(None);
            }
            if self.dechunk() {
                continue;
            }
            let mut chunk = [0u8; 8192];
            let n = match tokio::time::timeout_at(deadline, self.s.read(&mut chunk)).await {
                Err(_) => return Err(()),
                Ok(Ok(n)) => n,
                Ok(Err(_)) => 0,
            };
            if n == 0 {
                self.ended = true;
                continue;
            }
            self.raw.extend_from_slice(&chunk[..n]);
        }
    }

    /// Moves decoded bytes to `body`; true when it moved any or the stream ended.
    fn dechunk(&mut self) -> bool {
        let before = self.body.len();
        if dechunk(&mut self.raw, &mut self.body) {
            self.ended = true;
            return true;
        }
        self.body.len() > before
    }

    /// The next event that is not a comment (heartbeat); `None` at the end.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            match self.next_any().await {
                Some(e) if e.comment && e.data.is_empty() => continue,
                other => return other,
            }
        }
    }

    /// The next event's JSON, skipping heartbeats; panics at the end of the stream.
    pub async fn json(&mut self) -> Value {
        self.next().await.expect("an event before the end of the stream").json()
    }

    /// Skips events until one of type `kind`.
    pub async fn until(&mut self, kind: &str) -> Value {
        loop {
            let v = self.json().await;
            if v["type"] == kind {
                return v;
            }
        }
    }

    /// The stream's end: true when it ended (EOF or last chunk) within `limit`.
    pub async fn ends_within(&mut self, limit: Duration) -> bool {
        loop {
            match self.next_within(limit).await {
                Ok(None) => return true,
                Ok(Some(_)) => continue,
                Err(()) => return false,
            }
        }
    }
}
