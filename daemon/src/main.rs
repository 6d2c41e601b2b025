//! `tilld`: parse flags, install tracing, harden the process, load config, bind, run.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use tilld::config::Config;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

// Every request allocates a few small, short-lived buffers (JSON lines, headers, frames) on
// several threads; glibc's malloc spent about a fifth of tilld's CPU on them under load (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Till's daemon: holds your real API keys and lets agents use them through capability tokens.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Config file (else $TILL_CONFIG, else the default path, else built-in defaults).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the config and every secret source, then exit 0 (valid) or 1.
    #[arg(long)]
    check: bool,
    /// Try-it-now mode: a temporary state dir, the gateway on, and a built-in `echo` service with a
    /// dummy key. Ignores any config.
    #[arg(long, conflicts_with_all = ["config", "check"])]
    dev: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Colour only for a person at a terminal: journald, files and pipes get plain text.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TILL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match start(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tilld: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn start(args: Args) -> Result<()> {
    tilld::sys::harden().context("cannot make the process non-dumpable")?;
    match tilld::sys::raise_fd_limit() {
        Ok(n) => tracing::debug!(open_files = n, "descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the limit on open files"),
    }
    // reqwest is built without a default crypto provider; ring is the one we ship. First, since
    // `--check` builds the upstream clients too.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let uid = tilld::sys::uid();
    // --dev: the echo upstream needs a runtime before the config that names its address exists.
    // --dev: the echo upstream's port must be known before the config that names it is written,
    // so its listener is bound here and served once the runtime runs.
    let mut dev = None;
    let config = if args.dev {
        let dir = tempfile::Builder::new().prefix("tilld-dev-").tempdir()?;
        let echo = std::net::TcpListener::bind("127.0.0.1:0")?;
        let path = tilld::dev::write_config(dir.path(), echo.local_addr()?)?;
        let config = Config::from_file(&path)?;
        dev = Some((dir, echo));
        config
    } else {
        Config::resolve(args.config.as_deref(), uid)?
    };
    if args.check {
        let n = config.services.len();
        let source = config
            .source
            .as_ref()
            .map_or("built-in defaults".to_string(), |p| p.display().to_string());
        // Everything a start would build from the config, the upstream clients included (a bad
        // HTTPS_PROXY, say, shows here rather than at the next start).
        tilld::broker::Served::build(config.load_secrets()?)?;
        println!("{source}: OK ({n} service(s), every secret readable)");
        return Ok(());
    }
    if config.services.is_empty() {
        tracing::warn!(
            "no services configured: set a provider key (e.g. OPENAI_API_KEY) in tilld's environment \
             or write a till.toml"
        );
    }
    let loaded = config.load_secrets()?;
    // Before any thread exists: socket activation's fds and variables.
    let fds = tilld::sys::take_listen_fds().context("cannot take the sockets systemd passed")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let cfg = &loaded.config;
        // The single-instance lock holds with socket activation too.
        let _lock = tilld::server::lock(&cfg.socket)?;
        let activated = tilld::activation::sort(fds, cfg)?;
        let was_activated = activated.socket.is_some();
        let socket = match activated.socket {
            Some(s) => s,
            None => tilld::server::bind_unix(&cfg.socket)?,
        };
        let mcp = match activated.mcp {
            Some(s) => s,
            None => tilld::server::bind_unix(&cfg.mcp_socket)?,
        };
        let gateway = match (activated.gateway, cfg.gateway) {
            (Some(g), _) => Some(g),
            (None, Some(addr)) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on the gateway address {addr}"))?,
            ),
            (None, None) => None,
        };
        let shutdown = CancellationToken::new();
        // Printed once the daemon serves: a start that fails says only why.
        let mut banner = None;
        if let Some((dir, echo)) = &dev {
            tilld::dev::serve_echo(echo.try_clone()?)?;
            banner = Some(tilld::dev::banner(
                dir.path(),
                gateway.as_ref().and_then(|g| g.local_addr().ok()),
            ));
        }
        let ready = move || {
            if let Some(banner) = banner {
                // Whoever started us may stop reading stdout: a closed pipe must not take the
                // daemon down.
                let mut out = std::io::stdout();
                let _ = std::io::Write::write_all(&mut out, banner.as_bytes());
                let _ = std::io::Write::flush(&mut out);
            }
        };
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let s = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            s.cancel();
        });
        let listeners = tilld::Listeners {
            socket,
            mcp,
            gateway,
            activated: was_activated,
        };
        tilld::run(loaded, listeners, shutdown, ready).await
    })
}
