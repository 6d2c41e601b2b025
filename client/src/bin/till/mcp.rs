//! `till mcp`: MCP on stdio for agent hosts, relayed byte for byte to the daemon's `mcp.sock`.
//!
//! The relay holds no rules and no state: the daemon is the MCP server. When the daemon cannot be
//! reached, `till mcp` still answers as an MCP server (so the host shows a reason instead of a dead
//! server), with the same five tools, each returning an error that says how to start `tilld`.

use std::path::{Path, PathBuf};

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ErrorData as McpError, ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use tokio::net::UnixStream;

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
    match UnixStream::connect(path).await {
        Ok(stream) => relay(stream).await,
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

async fn relay(stream: UnixStream) -> anyhow::Result<()> {
    let (mut from_daemon, mut to_daemon) = stream.into_split();
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let up = async {
        tokio::io::copy(&mut stdin, &mut to_daemon).await?;
        // The host closed stdin: tell the daemon, which then ends the session and closes.
        use tokio::io::AsyncWriteExt;
        to_daemon.shutdown().await
    };
    let down = async {
        tokio::io::copy(&mut from_daemon, &mut stdout).await?;
        use tokio::io::AsyncWriteExt;
        stdout.flush().await
    };
    tokio::select! {
        r = down => r?,
        r = async { up.await?; std::future::pending::<std::io::Result<()>>().await } => r?,
    }
    Ok(())
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
