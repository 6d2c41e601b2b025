//! `tilld`: the daemon that holds the real API keys and never hands them out.
//!
//! Layout:
//! - [`config`], [`presets`], [`secret`]: `till.toml`, the built-in services, master credentials.
//! - [`signing`]: the ed25519 key that signs tokens.
//! - [`store`]: durable token state in redb, written by a group-committing thread.
//! - [`audit`]: the hash-chained trail, written by its own thread.
//! - [`broker`]: shared state and the rules; [`handlers`]: one file per request kind.
//! - [`proxy`]: the upstream call, key injection, scrubbing.
//! - [`server`]: the native socket; [`peer`]: who is calling.
//! - [`mcp`]: the MCP tools on `mcp.sock` and the gateway's `/mcp`; [`handoff`]: an agent host's
//!   stdio handed over by `till mcp`, served so that the session outlives a restart.
//! - [`sys`]: the only `unsafe` (process hardening).
//!
//! [`run`] is what `main` calls after binding, and what tests could call with their own listener.

pub mod activation;
pub mod alerts;
pub mod audit;
pub mod broker;
pub mod config;
pub mod dev;
pub mod gateway;
pub mod handlers;
pub mod handoff;
pub mod journal;
pub mod links;
pub mod mcp;
pub mod metrics;
pub mod peer;
pub mod presets;
pub mod proxy;
pub mod reload;
pub mod secret;
pub mod server;
pub mod signing;
pub mod store;
pub mod sys;
pub mod usage;

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{Audit, Event, EventKind, PeerJson};
use crate::broker::Broker;
use crate::config::Loaded;
use crate::peer::Peer;

/// How long shutdown waits for requests in flight.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// How much of a name a caller sent (a service, a header) is quoted back or written to the trail.
pub const MAX_QUOTED_NAME: usize = 128;

/// `s` cut to at most `max` bytes (on a character boundary), saying how long it was. For anything a
/// caller sent that goes into a reply or an audit line: a peer must not be able to write megabytes
/// into the trail, or flush its history out through rotation, with one long name.
pub fn clip(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}…[{} bytes]", &s[..end], s.len()))
}

/// Creates `dir` (and parents) 0700 if it does not exist. An existing one is used only if it is fit
/// for a socket or secrets: this uid's or root's, and not writable by everyone.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if dir.as_os_str().is_empty() {
        return Ok(());
    }
    // A directory that is already there must be fit for a socket or secrets (see
    // `till_protocol::paths::unfit_dir`); a symbolic link too, and what it points to.
    let mut checked = Vec::new();
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create directory {}", dir.display()));
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
        Ok(m) if m.file_type().is_symlink() => {
            checked.push(m);
            checked.push(
                std::fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?,
            );
        }
        Ok(m) => checked.push(m),
    }
    let uid = sys::uid();
    for m in checked {
        if let Some(why) = till_protocol::paths::unfit_dir(m.uid(), m.mode(), uid) {
            anyhow::bail!(
                "refusing to use {}: {why}. Remove it (tilld makes its own), or set \
                 XDG_RUNTIME_DIR, or name a directory of yours in till.toml",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Tells systemd (or a test) that the daemon is ready, when `$NOTIFY_SOCKET` is set.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// What `run` serves: the native socket, the MCP socket, and the gateway if configured. Bound by
/// the caller (main, or a test) so readiness can be announced only once they all exist.
pub struct Listeners {
    pub socket: UnixListener,
    pub mcp: UnixListener,
    pub gateway: Option<tokio::net::TcpListener>,
    /// The Unix sockets came from systemd: they are systemd's to remove, not ours.
    pub activated: bool,
}

/// Sweeps dead tokens past their retention, on a timer (a quarter of the retention, 1 s to 60 s).
fn spawn_sweeper(b: Broker, shutdown: CancellationToken) {
    tokio::spawn(async move {
        loop {
            let retention = b.served().config.retention;
            let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = b.audit.checkpoint() {
                tracing::error!(error = %e, "cannot write the audit checkpoint");
            }
            let n = b.sweep(retention.as_secs());
            // A retired key is remembered for the same retention as a dead token, so its tokens
            // are refused as "retired" (which says what happened) rather than as unknown.
            match b
                .keyring
                .prune(broker::now_secs().saturating_sub(retention.as_secs()))
            {
                Ok(0) => {}
                Ok(k) => tracing::info!(
                    retired = k,
                    "retired signing keys whose tokens have all expired"
                ),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot prune retired signing keys")
                }
            }
            if n > 0 {
                tracing::debug!(swept = n, "swept dead tokens past their retention");
            }
        }
    });
}

/// Opens the state, serves `listener` until `shutdown` fires, then drains and flushes.
/// `ready` runs once the daemon serves (after `READY=1`).
pub async fn run(
    loaded: Loaded,
    listeners: Listeners,
    shutdown: CancellationToken,
    ready: impl FnOnce(),
) -> Result<()> {
    let Listeners {
        socket: listener,
        mcp: mcp_listener,
        gateway: gateway_listener,
        activated,
    } = listeners;
    let mut loaded = loaded;
    if let Some(g) = &gateway_listener {
        // The address actually bound (the config may say port 0), for `status` and the logs.
        loaded.config.gateway = Some(g.local_addr()?);
    }
    let cfg = &loaded.config;
    create_private_dir(&cfg.state_dir)?;
    let keyring = signing::Keyring::load_or_create(&cfg.state_dir)?;
    let (store, records, store_thread) = store::Store::open(&cfg.state_dir)?;
    let audit_key = signing::load_or_create_key(&cfg.state_dir.join("audit.key"), "audit")?;
    let audit = Audit::open(
        &cfg.audit_log,
        audit_key,
        cfg.audit_max_bytes,
        cfg.audit_keep,
        &cfg.state_dir,
    )?;
    let socket = cfg.socket.clone();
    let broker = Broker::new(loaded, keyring, store, audit.clone(), records)?;
    let me = PeerJson::from(&Peer::daemon());
    audit
        .record(
            EventKind::Start,
            Event {
                peer: Some(me.clone()),
                reason: Some(format!(
                    "tilld {} serving {} service(s)",
                    env!("CARGO_PKG_VERSION"),
                    broker.served().services.len()
                )),
                ..Event::default()
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(what) = broker.store.damage() {
        tracing::error!("{what}");
        alerts::raise(
            &broker,
            alerts::STORE_DAMAGED,
            &Peer::daemon(),
            None,
            what.to_owned(),
        );
    }
    if let Some(what) = audit.discontinuity() {
        alerts::raise(
            &broker,
            alerts::TRAIL_DISCONTINUITY,
            &Peer::daemon(),
            None,
            what.to_owned(),
        );
    }

    for w in broker.stale_keys() {
        tracing::warn!("{w}");
    }
    let tracker = TaskTracker::new();
    tracing::info!(socket = %socket.display(), services = broker.served().services.len(), "tilld ready");
    if let Some(g) = gateway_listener {
        tracing::info!(gateway = %g.local_addr()?, "gateway listening");
        tracker.spawn(gateway::serve(
            g,
            broker.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    let mcp_socket = broker.served().config.mcp_socket.clone();
    tracker.spawn(mcp::serve(
        mcp_listener,
        broker.clone(),
        shutdown.clone(),
        tracker.clone(),
    ));
    reload::spawn(broker.clone(), shutdown.clone())?;
    spawn_sweeper(broker.clone(), shutdown.clone());
    alerts::watch_failure(
        broker.clone(),
        alerts::STORE_UNWRITABLE,
        broker.store.watch_failure(),
        store::Store::warning,
        shutdown.clone(),
    );
    let trail = broker.audit.clone();
    alerts::watch_failure(
        broker.clone(),
        alerts::AUDIT_UNWRITABLE,
        broker.audit.watch_failure(),
        move |e| trail.warning(e),
        shutdown.clone(),
    );
    notify("READY=1");
    ready();
    // Pings only from readiness on: before it, systemd's start timeout is what applies.
    activation::watchdog(shutdown.clone());
    server::serve(listener, broker.clone(), shutdown.clone(), tracker.clone()).await;

    notify("STOPPING=1");
    tracing::info!("shutting down: finishing requests in flight");
    tracker.close();
    let drained = tokio::time::timeout(DRAIN_DEADLINE, tracker.wait())
        .await
        .is_ok();
    let _ = audit.record(
        EventKind::Stop,
        Event {
            peer: Some(me),
            reason: Some(
                if drained {
                    "clean shutdown"
                } else {
                    "shutdown after the drain deadline"
                }
                .into(),
            ),
            ..Event::default()
        },
    );
    if !activated {
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&mcp_socket);
    }
    drop(broker);
    drop(audit);
    if drained {
        // Every store handle is gone, so the committer writes its last batch and returns.
        let _ = tokio::task::spawn_blocking(move || store_thread.join()).await;
    }
    tracing::info!("stopped");
    Ok(())
}
