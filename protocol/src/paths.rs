//! Default locations, in one place so the daemon and the CLI always agree.
//!
//! Root (a system service): `/run/till/till.sock`, `/var/lib/till`, `/etc/till/till.toml`.
//! A user: `$XDG_RUNTIME_DIR/till/till.sock` (else `/tmp/till-$UID/till.sock`),
//! `$XDG_STATE_HOME/till` (else `~/.local/state/till`), `$XDG_CONFIG_HOME/till/till.toml`
//! (else `~/.config/till/till.toml`).

use std::path::PathBuf;

/// The uid is passed in rather than read here, to keep this crate free of system calls.
pub fn default_socket(uid: u32) -> PathBuf {
    if uid == 0 {
        return PathBuf::from("/run/till/till.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("till").join("till.sock"),
        None => PathBuf::from(format!("/tmp/till-{uid}/till.sock")),
    }
}

/// `mcp.sock` beside the native socket.
pub fn mcp_socket_beside(socket: &std::path::Path) -> PathBuf {
    socket.with_file_name("mcp.sock")
}

pub fn default_state_dir(uid: u32) -> PathBuf {
    if uid == 0 {
        return PathBuf::from("/var/lib/till");
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("till");
    }
    home().join(".local/state/till")
}

pub fn default_config_file(uid: u32) -> PathBuf {
    if uid == 0 {
        return PathBuf::from("/etc/till/till.toml");
    }
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("till/till.toml");
    }
    home().join(".config/till/till.toml")
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}
