//! Who is on the other end of a connection, read when it is accepted.
//!
//! On a Unix socket the kernel says (`SO_PEERCRED`). On loopback TCP (the gateway) nothing is
//! carried on the wire, so the daemon looks the connection up in `/proc/net/tcp{,6}`, as identd
//! does: the client's end of a loopback connection is a socket on this host, owned by the client's
//! uid. When that lookup fails the uid is [`UNKNOWN_UID`], which no policy ever grants anything.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// The uid recorded when the peer's uid cannot be known.
pub const UNKNOWN_UID: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The native or MCP Unix socket: the peer got past the socket file's permissions.
    Socket,
    /// Loopback TCP: the gateway, or MCP over the gateway's `/mcp`.
    Tcp,
}

#[derive(Debug, Clone)]
pub struct Peer {
    pub conn: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// `/proc/<pid>/exe`, when readable: a hint for the audit trail, not proof (a pid can be reused).
    pub exe: Option<String>,
    pub transport: Transport,
    /// Supplementary groups, from `/proc/<pid>/status` (for `[[peers]]` rules by group).
    pub groups: Vec<u32>,
    /// The name an MCP client declared in `initialize`: a claim, not proof.
    pub client: Option<String>,
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
            groups: pid.map(groups_of).unwrap_or_default(),
            exe,
            transport: Transport::Socket,
            client: None,
        })
    }

    /// A loopback TCP peer; `local` is our end, `remote` theirs.
    pub fn from_tcp(local: SocketAddr, remote: SocketAddr) -> Peer {
        let uid = tcp_peer_uid(local, remote).unwrap_or(UNKNOWN_UID);
        Peer {
            conn: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
            uid,
            gid: UNKNOWN_UID,
            pid: None,
            exe: Some(format!("tcp {remote}")),
            groups: Vec::new(),
            transport: Transport::Tcp,
            client: None,
        }
    }

    /// The daemon itself, for events it raises on its own (start, stop).
    pub fn daemon() -> Peer {
        Peer {
            conn: 0,
            uid: crate::sys::uid(),
            gid: 0,
            pid: Some(std::process::id() as i32),
            exe: None,
            groups: Vec::new(),
            transport: Transport::Socket,
            client: None,
        }
    }

    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// A process's supplementary groups (`Groups:` in `/proc/<pid>/status`).
fn groups_of(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Finds the uid owning the client end (`remote`) of a loopback TCP connection to `local`.
pub fn tcp_peer_uid(local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    if !remote.ip().is_loopback() {
        return None;
    }
    let file = match remote {
        SocketAddr::V4(_) => "/proc/self/net/tcp",
        SocketAddr::V6(_) => "/proc/self/net/tcp6",
    };
    let table = std::fs::read_to_string(file).ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (l, r, uid) = (f.get(1)?, f.get(2)?, f.get(7)?);
        (parse_proc_addr(l)? == remote && parse_proc_addr(r)? == local)
            .then(|| uid.parse().ok())
            .flatten()
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:port` (IPv6), each 32-bit word in host order.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_le_bytes(),
        )),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses_parse() {
        assert_eq!(
            parse_proc_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().expect("addr"))
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().expect("addr"))
        );
    }

    #[test]
    fn own_loopback_connection_is_ours() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server_side, remote) = listener.accept().expect("accept");
        let local = server_side.local_addr().expect("local");
        assert_eq!(remote, client.local_addr().expect("client addr"));
        assert_eq!(tcp_peer_uid(local, remote), Some(crate::sys::uid()));
    }
}
