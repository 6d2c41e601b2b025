//! Wire messages of the native protocol. One frame = a 4-byte big-endian length + one JSON message.
//!
//! The client's first frame is always [`Request::Hello`]; the daemon answers [`Response::Hello`] or an
//! [`ErrorCode::VersionMismatch`] error and closes. After that, one request gets exactly one response,
//! in order. One exception: a daemon that is stopping sends an idle connection one
//! [`ErrorCode::ShuttingDown`] error unasked, then closes it. A request that crossed it was not
//! served; a client that finds it waiting before a request knows to connect again.

use serde::{Deserialize, Serialize};

/// Bumped by hand whenever a message changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 1;
/// Hard limit on one frame, checked against the length prefix before anything is allocated.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// On `mcp.sock`, the first byte of a hand-off: `till mcp` sends it with its stdin and stdout
/// attached (`SCM_RIGHTS`), and the daemon answers `ok\n` or `no: <why>\n`. A JSON-RPC stream never
/// starts with it, so any other first byte is a client speaking MCP on the socket itself.
pub const MCP_HANDOFF: u8 = 0;

/// On `mcp.sock`, the first byte of a resumed hand-off: as [`MCP_HANDOFF`], for a session the host
/// began with a daemon that has since stopped. One JSON line ([`McpResume`]) and the pending bytes
/// it counts follow the byte; the daemon serves the session on without waiting for `initialize`.
pub const MCP_RESUME: u8 = 1;

/// The longest line the daemon reads from an agent host (one JSON-RPC message), and so the most
/// input a session can leave pending across a restart. rmcp's own stdio limit.
pub const MCP_MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// The longest JSON line on a hand-off's lifeline, the pending bytes not counted.
pub const MCP_NOTICE_MAX_BYTES: usize = 1024 * 1024;

/// What the daemon says on a hand-off's lifeline after `ok\n`, one JSON line each, so `till mcp`
/// knows whether the session ended or only this daemon did. A lifeline that closes without
/// [`McpNotice::End`] (the daemon was killed) means the session can go on with the next daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum McpNotice {
    /// The host's `initialize` parameters as negotiated, which `till mcp` hands to the next daemon
    /// on a resume (the host will not send them again).
    Client { params: serde_json::Value },
    /// The session is over (the host closed its input, or its pipes failed): `till mcp` exits.
    End,
    /// The daemon is stopping with the session open, every request it took answered. `pending`
    /// raw bytes follow this line: the host's input the daemon read but did not serve, which
    /// `till mcp` hands to the next daemon.
    Resume { pending: usize },
    /// The requests the daemon has taken from the host and not yet answered: sent 10 ms after a
    /// request is taken (one answered sooner is never reported), and at once when a reported one
    /// is answered. If the lifeline then breaks without a word (the daemon was killed), `till mcp`
    /// answers each of them with what happened, so the host is not left waiting. An older
    /// `till mcp` ignores this notice.
    Open { requests: Vec<OpenRequest> },
}

/// A request of the host's that a daemon is serving ([`McpNotice::Open`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenRequest {
    /// The JSON-RPC id, as the host sent it (a number or a string).
    pub id: serde_json::Value,
    /// The JSON-RPC method (`tools/call`, ...), which decides the shape of the answer.
    pub method: String,
}

/// The line after [`MCP_RESUME`], followed by `pending` raw bytes of the host's input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McpResume {
    /// The host's `initialize` parameters, when a daemon reported them ([`McpNotice::Client`]).
    pub client: Option<serde_json::Value>,
    pub pending: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Hello(Hello),
    Status,
    Services,
    Mint(MintRequest),
    Call(CallRequest),
    Tokens(TokensRequest),
    Inspect(InspectRequest),
    Revoke(RevokeRequest),
    Pubkey,
    Audit(AuditRequest),
    /// Re-read the config and every secret (admin). All or nothing.
    Reload,
    /// Replace a service's master credential (admin). The secret travels over the 0600 socket only.
    Rotate(RotateRequest),
    /// Make a new signing key current (admin); the old one verifies its tokens until they expire.
    RotateSigningKey,
}

impl Request {
    /// The verb, for logs and spans (never the payload).
    pub fn verb(&self) -> &'static str {
        match self {
            Request::Hello(_) => "hello",
            Request::Status => "status",
            Request::Services => "services",
            Request::Mint(_) => "mint",
            Request::Call(_) => "call",
            Request::Tokens(_) => "tokens",
            Request::Inspect(_) => "inspect",
            Request::Revoke(_) => "revoke",
            Request::Pubkey => "pubkey",
            Request::Audit(_) => "audit",
            Request::Reload => "reload",
            Request::Rotate(_) => "rotate",
            Request::RotateSigningKey => "rotate_signing_key",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello(HelloReply),
    Status(StatusReply),
    Services(ServicesReply),
    Minted(MintReply),
    Called(CallReply),
    Tokens(TokensReply),
    Token(TokenInfo),
    Revoked(RevokeReply),
    Pubkey(PubkeyReply),
    Audit(AuditReply),
    Reloaded(ReloadReply),
    Error(ErrorReply),
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    pub service: String,
    /// The new master credential. Never logged; the `Debug` of this type hides it.
    pub secret: String,
}

impl std::fmt::Debug for RotateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotateRequest")
            .field("service", &self.service)
            .field("secret", &"[redacted]")
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadReply {
    /// What changed, in a sentence.
    pub summary: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub protocol_version: u32,
    /// The client's own name and version, e.g. "till 0.1.0" (informational).
    pub client: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelloReply {
    pub protocol_version: u32,
    pub daemon_version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReply {
    pub version: String,
    pub uptime_secs: u64,
    pub socket: String,
    pub gateway: Option<String>,
    pub live_tokens: u64,
    pub services: u64,
    /// Where the audit trail is written (for `till audit verify`).
    #[serde(default)]
    pub audit_log: Option<String>,
    /// Things an operator should act on (e.g. a key older than its `max_age`).
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServicesReply {
    pub services: Vec<ServiceInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    pub base_url: String,
    /// How the credential is injected, e.g. "header Authorization" or "query key" (never the secret).
    pub inject: String,
    pub allow: Vec<String>,
    pub max_uses: u32,
    pub max_ttl_secs: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MintRequest {
    pub service: String,
    /// Rules `METHOD /pattern`; empty means the service's whole ceiling.
    #[serde(default)]
    pub allow: Vec<String>,
    pub uses: Option<u32>,
    pub ttl_secs: Option<u64>,
    pub note: Option<String>,
    /// Bind the token to the minting peer's uid: no other uid can spend it.
    #[serde(default)]
    pub bind_to_peer: bool,
    /// Narrow this token (the whole token string) instead of minting from the service's ceiling:
    /// the child's rules must be within the parent's, its lifetime within the parent's, and every
    /// activation it spends is also taken from the parent's budget.
    #[serde(default)]
    pub from: Option<String>,
    /// A tripwire: no honest agent spends it; presenting it raises the `canary` alert (and, with
    /// `alerts.revoke_peer_on = ["canary"]`, revokes every token the presenter's uid minted).
    #[serde(default)]
    pub canary: bool,
    /// A budget of LLM tokens (input and output, as the service's answers report their usage) for
    /// all the token's requests together. Only for services whose answers report usage.
    #[serde(default)]
    pub budget: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MintReply {
    pub token: String,
    pub info: TokenInfo,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallRequest {
    /// The capability token to spend. Without it, `service` must be set and the daemon mints a
    /// one-shot token for exactly this method and path, then spends it.
    pub token: Option<String>,
    pub service: Option<String>,
    pub method: String,
    /// Path and optional query, appended to the service's base URL: `/v1/models?limit=2`.
    pub path: String,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default, with = "base64_bytes")]
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    #[serde(with = "base64_bytes")]
    pub body: Vec<u8>,
    pub token_id: String,
    pub activations_remaining: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensRequest {
    /// Include spent, expired and revoked tokens.
    #[serde(default)]
    pub all: bool,
    /// The newest this many (default 1,000); a reply also stops at 8 MiB of tokens.
    #[serde(default)]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokensReply {
    /// The newest of the tokens asked for, oldest first.
    pub tokens: Vec<TokenInfo>,
    /// How many tokens the request matched, listed or not.
    #[serde(default)]
    pub count: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InspectRequest {
    /// A whole token or a token id.
    pub token_or_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    Live,
    Spent,
    Expired,
    Revoked,
}

impl TokenState {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Live => "live",
            TokenState::Spent => "spent",
            TokenState::Expired => "expired",
            TokenState::Revoked => "revoked",
        }
    }
}

/// A token's claims and live state. Never contains the token string itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub service: String,
    pub rules: Vec<String>,
    pub uses: u32,
    pub used: u32,
    pub remaining: u32,
    pub state: TokenState,
    pub issued_at: u64,
    pub expires_at: Option<u64>,
    pub key_id: String,
    pub parent: Option<String>,
    pub holder_uid: Option<u32>,
    pub minted_by_uid: Option<u32>,
    pub note: Option<String>,
    /// The most LLM tokens the token's answers may use together, if it has a budget.
    #[serde(default)]
    pub budget: Option<u64>,
    /// LLM tokens used so far (its own answers and those of tokens narrowed from it).
    #[serde(default)]
    pub budget_used: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    pub target: RevokeTarget,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokeTarget {
    /// A whole token or a token id.
    Token(String),
    Service(String),
    All,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokeReply {
    /// The tokens revoked (or, for one token, its state), the first 1,000 of them.
    pub revoked: Vec<TokenInfo>,
    /// How many were revoked, listed or not.
    #[serde(default)]
    pub count: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PubkeyReply {
    pub keys: Vec<PublicKeyInfo>,
    /// The key that signs the audit trail's checkpoints (base64url), for `till audit verify`.
    #[serde(default)]
    pub audit_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublicKeyInfo {
    pub key_id: String,
    /// The 32-byte ed25519 public key, base64url without padding.
    pub public_key: String,
    pub current: bool,
    /// For a key rotated out: when it retires (Unix seconds), after the last token it signed expires.
    #[serde(default)]
    pub retire_at: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRequest {
    /// The last N events (default 100).
    pub limit: Option<usize>,
    /// Write a signed checkpoint first (so the live trail ends with one, for `till audit verify`).
    #[serde(default)]
    pub checkpoint: bool,
    /// Only events about this token id.
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub service: Option<String>,
    /// Only events of this kind (mint, activate, answer, charge, deny, revoke, reload, start, stop, alert, checkpoint).
    #[serde(default)]
    pub event: Option<String>,
    /// Only events at or after this time (RFC 3339).
    #[serde(default)]
    pub since: Option<String>,
    /// Only events after this sequence number (for `--follow`).
    #[serde(default)]
    pub after_seq: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditReply {
    /// Raw JSON lines, oldest first.
    pub lines: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    /// One sentence the caller can act on. Never contains a secret or a whole token.
    pub message: String,
}

/// Stable error codes. Adding one is compatible; renaming one is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    VersionMismatch,
    BadFrame,
    BadRequest,
    BadToken,
    UnknownToken,
    Expired,
    Revoked,
    Exhausted,
    OutOfScope,
    WrongService,
    WrongHolder,
    UnknownService,
    OverCeiling,
    Forbidden,
    UpstreamFailed,
    UpstreamTimeout,
    Internal,
    ShuttingDown,
    TooManyConnections,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::UnknownToken => "unknown_token",
            ErrorCode::Expired => "expired",
            ErrorCode::Revoked => "revoked",
            ErrorCode::Exhausted => "exhausted",
            ErrorCode::OutOfScope => "out_of_scope",
            ErrorCode::WrongService => "wrong_service",
            ErrorCode::WrongHolder => "wrong_holder",
            ErrorCode::UnknownService => "unknown_service",
            ErrorCode::OverCeiling => "over_ceiling",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::UpstreamFailed => "upstream_failed",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::Internal => "internal",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::TooManyConnections => "too_many_connections",
        }
    }
}

/// Bodies travel as base64 strings so binary payloads survive JSON.
mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// Encodes one frame: length prefix + JSON.
pub fn encode_frame<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serialising our own types to JSON cannot fail (no maps with non-string keys, no floats).
    let json = serde_json::to_vec(msg).unwrap_or_default();
    let mut out = Vec::with_capacity(json.len() + 4);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixtures_round_trip() {
        let fixtures = [
            r#"{"type":"hello","protocol_version":1,"client":"till 0.1.0"}"#,
            r#"{"type":"status"}"#,
            r#"{"type":"mint","service":"openai","allow":["GET /v1/models"],"uses":3,"ttl_secs":60,"note":null,"bind_to_peer":false}"#,
            r#"{"type":"call","token":null,"service":"echo","method":"POST","path":"/v1/x","headers":[["a","b"]],"body":"aGk="}"#,
            r#"{"type":"revoke","target":"all"}"#,
            r#"{"type":"revoke","target":{"service":"openai"}}"#,
            r#"{"type":"audit","limit":5}"#,
        ];
        for f in fixtures {
            let req: Request = serde_json::from_str(f).expect(f);
            let again = serde_json::to_string(&req).expect("ser");
            let req2: Request = serde_json::from_str(&again).expect("again");
            assert_eq!(req.verb(), req2.verb());
        }
        let call: Request = serde_json::from_str(fixtures[3]).expect("call");
        match call {
            Request::Call(c) => assert_eq!(c.body, b"hi"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn unknown_fields_and_types_are_refused() {
        for f in [
            r#"{"type":"mint","service":"x","bogus":1}"#,
            r#"{"type":"launch_missiles"}"#,
            r#"{"type":"call","method":"GET","path":"/","body":"***"}"#,
            r#"[1,2,3]"#,
        ] {
            assert!(serde_json::from_str::<Request>(f).is_err(), "{f}");
        }
    }

    #[test]
    fn frame_has_length_prefix() {
        let f = encode_frame(&Request::Status);
        let len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize;
        assert_eq!(len, f.len() - 4);
    }
}
