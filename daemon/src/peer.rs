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
///
/// Read as bytes: the file's `Name:` line is the executable's name cut to 15 bytes, which can end
/// inside a multi-byte character (`abcdefghijklmné`), and a read into a `String` then fails,
/// which lost every group, and with them the `[[peers]]` rules by group.
fn groups_of(pid: i32) -> Vec<u32> {
    let Ok(status) = std::fs::read(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"Groups:"))
        .map(|g| {
            String::from_utf8_lossy(g)
                .split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Finds the uid owning the client end (`remote`) of a loopback TCP connection to `local`: asks
/// the kernel for that one socket (`sock_diag`, as `ss` does: about 6 µs), else reads
/// `/proc/net/tcp` as identd does. To write that table the kernel walks its whole connection
/// hash, which took 4–17 ms a reading on the VM Till is developed on, in the gateway's accept
/// loop: a client opening a connection per request got 170 requests/s.
pub fn tcp_peer_uid(local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    if !remote.ip().is_loopback() {
        return None;
    }
    match diag_uid(remote, local) {
        Ok(uid) => uid,
        Err(e) => {
            tracing::debug!(error = %e, "sock_diag failed; reading /proc/net/tcp");
            proc_uid(local, remote)
        }
    }
}

/// `sock_diag`'s answer for the TCP socket whose own address is `src` and whose peer's is `dst`:
/// its uid, `None` when there is no such socket.
fn diag_uid(src: SocketAddr, dst: SocketAddr) -> std::io::Result<Option<u32>> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const REQUEST_LEN: usize = 16 + 56;
    let family = match src {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    let addr = |a: SocketAddr| -> [u8; 16] {
        let mut out = [0u8; 16];
        match a.ip() {
            IpAddr::V4(ip) => out[..4].copy_from_slice(&ip.octets()),
            IpAddr::V6(ip) => out.copy_from_slice(&ip.octets()),
        }
        out
    };
    // nlmsghdr, then inet_diag_req_v2 (linux/inet_diag.h): family, protocol, ext, pad, states,
    // then the socket's id: ports and addresses in network order, interface, cookie (none).
    let mut req = Vec::with_capacity(REQUEST_LEN);
    req.extend_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req.extend_from_slice(&[0; 8]);
    req.extend_from_slice(&[family as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    req.extend_from_slice(&src.port().to_be_bytes());
    req.extend_from_slice(&dst.port().to_be_bytes());
    req.extend_from_slice(&addr(src));
    req.extend_from_slice(&addr(dst));
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]);
    let mut reply = [0u8; 512];
    let n = crate::sys::sock_diag(&req, &mut reply)?;
    let reply = &reply[..n];
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(reply.get(at..at + 4)?.try_into().ok()?))
    };
    let kind = reply
        .get(4..6)
        .map(|b| u16::from_ne_bytes([b[0], b[1]]))
        .ok_or_else(|| std::io::Error::other("a short sock_diag answer"))?;
    if kind == SOCK_DIAG_BY_FAMILY {
        // inet_diag_msg after the 16-byte header: 4 bytes, the 48-byte id, expires, rqueue,
        // wqueue, then uid.
        return u32_at(16 + 4 + 48 + 12)
            .map(Some)
            .ok_or_else(|| std::io::Error::other("a short sock_diag answer"));
    }
    if kind == libc::NLMSG_ERROR as u16 {
        // nlmsgerr: a negative errno. ENOENT: no such socket (gone already).
        let errno = u32_at(16).map_or(0, |e| (e as i32).wrapping_neg());
        if errno == libc::ENOENT {
            return Ok(None);
        }
        return Err(std::io::Error::from_raw_os_error(errno));
    }
    Err(std::io::Error::other("an unexpected sock_diag answer"))
}

/// The same from `/proc/net/tcp{,6}`, where `sock_diag` is not allowed (some sandboxes).
fn proc_uid(local: SocketAddr, remote: SocketAddr) -> Option<u32> {
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

    /// Both lookups find the owner of a loopback connection's client end: this process.
    #[test]
    fn own_loopback_connection_is_ours() {
        for host in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = std::net::TcpListener::bind(host) else {
                continue; // no IPv6 loopback on this host
            };
            let client = std::net::TcpStream::connect(listener.local_addr().expect("addr"))
                .expect("connect");
            let (server_side, remote) = listener.accept().expect("accept");
            let local = server_side.local_addr().expect("local");
            assert_eq!(remote, client.local_addr().expect("client addr"));
            let uid = crate::sys::uid();
            assert_eq!(
                diag_uid(remote, local).expect("sock_diag"),
                Some(uid),
                "{host}"
            );
            assert_eq!(proc_uid(local, remote), Some(uid), "{host}");
            assert_eq!(tcp_peer_uid(local, remote), Some(uid), "{host}");
            // A connection that is gone is no one's.
            drop((client, server_side));
            let unused: SocketAddr = match remote {
                SocketAddr::V4(_) => "127.0.0.1:9".parse().expect("addr"),
                SocketAddr::V6(_) => "[::1]:9".parse().expect("addr"),
            };
            assert_eq!(diag_uid(unused, local).expect("sock_diag"), None);
        }
    }
}
