//! Per-LUN I/O counters: read and write operations, bytes and latency.
//!
//! Sessions record every READ/WRITE-family command they complete on a logical unit through a
//! [`Probe`]; exporters (the node agent's Prometheus endpoint) read [`Registry::snapshot`].
//! Counters are plain atomics: recording takes one read lock on the registry to find the LUN's
//! entry and a few relaxed atomic adds; nothing here blocks or allocates on the hot path once a
//! LUN has been seen.
//!
//! Entries are keyed by target IQN and LUN number and outlive reconfiguration on purpose (a
//! LUN re-opened with new settings keeps counting, as Prometheus counters must not go
//! backwards while the series exists); [`Registry::retain`] drops the series of LUNs that are
//! no longer served.
//!
//! # What counts
//! READ(6/10/12/16) are reads; WRITE(6/10/12/16), WRITE AND VERIFY(10/12/16) and COMPARE AND
//! WRITE are writes. Bytes are the Data-In bytes returned (reads) or the Data-Out bytes
//! received (writes) of commands that completed with GOOD status; operations and latency count
//! every completed command, failed ones also in `errors`. Latency runs from the moment the
//! session dispatches the command to the LUN until the LUN has produced the result (the time
//! to send Data-In back is not included).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use crate::scsi::{status, LogicalUnit, ScsiResult};

/// Operation codes counted (SBC-3 §5).
mod op {
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2E;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8A;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8E;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const WRITE_AND_VERIFY_12: u8 = 0xAE;
}

/// Upper bounds of the latency histogram buckets, in microseconds (the last bucket, `+Inf`,
/// is implicit). Block I/O on a local device spans tens of microseconds to seconds.
pub const LATENCY_BUCKETS_MICROS: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 10_000_000,
];

/// The direction of a data-transfer command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoKind {
    Read,
    Write,
}

impl IoKind {
    /// The kind of command `cdb` is, or `None` for commands that are not counted (INQUIRY,
    /// TEST UNIT READY, VERIFY, WRITE SAME, UNMAP, ...).
    pub fn of_cdb(cdb: &[u8]) -> Option<IoKind> {
        match *cdb.first()? {
            op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => Some(IoKind::Read),
            op::WRITE_6
            | op::WRITE_10
            | op::WRITE_12
            | op::WRITE_16
            | op::WRITE_AND_VERIFY_10
            | op::WRITE_AND_VERIFY_12
            | op::WRITE_AND_VERIFY_16
            | op::COMPARE_AND_WRITE => Some(IoKind::Write),
            _ => None,
        }
    }

    /// `"read"` or `"write"`, for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
        }
    }
}

/// A latency histogram with fixed buckets ([`LATENCY_BUCKETS_MICROS`]).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Non-cumulative counts; index `LATENCY_BUCKETS_MICROS.len()` is the `+Inf` bucket.
    buckets: [AtomicU64; LATENCY_BUCKETS_MICROS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn observe(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let index = LATENCY_BUCKETS_MICROS
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(LATENCY_BUCKETS_MICROS.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// A consistent-enough copy (each field is read once; concurrent observations may make
    /// `count` and the buckets differ by the commands in flight).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = [0u64; LATENCY_BUCKETS_MICROS.len() + 1];
        for (out, bucket) in buckets.iter_mut().zip(&self.buckets) {
            *out = bucket.load(Ordering::Relaxed);
        }
        HistogramSnapshot {
            buckets,
            sum: Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed)),
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// A copy of a [`LatencyHistogram`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Non-cumulative counts per bucket of [`LATENCY_BUCKETS_MICROS`], then `+Inf`.
    pub buckets: [u64; LATENCY_BUCKETS_MICROS.len() + 1],
    pub sum: Duration,
    pub count: u64,
}

impl HistogramSnapshot {
    /// `(upper bound in seconds, cumulative count)` per bucket, ending with `+Inf`, as
    /// Prometheus exposes them.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0u64;
        self.buckets
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                total = total.saturating_add(n);
                let bound = LATENCY_BUCKETS_MICROS
                    .get(i)
                    .map(|&us| us as f64 / 1e6)
                    .unwrap_or(f64::INFINITY);
                (bound, total)
            })
            .collect()
    }
}

/// Counters of one direction of one LUN.
#[derive(Debug, Default)]
pub struct DirectionStats {
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    pub latency: LatencyHistogram,
}

/// A copy of [`DirectionStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionSnapshot {
    pub ops: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency: HistogramSnapshot,
}

impl DirectionStats {
    fn snapshot(&self) -> DirectionSnapshot {
        DirectionSnapshot {
            ops: self.ops.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency: self.latency.snapshot(),
        }
    }
}

/// The counters of one LUN.
#[derive(Debug, Default)]
pub struct LunStats {
    pub read: DirectionStats,
    pub write: DirectionStats,
}

impl LunStats {
    /// Records one completed command. `bytes` is counted only when `ok`.
    pub fn record(&self, kind: IoKind, bytes: u64, latency: Duration, ok: bool) {
        let d = match kind {
            IoKind::Read => &self.read,
            IoKind::Write => &self.write,
        };
        d.ops.fetch_add(1, Ordering::Relaxed);
        if ok {
            d.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            d.errors.fetch_add(1, Ordering::Relaxed);
        }
        d.latency.observe(latency);
    }
}

/// The counters of one LUN at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunSnapshot {
    pub iqn: String,
    pub lun: u16,
    pub read: DirectionSnapshot,
    pub write: DirectionSnapshot,
}

/// All LUNs' counters, keyed by target IQN and LUN number.
#[derive(Debug, Default)]
pub struct Registry {
    /// IQN -> LUN -> counters (nested so a lookup borrows the IQN instead of allocating).
    luns: RwLock<HashMap<String, HashMap<u16, Arc<LunStats>>>>,
}

impl Registry {
    /// An empty registry (tests; the sessions use [`global`]).
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The counters of `lun` of target `iqn`, created on first use.
    pub fn lun(&self, iqn: &str, lun: u16) -> Arc<LunStats> {
        // The common case, the entry exists, takes only the read lock.
        {
            let map = self.luns.read().unwrap_or_else(|e| e.into_inner());
            if let Some(stats) = map.get(iqn).and_then(|luns| luns.get(&lun)) {
                return stats.clone();
            }
        }
        let mut map = self.luns.write().unwrap_or_else(|e| e.into_inner());
        map.entry(iqn.to_owned())
            .or_default()
            .entry(lun)
            .or_default()
            .clone()
    }

    /// Every LUN's counters, sorted by IQN then LUN.
    pub fn snapshot(&self) -> Vec<LunSnapshot> {
        let map = self.luns.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<LunSnapshot> = map
            .iter()
            .flat_map(|(iqn, luns)| {
                luns.iter().map(move |(lun, s)| LunSnapshot {
                    iqn: iqn.clone(),
                    lun: *lun,
                    read: s.read.snapshot(),
                    write: s.write.snapshot(),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.iqn, a.lun).cmp(&(&b.iqn, b.lun)));
        out
    }

    /// Keeps only the LUNs for which `keep(iqn, lun)` is true (call after reconfiguration so
    /// removed LUNs stop being exported).
    pub fn retain(&self, mut keep: impl FnMut(&str, u16) -> bool) {
        let mut map = self.luns.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|iqn, luns| {
            luns.retain(|lun, _| keep(iqn, *lun));
            !luns.is_empty()
        });
    }
}

/// The process-wide registry the sessions record into.
pub fn global() -> &'static Registry {
    static GLOBAL: OnceLock<Registry> = OnceLock::new();
    GLOBAL.get_or_init(Registry::new)
}

/// Times one command on a LUN: created when the session dispatches it, finished with its
/// result. A probe for an uncounted command (no LUN, no target, not a READ/WRITE) is inert.
#[derive(Debug)]
#[must_use = "a probe records nothing until finished"]
pub struct Probe {
    armed: Option<(Arc<LunStats>, IoKind, Instant)>,
    /// The session whose counters the command also goes to.
    session: Option<Arc<crate::table::SessionHandle>>,
}

impl Probe {
    /// Starts timing `cdb` on `lu` of target `iqn`, recording into [`global`]. The LU keeps
    /// its registry entry after the first look-up (an LU belongs to one target; a removed
    /// LUN's entry goes with [`Registry::retain`], a re-added LUN is a new LU).
    pub fn start(iqn: Option<&str>, lu: Option<&LogicalUnit>, cdb: &[u8]) -> Probe {
        let armed = match (iqn, lu, IoKind::of_cdb(cdb)) {
            (Some(iqn), Some(lu), Some(kind)) => {
                let stats = lu.stats.get_or_init(|| global().lun(iqn, lu.lun)).clone();
                Some((stats, kind, Instant::now()))
            }
            _ => None,
        };
        Probe {
            armed,
            session: None,
        }
    }

    /// Also counts the command in `session`'s [`crate::table::SessionIo`].
    pub fn for_session(mut self, session: Option<Arc<crate::table::SessionHandle>>) -> Probe {
        self.session = session;
        self
    }

    /// As [`Probe::start`], into `registry`.
    pub fn start_in(registry: &Registry, iqn: Option<&str>, lun: Option<u16>, cdb: &[u8]) -> Probe {
        let armed = match (iqn, lun, IoKind::of_cdb(cdb)) {
            (Some(iqn), Some(lun), Some(kind)) => {
                Some((registry.lun(iqn, lun), kind, Instant::now()))
            }
            _ => None,
        };
        Probe {
            armed,
            session: None,
        }
    }

    /// Records the command's outcome. `data_out_len` is the number of Data-Out bytes the
    /// initiator sent (writes); reads count the Data-In bytes of `result`.
    pub fn finish(self, result: &ScsiResult, data_out_len: u32) {
        let Some((stats, kind, started)) = self.armed else {
            return;
        };
        let bytes = match kind {
            IoKind::Read => result.data_in.len() as u64,
            IoKind::Write => u64::from(data_out_len),
        };
        let ok = result.status == status::GOOD;
        stats.record(kind, bytes, started.elapsed(), ok);
        if let Some(s) = &self.session {
            let (ops, total) = match kind {
                IoKind::Read => (&s.io.reads, &s.io.read_bytes),
                IoKind::Write => (&s.io.writes, &s.io.write_bytes),
            };
            ops.fetch_add(1, Ordering::Relaxed);
            if ok {
                total.fetch_add(bytes, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const IQN: &str = "iqn.2024-01.test:disk";

    fn read10() -> [u8; 10] {
        [op::READ_10, 0, 0, 0, 0, 0, 0, 0, 8, 0]
    }

    fn write16() -> [u8; 16] {
        let mut cdb = [0u8; 16];
        cdb[0] = op::WRITE_16;
        cdb
    }

    #[test]
    fn classifies_commands() {
        assert_eq!(IoKind::of_cdb(&read10()), Some(IoKind::Read));
        assert_eq!(
            IoKind::of_cdb(&[op::READ_6, 0, 0, 0, 1, 0]),
            Some(IoKind::Read)
        );
        assert_eq!(IoKind::of_cdb(&write16()), Some(IoKind::Write));
        assert_eq!(
            IoKind::of_cdb(&[op::COMPARE_AND_WRITE; 16]),
            Some(IoKind::Write)
        );
        assert_eq!(IoKind::of_cdb(&[0x12, 0, 0, 0, 36, 0]), None, "INQUIRY");
        assert_eq!(IoKind::of_cdb(&[0x00; 6]), None, "TEST UNIT READY");
        assert_eq!(IoKind::of_cdb(&[]), None);
    }

    #[test]
    fn probe_counts_reads_and_writes() {
        let registry = Registry::new();
        let ok_read = ScsiResult::good(Bytes::from(vec![0u8; 4096]));
        Probe::start_in(&registry, Some(IQN), Some(1), &read10()).finish(&ok_read, 0);
        Probe::start_in(&registry, Some(IQN), Some(1), &read10()).finish(&ok_read, 0);
        Probe::start_in(&registry, Some(IQN), Some(1), &write16())
            .finish(&ScsiResult::good(Bytes::new()), 8192);
        let failed = ScsiResult {
            status: status::CHECK_CONDITION,
            data_in: Bytes::new(),
            sense: None,
        };
        Probe::start_in(&registry, Some(IQN), Some(1), &write16()).finish(&failed, 512);

        let snap = registry.snapshot();
        assert_eq!(snap.len(), 1);
        let lun = &snap[0];
        assert_eq!((lun.iqn.as_str(), lun.lun), (IQN, 1));
        assert_eq!(lun.read.ops, 2);
        assert_eq!(lun.read.bytes, 8192);
        assert_eq!(lun.read.errors, 0);
        assert_eq!(lun.read.latency.count, 2);
        assert_eq!(lun.write.ops, 2);
        assert_eq!(lun.write.bytes, 8192, "a failed write counts no bytes");
        assert_eq!(lun.write.errors, 1);
        assert_eq!(lun.write.latency.count, 2);
    }

    #[test]
    fn uncounted_commands_and_missing_lun_are_inert() {
        let registry = Registry::new();
        let good = ScsiResult::good(Bytes::from_static(b"x"));
        Probe::start_in(&registry, Some(IQN), Some(0), &[0x12, 0, 0, 0, 36, 0]).finish(&good, 0);
        Probe::start_in(&registry, Some(IQN), None, &read10()).finish(&good, 0);
        Probe::start_in(&registry, None, Some(0), &read10()).finish(&good, 0);
        assert!(registry.snapshot().is_empty());
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(10)); // <= 50us
        h.observe(Duration::from_micros(50)); // <= 50us (bounds are inclusive)
        h.observe(Duration::from_micros(700)); // <= 1ms
        h.observe(Duration::from_secs(60)); // +Inf
        let snap = h.snapshot();
        assert_eq!(snap.count, 4);
        assert_eq!(
            snap.sum,
            Duration::from_micros(10 + 50 + 700) + Duration::from_secs(60)
        );
        let cumulative = snap.cumulative();
        assert_eq!(cumulative.len(), LATENCY_BUCKETS_MICROS.len() + 1);
        assert_eq!(cumulative[0], (50e-6, 2));
        assert_eq!(cumulative[3], (500e-6, 2));
        assert_eq!(cumulative[4], (1e-3, 3));
        assert_eq!(cumulative[LATENCY_BUCKETS_MICROS.len() - 1].1, 3);
        let last = cumulative.last().copied().unwrap_or_default();
        assert!(last.0.is_infinite());
        assert_eq!(last.1, 4);
    }

    #[test]
    fn retain_drops_removed_luns() {
        let registry = Registry::new();
        registry.lun(IQN, 0);
        registry.lun(IQN, 1);
        registry.lun("iqn.2024-01.test:other", 0);
        registry.retain(|iqn, lun| iqn == IQN && lun == 1);
        let left: Vec<(String, u16)> = registry
            .snapshot()
            .into_iter()
            .map(|s| (s.iqn, s.lun))
            .collect();
        assert_eq!(left, vec![(IQN.to_owned(), 1)]);
    }

    #[test]
    fn same_lun_same_counters() {
        let registry = Registry::new();
        let a = registry.lun(IQN, 3);
        let b = registry.lun(IQN, 3);
        assert!(Arc::ptr_eq(&a, &b));
    }
}
