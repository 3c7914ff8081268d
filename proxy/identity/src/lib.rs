//! meshlink's workload identity, shared by the gateway, the sidecar proxy, the identity service
//! and the CLI: Linkerd's identity strings ([`Id`]), trust-anchor bundles, TLS 1.3 configs whose
//! certificate is swapped in place ([`Credentials`]), certificate issuing with rcgen ([`ca`]) and
//! the Certify client that keeps a certificate fresh ([`certify`]).

pub mod ca;
pub mod certify;
mod creds;
mod id;
/// Certificates for tests (feature `test-util`).
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod tls;

pub use self::creds::{Credentials, InstallError};
pub use self::id::{Id, InvalidId, cert_ids, not_after, peer_id, permitted_dns};
pub use self::tls::TrustAnchors;
mod options;
pub use self::options::{IdentityError, IdentityOptions};
