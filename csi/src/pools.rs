//! Storage pools: where the controller makes volumes.
//!
//! A pool is a directory on one storage node (the node whose agent serves the volume's
//! Target), with a capacity the administrator grants it. Declared on the controller's command
//! line, one `--pool` each:
//!
//! ```text
//! --pool name=fast,node=storage-1,path=/var/lib/ktgt/csi/fast,capacity=500Gi
//! ```
//!
//! Volumes are sparse files, so capacity is accounted, not measured: a pool's free capacity is
//! its `capacity` less the sizes of the volumes in it (the Targets labelled with its name).
//! `path` must lie under the agent's `--csi-volume-dir` on that node (default
//! `/var/lib/ktgt/csi`), the only place where the agent deletes a volume's file when the
//! volume is deleted.

use std::collections::BTreeSet;
use std::fmt;

use ktgt_operator::quantity::parse_bytes;

/// One pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    /// The storage node: the Target's `spec.nodeName`.
    pub node: String,
    /// Absolute directory on that node.
    pub path: String,
    /// Bytes the pool may hand out.
    pub capacity: u64,
}

/// A `--pool` value that cannot be used, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--pool {value:?}: {reason}")]
pub struct PoolError {
    pub value: String,
    pub reason: String,
}

impl Pool {
    /// Parses `name=…,node=…,path=…,capacity=…` (every field required, each once).
    pub fn parse(value: &str) -> Result<Pool, PoolError> {
        let fail = |reason: String| PoolError {
            value: value.to_owned(),
            reason,
        };
        let (mut name, mut node, mut path, mut capacity) = (None, None, None, None);
        for part in value.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| fail(format!("{part:?} is not key=value")))?;
            let slot = match k.trim() {
                "name" => &mut name,
                "node" => &mut node,
                "path" => &mut path,
                "capacity" => &mut capacity,
                other => {
                    return Err(fail(format!(
                        "unknown field {other:?}; the fields are name, node, path, capacity"
                    )))
                }
            };
            if slot.replace(v.trim().to_owned()).is_some() {
                return Err(fail(format!("field {} given twice", k.trim())));
            }
        }
        let need = |v: Option<String>, field: &str| {
            v.filter(|s| !s.is_empty())
                .ok_or_else(|| fail(format!("field {field} is missing")))
        };
        let name = need(name, "name")?;
        let node = need(node, "node")?;
        let path = need(path, "path")?;
        let capacity = need(capacity, "capacity")?;
        if !is_dns_label(&name) {
            return Err(fail(format!(
                "name {name:?}: lower-case letters, digits and '-', at most 63 (a label value)"
            )));
        }
        if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
            return Err(fail(format!(
                "path {path:?}: an absolute directory without '..'"
            )));
        }
        let capacity = parse_bytes(&capacity).map_err(|e| fail(format!("capacity: {e}")))?;
        Ok(Pool {
            name,
            node,
            path: path.trim_end_matches('/').to_owned(),
            capacity,
        })
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Every pool the controller may use, in the order given.
#[derive(Debug, Clone, Default)]
pub struct Pools(Vec<Pool>);

impl Pools {
    /// Checks that names are unique.
    pub fn new(pools: Vec<Pool>) -> Result<Pools, PoolError> {
        let mut seen = BTreeSet::new();
        for p in &pools {
            if !seen.insert(p.name.clone()) {
                return Err(PoolError {
                    value: p.name.clone(),
                    reason: "two pools with this name".to_owned(),
                });
            }
        }
        Ok(Pools(pools))
    }

    pub fn get(&self, name: &str) -> Option<&Pool> {
        self.0.iter().find(|p| p.name == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Pool> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} bytes at {}:{})",
            self.name, self.capacity, self.node, self.path
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_pool_parses() {
        let p = Pool::parse("name=fast,node=storage-1,path=/var/lib/ktgt/csi/fast/,capacity=2Gi")
            .unwrap();
        assert_eq!(
            p,
            Pool {
                name: "fast".into(),
                node: "storage-1".into(),
                path: "/var/lib/ktgt/csi/fast".into(),
                capacity: 2 << 30,
            }
        );
    }

    #[test]
    fn bad_pools_name_the_field() {
        for (value, words) in [
            ("node=a,path=/p,capacity=1Gi", "field name is missing"),
            ("name=a,path=/p,capacity=1Gi", "field node is missing"),
            ("name=a,node=n,capacity=1Gi", "field path is missing"),
            ("name=a,node=n,path=/p", "field capacity is missing"),
            ("name=a,node=n,path=rel,capacity=1Gi", "absolute directory"),
            ("name=a,node=n,path=/a/../b,capacity=1Gi", "without '..'"),
            ("name=A,node=n,path=/p,capacity=1Gi", "lower-case"),
            ("name=a,node=n,path=/p,capacity=lots", "capacity:"),
            (
                "name=a,node=n,path=/p,capacity=1Gi,size=2",
                "unknown field \"size\"",
            ),
            ("name=a,name=b,node=n,path=/p,capacity=1Gi", "given twice"),
            ("name=a,node", "not key=value"),
        ] {
            let e = Pool::parse(value).unwrap_err();
            assert!(e.to_string().contains(words), "{value}: {e}");
        }
    }

    #[test]
    fn pool_names_are_unique() {
        let p = Pool::parse("name=a,node=n,path=/p,capacity=1Gi").unwrap();
        assert!(Pools::new(vec![p.clone(), p]).is_err());
    }
}
