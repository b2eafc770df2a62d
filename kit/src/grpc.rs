//! The credential of the internal gRPC APIs: a shared bearer token, checked by
//! servers (health stays open for probes) and added by clients.

use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
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

/// Client side: adds `authorization: Bearer <token>` to every call (nothing without a token).
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Self, InvalidToken> {
        match usable(token) {
            None => Ok(Self(None)),
            Some(t) => format!("Bearer {t}").parse().map(|v| Self(Some(v))).map_err(|_| InvalidToken),
        }
    }

    /// `channel` with this credential.
    pub fn channel(&self, channel: Channel) -> Authed {
        InterceptedService::new(channel, self.clone())
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
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
}
