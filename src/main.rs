//! The `switchboard` binary: parse flags, load config, start the server, handle signals.

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use switchboard::config::{Config, LogFormat};
use switchboard::Server;

/// STUN, TURN and WebSocket signaling for WebRTC apps, behind one login.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version)]
struct Cli {
    /// TOML config file; without one the embedded localhost defaults apply.
    #[arg(long, short = 'c', env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective config (file + environment) as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Log format: text or json (overrides log.format).
    #[arg(long, value_parser = ["text", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Read a password from standard input and print its argon2id hash for `[[auth.users]]`.
    HashPassword,
}

fn hash_password_command() -> ExitCode {
    use std::io::BufRead;
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() {
        eprintln!("switchboard: cannot read the password from standard input");
        return ExitCode::from(1);
    }
    let pw = line.trim_end_matches(['\r', '\n']);
    if pw.is_empty() {
        eprintln!("switchboard: empty password");
        return ExitCode::from(2);
    }
    match switchboard::auth::login::hash_password(pw) {
        Ok(h) => {
            println!("{h}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("switchboard: cannot hash: {e}");
            ExitCode::from(1)
        }
    }
}

/// Detaches the kernel offload on every way out of `main` that runs destructors (a return,
/// an error, a panic unwinding the main thread): a clsact attachment would otherwise keep
/// relaying after the process is gone. SIGTERM and SIGINT end through the same return.
struct DetachOffload;

impl Drop for DetachOffload {
    fn drop(&mut self) {
        switchboard::turn::offload::detach_all();
    }
}

fn main() -> ExitCode {
    let _detach = DetachOffload;
    let cli = Cli::parse();
    if let Some(Command::HashPassword) = cli.command {
        return hash_password_command();
    }
    let env = std::env::vars().filter(|(k, _)| k != "SWITCHBOARD_CONFIG");
    let mut config = match Config::load(cli.config.as_deref(), env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchboard: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(f) = cli.log_format.as_deref() {
        config.log.format = if f == "json" {
            LogFormat::Json
        } else {
            LogFormat::Text
        };
    }
    if cli.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    init_tracing(&config);
    let path = cli.config.clone();
    match run(config, path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("switchboard: {e:#}");
            // Bad certificate material is a configuration error, like a bad key.
            let config_error = matches!(
                e.downcast_ref::<switchboard::server::StartError>(),
                Some(
                    switchboard::server::StartError::Tls(_)
                        | switchboard::server::StartError::JwtKey(_)
                        | switchboard::server::StartError::Offload(_)
                        | switchboard::server::StartError::Cluster(_)
                        | switchboard::server::StartError::Webhooks(_)
                        | switchboard::server::StartError::Config(_)
                )
            );
            ExitCode::from(if config_error { 2 } else { 1 })
        }
    }
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(config.log.level.clone()));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match config.log.format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

fn run(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async move {
        let drain_timeout = Duration::from_secs(config.server.drain_timeout_secs);
        // Handlers first: a SIGHUP right after "ready" must reload, not kill the process.
        let signals = Signals::new()?;
        let server = Server::new(config).start().await?;
        tracing::info!("switchboard ready");
        let drain_deadline = lifecycle(&server, signals, path.as_deref(), drain_timeout).await?;
        let shared = server.shared().clone();
        // Ending allocations at shutdown emits `allocation.ended`; one webhook attempt's time
        // is kept for those even when the drain used all of its own.
        let floor = tokio::time::Instant::now()
            + Duration::from_secs(shared.config.webhooks.timeout_secs.max(1));
        server.shutdown();
        server.wait().await;
        if shared.webhooks.enabled() {
            let deadline = drain_deadline.map_or(floor, |d| d.max(floor));
            let dropped = shared.webhooks.flush(deadline).await;
            if dropped > 0 {
                tracing::warn!(dropped, "webhook events still undelivered at exit, dropped");
            } else {
                tracing::info!("webhook queues flushed");
            }
        }
        tracing::info!("stopped");
        Ok(())
    })
}

/// The signals the process handles, installed before the server reports ready.
#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            hup: signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?,
        })
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> anyhow::Result<Signals> {
        Ok(Signals)
    }
}

/// Signals: SIGHUP reloads; SIGTERM drains (readiness off, no new allocations or joins,
/// existing ones go on until they end or `drain_timeout` passes); a second SIGTERM, or
/// SIGINT, stops at once. Returns the drain deadline when a drain began: the webhook flush
/// at exit may use what is left of it.
#[cfg(unix)]
async fn lifecycle(
    server: &switchboard::RunningServer,
    signals: Signals,
    path: Option<&std::path::Path>,
    drain_timeout: Duration,
) -> anyhow::Result<Option<tokio::time::Instant>> {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    let shared = server.shared();
    loop {
        tokio::select! {
            _ = hup.recv() => reload(shared, path),
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping now");
                return Ok(None);
            }
            _ = term.recv() => break,
        }
    }
    shared.lifecycle.begin_drain();
    tracing::info!(
        timeout_secs = drain_timeout.as_secs(),
        active = shared.active_work(),
        "SIGTERM: draining (readiness off, new allocations and joins refused)"
    );
    let deadline = tokio::time::Instant::now() + drain_timeout;
    let mut poll = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = poll.tick() => {
                if shared.active_work() <= 0 {
                    tracing::info!("drained: no allocations or signaling connections left");
                    return Ok(Some(deadline));
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                tracing::info!(active = shared.active_work(), "drain timeout reached");
                return Ok(Some(deadline));
            }
            _ = hup.recv() => reload(shared, path),
            _ = term.recv() => {
                tracing::info!("second SIGTERM: stopping now");
                return Ok(None);
            }
            _ = int.recv() => return Ok(None),
        }
    }
}

#[cfg(not(unix))]
async fn lifecycle(
    _server: &switchboard::RunningServer,
    _signals: Signals,
    _path: Option<&std::path::Path>,
    _drain_timeout: Duration,
) -> anyhow::Result<Option<tokio::time::Instant>> {
    tokio::signal::ctrl_c()
        .await
        .context("cannot listen for Ctrl-C")?;
    Ok(None)
}

/// Re-read the config file and environment and apply what can change at run time.
fn reload(shared: &switchboard::shared::Shared, path: Option<&std::path::Path>) {
    let env = std::env::vars().filter(|(k, _)| k != "SWITCHBOARD_CONFIG");
    let result = Config::load(path, env)
        .map_err(switchboard::shared::ReloadError::from)
        .and_then(|c| shared.reload(&c));
    match result {
        Ok(()) => tracing::info!(
            "SIGHUP: reloaded secrets, login users, JWT keys, webhook secret, allowed origins and certificate"
        ),
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: reload refused; the running configuration stays")
        }
    }
}
