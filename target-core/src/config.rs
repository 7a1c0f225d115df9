//! The desired state of the target: what callers (the standalone YAML loader, the Kubernetes
//! reconciler) compute and apply. Plain data, already validated by whoever built it; the
//! target table diffs one `DesiredState` against the live one.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;

/// Everything the target should serve. Keyed by IQN so the diff is deterministic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub targets: BTreeMap<String, TargetConfig>,
    /// CHAP for discovery sessions. `None`: discovery takes no authentication. `Some` with no
    /// incoming account: discovery is required to authenticate and nobody can (a configured
    /// discovery secret that could not be read fails closed).
    pub discovery_chap: Option<ChapConfig>,
}

/// One iSCSI target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// iSCSI qualified name (RFC 3720 §3.2.6), already validated.
    pub iqn: String,
    /// TargetAlias sent at login, if any.
    pub alias: Option<String>,
    /// LUNs keyed by number.
    pub luns: BTreeMap<u16, LunConfig>,
    /// Who may log in. An empty ACL admits nobody (as tgtd).
    pub acl: Acl,
    /// CHAP accounts bound to this target. Non-empty means CHAP is required.
    pub chap: ChapConfig,
}

/// One logical unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunConfig {
    pub lun: u16,
    pub backing: Backing,
    /// Logical block size in bytes: 512 or 4096.
    pub block_size: u32,
    pub read_only: bool,
    /// Open the store with O_DIRECT (bypass the page cache).
    pub direct: bool,
    /// For files: create the file sparse at this size if it does not exist.
    pub create_size: Option<u64>,
    /// For files: create a missing file as a reflink copy of this one (grown to
    /// `create_size`) instead of empty; fails where the filesystem cannot reflink.
    pub clone_from: Option<PathBuf>,
    /// Product serial number override; by default derived from target IQN and LUN.
    pub serial: Option<String>,
}

/// Where a LUN's blocks live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// A regular file or a block device, through io_uring where the kernel allows, else the
    /// portable thread-pool backend.
    Path(PathBuf),
    /// A RAM store of the given size in bytes (tests, demos). Contents are lost on restart.
    Memory { size: u64 },
}

impl LunConfig {
    /// LUN `lun` in RAM, `size` bytes of 512-byte blocks, writable, nothing else set.
    pub fn memory(lun: u16, size: u64) -> LunConfig {
        LunConfig {
            lun,
            backing: Backing::Memory { size },
            block_size: 512,
            read_only: false,
            direct: false,
            create_size: None,
            clone_from: None,
            serial: None,
        }
    }
}

/// Access control for a target (see `docs/design/access.md`): a list of grants, one per
/// InitiatorGroup bound to the target. A login is admitted when one grant admits it; each
/// grant is judged on its own, so group A = (iqn-a, 10.1.0.0/16) beside group B = (iqn-b,
/// 10.2.0.0/16) admits iqn-b from 10.2.0.0/16 only, never from A's network. No grant: nobody.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    pub grants: Vec<Grant>,
}

/// One grant of an [`Acl`]. It admits a login when:
/// - `initiators` is empty or contains the InitiatorName, AND
/// - `addresses` is empty or one of its rules matches the source address,
/// - and at least one of the two lists is non-empty (an empty grant admits nobody).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    pub initiators: Vec<String>,
    pub addresses: Vec<AddressRule>,
    /// Where the grant comes from, for administrators (`binding B, group G`); not part of
    /// the decision.
    pub source: String,
}

/// One address rule of an ACL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressRule {
    /// `ALL`: any source address.
    All,
    /// An address or CIDR block (a bare address is a /32 or /128 network).
    Net(IpNet),
}

impl AddressRule {
    /// Whether `addr` is admitted by this rule. IPv4-mapped IPv6 sources (`::ffff:a.b.c.d`)
    /// match IPv4 rules.
    pub fn matches(&self, addr: IpAddr) -> bool {
        match self {
            AddressRule::All => true,
            AddressRule::Net(net) => {
                let addr = match addr {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
                    v4 => v4,
                };
                net.contains(&addr)
            }
        }
    }
}

impl Acl {
    /// An ACL of one grant (tests, and configurations without groups).
    pub fn single(initiators: Vec<String>, addresses: Vec<AddressRule>) -> Acl {
        Acl {
            grants: vec![Grant {
                initiators,
                addresses,
                source: String::new(),
            }],
        }
    }

    /// The ACL decision for a login from `initiator` at `addr`.
    pub fn admits(&self, initiator: &str, addr: IpAddr) -> bool {
        self.grants.iter().any(|g| g.admits(initiator, addr))
    }

    /// Every initiator name some grant names, sorted, once each.
    pub fn initiators(&self) -> Vec<String> {
        let set: std::collections::BTreeSet<&String> =
            self.grants.iter().flat_map(|g| &g.initiators).collect();
        set.into_iter().cloned().collect()
    }

    /// Every address rule some grant has, once each: `ALL` first, then networks in order.
    pub fn addresses(&self) -> Vec<AddressRule> {
        let mut out: Vec<AddressRule> = Vec::new();
        for r in self.grants.iter().flat_map(|g| &g.addresses) {
            if !out.contains(r) {
                out.push(*r);
            }
        }
        out.sort_by_key(|rule| match rule {
            AddressRule::All => None,
            AddressRule::Net(net) => Some(*net),
        });
        out
    }

    /// Whether no grant admits anyone.
    pub fn admits_nobody(&self) -> bool {
        self.grants
            .iter()
            .all(|g| g.initiators.is_empty() && g.addresses.is_empty())
    }
}

impl Grant {
    /// This grant's decision for a login from `initiator` at `addr`.
    pub fn admits(&self, initiator: &str, addr: IpAddr) -> bool {
        if self.initiators.is_empty() && self.addresses.is_empty() {
            return false;
        }
        let name_ok = self.initiators.is_empty()
            || self
                .initiators
                .iter()
                .any(|i| i.eq_ignore_ascii_case(initiator));
        let addr_ok = self.addresses.is_empty() || self.addresses.iter().any(|r| r.matches(addr));
        name_ok && addr_ok
    }
}

/// CHAP credentials: a user name and a secret (at least 12 bytes, checked at configuration).
#[derive(Clone, PartialEq, Eq)]
pub struct ChapCredentials {
    pub user: String,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for ChapCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapCredentials")
            .field("user", &self.user)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// CHAP accounts of a target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChapConfig {
    /// Accounts an initiator may authenticate as (one-way CHAP). Non-empty means required.
    pub incoming: Vec<ChapCredentials>,
    /// The target's own credentials for mutual CHAP, if configured.
    pub outgoing: Option<ChapCredentials>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_rules() {
        let none = Acl::default();
        assert!(!none.admits("iqn.x", "127.0.0.1".parse().unwrap()));
        let all = Acl::single(vec![], vec![AddressRule::All]);
        assert!(all.admits("iqn.x", "::1".parse().unwrap()));
        let both = Acl::single(
            vec!["iqn.a".into()],
            vec![AddressRule::Net("10.0.0.0/8".parse().unwrap())],
        );
        assert!(both.admits("iqn.a", "10.1.2.3".parse().unwrap()));
        assert!(both.admits("IQN.A", "::ffff:10.1.2.3".parse().unwrap()));
        assert!(!both.admits("iqn.b", "10.1.2.3".parse().unwrap()));
        assert!(!both.admits("iqn.a", "127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn each_grant_is_judged_on_its_own() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let net = |s: &str| AddressRule::Net(s.parse().unwrap());
        let grant = |names: &[&str], addrs: Vec<AddressRule>| Grant {
            initiators: names.iter().map(|n| n.to_string()).collect(),
            addresses: addrs,
            source: String::new(),
        };
        // Group A = (iqn-a, 10.1/16), group B = (iqn-b, 10.2/16).
        let acl = Acl {
            grants: vec![
                grant(&["iqn-a"], vec![net("10.1.0.0/16")]),
                grant(&["iqn-b"], vec![net("10.2.0.0/16")]),
            ],
        };
        assert!(acl.admits("iqn-b", ip("10.2.0.5")));
        assert!(
            !acl.admits("iqn-b", ip("10.1.0.5")),
            "B admitted from A's network"
        );
        assert!(!acl.admits("iqn-a", ip("10.2.0.5")));
        // Names only beside addresses only: each keeps its own reach.
        let acl = Acl {
            grants: vec![
                grant(&["iqn-n"], vec![]),
                grant(&[], vec![net("192.0.2.0/24")]),
            ],
        };
        assert!(
            acl.admits("iqn-n", ip("198.51.100.1")),
            "names lost their reach"
        );
        assert!(acl.admits("iqn-other", ip("192.0.2.7")));
        assert!(!acl.admits("iqn-other", ip("198.51.100.1")));
        assert_eq!(acl.initiators(), vec!["iqn-n".to_owned()]);
        // An empty grant admits nobody and does not open the others.
        let acl = Acl {
            grants: vec![grant(&[], vec![])],
        };
        assert!(acl.admits_nobody() && !acl.admits("iqn-x", ip("127.0.0.1")));
    }
}
