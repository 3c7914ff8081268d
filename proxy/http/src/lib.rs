//! HTTP plumbing every meshlink proxy needs, whatever its mode: what a proxy removes, adds and
//! rewrites on a request before it reaches an application, as pure functions over `http` types.
//!
//! - [`detect`]: what a connection speaks, from its first bytes (HTTP/2, HTTP/1 or opaque).
//! - [`headers`]: hop-by-hop hygiene, `Forwarded` loop detection, and `l5d-client-id` set from
//!   the verified peer identity only.
//! - [`orig_proto`]: Linkerd's HTTP/1-over-HTTP/2 upgrade (`l5d-orig-proto`), undone on the
//!   inbound side so that the application gets the HTTP version its client spoke.
//! - [`server`]: a proxied connection served until it ends, idles out or is drained; the
//!   HTTP/1 settings, with an exact request-head limit.
//! - [`client`]: connections to endpoints: HTTP/2 pooled per endpoint and per client, so that
//!   no client can stall another's requests; HTTP/1 kept per client connection.
//! - [`upgrade`]: HTTP/1.1 upgrades (WebSocket) carried through, the two sides joined.
//! - [`error`]: the responses a proxy writes itself (`l5d-proxy-error`, gRPC statuses).

pub mod client;
pub mod detect;
pub mod error;
pub mod headers;
pub mod orig_proto;
pub mod server;
pub mod upgrade;

pub use self::client::{
    HTTP1_POOL_IDLE, Http1Conns, Http2Pool, InFlightBody, PoolLimits, SendError, pooled_client,
};
pub use self::detect::{Protocol, classify, detect};
pub use self::error::{ProxyBody, ProxyError, is_grpc};
pub use self::headers::{L5D_CLIENT_ID, forwarded_by, set_client_id, strip_hop_by_hop};
pub use self::orig_proto::{L5D_ORIG_PROTO, OrigProto};
pub use self::server::{MAX_HTTP1_HEAD, ServeSettings, Version, http1_server, serve_connection};
