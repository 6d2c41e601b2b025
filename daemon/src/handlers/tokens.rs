//! `tokens`: live tokens (with `all`, every state). Admins see every token; others see their own.

use till_protocol::{Response, TokenState, TokensReply, TokensRequest};

use crate::broker::{Broker, Refusal, now_secs};
use crate::peer::Peer;

pub async fn handle(b: &Broker, peer: &Peer, req: TokensRequest) -> Result<Response, Refusal> {
    let now = now_secs();
    let admin = b.is_admin(peer);
    let mut tokens: Vec<_> = b
        .tokens()
        .values()
        .filter(|r| admin || r.minted_by_uid == Some(peer.uid))
        .map(|r| r.info(now))
        .filter(|i| req.all || i.state == TokenState::Live)
        .collect();
    tokens.sort_by(|a, b| (a.issued_at, &a.id).cmp(&(b.issued_at, &b.id)));
    Ok(Response::Tokens(TokensReply { tokens }))
}
