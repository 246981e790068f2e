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
    /// Run the broker (and, as they land, the workers and dashboard).
    Serve(ServeArgs),
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
            init_logging(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(crate::app::serve(config))
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
