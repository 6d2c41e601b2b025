//! One file per request kind; [`dispatch`] is the one `match` over [`Request`].

pub mod audit;
pub mod call;
pub mod inspect;
pub mod mint;
pub mod pubkey;
pub mod reload;
pub mod revoke;
pub mod services;
pub mod status;
pub mod tokens;

use till_protocol::{Request, Response, RevokeTarget};

use crate::broker::{Broker, Refusal};
use crate::peer::Peer;

/// The most bytes of listed items (audit lines, tokens) in one reply: well inside a frame
/// (16 MiB) once JSON-escaped. What the daemon holds can be far more (a trail of 100 MiB, a
/// million tokens), so every list is cut here and says how much more there is.
pub const MAX_REPLY_BYTES: usize = 8 * 1024 * 1024;

/// Runs one request. A refusal becomes an error reply here, in one place, for every adapter, and a
/// `deny` line in the trail (a `call` writes its own, with the method and path it asked for).
pub async fn dispatch(b: &Broker, peer: &Peer, req: Request) -> Response {
    let _in_flight = crate::broker::REQUESTS.start();
    let attempt = attempt(&req);
    let result = match req {
        Request::Hello(_) => Err(Refusal::bad_request(
            "hello was already exchanged on this connection",
        )),
        Request::Status => status::handle(b, peer).await,
        Request::Services => services::handle(b, peer).await,
        Request::Mint(r) => mint::handle(b, peer, r).await,
        Request::Call(r) => call::handle(b, peer, r).await,
        Request::Tokens(r) => tokens::handle(b, peer, r).await,
        Request::Inspect(r) => inspect::handle(b, peer, r).await,
        Request::Revoke(r) => revoke::handle(b, peer, r).await,
        Request::Pubkey => pubkey::handle(b, peer).await,
        Request::Audit(r) => audit::handle(b, peer, r).await,
        Request::Reload => reload::handle(b, peer).await,
        Request::Rotate(r) => reload::rotate(b, peer, r).await,
        Request::RotateSigningKey => pubkey::rotate(b, peer).await,
    };
    result.unwrap_or_else(|refusal| match attempt {
        Some((what, service)) => b.deny_request(peer, what, service, refusal).into_response(),
        None => refusal.into_response(),
    })
}

/// What a request attempts, for its `deny` line if it is refused: its name and the service it
/// names. `None` for the ones that audit their own refusals (`call`) or cannot be refused.
fn attempt(req: &Request) -> Option<(&'static str, Option<String>)> {
    Some(match req {
        Request::Hello(_) | Request::Status | Request::Call(_) => return None,
        Request::Services => ("services", None),
        Request::Mint(r) => ("mint", Some(r.service.clone())),
        Request::Tokens(_) => ("tokens", None),
        Request::Inspect(_) => ("inspect", None),
        Request::Revoke(r) => match &r.target {
            RevokeTarget::Service(s) => ("revoke", Some(s.clone())),
            RevokeTarget::Token(_) | RevokeTarget::All => ("revoke", None),
        },
        Request::Pubkey => ("pubkey", None),
        Request::Audit(_) => ("audit", None),
        Request::Reload => ("reload", None),
        Request::Rotate(r) => ("rotate", Some(r.service.clone())),
        Request::RotateSigningKey => ("rotate-signing-key", None),
    })
}
