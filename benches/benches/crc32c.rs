//! CRC32C (RFC 7143 §13.1 digests) as `iscsi_proto::codec::crc32c` computes it, over a BHS
//! (48 bytes: every header digest) and over data segments of 8 KiB, 64 KiB and 256 KiB (data
//! digests). The `crc32c` crate uses SSE 4.2 / ARMv8 CRC instructions where the CPU has
//! them, so this says what enabling digests costs per byte on this machine.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use iscsi_proto::codec::crc32c;
use ktgt_benches::pattern;

const SIZES: [(usize, &str); 4] = [
    (48, "48B"),
    (8 << 10, "8KiB"),
    (64 << 10, "64KiB"),
    (256 << 10, "256KiB"),
];

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("crc32c");
    for (size, name) in SIZES {
        let data = pattern::data(size, 3);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(name, |b| b.iter(|| crc32c(black_box(&data))));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
