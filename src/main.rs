//! The `highwater` command line: parses arguments and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use highwater::agent::{self, error_chain};
use highwater::config::Config;
use highwater::telemetry::{init_logging, LogFormat};

#[derive(Parser)]
#[command(
    name = "highwater",
    version,
    about = "Polls SQL databases and streams each changed row once to Redis"
)]
struct Cli {
    /// The configuration file.
    #[arg(
        long,
        short,
        global = true,
        default_value = "highwater.toml",
        env = "HIGHWATER_CONFIG"
    )]
    config: PathBuf,
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one cycle per entity, print what each did, exit non-zero if any failed.
    Once {
        /// Only this entity.
        #[arg(long)]
        entity: Option<String>,
    },
    /// Poll on the schedules until SIGINT or SIGTERM.
    Run,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async_main(cli))
}

async fn async_main(cli: Cli) -> ExitCode {
    let default_level = match cli.command {
        Command::Once { .. } => "warn",
        Command::Run => "info",
    };
    init_logging(cli.log_format, default_level);
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => return fail(&e),
    };
    match cli.command {
        Command::Once { entity } => once(&config, entity.as_deref()).await,
        Command::Run => match agent::run(config, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
    }
}

async fn once(config: &Config, entity: Option<&str>) -> ExitCode {
    let results = match agent::once(config, entity).await {
        Ok(results) => results,
        Err(e) => return fail(&e),
    };
    let mut failed = false;
    for (name, result) in results {
        match result {
            Ok(r) => println!(
                "{name}: {} rows read, {} emitted, {} skipped in {:.3}s",
                r.rows,
                r.emitted,
                r.skipped,
                r.duration.as_secs_f64()
            ),
            Err(e) => {
                failed = true;
                eprintln!("error: {}", error_chain(&e));
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn fail(error: &dyn std::error::Error) -> ExitCode {
    eprintln!("error: {}", error_chain(error));
    ExitCode::FAILURE
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
