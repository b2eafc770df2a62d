//! Tower layers in front of the presence gRPC service: a global concurrency
//! limit with load shedding (RESOURCE_EXHAUSTED at once instead of queueing)
//! and a timeout on producing the response. Streams (Sync, Watch) hold a slot
//! only while their response is being set up.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::limit::ConcurrencyLimit;
use tower::load_shed::LoadShed;
use tower::load_shed::error::Overloaded;
use tower::timeout::Timeout;
use tower::timeout::error::Elapsed;
use tower::{BoxError, Service, ServiceBuilder};

/// A gRPC service behind load shedding, a concurrency limit and a timeout.
#[derive(Debug, Clone)]
pub struct Guarded<S> {
    inner: LoadShed<ConcurrencyLimit<Timeout<S>>>,
}

impl<S> Guarded<S> {
    pub fn new(service: S, max_concurrent: usize, timeout: Duration) -> Self {
        let inner = ServiceBuilder::new()
            .load_shed()
            .concurrency_limit(max_concurrent)
            .timeout(timeout)
            .service(service);
        Self { inner }
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

fn status_for(e: &BoxError) -> Status {
    if e.is::<Overloaded>() {
        Status::resource_exhausted(
            "presence is overloaded: too many concurrent requests, retry with backoff",
        )
    } else if e.is::<Elapsed>() {
        Status::deadline_exceeded("presence did not answer in time")
    } else {
        Status::internal(e.to_string())
    }
}

impl<S> Service<http::Request<Body>> for Guarded<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // LoadShed is always ready: it records whether the limit is, and fails the call if not.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            match fut.await {
                Ok(resp) => Ok(resp),
                Err(e) => Ok(status_for(&e).into_http()),
            }
        })
    }
}
