//! `download ID --out FILE|-`: a snapshot straight from the coordinator, without an agent. A
//! stream snapshot comes out as its original bytes (the dump), a tree (files, PostgreSQL's
//! `tables` format) as a tar archive, a bundle as one tar holding its index and every part.
//! Every chunk is verified against its id and a stream
//! against its checksum; the file (mode 0600) appears under its name only when it is
//! complete. To stdout, bytes flow as they are verified chunk by chunk: a stream whose
//! checksum fails at its end has been written already, and the command exits non-zero.
//!
//! ```text
//! coordinator ══Read══▶ frames (async) ══bounded channel══▶ writer (blocking) ──▶ FILE
//! ```

use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use fleetvault_common::durable::{NewFile, Replace};
use fleetvault_common::protocol::ReadPart;
use fleetvault_common::{
    chunk, ChunkRef, Client, EntryKind, Manifest, ReadItem, ReadStream, SnapshotId,
};
use tokio::sync::mpsc;

/// Chunks buffered between the network and the file.
const QUEUE: usize = 16;

/// Verified chunk plaintext, in manifest order, from the network task.
struct Chunks {
    snapshot: SnapshotId,
    rx: mpsc::Receiver<Result<ReadItem, String>>,
    bar: indicatif::ProgressBar,
}

impl Chunks {
    fn next(&mut self, expected: &ChunkRef) -> anyhow::Result<Vec<u8>> {
        let snapshot = self.snapshot;
        match self.rx.blocking_recv() {
            Some(Ok(ReadItem::Chunk { id, envelope })) if id == expected.id => {
                let plain = chunk::open_verified(&envelope, &id)
                    .map_err(|e| anyhow!("snapshot {snapshot}: chunk {id} is damaged: {e}"))?;
                if plain.len() != expected.len as usize {
                    bail!("snapshot {snapshot}: chunk {id} has the wrong length");
                }
                self.bar.inc(plain.len() as u64);
                Ok(plain)
            }
            Some(Ok(ReadItem::Missing(id))) => {
                bail!("snapshot {snapshot}: chunk {id} is missing on the coordinator")
            }
            Some(Ok(ReadItem::Chunk { id, .. })) => bail!(
                "snapshot {snapshot}: chunk {id} arrived where {} was expected",
                expected.id
            ),
            Some(Err(e)) => bail!("snapshot {snapshot}: {e}"),
            Some(Ok(ReadItem::End)) | None => {
                bail!("snapshot {snapshot}: the chunk stream ended early")
            }
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

/// A stream's bytes as a `Read` that fails at the end unless they match the checksum.
struct Checked<'a> {
    inner: FileReader<'a>,
    hasher: blake3::Hasher,
    want: [u8; 32],
    snapshot: SnapshotId,
}

impl<'a> Checked<'a> {
    fn of(chunks: &'a mut Chunks, s: &'a fleetvault_common::StreamManifest) -> Self {
        let snapshot = chunks.snapshot;
        Checked {
            inner: FileReader {
                chunks,
                list: s.chunks.iter(),
                buf: Vec::new(),
                at: 0,
            },
            hasher: blake3::Hasher::new(),
            want: s.checksum,
            snapshot,
        }
    }
}

impl Read for Checked<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.hasher.update(&out[..n]);
        if n == 0 && !out.is_empty() && *self.hasher.finalize().as_bytes() != self.want {
            return Err(io::Error::other(format!(
                "snapshot {}: the stream does not match its checksum",
                self.snapshot
            )));
        }
        Ok(n)
    }
}

/// The tar archive a tree (or a bundle) is written into.
type Tar = tar::Builder<Out>;

/// Where the bytes go: a new file (under its name only once whole and durable) or stdout.
pub(crate) enum Out {
    File(io::BufWriter<NewFile>, Replace),
    Stdout(io::BufWriter<io::Stdout>),
}

impl Out {
    /// Everything written and durable under its name (a file) or handed on (stdout).
    fn finish(self) -> anyhow::Result<()> {
        match self {
            Out::File(w, replace) => {
                let file = w.into_inner().map_err(|e| e.into_error())?;
                file.commit(replace)?;
            }
            Out::Stdout(mut w) => w.flush()?,
        }
        Ok(())
    }
}

impl Write for Out {
    #[allow(clippy::disallowed_methods)] // delegating `Write` itself: callers use write_all
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Out::File(w, _) => w.write(buf),
            Out::Stdout(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Out::File(w, _) => w.flush(),
            Out::Stdout(w) => w.flush(),
        }
    }
}

/// Opens a `Read` of `snapshot` and returns its record, its verified manifest and the stream
/// on which its data chunks follow.
async fn open(
    client: &Client,
    snapshot: SnapshotId,
) -> anyhow::Result<(fleetvault_common::SnapshotRecord, Manifest, ReadStream)> {
    let read = client.read_snapshot(snapshot, ReadPart::All).await?;
    Ok((read.record, read.manifest, read.chunks))
}

/// Runs `sink` on a blocking thread, fed with the data chunks arriving on `recv`.
async fn with_chunks<T: Send + 'static>(
    snapshot: SnapshotId,
    mut chunks: ReadStream,
    bar: &indicatif::ProgressBar,
    sink: impl FnOnce(&mut Chunks) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let fetch = async {
        loop {
            let item = chunks.next().await.map_err(|e| e.to_string());
            let end = matches!(item, Ok(ReadItem::End) | Err(_));
            if end || tx.send(item).await.is_err() {
                break;
            }
        }
        drop(tx);
    };
    let bar = bar.clone();
    let write = tokio::task::spawn_blocking(move || sink(&mut Chunks { snapshot, rx, bar }));
    let (_, written) = tokio::join!(fetch, write);
    written.context("download task panicked")?
}

/// Writes a stream's bytes to `w`, checking its checksum; returns its length.
fn write_stream(
    s: &fleetvault_common::StreamManifest,
    chunks: &mut Chunks,
    w: &mut dyn Write,
) -> anyhow::Result<u64> {
    io::copy(&mut Checked::of(chunks, s), w)?;
    Ok(s.len)
}

/// Appends a snapshot to `tar`: a tree's entries under `prefix`, a stream as the file `prefix`
/// (`name` when there is no prefix); returns the content bytes.
fn append(
    tar: &mut Tar,
    manifest: &Manifest,
    prefix: &Path,
    chunks: &mut Chunks,
) -> anyhow::Result<u64> {
    let mut n = 0;
    match manifest {
        Manifest::Stream(s) => {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o600);
            h.set_size(s.len);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mtime(0);
            // Streamed into the archive; the checksum is checked at its end, and a mismatch
            // fails the download (its temporary file is removed).
            tar.append_data(&mut h, prefix, Checked::of(chunks, s))?;
            n += s.len;
        }
        Manifest::Tree(t) => {
            for e in &t.entries {
                let path = prefix.join(Path::new(std::ffi::OsStr::from_bytes(&e.path)));
                let mut h = tar::Header::new_gnu();
                h.set_mode(e.mode);
                h.set_uid(u64::from(e.uid));
                h.set_gid(u64::from(e.gid));
                h.set_mtime(e.mtime.max(0) as u64);
                match e.kind {
                    EntryKind::Dir => {
                        h.set_entry_type(tar::EntryType::Directory);
                        h.set_size(0);
                        tar.append_data(&mut h, &path, io::empty())?;
                    }
                    EntryKind::Symlink => {
                        h.set_entry_type(tar::EntryType::Symlink);
                        h.set_size(0);
                        let target = e.target.as_deref().unwrap_or_default();
                        tar.append_link(&mut h, &path, std::ffi::OsStr::from_bytes(target))?;
                    }
                    EntryKind::File => {
                        h.set_entry_type(tar::EntryType::Regular);
                        h.set_size(e.size);
                        let reader = FileReader {
                            chunks: &mut *chunks,
                            list: e.chunks.iter(),
                            buf: Vec::new(),
                            at: 0,
                        };
                        tar.append_data(&mut h, &path, reader)?;
                        n += e.size;
                    }
                }
            }
        }
    }
    Ok(n)
}

/// Downloads `snapshot` into the new file `out` (created 0600; an existing one is replaced
/// only with `force`), or to stdout when `out` is `None`; returns the bytes of content
/// written. A bundle becomes one tar: `bundle.json` (its index), then each part under its
/// name (a tree as a directory, a stream as one file).
pub(crate) async fn download(
    client: &Client,
    snapshot: SnapshotId,
    out: Option<&Path>,
    force: bool,
) -> anyhow::Result<u64> {
    let bar = fleetvault_common::report::progress_bar(None);
    let Some(out) = out else {
        let n = write_all(
            client,
            snapshot,
            Out::Stdout(io::BufWriter::new(io::stdout())),
            &bar,
        )
        .await;
        bar.finish_and_clear();
        return n;
    };
    // Created 0600 whatever the umask: a snapshot may hold secrets. The command checked that
    // nothing is at `out` unless `force`; one that appears meanwhile is not replaced either.
    let file = NewFile::create(out, 0o600)?;
    let replace = if force { Replace::Yes } else { Replace::No };
    let out = Out::File(io::BufWriter::new(file), replace);
    let written = write_all(client, snapshot, out, &bar).await;
    bar.finish_and_clear();
    written
}

/// A bundle snapshot's index (its parts with their own status, its hooks), as its agent
/// stored it.
pub(crate) async fn bundle_index(
    client: &Client,
    snapshot: SnapshotId,
) -> anyhow::Result<serde_json::Value> {
    let (_, manifest, recv) = open(client, snapshot).await?;
    let Manifest::Stream(s) = manifest else {
        bail!("bundle {snapshot} is not a stream");
    };
    let bar = indicatif::ProgressBar::hidden();
    let index = with_chunks(snapshot, recv, &bar, move |c| {
        let mut buf = Vec::new();
        write_stream(&s, c, &mut buf)?;
        Ok(buf)
    })
    .await?;
    serde_json::from_slice(&index).with_context(|| format!("bundle {snapshot}: bad index"))
}

async fn write_all(
    client: &Client,
    snapshot: SnapshotId,
    mut w: Out,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<u64> {
    let (rec, manifest, recv) = open(client, snapshot).await?;
    match &manifest {
        Manifest::Stream(s) if rec.kind != crate::bundle::KIND => bar.set_length(s.len),
        Manifest::Tree(t) => bar.set_length(t.entries.iter().map(|e| e.size).sum()),
        Manifest::Stream(_) => {}
    }
    let sync = |w: Out| w.finish();
    if rec.kind == crate::bundle::KIND {
        let Manifest::Stream(s) = &manifest else {
            bail!("bundle {snapshot} is not a stream");
        };
        let s = s.clone();
        let index = with_chunks(snapshot, recv, bar, move |c| {
            let mut buf = Vec::new();
            write_stream(&s, c, &mut buf)?;
            Ok(buf)
        })
        .await?;
        let parsed: serde_json::Value = serde_json::from_slice(&index)
            .with_context(|| format!("bundle {snapshot}: bad index"))?;
        let mut tar = tar::Builder::new(w);
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o600);
        h.set_size(index.len() as u64);
        h.set_mtime(rec.started_ms / 1000);
        tar.append_data(&mut h, "bundle.json", &index[..])?;
        let mut total = 0;
        for part in parsed["parts"].as_array().into_iter().flatten() {
            let (Some(name), Some(id)) = (part["name"].as_str(), part["snapshot_id"].as_str())
            else {
                continue;
            };
            let id: SnapshotId = id.parse()?;
            let (part_rec, m, recv) = open(client, id).await?;
            // The index is its agent's word: it never brings in another agent's snapshot.
            if part_rec.agent != rec.agent {
                bail!(
                    "bundle {snapshot} of agent {} lists snapshot {id} of agent {}; refused",
                    rec.agent,
                    part_rec.agent
                );
            }
            let prefix = match &m {
                Manifest::Stream(_) => std::path::PathBuf::from(format!("{name}.dump")),
                Manifest::Tree(_) => std::path::PathBuf::from(name),
            };
            let (t, n) = with_chunks(id, recv, bar, move |c| {
                let n = append(&mut tar, &m, &prefix, c)?;
                Ok((tar, n))
            })
            .await?;
            tar = t;
            total += n;
        }
        sync(tar.into_inner()?)?;
        return Ok(total);
    }
    match manifest {
        Manifest::Stream(s) => {
            let (w, n) = with_chunks(snapshot, recv, bar, move |c| {
                let n = write_stream(&s, c, &mut w)?;
                Ok((w, n))
            })
            .await?;
            sync(w)?;
            Ok(n)
        }
        tree @ Manifest::Tree(_) => {
            let (tar, n) = with_chunks(snapshot, recv, bar, move |c| {
                let mut tar = tar::Builder::new(w);
                let n = append(&mut tar, &tree, Path::new(""), c)?;
                Ok((tar, n))
            })
            .await?;
            sync(tar.into_inner()?)?;
            Ok(n)
        }
    }
}
