//! Prints the Link CRD (`make crds` writes it to `manifests/crds/link.yaml`).

use std::io::Write;

fn main() -> std::io::Result<()> {
    std::io::stdout().write_all(link_crd::crd_yaml().as_bytes())
}
