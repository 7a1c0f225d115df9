//! Full feature phase of one connection (RFC 7143 §4.2, §11): command window, write data
//! collection with R2T, Data-In sequences, task management, NOP, text, logout.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::{AbortHandle, Abortable};
use futures::stream::{FuturesUnordered, StreamExt};
use iscsi_proto::codec::ConnectionAction;
use iscsi_proto::negotiate::{SessionParams, SessionType};
use iscsi_proto::pdu::{
    tmf, tmf_response, AsyncMessage, DataIn, DataOut, Header, LogoutRequest, LogoutResponse, NopIn,
    NopOut, R2t, Reject, RejectReason, ScsiCommand, ScsiResponse, TaskMgmtRequest,
    TaskMgmtResponse, TextRequest, TextResponse, BHS_LEN,
};
use iscsi_proto::types::{Itt, Lun, Sn, Ttt};
use iscsi_proto::{Codec, DecodeError, Pdu};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::writer::{self, Counters, Out, OutTx};
use super::{new_handle, ConnectionContext, ConnectionError, LoggedIn};
use crate::events::{Notice, SessionEnd};
use crate::scsi::{self, LogicalUnit, ScsiError, ScsiResult, Sense, SenseKey};
use crate::table::{EndReason, SessionHandle, Target};

/// SCSI status GOOD (SAM-5 §5.3.1).
const GOOD: u8 = 0x00;
/// SCSI status CHECK CONDITION.
const CHECK_CONDITION: u8 = 0x02;
/// SCSI status TASK SET FULL (SAM-5 §5.3.1).
const TASK_SET_FULL: u8 = 0x28;

/// A CDB: the 16 bytes of the BHS, or those followed by an Extended CDB AHS (RFC 7143
/// §11.3.5). The common case stays inline, with no allocation.
enum Cdb {
    Short([u8; 16]),
    Long(Bytes),
}

impl std::ops::Deref for Cdb {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Cdb::Short(c) => c,
            Cdb::Long(b) => b,
        }
    }
}

/// A write command collecting its data.
struct WriteTask {
    cmd: ScsiCommand,
    lu: Option<Arc<LogicalUnit>>,
    cdb: Cdb,
    /// Bytes the command will consume: min(EDTL, what the CDB transfers).
    wanted: u32,
    /// Residual between EDTL and the CDB's transfer length.
    residual: Residual,
    /// The sense to answer once the data in flight has been drained, instead of executing.
    refuse: Option<(Sense, Residual)>,
    /// Data received so far, in buffer-offset order.
    bufs: Vec<Bytes>,
    received: u32,
    /// Unsolicited bytes still to come (immediate data counted already).
    unsolicited_left: u32,
    /// Next buffer offset of the unsolicited sequence.
    unsolicited_offset: u32,
    unsolicited_data_sn: u32,
    /// Offset up to which R2Ts have been sent.
    solicited_to: u32,
    /// Outstanding R2Ts: (TTT, offset, length, next expected offset, next DataSN).
    r2ts: VecDeque<R2tState>,
    r2t_sn: u32,
    /// Bytes of the session's solicitation budget this write holds (see [`WriteBudget`]);
    /// `None` until it is admitted and may be sent R2Ts.
    reserved: Option<u64>,
}

/// The session's bound on write data held in memory.
///
/// RFC 7143 bounds what one task may have in flight (FirstBurstLength unsolicited, §13.14;
/// MaxOutstandingR2T bursts of MaxBurstLength solicited, §13.17), and the command window bounds
/// the tasks (§4.2.2.1), but a write keeps what it received until it executes. So writes are
/// admitted to solicitation in arrival order, each reserving everything it still has to
/// solicit, while the reservations fit in queue_depth × MaxBurstLength × MaxOutstandingR2T;
/// with the unsolicited data (at most queue_depth × FirstBurstLength) a session holds at most
/// queue_depth × (FirstBurstLength + MaxBurstLength × MaxOutstandingR2T) bytes. A reservation
/// ends when the command has been answered.
///
/// # Caveats
/// A single write larger than the whole budget is admitted when it would be alone, so that it
/// can complete; it is bounded by the LU's MAXIMUM TRANSFER LENGTH instead.
struct WriteBudget {
    limit: u64,
    reserved: u64,
    /// Writes waiting for admission, oldest first.
    waiting: VecDeque<Itt>,
}

/// A command future that had to wait; it ends with its ITT and execution number.
type CommandFuture = std::pin::Pin<Box<dyn Future<Output = (Itt, u64)> + Send>>;

/// The connection's waiting commands (see [`Conn::pending`]).
type PendingSet = FuturesUnordered<Abortable<CommandFuture>>;

/// A command that had to wait, polled by the connection task among its [`Conn::pending`].
struct Running {
    lun: Lun,
    handle: AbortHandle,
    /// Tells this execution's [`TaskEvent::Done`] from a later command reusing the ITT.
    seq: u64,
    /// Set once the command's slot in the window has been given back (by the task when it
    /// answers, or by an abort) so that it is given back exactly once.
    answered: Arc<AtomicBool>,
    /// Bytes of the [`WriteBudget`] it holds.
    reserved: u64,
    /// The command's I bit: which kind of slot it holds (see [`Counters`]).
    immediate: bool,
}

impl Running {
    /// Gives the command's window slot back unless that already happened.
    fn release_slot(&self, counters: &Counters) {
        if !self.answered.swap(true, Ordering::AcqRel) {
            counters.release(self.immediate);
        }
    }
}

struct R2tState {
    ttt: Ttt,
    end: u32,
    next_offset: u32,
    next_data_sn: u32,
}

/// Residual of a command: (underflow, overflow) bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Residual {
    underflow: u32,
    overflow: u32,
}

/// Events from commands back to the connection.
enum TaskEvent {
    /// The execution `seq` of `Itt` finished and its response was queued.
    Done(Itt, u64),
}

struct Conn {
    ctx: ConnectionContext,
    params: SessionParams,
    peer: SocketAddr,
    local: SocketAddr,
    target: Option<Arc<Target>>,
    handle: Option<Arc<SessionHandle>>,
    out: OutTx,
    counters: Arc<Counters>,
    /// Commands that had to wait (an O_DIRECT read, a large copy, a flush), polled here: no
    /// task each, so a completion wakes just this connection's task. (In a `Mutex` only to
    /// make `Conn` `Sync`; it is reached through `get_mut`, never locked.)
    pending: std::sync::Mutex<PendingSet>,
    /// Commands executing, by ITT.
    running: HashMap<Itt, Running>,
    next_seq: u64,
    write_budget: WriteBudget,
    /// Write commands collecting data, by ITT.
    writes: HashMap<Itt, WriteTask>,
    /// Solicited transfers: TTT -> ITT.
    ttts: HashMap<Ttt, Itt>,
    next_ttt: u32,
    /// Non-immediate commands that arrived ahead of ExpCmdSN (held until the gap fills).
    held: BTreeMap<u32, Pdu>,
    /// Text responses waiting for the initiator to ask for the next part (TTT -> rest).
    text_continuations: HashMap<Ttt, Bytes>,
    /// The session's bound on read data held in memory, in bytes: a READ takes
    /// min(EDTL, limit) before it executes and gives it back once its Data-In is written to
    /// the socket. With an initiator that stops reading, its reads therefore stop at
    /// queue_depth × MaxBurstLength bytes (a single larger read runs alone) instead of
    /// queue_depth × the largest transfer; the semaphore is fair, so reads run in order.
    read_budget: Arc<tokio::sync::Semaphore>,
    read_budget_limit: u32,
    last_heard: Instant,
    /// When the connection next reports its incoming CPU (follow mode, `crate::workers`).
    next_follow: Instant,
    ping_outstanding: Option<Ttt>,
    /// The last command executed was answered inline (see `spawn_command`); busy polling
    /// is for those: a connection that waits on its store anyway (O_DIRECT, a slow disk)
    /// gains little from saving the wake-up for the next command.
    last_inline: bool,
    /// How the session ended, when the target or a Logout decided it.
    ended: Option<SessionEnd>,
}

pub(super) async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    ctx: ConnectionContext,
    rbuf: BytesMut,
    login: LoggedIn,
) -> Result<(), ConnectionError> {
    let LoggedIn {
        params,
        tsih,
        next_stat_sn,
        exp_cmd_sn,
    } = login;
    let codec = Codec {
        header_digest: params.header_digest,
        data_digest: params.data_digest,
        max_recv_data_segment_length: params.max_recv_data_segment_length,
    };
    let counters = Arc::new(Counters::new(exp_cmd_sn, ctx.options.queue_depth));
    let (rd, wr) = stream.into_split();
    let (out_tx, out_rx) = mpsc::channel::<Out>(1024);
    let writer = tokio::spawn(writer::run(
        wr,
        out_rx,
        codec.clone(),
        counters.clone(),
        next_stat_sn,
    ));

    let (target, handle) = if params.session_type == SessionType::Normal {
        let name = params.target_name.clone().unwrap_or_default();
        match ctx.table.target(&name) {
            Some(t) => {
                let h = new_handle(&ctx.table, &params, tsih, peer, local, ctx.tpgt);
                ctx.table.register_session(&t, h.clone());
                (Some(t), Some(h))
            }
            None => {
                // Removed between login and now.
                return Err(ConnectionError::Protocol("target removed during login"));
            }
        }
    } else {
        (None, None)
    };
    let ctx_queue_depth = ctx.options.queue_depth.max(1);
    let params_max_burst = params.max_burst_length.max(512);
    let params_max_r2t = params.max_outstanding_r2t.max(1);
    let read_budget_limit = ctx_queue_depth.saturating_mul(params_max_burst);
    let mut conn = Conn {
        ctx,
        params,
        peer,
        local,
        target,
        handle,
        out: out_tx,
        counters,
        pending: std::sync::Mutex::new(FuturesUnordered::new()),
        running: HashMap::new(),
        next_seq: 0,
        write_budget: WriteBudget {
            limit: u64::from(ctx_queue_depth)
                * u64::from(params_max_burst)
                * u64::from(params_max_r2t),
            reserved: 0,
            waiting: VecDeque::new(),
        },
        writes: HashMap::new(),
        ttts: HashMap::new(),
        next_ttt: 1,
        held: BTreeMap::new(),
        text_continuations: HashMap::new(),
        read_budget: Arc::new(tokio::sync::Semaphore::new(read_budget_limit as usize)),
        read_budget_limit,
        last_heard: Instant::now(),
        next_follow: Instant::now(),
        ping_outstanding: None,
        last_inline: false,
        ended: None,
    };
    let result = conn.serve(rd, rbuf, codec).await;
    conn.finish().await;
    let _ = writer.await;
    let end = conn.ended.unwrap_or(match &result {
        Ok(()) => SessionEnd::ConnectionClosed,
        Err(ConnectionError::NopTimeout(_)) => SessionEnd::NopTimeout,
        Err(_) => SessionEnd::ConnectionError,
    });
    if let (Some(t), Some(h)) = (&conn.target, &conn.handle) {
        conn.ctx.table.unregister_session(t, h.id);
        let events = crate::events::global();
        events.session_ended(&t.iqn, end);
        if end.is_drop() {
            events.notify(Notice::SessionDropped {
                target: t.iqn.clone(),
                initiator: conn.params.initiator_name.clone(),
                peer: conn.peer,
                end,
            });
        }
    }
    info!(
        peer = %conn.peer,
        initiator = %conn.params.initiator_name,
        target = conn.params.target_name.as_deref().unwrap_or("-"),
        reason = end.as_str(),
        "session ended"
    );
    result
}

/// Busy polling: when the socket has nothing, watches it for up to `limit` before the caller
/// sleeps on it. `Some`: the read finished (bytes read, 0 at end of stream); `None`: nothing
/// came.
///
/// At low queue depth a command's round trip is mostly wake-ups: the initiator wakes us, we
/// wake it. Sleeping in the reactor costs one of them, which on a VM (an idle vCPU halts)
/// is tens of microseconds. So the connection first lets its writer send what is queued,
/// then probes the socket with a non-blocking `MSG_PEEK` in a loop:
/// - between probes `sched_yield(2)`: when the initiator runs on this CPU (the scheduler
///   likes to put a waker and its wakee together), it gets the CPU at once;
/// - every 10 µs a yield to the thread's other tasks (which also polls the thread's reactor).
///
/// Data found is read directly (a non-blocking `read(2)` of up to 16 KiB; the rest, if
/// any, through the reactor as usual).
async fn read_polling(
    rd: &mut OwnedReadHalf,
    rbuf: &mut BytesMut,
    limit: Duration,
) -> Option<std::io::Result<usize>> {
    use std::io::ErrorKind::{Interrupted, WouldBlock};
    use std::mem::MaybeUninit;
    const TASK_YIELD: Duration = Duration::from_micros(10);
    let mut polled = poll_read_once(rd, rbuf).await;
    if polled.is_none() {
        tokio::task::yield_now().await;
        polled = poll_read_once(rd, rbuf).await;
    }
    if polled.is_some() {
        return polled;
    }
    // The wall clock, not tokio's (which a test may pause).
    let start = std::time::Instant::now();
    let mut task_yield = start;
    let sock = socket2::SockRef::from(rd.as_ref());
    loop {
        let mut probe = [MaybeUninit::<u8>::uninit(); 1];
        match sock.peek(&mut probe) {
            Ok(0) => return Some(Ok(0)),
            Ok(_) => match read_now(&sock, rbuf) {
                // Only this task reads the socket, so what the probe saw is still there.
                Err(e) if e.kind() == WouldBlock => {}
                r => return Some(r),
            },
            Err(e) if matches!(e.kind(), WouldBlock | Interrupted) => {}
            Err(e) => return Some(Err(e)),
        }
        let now = std::time::Instant::now();
        if now.duration_since(start) >= limit {
            return None;
        }
        std::thread::yield_now();
        if now.duration_since(task_yield) >= TASK_YIELD {
            tokio::task::yield_now().await;
            task_yield = std::time::Instant::now();
        }
    }
}

/// Polls one read through the reactor without waiting: `None` when it would wait.
async fn poll_read_once(
    rd: &mut OwnedReadHalf,
    rbuf: &mut BytesMut,
) -> Option<std::io::Result<usize>> {
    let mut read = std::pin::pin!(rd.read_buf(rbuf));
    match futures::poll!(read.as_mut()) {
        std::task::Poll::Ready(r) => Some(r),
        std::task::Poll::Pending => None,
    }
}

/// One non-blocking read of what the socket holds (at most 16 KiB) onto the end of `rbuf`.
///
/// Through a per-thread scratch buffer: reading into `rbuf`'s spare capacity directly would
/// need `unsafe`, and zeroing 16 KiB of it first costs more than copying the few bytes a
/// command usually is.
fn read_now(sock: &socket2::Socket, rbuf: &mut BytesMut) -> std::io::Result<usize> {
    use std::io::Read;
    const CHUNK: usize = 16 * 1024;
    thread_local! {
        static SCRATCH: std::cell::RefCell<Box<[u8]>> =
            std::cell::RefCell::new(vec![0; CHUNK].into_boxed_slice());
    }
    SCRATCH.with_borrow_mut(|scratch| {
        let mut reader = sock;
        let n = loop {
            match reader.read(scratch) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        rbuf.extend_from_slice(&scratch[..n]);
        Ok(n)
    })
}

/// When to busy-poll (see [`read_polling`]): always while polls find the next command;
/// after a poll that found nothing, the next 1, 3, 7 ... 63 waits sleep at once, so a
/// connection whose initiator pauses between commands costs at most one fruitless poll
/// per 64 waits.
#[derive(Debug, Default)]
struct PollBackoff {
    misses: u32,
    skip: u32,
}

impl PollBackoff {
    fn should_poll(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    fn found(&mut self) {
        self.misses = 0;
    }

    fn missed(&mut self) {
        self.misses = (self.misses + 1).min(6);
        self.skip = (1 << self.misses) - 1;
    }
}

impl Conn {
    async fn serve(
        &mut self,
        mut rd: OwnedReadHalf,
        mut rbuf: BytesMut,
        mut codec: Codec,
    ) -> Result<(), ConnectionError> {
        let cancel = self
            .handle
            .as_ref()
            .map(|h| h.cancel.clone())
            .unwrap_or_default();
        // Third-party aborts (another session's reset); a discovery session gets none.
        let handle = self.handle.clone();
        let no_aborts = crate::table::AbortRequests::default();
        let aborts = handle.as_deref().map_or(&no_aborts, |h| &h.aborts);
        let mut aborted = std::pin::pin!(aborts.posted());
        let shutdown = self.ctx.shutdown.clone();
        let mut tick =
            tokio::time::interval(Duration::from_secs(1).min(self.ctx.options.nop_interval));
        // Created once, not per loop turn: each creation registers with the token (a lock).
        let mut cancelled = std::pin::pin!(cancel.cancelled());
        let mut shutting_down = std::pin::pin!(shutdown.cancelled());
        let busy_poll = self.ctx.options.busy_poll;
        let mut backoff = PollBackoff::default();
        loop {
            // Decode everything already buffered before reading more.
            loop {
                match codec.decode(&mut rbuf) {
                    Ok(Some(pdu)) => {
                        self.last_heard = Instant::now();
                        if self.last_heard >= self.next_follow {
                            self.follow_initiator(&rd, busy_poll);
                        }
                        self.ping_outstanding = None;
                        if !self.handle_pdu(pdu).await? {
                            return Ok(());
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // The offending BHS is still at the front of the buffer (framing
                        // errors are found before the PDU is consumed).
                        let mut bhs = [0u8; BHS_LEN];
                        if let Some(front) = rbuf.get(..BHS_LEN) {
                            bhs.copy_from_slice(front);
                        }
                        self.decode_error(e, bhs).await?
                    }
                }
            }
            // Nothing executing: the connection is waiting for the initiator only.
            if !busy_poll.is_zero()
                && self.last_inline
                && self.pending_is_empty()
                && backoff.should_poll()
            {
                match read_polling(&mut rd, &mut rbuf, busy_poll).await {
                    Some(n) => {
                        backoff.found();
                        if n? == 0 {
                            debug!(peer = %self.peer, "peer closed the connection");
                            return Ok(());
                        }
                        continue;
                    }
                    None => backoff.missed(),
                }
            }
            tokio::select! {
                n = rd.read_buf(&mut rbuf) => {
                    if n? == 0 {
                        debug!(peer = %self.peer, "peer closed the connection");
                        return Ok(());
                    }
                }
                Some(done) = pending_next(&mut self.pending), if !self.pending_is_empty() => {
                    // `Err`: aborted by a task management function, already accounted for.
                    if let Ok((itt, seq)) = done {
                        self.task_event(TaskEvent::Done(itt, seq)).await;
                    }
                }
                _ = &mut aborted => {
                    aborted.set(aborts.posted());
                    for request in aborts.take() {
                        self.aborted_elsewhere(request);
                    }
                    self.admit_writes().await;
                }
                _ = &mut cancelled => {
                    let reason = self.handle.as_ref().and_then(|h| h.end_reason());
                    self.end_by_target(reason.unwrap_or(EndReason::Shutdown)).await;
                    return Ok(());
                }
                _ = &mut shutting_down => {
                    self.end_by_target(EndReason::Shutdown).await;
                    return Ok(());
                }
                _ = tick.tick() => self.keepalive().await?,
            }
        }
    }

    /// Follow mode (`crate::workers`): keeps this thread on the CPU the connection's packets
    /// arrive on while the initiator waits for each command in turn; lets go when the
    /// connection busy-polls or has several commands in flight. At most every
    /// [`FOLLOW_EVERY`](crate::workers::FOLLOW_EVERY).
    fn follow_initiator(&mut self, rd: &OwnedReadHalf, busy_poll: Duration) {
        self.next_follow = self.last_heard + crate::workers::FOLLOW_EVERY;
        if !crate::workers::following() {
            return;
        }
        let polls = !busy_poll.is_zero() && self.last_inline;
        let cpu = if polls || self.running.len() > 1 {
            None
        } else {
            crate::workers::incoming_cpu(rd.as_ref())
        };
        crate::workers::follow_incoming_cpu(cpu);
    }

    async fn task_event(&mut self, ev: TaskEvent) {
        match ev {
            TaskEvent::Done(itt, seq) => {
                if self.running.get(&itt).is_some_and(|r| r.seq == seq) {
                    self.forget_running(itt);
                    self.admit_writes().await;
                }
            }
        }
    }

    /// Drops the bookkeeping of an executing command (after it finished or was aborted),
    /// returning its window slot and write budget.
    fn forget_running(&mut self, itt: Itt) -> Option<AbortHandle> {
        let r = self.running.remove(&itt)?;
        r.release_slot(&self.counters);
        self.write_budget.reserved = self.write_budget.reserved.saturating_sub(r.reserved);
        Some(r.handle)
    }

    /// Drops a write that is still collecting data, returning its window slot and budget.
    fn forget_write(&mut self, itt: Itt) -> Option<WriteTask> {
        let w = self.writes.remove(&itt)?;
        for r in &w.r2ts {
            self.ttts.remove(&r.ttt);
        }
        self.write_budget.waiting.retain(|i| *i != itt);
        self.write_budget.reserved = self
            .write_budget
            .reserved
            .saturating_sub(w.reserved.unwrap_or(0));
        self.counters.release(w.cmd.immediate);
        Some(w)
    }

    /// Admits waiting writes to solicitation in arrival order while the budget allows (see
    /// [`WriteBudget`]), and sends their R2Ts.
    async fn admit_writes(&mut self) {
        loop {
            let admitted = self.admit_batch();
            if admitted.is_empty() {
                return;
            }
            // Advancing may end writes (refused ones give their budget back): go round again.
            for itt in admitted {
                self.advance_write(itt).await;
            }
        }
    }

    fn admit_batch(&mut self) -> Vec<Itt> {
        let mut admitted = Vec::new();
        while let Some(&itt) = self.write_budget.waiting.front() {
            let Some(task) = self.writes.get_mut(&itt) else {
                self.write_budget.waiting.pop_front();
                continue;
            };
            let need = u64::from(task.wanted.saturating_sub(task.solicited_to));
            let budget = &mut self.write_budget;
            if budget.reserved > 0 && budget.reserved + need > budget.limit {
                break;
            }
            budget.reserved += need;
            budget.waiting.pop_front();
            task.reserved = Some(need);
            admitted.push(itt);
        }
        admitted
    }

    async fn keepalive(&mut self) -> Result<(), ConnectionError> {
        let silent = self.last_heard.elapsed();
        let opts = &self.ctx.options;
        if silent >= opts.nop_timeout {
            warn!(peer = %self.peer, initiator = %self.params.initiator_name, "initiator unresponsive; dropping connection");
            return Err(ConnectionError::NopTimeout(silent));
        }
        if silent >= opts.nop_interval && self.ping_outstanding.is_none() {
            // RFC 7143 §11.19: a NOP-In with a valid TTT asks the initiator for a NOP-Out.
            let ttt = self.alloc_ttt();
            self.ping_outstanding = Some(ttt);
            self.send(Pdu::new(
                Header::NopIn(NopIn {
                    lun: Lun::default(),
                    itt: Itt::RESERVED,
                    ttt,
                    stat_sn: Sn(0),
                    exp_cmd_sn: Sn(0),
                    max_cmd_sn: Sn(0),
                }),
                Bytes::new(),
            ))
            .await;
        }
        Ok(())
    }

    fn alloc_ttt(&mut self) -> Ttt {
        loop {
            let t = Ttt(self.next_ttt);
            self.next_ttt = self.next_ttt.wrapping_add(1);
            if t != Ttt::RESERVED && !self.ttts.contains_key(&t) {
                return t;
            }
        }
    }

    async fn send(&self, pdu: Pdu) {
        let _ = self.out.send(Out::Pdu(pdu)).await;
    }

    async fn reject(&self, reason: RejectReason, header: &[u8]) {
        crate::events::global().reject(reason);
        // RFC 7143 §11.17: the data segment carries "the complete header of the PDU being
        // rejected".
        let hdr = Bytes::copy_from_slice(&header[..header.len().min(BHS_LEN)]);
        self.send(Pdu::new(
            Header::Reject(Reject {
                reason,
                stat_sn: Sn(0),
                exp_cmd_sn: Sn(0),
                max_cmd_sn: Sn(0),
                data_sn: Sn(0),
            }),
            hdr,
        ))
        .await;
    }

    async fn reject_pdu(&self, reason: RejectReason, pdu: &Pdu) {
        let bhs = pdu.header.write(pdu.ahs.len(), pdu.data.len());
        self.reject(reason, &bhs).await;
    }

    /// `bhs` is the header at the front of the receive buffer when the error was found (the
    /// rejected PDU's header for framing errors).
    async fn decode_error(
        &mut self,
        e: DecodeError,
        bhs: [u8; BHS_LEN],
    ) -> Result<(), ConnectionError> {
        warn!(peer = %self.peer, error = %e, "bad PDU");
        match (e.action(), e) {
            (ConnectionAction::Reject(reason), DecodeError::DataDigest { header, .. }) => {
                self.reject(reason, &header).await;
                // At ErrorRecoveryLevel 0 a lost Data-Out cannot be recovered: end the
                // connection after the Reject (RFC 7143 §7.1.5, session recovery).
                let itt = iscsi_proto::pdu::bhs_itt(&header);
                if self.writes.contains_key(&itt) {
                    self.flush().await;
                    return Err(ConnectionError::Decode(e));
                }
                Ok(())
            }
            (ConnectionAction::Reject(reason), _) => {
                self.reject(reason, &[0u8; BHS_LEN]).await;
                Ok(())
            }
            _ => {
                if let DecodeError::DataSegmentTooLong { .. } = e {
                    // RFC 7143 §13.12 violation: tell the initiator why before closing. The
                    // Reject carries "the complete header of the PDU being rejected" (§11.17).
                    self.reject(RejectReason::PROTOCOL_ERROR, &bhs).await;
                    self.flush().await;
                }
                Err(ConnectionError::Decode(e))
            }
        }
    }

    async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.out.send(Out::Close(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }
    }

    /// Handles one PDU. Returns false when the connection should close (after logout).
    async fn handle_pdu(&mut self, pdu: Pdu) -> Result<bool, ConnectionError> {
        let discovery = self.params.session_type == SessionType::Discovery;
        match &pdu.header {
            Header::ScsiCommand(_) if discovery => {
                // RFC 7143 §4.3: a discovery session carries only Text, Logout and NOP.
                self.reject_pdu(RejectReason::PROTOCOL_ERROR, &pdu).await;
                Ok(true)
            }
            Header::ScsiCommand(cmd) => {
                let cmd = cmd.clone();
                if !self.check_cmd_sn(cmd.immediate, cmd.cmd_sn, &pdu) {
                    return Ok(true);
                }
                self.scsi_command(cmd, pdu).await?;
                self.run_held().await?;
                Ok(true)
            }
            Header::DataOut(d) => {
                let d = d.clone();
                self.data_out(d, pdu).await?;
                Ok(true)
            }
            Header::NopOut(n) => {
                let n = n.clone();
                self.nop_out(n, pdu).await;
                Ok(true)
            }
            Header::TaskMgmtRequest(t) => {
                let t = t.clone();
                if !self.check_cmd_sn(t.immediate, t.cmd_sn, &pdu) {
                    return Ok(true);
                }
                self.task_mgmt(t).await;
                Ok(true)
            }
            Header::TextRequest(t) => {
                let t = t.clone();
                if !self.check_cmd_sn(t.immediate, t.cmd_sn, &pdu) {
                    return Ok(true);
                }
                self.text(t, pdu.data).await;
                Ok(true)
            }
            Header::LogoutRequest(l) => {
                let l = l.clone();
                if !self.check_cmd_sn(l.immediate, l.cmd_sn, &pdu) {
                    return Ok(true);
                }
                self.logout(l).await
            }
            Header::SnackRequest(_) => {
                // RFC 7143 §11.16: SNACK support is required only at ErrorRecoveryLevel > 0.
                self.reject_pdu(RejectReason::SNACK_REJECT, &pdu).await;
                Ok(true)
            }
            Header::LoginRequest(_) => {
                // RFC 7143 §6.3: a Login Request in full feature phase is a protocol error.
                self.reject_pdu(RejectReason::PROTOCOL_ERROR, &pdu).await;
                Ok(true)
            }
            Header::Unknown(raw) => {
                self.reject(RejectReason::COMMAND_NOT_SUPPORTED, &raw[..])
                    .await;
                Ok(true)
            }
            _ => {
                // A target-to-initiator opcode sent to us.
                self.reject_pdu(RejectReason::PROTOCOL_ERROR, &pdu).await;
                Ok(true)
            }
        }
    }

    /// CmdSN window check (RFC 7143 §4.2.2.1): "For non-immediate commands, the CmdSN field
    /// ... MUST be ... within the window [ExpCmdSN, MaxCmdSN]; commands outside it MUST be
    /// silently ignored." Immediate commands do not advance ExpCmdSN. Returns whether the PDU
    /// should be processed now; a command ahead of ExpCmdSN is held.
    fn check_cmd_sn(&mut self, immediate: bool, cmd_sn: Sn, pdu: &Pdu) -> bool {
        if immediate {
            return true;
        }
        let (exp, max) = self.counters.window();
        // A closed window (MaxCmdSN = ExpCmdSN - 1) admits nothing, not even ExpCmdSN: this
        // is what caps the commands (and their buffers) at the queue depth.
        if !(exp.le(cmd_sn) && cmd_sn.le(max)) {
            debug!(cmd_sn = %cmd_sn, exp = %exp, max = %max, "CmdSN outside window; ignored");
            return false;
        }
        if cmd_sn == exp {
            self.counters
                .exp_cmd_sn
                .store(exp.add(1).0, Ordering::Release);
            self.release_unless_scsi(pdu);
            return true;
        }
        if exp.lt(cmd_sn) && cmd_sn.le(max) && self.held.len() < 1024 {
            debug!(cmd_sn = %cmd_sn, exp = %exp, "command ahead of ExpCmdSN; holding");
            self.held.insert(cmd_sn.0, pdu.clone());
        } else {
            debug!(cmd_sn = %cmd_sn, exp = %exp, max = %max, "CmdSN outside window; ignored");
        }
        false
    }

    /// Only SCSI commands keep their window slot after acceptance (until answered); Text,
    /// Task Management, Logout and NOP-Out are answered on the spot, so their slot is free
    /// at once.
    fn release_unless_scsi(&self, pdu: &Pdu) {
        if !matches!(pdu.header, Header::ScsiCommand(_)) {
            self.counters.release(false);
        }
    }

    /// Runs held commands whose turn has come.
    async fn run_held(&mut self) -> Result<(), ConnectionError> {
        loop {
            let exp = self.counters.exp_cmd_sn.load(Ordering::Acquire);
            let Some(pdu) = self.held.remove(&exp) else {
                return Ok(());
            };
            self.counters
                .exp_cmd_sn
                .store(exp.wrapping_add(1), Ordering::Release);
            self.release_unless_scsi(&pdu);
            match &pdu.header {
                Header::ScsiCommand(c) => {
                    let c = c.clone();
                    self.scsi_command(c, pdu).await?;
                }
                Header::TaskMgmtRequest(t) => {
                    let t = t.clone();
                    self.task_mgmt(t).await;
                }
                Header::TextRequest(t) => {
                    let t = t.clone();
                    self.text(t, pdu.data).await;
                }
                Header::LogoutRequest(l) => {
                    let l = l.clone();
                    self.logout(l).await?;
                }
                _ => {}
            }
        }
    }

    async fn scsi_command(&mut self, cmd: ScsiCommand, pdu: Pdu) -> Result<(), ConnectionError> {
        if self
            .running
            .get(&cmd.itt)
            .is_some_and(|r| r.answered.load(Ordering::Acquire))
        {
            // The earlier command with this tag has been answered (its Done event is still on
            // the way): the tag is free again (RFC 7143 §11.2.1.6).
            self.forget_running(cmd.itt);
            self.admit_writes().await;
        }
        if self.running.contains_key(&cmd.itt) || self.writes.contains_key(&cmd.itt) {
            // RFC 7143 §11.2.1.6: the ITT "uniquely identifies the task"; a duplicate tag is a
            // protocol error.
            if !cmd.immediate {
                self.counters.release(false);
            }
            self.reject_pdu(RejectReason::TASK_IN_PROGRESS, &pdu).await;
            return Ok(());
        }
        if cmd.immediate && !self.counters.take_immediate() {
            // RFC 7143 §3.2.2.1 asks a target to handle at least one immediate command at a
            // time; beyond queue_depth of them the task set is full (SAM-5 §5.3.1).
            let pdu = scsi_response(cmd.itt, TASK_SET_FULL, None, Residual::default(), 0);
            self.send(pdu).await;
            return Ok(());
        }
        // The full CDB: 16 bytes in the BHS, more in an Extended CDB AHS (RFC 7143 §11.3.5).
        let cdb = match pdu.extended_cdb() {
            Some(ext) => {
                let mut v = BytesMut::with_capacity(16 + ext.len());
                v.extend_from_slice(&cmd.cdb);
                v.extend_from_slice(&ext);
                Cdb::Long(v.freeze())
            }
            None => Cdb::Short(cmd.cdb),
        };
        // From here the command holds a slot (taken above for an immediate command, by its
        // CmdSN otherwise) that every path below gives back exactly once.
        let lun = cmd.lun.number();
        let lu = lun.and_then(|n| self.target.as_ref().and_then(|t| t.lun(n)));
        let edtl = cmd.expected_data_transfer_length;

        if cmd.read && cmd.write {
            // Bidirectional commands are not supported by any command we implement.
            let err = ScsiError::InvalidFieldInCdb { byte: 0, bit: None };
            self.respond_error(&cmd, err.sense(), Residual::default(), 0)
                .await;
            return Ok(());
        }
        let immediate_len = pdu.data.len() as u32;
        if !cmd.write && immediate_len > 0 {
            // RFC 7143 §11.3: immediate data accompanies only write commands.
            self.reject_pdu(RejectReason::PROTOCOL_ERROR, &pdu).await;
            self.counters.release(cmd.immediate);
            return Ok(());
        }
        if cmd.write {
            let limits = (&self.params.immediate_data, self.params.first_burst_length);
            if immediate_len > 0 && (!*limits.0 || immediate_len > limits.1 || immediate_len > edtl)
            {
                // RFC 7143 §13.14/§13.15: immediate data only when ImmediateData=Yes, at most
                // FirstBurstLength and never more than the expected transfer.
                self.reject_pdu(RejectReason::PROTOCOL_ERROR, &pdu).await;
                self.counters.release(cmd.immediate);
                return Ok(());
            }
            return self.start_write(cmd, cdb, lu, pdu.data).await;
        }
        // Read or no-data command: run it now.
        self.spawn_command(cmd, cdb, lu, Vec::new(), None, 0);
        Ok(())
    }

    async fn start_write(
        &mut self,
        cmd: ScsiCommand,
        cdb: Cdb,
        lu: Option<Arc<LogicalUnit>>,
        immediate: Bytes,
    ) -> Result<(), ConnectionError> {
        let edtl = cmd.expected_data_transfer_length;
        let mut refuse = None;
        let mut wanted = 0u32;
        let mut residual = Residual::default();
        match &lu {
            None => {
                refuse = Some((ScsiError::LunNotSupported.sense(), Residual::default()));
            }
            Some(lu) => match lu
                .data_out_length(&cdb)
                .and_then(|n| lu.check_expected_length(&cdb, u64::from(edtl)).map(|()| n))
            {
                Err(e) => refuse = Some((e.sense(), Residual::default())),
                Ok(spdtl) => {
                    let spdtl = u32::try_from(spdtl).unwrap_or(u32::MAX);
                    // RFC 7143 §11.4.5 and FCP-4 §9.4.2 option a: when the expected length and
                    // the CDB disagree, process the command with the smaller amount (never
                    // soliciting data beyond EDTL) and report the difference as a residual.
                    wanted = spdtl.min(edtl);
                    residual = if spdtl > edtl {
                        Residual {
                            overflow: spdtl - edtl,
                            underflow: 0,
                        }
                    } else {
                        Residual {
                            underflow: edtl - spdtl,
                            overflow: 0,
                        }
                    };
                }
            },
        }
        // Unsolicited data the initiator will send regardless (RFC 7143 §13.13, §13.14):
        // immediate data plus, with InitialR2T=No, Data-Out up to FirstBurstLength.
        let unsolicited_total = if self.params.initial_r2t {
            immediate.len() as u32
        } else {
            edtl.min(self.params.first_burst_length)
        };
        let imm_len = immediate.len() as u32;
        let mut task = WriteTask {
            cmd,
            lu,
            cdb,
            wanted,
            residual,
            refuse,
            bufs: Vec::new(),
            received: 0,
            unsolicited_left: unsolicited_total.saturating_sub(imm_len),
            unsolicited_offset: imm_len,
            unsolicited_data_sn: 0,
            solicited_to: unsolicited_total,
            r2ts: VecDeque::new(),
            r2t_sn: 0,
            reserved: None,
        };
        if imm_len > 0 {
            task.received = imm_len;
            task.bufs.push(immediate);
        }
        let itt = task.cmd.itt;
        let solicits = task.refuse.is_none() && task.solicited_to < task.wanted;
        self.writes.insert(itt, task);
        if solicits {
            self.write_budget.waiting.push_back(itt);
        } else {
            self.advance_write(itt).await;
        }
        self.admit_writes().await;
        Ok(())
    }

    /// Sends R2Ts as allowed, or runs the command once all its data is in.
    async fn advance_write(&mut self, itt: Itt) {
        let max_r2t = u32::from(self.params.max_outstanding_r2t.max(1));
        let max_burst = self.params.max_burst_length.max(512);
        let Some(task) = self.writes.get_mut(&itt) else {
            return;
        };
        let target_len = if task.refuse.is_some() {
            0
        } else {
            task.wanted
        };
        let mut r2ts = Vec::new();
        if task.refuse.is_none() && task.reserved.is_some() {
            // RFC 7143 §13.17: MaxOutstandingR2T is "the maximum number of outstanding R2Ts
            // per task": count the ones about to be sent too.
            while task.solicited_to < target_len
                && ((task.r2ts.len() + r2ts.len()) as u32) < max_r2t
            {
                let offset = task.solicited_to;
                let len = (target_len - offset).min(max_burst);
                r2ts.push((offset, len));
                task.solicited_to += len;
            }
        }
        let done_unsolicited = task.unsolicited_left == 0;
        let complete = done_unsolicited
            && (task.refuse.is_some() || task.solicited_to >= target_len)
            && task.r2ts.is_empty()
            && r2ts.is_empty()
            && (task.refuse.is_some() || task.received >= task.wanted);
        if complete {
            let Some(task) = self.writes.remove(&itt) else {
                return;
            };
            self.write_budget.waiting.retain(|i| *i != itt);
            let reserved = task.reserved.unwrap_or(0);
            let ndata_sn = task.r2t_sn;
            match task.refuse {
                Some((err, residual)) => {
                    self.write_budget.reserved =
                        self.write_budget.reserved.saturating_sub(reserved);
                    self.respond_error(&task.cmd, err, residual, ndata_sn).await;
                }
                None => {
                    let mut bufs = task.bufs;
                    // Drop anything beyond what the command consumes.
                    trim_to(&mut bufs, task.wanted);
                    self.spawn_command(
                        task.cmd,
                        task.cdb,
                        task.lu,
                        bufs,
                        Some((ndata_sn, task.residual)),
                        reserved,
                    );
                }
            }
            return;
        }
        let mut pdus = Vec::with_capacity(r2ts.len());
        for (offset, len) in r2ts {
            let ttt = self.alloc_ttt();
            self.ttts.insert(ttt, itt);
            let Some(task) = self.writes.get_mut(&itt) else {
                return;
            };
            let r2t_sn = task.r2t_sn;
            task.r2t_sn += 1;
            task.r2ts.push_back(R2tState {
                ttt,
                end: offset + len,
                next_offset: offset,
                next_data_sn: 0,
            });
            pdus.push(Pdu::new(
                Header::R2t(R2t {
                    lun: task.cmd.lun,
                    itt,
                    ttt,
                    stat_sn: Sn(0),
                    exp_cmd_sn: Sn(0),
                    max_cmd_sn: Sn(0),
                    r2t_sn: Sn(r2t_sn),
                    buffer_offset: offset,
                    desired_data_transfer_length: len,
                }),
                Bytes::new(),
            ));
        }
        if !pdus.is_empty() {
            let _ = self.out.send(Out::Pdus(pdus)).await;
        }
    }

    async fn data_out(&mut self, d: DataOut, pdu: Pdu) -> Result<(), ConnectionError> {
        let len = pdu.data.len() as u32;
        let Some(task) = self.writes.get_mut(&d.itt) else {
            // RFC 7143 §11.7: Data-Out for an unknown task. It may belong to a command we
            // already answered (refused before its unsolicited data arrived); drop quietly
            // unless the tag was never seen.
            if self.running.contains_key(&d.itt) {
                return Ok(());
            }
            self.reject_pdu(RejectReason::INVALID_PDU_FIELD, &pdu).await;
            return Ok(());
        };
        if d.ttt == Ttt::RESERVED {
            // Unsolicited Data-Out (RFC 7143 §11.7.4: TTT 0xffffffff).
            if len > task.unsolicited_left || d.buffer_offset != task.unsolicited_offset {
                warn!(peer = %self.peer, itt = d.itt.0, "unsolicited Data-Out beyond FirstBurstLength or out of order");
                self.reject_pdu(RejectReason::PROTOCOL_ERROR, &pdu).await;
                self.flush().await;
                return Err(ConnectionError::Protocol("unsolicited data out of bounds"));
            }
            if d.data_sn.0 != task.unsolicited_data_sn {
                // RFC 7143 §11.7.5: DataSN counts Data-Out PDUs of the sequence from 0. At
                // ERL 0 the data cannot be recovered: the command fails (after its data is
                // drained) and the session stays up.
                warn!(peer = %self.peer, itt = d.itt.0, data_sn = d.data_sn.0, expected = task.unsolicited_data_sn, "Data-Out DataSN out of order; failing the command");
                task.refuse
                    .get_or_insert((data_phase_error(), Residual::default()));
            }
            task.unsolicited_data_sn = task.unsolicited_data_sn.wrapping_add(1);
            task.unsolicited_offset += len;
            task.unsolicited_left -= len;
            if d.final_ && task.unsolicited_left > 0 {
                // The initiator ended the unsolicited burst early (RFC 7143 §4.7.1 lets the F
                // bit close the unsolicited sequence): solicit the rest with R2Ts from where
                // the unsolicited data really ended, so the write cannot stall.
                task.unsolicited_left = 0;
                task.solicited_to = task.solicited_to.min(task.unsolicited_offset);
            }
        } else {
            let Some(pos) = task.r2ts.iter().position(|r| r.ttt == d.ttt) else {
                self.reject_pdu(RejectReason::INVALID_PDU_FIELD, &pdu).await;
                return Ok(());
            };
            let r = &mut task.r2ts[pos];
            if d.buffer_offset != r.next_offset || d.buffer_offset + len > r.end {
                // RFC 7143 §11.7.5 with DataPDUInOrder=Yes: offsets must be contiguous and
                // within the R2T's window.
                self.reject_pdu(RejectReason::PROTOCOL_ERROR, &pdu).await;
                self.flush().await;
                return Err(ConnectionError::Protocol("Data-Out offset outside the R2T"));
            }
            let bad_data_sn = d.data_sn.0 != r.next_data_sn;
            r.next_data_sn = r.next_data_sn.wrapping_add(1);
            r.next_offset += len;
            if r.next_offset >= r.end || d.final_ {
                let ttt = r.ttt;
                task.r2ts.remove(pos);
                self.ttts.remove(&ttt);
            }
            if bad_data_sn {
                // As above (RFC 7143 §11.7.5): fail the command, keep the session.
                warn!(peer = %self.peer, itt = d.itt.0, data_sn = d.data_sn.0, "Data-Out DataSN out of order; failing the command");
                task.refuse
                    .get_or_insert((data_phase_error(), Residual::default()));
            }
        }
        let task = self.writes.get_mut(&d.itt).expect("looked up above");
        if task.refuse.is_none() && len > 0 {
            task.received += len;
            task.bufs.push(pdu.data);
        }
        self.advance_write(d.itt).await;
        // A finished or refused write may have given budget back.
        self.admit_writes().await;
        Ok(())
    }

    fn spawn_command(
        &mut self,
        cmd: ScsiCommand,
        cdb: Cdb,
        lu: Option<Arc<LogicalUnit>>,
        data_out: Vec<Bytes>,
        write: Option<(u32, Residual)>,
        reserved: u64,
    ) {
        let out = self.out.clone();
        let answered = Arc::new(AtomicBool::new(false));
        let task_answered = answered.clone();
        let seq = self.next_seq;
        self.next_seq += 1;
        let counters = self.counters.clone();
        let nexus = self.handle.as_ref().map(|h| h.id).unwrap_or(0);
        // Only a command for a LUN that does not exist needs the LUN list (REPORT LUNS and
        // the LOGICAL UNIT NOT SUPPORTED answer).
        let luns = match (&lu, &self.target) {
            (None, Some(t)) => t.lun_numbers(),
            _ => Vec::new(),
        };
        let max_seg = self.params.max_send_data_segment_length.max(512);
        let max_burst = self.params.max_burst_length.max(512);
        let itt = cmd.itt;
        let lun = cmd.lun;
        let immediate = cmd.immediate;
        let iqn = self.target.as_ref().map(|t| t.iqn.as_str());
        let probe =
            crate::stats::Probe::start(iqn, lu.as_deref(), &cdb).for_session(self.handle.clone());
        let in_flight = self.handle.clone().map(crate::table::InFlight::new);
        let data_out_len: u32 = data_out.iter().map(|b| b.len() as u32).sum();
        // Read data waits for the session's read budget (see [`Conn::read_budget`]).
        let need = if cmd.read {
            cmd.expected_data_transfer_length
                .min(self.read_budget_limit)
        } else {
            0
        };
        let budget = (need > 0).then(|| self.read_budget.clone());
        let mut run: CommandFuture = Box::pin(async move {
            let permit = match budget {
                Some(b) => b.acquire_many_owned(need).await.ok(),
                None => None,
            };
            let result = match &lu {
                Some(lu) => lu.execute(nexus, &cdb, data_out, data_out_len).await,
                None => scsi::execute_no_lun(&cdb, &luns),
            };
            probe.finish(&result, data_out_len);
            drop(in_flight);
            let pdus = build_response(&cmd, result, max_seg, max_burst, write);
            // Whoever flips `answered` first owns the command's answer: this task (send the
            // status) or a task management function (the command counts as aborted and must
            // not also report a status, RFC 7143 §4.2.3.3).
            if !task_answered.swap(true, Ordering::AcqRel) {
                counters.release(cmd.immediate);
                let _ = out.send(Out::Answer(pdus, permit)).await;
            }
            (itt, seq)
        });
        // A command that needs no waiting (a page-cache read, a buffered write, most
        // non-data commands) is answered right here: one poll, no hand-off. One that returns
        // Pending joins `pending`: it is pinned in its box, so it may move there after this
        // poll, and the set's next poll installs the real waker. (Large copies do not run
        // here either way: the store hands them to the blocking pool.)
        let mut cx = Context::from_waker(Waker::noop());
        if run.as_mut().poll(&mut cx).is_ready() {
            self.write_budget.reserved = self.write_budget.reserved.saturating_sub(reserved);
            self.last_inline = true;
            return;
        }
        self.last_inline = false;
        let (handle, registration) = AbortHandle::new_pair();
        self.pending_mut().push(Abortable::new(run, registration));
        self.running.insert(
            itt,
            Running {
                lun,
                handle,
                seq,
                answered,
                reserved,
                immediate,
            },
        );
    }

    async fn respond_error(
        &mut self,
        cmd: &ScsiCommand,
        sense: Sense,
        residual: Residual,
        exp_data_sn: u32,
    ) {
        let pdu = scsi_response(
            cmd.itt,
            CHECK_CONDITION,
            Some(sense.to_fixed()),
            residual,
            exp_data_sn,
        );
        self.counters.release(cmd.immediate);
        self.send(pdu).await;
    }

    async fn nop_out(&mut self, n: NopOut, pdu: Pdu) {
        if n.ttt != Ttt::RESERVED {
            // Answer to our ping (RFC 7143 §11.18.3); nothing to send.
            return;
        }
        if n.itt == Itt::RESERVED {
            // RFC 7143 §11.18.1: a NOP-Out with ITT 0xffffffff asks for no answer.
            return;
        }
        if !n.immediate {
            // Non-immediate NOP-Outs consume a CmdSN (RFC 7143 §11.18).
            if !self.check_cmd_sn(false, n.cmd_sn, &pdu) {
                return;
            }
        }
        // RFC 7143 §11.19.1: the ping data is returned in the NOP-In.
        self.send(Pdu::new(
            Header::NopIn(NopIn {
                lun: n.lun,
                itt: n.itt,
                ttt: Ttt::RESERVED,
                stat_sn: Sn(0),
                exp_cmd_sn: Sn(0),
                max_cmd_sn: Sn(0),
            }),
            pdu.data,
        ))
        .await;
    }

    async fn task_mgmt(&mut self, t: TaskMgmtRequest) {
        let response = match t.function {
            tmf::ABORT_TASK => {
                let referenced = t.referenced_task_tag;
                let mut found = false;
                // Claim the command's answer atomically against its own completion: if the
                // command got there first its status is already on the way and the task no
                // longer exists for us.
                let claimed = self
                    .running
                    .get(&referenced)
                    .map(|r| (!r.answered.swap(true, Ordering::AcqRel), r.immediate));
                if let Some((true, immediate)) = claimed {
                    self.counters.release(immediate);
                    found = true;
                }
                if let Some(h) = self.forget_running(referenced) {
                    h.abort();
                }
                if self.forget_write(referenced).is_some() {
                    found = true;
                }
                self.admit_writes().await;
                if found {
                    tmf_response::COMPLETE
                } else {
                    // RFC 7143 §11.5.1: "If the Referenced Task Tag does not identify an existing
                    // task, but if the CmdSN indicated by the RefCmdSN field ... is within the
                    // valid CmdSN window and less than the CmdSN of the Task Management Function
                    // Request itself, then targets must consider the CmdSN as received and
                    // return the 'Function complete' response." A RefCmdSN below ExpCmdSN was
                    // received and already answered: "Task does not exist".
                    let (exp, max) = self.counters.window();
                    let in_window = exp.le(t.ref_cmd_sn) && t.ref_cmd_sn.le(max);
                    if in_window && t.ref_cmd_sn.lt(t.cmd_sn) {
                        tmf_response::COMPLETE
                    } else {
                        tmf_response::TASK_DOES_NOT_EXIST
                    }
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET | tmf::LOGICAL_UNIT_RESET => {
                let number = t.lun.number();
                match number.and_then(|n| self.target.as_ref().and_then(|tg| tg.lun(n))) {
                    None => tmf_response::LUN_DOES_NOT_EXIST,
                    Some(lu) => {
                        self.abort_where(|l| l == t.lun);
                        // RFC 7143 §11.5.1: "ABORT TASK SET - aborts all tasks issued via
                        // this session on the LU"; "CLEAR TASK SET - aborts all tasks in the
                        // appropriate task set as defined by the TST field in the Control
                        // mode page": TST 000b, one task set for every I_T nexus. LOGICAL
                        // UNIT RESET aborts every task of the LU (SAM-5 §7.7).
                        if t.function != tmf::ABORT_TASK_SET {
                            self.abort_elsewhere(number, t.function == tmf::CLEAR_TASK_SET);
                        }
                        if t.function == tmf::LOGICAL_UNIT_RESET {
                            lu.reset();
                        }
                        tmf_response::COMPLETE
                    }
                }
            }
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                // RFC 7143 §11.5.1: the reset acts on the whole target: every session's
                // tasks are aborted and every LU is reset (SAM-5 §6.3.1/§7.6).
                self.abort_where(|_| true);
                self.abort_elsewhere(None, false);
                if let Some(target) = &self.target {
                    for n in target.lun_numbers() {
                        if let Some(lu) = target.lun(n) {
                            lu.reset();
                        }
                    }
                }
                tmf_response::COMPLETE
            }
            tmf::CLEAR_ACA => tmf_response::NOT_SUPPORTED,
            // RFC 7143 §11.5.1: TASK REASSIGN needs ErrorRecoveryLevel 2.
            tmf::TASK_REASSIGN => tmf_response::REASSIGNMENT_NOT_SUPPORTED,
            _ => tmf_response::REJECTED,
        };
        crate::events::global().task_management(t.function, response);
        // Aborted writes gave their budget back.
        self.admit_writes().await;
        self.send(Pdu::new(
            Header::TaskMgmtResponse(TaskMgmtResponse {
                response,
                itt: t.itt,
                stat_sn: Sn(0),
                exp_cmd_sn: Sn(0),
                max_cmd_sn: Sn(0),
            }),
            Bytes::new(),
        ))
        .await;
        if t.function == tmf::TARGET_COLD_RESET {
            // RFC 7143 §11.5.1: after the response to a TARGET COLD RESET the target drops
            // every connection to the target, terminating all its sessions: this one and
            // the others.
            if let Some(target) = &self.target {
                for s in target.sessions() {
                    s.end(EndReason::ColdReset);
                }
            }
            if let Some(h) = &self.handle {
                h.end(EndReason::ColdReset);
            }
        }
    }

    /// Asks every other session of this session's target to abort its tasks on LUN `lun`
    /// (`None`: on every LUN): the part of a reset or CLEAR TASK SET that concerns tasks of
    /// other I_T nexuses (RFC 7143 §11.5.1, SAM-5 §5.6).
    fn abort_elsewhere(&self, lun: Option<u16>, cleared: bool) {
        let (Some(target), Some(me)) = (&self.target, &self.handle) else {
            return;
        };
        for s in target.sessions() {
            if s.id != me.id {
                s.aborts.post(crate::table::AbortRequest { lun, cleared });
            }
        }
    }

    /// Carries out another session's abort of this session's tasks: they end without a
    /// response (TAS 0), and CLEAR TASK SET leaves COMMANDS CLEARED BY ANOTHER INITIATOR.
    fn aborted_elsewhere(&mut self, request: crate::table::AbortRequest) {
        let n = match request.lun {
            Some(n) => self.abort_where(|l| l.number() == Some(n)),
            None => self.abort_where(|_| true),
        };
        if n == 0 || !request.cleared {
            return;
        }
        let lu = request
            .lun
            .and_then(|lun| self.target.as_ref().and_then(|t| t.lun(lun)));
        if let (Some(lu), Some(me)) = (lu, &self.handle) {
            lu.unit_attention_for(
                me.id,
                crate::scsi::UnitAttention::CommandsClearedByAnotherInitiator,
            );
        }
    }

    /// Aborts this session's tasks on the LUNs `pred` picks; returns how many.
    fn abort_where(&mut self, pred: impl Fn(Lun) -> bool) -> usize {
        let running: Vec<Itt> = self
            .running
            .iter()
            .filter(|(_, r)| pred(r.lun))
            .map(|(i, _)| *i)
            .collect();
        let mut n = running.len();
        for itt in running {
            if let Some(h) = self.forget_running(itt) {
                h.abort();
            }
        }
        let writes: Vec<Itt> = self
            .writes
            .iter()
            .filter(|(_, w)| pred(w.cmd.lun))
            .map(|(i, _)| *i)
            .collect();
        n += writes.len();
        for itt in writes {
            self.forget_write(itt);
        }
        n
    }

    async fn text(&mut self, t: TextRequest, data: Bytes) {
        let max = self.params.max_send_data_segment_length.max(512) as usize;
        // Continuation of a long response (RFC 7143 §11.10.4: the initiator sends an empty
        // Text Request with the TTT we gave).
        let body = if t.ttt != Ttt::RESERVED {
            match self.text_continuations.remove(&t.ttt) {
                Some(rest) => rest,
                None => {
                    let bhs = Header::TextRequest(t.clone()).write(0, data.len());
                    self.reject(RejectReason::INVALID_PDU_FIELD, &bhs).await;
                    return;
                }
            }
        } else {
            self.text_answer(&data)
        };
        let (chunk, rest) = if body.len() > max {
            (body.slice(..max), Some(body.slice(max..)))
        } else {
            (body, None)
        };
        let ttt = match rest {
            Some(rest) => {
                let ttt = self.alloc_ttt();
                // RFC 7143 §11.10: a Text Request with TTT 0xffffffff starts a new exchange,
                // so only the latest unfinished answer can still be continued: keep one.
                self.text_continuations.clear();
                self.text_continuations.insert(ttt, rest);
                ttt
            }
            None => Ttt::RESERVED,
        };
        let more = ttt != Ttt::RESERVED;
        self.send(Pdu::new(
            Header::TextResponse(TextResponse {
                final_: !more,
                continue_: more,
                lun: t.lun,
                itt: t.itt,
                ttt,
                stat_sn: Sn(0),
                exp_cmd_sn: Sn(0),
                max_cmd_sn: Sn(0),
            }),
            chunk,
        ))
        .await;
    }

    /// Answers the keys of a full-feature Text Request.
    fn text_answer(&self, data: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        let pairs = match iscsi_proto::text::parse(data) {
            Ok(p) => p,
            Err(_) => return Bytes::new(),
        };
        for (key, value) in pairs {
            if key == "SendTargets" {
                self.send_targets(value, &mut out);
            } else {
                // Renegotiation in full feature phase is not supported: RFC 7143 §6.2 lets a
                // responder answer a key it does not handle with NotUnderstood.
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(b"=NotUnderstood\0");
            }
        }
        out.freeze()
    }

    /// SendTargets (RFC 7143 Appendix C): targets this initiator may log in to, each with
    /// every portal it is served on ("the response lists ... the TargetAddress of each portal
    /// through which the target can be reached", with its TPGT, §13.8), the portal this
    /// connection arrived on first, so `iscsiadm -m node -p <portal>` finds the record.
    fn send_targets(&self, value: &str, out: &mut BytesMut) {
        let initiator = &self.params.initiator_name;
        let addresses = self.target_addresses();
        let wanted: Vec<Arc<Target>> = match value {
            "All" if self.params.session_type == SessionType::Discovery => self.ctx.table.targets(),
            // RFC 7143 Appendix C: in a normal session, an empty value or the session's own
            // target name reports just that target.
            "" | "All" => self.target.iter().cloned().collect(),
            name => self.ctx.table.target(name).into_iter().collect(),
        };
        for t in wanted {
            if !t.admits(initiator, self.peer.ip()) {
                continue;
            }
            out.extend_from_slice(format!("TargetName={}\0", t.iqn).as_bytes());
            for a in &addresses {
                out.extend_from_slice(format!("TargetAddress={a}\0").as_bytes());
            }
        }
    }

    /// The TargetAddress values of every portal: `ADDR:PORT,TPGT`. This connection's portal
    /// comes first, with the local address it was reached on; a portal bound to a wildcard
    /// address is named by this connection's local address and that portal's port.
    fn target_addresses(&self) -> Vec<String> {
        fn text(a: SocketAddr, tpgt: u16) -> String {
            match a {
                SocketAddr::V4(a) => format!("{}:{},{tpgt}", a.ip(), a.port()),
                SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
                    Some(v4) => format!("{}:{},{tpgt}", v4, a.port()),
                    None => format!("[{}]:{},{tpgt}", a.ip(), a.port()),
                },
            }
        }
        let mut out = vec![text(self.local, self.ctx.tpgt)];
        for p in self.ctx.portals.iter() {
            let addr = if p.addr.ip().is_unspecified() {
                SocketAddr::new(self.local.ip(), p.addr.port())
            } else {
                p.addr
            };
            let t = text(addr, p.tpgt);
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }

    async fn logout(&mut self, l: LogoutRequest) -> Result<bool, ConnectionError> {
        let response = match l.reason {
            // 0: close the session; 1: close the connection (the only one).
            0 | 1 => 0,
            // RFC 7143 §11.15.1: "connection recovery is not supported" at ERL 0.
            2 => 2,
            _ => {
                let bhs = Header::LogoutRequest(l.clone()).write(0, 0);
                self.reject(RejectReason::PROTOCOL_ERROR, &bhs).await;
                return Ok(true);
            }
        };
        if response == 0 {
            self.drain(self.ctx.options.drain_timeout).await;
        }
        self.send(Pdu::new(
            Header::LogoutResponse(LogoutResponse {
                response,
                itt: l.itt,
                stat_sn: Sn(0),
                exp_cmd_sn: Sn(0),
                max_cmd_sn: Sn(0),
                time2wait: 0,
                time2retain: 0,
            }),
            Bytes::new(),
        ))
        .await;
        if response == 0 {
            self.ended = Some(SessionEnd::Logout);
            info!(peer = %self.peer, initiator = %self.params.initiator_name, target = self.params.target_name.as_deref().unwrap_or("-"), "logout");
            self.flush().await;
            return Ok(false);
        }
        Ok(true)
    }

    /// Waits for running commands to finish, up to `limit`; drops the rest.
    async fn drain(&mut self, limit: Duration) {
        let pending = self.pending_mut();
        let _ =
            tokio::time::timeout(limit, async { while pending.next().await.is_some() {} }).await;
        self.pending_mut().clear();
        self.running.clear();
    }

    fn pending_mut(&mut self) -> &mut PendingSet {
        pending_set(&mut self.pending)
    }

    fn pending_is_empty(&mut self) -> bool {
        self.pending_mut().is_empty()
    }

    /// The target ends the session: finish what runs (bounded), tell the initiator with an
    /// Asynchronous Message, and close.
    async fn end_by_target(&mut self, reason: EndReason) {
        self.ended = Some(SessionEnd::Target(reason));
        info!(peer = %self.peer, initiator = %self.params.initiator_name, target = self.params.target_name.as_deref().unwrap_or("-"), ?reason, "target ends session");
        self.drain(self.ctx.options.drain_timeout).await;
        if !matches!(reason, EndReason::Reinstated | EndReason::ColdReset) {
            // RFC 7143 §11.9.1, AsyncEvent 3: "target will drop all connections of this
            // session"; Parameter2/3 carry Time2Wait and Time2Retain.
            self.send(Pdu::new(
                Header::AsyncMessage(AsyncMessage {
                    lun: Lun::default(),
                    stat_sn: Sn(0),
                    exp_cmd_sn: Sn(0),
                    max_cmd_sn: Sn(0),
                    async_event: 3,
                    async_vcode: 0,
                    parameter1: 0,
                    parameter2: 2,
                    parameter3: 0,
                }),
                Bytes::new(),
            ))
            .await;
        }
        self.flush().await;
    }

    async fn finish(&mut self) {
        self.pending_mut().clear();
        self.running.clear();
        self.writes.clear();
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let _ = self.out.send(Out::Close(tx)).await;
    }
}

/// The set behind [`Conn::pending`] (its `Mutex` is never locked, only reached through
/// `get_mut`). A free function so that `serve` can borrow the field alone.
fn pending_set(pending: &mut std::sync::Mutex<PendingSet>) -> &mut PendingSet {
    pending.get_mut().unwrap_or_else(|e| e.into_inner())
}

/// The next finished waiting command (see [`Conn::pending`]).
async fn pending_next(
    pending: &mut std::sync::Mutex<PendingSet>,
) -> Option<Result<(Itt, u64), futures::future::Aborted>> {
    pending_set(pending).next().await
}

/// ABORTED COMMAND, 4Bh/00h DATA PHASE ERROR (SPC-4 Annex D): the Data-Out sequence was
/// malformed.
fn data_phase_error() -> Sense {
    Sense::new(SenseKey::ABORTED_COMMAND, 0x4b, 0x00)
}

fn trim_to(bufs: &mut Vec<Bytes>, len: u32) {
    let mut left = len as usize;
    let mut keep = 0;
    for b in bufs.iter_mut() {
        if left == 0 {
            break;
        }
        if b.len() > left {
            b.truncate(left);
        }
        left -= b.len();
        keep += 1;
    }
    bufs.truncate(keep);
}

fn scsi_response(
    itt: Itt,
    status: u8,
    sense: Option<[u8; 18]>,
    residual: Residual,
    exp_data_sn: u32,
) -> Pdu {
    // RFC 7143 §11.4.7: sense data is preceded by a 2-byte SenseLength.
    let data = match sense {
        Some(s) => {
            let mut b = BytesMut::with_capacity(20);
            b.extend_from_slice(&(s.len() as u16).to_be_bytes());
            b.extend_from_slice(&s);
            b.freeze()
        }
        None => Bytes::new(),
    };
    Pdu::new(
        Header::ScsiResponse(ScsiResponse {
            bidi_overflow: false,
            bidi_underflow: false,
            overflow: residual.overflow > 0,
            underflow: residual.underflow > 0,
            response: 0,
            status,
            itt,
            snack_tag: 0,
            stat_sn: Sn(0),
            exp_cmd_sn: Sn(0),
            max_cmd_sn: Sn(0),
            exp_data_sn: Sn(exp_data_sn),
            bidi_read_residual_count: 0,
            residual_count: residual.overflow.max(residual.underflow),
        }),
        data,
    )
}

/// Data-In PDUs and the status for a finished command (RFC 7143 §11.7, §11.4).
fn build_response(
    cmd: &ScsiCommand,
    result: ScsiResult,
    max_seg: u32,
    max_burst: u32,
    write: Option<(u32, Residual)>,
) -> Vec<Pdu> {
    let edtl = cmd.expected_data_transfer_length;
    let produced = result.data_in.len() as u32;
    let r2t_count = write.map(|(n, _)| n).unwrap_or(0);
    // Residuals (RFC 7143 §11.4.5): underflow when the command moved less than EDTL,
    // overflow when it would have moved more. Write residuals were computed from the CDB.
    let residual = if let Some((_, r)) = write {
        r
    } else if !cmd.read && !cmd.write {
        Residual {
            overflow: produced,
            underflow: 0,
        }
    } else if produced < edtl {
        Residual {
            underflow: edtl - produced,
            overflow: 0,
        }
    } else {
        Residual {
            overflow: produced - edtl,
            underflow: 0,
        }
    };
    let send_len = if cmd.read { produced.min(edtl) } else { 0 };
    let mut pdus = Vec::with_capacity(1 + (send_len / max_seg.max(1)) as usize + 1);
    let collapse = result.status == GOOD && result.sense.is_none();
    let mut offset = 0u32;
    let mut data_sn = 0u32;
    let mut burst_left = max_burst;
    while offset < send_len {
        let len = (send_len - offset).min(max_seg).min(burst_left);
        let last = offset + len == send_len;
        burst_left -= len;
        let end_of_burst = burst_left == 0 || last;
        let status_here = last && collapse;
        pdus.push(Pdu::new(
            Header::DataIn(DataIn {
                final_: end_of_burst,
                acknowledge: false,
                overflow: status_here && residual.overflow > 0,
                underflow: status_here && residual.underflow > 0,
                status_present: status_here,
                status: if status_here { GOOD } else { 0 },
                lun: cmd.lun,
                itt: cmd.itt,
                ttt: Ttt::RESERVED,
                stat_sn: Sn(0),
                exp_cmd_sn: Sn(0),
                max_cmd_sn: Sn(0),
                data_sn: Sn(data_sn),
                buffer_offset: offset,
                residual_count: if status_here {
                    residual.overflow.max(residual.underflow)
                } else {
                    0
                },
            }),
            result
                .data_in
                .slice(offset as usize..(offset + len) as usize),
        ));
        data_sn += 1;
        offset += len;
        if burst_left == 0 {
            burst_left = max_burst;
        }
    }
    if send_len == 0 || !collapse {
        let sense = result.sense.map(|s| s.to_fixed());
        pdus.push(scsi_response(
            cmd.itt,
            result.status,
            sense,
            residual,
            data_sn + r2t_count,
        ));
    }
    pdus
}

#[cfg(test)]
mod tests {
    use super::PollBackoff;

    /// Misses back off 1, 3, 7 ... 63 waits (capped there); one hit polls again every time.
    #[test]
    fn poll_backoff_skips_grow_and_reset() {
        let mut b = PollBackoff::default();
        let mut skipped = Vec::new();
        for _ in 0..8 {
            assert!(b.should_poll());
            b.missed();
            let mut n = 0;
            while !b.should_poll() {
                n += 1;
            }
            skipped.push(n);
        }
        assert_eq!(skipped, vec![1, 3, 7, 15, 31, 63, 63, 63]);
        b.found();
        b.missed();
        assert!(!b.should_poll());
        assert!(
            b.should_poll(),
            "after a hit the backoff starts from one again"
        );
        b.found();
        assert!(b.should_poll() && b.should_poll());
    }
}
