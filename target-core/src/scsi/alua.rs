//! Asymmetric logical unit access (SPC-4 §5.15): the target port groups a LU is reached
//! through, their access states, REPORT TARGET PORT GROUPS (§6.36), and the commands a group
//! in a state other than active refuses.
//!
//! # Contract
//! - One iSCSI target portal group is one SCSI target port (RFC 7143 §4.4.1: the iSCSI
//!   target port is the target name with a TPGT), and one ALUA target port group holding that
//!   one port. Both identifiers are the TPGT: relative target port N and target port group N
//!   for portal group N (the portal refuses TPGT 0, which SPC-4 §7.8.6.5 reserves).
//! - Access is implicit only (INQUIRY TPGS 01b): the target decides states, SET TARGET PORT
//!   GROUPS is not supported. Every group starts active/optimized, which is the truth on one
//!   node; [`LogicalUnit::set_access_state`] is how a state changes (a second node serving the
//!   same LU would report its groups standby), raising ASYMMETRIC ACCESS STATE CHANGED for
//!   every other I_T nexus (§5.15.2.5: "the device server shall establish a unit attention
//!   condition for the initiator port associated with every I_T nexus other than the I_T
//!   nexus on which the [...] command was received").
//! - A group in standby, unavailable or transitioning state answers only the commands
//!   §5.15.2.4.4 to §5.15.2.4.6 allow in that state; others end in NOT READY with the state's
//!   additional sense code.

use bytes::Bytes;

use super::cdb::{self, be32, op};
use super::{LogicalUnit, ScsiError, UnitAttention};

/// An asymmetric access state (SPC-4 §6.36, table 264).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessState {
    ActiveOptimized,
    ActiveNonOptimized,
    Standby,
    Unavailable,
    Transitioning,
}

impl AccessState {
    /// The ASYMMETRIC ACCESS STATE code.
    pub const fn code(self) -> u8 {
        match self {
            AccessState::ActiveOptimized => 0x0,
            AccessState::ActiveNonOptimized => 0x1,
            AccessState::Standby => 0x2,
            AccessState::Unavailable => 0x3,
            AccessState::Transitioning => 0xF,
        }
    }

    /// Whether every command is served in this state.
    pub const fn is_active(self) -> bool {
        matches!(
            self,
            AccessState::ActiveOptimized | AccessState::ActiveNonOptimized
        )
    }

    /// Whether `opcode` (with its CDB, for service actions) is served in this state.
    /// SPC-4 §5.15.2.4.4 (standby), §5.15.2.4.5 (unavailable), §5.15.2.4.6 (transitioning).
    fn allows(self, opcode: u8, cdb: &[u8]) -> bool {
        let rtpg = opcode == op::MAINTENANCE_IN
            && cdb.get(1).map(|b| b & 0x1F) == Some(op::SA_REPORT_TARGET_PORT_GROUPS);
        let always = matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE) || rtpg;
        match self {
            AccessState::ActiveOptimized | AccessState::ActiveNonOptimized => true,
            // "The device server shall support the following commands ... INQUIRY, LOG
            // SELECT, LOG SENSE, MODE SELECT, MODE SENSE, REPORT LUNS, RECEIVE DIAGNOSTIC
            // RESULTS, SEND DIAGNOSTIC, REPORT TARGET PORT GROUPS, SET TARGET PORT GROUPS,
            // REQUEST SENSE, PERSISTENT RESERVE IN, PERSISTENT RESERVE OUT ..." (of those,
            // the ones we implement).
            AccessState::Standby => {
                always
                    || matches!(
                        opcode,
                        op::MODE_SENSE_6
                            | op::MODE_SENSE_10
                            | op::MODE_SELECT_6
                            | op::MODE_SELECT_10
                            | op::PERSISTENT_RESERVE_IN
                            | op::PERSISTENT_RESERVE_OUT
                    )
            }
            // Unavailable and transitioning: INQUIRY, REPORT LUNS, REPORT TARGET PORT
            // GROUPS, SET TARGET PORT GROUPS, REQUEST SENSE (and vendor commands).
            AccessState::Unavailable | AccessState::Transitioning => always,
        }
    }

    /// The error a refused command ends in: NOT READY, LOGICAL UNIT NOT ACCESSIBLE with the
    /// state's qualifier (04h/0Ah ASYMMETRIC ACCESS STATE TRANSITION, 04h/0Bh TARGET PORT IN
    /// STANDBY STATE, 04h/0Ch TARGET PORT IN UNAVAILABLE STATE).
    fn refusal(self) -> ScsiError {
        ScsiError::NotAccessible(self)
    }
}

/// One target port group: its identifier (the TPGT), its state, and PREF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetPortGroup {
    pub id: u16,
    pub state: AccessState,
    pub preferred: bool,
}

impl TargetPortGroup {
    /// An active/optimized group, as every group starts.
    pub const fn active(id: u16) -> TargetPortGroup {
        TargetPortGroup {
            id,
            state: AccessState::ActiveOptimized,
            preferred: false,
        }
    }
}

/// The groups a LU starts with before the table tells it (one portal group, TPGT 1).
pub(crate) fn default_groups() -> Vec<TargetPortGroup> {
    vec![TargetPortGroup::active(1)]
}

/// SUPPORTED STATES bits of a descriptor (SPC-4 §6.36 table 263): T_SUP (7), U_SUP (3),
/// S_SUP (2), AN_SUP (1), AO_SUP (0): the states [`AccessState`] models. O_SUP and LBD_SUP
/// are zero.
const SUPPORTED_STATES: u8 = 0x80 | 0x08 | 0x04 | 0x02 | 0x01;

/// IMPLICIT TRANSITION TIME (extended header): seconds a transition may take; ours are
/// immediate, and zero means "not specified", so one second.
const IMPLICIT_TRANSITION_TIME: u8 = 1;

impl LogicalUnit {
    /// Tells the LU which target port groups (TPGTs) it is reached through. Groups it already
    /// knows keep their state; new ones start active/optimized; an empty list keeps group 1.
    pub fn set_port_groups(&self, tpgts: &[u16]) {
        let mut st = self.lock();
        let mut groups: Vec<TargetPortGroup> = tpgts
            .iter()
            .map(|&id| {
                st.port_groups
                    .iter()
                    .find(|g| g.id == id)
                    .copied()
                    .unwrap_or(TargetPortGroup::active(id))
            })
            .collect();
        groups.sort_by_key(|g| g.id);
        groups.dedup_by_key(|g| g.id);
        if groups.is_empty() {
            groups = default_groups();
        }
        st.port_groups = groups;
        self.refresh_alua_restricted(&st);
    }

    /// Sets the access state of target port group `id` (an implicit transition), raising
    /// ASYMMETRIC ACCESS STATE CHANGED for every I_T nexus. Returns false for a group the LU
    /// is not reached through.
    pub fn set_access_state(&self, id: u16, state: AccessState) -> bool {
        let mut st = self.lock();
        let Some(g) = st.port_groups.iter_mut().find(|g| g.id == id) else {
            return false;
        };
        if g.state == state {
            return true;
        }
        g.state = state;
        self.refresh_alua_restricted(&st);
        drop(st);
        self.raise_unit_attention(UnitAttention::AsymmetricAccessStateChanged, None);
        true
    }

    /// The target port groups and their states, in identifier order.
    pub fn port_groups(&self) -> Vec<TargetPortGroup> {
        self.lock().port_groups.clone()
    }

    fn refresh_alua_restricted(&self, st: &super::LuState) {
        let restricted = st.port_groups.iter().any(|g| !g.state.is_active());
        self.alua_restricted
            .store(restricted, std::sync::atomic::Ordering::Release);
    }

    /// Refuses `opcode` from `nexus` when that nexus's target port group is in a state that
    /// does not serve it. Called only while some group is not active.
    pub(crate) fn check_access_state(
        &self,
        nexus: u64,
        opcode: u8,
        cdb: &[u8],
    ) -> Result<(), ScsiError> {
        let st = self.lock();
        let port = st.port(nexus).target_port;
        let state = st
            .port_groups
            .iter()
            .find(|g| g.id == port)
            .map_or(AccessState::ActiveOptimized, |g| g.state);
        if state.allows(opcode, cdb) {
            Ok(())
        } else {
            Err(state.refusal())
        }
    }

    /// REPORT TARGET PORT GROUPS (SPC-4 §6.36): every group with its state and its one
    /// target port, in the length-only (000b) or extended (001b) header format.
    pub(crate) fn report_target_port_groups(&self, cdb: &[u8]) -> Result<Bytes, ScsiError> {
        let c = cdb::fixed::<12>(cdb)?;
        let format = c[1] >> 5;
        let alloc = be32([c[6], c[7], c[8], c[9]]) as usize;
        let mut d = Vec::with_capacity(64);
        match format {
            0 => d.extend_from_slice(&[0; 4]),
            // FORMAT TYPE 001b in byte 4 bits 6..4, then IMPLICIT TRANSITION TIME.
            1 => d.extend_from_slice(&[0, 0, 0, 0, 0x10, IMPLICIT_TRANSITION_TIME, 0, 0]),
            // "If the PARAMETER DATA FORMAT field is set to a reserved value, the command
            // shall be terminated with CHECK CONDITION status, with the sense key set to
            // ILLEGAL REQUEST, and the additional sense code set to INVALID FIELD IN CDB."
            _ => return Err(ScsiError::cdb_bit(1, 7)),
        };
        for g in self.port_groups() {
            let pref = if g.preferred { 0x80 } else { 0 };
            d.push(pref | g.state.code());
            d.push(SUPPORTED_STATES);
            d.extend_from_slice(&g.id.to_be_bytes());
            // Reserved; STATUS CODE 00h (no status available); vendor specific.
            d.extend_from_slice(&[0, 0, 0]);
            // TARGET PORT COUNT: one, the relative target port of the same number.
            d.push(1);
            d.extend_from_slice(&[0, 0]);
            d.extend_from_slice(&g.id.to_be_bytes());
        }
        // RETURN DATA LENGTH (n - 3): every byte after the field, the rest of an extended
        // header included.
        let len = (d.len() - 4) as u32;
        d[..4].copy_from_slice(&len.to_be_bytes());
        d.truncate(alloc);
        Ok(Bytes::from(d))
    }
}
