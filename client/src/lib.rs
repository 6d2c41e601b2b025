//! `till-client`: talk to `tilld` over its Unix socket.
//!
//! Layout: this file is the library ([`Client`], [`socket_path`]); `bin/till/` is the CLI.
//!
//! ```no_run
//! # async fn demo() -> Result<(), till_client::ClientError> {
//! let mut till = till_client::Client::connect(&till_client::socket_path(None)).await?;
//! let minted = till.mint(till_protocol::MintRequest {
//!     service: "openai".into(),
//!     allow: vec!["GET /v1/models".into()],
//!     ..Default::default()
//! }).await?;
//! let reply = till.call(till_protocol::CallRequest {
//!     token: Some(minted.token),
//!     method: "GET".into(),
//!     path: "/v1/models".into(),
//!     ..Default::default()
//! }).await?;
//! println!("{}", reply.status);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use till_protocol::io::{BusyPoll, FrameError, FrameStream};
use till_protocol::{
    AuditReply, AuditRequest, CallReply, CallRequest, ErrorCode, Hello, InspectRequest, MintReply,
    MintRequest, PROTOCOL_VERSION, PubkeyReply, ReloadReply, Request, Response, RevokeReply,
    RevokeRequest, RevokeTarget, RotateRequest, ServicesReply, StatusReply, TokenInfo, TokensReply,
    TokensRequest,
};
use tokio::net::UnixStream;

pub use till_protocol;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket.
    #[error(
        "cannot reach tilld at {path}: {reason}. Start it with `tilld` (e.g. `OPENAI_API_KEY=sk-... tilld`), \
         or point --socket / $TILL_SOCKET at the socket it serves"
    )]
    Unreachable { path: PathBuf, reason: String },
    /// The daemon answered with a refusal.
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    /// The request would not fit in one message to the daemon; nothing was sent.
    #[error(
        "the request is {0} bytes once encoded, over the {max} bytes a message to tilld may hold; \
         send a smaller body",
        max = till_protocol::MAX_FRAME_BYTES
    )]
    TooLarge(usize),
    // The cause is in the message, not also a `source`: printed as a chain, it would show twice.
    #[error("connection to tilld failed: {0}")]
    Io(std::io::Error),
    #[error("unexpected reply from tilld: {0}")]
    Protocol(String),
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> ClientError {
        match e.get_ref().and_then(|e| e.downcast_ref::<FrameError>()) {
            Some(FrameError::TooBig(len)) => ClientError::TooLarge(*len),
            _ => ClientError::Io(e),
        }
    }
}

impl ClientError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// `--socket`, else `$TILL_SOCKET`, else the default path for this user; and when nothing is
/// there but the system service's socket is, that one (as the docker CLI finds the system
/// daemon): a member of `till-agents` needs no `TILL_SOCKET`.
pub fn socket_path(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_owned();
    }
    if let Some(p) = std::env::var_os("TILL_SOCKET").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    own_or_system(
        till_protocol::paths::default_socket(current_uid()),
        Path::new(SYSTEM_SOCKET),
    )
}

/// The `/tmp/till-UID` default (no `XDG_RUNTIME_DIR`) is a directory any local user may make
/// first and put a socket of their own in, to read the tokens and keys sent to it: a socket
/// there (`till.sock`, `mcp.sock`) is connected to only if the directory is this user's or
/// root's, and not writable by everyone, as tilld also checks.
pub fn refuse_a_squatted_tmp_dir(path: &Path) -> Result<(), ClientError> {
    use std::os::unix::fs::MetadataExt;
    let uid = current_uid();
    let shared = till_protocol::paths::shared_tmp_socket(uid);
    let Some(dir) = path.parent().filter(|d| Some(*d) == shared.parent()) else {
        return Ok(());
    };
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return Ok(()); // Not there: connecting fails, and says so.
    };
    let why = if meta.file_type().is_symlink() {
        Some("it is a symbolic link, which tilld never makes".to_owned())
    } else {
        till_protocol::paths::unfit_dir(meta.uid(), meta.mode(), uid)
    };
    match why {
        Some(why) => Err(ClientError::Unreachable {
            path: path.to_owned(),
            reason: format!("not connecting, since {} is unsafe: {why}", dir.display()),
        }),
        None => Ok(()),
    }
}

/// Where the system service (`systemd/tilld.socket`) puts its socket.
pub const SYSTEM_SOCKET: &str = "/run/till/till.sock";

fn own_or_system(own: PathBuf, system: &Path) -> PathBuf {
    if own.exists() || !system.exists() {
        own
    } else {
        system.to_owned()
    }
}

#[allow(unsafe_code)]
fn current_uid() -> u32 {
    // SAFETY: getuid cannot fail and touches no memory.
    unsafe { libc::getuid() }
}

/// How long a request waits for its reply by reading the socket directly before it sleeps (see
/// `till_protocol::io`): long enough for a mint, a status or an inspect, which the daemon answers
/// in tens of microseconds (a call takes longer, and then sleeps like any other wait). Only while
/// this is the process's one request in flight.
const BUSY_POLL: Duration = Duration::from_micros(100);

/// Requests to tilld in flight in this process, over every [`Client`]: one busy-polls only when it
/// is the only one.
static SPIN: BusyPoll = BusyPoll::new(1);

/// One connection to the daemon. Requests are answered in order; not shareable across tasks
/// (open one per task, they are cheap).
pub struct Client {
    framed: FrameStream,
    daemon_version: String,
    /// Where to connect again when the daemon has restarted since the last request.
    path: PathBuf,
    reconnect: bool,
}

macro_rules! expect {
    ($resp:expr, $variant:path) => {
        match $resp {
            $variant(x) => Ok(x),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    };
}

impl Client {
    /// Connects and exchanges `hello`. A `Client` outlives a restart of the daemon: a request
    /// after one goes out on a new connection (the daemon closed the old one while it was idle,
    /// so nothing is sent twice). A request in flight when the daemon stops is answered, or
    /// refused with [`ErrorCode::ShuttingDown`] when it was not served.
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let framed = Self::open(path).await?;
        let mut client = Client {
            framed,
            daemon_version: String::new(),
            path: path.to_owned(),
            reconnect: true,
        };
        client.hello().await?;
        Ok(client)
    }

    async fn open(path: &Path) -> Result<FrameStream, ClientError> {
        refuse_a_squatted_tmp_dir(path)?;
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| ClientError::Unreachable {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(FrameStream::new(stream).busy_poll(BUSY_POLL, &SPIN))
    }

    async fn hello(&mut self) -> Result<(), ClientError> {
        let hello = Request::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            client: concat!("till-client ", env!("CARGO_PKG_VERSION")).into(),
        });
        let reply = expect!(self.exchange(&hello).await?, Response::Hello)?;
        self.daemon_version = reply.daemon_version;
        Ok(())
    }

    pub fn daemon_version(&self) -> &str {
        &self.daemon_version
    }

    /// Whether to take a new connection when the daemon has let go of this one (on by
    /// default). Off, a request after a restart fails as the connection does, for a caller that
    /// must notice the restart itself (one that follows the audit trail, whose numbering may
    /// start over with the new daemon).
    pub fn reconnecting(mut self, on: bool) -> Self {
        self.reconnect = on;
        self
    }

    /// Sends one request and returns the daemon's response; an error reply becomes
    /// [`ClientError::Refused`].
    pub async fn request(&mut self, req: Request) -> Result<Response, ClientError> {
        if self.reconnect && !self.framed.usable() {
            // The daemon let go of this connection (it restarted): a new one, hello again.
            self.framed = Self::open(&self.path).await?;
            self.hello().await?;
        }
        self.exchange(&req).await
    }

    async fn exchange(&mut self, req: &Request) -> Result<Response, ClientError> {
        let _in_flight = SPIN.start();
        self.framed.send_json(req).await?;
        let frame = self
            .framed
            .next()
            .await
            .ok_or_else(|| ClientError::Protocol("tilld closed the connection".into()))?
            .map_err(|e| match e {
                FrameError::Io(e) => ClientError::Io(e),
                other => ClientError::Protocol(other.to_string()),
            })?;
        match serde_json::from_slice::<Response>(&frame) {
            Ok(Response::Error(e)) => Err(ClientError::Refused {
                code: e.code,
                message: e.message,
            }),
            Ok(r) => Ok(r),
            Err(e) => Err(ClientError::Protocol(e.to_string())),
        }
    }

    pub async fn status(&mut self) -> Result<StatusReply, ClientError> {
        expect!(self.request(Request::Status).await?, Response::Status)
    }

    pub async fn services(&mut self) -> Result<ServicesReply, ClientError> {
        expect!(self.request(Request::Services).await?, Response::Services)
    }

    pub async fn mint(&mut self, req: MintRequest) -> Result<MintReply, ClientError> {
        expect!(self.request(Request::Mint(req)).await?, Response::Minted)
    }

    pub async fn call(&mut self, req: CallRequest) -> Result<CallReply, ClientError> {
        expect!(self.request(Request::Call(req)).await?, Response::Called)
    }

    /// The newest 1,000 tokens the caller may see (live ones, or `all`); `count` says how many
    /// there are in all.
    pub async fn tokens(&mut self, all: bool) -> Result<TokensReply, ClientError> {
        self.list_tokens(TokensRequest { all, limit: None }).await
    }

    pub async fn list_tokens(&mut self, req: TokensRequest) -> Result<TokensReply, ClientError> {
        expect!(self.request(Request::Tokens(req)).await?, Response::Tokens)
    }

    pub async fn inspect(&mut self, token_or_id: &str) -> Result<TokenInfo, ClientError> {
        let req = Request::Inspect(InspectRequest {
            token_or_id: token_or_id.to_owned(),
        });
        expect!(self.request(req).await?, Response::Token)
    }

    pub async fn revoke(&mut self, target: RevokeTarget) -> Result<RevokeReply, ClientError> {
        expect!(
            self.request(Request::Revoke(RevokeRequest { target }))
                .await?,
            Response::Revoked
        )
    }

    pub async fn pubkey(&mut self) -> Result<PubkeyReply, ClientError> {
        expect!(self.request(Request::Pubkey).await?, Response::Pubkey)
    }

    pub async fn reload(&mut self) -> Result<ReloadReply, ClientError> {
        expect!(self.request(Request::Reload).await?, Response::Reloaded)
    }

    pub async fn rotate(
        &mut self,
        service: &str,
        secret: String,
    ) -> Result<ReloadReply, ClientError> {
        let req = Request::Rotate(RotateRequest {
            service: service.to_owned(),
            secret,
        });
        expect!(self.request(req).await?, Response::Reloaded)
    }

    pub async fn rotate_signing_key(&mut self) -> Result<PubkeyReply, ClientError> {
        expect!(
            self.request(Request::RotateSigningKey).await?,
            Response::Pubkey
        )
    }

    pub async fn audit(&mut self, limit: Option<usize>) -> Result<AuditReply, ClientError> {
        self.audit_query(AuditRequest {
            limit,
            ..AuditRequest::default()
        })
        .await
    }

    /// The trail's events that match `req`'s filters (admin).
    pub async fn audit_query(&mut self, req: AuditRequest) -> Result<AuditReply, ClientError> {
        expect!(self.request(Request::Audit(req)).await?, Response::Audit)
    }

    /// Has the daemon sign a checkpoint into its trail now (admin).
    pub async fn audit_checkpoint(&mut self) -> Result<(), ClientError> {
        let req = AuditRequest {
            limit: Some(0),
            checkpoint: true,
            ..AuditRequest::default()
        };
        expect!(self.request(Request::Audit(req)).await?, Response::Audit).map(|_| ())
    }
}
