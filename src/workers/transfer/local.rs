//! [`LocalBackend`]: both ends of the transfer are paths on this machine (host kind `local`).
//!
//! Every filesystem call runs on the blocking pool. Symlinks are never followed inside a
//! tree: the walk reports them instead of entering them, files are opened with `O_NOFOLLOW`,
//! and temporary files are created with `O_EXCL` so a planted link cannot redirect a write.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{Direction, FileDigest, NotCopied, Side, TransferBackend, Tree, TreeFile, PART_SUFFIX};
use crate::bus::BoxFuture;

/// A walk stops with an error past this many entries: a case is thousands of files, and an
/// endless tree (a bind mount loop) must not hang the worker.
const MAX_TREE_ENTRIES: usize = 1_000_000;

/// Read size for hashing: large enough that a 1 GB dose file is not syscall-bound.
const HASH_BUFFER: usize = 256 * 1024;

/// Copies between two local paths; the side of a path makes no difference here.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalBackend;

/// Runs blocking filesystem work off the async threads.
async fn blocking<T, F>(f: F) -> io::Result<T>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking task failed: {e}")))?
}

impl TransferBackend for LocalBackend {
    fn list(&self, _side: Side, root: PathBuf) -> BoxFuture<'_, io::Result<Tree>> {
        Box::pin(blocking(move || walk(&root)))
    }

    fn hash(&self, _side: Side, path: PathBuf) -> BoxFuture<'_, io::Result<Option<FileDigest>>> {
        Box::pin(blocking(move || sha256_file(&path)))
    }

    fn hash_many(
        &self,
        _side: Side,
        paths: Vec<PathBuf>,
    ) -> BoxFuture<'_, io::Result<Vec<Option<FileDigest>>>> {
        Box::pin(sha256_files(paths))
    }

    fn copy_to_temp(
        &self,
        _direction: Direction,
        src: PathBuf,
        temp: PathBuf,
    ) -> BoxFuture<'_, io::Result<u64>> {
        Box::pin(blocking(move || copy_file(&src, &temp)))
    }

    fn rename(&self, _side: Side, from: PathBuf, to: PathBuf) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(blocking(move || fs::rename(&from, &to)))
    }

    fn remove(&self, _side: Side, path: PathBuf) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(blocking(move || match fs::remove_file(&path) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            other => other,
        }))
    }

    fn make_dir(&self, _side: Side, path: PathBuf) -> BoxFuture<'_, io::Result<bool>> {
        Box::pin(blocking(move || make_dir(&path)))
    }

    fn resolve(&self, _side: Side, path: PathBuf) -> BoxFuture<'_, io::Result<PathBuf>> {
        Box::pin(blocking(move || resolve(&path)))
    }
}

/// Lists the regular files (with sizes) and directories under `root`, parents before
/// children. The root itself may be reached through a symlink (the caller has checked where
/// it resolves to); nothing below it is.
fn walk(root: &Path) -> io::Result<Tree> {
    if !fs::metadata(root)?.is_dir() {
        return Err(io::Error::new(
            ErrorKind::NotADirectory,
            format!("{} is not a directory", root.display()),
        ));
    }
    let mut tree = Tree::default();
    let mut pending = vec![PathBuf::new()];
    let mut seen = 0usize;
    while let Some(rel) = pending.pop() {
        for entry in fs::read_dir(root.join(&rel))? {
            seen += 1;
            if seen > MAX_TREE_ENTRIES {
                return Err(io::Error::other(format!(
                    "{} holds more than {MAX_TREE_ENTRIES} entries",
                    root.display()
                )));
            }
            let entry = entry?;
            let rel_path = rel.join(entry.file_name());
            // DirEntry::file_type and ::metadata do not follow symlinks.
            let kind = entry.file_type()?;
            if kind.is_symlink() {
                tree.not_copied.push((rel_path, NotCopied::Symlink));
            } else if kind.is_dir() {
                tree.dirs.push(rel_path.clone());
                pending.push(rel_path);
            } else if kind.is_file() {
                if entry.file_name().to_string_lossy().ends_with(PART_SUFFIX) {
                    tree.not_copied.push((rel_path, NotCopied::PartFile));
                } else {
                    let size = entry.metadata()?.len();
                    tree.files.push(TreeFile {
                        rel: rel_path,
                        size,
                    });
                }
            } else {
                tree.not_copied.push((rel_path, NotCopied::Special));
            }
        }
    }
    Ok(tree)
}

/// [`sha256_file`] of many files, in order, on a few blocking threads at once.
pub async fn sha256_files(paths: Vec<PathBuf>) -> io::Result<Vec<Option<FileDigest>>> {
    const THREADS: usize = 4;
    let per = paths.len().div_ceil(THREADS).max(1);
    let tasks: Vec<_> = paths
        .chunks(per)
        .map(|chunk| {
            let chunk = chunk.to_vec();
            tokio::task::spawn_blocking(move || {
                chunk
                    .iter()
                    .map(|p| sha256_file(p))
                    .collect::<io::Result<Vec<_>>>()
            })
        })
        .collect();
    let mut out = Vec::with_capacity(paths.len());
    for task in tasks {
        out.extend(
            task.await
                .map_err(|e| io::Error::other(format!("blocking task failed: {e}")))??,
        );
    }
    Ok(out)
}

/// Size and SHA-256 of a regular file, or `None` when there is none at `path` (absent, a
/// symlink, a directory): for the resume check all of those mean "copy it".
pub fn sha256_file(path: &Path) -> io::Result<Option<FileDigest>> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_BUFFER];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Some(FileDigest {
        size,
        sha256: hasher.finalize().into(),
    }))
}

/// Writes `src` to a fresh `temp` and flushes it to disk, so that the rename that follows
/// publishes a complete file even across a crash.
fn copy_file(src: &Path, temp: &Path) -> io::Result<u64> {
    let mut input = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(src)?;
    // A stale temp from an interrupted run is replaced; `create_new` refuses to write
    // through anything (a symlink) that appears at the name in between.
    match fs::remove_file(temp) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut output: File = OpenOptions::new().write(true).create_new(true).open(temp)?;
    let written = io::copy(&mut input, &mut output)?;
    output.sync_all()?;
    Ok(written)
}

/// Makes sure `path` is a real directory, creating it (and missing parents) when absent.
/// A symlink or file in its place is an error: writing through it could leave the root.
fn make_dir(path: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(false),
        Ok(_) => Err(io::Error::new(
            ErrorKind::NotADirectory,
            format!("{} exists and is not a directory", path.display()),
        )),
        Err(e) if e.kind() == ErrorKind::NotFound => fs::create_dir_all(path).map(|()| true),
        Err(e) => Err(e),
    }
}

/// `path` with the symlinks of its existing part resolved: the real path of its deepest
/// existing ancestor, followed by the components that do not exist yet.
fn resolve(path: &Path) -> io::Result<PathBuf> {
    let mut missing = Vec::new();
    let mut existing = path;
    loop {
        match fs::canonicalize(existing) {
            Ok(real) => return Ok(missing.iter().rev().fold(real, |acc, c| acc.join(c))),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let (Some(name), Some(parent)) = (existing.file_name(), existing.parent()) else {
                    return Err(e);
                };
                missing.push(name.to_owned());
                existing = parent;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn walk_lists_files_and_dirs_and_reports_links_without_entering_them() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"s").unwrap();
        let root = dir.path().join("case");
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::create_dir_all(root.join("empty")).unwrap();
        fs::write(root.join("top.txt"), b"12345").unwrap();
        fs::write(root.join("a/b/deep.bin"), vec![7u8; 1000]).unwrap();
        fs::write(root.join("a/left.mqic-part"), b"half").unwrap();
        symlink(outside.path(), root.join("a/outdir")).unwrap();
        symlink(outside.path().join("secret"), root.join("leak")).unwrap();

        let tree = walk(&root).unwrap();
        let mut files: Vec<_> = tree.files.iter().map(|f| (f.rel.clone(), f.size)).collect();
        files.sort();
        assert_eq!(
            files,
            vec![
                (PathBuf::from("a/b/deep.bin"), 1000),
                (PathBuf::from("top.txt"), 5)
            ]
        );
        let mut dirs = tree.dirs.clone();
        dirs.sort();
        assert_eq!(
            dirs,
            vec![
                PathBuf::from("a"),
                PathBuf::from("a/b"),
                PathBuf::from("empty")
            ]
        );
        let pos = |p: &str| tree.dirs.iter().position(|d| d == Path::new(p)).unwrap();
        assert!(pos("a") < pos("a/b"), "parents come before children");
        let mut skipped = tree.not_copied.clone();
        skipped.sort();
        assert_eq!(
            skipped,
            vec![
                (PathBuf::from("a/left.mqic-part"), NotCopied::PartFile),
                (PathBuf::from("a/outdir"), NotCopied::Symlink),
                (PathBuf::from("leak"), NotCopied::Symlink),
            ]
        );
    }

    #[test]
    fn walk_of_a_missing_or_file_root_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let err = walk(&dir.path().join("nope")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        fs::write(dir.path().join("f"), b"x").unwrap();
        let err = walk(&dir.path().join("f")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotADirectory);
    }

    #[test]
    fn hash_matches_a_known_digest_and_ignores_links() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("abc");
        fs::write(&file, b"abc").unwrap();
        let digest = sha256_file(&file).unwrap().unwrap();
        assert_eq!(digest.size, 3);
        assert_eq!(
            digest.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        symlink(&file, dir.path().join("link")).unwrap();
        assert_eq!(sha256_file(&dir.path().join("link")).unwrap(), None);
        assert_eq!(sha256_file(&dir.path().join("absent")).unwrap(), None);
    }

    #[test]
    fn copy_replaces_a_stale_temp_and_never_writes_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::write(&src, b"payload").unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let temp = dir.path().join("dst.mqic-part");
        symlink(&victim, &temp).unwrap();
        assert_eq!(copy_file(&src, &temp).unwrap(), 7);
        assert_eq!(fs::read(&temp).unwrap(), b"payload");
        assert!(!fs::symlink_metadata(&temp)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&victim).unwrap(), b"keep");

        let link_src = dir.path().join("link_src");
        symlink(&victim, &link_src).unwrap();
        assert!(copy_file(&link_src, &dir.path().join("other.mqic-part")).is_err());
    }

    #[test]
    fn make_dir_refuses_a_symlink_in_place_of_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        assert!(make_dir(&dir.path().join("x/y")).unwrap(), "created");
        assert!(!make_dir(&dir.path().join("x/y")).unwrap(), "already there");
        assert!(dir.path().join("x/y").is_dir());
        symlink(outside.path(), dir.path().join("planted")).unwrap();
        assert!(make_dir(&dir.path().join("planted")).is_err());
    }

    #[test]
    fn resolve_follows_links_in_the_existing_part_only() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(dir.path()).unwrap();
        assert_eq!(resolve(&dir.path().join("a/b")).unwrap(), base.join("a/b"));
        symlink(outside.path(), dir.path().join("link")).unwrap();
        assert_eq!(
            resolve(&dir.path().join("link/new/x")).unwrap(),
            fs::canonicalize(outside.path()).unwrap().join("new/x")
        );
    }
}
