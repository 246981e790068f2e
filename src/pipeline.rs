//! The case pipeline's wiring: open the store, recover, connect the bus (the embedded broker
//! in-process, or `broker.url`), declare the topology, and start every worker as a task that
//! stops on the one shutdown signal. `mqic serve` runs all of it; `mqic worker --role` runs
//! one queue worker against a broker URL.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;

use crate::amqp::Broker;
use crate::bus::{Bus, EmbeddedBus, ReconnectingBus};
use crate::conductor::driver::{self, Conductor};
use crate::conductor::plan::Plan;
use crate::conductor::{relay, rpc};
use crate::config::Config;
use crate::hpc::local::LocalRunner;
use crate::hpc::remote::RemoteRunner;
use crate::hpc::ssh::SshHost;
use crate::protocol::topology::{topology, CONDUCTOR_QUEUE};
use crate::protocol::{self, Command, NewCase, WorkerHeartbeat};
use crate::store::Store;
use crate::workers::archiver::{self, Archiver};
use crate::workers::curator::{self, Curator, HostProbe};
use crate::workers::scanner::{self, CaseSink};
use crate::workers::transfer::sftp::SftpBackend;
use crate::workers::transfer::{self, TransferWorker};
use crate::workers::{executor, Shutdown, WorkerStatus};

/// How often every worker announces itself.
pub const HEARTBEAT_SECS: u64 = 10;

/// The roles `mqic worker --role` can run in a process of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Executor,
    Transfer,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Executor => "executor",
            Role::Transfer => "transfer",
        }
    }
}

/// A running pipeline.
pub struct Pipeline {
    pub conductor: Arc<Conductor>,
    pub bus: Arc<dyn Bus>,
    /// Every worker of this process with its status, for heartbeats and the dashboard.
    pub workers: Vec<(&'static str, Arc<WorkerStatus>)>,
}

/// The scanner's sink: a found case is recorded as scanned and created, with its first
/// command in the outbox, in one transaction.
struct ConductorSink(Arc<Conductor>);

impl CaseSink for ConductorSink {
    fn found(&self, case: NewCase) -> Result<bool, String> {
        let correlation = uuid::Uuid::new_v4().to_string();
        self.0
            .admit_scanned(&case, &correlation, true)
            .map_err(|e| e.to_string())
    }
}

/// Connects the bus the config asks for.
pub async fn connect_bus(
    config: &Config,
    broker: Option<&Arc<Broker>>,
) -> anyhow::Result<Arc<dyn Bus>> {
    let bus: Arc<dyn Bus> = match (&config.broker.url, broker) {
        (Some(url), _) => Arc::new(
            ReconnectingBus::connect(url)
                .await
                .context("cannot connect to broker.url")?,
        ),
        (None, Some(broker)) => {
            Arc::new(EmbeddedBus::new(broker.clone(), "/").context("cannot open the embedded bus")?)
        }
        (None, None) => anyhow::bail!("no broker: set broker.url or pass --broker"),
    };
    bus.declare(&topology())
        .await
        .with_context(|| format!("cannot declare the workflow topology on {}", bus.describe()))?;
    Ok(bus)
}

/// Opens the store and starts every pipeline task in `tasks`.
pub async fn start(
    config: &Config,
    broker: &Arc<Broker>,
    tasks: &mut JoinSet<()>,
    shutdown: Shutdown,
) -> anyhow::Result<Pipeline> {
    let store_path = config.data_dir.join("mqic.redb");
    let store = {
        let path = store_path.clone();
        tokio::task::spawn_blocking(move || Store::open(&path)).await??
    };
    if config.workflows.is_empty() {
        tracing::warn!(
            "no workflow is configured: new cases will fail with no_workflow until one is"
        );
    }
    let plan = Arc::new(Plan::from_config(config));
    let conductor = Conductor::new(store.clone(), plan, config.conductor.event_log_len);
    let resent = {
        let c = conductor.clone();
        let hosts = config.hosts.clone();
        tokio::task::spawn_blocking(move || c.recover(&hosts)).await??
    };
    if resent > 0 {
        tracing::info!("re-sent the command of {resent} step(s) in flight at the last stop");
    }
    let bus = connect_bus(config, Some(broker)).await?;
    tracing::info!("workflow bus: {}", bus.describe());

    let mut workers = Vec::new();
    let mut status = |name: &'static str| {
        let s = WorkerStatus::new();
        workers.push((name, s.clone()));
        s
    };
    tasks.spawn(relay::run(
        conductor.clone(),
        bus.clone(),
        status("relay"),
        shutdown.clone(),
    ));
    tasks.spawn(driver::run(
        conductor.clone(),
        bus.clone(),
        status("conductor"),
        shutdown.clone(),
    ));
    tasks.spawn(rpc::run(
        conductor.clone(),
        bus.clone(),
        status("rpc"),
        shutdown.clone(),
    ));
    tasks.spawn(driver::ticker(
        conductor.clone(),
        Duration::from_millis(500),
        shutdown.clone(),
    ));
    if config.workers.executor {
        spawn_role(
            config,
            Role::Executor,
            bus.clone(),
            tasks,
            status("executor"),
            shutdown.clone(),
        )?;
    }
    if config.workers.transfer {
        spawn_role(
            config,
            Role::Transfer,
            bus.clone(),
            tasks,
            status("transfer"),
            shutdown.clone(),
        )?;
    }
    tasks.spawn(scanner::run(
        config.scanner.clone(),
        config.scan_dir(),
        Arc::new(ConductorSink(conductor.clone())),
        status("scanner"),
        shutdown.clone(),
    ));
    if config.workers.curator {
        let curator = Arc::new(Curator::new(
            store.clone(),
            config.curator.clone(),
            conductor.plan.gpu_policy.clone(),
            HostProbe::from_config(config),
            conductor.gpu_freed.clone(),
        ));
        tasks.spawn(curator::run(
            bus.clone(),
            curator.clone(),
            status("curator"),
            shutdown.clone(),
        ));
        tasks.spawn(curator::schedule(bus.clone(), curator, shutdown.clone()));
    } else if config.hosts.iter().any(|h| !h.gpus.is_empty()) {
        tracing::info!("the curator is off: GPUs from [[hosts]] are leased without checks");
    }
    let archiver = Arc::new(Archiver::new(
        store,
        config.archiver.clone(),
        config.backup_dir(),
    ));
    tasks.spawn(archiver::run(
        bus.clone(),
        archiver,
        status("archiver"),
        shutdown.clone(),
    ));
    if config.archiver.interval_secs > 0 {
        tasks.spawn(archiver::schedule(
            conductor.clone(),
            Duration::from_secs(config.archiver.interval_secs),
            shutdown.clone(),
        ));
    }
    if let Some(lines) = crate::logbus::take_receiver() {
        tasks.spawn(crate::logbus::publish(bus.clone(), lines, shutdown.clone()));
    }
    tasks.spawn(heartbeats(bus.clone(), workers.clone(), shutdown));
    Ok(Pipeline {
        conductor,
        bus,
        workers,
    })
}

/// Starts one queue worker role. Fails when an `ssh` host's key cannot be loaded.
pub fn spawn_role(
    config: &Config,
    role: Role,
    bus: Arc<dyn Bus>,
    tasks: &mut JoinSet<()>,
    status: Arc<WorkerStatus>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    match role {
        Role::Executor => {
            let runner = Arc::new(LocalRunner::new(
                config.data_dir.join("attempts"),
                config.executor.output_tail_bytes,
            ));
            let mut ssh_hosts = Vec::new();
            for h in &config.hosts {
                if let Some(ssh) = SshHost::from_config(h) {
                    ssh_hosts.push((h.name.clone(), ssh?, config.work_root(h)));
                }
            }
            let remote = (!ssh_hosts.is_empty()).then(|| {
                Arc::new(RemoteRunner::new(
                    config.data_dir.join("attempts"),
                    ssh_hosts,
                    config.executor.output_tail_bytes,
                ))
            });
            tasks.spawn(executor::run_with_remote(
                bus,
                runner,
                remote,
                config.executor.clone(),
                status,
                shutdown,
            ));
        }
        Role::Transfer => {
            let mut hosts = Vec::new();
            for h in &config.hosts {
                let backend: Arc<dyn transfer::TransferBackend> = match SshHost::from_config(h) {
                    None => Arc::new(transfer::LocalBackend),
                    Some(ssh) => Arc::new(SftpBackend::new(ssh?)),
                };
                hosts.push((h.name.clone(), config.work_root(h), backend));
            }
            let worker =
                TransferWorker::with_backends(vec![config.scan_dir(), config.results_dir()], hosts);
            tasks.spawn(transfer::run(bus, Arc::new(worker), status, shutdown));
        }
    }
    Ok(())
}

/// Announces every worker of this process to the conductor every [`HEARTBEAT_SECS`]; a
/// last one says `stopping`.
pub async fn heartbeats(
    bus: Arc<dyn Bus>,
    workers: Vec<(&'static str, Arc<WorkerStatus>)>,
    mut shutdown: Shutdown,
) {
    let hostname = hostname();
    let pid = std::process::id();
    let started_at = protocol::rfc3339(std::time::SystemTime::now());
    let beat = |stopping: bool| {
        workers
            .iter()
            .map(|(role, status)| {
                Command::WorkerHeartbeat(WorkerHeartbeat {
                    name: format!("{role}@{hostname}:{pid}"),
                    role: role.to_string(),
                    hostname: hostname.clone(),
                    pid,
                    started_at: started_at.clone(),
                    status: if stopping {
                        "stopping".into()
                    } else {
                        status.get()
                    },
                    interval_secs: HEARTBEAT_SECS,
                })
            })
            .collect::<Vec<_>>()
    };
    loop {
        for command in beat(false) {
            if let Err(e) =
                crate::workers::send_command(bus.as_ref(), CONDUCTOR_QUEUE, command, None).await
            {
                tracing::debug!("heartbeat not sent: {e}");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(HEARTBEAT_SECS)) => {}
            _ = crate::workers::stopped(&mut shutdown) => break,
        }
    }
    for command in beat(true) {
        let _ = tokio::time::timeout(
            Duration::from_millis(500),
            crate::workers::send_command(bus.as_ref(), CONDUCTOR_QUEUE, command, None),
        )
        .await;
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
