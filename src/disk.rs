//! The disk free limit: a sampler checks the free space of the file system holding the data
//! dir and raises the broker's disk alarm below the configured limit, which blocks publishing
//! connections (`connection.blocked`, reason "low on disk") before writes can fail.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::amqp::Broker;

/// How often free space is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// Bytes available to an unprivileged writer on the file system holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The limit in force; it can be changed while running (tests, and later the admin API).
#[derive(Debug)]
pub struct DiskFreeLimit {
    limit: AtomicU64,
    dir: PathBuf,
}

impl DiskFreeLimit {
    pub fn new(limit_bytes: u64, dir: PathBuf) -> Arc<DiskFreeLimit> {
        Arc::new(DiskFreeLimit {
            limit: AtomicU64::new(limit_bytes),
            dir,
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn set_limit(&self, bytes: u64) {
        self.limit.store(bytes, Ordering::Relaxed);
    }

    /// Samples free space until `shutdown`, raising and clearing the broker's disk alarm.
    pub async fn watch(self: Arc<Self>, broker: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut alarmed = false;
        let mut warned = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let free = match free_bytes(&self.dir) {
                Ok(free) => free,
                Err(e) => {
                    if !warned {
                        warned = true;
                        tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read free disk space; keeping the last disk alarm state");
                    }
                    continue;
                }
            };
            warned = false;
            let low = free < self.limit();
            if low != alarmed {
                alarmed = low;
                if low {
                    tracing::warn!(free, limit = self.limit(), dir = %self.dir.display(), "disk free space below the limit: blocking publishers");
                } else {
                    tracing::info!(free, limit = self.limit(), dir = %self.dir.display(), "disk free space above the limit again: unblocking publishers");
                }
                broker.set_disk_alarm(low);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_free_space_and_reports_a_missing_dir() {
        let dir = std::env::temp_dir();
        assert!(super::free_bytes(&dir).unwrap() > 0);
        let err = super::free_bytes(std::path::Path::new("/no/such/dir/here")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
