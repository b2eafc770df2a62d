//! Broadcast servers the gateway is measured against, written the way a Rust
//! user would write them with each library: every text message received is
//! sent to every connected client (the sender included), one task per
//! connection writing frames from an unbounded queue.
//!
//! `peer fastwebsockets <port>`: bare fastwebsockets + hyper (the floor of our stack).
//! `peer tungstenite <port>`: tokio-tungstenite (what most Rust users pick).
//! Both print `LISTENING <port>` once bound on 127.0.0.1.

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

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (kind, port) = match args.as_slice() {
        [_, kind, port] => (kind.clone(), port.parse::<u16>()?),
        _ => anyhow::bail!("usage: peer fastwebsockets|tungstenite <port>"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        println!("LISTENING {}", listener.local_addr()?.port());
        match kind.as_str() {
            "fastwebsockets" => fws::serve(listener).await,
            "tungstenite" => tung::serve(listener).await,
            other => anyhow::bail!("unknown peer `{other}`"),
        }
    })
}
