//! End to end in one process: target-core's `Portal` on 127.0.0.1 and the bench's own
//! initiator (`ktgt_benches::initiator`) over loopback TCP, so every command crosses the
//! codec, the session's reader, command window and writer, SCSI dispatch and a RAM store,
//! and the kernel's TCP stack both ways.
//!
//! One target with one 64 MiB RAM LUN (512-byte blocks) and an ACL admitting the bench
//! initiator from any address. The initiator logs in without CHAP, no digests,
//! ImmediateData=Yes, InitialR2T=No, MaxRecvDataSegmentLength=262144, MaxBurstLength=262144,
//! FirstBurstLength=65536; the LUN is written through once before measuring.
//!
//! Cases (Throughput::Elements = commands):
//! - `read_4KiB/qd1`, `read_4KiB/qd32`: READ(10) of 4 KiB at pseudo-random aligned LBAs.
//! - `write_4KiB/qd1`, `write_4KiB/qd32`: WRITE(10) of 4 KiB, all of it immediate data.
//! - `seqread_128KiB/qd8`: READ(10) of 128 KiB at consecutive LBAs.
//!
//! Queue depth N: the initiator keeps N commands outstanding (within MaxCmdSN), sending new
//! ones as completions arrive. One measured iteration is a fixed batch of commands, and
//! `iter_custom` runs all the iterations criterion asks for as one continuous pipeline, so
//! per-command times include no pipeline fill or drain except once per sample.
//!
//! Both sides share the machine: the target runs on a 2-worker tokio runtime, the
//! initiator on the bench's main thread (`block_on`), so on 2 cores the numbers include
//! initiator CPU time as a real loopback test would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ktgt_benches::initiator::{Command, Initiator};
use ktgt_benches::{cdb, pattern};
use target_core::config::{
    Acl, AddressRule, Backing, ChapConfig, DesiredState, LunConfig, TargetConfig,
};
use target_core::portal::Portal;
use target_core::session::SessionOptions;
use target_core::table::TargetTable;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

const INITIATOR: &str = "iqn.2024-01.io.ktgt:bench-initiator";
const TARGET: &str = "iqn.2024-01.io.ktgt:bench";
const LUN_SIZE: u64 = 64 << 20;
const BLOCK: u32 = 512;
const BLOCKS: u64 = LUN_SIZE / BLOCK as u64;

/// The operational keys the initiator offers (the target's answers are checked below).
const KEYS: &[(&str, &str)] = &[
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("ImmediateData", "Yes"),
    ("InitialR2T", "No"),
    ("MaxRecvDataSegmentLength", "262144"),
    ("MaxBurstLength", "262144"),
    ("FirstBurstLength", "65536"),
    ("MaxOutstandingR2T", "1"),
    ("ErrorRecoveryLevel", "0"),
    ("MaxConnections", "1"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
];

fn desired() -> DesiredState {
    let lun = LunConfig {
        lun: 0,
        backing: Backing::Memory { size: LUN_SIZE },
        block_size: BLOCK,
        read_only: false,
        direct: false,
        create_size: None,
        clone_from: None,
        serial: None,
    };
    let target = TargetConfig {
        iqn: TARGET.to_owned(),
        alias: None,
        luns: [(0, lun)].into_iter().collect(),
        acl: Acl::single(vec![INITIATOR.to_owned()], vec![AddressRule::All]),
        chap: ChapConfig::default(),
    };
    DesiredState {
        targets: [(TARGET.to_owned(), target)].into_iter().collect(),
        discovery_chap: None,
    }
}

/// Binds the portal on an ephemeral loopback port and serves it on `rt` until the returned
/// token is cancelled.
fn start_target(rt: &Runtime) -> (SocketAddr, CancellationToken) {
    rt.block_on(async {
        let table = TargetTable::new();
        let report = table.apply(&desired()).await;
        assert!(report.errors.is_empty(), "apply: {:?}", report.errors);
        // Keepalive pings off for the length of a bench run (the initiator would answer
        // them, but they would land in the measurements).
        let options = SessionOptions {
            nop_interval: Duration::from_secs(3600),
            nop_timeout: Duration::from_secs(7200),
            ..SessionOptions::default()
        };
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("a socket address");
        let portal = Portal::bind(&[loopback], Arc::clone(&table), options, 16)
            .await
            .expect("bind a loopback port");
        let addr = portal.local_addrs()[0];
        let shutdown = CancellationToken::new();
        tokio::spawn(portal.serve(shutdown.clone()));
        (addr, shutdown)
    })
}

/// Logs in, clears the power-on unit attention and writes the whole LUN once.
fn connect(rt: &Runtime, addr: SocketAddr) -> Initiator {
    rt.block_on(async {
        let mut ini = Initiator::login(addr, INITIATOR, TARGET, KEYS)
            .await
            .expect("login to the bench target");
        for (key, want) in [
            ("ImmediateData", "Yes"),
            ("InitialR2T", "No"),
            ("FirstBurstLength", "65536"),
        ] {
            assert_eq!(ini.negotiated(key), Some(want), "negotiated {key}");
        }
        // SAM-5 §5.14: a new I_T nexus starts with POWER ON OCCURRED pending; the first
        // command other than INQUIRY gets CHECK CONDITION.
        let tur = Command::no_data(cdb::test_unit_ready());
        let mut good = false;
        for _ in 0..4 {
            if ini.exec(&tur).await.expect("TEST UNIT READY") == 0 {
                good = true;
                break;
            }
        }
        assert!(good, "the unit attention did not clear");
        // Fill with 64 KiB writes (FirstBurstLength: all immediate data, no R2T).
        let chunk = Bytes::from(pattern::data(64 << 10, 7));
        let per = (chunk.len() / BLOCK as usize) as u64;
        ini.run(BLOCKS / per, 8, |n| {
            Command::write(cdb::write10((n * per) as u32, per as u16), chunk.clone())
        })
        .await
        .expect("fill the LUN");
        ini
    })
}

/// A case: commands per measured iteration, queue depth, and the `n`th command.
fn bench_case(
    c: &mut Criterion,
    rt: &Runtime,
    ini: &mut Initiator,
    name: &str,
    batch: u64,
    depth: usize,
    command: impl Fn(u64) -> Command,
) {
    let mut group = c.benchmark_group("e2e");
    group.throughput(Throughput::Elements(batch));
    // Commands are numbered across iterations and samples, so a sequential case sweeps the
    // LUN and a random one walks its whole table.
    let mut next = 0u64;
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let total = iters * batch;
            let first = next;
            next += total;
            rt.block_on(async {
                let start = Instant::now();
                let stats = ini
                    .run(total, depth, |n| command(first + n))
                    .await
                    .expect("bench commands complete with GOOD");
                let elapsed = start.elapsed();
                assert_eq!(stats.commands, total);
                elapsed
            })
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let rt = ktgt_benches::runtime();
    let (addr, shutdown) = start_target(&rt);
    let mut ini = connect(&rt, addr);

    // 4 KiB = 8 blocks at random 4 KiB-aligned LBAs, from a fixed table.
    let lbas: Arc<Vec<u32>> = Arc::new(
        pattern::random_offsets(16 << 10, LUN_SIZE, 4 << 10, 0x6532_6520)
            .into_iter()
            .map(|off| (off / u64::from(BLOCK)) as u32)
            .collect(),
    );
    let random_lba = {
        let lbas = lbas.clone();
        move |n: u64| lbas[(n % lbas.len() as u64) as usize]
    };
    let data_4k = Bytes::from(pattern::data(4 << 10, 8));

    for depth in [1, 32] {
        let lba = random_lba.clone();
        bench_case(
            c,
            &rt,
            &mut ini,
            &format!("read_4KiB/qd{depth}"),
            256,
            depth,
            move |n| Command::read(cdb::read10(lba(n), 8), 4 << 10),
        );
    }
    for depth in [1, 32] {
        let lba = random_lba.clone();
        let data = data_4k.clone();
        bench_case(
            c,
            &rt,
            &mut ini,
            &format!("write_4KiB/qd{depth}"),
            256,
            depth,
            move |n| Command::write(cdb::write10(lba(n), 8), data.clone()),
        );
    }
    // 128 KiB = 256 blocks, consecutive, wrapping at the end of the LUN.
    bench_case(c, &rt, &mut ini, "seqread_128KiB/qd8", 64, 8, |n| {
        let lba = (n * 256) % BLOCKS;
        Command::read(cdb::read10(lba as u32, 256), 128 << 10)
    });

    drop(ini);
    shutdown.cancel();
}

criterion_group!(e2e, benches);
criterion_main!(e2e);
