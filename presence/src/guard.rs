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
        let inner =
            ServiceBuilder::new().load_shed().concurrency_limit(max_concurrent).timeout(timeout).service(service);
        Self { inner }
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

fn status_for(e: &BoxError) -> Status {
    if e.is::<Overloaded>() {
        Status::resource_exhausted("presence is overloaded: too many concurrent requests, retry with backoff")
    } else if e.is::<Elapsed>() {
        Status::deadline_exceeded("presence did not answer in time")
    } else {
        Status::internal(e.to_string())
    }
}

impl<S> Service<http::Request<Body>> for Guarded<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Send + 'static,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::sync::Notify;

    #[derive(Clone)]
    struct Blocking(Arc<Notify>);

    impl NamedService for Blocking {
        const NAME: &'static str = "test.Blocking";
    }

    impl Service<http::Request<Body>> for Blocking {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            let n = self.0.clone();
            Box::pin(async move {
                n.notified().await;
                Ok(http::Response::new(Body::empty()))
            })
        }
    }

    fn grpc_status(r: &http::Response<Body>) -> Option<String> {
        r.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned())
    }

    #[tokio::test]
    async fn over_the_limit_is_shed_and_slow_calls_time_out() {
        let release = Arc::new(Notify::new());
        let svc = Guarded::new(Blocking(release.clone()), 1, Duration::from_millis(200));
        assert_eq!(Guarded::<Blocking>::NAME, "test.Blocking");
        let mut first = svc.clone();
        std::future::poll_fn(|cx| first.poll_ready(cx)).await.unwrap();
        let slow = first.call(http::Request::new(Body::empty()));
        // A second call while the first holds the only slot: refused at once.
        let mut second = svc.clone();
        std::future::poll_fn(|cx| second.poll_ready(cx)).await.unwrap();
        let shed = second.call(http::Request::new(Body::empty())).await.unwrap();
        assert_eq!(grpc_status(&shed).as_deref(), Some("8"), "RESOURCE_EXHAUSTED");
        // (tonic clones the service per request and drops it after the call; so do we.)
        drop((first, second));
        // The first never completes on its own: the timeout answers DEADLINE_EXCEEDED.
        let timed_out = slow.await.unwrap();
        assert_eq!(grpc_status(&timed_out).as_deref(), Some("4"));
        // Once the slot is free, calls go through.
        let mut third = svc.clone();
        std::future::poll_fn(|cx| third.poll_ready(cx)).await.unwrap();
        let call = third.call(http::Request::new(Body::empty()));
        release.notify_one();
        assert_eq!(grpc_status(&call.await.unwrap()), None);
    }
}
