//! PDU framing cost: `Codec::decode` and `Codec::encode` of SCSI data PDUs.
//!
//! Decode uses a Data-Out PDU and encode a Data-In PDU: those are the directions the target
//! handles (it decodes what the initiator writes and encodes what it reads). Each is measured
//! header only (a 48-byte BHS, as for every command and status) and with 8 KiB, 64 KiB and
//! 256 KiB data segments, without digests and with CRC32C header and data digests.
//!
//! - `decode/data_out/...`: one PDU from a `BytesMut` that holds exactly that PDU. The buffer is rebuilt
//!   outside the timing (`iter_batched`), so what is measured is framing, the zero-copy split
//!   of the data segment and, with digests, the CRC32C check over header and data.
//! - `encode/data_in/...`: into a `BytesMut` reused (cleared) between iterations, so no allocation is
//!   measured, but the data segment is copied into it.
//! - `encode/data_in_head_tail/...`: `encode_head` + `encode_tail` only, what the session writer does
//!   (it sends the data segment from its own `Bytes` with a vectored write, uncopied).

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use iscsi_proto::pdu::{DataIn, DataOut, Header};
use iscsi_proto::types::{Itt, Lun, Sn, Ttt};
use iscsi_proto::{Codec, Pdu};
use ktgt_benches::pattern;

/// Data segment sizes: none (header only), then typical MaxRecvDataSegmentLength values.
const SIZES: [(usize, &str); 4] = [
    (0, "header"),
    (8 << 10, "8KiB"),
    (64 << 10, "64KiB"),
    (256 << 10, "256KiB"),
];

fn codec(digests: bool) -> Codec {
    Codec {
        header_digest: digests,
        data_digest: digests,
        max_recv_data_segment_length: 256 << 10,
    }
}

fn digest_name(digests: bool) -> &'static str {
    if digests {
        "crc32c"
    } else {
        "none"
    }
}

fn data_out(data: Bytes) -> Pdu {
    Pdu::new(
        Header::DataOut(DataOut {
            final_: true,
            lun: Lun::default(),
            itt: Itt(0x1234),
            ttt: Ttt(0x55),
            exp_stat_sn: Sn(1000),
            data_sn: Sn(3),
            buffer_offset: 3 << 18,
        }),
        data,
    )
}

fn data_in(data: Bytes) -> Pdu {
    Pdu::new(
        Header::DataIn(DataIn {
            final_: true,
            acknowledge: false,
            overflow: false,
            underflow: false,
            status_present: true,
            status: 0,
            lun: Lun::default(),
            itt: Itt(0x1234),
            ttt: Ttt::RESERVED,
            stat_sn: Sn(2000),
            exp_cmd_sn: Sn(1001),
            max_cmd_sn: Sn(1128),
            data_sn: Sn(0),
            buffer_offset: 0,
            residual_count: 0,
        }),
        data,
    )
}

/// Bytes counted per PDU: the whole frame on the wire.
fn throughput(wire_len: usize) -> Throughput {
    Throughput::Bytes(wire_len as u64)
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("pdu/decode");
    for digests in [false, true] {
        for (size, name) in SIZES {
            let mut codec = codec(digests);
            let wire = codec.encode_to_bytes(&data_out(Bytes::from(pattern::data(size, 1))));
            // A small batch bounds the memory held by prepared 256 KiB inputs.
            let batch = if size == 0 {
                BatchSize::SmallInput
            } else {
                BatchSize::NumIterations(32)
            };
            group.throughput(throughput(wire.len()));
            group.bench_function(format!("data_out/{name}/{}", digest_name(digests)), |b| {
                b.iter_batched(
                    || BytesMut::from(&wire[..]),
                    |mut buf| {
                        codec
                            .decode(black_box(&mut buf))
                            .expect("a well-formed PDU decodes")
                            .expect("the buffer holds a whole PDU")
                    },
                    batch,
                )
            });
        }
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("pdu/encode");
    for digests in [false, true] {
        for (size, name) in SIZES {
            let codec = codec(digests);
            let pdu = data_in(Bytes::from(pattern::data(size, 2)));
            let wire_len = codec.encode_to_bytes(&pdu).len();
            let mut buf = BytesMut::with_capacity(wire_len);
            group.throughput(throughput(wire_len));
            group.bench_function(format!("data_in/{name}/{}", digest_name(digests)), |b| {
                b.iter(|| {
                    buf.clear();
                    codec.encode(black_box(&pdu), &mut buf);
                    black_box(buf.len())
                })
            });
            group.bench_function(
                format!("data_in_head_tail/{name}/{}", digest_name(digests)),
                |b| {
                    b.iter(|| {
                        buf.clear();
                        codec.encode_head(black_box(&pdu), &mut buf);
                        codec.encode_tail(&pdu, &mut buf);
                        black_box(buf.len())
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
