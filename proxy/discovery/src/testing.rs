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
pub(crate) struct Call<Req, T> {
    pub(crate) request: Req,
    pub(crate) answers: mpsc::UnboundedSender<Result<T, Status>>,
}

impl<Req, T> Call<Req, T> {
    pub(crate) fn send(&self, answer: T) {
        self.answers.send(Ok(answer)).expect("the call is open");
    }

    pub(crate) fn fail(&self, status: Status) {
        self.answers.send(Err(status)).expect("the call is open");
    }
}

pub(crate) type GetCall = Call<GetDestination, Update>;
pub(crate) type ProfileCall = Call<GetDestination, DestinationProfile>;
pub(crate) type PortCall = Call<PortSpec, Server>;

/// The calls the peer received, in order.
#[derive(Debug)]
pub(crate) struct Calls {
    pub(crate) get: mpsc::UnboundedReceiver<GetCall>,
    pub(crate) profile: mpsc::UnboundedReceiver<ProfileCall>,
    pub(crate) port: mpsc::UnboundedReceiver<PortCall>,
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

/// A channel to a new in-memory peer, and the calls it receives.
pub(crate) fn peer() -> (Channel, Calls) {
    let (get, get_rx) = mpsc::unbounded_channel();
    let (profile, profile_rx) = mpsc::unbounded_channel();
    let (port, port_rx) = mpsc::unbounded_channel();
    let peer = Peer { get, profile, port };
    let channel = Endpoint::from_static("http://peer.test").connect_with_connector_lazy(
        tower::service_fn(move |_| {
            let peer = peer.clone();
            async move {
                let (client, server) = tokio::io::duplex(64 * 1024);
                tokio::spawn(serve(TokioIo::new(server), peer));
                Ok::<_, std::io::Error>(TokioIo::new(client))
            }
        }),
    );
    (
        channel,
        Calls {
            get: get_rx,
            profile: profile_rx,
            port: port_rx,
        },
    )
}

async fn serve(io: TokioIo<tokio::io::DuplexStream>, peer: Peer) {
    let destination = DestinationServer::new(peer.clone());
    let inbound = InboundServerPoliciesServer::new(peer);
    let service = tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let (mut destination, mut inbound) = (destination.clone(), inbound.clone());
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
        .serve_connection(io, hyper_util::service::TowerToHyperService::new(service))
        .await;
}

/// Lets every task run until all wait: on paused time, a sleep ends only once the runtime has
/// nothing else to do (the clock then moves by the millisecond slept, not more).
pub(crate) async fn settle() {
    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
}
