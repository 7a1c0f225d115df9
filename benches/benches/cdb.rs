//! SCSI command dispatch: `LogicalUnit::execute` on a RAM-backed logical unit, without any
//! transport, so what is measured is CDB parsing, the dispatch table, the unit attention and
//! reservation checks, and the command itself.
//!
//! - `test_unit_ready`: the cheapest command, i.e. the fixed cost of `execute`.
//! - `inquiry_std`: standard INQUIRY data, 36 bytes (built per call).
//! - `read10_8x512`: READ(10) of 8 blocks of 512 bytes: a 4 KiB copy out of the RAM store
//!   into a fresh buffer.
//! - `write10_8x512`: WRITE(10) of 8 blocks: a 4 KiB copy into the store. The Data-Out
//!   buffers the command consumes are made outside the timing (`iter_batched`; the `Bytes`
//!   is shared, so making them is a reference count and a small `Vec`).
//! - `report_luns_no_lun`: REPORT LUNS answered by `execute_no_lun` (a LUN the target does
//!   not have), listing 4 LUNs; synchronous.
//!
//! The async `execute` runs on a current-thread tokio runtime through criterion's
//! `to_async` (feature `async_tokio`), which `block_on`s each batch: the memory store never
//! suspends, so this measures the command path rather than a scheduler.

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ktgt_benches::{cdb, pattern};
use target_core::lun::{MemStore, Store};
use target_core::scsi::{execute_no_lun, status, LogicalUnit, LuIdentity};

const BLOCK: u32 = 512;
const LU_SIZE: u64 = 16 << 20;
/// The I_T nexus id commands come from. Never registered with `add_nexus`, so no unit
/// attention is pending for it and every command takes its normal path.
const NEXUS: u64 = 1;
const LBA: u32 = 1024;
const BLOCKS: u16 = 8;

fn logical_unit() -> LogicalUnit {
    let store = MemStore::new(LU_SIZE).expect("a 16 MiB RAM store fits in memory");
    LogicalUnit::new(
        0,
        Store::Memory(store),
        BLOCK,
        false,
        LuIdentity::derive("iqn.2024-01.io.ktgt:bench", 0, None),
    )
    .expect("512-byte blocks over 16 MiB make a valid LU")
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread tokio runtime");
    let lu = logical_unit();
    let transfer = u32::from(BLOCKS) * BLOCK;

    // Sanity: every command below must succeed, or we would be timing an error path.
    let check = |cdb: &[u8], data: Vec<Bytes>, len: u32| {
        let r = rt.block_on(lu.execute(NEXUS, cdb, data, len));
        assert_eq!(r.status, status::GOOD, "{cdb:02x?}: {r:?}");
        r
    };
    check(&cdb::test_unit_ready(), vec![], 0);
    assert_eq!(check(&cdb::inquiry(36), vec![], 0).data_in.len(), 36);
    let write_data = Bytes::from(pattern::data(transfer as usize, 4));
    check(
        &cdb::write10(LBA, BLOCKS),
        vec![write_data.clone()],
        transfer,
    );
    assert_eq!(
        check(&cdb::read10(LBA, BLOCKS), vec![], 0).data_in,
        write_data
    );
    let luns = [0u16, 1, 2, 3];
    let r = execute_no_lun(&cdb::report_luns(4096), &luns);
    assert_eq!(r.status, status::GOOD, "REPORT LUNS: {r:?}");

    let mut group = c.benchmark_group("cdb");
    group.throughput(Throughput::Elements(1));

    let tur = cdb::test_unit_ready();
    group.bench_function("test_unit_ready", |b| {
        b.to_async(&rt)
            .iter(|| lu.execute(NEXUS, black_box(&tur), Vec::new(), 0))
    });

    let inquiry = cdb::inquiry(36);
    group.bench_function("inquiry_std", |b| {
        b.to_async(&rt)
            .iter(|| lu.execute(NEXUS, black_box(&inquiry), Vec::new(), 0))
    });

    group.throughput(Throughput::Bytes(u64::from(transfer)));
    let read = cdb::read10(LBA, BLOCKS);
    group.bench_function("read10_8x512", |b| {
        b.to_async(&rt)
            .iter(|| lu.execute(NEXUS, black_box(&read), Vec::new(), 0))
    });

    let write = cdb::write10(LBA, BLOCKS);
    group.bench_function("write10_8x512", |b| {
        b.to_async(&rt).iter_batched(
            || vec![write_data.clone()],
            |data| lu.execute(NEXUS, black_box(&write), data, transfer),
            BatchSize::SmallInput,
        )
    });

    group.throughput(Throughput::Elements(1));
    let report = cdb::report_luns(4096);
    group.bench_function("report_luns_no_lun", |b| {
        b.iter(|| execute_no_lun(black_box(&report), black_box(&luns)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
