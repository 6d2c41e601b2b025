//! `call`: spend one activation and make the upstream request with the real key.
//!
//! Order matters: every check that can refuse runs first and costs nothing; then the activation is
//! taken under the state lock and committed durably (together with the audit event) before a
//! single byte goes upstream. A crash after the commit can lose a request, never add one.

use till_protocol::{
    CallReply, CallRequest, Claims, ErrorCode, Method, RequestPath, Response, Rule,
};

use crate::audit::{Event, EventKind, PeerJson};
use crate::broker::{Broker, CallInFlight, Refusal};
use crate::handlers::mint::{claims_for, mint_event};
use crate::peer::Peer;
use crate::proxy::{self, Outgoing, ProxyError};
use crate::store::TokenRecord;

/// What a caller asks to spend, from any adapter (socket, gateway, MCP).
pub struct CallTarget<'a> {
    /// The capability token, if the caller presented one.
    pub token: Option<&'a str>,
    /// The service named by the caller: must match the token's, or (without a token) the service
    /// to mint a one-shot token for.
    pub service: Option<&'a str>,
    pub method: &'a str,
    /// Path and optional query.
    pub path: &'a str,
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
    /// Whether a missing token may be replaced by a one-shot token for exactly this request.
    /// The socket and MCP allow it (their peers are identified); the gateway does not.
    pub allow_one_shot: bool,
}

/// An activation that has been taken, committed durably and audited: the request may now go.
pub struct Activation {
    pub claims: Claims,
    pub method: Method,
    pub path: RequestPath,
    pub remaining: u32,
    /// The token (or one above it) has a budget: the answer's LLM usage is charged to it.
    pub budgeted: bool,
    /// Its `answer` line, owed since its `activate` line was written.
    answer: OwedAnswer,
    /// Counts this call in flight until the caller is done with it (upstream answer included).
    _in_flight: CallInFlight,
}

/// The `answer` line an `activate` line is owed. If none was written when this is dropped (the
/// caller went away, and its request's future with it, while the commit or the upstream was
/// awaited), one that says so is.
struct OwedAnswer {
    broker: Broker,
    /// The activation's audit event, which its answer line repeats.
    event: Event,
    paid: std::sync::atomic::AtomicBool,
}

impl OwedAnswer {
    /// Writes the line with `event`'s status or reason set, unless one was written already.
    fn pay(&self, fill: impl FnOnce(&mut Event)) {
        if self.paid.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut event = self.event.clone();
        fill(&mut event);
        if let Err(e) = self.broker.audit.record(EventKind::Answer, event) {
            tracing::error!(error = %e, "could not audit an upstream answer");
        }
    }
}

impl Drop for OwedAnswer {
    fn drop(&mut self) {
        self.pay(|e| {
            e.reason = Some(
                "caller_gone: the caller went away before the upstream's answer came; the \
                 activation was spent"
                    .into(),
            );
        });
    }
}

/// Runs every check, takes one activation, commits it durably and audits it. Nothing has been
/// sent upstream when this returns; after `Ok`, the request must be sent (it has been counted).
pub async fn activate(
    b: &Broker,
    peer: &Peer,
    target: CallTarget<'_>,
) -> Result<Activation, Refusal> {
    let in_flight = b.call_in_flight();
    let mut event = Event {
        service: target.service.map(str::to_owned),
        method: Some(target.method.chars().take(16).collect()),
        peer: Some(PeerJson::from(peer)),
        ..Event::default()
    };
    let (method, path) = match parse_request(b, &target) {
        Ok(x) => x,
        Err(refusal) => return Err(b.deny(peer, event, refusal)),
    };
    event.method = Some(method.to_string());
    event.path = Some(path.path());
    let (claims, one_shot) = match resolve(b, peer, &target, method, &path) {
        Ok(x) => x,
        Err(refusal) => return Err(b.deny(peer, event, refusal)),
    };
    event.token_id = Some(claims.id.to_string());
    event.service = Some(claims.service.clone());
    if let Err(refusal) = check_claims(b, peer, &claims, method, &path) {
        return Err(b.deny(peer, event, refusal));
    }
    if let Err(refusal) = watch_for_abuse(b, peer, &claims, &target) {
        return Err(b.deny(peer, event, refusal));
    }
    let fresh = one_shot.then(|| TokenRecord::from_claims(&claims, peer, Some("one-shot".into())));
    // A refusal from here on changes nothing: the activation is given back, or a one-shot token
    // minted for this request is removed.
    let give_back = || {
        if one_shot {
            b.forget(claims.id);
        } else {
            b.unreserve(claims.id);
        }
    };
    let (durable, remaining, budgeted) = match b.reserve(claims.id, fresh) {
        Ok(x) => x,
        Err(refusal) => {
            if one_shot {
                b.forget(claims.id);
            }
            return Err(b.deny(peer, event, refusal));
        }
    };
    if one_shot {
        if let Err(refusal) = b.audit(EventKind::Mint, mint_event(peer, &claims)) {
            give_back();
            return Err(refusal);
        }
        b.metrics.mint();
    }
    // The activation's audit line is written while its commit is in flight on the committer
    // thread (this one would only wait); both are done before a byte goes upstream. If the commit
    // fails, a `deny` line follows, saying the activation was given back and nothing was sent.
    let audited = b.audit(EventKind::Activate, event.clone());
    let answer = OwedAnswer {
        broker: b.clone(),
        event: event.clone(),
        // Nothing is owed for an `activate` line that was not written.
        paid: std::sync::atomic::AtomicBool::new(audited.is_err()),
    };
    if let Err(e) = durable.wait_or_lead(in_flight.alone()).await {
        give_back();
        let refusal = Refusal::internal(format!(
            "{e}; the activation was given back and nothing was sent upstream"
        ));
        if audited.is_ok() {
            // A `deny` in place of the answer; not through `deny`: this line must not be folded
            // into a burst summary.
            answer
                .paid
                .store(true, std::sync::atomic::Ordering::Relaxed);
            event.reason = Some(refusal.audit_reason());
            let _ = b.audit(EventKind::Deny, event);
        }
        return Err(refusal);
    }
    if let Err(refusal) = audited {
        // Nothing goes upstream without its `activate` line, so nothing is spent either: the
        // activation is given back (a crash before that reaches the store leaves it spent, the
        // safe side).
        give_back();
        return Err(refusal);
    }
    b.metrics.activation();
    Ok(Activation {
        claims,
        method,
        path,
        remaining,
        budgeted,
        answer,
        _in_flight: in_flight,
    })
}

impl Activation {
    /// Charges what the answer used to the token's budget (callers read the usage, and call
    /// this, only when `budgeted`). An answer that does not say: nothing for a refusal by the
    /// upstream (status 400 and up, which providers do not bill), and a budget that can no longer
    /// be kept for anything else.
    pub fn charge(&self, b: &Broker, status: u16, used: Option<u64>) {
        b.charge(self.claims.id, used.or((status >= 400).then_some(0)));
    }

    /// The second line of every activation: the upstream's status, or why there was none. The
    /// request has been made by then, so a line that cannot be written is logged, and the caller
    /// still gets the answer.
    pub fn audit_answer(&self, outcome: Result<u16, &Refusal>) {
        self.answer.pay(|event| match outcome {
            Ok(status) => event.status = Some(status),
            Err(r) => event.reason = Some(r.audit_reason()),
        });
    }
}

/// How an upstream failure reads to the caller. The activation was spent: the request was sent.
pub fn upstream_refusal(service: &str, e: &ProxyError) -> Refusal {
    tracing::warn!(service, error = %e, "upstream request failed");
    let code = match e {
        ProxyError::BadHeader(_) => ErrorCode::BadRequest,
        ProxyError::Timeout(_) | ProxyError::Stalled(_) => ErrorCode::UpstreamTimeout,
        _ => ErrorCode::UpstreamFailed,
    };
    Refusal::new(
        code,
        format!("{e}; the activation was spent because the request was sent"),
    )
}

pub async fn handle(b: &Broker, peer: &Peer, req: CallRequest) -> Result<Response, Refusal> {
    let target = CallTarget {
        token: req.token.as_deref(),
        service: req.service.as_deref(),
        method: &req.method,
        path: &req.path,
        headers: &req.headers,
        body: &req.body,
        allow_one_shot: true,
    };
    let act = activate(b, peer, target).await?;
    let svc = b.service(&act.claims.service).inspect_err(|refusal| {
        act.audit_answer(Err(refusal));
    })?;
    let out = Outgoing {
        method: act.method,
        path: &act.path,
        headers: &req.headers,
        body: req.body.into(),
    };
    let started = std::time::Instant::now();
    let result = proxy::forward(&svc, out, b.served().config.max_body).await;
    b.metrics.upstream(&act.claims.service, started.elapsed());
    match result {
        Ok(reply) => {
            act.audit_answer(Ok(reply.status));
            if act.budgeted {
                let content_type = reply
                    .headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                    .map(|(_, v)| v.as_str());
                let used = crate::usage::of_body(content_type, &reply.body);
                act.charge(b, reply.status, used);
            }
            Ok(Response::Called(CallReply {
                status: reply.status,
                headers: reply.headers,
                body: reply.body,
                token_id: act.claims.id.to_string(),
                activations_remaining: act.remaining,
            }))
        }
        Err(e) => {
            let refusal = upstream_refusal(&act.claims.service, &e);
            act.audit_answer(Err(&refusal));
            Err(refusal)
        }
    }
}

fn parse_request(b: &Broker, t: &CallTarget<'_>) -> Result<(Method, RequestPath), Refusal> {
    let method =
        Method::parse_request(t.method).map_err(|e| Refusal::bad_request(e.to_string()))?;
    let path = RequestPath::parse(t.path).map_err(|e| match path_in_url(b, t) {
        Some(p) => Refusal::bad_request(format!("{e}; for this URL, give the path {p}")),
        None => Refusal::bad_request(e.to_string()),
    })?;
    proxy::check_headers(t.headers).map_err(|e| Refusal::bad_request(e.to_string()))?;
    check_overrides(&path, t.headers, t.body)?;
    if t.body.len() > b.served().config.max_body {
        return Err(Refusal::bad_request(format!(
            "the request body is {} bytes, over the limit of {}",
            t.body.len(),
            b.served().config.max_body
        )));
    }
    Ok((method, path))
}

/// Headers that some servers take as the request's method (Google's APIs, many frameworks) or path
/// (IIS, Symfony) in place of the request line's.
const OVERRIDE_HEADERS: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
];

/// Refuses what would have the upstream act on another method or path than the one the token's
/// rules were checked against: an override header, or a `_method` parameter (Rails, Laravel and
/// Symfony read it from the query or a form body). Refused, not dropped: without it the request
/// would still go, as something the caller did not mean.
fn check_overrides(
    path: &RequestPath,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<(), Refusal> {
    if let Some((k, _)) = headers
        .iter()
        .find(|(k, _)| OVERRIDE_HEADERS.iter().any(|h| k.eq_ignore_ascii_case(h)))
    {
        return Err(Refusal::bad_request(format!(
            "header {} is refused: some servers take it as the request's method or path, past the \
             rules this request was checked against; send that method and path themselves",
            k.to_ascii_lowercase()
        )));
    }
    let method_param = |s: &[u8]| url::form_urlencoded::parse(s).any(|(k, _)| k == "_method");
    let content_type = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let in_body = match essence.as_str() {
        "application/x-www-form-urlencoded" => method_param(body),
        "multipart/form-data" => multipart_method_field(content_type, body),
        _ => false,
    };
    if in_body || path.query().is_some_and(|q| method_param(q.as_bytes())) {
        return Err(Refusal::bad_request(
            "a _method parameter is refused: some servers take it as the request's method, past \
             the rules this request was checked against; send that method itself",
        ));
    }
    Ok(())
}

/// Whether a multipart form has a part named `_method`: read from the parts' own headers, so a
/// file that holds the text (a Rails view has `name="_method"` in it) is not taken for one.
fn multipart_method_field(content_type: &str, body: &[u8]) -> bool {
    let Some(boundary) = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .map(|b| b.trim_matches('"'))
        .filter(|b| !b.is_empty())
    else {
        return false;
    };
    let delimiter = format!("--{boundary}");
    memchr::memmem::find_iter(body, delimiter.as_bytes()).any(|at| {
        let start = at + delimiter.len();
        let end =
            memchr::memmem::find(&body[start..], b"\r\n\r\n").map_or(body.len(), |e| start + e);
        String::from_utf8_lossy(&body[start..end])
            .lines()
            .any(|line| {
                let line = line.trim().to_ascii_lowercase();
                line.starts_with("content-disposition:")
                    && line
                        .split(';')
                        .any(|p| matches!(p.trim(), "name=\"_method\"" | "name=_method"))
            })
    })
}

/// The path to give for a whole URL given as the path (an agent copies one from an answer, such
/// as GitHub's next-page link): what follows the named service's base URL when the URL is under it,
/// else the URL's own path and query. Only a hint in the refusal: a URL is never taken as a path.
/// The refusal is quoted in the trail, so no hint longer than a path may be, nor one that holds a
/// master credential (it is refused for what it is, without one).
fn path_in_url(b: &Broker, t: &CallTarget<'_>) -> Option<String> {
    if t.path.len() > RequestPath::MAX_LEN
        || b.served()
            .services
            .values()
            .any(|s| s.scrubber.contains(t.path.as_bytes()))
    {
        return None;
    }
    let url = reqwest::Url::parse(t.path).ok()?;
    if !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    let on_url = &url[url::Position::BeforePath..url::Position::AfterQuery];
    let under_base = t.service.and_then(|name| {
        let served = b.served();
        let base = &served.services.get(name)?.config.base_url;
        let rest = crate::links::after_base_path(base, on_url)?;
        (url.origin() == base.origin() && rest.starts_with('/')).then(|| rest.to_owned())
    });
    under_base.or_else(|| Some(on_url.to_owned()))
}

/// The alert rules that look at a request: a canary presented (refused as if revoked, so the
/// tripwire does not show), a token spent by another uid than its minter, a master credential in
/// what the caller sent (refused: it is never forwarded).
fn watch_for_abuse(
    b: &Broker,
    peer: &Peer,
    claims: &Claims,
    target: &CallTarget<'_>,
) -> Result<(), Refusal> {
    let (canary, minter) = b
        .tokens()
        .get(&claims.id)
        .map(|r| (r.canary, r.minted_by_uid))
        .unwrap_or((false, None));
    if canary {
        crate::alerts::raise(
            b,
            "canary",
            peer,
            Some(claims.id),
            "a canary token was presented".into(),
        );
        return Err(Refusal::new(
            ErrorCode::Revoked,
            "this token was revoked; ask for a new one",
        ));
    }
    if let Some(m) = minter
        && m != peer.uid
        && peer.uid != crate::peer::UNKNOWN_UID
        && b.first_mismatch(claims.id)
    {
        crate::alerts::raise(
            b,
            "holder_mismatch",
            peer,
            Some(claims.id),
            format!(
                "a token minted by uid {m} was presented by uid {}",
                peer.uid
            ),
        );
    }
    let served = b.served();
    let leaked = served.services.values().any(|s| {
        s.scrubber.contains(target.body)
            || target
                .headers
                .iter()
                .any(|(_, v)| s.scrubber.contains(v.as_bytes()))
            || s.scrubber.contains(target.path.as_bytes())
    });
    if leaked {
        crate::alerts::raise(
            b,
            "credential_in_request",
            peer,
            Some(claims.id),
            "a request carried a master credential Till holds".into(),
        );
        return Err(Refusal::new(
            ErrorCode::BadRequest,
            "the request contains a master credential that Till holds; it was not sent, and an \
             alert was raised. Use a Till token instead of the key",
        ));
    }
    Ok(())
}

/// The claims to spend: from a verified token, or freshly minted for exactly this request.
fn resolve(
    b: &Broker,
    peer: &Peer,
    req: &CallTarget<'_>,
    method: Method,
    path: &RequestPath,
) -> Result<(Claims, bool), Refusal> {
    match (req.token, req.service) {
        (Some(token), service) => {
            let claims = b
                .keyring
                .verify(token)
                .map_err(|e| Refusal::new(ErrorCode::BadToken, e.to_string()))?;
            if let Some(s) = service
                && s != claims.service
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
        (None, _) if !req.allow_one_shot => Err(Refusal::new(
            ErrorCode::BadToken,
            "no Till token was presented: put the token where your SDK puts its API key \
             (Authorization: Bearer till_..., x-api-key, x-goog-api-key or ?key=)",
        )),
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
