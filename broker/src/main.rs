//! The `messina` binary: `serve` (the default), `devices`, `simulate`, `print-config` and
//! `check-config`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use messina_config::{Config, LogFormat};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "messina",
    version,
    about = "MQTT ingestion broker: devices → MessagePack → storage, with an HTTP query port"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker, bridge, storage and HTTP side-port (the default).
    Serve {
        /// TOML configuration file; without it, the embedded defaults are used.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Publish simulated device telemetry and events to a broker.
    Simulate(messina_broker::simulate::SimulateArgs),
    /// Manage the device registry: add, list, show, set, rotate, revoke, import.
    Devices(messina_broker::security::cli::DevicesArgs),
    /// Print the full default configuration, every key documented.
    PrintConfig,
    /// Load and validate a configuration, reporting every problem.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(config: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(config).map_err(|e| {
        eprintln!("messina: {e}");
        ExitCode::from(2)
    })
}

/// Cancels `token` on the first SIGINT or SIGTERM; a second signal exits at once.
fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        for n in 0..2 {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if n == 0 {
                tracing::info!("signal received; shutting down (send again to exit at once)");
                token.cancel();
            } else {
                tracing::warn!("second signal; exiting without draining");
                std::process::exit(130);
            }
        }
    });
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("messina: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command.unwrap_or(Command::Serve { config: None }) {
        Command::PrintConfig => {
            print!("{}", Config::documented_defaults());
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => match load(config.as_deref()) {
            // The API key files and variables a server reads at start, too.
            Ok(config) => match config.api_keys() {
                Ok(_) => {
                    println!("configuration is valid");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("messina: {e}");
                    ExitCode::from(2)
                }
            },
            Err(code) => code,
        },
        Command::Devices(args) => {
            let config = match load(args.config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging("warn", LogFormat::Text);
            runtime.block_on(async {
                match messina_broker::security::cli::run(config, args.action).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("messina devices: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Simulate(args) => {
            init_logging("warn", LogFormat::Text);
            runtime.block_on(async {
                let stop = CancellationToken::new();
                cancel_on_signal(stop.clone());
                match messina_broker::simulate::run(args, stop).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("messina simulate: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Serve { config } => {
            let config = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(&config.log.level, config.log.format);
            runtime.block_on(async {
                let metrics = match messina_broker::install_metrics() {
                    Ok(m) => Some(m),
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics disabled");
                        None
                    }
                };
                let shutdown = CancellationToken::new();
                cancel_on_signal(shutdown.clone());
                match messina_broker::serve(config, metrics, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!("{e:#}");
                        eprintln!("messina: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}
