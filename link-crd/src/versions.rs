//! The served versions of the Link CRD and the CRD document itself.
//!
//! Linkerd serves `v1alpha1`, `v1alpha2` and `v1alpha3` with no conversion webhook: an object is
//! stored once (as `v1alpha3`) and each version's structural schema only decides which fields
//! that version shows and keeps. So the older schemas are the storage schema minus what each
//! version lacks, derived here rather than written out a second and third time.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionVersion,
};
use kube::core::{ApiResource, CustomResourceExt, GroupVersionKind};

use crate::{GROUP, Link, keys};

/// A served version of the Link resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinkVersion {
    /// The first version: no status, no federated selector, no exclusion lists.
    V1alpha1,
    /// Adds `federatedServiceSelector` and the status subresource.
    V1alpha2,
    /// Adds `excludedAnnotations` and `excludedLabels`; the storage version.
    V1alpha3,
}

impl LinkVersion {
    /// Every served version, oldest first.
    pub const ALL: [Self; 3] = [Self::V1alpha1, Self::V1alpha2, Self::V1alpha3];

    /// The version's name, e.g. `v1alpha3`.
    pub fn name(self) -> &'static str {
        match self {
            Self::V1alpha1 => "v1alpha1",
            Self::V1alpha2 => "v1alpha2",
            Self::V1alpha3 => "v1alpha3",
        }
    }

    /// Spec fields this version does not have.
    fn missing_spec_fields(self) -> &'static [&'static str] {
        match self {
            Self::V1alpha1 => &[
                "federatedServiceSelector",
                "excludedAnnotations",
                "excludedLabels",
            ],
            Self::V1alpha2 => &["excludedAnnotations", "excludedLabels"],
            Self::V1alpha3 => &[],
        }
    }

    fn has_status(self) -> bool {
        self != Self::V1alpha1
    }
}

/// The API resource of one served version, for use with `kube::Api<DynamicObject>`.
pub fn api_resource(version: LinkVersion) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, version.name(), "Link"),
        "links",
    )
}

/// The complete CRD: every served version, `v1alpha3` stored.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = Link::crd();
    let storage = crd
        .spec
        .versions
        .pop()
        .expect("kube-derive emits one version per CustomResource");
    crd.spec.versions = LinkVersion::ALL
        .into_iter()
        .map(|v| derive_version(&storage, v))
        .collect();
    // Linkerd labels every object of the extension this way; `uninstall` selects by it.
    crd.metadata.labels = Some(
        [(
            keys::EXTENSION_LABEL.to_owned(),
            keys::EXTENSION_VALUE.to_owned(),
        )]
        .into(),
    );
    crd
}

/// The CRD as the YAML document committed in `manifests/crds/link.yaml`.
pub fn crd_yaml() -> String {
    let body = serde_norway::to_string(&crd()).expect("a CRD always serialises to YAML");
    format!(
        "# Generated from link-crd's Rust types by `make crds`; do not edit by hand.\n---\n{body}"
    )
}

fn derive_version(
    storage: &CustomResourceDefinitionVersion,
    version: LinkVersion,
) -> CustomResourceDefinitionVersion {
    let mut v = storage.clone();
    v.name = version.name().to_owned();
    v.storage = version == LinkVersion::V1alpha3;
    v.served = true;
    let Some(root) = v
        .schema
        .as_mut()
        .and_then(|s| s.open_api_v3_schema.as_mut())
    else {
        return v;
    };
    let props = root.properties.get_or_insert_default();
    if let Some(spec) = props.get_mut("spec").and_then(|s| s.properties.as_mut()) {
        for field in version.missing_spec_fields() {
            spec.remove(*field);
        }
    }
    if !version.has_status() {
        props.remove("status");
        v.subresources = None;
        if let Some(cols) = v.additional_printer_columns.as_mut() {
            cols.retain(|c| !c.json_path.starts_with(".status"));
        }
    }
    v
}

/// The schema of one version's spec, for tests.
#[cfg(test)]
fn spec_schema(
    crd: &CustomResourceDefinition,
    version: LinkVersion,
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps {
    crd.spec
        .versions
        .iter()
        .find(|v| v.name == version.name())
        .and_then(|v| v.schema.clone())
        .and_then(|s| s.open_api_v3_schema)
        .and_then(|s| s.properties)
        .and_then(|mut p| p.remove("spec"))
        .expect("every version has a spec")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_differ_only_where_linkerd_does() {
        let crd = crd();
        let names: Vec<_> = crd.spec.versions.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["v1alpha1", "v1alpha2", "v1alpha3"]);
        let stored: Vec<_> = crd.spec.versions.iter().filter(|v| v.storage).collect();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].name, "v1alpha3");
        assert!(crd.spec.versions.iter().all(|v| v.served));

        let fields = |v| -> Vec<String> {
            spec_schema(&crd, v)
                .properties
                .unwrap()
                .into_keys()
                .collect()
        };
        let v1 = fields(LinkVersion::V1alpha1);
        let v2 = fields(LinkVersion::V1alpha2);
        let v3 = fields(LinkVersion::V1alpha3);
        assert_eq!(v3.len(), 13, "{v3:?}");
        assert_eq!(v2.len(), 11);
        assert_eq!(v1.len(), 10);
        assert!(v2.contains(&"federatedServiceSelector".to_owned()));
        assert!(!v1.contains(&"federatedServiceSelector".to_owned()));

        let status = |v: LinkVersion| {
            let ver = crd
                .spec
                .versions
                .iter()
                .find(|x| x.name == v.name())
                .unwrap();
            (
                ver.subresources.is_some(),
                ver.schema
                    .clone()
                    .unwrap()
                    .open_api_v3_schema
                    .unwrap()
                    .properties
                    .unwrap()
                    .contains_key("status"),
            )
        };
        assert_eq!(status(LinkVersion::V1alpha1), (false, false));
        assert_eq!(status(LinkVersion::V1alpha2), (true, true));
        assert_eq!(status(LinkVersion::V1alpha3), (true, true));
    }

    #[test]
    fn probe_defaults_are_in_the_schema() {
        let probe = spec_schema(&crd(), LinkVersion::V1alpha3)
            .properties
            .unwrap()["probeSpec"]
            .properties
            .clone()
            .unwrap();
        assert_eq!(
            probe["failureThreshold"].default.as_ref().map(|d| &d.0),
            Some(&serde_json::json!("3"))
        );
        assert_eq!(
            probe["timeout"].default.as_ref().map(|d| &d.0),
            Some(&serde_json::json!("30s"))
        );
    }

    /// The committed CRD must be what the types generate. Run `make crds` after changing them.
    #[test]
    fn committed_crd_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/crds/link.yaml");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == crd_yaml(),
            "{path} is stale: run `make crds` and commit the result"
        );
    }
}
