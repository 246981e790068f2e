//! [`SftpBackend`]: the transfer backend of an `ssh` host. [`Side::Local`] is this machine
//! ([`LocalBackend`]); [`Side::Remote`] is the server, reached over the host's one SSH
//! session: files and directories through SFTP, hashes through `openssl dgst` or `sha256sum`
//! run on the server (a whole batch in one command, on a helper shell kept open, see
//! [`SshHost::run`]), never by reading the files back. Downloads are flushed per file and
//! synced once per transfer (`syncfs`) before it is reported done.
//!
//! Writes on the server go to a fresh `<name>.mqic-part` opened with `O_CREAT|O_EXCL` (so a
//! planted symlink cannot redirect them) and are shut down (flushed, closed, checked) before
//! they are hashed; the rename to the final name follows the hash check.

use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh_sftp::client::error::Error as SftpError;
use russh_sftp::protocol::{OpenFlags, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use super::local::LocalBackend;
use super::{Direction, FileDigest, NotCopied, Side, TransferBackend, Tree, TreeFile, PART_SUFFIX};
use crate::bus::BoxFuture;
use crate::conductor::template::shell_quote;
use crate::hpc::ssh::{SshError, SshHost};

/// A walk stops past this many entries (as [`LocalBackend`]'s does).
const MAX_TREE_ENTRIES: usize = 1_000_000;
/// Paths per hash command: well under any command-line limit.
const HASH_BATCH: usize = 128;
/// Hash commands run at once on the server, for all transfers to it. One keeps up with the
/// copying (hashing is many times faster than SFTP) and needs only the helper shell the
/// transfer starts at once: each further shell is a new channel, and on a server whose
/// `~/.bashrc` runs conda or pyenv set-up for every channel, starting one costs more than
/// the hashing it would speed up.
const HASH_COMMANDS: usize = 1;
/// Copy buffer: a few SFTP packets, so russh-sftp keeps its requests in flight.
const COPY_BUFFER: usize = 1 << 20;

/// Transfers to and from one SSH host.
#[derive(Debug, Clone)]
pub struct SftpBackend {
    host: Arc<SshHost>,
    /// [`HASH_COMMANDS`] permits.
    hashing: Arc<tokio::sync::Semaphore>,
}

impl SftpBackend {
    pub fn new(host: Arc<SshHost>) -> SftpBackend {
        SftpBackend {
            host,
            hashing: Arc::new(tokio::sync::Semaphore::new(HASH_COMMANDS)),
        }
    }

    pub fn host(&self) -> &Arc<SshHost> {
        &self.host
    }
}

fn ssh_io(e: SshError) -> io::Error {
    let kind = if e.is_retryable() {
        ErrorKind::ConnectionAborted
    } else {
        ErrorKind::PermissionDenied
    };
    io::Error::new(kind, e.to_string())
}

fn sftp_io(path: &str, e: SftpError) -> io::Error {
    let kind = match &e {
        SftpError::Status(s) => match s.status_code {
            StatusCode::NoSuchFile => ErrorKind::NotFound,
            StatusCode::PermissionDenied => ErrorKind::PermissionDenied,
            _ => ErrorKind::Other,
        },
        SftpError::Timeout => ErrorKind::TimedOut,
        _ => ErrorKind::Other,
    };
    io::Error::new(kind, format!("{path}: {e}"))
}

/// The file type bits of SFTP attributes (russh-sftp's `is_*` helpers test single bits, so a
/// symlink also looks like a regular file to them).
fn file_kind(meta: &russh_sftp::protocol::FileAttributes) -> u32 {
    meta.permissions.unwrap_or(0) & 0o170000
}
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// SFTP paths are strings: a non-UTF-8 path is refused rather than mangled.
fn remote_str(path: &Path) -> io::Result<String> {
    path.to_str().map(str::to_string).ok_or_else(|| {
        io::Error::new(
            ErrorKind::InvalidInput,
            format!("{} is not valid UTF-8", path.display()),
        )
    })
}

/// The script that hashes its arguments on the server. Prints the 1-based indices of the
/// arguments that are regular files (not symlinks), then one size per such file, then
/// `sha256sum`'s line per such file, in argument order. `sha256sum` escapes odd names (a
/// leading `\`), so each file is one line and the hash is the first 64 hex digits after it.
///
/// `openssl dgst -r` prints the same lines several times faster (it uses the CPU's SHA
/// instructions; coreutils' `sha256sum` does not), so it is used where the server has it. It
/// does not escape names: its answer is taken only when it has exactly one line per file
/// (no name holds a newline before the last), otherwise `sha256sum` hashes the batch.
const HASH_SCRIPT: &str = r#"n=$#; i=0; idx=""
for f do
  i=$((i+1))
  if [ -f "$f" ] && [ ! -h "$f" ]; then set -- "$@" "$f"; idx="$idx $i"; fi
done
shift "$n"
echo "files:$idx"
[ "$#" -eq 0 ] && exit 0
stat -c %s -- "$@" || exit 3
if command -v openssl >/dev/null 2>&1 && out=$(openssl dgst -sha256 -r -- "$@" 2>/dev/null) \
   && [ "$(printf '%s\n' "$out" | wc -l)" -eq "$#" ]; then
  printf '%s\n' "$out"
else
  sha256sum -b -- "$@" || exit 4
fi
"#;

/// Parses [`HASH_SCRIPT`]'s output for `count` arguments.
fn parse_hashes(stdout: &str, count: usize) -> io::Result<Vec<Option<FileDigest>>> {
    let bad = |why: &str| {
        io::Error::new(
            ErrorKind::InvalidData,
            format!("unexpected sha256sum output ({why})"),
        )
    };
    let mut lines = stdout.lines();
    let header = lines.next().ok_or_else(|| bad("empty"))?;
    let idx: Vec<usize> = header
        .strip_prefix("files:")
        .ok_or_else(|| bad("no header"))?
        .split_whitespace()
        .map(|i| i.parse::<usize>().map_err(|_| bad("bad index")))
        .collect::<io::Result<_>>()?;
    let sizes: Vec<u64> = (&mut lines)
        .take(idx.len())
        .map(|l| l.trim().parse::<u64>().map_err(|_| bad("bad size")))
        .collect::<io::Result<_>>()?;
    let hashes: Vec<[u8; 32]> = lines
        .take(idx.len())
        .map(|l| {
            let l = l.strip_prefix('\\').unwrap_or(l);
            let hex = l.get(..64).ok_or_else(|| bad("short hash line"))?;
            let mut out = [0u8; 32];
            for (i, byte) in out.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                    .map_err(|_| bad("hash is not hex"))?;
            }
            Ok(out)
        })
        .collect::<io::Result<_>>()?;
    if sizes.len() != idx.len() || hashes.len() != idx.len() {
        return Err(bad("too few lines"));
    }
    let mut out = vec![None; count];
    for ((i, size), sha256) in idx.into_iter().zip(sizes).zip(hashes) {
        let slot = out
            .get_mut(i.wrapping_sub(1))
            .ok_or_else(|| bad("index out of range"))?;
        *slot = Some(FileDigest { size, sha256 });
    }
    Ok(out)
}

impl SftpBackend {
    /// Hashes one batch with one command on the server.
    async fn hash_batch(&self, paths: &[PathBuf]) -> io::Result<Vec<Option<FileDigest>>> {
        let mut command = format!("sh -c {} sh", shell_quote(HASH_SCRIPT));
        for p in paths {
            command.push(' ');
            command.push_str(&shell_quote(&remote_str(p)?));
        }
        let out = {
            let _permit = self
                .hashing
                .acquire()
                .await
                .expect("the semaphore is never closed");
            self.host.run(&command, &[]).await.map_err(ssh_io)?
        };
        if !out.success() {
            return Err(io::Error::other(format!(
                "hashing on {} failed (status {:?}): {}",
                self.host.name(),
                out.status,
                out.stderr_lossy().trim()
            )));
        }
        parse_hashes(&out.stdout_lossy(), paths.len())
    }

    async fn hash_remote(&self, paths: Vec<PathBuf>) -> io::Result<Vec<Option<FileDigest>>> {
        let chunks: Vec<Vec<PathBuf>> = paths.chunks(HASH_BATCH).map(<[_]>::to_vec).collect();
        let mut results: Vec<Option<Vec<Option<FileDigest>>>> = vec![None; chunks.len()];
        let mut running = JoinSet::new();
        let mut next = 0;
        loop {
            while running.len() < HASH_COMMANDS && next < chunks.len() {
                let (me, chunk, i) = (self.clone(), chunks[next].clone(), next);
                running.spawn(async move { (i, me.hash_batch(&chunk).await) });
                next += 1;
            }
            match running.join_next().await {
                None => break,
                Some(Ok((i, r))) => results[i] = Some(r?),
                Some(Err(e)) => return Err(io::Error::other(format!("hash task: {e}"))),
            }
        }
        Ok(results.into_iter().flatten().flatten().collect())
    }

    async fn walk_remote(&self, root: PathBuf) -> io::Result<Tree> {
        let sftp = self.host.sftp().await.map_err(ssh_io)?;
        let root_s = remote_str(&root)?;
        let meta = sftp
            .metadata(root_s.clone())
            .await
            .map_err(|e| sftp_io(&root_s, e))?;
        if file_kind(&meta) != S_IFDIR {
            return Err(io::Error::new(
                ErrorKind::NotADirectory,
                format!("{root_s} is not a directory"),
            ));
        }
        let mut tree = Tree::default();
        let mut pending = vec![PathBuf::new()];
        let mut seen = 0usize;
        while let Some(rel) = pending.pop() {
            let dir = remote_str(&root.join(&rel))?;
            let entries = sftp
                .read_dir(dir.clone())
                .await
                .map_err(|e| sftp_io(&dir, e))?;
            for entry in entries {
                let name = entry.file_name();
                if name == "." || name == ".." {
                    continue;
                }
                seen += 1;
                if seen > MAX_TREE_ENTRIES {
                    return Err(io::Error::other(format!(
                        "{root_s} holds more than {MAX_TREE_ENTRIES} entries"
                    )));
                }
                let rel_path = rel.join(&name);
                // OpenSSH's readdir reports lstat attributes: links are seen as links.
                let meta = entry.metadata();
                let kind = file_kind(&meta);
                if kind == S_IFLNK {
                    tree.not_copied.push((rel_path, NotCopied::Symlink));
                } else if kind == S_IFDIR {
                    tree.dirs.push(rel_path.clone());
                    pending.push(rel_path);
                } else if kind == S_IFREG {
                    if name.ends_with(PART_SUFFIX) {
                        tree.not_copied.push((rel_path, NotCopied::PartFile));
                    } else {
                        tree.files.push(TreeFile {
                            rel: rel_path,
                            size: meta.len(),
                        });
                    }
                } else {
                    tree.not_copied.push((rel_path, NotCopied::Special));
                }
            }
        }
        // Parents before children, as the local walk gives them.
        tree.dirs.sort_by_key(|d| d.components().count());
        Ok(tree)
    }

    async fn upload(&self, src: PathBuf, temp: PathBuf) -> io::Result<u64> {
        let sftp = self.host.sftp().await.map_err(ssh_io)?;
        let temp_s = remote_str(&temp)?;
        let mut input = {
            use std::os::unix::fs::OpenOptionsExt;
            let src = src.clone();
            let f = tokio::task::spawn_blocking(move || {
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&src)
            })
            .await
            .map_err(|e| io::Error::other(format!("blocking task failed: {e}")))??;
            tokio::fs::File::from_std(f)
        };
        let flags = OpenFlags::CREATE | OpenFlags::EXCLUDE | OpenFlags::WRITE;
        // A leftover temporary (or anything else in its place) makes the exclusive open
        // fail; it is removed and the open tried once more. Only then, so the usual case
        // costs one round trip.
        let mut output = match sftp.open_with_flags(temp_s.clone(), flags).await {
            Ok(f) => f,
            Err(first) => {
                match sftp.remove_file(temp_s.clone()).await {
                    Ok(()) => {}
                    Err(e) => {
                        let e = sftp_io(&temp_s, e);
                        if e.kind() != ErrorKind::NotFound {
                            return Err(e);
                        }
                        // Nothing was in the way: the first failure is the answer.
                        return Err(sftp_io(&temp_s, first));
                    }
                }
                sftp.open_with_flags(temp_s.clone(), flags)
                    .await
                    .map_err(|e| sftp_io(&temp_s, e))?
            }
        };
        let mut buf = vec![0u8; COPY_BUFFER];
        let mut written = 0u64;
        loop {
            let n = input.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            output.write_all(&buf[..n]).await?;
            written += n as u64;
        }
        // Without this, write errors are lost when the handle is dropped.
        output.shutdown().await?;
        Ok(written)
    }

    async fn download(&self, src: PathBuf, temp: PathBuf) -> io::Result<u64> {
        let sftp = self.host.sftp().await.map_err(ssh_io)?;
        let src_s = remote_str(&src)?;
        let mut input = sftp
            .open(src_s.clone())
            .await
            .map_err(|e| sftp_io(&src_s, e))?;
        let output = {
            let temp = temp.clone();
            tokio::task::spawn_blocking(move || {
                match std::fs::remove_file(&temp) {
                    Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&temp)
            })
            .await
            .map_err(|e| io::Error::other(format!("blocking task failed: {e}")))??
        };
        let mut output = tokio::fs::File::from_std(output);
        let mut buf = vec![0u8; COPY_BUFFER];
        let mut written = 0u64;
        loop {
            let n = input.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            output.write_all(&buf[..n]).await?;
            written += n as u64;
        }
        // Flushed here, synced to disk by `settle` once for the whole tree (an fsync per
        // file costs milliseconds each; a crash before `settle` leaves a transfer that was
        // never reported done, and its retry hashes every file again).
        output.flush().await?;
        {
            // Start writing it out now, so the final `settle` finds little left to do.
            use std::os::fd::AsRawFd;
            // SAFETY: the descriptor is open for the call; the call only starts writeback.
            unsafe { libc::sync_file_range(output.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        }
        let _ = input.shutdown().await;
        Ok(written)
    }

    /// Syncs the filesystem holding `root` to disk (one `syncfs`, not an fsync per file).
    async fn settle_local(&self, root: PathBuf) -> io::Result<()> {
        tokio::task::spawn_blocking(move || {
            use std::os::fd::AsRawFd;
            let dir = std::fs::File::open(&root)?;
            // SAFETY: `dir` is an open descriptor for the duration of the call.
            if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
        .await
        .map_err(|e| io::Error::other(format!("blocking task failed: {e}")))?
    }

    async fn rename_remote(&self, from: PathBuf, to: PathBuf) -> io::Result<()> {
        let sftp = self.host.sftp().await.map_err(ssh_io)?;
        let (from_s, to_s) = (remote_str(&from)?, remote_str(&to)?);
        match sftp.rename(from_s.clone(), to_s.clone()).await {
            Ok(()) => Ok(()),
            Err(first) => {
                // Plain SFTP rename refuses to replace an existing file; the one there
                // failed its hash check, so it goes first.
                match sftp.symlink_metadata(to_s.clone()).await {
                    Ok(meta) if file_kind(&meta) != S_IFDIR => {
                        sftp.remove_file(to_s.clone())
                            .await
                            .map_err(|e| sftp_io(&to_s, e))?;
                        sftp.rename(from_s, to_s.clone())
                            .await
                            .map_err(|e| sftp_io(&to_s, e))
                    }
                    _ => Err(sftp_io(&to_s, first)),
                }
            }
        }
    }

    async fn remove_remote(&self, path: PathBuf) -> io::Result<()> {
        let sftp = self.host.sftp().await.map_err(ssh_io)?;
        let s = remote_str(&path)?;
        match sftp.remove_file(s.clone()).await {
            Ok(()) => Ok(()),
            Err(e) => match sftp_io(&s, e) {
                e if e.kind() == ErrorKind::NotFound => Ok(()),
                e => Err(e),
            },
        }
    }

    async fn make_dir_remote(&self, path: PathBuf) -> io::Result<bool> {
        let sftp = self.host.sftp().await.map_err(ssh_io)?;
        // The usual case, a new directory in an existing one, costs one round trip. The
        // transfer makes parents before children, each checked by this call, so the parent
        // of a new directory is a real directory, never a link; when the create fails the
        // path is looked at properly below.
        if sftp.create_dir(remote_str(&path)?).await.is_ok() {
            return Ok(true);
        }
        // From the deepest existing ancestor down, creating what is missing; a link or file
        // in the way is an error (writing through it could leave the root).
        let mut missing = Vec::new();
        let mut at = path.as_path();
        loop {
            let s = remote_str(at)?;
            match sftp.symlink_metadata(s.clone()).await {
                Ok(meta) if file_kind(&meta) == S_IFDIR => {
                    if at == path {
                        return Ok(false);
                    }
                    break;
                }
                Ok(_) => {
                    return Err(io::Error::new(
                        ErrorKind::NotADirectory,
                        format!("{s} exists and is not a directory"),
                    ))
                }
                Err(e) => {
                    let e = sftp_io(&s, e);
                    if e.kind() != ErrorKind::NotFound {
                        return Err(e);
                    }
                    missing.push(at.to_path_buf());
                    at = match at.parent() {
                        Some(p) => p,
                        None => break,
                    };
                }
            }
        }
        for dir in missing.into_iter().rev() {
            let s = remote_str(&dir)?;
            if let Err(e) = sftp.create_dir(s.clone()).await {
                // Another copy task may have made it meanwhile.
                match sftp.symlink_metadata(s.clone()).await {
                    Ok(meta) if file_kind(&meta) == S_IFDIR => {}
                    _ => return Err(sftp_io(&s, e)),
                }
            }
        }
        Ok(true)
    }

    async fn resolve_remote(&self, path: PathBuf) -> io::Result<PathBuf> {
        // The first remote call of a transfer: a helper shell starts meanwhile, for the
        // hashing to come.
        self.host.prewarm();
        let sftp = self.host.sftp().await.map_err(ssh_io)?;
        let mut missing = Vec::new();
        let mut at = path.as_path();
        loop {
            let s = remote_str(at)?;
            // realpath of a missing path fails on OpenSSH; an existing one resolves links.
            let exists = match sftp.symlink_metadata(s.clone()).await {
                Ok(_) => true,
                Err(e) => {
                    let e = sftp_io(&s, e);
                    if e.kind() != ErrorKind::NotFound {
                        return Err(e);
                    }
                    false
                }
            };
            if exists {
                let real = sftp
                    .canonicalize(s.clone())
                    .await
                    .map_err(|e| sftp_io(&s, e))?;
                return Ok(missing
                    .iter()
                    .rev()
                    .fold(PathBuf::from(real), |acc, c| acc.join(c)));
            }
            let (Some(name), Some(parent)) = (at.file_name(), at.parent()) else {
                return Err(io::Error::new(
                    ErrorKind::NotFound,
                    format!("{} does not exist", path.display()),
                ));
            };
            missing.push(name.to_owned());
            at = parent;
        }
    }
}

impl TransferBackend for SftpBackend {
    fn list(&self, side: Side, root: PathBuf) -> BoxFuture<'_, io::Result<Tree>> {
        match side {
            Side::Local => LocalBackend.list(side, root),
            Side::Remote => Box::pin(self.walk_remote(root)),
        }
    }

    fn hash(&self, side: Side, path: PathBuf) -> BoxFuture<'_, io::Result<Option<FileDigest>>> {
        match side {
            Side::Local => LocalBackend.hash(side, path),
            Side::Remote => {
                Box::pin(async move { Ok(self.hash_remote(vec![path]).await?.pop().flatten()) })
            }
        }
    }

    fn hash_many(
        &self,
        side: Side,
        paths: Vec<PathBuf>,
    ) -> BoxFuture<'_, io::Result<Vec<Option<FileDigest>>>> {
        match side {
            Side::Local => LocalBackend.hash_many(side, paths),
            Side::Remote => Box::pin(self.hash_remote(paths)),
        }
    }

    fn copy_to_temp(
        &self,
        direction: Direction,
        src: PathBuf,
        temp: PathBuf,
    ) -> BoxFuture<'_, io::Result<u64>> {
        match direction {
            Direction::Upload => Box::pin(self.upload(src, temp)),
            Direction::Download => Box::pin(self.download(src, temp)),
        }
    }

    fn rename(&self, side: Side, from: PathBuf, to: PathBuf) -> BoxFuture<'_, io::Result<()>> {
        match side {
            Side::Local => LocalBackend.rename(side, from, to),
            Side::Remote => Box::pin(self.rename_remote(from, to)),
        }
    }

    fn settle(&self, side: Side, root: PathBuf) -> BoxFuture<'_, io::Result<()>> {
        match side {
            Side::Local => Box::pin(self.settle_local(root)),
            // OpenSSH's sftp-server has written every file through `close`.
            Side::Remote => Box::pin(async { Ok(()) }),
        }
    }

    fn remove(&self, side: Side, path: PathBuf) -> BoxFuture<'_, io::Result<()>> {
        match side {
            Side::Local => LocalBackend.remove(side, path),
            Side::Remote => Box::pin(self.remove_remote(path)),
        }
    }

    fn make_dir(&self, side: Side, path: PathBuf) -> BoxFuture<'_, io::Result<bool>> {
        match side {
            Side::Local => LocalBackend.make_dir(side, path),
            Side::Remote => Box::pin(self.make_dir_remote(path)),
        }
    }

    fn resolve(&self, side: Side, path: PathBuf) -> BoxFuture<'_, io::Result<PathBuf>> {
        match side {
            Side::Local => LocalBackend.resolve(side, path),
            Side::Remote => Box::pin(self.resolve_remote(path)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_output_is_parsed_by_index_with_escaped_names() {
        let a = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let b = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let out = format!("files: 1 3\n3\n0\n{a} *x\n\\{b} *odd\\nname\n");
        let got = parse_hashes(&out, 3).unwrap();
        assert_eq!(got[0].unwrap().size, 3);
        assert_eq!(got[0].unwrap().hex(), a);
        assert_eq!(got[1], None);
        assert_eq!(got[2].unwrap().hex(), b);
        assert_eq!(parse_hashes("files:\n", 2).unwrap(), vec![None, None]);
        assert!(parse_hashes("files: 1\n3\n", 1).is_err());
        assert!(parse_hashes("files: 4\n3\nab\n", 1).is_err());
        assert!(parse_hashes("", 1).is_err());
    }
}
