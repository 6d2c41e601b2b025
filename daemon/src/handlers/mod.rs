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

use till_protocol::{Request, Response};

use crate::broker::{Broker, Refusal};
use crate::peer::Peer;

/// Runs one request. A refusal becomes an error reply here, in one place, for every adapter.
pub async fn dispatch(b: &Broker, peer: &Peer, req: Request) -> Response {
    let _in_flight = crate::broker::REQUESTS.start();
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
    result.unwrap_or_else(Refusal::into_response)
}
