//! `till mcp`: MCP on stdio for agent hosts, relayed byte for byte to the daemon's `mcp.sock`.
//!
//! The relay holds no rules and no state: the daemon is the MCP server. When the daemon cannot be
//! reached, `till mcp` still answers as an MCP server (so the host shows a reason instead of a dead
//! server), with the same five tools, each returning an error that says how to start `tilld`.

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

pub async fn run(path: &Path) -> anyhow::Result<()> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(stream) => {
            // Plain blocking copies on two threads: each direction is woken by the kernel
            // directly, with no event loop in between (this relay sits on every tool call).
            tokio::task::spawn_blocking(move || relay(stream)).await??;
            Ok(())
        }
        Err(e) => {
            let reason = format!(
                "Till's daemon is not running: nothing answers on {} ({e}). Ask your user to start it \
                 (for example `OPENAI_API_KEY=sk-... tilld`, or `systemctl --user start tilld`), \
                 then try again.",
                path.display()
            );
            eprintln!("till mcp: {reason}");
            let running = Offline::new(reason).serve(rmcp::transport::stdio()).await?;
            running.waiting().await?;
            Ok(())
        }
    }
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
