//! Start-up and shutdown, as a script of steps: load config, prepare the data directory,
//! bind listeners, start the broker's tasks; on SIGTERM or Ctrl-C, signal every task, let
//! connections close (`connection.close 320`) and wait for them within a deadline.

use std::fs::File;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::amqp::{server, Broker};
use crate::config::Config;
use crate::disk::DiskFreeLimit;
use crate::memory::{self, MemoryWatermark};
use crate::pipeline::{self, Pipeline};

/// How long shutdown waits for connections to close.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// A running mqic.
pub struct App {
    pub broker: Arc<Broker>,
    /// Where the plain AMQP listener is bound (the real port when configured with port 0).
    pub amqp_addr: SocketAddr,
    /// Where the AMQPS listener is bound, if configured.
    pub amqps_addr: Option<SocketAddr>,
    /// Where the management API and Prometheus listen, if enabled.
    pub http: crate::mgmt::Addrs,
    pub memory: Arc<MemoryWatermark>,
    /// The disk free limit on the data dir's file system.
    pub disk: Arc<DiskFreeLimit>,
    /// The case pipeline: conductor, bus and workers.
    pub pipeline: Pipeline,
    /// Where the dashboard is bound, if enabled (`[web]`).
    pub web_addr: Option<SocketAddr>,
    /// The configuration as started (data dir made absolute).
    pub config: Config,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// Held for the process's life: a second mqic on the same data dir is refused.
    _data_lock: File,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr}"))
}

impl App {
    /// Starts everything the config asks for; returns once listeners accept connections.
    pub async fn start(mut config: Config) -> anyhow::Result<App> {
        // The data dir is made absolute: paths in workflow messages must be (workers
        // confine them to their roots).
        let data_lock = lock_data_dir(&mut config)?;

        // Durable exchanges, queues, bindings and persistent messages come back from here.
        let broker = Broker::open(
            config.limits(),
            config.users(),
            &config.amqp.vhosts,
            &config.data_dir.join("broker.redb"),
        )?;
        let total = memory::total_memory_bytes().unwrap_or(u64::MAX);
        let watermark = MemoryWatermark::new(config.amqp.memory_high_watermark.bytes(total));

        let disk = DiskFreeLimit::new(config.amqp.disk_free_limit, config.data_dir.clone());

        let plain = bind(config.amqp.listen, "AMQP").await?;
        let amqp_addr = plain.local_addr()?;
        let tls = match &config.amqp.tls {
            None => None,
            Some(t) => {
                let acceptor = server::tls_acceptor(&t.cert, &t.key)?;
                Some((bind(t.listen, "AMQPS").await?, acceptor))
            }
        };
        let amqps_addr = match &tls {
            Some((l, _)) => Some(l.local_addr()?),
            None => None,
        };
        let http = crate::mgmt::bind(&config).await?;

        let web_listener = match config.web.enabled {
            true => Some(crate::web::bind(config.web.listen).await?),
            false => None,
        };
        let web_addr = match &web_listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };

        let (shutdown, rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(server::run(plain, None, broker.clone(), rx.clone()));
        if let Some((listener, acceptor)) = tls {
            tasks.spawn(server::run(
                listener,
                Some(acceptor),
                broker.clone(),
                rx.clone(),
            ));
        }
        tasks.spawn(watermark.clone().watch(broker.clone(), rx.clone()));
        tasks.spawn(disk.clone().watch(broker.clone(), rx.clone()));
        tasks.spawn(broker.clone().sweep_expired(rx.clone()));
        let pipeline = pipeline::start(&config, &broker, &mut tasks, rx.clone()).await?;
        let http = crate::mgmt::spawn(
            http,
            broker.clone(),
            Some(pipeline.conductor.store.clone()),
            watermark.clone(),
            disk.clone(),
            (amqp_addr, amqps_addr),
            config.data_dir.clone(),
            &mut tasks,
            rx.clone(),
        )?;
        if let Some(listener) = web_listener {
            let web = crate::web::Web::new(&config, broker.clone(), pipeline.conductor.clone());
            tasks.spawn(crate::web::run(listener, web, rx));
        }

        Ok(App {
            broker,
            amqp_addr,
            amqps_addr,
            http,
            memory: watermark,
            disk,
            pipeline,
            web_addr,
            config,
            shutdown,
            tasks,
            _data_lock: data_lock,
        })
    }

    /// The ready lines `mqic serve` prints.
    pub fn ready_lines(&self) -> Vec<String> {
        let mut lines = vec![format!("amqp listening on {}", self.amqp_addr)];
        if let Some(a) = self.amqps_addr {
            lines.push(format!("amqps listening on {a}"));
        }
        if let Some(a) = self.http.management {
            lines.push(format!("management API listening on http://{a}/api/"));
        }
        if let Some(a) = self.http.prometheus {
            lines.push(format!(
                "prometheus metrics listening on http://{a}/metrics"
            ));
        }
        if let Some(a) = self.web_addr {
            lines.push(format!("dashboard on {}", dashboard_url(a)));
        }
        lines
    }

    /// Signals every task and waits (up to a deadline) for connections to close.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(DRAIN_DEADLINE, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("shutdown deadline passed with connections still open");
            self.tasks.abort_all();
        }
        // Whatever the store still has pending is committed before the process exits.
        self.broker.close_store();
    }
}

/// The dashboard's URL for a bound address (an unspecified address is shown as loopback,
/// where a browser on this machine reaches it).
pub fn dashboard_url(addr: SocketAddr) -> String {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{a}/")
}

/// Locks the data dir for this process: a second mqic (serve or worker) on it is refused.
fn lock_data_dir(config: &mut Config) -> anyhow::Result<File> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    config.data_dir = std::fs::canonicalize(&config.data_dir)
        .with_context(|| format!("cannot resolve data dir {}", config.data_dir.display()))?;
    // Every other configured path too: workers confine message paths to absolute roots.
    let absolute = |p: &mut std::path::PathBuf| -> anyhow::Result<()> {
        if !p.as_os_str().is_empty() && p.is_relative() {
            *p = std::path::absolute(&*p)
                .with_context(|| format!("cannot resolve {}", p.display()))?;
        }
        Ok(())
    };
    absolute(&mut config.scanner.dir)?;
    absolute(&mut config.conductor.results_dir)?;
    absolute(&mut config.archiver.backup_dir)?;
    for host in &mut config.hosts {
        absolute(&mut host.work_root)?;
    }
    let lock_path = config.data_dir.join("mqic.lock");
    let lock = File::create(&lock_path)
        .with_context(|| format!("cannot create {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!(
            "data dir {} is in use by another mqic process",
            config.data_dir.display()
        );
    }
    Ok(lock)
}

/// `mqic worker --role ROLE --broker URL`: one queue worker in its own process, until
/// SIGTERM or Ctrl-C. Running steps are not killed on stop: a restarted executor reattaches.
pub async fn worker(mut config: Config, role: pipeline::Role) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    let _lock = lock_data_dir(&mut config)?;
    let bus = pipeline::connect_bus(&config, None).await?;
    let (shutdown, rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let status = crate::workers::WorkerStatus::new();
    pipeline::spawn_role(
        &config,
        role,
        bus.clone(),
        &mut tasks,
        status.clone(),
        rx.clone(),
    )?;
    tasks.spawn(pipeline::heartbeats(
        bus.clone(),
        vec![(role.name(), status)],
        rx,
    ));
    println!("worker {} connected to {}", role.name(), bus.describe());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("worker shutting down");
    let _ = shutdown.send(true);
    let _ = tokio::time::timeout(DRAIN_DEADLINE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

/// `mqic serve`: start, print the ready lines, run until SIGTERM or Ctrl-C, drain.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Handlers go in before the ready line, so a signal sent right after it is not lost.
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    let app = App::start(config).await?;
    // A reader that stopped reading (a closed pipe) must not take mqic down: the lines are
    // written with errors ignored, not with `println!`, which panics on EPIPE.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for line in app.ready_lines() {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
    app.shutdown().await;
    Ok(())
}
