//! The monitoring manifests (deploy/monitoring/) against what the agent and operator export:
//! every alert's and every dashboard panel's expression parses as PromQL, names only metrics a
//! scrape of the agent shows (or Prometheus's own `up`), matches and groups by labels those
//! metrics carry, and every alert has a severity, a summary and a description.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ktgt_agent::metrics::{target_readiness, AgentCollector};
use ktgt_operator::telemetry::{self, ReconcileMetrics};
use promql_parser::parser::{self, Expr, LabelModifier};
use promql_parser::util::{walk_expr, ExprVisitor};
use serde_json::Value;
use target_core::config::{DesiredState, LunConfig, TargetConfig};
use target_core::table::{SessionHandle, TargetTable};

const MONITORING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/monitoring");
const IQN: &str = "iqn.2024-01.cloud.unstable.test:monitoring";

/// Metric name -> label names, from a scrape in which every family has a sample.
async fn exported() -> BTreeMap<String, BTreeSet<String>> {
    let table = TargetTable::new();
    let mut desired = DesiredState::default();
    desired.targets.insert(
        IQN.to_owned(),
        TargetConfig {
            iqn: IQN.to_owned(),
            alias: None,
            luns: [(0, LunConfig::memory(0, 1 << 20))].into(),
            acl: Default::default(),
            chap: Default::default(),
        },
    );
    assert!(table.apply(&desired).await.errors.is_empty());
    let target = table.target(IQN).unwrap();
    table.register_session(
        &target,
        Arc::new(SessionHandle {
            id: table.allocate_session_id(),
            tsih: 1,
            initiator: "iqn.2024-01.test:initiator".into(),
            isid: [0x80, 0, 0, 0, 0, 1],
            tpgt: 1,
            peer: "127.0.0.1:50000".parse().unwrap(),
            cancel: Default::default(),
            end_reason: Default::default(),
            info: Default::default(),
            io: Default::default(),
            aborts: Default::default(),
        }),
    );
    // One sample in every family.
    let read10 = [0x28u8, 0, 0, 0, 0, 0, 0, 0, 8, 0];
    target_core::stats::Probe::start_in(target_core::stats::global(), Some(IQN), Some(0), &read10)
        .finish(
            &target_core::scsi::ScsiResult::good(vec![0u8; 4096].into()),
            0,
        );
    let events = target_core::events::global();
    events.login(Some(IQN), target_core::events::LoginOutcome::AuthFailed);
    events.session_ended(IQN, target_core::events::SessionEnd::NopTimeout);
    events.reject(iscsi_proto::pdu::RejectReason::PROTOCOL_ERROR);
    events.task_management(1, 0);
    events.unit_attention(target_core::scsi::UnitAttention::LunReset);
    target_readiness().set("monitoring", IQN, false, "LUNOpenFailed");

    let mut registry = telemetry::registry();
    let reconcile = ReconcileMetrics::register(&mut registry);
    reconcile.record("target", std::time::Duration::from_millis(3), Some("Api"));
    registry.register_collector(Box::new(AgentCollector::new(table.clone())));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();

    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, _) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let names = labels
            .split(',')
            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_owned()));
        out.entry(name.to_owned()).or_default().extend(names);
    }
    // Prometheus adds these to every scraped series; `up` is its own.
    for labels in out.values_mut() {
        labels.extend(["job".to_owned(), "instance".to_owned()]);
    }
    out.insert(
        "up".into(),
        ["job", "instance"].map(str::to_owned).into_iter().collect(),
    );
    out
}

/// The metric names an expression selects, and for each aggregation the labels it groups by
/// with the names of the metrics beneath it.
#[derive(Default)]
struct Uses {
    selectors: Vec<(String, Vec<String>)>,
    groupings: Vec<(Vec<String>, Expr)>,
}

impl ExprVisitor for Uses {
    type Error = String;
    fn pre_visit(&mut self, e: &Expr) -> Result<bool, String> {
        let vs = match e {
            Expr::VectorSelector(v) => Some(v),
            Expr::MatrixSelector(m) => Some(&m.vs),
            Expr::Aggregate(a) => {
                if let Some(LabelModifier::Include(l)) = &a.modifier {
                    self.groupings.push((l.labels.clone(), (*a.expr).clone()));
                }
                None
            }
            _ => None,
        };
        if let Some(v) = vs {
            let name = v
                .name
                .clone()
                .or_else(|| {
                    v.matchers
                        .matchers
                        .iter()
                        .find(|m| m.name == "__name__")
                        .map(|m| m.value.clone())
                })
                .ok_or("a selector without a metric name")?;
            let labels = v
                .matchers
                .matchers
                .iter()
                .map(|m| m.name.clone())
                .filter(|n| n != "__name__")
                .collect();
            self.selectors.push((name, labels));
        }
        Ok(true)
    }
}

fn names_under(e: &Expr) -> Vec<String> {
    let mut u = Uses::default();
    walk_expr(&mut u, e).unwrap();
    u.selectors.into_iter().map(|(n, _)| n).collect()
}

/// Checks one expression; `what` names it in failures.
fn check(what: &str, expr: &str, exported: &BTreeMap<String, BTreeSet<String>>) {
    // Grafana's interval variables are not PromQL; its other variables sit inside strings.
    let promql = expr
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m");
    let ast = parser::parse(&promql).unwrap_or_else(|e| panic!("{what}: `{expr}`: {e}"));
    let mut uses = Uses::default();
    walk_expr(&mut uses, &ast).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(!uses.selectors.is_empty(), "{what}: selects nothing");
    for (name, labels) in &uses.selectors {
        let Some(have) = exported.get(name) else {
            panic!(
                "{what}: `{name}` is not exported; the agent exports {:?}",
                exported.keys().collect::<Vec<_>>()
            );
        };
        for l in labels {
            assert!(
                have.contains(l),
                "{what}: `{name}` has no label `{l}` ({have:?})"
            );
        }
    }
    for (labels, inner) in &uses.groupings {
        for name in names_under(inner) {
            let have = &exported[&name];
            for l in labels {
                assert!(
                    have.contains(l),
                    "{what}: groups `{name}` by `{l}`, which it does not carry ({have:?})"
                );
            }
        }
    }
}

#[tokio::test]
async fn alerts_and_dashboard_use_only_what_is_exported() {
    let exported = exported().await;
    // Sanity: the scrape has the families the manifests rely on.
    for name in [
        "ktgt_lun_latency_seconds_bucket",
        "ktgt_logins_total",
        "ktgt_session_ops_total",
        "ktgt_target_ready",
        "ktgt_reconcile_errors_total",
    ] {
        assert!(exported.contains_key(name), "{name}: {exported:?}");
    }

    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(format!("{MONITORING}/prometheusrule.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(rules["kind"].as_str(), Some("PrometheusRule"));
    let mut alerts = 0;
    for group in rules["spec"]["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"].as_str().unwrap();
            check(&format!("alert {name}"), expr, &exported);
            assert!(
                matches!(
                    rule["labels"]["severity"].as_str(),
                    Some("critical" | "warning")
                ),
                "alert {name}: severity"
            );
            for a in ["summary", "description"] {
                assert!(
                    rule["annotations"][a]
                        .as_str()
                        .is_some_and(|s| s.len() > 10),
                    "alert {name}: {a}"
                );
            }
            assert!(rule["for"].as_str().is_some(), "alert {name}: for");
            alerts += 1;
        }
    }
    assert!(alerts >= 6, "{alerts} alerts");

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{MONITORING}/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = 0;
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "{title}: id");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            check(
                &format!("panel {title:?}"),
                t["expr"].as_str().unwrap(),
                &exported,
            );
            exprs += 1;
        }
    }
    // Template variables: label_values(metric, label).
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        let Some(q) = var["query"]["query"].as_str() else {
            continue;
        };
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {}: {q}", var["name"]));
        let (metric, label) = inner.split_once(',').unwrap();
        let have = exported
            .get(metric.trim())
            .unwrap_or_else(|| panic!("variable {}: {metric} not exported", var["name"]));
        assert!(
            have.contains(label.trim()),
            "variable {}: {label}",
            var["name"]
        );
    }
    assert!(exprs >= 15, "{exprs} panel queries");
}
