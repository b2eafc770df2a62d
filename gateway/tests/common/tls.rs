//! A throw-away CA and certificates for the client port's TLS, and a rustls client
//! (tokio-rustls, an independent implementation of the client side) that trusts it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

use super::{WAIT, now, token};

pub type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A CA, and the `--tls-cert`/`--tls-key` files in a temporary directory (removed on drop).
pub struct Pki {
    pub dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    pub fn new() -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("sb-client-tls-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "switchboard client-port test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        Self { dir, ca, ca_key }
    }

    /// A new certificate for localhost/127.0.0.1, signed by the CA, valid until
    /// `not_after` (y, m, d): (chain PEM, key PEM).
    pub fn leaf(&self, name: &str, not_after: (i32, u8, u8)) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, name);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn cert_path(&self) -> String {
        self.dir.join("tls.pem").display().to_string()
    }

    pub fn key_path(&self) -> String {
        self.dir.join("tls.key").display().to_string()
    }

    /// Replaces both files, each by a rename (as a deployment tool would).
    pub fn install(&self, cert: &str, key: &str) {
        for (path, pem) in [(self.cert_path(), cert), (self.key_path(), key)] {
            let tmp = format!("{path}.tmp");
            std::fs::write(&tmp, pem).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
    }

    /// `--tls-cert <file> --tls-key <file>`.
    pub fn args(&self) -> Vec<String> {
        vec!["--tls-cert".into(), self.cert_path(), "--tls-key".into(), self.key_path()]
    }

    /// A TLS connection to `addr` offering these ALPN protocols.
    pub async fn connect(&self, addr: SocketAddr, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        self.connect_from([127, 0, 0, 1].into(), addr, alpn).await
    }

    /// [`Pki::connect`] from a chosen local address (127.0.0.2: another client).
    pub async fn connect_from(&self, local: IpAddr, addr: SocketAddr, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(local, 0)).unwrap();
        let tcp = socket.connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        tokio::time::timeout(WAIT, connector.connect(ServerName::try_from("localhost").unwrap(), tcp))
            .await
            .expect("TLS handshake in time")
            .expect("TLS handshake")
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The DER of a PEM chain's first certificate.
pub fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

/// The certificate the server presented on `s`.
pub fn peer_leaf(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().expect("a server certificate")[0].to_vec()
}

/// A WebSocket upgrade as `user` over TLS (ALPN http/1.1) from `local`; the welcome read.
pub async fn wss_from(pki: &Pki, local: IpAddr, addr: SocketAddr, user: &str) -> Result<(Wss, Value), u16> {
    let tls = pki.connect_from(local, addr, &[b"http/1.1"]).await;
    let mut req = "wss://localhost/ws".into_client_request().unwrap();
    let t = token(json!({"sub": user, "exp": now() + 3600}));
    req.headers_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    match tokio_tungstenite::client_async(req, tls).await {
        Ok((mut ws, _)) => {
            let welcome = next_json(&mut ws).await;
            assert_eq!(welcome["type"], "welcome", "{welcome}");
            Ok((ws, welcome))
        }
        Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("upgrade over TLS: {e}"),
    }
}

pub async fn wss(pki: &Pki, addr: SocketAddr, user: &str) -> (Wss, Value) {
    wss_from(pki, [127, 0, 0, 1].into(), addr, user).await.expect("upgraded")
}

/// Next text frame as JSON (pings skipped); panics after [`WAIT`].
pub async fn next_json(ws: &mut Wss) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("a frame in time") {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Sends `cmd` with a ref; returns the reply with that ref (other frames skipped).
pub async fn call_tls(ws: &mut Wss, mut cmd: Value) -> Value {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let r = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_string();
    cmd["ref"] = json!(r);
    ws.send(Message::text(cmd.to_string())).await.unwrap();
    loop {
        let v = next_json(ws).await;
        if v["ref"] == json!(r) {
            return v;
        }
    }
}

/// The next frame of `kind` (others skipped).
pub async fn next_of(ws: &mut Wss, kind: &str) -> Value {
    loop {
        let v = next_json(ws).await;
        if v["type"] == kind {
            return v;
        }
    }
}
