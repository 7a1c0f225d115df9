//! LUN backing stores through `target_core::lun::Store`: RAM (`memory`), a file through
//! io_uring (`io_uring`) and through the blocking thread pool (`threadpool`), plus one
//! O_DIRECT io_uring case (`io_uring_direct`).
//!
//! The file stores share one 256 MiB file, created sparse in a temporary directory (or in
//! `$KTGT_BENCH_DIR`, to measure another filesystem or device) and written through once
//! before any store opens it, so reads hit data (and, buffered, the page cache) rather than
//! holes. The RAM store is 256 MiB too, pre-written likewise.
//!
//! Cases, each at queue depth 1 and 32:
//! - `randread_4KiB`, `randwrite_4KiB`: 4 KiB at 4 KiB-aligned pseudo-random offsets over the
//!   whole store (a fixed table, the same every run).
//! - `seqread_128KiB`, `seqwrite_128KiB`: 128 KiB operations at consecutive offsets,
//!   wrapping at the end.
//!
//! Queue depth N means N tasks on a 2-worker multi-thread runtime, each issuing its share of
//! the batch one operation at a time (operation `n` goes to task `n % N`, so at depth 32 the
//! sequential cases keep a window of 32 consecutive operations in flight, like fio with
//! `iodepth=32`). One measured iteration is a fixed batch of operations started and awaited
//! together; throughput is in bytes. Writes are buffered and without FUA.
//!
//! What to expect: buffered file reads of at most 64 KiB that are in the page cache, and
//! buffered writes up to 256 KiB, are done on the caller's thread (`preadv2`/`pwritev2`, see
//! the `target_core::lun` docs), so the 4 KiB cases of the two file engines differ little;
//! 128 KiB reads and the O_DIRECT case go through the engine. The RAM store is one buffer
//! behind an `RwLock`, so its writes do not run in parallel.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ktgt_benches::pattern;
use target_core::lun::{uring_available, Engine, MemStore, Store, StoreConfig};
use tokio::runtime::Runtime;

const STORE_SIZE: u64 = 256 << 20;
const BLOCK: u32 = 512;
const DEPTHS: [usize; 2] = [1, 32];
/// Entries of the random offset table (4 KiB each: 256 MiB, the whole store).
const RANDOM_TABLE: usize = 64 << 10;

/// One workload shape.
#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    write: bool,
    len: usize,
    random: bool,
    /// Operations per measured iteration, the same at every depth.
    ops: u64,
}

const CASES: [Case; 4] = [
    Case {
        name: "randread_4KiB",
        write: false,
        len: 4 << 10,
        random: true,
        ops: 512,
    },
    Case {
        name: "randwrite_4KiB",
        write: true,
        len: 4 << 10,
        random: true,
        ops: 512,
    },
    Case {
        name: "seqread_128KiB",
        write: false,
        len: 128 << 10,
        random: false,
        ops: 128,
    },
    Case {
        name: "seqwrite_128KiB",
        write: true,
        len: 128 << 10,
        random: false,
        ops: 128,
    },
];

/// What every task of a batch needs.
#[derive(Clone)]
struct Workload {
    store: Store,
    case: Case,
    offsets: Arc<Vec<u64>>,
    data: Bytes,
}

impl Workload {
    fn offset(&self, n: u64) -> u64 {
        if self.case.random {
            self.offsets[(n % self.offsets.len() as u64) as usize]
        } else {
            (n * self.case.len as u64) % STORE_SIZE
        }
    }

    /// Operations `start..start + ops`, spread over `depth` tasks; returns when all are done.
    async fn batch(&self, start: u64, depth: usize) {
        let end = start + self.case.ops;
        let tasks: Vec<_> = (0..depth as u64)
            .map(|t| {
                let w = self.clone();
                tokio::spawn(async move {
                    let mut n = start + t;
                    while n < end {
                        let off = w.offset(n);
                        if w.case.write {
                            w.store.write(off, vec![w.data.clone()], false).await?;
                        } else {
                            let got = w.store.read(off, w.case.len).await?;
                            debug_assert_eq!(got.len(), w.case.len);
                        }
                        n += depth as u64;
                    }
                    Ok::<(), target_core::lun::BackendError>(())
                })
            })
            .collect();
        for t in tasks {
            t.await
                .expect("an I/O task panicked")
                .expect("store I/O failed");
        }
    }
}

/// Runs every case and depth against `store` in group `store/<name>`.
fn bench_store(c: &mut Criterion, rt: &Runtime, name: &str, store: Store, offsets: &Arc<Vec<u64>>) {
    let mut group = c.benchmark_group(format!("store/{name}"));
    for case in CASES {
        let w = Workload {
            store: store.clone(),
            case,
            offsets: offsets.clone(),
            data: Bytes::from(pattern::data(case.len, 5)),
        };
        group.throughput(Throughput::Bytes(case.ops * case.len as u64));
        for depth in DEPTHS {
            // Each iteration goes on where the last stopped, so the sequential cases sweep
            // the store and the random ones walk the whole table.
            let mut next = 0u64;
            group.bench_function(format!("{}/qd{depth}", case.name), |b| {
                b.iter(|| {
                    let start = next;
                    next += case.ops;
                    rt.block_on(w.batch(start, depth));
                })
            });
        }
    }
    group.finish();
}

/// The O_DIRECT variant: 4 KiB random reads at depth 32 only, which bypass the page cache
/// (and the inline fast path) and so measure the ring and the device.
fn bench_direct(c: &mut Criterion, rt: &Runtime, store: Store, offsets: &Arc<Vec<u64>>) {
    let case = CASES[0];
    let w = Workload {
        store,
        case,
        offsets: offsets.clone(),
        data: Bytes::new(),
    };
    let mut group = c.benchmark_group("store/io_uring_direct");
    group.throughput(Throughput::Bytes(case.ops * case.len as u64));
    let mut next = 0u64;
    group.bench_function(format!("{}/qd32", case.name), |b| {
        b.iter(|| {
            let start = next;
            next += case.ops;
            rt.block_on(w.batch(start, 32));
        })
    });
    group.finish();
}

/// Creates the sparse backing file and writes it through, then syncs it, so that neither
/// reads of holes nor writeback of the fill distort the measurements.
fn prepare_file(dir: &Path) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let path = dir.join("store-bench.img");
    let f = std::fs::File::create(&path).expect("create the bench file");
    f.set_len(STORE_SIZE).expect("size the bench file (sparse)");
    let chunk = pattern::data(1 << 20, 6);
    for off in (0..STORE_SIZE).step_by(chunk.len()) {
        f.write_all_at(&chunk, off).expect("fill the bench file");
    }
    f.sync_all().expect("sync the bench file");
    path
}

fn open(path: &Path, engine: Engine, direct: bool, block_size: u32) -> Result<Store, String> {
    let cfg = StoreConfig {
        direct,
        block_size,
        engine,
        ..StoreConfig::new(path, block_size)
    };
    Store::open(&cfg).map_err(|e| e.to_string())
}

fn benches(c: &mut Criterion) {
    let rt = ktgt_benches::runtime();
    let offsets = Arc::new(pattern::random_offsets(
        RANDOM_TABLE,
        STORE_SIZE,
        4 << 10,
        0x6b74_6774,
    ));

    // RAM.
    let mem = Store::Memory(MemStore::new(STORE_SIZE).expect("256 MiB of RAM"));
    let chunk = Bytes::from(pattern::data(1 << 20, 6));
    rt.block_on(async {
        for off in (0..STORE_SIZE).step_by(chunk.len()) {
            mem.write(off, vec![chunk.clone()], false)
                .await
                .expect("fill the RAM store");
        }
    });
    bench_store(c, &rt, "memory", mem, &offsets);

    // Files.
    let dir = match std::env::var_os("KTGT_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("a temporary directory for the bench file");
    let path = prepare_file(dir.path());

    match uring_available() {
        Ok(()) => {
            match open(&path, Engine::Uring, false, BLOCK) {
                Ok(s) => bench_store(c, &rt, "io_uring", s, &offsets),
                Err(e) => eprintln!("store/io_uring: skipped: cannot open the store: {e}"),
            }
            match open(&path, Engine::Uring, true, 4096) {
                Ok(s) => bench_direct(c, &rt, s, &offsets),
                Err(e) => eprintln!(
                    "store/io_uring_direct: skipped: O_DIRECT store on {} failed: {e}",
                    dir.path().display()
                ),
            }
        }
        Err(reason) => {
            eprintln!("store/io_uring: skipped: io_uring unavailable: {reason}");
            eprintln!("store/io_uring_direct: skipped: io_uring unavailable: {reason}");
        }
    }

    match open(&path, Engine::ThreadPool, false, BLOCK) {
        Ok(s) => bench_store(c, &rt, "threadpool", s, &offsets),
        Err(e) => eprintln!("store/threadpool: skipped: cannot open the store: {e}"),
    }
}

criterion_group!(store, benches);
criterion_main!(store);
