//! Connection threads: one single-threaded tokio runtime per thread, sessions spread across
//! them.
//!
//! # Why not the multi-threaded runtime
//!
//! A connection's work is a chain of small steps (read a PDU, run the command inline, hand
//! the response to the writer task, write it). On a work-stealing runtime every idle worker
//! may be woken to steal or to run the I/O driver, so one command could cross threads twice;
//! on the 2-vCPU VM where this was measured, waking an idle vCPU costs tens of microseconds
//! (a bare loopback TCP ping-pong takes ~51 µs between two CPUs against ~11 µs on one).
//! Here each connection lives on one thread for its whole life: its reader, its writer task,
//! its commands and its socket's reactor registration all stay there, and an idle thread is
//! woken only for its own sockets. Busy polling (see
//! [`SessionOptions::busy_poll`](crate::session::SessionOptions::busy_poll)) relies on it: a
//! polling connection yields to the other tasks of its thread, and each yield polls that
//! thread's own reactor, without waking anybody else.
//!
//! Placement is by load: a new connection goes to the thread serving the fewest.
//!
//! # Pinned threads and the CPU a connection's packets arrive on
//!
//! [`Workers::start_pinned`] pins thread *i* to the *i*-th CPU the process may run on. The
//! portal then reads `SO_INCOMING_CPU` from each accepted socket: the CPU whose network
//! receive processing last handled the connection (the NIC queue's interrupt or RPS CPU; on
//! loopback, the CPU the initiator sent from). Among the least-loaded threads, a connection
//! goes to the one pinned to that CPU ([`Workers::spawn_near`]), so the initiator-facing
//! work of a connection stays on one CPU and placement never trades balance for locality.
//! On the 2-vCPU VM measured (docs/performance.md) the effect on O_DIRECT QD1 reads was
//! mixed (a median of 37 against 49 µs of target CPU per command with a fresh agent, no
//! difference after other sessions had run): the initiator did not stay on its CPU.
//!
//! # Following the initiator's CPU
//!
//! [`Workers::start_following`] leaves threads unpinned until a connection reports, from its
//! command path and at most every 100 ms ([`follow_incoming_cpu`]), the CPU its packets
//! arrive on. A thread serving exactly that one connection then pins itself to that CPU,
//! unless another thread already holds it; a thread with more connections, or none, lets
//! go and floats again. Only a connection whose initiator waits for each command in turn
//! follows (at most one command in flight, and not busy-polling): a polling thread keeps
//! its CPU busy, so the scheduler moves the initiator away and the thread chased it
//! (halving QD1 buffered reads in a comparison run), and an initiator with many commands in
//! flight needs a CPU of its own (4 KiB O_DIRECT writes at QD32 from qemu-img fell from
//! about 44k to 29k IOPS with the thread beside it).
//!
//! On loopback the CPU is the initiator's, and the scheduler moves the initiator now and
//! then, so the thread follows it: on the 2-vCPU VM an O_DIRECT QD1 connection then used
//! 37-41 µs of target CPU per command against 42-54 µs floating (tgtd 46-50), and the
//! initiator about half the CPU, because every wake-up between the two stayed on one CPU.
//! With a NIC the CPU is the one its receive queue's interrupt (or RPS) runs on, and a
//! followed connection's work stays beside its packets.

use std::cell::RefCell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// A set of connection threads.
pub struct Workers {
    threads: Vec<Worker>,
    stop: CancellationToken,
    joins: Vec<JoinHandle<()>>,
}

struct Worker {
    handle: Handle,
    /// Connections placed on this thread and not finished.
    load: Arc<AtomicUsize>,
    /// The CPU this thread is pinned to, if it is.
    cpu: Option<usize>,
}

/// `SO_INCOMING_CPU` of a socket: the CPU that last processed a packet of it, if the kernel
/// knows one (it reports -1 before any packet was processed).
pub(crate) fn incoming_cpu(sock: &impl std::os::fd::AsFd) -> Option<usize> {
    let cpu = socket2::SockRef::from(sock).cpu_affinity().ok()?;
    // socket2 returns the kernel's int as usize: -1 comes back as usize::MAX.
    (cpu < CpuSet::count()).then_some(cpu)
}

/// How often at most a connection reports its incoming CPU in follow mode.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(100);

/// What the threads of one following [`Workers`] share: which CPU each holds.
struct FollowShared {
    /// The process's CPUs when the threads started: a thread that lets go returns to these.
    allowed: Vec<usize>,
    /// Per thread, the CPU it is pinned to by following.
    held: Mutex<Vec<Option<usize>>>,
}

/// A following thread's own view.
struct FollowLocal {
    index: usize,
    load: Arc<AtomicUsize>,
    shared: Arc<FollowShared>,
}

thread_local! {
    /// Set on the threads of a following [`Workers`].
    static FOLLOW: RefCell<Option<FollowLocal>> = const { RefCell::new(None) };
}

/// Whether the calling thread follows its connection's CPU (so the caller knows whether
/// reading `SO_INCOMING_CPU` is worth a system call).
pub fn following() -> bool {
    FOLLOW.with(|f| f.borrow().is_some())
}

/// A connection on the calling thread saw its packets arrive on `cpu`: pin this thread
/// there if the connection is the thread's only one and no other thread holds the CPU; let
/// go if the thread serves more than one, or with `None` (a connection that busy-polls or
/// has several commands in flight, whose initiator needs its CPU to itself). No-op off a
/// following thread.
pub fn follow_incoming_cpu(cpu: Option<usize>) {
    FOLLOW.with(|f| {
        let f = f.borrow();
        let Some(f) = f.as_ref() else {
            return;
        };
        let mut held = f.shared.held.lock().unwrap_or_else(|e| e.into_inner());
        let mine = held[f.index];
        let Some(cpu) = cpu.filter(|_| f.load.load(Ordering::Relaxed) == 1) else {
            if mine.is_some() {
                release(&f.shared, &mut held, f.index);
            }
            return;
        };
        let taken = held
            .iter()
            .enumerate()
            .any(|(i, c)| i != f.index && *c == Some(cpu));
        if mine == Some(cpu) || taken || !f.shared.allowed.contains(&cpu) {
            return;
        }
        match pin_current_thread(cpu) {
            Ok(()) => held[f.index] = Some(cpu),
            Err(e) => tracing::debug!(cpu, error = %e, "cannot follow the connection's CPU"),
        }
    });
}

/// Unpins the calling thread (back to the process's CPUs) and gives its CPU up.
fn release(shared: &FollowShared, held: &mut [Option<usize>], index: usize) {
    // The main thread's mask is the process's as the cgroup has it now (a cpuset may have
    // changed since the threads started); the CPUs at start if it cannot be read.
    let set = sched_getaffinity(Pid::from_raw(std::process::id() as i32)).unwrap_or_else(|_| {
        let mut set = CpuSet::new();
        for &c in &shared.allowed {
            let _ = set.set(c);
        }
        set
    });
    if let Err(e) = sched_setaffinity(Pid::from_raw(0), &set) {
        tracing::debug!(error = %e, "cannot unpin the connection thread");
    }
    held[index] = None;
}

/// The CPUs this process may run on (its affinity mask, which a cgroup cpuset narrows), in
/// ascending order; empty if the mask cannot be read.
pub fn allowed_cpus() -> Vec<usize> {
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Pins the calling thread to `cpu`.
fn pin_current_thread(cpu: usize) -> nix::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    // Pid 0: the calling thread (sched_setaffinity(2) works per thread).
    sched_setaffinity(Pid::from_raw(0), &set)
}

impl Workers {
    /// Starts `n` threads (at least one), named `ktgt-conn-0`..., free to run on any CPU;
    /// fails when a thread or its runtime cannot be created.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        Workers::start_with(n, &[], None)
    }

    /// As [`Workers::start`], with each thread following its connection's CPU while it
    /// serves exactly one (see the module docs).
    pub fn start_following(n: usize) -> std::io::Result<Workers> {
        let shared = Arc::new(FollowShared {
            allowed: allowed_cpus(),
            held: Mutex::new(vec![None; n.max(1)]),
        });
        Workers::start_with(n, &[], Some(shared))
    }

    /// As [`Workers::start`], with thread *i* pinned to the *i*-th of the CPUs the process may
    /// run on ([`allowed_cpus`]; with more threads than CPUs they wrap around). A thread that
    /// cannot be pinned runs unpinned, with a warning.
    pub fn start_pinned(n: usize) -> std::io::Result<Workers> {
        Workers::start_with(n, &allowed_cpus(), None)
    }

    fn start_with(
        n: usize,
        cpus: &[usize],
        follow: Option<Arc<FollowShared>>,
    ) -> std::io::Result<Workers> {
        // Built up in place: if a thread cannot be made, dropping `w` stops the ones made.
        let mut w = Workers {
            threads: Vec::new(),
            stop: CancellationToken::new(),
            joins: Vec::new(),
        };
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("ktgt-conn-{i}-blocking"))
                .build()?;
            let handle = rt.handle().clone();
            let stop = w.stop.clone();
            let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
            let (pinned_tx, pinned_rx) = std::sync::mpsc::channel();
            let load = Arc::new(AtomicUsize::new(0));
            let follow = follow.clone().map(|shared| FollowLocal {
                index: i,
                load: load.clone(),
                shared,
            });
            let join = std::thread::Builder::new()
                .name(format!("ktgt-conn-{i}"))
                .spawn(move || {
                    let pinned = cpu.filter(|&c| match pin_current_thread(c) {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(thread = i, cpu = c, error = %e,
                                "cannot pin the connection thread; it runs unpinned");
                            false
                        }
                    });
                    let _ = pinned_tx.send(pinned);
                    FOLLOW.with(|f| *f.borrow_mut() = follow);
                    rt.block_on(stop.cancelled());
                    // Cancels what is left (by now the portal has drained its sessions or
                    // given up on them); a blocking read stuck in a hung store is not waited
                    // for beyond this.
                    rt.shutdown_timeout(std::time::Duration::from_secs(1));
                })?;
            w.joins.push(join);
            // The thread reports whether it pinned itself before it serves anything.
            let cpu = pinned_rx.recv().ok().flatten();
            w.threads.push(Worker { handle, load, cpu });
        }
        Ok(w)
    }

    /// Runs `fut` on the least loaded thread; the thread counts it until it finishes.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.spawn_near(None, fut)
    }

    /// As [`Workers::spawn`], preferring among the least loaded threads the one pinned to
    /// `cpu` (the CPU the connection's packets arrive on, see the module docs).
    pub fn spawn_near<F>(&self, cpu: Option<usize>, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let w = &self.threads[self.pick(cpu)];
        w.load.fetch_add(1, Ordering::Relaxed);
        let guard = LoadGuard(w.load.clone());
        w.handle.spawn(async move {
            let _guard = guard;
            fut.await
        })
    }

    /// The thread a connection arriving on `cpu` goes to.
    fn pick(&self, cpu: Option<usize>) -> usize {
        let loads: Vec<usize> = self.loads();
        let min = loads.iter().copied().min().unwrap_or(0);
        let least = |i: &usize| loads[*i] == min;
        cpu.and_then(|c| {
            (0..self.threads.len()).find(|i| least(i) && self.threads[*i].cpu == Some(c))
        })
        .or_else(|| (0..self.threads.len()).find(least))
        .unwrap_or(0)
    }

    /// The CPUs each thread may run on now (its affinity mask), in thread order; asks each
    /// thread, so it waits for them.
    pub async fn affinities(&self) -> Vec<Vec<usize>> {
        let mut out = Vec::with_capacity(self.threads.len());
        for w in &self.threads {
            out.push(
                w.handle
                    .spawn(async { allowed_cpus() })
                    .await
                    .unwrap_or_default(),
            );
        }
        out
    }

    /// The CPU each thread is pinned to at start ([`Workers::start_pinned`]), in thread order.
    pub fn cpus(&self) -> Vec<Option<usize>> {
        self.threads.iter().map(|w| w.cpu).collect()
    }

    /// Connections each thread serves now, in thread order.
    pub fn loads(&self) -> Vec<usize> {
        self.threads
            .iter()
            .map(|w| w.load.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
        for j in self.joins.drain(..) {
            let _ = j.join();
        }
    }
}

/// Gives a connection's place back when its future ends or is dropped (on its thread); a
/// following thread left with no connection lets go of its CPU.
struct LoadGuard(Arc<AtomicUsize>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        if self.0.fetch_sub(1, Ordering::Relaxed) != 1 {
            return;
        }
        FOLLOW.with(|f| {
            if let Some(f) = f
                .borrow()
                .as_ref()
                .filter(|f| Arc::ptr_eq(&f.load, &self.0))
            {
                let mut held = f.shared.held.lock().unwrap_or_else(|e| e.into_inner());
                if held[f.index].is_some() {
                    release(&f.shared, &mut held, f.index);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_by_load_and_counts_down() {
        let w = Workers::start(2).unwrap();
        assert_eq!(w.loads(), vec![0, 0]);
        let (tx1, rx1) = tokio::sync::oneshot::channel::<()>();
        let (tx2, rx2) = tokio::sync::oneshot::channel::<()>();
        let a = w.spawn(async move {
            let _ = rx1.await;
            std::thread::current().name().map(str::to_owned)
        });
        let b = w.spawn(async move {
            let _ = rx2.await;
            std::thread::current().name().map(str::to_owned)
        });
        assert_eq!(w.loads(), vec![1, 1]);
        tx1.send(()).unwrap();
        tx2.send(()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (na, nb) = rt.block_on(async { (a.await.unwrap(), b.await.unwrap()) });
        let mut names = vec![na.unwrap(), nb.unwrap()];
        names.sort();
        assert_eq!(names, vec!["ktgt-conn-0", "ktgt-conn-1"]);
        // The guard runs when the task's future is dropped, just after its output is sent.
        for _ in 0..100 {
            if w.loads() == vec![0, 0] {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(w.loads(), vec![0, 0]);
    }

    #[test]
    fn placement_prefers_the_incoming_cpu_only_among_the_least_loaded() {
        let mut w = Workers::start(3).unwrap();
        for (i, t) in w.threads.iter_mut().enumerate() {
            t.cpu = Some(10 + i);
        }
        // All idle: the thread on the connection's CPU, else the first.
        assert_eq!(w.pick(Some(12)), 2);
        assert_eq!(w.pick(Some(11)), 1);
        assert_eq!(w.pick(Some(99)), 0);
        assert_eq!(w.pick(None), 0);
        // Thread 2 busier than the others: balance first, even for CPU 12.
        w.threads[2].load.store(1, Ordering::Relaxed);
        assert_eq!(w.pick(Some(12)), 0);
        assert_eq!(w.pick(Some(11)), 1);
        // Unpinned threads never match a CPU.
        w.threads[1].cpu = None;
        assert_eq!(w.pick(Some(11)), 0);
    }

    #[test]
    fn pinned_threads_run_on_their_cpu() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty(), "the affinity mask is readable");
        let w = Workers::start_pinned(cpus.len() + 1).unwrap();
        // Thread i on the i-th allowed CPU, wrapping around.
        let want: Vec<Option<usize>> = (0..=cpus.len())
            .map(|i| Some(cpus[i % cpus.len()]))
            .collect();
        assert_eq!(w.cpus(), want);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for (i, t) in w.threads.iter().enumerate() {
            let mask = rt
                .block_on(t.handle.spawn(async { allowed_cpus() }))
                .unwrap();
            assert_eq!(mask, vec![cpus[i % cpus.len()]], "thread {i}");
        }
        // Unpinned threads keep the process's mask.
        let free = Workers::start(1).unwrap();
        assert_eq!(free.cpus(), vec![None]);
        let mask = rt
            .block_on(free.threads[0].handle.spawn(async { allowed_cpus() }))
            .unwrap();
        assert_eq!(mask, cpus);
    }

    /// Follow mode: a thread with one connection moves to the reported CPU unless another
    /// thread holds it, lets go with a second connection, and when its connections end.
    #[test]
    fn following_threads_take_free_cpus_and_let_go() {
        let cpus = allowed_cpus();
        let w = Workers::start_following(2).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (hold_tx, hold_rx) = tokio::sync::oneshot::channel::<()>();
        let (a_tx, a_rx) = tokio::sync::oneshot::channel::<Vec<usize>>();
        // Connection A (thread 0, its only one) reports the first CPU.
        let a = w.spawn(async move {
            follow_incoming_cpu(Some(cpus_first()));
            let _ = a_tx.send(allowed_cpus());
            let _ = hold_rx.await;
        });
        let a_mask = rt.block_on(a_rx).unwrap();
        assert_eq!(a_mask, vec![cpus_first()], "thread 0 followed");
        let (b_tx, b_rx) = tokio::sync::oneshot::channel::<Vec<usize>>();
        // Connection B (thread 1) reports the same CPU: held by thread 0, so it stays put.
        let b = w.spawn(async move {
            follow_incoming_cpu(Some(cpus_first()));
            let _ = b_tx.send(allowed_cpus());
        });
        rt.block_on(async {
            assert_eq!(
                b_rx.await.unwrap(),
                cpus,
                "a CPU another thread holds is not taken"
            );
            b.await.unwrap();
            let _ = hold_tx.send(());
            a.await.unwrap();
            // A's end lets thread 0 go (the guard runs just after the task's output).
            for _ in 0..100 {
                if w.affinities().await[0] == cpus {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            assert_eq!(w.affinities().await, vec![cpus.clone(), cpus.clone()]);
        });
        // Two connections on one thread: it does not follow.
        let one = Workers::start_following(1).unwrap();
        let (h1, r1) = tokio::sync::oneshot::channel::<()>();
        let first = one.spawn(async move {
            let _ = r1.await;
        });
        let second = one.spawn(async move {
            follow_incoming_cpu(Some(cpus_first()));
            allowed_cpus()
        });
        rt.block_on(async {
            assert_eq!(second.await.unwrap(), allowed_cpus());
            let _ = h1.send(());
            first.await.unwrap();
        });
    }

    fn cpus_first() -> usize {
        allowed_cpus()[0]
    }

    #[test]
    fn drop_stops_the_threads() {
        let w = Workers::start(1).unwrap();
        let t = w.spawn(std::future::pending::<()>());
        drop(w); // joins the thread; the pending task is cancelled with its runtime
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(rt.block_on(t).unwrap_err().is_cancelled());
    }
}
