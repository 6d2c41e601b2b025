//! `mint`: a token within the service's ceiling.

use std::time::Duration;

use till_protocol::scope::first_uncovered;
use till_protocol::{Claims, ErrorCode, MintReply, MintRequest, Response, Rule, TokenState};

use crate::audit::{Event, EventKind, PeerJson};
use crate::broker::{Broker, Refusal, new_token_id, now_secs};
use crate::peer::Peer;
use crate::store::TokenRecord;

const MAX_NOTE: usize = 200;

/// Builds claims for `rules` on `service` after checking them against the ceiling and limits.
pub fn claims_for(
    b: &Broker,
    peer: &Peer,
    service: &str,
    rules: Vec<Rule>,
    uses: Option<u32>,
    ttl: Option<Duration>,
    bind_to_peer: bool,
) -> Result<Claims, Refusal> {
    b.require_minter(peer)?;
    let svc = &b.service(service)?.config;
    b.require_peer_may_mint_for(peer, service)?;
    let ceiling = || {
        svc.allow
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(rule) = first_uncovered(&svc.allow, &rules) {
        return Err(Refusal::new(
            ErrorCode::OverCeiling,
            format!(
                "'{rule}' is outside what service {service} allows ({}); ask for a rule inside it, \
                 or have the operator widen `allow` in till.toml",
                ceiling()
            ),
        ));
    }
    let uses = uses.unwrap_or(b.served().config.default_uses);
    if uses == 0 {
        return Err(Refusal::bad_request("a token needs at least 1 activation"));
    }
    if uses > svc.max_uses {
        return Err(Refusal::new(
            ErrorCode::OverCeiling,
            format!(
                "{uses} activations is more than service {service} allows per token ({}); ask for fewer",
                svc.max_uses
            ),
        ));
    }
    let ttl = ttl.unwrap_or_else(|| b.served().config.default_ttl.min(svc.max_ttl));
    if ttl.is_zero() {
        return Err(Refusal::bad_request(
            "a token's lifetime must be longer than zero",
        ));
    }
    if ttl > svc.max_ttl {
        return Err(Refusal::new(
            ErrorCode::OverCeiling,
            format!(
                "a lifetime of {} is longer than service {service} allows ({}); ask for a shorter one",
                humantime::format_duration(ttl),
                humantime::format_duration(svc.max_ttl)
            ),
        ));
    }
    let now = now_secs();
    Ok(Claims {
        id: new_token_id()?,
        key_id: b.keyring.current_id(),
        service: service.to_owned(),
        rules,
        uses,
        issued_at: now,
        expires_at: Some(now + ttl.as_secs()),
        parent: None,
        holder_uid: bind_to_peer.then_some(peer.uid),
        budget: None,
    })
}

pub fn mint_event(peer: &Peer, claims: &Claims) -> Event {
    Event {
        token_id: Some(claims.id.to_string()),
        service: Some(claims.service.clone()),
        peer: Some(PeerJson::from(peer)),
        reason: Some(format!(
            "{} activation(s){}: {}",
            claims.uses,
            claims
                .budget
                .map(|n| format!(", a budget of {n} LLM tokens"))
                .unwrap_or_default(),
            claims
                .rules
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
        ..Event::default()
    }
}

/// A budget of LLM tokens: only for a service whose answers report their usage, and for a
/// narrowed token no more than every token above it has left.
fn check_budget(b: &Broker, claims: &Claims, budget: u64) -> Result<(), Refusal> {
    if budget == 0 {
        return Err(Refusal::bad_request(
            "a budget must be at least 1 LLM token",
        ));
    }
    if !b.service(&claims.service)?.config.llm_usage {
        return Err(Refusal::bad_request(format!(
            "service {} does not report the LLM tokens its answers use, so its tokens cannot carry \
             a budget (if it does, e.g. an OpenAI-compatible server of your own, set \
             llm_usage = true in its section of till.toml)",
            claims.service
        )));
    }
    if let Some(parent) = claims.parent {
        let map = b.tokens();
        let left = crate::broker::lineage(&map, parent)?
            .iter()
            .filter_map(|l| map[l].budget.map(|n| n.saturating_sub(map[l].budget_used)))
            .min();
        if let Some(left) = left
            && budget > left
        {
            return Err(Refusal::new(
                ErrorCode::OverCeiling,
                format!(
                    "the parent token has {left} LLM tokens of budget left; ask for at most that many"
                ),
            ));
        }
    }
    Ok(())
}

/// A child of `parent` (a whole token): within its rules, lifetime and remaining budget.
fn narrowed(
    b: &Broker,
    peer: &Peer,
    req: &MintRequest,
    parent: &str,
    rules: Vec<Rule>,
) -> Result<Claims, Refusal> {
    let p = b
        .keyring
        .verify(parent)
        .map_err(|e| Refusal::new(ErrorCode::BadToken, format!("the parent token: {e}")))?;
    if p.service != req.service {
        return Err(Refusal::new(
            ErrorCode::WrongService,
            format!(
                "the parent token is for service {}, not {}; a narrowed token keeps its parent's service",
                p.service, req.service
            ),
        ));
    }
    let now = now_secs();
    let (left, parent_exp) = {
        let map = b.tokens();
        let lineage = crate::broker::lineage(&map, p.id)?;
        if lineage.len() >= crate::broker::MAX_LINEAGE {
            return Err(Refusal::bad_request(
                "tokens may be narrowed at most 8 levels deep",
            ));
        }
        let mut left = u32::MAX;
        for link in &lineage {
            let rec = &map[link];
            if rec.state(now) != TokenState::Live {
                return Err(Refusal::new(
                    ErrorCode::Revoked,
                    format!(
                        "the parent token (or one it was narrowed from) is {}; ask for a new one",
                        rec.state(now).as_str()
                    ),
                ));
            }
            left = left.min(rec.uses - rec.used);
        }
        (left, p.expires_at)
    };
    let rules = if rules.is_empty() {
        p.rules.clone()
    } else {
        rules
    };
    if let Some(rule) = first_uncovered(&p.rules, &rules) {
        return Err(Refusal::new(
            ErrorCode::OverCeiling,
            format!(
                "'{rule}' is outside the parent token's rules ({}); a narrowed token can only allow less",
                p.rules
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let uses = req.uses.unwrap_or(1);
    if uses == 0 || uses > left {
        return Err(Refusal::new(
            ErrorCode::OverCeiling,
            format!("the parent token has {left} activation(s) left; ask for at most that many"),
        ));
    }
    let max_ttl = parent_exp.map_or(u64::MAX, |e| e.saturating_sub(now));
    let ttl = req
        .ttl_secs
        .unwrap_or_else(|| b.served().config.default_ttl.as_secs().min(max_ttl));
    if ttl == 0 || ttl > max_ttl {
        return Err(Refusal::new(
            ErrorCode::OverCeiling,
            format!("the parent token expires in {max_ttl}s; a narrowed token cannot outlive it"),
        ));
    }
    b.require_minter(peer)?;
    Ok(Claims {
        id: new_token_id()?,
        key_id: b.keyring.current_id(),
        service: p.service.clone(),
        rules,
        uses,
        issued_at: now,
        expires_at: Some(now + ttl),
        parent: Some(p.id),
        // A binding is inherited: narrowing never widens who may spend.
        holder_uid: p.holder_uid.or(req.bind_to_peer.then_some(peer.uid)),
        budget: None,
    })
}

pub async fn handle(b: &Broker, peer: &Peer, req: MintRequest) -> Result<Response, Refusal> {
    let note = match req.note.clone() {
        Some(n) if n.chars().count() > MAX_NOTE || n.chars().any(char::is_control) => {
            return Err(Refusal::bad_request(format!(
                "a note is at most {MAX_NOTE} characters without control characters"
            )));
        }
        n => n,
    };
    let rules = req
        .allow
        .iter()
        .map(|r| Rule::parse(r).map_err(|e| Refusal::bad_request(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let claims = match &req.from {
        Some(parent) => narrowed(b, peer, &req, parent, rules)?,
        None => {
            let rules = if rules.is_empty() {
                b.service(&req.service)?.config.allow.clone()
            } else {
                rules
            };
            claims_for(
                b,
                peer,
                &req.service,
                rules,
                req.uses,
                req.ttl_secs.map(Duration::from_secs),
                req.bind_to_peer,
            )?
        }
    };
    let mut claims = claims;
    if let Some(budget) = req.budget {
        check_budget(b, &claims, budget)?;
        claims.budget = Some(budget);
    }
    let token = claims
        .sign(&b.keyring.current())
        .map_err(|e| Refusal::bad_request(e.to_string()))?;
    let mut record = TokenRecord::from_claims(&claims, peer, note);
    record.canary = req.canary;
    let info = record.info(now_secs());
    if b.store.failure().is_some() {
        // The store's last write failed: this one is written durably before the token is
        // handed out, not lazily. A store that still cannot write refuses the mint (the token
        // could never be spent); one that can again clears `till status`'s warning.
        if let Err(e) = b.store.put_durable(&record).wait().await {
            return Err(Refusal::internal(format!(
                "{e}; no token was minted. If the disk is full, free space and restart tilld"
            )));
        }
    }
    b.insert(record);
    if let Err(refusal) = b.audit(EventKind::Mint, mint_event(peer, &claims)) {
        // Fail closed: a token whose mint is not in the trail must not work.
        if let Some(rec) = b.tokens().get_mut(&claims.id) {
            rec.revoked_at = Some(now_secs());
            b.store.put(rec);
        }
        return Err(refusal);
    }
    b.metrics.mint();
    Ok(Response::Minted(MintReply { token, info }))
}
