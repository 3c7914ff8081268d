//! `meshlink gateways`: the liveness of every linked cluster's gateway, read from Link status
//! (Linkerd's command port-forwards to the controller and scrapes its metrics [quirk]).

use kube::{Api, Client, api::ListParams};
use link_crd::{CONDITION_GATEWAY_ALIVE, CONDITION_MIRRORED, ConditionStatus, Link};
use serde_json::json;

use crate::Output;

/// Flags of `meshlink gateways`.
#[derive(clap::Args, Debug)]
pub struct GatewaysArgs {
    /// Only this linked cluster.
    #[arg(long)]
    pub cluster_name: Option<String>,
    /// Only Links in this namespace (default: every namespace).
    #[arg(long)]
    pub namespace: Option<String>,
}

/// One row of the table.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Row {
    cluster: String,
    alive: Option<bool>,
    services: usize,
    latency_ms: Option<u64>,
}

/// Lists the Links and prints their gateways.
pub async fn run(
    args: &GatewaysArgs,
    client: Client,
    output: Output,
) -> Result<String, kube::Error> {
    let links: Api<Link> = match &args.namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let list = links.list(&ListParams::default()).await?;
    let rows: Vec<Row> = list
        .items
        .iter()
        .filter(|l| {
            args.cluster_name
                .as_ref()
                .is_none_or(|c| *c == l.spec.target_cluster_name)
        })
        .filter_map(row)
        .collect();
    Ok(render(&rows, output))
}

/// The row of a Link with a gateway probe; `None` for Links without one (as Linkerd skips
/// clusters whose gateway is not probed).
pub(crate) fn row(link: &Link) -> Option<Row> {
    if link.spec.probe_spec.path.is_empty() {
        return None;
    }
    let status = link.status.clone().unwrap_or_default();
    let alive = status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_GATEWAY_ALIVE)
        .and_then(|c| match c.status {
            ConditionStatus::True => Some(true),
            ConditionStatus::False => Some(false),
            ConditionStatus::Unknown => None,
        });
    // The full count when the controller summarised a long list (see LinkStatus::summary).
    let summarised = status.summary.as_ref().map(|s| s.mirrored);
    let services = status
        .mirror_services
        .iter()
        .filter(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == CONDITION_MIRRORED && c.status == ConditionStatus::True)
        })
        .count();
    Some(Row {
        cluster: link.spec.target_cluster_name.clone(),
        alive,
        services: summarised.map_or(services, |n| usize::try_from(n).unwrap_or(usize::MAX)),
        latency_ms: status.gateway.and_then(|g| g.latency_milliseconds),
    })
}

pub(crate) fn render(rows: &[Row], output: Output) -> String {
    let mut rows: Vec<&Row> = rows.iter().collect();
    rows.sort_by(|a, b| a.cluster.cmp(&b.cluster));
    if output == Output::Json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "clusterName": r.cluster,
                    "alive": r.alive == Some(true),
                    "numberOfServices": r.services,
                    "latency": r.latency_ms.filter(|_| r.alive == Some(true)),
                })
            })
            .collect();
        return format!("{}\n", serde_json::Value::Array(v));
    }
    let cells: Vec<[String; 4]> = rows
        .iter()
        .map(|r| {
            [
                r.cluster.clone(),
                match r.alive {
                    Some(true) => "True".into(),
                    Some(false) => "False".into(),
                    None => "Unknown".into(),
                },
                r.services.to_string(),
                match (r.alive, r.latency_ms) {
                    (Some(true), Some(ms)) => format!("{ms}ms"),
                    _ => "-".into(),
                },
            ]
        })
        .collect();
    let header = ["CLUSTER", "ALIVE", "NUM_SVC", "LATENCY"].map(String::from);
    let width = |i: usize| {
        std::iter::once(&header)
            .chain(&cells)
            .map(|c| c[i].len())
            .max()
            .unwrap_or(0)
    };
    let widths = [width(0), width(1), width(2)];
    std::iter::once(&header)
        .chain(&cells)
        .map(|c| {
            format!(
                "{:w0$}   {:w1$}   {:w2$}   {}\n",
                c[0],
                c[1],
                c[2],
                c[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2]
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(cluster: &str, probe: bool, status: serde_json::Value) -> Link {
        serde_json::from_value(json!({
            "apiVersion": "multicluster.linkerd.io/v1alpha3", "kind": "Link",
            "metadata": { "name": cluster, "namespace": "linkerd-multicluster" },
            "spec": { "targetClusterName": cluster, "probeSpec": if probe { json!({ "path": "/ready", "port": "4191", "period": "3s" }) } else { json!({}) } },
            "status": status,
        }))
        .unwrap()
    }

    fn cond(t: &str, s: &str) -> serde_json::Value {
        json!({ "type": t, "status": s, "reason": "R", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z" })
    }

    #[test]
    fn table() {
        let mirrored = |name: &str, s: &str| {
            json!({
                "controllerName": "linkerd.io/service-mirror",
                "remoteRef": { "name": name, "namespace": "shop" },
                "conditions": [cond("Mirrored", s)],
            })
        };
        let links = [
            link(
                "west",
                true,
                json!({ "conditions": [cond("GatewayAlive", "False")], "gateway": { "latencyMilliseconds": 9 },
                "mirrorServices": [mirrored("a", "True")] }),
            ),
            link(
                "east",
                true,
                json!({ "conditions": [cond("GatewayAlive", "True")], "gateway": { "latencyMilliseconds": 3 },
                "mirrorServices": [mirrored("a", "True"), mirrored("b", "True"), mirrored("c", "False")] }),
            ),
            link("north", false, json!({})),
        ];
        let rows: Vec<Row> = links.iter().filter_map(row).collect();
        assert_eq!(rows.len(), 2, "Links without a probe are not listed");
        assert_eq!(
            render(&rows, Output::Yaml),
            "CLUSTER   ALIVE   NUM_SVC   LATENCY\n\
             east      True    2         3ms\n\
             west      False   1         -\n"
        );
        let json: serde_json::Value = serde_json::from_str(&render(&rows, Output::Json)).unwrap();
        assert_eq!(
            json[0],
            json!({ "clusterName": "east", "alive": true, "numberOfServices": 2, "latency": 3 })
        );
        assert_eq!(json[1]["latency"], serde_json::Value::Null);
    }
}
