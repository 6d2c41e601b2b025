//! `tokens`: live tokens (with `all`, every state). Admins see every token; others see their own.

use till_protocol::{Response, TokenState, TokensReply, TokensRequest};

use crate::broker::{Broker, Refusal, now_secs};
use crate::peer::Peer;

const DEFAULT_LIMIT: usize = 1000;

pub async fn handle(b: &Broker, peer: &Peer, req: TokensRequest) -> Result<Response, Refusal> {
    let now = now_secs();
    let admin = b.is_admin(peer);
    let limit = req.limit.unwrap_or(DEFAULT_LIMIT);
    let (mut tokens, count) = {
        let map = b.tokens();
        let mut matching: Vec<_> = map
            .values()
            .filter(|r| admin || r.minted_by_uid == Some(peer.uid))
            .filter(|r| req.all || r.state(now) == TokenState::Live)
            .collect();
        let count = matching.len();
        // Newest first, then as many as fit.
        matching.sort_unstable_by_key(|r| std::cmp::Reverse((r.issued_at, r.id)));
        let mut bytes = 0;
        let mut listed = Vec::new();
        for r in matching.into_iter().take(limit) {
            let info = r.info(now);
            bytes += serde_json::to_vec(&info).map_or(0, |v| v.len());
            if bytes > super::MAX_REPLY_BYTES {
                break;
            }
            listed.push(info);
        }
        (listed, count)
    };
    tokens.reverse();
    Ok(Response::Tokens(TokensReply { tokens, count }))
}
