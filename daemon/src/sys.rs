//! The only module with `unsafe`: thin calls into libc for process hardening and identity.
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
