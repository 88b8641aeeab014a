//! Micro-benchmarks of the pipeline's CPU stages: `cargo bench -p fleetvault-common`.
//!
//! Inputs are 32 MiB, deterministic: "text" (repetitive lines, like a SQL dump) and "random"
//! (incompressible, like uploaded media). Throughput is reported per input byte.

#![allow(missing_docs)] // criterion's macros define undocumented items

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fleetvault_common::chunk::{open_verified, seal};
use fleetvault_common::protocol::frame::{decode_body, encode};
use fleetvault_common::protocol::Request;
use fleetvault_common::{ChunkId, Chunker, ChunkerParams};

const LEN: usize = 32 << 20;

fn random(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn text(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!(
                "{i}\t{}\tuser-{}\thello from channel {} at 2026-02-{:02}\n",
                i * 7919 % 100_003,
                i % 500,
                i % 40,
                1 + i % 28
            )
            .as_bytes(),
        );
        i += 1;
    }
    out.truncate(len);
    out
}

fn inputs() -> [(&'static str, Vec<u8>); 2] {
    [("text", text(LEN)), ("random", random(LEN))]
}

fn chunking(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunk+hash");
    g.sample_size(10).throughput(Throughput::Bytes(LEN as u64));
    for (name, data) in inputs() {
        for (label, params) in [
            ("64k/256k/1m", ChunkerParams::default()),
            (
                "16k/64k/256k",
                ChunkerParams {
                    min: 16 << 10,
                    avg: 64 << 10,
                    max: 256 << 10,
                },
            ),
        ] {
            g.bench_with_input(BenchmarkId::new(label, name), &data, |b, data| {
                b.iter(|| {
                    let mut ch = Chunker::new(&data[..], params);
                    let mut n = 0;
                    while let Some(c) = ch.next_chunk().expect("in memory") {
                        n += c.data.len();
                    }
                    black_box((n, ch.checksum()))
                })
            });
        }
    }
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("blake3");
    g.sample_size(10).throughput(Throughput::Bytes(LEN as u64));
    let data = random(LEN);
    g.bench_function("256k chunks", |b| {
        b.iter(|| {
            for part in data.chunks(256 << 10) {
                black_box(ChunkId::of(part));
            }
        })
    });
    g.finish();
}

fn sealing(c: &mut Criterion) {
    let mut g = c.benchmark_group("seal+open");
    g.sample_size(10).throughput(Throughput::Bytes(LEN as u64));
    for (name, data) in inputs() {
        let chunks: Vec<&[u8]> = data.chunks(256 << 10).collect();
        for level in [1, 2, 3] {
            g.bench_with_input(
                BenchmarkId::new(format!("seal zstd-{level}"), name),
                &chunks,
                |b, chunks| {
                    b.iter(|| {
                        let mut stored = 0;
                        for c in chunks {
                            stored += seal(c, level).len();
                        }
                        black_box(stored)
                    })
                },
            );
            let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
            let sealed: Vec<Vec<u8>> = chunks.iter().map(|c| seal(c, level)).collect();
            let stored: usize = sealed.iter().map(Vec::len).sum();
            eprintln!("{name} zstd-{level}: {stored} bytes stored of {LEN}");
            g.bench_with_input(
                BenchmarkId::new(format!("open+verify zstd-{level}"), name),
                &sealed,
                |b, sealed| {
                    b.iter(|| {
                        for (env, id) in sealed.iter().zip(&ids) {
                            black_box(open_verified(env, id).expect("valid"));
                        }
                    })
                },
            );
        }
    }
    g.finish();
}

fn framing(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    let envelope = seal(&random(256 << 10), 3);
    let msg = Request::Chunk {
        id: ChunkId::of(&envelope),
        envelope,
    };
    g.throughput(Throughput::Bytes(256 << 10));
    g.bench_function("encode 256k chunk", |b| b.iter(|| black_box(encode(&msg))));
    let frame = encode(&msg);
    g.bench_function("decode 256k chunk", |b| {
        b.iter(|| black_box(decode_body::<Request>(&frame[4..]).expect("valid")))
    });
    g.finish();
}

criterion_group!(benches, chunking, hashing, sealing, framing);
criterion_main!(benches);
