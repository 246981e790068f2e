//! The command line. Each subcommand is a thin call into the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat, DEFAULT_TOML};

#[derive(Debug, Parser)]
#[command(
    name = "mqic",
    about = "MQI Communicator: AMQP broker and MOQUI case pipeline in one binary"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run everything: the broker, the case pipeline and its workers.
    Serve(ServeArgs),
    /// Run the whole product on synthetic cases in a temp dir and show it working.
    Demo(DemoArgs),
    /// Run one queue worker in its own process, against a broker (mqic or RabbitMQ).
    Worker(WorkerArgs),
    /// Show the daemon: cases by status, GPUs, workers (through the running daemon).
    Status(StatusArgs),
    /// List cases, most recently updated first (through the running daemon).
    Cases(CasesArgs),
    /// Show one case with its steps and history (through the running daemon).
    Case(CaseArgs),
    /// Retry a FAILED or CANCELLED case (through the running daemon).
    Retry(CaseArgs),
    /// Cancel a case; a running step is killed (through the running daemon).
    Cancel(CaseArgs),
    /// List queues: ready, unacked, consumers, rates (through the management API).
    Queues(QueuesArgs),
    /// Validate a JSON message envelope and publish it to a queue (through the broker).
    Publish(PublishArgs),
    /// Archive finished cases past the retention age and back up the store now.
    Archive(DaemonArgs),
    /// Inspect configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print version, git commit and target.
    Version,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); without it the embedded defaults apply.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override `data_dir`.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Override `amqp.listen` (port 0 picks a free port).
    #[arg(long)]
    pub amqp_listen: Option<SocketAddr>,
    /// Override `log.format`.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Override `web.listen`, the dashboard (port 0 picks a free port).
    #[arg(long)]
    pub web_listen: Option<SocketAddr>,
    /// Override `scanner.dir` (the watched folder).
    #[arg(long)]
    pub scan_dir: Option<PathBuf>,
    /// Override `management.listen` (port 0 picks a free port).
    #[arg(long)]
    pub management_listen: Option<SocketAddr>,
    /// Override `prometheus.listen` (port 0 picks a free port).
    #[arg(long)]
    pub prometheus_listen: Option<SocketAddr>,
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How many synthetic cases to run.
    #[arg(long, default_value_t = 6)]
    pub cases: usize,
    /// Keep serving after the cases finish (until Ctrl-C), and keep the data dir.
    #[arg(long)]
    pub keep: bool,
    /// Use this data dir instead of a fresh temp dir (kept afterwards).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Cases of realistic size (about 45 MB and 220 files each) instead of tiny ones.
    #[arg(long)]
    pub realistic: bool,
}

#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// The broker the daemon's conductor listens on.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2F")]
    pub broker: String,
}

#[derive(Debug, clap::Args)]
pub struct CaseArgs {
    /// The case id.
    pub case_id: String,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct CasesArgs {
    /// Only cases with this status (NEW, QUEUED, PENDING_RESOURCE, PROCESSING, ...).
    #[arg(long)]
    pub status: Option<String>,
    /// At most this many cases.
    #[arg(long, default_value_t = 1000)]
    pub limit: u64,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct QueuesArgs {
    /// The management API (its user and password are taken from --broker).
    #[arg(long, default_value = "http://127.0.0.1:15672")]
    pub management: String,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// The queue to publish to (through the default exchange).
    pub queue: String,
    /// The message: a JSON envelope `{"command": ..., "payload": {...}}`.
    pub message: String,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Print JSON instead of a line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Which worker to run.
    #[arg(long, value_enum)]
    pub role: crate::pipeline::Role,
    /// The broker to work through (overrides `broker.url`).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2F")]
    pub broker: String,
    /// Configuration file (hosts, executor settings, data_dir for attempt records).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override `data_dir` (the executor keeps its attempt records there).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a configuration file; prints the problem with its line, or "ok".
    Check { file: PathBuf },
    /// Print the default configuration (the embedded assets/mqic.toml).
    Default,
    /// Read a password on stdin and print its hash for `password_hash`.
    HashPassword,
}

/// Runs the command line; errors become one line on stderr and a non-zero exit.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mqic: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
        .replace('\n', " ")
}

fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let mut config = match &args.config {
                Some(path) => Config::load(path)?,
                None => Config::embedded(),
            };
            if let Some(d) = args.data_dir {
                config.data_dir = d;
            }
            if let Some(a) = args.amqp_listen {
                config.amqp.listen = a;
            }
            if let Some(f) = args.log_format {
                config.log.format = f;
            }
            if let Some(a) = args.web_listen {
                config.web.listen = a;
            }
            if let Some(d) = args.scan_dir {
                config.scanner.dir = d;
            }
            if let Some(a) = args.management_listen {
                config.management.listen = a;
            }
            if let Some(a) = args.prometheus_listen {
                config.prometheus.listen = a;
            }
            init_logging(&config)?;
            runtime()?.block_on(crate::app::serve(config))
        }
        Command::Demo(args) => {
            let mut quiet = Config::embedded();
            quiet.log.level = "warn".into();
            init_logging(&quiet)?;
            let all_completed = runtime()?.block_on(crate::demo::run::run(args))?;
            if !all_completed {
                anyhow::bail!("not every demo case completed");
            }
            Ok(())
        }
        Command::Worker(args) => {
            let mut config = match &args.config {
                Some(path) => Config::load(path)?,
                None => Config::embedded(),
            };
            config.broker.url = Some(args.broker.clone());
            if let Some(d) = args.data_dir {
                config.data_dir = d;
            }
            config
                .pipeline()
                .validate()
                .map_err(|e| anyhow::anyhow!("--broker: {e}"))?;
            init_logging(&config)?;
            runtime()?.block_on(crate::app::worker(config, args.role))
        }
        Command::Status(a) => crate::mgmt::commands::status(&a.daemon.broker, a.json),
        Command::Cases(a) => {
            crate::mgmt::commands::cases(&a.daemon.broker, a.status.as_deref(), a.limit, a.json)
        }
        Command::Case(a) => crate::mgmt::commands::case(&a.daemon.broker, &a.case_id, a.json),
        Command::Retry(a) => crate::mgmt::commands::change(
            &a.daemon.broker,
            crate::protocol::rpc::Method::RetryCase,
            &a.case_id,
            a.json,
        ),
        Command::Cancel(a) => crate::mgmt::commands::change(
            &a.daemon.broker,
            crate::protocol::rpc::Method::CancelCase,
            &a.case_id,
            a.json,
        ),
        Command::Queues(a) => {
            crate::mgmt::commands::queues(&a.daemon.broker, &a.management, a.json)
        }
        Command::Publish(a) => {
            crate::mgmt::commands::publish(&a.daemon.broker, &a.queue, &a.message, a.json)
        }
        Command::Archive(args) => rpc_command(
            &args,
            crate::protocol::rpc::Method::ArchiveData,
            serde_json::json!({}),
        ),
        Command::Config(ConfigCommand::Check { file }) => {
            Config::load(&file)?;
            println!("ok: {}", file.display());
            Ok(())
        }
        Command::Config(ConfigCommand::Default) => {
            print!("{DEFAULT_TOML}");
            Ok(())
        }
        Command::Config(ConfigCommand::HashPassword) => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            let password = line.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                anyhow::bail!("no password on stdin");
            }
            println!("{}", crate::amqp::auth::hash_password(password));
            Ok(())
        }
        Command::Version => {
            println!(
                "mqic {} (commit {}, target {})",
                env!("CARGO_PKG_VERSION"),
                env!("MQIC_GIT_COMMIT"),
                env!("MQIC_TARGET")
            );
            Ok(())
        }
    }
}

/// Sends one RPC to the running daemon and prints its answer; a failure reply or an
/// unreachable daemon is one line and a non-zero exit.
fn rpc_command(
    daemon: &DaemonArgs,
    method: crate::protocol::rpc::Method,
    payload: serde_json::Value,
) -> anyhow::Result<()> {
    use crate::protocol::rpc::Status;
    runtime()?.block_on(async {
        let bus = crate::bus::RemoteBus::connect(&daemon.broker)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the mqic daemon: {e}"))?;
        let reply =
            crate::conductor::rpc::call(&bus, method, payload, std::time::Duration::from_secs(15))
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", method.name()))?;
        bus.close().await;
        match reply.status {
            Status::Success => {
                println!("{}", reply.payload);
                Ok(())
            }
            Status::Failure => {
                let why = reply.payload["error"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| reply.payload.to_string());
                anyhow::bail!("{}: {why}", method.name())
            }
        }
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Logs go to stderr (stdout carries the ready lines): human-readable or JSON lines.
fn init_logging(config: &Config) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(v)?,
        _ => EnvFilter::try_new(&config.log.level)
            .map_err(|e| anyhow::anyhow!("log.level '{}': {e}", config.log.level))?,
    };
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Log lines also go to the `mqic.logs` exchange once the pipeline runs.
    match config.log.format {
        LogFormat::Human => builder.finish().with(crate::logbus::layer()).init(),
        LogFormat::Json => builder.json().finish().with(crate::logbus::layer()).init(),
    }
    Ok(())
}
