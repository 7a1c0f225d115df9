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

/// Access control for a target (see `docs/design/access.md`).
///
/// A login is admitted when:
/// - `initiators` is empty or contains the InitiatorName, AND
/// - `addresses` is empty or one of its rules matches the source address,
/// - and at least one of the two lists is non-empty (an empty ACL admits nobody).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    pub initiators: Vec<String>,
    pub addresses: Vec<AddressRule>,
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
    /// The ACL decision for a login from `initiator` at `addr`.
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
        let all = Acl {
            initiators: vec![],
            addresses: vec![AddressRule::All],
        };
        assert!(all.admits("iqn.x", "::1".parse().unwrap()));
        let both = Acl {
            initiators: vec!["iqn.a".into()],
            addresses: vec![AddressRule::Net("10.0.0.0/8".parse().unwrap())],
        };
        assert!(both.admits("iqn.a", "10.1.2.3".parse().unwrap()));
        assert!(both.admits("IQN.A", "::ffff:10.1.2.3".parse().unwrap()));
        assert!(!both.admits("iqn.b", "10.1.2.3".parse().unwrap()));
        assert!(!both.admits("iqn.a", "127.0.0.1".parse().unwrap()));
    }
}
