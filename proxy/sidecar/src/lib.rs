//! The sidecar proxy. Its sibling crates under `proxy/` (identity, transport, admin) are the
//! libraries the gateway is built from; filled in by the identity and gateway issue.
