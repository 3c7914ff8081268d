//! A test double of the control plane's gRPC peer: each call is handed to the test, which
//! answers it message by message and sees when the client cancels it. Served in memory, so
//! that tests run on paused Tokio time without the clock jumping while bytes are in flight.

use std::pin::Pin;

use futures::Stream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use linkerd2_proxy_api::{
    destination::{
        DestinationProfile, GetDestination, Update,
        destination_server::{Destination, DestinationServer},
    },
    inbound::{
        PortSpec, Server,
        inbound_server_policies_server::{InboundServerPolicies, InboundServerPoliciesServer},
    },
};
use tokio::sync::mpsc;
use tonic::{
    Request, Response, Status,
    transport::{Channel, Endpoint},
};

type Answers<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// One call: what was asked, and the sender of its answers. `answers.closed()` resolves when
/// the client cancelled the call.
#[derive(Debug)]
pub struct Call<Req, T> {
    pub request: Req,
    pub answers: mpsc::UnboundedSender<Result<T, Status>>,
}

impl<Req, T> Call<Req, T> {
    pub fn send(&self, answer: T) {
        self.answers.send(Ok(answer)).expect("the call is open");
    }

    pub fn fail(&self, status: Status) {
        self.answers.send(Err(status)).expect("the call is open");
    }
}

pub type GetCall = Call<GetDestination, Update>;
pub type ProfileCall = Call<GetDestination, DestinationProfile>;
pub type PortCall = Call<PortSpec, Server>;

/// The calls the peer received, in order.
#[derive(Debug)]
pub struct Calls {
    pub get: mpsc::UnboundedReceiver<GetCall>,
    pub profile: mpsc::UnboundedReceiver<ProfileCall>,
    pub port: mpsc::UnboundedReceiver<PortCall>,
}

#[derive(Clone, Debug)]
struct Peer {
    get: mpsc::UnboundedSender<GetCall>,
    profile: mpsc::UnboundedSender<ProfileCall>,
    port: mpsc::UnboundedSender<PortCall>,
}

fn answer<Req, T: Send + 'static>(
    calls: &mpsc::UnboundedSender<Call<Req, T>>,
    request: Req,
) -> Result<Response<Answers<T>>, Status> {
    let (tx, rx) = mpsc::unbounded_channel();
    calls
        .send(Call {
            request,
            answers: tx,
        })
        .map_err(|_| Status::unavailable("the test is over"))?;
    Ok(Response::new(Box::pin(futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|a| (a, rx)) },
    ))))
}

#[tonic::async_trait]
impl Destination for Peer {
    type GetStream = Answers<Update>;
    type GetProfileStream = Answers<DestinationProfile>;

    async fn get(&self, req: Request<GetDestination>) -> Result<Response<Self::GetStream>, Status> {
        answer(&self.get, req.into_inner())
    }

    async fn get_profile(
        &self,
        req: Request<GetDestination>,
    ) -> Result<Response<Self::GetProfileStream>, Status> {
        answer(&self.profile, req.into_inner())
    }
}

#[tonic::async_trait]
impl InboundServerPolicies for Peer {
    type WatchPortStream = Answers<Server>;

    async fn get_port(&self, _: Request<PortSpec>) -> Result<Response<Server>, Status> {
        Err(Status::unimplemented("the proxy watches"))
    }

    async fn watch_port(
        &self,
        req: Request<PortSpec>,
    ) -> Result<Response<Self::WatchPortStream>, Status> {
        answer(&self.port, req.into_inner())
    }
}

/// The peer as an HTTP/2 service (to serve over any transport), and the calls it receives.
pub fn service() -> (Service, Calls) {
    let (get, get_rx) = mpsc::unbounded_channel();
    let (profile, profile_rx) = mpsc::unbounded_channel();
    let (port, port_rx) = mpsc::unbounded_channel();
    let peer = Peer { get, profile, port };
    (
        Service {
            destination: DestinationServer::new(peer.clone()),
            inbound: InboundServerPoliciesServer::new(peer),
        },
        Calls {
            get: get_rx,
            profile: profile_rx,
            port: port_rx,
        },
    )
}

/// The peer's two gRPC services, routed by path.
#[derive(Clone, Debug)]
pub struct Service {
    destination: DestinationServer<Peer>,
    inbound: InboundServerPoliciesServer<Peer>,
}

impl Service {
    /// Serves one connection until it ends.
    pub async fn serve<IO>(self, io: IO)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let service = tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let (mut destination, mut inbound) = (self.destination.clone(), self.inbound.clone());
            async move {
                use tower::Service;
                if req
                    .uri()
                    .path()
                    .starts_with("/io.linkerd.proxy.destination.")
                {
                    destination.call(req).await
                } else {
                    inbound.call(req).await
                }
            }
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(
                TokioIo::new(io),
                hyper_util::service::TowerToHyperService::new(service),
            )
            .await;
    }
}

/// A channel to a new in-memory peer, and the calls it receives.
pub fn peer() -> (Channel, Calls) {
    let (service, calls) = service();
    let channel = Endpoint::from_static("http://peer.test").connect_with_connector_lazy(
        tower::service_fn(move |_| {
            let service = service.clone();
            async move {
                let (client, server) = tokio::io::duplex(64 * 1024);
                tokio::spawn(service.serve(server));
                Ok::<_, std::io::Error>(TokioIo::new(client))
            }
        }),
    );
    (channel, calls)
}

/// Lets every task run until all wait: on paused time, a sleep ends only once the runtime has
/// nothing else to do (the clock then moves by the millisecond slept, not more).
pub async fn settle() {
    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
}
