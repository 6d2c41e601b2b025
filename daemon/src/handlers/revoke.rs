//! `revoke`: one token (its holder, its minter or an admin), every token of a service, or all
//! (admins). The reply comes only after the revocation is durable, so a revocation that has
//! returned holds for every request that starts after it, across a crash too.

use std::collections::{HashMap, HashSet};

use futures_util::future::join_all;
use till_protocol::{ErrorCode, Response, RevokeReply, RevokeRequest, RevokeTarget, TokenId};

use crate::audit::{Event, EventKind, PeerJson};
use crate::broker::{Broker, Refusal, now_secs};
use crate::peer::Peer;
use crate::store::TokenRecord;

/// Revoked tokens listed in a reply, at most: the rest are counted (a reply must fit in a frame,
/// and `revoke --all` can revoke a million).
const MAX_LISTED: usize = 1000;

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
            let ids: Vec<TokenId> = b
                .tokens()
                .values()
                .filter(|r| r.service == *s)
                .map(|r| TokenId(r.id))
                .collect();
            // A misspelt name would revoke nothing and say so as if all were well. A service
            // no longer configured (removed by a reload) still has its tokens revoked.
            let served = b.served();
            if ids.is_empty() && !served.services.contains_key(s) {
                let names: Vec<&str> = served.services.keys().map(String::as_str).collect();
                return Err(Refusal::new(
                    ErrorCode::UnknownService,
                    format!(
                        "no service is named {:?}, and no token was minted for one; the services \
                         are: {}",
                        crate::clip(s, crate::MAX_QUOTED_NAME),
                        names.join(", ")
                    ),
                ));
            }
            ids
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
    let mut count = 0;
    {
        let mut map = b.tokens();
        // Revoking a token revokes every token narrowed from it, at any depth (`--all` names
        // them all already).
        let ids = match req.target {
            RevokeTarget::All => ids,
            _ => with_descendants(&map, ids),
        };
        for id in &ids {
            if let Some(rec) = map.get_mut(id) {
                // A revocation that could not be written before is written again (and its
                // audit line, which was not written, too).
                let again = rec.revocation_unsaved;
                if again
                    || (rec.revoked_at.is_none()
                        && rec.state(now) == till_protocol::TokenState::Live)
                {
                    rec.revoked_at.get_or_insert(now);
                    rec.revocation_unsaved = true;
                    pending.push(b.store.put_durable(rec));
                    newly.push((*id, rec.service.clone()));
                }
                let listed = matches!(req.target, RevokeTarget::Token(_))
                    || newly.last().is_some_and(|n| n.0 == *id);
                if listed {
                    count += 1;
                    if infos.len() < MAX_LISTED {
                        infos.push(rec.info(now));
                    }
                }
            }
        }
    }
    for result in join_all(pending.into_iter().map(|d| d.wait())).await {
        result.map_err(|e| {
            Refusal::internal(format!(
                "{e}; what was revoked is refused from now on, but after a restart it would not \
                 be: revoke again once the daemon can write"
            ))
        })?;
    }
    {
        let mut map = b.tokens();
        for (id, _) in &newly {
            if let Some(rec) = map.get_mut(id) {
                rec.revocation_unsaved = false;
            }
        }
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
    Ok(Response::Revoked(RevokeReply {
        revoked: infos,
        count,
    }))
}

/// `ids` and every token narrowed from them, at any depth: one pass over the tokens to index
/// their children, then a walk down from `ids`. (Linear: asking, depth by depth, which tokens
/// have a parent among `ids` held the tokens' lock for seconds with a hundred thousand tokens.)
fn with_descendants(map: &HashMap<TokenId, TokenRecord>, ids: Vec<TokenId>) -> Vec<TokenId> {
    let mut children: HashMap<TokenId, Vec<TokenId>> = HashMap::new();
    for r in map.values() {
        if let Some(p) = r.parent {
            children.entry(TokenId(p)).or_default().push(TokenId(r.id));
        }
    }
    let mut seen: HashSet<TokenId> = ids.iter().copied().collect();
    let mut out = ids;
    let mut next = 0;
    while let Some(id) = out.get(next).copied() {
        next += 1;
        for child in children.get(&id).into_iter().flatten() {
            if seen.insert(*child) {
                out.push(*child);
            }
        }
    }
    out
}
