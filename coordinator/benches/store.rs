//! Micro-benchmark of the chunk store: `cargo bench -p fleetvault-coordinator`.
//!
//! `put` writes 8 MiB batches of sealed 256 KiB chunks (the size the upload session collects
//! before one durable write: verify, write, fsync each file, rename, fsync the directories) into
//! a fresh store; `get` reads them back. The store lives under `$TMPDIR`: run it on the disk the
//! coordinator would use.

#![allow(missing_docs)] // criterion's macros define undocumented items

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use fleetvault_common::chunk::seal;
use fleetvault_common::ChunkId;

#[allow(dead_code, unreachable_pub, unused_imports)] // the bench uses part of the store (and not its tests)
#[path = "../src/store/mod.rs"]
mod store;

use store::ChunkStore;

const CHUNK: usize = 256 << 10;
const BATCH: usize = 32; // 8 MiB

/// `BATCH` distinct incompressible chunks, sealed as an agent would (zstd level 1, kept raw).
fn batch(seed: u64) -> Vec<(ChunkId, Vec<u8>)> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    (0..BATCH)
        .map(|_| {
            let mut data = Vec::with_capacity(CHUNK);
            while data.len() < CHUNK {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                data.extend_from_slice(&x.to_le_bytes());
            }
            (ChunkId::of(&data), seal(&data, 1))
        })
        .collect()
}

fn put_get(c: &mut Criterion) {
    let mut g = c.benchmark_group("store");
    g.sample_size(10)
        .throughput(Throughput::Bytes((CHUNK * BATCH) as u64));
    let chunks = batch(1);
    g.bench_function("put 8 MiB batch", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().expect("temp dir");
                let store = ChunkStore::open(dir.path()).expect("open store");
                (dir, store)
            },
            |(dir, store)| {
                black_box(store.put_batch(&chunks).expect("put"));
                dir
            },
            BatchSize::PerIteration,
        )
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let store = ChunkStore::open(dir.path()).expect("open store");
    store.put_batch(&chunks).expect("put");
    g.bench_function("get 8 MiB batch", |b| {
        b.iter(|| {
            for (id, _) in &chunks {
                black_box(store.get(id).expect("get").expect("present"));
            }
        })
    });
    g.bench_function("put 8 MiB batch, all present", |b| {
        b.iter(|| black_box(store.put_batch(&chunks).expect("put")))
    });
    g.finish();
}

criterion_group!(benches, put_get);
criterion_main!(benches);
