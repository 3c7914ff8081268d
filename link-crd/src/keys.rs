//! Label and annotation keys, values and default names shared with Linkerd's multicluster
//! extension. Every value here is a wire contract: a Link, label or tool written for Linkerd must
//! keep working, so none of them may change.

/// Prefix of the service-mirror keys.
pub const SERVICE_MIRROR_PREFIX: &str = "mirror.linkerd.io";
/// Prefix of the multicluster keys.
pub const MULTICLUSTER_PREFIX: &str = "multicluster.linkerd.io";

/// Label selecting remote Services for gateway-mode mirroring; the default selector is
/// `mirror.linkerd.io/exported=true`.
pub const EXPORTED_LABEL: &str = "mirror.linkerd.io/exported";
/// Value of [`EXPORTED_LABEL`] that exports a Service through the gateway.
pub const EXPORTED_VALUE_GATEWAY: &str = "true";
/// Value of [`EXPORTED_LABEL`] that exports a Service for remote (pod-to-pod) discovery.
pub const EXPORTED_VALUE_REMOTE_DISCOVERY: &str = "remote-discovery";
/// Label that makes a Service a member of a federated service (`=member`).
pub const FEDERATED_LABEL: &str = "mirror.linkerd.io/federated";
/// Value of [`FEDERATED_LABEL`] for members.
pub const FEDERATED_VALUE_MEMBER: &str = "member";

/// Label on every object the controller creates (mirror Services, Endpoints, created
/// Namespaces, federated Services), value `"true"`.
pub const MIRRORED_RESOURCE_LABEL: &str = "mirror.linkerd.io/mirrored-service";
/// Label naming the target cluster on mirrors, probe objects and controller workloads.
pub const CLUSTER_NAME_LABEL: &str = "mirror.linkerd.io/cluster-name";
/// Label on the local probe Service of a Link's gateway, value `"true"`.
pub const MIRRORED_GATEWAY_LABEL: &str = "mirror.linkerd.io/mirrored-gateway";
/// Label on per-pod endpoint mirrors of a headless Service naming their root mirror.
pub const HEADLESS_MIRROR_SVC_NAME_LABEL: &str = "mirror.linkerd.io/headless-mirror-svc-name";
/// As a **label** on a remote-discovery mirror: the target cluster's name. As an **annotation**
/// on a federated Service: its remote members, `svc@cluster[,svc@cluster...]`.
pub const REMOTE_DISCOVERY_KEY: &str = "multicluster.linkerd.io/remote-discovery";
/// Label on a remote-discovery mirror naming the remote Service.
pub const REMOTE_SERVICE_LABEL: &str = "multicluster.linkerd.io/remote-service";
/// Annotation on a federated Service naming its local member.
pub const LOCAL_DISCOVERY_ANNOTATION: &str = "multicluster.linkerd.io/local-discovery";

/// Annotation on a mirror Service: the remote Service's `resourceVersion`.
pub const REMOTE_RESOURCE_VERSION_ANNOTATION: &str = "mirror.linkerd.io/remote-resource-version";
/// Annotation on mirror Services and Endpoints: the remote Service's FQDN.
pub const REMOTE_SVC_FQ_NAME_ANNOTATION: &str = "mirror.linkerd.io/remote-svc-fq-name";
/// Annotation on mirror and probe Endpoints: the TLS identity of the remote gateway.
pub const REMOTE_GATEWAY_IDENTITY_ANNOTATION: &str = "mirror.linkerd.io/remote-gateway-identity";

/// Annotation on the target cluster's gateway Service: its TLS identity.
pub const GATEWAY_IDENTITY_ANNOTATION: &str = "mirror.linkerd.io/gateway-identity";
/// Annotation on the gateway Service: the HTTP path of its liveness probe.
pub const GATEWAY_PROBE_PATH_ANNOTATION: &str = "mirror.linkerd.io/probe-path";
/// Annotation on the gateway Service: the probe period (an integer of seconds or a duration).
pub const GATEWAY_PROBE_PERIOD_ANNOTATION: &str = "mirror.linkerd.io/probe-period";
/// Defined by Linkerd, not read by its controller.
pub const GATEWAY_PROBE_FAILURE_THRESHOLD_ANNOTATION: &str =
    "mirror.linkerd.io/probe-failure-threshold";
/// Defined by Linkerd, not read by its controller.
pub const GATEWAY_PROBE_TIMEOUT_ANNOTATION: &str = "mirror.linkerd.io/probe-timeout";
/// Label set on the gateway Service, value `"true"`.
pub const MULTICLUSTER_GATEWAY_LABEL: &str = "mirror.linkerd.io/multicluster-gateway";

/// `type` of the Secret that carries a Link's credentials.
pub const REMOTE_KUBECONFIG_SECRET_TYPE: &str = "mirror.linkerd.io/remote-kubeconfig";
/// Data key of the kubeconfig inside that Secret.
pub const KUBECONFIG_SECRET_KEY: &str = "kubeconfig";

/// Label on the copy of the credentials Secret in the control-plane namespace.
pub const DESTINATION_CLUSTER_NAME_LABEL: &str = "multicluster.linkerd.io/cluster-name";
/// Annotation on that copy: the target's identity trust domain.
pub const TRUST_DOMAIN_ANNOTATION: &str = "multicluster.linkerd.io/trust-domain";
/// Annotation on that copy: the target's cluster DNS domain.
pub const CLUSTER_DOMAIN_ANNOTATION: &str = "multicluster.linkerd.io/cluster-domain";

/// Name of the gateway's data port on its Service.
pub const GATEWAY_PORT_NAME: &str = "mc-gateway";
/// Name of the gateway's probe port on its Service and on probe Endpoints.
pub const PROBE_PORT_NAME: &str = "mc-probe";

/// `controllerName` written into Link status entries.
pub const STATUS_CONTROLLER_NAME: &str = "linkerd.io/service-mirror";
/// Ports served without protocol detection. Always copied onto mirrors, whatever the exclusion
/// lists say; read by the destination service, written by the injector.
pub const OPAQUE_PORTS_ANNOTATION: &str = "config.linkerd.io/opaque-ports";
/// The policy of a Pod's ports that no Server selects: on a Pod or its namespace, written by the
/// injector, read by the destination service.
pub const DEFAULT_INBOUND_POLICY_ANNOTATION: &str = "config.linkerd.io/default-inbound-policy";
/// Label Linkerd's injector (and meshlink's) puts on a meshed Pod: the namespace of the control
/// plane whose identity service certifies its proxy. The destination service gives an endpoint an
/// identity, and the gateway dials a Pod over mTLS, only when it is there.
pub const CONTROL_PLANE_NS_LABEL: &str = "linkerd.io/control-plane-ns";
/// Label on every object of the extension, value [`EXTENSION_VALUE`].
pub const EXTENSION_LABEL: &str = "linkerd.io/extension";
/// Value of [`EXTENSION_LABEL`].
pub const EXTENSION_VALUE: &str = "multicluster";
/// Annotation naming the tool that produced an object (`linkerd/cli <version>` in Linkerd).
pub const CREATED_BY_ANNOTATION: &str = "linkerd.io/created-by";
/// The [`CREATED_BY_ANNOTATION`] value `meshlink link` writes, which `meshlink check` compares
/// with its own version.
pub const CLI_CREATED_BY: &str = concat!("meshlink/cli ", env!("CARGO_PKG_VERSION"));

/// The identity service's issuer Secret (`tls.crt`, `tls.key`), in the control plane's namespace.
pub const ISSUER_SECRET: &str = "linkerd-identity-issuer";
/// The trust-anchor bundle ConfigMap (key [`TRUST_ROOTS_KEY`]), in each namespace that reads it.
pub const TRUST_ROOTS_CONFIGMAP: &str = "linkerd-identity-trust-roots";
pub const TRUST_ROOTS_KEY: &str = "ca-bundle.crt";

/// The Lease the service-mirror controller holds while it writes: Linkerd's name for a
/// controller of one Link, one name for a controller of every Link in its namespace.
pub fn controller_lease(link: Option<&str>) -> String {
    match link {
        Some(link) => format!("{CONTROLLER_LEASE_PREFIX}{link}"),
        None => SHARED_CONTROLLER_LEASE.to_owned(),
    }
}
pub const CONTROLLER_LEASE_PREFIX: &str = "service-mirror-write-";
pub const SHARED_CONTROLLER_LEASE: &str = "meshlink-service-mirror-write";

/// Namespace of the multicluster extension.
pub const DEFAULT_MULTICLUSTER_NAMESPACE: &str = "linkerd-multicluster";
/// Namespace of the Linkerd control plane.
pub const DEFAULT_LINKERD_NAMESPACE: &str = "linkerd";
/// Name of the gateway Service and Deployment.
pub const DEFAULT_GATEWAY_NAME: &str = "linkerd-gateway";
/// ServiceAccount whose token the target cluster hands out for remote access.
pub const DEFAULT_REMOTE_ACCESS_SERVICE_ACCOUNT: &str =
    "linkerd-service-mirror-remote-access-default";
