//! Prints the CustomResourceDefinitions of Target, InitiatorGroup, InitiatorGroupBinding and
//! TargetSnapshot as a YAML stream. `deploy/crds/` holds its output; `deploy/check-drift.sh` compares.
//!
//! `crdgen` prints the stream to stdout; `crdgen DIR` writes one `<plural>.yaml` per CRD into
//! DIR instead.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let crds = ktgt_operator::crds();
    match std::env::args_os().nth(1) {
        None => print!("{}", ktgt_operator::crd_yaml_stream(&crds)?),
        Some(dir) => {
            let dir = Path::new(&dir);
            for crd in &crds {
                let path = dir.join(ktgt_operator::crd_file_name(crd));
                std::fs::write(&path, ktgt_operator::crd_yaml(crd)?)
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
            }
        }
    }
    Ok(())
}
