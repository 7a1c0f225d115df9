//! Checks of `deploy/`: the kustomization renders, the committed CRDs are what the API types
//! generate, the examples validate against the CRD schemas, and RBAC stays least-privilege.
//!
//! Schema validation uses the `jsonschema` crate on each CRD's `openAPIV3Schema` (types,
//! required fields, patterns, ranges, enums) and kube's client-side CEL validator for the
//! `x-kubernetes-validations` rules. Not checked here: Kubernetes' list-map uniqueness, CEL
//! cost limits and structural-schema rules, which only an API server applies.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document of `path` (empty documents skipped) as JSON.
fn documents(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The documents of every resource listed in a kustomization, checked to exist and parse.
fn kustomization_objects(dir: &Path) -> Vec<Value> {
    let k = &documents(&dir.join("kustomization.yaml"))[0];
    assert_eq!(k["kind"], "Kustomization");
    let mut objects = Vec::new();
    for resource in k["resources"].as_array().expect("resources") {
        let path = dir.join(resource.as_str().expect("resource path"));
        assert!(path.is_file(), "{} is listed but missing", path.display());
        for doc in documents(&path) {
            for key in ["apiVersion", "kind"] {
                assert!(doc[key].is_string(), "{}: no {key}", path.display());
            }
            assert!(
                doc["metadata"]["name"].is_string(),
                "{}: no metadata.name",
                path.display()
            );
            objects.push(doc);
        }
    }
    objects
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn kustomization_resources_exist_and_parse() {
    let objects = kustomization_objects(&deploy_dir());
    for (kind, name) in [
        ("CustomResourceDefinition", "targets.tgtd.unstable.cloud"),
        (
            "CustomResourceDefinition",
            "initiatorgroups.tgtd.unstable.cloud",
        ),
        (
            "CustomResourceDefinition",
            "initiatorgroupbindings.tgtd.unstable.cloud",
        ),
        ("Namespace", "ktgt-system"),
        ("Deployment", "ktgt-operator"),
        ("DaemonSet", "ktgt-agent"),
    ] {
        find(&objects, kind, name);
    }
    kustomization_objects(&deploy_dir().join("examples/k8s"));
}

#[test]
fn kubectl_kustomize_renders() {
    let Ok(out) = Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy_dir())
        .output()
    else {
        eprintln!("skipped: kubectl is not installed (the parse test above still ran)");
        return;
    };
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/ failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        rendered.matches("kind: CustomResourceDefinition").count(),
        4
    );
    assert!(rendered.contains("kind: DaemonSet"));
    assert!(rendered.contains("image: ktgt:latest"));
}

#[test]
fn committed_crds_match_the_api_types() {
    for crd in ktgt_operator::crds() {
        let path = deploy_dir()
            .join("crds")
            .join(ktgt_operator::crd_file_name(&crd));
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == ktgt_operator::crd_yaml(&crd).unwrap(),
            "{} is stale: run `cargo run -p ktgt-operator --bin crdgen -- deploy/crds`",
            path.display()
        );
    }
}

/// Validators for the kinds of the API group, from the committed CRDs.
struct Schemas(Vec<(String, Value, jsonschema::Validator)>);

impl Schemas {
    fn load() -> Self {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(deploy_dir().join("crds")).unwrap() {
            for crd in documents(&entry.unwrap().path()) {
                let kind = crd["spec"]["names"]["kind"].as_str().unwrap().to_owned();
                let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
                let validator = jsonschema::validator_for(schema)
                    .unwrap_or_else(|e| panic!("schema of {kind}: {e}"));
                out.push((kind, schema.clone(), validator));
            }
        }
        Schemas(out)
    }

    /// The validation errors of `object`; `None` when it is not of this API group.
    fn errors(&self, object: &Value) -> Option<Vec<String>> {
        if object["apiVersion"] != ktgt_operator::api::API_VERSION {
            return None;
        }
        let kind = object["kind"].as_str().unwrap_or("");
        let (_, schema, validator) = self
            .0
            .iter()
            .find(|(k, _, _)| k == kind)
            .unwrap_or_else(|| panic!("no CRD for kind {kind}"));
        let mut errors: Vec<String> = validator
            .iter_errors(object)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        if errors.is_empty() {
            // CEL rules assume a schema-valid object.
            if let Err(cel) = kube::core::cel::Validator::new().validate(schema, object, None) {
                errors.extend(
                    cel.into_vec()
                        .into_iter()
                        .map(|e| format!("CEL {}: {} ({})", e.field_path, e.message, e.rule)),
                );
            }
        }
        Some(errors)
    }
}

#[test]
fn examples_validate_against_the_crd_schemas() {
    let schemas = Schemas::load();
    let dir = deploy_dir().join("examples");
    let mut checked = 0;
    for path in [
        dir.join("k8s/initiatorgroup.yaml"),
        dir.join("k8s/target.yaml"),
        dir.join("k8s/initiatorgroupbinding.yaml"),
        dir.join("k8s/chap.yaml"),
        // The standalone agent's example uses the same objects.
        dir.join("standalone.yaml"),
    ] {
        if !path.exists() {
            continue;
        }
        for object in documents(&path) {
            if let Some(errors) = schemas.errors(&object) {
                assert!(
                    errors.is_empty(),
                    "{} {}: {errors:?}",
                    path.display(),
                    object["metadata"]["name"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 6, "only {checked} objects checked");
}

#[test]
fn schemas_reject_what_the_api_server_must_refuse() {
    let schemas = Schemas::load();
    let target = |spec: Value| {
        json!({"apiVersion": "tgtd.unstable.cloud/v1alpha1", "kind": "Target",
               "metadata": {"name": "t"}, "spec": spec})
    };
    let valid = target(json!({"iqn": "iqn.2020-06.cloud.unstable:t",
        "luns": [{"lun": 16383, "backingStore": "/dev/sdb", "blockSize": 4096, "size": "1Gi"}]}));
    assert_eq!(schemas.errors(&valid), Some(vec![]));
    // A tgtd-operator manifest with the Go type's spelling is valid too.
    let alias = target(json!({"targetNodeName": "n1", "iqn": "iqn.2020-06.cloud.unstable:t"}));
    assert_eq!(schemas.errors(&alias), Some(vec![]));
    // Integer sizes are quantities as well.
    let int_size = target(json!({"iqn": "iqn.2020-06.x.y:t",
        "luns": [{"lun": 1, "bsType": "memory", "size": 1048576}]}));
    assert_eq!(schemas.errors(&int_size), Some(vec![]));

    for (what, spec) in [
        ("no iqn", json!({"luns": []})),
        (
            "uppercase iqn",
            json!({"iqn": "IQN.2020-06.cloud.unstable:t"}),
        ),
        ("bad month", json!({"iqn": "iqn.2020-13.cloud.unstable:t"})),
        (
            "lun out of range",
            json!({"iqn": "iqn.2020-06.x.y:t", "luns": [{"lun": 16384, "backingStore": "/a"}]}),
        ),
        (
            "negative lun",
            json!({"iqn": "iqn.2020-06.x.y:t", "luns": [{"lun": -1, "backingStore": "/a"}]}),
        ),
        (
            "block size",
            json!({"iqn": "iqn.2020-06.x.y:t", "luns": [{"lun": 1, "backingStore": "/a", "blockSize": 1024}]}),
        ),
        (
            "bs type",
            json!({"iqn": "iqn.2020-06.x.y:t", "luns": [{"lun": 1, "backingStore": "/a", "bsType": "rbd"}]}),
        ),
        (
            "size syntax",
            json!({"iqn": "iqn.2020-06.x.y:t", "luns": [{"lun": 1, "bsType": "memory", "size": "1 GB"}]}),
        ),
        (
            "CEL: memory without size",
            json!({"iqn": "iqn.2020-06.x.y:t", "luns": [{"lun": 1, "bsType": "memory"}]}),
        ),
        (
            "CEL: memory with a backing store",
            json!({"iqn": "iqn.2020-06.x.y:t", "luns": [{"lun": 1, "bsType": "memory", "size": "1Mi", "backingStore": "/a"}]}),
        ),
        (
            "CEL: file LUN without backing store",
            json!({"iqn": "iqn.2020-06.x.y:t", "luns": [{"lun": 1, "bsType": "aio"}]}),
        ),
        (
            "CEL: default bsType without backing store",
            json!({"iqn": "iqn.2020-06.x.y:t", "luns": [{"lun": 1}]}),
        ),
        (
            "CEL: nodeName and targetNodeName",
            json!({"iqn": "iqn.2020-06.x.y:t", "nodeName": "a", "targetNodeName": "a"}),
        ),
        (
            "chap without secret name",
            json!({"iqn": "iqn.2020-06.x.y:t", "chap": {"secretRef": {"name": ""}}}),
        ),
    ] {
        let errors = schemas.errors(&target(spec)).unwrap();
        assert!(!errors.is_empty(), "accepted: {what}");
    }

    let group = json!({"apiVersion": "tgtd.unstable.cloud/v1alpha1", "kind": "InitiatorGroup",
        "metadata": {"name": "g"},
        "spec": {"initiatorNameStrategy": {"type": "AnnotationKey"}}});
    assert!(!schemas.errors(&group).unwrap().is_empty(), "strategy enum");
    let group = json!({"apiVersion": "tgtd.unstable.cloud/v1alpha1", "kind": "InitiatorGroup",
        "metadata": {"name": "g"},
        "spec": {"initiatorNameStrategy": {"type": "Annotation"}}});
    let errors = schemas.errors(&group).unwrap();
    assert!(
        errors.iter().any(|e| e.contains("annotationKey")),
        "{errors:?}"
    );
    let binding = json!({"apiVersion": "tgtd.unstable.cloud/v1alpha1",
        "kind": "InitiatorGroupBinding", "metadata": {"name": "b"},
        "spec": {"targetRef": {"name": "t"}}});
    assert!(
        !schemas.errors(&binding).unwrap().is_empty(),
        "missing group ref"
    );
}

/// Rules of a ClusterRole or Role as (apiGroup, resource, verb) triples.
fn grants(role: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for rule in role["rules"].as_array().unwrap() {
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                for verb in rule["verbs"].as_array().unwrap() {
                    out.push((
                        group.as_str().unwrap().to_owned(),
                        resource.as_str().unwrap().to_owned(),
                        verb.as_str().unwrap().to_owned(),
                    ));
                }
            }
        }
    }
    out
}

#[test]
fn rbac_is_least_privilege() {
    let objects = kustomization_objects(&deploy_dir());
    let has = |g: &[(String, String, String)], group: &str, res: &str, verb: &str| {
        g.iter()
            .any(|(a, b, c)| a == group && b == res && (c == verb || c == "*"))
    };
    let agent = grants(find(&objects, "ClusterRole", "ktgt-agent"));
    for verb in ["get", "list", "watch", "patch"] {
        assert!(
            has(&agent, "tgtd.unstable.cloud", "targets", verb),
            "{verb}"
        );
    }
    assert!(has(
        &agent,
        "tgtd.unstable.cloud",
        "targets/status",
        "patch"
    ));
    for verb in ["create", "delete", "deletecollection", "update"] {
        assert!(
            !has(&agent, "tgtd.unstable.cloud", "targets", verb),
            "agent may {verb} Targets"
        );
    }
    for res in ["initiatorgroups", "initiatorgroupbindings"] {
        for verb in ["create", "update", "patch", "delete"] {
            assert!(
                !has(&agent, "tgtd.unstable.cloud", res, verb),
                "agent may {verb} {res}"
            );
        }
    }
    let operator = grants(find(&objects, "ClusterRole", "ktgt-operator"));
    assert!(has(&operator, "", "nodes", "watch"));
    assert!(!has(&operator, "", "nodes", "patch"));
    assert!(has(
        &operator,
        "tgtd.unstable.cloud",
        "initiatorgroups/status",
        "patch"
    ));
    assert!(!has(
        &operator,
        "tgtd.unstable.cloud",
        "initiatorgroups",
        "patch"
    ));
    assert!(!has(&operator, "tgtd.unstable.cloud", "targets", "get"));

    // No wildcard anywhere, and Secrets only through namespaced Roles.
    for role in objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
    {
        let g = grants(role);
        assert!(
            !g.iter().any(|(a, b, c)| a == "*" || b == "*" || c == "*"),
            "wildcard in {}",
            role["metadata"]["name"]
        );
        if role["kind"] == "ClusterRole" {
            assert!(
                !g.iter().any(|(_, r, _)| r == "secrets"),
                "cluster-wide Secrets"
            );
        }
    }
}

#[test]
fn daemonset_and_deployment_shape() {
    let objects = kustomization_objects(&deploy_dir());
    let ds = &find(&objects, "DaemonSet", "ktgt-agent")["spec"]["template"]["spec"];
    assert_eq!(ds["hostNetwork"], true);
    assert_eq!(ds["nodeSelector"]["tgtd.unstable.cloud/storage"], "");
    assert_eq!(ds["terminationGracePeriodSeconds"], 60);
    let agent = &ds["containers"][0];
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(agent["env"][0]["name"], "NODE_NAME");
    assert_eq!(
        agent["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let args: Vec<&str> = agent["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        &args[..5],
        [
            "kubernetes",
            "--node-name",
            "$(NODE_NAME)",
            "--listen",
            "0.0.0.0:3260"
        ]
    );

    let deploy = &find(&objects, "Deployment", "ktgt-operator")["spec"];
    assert_eq!(deploy["replicas"], 2);
    let operator = &deploy["template"]["spec"]["containers"][0];
    assert_eq!(operator["securityContext"]["readOnlyRootFilesystem"], true);
    let env: Vec<&str> = operator["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(env.contains(&"POD_NAME") && env.contains(&"POD_NAMESPACE"));
}
