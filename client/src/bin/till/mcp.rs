//! `till mcp`: MCP on stdio for agent hosts, served by the daemon on `mcp.sock`.
//!
//! When stdin and stdout are pipes or sockets (as every agent host gives them), `till mcp` hands
//! them to the daemon (`SCM_RIGHTS`) and then only waits: the daemon reads and answers the host
//! directly, with no process in between to wake for every message. Otherwise (a terminal, or
//! `--relay`), it copies bytes both ways. Either way it holds no rules and no state. When the daemon cannot be
//! reached, `till mcp` still answers as an MCP server (so the host shows a reason instead of a dead
//! server), with the same five tools, each returning an error that says how to start `tilld`.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ErrorData as McpError, ServerHandler, ServiceExt, tool, tool_handler, tool_router};

/// `--mcp-socket`, else `$TILL_MCP_SOCKET`, else `mcp.sock` beside the native socket.
pub fn mcp_socket_path(explicit: Option<&Path>, native: &Path) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_owned();
    }
    if let Some(p) = std::env::var_os("TILL_MCP_SOCKET").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    till_client::till_protocol::paths::mcp_socket_beside(native)
}

pub async fn run(path: &Path, relay_only: bool, wait: Duration) -> anyhow::Result<()> {
    if let Err(e) = till_client::refuse_a_squatted_tmp_dir(path) {
        return offline(format!("Till cannot be used safely: {e}")).await;
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(stream) => {
            let path = path.to_owned();
            let after = tokio::task::spawn_blocking(move || {
                if relay_only || !stdio_is_pollable() {
                    return relay(stream).map(|()| After::Done);
                }
                handed(stream, &path, wait)
            })
            .await??;
            match after {
                After::Done => Ok(()),
                After::Offline { reason, pending } => offline_resumed(reason, pending).await,
            }
        }
        Err(e) => {
            let reason = format!(
                "Till's daemon is not running: nothing answers on {} ({e}). Ask your user to start it \
                 (for example `OPENAI_API_KEY=sk-... tilld`, or `systemctl --user start tilld`), \
                 then try again.",
                path.display()
            );
            offline(reason).await
        }
    }
}

/// What is left to do once the daemon no longer serves the host.
enum After {
    Done,
    /// The daemon stopped mid-session and none took the session back: answer the host with the
    /// reason, `pending` (input the daemon read and did not serve) first.
    Offline {
        reason: String,
        pending: Vec<u8>,
    },
}

/// Hands stdio to the daemon, and again to the next daemon each time one stops with the session
/// open (a restart, an upgrade), until the session ends.
fn handed(
    stream: std::os::unix::net::UnixStream,
    path: &Path,
    wait: Duration,
) -> std::io::Result<After> {
    let mut stream = stream;
    let mut client = None;
    let mut resume: Option<Vec<u8>> = None;
    let mut deadline = None;
    loop {
        let pending = match hand_off(&stream, resume.as_deref(), &mut client) {
            Ok(Handed::Ended) => return Ok(After::Done),
            Ok(Handed::Lost {
                pending,
                unanswered,
            }) => {
                deadline = None;
                if !unanswered.is_empty() {
                    answer_unanswered(&unanswered);
                }
                pending
            }
            Err(e) if resume.is_none() => {
                eprintln!("till mcp: {e}; relaying instead");
                return relay(std::os::unix::net::UnixStream::connect(path)?).map(|()| After::Done);
            }
            Err(HandOffError::Refused(why)) => {
                let reason = format!(
                    "Till's daemon restarted but did not take this session back ({why}). Ask \
                     your user to reconnect Till's MCP server."
                );
                return Ok(After::Offline {
                    reason,
                    pending: resume.unwrap_or_default(),
                });
            }
            // The connection broke before the daemon answered: it was a daemon on its way
            // out (its listener outlives its other sockets by a moment), so wait on.
            Err(HandOffError::Broken(_)) => resume.take().unwrap_or_default(),
        };
        if host_left() {
            return Ok(After::Done);
        }
        // One wait per stop: a daemon that accepts and then dies does not extend it.
        let until = *deadline.get_or_insert_with(|| {
            eprintln!(
                "till mcp: the daemon stopped with this session open; waiting up to {} for it \
                 to come back on {}",
                humantime::format_duration(wait),
                path.display()
            );
            std::time::Instant::now() + wait
        });
        match wait_for_daemon(path, until) {
            Some(s) => {
                stream = s;
                resume = Some(pending);
            }
            None => {
                let reason = format!(
                    "Till's daemon stopped during this session and has not come back (nothing \
                     answers on {}). Ask your user to start it (for example `systemctl --user \
                     start tilld`), then to reconnect Till's MCP server.",
                    path.display()
                );
                return Ok(After::Offline { reason, pending });
            }
        }
    }
}

/// Tries the daemon's socket twice a second until `until` or the host has left.
fn wait_for_daemon(
    path: &Path,
    until: std::time::Instant,
) -> Option<std::os::unix::net::UnixStream> {
    loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(path) {
            return Some(s);
        }
        let now = std::time::Instant::now();
        if now >= until || host_left() {
            return None;
        }
        // Polling, as `tail -F` does: there is nothing to wait on for a socket that is not there.
        std::thread::sleep(Duration::from_millis(500).min(until - now));
    }
}

/// Whether the host has closed its end of stdin with nothing left in it: hung up (a pipe's
/// `POLLHUP`, a socket's `POLLRDHUP`; Node gives its children sockets) and no byte unread.
#[allow(unsafe_code)]
fn host_left() -> bool {
    let mut fd = libc::pollfd {
        fd: 0,
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    let mut unread: libc::c_int = 0;
    // SAFETY: one valid pollfd and a zero timeout; FIONREAD writes one int to a live local.
    unsafe {
        libc::poll(&mut fd, 1, 0) == 1
            && fd.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0
            && libc::ioctl(0, libc::FIONREAD, &mut unread) == 0
            && unread == 0
    }
}

/// Serves the agent host an MCP server whose every tool says `reason`, until it hangs up.
async fn offline(reason: String) -> anyhow::Result<()> {
    eprintln!("till mcp: {reason}");
    let running = Offline::new(reason).serve(rmcp::transport::stdio()).await?;
    running.waiting().await?;
    Ok(())
}

/// As [`offline`], for a session the host already initialized with a daemon that is gone.
async fn offline_resumed(reason: String, pending: Vec<u8>) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    eprintln!("till mcp: {reason}");
    // The daemon made the host's pipes non-blocking; tokio's stdio reads them with blocking calls.
    set_blocking(std::io::stdin().as_fd())?;
    set_blocking(std::io::stdout().as_fd())?;
    let input = std::io::Cursor::new(pending).chain(tokio::io::stdin());
    let running =
        rmcp::service::serve_directly(Offline::new(reason), (input, tokio::io::stdout()), None);
    running.waiting().await?;
    Ok(())
}

#[allow(unsafe_code)]
fn set_blocking(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor borrowed for the call, with integer arguments only.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether stdin and stdout are pipes or sockets, the kinds the daemon can serve directly.
fn stdio_is_pollable() -> bool {
    use std::os::unix::fs::FileTypeExt;
    let pollable = |fd: std::os::fd::BorrowedFd<'_>| {
        fd.try_clone_to_owned()
            .map(std::fs::File::from)
            .and_then(|f| f.metadata())
            .map(|m| m.file_type().is_fifo() || m.file_type().is_socket())
            .unwrap_or(false)
    };
    pollable(std::io::stdin().as_fd()) && pollable(std::io::stdout().as_fd())
}

/// Why a hand-off did not happen.
#[derive(Debug, thiserror::Error)]
enum HandOffError {
    /// The daemon answered no, and why.
    #[error("{0}")]
    Refused(String),
    /// The connection failed before the daemon answered.
    #[error("the daemon's socket failed ({0})")]
    Broken(#[from] std::io::Error),
}

/// How a hand-off ended.
enum Handed {
    /// The session is over (the daemon said so): exit.
    Ended,
    /// The daemon stopped with the session open; `pending` is the host's input it read and did
    /// not serve (nothing when it was killed). `unanswered`: the requests it was serving when it
    /// was killed (a daemon that stops cleanly answers them first).
    Lost {
        pending: Vec<u8>,
        unanswered: Vec<till_client::till_protocol::OpenRequest>,
    },
}

/// Answers the requests a killed daemon had taken, so the host is not left waiting on them: a
/// tool call with a tool error (what an agent reads), anything else with a JSON-RPC error.
fn answer_unanswered(requests: &[till_client::till_protocol::OpenRequest]) {
    use std::io::Write;
    const WHY: &str = "Till's daemon stopped while serving this request (it was killed or \
        crashed), so it was not answered. A call may have reached the upstream and spent its \
        activation: check with token_status before trying again. Till's MCP server reconnects to \
        the daemon by itself.";
    let mut out = Vec::new();
    for r in requests {
        let answer = if r.method == "tools/call" {
            serde_json::json!({"jsonrpc": "2.0", "id": r.id, "result": {
                "content": [{"type": "text", "text": WHY}], "isError": true}})
        } else {
            serde_json::json!({"jsonrpc": "2.0", "id": r.id,
                "error": {"code": -32603, "message": WHY}})
        };
        out.extend_from_slice(answer.to_string().as_bytes());
        out.push(b'\n');
    }
    eprintln!(
        "till mcp: the daemon stopped with {} request(s) of the host's open; answering them",
        requests.len()
    );
    // The daemon made the host's pipes non-blocking; the next one sets them so again.
    let stdout = std::io::stdout();
    let written = set_blocking(stdout.as_fd()).and_then(|()| {
        let mut w = stdout.lock();
        w.write_all(&out)?;
        w.flush()
    });
    if let Err(e) = written {
        eprintln!("till mcp: could not answer them ({e})");
    }
}

/// Sends stdin and stdout to the daemon with the hand-off byte (or, with `resume`, the resume byte,
/// the host's `initialize` parameters and the pending input), reads its answer ("ok", or "no:"
/// and why), then follows the session's notices on the lifeline until it ends. Nothing is read
/// from stdin here, so no byte of the host's is lost either way.
fn hand_off(
    stream: &std::os::unix::net::UnixStream,
    resume: Option<&[u8]>,
    client: &mut Option<serde_json::Value>,
) -> Result<Handed, HandOffError> {
    use std::io::{BufRead, Read, Write};
    use till_client::till_protocol::{
        MCP_HANDOFF, MCP_MAX_LINE_BYTES, MCP_NOTICE_MAX_BYTES, MCP_RESUME, McpNotice, McpResume,
    };
    let (stdin, stdout) = (std::io::stdin(), std::io::stdout());
    let stdio = [stdin.as_fd(), stdout.as_fd()];
    match resume {
        None => send_with_fds(stream, MCP_HANDOFF, &stdio)?,
        Some(pending) => {
            send_with_fds(stream, MCP_RESUME, &stdio)?;
            let header = McpResume {
                client: client.clone(),
                pending: pending.len(),
            };
            let mut bytes = serde_json::to_vec(&header).map_err(std::io::Error::from)?;
            bytes.push(b'\n');
            bytes.extend_from_slice(pending);
            (&*stream).write_all(&bytes)?;
        }
    }
    let mut answer = String::new();
    let mut reader = std::io::BufReader::new(stream);
    reader.read_line(&mut answer)?;
    if answer.is_empty() {
        return Err(HandOffError::Broken(
            std::io::ErrorKind::UnexpectedEof.into(),
        ));
    }
    if answer != "ok\n" {
        let why = answer.trim().trim_start_matches("no:").trim();
        return Err(HandOffError::Refused(if why.is_empty() {
            "the daemon did not take stdio over".to_string()
        } else {
            format!("the daemon did not take stdio over: {why}")
        }));
    }
    // The session runs in the daemon now. Follow what it says about it; however the lifeline
    // breaks without a word (the daemon was killed), the session can go on with the next one.
    let mut open = Vec::new();
    loop {
        let mut line = Vec::new();
        match (&mut reader)
            .take(MCP_NOTICE_MAX_BYTES as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => {
                return Ok(Handed::Lost {
                    pending: Vec::new(),
                    unanswered: open,
                });
            }
            Ok(_) => {}
        }
        match serde_json::from_slice::<McpNotice>(&line) {
            Ok(McpNotice::Client { params }) => *client = Some(params),
            Ok(McpNotice::Open { requests }) => open = requests,
            Ok(McpNotice::End) => return Ok(Handed::Ended),
            Ok(McpNotice::Resume { pending }) if pending <= MCP_MAX_LINE_BYTES => {
                let mut bytes = vec![0u8; pending];
                if reader.read_exact(&mut bytes).is_err() {
                    // Cut short: the rest went with the daemon; the next one gets what is left.
                    bytes.clear();
                }
                // Every request it took was answered before this.
                return Ok(Handed::Lost {
                    pending: bytes,
                    unanswered: Vec::new(),
                });
            }
            // A notice from a newer daemon, or one this cannot hold: the session goes on.
            _ => {}
        }
    }
}

/// One byte with `fds` attached (`SCM_RIGHTS`); the daemon gets its own copies of them.
#[allow(unsafe_code)]
fn send_with_fds(
    stream: &std::os::unix::net::UnixStream,
    byte: u8,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let payload = fds.len() * std::mem::size_of::<libc::c_int>();
    // u64 storage keeps the control buffer aligned for `cmsghdr`.
    let mut control = [0u64; 8];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    if space > std::mem::size_of_val(&control) {
        return Err(std::io::Error::other("too many descriptors to send"));
    }
    let mut data = [byte];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: an all-zero msghdr is a valid empty message header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer is aligned and at least CMSG_SPACE(payload) long, so the first
    // header and its data (CMSG_LEN(payload)) fit in it; `msg` points only at live locals, and
    // the descriptors are borrowed, valid for the call.
    let n = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
        let out = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
        for (i, fd) in fds.iter().enumerate() {
            std::ptr::write_unaligned(out.add(i), fd.as_raw_fd());
        }
        libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if n != 1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn relay(stream: std::os::unix::net::UnixStream) -> std::io::Result<()> {
    let mut to_daemon = stream.try_clone()?;
    let mut from_daemon = stream;
    std::thread::spawn(move || {
        let _ = pump(&mut std::io::stdin().lock(), &mut to_daemon);
        // The host closed stdin: tell the daemon, which then ends the session and closes.
        let _ = to_daemon.shutdown(std::net::Shutdown::Write);
    });
    pump(&mut from_daemon, &mut std::io::stdout().lock())
}

/// Copies until end of input, passing each read on at once (a JSON-RPC message must not wait in
/// a buffer for the next one).
fn pump(from: &mut impl std::io::Read, to: &mut impl std::io::Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
    }
}

/// The stand-in server when the daemon is down: every tool answers with the reason.
#[derive(Clone)]
struct Offline {
    reason: String,
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl Offline {
    fn new(reason: String) -> Self {
        Offline {
            reason,
            tool_router: Self::tool_router(),
        }
    }

    fn refuse(&self) -> Result<CallToolResult, McpError> {
        Ok(CallToolResult::error(vec![ContentBlock::text(
            self.reason.clone(),
        )]))
    }

    #[tool(
        description = "List the services you may call through Till (unavailable: tilld is not running)."
    )]
    async fn list_services(&self) -> Result<CallToolResult, McpError> {
        self.refuse()
    }

    #[tool(description = "Ask Till for a capability token (unavailable: tilld is not running).")]
    async fn request_token(&self) -> Result<CallToolResult, McpError> {
        self.refuse()
    }

    #[tool(description = "Make one HTTP request through Till (unavailable: tilld is not running).")]
    async fn call_api(&self) -> Result<CallToolResult, McpError> {
        self.refuse()
    }

    #[tool(description = "A token's state (unavailable: tilld is not running).")]
    async fn token_status(&self) -> Result<CallToolResult, McpError> {
        self.refuse()
    }

    #[tool(description = "Revoke a token (unavailable: tilld is not running).")]
    async fn revoke_token(&self) -> Result<CallToolResult, McpError> {
        self.refuse()
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Offline {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("till", env!("CARGO_PKG_VERSION")))
            .with_instructions(self.reason.clone())
    }
}
