//! The multicluster gateway: accepts cross-cluster mTLS on port 4143 and forwards to local
//! services. Built from the `proxy/` library crates; filled in by the gateway issue.
