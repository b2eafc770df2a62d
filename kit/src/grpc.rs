//! The credentials of the internal gRPC APIs: a shared bearer token, checked by
//! servers (health stays open for probes) and added by clients, and/or mutual
//! TLS (every service presents a certificate from one CA, as server and client).

use std::path::Path;
use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// A channel whose calls carry the token.
pub type Authed = InterceptedService<Channel, Bearer>;

/// The token is not a valid header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidToken;

impl std::fmt::Display for InvalidToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the internal token must be printable ASCII")
    }
}

impl std::error::Error for InvalidToken {}

fn usable(token: Option<&str>) -> Option<&str> {
    token.filter(|t| !t.is_empty())
}

/// Client side: adds `authorization: Bearer <token>` to every call (nothing without a
/// token), and makes endpoints that present this service's certificate when mutual TLS is on.
#[derive(Debug, Clone, Default)]
pub struct Bearer {
    token: Option<MetadataValue<Ascii>>,
    tls: Option<ClientTlsConfig>,
}

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Self, InvalidToken> {
        let token = match usable(token) {
            None => None,
            Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| InvalidToken)?),
        };
        Ok(Self { token, tls: None })
    }

    /// The same credential, also presenting a client certificate (mutual TLS).
    #[must_use]
    pub fn with_tls(mut self, tls: Option<&InternalTls>) -> Self {
        self.tls = tls.map(|t| t.client.clone());
        self
    }

    /// An endpoint for `addr` (`https://` with mutual TLS on).
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, tonic::transport::Error> {
        self.endpoint_named(addr, None)
    }

    /// An endpoint for `addr` whose certificate must name `server_name` rather than the
    /// address's host (an address found through DNS, certified for the DNS name).
    pub fn endpoint_named(&self, addr: &str, server_name: Option<&str>) -> Result<Endpoint, tonic::transport::Error> {
        let ep = Endpoint::from_shared(addr.to_owned())?;
        match (&self.tls, server_name) {
            (Some(tls), Some(name)) => ep.tls_config(tls.clone().domain_name(name)),
            (Some(tls), None) => ep.tls_config(tls.clone()),
            (None, _) => Ok(ep),
        }
    }

    /// `channel` with this credential.
    pub fn channel(&self, channel: Channel) -> Authed {
        InterceptedService::new(channel, self.clone())
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.token {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Mutual TLS settings of a service, loaded from the `--internal-tls-*` files.
#[derive(Debug, Clone)]
pub struct InternalTls {
    pub server: ServerTlsConfig,
    pub client: ClientTlsConfig,
}

impl InternalTls {
    /// Loads the three PEM files; `Ok(None)` when none is given, an error when only some are.
    pub fn load(cert: Option<&Path>, key: Option<&Path>, ca: Option<&Path>) -> Result<Option<Self>, String> {
        let (cert, key, ca) = match (cert, key, ca) {
            (None, None, None) => return Ok(None),
            (Some(c), Some(k), Some(a)) => (c, k, a),
            _ => return Err("--internal-tls-cert, --internal-tls-key and --internal-tls-ca go together".into()),
        };
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let identity = Identity::from_pem(read(cert)?, read(key)?);
        let ca = Certificate::from_pem(read(ca)?);
        Ok(Some(Self {
            server: ServerTlsConfig::new().identity(identity.clone()).client_ca_root(ca.clone()),
            client: ClientTlsConfig::new().identity(identity).ca_certificate(ca),
        }))
    }

    /// The scheme of this service's own gRPC address as announced to peers.
    pub fn scheme(tls: Option<&Self>) -> &'static str {
        if tls.is_some() { "https" } else { "http" }
    }
}

/// Server side: requires the token when one is configured.
#[derive(Debug, Clone, Default)]
pub struct RequireBearer(Option<Arc<[u8]>>);

impl RequireBearer {
    pub fn new(token: Option<&str>) -> Self {
        Self(usable(token).map(|t| Arc::from(t.as_bytes())))
    }
}

/// Compares without an early exit on the first differing byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Interceptor for RequireBearer {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(want) = &self.0 else { return Ok(req) };
        let got =
            req.metadata().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if got.is_some_and(|g| same(g.as_bytes(), want)) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("missing or wrong internal credential (authorization: Bearer <token>)"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked() {
        let mut need = RequireBearer::new(Some("s3cret"));
        let mut add = Bearer::new(Some("s3cret")).unwrap();
        assert!(need.call(add.call(Request::new(())).unwrap()).is_ok());
        let mut wrong = Bearer::new(Some("nope")).unwrap();
        assert_eq!(need.call(wrong.call(Request::new(())).unwrap()).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(need.call(Request::new(())).is_err());
        // No token configured: everything passes, nothing is added.
        assert!(RequireBearer::new(None).call(Request::new(())).is_ok());
        assert!(
            Bearer::new(Some("")).unwrap().call(Request::new(())).unwrap().metadata().get("authorization").is_none()
        );
        assert_eq!(Bearer::new(Some("bad\nvalue")).err(), Some(InvalidToken));
    }

    #[test]
    fn tls_files_go_together() {
        assert!(InternalTls::load(None, None, None).unwrap().is_none());
        let err = InternalTls::load(Some(Path::new("c.pem")), None, None).unwrap_err();
        assert!(err.contains("go together"), "{err}");
        let err = InternalTls::load(Some(Path::new("/nonexistent/c")), Some(Path::new("k")), Some(Path::new("a")))
            .unwrap_err();
        assert!(err.contains("cannot read /nonexistent/c"), "{err}");
    }
}
