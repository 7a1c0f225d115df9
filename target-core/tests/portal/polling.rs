//! Connection threads and busy polling: the same protocol behaviour when connections run on
//! [`Workers`] threads and poll their socket between commands.

use std::sync::Arc;
use std::time::Duration;

use target_core::workers::Workers;

use crate::lifecycle::wait_for;
use crate::support::*;

fn polling_options() -> target_core::session::SessionOptions {
    let mut o = options();
    // Long enough that a scripted initiator on a loaded CI machine is usually caught.
    o.busy_poll = Duration::from_micros(500);
    o
}

/// Writes and reads back at queue depth 1, the case busy polling is for, with pauses longer
/// than the polling window in between (the backoff path) and writes whose Data-Out burst is
/// larger than one direct read: every byte comes back as written.
#[tokio::test]
async fn busy_polling_on_connection_threads_keeps_data_and_order() {
    let workers = Arc::new(Workers::start(2).unwrap());
    let t = Target::start_on(
        state([target(TARGET, &[0])]),
        polling_options(),
        Some(workers.clone()),
    )
    .await;
    let mut i = t.login().await;
    i.clear_ua(0).await;
    let mut loads = workers.loads();
    loads.sort();
    assert_eq!(
        loads,
        vec![0, 1],
        "the session runs on one connection thread"
    );
    for n in 0..120u32 {
        let len = if n % 10 == 9 { 65536 } else { 4096 };
        let data = pattern(len, n as u8);
        let lba = (n * 128) % 8000;
        assert_eq!(i.write(0, lba, &data).await.status, GOOD, "write {n}");
        let back = i
            .exec(0, &read10(lba, (len / 512) as u16), len as u32)
            .await;
        assert_eq!(back.status, GOOD, "read {n}");
        assert!(back.data == data, "read {n} returned other data");
        if n % 30 == 29 {
            // Longer than the polling window: the connection sleeps, then wakes as usual.
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    let (_, logout) = i.logout(0);
    i.send(&logout).await;
    let _ = i.expect_closed().await;
    wait_for(|| workers.loads() == vec![0, 0]).await;
    t.cancel.cancel();
}

/// An initiator that disconnects while the target polls its socket ends the session (the
/// probe sees end of stream) instead of leaving it to the keepalive.
#[tokio::test]
async fn disconnect_seen_while_polling_ends_the_session() {
    let workers = Arc::new(Workers::start(1).unwrap());
    let mut o = polling_options();
    o.busy_poll = Duration::from_millis(200);
    let t = Target::start_on(state([target(TARGET, &[0])]), o, Some(workers.clone())).await;
    let mut i = t.login().await;
    i.clear_ua(0).await;
    assert_eq!(i.exec(0, &read10(0, 8), 4096).await.status, GOOD);
    // The target is now polling for the next command (200 ms window): close under it.
    drop(i);
    let table = t.table.clone();
    wait_for(|| table.session_count() == 0).await;
    wait_for(|| workers.loads() == vec![0]).await;
    t.cancel.cancel();
}

/// With pinned connection threads, a connection goes to the thread pinned to the CPU its
/// packets arrive on (`SO_INCOMING_CPU`; on loopback, the CPU the initiator sends from): the
/// test pins its own thread, which runs the initiator, to each allowed CPU in turn.
#[tokio::test]
async fn pinned_threads_take_connections_from_their_cpu() {
    use nix::sched::{sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let cpus = target_core::workers::allowed_cpus();
    let workers = Arc::new(Workers::start_pinned(cpus.len()).unwrap());
    let t = Target::start_on(
        state([target(TARGET, &[0])]),
        polling_options(),
        Some(workers.clone()),
    )
    .await;
    for &cpu in &cpus {
        let mut only = CpuSet::new();
        only.set(cpu).unwrap();
        // This test's thread runs the initiator (and the accept loop): now on `cpu` only.
        sched_setaffinity(Pid::from_raw(0), &only).unwrap();
        let mut i = t.login().await;
        let on: Vec<Option<usize>> = workers
            .cpus()
            .into_iter()
            .zip(workers.loads())
            .filter(|&(_, load)| load > 0)
            .map(|(c, _)| c)
            .collect();
        assert_eq!(on, vec![Some(cpu)], "session from CPU {cpu}");
        i.clear_ua(0).await;
        let (_, logout) = i.logout(0);
        i.send(&logout).await;
        i.expect_closed().await;
        wait_for(|| workers.loads().iter().all(|&l| l == 0)).await;
    }
}

/// Follow mode: a connection's thread moves to the CPU the connection's packets arrive on
/// (the initiator's, on loopback) once it has seen traffic for [`FOLLOW_EVERY`], and lets go
/// when the connection ends; a connection that busy-polls does not follow.
///
/// [`FOLLOW_EVERY`]: target_core::workers::FOLLOW_EVERY
#[tokio::test]
async fn following_threads_move_to_the_initiators_cpu() {
    use nix::sched::{sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    use target_core::workers::{allowed_cpus, FOLLOW_EVERY};
    let cpus = allowed_cpus();
    for polling in [false, true] {
        let workers = Arc::new(Workers::start_following(2).unwrap());
        let mut opts = polling_options();
        if !polling {
            opts.busy_poll = Duration::ZERO;
        }
        let t = Target::start_on(state([target(TARGET, &[0])]), opts, Some(workers.clone())).await;
        for &cpu in cpus.iter().rev() {
            let mut only = CpuSet::new();
            only.set(cpu).unwrap();
            // This test's thread runs the initiator: its packets are processed on `cpu`.
            sched_setaffinity(Pid::from_raw(0), &only).unwrap();
            let mut i = t.login().await;
            i.clear_ua(0).await;
            let start = std::time::Instant::now();
            while start.elapsed() < FOLLOW_EVERY * 3 {
                // TEST UNIT READY, answered inline (so a polling connection polls).
                let r = i.exec(0, &[0x00, 0, 0, 0, 0, 0], 0).await;
                assert_eq!(r.status, 0);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let serving: Vec<usize> = (0..2).filter(|&n| workers.loads()[n] == 1).collect();
            assert_eq!(serving.len(), 1);
            let want = if polling { cpus.clone() } else { vec![cpu] };
            let masks = workers.affinities().await;
            assert_eq!(masks[serving[0]], want, "CPU {cpu}, polling {polling}");
            let (_, logout) = i.logout(0);
            i.send(&logout).await;
            i.expect_closed().await;
            wait_for(|| workers.loads().iter().all(|&l| l == 0)).await;
            assert_eq!(workers.affinities().await, vec![cpus.clone(), cpus.clone()]);
        }
        // The test thread may run anywhere again for the next round.
        let mut all = CpuSet::new();
        for &c in &cpus {
            all.set(c).unwrap();
        }
        sched_setaffinity(Pid::from_raw(0), &all).unwrap();
    }
}
