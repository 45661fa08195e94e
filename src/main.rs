//! The `highwater` command line: parses arguments and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use highwater::agent::{self, error_chain, OnceOutcome};
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
    /// Run one cycle per entity, print what each did. Exit 0: all ran; 1: one
    /// failed; 75: none failed, but another agent holds one (skipped).
    Once {
        /// Only this entity.
        #[arg(long)]
        entity: Option<String>,
        /// Wait for an entity another agent holds instead of skipping it.
        #[arg(long)]
        wait: bool,
    },
    /// Poll on the schedules until SIGINT or SIGTERM.
    Run,
    /// Check the configuration against the real servers: every problem at
    /// once, one line each; exit 1 if any is an error.
    Check,
    /// Per entity, from Redis: watermark, lag, the last cycle, dedup set, stream.
    Status {
        /// Only this entity.
        #[arg(long)]
        entity: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print an entity's (or any) stream as messages arrive, like `tail -f`.
    Tail {
        /// An entity name, or a stream key.
        target: String,
        /// Start with the entries the stream already holds (a new group: from the first entry).
        #[arg(long)]
        from_start: bool,
        /// Read as this consumer group (XREADGROUP), acknowledging (XACK) what was printed.
        #[arg(long)]
        group: Option<String>,
        /// The consumer's name within the group.
        #[arg(long, default_value = "highwater-tail", requires = "group")]
        consumer: String,
    },
    /// Wait until every entity completed a cycle that started after this
    /// command did (for deploy scripts and tests); exit 1 on timeout.
    Wait {
        /// Only this entity.
        #[arg(long)]
        entity: Option<String>,
        /// Give up after this long (e.g. 30s); default: wait until interrupted.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
    },
    /// Create a small SQLite shop, change it continuously, run the agent on
    /// it and print every message as it lands in Redis (Ctrl-C stops).
    Demo {
        /// Where the database, config and queries are written.
        #[arg(long, default_value = "./demo")]
        dir: PathBuf,
        /// The Redis to write to.
        #[arg(
            long,
            env = "REDIS_URL",
            hide_env_values = true,
            default_value = "redis://127.0.0.1:6379/0"
        )]
        redis_url: String,
        /// Stop after this long (e.g. 20s); default: until Ctrl-C.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// Key prefix; the streams are <PREFIX>:customers and <PREFIX>:orders,
        /// deleted with their state at start.
        #[arg(long, default_value = "highwater-demo")]
        prefix: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One crypto provider for every TLS connection of the process (Redis,
    // PostgreSQL, MySQL): ring. Installing fails only if one is already set.
    let _ = rustls::crypto::ring::default_provider().install_default();
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
        Command::Demo { .. }
        | Command::Check
        | Command::Status { .. }
        | Command::Tail { .. }
        | Command::Wait { .. } => "warn",
    };
    init_logging(cli.log_format, default_level);
    if let Command::Demo {
        dir,
        redis_url,
        duration,
        prefix,
    } = cli.command
    {
        let options = highwater::demo::DemoOptions {
            dir,
            redis_url,
            duration,
            prefix,
        };
        return match highwater::demo::run(options, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        };
    }
    if let Command::Check = cli.command {
        // `check` reports a broken config itself, one problem per line.
        return check(&cli.config).await;
    }
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => return fail(&e),
    };
    match cli.command {
        Command::Once { entity, wait } => once(&config, entity.as_deref(), wait).await,
        Command::Run => match agent::run(config, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Status { entity, json } => status(&config, entity.as_deref(), json).await,
        Command::Tail {
            target,
            from_start,
            group,
            consumer,
        } => {
            let options = highwater::tail::TailOptions {
                target,
                from_start,
                group,
                consumer,
            };
            match highwater::tail::tail(&config, &options, shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Wait { entity, timeout } => {
            let waited = highwater::status::wait(&config, entity.as_deref(), timeout, |line| {
                println!("{line}")
            });
            tokio::select! {
                result = waited => match result {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => fail(&e),
                },
                () = shutdown_signal() => ExitCode::FAILURE,
            }
        }
        Command::Demo { .. } | Command::Check => {
            unreachable!("dispatched before a config is loaded")
        }
    }
}

async fn check(path: &std::path::Path) -> ExitCode {
    let report = highwater::check::check(path).await;
    for finding in &report.findings {
        println!("{finding}");
    }
    println!("{}", report.summary());
    if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn status(config: &Config, entity: Option<&str>, json: bool) -> ExitCode {
    let statuses = match highwater::status::status(config, entity).await {
        Ok(statuses) => statuses,
        Err(e) => return fail(&e),
    };
    if json {
        println!("{}", highwater::status::render_json(&statuses));
    } else {
        print!("{}", highwater::status::render_text(&statuses));
    }
    ExitCode::SUCCESS
}

/// `once`'s exit status when no entity failed but one was skipped because
/// another agent holds it (sysexits' EX_TEMPFAIL: try again later).
const EXIT_HELD: u8 = 75;

async fn once(config: &Config, entity: Option<&str>, wait: bool) -> ExitCode {
    let results = match agent::once(config, entity, wait).await {
        Ok(results) => results,
        Err(e) => return fail(&e),
    };
    let (mut failed, mut held) = (false, false);
    for (name, result) in results {
        match result {
            Ok(OnceOutcome::Done(r)) => println!(
                "{name}: {} rows read, {} emitted, {} skipped in {:.3}s",
                r.rows,
                r.emitted,
                r.skipped,
                r.duration.as_secs_f64()
            ),
            Ok(OnceOutcome::Held { holder, expires_in }) => {
                held = true;
                match expires_in {
                    Some(left) => println!(
                        "{name}: held by agent {holder} (its lease runs {:.1}s more unless renewed); skipped",
                        left.as_secs_f64()
                    ),
                    None => println!("{name}: taken over by agent {holder} during the cycle; stopped"),
                }
            }
            Err(e) => {
                failed = true;
                eprintln!("error: {}", error_chain(&e));
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else if held {
        ExitCode::from(EXIT_HELD)
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
