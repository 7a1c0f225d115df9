//! The agent's read-on-scrape metrics (both modes): sessions and served targets from the
//! table, per-LUN I/O from [`target_core::stats`], per-session counters, and logins, Rejects,
//! task management functions, unit attentions and session ends from [`target_core::events`].
//!
//! | metric | labels |
//! |---|---|
//! | `ktgt_targets` (gauge) | |
//! | `ktgt_sessions` (gauge) | `target` |
//! | `ktgt_lun_ops_total` | `target`, `lun`, `op` (`read`/`write`) |
//! | `ktgt_lun_bytes_total` | `target`, `lun`, `op` |
//! | `ktgt_lun_errors_total` | `target`, `lun`, `op` |
//! | `ktgt_lun_latency_seconds` (histogram) | `target`, `lun`, `op` |
//! | `ktgt_session_ops_total` | `target`, `initiator`, `isid`, `tsih`, `op` |
//! | `ktgt_session_bytes_total` | `target`, `initiator`, `isid`, `tsih`, `op` |
//! | `ktgt_session_commands_in_flight` (gauge) | `target`, `initiator`, `isid`, `tsih` |
//! | `ktgt_logins_total` | `target` (empty: discovery or not served), `result` |
//! | `ktgt_sessions_ended_total` | `target`, `reason` |
//! | `ktgt_pdu_rejects_total` | `reason` |
//! | `ktgt_task_management_total` | `function`, `response` |
//! | `ktgt_unit_attentions_total` | `condition` |
//! | `ktgt_target_ready` (gauge, cluster mode) | `name`, `target`, `reason` |
//!
//! Per-session series exist while the session does: they are read from the table on each
//! scrape, so a session that ends takes its series with it (at most `--max-connections` of
//! them). `result` is one of `success`, `auth_failed`, `not_in_acl`, `unknown_target`,
//! `protocol_error`; the other label values are listed in [`target_core::events`].
//! `ktgt_target_ready` is 1 for each Target object of this node whose Ready condition is True,
//! 0 otherwise (with the condition's reason), as the last reconcile wrote it ([`TargetReadiness`]).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use target_core::events;
use target_core::stats::{self, DirectionSnapshot, IoKind};
use target_core::table::TargetTable;

/// The Ready condition of each Target object this node serves, as its last reconcile wrote
/// it (cluster mode; empty in standalone mode, where a configuration that cannot be served
/// is refused whole).
#[derive(Debug, Default)]
pub struct TargetReadiness(
    std::sync::Mutex<std::collections::BTreeMap<String, (String, bool, String)>>,
);

impl TargetReadiness {
    /// Target object `name` (serving `iqn`) is ready or not, for `reason`.
    pub fn set(&self, name: &str, iqn: &str, ready: bool, reason: &str) {
        self.lock()
            .insert(name.to_owned(), (iqn.to_owned(), ready, reason.to_owned()));
    }

    /// Target object `name` is no longer this node's (deleted or moved).
    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, (String, bool, String)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The process-wide [`TargetReadiness`] the Target reconciler writes.
pub fn target_readiness() -> &'static TargetReadiness {
    static GLOBAL: std::sync::OnceLock<TargetReadiness> = std::sync::OnceLock::new();
    GLOBAL.get_or_init(TargetReadiness::default)
}

/// Collects from the live table and the global LUN stats registry on each scrape.
#[derive(Debug)]
pub struct AgentCollector {
    table: Arc<TargetTable>,
    stats: &'static stats::Registry,
    events: &'static events::Registry,
}

impl AgentCollector {
    pub fn new(table: Arc<TargetTable>) -> AgentCollector {
        AgentCollector {
            table,
            stats: stats::global(),
            events: events::global(),
        }
    }

    /// Reading from `registry` instead of the global one (tests).
    pub fn with_stats(table: Arc<TargetTable>, registry: &'static stats::Registry) -> Self {
        AgentCollector {
            table,
            stats: registry,
            events: events::global(),
        }
    }
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let targets = self.table.targets();
        ConstGauge::new(targets.len() as i64).encode(encoder.encode_descriptor(
            "targets",
            "Targets served by this node",
            None,
            MetricType::Gauge,
        )?)?;

        {
            let mut sessions = encoder.encode_descriptor(
                "sessions",
                "iSCSI sessions logged in, by target",
                None,
                MetricType::Gauge,
            )?;
            for t in &targets {
                let labels = [("target", t.iqn.as_str())];
                sessions
                    .encode_family(&labels)?
                    .encode_gauge(&(t.sessions().len() as i64))?;
            }
        }

        let luns = self.stats.snapshot();
        type Pick = fn(&DirectionSnapshot) -> u64;
        let counters: [(&str, &str, Pick); 3] = [
            (
                "lun_ops",
                "READ/WRITE commands completed, by target, LUN and direction",
                |d| d.ops,
            ),
            (
                "lun_bytes",
                "Bytes read or written by completed commands",
                |d| d.bytes,
            ),
            (
                "lun_errors",
                "READ/WRITE commands that completed with an error status",
                |d| d.errors,
            ),
        ];
        for (name, help, pick) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for l in &luns {
                let lun = l.lun.to_string();
                for (kind, d) in [(IoKind::Read, &l.read), (IoKind::Write, &l.write)] {
                    let labels = [
                        ("target", l.iqn.as_str()),
                        ("lun", lun.as_str()),
                        ("op", kind.as_str()),
                    ];
                    family
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&pick(d), None)?;
                }
            }
        }

        let mut latency = encoder.encode_descriptor(
            "lun_latency_seconds",
            "Time from dispatch to completion of READ/WRITE commands",
            None,
            MetricType::Histogram,
        )?;
        for l in &luns {
            let lun = l.lun.to_string();
            for (kind, d) in [(IoKind::Read, &l.read), (IoKind::Write, &l.write)] {
                let labels = [
                    ("target", l.iqn.as_str()),
                    ("lun", lun.as_str()),
                    ("op", kind.as_str()),
                ];
                let h = &d.latency;
                latency
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(
                        h.sum.as_secs_f64(),
                        h.count,
                        &h.cumulative(),
                        None,
                    )?;
            }
        }
        encode_sessions(&mut encoder, &targets)?;
        encode_events(&mut encoder, &self.events.snapshot())?;
        let mut ready = encoder.encode_descriptor(
            "target_ready",
            "1 when the Target object's Ready condition is True, else 0 (cluster mode)",
            None,
            MetricType::Gauge,
        )?;
        for (name, (iqn, is_ready, reason)) in target_readiness().lock().iter() {
            let labels = [
                ("name", name.as_str()),
                ("target", iqn.as_str()),
                ("reason", reason.as_str()),
            ];
            ready
                .encode_family(&labels)?
                .encode_gauge(&i64::from(*is_ready))?;
        }
        Ok(())
    }
}

/// Per-session series, read from the live sessions.
fn encode_sessions(
    encoder: &mut DescriptorEncoder,
    targets: &[Arc<target_core::table::Target>],
) -> Result<(), std::fmt::Error> {
    use std::sync::atomic::Ordering::Relaxed;
    struct Row {
        target: String,
        initiator: String,
        isid: String,
        tsih: String,
        io: [(u64, u64); 2],
        in_flight: u64,
    }
    let mut rows = Vec::new();
    for t in targets {
        for s in t.sessions() {
            rows.push(Row {
                target: t.iqn.clone(),
                initiator: s.initiator.clone(),
                isid: s.isid.iter().map(|b| format!("{b:02x}")).collect(),
                tsih: s.tsih.to_string(),
                io: [
                    (s.io.reads.load(Relaxed), s.io.read_bytes.load(Relaxed)),
                    (s.io.writes.load(Relaxed), s.io.write_bytes.load(Relaxed)),
                ],
                in_flight: s.io.in_flight.load(Relaxed),
            });
        }
    }
    let labels = |r: &'_ Row| {
        [
            ("target", r.target.clone()),
            ("initiator", r.initiator.clone()),
            ("isid", r.isid.clone()),
            ("tsih", r.tsih.clone()),
        ]
    };
    for (name, help, bytes) in [
        (
            "session_ops",
            "READ/WRITE commands completed, by session and direction",
            false,
        ),
        (
            "session_bytes",
            "Bytes read or written by the session's completed commands",
            true,
        ),
    ] {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for r in &rows {
            for (i, op) in ["read", "write"].into_iter().enumerate() {
                let [a, b, c, d] = labels(r);
                let l = [a, b, c, d, ("op", op.to_owned())];
                let v = if bytes { r.io[i].1 } else { r.io[i].0 };
                family
                    .encode_family(&l)?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }
    }
    let mut family = encoder.encode_descriptor(
        "session_commands_in_flight",
        "Commands of the session being executed now",
        None,
        MetricType::Gauge,
    )?;
    for r in &rows {
        family
            .encode_family(&labels(r))?
            .encode_gauge(&(r.in_flight as i64))?;
    }
    Ok(())
}

/// Counters by reason from [`target_core::events`].
fn encode_events(
    encoder: &mut DescriptorEncoder,
    s: &events::Snapshot,
) -> Result<(), std::fmt::Error> {
    fn counter<'a, L: prometheus_client::encoding::EncodeLabelSet + 'a>(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        rows: impl Iterator<Item = (L, u64)>,
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, v) in rows {
            family
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }
        Ok(())
    }
    counter(
        encoder,
        "logins",
        "Logins by target and result (success or the reason of the refusal)",
        s.logins
            .iter()
            .map(|((t, o), v)| ([("target", t.as_str()), ("result", o.as_str())], *v)),
    )?;
    counter(
        encoder,
        "sessions_ended",
        "Full-feature sessions that ended, by target and reason",
        s.sessions_ended
            .iter()
            .map(|((t, e), v)| ([("target", t.as_str()), ("reason", e.as_str())], *v)),
    )?;
    counter(
        encoder,
        "pdu_rejects",
        "Reject PDUs sent, by reason (RFC 7143 section 11.17.1)",
        s.rejects.iter().map(|(r, v)| ([("reason", *r)], *v)),
    )?;
    counter(
        encoder,
        "task_management",
        "Task management functions answered, by function and response",
        s.task_management
            .iter()
            .map(|((f, r), v)| ([("function", *f), ("response", *r)], *v)),
    )?;
    counter(
        encoder,
        "unit_attentions",
        "Unit attention conditions established, by condition (one per I_T nexus)",
        s.unit_attentions
            .iter()
            .map(|(c, v)| ([("condition", *c)], *v)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use target_core::config::{DesiredState, LunConfig, TargetConfig};
    use target_core::scsi::ScsiResult;

    #[tokio::test]
    async fn exports_sessions_and_lun_counters() {
        static STATS: std::sync::OnceLock<stats::Registry> = std::sync::OnceLock::new();
        let registry_stats = STATS.get_or_init(stats::Registry::new);
        let table = TargetTable::new();
        let iqn = "iqn.2024-01.test:metrics";
        let mut desired = DesiredState::default();
        desired.targets.insert(
            iqn.to_owned(),
            TargetConfig {
                iqn: iqn.to_owned(),
                alias: None,
                luns: [(0, LunConfig::memory(0, 1 << 20))].into(),
                acl: Default::default(),
                chap: Default::default(),
            },
        );
        let report = table.apply(&desired).await;
        assert!(report.errors.is_empty());
        let read10 = [0x28u8, 0, 0, 0, 0, 0, 0, 0, 8, 0];
        stats::Probe::start_in(registry_stats, Some(iqn), Some(0), &read10)
            .finish(&ScsiResult::good(vec![0u8; 4096].into()), 0);

        let mut registry = ktgt_operator::telemetry::registry();
        registry.register_collector(Box::new(AgentCollector::with_stats(table, registry_stats)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("ktgt_targets 1"), "{text}");
        assert!(
            text.contains(&format!(
                r#"ktgt_lun_ops_total{{target="{iqn}",lun="0",op="read"}} 1"#
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                r#"ktgt_lun_bytes_total{{target="{iqn}",lun="0",op="read"}} 4096"#
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                r#"ktgt_lun_latency_seconds_count{{target="{iqn}",lun="0",op="read"}} 1"#
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                r#"ktgt_lun_ops_total{{target="{iqn}",lun="0",op="write"}} 0"#
            )),
            "{text}"
        );
    }
}
