//! `revoke`: one token (its holder, its minter or an admin), every token of a service, or all
//! (admins). The reply comes only after the revocation is durable, so a revocation that has
//! returned holds for every request that starts after it, across a crash too.

use futures_util::future::join_all;
use till_protocol::{ErrorCode, Response, RevokeReply, RevokeRequest, RevokeTarget, TokenId};

use crate::audit::{Event, EventKind, PeerJson};
use crate::broker::{Broker, Refusal, now_secs};
use crate::peer::Peer;

/// Resolves a token string or id to an id the peer may act on.
pub fn resolve_one(b: &Broker, peer: &Peer, token_or_id: &str) -> Result<TokenId, Refusal> {
    let s = token_or_id.trim();
    if s.starts_with(till_protocol::token::TOKEN_PREFIX) {
        // Holding a valid token is authority enough to inspect or revoke it.
        let t = b
            .keyring
            .verify(s)
            .map_err(|e| Refusal::new(ErrorCode::BadToken, e.to_string()))?;
        return Ok(t.id);
    }
    let id = TokenId::parse(s).ok_or_else(|| {
        Refusal::bad_request("give a whole token (till_...) or a 32-hex-digit token id")
    })?;
    let minter = b.tokens().get(&id).map(|r| r.minted_by_uid);
    match minter {
        None => Err(Refusal::new(
            ErrorCode::UnknownToken,
            format!("no token with id {id} is known; `till tokens --all` lists them"),
        )),
        Some(m) if b.is_admin(peer) || m == Some(peer.uid) => Ok(id),
        Some(_) => Err(Refusal::new(
            ErrorCode::Forbidden,
            format!(
                "token {id} was minted by another user; only its minter, its holder (with the whole \
                 token) or an admin may act on it by id"
            ),
        )),
    }
}

pub async fn handle(b: &Broker, peer: &Peer, req: RevokeRequest) -> Result<Response, Refusal> {
    let ids: Vec<TokenId> = match &req.target {
        RevokeTarget::Token(t) => vec![resolve_one(b, peer, t)?],
        RevokeTarget::Service(s) => {
            b.require_admin(peer, "revoking every token of a service")?;
            b.tokens()
                .values()
                .filter(|r| r.service == *s)
                .map(|r| TokenId(r.id))
                .collect()
        }
        RevokeTarget::All => {
            b.require_admin(peer, "revoking every token")?;
            b.tokens().keys().copied().collect()
        }
    };
    let now = now_secs();
    let mut pending = Vec::new();
    let mut newly = Vec::new();
    let mut infos = Vec::new();
    {
        let mut map = b.tokens();
        // Revoking a token revokes every token narrowed from it, at any depth.
        let mut ids = ids;
        loop {
            let more: Vec<TokenId> = map
                .values()
                .filter(|r| {
                    r.parent.is_some_and(|p| ids.contains(&TokenId(p)))
                        && !ids.contains(&TokenId(r.id))
                })
                .map(|r| TokenId(r.id))
                .collect();
            if more.is_empty() {
                break;
            }
            ids.extend(more);
        }
        for id in &ids {
            if let Some(rec) = map.get_mut(id) {
                if rec.revoked_at.is_none() && rec.state(now) == till_protocol::TokenState::Live {
                    rec.revoked_at = Some(now);
                    pending.push(b.store.put_durable(rec));
                    newly.push((*id, rec.service.clone()));
                }
                if matches!(req.target, RevokeTarget::Token(_))
                    || newly.last().is_some_and(|n| n.0 == *id)
                {
                    infos.push(rec.info(now));
                }
            }
        }
    }
    for result in join_all(pending.into_iter().map(|d| d.wait())).await {
        result.map_err(|e| {
            Refusal::internal(format!(
                "{e}; the revocation may not have been recorded, try again"
            ))
        })?;
    }
    for (id, service) in newly {
        b.audit(
            EventKind::Revoke,
            Event {
                token_id: Some(id.to_string()),
                service: Some(service),
                peer: Some(PeerJson::from(peer)),
                ..Event::default()
            },
        )?;
    }
    Ok(Response::Revoked(RevokeReply { revoked: infos }))
}
