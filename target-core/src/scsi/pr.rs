//! Reservations: persistent reservations (SPC-4 §5.12; PERSISTENT RESERVE IN §6.15 and
//! PERSISTENT RESERVE OUT §6.16) and SPC-2 RESERVE/RELEASE(6/10), plus the access check every
//! command goes through while a reservation exists.
//!
//! # I_T nexuses
//! Registrations and reservations belong to the I_T nexus ([`ItNexus`]), which for iSCSI is
//! the initiator port name ([`initiator_port`]: initiator name, ",i,0x" and the ISID)
//! together with the target port (the portal group the session logged in through; RFC 7143
//! §4.4.1). A session id is not an I_T nexus: a re-login with the same initiator name and
//! ISID through the same portal group is the same nexus and finds its registrations again;
//! the same initiator port through another portal group is another nexus, which registers
//! on its own (ALL_TG_PT is not supported). The LU learns each session's nexus in
//! [`LogicalUnit::add_nexus`]; a session that never called it gets a port of its own.
//!
//! # What is kept, what is not
//! - Registrations and the persistent reservation survive I_T nexus loss, LOGICAL UNIT RESET
//!   and re-login (SPC-4 §5.12.4). With APTPL=1 they also survive a restart of the target on
//!   a LU backed by a regular file (`pr_state.rs`; REPORT CAPABILITIES PTPL_C=1); other LUs
//!   refuse APTPL=1 with INVALID FIELD IN PARAMETER LIST (PTPL_C=0).
//! - SPEC_I_PT, ALL_TG_PT and REGISTER AND MOVE are not supported (SIP_C=0, ATP_C=0; REGISTER
//!   AND MOVE is an unsupported service action: INVALID FIELD IN CDB).
//! - PREEMPT AND ABORT behaves as PREEMPT: aborting the preempted nexuses' tasks is the
//!   transport's job, and the command succeeds.
//! - An SPC-2 reservation is released by RELEASE from its holder, LOGICAL UNIT RESET (and
//!   target resets, which reset every LU) and I_T nexus loss ([`LogicalUnit::remove_nexus`]).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::cdb::{self, be16, be32, be64, op};
use super::{push_ua, DataOut, LogicalUnit, LuState, ScsiError, UnitAttention};

/// Most registrations one LU keeps (one per initiator port); REGISTER beyond this ends in
/// INSUFFICIENT REGISTRATION RESOURCES.
pub const MAX_REGISTRATIONS: usize = 256;

/// The basic PERSISTENT RESERVE OUT parameter list is 24 bytes (SPC-4 §6.16.3, table 227).
const PR_OUT_LIST_LEN: usize = 24;

/// PERSISTENT RESERVE IN service actions (SPC-4 §6.15.1, table 211).
mod prin {
    pub const READ_KEYS: u8 = 0x00;
    pub const READ_RESERVATION: u8 = 0x01;
    pub const REPORT_CAPABILITIES: u8 = 0x02;
    pub const READ_FULL_STATUS: u8 = 0x03;
}

/// PERSISTENT RESERVE OUT service actions (SPC-4 §6.16.2, table 220).
mod prout {
    pub const REGISTER: u8 = 0x00;
    pub const RESERVE: u8 = 0x01;
    pub const RELEASE: u8 = 0x02;
    pub const CLEAR: u8 = 0x03;
    pub const PREEMPT: u8 = 0x04;
    pub const PREEMPT_AND_ABORT: u8 = 0x05;
    pub const REGISTER_AND_IGNORE_EXISTING_KEY: u8 = 0x06;
}

/// An I_T nexus: an initiator port (see [`initiator_port`]) and a relative target port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ItNexus {
    initiator: Arc<str>,
    pub(crate) target_port: u16,
}

impl ItNexus {
    pub(crate) fn new(initiator_port: &str, target_port: u16) -> ItNexus {
        ItNexus {
            initiator: Arc::from(initiator_port),
            target_port,
        }
    }

    /// The initiator port name.
    pub(crate) fn initiator(&self) -> &str {
        &self.initiator
    }
}

/// The iSCSI initiator port name of a session: `<initiator name>,i,0x<ISID in 12 hex digits>`
/// (RFC 7143 §4.2.7.1; SPC-4 §7.6.4.6 iSCSI TransportID, FORMAT CODE 01b). The name is
/// lowercased: iSCSI names compare case-insensitively.
pub fn initiator_port(initiator: &str, isid: &[u8; 6]) -> String {
    let mut s = initiator.to_ascii_lowercase();
    s.push_str(",i,0x");
    for b in isid {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Persistent reservation TYPE (SPC-4 §6.16.2, table 221).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PrType {
    WriteExclusive,
    ExclusiveAccess,
    WriteExclusiveRegistrantsOnly,
    ExclusiveAccessRegistrantsOnly,
    WriteExclusiveAllRegistrants,
    ExclusiveAccessAllRegistrants,
}

impl PrType {
    pub(crate) fn from_code(code: u8) -> Option<PrType> {
        Some(match code {
            1 => PrType::WriteExclusive,
            3 => PrType::ExclusiveAccess,
            5 => PrType::WriteExclusiveRegistrantsOnly,
            6 => PrType::ExclusiveAccessRegistrantsOnly,
            7 => PrType::WriteExclusiveAllRegistrants,
            8 => PrType::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            PrType::WriteExclusive => 1,
            PrType::ExclusiveAccess => 3,
            PrType::WriteExclusiveRegistrantsOnly => 5,
            PrType::ExclusiveAccessRegistrantsOnly => 6,
            PrType::WriteExclusiveAllRegistrants => 7,
            PrType::ExclusiveAccessAllRegistrants => 8,
        }
    }

    /// All-registrants types: every registered I_T nexus is a reservation holder (SPC-4
    /// §5.12.9, "Persistent reservation holder").
    fn all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }

    fn registrants_only(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveRegistrantsOnly | PrType::ExclusiveAccessRegistrantsOnly
        )
    }

    /// Exclusive Access types also refuse reads to those without access.
    fn exclusive_access(self) -> bool {
        matches!(
            self,
            PrType::ExclusiveAccess
                | PrType::ExclusiveAccessRegistrantsOnly
                | PrType::ExclusiveAccessAllRegistrants
        )
    }
}

#[derive(Debug, Clone)]
struct Registration {
    port: ItNexus,
    key: u64,
}

#[derive(Debug, Clone)]
struct Persistent {
    /// The nexus that reserved (for all-registrants types every registrant holds it).
    holder: ItNexus,
    kind: PrType,
}

/// Reservation state of one LU, kept in the LU state mutex.
#[derive(Debug, Default, Clone)]
pub(crate) struct Reservations {
    /// In registration order (READ KEYS lists them so).
    registrations: Vec<Registration>,
    persistent: Option<Persistent>,
    /// PRGENERATION (SPC-4 §6.15.2): a 32-bit counter that wraps.
    generation: u32,
    /// Holder of an SPC-2 RESERVE(6/10) reservation.
    spc2: Option<ItNexus>,
    /// APTPL of the last successful REGISTER or REGISTER AND IGNORE EXISTING KEY (SPC-4
    /// §5.14.5): the state is saved to the LU's state file while it is set.
    aptpl: bool,
}

impl Reservations {
    /// State read back from a state file (APTPL in effect, as it was when saved). Refuses
    /// what no sequence of commands could have produced.
    pub(crate) fn restore(
        generation: u32,
        registrations: Vec<(ItNexus, u64)>,
        reservation: Option<(PrType, ItNexus)>,
    ) -> Result<Reservations, &'static str> {
        if registrations.len() > MAX_REGISTRATIONS {
            return Err("more registrations than a LU keeps");
        }
        let mut r = Reservations {
            generation,
            aptpl: true,
            ..Reservations::default()
        };
        for (port, key) in registrations {
            if key == 0 {
                return Err("a registration with key 0");
            }
            if r.registration(&port).is_some() {
                return Err("an I_T nexus registered twice");
            }
            r.registrations.push(Registration { port, key });
        }
        if let Some((kind, holder)) = reservation {
            if r.registration(&holder).is_none() {
                return Err("the reservation holder is not registered");
            }
            r.persistent = Some(Persistent { holder, kind });
        }
        Ok(r)
    }

    pub(crate) fn generation(&self) -> u32 {
        self.generation
    }

    /// Registrations in order, with their keys.
    pub(crate) fn registered(&self) -> impl Iterator<Item = (&ItNexus, u64)> {
        self.registrations.iter().map(|r| (&r.port, r.key))
    }

    /// The persistent reservation's type and holder.
    pub(crate) fn reservation(&self) -> Option<(PrType, &ItNexus)> {
        self.persistent.as_ref().map(|p| (p.kind, &p.holder))
    }

    /// Whether some reservation restricts access (registrations alone do not).
    pub(crate) fn any(&self) -> bool {
        self.persistent.is_some() || self.spc2.is_some()
    }

    fn registration(&self, port: &ItNexus) -> Option<usize> {
        self.registrations.iter().position(|r| r.port == *port)
    }

    fn is_holder(&self, port: &ItNexus) -> bool {
        match &self.persistent {
            Some(p) if p.kind.all_registrants() => self.registration(port).is_some(),
            Some(p) => p.holder == *port,
            None => false,
        }
    }

    /// The reservation key READ RESERVATION reports: the holder's key, or zero for the
    /// all-registrants types (SPC-4 §6.15.3: "If the persistent reservation is an all
    /// registrants type, the RESERVATION KEY field shall be set to zero").
    fn reservation_key(&self) -> u64 {
        match &self.persistent {
            Some(p) if !p.kind.all_registrants() => self
                .registration(&p.holder)
                .map(|i| self.registrations[i].key)
                .unwrap_or(0),
            _ => 0,
        }
    }

    fn bump(&mut self) {
        // SPC-4 §6.15.2: PRGENERATION "shall be incremented" by each PERSISTENT RESERVE OUT
        // that changes registrations (not by RESERVE or RELEASE); the field wraps.
        self.generation = self.generation.wrapping_add(1);
    }

    /// The registration of `port` with its RESERVATION KEY checked: SPC-4 §5.12.6 ff. end
    /// RESERVE, RELEASE, CLEAR and PREEMPT from an unregistered I_T nexus, or one whose
    /// RESERVATION KEY field does not match its registered key, in RESERVATION CONFLICT.
    fn check_key(&self, port: &ItNexus, key: u64) -> Result<usize, ScsiError> {
        match self.registration(port) {
            Some(i) if self.registrations[i].key == key => Ok(i),
            _ => Err(ScsiError::ReservationConflict),
        }
    }

    /// Removes registration `i`, releasing the reservation it held (SPC-4 §5.12.11.2.1: the
    /// reservation is released when its holder is unregistered; for an all-registrants type,
    /// when the last registrant goes). Queues the unit attentions due in `uas`.
    fn unregister(&mut self, i: usize, uas: &mut Vec<(ItNexus, UnitAttention)>) {
        let gone = self.registrations.remove(i);
        let Some(p) = &self.persistent else {
            return;
        };
        if p.kind.all_registrants() {
            if self.registrations.is_empty() {
                self.persistent = None;
            }
        } else if p.holder == gone.port {
            let kind = p.kind;
            self.persistent = None;
            // SPC-4 §5.12.11.2.1: when the holder of a registrants-only reservation is
            // unregistered, "the device server shall establish a unit attention condition for
            // the initiator port associated with every registered I_T nexus ... with the
            // additional sense code set to RESERVATIONS RELEASED".
            if kind.registrants_only() {
                for r in &self.registrations {
                    uas.push((r.port.clone(), UnitAttention::ReservationsReleased));
                }
            }
        }
    }

    /// REGISTER and REGISTER AND IGNORE EXISTING KEY (SPC-4 §5.12.6, "Registering").
    fn register(
        &mut self,
        port: &ItNexus,
        key: u64,
        sa_key: u64,
        ignore: bool,
        uas: &mut Vec<(ItNexus, UnitAttention)>,
    ) -> Result<(), ScsiError> {
        match self.registration(port) {
            None => {
                // "If the I_T nexus has not been registered: a) if the RESERVATION KEY field
                // contains a value other than zero [REGISTER only], the device server shall
                // terminate the command with RESERVATION CONFLICT status".
                if !ignore && key != 0 {
                    return Err(ScsiError::ReservationConflict);
                }
                // "b) if the SERVICE ACTION RESERVATION KEY field contains zero, the device
                // server shall take no action and complete the command with GOOD status".
                if sa_key == 0 {
                    return Ok(());
                }
                if self.registrations.len() >= MAX_REGISTRATIONS {
                    return Err(ScsiError::InsufficientRegistrationResources);
                }
                self.registrations.push(Registration {
                    port: port.clone(),
                    key: sa_key,
                });
            }
            Some(i) => {
                // "If the I_T nexus has been registered: a) if the RESERVATION KEY field
                // [REGISTER only] does not match the registered reservation key, RESERVATION
                // CONFLICT".
                if !ignore && self.registrations[i].key != key {
                    return Err(ScsiError::ReservationConflict);
                }
                if sa_key == 0 {
                    // "c) ... zero: unregister the I_T nexus".
                    self.unregister(i, uas);
                } else {
                    // "b) ... not zero: replace the reservation key"; a reservation it holds
                    // is kept (its key changes with the registration).
                    self.registrations[i].key = sa_key;
                }
            }
        }
        self.bump();
        Ok(())
    }

    /// RESERVE (SPC-4 §5.12.8, "Reserving").
    fn reserve(&mut self, port: &ItNexus, key: u64, kind: PrType) -> Result<(), ScsiError> {
        self.check_key(port, key)?;
        match &self.persistent {
            None => {
                self.persistent = Some(Persistent {
                    holder: port.clone(),
                    kind,
                });
                Ok(())
            }
            // "If the device server receives a PERSISTENT RESERVE OUT command from an I_T
            // nexus ... that is the persistent reservation holder ... with the same TYPE and
            // SCOPE, the device server shall not alter the reservation and complete with GOOD".
            Some(p) if p.kind == kind && self.is_holder(port) => Ok(()),
            // "... a reservation with a different TYPE or SCOPE, or from an I_T nexus other
            // than the holder ... RESERVATION CONFLICT."
            Some(_) => Err(ScsiError::ReservationConflict),
        }
    }

    /// RELEASE (SPC-4 §5.12.11.2, "Releasing").
    fn release(
        &mut self,
        port: &ItNexus,
        key: u64,
        kind: PrType,
        uas: &mut Vec<(ItNexus, UnitAttention)>,
    ) -> Result<(), ScsiError> {
        self.check_key(port, key)?;
        let Some(p) = &self.persistent else {
            // "a) if no persistent reservation exists, GOOD".
            return Ok(());
        };
        // "b) if the I_T nexus is not a persistent reservation holder, GOOD" (nothing changes).
        if !self.is_holder(port) {
            return Ok(());
        }
        // "if the SCOPE and TYPE fields do not match the scope and type of the persistent
        // reservation, ... ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION".
        if p.kind != kind {
            return Err(ScsiError::InvalidReleaseOfPersistentReservation);
        }
        self.persistent = None;
        // "If the released persistent reservation is a registrants only type or all
        // registrants type, the device server shall establish a unit attention condition for
        // the initiator port associated with every registered I_T nexus other than I_T nexus
        // on which the PERSISTENT RESERVE OUT command with RELEASE service action was
        // received, with the additional sense code set to RESERVATIONS RELEASED."
        if kind.registrants_only() || kind.all_registrants() {
            for r in self.registrations.iter().filter(|r| r.port != *port) {
                uas.push((r.port.clone(), UnitAttention::ReservationsReleased));
            }
        }
        Ok(())
    }

    /// CLEAR (SPC-4 §5.12.11.3, "Clearing").
    fn clear(
        &mut self,
        port: &ItNexus,
        key: u64,
        uas: &mut Vec<(ItNexus, UnitAttention)>,
    ) -> Result<(), ScsiError> {
        self.check_key(port, key)?;
        // "a) release the persistent reservation, if any; b) remove all registrations; c)
        // ... establish a unit attention condition for the initiator port associated with
        // every registered I_T nexus other than the I_T nexus on which the PERSISTENT RESERVE
        // OUT command with CLEAR service action was received, with the additional sense code
        // set to RESERVATIONS PREEMPTED; and d) increment the PRgeneration value".
        for r in self.registrations.iter().filter(|r| r.port != *port) {
            uas.push((r.port.clone(), UnitAttention::ReservationsPreempted));
        }
        self.registrations.clear();
        self.persistent = None;
        self.bump();
        Ok(())
    }

    /// PREEMPT and PREEMPT AND ABORT (SPC-4 §5.12.11.4, "Preempting").
    fn preempt(
        &mut self,
        port: &ItNexus,
        key: u64,
        sa_key: u64,
        kind: PrType,
        uas: &mut Vec<(ItNexus, UnitAttention)>,
    ) -> Result<(), ScsiError> {
        self.check_key(port, key)?;
        let current = self.persistent.clone();
        match current {
            Some(p) if p.kind.all_registrants() && sa_key == 0 => {
                // §5.12.11.4.3: with an all-registrants reservation and a SERVICE ACTION
                // RESERVATION KEY of zero, remove every other registration and create the new
                // reservation for this I_T nexus.
                for r in self.registrations.iter().filter(|r| r.port != *port) {
                    uas.push((r.port.clone(), UnitAttention::RegistrationsPreempted));
                }
                self.registrations.retain(|r| r.port == *port);
                self.persistent = Some(Persistent {
                    holder: port.clone(),
                    kind,
                });
            }
            Some(p) if !p.kind.all_registrants() && self.reservation_key() == sa_key => {
                // §5.12.11.4.3: the key names the holder: "a) perform a registration removal
                // for all registrations identified by the SERVICE ACTION RESERVATION KEY
                // field, except the I_T nexus that is being used for the PERSISTENT RESERVE
                // OUT command; b) release the persistent reservation and establish a
                // persistent reservation for the preempting I_T nexus using the contents of
                // the SCOPE and TYPE fields".
                for r in self
                    .registrations
                    .iter()
                    .filter(|r| r.key == sa_key && r.port != *port)
                {
                    uas.push((r.port.clone(), UnitAttention::RegistrationsPreempted));
                }
                self.registrations
                    .retain(|r| r.key != sa_key || r.port == *port);
                // "c) ... if the type or scope has changed, then for every I_T nexus whose
                // reservation key was not removed, except for the I_T nexus on which the
                // PERSISTENT RESERVE OUT command was received, the device server shall
                // establish a unit attention condition ... RESERVATIONS RELEASED".
                if p.kind != kind {
                    for r in self.registrations.iter().filter(|r| r.port != *port) {
                        uas.push((r.port.clone(), UnitAttention::ReservationsReleased));
                    }
                }
                self.persistent = Some(Persistent {
                    holder: port.clone(),
                    kind,
                });
            }
            _ => {
                // §5.12.11.4.4, "Removing registrations": no reservation, an all-registrants
                // one with a non-zero key, or a key that does not name the holder. "If the
                // SERVICE ACTION RESERVATION KEY field is set to zero, the device server shall
                // terminate the command ... INVALID FIELD IN PARAMETER LIST."
                if sa_key == 0 {
                    return Err(ScsiError::param(8));
                }
                // "If the SERVICE ACTION RESERVATION KEY does not identify any registered I_T
                // nexus, RESERVATION CONFLICT."
                if !self.registrations.iter().any(|r| r.key == sa_key) {
                    return Err(ScsiError::ReservationConflict);
                }
                for r in self
                    .registrations
                    .iter()
                    .filter(|r| r.key == sa_key && r.port != *port)
                {
                    uas.push((r.port.clone(), UnitAttention::RegistrationsPreempted));
                }
                self.registrations.retain(|r| r.key != sa_key);
                // An all-registrants reservation ends with its last registrant.
                if self.registrations.is_empty() {
                    self.persistent = None;
                }
            }
        }
        self.bump();
        Ok(())
    }

    /// The access check of SPC-4 §5.12.1 table 66 ("SPC commands that are allowed in the
    /// presence of various reservations") and SBC-3 §4.17 table 13 (the SBC commands), and for
    /// SPC-2 reservations SPC-2 §5.5.1.
    fn check(&self, port: &ItNexus, opcode: u8, cdb: &[u8]) -> Result<(), ScsiError> {
        if let Some(holder) = &self.spc2 {
            // SPC-4 §5.12.3 ("Exceptions to SPC-2 RESERVE and RELEASE behavior"): while an
            // SPC-2 reservation exists, "all PERSISTENT RESERVE IN and all PERSISTENT RESERVE
            // OUT commands shall conflict regardless of initiator or service action and shall
            // terminate with a RESERVATION CONFLICT status."
            if matches!(
                opcode,
                op::PERSISTENT_RESERVE_IN | op::PERSISTENT_RESERVE_OUT
            ) {
                return Err(ScsiError::ReservationConflict);
            }
            // SPC-2 §5.5.1: other initiators may only run commands that cannot interfere with
            // the reservation (INQUIRY, REPORT LUNS, REQUEST SENSE) and RELEASE, which leaves
            // the reservation in place (SPC-2 §7.23).
            if *holder != *port
                && !matches!(
                    opcode,
                    op::INQUIRY
                        | op::REPORT_LUNS
                        | op::REQUEST_SENSE
                        | op::RELEASE_6
                        | op::RELEASE_10
                )
            {
                return Err(ScsiError::ReservationConflict);
            }
            return Ok(());
        }
        let Some(p) = &self.persistent else {
            return Ok(());
        };
        let access = access_class(opcode, cdb);
        if access == Access::Unrestricted {
            return Ok(());
        }
        // Write Exclusive / Exclusive Access: only the holder has access. Registrants-only
        // and all-registrants types: every registered I_T nexus has access.
        let allowed = if p.kind.registrants_only() || p.kind.all_registrants() {
            self.registration(port).is_some()
        } else {
            p.holder == *port
        };
        if allowed || (access == Access::Read && !p.kind.exclusive_access()) {
            return Ok(());
        }
        Err(ScsiError::ReservationConflict)
    }
}

/// How a command is treated in the presence of a persistent reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Allowed under every reservation type.
    Unrestricted,
    /// Reads the medium (or mode data): allowed under the Write Exclusive types.
    Read,
    /// Everything else: allowed only with access under the reservation's type.
    Write,
}

fn access_class(opcode: u8, cdb: &[u8]) -> Access {
    match opcode {
        // SPC-4 table 66 / SBC-3 table 13: "Allowed" in every column. RESERVE and RELEASE
        // decide for themselves (they conflict while registrations exist).
        op::INQUIRY
        | op::REPORT_LUNS
        | op::REQUEST_SENSE
        | op::TEST_UNIT_READY
        | op::PERSISTENT_RESERVE_IN
        | op::PERSISTENT_RESERVE_OUT
        | op::MAINTENANCE_IN
        | op::READ_CAPACITY_10
        | op::SERVICE_ACTION_IN_16
        | op::RESERVE_6
        | op::RESERVE_10
        | op::RELEASE_6
        | op::RELEASE_10 => Access::Unrestricted,
        // SBC-3 table 13: PREVENT ALLOW MEDIUM REMOVAL with PREVENT 00b is allowed.
        op::PREVENT_ALLOW_MEDIUM_REMOVAL if cdb.get(4).is_some_and(|b| b & 0x03 == 0) => {
            Access::Unrestricted
        }
        // SBC-3 table 13: START STOP UNIT with START=1 and POWER CONDITION 0h is allowed.
        op::START_STOP_UNIT if cdb.get(4).is_some_and(|b| b & 0xF1 == 0x01) => Access::Unrestricted,
        op::READ_6
        | op::READ_10
        | op::READ_12
        | op::READ_16
        | op::VERIFY_10
        | op::VERIFY_12
        | op::VERIFY_16
        | op::PRE_FETCH_10
        | op::PRE_FETCH_16
        | op::MODE_SENSE_6
        | op::MODE_SENSE_10 => Access::Read,
        _ => Access::Write,
    }
}

impl LuState {
    /// The I_T nexus of session `nexus`; one of its own for a session that never called
    /// [`LogicalUnit::add_nexus`].
    pub(super) fn port(&self, nexus: u64) -> ItNexus {
        match self.ports.get(&nexus) {
            Some(p) => p.clone(),
            None => ItNexus::new(&format!("nexus-{nexus}"), 1),
        }
    }

    /// Queues each unit attention for every live session of its initiator port (SPC-4:
    /// "for the initiator port associated with" the I_T nexus). A port with no session
    /// misses it, as a nexus that does not exist cannot be told.
    fn raise_for_ports(&mut self, uas: Vec<(ItNexus, UnitAttention)>) {
        for (port, ua) in uas {
            for (nexus, p) in &self.ports {
                if *p == port {
                    if let Some(q) = self.ua.get_mut(nexus) {
                        push_ua(q, ua);
                    }
                }
            }
        }
    }
}

impl LogicalUnit {
    /// Fails with RESERVATION CONFLICT when a reservation keeps `nexus` from running the
    /// command. Called only while the `reserved` flag is set.
    pub(crate) fn check_reservation(
        &self,
        nexus: u64,
        opcode: u8,
        cdb: &[u8],
    ) -> Result<(), ScsiError> {
        let st = self.lock();
        let port = st.port(nexus);
        st.res.check(&port, opcode, cdb)
    }

    pub(super) fn refresh_reserved(&self, st: &LuState) {
        self.reserved.store(st.res.any(), Ordering::Release);
    }

    /// PERSISTENT RESERVE IN (SPC-4 §6.15).
    pub(crate) fn persistent_reserve_in(&self, cdb: &[u8]) -> Result<Bytes, ScsiError> {
        let c = cdb::fixed::<10>(cdb)?;
        let alloc = usize::from(be16([c[7], c[8]]));
        let st = self.lock();
        let r = &st.res;
        let mut d = Vec::with_capacity(64);
        d.extend_from_slice(&r.generation.to_be_bytes());
        match c[1] & 0x1F {
            // §6.15.2 READ KEYS: PRGENERATION, ADDITIONAL LENGTH, the keys. "The ADDITIONAL
            // LENGTH field ... is not altered based on the allocation length."
            prin::READ_KEYS => {
                // At most MAX_REGISTRATIONS * 8 bytes: fits.
                let len = (r.registrations.len() * 8) as u32;
                d.extend_from_slice(&len.to_be_bytes());
                for reg in &r.registrations {
                    d.extend_from_slice(&reg.key.to_be_bytes());
                }
            }
            // §6.15.3 READ RESERVATION: with a reservation, a 16-byte descriptor of key, scope
            // and type.
            prin::READ_RESERVATION => match &r.persistent {
                None => d.extend_from_slice(&0u32.to_be_bytes()),
                Some(p) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    d.extend_from_slice(&r.reservation_key().to_be_bytes());
                    d.extend_from_slice(&[0; 4]); // obsolete
                    d.push(0); // reserved
                    d.push(p.kind.code()); // SCOPE 0h (LU_SCOPE), TYPE
                    d.extend_from_slice(&[0; 2]); // obsolete
                }
            },
            // §6.15.4 REPORT CAPABILITIES: LENGTH 8; CRH=1 (we follow §5.12.3), SIP_C and
            // ATP_C zero, PTPL_C when the LU has a state file; TMV=1 with ALLOW COMMANDS 000b
            // (no information), PTPL_A when APTPL is in effect; every type in the mask.
            prin::REPORT_CAPABILITIES => {
                d.clear();
                d.extend_from_slice(&8u16.to_be_bytes());
                d.push(0x10 | u8::from(self.pr_file.is_some())); // CRH, PTPL_C
                d.push(0x80 | u8::from(r.aptpl)); // TMV, PTPL_A
                                                  // WR_EX_AR (7), EX_AC_RO (6), WR_EX_RO (5), EX_AC (3), WR_EX (1); EX_AC_AR (0).
                d.push(0x80 | 0x40 | 0x20 | 0x08 | 0x02);
                d.push(0x01);
                d.extend_from_slice(&[0; 2]);
            }
            // §6.15.5 READ FULL STATUS: one descriptor per registration with its TransportID.
            prin::READ_FULL_STATUS => {
                let mut body = Vec::new();
                for reg in &r.registrations {
                    let holder = r.is_holder(&reg.port);
                    body.extend_from_slice(&reg.key.to_be_bytes());
                    body.extend_from_slice(&[0; 4]);
                    body.push(u8::from(holder)); // ALL_TG_PT 0, R_HOLDER
                    body.push(match (&r.persistent, holder) {
                        (Some(p), true) => p.kind.code(),
                        _ => 0,
                    });
                    body.extend_from_slice(&[0; 4]);
                    // RELATIVE TARGET PORT IDENTIFIER: the nexus's target port (as in VPD
                    // page 83h).
                    body.extend_from_slice(&reg.port.target_port.to_be_bytes());
                    let tid = transport_id(&reg.port.initiator);
                    body.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    body.extend_from_slice(&tid);
                }
                let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
                d.extend_from_slice(&len.to_be_bytes());
                d.extend_from_slice(&body);
            }
            // §6.15.1: a reserved service action → INVALID FIELD IN CDB.
            _ => return Err(ScsiError::cdb_bit(1, 4)),
        }
        d.truncate(alloc);
        Ok(Bytes::from(d))
    }

    /// PERSISTENT RESERVE OUT (SPC-4 §6.16).
    pub(crate) fn persistent_reserve_out(
        &self,
        nexus: u64,
        cdb: &[u8],
        data: &DataOut,
    ) -> Result<Bytes, ScsiError> {
        let c = cdb::fixed::<10>(cdb)?;
        let sa = c[1] & 0x1F;
        // REGISTER AND MOVE (07h) is optional and not offered; the rest are reserved.
        if sa > prout::REGISTER_AND_IGNORE_EXISTING_KEY {
            return Err(ScsiError::cdb_bit(1, 4));
        }
        let registering = matches!(
            sa,
            prout::REGISTER | prout::REGISTER_AND_IGNORE_EXISTING_KEY
        );
        // SCOPE and TYPE matter to RESERVE, RELEASE and the PREEMPTs (§6.16.2: ignored by
        // REGISTER, REGISTER AND IGNORE EXISTING KEY and CLEAR). Only LU_SCOPE (0h) exists in
        // SPC-4; an unknown TYPE is INVALID FIELD IN CDB.
        let kind = if registering || sa == prout::CLEAR {
            None
        } else {
            if c[2] >> 4 != 0 {
                return Err(ScsiError::cdb_bit(2, 7));
            }
            Some(PrType::from_code(c[2] & 0x0F).ok_or(ScsiError::cdb_bit(2, 3))?)
        };
        let param_len = be32([c[5], c[6], c[7], c[8]]) as usize;
        let list = data.contiguous(0, param_len.min(PR_OUT_LIST_LEN));
        // §6.16.3: SPEC_I_PT set with SIP_C zero → INVALID FIELD IN PARAMETER LIST (the list
        // would be longer than 24 bytes, so look before the length check).
        if list.len() > 20 && list[20] & 0x08 != 0 {
            return Err(ScsiError::param_bit(20, 3));
        }
        // "If the SPEC_I_PT bit is set to zero, ... the PARAMETER LIST LENGTH field shall be
        // set to 24 (i.e., 18h). If the parameter list length is not valid ... PARAMETER LIST
        // LENGTH ERROR." Likewise when less than that arrived.
        if param_len != PR_OUT_LIST_LEN || list.len() < PR_OUT_LIST_LEN {
            return Err(ScsiError::ParameterListLengthError);
        }
        let key = be64([
            list[0], list[1], list[2], list[3], list[4], list[5], list[6], list[7],
        ]);
        let sa_key = be64([
            list[8], list[9], list[10], list[11], list[12], list[13], list[14], list[15],
        ]);
        if registering {
            // ALL_TG_PT with ATP_C zero → INVALID FIELD IN PARAMETER LIST (§6.16.3).
            if list[20] & 0x04 != 0 {
                return Err(ScsiError::param_bit(20, 2));
            }
            // APTPL: "If a device server that does not support the APTPL bit value of one
            // receives that value in a REGISTER or a REGISTER AND IGNORE EXISTING KEY service
            // action, the device server shall terminate the command ... INVALID FIELD IN
            // PARAMETER LIST." Only a LU with a state file supports it (PTPL_C).
            if list[20] & 0x01 != 0 && self.pr_file.is_none() {
                return Err(ScsiError::param_bit(20, 0));
            }
        }
        let mut st = self.lock();
        let port = st.port(nexus);
        let mut uas = Vec::new();
        let before = st.res.clone();
        let r = &mut st.res;
        let result = match (sa, kind) {
            (prout::REGISTER, _) => r.register(&port, key, sa_key, false, &mut uas),
            (prout::REGISTER_AND_IGNORE_EXISTING_KEY, _) => {
                r.register(&port, key, sa_key, true, &mut uas)
            }
            (prout::CLEAR, _) => r.clear(&port, key, &mut uas),
            (prout::RESERVE, Some(kind)) => r.reserve(&port, key, kind),
            (prout::RELEASE, Some(kind)) => r.release(&port, key, kind, &mut uas),
            // PREEMPT AND ABORT also aborts the preempted nexuses' tasks: the transport's part.
            (prout::PREEMPT | prout::PREEMPT_AND_ABORT, Some(kind)) => {
                r.preempt(&port, key, sa_key, kind, &mut uas)
            }
            // Unreachable: every other service action was refused above or has a TYPE.
            _ => Err(ScsiError::cdb_bit(1, 4)),
        };
        if result.is_ok() && registering {
            // SPC-4 §5.14.5: the APTPL bit of the most recent successful REGISTER or
            // REGISTER AND IGNORE EXISTING KEY decides whether the state persists.
            r.aptpl = list[20] & 0x01 != 0;
        }
        // Saved before the command completes; a failed save undoes the command.
        if let (Ok(()), Some(file)) = (&result, &self.pr_file) {
            let saved = if r.aptpl {
                file.save(r)
            } else if before.aptpl {
                file.remove()
            } else {
                Ok(())
            };
            if let Err(e) = saved {
                tracing::error!(error = %e, "PERSISTENT RESERVE OUT not applied: its state could not be saved");
                st.res = before;
                return Err(ScsiError::InsufficientRegistrationResources);
            }
        }
        st.raise_for_ports(uas);
        self.refresh_reserved(&st);
        self.refresh_ua_pending(&st);
        result.map(|()| Bytes::new())
    }

    /// RESERVE(6) and RESERVE(10) (SPC-2 §7.21, §7.22): a logical unit reservation for this
    /// I_T nexus. Third-party reservations are not supported.
    pub(crate) fn reserve_spc2(&self, nexus: u64, cdb: &[u8]) -> Result<Bytes, ScsiError> {
        check_spc2_cdb(cdb)?;
        let mut st = self.lock();
        let port = st.port(nexus);
        // SPC-4 §5.12.3: while any I_T nexus is registered, "all RESERVE commands and all
        // RELEASE commands regardless of initiator shall conflict and shall terminate with a
        // RESERVATION CONFLICT status."
        if !st.res.registrations.is_empty() {
            return Err(ScsiError::ReservationConflict);
        }
        // SPC-2 §7.21.2: a reservation held by another initiator conflicts; the holder may
        // reserve again (superseding the reservation with the same one).
        match &st.res.spc2 {
            Some(h) if *h != port => return Err(ScsiError::ReservationConflict),
            _ => st.res.spc2 = Some(port),
        }
        self.refresh_reserved(&st);
        Ok(Bytes::new())
    }

    /// RELEASE(6) and RELEASE(10) (SPC-2 §7.23, §7.24).
    pub(crate) fn release_spc2(&self, nexus: u64, cdb: &[u8]) -> Result<Bytes, ScsiError> {
        check_spc2_cdb(cdb)?;
        let mut st = self.lock();
        let port = st.port(nexus);
        // SPC-4 §5.12.3, as for RESERVE.
        if !st.res.registrations.is_empty() {
            return Err(ScsiError::ReservationConflict);
        }
        // SPC-2 §7.23: releases the reservation of this initiator; "If a valid reservation
        // exists for an I_T nexus other than the one sending the RELEASE, the device server
        // shall return GOOD status without altering the reservation".
        if st.res.spc2.as_ref() == Some(&port) {
            st.res.spc2 = None;
        }
        self.refresh_reserved(&st);
        Ok(Bytes::new())
    }

    /// Drops the SPC-2 reservation held through `port` (I_T nexus loss), or any (`None`:
    /// LOGICAL UNIT RESET). Persistent reservations are not touched (SPC-4 §5.12.4).
    pub(super) fn release_spc2_for(&self, st: &mut LuState, port: Option<&ItNexus>) {
        if port.is_none() || st.res.spc2.as_ref() == port {
            st.res.spc2 = None;
        }
        self.refresh_reserved(st);
    }
}

/// RESERVE/RELEASE(10): the 3RDPTY bit asks for a third-party reservation, which we do not
/// support (INVALID FIELD IN CDB). The 6-byte forms carry only obsolete fields.
fn check_spc2_cdb(cdb: &[u8]) -> Result<(), ScsiError> {
    if matches!(cdb.first(), Some(&op::RESERVE_10) | Some(&op::RELEASE_10)) {
        let c = cdb::fixed::<10>(cdb)?;
        if c[1] & 0x10 != 0 {
            return Err(ScsiError::cdb_bit(1, 4));
        }
    }
    Ok(())
}

/// An iSCSI TransportID with ISID (SPC-4 §7.6.4.6, FORMAT CODE 01b, PROTOCOL IDENTIFIER 5h):
/// the initiator port name, NUL terminated and padded to a multiple of four bytes, at least
/// 20 bytes of it.
fn transport_id(port: &str) -> Vec<u8> {
    let mut name: Vec<u8> = port.as_bytes().iter().copied().take(1000).collect();
    name.push(0);
    while !name.len().is_multiple_of(4) || name.len() < 20 {
        name.push(0);
    }
    let mut t = Vec::with_capacity(4 + name.len());
    t.push(0x40 | 0x05);
    t.push(0);
    // At most 1020 bytes: fits in 16 bits.
    t.extend_from_slice(&(name.len() as u16).to_be_bytes());
    t.extend_from_slice(&name);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names() {
        assert_eq!(
            initiator_port(
                "IQN.2007-10.com.Example:x",
                &[0x80, 0x12, 0x34, 0x56, 0, 0x01]
            ),
            "iqn.2007-10.com.example:x,i,0x801234560001"
        );
    }

    #[test]
    fn transport_id_layout() {
        let t = transport_id("iqn.x,i,0x000000000001");
        assert_eq!(t[0], 0x45);
        let len = usize::from(u16::from_be_bytes([t[2], t[3]]));
        assert_eq!(len, t.len() - 4);
        assert_eq!(len % 4, 0);
        assert!(len >= 20);
        assert_eq!(&t[4..26], b"iqn.x,i,0x000000000001");
        assert_eq!(t[26], 0);
    }
}
