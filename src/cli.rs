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
    /// Override `scanner.dir` (the watched folder).
    #[arg(long)]
    pub scan_dir: Option<PathBuf>,
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
            if let Some(d) = args.scan_dir {
                config.scanner.dir = d;
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}
