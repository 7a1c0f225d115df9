//! Store tests: open rules, error paths, concurrency, and a differential property test that
//! runs the same operations through [`MemStore`], the thread pool and io_uring (buffered and
//! O_DIRECT) and compares every read and the final files (STYLE.md §8). io_uring variants
//! skip, printing the reason, when [`uring_available`] fails.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;

use super::sys::{AlignedBuf, DIRECT_MEM_ALIGN};
use super::*;

const BS: u32 = 4096;
const BLOCKS: u64 = 32;
const SIZE: u64 = BLOCKS * BS as u64;

fn config(path: &Path, engine: Engine, direct: bool) -> StoreConfig {
    StoreConfig {
        path: path.to_path_buf(),
        direct,
        read_only: false,
        create_size: Some(SIZE),
        clone_from: None,
        block_size: BS,
        engine,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A file-backed variant under test.
#[derive(Debug, Clone, Copy)]
struct Variant {
    engine: Engine,
    direct: bool,
    name: &'static str,
}

/// Every file variant this machine can run; prints why io_uring ones are skipped.
fn variants() -> Vec<Variant> {
    let v = |engine, direct, name| Variant {
        engine,
        direct,
        name,
    };
    let mut all = vec![
        v(Engine::ThreadPool, false, "threadpool"),
        v(Engine::ThreadPool, true, "threadpool-direct"),
    ];
    match uring_available() {
        Ok(()) => all.extend([
            v(Engine::Uring, false, "uring"),
            v(Engine::Uring, true, "uring-direct"),
        ]),
        Err(reason) => eprintln!("skipping io_uring variants: {reason}"),
    }
    all
}

/// Opens `variant` at `path`, or `None` (printing why) when this filesystem has no O_DIRECT.
fn open_variant(path: &Path, variant: Variant) -> Option<Store> {
    match Store::open(&config(path, variant.engine, variant.direct)) {
        Ok(store) => Some(store),
        Err(BackendError::Open { source, .. })
            if variant.direct && source.raw_os_error() == Some(libc::EINVAL) =>
        {
            eprintln!("skipping {}: no O_DIRECT here: {source}", variant.name);
            None
        }
        Err(e) => panic!("open {}: {e}", variant.name),
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ ((i >> 9) as u8))
        .collect()
}

/// Splits `data` at `cuts` into parts sharing one allocation (page-aligned when `aligned`).
fn split(data: &[u8], cuts: &[usize], aligned: bool) -> Vec<Bytes> {
    let whole = if aligned {
        Bytes::from_owner(AlignedBuf::copy_from(
            &[Bytes::copy_from_slice(data)],
            DIRECT_MEM_ALIGN,
        ))
    } else {
        Bytes::copy_from_slice(data)
    };
    let mut cuts: Vec<usize> = cuts
        .iter()
        .map(|&c| {
            if aligned {
                c / BS as usize * BS as usize
            } else {
                c
            }
        })
        .filter(|&c| c > 0 && c < data.len())
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut parts = Vec::new();
    let mut start = 0;
    for c in cuts.into_iter().chain([data.len()]) {
        parts.push(whole.slice(start..c));
        start = c;
    }
    parts
}

#[derive(Debug, Clone)]
enum TestOp {
    Write {
        block: u64,
        blocks: u64,
        seed: u8,
        cuts: Vec<usize>,
        aligned: bool,
        fua: bool,
    },
    Read {
        block: u64,
        blocks: u64,
    },
    Discard {
        block: u64,
        blocks: u64,
    },
    WriteZeroes {
        block: u64,
        blocks: u64,
    },
    Flush,
    /// Straddles the end of the store: every backend must refuse it the same way.
    ReadPastEnd,
}

fn test_op() -> impl Strategy<Value = TestOp> {
    let range = (0..BLOCKS, 1..=8u64).prop_map(|(b, n)| (b, n.min(BLOCKS - b)));
    prop_oneof![
        5 => (
            range.clone(),
            any::<u8>(),
            proptest::collection::vec(0..8 * BS as usize, 0..4),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|((block, blocks), seed, cuts, aligned, fua)| TestOp::Write {
                block,
                blocks,
                seed,
                cuts,
                aligned,
                fua,
            }),
        4 => range.clone().prop_map(|(block, blocks)| TestOp::Read { block, blocks }),
        1 => range.clone().prop_map(|(block, blocks)| TestOp::Discard { block, blocks }),
        1 => range.prop_map(|(block, blocks)| TestOp::WriteZeroes { block, blocks }),
        1 => Just(TestOp::Flush),
        1 => Just(TestOp::ReadPastEnd),
    ]
}

/// Applies `op`; a read returns its bytes, errors become their message.
async fn apply(store: &Store, op: &TestOp) -> Result<Option<Bytes>, String> {
    let bs = u64::from(BS);
    let res = match op {
        TestOp::Write {
            block,
            blocks,
            seed,
            cuts,
            aligned,
            fua,
        } => {
            let data = pattern(*seed, (blocks * bs) as usize);
            store
                .write(block * bs, split(&data, cuts, *aligned), *fua)
                .await
                .map(|()| None)
        }
        TestOp::Read { block, blocks } => store
            .read(block * bs, (blocks * bs) as usize)
            .await
            .map(Some),
        TestOp::Discard { block, blocks } => {
            store.discard(block * bs, blocks * bs).await.map(|()| None)
        }
        TestOp::WriteZeroes { block, blocks } => store
            .write_zeroes(block * bs, blocks * bs)
            .await
            .map(|()| None),
        TestOp::Flush => store.flush().await.map(|()| None),
        TestOp::ReadPastEnd => store.read(SIZE - bs, 2 * bs as usize).await.map(Some),
    };
    res.map_err(|e| e.to_string())
}

fn differential(ops: Vec<TestOp>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mut stores = vec![("memory", Store::Memory(MemStore::new(SIZE).unwrap()))];
        for variant in variants() {
            if let Some(store) = open_variant(&dir.path().join(variant.name), variant) {
                prop_assert_eq!(store.size(), SIZE);
                stores.push((variant.name, store));
            }
        }
        for (i, op) in ops.iter().enumerate() {
            let expected = apply(&stores[0].1, op).await;
            for (name, store) in &stores[1..] {
                let got = apply(store, op).await;
                prop_assert_eq!(&got, &expected, "op #{} {:?} on {}", i, op, name);
            }
        }
        let image = stores[0].1.read(0, SIZE as usize).await.unwrap();
        for (name, store) in &stores[1..] {
            let got = store.read(0, SIZE as usize).await.unwrap();
            prop_assert!(got == image, "final contents differ on {}", name);
        }
        let names: Vec<&str> = stores[1..].iter().map(|(n, _)| *n).collect();
        drop(stores);
        for name in names {
            let file = std::fs::read(dir.path().join(name)).unwrap();
            prop_assert_eq!(file.len() as u64, SIZE);
            prop_assert!(file == image[..], "file of {} differs", name);
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn lun_backends_agree_with_memory(ops in proptest::collection::vec(test_op(), 1..48)) {
        differential(ops)?;
    }
}

#[test]
fn open_missing_path_without_create_size_names_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.img");
    let mut cfg = config(&path, Engine::ThreadPool, false);
    cfg.create_size = None;
    let err = Store::open(&cfg).unwrap_err();
    assert!(
        matches!(&err, BackendError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound),
        "{err:?}"
    );
    assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    assert!(!path.exists());
}

#[test]
fn create_size_creates_a_sparse_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.img");
    let mut cfg = config(&path, Engine::Auto, false);
    cfg.create_size = Some(1 << 30);
    let store = Store::open(&cfg).unwrap();
    assert_eq!(store.size(), 1 << 30);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    // st_blocks counts 512-byte units actually allocated.
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "{} blocks allocated",
        meta.blocks()
    );
}

#[test]
fn a_clone_where_the_filesystem_cannot_reflink_is_refused_and_leaves_nothing() {
    // Source on tmpfs (/dev/shm), copy beside it or in /tmp: tmpfs has no reflink, and
    // across filesystems there is none (EXDEV). Either way no data may be copied.
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let source = shm.path().join("source.img");
    std::fs::write(&source, pattern(3, 4 * BS as usize)).unwrap();
    let other = tempfile::tempdir().unwrap();
    // The leftover of an attempt cut short (a crash) goes with the next attempt.
    std::fs::write(other.path().join(".copy.img.clone"), b"stale").unwrap();
    for dir in [shm.path(), other.path()] {
        let path = dir.join("copy.img");
        let mut cfg = config(&path, Engine::ThreadPool, false);
        cfg.clone_from = Some(source.clone());
        let err = Store::open(&cfg).unwrap_err();
        assert!(
            matches!(err, BackendError::CloneUnsupported { .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("reflink") && text.contains("no data was copied"),
            "{text}"
        );
        let left: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "source.img")
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

#[test]
fn a_clone_of_a_missing_or_irregular_source_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("copy.img");
    let mut cfg = config(&path, Engine::ThreadPool, false);
    cfg.clone_from = Some(dir.path().join("absent.img"));
    let err = Store::open(&cfg).unwrap_err();
    assert!(
        matches!(&err, BackendError::Open { path: p, source } if p.ends_with("absent.img") && source.kind() == io::ErrorKind::NotFound),
        "{err:?}"
    );
    cfg.clone_from = Some(dir.path().to_path_buf());
    let err = Store::open(&cfg).unwrap_err();
    assert!(matches!(err, BackendError::Invalid { .. }), "{err:?}");
    assert!(!path.exists());
}

#[test]
fn a_clone_never_replaces_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = (dir.path().join("a.img"), dir.path().join("b.img"));
    std::fs::write(&source, pattern(1, BS as usize)).unwrap();
    std::fs::write(&dest, pattern(2, BS as usize)).unwrap();
    let err = clone::reflink(&source, &dest, None).unwrap_err();
    assert!(
        matches!(&err, BackendError::Open { source, .. } if source.kind() == io::ErrorKind::AlreadyExists),
        "{err:?}"
    );
    assert_eq!(std::fs::read(&dest).unwrap(), pattern(2, BS as usize));
}

#[test]
fn create_size_is_validated_before_creating() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.img");
    let mut cfg = config(&path, Engine::ThreadPool, false);
    cfg.create_size = Some(5000);
    let err = Store::open(&cfg).unwrap_err();
    assert!(matches!(err, BackendError::Invalid { .. }), "{err:?}");
    assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    assert!(!path.exists());
}

#[test]
fn existing_file_is_neither_truncated_nor_grown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("existing.img");
    let data = pattern(9, 2 * BS as usize);
    std::fs::write(&path, &data).unwrap();
    let rt = runtime();
    for variant in variants() {
        let mut cfg = config(&path, variant.engine, variant.direct);
        cfg.create_size = Some(1 << 20);
        let store = Store::open(&cfg).unwrap();
        assert_eq!(store.size(), data.len() as u64, "{}", variant.name);
        let got = rt.block_on(store.read(0, data.len())).unwrap();
        assert!(got == data, "{}", variant.name);
    }
    assert_eq!(std::fs::read(&path).unwrap(), data);
}

#[test]
fn size_not_multiple_of_block_size_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.img");
    std::fs::write(&path, vec![0u8; 1000]).unwrap();
    let mut cfg = config(&path, Engine::Auto, false);
    cfg.block_size = 512;
    let err = Store::open(&cfg).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, BackendError::Invalid { .. }), "{err:?}");
    assert!(
        msg.contains(&*path.to_string_lossy()) && msg.contains("multiple"),
        "{msg}"
    );
}

#[test]
fn bad_block_size_and_non_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.img");
    let mut cfg = config(&path, Engine::ThreadPool, false);
    cfg.block_size = 1000;
    assert!(matches!(
        Store::open(&cfg),
        Err(BackendError::Invalid { .. })
    ));
    for special in ["/dev/null", "/tmp"] {
        let mut cfg = config(Path::new(special), Engine::ThreadPool, false);
        cfg.read_only = true;
        let err = Store::open(&cfg).unwrap_err();
        assert!(err.to_string().contains(special), "{err}");
    }
}

#[test]
fn unwritable_file_is_rejected_for_a_read_write_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.img");
    std::fs::write(&path, vec![0u8; BS as usize]).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    // Root ignores permission bits; an immutable file stops it too, when chattr works.
    let writable = || std::fs::OpenOptions::new().write(true).open(&path).is_ok();
    let mut immutable = false;
    if writable() {
        immutable = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !immutable || writable() {
            eprintln!("skipping: cannot make a file unwritable for this user");
            return;
        }
    }
    let result = Store::open(&config(&path, Engine::Auto, false));
    let ro = Store::open(&StoreConfig {
        read_only: true,
        ..config(&path, Engine::Auto, false)
    });
    if immutable {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&path)
            .status();
    }
    let err = result.unwrap_err();
    assert!(matches!(err, BackendError::Open { .. }), "{err:?}");
    assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    assert!(ro.is_ok(), "read-only open must still work: {:?}", ro.err());
}

#[test]
fn read_only_store_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    for variant in variants() {
        let path = dir.path().join(variant.name);
        let Some(store) = open_variant(&path, variant) else {
            continue;
        };
        drop(store);
        let store = Store::open(&StoreConfig {
            read_only: true,
            create_size: None,
            clone_from: None,
            ..config(&path, variant.engine, variant.direct)
        })
        .unwrap();
        assert!(store.read_only());
        rt.block_on(async {
            let data = vec![Bytes::from(vec![1u8; BS as usize])];
            let name = variant.name;
            assert!(
                matches!(
                    store.write(0, data, false).await,
                    Err(BackendError::ReadOnly)
                ),
                "{name}"
            );
            assert!(
                matches!(store.discard(0, 4096).await, Err(BackendError::ReadOnly)),
                "{name}"
            );
            assert!(
                matches!(
                    store.write_zeroes(0, 4096).await,
                    Err(BackendError::ReadOnly)
                ),
                "{name}"
            );
            assert!(store.flush().await.is_ok(), "{name}");
            let got = store.read(0, BS as usize).await.unwrap();
            assert!(got.iter().all(|&b| b == 0), "{name}");
        });
    }
}

#[test]
fn read_beyond_a_shrunk_file_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    for variant in variants() {
        let path = dir.path().join(variant.name);
        let Some(store) = open_variant(&path, variant) else {
            continue;
        };
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(SIZE / 2)
            .unwrap();
        let res = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                store.read(SIZE - u64::from(BS), BS as usize),
            )
            .await
        });
        let res = res.unwrap_or_else(|_| panic!("{} hung", variant.name));
        assert!(
            matches!(res, Err(BackendError::Io(_))),
            "{}: {res:?}",
            variant.name
        );
        // A read that starts inside the file but runs past its end fails as well.
        let res = rt.block_on(store.read(SIZE / 2 - u64::from(BS), 2 * BS as usize));
        assert!(
            matches!(res, Err(BackendError::Io(_))),
            "{}: {res:?}",
            variant.name
        );
    }
}

#[test]
fn misaligned_direct_ranges_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    for variant in variants().into_iter().filter(|v| v.direct) {
        let Some(store) = open_variant(&dir.path().join(variant.name), variant) else {
            continue;
        };
        let res = rt.block_on(store.read(100, BS as usize));
        assert!(
            matches!(res, Err(BackendError::Misaligned { .. })),
            "{res:?}"
        );
        let res = rt.block_on(store.write(0, vec![Bytes::from(vec![1u8; 100])], false));
        assert!(
            matches!(res, Err(BackendError::Misaligned { .. })),
            "{res:?}"
        );
    }
}

#[test]
fn engine_choice_is_reported_by_kind() {
    let dir = tempfile::tempdir().unwrap();
    let open = |engine| Store::open(&config(&dir.path().join("k.img"), engine, false)).unwrap();
    assert_eq!(open(Engine::ThreadPool).kind(), "threadpool");
    let auto = open(Engine::Auto).kind();
    match uring_available() {
        Ok(()) => {
            assert_eq!(open(Engine::Uring).kind(), "io_uring");
            assert_eq!(auto, "io_uring");
        }
        Err(reason) => {
            assert_eq!(auto, "threadpool");
            let err = Store::open(&config(&dir.path().join("k.img"), Engine::Uring, false));
            assert!(matches!(err, Err(BackendError::Unsupported(_))), "{reason}");
        }
    }
}

#[test]
fn queue_depth_32_completes() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    for variant in variants() {
        let Some(store) = open_variant(&dir.path().join(variant.name), variant) else {
            continue;
        };
        rt.block_on(async {
            for round in 0..8u8 {
                let mut set = tokio::task::JoinSet::new();
                for i in 0..32u64 {
                    let store = store.clone();
                    set.spawn(async move {
                        let data = Bytes::from(pattern(round ^ i as u8, BS as usize));
                        store.write(i * u64::from(BS), vec![data], i % 4 == 0).await
                    });
                }
                let all = tokio::time::timeout(Duration::from_secs(30), set.join_all()).await;
                for res in all.unwrap_or_else(|_| panic!("{} writes hung", variant.name)) {
                    res.unwrap();
                }
                let mut set = tokio::task::JoinSet::new();
                for i in 0..32u64 {
                    let store = store.clone();
                    set.spawn(async move {
                        let got = store.read(i * u64::from(BS), BS as usize).await.unwrap();
                        got == pattern(round ^ i as u8, BS as usize)
                    });
                }
                let all = tokio::time::timeout(Duration::from_secs(30), set.join_all()).await;
                let all = all.unwrap_or_else(|_| panic!("{} reads hung", variant.name));
                assert!(
                    all.into_iter().all(|ok| ok),
                    "{} round {round}",
                    variant.name
                );
            }
        });
    }
}

#[test]
fn many_small_segments_beyond_iov_max() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    for variant in variants() {
        let Some(store) = open_variant(&dir.path().join(variant.name), variant) else {
            continue;
        };
        let data = pattern(3, SIZE as usize);
        // 2048 parts of 64 bytes: more than one writev can take.
        let whole = Bytes::from(data.clone());
        let parts: Vec<Bytes> = (0..data.len() / 64)
            .map(|i| whole.slice(i * 64..(i + 1) * 64))
            .collect();
        rt.block_on(async {
            store.write(0, parts, true).await.unwrap();
            assert!(
                store.read(0, SIZE as usize).await.unwrap() == data,
                "{}",
                variant.name
            );
        });
    }
}

#[test]
fn discard_reads_back_zeroes_and_frees_space() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    for variant in variants() {
        let path = dir.path().join(variant.name);
        let Some(store) = open_variant(&path, variant) else {
            continue;
        };
        rt.block_on(async {
            let data = Bytes::from(pattern(5, SIZE as usize));
            store.write(0, vec![data], false).await.unwrap();
            store.flush().await.unwrap();
            let before = std::fs::metadata(&path).unwrap().blocks();
            store.discard(0, SIZE / 2).await.unwrap();
            store.write_zeroes(SIZE / 2, u64::from(BS)).await.unwrap();
            let got = store
                .read(0, SIZE as usize / 2 + BS as usize)
                .await
                .unwrap();
            assert!(got.iter().all(|&b| b == 0), "{}", variant.name);
            let after = std::fs::metadata(&path).unwrap().blocks();
            if store.supports_discard() {
                assert!(
                    after < before,
                    "{}: {before} -> {after} blocks",
                    variant.name
                );
            }
        });
    }
}

#[test]
fn cancelled_operations_and_dropped_store_are_safe() {
    let Ok(()) = uring_available().map_err(|r| eprintln!("skipping: {r}")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cancel.img");
    let rt = runtime();
    for direct in [false, true] {
        let Some(store) = open_variant(
            &path,
            Variant {
                engine: Engine::Uring,
                direct,
                name: "uring",
            },
        ) else {
            continue;
        };
        rt.block_on(async {
            for i in 0..64u64 {
                let block = (i % BLOCKS) * u64::from(BS);
                // Polled once, then dropped: the ring keeps the buffers until completion.
                let _ = tokio::time::timeout(Duration::ZERO, store.read(block, BS as usize)).await;
                let data = vec![Bytes::from(vec![i as u8; BS as usize])];
                let _ = tokio::time::timeout(Duration::ZERO, store.write(block, data, false)).await;
            }
        });
        drop(store);
        let store = open_variant(
            &path,
            Variant {
                engine: Engine::Uring,
                direct,
                name: "uring",
            },
        )
        .unwrap();
        rt.block_on(async {
            store
                .write(0, vec![Bytes::from(vec![7u8; BS as usize])], true)
                .await
                .unwrap();
            let got = store.read(0, BS as usize).await.unwrap();
            assert!(got.iter().all(|&b| b == 7));
        });
    }
}

/// Rings are per thread: stores used from several threads, each with its own current-thread
/// runtime (as connection threads are), complete on each thread's own ring and agree on the
/// data.
#[test]
fn uring_rings_per_thread_serve_the_same_store() {
    let Ok(()) = uring_available().map_err(|r| eprintln!("skipping: {r}")) else {
        return;
    };
    // 3 threads x 10 blocks of the 32-block test file.
    const CHUNK: u64 = BS as u64;
    const PER_THREAD: u64 = 10;
    let dir = tempfile::tempdir().unwrap();
    for direct in [false, true] {
        let cfg = config(
            &dir.path().join(format!("threads-{direct}.img")),
            Engine::Uring,
            direct,
        );
        let store = Store::open(&cfg).unwrap();
        let threads: Vec<_> = (0..3u8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async {
                        for i in 0..PER_THREAD {
                            let at = (u64::from(t) * PER_THREAD + i) * CHUNK;
                            let fill = Bytes::from(vec![t * 50 + i as u8; CHUNK as usize]);
                            store
                                .write(at, vec![fill.clone()], i % 8 == 0)
                                .await
                                .unwrap();
                            assert_eq!(store.read(at, CHUNK as usize).await.unwrap(), fill);
                        }
                    });
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread ran its operations");
        }
        let rt = runtime();
        rt.block_on(async {
            for t in 0..3u8 {
                for i in 0..PER_THREAD {
                    let got = store
                        .read((u64::from(t) * PER_THREAD + i) * CHUNK, CHUNK as usize)
                        .await
                        .unwrap();
                    assert!(
                        got.iter().all(|&b| b == t * 50 + i as u8),
                        "direct={direct}"
                    );
                }
            }
        });
    }
}

#[test]
fn uring_file_is_released_after_last_clone_and_operation() {
    let Ok(()) = uring_available().map_err(|r| eprintln!("skipping: {r}")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let cfg = config(&dir.path().join("exit.img"), Engine::Uring, false);
    let Store::Uring(store) = Store::open(&cfg).unwrap() else {
        panic!("Engine::Uring gave another backend");
    };
    let file = store.file_weak();
    let clone = Store::Uring(store.clone());
    rt.block_on(async {
        clone
            .write(0, vec![Bytes::from(vec![1u8; 4096])], false)
            .await
            .unwrap();
        // Leave some operations in flight, abandoned by their callers.
        for _ in 0..16 {
            let _ = tokio::time::timeout(Duration::ZERO, clone.read(0, 4096)).await;
        }
    });
    drop(clone);
    assert!(file.upgrade().is_some(), "one clone is still alive");
    drop(store);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while file.upgrade().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the file is still held after its operations finished"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Rough throughput numbers, not a benchmark suite (that is `benches/`). Run with
/// `cargo test --release -p target-core lun::tests::throughput -- --ignored --nocapture`.
#[test]
#[ignore = "timing only; run by hand in release mode"]
fn throughput() {
    const FILE: u64 = 256 << 20;
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    for variant in variants() {
        let path = dir.path().join(variant.name);
        let mut cfg = config(&path, variant.engine, variant.direct);
        cfg.create_size = Some(FILE);
        let store = Store::open(&cfg).unwrap();
        rt.block_on(async {
            // Fill so reads hit allocated blocks.
            let chunk = Bytes::from(vec![0xa5u8; 1 << 20]);
            for off in (0..FILE).step_by(1 << 20) {
                store.write(off, vec![chunk.clone()], false).await.unwrap();
            }
            store.flush().await.unwrap();
            for (label, len, seq) in [("4k-rand", 4096usize, false), ("128k-seq", 128 << 10, true)]
            {
                for qd in [1usize, 32] {
                    for write in [false, true] {
                        let ops = if len == 4096 { 20_000 } else { 4_000 };
                        let start = std::time::Instant::now();
                        let mut set = tokio::task::JoinSet::new();
                        for w in 0..qd {
                            let store = store.clone();
                            let data = Bytes::from(vec![w as u8; len]);
                            set.spawn(async move {
                                let mut x = (w as u64 + 1) * 0x9e37_79b9_7f4a_7c15;
                                let slots = FILE / len as u64;
                                for i in 0..ops / qd {
                                    x ^= x << 13;
                                    x ^= x >> 7;
                                    x ^= x << 17;
                                    let slot = if seq {
                                        (w * (ops / qd) + i) as u64 % slots
                                    } else {
                                        x % slots
                                    };
                                    let off = slot * len as u64;
                                    if write {
                                        store.write(off, vec![data.clone()], false).await.unwrap();
                                    } else {
                                        store.read(off, len).await.unwrap();
                                    }
                                }
                            });
                        }
                        set.join_all().await;
                        let secs = start.elapsed().as_secs_f64();
                        let done = (ops / qd * qd) as f64;
                        println!(
                            "{:<18} {:<8} {:<5} qd{:<2} {:>9.0} IOPS {:>8.1} MiB/s",
                            variant.name,
                            label,
                            if write { "write" } else { "read" },
                            qd,
                            done / secs,
                            done * len as f64 / secs / (1 << 20) as f64
                        );
                    }
                }
            }
        });
    }
}

/// Detaches a loop device when dropped.
struct LoopDevice(std::path::PathBuf);

impl LoopDevice {
    /// Attaches `file` with `losetup`, or `None` (printing why) when that is not possible.
    fn attach(file: &Path) -> Option<LoopDevice> {
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output();
        match out {
            Ok(out) if out.status.success() => {
                let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                Some(LoopDevice(dev.into()))
            }
            Ok(out) => {
                let err = String::from_utf8_lossy(&out.stderr);
                eprintln!("skipping: losetup failed: {}", err.trim());
                None
            }
            Err(e) => {
                eprintln!("skipping: cannot run losetup: {e}");
                None
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn block_device_backing_through_a_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("loop.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let Some(dev) = LoopDevice::attach(&image) else {
        return;
    };
    let rt = runtime();
    for variant in variants() {
        let cfg = StoreConfig {
            create_size: None,
            clone_from: None,
            ..config(&dev.0, variant.engine, variant.direct)
        };
        let store = Store::open(&cfg).unwrap_or_else(|e| panic!("{}: {e}", variant.name));
        assert_eq!(store.size(), SIZE, "{}", variant.name);
        rt.block_on(async {
            let bs = u64::from(BS);
            let data = pattern(11, 4 * BS as usize);
            let parts = split(&data, &[100, 5000], false);
            store.write(bs, parts, true).await.unwrap();
            assert!(
                store.read(bs, data.len()).await.unwrap() == data,
                "{}",
                variant.name
            );
            store.discard(bs, bs).await.unwrap();
            store.write_zeroes(2 * bs, bs).await.unwrap();
            store.flush().await.unwrap();
            let got = store.read(bs, data.len()).await.unwrap();
            assert!(
                got[..2 * BS as usize].iter().all(|&b| b == 0),
                "{}",
                variant.name
            );
            assert!(
                got[2 * BS as usize..] == data[2 * BS as usize..],
                "{}",
                variant.name
            );
            let res = store.read(SIZE - bs, 2 * BS as usize).await;
            assert!(
                matches!(res, Err(BackendError::OutOfRange { .. })),
                "{res:?}"
            );
        });
    }
}

#[test]
fn cached_read_fast_path_returns_the_file_contents() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cached.img");
    let data = pattern(9, SIZE as usize);
    std::fs::write(&path, &data).unwrap();
    let shared = file::FileShared::open(&config(&path, Engine::ThreadPool, false)).unwrap();
    // Just written, so in the page cache: served inline, byte for byte.
    let got = shared
        .read_cached(3 * BS as u64, 5 * BS as usize)
        .expect("cached");
    assert_eq!(&got[..], &data[3 * BS as usize..8 * BS as usize]);
    // O_DIRECT stores never take the fast path.
    let direct = file::FileShared::open(&config(&path, Engine::ThreadPool, true)).unwrap();
    assert!(direct.read_cached(0, BS as usize).is_none());
    // Whatever the filesystem says about non-blocking writes, a write through the store
    // lands, and reads back through the fast path.
    let rt = runtime();
    let store = Store::open(&config(&path, Engine::ThreadPool, false)).unwrap();
    let new = pattern(77, 2 * BS as usize);
    let parts = split(&new, &[100, 5000], false);
    rt.block_on(store.write(BS as u64, parts, false)).unwrap();
    let back = rt.block_on(store.read(BS as u64, new.len())).unwrap();
    assert_eq!(&back[..], &new[..]);
    // Inline writes paused (as after a slow one): nothing is written inline, and the
    // engine writes instead.
    shared.pause_inline_writes(std::time::Duration::from_millis(50));
    let n = shared.write_cached(0, &[Bytes::from_static(b"x")]);
    assert!(
        n == 0 || shared.has_nowait_writes(),
        "paused: {n} bytes written inline"
    );
}

#[test]
fn advance_drops_whole_and_partial_parts() {
    let parts = || vec![Bytes::from_static(b"abc"), Bytes::from_static(b"defg")];
    let flat = |v: Vec<Bytes>| v.iter().flat_map(|b| b.to_vec()).collect::<Vec<u8>>();
    assert_eq!(flat(file::advance(parts(), 0)), b"abcdefg");
    assert_eq!(flat(file::advance(parts(), 2)), b"cdefg");
    assert_eq!(flat(file::advance(parts(), 3)), b"defg");
    assert_eq!(flat(file::advance(parts(), 5)), b"fg");
    assert!(flat(file::advance(parts(), 7)).is_empty());
}

#[test]
fn uring_store_outlives_the_runtime_that_started_its_reaper() {
    let Ok(()) = uring_available().map_err(|r| eprintln!("skipping: {r}")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir.path().join("rt.img"), Engine::Uring, false);
    let store = Store::open(&cfg).unwrap();
    let first = runtime();
    first.block_on(async {
        store
            .write(0, vec![Bytes::from(vec![3u8; 128 << 10])], false)
            .await
            .unwrap();
        // Some operations (larger than the page-cache fast path takes, so they go to the
        // ring) left in flight when the runtime goes away.
        for _ in 0..8 {
            let _ = tokio::time::timeout(Duration::ZERO, store.read(0, 128 << 10)).await;
        }
    });
    drop(first);
    // A new runtime gets a new reaper; nothing hangs and the data is there.
    let second = runtime();
    second.block_on(async {
        let got = tokio::time::timeout(Duration::from_secs(5), store.read(0, 128 << 10))
            .await
            .expect("read completes on the second runtime")
            .unwrap();
        assert!(got.iter().all(|&b| b == 3));
    });
}

/// More parts than one `pwritev2` takes (1024 iovecs): the short writes continue where they
/// stopped and every byte lands in order.
#[test]
fn pwrite_all_continues_across_many_tiny_parts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("parts.img");
    let file = std::fs::File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    // 3000 parts of 1 to 3 bytes, one empty in between.
    let parts: Vec<Bytes> = (0..3000u32)
        .map(|i| {
            let len = if i == 1500 { 0 } else { (i % 3 + 1) as usize };
            Bytes::from(vec![(i % 251) as u8; len])
        })
        .collect();
    let want: Vec<u8> = parts.iter().flat_map(|b| b.to_vec()).collect();
    super::sys::pwrite_all(&file, &parts, 4096, false).unwrap();
    let got = std::fs::read(&path).unwrap();
    assert_eq!(got.len(), 4096 + want.len());
    assert!(got[4096..] == want[..], "bytes out of order or lost");
}
