//! The file-transfer worker: copies a case tree to a step host (`upload_case`) and results
//! back (`download_results`), confined to configured roots, resumable and verified.
//!
//! A transfer walks the source tree, then places every file (4 at a time up, 8 down): a destination file
//! that already has the source's size and SHA-256 is skipped, anything else is written to
//! `<name>.mqic-part`, hashed, and renamed to its final name only when the hashes agree. So a
//! half-copied tree never looks complete, and a retried transfer only sends what is missing.
//!
//! The filesystem work goes through [`TransferBackend`]; [`local::LocalBackend`] serves host
//! kind `local`, and an SSH/SFTP backend plugs in through [`TransferWorker::with_backends`].

pub mod local;
pub mod sftp;

use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::bus::{BoxFuture, Bus, Delivery};
use crate::protocol::topology::{CONDUCTOR_QUEUE, FILE_TRANSFER_QUEUE};
use crate::protocol::{
    Command, Envelope, ExecutionProgress, FailureCategory, FailureInfo, FailurePayload,
    TransferDone, TransferRequest,
};
use crate::workers::{self, Handled, Shutdown, WorkerStatus};

pub use local::LocalBackend;

/// Appended to a file's name while it is being written; never a final name.
pub const PART_SUFFIX: &str = ".mqic-part";

/// Files copied at the same time within one transfer: more for downloads, whose reads
/// wait on the server (measured with `cargo bench --bench ssh`: 8 helped downloads, not
/// uploads).
fn files_in_flight(direction: Direction) -> usize {
    match direction {
        Direction::Upload => 4,
        Direction::Download => 8,
    }
}

/// Progress goes to the conductor at most this often per transfer.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Deliveries the worker holds at once: one in work, one ready behind it.
const PREFETCH: u16 = 2;

/// Copies hashed together (one command on a remote host), and such batches at once.
const VERIFY_BATCH: usize = 16;
const VERIFY_IN_FLIGHT: usize = 2;

/// Tries per file when the written copy does not hash like the source.
const CHECKSUM_TRIES: u32 = 3;

/// The wait after the first checksum mismatch; doubled after each further one.
const CHECKSUM_BACKOFF: Duration = Duration::from_millis(100);

/// Which way a transfer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `local_dir` to `remote_dir` (`upload_case`).
    Upload,
    /// `remote_dir` to `local_dir` (`download_results`).
    Download,
}

impl Direction {
    /// The failure phase the conductor records.
    pub fn phase(self) -> &'static str {
        match self {
            Direction::Upload => "upload",
            Direction::Download => "download",
        }
    }

    fn sides(self) -> (Side, Side) {
        match self {
            Direction::Upload => (Side::Local, Side::Remote),
            Direction::Download => (Side::Remote, Side::Local),
        }
    }
}

/// Which end of a transfer a path lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// This machine.
    Local,
    /// The step host (for host kind `local`, also this machine).
    Remote,
}

/// A file's size and SHA-256: what "the same file" means on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileDigest {
    pub size: u64,
    pub sha256: [u8; 32],
}

impl FileDigest {
    /// The hash as lowercase hex, for messages.
    pub fn hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A regular file found by [`TransferBackend::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFile {
    /// Relative to the listed root.
    pub rel: PathBuf,
    pub size: u64,
}

/// Why a tree entry is left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NotCopied {
    /// Following it could leave the allowed root.
    Symlink,
    /// A socket, FIFO or device: not case data.
    Special,
    /// A leftover temporary of an interrupted transfer, never a real file.
    PartFile,
}

/// A source tree as [`TransferBackend::list`] sees it, without following symlinks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    pub files: Vec<TreeFile>,
    /// Every directory, relative, parents before children (empty ones are copied too).
    pub dirs: Vec<PathBuf>,
    /// Entries that are not copied, for the log.
    pub not_copied: Vec<(PathBuf, NotCopied)>,
}

/// The filesystem operations a transfer needs, on either side. A backend for a remote host
/// serves [`Side::Local`] from this machine's filesystem and [`Side::Remote`] from the host.
/// Paths are absolute; [`NotFound`](ErrorKind::NotFound) and
/// [`NotADirectory`](ErrorKind::NotADirectory) from `list` mean the source is missing.
pub trait TransferBackend: Send + Sync + 'static {
    /// Walks the tree under `root` (the root may be a symlink; nothing below it is followed).
    fn list(&self, side: Side, root: PathBuf) -> BoxFuture<'_, io::Result<Tree>>;

    /// Size and SHA-256 of the regular file at `path`, `None` when there is none.
    fn hash(&self, side: Side, path: PathBuf) -> BoxFuture<'_, io::Result<Option<FileDigest>>>;

    /// [`TransferBackend::hash`] of many files, in order. A remote backend answers with one
    /// command on the host instead of one per file.
    fn hash_many(
        &self,
        side: Side,
        paths: Vec<PathBuf>,
    ) -> BoxFuture<'_, io::Result<Vec<Option<FileDigest>>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(paths.len());
            for p in paths {
                out.push(self.hash(side, p).await?);
            }
            Ok(out)
        })
    }

    /// Copies `src` on the direction's source side to a fresh `temp` on its destination side,
    /// flushed to disk here or by [`TransferBackend::settle`]; the parent directory exists.
    /// Returns the bytes written.
    fn copy_to_temp(
        &self,
        direction: Direction,
        src: PathBuf,
        temp: PathBuf,
    ) -> BoxFuture<'_, io::Result<u64>>;

    /// Makes everything written under `root` durable; called once after the last file of a
    /// transfer is in place, before it is reported done.
    fn settle(&self, _side: Side, _root: PathBuf) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Atomically renames `from` to `to`, replacing what `to` was.
    fn rename(&self, side: Side, from: PathBuf, to: PathBuf) -> BoxFuture<'_, io::Result<()>>;

    /// Removes a file; one that is already gone is fine.
    fn remove(&self, side: Side, path: PathBuf) -> BoxFuture<'_, io::Result<()>>;

    /// Makes `path` a directory (with missing parents); a symlink or file there is an error.
    /// `true` when it did not exist before (so it is empty).
    fn make_dir(&self, side: Side, path: PathBuf) -> BoxFuture<'_, io::Result<bool>>;

    /// The real path: symlinks in the existing part resolved, missing components appended.
    fn resolve(&self, side: Side, path: PathBuf) -> BoxFuture<'_, io::Result<PathBuf>>;
}

/// Why a transfer failed. `error_type` and `code` are what the conductor sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferFailure {
    #[error("unknown host `{0}`")]
    UnknownHost(String),
    #[error("path refused: {0}")]
    PathRefused(String),
    #[error("source missing: {0}")]
    SourceMissing(String),
    #[error("checksum mismatch: {0}")]
    ChecksumMismatch(String),
    /// Any other I/O failure: a full disk, a permission, a vanished file.
    #[error("transfer error: {0}")]
    Io(String),
}

impl TransferFailure {
    /// The seed's `error_type`.
    pub fn error_type(&self) -> &'static str {
        match self {
            TransferFailure::UnknownHost(_) => "UnknownHost",
            TransferFailure::PathRefused(_) => "PathRefused",
            TransferFailure::SourceMissing(_) => "SourceMissing",
            TransferFailure::ChecksumMismatch(_) => "ChecksumMismatch",
            TransferFailure::Io(_) => "TransferError",
        }
    }

    /// `error_type` in snake case, for [`FailureInfo::code`].
    pub fn code(&self) -> &'static str {
        match self {
            TransferFailure::UnknownHost(_) => "unknown_host",
            TransferFailure::PathRefused(_) => "path_refused",
            TransferFailure::SourceMissing(_) => "source_missing",
            TransferFailure::ChecksumMismatch(_) => "checksum_mismatch",
            TransferFailure::Io(_) => "transfer_error",
        }
    }

    /// Bad requests stay bad; I/O trouble and corruption in flight may pass. A retry resumes,
    /// so it only sends what is still missing.
    pub fn category(&self) -> FailureCategory {
        match self {
            TransferFailure::UnknownHost(_)
            | TransferFailure::PathRefused(_)
            | TransferFailure::SourceMissing(_) => FailureCategory::Permanent,
            TransferFailure::ChecksumMismatch(_) | TransferFailure::Io(_) => {
                FailureCategory::Retryable
            }
        }
    }

    fn io(context: &str, path: &Path, e: io::Error) -> TransferFailure {
        TransferFailure::Io(format!("{context} {}: {e}", path.display()))
    }
}

/// Where a host's files live and how to reach them.
struct HostRoute {
    /// Every `remote_dir` for this host must lie under it.
    remote_root: PathBuf,
    backend: Arc<dyn TransferBackend>,
}

/// Copies trees between this machine and the configured hosts, inside the allowed roots.
pub struct TransferWorker {
    /// Every `local_dir` must lie under one of these (the scan and results directories).
    local_roots: Vec<PathBuf>,
    /// By host name, as `TransferRequest::host` names it.
    hosts: HashMap<String, HostRoute>,
}

impl TransferWorker {
    /// A worker whose hosts are all reached through [`LocalBackend`] (host kind `local`).
    /// Relative roots are taken against the current directory.
    pub fn new(local_roots: Vec<PathBuf>, hosts: Vec<(String, PathBuf)>) -> TransferWorker {
        let backend: Arc<dyn TransferBackend> = Arc::new(LocalBackend);
        TransferWorker::with_backends(
            local_roots,
            hosts
                .into_iter()
                .map(|(name, root)| (name, root, backend.clone()))
                .collect(),
        )
    }

    /// A worker with a backend chosen per host (`(name, remote_root, backend)`).
    pub fn with_backends(
        local_roots: Vec<PathBuf>,
        hosts: Vec<(String, PathBuf, Arc<dyn TransferBackend>)>,
    ) -> TransferWorker {
        TransferWorker {
            local_roots: local_roots.iter().map(|r| absolute_root(r)).collect(),
            hosts: hosts
                .into_iter()
                .map(|(name, root, backend)| {
                    let remote_root = absolute_root(&root);
                    (
                        name,
                        HostRoute {
                            remote_root,
                            backend,
                        },
                    )
                })
                .collect(),
        }
    }

    /// Copies the request's tree in `direction`. Files already at the destination with the
    /// same size and hash are skipped; `files` and `bytes` count the whole source tree.
    pub async fn transfer(
        &self,
        req: &TransferRequest,
        direction: Direction,
    ) -> Result<TransferDone, TransferFailure> {
        self.transfer_with_progress(req, direction, &|_| {}).await
    }

    /// [`TransferWorker::transfer`], calling `progress` as files are verified in place.
    ///
    /// The work goes in rounds: hash every source and every destination file (one batch per
    /// side, so a remote host hashes them all in one command), copy what differs to
    /// temporaries (several at once), hash the temporaries in one batch, rename those that
    /// match, and copy the mismatched ones again after a backoff.
    pub async fn transfer_with_progress(
        &self,
        req: &TransferRequest,
        direction: Direction,
        progress: &(dyn Fn(TransferProgress) + Send + Sync),
    ) -> Result<TransferDone, TransferFailure> {
        let host = self
            .hosts
            .get(&req.host)
            .ok_or_else(|| TransferFailure::UnknownHost(req.host.clone()))?;
        let backend = &host.backend;
        let remote_roots = std::slice::from_ref(&host.remote_root);
        let local = confine("local_dir", &req.local_dir, &self.local_roots)?;
        let remote = confine("remote_dir", &req.remote_dir, remote_roots)?;
        confine_resolved(backend.as_ref(), Side::Local, &local, &self.local_roots).await?;
        confine_resolved(backend.as_ref(), Side::Remote, &remote, remote_roots).await?;

        let started = std::time::Instant::now();
        let ms = move || started.elapsed().as_millis() as u64;
        let (src_side, dst_side) = direction.sides();
        let (src, dst) = match direction {
            Direction::Upload => (local, remote),
            Direction::Download => (remote, local),
        };
        let tree = match backend.list(src_side, src.clone()).await {
            Ok(tree) => tree,
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                return Err(TransferFailure::SourceMissing(format!(
                    "{}: {e}",
                    src.display()
                )))
            }
            Err(e) => return Err(TransferFailure::io("cannot list", &src, e)),
        };
        log_not_copied(req, &src, &tree.not_copied);
        tracing::debug!(
            ms = ms(),
            files = tree.files.len(),
            "transfer: source listed"
        );

        // A destination that did not exist holds nothing yet: no listing to look for files
        // already there.
        let mut fresh = false;
        for (n, dir) in std::iter::once(dst.clone())
            .chain(tree.dirs.iter().map(|d| dst.join(d)))
            .enumerate()
        {
            let created = backend
                .make_dir(dst_side, dir.clone())
                .await
                .map_err(|e| TransferFailure::io("cannot create directory", &dir, e))?;
            if n == 0 {
                fresh = created;
            }
        }

        let files = tree.files.len() as u64;
        let mut report = TransferProgress {
            files_done: 0,
            files_total: files,
            bytes_done: 0,
            bytes_total: tree.files.iter().map(|f| f.size).sum(),
        };
        let sizes_listed: Vec<u64> = tree.files.iter().map(|f| f.size).collect();
        let rels: Vec<PathBuf> = tree.files.into_iter().map(|f| f.rel).collect();
        let srcs: Vec<PathBuf> = rels.iter().map(|r| src.join(r)).collect();
        let dsts: Vec<PathBuf> = rels.iter().map(|r| dst.join(r)).collect();
        // The source hashes are only needed to verify the copies (and to skip files already
        // there): they are computed while the copying starts.
        let mut sources = Sources::start(backend, src_side, &srcs);
        let sizes = if fresh {
            vec![None; rels.len()]
        } else {
            existing_sizes(backend.as_ref(), dst_side, &dst, &rels).await?
        };
        // A destination file with the source's size may already be complete: then the copy
        // waits for both sides' hashes. Otherwise every file is copied, so copying starts now.
        let resuming = (0..rels.len()).any(|i| sizes[i] == Some(sizes_listed[i]));
        let mut pending = Vec::new();
        let (mut bytes, mut skipped, mut copied_bytes) = (0u64, 0u64, 0u64);
        if resuming {
            let known = sources.all().await?;
            let existing =
                existing_digests(backend.as_ref(), dst_side, &dsts, &known, sizes).await?;
            for (i, (source, there)) in known.iter().zip(&existing).enumerate() {
                if *there == Some(*source) {
                    skipped += 1;
                    bytes += source.size;
                    report.files_done += 1;
                    report.bytes_done += source.size;
                } else {
                    pending.push(i);
                }
            }
        } else {
            pending = (0..rels.len()).collect();
        }
        progress(report);
        tracing::debug!(ms = ms(), resuming, "transfer: copying starts");

        let mut backoff = CHECKSUM_BACKOFF;
        let mut mismatches = Vec::new();
        for round in 1..=CHECKSUM_TRIES {
            if round > 1 {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                // Hashed again: a source still changing is one cause of a mismatch.
                let again: Vec<PathBuf> = pending.iter().map(|&i| srcs[i].clone()).collect();
                let digests = source_digests(backend.as_ref(), src_side, &again).await?;
                sources.all().await?;
                for (&i, d) in pending.iter().zip(digests) {
                    sources.known[i] = Some(d);
                }
            }
            let round_result = run_round(
                backend,
                direction,
                &pending,
                &srcs,
                &dsts,
                &mut sources,
                &mut report,
                progress,
            )
            .await?;
            tracing::debug!(ms = ms(), round, "transfer: round done");
            bytes += round_result.bytes;
            copied_bytes += round_result.bytes;
            mismatches = round_result.mismatches;
            let again = round_result.again;
            for m in &mismatches {
                tracing::warn!(round, mismatch = %m, "copy does not match its source");
            }
            pending = again;
            if pending.is_empty() {
                break;
            }
        }
        if !pending.is_empty() {
            let more = match mismatches.len() {
                0 | 1 => String::new(),
                n => format!(" (and {} more files)", n - 1),
            };
            return Err(TransferFailure::ChecksumMismatch(format!(
                "{}{more} after {CHECKSUM_TRIES} tries",
                mismatches.first().map(String::as_str).unwrap_or("")
            )));
        }
        // Every source was hashed (a failure of that hashing is the transfer's failure).
        sources.all().await?;
        tracing::debug!(ms = ms(), "transfer: sources hashed");
        backend
            .settle(dst_side, dst.clone())
            .await
            .map_err(|e| TransferFailure::io("cannot sync", &dst, e))?;
        tracing::debug!(ms = ms(), "transfer: settled");
        Ok(TransferDone {
            step: req.step.clone(),
            files,
            bytes,
            skipped,
            copied_bytes,
        })
    }
}

/// How far a transfer is: files and bytes verified in place (skipped ones included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferProgress {
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

impl TransferProgress {
    /// Bytes done over bytes in all (files when the tree holds no bytes).
    pub fn fraction(&self) -> f64 {
        if self.bytes_total > 0 {
            self.bytes_done as f64 / self.bytes_total as f64
        } else if self.files_total > 0 {
            self.files_done as f64 / self.files_total as f64
        } else {
            1.0
        }
    }

    /// `12/220 files, 3.1/45.2 MB`.
    pub fn message(&self) -> String {
        format!(
            "{}/{} files, {:.1}/{:.1} MB",
            self.files_done,
            self.files_total,
            self.bytes_done as f64 / 1e6,
            self.bytes_total as f64 / 1e6
        )
    }
}

fn temp_name(dst: &Path) -> PathBuf {
    let mut name = dst.file_name().unwrap_or_default().to_owned();
    name.push(PART_SUFFIX);
    dst.with_file_name(name)
}

/// Size and hash of every source file; one that vanished is an error.
async fn hash_all(
    backend: &dyn TransferBackend,
    side: Side,
    paths: &[PathBuf],
) -> Result<Vec<Option<FileDigest>>, TransferFailure> {
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    let digests = backend
        .hash_many(side, paths.to_vec())
        .await
        .map_err(|e| TransferFailure::io("cannot hash files under", common_parent(paths), e))?;
    if digests.len() != paths.len() {
        return Err(TransferFailure::Io(format!(
            "hashing {} files gave {} results",
            paths.len(),
            digests.len()
        )));
    }
    Ok(digests)
}

/// The size of each of `rels` that is a regular file under `root`, from one listing.
async fn existing_sizes(
    backend: &dyn TransferBackend,
    side: Side,
    root: &Path,
    rels: &[PathBuf],
) -> Result<Vec<Option<u64>>, TransferFailure> {
    let tree = backend
        .list(side, root.to_path_buf())
        .await
        .map_err(|e| TransferFailure::io("cannot list", root, e))?;
    let there: HashMap<PathBuf, u64> = tree.files.into_iter().map(|f| (f.rel, f.size)).collect();
    Ok(rels.iter().map(|r| there.get(r).copied()).collect())
}

/// The digests of the destination files that may already be complete: only those there
/// with the source's size are hashed (a fresh destination costs no hashing at all).
async fn existing_digests(
    backend: &dyn TransferBackend,
    side: Side,
    dsts: &[PathBuf],
    sources: &[FileDigest],
    sizes: Vec<Option<u64>>,
) -> Result<Vec<Option<FileDigest>>, TransferFailure> {
    let candidates: Vec<usize> = (0..dsts.len())
        .filter(|&i| sizes[i] == Some(sources[i].size))
        .collect();
    let paths: Vec<PathBuf> = candidates.iter().map(|&i| dsts[i].clone()).collect();
    let digests = hash_all(backend, side, &paths).await?;
    let mut out = vec![None; dsts.len()];
    for (i, d) in candidates.into_iter().zip(digests) {
        out[i] = d;
    }
    Ok(out)
}

/// [`hash_all`] of source files: each must be there.
async fn source_digests(
    backend: &dyn TransferBackend,
    side: Side,
    paths: &[PathBuf],
) -> Result<Vec<FileDigest>, TransferFailure> {
    let digests = hash_all(backend, side, paths).await?;
    paths
        .iter()
        .zip(digests)
        .map(|(p, d)| d.ok_or_else(|| TransferFailure::Io(format!("{} vanished", p.display()))))
        .collect()
}

/// Source files hashed per task while the copies run: the first copies are verified (and
/// land) while later sources are still being hashed.
const SOURCE_CHUNK: usize = 32;

type SourceChunk = (Vec<usize>, Result<Vec<FileDigest>, TransferFailure>);

/// The source files' digests, known as their chunks are hashed (the tasks stop when this is
/// dropped).
struct Sources {
    known: Vec<Option<FileDigest>>,
    hashing: JoinSet<SourceChunk>,
}

impl Sources {
    fn start(backend: &Arc<dyn TransferBackend>, side: Side, srcs: &[PathBuf]) -> Sources {
        let mut hashing = JoinSet::new();
        let ids: Vec<usize> = (0..srcs.len()).collect();
        for chunk in ids.chunks(SOURCE_CHUNK) {
            let b = backend.clone();
            let (chunk, paths) = (
                chunk.to_vec(),
                chunk.iter().map(|&i| srcs[i].clone()).collect::<Vec<_>>(),
            );
            hashing.spawn(async move {
                let r = source_digests(b.as_ref(), side, &paths).await;
                (chunk, r)
            });
        }
        Sources {
            known: vec![None; srcs.len()],
            hashing,
        }
    }

    fn coming(&self) -> bool {
        !self.hashing.is_empty()
    }

    /// Waits for the next chunk of digests.
    async fn next(&mut self) -> Result<(), TransferFailure> {
        match self.hashing.join_next().await {
            None => Ok(()),
            Some(Ok((ids, r))) => {
                for (i, d) in ids.into_iter().zip(r?) {
                    self.known[i] = Some(d);
                }
                Ok(())
            }
            Some(Err(e)) => Err(TransferFailure::Io(format!("source hashing task: {e}"))),
        }
    }

    /// Waits for every digest.
    async fn all(&mut self) -> Result<Vec<FileDigest>, TransferFailure> {
        while self.coming() {
            self.next().await?;
        }
        self.known
            .iter()
            .map(|d| d.ok_or_else(|| TransferFailure::Io("a source was not hashed".into())))
            .collect()
    }
}

fn common_parent(paths: &[PathBuf]) -> &Path {
    paths
        .first()
        .and_then(|p| p.parent())
        .unwrap_or(Path::new("/"))
}

/// What one round of copies did.
struct Round {
    /// Bytes of the files verified and renamed into place.
    bytes: u64,
    /// Files whose copy did not match, to copy again.
    again: Vec<usize>,
    mismatches: Vec<String>,
}

/// What a verify batch gives back: a verdict per file, or the failure with the files whose
/// temporaries are to be removed.
type Verified = Result<Vec<(usize, Verdict)>, (Vec<usize>, TransferFailure)>;

/// How one verified copy ended.
enum Verdict {
    Placed(u64),
    Mismatch(String),
}

/// Copies `srcs[i]` to a temporary next to `dsts[i]` for each pending `i`, several at once;
/// as copies finish they are hashed in batches (one command for a remote side) and renamed
/// into place when they match. So files land (and count as progress, and survive an
/// interruption) all along, not only at the end. On a failure nothing new starts, what runs
/// is let finish, and the temporaries not renamed are removed.
#[allow(clippy::too_many_arguments)]
async fn run_round(
    backend: &Arc<dyn TransferBackend>,
    direction: Direction,
    pending: &[usize],
    srcs: &[PathBuf],
    dsts: &[PathBuf],
    sources: &mut Sources,
    report: &mut TransferProgress,
    progress: &(dyn Fn(TransferProgress) + Send + Sync),
) -> Result<Round, TransferFailure> {
    let (_, dst_side) = direction.sides();
    let mut queue = pending.iter().copied();
    let mut copying: JoinSet<(usize, Result<(), TransferFailure>)> = JoinSet::new();
    let mut verifying: JoinSet<Verified> = JoinSet::new();
    let mut ready: Vec<usize> = Vec::new();
    let mut leftovers: Vec<usize> = Vec::new();
    let mut failure = None;
    let mut round = Round {
        bytes: 0,
        again: Vec::new(),
        mismatches: Vec::new(),
    };
    let mut queue_done = false;
    loop {
        while failure.is_none() && copying.len() < files_in_flight(direction) {
            let Some(i) = queue.next() else {
                queue_done = true;
                break;
            };
            let b = backend.clone();
            let (src, temp) = (srcs[i].clone(), temp_name(&dsts[i]));
            copying.spawn(async move {
                let r = b
                    .copy_to_temp(direction, src.clone(), temp.clone())
                    .await
                    .map(drop)
                    .map_err(|e| {
                        TransferFailure::Io(format!(
                            "cannot copy {} to {}: {e}",
                            src.display(),
                            temp.display()
                        ))
                    });
                (i, r)
            });
        }
        let copies_over = copying.is_empty() && (queue_done || failure.is_some());
        if failure.is_some() {
            leftovers.append(&mut ready);
        } else if verifying.len() < VERIFY_IN_FLIGHT && {
            // A copy waits here for its source's hash when that is still coming.
            let verifiable = ready
                .iter()
                .filter(|&&i| sources.known[i].is_some())
                .count();
            verifiable >= VERIFY_BATCH || (copies_over && verifiable > 0)
        } {
            let (known, waiting): (Vec<usize>, Vec<usize>) = std::mem::take(&mut ready)
                .into_iter()
                .partition(|&i| sources.known[i].is_some());
            ready = waiting;
            if !known.is_empty() {
                let batch: Vec<(usize, PathBuf, PathBuf, FileDigest)> = known
                    .into_iter()
                    .filter_map(|i| {
                        let source = sources.known[i]?;
                        Some((i, temp_name(&dsts[i]), dsts[i].clone(), source))
                    })
                    .collect();
                verifying.spawn(verify_batch(backend.clone(), dst_side, batch));
            }
        }
        let coming = sources.coming();
        if copying.is_empty() && verifying.is_empty() {
            if ready.is_empty() || failure.is_some() {
                break;
            }
            if !coming {
                if ready.iter().any(|&i| sources.known[i].is_none()) {
                    failure.get_or_insert(TransferFailure::Io("a source was not hashed".into()));
                }
                continue;
            }
        }
        tokio::select! {
            got = sources.next(), if coming => {
                if let Err(f) = got {
                    failure.get_or_insert(f);
                }
            },
            Some(done) = copying.join_next(), if !copying.is_empty() => match done {
                Ok((i, Ok(()))) => ready.push(i),
                Ok((i, Err(f))) => {
                    leftovers.push(i);
                    failure.get_or_insert(f);
                }
                Err(e) => {
                    failure.get_or_insert(TransferFailure::Io(format!("copy task: {e}")));
                }
            },
            Some(done) = verifying.join_next(), if !verifying.is_empty() => match done {
                Ok(Ok(verdicts)) => {
                    for (i, verdict) in verdicts {
                        match verdict {
                            Verdict::Placed(size) => {
                                round.bytes += size;
                                report.files_done += 1;
                                report.bytes_done += size;
                            }
                            Verdict::Mismatch(m) => {
                                round.again.push(i);
                                round.mismatches.push(m);
                            }
                        }
                    }
                    progress(*report);
                }
                Ok(Err((batch, f))) => {
                    leftovers.extend(batch);
                    failure.get_or_insert(f);
                }
                Err(e) => {
                    failure.get_or_insert(TransferFailure::Io(format!("verify task: {e}")));
                }
            },
        }
    }
    match failure {
        None => Ok(round),
        Some(f) => {
            let temps: Vec<PathBuf> = leftovers.iter().map(|&i| temp_name(&dsts[i])).collect();
            remove_all(backend.as_ref(), dst_side, &temps).await;
            Err(f)
        }
    }
}

/// Hashes a batch of copies at once and renames each that matches its source; removes the
/// others. On an error the whole batch is handed back for cleanup.
async fn verify_batch(
    backend: Arc<dyn TransferBackend>,
    side: Side,
    batch: Vec<(usize, PathBuf, PathBuf, FileDigest)>,
) -> Verified {
    let ids = || batch.iter().map(|b| b.0).collect::<Vec<_>>();
    let temps: Vec<PathBuf> = batch.iter().map(|b| b.1.clone()).collect();
    let written = match backend.hash_many(side, temps).await {
        Ok(w) if w.len() == batch.len() => w,
        Ok(w) => {
            return Err((
                ids(),
                TransferFailure::Io(format!(
                    "hashing {} copies gave {} results",
                    batch.len(),
                    w.len()
                )),
            ))
        }
        Err(e) => {
            return Err((
                ids(),
                TransferFailure::io("cannot hash the copy of", &batch[0].2, e),
            ))
        }
    };
    let mut out = Vec::with_capacity(batch.len());
    // The matching copies are renamed at once (one round trip each on a remote side).
    let mut renames = JoinSet::new();
    for ((i, temp, dst, source), copy) in batch.iter().cloned().zip(written) {
        if copy == Some(source) {
            let b = backend.clone();
            renames.spawn(async move { (i, dst.clone(), source, b.rename(side, temp, dst).await) });
        } else {
            let copy = copy.map_or("missing".into(), |w| {
                format!("{} ({} bytes)", w.hex(), w.size)
            });
            let _ = backend.remove(side, temp).await;
            out.push((
                i,
                Verdict::Mismatch(format!(
                    "{}: source {} ({} bytes), copy {copy}",
                    dst.display(),
                    source.hex(),
                    source.size
                )),
            ));
        }
    }
    let mut failed = None;
    while let Some(done) = renames.join_next().await {
        match done {
            Ok((i, _, source, Ok(()))) => out.push((i, Verdict::Placed(source.size))),
            Ok((_, dst, _, Err(e))) => {
                failed.get_or_insert(TransferFailure::io("cannot rename to", &dst, e));
            }
            Err(e) => {
                failed.get_or_insert(TransferFailure::Io(format!("rename task: {e}")));
            }
        }
    }
    if let Some(f) = failed {
        let rest = batch
            .iter()
            .map(|b| b.0)
            .filter(|j| !out.iter().any(|(k, _)| k == j))
            .collect();
        return Err((rest, f));
    }
    Ok(out)
}

/// Removes temporaries (best effort).
async fn remove_all(backend: &dyn TransferBackend, side: Side, paths: &[PathBuf]) {
    for p in paths {
        let _ = backend.remove(side, p.clone()).await;
    }
}

/// A configured root made absolute and normalised, so payload paths compare against it.
fn absolute_root(root: &Path) -> PathBuf {
    std::path::absolute(root)
        .unwrap_or_else(|_| root.to_path_buf())
        .components()
        .collect()
}

/// Checks a payload path lexically: absolute, no `..`, under one of `roots`. Returns it
/// normalised (no `.`, no doubled or trailing separators).
fn confine(field: &str, raw: &str, roots: &[PathBuf]) -> Result<PathBuf, TransferFailure> {
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(TransferFailure::PathRefused(format!(
            "{field} `{raw}` is not absolute"
        )));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(TransferFailure::PathRefused(format!(
            "{field} `{raw}` contains `..`"
        )));
    }
    let normal: PathBuf = path.components().collect();
    if roots.iter().any(|root| normal.starts_with(root)) {
        Ok(normal)
    } else {
        Err(TransferFailure::PathRefused(format!(
            "{field} `{raw}` is outside the allowed roots"
        )))
    }
}

/// Checks that `path` still lies under a root once symlinks are resolved, so a link inside
/// a root cannot carry the transfer out of it.
async fn confine_resolved(
    backend: &dyn TransferBackend,
    side: Side,
    path: &Path,
    roots: &[PathBuf],
) -> Result<(), TransferFailure> {
    let real = backend
        .resolve(side, path.to_path_buf())
        .await
        .map_err(|e| TransferFailure::io("cannot resolve", path, e))?;
    for root in roots {
        let real_root = backend
            .resolve(side, root.clone())
            .await
            .map_err(|e| TransferFailure::io("cannot resolve", root, e))?;
        if real.starts_with(&real_root) {
            return Ok(());
        }
    }
    Err(TransferFailure::PathRefused(format!(
        "`{}` resolves to `{}`, outside the allowed roots",
        path.display(),
        real.display()
    )))
}

/// Logs what the walk left behind: a few by name, and how many in all.
fn log_not_copied(req: &TransferRequest, src: &Path, entries: &[(PathBuf, NotCopied)]) {
    const NAMED: usize = 20;
    for (path, why) in entries.iter().take(NAMED) {
        tracing::warn!(case = %req.step.case_id, src = %src.display(), entry = %path.display(), ?why, "not copied");
    }
    if entries.len() > NAMED {
        tracing::warn!(case = %req.step.case_id, count = entries.len(), "entries not copied in all");
    }
}

/// The command that reports a transfer's outcome to the conductor.
pub fn outcome_command(
    req: &TransferRequest,
    direction: Direction,
    result: Result<TransferDone, TransferFailure>,
) -> Command {
    match (result, direction) {
        (Ok(done), Direction::Upload) => Command::CaseUploadCompleted(done),
        (Ok(done), Direction::Download) => Command::ResultsDownloadCompleted(done),
        (Err(failure), _) => Command::FileTransferFailed(FailurePayload {
            case_id: req.step.case_id.clone(),
            error_type: failure.error_type().into(),
            error_message: failure.to_string(),
            original_payload: serde_json::to_value(req).unwrap_or_default(),
            step: Some(req.step.step.clone()),
            attempt: Some(req.step.attempt),
            failure: Some(FailureInfo {
                category: failure.category(),
                phase: direction.phase().into(),
                code: failure.code().into(),
                detail: failure.to_string(),
            }),
            output_tail: String::new(),
        }),
    }
}

/// Runs the transfer worker on `file_transfer_queue` until shutdown. A transfer under way
/// finishes before shutdown is noticed; one cut off by the process ending is redelivered
/// and resumes.
pub async fn run(
    bus: Arc<dyn Bus>,
    worker: Arc<TransferWorker>,
    status: Arc<WorkerStatus>,
    shutdown: Shutdown,
) {
    let handler_bus = bus.clone();
    let handler_status = status.clone();
    workers::consume(
        bus,
        FILE_TRANSFER_QUEUE,
        PREFETCH,
        status,
        shutdown,
        move |envelope, delivery| {
            let bus = handler_bus.clone();
            let worker = worker.clone();
            let status = handler_status.clone();
            async move {
                let handled = handle(bus.as_ref(), &worker, &status, envelope).await;
                (handled, Some::<Delivery>(delivery))
            }
        },
    )
    .await
}

/// Transfers one request and reports it; acked only once the report is confirmed.
async fn handle(
    bus: &dyn Bus,
    worker: &TransferWorker,
    status: &WorkerStatus,
    envelope: Envelope,
) -> Handled {
    let (req, direction) = match envelope.command {
        Command::UploadCase(req) => (req, Direction::Upload),
        Command::DownloadResults(req) => (req, Direction::Download),
        other => {
            return Handled::Reject(format!("`{}` is not a file-transfer command", other.name()))
        }
    };
    status.set(format!(
        "{} {} step {}",
        direction.phase(),
        req.step.case_id,
        req.step.step
    ));
    let result = {
        // The latest progress goes to the conductor at most once a second.
        let (tx, mut rx) = tokio::sync::watch::channel(None::<TransferProgress>);
        let on_progress = |p| {
            tx.send_replace(Some(p));
        };
        let transfer = worker.transfer_with_progress(&req, direction, &on_progress);
        let report = async {
            loop {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                let latest = *rx.borrow_and_update();
                if let Some(p) = latest {
                    let command = Command::ExecutionProgress(ExecutionProgress {
                        step: req.step.clone(),
                        fraction: p.fraction(),
                        message: p.message(),
                    });
                    if let Err(e) = workers::send_command(
                        bus,
                        CONDUCTOR_QUEUE,
                        command,
                        Some(&envelope.correlation_id),
                    )
                    .await
                    {
                        tracing::debug!(error = %e, "transfer progress not published");
                    }
                }
                tokio::time::sleep(PROGRESS_INTERVAL).await;
            }
        };
        tokio::select! {
            r = transfer => r,
            _ = report => unreachable!("the report loop never ends"),
        }
    };
    match &result {
        Ok(done) => tracing::info!(case = %req.step.case_id, step = %req.step.step,
            files = done.files, bytes = done.bytes, skipped = done.skipped, "{} done", direction.phase()),
        Err(failure) => tracing::warn!(case = %req.step.case_id, step = %req.step.step,
            error = %failure, "{} failed", direction.phase()),
    }
    let command = outcome_command(&req, direction, result);
    let sent = workers::send_command(
        bus,
        CONDUCTOR_QUEUE,
        command,
        Some(&envelope.correlation_id),
    )
    .await;
    status.set("idle");
    match sent {
        Ok(()) => Handled::Ack,
        Err(e) => {
            tracing::warn!(case = %req.step.case_id, error = %e, "cannot report the transfer; requeueing it");
            Handled::Retry
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Acker, BusError, BusResult, Outgoing, Settle, Subscription};
    use crate::protocol::topology::{dead_letter_queue, Topology};
    use crate::protocol::StepRef;
    use parking_lot::Mutex;
    use rand::RngCore;
    use std::collections::BTreeMap;
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use tokio::sync::{mpsc, watch};

    struct Fixture {
        _dir: tempfile::TempDir,
        scan: PathBuf,
        results: PathBuf,
        work: PathBuf,
        outside: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let fx = Fixture {
            scan: root.join("scan"),
            results: root.join("results"),
            work: root.join("work"),
            outside: root.join("outside"),
            _dir: dir,
        };
        for d in [&fx.scan, &fx.results, &fx.work, &fx.outside] {
            fs::create_dir_all(d).unwrap();
        }
        fx
    }

    impl Fixture {
        fn worker(&self) -> TransferWorker {
            TransferWorker::new(
                vec![self.scan.clone(), self.results.clone()],
                vec![("local".into(), self.work.clone())],
            )
        }

        fn worker_with(&self, backend: Arc<dyn TransferBackend>) -> TransferWorker {
            TransferWorker::with_backends(
                vec![self.scan.clone(), self.results.clone()],
                vec![("local".into(), self.work.clone(), backend)],
            )
        }
    }

    fn request(local: &Path, remote: &Path) -> TransferRequest {
        TransferRequest {
            step: StepRef {
                case_id: "case1".into(),
                step: "upload".into(),
                attempt: 1,
            },
            host: "local".into(),
            local_dir: local.display().to_string(),
            remote_dir: remote.display().to_string(),
        }
    }

    /// Writes a 20-file case in nested directories, three of them 1 MB; returns its bytes.
    fn write_case(root: &Path) -> u64 {
        let mut rng = rand::rng();
        let mut total = 0;
        for i in 0..20u64 {
            let dir = ["", "plan", "plan/beam1", "logs/G1/raw"][(i % 4) as usize];
            let size = if i % 7 == 0 { 1 << 20 } else { 1 + i * 37 };
            let mut data = vec![0u8; size as usize];
            rng.fill_bytes(&mut data);
            fs::create_dir_all(root.join(dir)).unwrap();
            fs::write(root.join(dir).join(format!("f{i:02}.dcm")), data).unwrap();
            total += size;
        }
        fs::create_dir_all(root.join("empty")).unwrap();
        total
    }

    /// Every regular file under `root`, by relative path, with its content.
    fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut pending = vec![root.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in fs::read_dir(dir).unwrap() {
                let entry = entry.unwrap();
                let kind = entry.file_type().unwrap();
                if kind.is_dir() {
                    pending.push(entry.path());
                } else if kind.is_file() {
                    let rel = entry.path().strip_prefix(root).unwrap().to_path_buf();
                    out.insert(rel, fs::read(entry.path()).unwrap());
                }
            }
        }
        out
    }

    fn part_files(root: &Path) -> Vec<PathBuf> {
        snapshot(root)
            .into_keys()
            .filter(|p| p.to_string_lossy().ends_with(PART_SUFFIX))
            .collect()
    }

    #[tokio::test]
    async fn upload_copies_the_tree_and_a_rerun_resumes() {
        let fx = fixture();
        let src = fx.scan.join("case1");
        let total = write_case(&src);
        let dst = fx.work.join("case1/input");
        let worker = fx.worker();
        let req = request(&src, &dst);

        let done = worker.transfer(&req, Direction::Upload).await.unwrap();
        assert_eq!((done.files, done.bytes, done.skipped), (20, total, 0));
        assert_eq!(done.step, req.step);
        assert_eq!(snapshot(&dst), snapshot(&src));
        assert!(dst.join("empty").is_dir(), "empty directories are copied");
        assert!(part_files(&dst).is_empty());

        let again = worker.transfer(&req, Direction::Upload).await.unwrap();
        assert_eq!((again.files, again.bytes, again.skipped), (20, total, 20));
        assert_eq!((done.copied_bytes, again.copied_bytes), (total, 0));

        // Same size, different content: only a hash can tell.
        let changed = src.join("plan/beam1/f02.dcm");
        let mut data = fs::read(&changed).unwrap();
        data[0] ^= 0xff;
        fs::write(&changed, &data).unwrap();
        let third = worker.transfer(&req, Direction::Upload).await.unwrap();
        assert_eq!((third.files, third.skipped), (20, 19));
        assert_eq!(fs::read(dst.join("plan/beam1/f02.dcm")).unwrap(), data);
        assert_eq!(snapshot(&dst), snapshot(&src));
    }

    #[tokio::test]
    async fn download_copies_remote_results_into_the_results_dir() {
        let fx = fixture();
        let remote = fx.work.join("case1/output");
        let total = write_case(&remote);
        let local = fx.results.join("case1");
        let done = fx
            .worker()
            .transfer(&request(&local, &remote), Direction::Download)
            .await
            .unwrap();
        assert_eq!((done.files, done.bytes, done.skipped), (20, total, 0));
        assert_eq!(snapshot(&local), snapshot(&remote));
        assert!(part_files(&local).is_empty());
    }

    #[tokio::test]
    async fn paths_outside_the_roots_are_refused() {
        let fx = fixture();
        let src = fx.scan.join("case1");
        write_case(&src);
        let worker = fx.worker();
        let good_remote = fx.work.join("case1").display().to_string();
        let refused = [
            (
                src.display().to_string(),
                format!("{}/../escape", fx.work.display()),
            ),
            ("scan/case1".to_string(), good_remote.clone()),
            (src.display().to_string(), "relative/dir".to_string()),
            (fx.outside.display().to_string(), good_remote.clone()),
            // A local root is no remote root.
            (
                src.display().to_string(),
                fx.results.join("x").display().to_string(),
            ),
            // A sibling whose name merely starts with the root's name.
            (format!("{}2/case1", fx.scan.display()), good_remote),
        ];
        for (local, remote) in refused {
            let mut req = request(&src, &src);
            req.local_dir = local.clone();
            req.remote_dir = remote.clone();
            for direction in [Direction::Upload, Direction::Download] {
                let err = worker.transfer(&req, direction).await.unwrap_err();
                assert_eq!(err.error_type(), "PathRefused", "{local} {remote}: {err}");
                assert_eq!(err.category(), FailureCategory::Permanent);
            }
        }
        assert!(snapshot(&fx.work).is_empty() && snapshot(&fx.outside).is_empty());
    }

    #[tokio::test]
    async fn symlinks_never_lead_out_of_a_root() {
        let fx = fixture();
        fs::write(fx.outside.join("secret"), b"not case data").unwrap();
        let src = fx.scan.join("case1");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("plan.dcm"), b"plan").unwrap();
        symlink(fx.outside.join("secret"), src.join("leak.dcm")).unwrap();
        symlink(&fx.outside, src.join("leakdir")).unwrap();
        let dst = fx.work.join("case1");
        let worker = fx.worker();

        let done = worker
            .transfer(&request(&src, &dst), Direction::Upload)
            .await
            .unwrap();
        assert_eq!(done.files, 1);
        assert_eq!(
            snapshot(&dst).into_keys().collect::<Vec<_>>(),
            vec![PathBuf::from("plan.dcm")]
        );
        assert!(fs::symlink_metadata(dst.join("leakdir")).is_err());

        // A case directory that is itself a link out of the scan root.
        symlink(&fx.outside, fx.scan.join("linked")).unwrap();
        let err = worker
            .transfer(&request(&fx.scan.join("linked"), &dst), Direction::Upload)
            .await
            .unwrap_err();
        assert_eq!(err.error_type(), "PathRefused", "{err}");
        // A destination reached through a link out of the host root.
        symlink(&fx.outside, fx.work.join("via")).unwrap();
        let err = worker
            .transfer(
                &request(&src, &fx.work.join("via/case1")),
                Direction::Upload,
            )
            .await
            .unwrap_err();
        assert_eq!(err.error_type(), "PathRefused", "{err}");
        assert_eq!(snapshot(&fx.outside).len(), 1);
    }

    #[tokio::test]
    async fn a_missing_source_or_unknown_host_is_permanent() {
        let fx = fixture();
        let worker = fx.worker();
        let req = request(&fx.scan.join("gone"), &fx.work.join("gone"));
        let err = worker.transfer(&req, Direction::Upload).await.unwrap_err();
        assert_eq!(
            (err.error_type(), err.code()),
            ("SourceMissing", "source_missing")
        );
        assert_eq!(err.category(), FailureCategory::Permanent);
        let err = worker
            .transfer(&req, Direction::Download)
            .await
            .unwrap_err();
        assert_eq!(err.error_type(), "SourceMissing");

        let mut req = request(&fx.scan, &fx.work);
        req.host = "gpu-server-9".into();
        let err = worker.transfer(&req, Direction::Upload).await.unwrap_err();
        assert_eq!(err, TransferFailure::UnknownHost("gpu-server-9".into()));
        assert_eq!(err.category(), FailureCategory::Permanent);
    }

    /// [`LocalBackend`], except that the first `bad_copies` copies come out corrupted.
    struct Corrupting {
        bad_copies: AtomicU32,
    }

    impl TransferBackend for Corrupting {
        fn list(&self, side: Side, root: PathBuf) -> BoxFuture<'_, io::Result<Tree>> {
            LocalBackend.list(side, root)
        }
        fn hash(&self, side: Side, path: PathBuf) -> BoxFuture<'_, io::Result<Option<FileDigest>>> {
            LocalBackend.hash(side, path)
        }
        fn copy_to_temp(
            &self,
            direction: Direction,
            src: PathBuf,
            temp: PathBuf,
        ) -> BoxFuture<'_, io::Result<u64>> {
            Box::pin(async move {
                let written = LocalBackend
                    .copy_to_temp(direction, src, temp.clone())
                    .await?;
                let corrupt = self
                    .bad_copies
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if corrupt {
                    let mut data = fs::read(&temp)?;
                    data[0] ^= 1;
                    fs::write(&temp, data)?;
                }
                Ok(written)
            })
        }
        fn rename(&self, side: Side, from: PathBuf, to: PathBuf) -> BoxFuture<'_, io::Result<()>> {
            LocalBackend.rename(side, from, to)
        }
        fn remove(&self, side: Side, path: PathBuf) -> BoxFuture<'_, io::Result<()>> {
            LocalBackend.remove(side, path)
        }
        fn make_dir(&self, side: Side, path: PathBuf) -> BoxFuture<'_, io::Result<bool>> {
            LocalBackend.make_dir(side, path)
        }
        fn resolve(&self, side: Side, path: PathBuf) -> BoxFuture<'_, io::Result<PathBuf>> {
            LocalBackend.resolve(side, path)
        }
    }

    #[tokio::test]
    async fn a_corrupted_copy_is_retried_then_fails_without_a_final_name() {
        let fx = fixture();
        let src = fx.scan.join("case1");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("dose.bin"), vec![42u8; 4096]).unwrap();
        let dst = fx.work.join("case1");
        let req = request(&src, &dst);

        let flaky = fx.worker_with(Arc::new(Corrupting {
            bad_copies: AtomicU32::new(CHECKSUM_TRIES - 1),
        }));
        let done = flaky.transfer(&req, Direction::Upload).await.unwrap();
        assert_eq!((done.files, done.skipped), (1, 0));
        assert_eq!(snapshot(&dst), snapshot(&src));

        fs::remove_file(dst.join("dose.bin")).unwrap();
        let broken = fx.worker_with(Arc::new(Corrupting {
            bad_copies: AtomicU32::new(u32::MAX),
        }));
        let err = broken.transfer(&req, Direction::Upload).await.unwrap_err();
        assert_eq!(
            (err.error_type(), err.code()),
            ("ChecksumMismatch", "checksum_mismatch")
        );
        assert!(err.to_string().contains("dose.bin"), "{err}");
        assert!(
            snapshot(&dst).is_empty(),
            "neither a final name nor a temporary is left"
        );
    }

    #[test]
    fn a_failure_reports_the_structured_record() {
        let req = request(Path::new("/scan/c"), Path::new("/work/c"));
        let failure = TransferFailure::PathRefused("remote_dir `x` is not absolute".into());
        let Command::FileTransferFailed(p) =
            outcome_command(&req, Direction::Download, Err(failure.clone()))
        else {
            panic!("expected file_transfer_failed");
        };
        assert_eq!(p.case_id, req.step.case_id);
        assert_eq!(p.error_type, "PathRefused");
        assert_eq!(p.error_message, failure.to_string());
        assert_eq!(p.original_payload, serde_json::to_value(&req).unwrap());
        assert_eq!((p.step.as_deref(), p.attempt), (Some("upload"), Some(1)));
        let info = p.failure.unwrap();
        assert_eq!(info.category, FailureCategory::Permanent);
        assert_eq!(
            (info.phase.as_str(), info.code.as_str()),
            ("download", "path_refused")
        );
        assert_eq!(p.output_tail, "");
    }

    /// A bus that hands out one scripted subscription and records what is published.
    struct ScriptedBus {
        deliveries: Mutex<Option<mpsc::Receiver<Delivery>>>,
        published: Mutex<Vec<Outgoing>>,
        refuse_publish: AtomicBool,
    }

    impl Bus for ScriptedBus {
        fn declare(&self, _: &Topology) -> BoxFuture<'_, BusResult<()>> {
            Box::pin(async { Ok(()) })
        }
        fn publish(&self, message: Outgoing) -> BoxFuture<'_, BusResult<()>> {
            Box::pin(async move {
                if self.refuse_publish.load(Ordering::SeqCst) {
                    return Err(BusError::Nacked);
                }
                self.published.lock().push(message);
                Ok(())
            })
        }
        fn consume(&self, queue: &str, _: u16) -> BoxFuture<'_, BusResult<Subscription>> {
            let rx = self.deliveries.lock().take();
            let queue = queue.to_string();
            Box::pin(async move {
                rx.map(|rx| Subscription::new(queue, rx))
                    .ok_or_else(|| BusError::Closed("used up".into()))
            })
        }
        fn reply_queue(&self) -> BoxFuture<'_, BusResult<Subscription>> {
            Box::pin(async { Err(BusError::Closed("none".into())) })
        }
        fn bind(&self, _: &str, _: &str, _: &str) -> BoxFuture<'_, BusResult<()>> {
            Box::pin(async { Ok(()) })
        }
        fn queue_depth(&self, _: &str) -> BoxFuture<'_, BusResult<Option<(u32, u32)>>> {
            Box::pin(async { Ok(None) })
        }
        fn describe(&self) -> String {
            "scripted".into()
        }
    }

    fn delivery(
        command: Command,
        tag: u64,
        acks: &mpsc::UnboundedSender<(u64, Settle)>,
    ) -> Delivery {
        let envelope = Envelope::with_correlation(command, format!("corr-{tag}"));
        Delivery::new(
            envelope.to_bytes().into(),
            String::new(),
            FILE_TRANSFER_QUEUE.into(),
            false,
            vec![],
            Some(envelope.correlation_id.clone()),
            None,
            Acker::new(tag, acks.clone()),
        )
    }

    async fn next_settle(acks: &mut mpsc::UnboundedReceiver<(u64, Settle)>) -> (u64, Settle) {
        tokio::time::timeout(Duration::from_secs(30), acks.recv())
            .await
            .expect("settled in time")
            .expect("ack channel open")
    }

    fn not_progress(m: &Outgoing) -> bool {
        crate::protocol::decode(&m.body)
            .map(|e| e.command.name() != "execution_progress")
            .unwrap_or(true)
    }

    #[tokio::test]
    async fn run_reports_to_the_conductor_before_acking() {
        let fx = fixture();
        let src = fx.scan.join("case1");
        write_case(&src);
        let req = request(&src, &fx.work.join("case1"));
        let (tx, rx) = mpsc::channel(8);
        let bus = Arc::new(ScriptedBus {
            deliveries: Mutex::new(Some(rx)),
            published: Mutex::new(vec![]),
            refuse_publish: AtomicBool::new(false),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let (ack_tx, mut acks) = mpsc::unbounded_channel();
        let worker = tokio::spawn(run(
            bus.clone(),
            Arc::new(fx.worker()),
            WorkerStatus::new(),
            stop_rx,
        ));

        tx.send(delivery(Command::UploadCase(req.clone()), 1, &ack_tx))
            .await
            .unwrap();
        assert_eq!(next_settle(&mut acks).await, (1, Settle::Ack));
        {
            let all = bus.published.lock();
            let progress: Vec<_> = all.iter().filter(|m| !not_progress(m)).collect();
            let env = crate::protocol::decode(&progress[0].body).unwrap();
            let Command::ExecutionProgress(p) = env.command else {
                unreachable!()
            };
            assert!(p.message.contains("/20 files"), "{}", p.message);
            let published: Vec<_> = all.iter().filter(|m| not_progress(m)).collect();
            assert_eq!(published.len(), 1);
            assert_eq!(published[0].routing_key, CONDUCTOR_QUEUE);
            let env = crate::protocol::decode(&published[0].body).unwrap();
            assert_eq!(env.correlation_id, "corr-1");
            let Command::CaseUploadCompleted(done) = env.command else {
                panic!("expected case_upload_completed, got {:?}", env.command);
            };
            assert_eq!((done.files, done.skipped), (20, 0));
        }

        let stray = Command::CaseUploadCompleted(TransferDone {
            step: req.step.clone(),
            files: 0,
            bytes: 0,
            skipped: 0,
            copied_bytes: 0,
        });
        tx.send(delivery(stray, 2, &ack_tx)).await.unwrap();
        assert_eq!(next_settle(&mut acks).await, (2, Settle::Ack));
        assert_eq!(
            bus.published
                .lock()
                .iter()
                .filter(|m| not_progress(m))
                .nth(1)
                .unwrap()
                .routing_key,
            dead_letter_queue(FILE_TRANSFER_QUEUE)
        );

        bus.refuse_publish.store(true, Ordering::SeqCst);
        tx.send(delivery(Command::UploadCase(req), 3, &ack_tx))
            .await
            .unwrap();
        assert_eq!(
            next_settle(&mut acks).await,
            (3, Settle::Nack { requeue: true })
        );

        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(30), worker)
            .await
            .expect("worker stops on shutdown")
            .unwrap();
    }
}
