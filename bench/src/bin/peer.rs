//! Broadcast servers the gateway is measured against, written the way a Rust
//! user would write them with each library: every text message received is
//! sent to every connected client (the sender included), one task per
//! connection writing frames from an unbounded queue.
//!
//! `peer fastwebsockets <port>`: bare fastwebsockets + hyper (the floor of our stack).
//! `peer tungstenite <port>`: tokio-tungstenite (what most Rust users pick).
//! `peer floor <port>`: not a library's way but the physical floor: the frame is
//! built once and written to every socket with one `write` each, straight from
//! the reading task (no queue, no task per write); only what a socket does not
//! take at once waits for its writer task. Its CPU per delivery is the kernel's
//! cost of a loopback write plus next to nothing.
//! All print `LISTENING <port>` once bound on 127.0.0.1.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

#[derive(Debug, Default)]
struct Clients {
    next: AtomicU64,
    map: Mutex<HashMap<u64, mpsc::UnboundedSender<Bytes>>>,
}

impl Clients {
    fn join(&self) -> (u64, mpsc::UnboundedReceiver<Bytes>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.map.lock().insert(id, tx);
        (id, rx)
    }

    fn leave(&self, id: u64) {
        self.map.lock().remove(&id);
    }

    fn broadcast(&self, msg: &Bytes) {
        for tx in self.map.lock().values() {
            let _ = tx.send(msg.clone());
        }
    }
}

mod fws {
    use super::*;
    use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
    use http_body_util::Empty;
    use hyper::body::Incoming;
    use hyper::{Request, Response};

    async fn session(fut: fastwebsockets::upgrade::UpgradeFut, clients: Arc<Clients>) -> Result<(), WebSocketError> {
        let ws = fut.await?;
        let (rx, mut tx) = ws.split(tokio::io::split);
        let mut rx = fastwebsockets::FragmentCollectorRead::new(rx);
        let (id, mut queue) = clients.join();
        let writer = tokio::spawn(async move {
            while let Some(msg) = queue.recv().await {
                if tx.write_frame(Frame::text(Payload::Borrowed(&msg))).await.is_err() {
                    break;
                }
            }
        });
        let mut obligated = |_: Frame<'_>| async { Ok::<(), WebSocketError>(()) };
        loop {
            let frame = match rx.read_frame(&mut obligated).await {
                Ok(f) => f,
                Err(_) => break,
            };
            match frame.opcode {
                OpCode::Close => break,
                OpCode::Text | OpCode::Binary => clients.broadcast(&Bytes::copy_from_slice(&frame.payload)),
                _ => {}
            }
        }
        clients.leave(id);
        writer.abort();
        Ok(())
    }

    pub(super) async fn serve(listener: TcpListener) -> anyhow::Result<()> {
        let clients = Arc::new(Clients::default());
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let clients = clients.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    let clients = clients.clone();
                    async move {
                        let (resp, fut) = fastwebsockets::upgrade::upgrade(&mut req)?;
                        tokio::spawn(session(fut, clients));
                        Ok::<Response<Empty<Bytes>>, WebSocketError>(resp)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).with_upgrades().await;
            });
        }
    }
}

mod tung {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    async fn session(stream: TcpStream, clients: Arc<Clients>) -> anyhow::Result<()> {
        let ws = tokio_tungstenite::accept_async(stream).await?;
        let (mut sink, mut source) = ws.split();
        let (id, mut queue) = clients.join();
        let writer = tokio::spawn(async move {
            while let Some(msg) = queue.recv().await {
                let Ok(text) = tokio_tungstenite::tungstenite::Utf8Bytes::try_from(msg) else { continue };
                if sink.send(Message::Text(text)).await.is_err() {
                    break;
                }
            }
        });
        while let Some(Ok(msg)) = source.next().await {
            match msg {
                Message::Text(t) => clients.broadcast(&Bytes::from(t)),
                Message::Close(_) => break,
                _ => {}
            }
        }
        clients.leave(id);
        writer.abort();
        Ok(())
    }

    pub(super) async fn serve(listener: TcpListener) -> anyhow::Result<()> {
        let clients = Arc::new(Clients::default());
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(session(stream, clients.clone()));
        }
    }
}

mod floor {
    use super::*;
    use fastwebsockets::WebSocketError;
    use http_body_util::Empty;
    use hyper::body::Incoming;
    use hyper::{Request, Response};
    use tokio::io::AsyncReadExt;
    use tokio::net::tcp::OwnedWriteHalf;

    /// One connection: its socket's write half and what it did not take yet.
    struct Client {
        w: OwnedWriteHalf,
        pending: Mutex<Vec<u8>>,
        wake: tokio::sync::Notify,
    }

    type All = Arc<Mutex<HashMap<u64, Arc<Client>>>>;

    fn broadcast(all: &All, frame: &[u8]) {
        for c in all.lock().values() {
            let mut pending = c.pending.lock();
            if pending.is_empty() {
                match c.w.try_write(frame) {
                    Ok(n) if n == frame.len() => continue,
                    Ok(n) => pending.extend_from_slice(&frame[n..]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => pending.extend_from_slice(frame),
                    Err(_) => continue,
                }
            } else {
                pending.extend_from_slice(frame);
            }
            c.wake.notify_one();
        }
    }

    /// Writes what a socket did not take at once, as it takes it.
    async fn writer(c: Arc<Client>) {
        loop {
            c.wake.notified().await;
            loop {
                {
                    let mut pending = c.pending.lock();
                    if pending.is_empty() {
                        break;
                    }
                    match c.w.try_write(&pending) {
                        Ok(n) => drop(pending.drain(..n)),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                }
                if c.w.writable().await.is_err() {
                    return;
                }
            }
        }
    }

    /// An unmasked server text frame.
    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x81];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n if n < 65536 => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// Reads masked client frames; broadcasts every text frame.
    async fn session(fut: fastwebsockets::upgrade::UpgradeFut, all: All, id: u64) -> anyhow::Result<()> {
        let io = fut.await?.into_inner().into_inner();
        let parts = io.downcast::<hyper_util::rt::TokioIo<TcpStream>>().map_err(|_| anyhow::anyhow!("not TCP"))?;
        let (mut r, w) = parts.io.into_inner().into_split();
        let client = Arc::new(Client { w, pending: Mutex::new(Vec::new()), wake: tokio::sync::Notify::new() });
        all.lock().insert(id, client.clone());
        let writing = tokio::spawn(writer(client));
        let mut buf = parts.read_buf.to_vec();
        let mut chunk = vec![0u8; 64 * 1024];
        'read: loop {
            // Every whole frame buffered.
            while let [b0, b1, ..] = buf[..] {
                let (len, at) = match b1 & 0x7f {
                    126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
                    127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into()?) as usize, 10),
                    126 | 127 => break,
                    n => (usize::from(n), 2),
                };
                if buf.len() < at + 4 + len {
                    break;
                }
                let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
                let mut payload = buf[at + 4..at + 4 + len].to_vec();
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
                buf.drain(..at + 4 + len);
                match b0 & 0x0f {
                    0x8 => break 'read,
                    0x1 | 0x2 => broadcast(&all, &frame(&payload)),
                    _ => {}
                }
            }
            let n = r.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        all.lock().remove(&id);
        writing.abort();
        Ok(())
    }

    pub(super) async fn serve(listener: TcpListener) -> anyhow::Result<()> {
        let all: All = Arc::default();
        let next = Arc::new(AtomicU64::new(0));
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let (all, next) = (all.clone(), next.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    let (all, id) = (all.clone(), next.fetch_add(1, Ordering::Relaxed));
                    async move {
                        let (resp, fut) = fastwebsockets::upgrade::upgrade(&mut req)?;
                        tokio::spawn(session(fut, all, id));
                        Ok::<Response<Empty<Bytes>>, WebSocketError>(resp)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).with_upgrades().await;
            });
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (kind, port) = match args.as_slice() {
        [_, kind, port] => (kind.clone(), port.parse::<u16>()?),
        _ => anyhow::bail!("usage: peer fastwebsockets|tungstenite|floor <port>"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        println!("LISTENING {}", listener.local_addr()?.port());
        match kind.as_str() {
            "fastwebsockets" => fws::serve(listener).await,
            "tungstenite" => tung::serve(listener).await,
            "floor" => floor::serve(listener).await,
            other => anyhow::bail!("unknown peer `{other}`"),
        }
    })
}
