//! HTTP plumbing every meshlink proxy needs, whatever its mode: what a proxy removes, adds and
//! rewrites on a request before it reaches an application, as pure functions over `http` types.
//!
//! - [`headers`]: hop-by-hop hygiene, `Forwarded` loop detection, and `l5d-client-id` set from
//!   the verified peer identity only.
//! - [`orig_proto`]: Linkerd's HTTP/1-over-HTTP/2 upgrade (`l5d-orig-proto`), undone on the
//!   inbound side so that the application gets the HTTP version its client spoke.
//! - [`server`]: the HTTP/1 server settings, with an exact request-head limit.

pub mod headers;
pub mod orig_proto;
pub mod server;

pub use self::headers::{L5D_CLIENT_ID, forwarded_by, set_client_id, strip_hop_by_hop};
pub use self::orig_proto::{L5D_ORIG_PROTO, OrigProto};
pub use self::server::{MAX_HTTP1_HEAD, http1_server};
