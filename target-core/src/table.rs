//! The live target table: what the portal serves right now.
//!
//! [`TargetTable::apply`] takes a whole [`DesiredState`] and changes only what differs: a LUN
//! whose configuration is unchanged keeps its open store and its sessions; a new LUN is opened
//! before it becomes visible; a removed LUN disappears from REPORT LUNS and answers LOGICAL UNIT
//! NOT SUPPORTED; sessions whose access is revoked are ended (Asynchronous Message, then drop).
//!
//! Locks are `std::sync` and never held across `.await` or I/O (as mini-redis `db.rs`): stores
//! are opened outside the lock and installed under it.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use crate::config::{Acl, Backing, ChapConfig, DesiredState, LunConfig, TargetConfig};
use crate::lun::{BackendError, Engine, MemStore, Store, StoreConfig};
use crate::scsi::{LogicalUnit, LuIdentity, UnitAttention};

/// Why a session is being ended by the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EndReason {
    /// The initiator lost access (ACL or CHAP change).
    AccessRevoked,
    /// The target was removed from the configuration.
    TargetRemoved,
    /// The same initiator and ISID logged in again (session reinstatement, RFC 7143 §6.3.5).
    Reinstated,
    /// The agent is shutting down.
    Shutdown,
    /// An initiator asked for TARGET COLD RESET (RFC 7143 §11.5.1: the target drops every
    /// connection to the target).
    ColdReset,
}

/// A live session as the table sees it: enough to end it and to tell it about LUN changes.
#[derive(Debug)]
pub struct SessionHandle {
    pub id: u64,
    pub tsih: u16,
    pub initiator: String,
    pub isid: [u8; 6],
    /// The target portal group the session logged in through (its SCSI target port).
    pub tpgt: u16,
    pub peer: SocketAddr,
    /// Cancelled to end the session; the reason is set first.
    pub cancel: CancellationToken,
    pub end_reason: Mutex<Option<EndReason>>,
    /// What an administrator sees of the session beyond its identity (`ktgt-agent ls`).
    pub info: SessionInfo,
    /// The session's command counters.
    pub io: SessionIo,
    /// Tasks another session's task management function aborts (see [`AbortRequests`]).
    pub aborts: AbortRequests,
}

/// Task sets to abort in a session because of a task management function received in
/// another session (a "third-party" reset: LOGICAL UNIT RESET, CLEAR TASK SET, TARGET WARM
/// or COLD RESET). The session aborts them quietly: with the Control mode page's TAS bit 0,
/// SAM-5 §5.6 terminates another I_T nexus's aborted commands without a response, and the
/// reset's unit attention tells that nexus what happened.
#[derive(Debug, Default)]
pub struct AbortRequests {
    pending: Mutex<Vec<AbortRequest>>,
    notify: tokio::sync::Notify,
}

/// One third-party abort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbortRequest {
    /// The LUN whose tasks to abort; `None`: every LUN.
    pub lun: Option<u16>,
    /// CLEAR TASK SET: a session that loses commands to it gets COMMANDS CLEARED BY ANOTHER
    /// INITIATOR (SAM-5 §5.6, TAS 0). A reset needs none: its own unit attention says so.
    pub cleared: bool,
}

impl AbortRequests {
    /// Asks the session to abort its tasks as `request` says.
    pub fn post(&self, request: AbortRequest) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(request);
        self.notify.notify_one();
    }

    /// The requests posted since the last call.
    pub fn take(&self) -> Vec<AbortRequest> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Resolves when a request was posted (one permit is kept if nobody waits).
    pub async fn posted(&self) {
        self.notify.notified().await
    }
}

/// The negotiated state of a session that matters to an administrator, fixed at login.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// The portal address the connection arrived on.
    pub portal: Option<SocketAddr>,
    /// When the login completed.
    pub since: SystemTime,
    pub header_digest: bool,
    pub data_digest: bool,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    /// Ours: the largest data segment the initiator may send.
    pub max_recv_data_segment_length: u32,
    /// The initiator's: the largest data segment we send.
    pub max_send_data_segment_length: u32,
    /// The CHAP account the initiator authenticated as (the name only).
    pub chap_user: Option<String>,
}

impl Default for SessionInfo {
    fn default() -> Self {
        SessionInfo {
            portal: None,
            since: SystemTime::now(),
            header_digest: false,
            data_digest: false,
            immediate_data: false,
            initial_r2t: true,
            max_burst_length: 0,
            first_burst_length: 0,
            max_recv_data_segment_length: 0,
            max_send_data_segment_length: 0,
            chap_user: None,
        }
    }
}

/// Counters of one session: READ and WRITE commands completed (bytes only of those that
/// succeeded), and commands of any kind being executed now.
#[derive(Debug, Default)]
pub struct SessionIo {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub in_flight: AtomicU64,
}

/// Counts one command of a session as in flight until dropped (answered, aborted, or the
/// connection gone).
#[derive(Debug)]
pub struct InFlight(Arc<SessionHandle>);

impl InFlight {
    pub fn new(session: Arc<SessionHandle>) -> InFlight {
        session.io.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(session)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.io.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SessionHandle {
    /// Asks the session to end for `reason`.
    pub fn end(&self, reason: EndReason) {
        *self.end_reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
        self.cancel.cancel();
    }

    /// Why the session was asked to end, if it was.
    pub fn end_reason(&self) -> Option<EndReason> {
        *self.end_reason.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The mutable part of a target.
#[derive(Debug, Clone)]
pub struct TargetState {
    pub alias: Option<String>,
    pub acl: Acl,
    pub chap: ChapConfig,
    pub luns: BTreeMap<u16, Arc<LogicalUnit>>,
    lun_configs: BTreeMap<u16, LunConfig>,
}

impl TargetState {
    /// The configuration LUN `lun` is served with.
    pub fn lun_config(&self, lun: u16) -> Option<&LunConfig> {
        self.lun_configs.get(&lun)
    }
}

/// One served target.
#[derive(Debug)]
pub struct Target {
    pub iqn: String,
    state: RwLock<TargetState>,
    sessions: Mutex<HashMap<u64, Arc<SessionHandle>>>,
}

impl Target {
    /// A snapshot of the target's state (cheap: LUNs are `Arc`s).
    pub fn state(&self) -> TargetState {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The logical unit numbered `lun`, if configured.
    pub fn lun(&self, lun: u16) -> Option<Arc<LogicalUnit>> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .luns
            .get(&lun)
            .cloned()
    }

    /// The configured LUN numbers, ascending.
    pub fn lun_numbers(&self) -> Vec<u16> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .luns
            .keys()
            .copied()
            .collect()
    }

    /// Whether `initiator` at `addr` may log in.
    pub fn admits(&self, initiator: &str, addr: IpAddr) -> bool {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .acl
            .admits(initiator, addr)
    }

    /// The sessions logged in to this target.
    pub fn sessions(&self) -> Vec<Arc<SessionHandle>> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn all_luns(&self) -> Vec<Arc<LogicalUnit>> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .luns
            .values()
            .cloned()
            .collect()
    }
}

/// What one `apply` changed and what it could not do.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub added_targets: Vec<String>,
    pub removed_targets: Vec<String>,
    pub changed_targets: Vec<String>,
    /// Sessions ended because their access was revoked or their target removed.
    pub sessions_ended: usize,
    /// Per target IQN, the LUNs that could not be opened (the rest of the target is served).
    pub errors: BTreeMap<String, Vec<LunError>>,
    /// LUNs grown in place: (target IQN, LUN, bytes now served).
    pub resized_luns: Vec<(String, u16, u64)>,
}

/// Whether two configurations of a LUN differ in nothing but the size to create a file at
/// (the one change served in place, by growing the file).
fn same_but_size(a: &LunConfig, b: &LunConfig) -> bool {
    a.create_size.is_some()
        && b.create_size.is_some()
        && LunConfig {
            create_size: b.create_size,
            ..a.clone()
        } == *b
}

impl ApplyReport {
    /// Logs what the apply changed and what failed, one line each.
    pub fn log(&self) {
        for iqn in &self.added_targets {
            tracing::info!(target_iqn = %iqn, "target added");
        }
        for iqn in &self.changed_targets {
            tracing::info!(target_iqn = %iqn, "target changed");
        }
        for (iqn, lun, bytes) in &self.resized_luns {
            tracing::info!(target_iqn = %iqn, lun, bytes, "LUN grown");
        }
        for iqn in &self.removed_targets {
            tracing::info!(target_iqn = %iqn, "target removed");
        }
        if self.sessions_ended > 0 {
            tracing::info!(
                sessions = self.sessions_ended,
                "sessions ended by the change"
            );
        }
        for (iqn, errs) in &self.errors {
            for e in errs {
                tracing::error!(target_iqn = %iqn, "{e}");
            }
        }
    }
}

/// A LUN that could not be brought up.
#[derive(Debug)]
pub struct LunError {
    pub lun: u16,
    pub error: BackendError,
}

impl std::fmt::Display for LunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LUN {}: {}", self.lun, self.error)
    }
}

/// All targets, plus the session registry used for reinstatement and TSIH allocation.
#[derive(Debug, Default)]
pub struct TargetTable {
    targets: RwLock<BTreeMap<String, Arc<Target>>>,
    /// Serialises `apply` calls so two diffs never interleave.
    apply_lock: tokio::sync::Mutex<()>,
    next_tsih: AtomicU16,
    next_session_id: AtomicU64,
    engine: Mutex<Option<Engine>>,
    /// The portal groups (TPGTs) the targets are served on; empty: group 1 only.
    port_groups: RwLock<Vec<u16>>,
    /// Discovery session CHAP, from the last applied [`DesiredState`].
    discovery_chap: RwLock<Option<ChapConfig>>,
}

impl TargetTable {
    pub fn new() -> Arc<TargetTable> {
        Arc::new(TargetTable::default())
    }

    /// Sets the portal groups (TPGTs, one SCSI target port each) every target is served on:
    /// every LU reports them in REPORT TARGET PORT GROUPS. [`crate::portal::Portal`] calls
    /// this when it binds.
    pub fn set_port_groups(&self, tpgts: &[u16]) {
        *self.port_groups.write().unwrap_or_else(|e| e.into_inner()) = tpgts.to_vec();
        for t in self.targets() {
            for lu in t.all_luns() {
                lu.set_port_groups(tpgts);
            }
        }
    }

    /// Discovery session CHAP (see [`DesiredState::discovery_chap`]).
    pub fn discovery_chap(&self) -> Option<ChapConfig> {
        self.discovery_chap
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The portal groups every target is served on, in order (group 1 when none was set).
    pub fn port_groups(&self) -> Vec<u16> {
        let g = self.port_groups.read().unwrap_or_else(|e| e.into_inner());
        if g.is_empty() {
            vec![1]
        } else {
            g.clone()
        }
    }

    /// Forces the I/O engine for stores opened from now on (default: probe io_uring, fall back).
    pub fn set_engine(&self, engine: Engine) {
        *self.engine.lock().unwrap_or_else(|e| e.into_inner()) = Some(engine);
    }

    /// The target named `iqn` (case-insensitive, RFC 3722 names compare after folding).
    pub fn target(&self, iqn: &str) -> Option<Arc<Target>> {
        let targets = self.targets.read().unwrap_or_else(|e| e.into_inner());
        targets
            .get(iqn)
            .or_else(|| {
                targets
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(iqn))
                    .map(|(_, t)| t)
            })
            .cloned()
    }

    /// All targets, in IQN order.
    pub fn targets(&self) -> Vec<Arc<Target>> {
        self.targets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// A fresh non-zero TSIH (RFC 7143 §11.12.6: "The target ... MUST NOT use 0").
    pub fn allocate_tsih(&self) -> u16 {
        loop {
            let t = self
                .next_tsih
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            if t != 0 {
                return t;
            }
        }
    }

    /// A process-unique session id, used as the I_T nexus id by the SCSI layer.
    pub fn allocate_session_id(&self) -> u64 {
        self.next_session_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers a session on `target`, ending any earlier session of the same initiator,
    /// ISID and portal group (session reinstatement, RFC 7143 §6.3.5: "the target MUST ...
    /// terminate the old session" when a new session with the same ISID and TSIH 0 is
    /// established; the TPGT is part of the session identifier, §4.4.3, so a login through
    /// another portal group is another session). Every LU of the target learns the new I_T
    /// nexus.
    pub fn register_session(&self, target: &Target, handle: Arc<SessionHandle>) {
        let old: Vec<Arc<SessionHandle>> = {
            let mut sessions = target.sessions.lock().unwrap_or_else(|e| e.into_inner());
            let old = sessions
                .values()
                .filter(|s| {
                    s.isid == handle.isid
                        && s.tpgt == handle.tpgt
                        && s.initiator.eq_ignore_ascii_case(&handle.initiator)
                })
                .cloned()
                .collect::<Vec<_>>();
            for o in &old {
                sessions.remove(&o.id);
            }
            sessions.insert(handle.id, handle.clone());
            old
        };
        for o in old {
            o.end(EndReason::Reinstated);
            for lu in target.all_luns() {
                lu.remove_nexus(o.id);
            }
        }
        let port = crate::scsi::initiator_port(&handle.initiator, &handle.isid);
        for lu in target.all_luns() {
            lu.add_nexus(handle.id, &port, handle.tpgt);
        }
    }

    /// Removes a session that ended.
    pub fn unregister_session(&self, target: &Target, id: u64) {
        target
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        for lu in target.all_luns() {
            lu.remove_nexus(id);
        }
    }

    /// Whether a session with this TSIH exists for (initiator, ISID) through portal group
    /// `tpgt` on any target.
    pub fn session_exists(&self, initiator: &str, isid: [u8; 6], tsih: u16, tpgt: u16) -> bool {
        self.targets().iter().any(|t| {
            t.sessions().iter().any(|s| {
                s.tsih == tsih
                    && s.isid == isid
                    && s.tpgt == tpgt
                    && s.initiator.eq_ignore_ascii_case(initiator)
            })
        })
    }

    /// Ends every session (shutdown).
    pub fn end_all_sessions(&self, reason: EndReason) {
        for t in self.targets() {
            for s in t.sessions() {
                s.end(reason);
            }
        }
    }

    /// Number of live sessions across all targets.
    pub fn session_count(&self) -> usize {
        self.targets().iter().map(|t| t.sessions().len()).sum()
    }

    /// Flushes every store (SYNCHRONIZE CACHE for the whole target), logging failures.
    pub async fn flush_all(&self) {
        for t in self.targets() {
            for lu in t.all_luns() {
                if let Err(e) = lu.store.flush().await {
                    tracing::error!(target_iqn = %t.iqn, lun = lu.lun, error = %e, "flush failed");
                }
            }
        }
    }

    /// Applies `desired` as a diff against the live table. LUNs that fail to open are reported
    /// and left out; everything else is served.
    pub async fn apply(&self, desired: &DesiredState) -> ApplyReport {
        let _serial = self.apply_lock.lock().await;
        let mut report = ApplyReport::default();
        // Discovery CHAP applies to logins from now on; a discovery session already open
        // keeps going (it can only list targets, which the ACL check still filters).
        *self
            .discovery_chap
            .write()
            .unwrap_or_else(|e| e.into_inner()) = desired.discovery_chap.clone();
        let current = self.targets();

        // Open new or changed LUNs first, outside any lock. A LUN whose configuration changed
        // only in its size is grown in place (its sessions, reservations and unit attentions
        // stay); an unchanged one is grown to what its file or block device now holds.
        let mut opened: BTreeMap<(String, u16), Arc<LogicalUnit>> = BTreeMap::new();
        let mut resized: BTreeMap<(String, u16), bool> = BTreeMap::new();
        for (iqn, tc) in &desired.targets {
            let existing = current.iter().find(|t| &t.iqn == iqn);
            for (n, lc) in &tc.luns {
                let live = existing.and_then(|t| {
                    let st = t.state.read().unwrap_or_else(|e| e.into_inner());
                    Some((st.lun_configs.get(n)?.clone(), st.luns.get(n)?.clone()))
                });
                if let Some((old, lu)) = live {
                    if old == *lc || same_but_size(&old, lc) {
                        let want = (old != *lc).then_some(lc.create_size).flatten();
                        match lu.grow(want) {
                            Ok(grown) => {
                                if let Some(bytes) = grown {
                                    report.resized_luns.push((iqn.clone(), *n, bytes));
                                }
                                if old != *lc {
                                    resized.insert((iqn.clone(), *n), true);
                                }
                            }
                            Err(error) => {
                                if old != *lc {
                                    resized.insert((iqn.clone(), *n), false);
                                }
                                report
                                    .errors
                                    .entry(iqn.clone())
                                    .or_default()
                                    .push(LunError { lun: *n, error });
                            }
                        }
                        continue;
                    }
                }
                match self.open_lun(iqn, lc).await {
                    Ok(lu) => {
                        opened.insert((iqn.clone(), *n), lu);
                    }
                    Err(error) => report
                        .errors
                        .entry(iqn.clone())
                        .or_default()
                        .push(LunError { lun: *n, error }),
                }
            }
        }

        let mut lun_changed: Vec<Arc<Target>> = Vec::new();
        {
            let mut targets = self.targets.write().unwrap_or_else(|e| e.into_inner());
            // Removed targets.
            let gone: Vec<String> = targets
                .keys()
                .filter(|k| !desired.targets.contains_key(*k))
                .cloned()
                .collect();
            for iqn in gone {
                if let Some(t) = targets.remove(&iqn) {
                    for s in t.sessions() {
                        s.end(EndReason::TargetRemoved);
                        report.sessions_ended += 1;
                    }
                    report.removed_targets.push(iqn);
                }
            }
            for (iqn, tc) in &desired.targets {
                match targets.get(iqn) {
                    None => {
                        let t = Arc::new(Target {
                            iqn: iqn.clone(),
                            state: RwLock::new(new_state(tc, iqn, &mut opened)),
                            sessions: Mutex::new(HashMap::new()),
                        });
                        lun_changed.push(t.clone());
                        targets.insert(iqn.clone(), t);
                        report.added_targets.push(iqn.clone());
                    }
                    Some(t) => {
                        let mut st = t.state.write().unwrap_or_else(|e| e.into_inner());
                        let mut changed = false;
                        let mut luns_changed = false;
                        if st.alias != tc.alias {
                            st.alias = tc.alias.clone();
                            changed = true;
                        }
                        let chap_changed = st.chap != tc.chap;
                        let access_changed = st.acl != tc.acl || chap_changed;
                        if access_changed {
                            st.acl = tc.acl.clone();
                            st.chap = tc.chap.clone();
                            changed = true;
                        }
                        // LUNs removed or replaced.
                        let sessions = t.sessions();
                        let old_numbers: Vec<u16> = st.luns.keys().copied().collect();
                        for n in old_numbers {
                            // Grown in place: the new size is the configuration now (a refused
                            // shrink keeps the old one, and is reported again next time).
                            match resized.get(&(iqn.clone(), n)) {
                                Some(true) => {
                                    if let Some(lc) = tc.luns.get(&n) {
                                        st.lun_configs.insert(n, lc.clone());
                                    }
                                    changed = true;
                                    continue;
                                }
                                Some(false) => continue,
                                None => {}
                            }
                            let keep = tc.luns.get(&n) == st.lun_configs.get(&n);
                            if !keep {
                                st.luns.remove(&n);
                                st.lun_configs.remove(&n);
                                luns_changed = true;
                            }
                        }
                        for (n, lc) in &tc.luns {
                            if st.luns.contains_key(n) {
                                continue;
                            }
                            if let Some(lu) = opened.remove(&(iqn.clone(), *n)) {
                                for s in &sessions {
                                    let port = crate::scsi::initiator_port(&s.initiator, &s.isid);
                                    lu.add_nexus(s.id, &port, s.tpgt);
                                }
                                st.luns.insert(*n, lu);
                                st.lun_configs.insert(*n, lc.clone());
                                luns_changed = true;
                            }
                        }
                        if luns_changed {
                            changed = true;
                            lun_changed.push(t.clone());
                        }
                        if access_changed {
                            // A CHAP change ends every session while the target still asks
                            // for CHAP (they authenticated with the old secrets; a target
                            // that no longer asks keeps them); an ACL change ends the
                            // sessions the new ACL refuses.
                            for s in &sessions {
                                let refused = !tc.acl.admits(&s.initiator, s.peer.ip());
                                if refused || (chap_changed && !tc.chap.incoming.is_empty()) {
                                    s.end(EndReason::AccessRevoked);
                                    report.sessions_ended += 1;
                                }
                            }
                        }
                        if changed {
                            report.changed_targets.push(iqn.clone());
                        }
                    }
                }
            }
        }
        // REPORTED LUNS DATA HAS CHANGED (SPC-4 §6.37: "the device server shall establish a
        // unit attention condition ... with the additional sense code set to REPORTED LUNS DATA
        // HAS CHANGED" for every I_T nexus) on the LUs that remain.
        for t in lun_changed {
            let numbers = t.lun_numbers();
            let has_sessions = !t.sessions().is_empty();
            for lu in t.all_luns() {
                lu.set_target_luns(&numbers);
                if has_sessions {
                    lu.raise_unit_attention(UnitAttention::ReportedLunsDataChanged, None);
                }
            }
        }
        // The login and session-end series of a target go with it.
        crate::events::global().retain_targets(|iqn| desired.targets.contains_key(iqn));
        report
    }

    async fn open_lun(&self, iqn: &str, lc: &LunConfig) -> Result<Arc<LogicalUnit>, BackendError> {
        let store = match &lc.backing {
            Backing::Memory { size } => Store::Memory(MemStore::new(*size)?),
            Backing::Path(path) => {
                if lc.create_size.is_some() {
                    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
                        std::fs::create_dir_all(dir).map_err(|source| BackendError::Open {
                            path: dir.to_path_buf(),
                            source,
                        })?;
                    }
                }
                let engine = self
                    .engine
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .unwrap_or(Engine::Auto);
                let cfg = StoreConfig {
                    path: path.clone(),
                    direct: lc.direct,
                    read_only: lc.read_only,
                    create_size: lc.create_size,
                    clone_from: lc.clone_from.clone(),
                    block_size: lc.block_size,
                    engine,
                };
                Store::open(&cfg)?
            }
        };
        let identity = LuIdentity::derive(iqn, lc.lun, lc.serial.as_deref());
        let naa = identity.naa;
        let groups = self.port_groups();
        let mut lu = LogicalUnit::new(lc.lun, store, lc.block_size, lc.read_only, identity)
            .map_err(|e| BackendError::Invalid {
                path: match &lc.backing {
                    Backing::Path(p) => p.clone(),
                    Backing::Memory { .. } => "<memory>".into(),
                },
                reason: e.to_string(),
            })?;
        // A regular file keeps its reservations beside it (APTPL, scsi/pr_state.rs).
        if let Backing::Path(path) = &lc.backing {
            if std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
                let file = crate::scsi::pr_state::PrFile::beside(path, &naa);
                lu = lu
                    .with_reservation_file(file)
                    .map_err(|e| BackendError::Invalid {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
            }
        }
        lu.set_port_groups(&groups);
        Ok(Arc::new(lu))
    }
}

fn new_state(
    tc: &TargetConfig,
    iqn: &str,
    opened: &mut BTreeMap<(String, u16), Arc<LogicalUnit>>,
) -> TargetState {
    let mut luns = BTreeMap::new();
    let mut lun_configs = BTreeMap::new();
    for (n, lc) in &tc.luns {
        if let Some(lu) = opened.remove(&(iqn.to_string(), *n)) {
            luns.insert(*n, lu);
            lun_configs.insert(*n, lc.clone());
        }
    }
    TargetState {
        alias: tc.alias.clone(),
        acl: tc.acl.clone(),
        chap: tc.chap.clone(),
        luns,
        lun_configs,
    }
}
