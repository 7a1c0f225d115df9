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

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

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
}

impl Workers {
    /// Starts `n` threads (at least one), named `ktgt-conn-0`...; fails when a thread or its
    /// runtime cannot be created.
    pub fn start(n: usize) -> std::io::Result<Workers> {
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
            let join = std::thread::Builder::new()
                .name(format!("ktgt-conn-{i}"))
                .spawn(move || {
                    rt.block_on(stop.cancelled());
                    // Cancels what is left (by now the portal has drained its sessions or
                    // given up on them); a blocking read stuck in a hung store is not waited
                    // for beyond this.
                    rt.shutdown_timeout(std::time::Duration::from_secs(1));
                })?;
            w.threads.push(Worker {
                handle,
                load: Arc::new(AtomicUsize::new(0)),
            });
            w.joins.push(join);
        }
        Ok(w)
    }

    /// Runs `fut` on the least loaded thread; the thread counts it until it finishes.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let w = self
            .threads
            .iter()
            .min_by_key(|w| w.load.load(Ordering::Relaxed))
            .expect("Workers::start makes at least one thread");
        w.load.fetch_add(1, Ordering::Relaxed);
        let guard = LoadGuard(w.load.clone());
        w.handle.spawn(async move {
            let _guard = guard;
            fut.await
        })
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

/// Gives a connection's place back when its future ends or is dropped.
struct LoadGuard(Arc<AtomicUsize>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
