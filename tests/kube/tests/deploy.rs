//! `deploy/` on a real kube-apiserver: the kustomization and every example are accepted, and
//! each CRD validation rule rejects what it should with the message a user reads (the server's
//! own OpenAPI, CEL, list-map and strict-field validation; not a client-side validator).

use ktgt_kube_tests::{repo_root, ControlPlane};

#[test]
fn kubectl_apply_k_deploy_is_accepted_whole() {
    let cp = ControlPlane::shared();
    cp.install_deploy();
    // Applying again changes nothing and is accepted (idempotent install).
    let deploy = repo_root().join("deploy");
    let (ok, out, err) = cp.kubectl(&["apply", "-k", deploy.to_str().unwrap()]);
    assert!(ok, "second apply failed: {out}{err}");
    assert!(
        out.lines().all(|l| l.ends_with(" unchanged")),
        "a second apply changed something:\n{out}"
    );
    for (kind, name, ns) in [
        ("namespace", "ktgt-system", None),
        ("serviceaccount", "ktgt-agent", Some("ktgt-system")),
        ("serviceaccount", "ktgt-operator", Some("ktgt-system")),
        ("clusterrole", "ktgt-agent", None),
        ("clusterrole", "ktgt-operator", None),
        ("deployment", "ktgt-operator", Some("ktgt-system")),
        ("daemonset", "ktgt-agent", Some("ktgt-system")),
    ] {
        let mut args = vec!["get", kind, name];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        let (ok, _, err) = cp.kubectl(&args);
        assert!(ok, "{kind} {name} missing after apply: {err}");
    }
}

#[test]
fn deploy_csi_is_accepted_whole() {
    let cp = ControlPlane::shared();
    cp.install_deploy();
    // The CSI driver's kustomization on its own, as docs/csi.md applies it, and the example
    // StorageClass it does not include.
    let csi = repo_root().join("deploy/csi");
    let (ok, out, err) = cp.kubectl(&["apply", "-k", csi.to_str().unwrap()]);
    assert!(ok, "kubectl apply -k deploy/csi/ failed: {out}{err}");
    for (kind, name, ns) in [
        ("csidriver", "csi.ktgt.io", None),
        ("deployment", "ktgt-csi-controller", Some("ktgt-system")),
        ("daemonset", "ktgt-csi-node", Some("ktgt-system")),
        ("clusterrole", "ktgt-csi-provisioner", None),
        ("clusterrole", "ktgt-csi-attacher", None),
    ] {
        let mut args = vec!["get", kind, name];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        let (ok, _, err) = cp.kubectl(&args);
        assert!(ok, "{kind} {name} missing after apply: {err}");
    }
    // The walkthrough's overlay: the image and the pool replaced, accepted by the server.
    let overlay = repo_root().join("deploy/examples/csi");
    let (ok, out, err) = cp.kubectl(&["kustomize", overlay.to_str().unwrap()]);
    assert!(ok, "kubectl kustomize deploy/examples/csi failed: {err}");
    assert!(
        out.contains("image: registry.example.com/ktgt-csi:dev"),
        "{out}"
    );
    assert!(
        out.contains("name=default,node=storage-1,path=/var/lib/ktgt/csi/default,capacity=500Gi"),
        "{out}"
    );
    let (ok, out, err) =
        cp.kubectl(&["apply", "--dry-run=server", "-k", overlay.to_str().unwrap()]);
    assert!(ok, "the overlay was refused: {out}{err}");
    let sc = csi.join("storageclass.yaml");
    let (ok, out, err) = cp.kubectl(&["apply", "--dry-run=server", "-f", sc.to_str().unwrap()]);
    assert!(ok, "{} rejected: {out}{err}", sc.display());
    if cp.install_snapshot_crds() {
        let vsc = csi.join("snapshotclass.yaml");
        let (ok, out, err) =
            cp.kubectl(&["apply", "--dry-run=server", "-f", vsc.to_str().unwrap()]);
        assert!(ok, "{} rejected: {out}{err}", vsc.display());
    }
}

#[test]
fn every_example_is_accepted() {
    let cp = ControlPlane::shared();
    cp.install_deploy();
    let examples = repo_root().join("deploy/examples/k8s");
    let (ok, out, err) = cp.kubectl(&["apply", "-k", examples.to_str().unwrap()]);
    assert!(
        ok,
        "kubectl apply -k deploy/examples/k8s/ failed: {out}{err}"
    );
    // Each file on its own too (a user copies one).
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml")
            && path.file_name().is_some_and(|n| n != "kustomization.yaml")
        {
            let (ok, out, err) =
                cp.kubectl(&["apply", "--dry-run=server", "-f", path.to_str().unwrap()]);
            assert!(ok, "{} rejected: {out}{err}", path.display());
        }
    }
    // The standalone file holds the same kinds: the server accepts its API objects.
    let standalone = repo_root().join("deploy/examples/standalone.yaml");
    let (ok, out, err) = cp.kubectl(&[
        "apply",
        "--dry-run=server",
        "-f",
        standalone.to_str().unwrap(),
    ]);
    assert!(ok, "deploy/examples/standalone.yaml rejected: {out}{err}");
}

/// A bad object and the words the API server's answer must contain.
struct Case {
    what: &'static str,
    yaml: &'static str,
    expect: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        what: "bad IQN",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: Target
metadata: {name: bad-iqn}
spec: {nodeName: n1, iqn: "iqn.2020-13.bad:x", luns: []}
"#,
        expect: &["spec.iqn", "should match"],
    },
    Case {
        what: "IQN with upper case",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: Target
metadata: {name: bad-iqn-case}
spec: {nodeName: n1, iqn: "iqn.2020-06.Cloud:x"}
"#,
        expect: &["spec.iqn", "should match"],
    },
    Case {
        what: "LUN out of range",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: Target
metadata: {name: lun-range}
spec:
  nodeName: n1
  iqn: iqn.2020-06.cloud.unstable:lun-range
  luns: [{lun: 16384, bsType: memory, size: 1Mi}]
"#,
        expect: &["spec.luns[0].lun", "less than or equal to 16383"],
    },
    Case {
        what: "negative LUN",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: Target
metadata: {name: lun-negative}
spec:
  nodeName: n1
  iqn: iqn.2020-06.cloud.unstable:lun-negative
  luns: [{lun: -1, bsType: memory, size: 1Mi}]
"#,
        expect: &["spec.luns[0].lun", "greater than or equal to 0"],
    },
    Case {
        what: "duplicate LUN",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: Target
metadata: {name: lun-dup}
spec:
  nodeName: n1
  iqn: iqn.2020-06.cloud.unstable:lun-dup
  luns:
    - {lun: 1, backingStore: /var/lib/ktgt/a.img}
    - {lun: 1, backingStore: /var/lib/ktgt/b.img}
"#,
        expect: &["spec.luns[1]", "Duplicate value"],
    },
    Case {
        what: "memory LUN without size",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: Target
metadata: {name: mem-nosize}
spec:
  nodeName: n1
  iqn: iqn.2020-06.cloud.unstable:mem-nosize
  luns: [{lun: 1, bsType: memory}]
"#,
        expect: &["bsType memory needs size and no backingStore"],
    },
    Case {
        what: "file LUN without backingStore",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: Target
metadata: {name: file-nostore}
spec:
  nodeName: n1
  iqn: iqn.2020-06.cloud.unstable:file-nostore
  luns: [{lun: 1, size: 1Gi}]
"#,
        expect: &["rdwr and aio need backingStore"],
    },
    Case {
        what: "unknown bsType",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: Target
metadata: {name: bstype}
spec:
  nodeName: n1
  iqn: iqn.2020-06.cloud.unstable:bstype
  luns: [{lun: 1, bsType: rbd, backingStore: pool/img}]
"#,
        expect: &["spec.luns[0].bsType", "Unsupported value", "\"rbd\""],
    },
    Case {
        what: "block size not 512 or 4096",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: Target
metadata: {name: blocksize}
spec:
  nodeName: n1
  iqn: iqn.2020-06.cloud.unstable:blocksize
  luns: [{lun: 1, bsType: memory, size: 1Mi, blockSize: 1024}]
"#,
        expect: &["spec.luns[0].blockSize", "Unsupported value"],
    },
    Case {
        what: "bad size quantity",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: Target
metadata: {name: badsize}
spec:
  nodeName: n1
  iqn: iqn.2020-06.cloud.unstable:badsize
  luns: [{lun: 1, bsType: memory, size: "ten gigs"}]
"#,
        expect: &["spec.luns[0].size"],
    },
    Case {
        what: "nodeName and targetNodeName both",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: Target
metadata: {name: two-nodes}
spec: {nodeName: n1, targetNodeName: n2, iqn: "iqn.2020-06.cloud.unstable:two"}
"#,
        expect: &["set nodeName or its alias targetNodeName, not both"],
    },
    Case {
        what: "Target without iqn",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: Target
metadata: {name: no-iqn}
spec: {nodeName: n1}
"#,
        expect: &["spec.iqn", "Required value"],
    },
    Case {
        what: "unknown field in a Target",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: Target
metadata: {name: unknown-field}
spec: {nodeName: n1, iqn: "iqn.2020-06.cloud.unstable:uf", lunz: []}
"#,
        expect: &["unknown field", "spec.lunz"],
    },
    Case {
        what: "CHAP without secretRef",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: Target
metadata: {name: chap-noref}
spec:
  nodeName: n1
  iqn: iqn.2020-06.cloud.unstable:chap-noref
  chap: {mutualSecretRef: {name: m}}
"#,
        expect: &["spec.chap.secretRef", "Required value"],
    },
    Case {
        what: "unknown strategy type",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: InitiatorGroup
metadata: {name: bad-strategy}
spec:
  initiatorNameStrategy: {type: Hostname}
"#,
        expect: &[
            "spec.initiatorNameStrategy.type",
            "Unsupported value",
            "\"NodeName\"",
            "\"Annotation\"",
        ],
    },
    Case {
        what: "Annotation strategy without a key",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: InitiatorGroup
metadata: {name: annotation-nokey}
spec:
  initiatorNameStrategy: {type: Annotation}
"#,
        expect: &["type Annotation needs annotationKey"],
    },
    Case {
        what: "static initiator that is not an iSCSI name",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: InitiatorGroup
metadata: {name: bad-initiator}
spec:
  initiators: ["host-1"]
"#,
        expect: &["spec.initiators[0]", "should match"],
    },
    Case {
        what: "unknown field in an InitiatorGroup",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: InitiatorGroup
metadata: {name: ig-unknown}
spec: {nodeSelectors: {a: b}}
"#,
        expect: &["unknown field", "spec.nodeSelectors"],
    },
    Case {
        what: "binding without targetRef",
        yaml: r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: InitiatorGroupBinding
metadata: {name: binding-notarget}
spec:
  initiatorGroupRef: {name: g}
"#,
        expect: &["spec.targetRef", "Required value"],
    },
];

#[test]
fn crd_validation_rejects_bad_objects_with_a_readable_message() {
    let cp = ControlPlane::shared();
    cp.install_deploy();
    let mut failures = Vec::new();
    for case in CASES {
        let (ok, out, err) =
            cp.kubectl_stdin(&["create", "--dry-run=server", "-f", "-"], case.yaml);
        if ok {
            failures.push(format!("{}: accepted ({out})", case.what));
            continue;
        }
        let missing: Vec<_> = case.expect.iter().filter(|w| !err.contains(*w)).collect();
        if !missing.is_empty() {
            failures.push(format!(
                "{}: the message lacks {missing:?}:\n  {}",
                case.what,
                err.trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn a_good_object_of_each_kind_is_accepted_and_reads_back_the_same() {
    let cp = ControlPlane::shared();
    cp.install_deploy();
    let yaml = r#"
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: Target
metadata: {name: good-target}
spec:
  targetNodeName: n1
  iqn: iqn.2020-06.cloud.unstable:good
  luns:
    - {lun: 0, bsType: memory, size: 16Mi, blockSize: 4096}
    - {lun: 7, backingStore: /var/lib/ktgt/g.img, size: "1073741824", direct: true, readOnly: true}
---
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: InitiatorGroup
metadata: {name: good-group}
spec:
  addresses: ["10.1.0.0/16"]
  initiators: ["iqn.1994-05.com.redhat:abc", "eui.0123456789ABCDEF"]
  initiatorNameStrategy: {type: Annotation, annotationKey: example.com/iqn}
---
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: InitiatorGroupBinding
metadata: {name: good-binding}
spec: {targetRef: {name: good-target}, initiatorGroupRef: {name: good-group}}
"#;
    cp.apply_yaml(yaml);
    let (ok, out, err) = cp.kubectl(&["get", "target", "good-target", "-o", "json"]);
    assert!(ok, "{err}");
    let t: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(t["spec"]["targetNodeName"], "n1");
    assert_eq!(t["spec"]["luns"][1]["size"], "1073741824");
    // The typed API reads what the server stored.
    let target: ktgt_operator::api::Target = serde_json::from_value(t).unwrap();
    assert_eq!(target.spec.luns.len(), 2);
    // A strategy default is filled in by the server (schema default).
    cp.apply_yaml(
        "apiVersion: tgtd.unstable.cloud/v1alpha1\nkind: InitiatorGroup\nmetadata: {name: default-strategy}\nspec:\n  initiatorNameStrategy: {initiatorNamePrefix: iqn.2020-06.example}\n",
    );
    let (_, out, _) = cp.kubectl(&[
        "get",
        "initiatorgroup",
        "default-strategy",
        "-o",
        "jsonpath={.spec.initiatorNameStrategy.type}",
    ]);
    assert_eq!(out, "NodeName");
}
