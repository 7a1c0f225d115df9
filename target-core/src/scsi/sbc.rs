//! Block commands (SBC-3): READ, WRITE, WRITE AND VERIFY, VERIFY, WRITE SAME, UNMAP,
//! COMPARE AND WRITE, ORWRITE, SYNCHRONIZE CACHE, PRE-FETCH, READ CAPACITY.

use bytes::Bytes;

use super::cdb::{self, be16, be24, be32, be64, op};
use super::{
    DataOut, LogicalUnit, ScsiError, MAX_COMPARE_AND_WRITE_BLOCKS, MAX_UNMAP_DESCRIPTORS,
    MAX_WRITE_SAME_BLOCKS, WRITE_SAME_NON_ZERO,
};

/// The LBA and length fields shared by the READ/WRITE/VERIFY/WRITE SAME/PRE-FETCH/
/// SYNCHRONIZE CACHE families, which place them identically per CDB size.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RwCdb {
    /// CDB byte 1 (protection field, DPO, FUA, ...); zero for 6-byte CDBs.
    pub flags: u8,
    pub lba: u64,
    /// Transfer length in blocks (READ(6)/WRITE(6): 0 already turned into 256).
    pub blocks: u32,
    /// CDB byte of the length field, for INVALID FIELD IN CDB field pointers.
    pub len_byte: u16,
}

impl RwCdb {
    pub fn parse(cdb: &[u8]) -> Result<RwCdb, ScsiError> {
        let opcode = cdb.first().copied().unwrap_or(0);
        let len = cdb::group_len(opcode).ok_or(ScsiError::InvalidOpcode)?;
        cdb::check_control(cdb, len)?;
        let rw = match len {
            6 => {
                let c = cdb::fixed::<6>(cdb)?;
                // SBC-3 §5.11 READ(6): "A TRANSFER LENGTH field set to zero specifies that 256
                // logical blocks shall be read." (§5.36 WRITE(6) likewise.)
                let blocks = if c[4] == 0 { 256 } else { u32::from(c[4]) };
                RwCdb {
                    flags: 0,
                    lba: u64::from(be24([c[1] & 0x1F, c[2], c[3]])),
                    blocks,
                    len_byte: 4,
                }
            }
            10 => {
                let c = cdb::fixed::<10>(cdb)?;
                RwCdb {
                    flags: c[1],
                    lba: u64::from(be32([c[2], c[3], c[4], c[5]])),
                    blocks: u32::from(be16([c[7], c[8]])),
                    len_byte: 7,
                }
            }
            12 => {
                let c = cdb::fixed::<12>(cdb)?;
                RwCdb {
                    flags: c[1],
                    lba: u64::from(be32([c[2], c[3], c[4], c[5]])),
                    blocks: be32([c[6], c[7], c[8], c[9]]),
                    len_byte: 6,
                }
            }
            _ => {
                let c = cdb::fixed::<16>(cdb)?;
                RwCdb {
                    flags: c[1],
                    lba: be64([c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9]]),
                    blocks: be32([c[10], c[11], c[12], c[13]]),
                    len_byte: 10,
                }
            }
        };
        Ok(rw)
    }

    /// RDPROTECT / WRPROTECT / VRPROTECT (byte 1 bits 7-5).
    ///
    /// SBC-3 §5.8 (READ(10)), table 58: with no protection information (our INQUIRY PROTECT
    /// bit is zero), "If the logical unit does not support protection information ... and the
    /// RDPROTECT field is not set to 000b, ... INVALID FIELD IN CDB."
    fn check_no_protect(&self) -> Result<(), ScsiError> {
        if self.flags >> 5 != 0 {
            return Err(ScsiError::cdb_bit(1, 7));
        }
        Ok(())
    }

    fn fua(&self) -> bool {
        self.flags & 0x08 != 0
    }
}

/// VERIFY BYTCHK (SBC-3 §5.33, table 94).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ByteCheck {
    /// 00b: medium verification only, no Data-Out.
    None,
    /// 01b: compare the whole Data-Out buffer with the medium.
    All,
    /// 11b: compare one block of Data-Out with every block of the range.
    OneBlock,
}

pub(crate) fn bytchk(flags: u8) -> Result<ByteCheck, ScsiError> {
    match (flags >> 1) & 0x03 {
        0 => Ok(ByteCheck::None),
        1 => Ok(ByteCheck::All),
        3 => Ok(ByteCheck::OneBlock),
        // 10b is reserved.
        _ => Err(ScsiError::cdb_bit(1, 2)),
    }
}

/// The offset of the first byte where `bufs` (concatenated) differs from `medium`.
fn first_mismatch<'a>(medium: &[u8], bufs: impl IntoIterator<Item = &'a [u8]>) -> Option<usize> {
    let mut pos = 0usize;
    for b in bufs {
        let m = medium.get(pos..)?;
        let n = b.len().min(m.len());
        if let Some(i) = b[..n].iter().zip(&m[..n]).position(|(x, y)| x != y) {
            return Some(pos + i);
        }
        pos += n;
    }
    None
}

impl LogicalUnit {
    /// SBC-3 §4.5 and each command's LBA check, e.g. §5.8 READ(10): "If the specified
    /// LOGICAL BLOCK ADDRESS ... and the TRANSFER LENGTH exceed the capacity of the medium,
    /// then the device server shall terminate the command with CHECK CONDITION status with the
    /// sense key set to ILLEGAL REQUEST and the additional sense code set to LOGICAL BLOCK
    /// ADDRESS OUT OF RANGE." Checked without overflow: an LBA near 2^64 never wraps.
    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), ScsiError> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.num_blocks() => Ok(()),
            _ => Err(ScsiError::LbaOutOfRange),
        }
    }

    /// Byte offset and length of a range already checked by [`Self::check_range`].
    fn byte_range(&self, lba: u64, blocks: u64) -> Result<(u64, usize), ScsiError> {
        self.check_range(lba, blocks)?;
        let off = lba
            .checked_mul(u64::from(self.block_size))
            .ok_or(ScsiError::LbaOutOfRange)?;
        let len = blocks
            .checked_mul(u64::from(self.block_size))
            .and_then(|l| usize::try_from(l).ok())
            .ok_or(ScsiError::LbaOutOfRange)?;
        Ok((off, len))
    }

    /// Range and MAXIMUM TRANSFER LENGTH checks of a transfer.
    ///
    /// SBC-3 §6.5.3: "If a device server receives a request for a transfer length exceeding
    /// [MAXIMUM TRANSFER LENGTH], then the device server shall terminate the command with
    /// CHECK CONDITION status ... INVALID FIELD IN CDB."
    pub(crate) fn check_transfer(&self, rw: &RwCdb) -> Result<(), ScsiError> {
        self.check_range(rw.lba, u64::from(rw.blocks))?;
        if rw.blocks > self.max_transfer_blocks() {
            return Err(ScsiError::cdb(rw.len_byte));
        }
        Ok(())
    }

    /// READ(6/10/12/16). The store's buffer goes back as Data-In untouched.
    pub(crate) async fn read(&self, cdb: &[u8]) -> Result<Bytes, ScsiError> {
        let rw = RwCdb::parse(cdb)?;
        rw.check_no_protect()?;
        self.check_transfer(&rw)?;
        // SBC-3 §5.8: "A TRANSFER LENGTH field set to zero specifies that no logical blocks
        // shall be read. This condition shall not be considered an error."
        if rw.blocks == 0 {
            return Ok(Bytes::new());
        }
        let (off, len) = self.byte_range(rw.lba, u64::from(rw.blocks))?;
        self.store
            .read(off, len)
            .await
            .map_err(ScsiError::from_read)
    }

    /// WRITE(6/10/12/16) and, with `verify`, WRITE AND VERIFY(10/12/16). WRITE AND VERIFY
    /// writes FUA (the medium verification a store can give); with BYTCHK=1 it then reads the
    /// blocks back and compares them with the Data-Out buffer.
    pub(crate) async fn write(
        &self,
        cdb: &[u8],
        data: DataOut,
        verify: bool,
    ) -> Result<(), ScsiError> {
        let rw = RwCdb::parse(cdb)?;
        rw.check_no_protect()?;
        // SBC-3 §5.40 WRITE AND VERIFY(10): "If the byte check (BYTCHK) bit is set to one,
        // the device server shall perform a byte-by-byte comparison of the data transferred
        // from the Data-Out Buffer with the data written to the medium", and on a miscompare
        // terminate with "MISCOMPARE DURING VERIFY OPERATION".
        let byte_check = verify && rw.flags & 0x02 != 0;
        // SBC-3 §6.4.1: the WP bit we report in MODE SENSE "set to one specifies that the
        // medium is write-protected"; writes end in DATA PROTECT, WRITE PROTECTED (27h/00h).
        if self.write_protected() {
            return Err(ScsiError::WriteProtected);
        }
        self.check_transfer(&rw)?;
        // SBC-3 §5.37: "A TRANSFER LENGTH field set to zero specifies that no logical blocks
        // shall be transferred. This condition shall not be considered an error."
        let (off, want) = self.byte_range(rw.lba, u64::from(rw.blocks))?;
        // The initiator may have sent less (iSCSI EDTL < transfer length): write the whole
        // blocks we have and let the transport report the residual.
        let have = data.len.min(want);
        let len = have - have % self.block_size as usize;
        if len == 0 {
            return Ok(());
        }
        let bufs = data.take(len);
        let fua = rw.fua() || verify || !self.wce();
        let compare = byte_check.then(|| bufs.clone());
        self.store
            .write(off, bufs, fua)
            .await
            .map_err(ScsiError::from_write)?;
        if let Some(sent) = compare {
            let medium = self
                .store
                .read(off, len)
                .await
                .map_err(ScsiError::from_read)?;
            if let Some(o) = first_mismatch(&medium, sent.iter().map(|b| &b[..])) {
                return Err(ScsiError::Miscompare { offset: o as u64 });
            }
        }
        Ok(())
    }

    /// VERIFY(10/12/16).
    pub(crate) async fn verify(&self, cdb: &[u8], data: &DataOut) -> Result<Bytes, ScsiError> {
        let rw = RwCdb::parse(cdb)?;
        rw.check_no_protect()?;
        let check = bytchk(rw.flags)?;
        self.check_transfer(&rw)?;
        // SBC-3 §5.33: "A VERIFICATION LENGTH field set to zero specifies that no logical
        // blocks shall be verified. This condition shall not be considered an error."
        if rw.blocks == 0 {
            return Ok(Bytes::new());
        }
        let (off, len) = self.byte_range(rw.lba, u64::from(rw.blocks))?;
        // Medium verification: the read itself is the check (a failing store read is
        // MEDIUM ERROR).
        let medium = self
            .store
            .read(off, len)
            .await
            .map_err(ScsiError::from_read)?;
        let bs = self.block_size as usize;
        let mismatch = match check {
            ByteCheck::None => None,
            // SBC-3 §5.33: "If the BYTCHK field is set to 01b ... the device server shall
            // compare the data read from the medium with the data transferred from the
            // Data-Out Buffer. If the comparison is unsuccessful ... MISCOMPARE DURING VERIFY
            // OPERATION" with the INFORMATION field set to the offset of the first miscompare.
            ByteCheck::All => {
                let have = data.len.min(len);
                let bufs = data.bufs.iter().map(|b| &b[..]);
                first_mismatch(&medium[..have], bufs)
            }
            ByteCheck::OneBlock => {
                let block = data.contiguous(0, bs);
                if block.len() < bs {
                    return Err(ScsiError::ParameterListLengthError);
                }
                medium
                    .chunks(bs)
                    .enumerate()
                    .find_map(|(i, m)| first_mismatch(m, [&block[..]]).map(|o| i * bs + o))
            }
        };
        match mismatch {
            Some(offset) => Err(ScsiError::Miscompare {
                offset: offset as u64,
            }),
            None => Ok(Bytes::new()),
        }
    }

    /// SYNCHRONIZE CACHE(10/16): range checked, then the whole store is flushed.
    pub(crate) async fn synchronize_cache(&self, cdb: &[u8]) -> Result<Bytes, ScsiError> {
        let rw = RwCdb::parse(cdb)?;
        // SBC-3 §5.22: "If the LOGICAL BLOCK ADDRESS field plus the NUMBER OF LOGICAL BLOCKS
        // field exceeds the capacity of the medium, then the device server shall terminate
        // the command ... LOGICAL BLOCK ADDRESS OUT OF RANGE." (Zero blocks = to the end.)
        self.check_range(rw.lba, u64::from(rw.blocks))?;
        self.store.flush().await.map_err(ScsiError::from_write)?;
        Ok(Bytes::new())
    }

    /// PRE-FETCH(10/16): range checked; nothing to prefetch into, so GOOD (SBC-3 §5.9: GOOD
    /// when the cache cannot hold the range, CONDITION MET when it will).
    pub(crate) fn pre_fetch(&self, cdb: &[u8]) -> Result<Bytes, ScsiError> {
        let rw = RwCdb::parse(cdb)?;
        self.check_range(rw.lba, u64::from(rw.blocks))?;
        Ok(Bytes::new())
    }

    /// READ CAPACITY(10) (SBC-3 §5.15).
    pub(crate) fn read_capacity_10(&self, cdb: &[u8]) -> Result<Bytes, ScsiError> {
        let c = cdb::fixed::<10>(cdb)?;
        let lba = be32([c[2], c[3], c[4], c[5]]);
        // SBC-3 §5.15: "If the PMI bit is set to zero and the LOGICAL BLOCK ADDRESS field is
        // not set to zero, the device server shall terminate the command ... INVALID FIELD IN
        // CDB."
        if c[8] & 0x01 == 0 && lba != 0 {
            return Err(ScsiError::cdb(2));
        }
        // "If the number of logical blocks exceeds the maximum value that is able to be
        // specified in the RETURNED LOGICAL BLOCK ADDRESS field, the device server shall set
        // the RETURNED LOGICAL BLOCK ADDRESS field to FFFF_FFFFh."
        let last = u32::try_from(self.num_blocks() - 1).unwrap_or(u32::MAX);
        let mut d = [0u8; 8];
        d[..4].copy_from_slice(&last.to_be_bytes());
        d[4..].copy_from_slice(&self.block_size.to_be_bytes());
        Ok(Bytes::copy_from_slice(&d))
    }

    /// SERVICE ACTION IN(16): READ CAPACITY(16) and, for a thin-provisioned LU, GET LBA
    /// STATUS.
    pub(crate) async fn service_action_in_16(&self, cdb: &[u8]) -> Result<Bytes, ScsiError> {
        let c = cdb::fixed::<16>(cdb)?;
        match c[1] & 0x1F {
            op::SA_READ_CAPACITY_16 => self.read_capacity_16(c),
            op::SA_GET_LBA_STATUS if self.store.supports_discard() => self.get_lba_status(c).await,
            _ => Err(ScsiError::cdb_bit(1, 4)),
        }
    }

    /// GET LBA STATUS (SBC-3 §5.7): one descriptor for the run of blocks from the starting
    /// LBA that share a state. Blocks that read as zero are reported deallocated: with LBPRZ=1
    /// a deallocated block reads as zero, so the answer cannot contradict a later read. The
    /// scan is bounded (1 MiB) to keep the command cheap.
    async fn get_lba_status(&self, c: &[u8; 16]) -> Result<Bytes, ScsiError> {
        let lba = be64([c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9]]);
        let alloc = be32([c[10], c[11], c[12], c[13]]) as usize;
        // SBC-3 §5.7: "If the STARTING LOGICAL BLOCK ADDRESS field is greater than the
        // logical block address of the last logical block on the logical unit, then the device
        // server shall terminate the command ... LOGICAL BLOCK ADDRESS OUT OF RANGE."
        if lba >= self.num_blocks() {
            return Err(ScsiError::LbaOutOfRange);
        }
        let left = self.num_blocks() - lba;
        // A file says where its holes are (SEEK_HOLE): one descriptor to the next change,
        // however far (SBC-3 §5.7: the descriptor covers "the number of contiguous logical
        // blocks" with the same status).
        if let Some((mapped, bytes)) = self.store.extent(lba << self.block_shift) {
            let run = (bytes >> self.block_shift).clamp(1, left.min(u64::from(u32::MAX)));
            return Ok(lba_status(lba, run as u32, !mapped, alloc));
        }
        const SCAN: u64 = 1 << 20;
        let scan = left.min(SCAN >> self.block_shift);
        let (off, len) = self.byte_range(lba, scan)?;
        let data = self
            .store
            .read(off, len)
            .await
            .map_err(ScsiError::from_read)?;
        let bs = self.block_size as usize;
        let is_zero = |b: &[u8]| b.iter().all(|&x| x == 0);
        let mut blocks = data.chunks(bs);
        let first_zero = blocks.next().is_some_and(is_zero);
        let run = 1 + blocks.take_while(|b| is_zero(b) == first_zero).count();
        Ok(lba_status(lba, run as u32, first_zero, alloc))
    }

    /// READ CAPACITY(16) (SBC-3 §5.16).
    fn read_capacity_16(&self, c: &[u8; 16]) -> Result<Bytes, ScsiError> {
        let alloc = be32([c[10], c[11], c[12], c[13]]) as usize;
        let mut d = [0u8; 32];
        d[..8].copy_from_slice(&(self.num_blocks() - 1).to_be_bytes());
        d[8..12].copy_from_slice(&self.block_size.to_be_bytes());
        // Byte 13: P_I_EXPONENT 0, LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT 0.
        // Byte 14: LBPME (bit 7) when the store deallocates, LBPRZ (bit 6): unmapped blocks
        // read as zero (SBC-3 §5.16.2).
        if self.store.supports_discard() {
            d[14] = 0x80 | 0x40;
        }
        Ok(Bytes::copy_from_slice(&d[..alloc.min(d.len())]))
    }

    /// WRITE SAME(10/16) (SBC-3 §5.45, §5.46).
    pub(crate) async fn write_same(&self, cdb: &[u8], data: &DataOut) -> Result<Bytes, ScsiError> {
        let is16 = cdb.first() == Some(&op::WRITE_SAME_16);
        let rw = RwCdb::parse(cdb)?;
        rw.check_no_protect()?;
        let unmap = rw.flags & 0x08 != 0;
        // With LBPWS/LBPWS10 zero (a store that cannot deallocate), UNMAP=1 is refused as
        // libiscsi expects (SBC-3 §5.45: the UNMAP bit requests deallocation).
        if unmap && !self.store.supports_discard() {
            return Err(ScsiError::cdb_bit(1, 3));
        }
        let ndob = is16 && rw.flags & 0x01 != 0;
        // SBC-3 §5.45: "If the ANCHOR bit is set to one and the ANC_SUP bit in the Logical
        // Block Provisioning VPD page is set to zero, then the device server shall terminate
        // the command ... INVALID FIELD IN CDB."
        if rw.flags & 0x10 != 0 {
            return Err(ScsiError::cdb_bit(1, 4));
        }
        // PBDATA and LBDATA (bits 2 and 1): not supported.
        if rw.flags & 0x06 != 0 {
            return Err(ScsiError::cdb_bit(1, 2));
        }
        // WRITE SAME(10) bit 0 is reserved.
        if !is16 && rw.flags & 0x01 != 0 {
            return Err(ScsiError::cdb_bit(1, 0));
        }
        if self.write_protected() {
            return Err(ScsiError::WriteProtected);
        }
        self.check_range(rw.lba, u64::from(rw.blocks))?;
        // SBC-3 §5.45: "A NUMBER OF LOGICAL BLOCKS field set to zero specifies that the device
        // server write all the logical blocks starting with the one specified in the LOGICAL
        // BLOCK ADDRESS field to the last logical block on the medium" (we report WSNZ=0 in
        // the Block Limits VPD page). The LBA must then name a block: LBA OUT OF RANGE if not.
        let blocks = if rw.blocks == 0 {
            // SBC-3 §6.5.3: "A WSNZ (write same non-zero) bit set to one indicates that the
            // device server does not support a value of zero in the NUMBER OF LOGICAL BLOCKS
            // field"; such a command ends in INVALID FIELD IN CDB.
            if WRITE_SAME_NON_ZERO {
                return Err(ScsiError::cdb(rw.len_byte));
            }
            if rw.lba >= self.num_blocks() {
                return Err(ScsiError::LbaOutOfRange);
            }
            self.num_blocks() - rw.lba
        } else {
            u64::from(rw.blocks)
        };
        // SBC-3 §6.5.3: more blocks than MAXIMUM WRITE SAME LENGTH (the explicit count or the
        // rest of the medium) → INVALID FIELD IN CDB.
        if blocks > MAX_WRITE_SAME_BLOCKS {
            return Err(ScsiError::cdb(rw.len_byte));
        }
        let bs = self.block_size as usize;
        let block = if ndob {
            None
        } else {
            let b = data.contiguous(0, bs);
            if b.len() < bs {
                // Less than one block of data arrived: nothing to write, as for WRITE.
                return Ok(Bytes::new());
            }
            Some(b)
        };
        let (off, len) = self.byte_range(rw.lba, blocks)?;
        let fua = !self.wce();
        match block {
            Some(b) if b.iter().any(|&x| x != 0) => {
                // Repeat the block: the same buffer referenced many times, no copies.
                const CHUNK: usize = 1 << 20;
                let per_chunk = (CHUNK / bs).max(1);
                let mut lba_off = off;
                // At most MAX_WRITE_SAME_BLOCKS (checked above): fits.
                let mut left = blocks as usize;
                while left > 0 {
                    let n = left.min(per_chunk);
                    let bufs = vec![b.clone(); n];
                    self.store
                        .write(lba_off, bufs, fua)
                        .await
                        .map_err(ScsiError::from_write)?;
                    lba_off += (n * bs) as u64;
                    left -= n;
                }
            }
            // Zero data. SBC-3 §5.45: with UNMAP=1 the device server may deallocate; our
            // LBPRZ=1 means deallocated blocks read as this same zero data.
            _ if unmap && self.store.supports_discard() => self
                .store
                .discard(off, len as u64)
                .await
                .map_err(ScsiError::from_write)?,
            _ => self
                .store
                .write_zeroes(off, len as u64)
                .await
                .map_err(ScsiError::from_write)?,
        }
        Ok(Bytes::new())
    }

    /// UNMAP (SBC-3 §5.28).
    pub(crate) async fn unmap(&self, cdb: &[u8], data: &DataOut) -> Result<Bytes, ScsiError> {
        let c = cdb::fixed::<10>(cdb)?;
        // SBC-3 §5.28: ANCHOR with ANC_SUP=0 → INVALID FIELD IN CDB.
        if c[1] & 0x01 != 0 {
            return Err(ScsiError::cdb_bit(1, 0));
        }
        if self.write_protected() {
            return Err(ScsiError::WriteProtected);
        }
        let param_len = usize::from(be16([c[7], c[8]]));
        // SBC-3 §5.28: "A PARAMETER LIST LENGTH field set to zero specifies that no data shall
        // be sent. This shall not be considered an error."
        if param_len == 0 {
            return Ok(Bytes::new());
        }
        // "If the PARAMETER LIST LENGTH field is set to a value greater than zero and less
        // than eight, then the device server shall terminate the command ... PARAMETER LIST
        // LENGTH ERROR."
        if param_len < 8 {
            return Err(ScsiError::ParameterListLengthError);
        }
        let list = data.contiguous(0, param_len);
        if list.len() < 8 {
            return Err(ScsiError::ParameterListLengthError);
        }
        let desc_len = usize::from(be16([list[2], list[3]]));
        // SBC-3 §5.28.2: block descriptors run to the smaller of the UNMAP BLOCK DESCRIPTOR
        // DATA LENGTH and what the list holds; "If the UNMAP BLOCK DESCRIPTOR DATA LENGTH is
        // not a multiple of 16, then the last UNMAP block descriptor is incomplete and shall
        // be ignored."
        let descs = list.get(8..).unwrap_or_default();
        let descs = &descs[..desc_len.min(descs.len())];
        let count = descs.len() / 16;
        // SBC-3 §5.28: more descriptors than MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT, or more
        // LBAs than MAXIMUM UNMAP LBA COUNT → INVALID FIELD IN PARAMETER LIST.
        if count > MAX_UNMAP_DESCRIPTORS as usize {
            return Err(ScsiError::param(2));
        }
        // MAXIMUM UNMAP LBA COUNT is FFFF_FFFFh (no limit), so only the ranges are checked.
        // Validate every descriptor before deallocating anything.
        for d in descs.chunks_exact(16) {
            let lba = be64([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
            let n = be32([d[8], d[9], d[10], d[11]]);
            // "If the LBA plus the NUMBER OF LOGICAL BLOCKS exceeds the capacity of the medium,
            // then the device server shall terminate the command ... LOGICAL BLOCK ADDRESS OUT
            // OF RANGE."
            self.check_range(lba, u64::from(n))?;
        }
        for d in descs.chunks_exact(16) {
            let lba = be64([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
            let n = be32([d[8], d[9], d[10], d[11]]);
            if n == 0 {
                continue;
            }
            let (off, len) = self.byte_range(lba, u64::from(n))?;
            self.store
                .discard(off, len as u64)
                .await
                .map_err(ScsiError::from_write)?;
        }
        Ok(Bytes::new())
    }

    /// COMPARE AND WRITE (SBC-3 §5.2). Serialised with other COMPARE AND WRITE commands.
    pub(crate) async fn compare_and_write(
        &self,
        cdb: &[u8],
        data: DataOut,
    ) -> Result<Bytes, ScsiError> {
        let c = cdb::fixed::<16>(cdb)?;
        let flags = c[1];
        if flags >> 5 != 0 {
            return Err(ScsiError::cdb_bit(1, 7));
        }
        if self.write_protected() {
            return Err(ScsiError::WriteProtected);
        }
        let lba = be64([c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9]]);
        let blocks = c[13];
        self.check_range(lba, u64::from(blocks))?;
        // SBC-3 §5.2: "A NUMBER OF LOGICAL BLOCKS field set to zero specifies that no read
        // operations shall be performed, no logical block data shall be transferred ..., and
        // no write operations shall be performed. This condition shall not be considered an
        // error."
        if blocks == 0 {
            return Ok(Bytes::new());
        }
        // "If the NUMBER OF LOGICAL BLOCKS field is larger than the value in the MAXIMUM
        // COMPARE AND WRITE LENGTH field ..., then the device server shall terminate the
        // command ... INVALID FIELD IN CDB."
        if blocks > MAX_COMPARE_AND_WRITE_BLOCKS {
            return Err(ScsiError::cdb(13));
        }
        let (off, len) = self.byte_range(lba, u64::from(blocks))?;
        // The Data-Out buffer holds the verify instance then the write instance.
        if data.len < 2 * len {
            return Err(ScsiError::ParameterListLengthError);
        }
        let compare = data.contiguous(0, len);
        let write = data.contiguous(len, len);
        let _guard = self.read_modify_write.lock().await;
        let medium = self
            .store
            .read(off, len)
            .await
            .map_err(ScsiError::from_read)?;
        // "If the comparison is unsuccessful, then the device server shall terminate the
        // command with CHECK CONDITION status with the sense key set to MISCOMPARE and the
        // additional sense code set to MISCOMPARE DURING VERIFY OPERATION", INFORMATION set to
        // the offset of the first differing byte.
        if let Some(o) = first_mismatch(&medium, [&compare[..]]) {
            return Err(ScsiError::Miscompare { offset: o as u64 });
        }
        let fua = flags & 0x08 != 0 || !self.wce();
        self.store
            .write(off, vec![write], fua)
            .await
            .map_err(ScsiError::from_write)?;
        Ok(Bytes::new())
    }
}

impl LogicalUnit {
    /// ORWRITE(16) (SBC-3, "ORWRITE (16) command"), the simple form: each byte of the Data-Out buffer is ORed
    /// into the medium. Read-modify-write under the LU's lock shared with COMPARE AND WRITE.
    pub(crate) async fn orwrite(&self, cdb: &[u8], data: DataOut) -> Result<Bytes, ScsiError> {
        let rw = RwCdb::parse(cdb)?;
        // ORPROTECT (byte 1 bits 7-5): without protection information "If the ORPROTECT field
        // is not set to 000b, ... INVALID FIELD IN CDB" (as RDPROTECT for READ).
        rw.check_no_protect()?;
        if self.write_protected() {
            return Err(ScsiError::WriteProtected);
        }
        self.check_transfer(&rw)?;
        // SBC-3 ORWRITE(16): "A TRANSFER LENGTH field set to zero specifies that no logical blocks
        // shall be transferred. This condition shall not be considered an error."
        let (off, want) = self.byte_range(rw.lba, u64::from(rw.blocks))?;
        // As WRITE: only whole blocks the initiator actually sent are written.
        let have = data.len.min(want);
        let len = have - have % self.block_size as usize;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let mask = data.contiguous(0, len);
        let _guard = self.read_modify_write.lock().await;
        let medium = self
            .store
            .read(off, len)
            .await
            .map_err(ScsiError::from_read)?;
        let merged: Vec<u8> = medium.iter().zip(mask.iter()).map(|(m, d)| m | d).collect();
        let fua = rw.fua() || !self.wce();
        self.store
            .write(off, vec![Bytes::from(merged)], fua)
            .await
            .map_err(ScsiError::from_write)?;
        Ok(Bytes::new())
    }
}

/// GET LBA STATUS parameter data with one descriptor (SBC-3 §5.7.2): `blocks` from `lba`,
/// deallocated or mapped, cut to `alloc` bytes.
fn lba_status(lba: u64, blocks: u32, deallocated: bool, alloc: usize) -> Bytes {
    let mut d = [0u8; 24];
    // PARAMETER DATA LENGTH: n - 3 of the 4-byte field, i.e. 20 for one descriptor.
    d[..4].copy_from_slice(&20u32.to_be_bytes());
    d[8..16].copy_from_slice(&lba.to_be_bytes());
    d[16..20].copy_from_slice(&blocks.to_be_bytes());
    // PROVISIONING STATUS: 0h mapped, 1h deallocated.
    d[20] = u8::from(deallocated);
    Bytes::copy_from_slice(&d[..alloc.min(d.len())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatch_offsets() {
        let m = [1u8, 2, 3, 4, 5];
        assert_eq!(first_mismatch(&m, [&[1u8, 2][..], &[3, 4, 5][..]]), None);
        assert_eq!(first_mismatch(&m, [&[1u8, 2][..], &[3, 9][..]]), Some(3));
        assert_eq!(first_mismatch(&m, [&[7u8][..]]), Some(0));
        // Data beyond the medium is not compared.
        assert_eq!(first_mismatch(&m[..2], [&[1u8, 2, 9][..]]), None);
    }

    #[test]
    fn rw_cdb_fields() {
        let r = RwCdb::parse(&[0x08, 0x1F, 0xFF, 0xFF, 0, 0]).unwrap();
        assert_eq!((r.lba, r.blocks), (0x1F_FFFF, 256));
        let r = RwCdb::parse(&[0x88, 0x08, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 1, 0, 0, 0]).unwrap();
        assert_eq!(
            (r.lba, r.blocks, r.fua()),
            (0x0102_0304_0506_0708, 256, true)
        );
        let r = RwCdb::parse(&[0xA8, 0, 0, 0, 0, 9, 0, 0, 0, 3, 0, 0]).unwrap();
        assert_eq!((r.lba, r.blocks, r.len_byte), (9, 3, 6));
        assert_eq!(
            RwCdb::parse(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0x04]).unwrap_err(),
            ScsiError::cdb_bit(9, 2)
        );
        assert_eq!(RwCdb::parse(&[0x28, 0, 0]).unwrap_err(), ScsiError::cdb(0));
    }
}
