//! Deadlines on a call's request body and on the whole call, for servers of short calls (the
//! identity service's Certify): a client that opens a stream and never finishes its request
//! must not hold the stream, its connection's slot, or a graceful drain, for ever.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty};
use tokio::time::Sleep;

/// The deadlines of one server's calls.
#[derive(Clone, Copy, Debug)]
pub struct CallDeadlines {
    /// The request body must be complete this long after the call started.
    pub body: Duration,
    /// The response head must be ready this long after the call started; past it the call is
    /// answered with gRPC `DEADLINE_EXCEEDED` and its handler dropped.
    pub call: Duration,
}

/// Why a request body was cut short.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyDeadline(Duration);

/// `inner` with [`CallDeadlines`]: a tower service over requests with a [`TimedBody`].
#[derive(Clone, Debug)]
pub struct WithDeadlines<S> {
    inner: S,
    deadlines: CallDeadlines,
}

impl<S> WithDeadlines<S> {
    pub fn new(inner: S, deadlines: CallDeadlines) -> Self {
        Self { inner, deadlines }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B, ReqB> tower_service::Service<http::Request<ReqB>> for WithDeadlines<S>
where
    S: tower_service::Service<http::Request<TimedBody<ReqB>>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: Body,
{
    type Response = http::Response<Either<B, Empty<B::Data>>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        let deadlines = self.deadlines;
        let req = req.map(|body| TimedBody {
            inner: body,
            limit: deadlines.body,
            deadline: Box::pin(tokio::time::sleep(deadlines.body)),
        });
        let call = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout(deadlines.call, call).await {
                Ok(rsp) => Ok(rsp?.map(Either::Left)),
                Err(_) => {
                    tracing::debug!(deadline = ?deadlines.call, "call deadline exceeded");
                    Ok(deadline_exceeded())
                }
            }
        })
    }
}

/// A trailers-only gRPC answer: `DEADLINE_EXCEEDED` (4).
fn deadline_exceeded<B: Body>() -> http::Response<Either<B, Empty<B::Data>>> {
    let mut rsp = http::Response::new(Either::Right(Empty::new()));
    let headers = rsp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", http::HeaderValue::from_static("4"));
    headers.insert(
        "grpc-message",
        http::HeaderValue::from_static("the call did not finish within the server's deadline"),
    );
    rsp
}

/// A request body that fails once its deadline has passed without it being complete.
#[derive(Debug)]
pub struct TimedBody<B> {
    inner: B,
    limit: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<B> Body for TimedBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        ready!(self.deadline.as_mut().poll(cx));
        Poll::Ready(Some(Err(BodyDeadline(self.limit).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    type Frames =
        StreamBody<futures::channel::mpsc::UnboundedReceiver<Result<Frame<Bytes>, Infallible>>>;

    /// A handler that reads the whole body, then answers.
    #[derive(Clone)]
    struct ReadAll;

    impl tower_service::Service<http::Request<TimedBody<Frames>>> for ReadAll {
        type Response = http::Response<String>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: http::Request<TimedBody<Frames>>) -> Self::Future {
            Box::pin(async move {
                Ok(http::Response::new(match req.into_body().collect().await {
                    Ok(b) => format!("read {} bytes", b.to_bytes().len()),
                    Err(e) => e.to_string(),
                }))
            })
        }
    }

    /// A handler that never answers.
    #[derive(Clone)]
    struct Stuck;

    impl tower_service::Service<http::Request<TimedBody<Frames>>> for Stuck {
        type Response = http::Response<String>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<TimedBody<Frames>>) -> Self::Future {
            Box::pin(std::future::pending())
        }
    }

    const DEADLINES: CallDeadlines = CallDeadlines {
        body: Duration::from_secs(5),
        call: Duration::from_secs(15),
    };

    async fn body_of(rsp: http::Response<Either<String, Empty<Bytes>>>) -> String {
        String::from_utf8(rsp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_at_its_deadline() {
        use tower_service::Service as _;
        let (tx, rx) = futures::channel::mpsc::unbounded();
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"part"))))
            .unwrap();
        let start = tokio::time::Instant::now();
        let rsp = WithDeadlines::new(ReadAll, DEADLINES)
            .call(http::Request::new(StreamBody::new(rx)))
            .await
            .unwrap();
        assert_eq!(start.elapsed(), DEADLINES.body);
        assert!(body_of(rsp).await.contains("did not arrive within 5s"));
        drop(tx);

        // A body that arrives in time is read whole.
        let (tx, rx) = futures::channel::mpsc::unbounded();
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"whole"))))
            .unwrap();
        drop(tx);
        let rsp = WithDeadlines::new(ReadAll, DEADLINES)
            .call(http::Request::new(StreamBody::new(rx)))
            .await
            .unwrap();
        assert_eq!(body_of(rsp).await, "read 5 bytes");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_call_is_answered_deadline_exceeded() {
        use tower_service::Service as _;
        let (_tx, rx) = futures::channel::mpsc::unbounded();
        let start = tokio::time::Instant::now();
        let rsp = WithDeadlines::new(Stuck, DEADLINES)
            .call(http::Request::new(StreamBody::new(rx)))
            .await
            .unwrap();
        assert_eq!(start.elapsed(), DEADLINES.call);
        assert_eq!(rsp.headers()["grpc-status"], "4");
    }
}
