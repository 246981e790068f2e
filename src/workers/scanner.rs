//! The case scanner: finds the case directories in the watched folder that are ready and
//! announces each once through a [`CaseSink`].
//!
//! One predicate, [`ReadyRule`], decides readiness for the startup rescan, for notify events
//! and for polling alike (the original's startup scan skipped the marker check, lineage C6).
//! A case is the directory exactly `case_depth` levels below the root; its id is its relative
//! path joined with `__`, so the same study name under two patients gives two cases (B10).
//!
//! Notify events are only hints: inotify misses the `Create` of files made right after their
//! new parent directory and reports a directory moved in as one `Name(To)`, so every event is
//! mapped to the case directory (or the shallower subtree) it touches and that directory is
//! looked at afresh. Quiet-period readiness is the absence of events, so the case directories
//! that are not ready yet are re-checked on a timer.

mod rule;

pub use rule::{is_ready, scan_once, ReadyRule};

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{new_debouncer, DebounceEventResult, Debouncer, RecommendedCache};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::{interval_at, Instant, MissedTickBehavior};

use super::{stopped, Shutdown, WorkerStatus};
use crate::config::pipeline::{ScanMode, ScannerConfig};
use crate::protocol::NewCase;
use rule::{absolute, Located, Readiness};

/// Where ready cases go. The real sink records the case in the store and the outbox in one
/// transaction, so "announced once, also across restarts" is the sink's guarantee; the
/// scanner's own memory only saves it from asking twice.
pub trait CaseSink: Send + Sync + 'static {
    /// Records a ready case: `Ok(true)` when it was new, `Ok(false)` when it was already
    /// known. Blocking; the scanner calls it on a blocking thread. An `Err` is retried on the
    /// scanner's next pass.
    fn found(&self, case: NewCase) -> Result<bool, String>;
}

/// Why the notify watcher could not be started (the scanner then polls).
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("{0}")]
    Notify(#[from] notify::Error),
    #[error("the watcher setup task failed: {0}")]
    Setup(String),
}

/// Intervals below this would make the debouncer thread and the timer spin.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// In notify mode, every this many ticks the whole tree is rescanned anyway, in case the
/// kernel dropped an event without saying so.
const FULL_RESCAN_TICKS: u64 = 60;

/// Debounced batches waiting for the scanner; the debouncer thread blocks when it is full.
const EVENT_CHANNEL_CAPACITY: usize = 256;

/// The most batches taken from the channel for one pass.
const MAX_BATCHES_PER_PASS: usize = 1024;

/// What one pass of the scanner looks at.
#[derive(Debug)]
enum Work {
    /// The whole tree (startup, polling, a watcher that lost events).
    Full,
    /// The case directories seen earlier that were not ready yet.
    Pending,
    /// What a batch of events touched.
    Touched {
        cases: HashSet<PathBuf>,
        subtrees: HashSet<PathBuf>,
    },
}

/// What the scanner remembers between passes.
#[derive(Debug, Default)]
struct Memory {
    /// Ids the sink has accepted (new or known), so they are not offered again.
    announced: HashSet<String>,
    /// Case directories that exist but were not ready (or the sink failed): re-checked on
    /// every tick.
    pending: HashSet<PathBuf>,
    /// Ids whose last offer failed, so a broken store is logged once per case.
    failing: HashSet<String>,
}

/// The running scanner's state; its passes run one at a time on a blocking thread.
struct Scanner {
    rule: ReadyRule,
    root: PathBuf,
    sink: Arc<dyn CaseSink>,
    status: Arc<WorkerStatus>,
    /// The status shown while nothing fails: `watching <root> (notify)` or `polling <root>`.
    healthy: Mutex<String>,
    memory: Mutex<Memory>,
}

impl Scanner {
    fn pass(&self, work: Work) {
        let now = SystemTime::now();
        match work {
            Work::Full => self.full_pass(now),
            Work::Pending => {
                let dirs: Vec<PathBuf> = self.memory.lock().pending.iter().cloned().collect();
                self.check(dirs, now);
            }
            Work::Touched { cases, subtrees } => {
                let mut dirs: Vec<PathBuf> = cases.into_iter().collect();
                for sub in &subtrees {
                    dirs.extend(self.rule.case_dirs_under(&self.root, sub));
                }
                self.check(dirs, now);
            }
        }
        if self.memory.lock().failing.is_empty() {
            self.status.set(self.healthy.lock().clone());
        }
    }

    /// Looks at every case directory in the tree and rebuilds what is pending; forgets ids
    /// whose directory is gone, so memory follows the folder.
    fn full_pass(&self, now: SystemTime) {
        let mut seen = HashSet::new();
        let mut waiting = HashSet::new();
        for dir in self.rule.case_dirs_under(&self.root, &self.root) {
            let Some(case) = self.rule.describe(&self.root, &dir) else {
                continue;
            };
            seen.insert(case.case_id.0.clone());
            if self.memory.lock().announced.contains(&case.case_id.0) {
                continue;
            }
            let taken = match self.rule.readiness(&dir, now) {
                Readiness::Ready => self.offer(case),
                Readiness::Waiting => false,
                Readiness::Gone => true,
            };
            if !taken {
                waiting.insert(dir);
            }
        }
        let mut memory = self.memory.lock();
        memory.announced.retain(|id| seen.contains(id));
        memory.failing.retain(|id| seen.contains(id));
        memory.pending = waiting;
    }

    fn check(&self, dirs: Vec<PathBuf>, now: SystemTime) {
        let unique: HashSet<PathBuf> = dirs.into_iter().collect();
        for dir in unique {
            let Some(case) = self.rule.describe(&self.root, &dir) else {
                self.memory.lock().pending.remove(&dir);
                continue;
            };
            let id = case.case_id.0.clone();
            if !fs::metadata(&dir).is_ok_and(|m| m.is_dir()) {
                let mut memory = self.memory.lock();
                memory.pending.remove(&dir);
                memory.announced.remove(&id);
                memory.failing.remove(&id);
                continue;
            }
            if self.memory.lock().announced.contains(&id) {
                self.memory.lock().pending.remove(&dir);
                continue;
            }
            let ready = match self.rule.readiness(&dir, now) {
                Readiness::Ready => self.offer(case),
                Readiness::Waiting => false,
                Readiness::Gone => {
                    self.memory.lock().pending.remove(&dir);
                    continue;
                }
            };
            let mut memory = self.memory.lock();
            if ready {
                memory.pending.remove(&dir);
            } else {
                memory.pending.insert(dir);
            }
        }
    }

    /// Hands a ready case to the sink; true when the sink took it (new or known).
    fn offer(&self, case: NewCase) -> bool {
        let id = case.case_id.0.clone();
        let path = case.case_path.clone();
        match self.sink.found(case) {
            Ok(new) => {
                if new {
                    tracing::info!(case_id = %id, path = %path, "new case found");
                } else {
                    tracing::debug!(case_id = %id, "ready case already known");
                }
                let mut memory = self.memory.lock();
                memory.failing.remove(&id);
                memory.announced.insert(id);
                true
            }
            Err(e) => {
                if self.memory.lock().failing.insert(id.clone()) {
                    tracing::warn!(case_id = %id, error = %e, "cannot record a ready case; retrying");
                } else {
                    tracing::debug!(case_id = %id, error = %e, "cannot record a ready case yet");
                }
                self.status.set(format!("cannot record case {id}: {e}"));
                false
            }
        }
    }
}

/// The notify debouncer; dropping it stops watching, so `run` holds it to the end.
type Watch = Debouncer<RecommendedWatcher, RecommendedCache>;

/// Starts a recursive watch on `root` whose debounced batches arrive on the receiver.
/// Adding the recursive watch walks the tree, so it runs on a blocking thread.
async fn watch(
    root: PathBuf,
    debounce: Duration,
) -> Result<(Watch, mpsc::Receiver<DebounceEventResult>), WatchError> {
    let (tx, rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
    let debouncer = tokio::task::spawn_blocking(move || -> Result<Watch, WatchError> {
        // The debouncer calls this on its own thread, never inside the runtime, so a
        // blocking send is the backpressure it should feel.
        let handler = move |result: DebounceEventResult| {
            let _ = tx.blocking_send(result);
        };
        let mut debouncer = new_debouncer(debounce, None, handler)?;
        debouncer.watch(&root, RecursiveMode::Recursive)?;
        Ok(debouncer)
    })
    .await
    .map_err(|e| WatchError::Setup(e.to_string()))??;
    Ok((debouncer, rx))
}

/// The next debounced batches (all that are waiting); never resolves without a watcher,
/// `None` when the watcher has stopped.
async fn next_batches(
    events: &mut Option<mpsc::Receiver<DebounceEventResult>>,
) -> Option<Vec<DebounceEventResult>> {
    let Some(rx) = events else {
        return std::future::pending().await;
    };
    let first = rx.recv().await?;
    let mut batches = vec![first];
    while batches.len() < MAX_BATCHES_PER_PASS {
        match rx.try_recv() {
            Ok(more) => batches.push(more),
            Err(_) => break,
        }
    }
    Some(batches)
}

/// Maps event batches to the work they call for. Access events are the scanner's own reads.
fn touched(rule: &ReadyRule, root: &Path, batches: Vec<DebounceEventResult>) -> Work {
    let mut cases = HashSet::new();
    let mut subtrees = HashSet::new();
    for batch in batches {
        match batch {
            Ok(events) => {
                for event in events {
                    if matches!(event.kind, EventKind::Access(_)) {
                        continue;
                    }
                    if event.need_rescan() {
                        return Work::Full;
                    }
                    for path in &event.paths {
                        match rule.locate(root, path) {
                            Located::Case(dir) => {
                                cases.insert(dir);
                            }
                            Located::Above(dir) => {
                                subtrees.insert(dir);
                            }
                            Located::Nowhere => {}
                        }
                    }
                }
            }
            Err(errors) => {
                for e in errors {
                    tracing::warn!(error = %e, "watcher error; rescanning the tree");
                }
                return Work::Full;
            }
        }
    }
    Work::Touched { cases, subtrees }
}

/// Runs one pass on a blocking thread; false when shutdown came first (the pass finishes
/// in the background; the sink is atomic, so an offer cut short is simply made again).
async fn run_pass(scanner: &Arc<Scanner>, work: Work, shutdown: &mut Shutdown) -> bool {
    let scanner = scanner.clone();
    let task = tokio::task::spawn_blocking(move || scanner.pass(work));
    tokio::select! {
        joined = task => {
            if let Err(e) = joined {
                tracing::error!(error = %e, "a scanner pass failed");
            }
            true
        }
        _ = stopped(shutdown) => false,
    }
}

/// Watches `root` for ready cases until shutdown and offers each to `sink` once: creates
/// the root if missing, rescans the whole tree at start (what arrived while mqic was down),
/// then follows notify events (or polls, by config or when the watcher cannot start).
pub async fn run(
    config: ScannerConfig,
    root: PathBuf,
    sink: Arc<dyn CaseSink>,
    status: Arc<WorkerStatus>,
    mut shutdown: Shutdown,
) {
    if !config.enabled {
        status.set("disabled");
        stopped(&mut shutdown).await;
        return;
    }
    let root = absolute(&root);
    let poll = Duration::from_millis(config.poll_interval_ms).max(MIN_INTERVAL);
    let mut logged = false;
    while let Err(e) = tokio::fs::create_dir_all(&root).await {
        let text = format!("cannot create {}: {e}", root.display());
        if !logged {
            tracing::error!("{text}");
            logged = true;
        }
        status.set(text);
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = stopped(&mut shutdown) => return,
        }
    }

    // The watch starts before the startup rescan, so nothing falls between the two.
    let (mut watcher, mut events) = match config.mode {
        ScanMode::Notify => {
            let debounce = Duration::from_millis(config.debounce_ms).max(MIN_INTERVAL);
            match watch(root.clone(), debounce).await {
                Ok((w, rx)) => (Some(w), Some(rx)),
                Err(e) => {
                    tracing::warn!(root = %root.display(), error = %e, "cannot watch the case folder; polling it instead");
                    (None, None)
                }
            }
        }
        ScanMode::Poll => (None, None),
    };
    let healthy = if events.is_some() {
        format!("watching {} (notify)", root.display())
    } else {
        format!("polling {}", root.display())
    };
    status.set(healthy.clone());
    let rule = ReadyRule::new(&config);
    let scanner = Arc::new(Scanner {
        rule: rule.clone(),
        root: root.clone(),
        sink,
        status: status.clone(),
        healthy: Mutex::new(healthy),
        memory: Mutex::new(Memory::default()),
    });

    if !run_pass(&scanner, Work::Full, &mut shutdown).await {
        return;
    }
    let mut tick = interval_at(Instant::now() + poll, poll);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        let work = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            batches = next_batches(&mut events) => match batches {
                Some(batches) => touched(&rule, &root, batches),
                None => {
                    tracing::warn!(root = %root.display(), "the watcher stopped; polling the case folder instead");
                    events = None;
                    watcher = None;
                    *scanner.healthy.lock() = format!("polling {}", root.display());
                    Work::Full
                }
            },
            _ = tick.tick() => {
                ticks += 1;
                if events.is_none() || ticks.is_multiple_of(FULL_RESCAN_TICKS) {
                    Work::Full
                } else if scanner.memory.lock().pending.is_empty() {
                    continue;
                } else {
                    Work::Pending
                }
            }
        };
        if !run_pass(&scanner, work, &mut shutdown).await {
            break;
        }
    }
    drop(watcher);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::watch as tokio_watch;
    use tokio::task::JoinHandle;

    /// The most any test waits for the scanner to do something.
    const WAIT: Duration = Duration::from_secs(10);

    /// The boundary the scanner talks to: records what it is offered.
    struct Recorder {
        found: Mutex<Vec<(NewCase, SystemTime)>>,
        calls: tokio_watch::Sender<usize>,
        /// What `found` answers for a case it accepts.
        answer: bool,
        /// How many offers to refuse before accepting.
        refuse: AtomicUsize,
    }

    impl Recorder {
        fn new(answer: bool, refuse: usize) -> Arc<Recorder> {
            Arc::new(Recorder {
                found: Mutex::new(Vec::new()),
                calls: tokio_watch::channel(0).0,
                answer,
                refuse: AtomicUsize::new(refuse),
            })
        }

        fn ids(&self) -> Vec<String> {
            self.found
                .lock()
                .iter()
                .map(|(c, _)| c.case_id.0.clone())
                .collect()
        }

        fn case(&self, id: &str) -> Option<(NewCase, SystemTime)> {
            self.found
                .lock()
                .iter()
                .find(|(c, _)| c.case_id.0 == id)
                .cloned()
        }

        async fn wait_for(&self, id: &str) -> NewCase {
            let mut rx = self.calls.subscribe();
            // The borrow `wait_for` returns holds the channel's read lock, which would block
            // the sink's next `send_modify`: keep only whether it succeeded.
            let waited = tokio::time::timeout(WAIT, rx.wait_for(|_| self.case(id).is_some()))
                .await
                .is_ok_and(|r| r.is_ok());
            assert!(
                waited,
                "case {id} was not found within {WAIT:?}; found so far: {:?}",
                self.ids()
            );
            self.case(id).unwrap().0
        }
    }

    impl CaseSink for Recorder {
        fn found(&self, case: NewCase) -> Result<bool, String> {
            let refused = self
                .refuse
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if !refused {
                self.found.lock().push((case, SystemTime::now()));
            }
            self.calls.send_modify(|n| *n += 1);
            if refused {
                Err("the store is down".into())
            } else {
                Ok(self.answer)
            }
        }
    }

    struct Running {
        status: Arc<WorkerStatus>,
        stop: tokio_watch::Sender<bool>,
        task: JoinHandle<()>,
    }

    impl Running {
        async fn stop(self) {
            self.stop.send(true).unwrap();
            let joined = tokio::time::timeout(Duration::from_secs(5), self.task).await;
            assert!(joined.is_ok(), "run did not stop within 5 s of shutdown");
            joined.unwrap().unwrap();
        }
    }

    fn start(config: ScannerConfig, root: &Path, sink: Arc<Recorder>) -> Running {
        let status = WorkerStatus::new();
        let (stop, shutdown) = tokio_watch::channel(false);
        let task = tokio::spawn(run(
            config,
            root.to_path_buf(),
            sink,
            status.clone(),
            shutdown,
        ));
        Running { status, stop, task }
    }

    fn config(depth: usize) -> ScannerConfig {
        ScannerConfig {
            case_depth: depth,
            ..ScannerConfig::default()
        }
    }

    /// A case directory with a data file and, if asked, the marker.
    fn make_case(dir: &Path, marker: bool) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("PlanInfo.txt"), b"DICOM_BEAM_NUMBER,2\n").unwrap();
        if marker {
            fs::write(dir.join("_CASE_READY"), b"").unwrap();
        }
    }

    #[tokio::test]
    async fn a_marked_case_is_found_once_and_an_unmarked_one_never() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cases");
        let sink = Recorder::new(true, 0);
        let running = start(config(1), &root, sink.clone());

        make_case(&root.join("unmarked"), false);
        make_case(&root.join("case1"), true);
        let case = sink.wait_for("case1").await;
        assert_eq!(Path::new(&case.case_path), absolute(&root.join("case1")));
        assert_eq!(case.room, None);
        // Writes into an announced case do not announce it again.
        fs::write(root.join("case1").join("late.txt"), b"more").unwrap();
        make_case(&root.join("sentinel"), true);
        sink.wait_for("sentinel").await;

        let ids = sink.ids();
        assert_eq!(ids.iter().filter(|id| *id == "case1").count(), 1, "{ids:?}");
        assert!(!ids.contains(&"unmarked".to_string()), "{ids:?}");
        assert!(
            running.status.get().starts_with("watching "),
            "{}",
            running.status.get()
        );
        running.stop().await;
    }

    #[tokio::test]
    async fn a_marker_arriving_later_makes_the_case_ready() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cases");
        let sink = Recorder::new(true, 0);
        let running = start(config(1), &root, sink.clone());

        make_case(&root.join("late"), false);
        make_case(&root.join("sentinel"), true);
        sink.wait_for("sentinel").await;
        assert!(!sink.ids().contains(&"late".to_string()));
        fs::write(root.join("late").join("_CASE_READY"), b"").unwrap();
        sink.wait_for("late").await;
        running.stop().await;
    }

    #[tokio::test]
    async fn temporary_names_are_ignored_until_renamed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cases");
        let sink = Recorder::new(true, 0);
        let running = start(config(1), &root, sink.clone());

        make_case(&root.join("a.extracting"), true);
        make_case(&root.join("b"), true);
        fs::write(root.join("b").join("beam.zip.tmp"), b"partial").unwrap();
        make_case(&root.join("sentinel"), true);
        sink.wait_for("sentinel").await;
        let ids = sink.ids();
        assert!(
            !ids.iter().any(|id| id.starts_with('a') || id == "b"),
            "{ids:?}"
        );

        fs::rename(root.join("a.extracting"), root.join("a")).unwrap();
        fs::rename(
            root.join("b").join("beam.zip.tmp"),
            root.join("b").join("beam.zip"),
        )
        .unwrap();
        sink.wait_for("a").await;
        sink.wait_for("b").await;
        assert!(!sink.ids().contains(&"a.extracting".to_string()));
        running.stop().await;
    }

    #[tokio::test]
    async fn nested_layout_with_rooms_and_patients() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cases");
        let sink = Recorder::new(true, 0);
        let running = start(config(3), &root, sink.clone());

        make_case(&root.join("G1/P1/S1"), true);
        make_case(&root.join("G1/P2/S1"), true);
        let first = sink.wait_for("G1__P1__S1").await;
        let second = sink.wait_for("G1__P2__S1").await;
        assert_eq!(first.room.as_deref(), Some("G1"));
        assert_eq!(second.room.as_deref(), Some("G1"));
        assert_eq!(
            Path::new(&first.case_path),
            absolute(&root.join("G1/P1/S1"))
        );
        running.stop().await;
    }

    #[tokio::test]
    async fn directories_built_elsewhere_and_moved_in_are_found() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cases");
        let staging = tmp.path().join("staging");
        fs::create_dir_all(&staging).unwrap();
        let sink = Recorder::new(true, 0);
        let running = start(config(1), &root, sink.clone());
        let nested_root = tmp.path().join("nested");
        let nested_sink = Recorder::new(true, 0);
        let nested = start(config(3), &nested_root, nested_sink.clone());

        make_case(&staging.join("moved"), true);
        make_case(&root.join("sentinel"), true);
        sink.wait_for("sentinel").await;
        fs::rename(staging.join("moved"), root.join("moved")).unwrap();
        sink.wait_for("moved").await;

        // A whole patient directory moved into a room: one event for a directory above
        // the case level.
        make_case(&staging.join("P9/S1"), true);
        make_case(&nested_root.join("G2/P0/S0"), true);
        nested_sink.wait_for("G2__P0__S0").await;
        fs::rename(staging.join("P9"), nested_root.join("G2/P9")).unwrap();
        let case = nested_sink.wait_for("G2__P9__S1").await;
        assert_eq!(case.room.as_deref(), Some("G2"));
        running.stop().await;
        nested.stop().await;
    }

    #[tokio::test]
    async fn startup_rescan_finds_what_arrived_while_down() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cases");
        make_case(&root.join("before1"), true);
        make_case(&root.join("before2"), true);
        make_case(&root.join("before_unmarked"), false);
        let sink = Recorder::new(true, 0);
        let running = start(config(1), &root, sink.clone());
        sink.wait_for("before1").await;
        sink.wait_for("before2").await;
        make_case(&root.join("sentinel"), true);
        sink.wait_for("sentinel").await;
        assert!(!sink.ids().contains(&"before_unmarked".to_string()));
        running.stop().await;
    }

    #[tokio::test]
    async fn an_already_known_case_is_not_an_error_nor_offered_again() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cases");
        make_case(&root.join("known"), true);
        let sink = Recorder::new(false, 0);
        let running = start(
            ScannerConfig {
                poll_interval_ms: 50,
                ..config(1)
            },
            &root,
            sink.clone(),
        );
        sink.wait_for("known").await;
        fs::write(root.join("known").join("touch.txt"), b"x").unwrap();
        make_case(&root.join("sentinel"), true);
        sink.wait_for("sentinel").await;
        assert_eq!(sink.ids().iter().filter(|id| *id == "known").count(), 1);
        assert!(
            running.status.get().starts_with("watching "),
            "{}",
            running.status.get()
        );
        running.stop().await;
    }

    #[tokio::test]
    async fn a_failing_sink_is_retried_and_shown_in_the_status() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cases");
        make_case(&root.join("retry"), true);
        let sink = Recorder::new(true, 2);
        let running = start(
            ScannerConfig {
                poll_interval_ms: 50,
                ..config(1)
            },
            &root,
            sink.clone(),
        );
        let mut calls = sink.calls.subscribe();
        let called = tokio::time::timeout(WAIT, calls.wait_for(|n| *n >= 1))
            .await
            .is_ok_and(|r| r.is_ok());
        assert!(called, "the sink was never called");
        sink.wait_for("retry").await;
        assert_eq!(sink.refuse.load(Ordering::SeqCst), 0);
        assert_eq!(sink.ids(), vec!["retry".to_string()]);
        let mut status = running.status.get();
        for _ in 0..200 {
            if status.starts_with("watching ") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            status = running.status.get();
        }
        assert!(status.starts_with("watching "), "{status}");
        running.stop().await;
    }

    #[tokio::test]
    async fn quiet_period_finds_the_case_after_writes_stop() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cases");
        let sink = Recorder::new(true, 0);
        let running = start(
            ScannerConfig {
                ready_marker: String::new(),
                quiet_period_secs: 1,
                poll_interval_ms: 100,
                ..config(1)
            },
            &root,
            sink.clone(),
        );
        let case = root.join("quiet");
        fs::create_dir_all(&case).unwrap();
        for i in 0..4 {
            fs::write(case.join(format!("part{i}.ptn")), vec![0u8; 1024]).unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let last_write = fs::metadata(case.join("part3.ptn"))
            .unwrap()
            .modified()
            .unwrap();
        sink.wait_for("quiet").await;
        let (_, when) = sink.case("quiet").unwrap();
        // Generous slack for the filesystem's coarse timestamp clock.
        let quiet = when.duration_since(last_write).unwrap_or_default();
        assert!(
            quiet >= Duration::from_millis(900),
            "found only {quiet:?} after the last write"
        );
        running.stop().await;
    }

    #[tokio::test]
    async fn poll_mode_finds_cases() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cases");
        let sink = Recorder::new(true, 0);
        let running = start(
            ScannerConfig {
                mode: ScanMode::Poll,
                poll_interval_ms: 50,
                ..config(1)
            },
            &root,
            sink.clone(),
        );
        make_case(&root.join("polled"), true);
        sink.wait_for("polled").await;
        assert_eq!(
            running.status.get(),
            format!("polling {}", absolute(&root).display())
        );
        running.stop().await;
    }

    #[tokio::test]
    async fn shutdown_stops_run_promptly() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cases");
        let sink = Recorder::new(true, 0);
        let running = start(config(1), &root, sink.clone());
        make_case(&root.join("sentinel"), true);
        sink.wait_for("sentinel").await;
        running.stop().await;

        let polling = start(
            ScannerConfig {
                mode: ScanMode::Poll,
                ..config(1)
            },
            &root,
            Recorder::new(true, 0),
        );
        polling.stop().await;
    }
}
