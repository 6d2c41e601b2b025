//! `call`: spend one activation and make the upstream request with the real key.
//!
//! Order matters: every check that can refuse runs first and costs nothing; then the activation is
//! taken under the state lock and committed durably (together with the audit event) before a
//! single byte goes upstream. A crash after the commit can lose a request, never add one.

use till_protocol::{
    CallReply, CallRequest, Claims, ErrorCode, Method, RequestPath, Response, Rule,
};

use crate::audit::{Event, EventKind, PeerJson};
use crate::broker::{Broker, Refusal};
use crate::handlers::mint::{claims_for, mint_event};
use crate::peer::Peer;
use crate::proxy::{self, Outgoing, ProxyError};
use crate::store::TokenRecord;

pub async fn handle(b: &Broker, peer: &Peer, req: CallRequest) -> Result<Response, Refusal> {
    let method =
        Method::parse_request(&req.method).map_err(|e| Refusal::bad_request(e.to_string()))?;
    let path = RequestPath::parse(&req.path).map_err(|e| Refusal::bad_request(e.to_string()))?;
    let mut event = Event {
        service: req.service.clone(),
        method: Some(method.to_string()),
        path: Some(path.path()),
        ..Event::default()
    };
    let early = check_request(b, &req);
    if let Err(refusal) = early {
        return Err(b.deny(peer, event, refusal));
    }
    let (claims, one_shot) = match resolve(b, peer, &req, method, &path) {
        Ok(x) => x,
        Err(refusal) => return Err(b.deny(peer, event, refusal)),
    };
    event.token_id = Some(claims.id.to_string());
    event.service = Some(claims.service.clone());
    if let Err(refusal) = check_claims(b, peer, &claims, method, &path) {
        return Err(b.deny(peer, event, refusal));
    }
    let fresh = one_shot.then(|| TokenRecord::from_claims(&claims, peer, Some("one-shot".into())));
    let (durable, remaining) = match b.reserve(claims.id, fresh) {
        Ok(x) => x,
        Err(refusal) => return Err(b.deny(peer, event, refusal)),
    };
    event.peer = Some(PeerJson::from(peer));
    if one_shot {
        b.audit(EventKind::Mint, mint_event(peer, &claims))?;
    }
    if let Err(e) = durable.wait().await {
        b.unreserve(claims.id);
        return Err(Refusal::internal(format!("{e}; nothing was sent upstream")));
    }
    // The activation is on disk; its audit line goes before a byte goes upstream.
    b.audit(EventKind::Activate, event)?;

    let svc = b.service(&claims.service)?;
    let out = Outgoing {
        method,
        path: &path,
        headers: &req.headers,
        body: req.body,
    };
    match proxy::forward(
        &svc.client,
        &svc.config,
        &svc.secret,
        &svc.scrubber,
        out,
        b.config.max_body,
    )
    .await
    {
        Ok(reply) => Ok(Response::Called(CallReply {
            status: reply.status,
            headers: reply.headers,
            body: reply.body,
            token_id: claims.id.to_string(),
            activations_remaining: remaining,
        })),
        Err(e) => {
            tracing::warn!(service = %claims.service, error = %e, "upstream request failed");
            let code = match e {
                ProxyError::BadHeader(_) => ErrorCode::BadRequest,
                _ => ErrorCode::UpstreamFailed,
            };
            Err(Refusal::new(
                code,
                format!("{e}; the activation was spent because the request was sent"),
            ))
        }
    }
}

/// Checks that cost nothing and need no token: headers and body size.
fn check_request(b: &Broker, req: &CallRequest) -> Result<(), Refusal> {
    proxy::check_headers(&req.headers).map_err(|e| Refusal::bad_request(e.to_string()))?;
    if req.body.len() > b.config.max_body {
        return Err(Refusal::bad_request(format!(
            "the request body is {} bytes, over the limit of {}",
            req.body.len(),
            b.config.max_body
        )));
    }
    Ok(())
}

/// The claims to spend: from a verified token, or freshly minted for exactly this request.
fn resolve(
    b: &Broker,
    peer: &Peer,
    req: &CallRequest,
    method: Method,
    path: &RequestPath,
) -> Result<(Claims, bool), Refusal> {
    match (&req.token, &req.service) {
        (Some(token), service) => {
            let claims = b
                .keyring
                .verify(token)
                .map_err(|e| Refusal::new(ErrorCode::BadToken, e.to_string()))?
                .into_claims();
            if let Some(s) = service
                && *s != claims.service
            {
                return Err(Refusal::new(
                    ErrorCode::WrongService,
                    format!(
                        "this token is for service {}, not {s}; use a token minted for {s}",
                        claims.service
                    ),
                ));
            }
            Ok((claims, false))
        }
        (None, Some(service)) => {
            let rule = Rule::exact(method, path);
            Ok((
                claims_for(b, peer, service, vec![rule], Some(1), None, false)?,
                true,
            ))
        }
        (None, None) => Err(Refusal::bad_request(
            "a call needs a token, or a service to mint a one-shot token for",
        )),
    }
}

fn check_claims(
    b: &Broker,
    peer: &Peer,
    claims: &Claims,
    method: Method,
    path: &RequestPath,
) -> Result<(), Refusal> {
    b.service(&claims.service)?;
    if !claims.rules.iter().any(|r| r.matches(method, path)) {
        let rules: Vec<String> = claims.rules.iter().map(ToString::to_string).collect();
        return Err(Refusal::new(
            ErrorCode::OutOfScope,
            format!(
                "{method} {} is outside this token's rules ({}); mint a token that allows it",
                path.path(),
                rules.join(", ")
            ),
        ));
    }
    if let Some(uid) = claims.holder_uid
        && uid != peer.uid
    {
        return Err(Refusal::new(
            ErrorCode::WrongHolder,
            format!(
                "this token is bound to uid {uid} and cannot be spent by uid {}",
                peer.uid
            ),
        ));
    }
    Ok(())
}
