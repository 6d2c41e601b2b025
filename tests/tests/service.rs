//! Running as a service: socket activation (`LISTEN_FDS`), readiness, and peers of other uids
//! (a peer outside the socket's group, a non-admin, `[[peers]]` limits). Needs root, to hand the
//! sockets to a group and to run clients as other uids.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use till_tests::{TestDaemon, Upstream, bin, standard_config};

const AGENTS_GID: u32 = 43210;
const AGENT_UID: u32 = 43211;
const OUTSIDER_UID: u32 = 43212;

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// Binds a socket as systemd's `tilld.socket` would: mode 0660, group `AGENTS_GID`; returns it
/// with its fd duplicated high and inheritable (the fd the daemon will get).
fn activated_socket(path: &std::path::Path) -> (std::os::unix::net::UnixListener, i32) {
    let (l, fd) = till_tests::activation_socket(path);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).expect("chmod");
    std::os::unix::fs::chown(path, Some(0), Some(AGENTS_GID)).expect("chown");
    (l, fd)
}

fn till_as(uid: u32, gid: u32, groups: &[u32], socket: &std::path::Path, args: &[&str]) -> Output {
    run_as(&bin("till"), uid, gid, groups, Some(socket), args)
}

/// `till` (or a copy of it at `exe`) as another uid, with that gid and supplementary groups;
/// without `socket`, it finds the socket itself (no `--socket`, no `TILL_SOCKET`).
fn run_as(
    exe: &std::path::Path,
    uid: u32,
    gid: u32,
    groups: &[u32],
    socket: Option<&std::path::Path>,
    args: &[&str],
) -> Output {
    let mut cmd = Command::new(exe);
    if let Some(socket) = socket {
        cmd.arg("--socket").arg(socket);
    }
    cmd.args(args)
        .env_remove("TILL_TOKEN")
        .env_remove("TILL_SOCKET");
    as_user(&mut cmd, uid, gid, groups);
    cmd.output().expect("run till as another uid")
}

/// Makes `cmd` run as `uid`, with `gid` and the supplementary `groups`.
fn as_user(cmd: &mut Command, uid: u32, gid: u32, groups: &[u32]) {
    let groups = groups.to_vec();
    #[allow(unsafe_code)]
    // SAFETY: between fork and exec, only async-signal-safe calls that allocate nothing: groups,
    // then gid, then uid (std's own uid/gid would run before this and drop the right to setgroups).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_group_access_admin_and_peer_limits() {
    if !is_root() {
        eprintln!("skipped: needs root to hand sockets to a group and run clients as other uids");
        return;
    }
    let up = Upstream::start(None).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let mut text = standard_config(dir, &up.url(), "admin_uids = [0]");
    text.push_str(&format!(
        "\n[[peers]]\ngid = {AGENTS_GID}\nservices = [\"echo\"]\n"
    ));
    std::fs::write(dir.join("till.toml"), text).expect("config");
    let (_keep1, fd1) = activated_socket(&dir.join("till.sock"));
    let (_keep2, fd2) = activated_socket(&dir.join("mcp.sock"));

    let d = TestDaemon::start_activated(dir, &[fd1, fd2]);
    // READY=1 came after the listeners work: a client is served at once, on systemd's socket.
    let status = d
        .client()
        .await
        .status()
        .await
        .expect("served on the handed-over socket");
    assert_eq!(status.socket, dir.join("till.sock").display().to_string());
    let mode = std::fs::metadata(dir.join("till.sock"))
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "the unit's mode is kept, not replaced");

    // A peer outside the socket's group cannot connect at all.
    let out = till_as(OUTSIDER_UID, OUTSIDER_UID, &[], &d.socket, &["status"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));

    // An agent in the group: served, but not an admin, and limited by [[peers]].
    let agent = |args: &[&str]| till_as(AGENT_UID, AGENT_UID, &[AGENTS_GID], &d.socket, args);
    assert!(agent(&["status"]).status.success());
    let out = agent(&["revoke", "--all"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = agent(&["audit"]);
    assert_eq!(out.status.code(), Some(1));
    let out = agent(&["mint", "other", "--allow", "GET /x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("[[peers]]"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = agent(&["mint", "echo", "--allow", "GET /x"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same agent through a client whose process name, cut to 15 bytes by the kernel, ends
    // inside a character (`/proc/PID/status` is then not UTF-8): still in its group.
    let odd = dir.join("till-agent-abcé");
    std::fs::copy(bin("till"), &odd).expect("copy till");
    std::fs::set_permissions(&odd, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = run_as(
        &odd,
        AGENT_UID,
        AGENT_UID,
        &[AGENTS_GID],
        Some(&d.socket),
        &["mint", "echo", "--allow", "GET /x"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = agent(&["mint", "echo", "--allow", "GET /x"]);
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let out = agent(&["call", "echo", "GET", "/x", "--token", &token]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let audit = d.audit_text();
    assert!(
        audit.contains(&format!("\"uid\":{AGENT_UID}")),
        "the trail names the agent's uid"
    );

    // The root admin may do what the agent may not.
    assert!(
        d.till(&["mint", "other", "--allow", "GET /x"])
            .status
            .success()
    );
    assert!(d.till(&["audit"]).status.success());
}

/// A member of the agents' group reaches the system service with no `--socket` and no
/// `TILL_SOCKET`: nothing is at its own default socket (under `XDG_RUNTIME_DIR`), and `till`
/// then uses `/run/till/till.sock`, as the docker CLI finds the system daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_finds_the_system_service_without_being_told() {
    if !is_root() {
        eprintln!("skipped: needs root to create /run/till and run a client as another uid");
        return;
    }
    let run_till = std::path::Path::new("/run/till");
    if run_till.exists() {
        eprintln!("skipped: /run/till exists (a Till system service on this machine)");
        return;
    }
    /// Removes `/run/till` however the test ends.
    struct Cleanup;
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all("/run/till");
        }
    }
    std::fs::create_dir(run_till).expect("create /run/till");
    let _cleanup = Cleanup;
    std::fs::set_permissions(run_till, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    let up = Upstream::start(None).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let text = standard_config(dir, &up.url(), "admin_uids = [0]").replace(
        &format!("socket = \"{}/till.sock\"", dir.display()),
        "socket = \"/run/till/till.sock\"",
    );
    assert!(text.contains("socket = \"/run/till/till.sock\""));
    std::fs::write(dir.join("till.toml"), text).expect("config");
    let (_keep1, fd1) = activated_socket(&run_till.join("till.sock"));
    let (_keep2, fd2) = activated_socket(&run_till.join("mcp.sock"));
    let d = TestDaemon::start_activated(dir, &[fd1, fd2]);

    let runtime = tempfile::tempdir().expect("runtime dir");
    let mut cmd = Command::new(bin("till"));
    cmd.args(["status", "--json"])
        .env_remove("TILL_SOCKET")
        .env("XDG_RUNTIME_DIR", runtime.path());
    as_user(&mut cmd, AGENT_UID, AGENT_UID, &[AGENTS_GID]);
    let out = cmd.output().expect("till status as the agent");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(v["socket"], "/run/till/till.sock");
    drop(d);
}

/// Without `XDG_RUNTIME_DIR`, the default socket is `/tmp/till-UID/till.sock`, a directory any
/// local user may make first, with a listener of their own in it to read what `till` sends
/// (tokens, a new key for `till rotate`). `till` does not connect through a directory that is
/// another user's or that anyone may write to.
#[test]
fn till_does_not_connect_through_a_squatted_tmp_directory() {
    if !is_root() {
        eprintln!("skipped: needs root to make a directory as another user and run till as one");
        return;
    }
    let dir = std::path::PathBuf::from(format!("/tmp/till-{AGENT_UID}"));
    /// Removes the directory however the test ends.
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).expect("mkdir");
    let _cleanup = Cleanup(dir.clone());
    // The squatter's listeners, where the agent's `till` and `till mcp` would connect: each
    // counts the connections it gets and hangs up (it could as well read what comes).
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for name in ["till.sock", "mcp.sock"] {
        let listener =
            std::os::unix::net::UnixListener::bind(dir.join(name)).expect("squatter's socket");
        std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o777))
            .expect("chmod socket");
        let connections = connections.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(conn);
            }
        });
    }
    let agent = |args: &[&str]| {
        let mut cmd = Command::new(bin("till"));
        cmd.args(args)
            .env_remove("TILL_SOCKET")
            .env_remove("TILL_MCP_SOCKET")
            .env_remove("XDG_RUNTIME_DIR")
            .stdin(std::process::Stdio::null());
        as_user(&mut cmd, AGENT_UID, AGENT_UID, &[]);
        cmd.output().expect("till as the agent")
    };
    for (owner, mode, why) in [
        (OUTSIDER_UID, 0o755, "belongs to uid"),
        (AGENT_UID, 0o777, "anyone may write to it"),
    ] {
        std::os::unix::fs::chown(&dir, Some(owner), None).expect("chown");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let out = agent(&["status"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{stderr}");
        assert!(
            stderr.contains("not connecting") && stderr.contains(why),
            "{stderr}"
        );
        // `till mcp` tells the agent host instead (its tools say why), and ends when the host
        // hangs up: here at once, stdin being empty.
        let out = agent(&["mcp"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("not connecting") && stderr.contains(why),
            "{stderr}"
        );
    }
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "till connected to the squatter's socket"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_then_watchdog_pings_when_systemd_asks_for_them() {
    let up = Upstream::start(None).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        tmp.path().join("till.toml"),
        standard_config(tmp.path(), &up.url(), ""),
    )
    .expect("config");
    let notify_path = tmp.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("bind");
    notify
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    let mut child = Command::new(bin("tilld"))
        .arg("--config")
        .arg(tmp.path().join("till.toml"))
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut seen = Vec::new();
    let mut buf = [0u8; 128];
    while !seen.iter().any(|m: &String| m.contains("WATCHDOG=1")) {
        let n = notify.recv(&mut buf).expect("a notification within 30 s");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.contains("READY=1") {
            // Ready means served: the socket answers now.
            till_tests::Client::connect(&tmp.path().join("till.sock"))
                .await
                .expect("served at READY");
        }
        seen.push(msg);
    }
    let _ = child.kill();
    let _ = child.wait();
    let ready = seen
        .iter()
        .position(|m| m.contains("READY=1"))
        .expect("READY=1 was sent");
    let ping = seen
        .iter()
        .position(|m| m.contains("WATCHDOG=1"))
        .expect("pinged");
    assert!(ready < ping, "READY=1 comes first: {seen:?}");
}

/// journald, log files and pipes get plain text: no terminal colour codes in what tilld logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_plain_text_when_stderr_is_not_a_terminal() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    d.wait_log("tilld ready").await;
    let log = d.log_text();
    assert!(log.contains(" INFO "), "{log}");
    assert!(!log.contains('\u{1b}'), "{log:?}");
}
