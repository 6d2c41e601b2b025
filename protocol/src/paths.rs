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
        None => shared_tmp_socket(uid),
    }
}

/// The default socket without `XDG_RUNTIME_DIR`: in `/tmp`, where any user may make the
/// directory first, so both ends check it ([`unfit_dir`]).
pub fn shared_tmp_socket(uid: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/till-{uid}/till.sock"))
}

/// Why a directory owned by `owner`, with permission bits `mode`, is not fit to hold `uid`'s
/// socket or secrets; `None` when it is. As tmux and ssh ask of theirs: it must be `uid`'s or
/// root's, and others may not write to it, unless it is sticky as `/tmp` is (then they cannot
/// remove or rename what is in it). Otherwise another local user who made it first (the
/// `/tmp/till-UID` default, without `XDG_RUNTIME_DIR`) could put their own socket in it and read
/// what clients send: tokens, or a new key for `till rotate`.
pub fn unfit_dir(owner: u32, mode: u32, uid: u32) -> Option<String> {
    if owner != uid && owner != 0 {
        return Some(format!(
            "it belongs to uid {owner}, not to uid {uid} or root, so that user could put a socket of \
             their own in it"
        ));
    }
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        return Some(format!(
            "anyone may write to it (mode {:o}), so anyone could put a socket of their own in it",
            mode & 0o7777
        ));
    }
    None
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

#[cfg(test)]
mod tests {
    use super::unfit_dir;

    #[test]
    fn a_directory_is_fit_when_it_is_ours_or_roots_and_others_cannot_swap_its_entries() {
        assert_eq!(unfit_dir(1000, 0o40700, 1000), None);
        assert_eq!(unfit_dir(0, 0o40755, 1000), None);
        assert_eq!(
            unfit_dir(1000, 0o40775, 1000),
            None,
            "group-writable: as tmux allows"
        );
        assert_eq!(unfit_dir(0, 0o41777, 1000), None, "sticky, as /tmp");
        let theirs = unfit_dir(1001, 0o40700, 1000).expect("another user's");
        assert!(theirs.contains("uid 1001"), "{theirs}");
        let open = unfit_dir(1000, 0o40777, 1000).expect("world-writable");
        assert!(open.contains("mode 777"), "{open}");
    }
}
