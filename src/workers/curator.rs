//! The curator (`system_monitor`): on each `system_monitor` message (published every
//! `curator.interval_ms` by [`schedule`], or by any tool), samples the GPUs of every host
//! that lists some — NVML on this machine when it loads, otherwise `nvidia-smi` through the
//! host's [`CommandRunner`] — and upserts what it saw into the store in one transaction per
//! host: health (ok / missing / error), uuid, name, utilization, memory, temperature, the
//! compute processes (marked foreign unless they belong to the GPU's lease), last seen, and
//! a point of bounded history. The conductor reads that through [`crate::gpu::lease`].
//!
//! A host without any monitoring (no NVML, no nvidia-smi) is reported once and its GPUs keep
//! no state, so they are leased as configured. A failing host is reported when its error
//! changes, not every interval. Sampling runs on this task with a timeout per command, so a
//! hung `nvidia-smi` never blocks anything else (lineage A20).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::Notify;

use super::{consume, Handled, Shutdown, WorkerStatus};
use crate::bus::Bus;
use crate::config::{Config, CuratorConfig, HostKind};
use crate::gpu::lease::LeasePolicy;
use crate::gpu::procs::{self, ProcTable};
use crate::gpu::{self, CommandRunner, HostReading, LocalCommandRunner, SampleError};
use crate::protocol::topology::SYSTEM_CURATOR_QUEUE;
use crate::protocol::Command;
use crate::store::records::{now_ms, GpuHealth, GpuKey, GpuPoint, GpuProcess, GpuRecord, GpuState};
use crate::store::{Store, StoreResult, Tx};

/// One host the curator samples.
pub struct HostProbe {
    pub host: String,
    /// The configured GPU indices: only these are recorded.
    pub gpus: Vec<u32>,
    /// This machine: NVML may be tried first.
    pub local: bool,
    /// Runs nvidia-smi and reads the process table there.
    pub runner: Arc<dyn CommandRunner>,
}

impl HostProbe {
    /// The probes for the configured hosts that list GPUs. Local hosts get a
    /// [`LocalCommandRunner`]; SSH hosts run the same commands over their session.
    pub fn from_config(config: &Config) -> Vec<HostProbe> {
        config
            .hosts
            .iter()
            .filter(|h| !h.gpus.is_empty())
            .filter_map(|h| match h.kind {
                HostKind::Local => Some(HostProbe {
                    host: h.name.clone(),
                    gpus: h.gpus.clone(),
                    local: true,
                    runner: Arc::new(LocalCommandRunner::new(h.name.clone())),
                }),
                // nvidia-smi over the host's one SSH session.
                HostKind::Ssh => match crate::hpc::ssh::SshHost::from_config(h)? {
                    Ok(ssh) => Some(HostProbe {
                        host: h.name.clone(),
                        gpus: h.gpus.clone(),
                        local: false,
                        runner: ssh,
                    }),
                    Err(e) => {
                        tracing::error!(host = %h.name, "GPU monitoring of this host is off: {e}");
                        None
                    }
                },
            })
            .collect()
    }
}

/// What one host's sample came to, for the worker's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSummary {
    pub ok: usize,
    pub missing: usize,
    pub error: usize,
    pub unavailable: bool,
}

/// The curator: the hosts, the store, and what it has already reported.
pub struct Curator {
    store: Store,
    config: CuratorConfig,
    policy: LeasePolicy,
    hosts: Vec<HostProbe>,
    /// Wakes the conductor's ticker when a sample made a GPU leasable.
    gpu_freed: Arc<Notify>,
    /// Per host, the last condition reported (unavailable or an error text), so each is
    /// logged once, and its end too.
    reported: Mutex<BTreeMap<String, String>>,
    /// When the schedule published a `system_monitor` nobody has consumed yet.
    pending_since: Mutex<Option<Instant>>,
}

impl Curator {
    pub fn new(
        store: Store,
        config: CuratorConfig,
        policy: LeasePolicy,
        hosts: Vec<HostProbe>,
        gpu_freed: Arc<Notify>,
    ) -> Curator {
        Curator {
            store,
            config,
            policy,
            hosts,
            gpu_freed,
            reported: Mutex::new(BTreeMap::new()),
            pending_since: Mutex::new(None),
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    /// Samples every host (or only `only`) at once, each with its own timeout, so a slow
    /// or unreachable host never delays the others; records each host as it answers.
    /// Returns a summary per host sampled, in configuration order.
    pub async fn sample_all(self: &Arc<Self>, only: Option<&str>) -> Vec<(String, HostSummary)> {
        let mut set = tokio::task::JoinSet::new();
        for (i, probe) in self.hosts.iter().enumerate() {
            if only.is_none_or(|h| h == probe.host) {
                let me = self.clone();
                set.spawn(async move { (i, me.sample_one(i).await) });
            }
        }
        let mut out = Vec::new();
        while let Some(done) = set.join_next().await {
            match done {
                Ok((i, Some(summary))) => out.push((i, summary)),
                Ok((_, None)) => {}
                Err(e) => tracing::error!("GPU sampling task failed: {e}"),
            }
        }
        out.sort_by_key(|(i, _)| *i);
        out.into_iter()
            .map(|(i, summary)| (self.hosts[i].host.clone(), summary))
            .collect()
    }

    /// Samples host `i` and records what it saw; `None` when the store write failed.
    async fn sample_one(self: Arc<Self>, i: usize) -> Option<HostSummary> {
        let probe = &self.hosts[i];
        let outcome = self.sample_host(probe).await;
        self.report(&probe.host, &probe.gpus, &outcome);
        let table = match &outcome {
            Ok(reading) if !reading.processes.is_empty() => {
                procs::read_table(probe.runner.as_ref(), self.timeout()).await
            }
            _ => ProcTable::new(),
        };
        let me = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            let probe = &me.hosts[i];
            me.store.write(|tx| {
                record(
                    tx,
                    &probe.host,
                    &probe.gpus,
                    &outcome,
                    &table,
                    &me.policy,
                    me.config.history_len,
                    now_ms(),
                )
            })
        })
        .await;
        match result {
            Ok(Ok((summary, freed))) => {
                if freed {
                    self.gpu_freed.notify_one();
                }
                Some(summary)
            }
            Ok(Err(e)) => {
                tracing::error!(host = %probe.host, "cannot record GPU state: {e}");
                None
            }
            Err(e) => {
                tracing::error!(host = %probe.host, "GPU state task failed: {e}");
                None
            }
        }
    }

    async fn sample_host(&self, probe: &HostProbe) -> Result<HostReading, SampleError> {
        let program = &self.config.nvidia_smi;
        if probe.local {
            gpu::sample_local(
                self.config.nvml,
                probe.runner.as_ref(),
                program,
                self.timeout(),
            )
            .await
        } else {
            gpu::sample_smi(probe.runner.as_ref(), program, self.timeout()).await
        }
    }

    /// Logs a host's condition when it changes: unavailable once, an error once per
    /// distinct message, and the return to normal. Returns whether it logged.
    fn report(&self, host: &str, gpus: &[u32], outcome: &Result<HostReading, SampleError>) -> bool {
        let mut reported = self.reported.lock();
        let now = match outcome {
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        };
        let before = reported.get(host).cloned();
        if before == now {
            return false;
        }
        match (&now, outcome) {
            (Some(_), Err(SampleError::Unavailable(why))) => tracing::warn!(
                host,
                "GPU monitoring unavailable on host {host} ({why}): its GPUs {gpus:?} are leased as configured, without checks"
            ),
            (Some(why), _) => tracing::warn!(
                host,
                "GPU sampling failed on host {host}: {why}; its GPUs are not leased until a sample succeeds"
            ),
            (None, _) => tracing::info!(host, "GPU monitoring on host {host} works"),
        }
        match now {
            Some(n) => reported.insert(host.to_string(), n),
            None => reported.remove(host),
        };
        true
    }

    /// Whether the schedule should publish another `system_monitor`: not while one is
    /// still waiting (a slow host must not let them pile up), unless it was lost.
    fn take_turn(&self) -> bool {
        let mut pending = self.pending_since.lock();
        let lost_after = Duration::from_millis(self.config.stale_after_ms());
        match *pending {
            Some(since) if since.elapsed() < lost_after => false,
            _ => {
                *pending = Some(Instant::now());
                true
            }
        }
    }

    fn consumed(&self) {
        *self.pending_since.lock() = None;
    }
}

/// Upserts one host's sample. Returns the summary and whether a GPU became leasable.
#[allow(clippy::too_many_arguments)]
pub fn record(
    tx: &mut Tx<'_>,
    host: &str,
    configured: &[u32],
    outcome: &Result<HostReading, SampleError>,
    table: &ProcTable,
    policy: &LeasePolicy,
    history_len: usize,
    now: u64,
) -> StoreResult<(HostSummary, bool)> {
    let leases = tx.leases()?;
    let known: Vec<GpuRecord> = tx
        .gpus()?
        .into_iter()
        .filter(|g| g.gpu.host == host)
        .collect();
    let leasable =
        |g: &GpuRecord| policy.refusal(g, now).is_none() && !leases.iter().any(|l| l.gpu == g.gpu);
    let before: BTreeSet<GpuKey> = known
        .iter()
        .filter(|g| leasable(g))
        .map(|g| g.gpu.clone())
        .collect();
    // The session leader of the step holding each leased GPU, when it has started.
    let mut step_pids: BTreeMap<GpuKey, u32> = BTreeMap::new();
    for lease in leases.iter().filter(|l| l.gpu.host == host) {
        let pid = tx
            .case(&lease.case_id)?
            .and_then(|c| c.step)
            .filter(|r| r.gpu.as_ref() == Some(&lease.gpu) && r.attempt == lease.attempt)
            .and_then(|r| r.pid);
        if let Some(pid) = pid {
            step_pids.insert(lease.gpu.clone(), pid);
        }
    }
    let mut summary = HostSummary::default();
    let mut after = BTreeSet::new();
    for &index in configured {
        let key = GpuKey {
            host: host.to_string(),
            index,
        };
        let mut rec = known
            .iter()
            .find(|g| g.gpu == key)
            .cloned()
            .unwrap_or(GpuRecord {
                gpu: key.clone(),
                usable: true,
                name: String::new(),
                last_seen_ms: 0,
                state: None,
            });
        let previous = rec.state.take();
        rec.state = match outcome {
            Err(SampleError::Unavailable(_)) => {
                summary.unavailable = true;
                None
            }
            Err(SampleError::Failed(why)) => {
                summary.error += 1;
                let mut s = previous.unwrap_or_else(|| empty_state(GpuHealth::Error, now));
                s.health = GpuHealth::Error;
                s.sampled_ms = now;
                s.error = Some(why.clone());
                Some(s)
            }
            Ok(reading) => match reading.gpus.iter().find(|g| g.index == index) {
                None => {
                    summary.missing += 1;
                    let mut s = empty_state(GpuHealth::Missing, now);
                    s.uuid = previous.map(|p| p.uuid).unwrap_or_default();
                    Some(s)
                }
                Some(g) => {
                    summary.ok += 1;
                    rec.name = g.name.clone();
                    rec.last_seen_ms = now;
                    let owner = step_pids.get(&key);
                    let processes = reading
                        .processes
                        .iter()
                        .filter(|p| p.gpu_uuid == g.uuid)
                        .map(|p| GpuProcess {
                            pid: p.pid,
                            name: p.name.clone(),
                            used_memory_mib: p.used_memory_mib,
                            foreign: !owner.is_some_and(|&s| procs::belongs_to(p.pid, s, table)),
                        })
                        .collect();
                    Some(GpuState {
                        health: GpuHealth::Ok,
                        sampled_ms: now,
                        uuid: g.uuid.clone(),
                        utilization_pct: g.utilization_pct,
                        memory_used_mib: g.memory_used_mib,
                        memory_total_mib: g.memory_total_mib,
                        temperature_c: g.temperature_c,
                        processes,
                        error: None,
                    })
                }
            },
        };
        if let Some(s) = &rec.state {
            for p in s.processes.iter().filter(|p| p.foreign) {
                if leases.iter().any(|l| l.gpu == key) {
                    tracing::debug!(gpu = %key, pid = p.pid, "a foreign process ({}) runs on a leased GPU", p.name);
                }
            }
            tx.push_gpu_point(
                &key.key(),
                &GpuPoint {
                    at_ms: now,
                    health: s.health,
                    utilization_pct: s.utilization_pct,
                    memory_used_mib: s.memory_used_mib,
                    temperature_c: s.temperature_c,
                    processes: s.processes.len() as u32,
                },
                history_len,
            )?;
        }
        if leasable(&rec) {
            after.insert(key.clone());
        }
        tx.put_gpu(&rec)?;
    }
    Ok((summary, after.difference(&before).next().is_some()))
}

fn empty_state(health: GpuHealth, now: u64) -> GpuState {
    GpuState {
        health,
        sampled_ms: now,
        uuid: String::new(),
        utilization_pct: None,
        memory_used_mib: None,
        memory_total_mib: None,
        temperature_c: None,
        processes: Vec::new(),
        error: None,
    }
}

/// Consumes `system_curator_queue` until shutdown. A `system_monitor` payload may name one
/// host (`{"host": "gpu1"}`); otherwise every host is sampled.
pub async fn run(
    bus: Arc<dyn Bus>,
    curator: Arc<Curator>,
    status: Arc<WorkerStatus>,
    shutdown: Shutdown,
) {
    let s = status.clone();
    consume(
        bus,
        SYSTEM_CURATOR_QUEUE,
        1,
        status,
        shutdown,
        move |envelope, delivery| {
            let curator = curator.clone();
            let status = s.clone();
            async move {
                let Command::SystemMonitor(payload) = envelope.command else {
                    let reason = format!("`{}` is not a curator command", envelope.command.name());
                    return (Handled::Reject(reason), Some(delivery));
                };
                curator.consumed();
                let only = payload.get("host").and_then(Value::as_str);
                let summaries = curator.sample_all(only).await;
                status.set(describe(&summaries));
                (Handled::Ack, Some(delivery))
            }
        },
    )
    .await
}

/// The worker status line: `local: 2 ok, 1 missing; gpu1: unavailable`.
fn describe(summaries: &[(String, HostSummary)]) -> String {
    if summaries.is_empty() {
        return "no host lists GPUs".into();
    }
    summaries
        .iter()
        .map(|(host, s)| {
            if s.unavailable {
                format!("{host}: monitoring unavailable")
            } else {
                let mut parts = vec![format!("{} ok", s.ok)];
                if s.missing > 0 {
                    parts.push(format!("{} missing", s.missing));
                }
                if s.error > 0 {
                    parts.push(format!("{} error", s.error));
                }
                format!("{host}: {}", parts.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Publishes `system_monitor` at once and then every `curator.interval_ms` until shutdown,
/// skipping a turn while the previous one waits. With no host listing GPUs it publishes
/// nothing.
pub async fn schedule(bus: Arc<dyn Bus>, curator: Arc<Curator>, mut shutdown: Shutdown) {
    if curator.hosts.is_empty() {
        // Nothing to sample; a `system_monitor` sent by hand is still answered.
        return;
    }
    let every = Duration::from_millis(curator.config.interval_ms);
    loop {
        if curator.take_turn() {
            let command = Command::SystemMonitor(serde_json::Map::new());
            if let Err(e) =
                super::send_command(bus.as_ref(), SYSTEM_CURATOR_QUEUE, command, None).await
            {
                tracing::debug!("system_monitor not published: {e}");
                curator.consumed();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = super::stopped(&mut shutdown) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{GpuReading, ProcessReading};
    use crate::store::records::{CaseStatus, GpuLease, StepRun};

    const NOW: u64 = 1_000_000;

    fn reading() -> HostReading {
        let gpu = |index: u32, used: u64| GpuReading {
            index,
            uuid: format!("GPU-{index}"),
            name: "NVIDIA H100 80GB HBM3".into(),
            utilization_pct: Some(5),
            memory_used_mib: Some(used),
            memory_total_mib: Some(81_559),
            temperature_c: Some(33),
        };
        HostReading {
            gpus: vec![gpu(0, 10), gpu(1, 81_000), gpu(2, 300), gpu(7, 0)],
            processes: vec![
                ProcessReading {
                    gpu_uuid: "GPU-0".into(),
                    pid: 4242,
                    name: "python".into(),
                    used_memory_mib: Some(200),
                },
                ProcessReading {
                    gpu_uuid: "GPU-2".into(),
                    pid: 5001,
                    name: "tps_env".into(),
                    used_memory_mib: Some(300),
                },
            ],
        }
    }

    fn policy() -> LeasePolicy {
        LeasePolicy {
            monitored: true,
            stale_after_ms: 60_000,
            min_free_mib: [("gpu1".to_string(), 1024)].into_iter().collect(),
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("mqic.redb")).unwrap();
        (dir, store)
    }

    fn state(store: &Store, index: u32) -> GpuState {
        store
            .gpus()
            .unwrap()
            .into_iter()
            .find(|g| g.gpu.index == index)
            .and_then(|g| g.state)
            .unwrap()
    }

    #[test]
    fn a_sample_upserts_state_marks_missing_and_tells_own_from_foreign() {
        let (_d, store) = open();
        // GPU 2 is leased by a running step whose wrapper is pid 5000 (MOQUI is 5001).
        let key = |index| GpuKey {
            host: "gpu1".into(),
            index,
        };
        store
            .write(|tx| {
                let mut c = crate::store::tests::sample_case("c1", CaseStatus::Processing, 1);
                c.step = Some(StepRun {
                    name: "simulate".into(),
                    attempt: 1,
                    dispatched_ms: 1,
                    started_ms: Some(2),
                    deadline_ms: u64::MAX,
                    pid: Some(5000),
                    progress: 0.0,
                    gpu: Some(key(2)),
                });
                tx.put_case(&c)?;
                tx.take_lease(&GpuLease {
                    gpu: key(2),
                    case_id: "c1".into(),
                    step: "simulate".into(),
                    attempt: 1,
                    taken_ms: 1,
                    expires_ms: u64::MAX,
                })?;
                Ok(())
            })
            .unwrap();
        let mut table = ProcTable::new();
        table.insert(
            5001,
            procs::ProcEntry {
                ppid: 5000,
                pgrp: 5000,
                session: 5000,
            },
        );
        let (summary, freed) = store
            .write(|tx| {
                record(
                    tx,
                    "gpu1",
                    &[0, 1, 2, 3],
                    &Ok(reading()),
                    &table,
                    &policy(),
                    10,
                    NOW,
                )
            })
            .unwrap();
        assert_eq!(
            summary,
            HostSummary {
                ok: 3,
                missing: 1,
                error: 0,
                unavailable: false
            }
        );
        assert!(
            !freed,
            "nothing is leasable: a process, full memory, leased, missing"
        );
        let g0 = state(&store, 0);
        assert_eq!(g0.health, GpuHealth::Ok);
        assert_eq!(g0.uuid, "GPU-0");
        assert_eq!(g0.processes.len(), 1);
        assert!(g0.processes[0].foreign);
        assert_eq!(state(&store, 1).memory_free_mib(), Some(559));
        let g2 = state(&store, 2);
        assert!(
            !g2.processes[0].foreign,
            "MOQUI in the lease's session is ours"
        );
        assert_eq!(state(&store, 3).health, GpuHealth::Missing);
        assert!(
            !store.gpus().unwrap().iter().any(|g| g.gpu.index == 7),
            "an unconfigured GPU is not recorded"
        );
        assert_eq!(store.gpu_history("gpu1:0", 100).unwrap().len(), 1);
        assert_eq!(
            store.gpu_history("gpu1:3", 100).unwrap()[0].health,
            GpuHealth::Missing
        );

        // The foreign process ends: GPU 0 becomes leasable, and the sample says so.
        let mut r = reading();
        r.processes.remove(0);
        let (_, freed) = store
            .write(|tx| {
                record(
                    tx,
                    "gpu1",
                    &[0, 1, 2, 3],
                    &Ok(r),
                    &table,
                    &policy(),
                    10,
                    NOW + 1,
                )
            })
            .unwrap();
        assert!(freed);
        assert!(state(&store, 0).processes.is_empty());
        assert_eq!(store.gpu_history("gpu1:0", 100).unwrap().len(), 2);
    }

    #[test]
    fn failures_mark_errors_and_unavailable_clears_state() {
        let (_d, store) = open();
        let write = |outcome: Result<HostReading, SampleError>, at: u64| {
            store
                .write(|tx| {
                    record(
                        tx,
                        "gpu1",
                        &[0],
                        &outcome,
                        &ProcTable::new(),
                        &policy(),
                        3,
                        at,
                    )
                })
                .unwrap()
        };
        write(Ok(reading()), NOW);
        let (summary, _) = write(
            Err(SampleError::Failed("nvidia-smi timed out".into())),
            NOW + 1,
        );
        assert_eq!(summary.error, 1);
        let s = state(&store, 0);
        assert_eq!(s.health, GpuHealth::Error);
        assert_eq!(s.error.as_deref(), Some("nvidia-smi timed out"));
        assert_eq!(
            s.memory_total_mib,
            Some(81_559),
            "the last values are kept for display"
        );
        for i in 2..6 {
            write(Err(SampleError::Failed("x".into())), NOW + i);
        }
        assert_eq!(
            store.gpu_history("gpu1:0", 100).unwrap().len(),
            3,
            "bounded"
        );
        let (summary, freed) = write(
            Err(SampleError::Unavailable("no nvidia-smi".into())),
            NOW + 9,
        );
        assert!(summary.unavailable);
        assert!(
            freed,
            "without monitoring the configured GPU is leasable again"
        );
        let g = store.gpus().unwrap().remove(0);
        assert!(g.state.is_none());
        assert!(g.usable);
    }

    #[test]
    fn conditions_are_logged_once_and_turns_do_not_pile_up() {
        let (_d, store) = open();
        let c = Curator::new(
            store,
            CuratorConfig::default(),
            policy(),
            Vec::new(),
            Arc::new(Notify::new()),
        );
        let unavailable = Err(SampleError::Unavailable("no nvidia-smi".into()));
        let failed = |m: &str| Err(SampleError::Failed(m.into()));
        assert!(c.report("local", &[0], &unavailable));
        for _ in 0..5 {
            assert!(
                !c.report("local", &[0], &unavailable),
                "unavailable is said once"
            );
        }
        assert!(c.report("gpu1", &[0], &failed("timed out")), "per host");
        assert!(!c.report("gpu1", &[0], &failed("timed out")));
        assert!(
            c.report("gpu1", &[0], &failed("exit 9")),
            "a new error is said"
        );
        assert!(c.report("gpu1", &[0], &Ok(reading())), "and the recovery");
        assert!(!c.report("gpu1", &[0], &Ok(reading())));

        assert!(c.take_turn());
        assert!(!c.take_turn(), "one system_monitor waits at a time");
        c.consumed();
        assert!(c.take_turn());
    }

    /// A host reached through the [`CommandRunner`] seam, answering each nvidia-smi query
    /// from canned text (`None`: the host is unreachable).
    struct FakeHost(&'static str, Option<(&'static str, &'static str)>);

    impl CommandRunner for FakeHost {
        fn host(&self) -> &str {
            self.0
        }
        fn run<'a>(
            &'a self,
            argv: &'a [String],
            _timeout: Duration,
        ) -> crate::gpu::runner::BoxFuture<'a, Result<gpu::CommandOutput, gpu::RunError>> {
            let answer = match self.1 {
                None => Err(gpu::RunError::Failed(format!("{} is unreachable", self.0))),
                Some((gpus, apps)) => Ok(gpu::CommandOutput {
                    code: Some(0),
                    stdout: if argv[1].starts_with("--query-gpu") {
                        gpus
                    } else {
                        apps
                    }
                    .into(),
                    stderr: String::new(),
                }),
            };
            Box::pin(async move { answer })
        }
    }

    #[tokio::test]
    async fn every_host_is_sampled_through_its_runner_and_recorded() {
        let (_d, store) = open();
        let probe = |host: &'static str, answer| HostProbe {
            host: host.into(),
            gpus: vec![0, 1],
            local: false,
            runner: Arc::new(FakeHost(host, answer)),
        };
        let curator = Arc::new(Curator::new(
            store.clone(),
            CuratorConfig::default(),
            policy(),
            vec![
                probe(
                    "gpu1",
                    Some((
                        "index, uuid, memory.used [MiB], memory.total [MiB]\n0, GPU-a, 1 MiB, 81559 MiB\n",
                        "gpu_uuid, pid, process_name, used_gpu_memory [MiB]\n",
                    )),
                ),
                probe("gpu2", None),
            ],
            Arc::new(Notify::new()),
        ));
        let summaries = curator.sample_all(None).await;
        assert_eq!(
            summaries,
            [
                (
                    "gpu1".to_string(),
                    HostSummary {
                        ok: 1,
                        missing: 1,
                        ..Default::default()
                    }
                ),
                (
                    "gpu2".to_string(),
                    HostSummary {
                        error: 2,
                        ..Default::default()
                    }
                ),
            ]
        );
        let gpus = store.gpus().unwrap();
        let health = |host: &str, index: u32| {
            gpus.iter()
                .find(|g| g.gpu.host == host && g.gpu.index == index)
                .and_then(|g| g.state.as_ref())
                .map(|s| (s.health, s.error.clone()))
        };
        assert_eq!(health("gpu1", 0), Some((GpuHealth::Ok, None)));
        assert_eq!(health("gpu1", 1), Some((GpuHealth::Missing, None)));
        assert_eq!(
            health("gpu2", 0),
            Some((GpuHealth::Error, Some("gpu2 is unreachable".into())))
        );
        assert_eq!(
            curator.sample_all(Some("gpu2")).await.len(),
            1,
            "one host on request"
        );
    }

    #[test]
    fn the_status_line_names_each_host() {
        assert_eq!(describe(&[]), "no host lists GPUs");
        let s = describe(&[
            (
                "local".into(),
                HostSummary {
                    ok: 2,
                    missing: 1,
                    ..Default::default()
                },
            ),
            (
                "gpu1".into(),
                HostSummary {
                    unavailable: true,
                    ..Default::default()
                },
            ),
        ]);
        assert_eq!(s, "local: 2 ok, 1 missing; gpu1: monitoring unavailable");
    }
}
