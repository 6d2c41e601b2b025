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

/// A deterministic source of test inputs (xorshift64), so the decoders' tests can throw thousands
/// of odd inputs at them without a dependency; a failure names the input, and reruns the same.
#[cfg(test)]
pub(crate) struct TestRng(pub u64);

#[cfg(test)]
impl TestRng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
pub use scope::{Method, Pattern, RequestPath, Rule, ScopeError};
pub use token::{Claims, KeyId, Token, TokenError, TokenId};
