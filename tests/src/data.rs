//! Deterministic test data (a seeded xorshift generator, so nothing big is shipped and a failure
//! reproduces) and BLAKE3 hashes of files and streams.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::Context;

/// 1 MiB.
pub const MIB: u64 = 1 << 20;

/// xorshift64*: fast, seedable, good enough to defeat compression and accidental dedup.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Self {
        Self((seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.fill(&mut v);
        v
    }
}

/// Writes `len` random bytes from `seed` to a new file `path`, 1 MiB at a time.
pub fn write_random_file(path: &Path, len: u64, seed: u64) -> anyhow::Result<()> {
    let mut rng = Rng::new(seed);
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut buf = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// Overwrites `count` non-overlapping regions of `region_len` bytes, spread evenly over the file
/// with a random jitter, with fresh random bytes from `seed`. Returns the bytes changed.
pub fn overwrite_regions(
    path: &Path,
    count: u64,
    region_len: u64,
    seed: u64,
) -> anyhow::Result<u64> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    let slot = len / count.max(1);
    anyhow::ensure!(slot > region_len, "regions do not fit in {len} bytes");
    let mut rng = Rng::new(seed);
    for i in 0..count {
        let offset = i * slot + rng.below(slot - region_len);
        f.seek(SeekFrom::Start(offset))?;
        f.write_all(&rng.bytes(region_len as usize))?;
    }
    f.sync_all()?;
    Ok(count * region_len)
}

/// BLAKE3 of everything `r` yields, as lowercase hex, and its length.
pub fn hash_reader(mut r: impl Read) -> anyhow::Result<(String, u64)> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.finalize().to_hex().to_string(), total))
}

/// BLAKE3 of a file's contents, as lowercase hex.
pub fn hash_file(path: &Path) -> anyhow::Result<String> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(hash_reader(f)?.0)
}

/// BLAKE3 (hex) and length of a shell command's stdout, streamed.
pub fn hash_command_output(shell_command: &str) -> anyhow::Result<(String, u64)> {
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(shell_command)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {shell_command}"))?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let hashed = hash_reader(stdout)?;
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "`{shell_command}` exited with {status}");
    Ok(hashed)
}
