//! The federated Service `<svc>-federated`: one local Service that stands for every member
//! Service of the same name and namespace, in this cluster and in linked ones.
//!
//! Linkerd updates it incrementally: it copies metadata and ports from whichever member it
//! decides is "oldest" when that member joins, and never recomputes them when a member leaves or
//! changes, so port changes can be lost (#13680) [quirk]. Here it is a pure function of the full,
//! current member set, recomputed on every change, with this precedence:
//!
//! 1. the local member (this cluster's own Service), then
//! 2. remote members by the creation time of their Link, oldest first, then by cluster name.
//!
//! Labels and annotations come from the first member in that order. Ports are the union of every
//! member's ports, keyed by (port, protocol); where members disagree on a port's name or target,
//! the first member wins. The discovery annotations list every member in that order.
//!
//! A member whose cluster has not been listed yet (the controller just started, or that cluster's
//! API server is unreachable since) is *pending*: it keeps its `svc@cluster` entry if the
//! federated Service already had one, and contributes nothing else until it is listed. A
//! federated Service whose only members are pending is left as it is, never deleted.

use k8s_openapi::{
    api::core::v1::{Service, ServicePort, ServiceSpec},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::ResourceExt;
use link_crd::{keys, naming};

use super::{InvalidService, copied_annotations, copied_labels, copied_port, is_headless};

/// One member of a federated Service.
#[derive(Clone, Debug)]
pub struct Member<'a> {
    /// The member's cluster: `None` for this cluster's own Service.
    pub cluster: Option<&'a str>,
    /// When the member's Link was created (remote members); orders the members.
    pub link_created: Option<&'a Time>,
    /// The member Service; `None` for a pending member (see the module documentation).
    pub service: Option<&'a Service>,
    /// Label keys not copied (the member's Link's `excludedLabels`).
    pub excluded_labels: &'a [String],
    /// Annotation keys not copied (the member's Link's `excludedAnnotations`).
    pub excluded_annotations: &'a [String],
}

/// A member that cannot join, and why (reported as `InvalidService` on its Link).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub cluster: Option<String>,
    pub reason: String,
}

/// What the federated Service should be.
#[derive(Clone, Debug, PartialEq)]
pub struct Federated {
    /// `None` when no member can join: the federated Service should not exist, unless `keep`.
    pub service: Option<Service>,
    /// Only pending members: leave the federated Service as it is.
    pub keep: bool,
    /// Members left out.
    pub rejected: Vec<Rejected>,
}

/// The federated Service for `members` (all of the same name and namespace).
pub fn federated_service(members: &[Member<'_>]) -> Result<Federated, InvalidService> {
    let mut rejected = Vec::new();
    let mut joining: Vec<&Member<'_>> = Vec::new();
    for m in members {
        let reason = match m.service {
            Some(s) if is_headless(s) => "a headless Service cannot join a federated Service",
            Some(s)
                if s.labels()
                    .get(keys::MIRRORED_RESOURCE_LABEL)
                    .map(String::as_str)
                    == Some("true") =>
            {
                "this Service is itself a mirror; mirrors do not join federated Services"
            }
            _ => {
                joining.push(m);
                continue;
            }
        };
        rejected.push(Rejected {
            cluster: m.cluster.map(str::to_owned),
            reason: reason.to_owned(),
        });
    }
    joining.sort_by(|a, b| {
        let key = |m: &Member<'_>| {
            (
                m.cluster.is_some(),
                m.link_created.map(|t| t.0),
                m.cluster.map(str::to_owned),
            )
        };
        key(a).cmp(&key(b))
    });
    // Metadata comes from the first member that is known.
    let Some((first, first_service)) = joining.iter().find_map(|m| Some((*m, m.service?))) else {
        return Ok(Federated {
            service: None,
            keep: !joining.is_empty(),
            rejected,
        });
    };
    let name = first_service.metadata.name.clone().unwrap_or_default();
    let namespace = first_service.metadata.namespace.clone();

    let mut labels = copied_labels(first_service, first.excluded_labels);
    labels.insert(keys::MIRRORED_RESOURCE_LABEL.to_owned(), "true".to_owned());

    // The discovery annotations are this Service's own, written below.
    let mut annotations = copied_annotations(first_service, first.excluded_annotations);
    annotations.remove(keys::REMOTE_DISCOVERY_KEY);
    annotations.remove(keys::LOCAL_DISCOVERY_ANNOTATION);
    let remote: Vec<String> = joining
        .iter()
        .filter_map(|m| m.cluster.map(|c| format!("{name}@{c}")))
        .collect();
    if !remote.is_empty() {
        annotations.insert(keys::REMOTE_DISCOVERY_KEY.to_owned(), remote.join(","));
    }
    if joining.iter().any(|m| m.cluster.is_none()) {
        annotations.insert(keys::LOCAL_DISCOVERY_ANNOTATION.to_owned(), name.clone());
    }

    let mut ports: Vec<ServicePort> = Vec::new();
    for m in &joining {
        let ports_of = m.service.and_then(|s| s.spec.as_ref());
        for p in ports_of.iter().flat_map(|s| s.ports.iter().flatten()) {
            let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".to_owned());
            let seen = ports
                .iter()
                .any(|q| q.port == p.port && q.protocol.as_deref().unwrap_or("TCP") == protocol);
            if !seen {
                ports.push(copied_port(p));
            }
        }
    }
    // Two members may name different ports alike; a Service's port names must be unique.
    let mut names = std::collections::HashSet::new();
    for p in &mut ports {
        if let Some(n) = &p.name
            && !names.insert(n.clone())
        {
            p.name = Some(format!("{n}-{}", p.port));
        }
    }
    if ports.is_empty() {
        return Err(InvalidService::NoPorts);
    }
    // A name over the limit cannot be created, whichever member asks.
    let federated_name = naming::federated_service_name(&name)?;
    Ok(Federated {
        service: Some(Service {
            metadata: ObjectMeta {
                name: Some(federated_name),
                namespace,
                labels: Some(labels),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".to_owned()),
                ports: Some(ports),
                ..ServiceSpec::default()
            }),
            status: None,
        }),
        keep: false,
        rejected,
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    use super::*;

    fn svc(labels: serde_json::Value, ports: serde_json::Value, headless: bool) -> Service {
        let mut spec = json!({ "ports": ports });
        if headless {
            spec["clusterIP"] = json!("None");
        }
        serde_json::from_value(json!({
            "metadata": { "name": "web", "namespace": "shop", "labels": labels,
                "annotations": { "docs": "x", "config.linkerd.io/opaque-ports": "5432" } },
            "spec": spec,
        }))
        .unwrap()
    }

    fn time(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn member<'a>(
        cluster: Option<&'a str>,
        created: Option<&'a Time>,
        service: &'a Service,
    ) -> Member<'a> {
        Member {
            cluster,
            link_created: created,
            service: Some(service),
            excluded_labels: &[],
            excluded_annotations: &[],
        }
    }

    fn annotation(f: &Federated, key: &str) -> Option<String> {
        f.service
            .as_ref()?
            .metadata
            .annotations
            .as_ref()?
            .get(key)
            .cloned()
    }

    #[test]
    fn precedence_and_discovery_annotations() {
        let (t1, t2) = (time(100), time(200));
        let local = svc(
            json!({ "from": "local" }),
            json!([{ "name": "http", "port": 80 }]),
            false,
        );
        let east = svc(
            json!({ "from": "east", "mirror.linkerd.io/federated": "member" }),
            json!([{ "name": "http", "port": 80 }]),
            false,
        );
        let west = svc(
            json!({ "from": "west" }),
            json!([{ "name": "http", "port": 80 }]),
            false,
        );

        // Remote only: the older Link wins; order of the list is precedence order.
        let f = federated_service(&[
            member(Some("west"), Some(&t2), &west),
            member(Some("east"), Some(&t1), &east),
        ])
        .unwrap();
        let s = f.service.clone().unwrap();
        assert_eq!(s.metadata.name.as_deref(), Some("web-federated"));
        let labels = s.metadata.labels.unwrap();
        assert_eq!(labels["from"], "east");
        assert_eq!(labels["mirror.linkerd.io/mirrored-service"], "true");
        assert!(
            !labels.contains_key("mirror.linkerd.io/cluster-name"),
            "federated Services belong to no one cluster"
        );
        assert!(!labels.contains_key("mirror.linkerd.io/federated"));
        assert_eq!(
            annotation(&f, "multicluster.linkerd.io/remote-discovery").as_deref(),
            Some("web@east,web@west")
        );
        assert_eq!(
            annotation(&f, "multicluster.linkerd.io/local-discovery"),
            None
        );

        // With the local member: it wins, and is named in local-discovery.
        let f = federated_service(&[
            member(Some("east"), Some(&t1), &east),
            member(None, None, &local),
        ])
        .unwrap();
        assert_eq!(
            f.service
                .as_ref()
                .unwrap()
                .metadata
                .labels
                .as_ref()
                .unwrap()["from"],
            "local"
        );
        assert_eq!(
            annotation(&f, "multicluster.linkerd.io/local-discovery").as_deref(),
            Some("web")
        );
        assert_eq!(
            annotation(&f, "multicluster.linkerd.io/remote-discovery").as_deref(),
            Some("web@east")
        );

        // Equal Link times: by cluster name.
        let f = federated_service(&[
            member(Some("west"), Some(&t1), &west),
            member(Some("east"), Some(&t1), &east),
        ])
        .unwrap();
        assert_eq!(
            annotation(&f, "multicluster.linkerd.io/remote-discovery").as_deref(),
            Some("web@east,web@west")
        );
    }

    #[test]
    fn ports_are_the_union_so_no_change_is_lost() {
        let t = time(1);
        let a = svc(json!({}), json!([{ "name": "http", "port": 80 }]), false);
        let b = svc(
            json!({}),
            json!([{ "name": "http", "port": 80 }, { "name": "grpc", "port": 9090 }, { "name": "http", "port": 8080 }]),
            false,
        );
        let f = federated_service(&[
            member(Some("a"), Some(&t), &a),
            member(Some("b"), Some(&t), &b),
        ])
        .unwrap();
        let ports: Vec<(Option<String>, i32)> = f
            .service
            .unwrap()
            .spec
            .unwrap()
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name, p.port))
            .collect();
        assert_eq!(
            ports,
            [
                (Some("http".into()), 80),
                (Some("grpc".into()), 9090),
                // A second port named like the first gets a unique name.
                (Some("http-8080".into()), 8080),
            ]
        );
        // A member changing its port is reflected at once: recompute with the new set.
        let a2 = svc(json!({}), json!([{ "name": "http", "port": 81 }]), false);
        let f = federated_service(&[member(Some("a"), Some(&t), &a2)]).unwrap();
        let ports: Vec<i32> = f
            .service
            .unwrap()
            .spec
            .unwrap()
            .ports
            .unwrap()
            .iter()
            .map(|p| p.port)
            .collect();
        assert_eq!(ports, [81]);
    }

    #[test]
    fn headless_members_are_rejected_and_no_members_means_no_service() {
        let t = time(1);
        let h = svc(json!({}), json!([{ "port": 80 }]), true);
        let f = federated_service(&[member(Some("east"), Some(&t), &h)]).unwrap();
        assert_eq!(f.service, None);
        assert_eq!(f.rejected.len(), 1);
        assert!(f.rejected[0].reason.contains("headless"));
        assert_eq!(federated_service(&[]).unwrap().service, None);
    }

    #[test]
    fn opaque_ports_survive_exclusion_and_names_are_checked() {
        let t = time(1);
        let s = svc(json!({}), json!([{ "port": 80 }]), false);
        let excluded = vec![
            "config.linkerd.io/opaque-ports".to_owned(),
            "docs".to_owned(),
        ];
        let m = Member {
            excluded_annotations: &excluded,
            ..member(Some("east"), Some(&t), &s)
        };
        let f = federated_service(&[m]).unwrap();
        assert_eq!(
            annotation(&f, "config.linkerd.io/opaque-ports").as_deref(),
            Some("5432")
        );
        assert_eq!(annotation(&f, "docs"), None);

        let mut long = s.clone();
        long.metadata.name = Some("x".repeat(60));
        assert!(matches!(
            federated_service(&[member(Some("east"), Some(&t), &long)]),
            Err(InvalidService::Name(_))
        ));
    }

    #[test]
    fn pending_members_keep_their_entry_and_alone_keep_the_service() {
        let (t1, t2) = (time(1), time(2));
        let east = svc(json!({ "from": "east" }), json!([{ "port": 80 }]), false);
        let pending = |cluster, created| Member {
            service: None,
            ..member(Some(cluster), created, &east)
        };
        // west's Link is older but west is not listed yet: metadata from east, both listed.
        let f = federated_service(&[
            member(Some("east"), Some(&t2), &east),
            pending("west", Some(&t1)),
        ])
        .unwrap();
        assert_eq!(
            annotation(&f, "multicluster.linkerd.io/remote-discovery").as_deref(),
            Some("web@west,web@east")
        );
        assert_eq!(f.service.unwrap().metadata.labels.unwrap()["from"], "east");
        // Only pending members: leave the Service alone rather than delete it.
        let f = federated_service(&[pending("west", Some(&t1))]).unwrap();
        assert_eq!((f.service, f.keep), (None, true));
        assert!(!federated_service(&[]).unwrap().keep);
    }

    #[test]
    fn the_local_members_excluded_keys_are_not_copied() {
        let local = svc(
            json!({"app": "api", "private.example.com/team": "payments", "tier": "back"}),
            json!([{"name": "http", "port": 80}]),
            false,
        );
        let rules = vec!["private.example.com/*".to_owned(), "tier".to_owned()];
        let members = [Member {
            cluster: None,
            link_created: None,
            service: Some(&local),
            excluded_labels: &rules,
            excluded_annotations: &rules,
        }];
        let f = federated_service(&members).unwrap();
        let labels = f.service.unwrap().metadata.labels.unwrap();
        assert_eq!(labels.get("app").map(String::as_str), Some("api"));
        assert!(
            !labels.contains_key("private.example.com/team"),
            "{labels:?}"
        );
        assert!(!labels.contains_key("tier"), "{labels:?}");
    }

    #[test]
    fn mirrors_do_not_join() {
        let mirror = svc(
            json!({ "mirror.linkerd.io/mirrored-service": "true" }),
            json!([{ "port": 80 }]),
            false,
        );
        let f = federated_service(&[member(None, None, &mirror)]).unwrap();
        assert_eq!((f.service, f.keep), (None, false));
        assert!(f.rejected[0].reason.contains("itself a mirror"));
    }
}
