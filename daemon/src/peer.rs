//! Who is on the other end of a connection, read from the socket when it is accepted.

use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, Clone)]
pub struct Peer {
    pub conn: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// `/proc/<pid>/exe`, when readable: a hint for the audit trail, not proof (a pid can be reused).
    pub exe: Option<String>,
}

impl Peer {
    pub fn from_unix(stream: &tokio::net::UnixStream) -> std::io::Result<Peer> {
        let cred = stream.peer_cred()?;
        let pid = cred.pid();
        let exe = pid.and_then(|p| {
            std::fs::read_link(format!("/proc/{p}/exe"))
                .ok()
                .map(|e| e.display().to_string())
        });
        Ok(Peer {
            conn: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
            uid: cred.uid(),
            gid: cred.gid(),
            pid,
            exe,
        })
    }

    /// The daemon itself, for events it raises on its own (start, stop).
    pub fn daemon() -> Peer {
        Peer {
            conn: 0,
            uid: crate::sys::uid(),
            gid: 0,
            pid: Some(std::process::id() as i32),
            exe: None,
        }
    }
}

/// The uid recorded for a gateway peer: TCP carries no credentials, so none is claimed. Tokens bound
/// to a uid cannot be spent through the gateway, and nothing admin is served there.
pub const UNKNOWN_UID: u32 = u32::MAX;

impl Peer {
    pub fn gateway(remote: std::net::SocketAddr) -> Peer {
        Peer {
            conn: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
            uid: UNKNOWN_UID,
            gid: UNKNOWN_UID,
            pid: None,
            exe: Some(format!("gateway client {remote}")),
        }
    }
}
