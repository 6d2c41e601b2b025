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

pub async fn run(path: &Path, relay_only: bool) -> anyhow::Result<()> {
    if let Err(e) = till_client::refuse_a_squatted_tmp_dir(path) {
        return offline(format!("Till cannot be used safely: {e}")).await;
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(stream) => {
            let path = path.to_owned();
            tokio::task::spawn_blocking(move || {
                if !relay_only && stdio_is_pollable() {
                    match hand_off(&stream) {
                        Ok(()) => return Ok(()),
                        Err(e) => {
                            eprintln!("till mcp: {e}; relaying instead");
                            return relay(std::os::unix::net::UnixStream::connect(&path)?);
                        }
                    }
                }
                relay(stream)
            })
            .await??;
            Ok(())
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

/// Serves the agent host an MCP server whose every tool says `reason`, until it hangs up.
async fn offline(reason: String) -> anyhow::Result<()> {
    eprintln!("till mcp: {reason}");
    let running = Offline::new(reason).serve(rmcp::transport::stdio()).await?;
    running.waiting().await?;
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

/// Sends stdin and stdout to the daemon with the hand-off byte, reads its answer ("ok", or "no:"
/// and why), then waits until the daemon closes the connection, which it does when the session
/// ends. Nothing is read from stdin here, so no byte of the host's is lost either way.
fn hand_off(stream: &std::os::unix::net::UnixStream) -> std::io::Result<()> {
    use std::io::BufRead;
    send_with_fds(
        stream,
        till_client::till_protocol::MCP_HANDOFF,
        &[std::io::stdin().as_fd(), std::io::stdout().as_fd()],
    )?;
    let mut answer = String::new();
    let mut reader = std::io::BufReader::new(stream);
    reader.read_line(&mut answer)?;
    if answer != "ok\n" {
        let why = answer.trim().trim_start_matches("no:").trim();
        return Err(std::io::Error::other(if why.is_empty() {
            "the daemon did not take stdio over".to_string()
        } else {
            format!("the daemon did not take stdio over: {why}")
        }));
    }
    // The session runs in the daemon now. Block until it closes the lifeline; however that
    // ends (an error included: the daemon died), it is not a reason to relay, since the host is
    // mid-session and a relay would start it over.
    let mut sink = [0u8; 64];
    while matches!(std::io::Read::read(&mut reader, &mut sink), Ok(n) if n > 0) {}
    Ok(())
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
