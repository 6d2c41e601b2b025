//! MCP: agents list services, ask for tokens, spend them, check and revoke them, as tools.
//!
//! Served with rmcp on `mcp.sock` (a Unix socket with the same permission rules as the native one;
//! agent hosts launch `till mcp`, which relays stdio to it) and as streamable HTTP at the gateway's
//! `/mcp`. Each tool is a thin adapter over the same handlers as the socket protocol. A refusal is a
//! tool result with `isError: true` and the broker's sentence, never a protocol error; protocol
//! errors are left to rmcp for what cannot be routed (unknown tool, arguments that do not parse).

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, ServiceExt};
use rmcp::{schemars, tool, tool_handler, tool_router};
use serde::Deserialize;
use serde_json::{Value, json};
use till_protocol::{InspectRequest, MintRequest, Response, RevokeRequest, RevokeTarget};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, Refusal};
use crate::handlers;
use crate::peer::Peer;

const INSTRUCTIONS: &str = "Till holds the real API keys; you never see them. To call an API: \
list_services to see what you may use, request_token for the method and path you need (or call_api \
with `service` for a single request), then call_api with the token. Each token has a number of \
activations; token_status shows what is left without spending any. If a call is refused, the \
message says what to do next.";

// Every tool refuses an argument it does not know, naming it and the ones it takes: ignored, a
// misnamed `allow` would mint the service's whole ceiling, a misnamed `ttl_seconds` the default.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestTokenArgs {
    /// The service to call, as `list_services` names it (e.g. "openai", "github").
    pub service: String,
    /// Rules the token allows, each "METHOD /path" with `*` for one path segment and `**` for any
    /// number of trailing segments, e.g. ["POST /v1/chat/completions"]. Omit for the service's whole
    /// ceiling. Ask for no more than the task needs.
    pub allow: Option<Vec<String>>,
    /// How many requests the token may make (activations). Default 1.
    pub uses: Option<u32>,
    /// Lifetime in seconds. Default: the daemon's default (15 minutes unless configured).
    pub ttl_seconds: Option<u64>,
    /// What the token is for, in a few words; kept with the token and shown to the user.
    pub purpose: Option<String>,
    /// A token you hold, to narrow for a sub-agent: the new token gets a subset of its rules, no
    /// longer a lifetime, and its activations count against the parent's too.
    pub parent: Option<String>,
    /// The most LLM tokens (input and output) all the token's requests may use together, for an
    /// LLM service. The request that crosses it completes; the next is refused.
    pub budget_tokens: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CallApiArgs {
    /// A token from request_token. Omit it and give `service` to spend a one-shot token minted for
    /// exactly this method and path.
    pub token: Option<String>,
    /// The service to call: required without a token; with a token it must be the token's service.
    pub service: Option<String>,
    /// HTTP method: GET, POST, PUT, PATCH, DELETE, HEAD or OPTIONS.
    pub method: String,
    /// Path on the service, starting with "/", e.g. "/v1/chat/completions". No host: requests only
    /// ever go to the service's own origin.
    pub path: String,
    /// Query parameters, added to the path's query string.
    pub query: Option<BTreeMap<String, String>>,
    /// Request headers (never an API key: Till adds the real one).
    pub headers: Option<BTreeMap<String, String>>,
    /// Request body: a JSON value is sent as JSON; a string is sent as it is.
    pub body: Option<Value>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRefArgs {
    /// The whole token (till_...).
    pub token: Option<String>,
    /// Or the token's id (32 hex digits), for a token you minted.
    pub id: Option<String>,
}

/// One MCP session: the broker, and who is on the other end.
#[derive(Clone)]
pub struct TillMcp {
    broker: Broker,
    peer: Arc<Peer>,
    tool_router: ToolRouter<Self>,
}

fn refused(r: &Refusal) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(format!(
        "Refused ({}): {}",
        r.code.as_str(),
        r.message
    ))])
}

fn ok(v: Value) -> CallToolResult {
    CallToolResult::structured(v)
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn token_ref(a: TokenRefArgs) -> Result<String, Refusal> {
    a.token
        .or(a.id)
        .ok_or_else(|| Refusal::bad_request("give `token` (the whole token) or `id`"))
}

#[tool_router]
impl TillMcp {
    pub fn new(broker: Broker, peer: Peer) -> Self {
        TillMcp {
            broker,
            peer: Arc::new(peer),
            tool_router: Self::tool_router(),
        }
    }

    /// Who is calling: over HTTP, the peer of the request's connection (the gateway puts it in the
    /// request's extensions); over the socket, the session's. Plus the client name the MCP host
    /// declared in `initialize`.
    fn who(&self, ctx: &RequestContext<RoleServer>) -> Peer {
        let mut p = ctx
            .extensions
            .get::<hyper::http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<Peer>())
            .cloned()
            .unwrap_or_else(|| (*self.peer).clone());
        p.client = ctx
            .peer
            .peer_info()
            .map(|i| i.client_info.name.chars().take(64).collect());
        p
    }

    async fn run(&self, peer: &Peer, req: till_protocol::Request) -> CallToolResult {
        match handlers::dispatch(&self.broker, peer, req).await {
            Response::Error(e) => refused(&Refusal::new(e.code, e.message)),
            Response::Services(s) => ok(to_value(&s)),
            Response::Minted(m) => ok(json!({
                "token": m.token,
                "id": m.info.id,
                "service": m.info.service,
                "rules": m.info.rules,
                "activations": m.info.uses,
                "budget_tokens": m.info.budget,
                "expires_at": m.info.expires_at,
            })),
            Response::Token(t) => ok(to_value(&t)),
            Response::Revoked(r) => ok(to_value(&r)),
            Response::Tokens(t) => ok(to_value(&t)),
            other => ok(to_value(&other)),
        }
    }

    #[tool(
        description = "List the services you may call through Till, with the rules (METHOD /path) a token for each may allow and the most activations and lifetime per token.",
        annotations(read_only_hint = true)
    )]
    async fn list_services(
        &self,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let peer = self.who(&ctx);
        Ok(self.run(&peer, till_protocol::Request::Services).await)
    }

    #[tool(
        description = "Ask Till for a capability token: one service, the rules it allows, a number of activations (default 1). Returns the token to pass to call_api. It carries no secret."
    )]
    async fn request_token(
        &self,
        Parameters(a): Parameters<RequestTokenArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let peer = self.who(&ctx);
        let req = MintRequest {
            service: a.service,
            allow: a.allow.unwrap_or_default(),
            uses: a.uses,
            ttl_secs: a.ttl_seconds,
            note: a.purpose,
            bind_to_peer: false,
            from: a.parent,
            canary: false,
            budget: a.budget_tokens,
        };
        Ok(self.run(&peer, till_protocol::Request::Mint(req)).await)
    }

    #[tool(
        description = "Make one HTTP request to a service through Till, which adds the real API key and removes it from the answer. Spends one activation of `token`; or, with `service` and no token, mints and spends a one-shot token for exactly this request. Returns status, headers and body."
    )]
    async fn call_api(
        &self,
        Parameters(a): Parameters<CallApiArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let peer = self.who(&ctx);
        Ok(match self.call(&peer, a).await {
            Ok(v) => ok(v),
            Err(r) => refused(&r),
        })
    }

    #[tool(
        description = "A token's state and remaining activations. Spends nothing.",
        annotations(read_only_hint = true)
    )]
    async fn token_status(
        &self,
        Parameters(a): Parameters<TokenRefArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let peer = self.who(&ctx);
        Ok(match token_ref(a) {
            Ok(t) => {
                let req = InspectRequest { token_or_id: t };
                self.run(&peer, till_protocol::Request::Inspect(req)).await
            }
            Err(r) => refused(&r),
        })
    }

    #[tool(
        description = "Revoke a token: no request that starts after this can spend it. Returns its final state."
    )]
    async fn revoke_token(
        &self,
        Parameters(a): Parameters<TokenRefArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let peer = self.who(&ctx);
        Ok(match token_ref(a) {
            Ok(t) => {
                let req = RevokeRequest {
                    target: RevokeTarget::Token(t),
                };
                self.run(&peer, till_protocol::Request::Revoke(req)).await
            }
            Err(r) => refused(&r),
        })
    }
}

impl TillMcp {
    async fn call(&self, peer: &Peer, a: CallApiArgs) -> Result<Value, Refusal> {
        let b = &self.broker;
        let mut path = a.path;
        if let Some(q) = a.query.filter(|q| !q.is_empty()) {
            let encoded: String = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(q.iter())
                .finish();
            path.push(if path.contains('?') { '&' } else { '?' });
            path.push_str(&encoded);
        }
        let mut headers: Vec<(String, String)> =
            a.headers.unwrap_or_default().into_iter().collect();
        let body: Vec<u8> = match a.body {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => s.into_bytes(),
            Some(v) => {
                if !headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                {
                    headers.push(("content-type".into(), "application/json".into()));
                }
                serde_json::to_vec(&v).unwrap_or_default()
            }
        };
        // The same handler as the socket's `call`: this adapter only shapes arguments and result.
        let req = till_protocol::CallRequest {
            token: a.token,
            service: a.service,
            method: a.method,
            path,
            headers,
            body,
        };
        let reply = match handlers::call::handle(b, peer, req).await? {
            Response::Called(r) => r,
            _ => {
                return Err(Refusal::internal(
                    "the call handler gave an unexpected reply",
                ));
            }
        };
        let headers: BTreeMap<String, String> = reply.headers.into_iter().collect();
        let (body, encoding) = match String::from_utf8(reply.body) {
            Ok(text) => (Value::String(text), "text"),
            Err(e) => (
                Value::String(base64::engine::general_purpose::STANDARD.encode(e.as_bytes())),
                "base64",
            ),
        };
        Ok(json!({
            "status": reply.status,
            "headers": headers,
            "body": body,
            "body_encoding": encoding,
            "token_id": reply.token_id,
            "activations_remaining": reply.activations_remaining,
        }))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for TillMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("till", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }
}

/// Serves MCP on the Unix socket `mcp.sock` until `shutdown`.
pub async fn serve(
    listener: UnixListener,
    broker: Broker,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let s = shutdown.clone();
    let b = broker.clone();
    crate::server::accept_unix(
        listener,
        broker,
        shutdown,
        tracker,
        "mcp.sock",
        move |stream, peer| session(stream, TillMcp::new(b.clone(), peer), s.clone()),
        // A JSON-RPC error, which the host shows; `till mcp` relays it when its hand-off is
        // refused this way.
        |mut stream: tokio::net::UnixStream, message: String| async move {
            use tokio::io::AsyncWriteExt;
            crate::server::read_briefly(&mut stream).await;
            let line = serde_json::json!({
                "jsonrpc": "2.0",
                "id": null,
                "error": {"code": -32000, "message": format!("Till: {message}")},
            });
            let _ = stream.write_all(format!("{line}\n").as_bytes()).await;
            let _ = stream.shutdown().await;
        },
    )
    .await;
}

pub(crate) type Reader = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
pub(crate) type Writer = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// One connection on `mcp.sock`: either MCP spoken on the socket, or `till mcp` handing over the
/// agent host's stdin and stdout (`SCM_RIGHTS`) so the daemon serves the host directly, with no
/// process relaying bytes in between ([`crate::handoff`]). The hand-off's connection then stays
/// open as the session's lifeline: the session ends if `till mcp` dies, and the daemon tells
/// `till mcp` on it how the session ended.
async fn session(mut stream: tokio::net::UnixStream, server: TillMcp, shutdown: CancellationToken) {
    use std::os::fd::AsFd;
    use till_protocol::{MCP_HANDOFF, MCP_RESUME};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut first = [0u8; 1];
    let (n, fds) = loop {
        tokio::select! {
            r = stream.readable() => if r.is_err() {
                return;
            },
            // A client that connects and says nothing must not hold up a shutdown.
            _ = shutdown.cancelled() => return,
        }
        match stream.try_io(tokio::io::Interest::READABLE, || {
            crate::sys::recv_with_fds(stream.as_fd(), &mut first)
        }) {
            Ok(got) => break got,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::debug!(error = %e, "mcp connection failed before its first message");
                return;
            }
        }
    };
    if n == 0 {
        return;
    }
    if first[0] != MCP_HANDOFF && first[0] != MCP_RESUME {
        if !fds.is_empty() {
            tracing::debug!("descriptors sent without a hand-off; closing");
            return;
        }
        let (r, w) = stream.into_split();
        let r: Reader = Box::new(std::io::Cursor::new(first).chain(r));
        serve_until_done(server, r, Box::new(w), shutdown).await;
        return;
    }
    let resumed = if first[0] == MCP_RESUME {
        let read = tokio::select! {
            r = crate::handoff::read_resume(&mut stream) => r,
            _ = shutdown.cancelled() => return,
        };
        match read {
            Ok(r) => Some(r),
            Err(why) => {
                let _ = stream.write_all(format!("no: {why}\n").as_bytes()).await;
                return;
            }
        }
    } else {
        None
    };
    let stdio = match <[std::os::fd::OwnedFd; 2]>::try_from(fds) {
        Ok([stdin, stdout]) => stdio_streams(stdin, stdout),
        Err(_) => Err("a hand-off carries exactly two descriptors, stdin and stdout".to_string()),
    };
    match stdio {
        Ok((r, w)) => {
            if stream.write_all(b"ok\n").await.is_err() {
                return;
            }
            let (r, resumed): (Reader, _) = match resumed {
                Some((client, pending)) => {
                    tracing::debug!(
                        pending = pending.len(),
                        "resuming an agent host's session begun with an earlier daemon"
                    );
                    (
                        Box::new(std::io::Cursor::new(pending).chain(r)),
                        Some(client),
                    )
                }
                None => {
                    tracing::debug!("serving an agent host's stdio handed over by `till mcp`");
                    (r, None)
                }
            };
            crate::handoff::serve(server, r, w, stream, resumed, shutdown).await;
        }
        Err(why) => {
            let _ = stream.write_all(format!("no: {why}\n").as_bytes()).await;
        }
    }
}

/// Wraps handed-over descriptors for tokio: pipes and sockets only (what agent hosts give their
/// servers), since only those can be polled; anything else (a terminal, a file) is refused and
/// `till mcp` relays instead.
fn stdio_streams(
    stdin: std::os::fd::OwnedFd,
    stdout: std::os::fd::OwnedFd,
) -> Result<(Reader, Writer), String> {
    use std::os::unix::fs::FileTypeExt;
    use tokio::net::unix::pipe;
    let kind = |fd: std::os::fd::OwnedFd| {
        let f = std::fs::File::from(fd);
        let t = f.metadata().map(|m| m.file_type());
        (std::os::fd::OwnedFd::from(f), t)
    };
    let socket = |fd: std::os::fd::OwnedFd| {
        let s = std::os::unix::net::UnixStream::from(fd);
        s.set_nonblocking(true)?;
        tokio::net::UnixStream::from_std(s)
    };
    let unusable = |e: std::io::Error| format!("the host's stdio cannot be served directly ({e})");
    let r: Reader = match kind(stdin) {
        (fd, Ok(t)) if t.is_fifo() => {
            Box::new(pipe::Receiver::from_owned_fd(fd).map_err(unusable)?)
        }
        (fd, Ok(t)) if t.is_socket() => Box::new(socket(fd).map_err(unusable)?),
        _ => return Err("stdin is neither a pipe nor a socket".into()),
    };
    let w: Writer = match kind(stdout) {
        (fd, Ok(t)) if t.is_fifo() => Box::new(pipe::Sender::from_owned_fd(fd).map_err(unusable)?),
        (fd, Ok(t)) if t.is_socket() => Box::new(socket(fd).map_err(unusable)?),
        _ => return Err("stdout is neither a pipe nor a socket".into()),
    };
    Ok((r, w))
}

/// Serves one MCP session on the socket until the client leaves or the daemon shuts down.
async fn serve_until_done(server: TillMcp, r: Reader, w: Writer, shutdown: CancellationToken) {
    let running = match server.serve((r, w)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "mcp session ended before initialize");
            return;
        }
    };
    let ct = running.cancellation_token();
    tokio::select! {
        r = running.waiting() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "mcp session ended");
            }
        }
        _ = shutdown.cancelled() => ct.cancel(),
    }
}

type Sessions = rmcp::transport::streamable_http_server::session::local::LocalSessionManager;

/// The most MCP sessions open at once over HTTP. Each holds a task, its channels and caches
/// (about 110 KB, measured: 5,000 sessions took 547 MB); any local process can open them, and
/// rmcp closes an idle one only after 5 minutes. Agent hosts open one per server connection.
pub const MAX_HTTP_SESSIONS: usize = 512;

/// The streamable-HTTP MCP endpoint the gateway serves at `/mcp`. rmcp's own Host check keeps it to
/// loopback names (a DNS-rebinding guard for a server on localhost), and its Origin check to pages
/// served from this machine.
pub struct HttpService {
    pub service: rmcp::transport::streamable_http_server::StreamableHttpService<TillMcp, Sessions>,
    sessions: Arc<Sessions>,
}

impl HttpService {
    /// How many sessions are open.
    pub async fn open_sessions(&self) -> usize {
        self.sessions.sessions.read().await.len()
    }
}

pub fn http_service(broker: Broker, shutdown: CancellationToken) -> HttpService {
    // No token guards `/mcp`: the peer's uid is the identity, and a browser runs as the user. A
    // request from a web page carries its `Origin`; only pages served from this machine may use
    // it (the MCP spec asks servers to check, against DNS rebinding and cross-site requests).
    // Agent hosts send no `Origin`.
    let mut config = rmcp::transport::streamable_http_server::StreamableHttpServerConfig::default()
        .with_allowed_origins([
            "http://localhost:*",
            "https://localhost:*",
            "http://127.0.0.1:*",
            "https://127.0.0.1:*",
            "http://[::1]:*",
            "https://[::1]:*",
        ]);
    config.cancellation_token = shutdown;
    let placeholder = Peer::from_tcp(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
    );
    let sessions = Arc::new(Sessions::default());
    HttpService {
        service: rmcp::transport::streamable_http_server::StreamableHttpService::new(
            move || Ok(TillMcp::new(broker.clone(), placeholder.clone())),
            sessions.clone(),
            config,
        ),
        sessions,
    }
}
