//! The write half of a connection: stamps sequence numbers and sends PDUs with vectored writes.
//!
//! StatSN is assigned here, in send order, so responses completed out of order by concurrent
//! commands still carry increasing StatSNs (RFC 7143 §4.2.2.2: "StatSN ... is incremented for
//! every response"). ExpCmdSN and MaxCmdSN are read from the session counters at send time.

use std::io::IoSlice;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use iscsi_proto::pdu::Header;
use iscsi_proto::types::{Itt, Sn};
use iscsi_proto::{Codec, Pdu};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// Command-window counters shared by the reader, the command tasks and the writer.
///
/// RFC 7143 §4.2.2.1: the target accepts non-immediate commands with ExpCmdSN <= CmdSN <=
/// MaxCmdSN and "MUST silently ignore" the others, so a MaxCmdSN once advertised must stay
/// valid: a command sent within it and refused later is lost for good at ErrorRecoveryLevel 0
/// (the initiator waits for it forever). Both numbers therefore only move forward, each on
/// its own: ExpCmdSN when the reader accepts a command, MaxCmdSN by one when a command gives
/// its slot back. The window never holds more than `queue_depth` unanswered commands (with
/// MaxCmdSN = ExpCmdSN + queue_depth - 1 when all are answered), and any (ExpCmdSN, MaxCmdSN)
/// pair read at any moment satisfies MaxCmdSN >= ExpCmdSN - 1.
///
/// Immediate commands "do not advance the CmdSN" (§3.2.2.1) and take no window slot; they
/// are counted apart and bounded by the queue depth too.
#[derive(Debug)]
pub struct Counters {
    /// Next expected CmdSN. Written by the connection task only.
    pub exp_cmd_sn: AtomicU32,
    /// Highest CmdSN the initiator may send. Only ever incremented.
    max_cmd_sn: AtomicU32,
    /// Immediate SCSI commands received and not yet answered.
    immediate: AtomicU32,
    /// Queue depth: the most commands an initiator may have outstanding.
    pub queue_depth: u32,
}

impl Counters {
    pub fn new(exp_cmd_sn: Sn, queue_depth: u32) -> Counters {
        let queue_depth = queue_depth.max(1);
        Counters {
            exp_cmd_sn: AtomicU32::new(exp_cmd_sn.0),
            max_cmd_sn: AtomicU32::new(exp_cmd_sn.0.wrapping_add(queue_depth - 1)),
            immediate: AtomicU32::new(0),
            queue_depth,
        }
    }

    /// (ExpCmdSN, MaxCmdSN). MaxCmdSN = ExpCmdSN - 1 means the window is closed.
    pub fn window(&self) -> (Sn, Sn) {
        // ExpCmdSN first: both only grow and ExpCmdSN <= MaxCmdSN + 1 at every moment, so a
        // MaxCmdSN read after ExpCmdSN keeps the pair consistent.
        let exp = Sn(self.exp_cmd_sn.load(Ordering::Acquire));
        let max = Sn(self.max_cmd_sn.load(Ordering::Acquire));
        (exp, max)
    }

    /// An accepted command's slot is free again (it was answered, aborted or refused).
    /// Must be called exactly once per command taken in, with the command's I bit.
    pub fn release(&self, immediate: bool) {
        if immediate {
            // Saturating: an inconsistent release must not open an unbounded count.
            let _ = self
                .immediate
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        } else {
            self.max_cmd_sn.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Takes a slot for an immediate command; false when `queue_depth` of them are already
    /// executing.
    pub fn take_immediate(&self) -> bool {
        let qd = self.queue_depth;
        self.immediate
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < qd).then_some(n + 1)
            })
            .is_ok()
    }
}

/// What the writer is asked to do.
#[derive(Debug)]
pub enum Out {
    /// Send these PDUs in order.
    Pdus(Vec<Pdu>),
    /// Send a command's answer in order, then give back the session read budget it held
    /// (the `read_budget` semaphore of `ffp::Conn`): the data is in the socket then, no longer
    /// in our buffers.
    Answer(Vec<Pdu>, Option<OwnedSemaphorePermit>),
    /// Send one PDU.
    Pdu(Pdu),
    /// Flush, then stop; the oneshot fires once everything before it was written.
    Close(tokio::sync::oneshot::Sender<()>),
}

/// Handle for sending PDUs to the writer task.
pub type OutTx = mpsc::Sender<Out>;

/// Sets StatSN, ExpCmdSN and MaxCmdSN in `h`. Returns whether StatSN advances.
fn stamp(h: &mut Header, stat_sn: Sn, exp: Sn, max: Sn) -> bool {
    match h {
        Header::ScsiResponse(r) => {
            (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (stat_sn, exp, max);
            true
        }
        Header::TaskMgmtResponse(r) => {
            (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (stat_sn, exp, max);
            true
        }
        Header::LogoutResponse(r) => {
            (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (stat_sn, exp, max);
            true
        }
        Header::TextResponse(r) => {
            (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (stat_sn, exp, max);
            true
        }
        Header::LoginResponse(r) => {
            (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (stat_sn, exp, max);
            true
        }
        Header::Reject(r) => {
            (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (stat_sn, exp, max);
            true
        }
        Header::AsyncMessage(r) => {
            (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (stat_sn, exp, max);
            true
        }
        Header::NopIn(r) => {
            (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (stat_sn, exp, max);
            // RFC 7143 §11.19.2: "when the Initiator Task Tag is set to 0xffffffff, the StatSN
            // for the connection is not advanced after this PDU is sent."
            r.itt != Itt::RESERVED
        }
        Header::DataIn(r) => {
            (r.exp_cmd_sn, r.max_cmd_sn) = (exp, max);
            // RFC 7143 §11.7.4: StatSN is only meaningful (and consumed) when S is set.
            if r.status_present {
                r.stat_sn = stat_sn;
                true
            } else {
                false
            }
        }
        Header::R2t(r) => {
            // RFC 7143 §11.8: "StatSN ... contains the next StatSN"; an R2T does not advance it.
            (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (stat_sn, exp, max);
            false
        }
        _ => false,
    }
}

/// Runs the writer until the channel closes or a `Close` is processed. Returns the I/O error
/// that ended it, if any.
pub async fn run<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Out>,
    codec: Codec,
    counters: Arc<Counters>,
    mut stat_sn: Sn,
) -> std::io::Result<()> {
    let mut scratch = BytesMut::with_capacity(16 * 1024);
    let mut segs: Vec<Bytes> = Vec::with_capacity(64);
    let mut pdus: Vec<Pdu> = Vec::with_capacity(64);
    let mut permits: Vec<OwnedSemaphorePermit> = Vec::new();
    loop {
        let Some(first) = rx.recv().await else {
            return Ok(());
        };
        let mut close = None;
        let mut push = |m: Out, pdus: &mut Vec<Pdu>| match m {
            Out::Pdus(v) => pdus.extend(v),
            Out::Answer(v, permit) => {
                pdus.extend(v);
                permits.extend(permit);
            }
            Out::Pdu(p) => pdus.push(p),
            Out::Close(tx) => close = Some(tx),
        };
        push(first, &mut pdus);
        // Coalesce what is already queued into one vectored write.
        while pdus.len() < 256 {
            match rx.try_recv() {
                Ok(m) => push(m, &mut pdus),
                Err(_) => break,
            }
        }
        let (exp, max) = counters.window();
        for mut pdu in pdus.drain(..) {
            if stamp(&mut pdu.header, stat_sn, exp, max) {
                stat_sn = stat_sn.add(1);
            }
            codec.encode_head(&pdu, &mut scratch);
            segs.push(scratch.split().freeze());
            if !pdu.data.is_empty() {
                segs.push(pdu.data.clone());
                codec.encode_tail(&pdu, &mut scratch);
                if !scratch.is_empty() {
                    segs.push(scratch.split().freeze());
                }
            }
        }
        write_all_vectored(&mut w, &mut segs).await?;
        permits.clear();
        if let Some(tx) = close {
            w.flush().await?;
            let _ = w.shutdown().await;
            let _ = tx.send(());
            return Ok(());
        }
    }
}

/// Writes every segment, handling partial writes. Empties `segs`.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    segs: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    let mut start = 0;
    while start < segs.len() {
        let n = {
            let mut slices = [IoSlice::new(&[]); 64];
            let mut k = 0;
            for (slot, seg) in slices.iter_mut().zip(&segs[start..]) {
                *slot = IoSlice::new(seg);
                k += 1;
            }
            w.write_vectored(&slices[..k]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        start = crate::parts::consume(segs, start, n);
    }
    segs.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_starts_at_queue_depth_and_moves_only_forward() {
        let c = Counters::new(Sn(u32::MAX - 1), 4);
        assert_eq!(c.window(), (Sn(u32::MAX - 1), Sn(1)));
        // Four commands accepted: the window closes (MaxCmdSN = ExpCmdSN - 1).
        for _ in 0..4 {
            let exp = c.exp_cmd_sn.load(Ordering::Relaxed);
            c.exp_cmd_sn.store(exp.wrapping_add(1), Ordering::Relaxed);
        }
        assert_eq!(c.window(), (Sn(2), Sn(1)));
        c.release(false);
        assert_eq!(c.window(), (Sn(2), Sn(2)));
        // Immediate commands neither take nor give window slots.
        assert!(c.take_immediate());
        c.release(true);
        c.release(true);
        assert_eq!(c.window(), (Sn(2), Sn(2)));
    }

    #[test]
    fn immediate_commands_are_bounded_by_queue_depth() {
        let c = Counters::new(Sn(1), 2);
        assert!(c.take_immediate());
        assert!(c.take_immediate());
        assert!(!c.take_immediate());
        c.release(true);
        assert!(c.take_immediate());
    }
}
