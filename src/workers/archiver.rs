//! The archiver: on `archive_data` (published on a schedule, or asked for through the RPC),
//! moves finished cases older than the retention age to the archive tables in one
//! transaction, then writes a consistent backup of `mqic.redb` (a logical copy inside one
//! read transaction, which never blocks writers), keeps the newest N and checks that every
//! kept backup opens. The original's archiver had no trigger and no rotation; this one has
//! both, and runs inside the process that owns the store.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{consume, Handled, Shutdown, WorkerStatus};
use crate::bus::Bus;
use crate::conductor::driver::Conductor;
use crate::config::ArchiverConfig;
use crate::protocol::topology::ARCHIVER_QUEUE;
use crate::protocol::{ArchiveRequest, Command};
use crate::store::records::now_ms;
use crate::store::Store;

/// What one archive run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveReport {
    pub archived: u64,
    pub backup: PathBuf,
    pub rows_copied: u64,
    /// Older backups deleted by rotation.
    pub removed: Vec<PathBuf>,
    /// Kept backups that did not open (they are reported, never deleted silently).
    pub unreadable: Vec<PathBuf>,
}

pub struct Archiver {
    store: Store,
    config: ArchiverConfig,
    backup_dir: PathBuf,
}

impl Archiver {
    pub fn new(store: Store, config: ArchiverConfig, backup_dir: PathBuf) -> Archiver {
        Archiver {
            store,
            config,
            backup_dir,
        }
    }

    /// Archives and backs up once. Blocking.
    pub fn run_once(&self, request: &ArchiveRequest) -> Result<ArchiveReport, String> {
        let days = request.retention_days.unwrap_or(self.config.retention_days);
        let before = now_ms().saturating_sub(days.saturating_mul(86_400_000));
        let archived = self
            .store
            .write(|tx| tx.archive_before(before))
            .map_err(|e| e.to_string())?;
        std::fs::create_dir_all(&self.backup_dir)
            .map_err(|e| format!("cannot create {}: {e}", self.backup_dir.display()))?;
        // Written under a temporary name and renamed once verified, so a failed backup can
        // never count as one (and push a good one out of the rotation).
        let backup = self.next_backup_path();
        let partial = backup.with_extension("redb.partial");
        let _ = std::fs::remove_file(&partial);
        let rows_copied = match self.store.backup_to(&partial) {
            Ok(rows) => rows,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e.to_string());
            }
        };
        std::fs::rename(&partial, &backup)
            .map_err(|e| format!("cannot rename {}: {e}", partial.display()))?;
        let mut backups = list_backups(&self.backup_dir);
        let mut removed = Vec::new();
        while backups.len() > self.config.keep_backups.max(1) {
            let old = backups.remove(0);
            match std::fs::remove_file(&old) {
                Ok(()) => removed.push(old),
                Err(e) => tracing::warn!("cannot remove old backup {}: {e}", old.display()),
            }
        }
        let unreadable = backups
            .iter()
            .filter(|b| redb::ReadOnlyDatabase::open(b).is_err())
            .cloned()
            .collect();
        Ok(ArchiveReport {
            archived,
            backup,
            rows_copied,
            removed,
            unreadable,
        })
    }

    /// `mqic-<UTC time>.redb`, names that sort by time; a suffix if two land in one second.
    fn next_backup_path(&self) -> PathBuf {
        let stamp = crate::store::records::ms_to_rfc3339(now_ms())
            .replace([':', '-'], "")
            .replace('.', "_");
        let mut path = self.backup_dir.join(format!("mqic-{stamp}.redb"));
        let mut n = 1;
        while path.exists() {
            path = self.backup_dir.join(format!("mqic-{stamp}-{n}.redb"));
            n += 1;
        }
        path
    }
}

/// The backups in `dir`, oldest first.
pub fn list_backups(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("mqic-") && n.ends_with(".redb"))
        })
        .collect();
    out.sort();
    out
}

/// Consumes `archiver_queue` until shutdown.
pub async fn run(
    bus: Arc<dyn Bus>,
    archiver: Arc<Archiver>,
    status: Arc<WorkerStatus>,
    shutdown: Shutdown,
) {
    let s = status.clone();
    consume(
        bus,
        ARCHIVER_QUEUE,
        1,
        status,
        shutdown,
        move |envelope, delivery| {
            let archiver = archiver.clone();
            let status = s.clone();
            async move {
                let Command::ArchiveData(request) = envelope.command else {
                    let reason =
                        format!("`{}` is not an archiver command", envelope.command.name());
                    return (Handled::Reject(reason), Some(delivery));
                };
                status.set("archiving");
                let result = tokio::task::spawn_blocking(move || archiver.run_once(&request)).await;
                match result {
                    Ok(Ok(report)) => {
                        tracing::info!(
                            archived = report.archived,
                            backup = %report.backup.display(),
                            rows = report.rows_copied,
                            removed = report.removed.len(),
                            "archive run done"
                        );
                        for bad in &report.unreadable {
                            tracing::error!("backup {} does not open", bad.display());
                        }
                        status.set(format!("last run archived {} cases", report.archived));
                        (Handled::Ack, Some(delivery))
                    }
                    Ok(Err(e)) => {
                        tracing::error!("archive run failed: {e}");
                        status.set(format!("last run failed: {e}"));
                        (Handled::Ack, Some(delivery))
                    }
                    Err(e) => {
                        tracing::error!("archive task failed: {e}");
                        (Handled::Retry, Some(delivery))
                    }
                }
            }
        },
    )
    .await
}

/// Publishes `archive_data` every `every` (through the outbox) until shutdown.
pub async fn schedule(conductor: Arc<Conductor>, every: Duration, mut shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = super::stopped(&mut shutdown) => return,
        }
        let c = conductor.clone();
        let queued = tokio::task::spawn_blocking(move || {
            c.enqueue(
                ARCHIVER_QUEUE,
                Command::ArchiveData(ArchiveRequest::default()),
            )
        })
        .await;
        if !matches!(queued, Ok(Ok(()))) {
            tracing::error!("cannot schedule archive_data: {queued:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::{CaseRecord, CaseStatus};

    fn case(id: &str, status: CaseStatus, updated_ms: u64) -> CaseRecord {
        crate::store::tests::sample_case(id, status, updated_ms)
    }

    #[test]
    fn archives_old_finished_cases_and_rotates_verified_backups() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("mqic.redb")).unwrap();
        let old = now_ms() - 10 * 86_400_000;
        store
            .write(|tx| {
                tx.put_case(&case("old", CaseStatus::Completed, old))?;
                tx.put_case(&case("old-failed", CaseStatus::Failed, old))?;
                tx.put_case(&case("running", CaseStatus::Processing, old))?;
                tx.put_case(&case("recent", CaseStatus::Completed, now_ms()))?;
                Ok(())
            })
            .unwrap();
        let config = ArchiverConfig {
            retention_days: 7,
            keep_backups: 2,
            ..ArchiverConfig::default()
        };
        let backups = dir.path().join("backups");
        let archiver = Archiver::new(store.clone(), config, backups.clone());
        let first = archiver.run_once(&ArchiveRequest::default()).unwrap();
        assert_eq!(first.archived, 2);
        assert!(first.unreadable.is_empty());
        assert_eq!(store.cases().unwrap().len(), 2);
        let copy = Store::open(&first.backup).unwrap();
        assert_eq!(copy.archived_count().unwrap(), 2);
        drop(copy);
        for _ in 0..3 {
            archiver.run_once(&ArchiveRequest::default()).unwrap();
        }
        let kept = list_backups(&backups);
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(!kept.contains(&first.backup), "the oldest went first");
        let zero = archiver
            .run_once(&ArchiveRequest {
                retention_days: Some(0),
            })
            .unwrap();
        assert_eq!(
            zero.archived, 1,
            "the recent completed case, not the running one"
        );
    }
}
