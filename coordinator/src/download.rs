//! `download ID --out FILE`: a snapshot straight from the coordinator, without an agent. A
//! stream snapshot comes out as its original bytes (the dump), a tree (files, PostgreSQL's
//! `tables` format) as a tar archive. Every chunk is verified against its id and a stream
//! against its checksum; the file appears under its name only when it is complete.
//!
//! ```text
//! coordinator ══Read══▶ frames (async) ══bounded channel══▶ writer (blocking) ──▶ FILE
//! ```

use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use fleetvault_common::protocol::{ReadPart, Request, Response};
use fleetvault_common::{chunk, ChunkRef, Client, EntryKind, Manifest, SnapshotId};
use tokio::sync::mpsc;

/// Chunks buffered between the network and the file.
const QUEUE: usize = 16;

/// Verified chunk plaintext, in manifest order, from the network task.
struct Chunks {
    snapshot: SnapshotId,
    rx: mpsc::Receiver<Result<Response, String>>,
}

impl Chunks {
    fn next(&mut self, expected: &ChunkRef) -> anyhow::Result<Vec<u8>> {
        let snapshot = self.snapshot;
        match self.rx.blocking_recv() {
            Some(Ok(Response::Chunk { id, envelope })) if id == expected.id => {
                let plain = chunk::open_verified(&envelope, &id)
                    .map_err(|e| anyhow!("snapshot {snapshot}: chunk {id} is damaged: {e}"))?;
                if plain.len() != expected.len as usize {
                    bail!("snapshot {snapshot}: chunk {id} has the wrong length");
                }
                Ok(plain)
            }
            Some(Ok(Response::ChunkMissing { id })) => {
                bail!("snapshot {snapshot}: chunk {id} is missing on the coordinator")
            }
            Some(Ok(other)) => bail!("snapshot {snapshot}: unexpected frame {other:?}"),
            Some(Err(e)) => bail!("snapshot {snapshot}: {e}"),
            None => bail!("snapshot {snapshot}: the chunk stream ended early"),
        }
    }
}

/// A file's content as a `Read`, pulled chunk by chunk.
struct FileReader<'a> {
    chunks: &'a mut Chunks,
    list: std::slice::Iter<'a, ChunkRef>,
    buf: Vec<u8>,
    at: usize,
}

impl Read for FileReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.buf.len() {
            let Some(c) = self.list.next() else {
                return Ok(0);
            };
            self.buf = self
                .chunks
                .next(c)
                .map_err(|e| io::Error::other(format!("{e:#}")))?;
            self.at = 0;
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Downloads `snapshot` into the new file `out`; returns the bytes of content written.
pub(crate) async fn download(
    client: &Client,
    snapshot: SnapshotId,
    out: &Path,
) -> anyhow::Result<u64> {
    if out.exists() {
        bail!("{} already exists", out.display());
    }
    let (mut send, mut recv) = client
        .open(&Request::Read {
            snapshot,
            part: ReadPart::All,
        })
        .await?;
    let _ = send.finish();
    let rec = match client.reply(&mut recv).await? {
        Response::Reading(r) => r,
        other => bail!("unexpected reply {other:?}"),
    };
    let root = rec
        .root
        .clone()
        .with_context(|| format!("snapshot {snapshot} has no manifest"))?;
    let mut bytes = Vec::new();
    for c in &root.chunks {
        match client.reply(&mut recv).await? {
            Response::Chunk { id, envelope } if id == c.id => bytes.extend(
                chunk::open_verified(&envelope, &id)
                    .map_err(|e| anyhow!("snapshot {snapshot}: manifest chunk {id}: {e}"))?,
            ),
            other => bail!("snapshot {snapshot}: unexpected frame in the manifest: {other:?}"),
        }
    }
    if *blake3::hash(&bytes).as_bytes() != root.checksum {
        bail!("snapshot {snapshot}: the manifest does not match its checksum");
    }
    let manifest = Manifest::decode(&bytes).with_context(|| format!("snapshot {snapshot}"))?;
    drop(bytes);
    let (tx, rx) = mpsc::channel(QUEUE);
    let fetch = async {
        loop {
            let item = client.reply(&mut recv).await.map_err(|e| e.to_string());
            let end = matches!(item, Ok(Response::End) | Err(_));
            if end || tx.send(item).await.is_err() {
                break;
            }
        }
        drop(tx);
    };
    let tmp = out.with_file_name(format!(
        ".{}.fleetvault-download",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let tmp2 = tmp.clone();
    let write = tokio::task::spawn_blocking(move || {
        let mut chunks = Chunks { snapshot, rx };
        let file = std::fs::File::create_new(&tmp2)
            .with_context(|| format!("creating {}", tmp2.display()))?;
        let mut w = io::BufWriter::new(file);
        let written = match &manifest {
            Manifest::Stream(s) => {
                let mut whole = blake3::Hasher::new();
                for c in &s.chunks {
                    let plain = chunks.next(c)?;
                    whole.update(&plain);
                    w.write_all(&plain)?;
                }
                if *whole.finalize().as_bytes() != s.checksum {
                    bail!("snapshot {snapshot}: the stream does not match its checksum");
                }
                s.len
            }
            Manifest::Tree(t) => {
                let mut tar = tar::Builder::new(&mut w);
                let mut n = 0;
                for e in &t.entries {
                    let path = Path::new(std::ffi::OsStr::from_bytes(&e.path));
                    let mut h = tar::Header::new_gnu();
                    h.set_mode(e.mode);
                    h.set_uid(u64::from(e.uid));
                    h.set_gid(u64::from(e.gid));
                    h.set_mtime(e.mtime.max(0) as u64);
                    match e.kind {
                        EntryKind::Dir => {
                            h.set_entry_type(tar::EntryType::Directory);
                            h.set_size(0);
                            tar.append_data(&mut h, path, io::empty())?;
                        }
                        EntryKind::Symlink => {
                            h.set_entry_type(tar::EntryType::Symlink);
                            h.set_size(0);
                            let target = e.target.as_deref().unwrap_or_default();
                            tar.append_link(&mut h, path, std::ffi::OsStr::from_bytes(target))?;
                        }
                        EntryKind::File => {
                            h.set_entry_type(tar::EntryType::Regular);
                            h.set_size(e.size);
                            let reader = FileReader {
                                chunks: &mut chunks,
                                list: e.chunks.iter(),
                                buf: Vec::new(),
                                at: 0,
                            };
                            tar.append_data(&mut h, path, reader)?;
                            n += e.size;
                        }
                    }
                }
                tar.finish()?;
                n
            }
        };
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        anyhow::Ok(written)
    });
    let (_, written) = tokio::join!(fetch, write);
    let written = match written.context("download task panicked")? {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    #[allow(clippy::disallowed_methods)] // temp, fsync, rename: the file appears whole
    std::fs::rename(&tmp, out).with_context(|| format!("renaming into {}", out.display()))?;
    Ok(written)
}
