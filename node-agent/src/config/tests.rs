//! Loader tests: each validation error names its object and field; the access rule.

use std::net::IpAddr;
use std::path::PathBuf;

use target_core::config::{AddressRule, Backing, DesiredState, TargetConfig};

use super::api::{InitiatorGroupBinding, Target};
use super::*;

const GROUP_VERSION: &str = "apiVersion: tgtd.unstable.cloud/v1alpha1";

/// A Target with one LUN; `extra` is appended to `spec`.
fn target(name: &str, iqn: &str, extra: &str) -> String {
    format!(
        "---\n{GROUP_VERSION}\nkind: Target\nmetadata:\n  name: {name}\nspec:\n  iqn: {iqn}\n  \
         luns:\n  - lun: 1\n    backingStore: /var/tmp/{name}.img\n{extra}"
    )
}

/// A Target with the given `luns:` items (indented by 2).
fn target_luns(name: &str, luns: &str) -> String {
    format!(
        "---\n{GROUP_VERSION}\nkind: Target\nmetadata:\n  name: {name}\nspec:\n  \
         iqn: iqn.2026-11.io.ktgt:{name}\n  luns:\n{luns}"
    )
}

/// An InitiatorGroup; `body` is the indented content of the object after `metadata`.
fn group(name: &str, body: &str) -> String {
    format!("---\n{GROUP_VERSION}\nkind: InitiatorGroup\nmetadata:\n  name: {name}\n{body}")
}

fn binding(name: &str, target: &str, group: &str) -> String {
    format!(
        "---\n{GROUP_VERSION}\nkind: InitiatorGroupBinding\nmetadata:\n  name: {name}\nspec:\n  \
         targetRef:\n    name: {target}\n  initiatorGroupRef:\n    name: {group}\n"
    )
}

fn secret(name: &str, body: &str) -> String {
    format!("---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n{body}")
}

fn ok(yaml: &str) -> DesiredState {
    match parse_str(yaml, "test.yaml") {
        Ok(state) => state,
        Err(e) => panic!("unexpected error: {e}\n--- input ---\n{yaml}"),
    }
}

/// The error messages of an invalid configuration.
fn errors(yaml: &str) -> Vec<String> {
    match parse_str(yaml, "test.yaml") {
        Ok(state) => panic!("expected an error, got {state:?}"),
        Err(e) => {
            let list: Vec<String> = e.object_errors().iter().map(|e| e.to_string()).collect();
            assert!(!list.is_empty(), "not an object error: {e}");
            list
        }
    }
}

/// Asserts that exactly one error is reported and that it contains every needle.
#[track_caller]
fn assert_one_error(yaml: &str, needles: &[&str]) {
    let list = errors(yaml);
    assert_eq!(list.len(), 1, "expected one error, got {list:#?}");
    for needle in needles {
        assert!(list[0].contains(needle), "{:?} lacks {needle:?}", list[0]);
    }
}

fn the_target<'a>(state: &'a DesiredState, iqn: &str) -> &'a TargetConfig {
    state
        .targets
        .get(iqn)
        .unwrap_or_else(|| panic!("no target {iqn}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// The example and the happy path

#[test]
fn example_file_parses() {
    let yaml = include_str!("../../../deploy/examples/standalone.yaml");
    let state = ok(yaml);
    assert_eq!(state.targets.len(), 1);
    let t = the_target(&state, "iqn.2026-11.io.ktgt:demo");
    let lun = &t.luns[&1];
    assert_eq!(lun.backing, Backing::Path("/var/tmp/ktgt/demo.img".into()));
    assert_eq!(lun.create_size, Some(1 << 30));
    assert_eq!(lun.block_size, 512);
    assert!(!lun.read_only && !lun.direct);
    assert_eq!(t.acl.addresses(), vec![AddressRule::All]);
    assert!(t.acl.initiators().is_empty());
    assert!(t
        .acl
        .admits("iqn.2004-10.com.ubuntu:01:abc", ip("127.0.0.1")));
    assert!(t.chap.incoming.is_empty());
}

#[test]
fn example_file_loads_from_disk() {
    // The example's LUN has a size, so a missing image is fine at load time.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/standalone.yaml");
    load_file(&path).unwrap();
}

#[test]
fn lun_fields_map_to_lun_config() {
    let yaml = target_luns(
        "disk1",
        "  - lun: 0\n    backingStore: /dev/sdb\n    bsType: aio\n    readOnly: true\n    \
         blockSize: 4096\n    bsOpts: bsoflags=direct\n\
         \x20 - lun: 16383\n    backingStore: /var/tmp/a.img\n    size: 1073741824\n    direct: true\n\
         \x20 - lun: 7\n    bsType: memory\n    size: 64Mi\n",
    );
    let state = ok(&yaml);
    let t = the_target(&state, "iqn.2026-11.io.ktgt:disk1");
    let l0 = &t.luns[&0];
    assert_eq!(l0.backing, Backing::Path("/dev/sdb".into()));
    assert!(l0.read_only && l0.direct);
    assert_eq!((l0.block_size, l0.create_size), (4096, None));
    let l1 = &t.luns[&16383];
    assert_eq!(l1.create_size, Some(1 << 30));
    assert!(l1.direct && !l1.read_only);
    assert_eq!(t.luns[&7].backing, Backing::Memory { size: 64 << 20 });
    assert_eq!(t.luns[&7].create_size, None);
}

#[test]
fn empty_documents_and_files() {
    assert_eq!(ok(""), DesiredState::default());
    assert_eq!(ok("---\n---\n"), DesiredState::default());
    let yaml = format!("---\n{}---\n", target("a", "iqn.2026-11.io.ktgt:a", ""));
    assert_eq!(ok(&yaml).targets.len(), 1);
}

#[test]
fn kubectl_list_is_flattened() {
    let yaml = "apiVersion: v1\nkind: List\nitems:\n\
        - apiVersion: tgtd.unstable.cloud/v1alpha1\n  kind: Target\n  metadata:\n    name: a\n    \
          uid: 0b7c\n    resourceVersion: \"42\"\n    finalizers: [x]\n  spec:\n    \
          targetNodeName: node1\n    iqn: iqn.2026-11.io.ktgt:a\n  status:\n    \
          observedGeneration: 3\n    conditions:\n    - type: Ready\n      status: \"True\"\n    \
          observedState:\n      tid: 1\n      luns:\n      - backingStore: None\n      - lun: 1\n\
        - apiVersion: tgtd.unstable.cloud/v1alpha1\n  kind: Target\n  metadata:\n    name: b\n  \
          spec:\n    iqn: iqn.2026-11.io.ktgt:a\n";
    let list = errors(yaml);
    assert_eq!(
        list,
        vec![
            "document 1, items[1]: Target \"b\": spec.iqn: IQN \"iqn.2026-11.io.ktgt:a\" is \
             already used by Target \"a\""
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Schema errors

#[test]
fn unknown_field_names_object_and_path() {
    let yaml = target_luns(
        "disk1",
        "  - lun: 1\n    backingStore: /x\n    bsOtps: direct\n",
    );
    assert_one_error(
        &yaml,
        &[
            "document 1: Target \"disk1\": spec.luns[0]",
            "unknown field `bsOtps`",
        ],
    );
    let yaml = group("g", "spec:\n  adresses: [ALL]\n");
    assert_one_error(&yaml, &["InitiatorGroup \"g\"", "unknown field `adresses`"]);
}

#[test]
fn wrong_type_names_path() {
    let yaml = target_luns("disk1", "  - lun: one\n    backingStore: /x\n");
    assert_one_error(
        &yaml,
        &["Target \"disk1\": spec.luns[0].lun", "invalid type"],
    );
}

#[test]
fn unknown_kind_and_api_version() {
    let yaml = format!("{GROUP_VERSION}\nkind: Account\nmetadata:\n  name: acc\n");
    assert_one_error(
        &yaml,
        &["document 1: Account \"acc\": kind: unknown kind \"Account\""],
    );
    let yaml = "apiVersion: tgtd.unstable.cloud/v1beta1\nkind: Target\nmetadata:\n  name: t\n";
    assert_one_error(
        yaml,
        &["Target \"t\": apiVersion: apiVersion \"tgtd.unstable.cloud/v1beta1\" is not served"],
    );
    let yaml = "apiVersion: tgtd.unstable.cloud/v1alpha1\nkind: Secret\nmetadata:\n  name: s\n";
    assert_one_error(yaml, &["Secret \"s\": apiVersion", "expected \"v1\""]);
    assert_one_error(
        "- 1\n- 2\n",
        &["document 1: object (unnamed)", "expected an object"],
    );
}

#[test]
fn yaml_syntax_error_names_document() {
    let yaml = format!("{}---\nkind: [\n", target("a", "iqn.2026-11.io.ktgt:a", ""));
    let e = parse_str(&yaml, "test.yaml").unwrap_err();
    assert!(matches!(e, ConfigError::Yaml { document: 2, .. }), "{e:?}");
    assert!(e.to_string().starts_with("test.yaml: document 2: "), "{e}");
    // The parser's message is in ours, and not again as a source (an error report walking
    // the chain would print it twice).
    assert!(std::error::Error::source(&e).is_none(), "{e:?}");
    let report = format!("{:?}", anyhow::Error::from(e));
    assert!(!report.contains("Caused by"), "{report}");
}

#[test]
fn missing_name() {
    let yaml = format!("{GROUP_VERSION}\nkind: InitiatorGroup\nspec:\n  addresses: [ALL]\n");
    assert_one_error(
        &yaml,
        &["document 1: InitiatorGroup (unnamed): metadata.name: missing"],
    );
}

#[test]
fn duplicate_names_per_kind() {
    let yaml = format!(
        "{}{}{}{}",
        target("a", "iqn.2026-11.io.ktgt:a", ""),
        target("a", "iqn.2026-11.io.ktgt:b", ""),
        group("a", ""),
        group("a", ""),
    );
    let list = errors(&yaml);
    assert_eq!(
        list,
        vec![
            "document 2: Target \"a\": metadata.name: duplicate name: another Target has the \
             same name",
            "document 4: InitiatorGroup \"a\": metadata.name: duplicate name: another \
             InitiatorGroup has the same name",
        ]
    );
}

#[test]
fn duplicate_iqn_across_targets() {
    let yaml = format!(
        "{}{}",
        target("a", "iqn.2026-11.io.ktgt:same", ""),
        target("b", "iqn.2026-11.io.ktgt:same", ""),
    );
    assert_one_error(
        &yaml,
        &["document 2: Target \"b\": spec.iqn: IQN \"iqn.2026-11.io.ktgt:same\" is already used by Target \"a\""],
    );
}

#[test]
fn duplicate_iqn_first_claim_wins_even_when_broken() {
    // Cluster mode: the older Target "a" is broken; the newer duplicate must not take over
    // its IQN (initiators would reach b's LUNs under a's name).
    let yaml = format!(
        "{}{}{}{}",
        target_luns("a", "  - lun: 1\n    backingStore: /a\n    blockSize: 1\n")
            .replace("iqn.2026-11.io.ktgt:a", "iqn.2026-11.io.ktgt:same"),
        target("b", "iqn.2026-11.io.ktgt:same", ""),
        target("c", "eui.02004567A425678D", ""),
        target("d", "eui.02004567a425678d", ""),
    );
    let resolved = desired_state_for_node(&objects(&yaml), None);
    assert_eq!(
        resolved.state.targets.keys().collect::<Vec<_>>(),
        vec!["eui.02004567A425678D"]
    );
    assert_eq!(
        resolved.failed_targets.iter().collect::<Vec<_>>(),
        vec!["a", "b", "d"]
    );
    let d = resolved.errors.iter().find(|e| e.name == "d").unwrap();
    assert_eq!(d.problem.reason(), "DuplicateIqn");
}

// ---------------------------------------------------------------------------------------------
// LUN errors

#[test]
fn duplicate_lun() {
    let yaml = target_luns(
        "disk1",
        "  - lun: 1\n    backingStore: /a\n  - lun: 1\n    backingStore: /b\n",
    );
    let list = errors(&yaml);
    assert_eq!(
        list,
        vec!["document 1: Target \"disk1\": spec.luns[1].lun: duplicate LUN 1"]
    );
}

#[test]
fn lun_out_of_range() {
    for lun in ["-1", "16384"] {
        let yaml = target_luns("disk1", &format!("  - lun: {lun}\n    backingStore: /a\n"));
        assert_one_error(
            &yaml,
            &[&format!(
                "Target \"disk1\": spec.luns[0].lun: LUN {lun} out of range 0..=16383"
            )],
        );
    }
}

#[test]
fn missing_backing_store() {
    let yaml = target_luns("disk1", "  - lun: 1\n");
    assert_one_error(
        &yaml,
        &[
            "Target \"disk1\": spec.luns[0].backingStore: missing",
            "bsType \"rdwr\"",
        ],
    );
    let yaml = target_luns("disk1", "  - lun: 1\n    backingStore: relative.img\n");
    assert_one_error(
        &yaml,
        &["spec.luns[0].backingStore", "not an absolute path"],
    );
}

#[test]
fn bs_type() {
    let yaml = target_luns(
        "disk1",
        "  - lun: 1\n    backingStore: /a\n    bsType: rbd\n",
    );
    assert_one_error(
        &yaml,
        &["Target \"disk1\": spec.luns[0].bsType: unknown bsType \"rbd\"; accepted: rdwr (default), aio, memory"],
    );
    let yaml = target_luns("disk1", "  - lun: 1\n    bsType: memory\n");
    assert_one_error(&yaml, &["spec.luns[0].size: required for bsType memory"]);
    let yaml = target_luns(
        "disk1",
        "  - lun: 1\n    bsType: memory\n    size: 1Mi\n    backingStore: /a\n",
    );
    assert_one_error(
        &yaml,
        &["spec.luns[0].backingStore: must be empty for bsType memory"],
    );
}

#[test]
fn bs_opts() {
    let yaml = target_luns(
        "disk1",
        "  - lun: 1\n    backingStore: /a\n    bsOpts: \"direct; \"\n",
    );
    assert!(ok(&yaml).targets["iqn.2026-11.io.ktgt:disk1"].luns[&1].direct);
    let yaml = target_luns(
        "disk1",
        "  - lun: 1\n    backingStore: /a\n    bsOpts: bsoflags=sync\n",
    );
    assert_one_error(
        &yaml,
        &["spec.luns[0].bsOpts: unsupported bsOpts entry \"bsoflags=sync\""],
    );
}

#[test]
fn block_size() {
    let yaml = target_luns(
        "disk1",
        "  - lun: 1\n    backingStore: /a\n    blockSize: 1024\n",
    );
    assert_one_error(
        &yaml,
        &["Target \"disk1\": spec.luns[0].blockSize: block size 1024 is not supported; use 512 or 4096"],
    );
    let yaml = target_luns(
        "disk1",
        "  - lun: 1\n    backingStore: /a\n    blockSize: 4096\n    size: 4608\n",
    );
    assert_one_error(
        &yaml,
        &["spec.luns[0].size: size 4608 is not a multiple of the block size 4096"],
    );
}

#[test]
fn size_not_parseable() {
    for (size, reason) in [
        ("1GB", "unknown suffix"),
        ("-1", "negative"),
        ("1.5", "whole number"),
    ] {
        let yaml = target_luns(
            "disk1",
            &format!("  - lun: 1\n    backingStore: /a\n    size: \"{size}\"\n"),
        );
        assert_one_error(
            &yaml,
            &[
                &format!("Target \"disk1\": spec.luns[0].size: \"{size}\" is not a size"),
                reason,
            ],
        );
    }
    let yaml = target_luns("disk1", "  - lun: 1\n    backingStore: /a\n    size: [1]\n");
    assert_one_error(&yaml, &["spec.luns[0].size", "quantity"]);
}

#[test]
fn several_errors_are_all_reported() {
    let yaml = target_luns(
        "disk1",
        "  - lun: 1\n    backingStore: /a\n    blockSize: 1000\n  - lun: 99999\n",
    );
    let list = errors(&yaml);
    assert_eq!(list.len(), 3, "{list:#?}");
    assert!(list[0].contains("spec.luns[0].blockSize"));
    assert!(list[1].contains("spec.luns[1].backingStore"));
    assert!(list[2].contains("spec.luns[1].lun"));
    let text = parse_str(&yaml, "test.yaml").unwrap_err().to_string();
    assert!(
        text.starts_with(
            "test.yaml: invalid configuration (3 problems):\n  \
             document 1: Target \"disk1\": spec.luns[0].blockSize: "
        ),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Names and addresses

#[test]
fn target_iqn_checked() {
    let yaml = target("a", "iqn.2026-11.io.KTGT:a", "");
    assert_one_error(
        &yaml,
        &[
            "Target \"a\": spec.iqn: \"iqn.2026-11.io.KTGT:a\" is not a valid iSCSI name",
            "write \"iqn.2026-11.io.ktgt:a\"",
        ],
    );
    let yaml = target("a", "target1", "");
    assert_one_error(&yaml, &["spec.iqn", "must start with"]);
    let yaml = target("a", "eui.02004567A425678D", "");
    assert!(ok(&yaml).targets.contains_key("eui.02004567A425678D"));
}

#[test]
fn initiator_names_checked() {
    let yaml = group(
        "g",
        "spec:\n  initiators:\n  - iqn.2004-10.com.ubuntu:01:abc\n  - iqn.bad\n",
    );
    assert_one_error(
        &yaml,
        &["InitiatorGroup \"g\": spec.initiators[1]: \"iqn.bad\" is not a valid iSCSI name"],
    );
    let yaml = group(
        "g",
        "status:\n  initiators: [\"iqn.2004-10.com.ubuntu:01:a b\"]\n",
    );
    assert_one_error(
        &yaml,
        &["InitiatorGroup \"g\": status.initiators[0]", "whitespace"],
    );
}

#[test]
fn addresses_checked() {
    let yaml = group("g", "spec:\n  addresses: [ALL, 10.0.0.1, 10.0.0.0/33]\n");
    assert_one_error(
        &yaml,
        &["InitiatorGroup \"g\": spec.addresses[2]: \"10.0.0.0/33\" is not an IP address, CIDR block or ALL: bad CIDR block"],
    );
    let yaml = group("g", "status:\n  addresses: [host.example]\n");
    assert_one_error(&yaml, &["status.addresses[0]", "bad IP address"]);
}

#[test]
fn address_forms() {
    assert_eq!(parse_address("ALL"), Ok(AddressRule::All));
    assert_eq!(parse_address("All"), Ok(AddressRule::All));
    assert_eq!(
        parse_address("10.1.2.3/8"),
        Ok(AddressRule::Net("10.0.0.0/8".parse().unwrap()))
    );
    assert_eq!(
        parse_address("fd00::1"),
        Ok(AddressRule::Net("fd00::1/128".parse().unwrap()))
    );
}

// ---------------------------------------------------------------------------------------------
// Bindings and the access rule

#[test]
fn binding_to_missing_objects() {
    let yaml = format!(
        "{}{}{}",
        target("t", "iqn.2026-11.io.ktgt:t", ""),
        group("g", "spec:\n  addresses: [ALL]\n"),
        binding("b1", "nope", "g"),
    );
    assert_one_error(
        &yaml,
        &["document 3: InitiatorGroupBinding \"b1\": spec.targetRef.name: Target \"nope\" not found"],
    );
    let yaml = format!(
        "{}{}",
        target("t", "iqn.2026-11.io.ktgt:t", ""),
        binding("b2", "t", "nope")
    );
    assert_one_error(
        &yaml,
        &["InitiatorGroupBinding \"b2\": spec.initiatorGroupRef.name: InitiatorGroup \"nope\" not found"],
    );
}

/// Two Targets, each bound to its own group. tgtd-operator 0.1.2 gave both groups access to
/// both Targets; here each Target admits only its own group.
#[test]
fn acl_comes_only_from_bindings_of_that_target() {
    let yaml = format!(
        "{}{}{}{}{}{}{}",
        target("a", "iqn.2026-11.io.ktgt:a", ""),
        target("b", "iqn.2026-11.io.ktgt:b", ""),
        target("c", "iqn.2026-11.io.ktgt:c", ""),
        group("ga", "spec:\n  initiators: [iqn.2026-11.io.ktgt:init-a]\n"),
        group("gb", "spec:\n  addresses: [192.0.2.0/24]\n"),
        binding("ba", "a", "ga"),
        binding("bb", "b", "gb"),
    );
    let state = ok(&yaml);
    let a = &the_target(&state, "iqn.2026-11.io.ktgt:a").acl;
    assert_eq!(a.initiators(), vec!["iqn.2026-11.io.ktgt:init-a"]);
    assert!(a.addresses().is_empty());
    let b = &the_target(&state, "iqn.2026-11.io.ktgt:b").acl;
    assert!(b.initiators().is_empty());
    assert_eq!(b.addresses(), vec![parse_address("192.0.2.0/24").unwrap()]);

    assert!(a.admits("iqn.2026-11.io.ktgt:init-a", ip("198.51.100.1")));
    assert!(!b.admits("iqn.2026-11.io.ktgt:init-a", ip("198.51.100.1")));
    assert!(b.admits("iqn.x", ip("192.0.2.9")));
    assert!(!a.admits("iqn.x", ip("192.0.2.9")));

    // No binding: empty ACL, admits nobody.
    let c = &the_target(&state, "iqn.2026-11.io.ktgt:c").acl;
    assert!(c.initiators().is_empty() && c.addresses().is_empty());
    assert!(!c.admits("iqn.2026-11.io.ktgt:init-a", ip("192.0.2.9")));
}

#[test]
fn acl_lists_the_union_of_bound_groups_spec_and_status() {
    let yaml = format!(
        "{}{}{}{}{}",
        target("a", "iqn.2026-11.io.ktgt:a", ""),
        group(
            "g1",
            "spec:\n  initiators: [iqn.2026-11.io.ktgt:i1]\n  addresses: [10.0.0.0/8]\n\
             status:\n  initiators: [iqn.2026-11.io.ktgt:i2, iqn.2026-11.io.ktgt:i1]\n"
        ),
        group(
            "g2",
            "status:\n  initiators: [iqn.2026-11.io.ktgt:i3]\n  addresses: [10.1.2.3, ALL]\n"
        ),
        binding("b1", "a", "g1"),
        binding("b2", "a", "g2"),
    );
    let state = ok(&yaml);
    let acl = &the_target(&state, "iqn.2026-11.io.ktgt:a").acl;
    assert_eq!(
        acl.initiators(),
        vec![
            "iqn.2026-11.io.ktgt:i1",
            "iqn.2026-11.io.ktgt:i2",
            "iqn.2026-11.io.ktgt:i3"
        ]
    );
    assert_eq!(
        acl.addresses(),
        vec![
            AddressRule::All,
            parse_address("10.0.0.0/8").unwrap(),
            parse_address("10.1.2.3").unwrap(),
        ]
    );
    // status.initiators alone (a file dumped from a cluster) grants access.
    assert!(acl.admits("iqn.2026-11.io.ktgt:i3", ip("203.0.113.7")));
    assert!(!acl.admits("iqn.2026-11.io.ktgt:i4", ip("10.1.2.3")));
}

fn objects(yaml: &str) -> Objects {
    parse::parse_objects(yaml, "test.yaml").unwrap().objects
}

#[test]
fn removing_binding_or_group_revokes_access() {
    let yaml = format!(
        "{}{}{}",
        target("a", "iqn.2026-11.io.ktgt:a", ""),
        group("g", "spec:\n  addresses: [ALL]\n"),
        binding("b", "a", "g"),
    );
    let mut objs = objects(&yaml);
    let iqn = "iqn.2026-11.io.ktgt:a";
    let before = desired_state(&objs).unwrap();
    assert_eq!(before.targets[iqn].acl.addresses(), vec![AddressRule::All]);

    // Binding removed: the Target stays, with an empty ACL.
    let mut no_binding = objs.clone();
    no_binding.bindings.clear();
    let after = desired_state(&no_binding).unwrap();
    assert!(after.targets[iqn].acl.addresses().is_empty());
    assert!(!after.targets[iqn].acl.admits("iqn.x", ip("127.0.0.1")));

    // Group removed while the binding still points at it (cluster mode, mid-deletion): the
    // binding is reported, the Target is still served, and the group grants nothing.
    objs.initiator_groups.clear();
    let resolved = desired_state_for_node(&objs, None);
    assert!(resolved.failed_targets.is_empty());
    assert!(resolved.state.targets[iqn].acl.addresses().is_empty());
    assert_eq!(resolved.errors.len(), 1);
    assert_eq!(
        resolved.errors[0].problem,
        Problem::MissingReference {
            kind: ObjectKind::InitiatorGroup,
            name: "g".into()
        }
    );
    // Standalone treats it as fatal.
    assert!(desired_state(&objs).is_err());
}

#[test]
fn node_filter() {
    let yaml = format!(
        "{}{}{}",
        target("a", "iqn.2026-11.io.ktgt:a", "  nodeName: n1\n"),
        target("b", "iqn.2026-11.io.ktgt:b", "  targetNodeName: n2\n"),
        target("c", "iqn.2026-11.io.ktgt:c", ""),
    );
    let objs = objects(&yaml);
    let keys = |node| {
        desired_state_for_node(&objs, node)
            .into_result()
            .unwrap()
            .targets
            .into_keys()
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(Some("n1")), vec!["iqn.2026-11.io.ktgt:a"]);
    assert_eq!(keys(Some("n2")), vec!["iqn.2026-11.io.ktgt:b"]);
    assert!(keys(Some("n3")).is_empty());
    assert_eq!(keys(None).len(), 3);
}

#[test]
fn one_bad_target_does_not_block_others() {
    let yaml = format!(
        "{}{}{}{}{}{}",
        target("good", "iqn.2026-11.io.ktgt:good", ""),
        target(
            "bad",
            "iqn.2026-11.io.ktgt:bad",
            "  chap:\n    secretRef:\n      name: missing\n"
        ),
        target("grouped", "iqn.2026-11.io.ktgt:grouped", ""),
        group(
            "broken",
            "spec:\n  initiators: [iqn.2026-11.io.ktgt:ok]\n  addresses: [300.0.0.1]\n"
        ),
        binding("b", "grouped", "broken"),
        binding("b2", "good", "nothere"),
    );
    let resolved = desired_state_for_node(&objects(&yaml), None);
    assert_eq!(
        resolved.state.targets.keys().collect::<Vec<_>>(),
        vec!["iqn.2026-11.io.ktgt:good"]
    );
    assert_eq!(
        resolved.failed_targets.iter().collect::<Vec<_>>(),
        vec!["bad", "grouped"]
    );
    let messages: Vec<String> = resolved.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(messages.len(), 4, "{messages:#?}");
    assert!(messages[0]
        .starts_with("Target \"bad\": spec.chap.secretRef: Secret default/missing not found"));
    // An invalid bound group fails its Target rather than serving a partial ACL (dropping only
    // the bad address would admit the initiator from anywhere).
    assert!(messages[1].starts_with("Target \"grouped\": InitiatorGroup \"broken\" (bound by InitiatorGroupBinding \"b\") is invalid"));
    assert!(messages[2].starts_with("InitiatorGroup \"broken\": spec.addresses[0]"));
    assert!(messages[3].starts_with("InitiatorGroupBinding \"b2\": spec.initiatorGroupRef.name"));
    assert_eq!(resolved.errors[0].problem.reason(), "SecretNotFound");
}

// ---------------------------------------------------------------------------------------------
// CHAP

const CHAP: &str = "  chap:\n    secretRef:\n      name: chap\n";
const MUTUAL: &str = "  chap:\n    secretRef:\n      name: chap\n      namespace: storage\n    \
                      mutualSecretRef:\n      name: mutual\n      namespace: storage\n";

#[test]
fn chap_from_secret_data_base64() {
    // "user1" / "0123456789ab"
    let yaml = format!(
        "{}{}",
        target("a", "iqn.2026-11.io.ktgt:a", CHAP),
        secret(
            "chap",
            "type: Opaque\ndata:\n  username: dXNlcjE=\n  password: MDEyMzQ1Njc4OWFi\n"
        ),
    );
    let state = ok(&yaml);
    let chap = &the_target(&state, "iqn.2026-11.io.ktgt:a").chap;
    assert_eq!(chap.incoming.len(), 1);
    assert_eq!(chap.incoming[0].user, "user1");
    assert_eq!(chap.incoming[0].secret, b"0123456789ab");
    assert_eq!(chap.outgoing, None);
}

#[test]
fn chap_from_secret_string_data_and_mutual() {
    let yaml = format!(
        "{}{}{}",
        target("a", "iqn.2026-11.io.ktgt:a", MUTUAL),
        // stringData wins over data, as in Kubernetes.
        secret(
            "chap",
            "  namespace: storage\ndata:\n  username: b2xk\nstringData:\n  username: user1\n  \
             password: initiator-secret\n"
        ),
        secret(
            "mutual",
            "  namespace: storage\nstringData:\n  username: target1\n  password: target-secret-1\n"
        ),
    );
    let state = ok(&yaml);
    let chap = &the_target(&state, "iqn.2026-11.io.ktgt:a").chap;
    assert_eq!(chap.incoming[0].user, "user1");
    assert_eq!(chap.incoming[0].secret, b"initiator-secret");
    let out = chap.outgoing.as_ref().unwrap();
    assert_eq!(
        (out.user.as_str(), out.secret.as_slice()),
        ("target1", &b"target-secret-1"[..])
    );
}

#[test]
fn chap_errors() {
    let t = target("a", "iqn.2026-11.io.ktgt:a", CHAP);
    assert_one_error(
        &t,
        &["Target \"a\": spec.chap.secretRef: Secret default/chap not found"],
    );
    // A Secret of the same name in another namespace is not it.
    let yaml = format!(
        "{t}{}",
        secret(
            "chap",
            "  namespace: other\nstringData:\n  username: u\n  password: 0123456789ab\n"
        )
    );
    assert_one_error(&yaml, &["Secret default/chap not found"]);

    let yaml = format!("{t}{}", secret("chap", "stringData:\n  username: u\n"));
    assert_one_error(
        &yaml,
        &["Target \"a\": spec.chap.secretRef: Secret default/chap: key \"password\" missing"],
    );
    let yaml = format!(
        "{t}{}",
        secret("chap", "stringData:\n  username: u\n  password: short\n")
    );
    assert_one_error(
        &yaml,
        &[
            "spec.chap.secretRef: Secret default/chap: key \"password\" is 5 bytes",
            "at least 12 bytes",
            "RFC 7143",
        ],
    );
    let yaml = format!(
        "{t}{}",
        secret(
            "chap",
            "data:\n  username: \"!!\"\n  password: MDEyMzQ1Njc4OWFi\n"
        )
    );
    assert_one_error(
        &yaml,
        &["Secret default/chap: key \"username\": data is not base64"],
    );

    let same = "  namespace: storage\nstringData:\n  username: u\n  password: the-same-secret\n";
    let yaml = format!(
        "{}{}{}",
        target("a", "iqn.2026-11.io.ktgt:a", MUTUAL),
        secret("chap", same),
        secret("mutual", same),
    );
    assert_one_error(
        &yaml,
        &["Target \"a\": spec.chap.mutualSecretRef: the mutual CHAP secret equals the initiator's secret"],
    );
}

#[test]
fn secret_debug_hides_values() {
    let yaml = secret(
        "chap",
        "stringData:\n  username: u\n  password: hunter2hunter2\n",
    );
    let objs = objects(&yaml);
    let debug = format!("{:?}", objs.secrets[0]);
    assert!(
        debug.contains("password") && !debug.contains("hunter2"),
        "{debug}"
    );
}

// ---------------------------------------------------------------------------------------------
// Backing stores on disk

#[test]
fn backing_store_existence_checked_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("existing.img");
    std::fs::write(&existing, [0u8; 512]).unwrap();
    let missing = dir.path().join("missing.img");
    let yaml = target_luns(
        "disk1",
        &format!(
            "  - lun: 1\n    backingStore: {}\n  - lun: 2\n    backingStore: {}\n    size: 1Mi\n\
             \x20 - lun: 3\n    backingStore: {}\n  - lun: 4\n    backingStore: {}\n",
            existing.display(),
            missing.display(),
            missing.display(),
            dir.path().display(),
        ),
    );
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, &yaml).unwrap();

    // parse_str does not look at the filesystem.
    assert_eq!(parse_str(&yaml, "x").unwrap().targets.len(), 1);

    let e = load_file(&file).unwrap_err();
    let list: Vec<String> = e.object_errors().iter().map(|e| e.to_string()).collect();
    assert_eq!(list.len(), 2, "{list:#?}");
    assert_eq!(
        list[0],
        format!(
            "document 1: Target \"disk1\": spec.luns[2].backingStore: backing store {:?} does \
             not exist and no size is given to create it",
            missing
        )
    );
    assert!(list[1].starts_with("document 1: Target \"disk1\": spec.luns[3].backingStore"));
    assert!(list[1].ends_with("is a directory"), "{}", list[1]);

    // The same check, standalone, as the cluster mode uses it.
    let state = parse_str(&yaml, "x").unwrap();
    let problems = check_backing_stores(&state);
    assert_eq!(
        problems.iter().map(|p| p.lun).collect::<Vec<_>>(),
        vec![3, 4]
    );
}

#[test]
fn load_file_reports_unreadable_path() {
    let e = load_file(std::path::Path::new("/nonexistent/ktgt.yaml")).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
    assert!(e.to_string().starts_with("/nonexistent/ktgt.yaml: "), "{e}");
    assert!(e.to_string().contains("No such file"), "{e}");
    assert!(std::error::Error::source(&e).is_none(), "{e:?}");
}

#[test]
fn api_types_round_trip() {
    let yaml = format!(
        "{}{}",
        target("a", "iqn.2026-11.io.ktgt:a", CHAP),
        binding("b", "a", "g"),
    );
    let objs = objects(&yaml);
    let t: &Target = &objs.targets[0];
    let text = serde_yaml::to_string(t).unwrap();
    assert_eq!(&serde_yaml::from_str::<Target>(&text).unwrap(), t);
    let b: &InitiatorGroupBinding = &objs.bindings[0];
    let text = serde_yaml::to_string(b).unwrap();
    assert!(text.contains("initiatorGroupRef:"), "{text}");
    assert_eq!(
        &serde_yaml::from_str::<InitiatorGroupBinding>(&text).unwrap(),
        b
    );
}

/// Two groups bound to one Target are two grants, each judged on its own: group A =
/// (iqn-a, 10.1.0.0/16) and group B = (iqn-b, 10.2.0.0/16) do not admit iqn-b from A's
/// network, and a group of names only beside a group of addresses only keeps its names'
/// access from anywhere. Each grant says which binding and group it comes from.
#[test]
fn each_bound_group_is_its_own_grant() {
    let yaml = format!(
        "{}{}{}{}{}{}{}{}{}{}",
        target("t", "iqn.2026-11.io.ktgt:t", ""),
        target("u", "iqn.2026-11.io.ktgt:u", ""),
        group(
            "ga",
            "spec:\n  initiators: [iqn.2026-11.io.ktgt:a]\n  addresses: [10.1.0.0/16]\n"
        ),
        group(
            "gb",
            "spec:\n  initiators: [iqn.2026-11.io.ktgt:b]\n  addresses: [10.2.0.0/16]\n"
        ),
        binding("ba", "t", "ga"),
        binding("bb", "t", "gb"),
        group("names", "spec:\n  initiators: [iqn.2026-11.io.ktgt:n]\n"),
        group("nets", "spec:\n  addresses: [192.0.2.0/24]\n"),
        binding("bn", "u", "names"),
        binding("bt", "u", "nets"),
    );
    let state = ok(&yaml);
    let t = &the_target(&state, "iqn.2026-11.io.ktgt:t").acl;
    assert!(t.admits("iqn.2026-11.io.ktgt:b", ip("10.2.3.4")));
    assert!(!t.admits("iqn.2026-11.io.ktgt:b", ip("10.1.3.4")));
    assert!(t.admits("iqn.2026-11.io.ktgt:a", ip("10.1.3.4")));
    assert!(!t.admits("iqn.2026-11.io.ktgt:a", ip("10.2.3.4")));
    let sources: Vec<&str> = t.grants.iter().map(|g| g.source.as_str()).collect();
    assert_eq!(sources, ["binding ba, group ga", "binding bb, group gb"]);
    let u = &the_target(&state, "iqn.2026-11.io.ktgt:u").acl;
    assert!(u.admits("iqn.2026-11.io.ktgt:n", ip("198.51.100.7")));
    assert!(u.admits("iqn.2026-11.io.ktgt:other", ip("192.0.2.7")));
    assert!(!u.admits("iqn.2026-11.io.ktgt:other", ip("198.51.100.7")));
}

/// A `kubernetes.io/iscsi-chap` Secret as kubelet's in-tree iSCSI volumes and csi-driver-iscsi
/// use it: open-iscsi setting names for the initiator's account and, with `_in`, the
/// target's (mutual CHAP without a mutualSecretRef).
#[test]
fn chap_from_kubelet_key_names() {
    let kubelet = "type: kubernetes.io/iscsi-chap\nstringData:\n  \
                   node.session.auth.username: host-a\n  \
                   node.session.auth.password: initiator-secret\n";
    let yaml = format!(
        "{}{}",
        target("a", "iqn.2026-11.io.ktgt:a", CHAP),
        secret("chap", kubelet)
    );
    let state = ok(&yaml);
    let chap = &the_target(&state, "iqn.2026-11.io.ktgt:a").chap;
    assert_eq!(chap.incoming[0].user, "host-a");
    assert_eq!(chap.incoming[0].secret, b"initiator-secret");
    assert_eq!(chap.outgoing, None);

    let mutual = format!(
        "{kubelet}  node.session.auth.username_in: the-target\n  \
         node.session.auth.password_in: target-own-secret\n"
    );
    let yaml = format!(
        "{}{}",
        target("a", "iqn.2026-11.io.ktgt:a", CHAP),
        secret("chap", &mutual)
    );
    let state = ok(&yaml);
    let out = the_target(&state, "iqn.2026-11.io.ktgt:a")
        .chap
        .outgoing
        .clone()
        .expect("mutual from the _in keys");
    assert_eq!(out.user, "the-target");
    assert_eq!(out.secret, b"target-own-secret");

    // Neither key set: the error names both.
    let yaml = format!(
        "{}{}",
        target("a", "iqn.2026-11.io.ktgt:a", CHAP),
        secret("chap", "stringData:\n  user: x\n")
    );
    assert_one_error(
        &yaml,
        &[
            "spec.chap.secretRef: Secret default/chap: no CHAP credentials",
            "username and password (or node.session.auth.username and node.session.auth.password)",
        ],
    );
    // A short kubelet password names its key.
    let yaml = format!(
        "{}{}",
        target("a", "iqn.2026-11.io.ktgt:a", CHAP),
        secret(
            "chap",
            "stringData:\n  node.session.auth.username: u\n  node.session.auth.password: short\n"
        )
    );
    assert_one_error(&yaml, &["key \"node.session.auth.password\" is 5 bytes"]);
}

fn discovery(name: &str, mutual: Option<&str>) -> DiscoveryChap {
    let r = |n: &str| ktgt_operator::api::SecretReference {
        name: n.to_owned(),
        namespace: None,
    };
    DiscoveryChap {
        secret_ref: r(name),
        mutual_secret_ref: mutual.map(r),
    }
}

/// `--discovery-chap-secret`: our keys or kubelet's `discovery.sendtargets.auth.*`, mutual
/// from `--discovery-chap-mutual-secret` or the `_in` keys; problems name the flag.
#[test]
fn discovery_chap_from_the_flag_secrets() {
    let base = target("a", "iqn.2026-11.io.ktgt:a", "");
    let ours = secret(
        "disc",
        "stringData:\n  username: finder\n  password: discovery-secret\n",
    );
    let state = parse_str_with(
        &format!("{base}{ours}"),
        "t.yaml",
        Some(&discovery("disc", None)),
    )
    .unwrap();
    let chap = state.discovery_chap.expect("discovery CHAP");
    assert_eq!(chap.incoming[0].user, "finder");
    assert_eq!(chap.outgoing, None);
    // Without the flag, none.
    assert_eq!(ok(&format!("{base}{ours}")).discovery_chap, None);

    let kubelet = secret(
        "disc",
        "stringData:\n  discovery.sendtargets.auth.username: finder\n  \
         discovery.sendtargets.auth.password: discovery-secret\n  \
         discovery.sendtargets.auth.username_in: portal\n  \
         discovery.sendtargets.auth.password_in: portal-own-secret\n",
    );
    let state = parse_str_with(
        &format!("{base}{kubelet}"),
        "t.yaml",
        Some(&discovery("disc", None)),
    )
    .unwrap();
    let chap = state.discovery_chap.unwrap();
    assert_eq!(chap.incoming[0].user, "finder");
    assert_eq!(chap.outgoing.unwrap().user, "portal");

    let other = secret(
        "mine",
        "stringData:\n  username: portal2\n  password: portal-own-secret2\n",
    );
    let state = parse_str_with(
        &format!("{base}{ours}{other}"),
        "t.yaml",
        Some(&discovery("disc", Some("mine"))),
    )
    .unwrap();
    assert_eq!(
        state.discovery_chap.unwrap().outgoing.unwrap().user,
        "portal2"
    );

    for (yaml, d, needle) in [
        (
            base.clone(),
            discovery("disc", None),
            "t.yaml: --discovery-chap-secret: Secret default/disc not found",
        ),
        (
            format!("{base}{ours}"),
            discovery("disc", Some("gone")),
            "t.yaml: --discovery-chap-mutual-secret: Secret default/gone not found",
        ),
        (
            format!("{base}{}", secret("disc", "stringData:\n  other: x\n")),
            discovery("disc", None),
            "discovery.sendtargets.auth.username and discovery.sendtargets.auth.password",
        ),
        (
            format!(
                "{base}{ours}{}",
                secret(
                    "same",
                    "stringData:\n  username: p\n  password: discovery-secret\n"
                )
            ),
            discovery("disc", Some("same")),
            "--discovery-chap-mutual-secret: the mutual CHAP secret equals",
        ),
    ] {
        let e = parse_str_with(&yaml, "t.yaml", Some(&d))
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{e:?} lacks {needle:?}");
    }
}
