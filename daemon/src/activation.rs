//! systemd integration: socket activation, readiness and the watchdog.
//!
//! With `tilld.socket`, systemd creates `till.sock` and `mcp.sock` (mode and group from the unit)
//! and hands them over as `LISTEN_FDS`; `tilld` recognises each by its address, so no names need
//! configuring. Without activation, `tilld` binds them itself (`server::bind`).

use std::os::fd::OwnedFd;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// The listeners systemd passed, sorted by what the config says they are.
#[derive(Default)]
pub struct Activated {
    pub socket: Option<tokio::net::UnixListener>,
    pub mcp: Option<tokio::net::UnixListener>,
    pub gateway: Option<tokio::net::TcpListener>,
}

/// Sorts the handed-over fds; an fd that matches nothing in the config is an error, so a unit and a
/// config that disagree are found at start, not by a client that cannot connect.
pub fn sort(fds: Vec<OwnedFd>, cfg: &Config) -> Result<Activated> {
    let mut out = Activated::default();
    for fd in fds {
        let unix = std::os::unix::net::UnixListener::from(fd.try_clone()?);
        if let Ok(addr) = unix.local_addr() {
            let path = addr.as_pathname().map(|p| p.to_owned());
            unix.set_nonblocking(true)?;
            let listener = tokio::net::UnixListener::from_std(unix)?;
            if path.as_deref() == Some(cfg.socket.as_path()) {
                out.socket = Some(listener);
            } else if path.as_deref() == Some(cfg.mcp_socket.as_path()) {
                out.mcp = Some(listener);
            } else {
                bail!(
                    "systemd passed a socket at {path:?}, which is neither daemon.socket ({}) nor \
                     daemon.mcp_socket ({}); make the unit and till.toml agree",
                    cfg.socket.display(),
                    cfg.mcp_socket.display()
                );
            }
            continue;
        }
        let tcp = std::net::TcpListener::from(fd);
        let addr = tcp
            .local_addr()
            .context("a handed-over fd is neither a Unix nor a TCP listener")?;
        if Some(addr) != cfg.gateway {
            bail!(
                "systemd passed a TCP socket on {addr}, but daemon.gateway is {:?}",
                cfg.gateway
            );
        }
        tcp.set_nonblocking(true)?;
        out.gateway = Some(tokio::net::TcpListener::from_std(tcp)?);
    }
    Ok(out)
}

/// Pings systemd's watchdog at half the interval it asked for (`WATCHDOG_USEC`), from the runtime,
/// so a wedged runtime stops the pings and systemd restarts the daemon.
pub fn watchdog(shutdown: CancellationToken) {
    let usec = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let for_us = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_none_or(|p| p == std::process::id());
    let Some(usec) = usec.filter(|u| *u > 0 && for_us) else {
        return;
    };
    let every = Duration::from_micros(usec / 2);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => crate::notify("WATCHDOG=1"),
            }
        }
    });
}
