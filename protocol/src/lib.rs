//! `till-protocol`: what Till's daemon and its callers agree on; no I/O but `io`'s frame stream
//! (feature `io`).
//!
//! Layout:
//! - [`message`]: the native protocol's `Request`/`Response` enums, framing constants, error codes.
//! - [`token`]: the capability token: claims, byte layout (docs/TOKEN.md), ed25519 sign and verify.
//! - [`scope`]: the `METHOD /path/*/**` rule grammar, request-path validation, matching, containment.
//! - [`audit`]: the audit trail's hash chain and its check.
//! - `io` (feature `io`): length-prefixed frames over a Unix socket, with optional busy-polling.
//! - [`paths`]: where the daemon's socket is by default, shared by the daemon and the CLI.

pub mod audit;
#[cfg(feature = "io")]
pub mod io;
pub mod message;
pub mod paths;
pub mod scope;
pub mod token;

pub use message::*;
pub use scope::{Method, Pattern, RequestPath, Rule, ScopeError};
pub use token::{Claims, KeyId, Token, TokenError, TokenId};
