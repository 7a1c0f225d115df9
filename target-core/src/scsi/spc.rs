//! Primary commands (SPC-4): INQUIRY and VPD pages, REPORT LUNS, MODE SENSE/SELECT,
//! REQUEST SENSE, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL; and the answers for a LUN
//! the target does not have.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use iscsi_proto::types::Lun;

use super::cdb::{self, be16, be32, op};
use super::sense::{Sense, UnitAttention, FIXED_SENSE_LEN};
use super::{
    DataOut, LogicalUnit, ScsiError, MAX_COMPARE_AND_WRITE_BLOCKS, MAX_UNMAP_DESCRIPTORS,
    MAX_UNMAP_LBA_COUNT, MAX_WRITE_SAME_BLOCKS,
};

/// PERIPHERAL DEVICE TYPE 00h: direct access block device.
const DEVICE_TYPE_DISK: u8 = 0x00;
/// Peripheral qualifier 011b with device type 1Fh (SPC-4 §6.4.2): "The device server is not
/// capable of supporting a peripheral device on this logical unit."
const NO_LUN_PERIPHERAL: u8 = 0x7F;

/// VPD pages we serve, in ascending order (SPC-4 §7.8.13: the supported pages list "shall
/// be in ascending order").
const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2];

/// Truncates a response to the ALLOCATION LENGTH (SPC-4 §4.2.5.6: "The device server shall
/// terminate transfers to the Data-In Buffer when the number of bytes specified by the
/// ALLOCATION LENGTH field have been transferred").
fn truncated(mut v: Vec<u8>, alloc: usize) -> Bytes {
    v.truncate(alloc);
    Bytes::from(v)
}

/// The standard INQUIRY data (SPC-4 §6.4.2) with `peripheral` in byte 0.
fn standard_inquiry(
    peripheral: u8,
    vendor: &[u8; 8],
    product: &[u8; 16],
    rev: &[u8; 4],
) -> Vec<u8> {
    let mut d = vec![0u8; 96];
    d[0] = peripheral;
    // VERSION 06h: SPC-4.
    d[2] = 0x06;
    // HISUP (bit 4): hierarchical LUN addressing; RESPONSE DATA FORMAT 2.
    d[3] = 0x10 | 0x02;
    d[4] = (d.len() - 5) as u8;
    // Byte 5: SCCS, ACC, TPGS 00b, 3PC, PROTECT all zero (a LU sets TPGS).
    // Byte 7: CMDQUE (bit 1).
    d[7] = 0x02;
    d[8..16].copy_from_slice(vendor);
    d[16..32].copy_from_slice(product);
    d[32..36].copy_from_slice(rev);
    // VERSION DESCRIPTORS (SPC-4 §6.4.2, codes from Annex E): SAM-5, iSCSI, SPC-4, SBC-3.
    for (i, v) in [0x00A0u16, 0x0960, 0x0460, 0x04C0].iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// One designation descriptor (SPC-4 §7.8.6.1): PROTOCOL IDENTIFIER / CODE SET,
/// PIV / ASSOCIATION / DESIGNATOR TYPE, length, designator.
fn designator(out: &mut Vec<u8>, proto_code_set: u8, piv_assoc_type: u8, d: &[u8]) {
    out.extend_from_slice(&[proto_code_set, piv_assoc_type, 0, d.len() as u8]);
    out.extend_from_slice(d);
}

/// A SCSI name string designator value (SPC-4 §7.8.6.11): UTF-8, null terminated, padded
/// with nulls to a multiple of four bytes, at most 256 bytes.
fn scsi_name(name: &str) -> Vec<u8> {
    let mut v: Vec<u8> = name.as_bytes().iter().copied().take(251).collect();
    v.push(0);
    while v.len() & 3 != 0 {
        v.push(0);
    }
    v
}

impl LogicalUnit {
    /// INQUIRY (SPC-4 §6.4).
    pub(crate) fn inquiry(&self, nexus: u64, cdb: &[u8]) -> Result<Bytes, ScsiError> {
        let c = cdb::fixed::<6>(cdb)?;
        let evpd = c[1] & 0x01 != 0;
        let alloc = usize::from(be16([c[3], c[4]]));
        // CMDDT (bit 1) is obsolete in SPC-4; we refuse it as tgtd and LIO do.
        if c[1] & 0x02 != 0 {
            return Err(ScsiError::cdb_bit(1, 1));
        }
        if !evpd {
            // SPC-4 §6.4.1: "If the EVPD bit is set to zero and the PAGE CODE field is not
            // set to zero, the device server shall terminate the command ... INVALID FIELD
            // IN CDB."
            if c[2] != 0 {
                return Err(ScsiError::cdb(2));
            }
            let id = &self.identity;
            let mut d = standard_inquiry(DEVICE_TYPE_DISK, &id.vendor, &id.product, &id.revision);
            // TPGS 01b (byte 5 bits 5..4): implicit asymmetric access only (SPC-4 §6.4.2,
            // table 146): REPORT TARGET PORT GROUPS is supported, SET TARGET PORT GROUPS not.
            d[5] |= 0x10;
            return Ok(truncated(d, alloc));
        }
        let page = c[2];
        let mut d = vec![DEVICE_TYPE_DISK, page, 0, 0];
        match page {
            // SPC-4 §7.8.13 Supported VPD Pages.
            0x00 => d.extend_from_slice(&VPD_PAGES),
            // SPC-4 §7.8.15 Unit Serial Number.
            0x80 => d.extend_from_slice(self.identity.serial.as_bytes()),
            // SPC-4 §7.8.6 Device Identification.
            0x83 => {
                let port = self.lock().port(nexus).target_port;
                self.device_identification(port, &mut d)
            }
            // SBC-3 §6.5.3 Block Limits.
            0xB0 => self.block_limits(&mut d),
            // SBC-3 §6.5.2 Block Device Characteristics: MEDIUM ROTATION RATE 0001h
            // (non-rotating medium), other fields zero.
            0xB1 => {
                d.resize(64, 0);
                d[5] = 0x01;
                // WABEREQ 01b (byte 7 bits 7..6): after SANITIZE BLOCK ERASE, reads return
                // GOOD (zeroes) without a write first.
                if self.store.supports_discard() {
                    d[7] = 0x40;
                }
            }
            // SBC-3 §6.5.4 Logical Block Provisioning.
            0xB2 => {
                d.resize(8, 0);
                if self.store.supports_discard() {
                    // LBPU (bit 7), LBPWS (6), LBPWS10 (5), LBPRZ (2).
                    d[5] = 0x80 | 0x40 | 0x20 | 0x04;
                    // PROVISIONING TYPE 010b: thin provisioned.
                    d[6] = 0x02;
                }
            }
            // SPC-4 §6.4.1: "If the device server does not implement the requested vital
            // product data page, then the device server shall terminate the command ...
            // INVALID FIELD IN CDB."
            _ => return Err(ScsiError::cdb(2)),
        }
        let page_len = (d.len() - 4) as u16;
        d[2..4].copy_from_slice(&page_len.to_be_bytes());
        Ok(truncated(d, alloc))
    }

    /// Device Identification for a command received through relative target port `port`
    /// (the session's TPGT).
    fn device_identification(&self, port: u16, d: &mut Vec<u8>) {
        let id = &self.identity;
        // NAA IEEE Registered Extended: code set 1 (binary), association 0 (LU), type 3 (NAA).
        designator(d, 0x01, 0x03, &id.naa);
        // T10 vendor ID: code set 2 (ASCII), association 0, type 1: vendor + serial.
        let mut t10 = id.vendor.to_vec();
        t10.extend_from_slice(id.serial.as_bytes());
        designator(d, 0x02, 0x01, &t10);
        let [hi, lo] = port.to_be_bytes();
        // Relative target port (SPC-4 §7.8.6.5): the TPGT. Protocol iSCSI (5h), code set 1,
        // PIV, association 1 (target port), type 4.
        designator(d, 0x51, 0x80 | 0x10 | 0x04, &[0, 0, hi, lo]);
        // Target port group (§7.8.6.6): the same number, see `alua.rs`. Code set 1,
        // association 1, type 5.
        designator(d, 0x01, 0x10 | 0x05, &[0, 0, hi, lo]);
        // SCSI name string of the target port (iSCSI: "<name>,t,0x<TPGT>"; SPC-4 §7.8.6.11,
        // the iSCSI target port name of RFC 7143), code set 3 (UTF-8), PIV, association 1, type 8.
        let name = format!("{},t,0x{port:04x}", id.target_iqn);
        designator(d, 0x53, 0x80 | 0x10 | 0x08, &scsi_name(&name));
        // SCSI name string of the target device: association 2.
        designator(d, 0x53, 0x80 | 0x20 | 0x08, &scsi_name(&id.target_iqn));
    }

    fn block_limits(&self, d: &mut Vec<u8>) {
        d.resize(64, 0);
        // WSNZ (SBC-3 §6.5.3): see WRITE_SAME_NON_ZERO.
        d[4] = u8::from(super::WRITE_SAME_NON_ZERO);
        d[5] = MAX_COMPARE_AND_WRITE_BLOCKS;
        // OPTIMAL TRANSFER LENGTH GRANULARITY: one block.
        d[6..8].copy_from_slice(&1u16.to_be_bytes());
        let max = self.max_transfer_blocks();
        d[8..12].copy_from_slice(&max.to_be_bytes());
        // OPTIMAL TRANSFER LENGTH: 1 MiB.
        let opt = (1u32 << 20) >> self.block_shift;
        d[12..16].copy_from_slice(&opt.to_be_bytes());
        // MAXIMUM PREFETCH LENGTH.
        d[16..20].copy_from_slice(&max.to_be_bytes());
        if self.store.supports_discard() {
            d[20..24].copy_from_slice(&MAX_UNMAP_LBA_COUNT.to_be_bytes());
            d[24..28].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
            // OPTIMAL UNMAP GRANULARITY: 4 KiB (hole punching works in pages).
            let gran = (4096u32 >> self.block_shift).max(1);
            d[28..32].copy_from_slice(&gran.to_be_bytes());
        }
        d[36..44].copy_from_slice(&MAX_WRITE_SAME_BLOCKS.to_be_bytes());
    }

    /// REQUEST SENSE (SPC-4 §6.29): a pending unit attention of this nexus is reported (and
    /// cleared) as sense data, otherwise NO SENSE.
    pub(crate) fn request_sense(&self, nexus: u64, cdb: &[u8]) -> Result<Bytes, ScsiError> {
        let c = cdb::fixed::<6>(cdb)?;
        let desc = c[1] & 0x01 != 0;
        let alloc = usize::from(c[4]);
        let sense = if self.ua_pending.load(Ordering::Acquire) {
            self.take_unit_attention(nexus)
                .map(UnitAttention::sense)
                .unwrap_or(Sense::NO_SENSE)
        } else {
            Sense::NO_SENSE
        };
        Ok(sense_data(&sense, desc, alloc))
    }

    /// MODE SENSE(6) and MODE SENSE(10) (SPC-4 §6.11, §6.12).
    pub(crate) fn mode_sense(&self, cdb: &[u8]) -> Result<Bytes, ScsiError> {
        let ten = cdb.first() == Some(&op::MODE_SENSE_10);
        let (flags, pc_page, subpage, alloc) = if ten {
            let c = cdb::fixed::<10>(cdb)?;
            (c[1], c[2], c[3], usize::from(be16([c[7], c[8]])))
        } else {
            let c = cdb::fixed::<6>(cdb)?;
            (c[1], c[2], c[3], usize::from(c[4]))
        };
        let dbd = flags & 0x08 != 0;
        let llbaa = ten && flags & 0x10 != 0;
        let pc = pc_page >> 6;
        let page = pc_page & 0x3F;
        // SPC-4 §6.11: "If the PC field is set to 11b (saved values) and saved values are not
        // implemented, the command shall be terminated ... SAVING PARAMETERS NOT SUPPORTED."
        if pc == 3 {
            return Err(ScsiError::SavingParametersNotSupported);
        }
        let mut pages = Vec::new();
        // Subpage 00h: the page itself; FFh: the page and all its subpages (we have none).
        // SPC-4 §6.11: an unsupported page or subpage → INVALID FIELD IN CDB.
        if subpage != 0x00 && subpage != 0xFF {
            return Err(ScsiError::cdb(3));
        }
        if page == 0x3F {
            for p in MODE_PAGES {
                self.mode_page(p, pc, &mut pages);
            }
        } else if MODE_PAGES.contains(&page) {
            self.mode_page(page, pc, &mut pages);
        } else {
            return Err(ScsiError::cdb_bit(2, 5));
        }
        // DEVICE-SPECIFIC PARAMETER (SBC-3 §6.4.1): WP (bit 7), DPOFUA (bit 4).
        let dsp = if self.write_protected() { 0x80 } else { 0 } | 0x10;
        let mut bd = Vec::new();
        if !dbd {
            if llbaa {
                // SBC-3 §6.4.2.3 long LBA block descriptor.
                bd.extend_from_slice(&self.num_blocks().to_be_bytes());
                bd.extend_from_slice(&[0; 4]);
                bd.extend_from_slice(&self.block_size.to_be_bytes());
            } else {
                // SBC-3 §6.4.2.2 short LBA block descriptor: "If the number of logical blocks
                // ... exceeds the maximum value ..., the NUMBER OF LOGICAL BLOCKS field shall
                // be set to FFFF_FFFFh."
                let n = u32::try_from(self.num_blocks()).unwrap_or(u32::MAX);
                bd.extend_from_slice(&n.to_be_bytes());
                bd.push(0);
                bd.extend_from_slice(&self.block_size.to_be_bytes()[1..]);
            }
        }
        let mut d = Vec::with_capacity(8 + bd.len() + pages.len());
        if ten {
            let total = 8 + bd.len() + pages.len();
            d.extend_from_slice(&((total - 2) as u16).to_be_bytes());
            d.extend_from_slice(&[0, dsp, u8::from(llbaa && !dbd), 0]);
            d.extend_from_slice(&(bd.len() as u16).to_be_bytes());
        } else {
            let total = 4 + bd.len() + pages.len();
            // MODE DATA LENGTH is one byte; our pages stay well under it.
            d.extend_from_slice(&[(total - 1).min(255) as u8, 0, dsp, bd.len() as u8]);
        }
        d.extend_from_slice(&bd);
        d.extend_from_slice(&pages);
        Ok(truncated(d, alloc))
    }

    /// Appends mode page `page` as PC `pc` (0 current, 1 changeable, 2 default) would show it.
    fn mode_page(&self, page: u8, pc: u8, out: &mut Vec<u8>) {
        let wce = match pc {
            0 => self.wce(),
            2 => super::DEFAULT_WCE,
            _ => false,
        };
        match page {
            // SBC-3 §6.4.5 Caching mode page: only WCE is changeable; RCD=0.
            0x08 => {
                let mut p = [0u8; 20];
                p[0] = 0x08;
                p[1] = 0x12;
                if pc == 1 || wce {
                    p[2] = 0x04;
                }
                out.extend_from_slice(&p);
            }
            // SPC-4 §7.5.8 Control mode page: TST 000b, D_SENSE 0, QUEUE ALGORITHM MODIFIER 1
            // (unrestricted reordering), QERR 00b, BUSY TIMEOUT PERIOD unlimited. SWP (byte 4
            // bit 3, software write protect) is the one changeable field.
            0x0A => {
                let mut p = [0u8; 12];
                p[0] = 0x0A;
                p[1] = 0x0A;
                if pc == 1 {
                    p[4] = 0x08;
                } else {
                    p[3] = 0x10;
                    p[8] = 0xFF;
                    p[9] = 0xFF;
                }
                if pc == 0 && self.swp.load(Ordering::Acquire) {
                    p[4] = 0x08;
                }
                out.extend_from_slice(&p);
            }
            // SPC-4 §7.5.11 Informational Exceptions Control mode page: all zero (MRIE 0, no
            // reporting). Nothing changeable.
            0x1C => {
                let mut p = [0u8; 12];
                p[0] = 0x1C;
                p[1] = 0x0A;
                out.extend_from_slice(&p);
            }
            _ => {}
        }
    }

    /// MODE SELECT(6) and MODE SELECT(10) (SPC-4 §6.9, §6.10). Only the caching page WCE bit
    /// can change; every other field must repeat its current value.
    pub(crate) fn mode_select(
        &self,
        nexus: u64,
        cdb: &[u8],
        data: &DataOut,
    ) -> Result<Bytes, ScsiError> {
        let ten = cdb.first() == Some(&op::MODE_SELECT_10);
        let (flags, param_len) = if ten {
            let c = cdb::fixed::<10>(cdb)?;
            (c[1], usize::from(be16([c[7], c[8]])))
        } else {
            let c = cdb::fixed::<6>(cdb)?;
            (c[1], usize::from(c[4]))
        };
        // SPC-4 §6.9: SP=1 with no saved pages implemented → ILLEGAL REQUEST, INVALID FIELD
        // IN CDB.
        if flags & 0x01 != 0 {
            return Err(ScsiError::cdb_bit(1, 0));
        }
        // "A PARAMETER LIST LENGTH field set to zero specifies that no data shall be
        // transferred. This shall not be considered an error."
        if param_len == 0 {
            return Ok(Bytes::new());
        }
        let list = data.contiguous(0, param_len);
        let hdr = if ten { 8 } else { 4 };
        // SPC-4 §6.9: a parameter list that truncates the header or a page →
        // PARAMETER LIST LENGTH ERROR.
        if list.len() < hdr {
            return Err(ScsiError::ParameterListLengthError);
        }
        let bd_len = if ten {
            usize::from(be16([list[6], list[7]]))
        } else {
            usize::from(list[3])
        };
        let long_lba = ten && list[4] & 0x01 != 0;
        let bd_end = hdr + bd_len;
        let Some(bd) = list.get(hdr..bd_end) else {
            return Err(ScsiError::ParameterListLengthError);
        };
        self.check_block_descriptor(bd, long_lba, hdr)?;
        let mut new_wce = None;
        let mut new_swp = None;
        let mut pos = bd_end;
        while pos < list.len() {
            let rest = &list[pos..];
            let (code, spf) = (rest[0] & 0x3F, rest[0] & 0x40 != 0);
            // We have no subpages: SPF=1 names a page we do not implement.
            if spf {
                return Err(ScsiError::param(pos as u16));
            }
            let Some(&plen) = rest.get(1) else {
                return Err(ScsiError::ParameterListLengthError);
            };
            let total = 2 + usize::from(plen);
            let Some(got) = rest.get(..total) else {
                return Err(ScsiError::ParameterListLengthError);
            };
            let mut current = Vec::new();
            let mut changeable = Vec::new();
            if MODE_PAGES.contains(&code) {
                self.mode_page(code, 0, &mut current);
                self.mode_page(code, 1, &mut changeable);
            }
            // SPC-4 §6.9: an unsupported page, a wrong PAGE LENGTH, or a change to a field
            // that is not changeable → INVALID FIELD IN PARAMETER LIST, pointing at it.
            if current.is_empty() {
                return Err(ScsiError::param(pos as u16));
            }
            if current.len() != total {
                return Err(ScsiError::param(pos as u16 + 1));
            }
            // Byte 0 bit 7 (PS) is reserved in MODE SELECT: ignore it.
            for i in 2..total {
                if (got[i] ^ current[i]) & !changeable[i] != 0 {
                    return Err(ScsiError::param((pos + i) as u16));
                }
            }
            if code == 0x08 {
                new_wce = Some(got[2] & 0x04 != 0);
            }
            if code == 0x0A {
                new_swp = Some(got[4] & 0x08 != 0);
            }
            pos += total;
        }
        let swp_changed = new_swp.is_some_and(|s| self.swp.swap(s, Ordering::AcqRel) != s);
        if swp_changed {
            self.raise_unit_attention(UnitAttention::ModeParametersChanged, Some(nexus));
        }
        if let Some(w) = new_wce {
            if self.wce.swap(w, Ordering::AcqRel) != w {
                // SPC-4 §6.9: when mode parameters change, "the device server shall establish a
                // unit attention condition ... for every I_T nexus except the I_T nexus on which
                // the MODE SELECT command was received" (MODE PARAMETERS CHANGED).
                self.raise_unit_attention(UnitAttention::ModeParametersChanged, Some(nexus));
            }
        }
        Ok(Bytes::new())
    }

    /// A block descriptor in MODE SELECT may only restate the current geometry (or give a
    /// zero block count, "no change").
    fn check_block_descriptor(&self, bd: &[u8], long: bool, at: usize) -> Result<(), ScsiError> {
        match (bd.len(), long) {
            (0, _) => Ok(()),
            (8, false) => {
                let n = be32([bd[0], bd[1], bd[2], bd[3]]);
                let cur = u32::try_from(self.num_blocks()).unwrap_or(u32::MAX);
                if n != 0 && n != cur {
                    return Err(ScsiError::param(at as u16));
                }
                let bl = u32::from_be_bytes([0, bd[5], bd[6], bd[7]]);
                if bl != self.block_size {
                    return Err(ScsiError::param((at + 5) as u16));
                }
                Ok(())
            }
            (16, true) => {
                let n =
                    u64::from_be_bytes([bd[0], bd[1], bd[2], bd[3], bd[4], bd[5], bd[6], bd[7]]);
                if n != 0 && n != self.num_blocks() {
                    return Err(ScsiError::param(at as u16));
                }
                if be32([bd[12], bd[13], bd[14], bd[15]]) != self.block_size {
                    return Err(ScsiError::param((at + 12) as u16));
                }
                Ok(())
            }
            // More than one descriptor, or a length that fits neither format.
            _ => Err(ScsiError::param((at - 2) as u16)),
        }
    }
}

/// Mode pages we implement, in the order MODE SENSE returns them for page 3Fh.
const MODE_PAGES: [u8; 3] = [0x08, 0x0A, 0x1C];

/// Sense data as REQUEST SENSE returns it, fixed or descriptor format.
fn sense_data(sense: &Sense, desc: bool, alloc: usize) -> Bytes {
    if desc {
        let (b, n) = sense.to_descriptor();
        Bytes::copy_from_slice(&b[..n.min(alloc)])
    } else {
        let b = sense.to_fixed();
        Bytes::copy_from_slice(&b[..FIXED_SENSE_LEN.min(alloc)])
    }
}

/// REPORT LUNS (SPC-4 §6.33) listing `luns`: the parameter data for `cdb`.
///
/// LUNs use single-level peripheral device addressing below 256 and flat space addressing up
/// to 16383 (SAM-5 §4.7); numbers beyond that are left out.
pub fn report_luns(cdb: &[u8], luns: &[u16]) -> Result<Bytes, ScsiError> {
    let c = cdb::fixed::<12>(cdb)?;
    let select = c[2];
    let alloc = be32([c[6], c[7], c[8], c[9]]) as usize;
    // SPC-4 §6.33: "The ALLOCATION LENGTH field ... If the ALLOCATION LENGTH field is less
    // than 16, the device server shall terminate the command ... INVALID FIELD IN CDB."
    if alloc < 16 {
        return Err(ScsiError::cdb(6));
    }
    let list: Vec<[u8; 8]> = match select {
        // 00h: logical units (no well-known LUNs); 02h: all. 01h: well-known only (none).
        0x00 | 0x02 => luns
            .iter()
            .filter_map(|&n| Lun::from_number(n).map(|l| l.0))
            .collect(),
        0x01 => Vec::new(),
        _ => return Err(ScsiError::cdb(2)),
    };
    let mut d = Vec::with_capacity(8 + 8 * list.len());
    d.extend_from_slice(&((8 * list.len()) as u32).to_be_bytes());
    d.extend_from_slice(&[0; 4]);
    for l in &list {
        d.extend_from_slice(l);
    }
    Ok(truncated(d, alloc))
}

/// START STOP UNIT (SBC-3 §5.25): accepted and ignored; a virtual disk has no motor or
/// medium to eject.
pub(crate) fn start_stop_unit(cdb: &[u8]) -> Result<Bytes, ScsiError> {
    cdb::fixed::<6>(cdb)?;
    Ok(Bytes::new())
}

/// PREVENT ALLOW MEDIUM REMOVAL (SBC-3 §5.10): 00b allow and 01b prevent are accepted (and
/// mean nothing for a fixed medium); 10b and 11b are obsolete (SPC-4 table 172), refused.
pub(crate) fn prevent_allow(cdb: &[u8]) -> Result<Bytes, ScsiError> {
    let c = cdb::fixed::<6>(cdb)?;
    if c[4] & 0x03 >= 2 {
        return Err(ScsiError::cdb_bit(4, 1));
    }
    Ok(Bytes::new())
}

/// Commands addressed to a LUN the target does not have (see [`super::execute_no_lun`]).
pub(crate) fn no_lun(cdb: &[u8], luns: &[u16]) -> Result<Bytes, ScsiError> {
    let Some(&opcode) = cdb.first() else {
        return Err(ScsiError::LunNotSupported);
    };
    match opcode {
        // SPC-4 §6.4.2: "peripheral qualifier 011b: The device server is not capable of
        // supporting a peripheral device on this logical unit. For this peripheral qualifier
        // the peripheral device type shall be set to 1Fh."
        op::INQUIRY => {
            let c = cdb::fixed::<6>(cdb)?;
            let alloc = usize::from(be16([c[3], c[4]]));
            if c[1] & 0x02 != 0 {
                return Err(ScsiError::cdb_bit(1, 1));
            }
            if c[1] & 0x01 != 0 {
                if c[2] != 0 {
                    return Err(ScsiError::cdb(2));
                }
                return Ok(truncated(vec![NO_LUN_PERIPHERAL, 0, 0, 1, 0], alloc));
            }
            if c[2] != 0 {
                return Err(ScsiError::cdb(2));
            }
            let d = standard_inquiry(NO_LUN_PERIPHERAL, b"KTGT    ", b"ktgt disk       ", b"    ");
            Ok(truncated(d, alloc))
        }
        op::REPORT_LUNS => report_luns(cdb, luns),
        // SPC-4 §6.29: REQUEST SENSE to an unsupported LUN returns parameter data with
        // ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (and GOOD status).
        op::REQUEST_SENSE => {
            let c = cdb::fixed::<6>(cdb)?;
            let sense = ScsiError::LunNotSupported.sense();
            Ok(sense_data(&sense, c[1] & 0x01 != 0, usize::from(c[4])))
        }
        _ => Err(ScsiError::LunNotSupported),
    }
}
