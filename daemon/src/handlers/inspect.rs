//! `inspect`: a token's claims and state, spending nothing.

use till_protocol::{ErrorCode, InspectRequest, Response};

use crate::broker::{Broker, Refusal, now_secs};
use crate::handlers::revoke::resolve_one;
use crate::peer::Peer;

pub async fn handle(b: &Broker, peer: &Peer, req: InspectRequest) -> Result<Response, Refusal> {
    let id = resolve_one(b, peer, &req.token_or_id)?;
    let info = b.tokens().get(&id).map(|r| r.info(now_secs()));
    info.map(Response::Token).ok_or_else(|| {
        Refusal::new(
            ErrorCode::UnknownToken,
            "the signature is valid but the daemon has no record of this token (minted just before \
             a crash?); mint a new one",
        )
    })
}
