//! `meshlink-injector`: the mutating admission webhook that adds meshlink-proxy to Pods created
//! in a namespace, or from a template, annotated `linkerd.io/inject: enabled`, with
//! `proxy_inject::inject_pod_spec`, the function behind `meshlink inject` too.
//!
//! - [`review`]: the decision for one AdmissionReview (pure).
//! - [`cert`]: the serving certificate, signed at start-up by a CA kept in a Secret, and
//!   renewed in place.
//! - [`webhook_config`]: the CA bundle kept in the MutatingWebhookConfiguration.
//! - [`server`]: the HTTP handler, its logs and metrics.
//!
//! The configuration's `failurePolicy: Ignore` means an injector that is down or slow never
//! blocks a deployment: the API server admits the Pod as it is (and `meshlink check` then
//! reports the Pods that should have been meshed but were not).

pub mod cert;
pub mod review;
pub mod server;
pub mod webhook_config;

pub use self::{
    cert::{Ca, ServingCert, ensure_ca},
    review::{Decision, review},
    server::{Metrics, Webhook},
    webhook_config::{Target, keep_ca_bundle},
};
