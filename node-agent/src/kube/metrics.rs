//! The agent's read-on-scrape metrics: sessions and served targets from the table, per-LUN
//! I/O from [`target_core::stats`].
//!
//! | metric | labels |
//! |---|---|
//! | `ktgt_targets` (gauge) | |
//! | `ktgt_sessions` (gauge) | `target` |
//! | `ktgt_lun_ops_total` | `target`, `lun`, `op` (`read`/`write`) |
//! | `ktgt_lun_bytes_total` | `target`, `lun`, `op` |
//! | `ktgt_lun_errors_total` | `target`, `lun`, `op` |
//! | `ktgt_lun_latency_seconds` (histogram) | `target`, `lun`, `op` |

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use target_core::stats::{self, DirectionSnapshot, IoKind};
use target_core::table::TargetTable;

/// Collects from the live table and the global LUN stats registry on each scrape.
#[derive(Debug)]
pub struct AgentCollector {
    table: Arc<TargetTable>,
    stats: &'static stats::Registry,
}

impl AgentCollector {
    pub fn new(table: Arc<TargetTable>) -> AgentCollector {
        AgentCollector {
            table,
            stats: stats::global(),
        }
    }

    /// Reading from `registry` instead of the global one (tests).
    pub fn with_stats(table: Arc<TargetTable>, registry: &'static stats::Registry) -> Self {
        AgentCollector {
            table,
            stats: registry,
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use target_core::config::{Backing, DesiredState, LunConfig, TargetConfig};
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
                luns: [(
                    0,
                    LunConfig {
                        lun: 0,
                        backing: Backing::Memory { size: 1 << 20 },
                        block_size: 512,
                        read_only: false,
                        direct: false,
                        create_size: None,
                        clone_from: None,
                        serial: None,
                    },
                )]
                .into(),
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
