//! The only module with `unsafe`: thin calls into libc for process hardening, identity and passing
//! descriptors.
#![allow(unsafe_code)]

use std::io;

/// Makes the process non-dumpable (no core files, no ptrace attach by same-uid processes, no
/// `/proc/<pid>/mem` reads) and sets the core-file limit to zero. Both protect the master keys.
pub fn harden() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) takes integer arguments only and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `zero` is a valid, initialised rlimit that outlives the call.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit (as Go's runtime does for every program):
/// each connection is a descriptor, and the usual soft limit of 1024 is a default from another
/// era, while the hard limit is what the administrator allows. Returns the limit now in force.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit to fill, and outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid, initialised rlimit that outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok(lim.rlim_cur)
}

/// Whether the process is currently dumpable (for the hardening test).
pub fn is_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no pointer arguments.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) == 1 }
}

pub fn uid() -> u32 {
    // SAFETY: getuid cannot fail and touches no memory.
    unsafe { libc::getuid() }
}

/// Runs `f` with the process umask set to `mask`, then restores it. Used around `bind` so the socket
/// file is never, even for an instant, more open than 0600. Called at startup before any other task
/// creates files, so the process-wide umask change races with nothing.
pub fn with_umask<T>(mask: u32, f: impl FnOnce() -> T) -> T {
    // SAFETY: umask only swaps an integer in the process's file-creation state.
    let old = unsafe { libc::umask(mask as libc::mode_t) };
    let out = f();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    out
}

/// Sockets handed over by systemd's socket activation (`LISTEN_PID`, `LISTEN_FDS` from fd 3 on).
/// Empty when the variables are absent or meant for another process. Call once, at startup, before
/// any thread exists (it clears the variables so children do not inherit them).
pub fn take_listen_fds() -> io::Result<Vec<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd;
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let n: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    // SAFETY: called before the runtime or any other thread starts, so nothing reads the
    // environment concurrently.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if !for_us || n <= 0 {
        return Ok(Vec::new());
    }
    let mut fds = Vec::new();
    for fd in 3..3 + n {
        // SAFETY: systemd passes fds 3..3+LISTEN_FDS open and owned by this process; nothing else
        // in the process has taken them (this runs first), so each becomes owned exactly once.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: fcntl on an fd we own, with integer arguments.
        let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        fds.push(owned);
    }
    Ok(fds)
}

/// Receives up to `buf.len()` bytes and the file descriptors sent with them (`SCM_RIGHTS`), without
/// blocking (`WouldBlock` when nothing is there yet). The descriptors arrive close-on-exec and owned,
/// so any the caller does not keep are closed. More descriptors than fit is an error (the kernel
/// has already dropped the extra ones).
pub fn recv_with_fds(
    sock: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<std::os::fd::OwnedFd>)> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // u64 storage keeps the control buffer aligned for `cmsghdr`; 128 bytes hold 28 descriptors.
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `iov` (over `buf`) and `control`, all live and writable for the call.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, within
    // `msg.msg_controllen`; each SCM_RIGHTS payload is an array of descriptors the kernel just
    // installed in this process, owned by nobody else yet, so each becomes an OwnedFd exactly once.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other(
            "more file descriptors were sent than the protocol allows",
        ));
    }
    Ok((n as usize, fds))
}

/// One request and its answer on a `NETLINK_SOCK_DIAG` socket (the kernel's socket lookup, as
/// `ss` uses it): sends `request`, a whole netlink message, and returns the length of the answer
/// written into `reply`.
pub fn sock_diag(request: &[u8], reply: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket() takes integers; the descriptor it returns is owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor, owned once.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // The kernel answers a lookup at once; a second is plenty, and the gateway's accept loop
    // must never hang on it.
    let limit = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: a timeval of the size given, for the socket just made.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const limit).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    // SAFETY: `request` is valid for its length; send() only reads it.
    let sent = unsafe { libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `reply` is valid for writes of its length; recv() writes at most that.
    let got = unsafe { libc::recv(fd.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(got as usize)
}
