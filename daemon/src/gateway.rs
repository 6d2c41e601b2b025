//! The HTTP gateway on loopback: SDKs that only know "base URL + API key" use a Till token as the
//! key, and Till makes the call with the real one. An adapter over the same `activate` as the
//! socket's `call`; the only rules here are HTTP's (where the token sits, how a refusal looks).
//!
//! Routes:
//! - `/proxy/{service}/...`: to the service's base URL + `/...`; the token must be for that service.
//!   A `/...` that begins with the base URL's own path (`/openai/v1/...` for a base URL ending in
//!   `/openai`, as Groq's SDK sends it) has that part taken once.
//! - `/v1/...`: the service is the token's own; the path goes upstream as it is (`/v1/...`), so
//!   `base_url=http://127.0.0.1:8719/v1` works with the OpenAI SDK for any OpenAI-compatible preset.
//! - `GET /healthz`, `GET /metrics` (Prometheus text).
//!
//! The token is read from where each SDK puts its key: `Authorization: Bearer` (OpenAI and most),
//! `Authorization: token` (GitHub clients), `x-api-key` (Anthropic), `x-goog-api-key` or `?key=`
//! (Gemini). It is removed before the request goes on; the real key is injected the service's way.
//! Responses stream through chunk by chunk, scrubbed (see `proxy::StreamScrubber`); one request,
//! streamed or not, is one activation.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use till_protocol::ErrorCode;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::broker::{Broker, Refusal, Service};
use crate::handlers::call::{CallTarget, activate, upstream_refusal};
use crate::links::{self, BodyRebase, Rebase};
use crate::peer::Peer;
use crate::proxy::{self, Outgoing, StreamScrubber};
use crate::usage::UsageMeter;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

pub const REMAINING_HEADER: &str = "till-activations-remaining";

/// Accepts until `shutdown`; each connection is served on `tracker`.
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mcp = Arc::new(crate::mcp::http_service(
        broker.clone(),
        shutdown.child_token(),
    ));
    let mut failing = crate::server::AcceptFailures::default();
    let open = Arc::new(crate::server::OpenConnections::new(
        "gateway connections",
        "daemon.gateway_max_connections",
    ));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, remote) = match accepted {
            Ok(x) => {
                failing.succeeded("gateway");
                x
            }
            Err(e) => {
                failing.failed(&e, "gateway").await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(remote);
        let peer = Peer::from_tcp(local, remote);
        let max = broker.served().config.gateway_max_connections;
        let Some(held) = open.take(peer.uid, max) else {
            tracker.spawn(refuse_connection(stream, max));
            continue;
        };
        let span = tracing::info_span!("http", id = peer.conn, %remote);
        let conn = connection(stream, peer, broker.clone(), mcp.clone(), shutdown.clone());
        tracker.spawn(
            async move {
                conn.await;
                drop(held);
            }
            .instrument(span),
        );
    }
}

/// A connection over its uid's cap: a 503 that says why, then closed. What the client sent is
/// read (briefly) first, so that closing does not reset the connection and lose the answer.
async fn refuse_connection(mut stream: tokio::net::TcpStream, max: usize) {
    use tokio::io::AsyncWriteExt;
    let refusal = Refusal::new(
        ErrorCode::TooManyConnections,
        format!(
            "this user already holds {max} connections to the gateway, the most it allows \
             (daemon.gateway_max_connections); close some, or reuse them (keep-alive)"
        ),
    );
    let body = refusal_body(&refusal, StatusCode::SERVICE_UNAVAILABLE);
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    crate::server::read_briefly(&mut stream).await;
    let _ = stream.write_all(format!("{head}{body}").as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: Peer,
    b: Broker,
    mcp: Arc<crate::mcp::HttpService>,
    shutdown: CancellationToken,
) {
    let idle = b.served().config.gateway_idle_timeout;
    let svc = hyper::service::service_fn(move |req| {
        let b = b.clone();
        let peer = peer.clone();
        let mcp = mcp.clone();
        async move {
            // Counted so that native-socket connections do not busy-poll while the gateway works
            // (its /mcp requests are counted again in `dispatch`, which does no harm).
            let _busy = crate::broker::REQUESTS.start();
            if req.uri().path() == "/mcp" {
                return Ok::<_, Infallible>(mcp_request(&mcp, peer, req, idle).await);
            }
            Ok::<_, Infallible>(handle(&b, &peer, req).await)
        }
    });
    // Without a timer hyper applies no header timeout at all: a connection that never sends a
    // request (or stops between two) would hold its descriptor and task for ever.
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(idle)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            // Finish the request in flight (a stream included), then close.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "gateway connection ended");
    }
}

/// MCP over streamable HTTP: rmcp's service, with this connection's peer in the request so the
/// tools know who is calling.
async fn mcp_request(
    mcp: &crate::mcp::HttpService,
    peer: Peer,
    mut req: Request<Incoming>,
    idle: std::time::Duration,
) -> Response<Body> {
    // A POST without a session id opens a session: refused past the cap, before rmcp builds it.
    let opens =
        req.method() == hyper::Method::POST && !req.headers().contains_key("mcp-session-id");
    if opens && mcp.open_sessions().await >= crate::mcp::MAX_HTTP_SESSIONS {
        tracing::warn!(
            uid = peer.uid,
            max = crate::mcp::MAX_HTTP_SESSIONS,
            "refused a new MCP session: too many are open"
        );
        // Read (and drop) the request first, so the connection stays usable.
        let _ = read_body(req.into_body(), 1 << 20, idle).await;
        let body = serde_json::json!({
            "jsonrpc": "2.0",
            "id": null,
            "error": {
                "code": -32000,
                "message": format!(
                    "Till: {} MCP sessions are open, the most it keeps; close one (DELETE /mcp with \
                     its Mcp-Session-Id) or try again later (idle ones close after 5 minutes)",
                    crate::mcp::MAX_HTTP_SESSIONS
                ),
            },
        });
        return full(
            StatusCode::SERVICE_UNAVAILABLE,
            "application/json",
            body.to_string(),
        );
    }
    req.extensions_mut().insert(peer);
    let deletes = req.method() == hyper::Method::DELETE;
    let resp = mcp
        .service
        .handle(req)
        .await
        .map(|body| body.map_err(|never| match never {}).boxed_unsync());
    if deletes && resp.status() == StatusCode::ACCEPTED {
        // rmcp says 202 for a session it closed; the Python MCP SDK takes only 200 or 204 as
        // success and logs a failure otherwise. 204: done, nothing to say.
        let mut done = full(StatusCode::NO_CONTENT, "text/plain", Bytes::new());
        done.headers_mut().remove(hyper::header::CONTENT_TYPE);
        return done;
    }
    resp
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    resp
}

/// A refusal in the shape OpenAI's, Anthropic's and most SDKs turn into a readable exception:
/// `{"error": {"message", "type", "code"}}` (plus Anthropic's top-level `"type": "error"`).
fn refusal_response(r: &Refusal, remaining: Option<u32>) -> Response<Body> {
    let status = match r.code {
        ErrorCode::BadToken | ErrorCode::UnknownToken | ErrorCode::Expired | ErrorCode::Revoked => {
            StatusCode::UNAUTHORIZED
        }
        ErrorCode::OutOfScope
        | ErrorCode::WrongService
        | ErrorCode::WrongHolder
        | ErrorCode::OverCeiling
        | ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::Exhausted => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::UnknownService => StatusCode::NOT_FOUND,
        ErrorCode::BadRequest | ErrorCode::BadFrame | ErrorCode::VersionMismatch => {
            StatusCode::BAD_REQUEST
        }
        ErrorCode::UpstreamFailed => StatusCode::BAD_GATEWAY,
        ErrorCode::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::ShuttingDown | ErrorCode::TooManyConnections => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut resp = full(status, "application/json", refusal_body(r, status));
    if let Some(n) = remaining {
        resp.headers_mut()
            .insert(REMAINING_HEADER, HeaderValue::from(n));
    }
    let retry_is_futile = match r.code {
        // A retry would be sent again, and costs an activation: futile only with none left.
        ErrorCode::UpstreamFailed | ErrorCode::UpstreamTimeout => remaining == Some(0),
        ErrorCode::ShuttingDown | ErrorCode::TooManyConnections | ErrorCode::Internal => false,
        _ => true,
    };
    if retry_is_futile {
        resp.headers_mut()
            .insert(SHOULD_RETRY, HeaderValue::from_static("false"));
    }
    resp
}

/// A refusal's JSON, in the shape SDKs read (see `refusal_response`).
fn refusal_body(r: &Refusal, status: StatusCode) -> String {
    serde_json::json!({
        "type": "error",
        "error": {
            "message": format!("Till: {}", r.message),
            "type": format!("till_{}", r.code.as_str()),
            "code": r.code.as_str(),
            // Google's SDKs name an error by this (google.rpc.Code for the HTTP status).
            "status": google_status(status),
        }
    })
    .to_string()
}

/// The google.rpc.Code name Google's APIs give with an HTTP status, which its SDKs show.
fn google_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 413 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        502 | 503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

/// The OpenAI and Anthropic SDKs retry a 408, 409, 429 or 5xx by themselves (twice, with backoff)
/// unless the answer says `x-should-retry: false`. Till says so when a retry cannot succeed: a
/// spent, bad or out-of-scope token gets the same refusal again, seconds later and with two more
/// `deny` lines; and an upstream failure with no activation left would be retried into "spent",
/// which hides the failure the agent should see.
const SHOULD_RETRY: &str = "x-should-retry";

/// Finds the token where an SDK puts its API key. Returns it and the query without `key=till_…`.
fn extract_token<'a>(
    headers: &'a hyper::HeaderMap,
    query: Option<&'a str>,
) -> (Option<&'a str>, Option<String>) {
    let mut token = None;
    if let Some(auth) = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let value = auth.trim();
        let rest = value
            .split_once(' ')
            .filter(|(scheme, _)| {
                scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token")
            })
            .map(|(_, t)| t.trim());
        token = rest.filter(|t| t.starts_with(till_protocol::token::TOKEN_PREFIX));
    }
    for name in ["x-api-key", "x-goog-api-key"] {
        if token.is_none() {
            token = headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|t| t.starts_with(till_protocol::token::TOKEN_PREFIX));
        }
    }
    let query = query.map(|q| {
        let mut kept = Vec::new();
        for pair in q.split('&') {
            match pair.strip_prefix("key=") {
                Some(v) if v.starts_with(till_protocol::token::TOKEN_PREFIX) => {
                    if token.is_none() {
                        token = Some(v);
                    }
                }
                _ => kept.push(pair),
            }
        }
        kept.join("&")
    });
    (token, query.filter(|q| !q.is_empty()))
}

async fn handle(b: &Broker, peer: &Peer, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&hyper::Method::GET, "/healthz") => return full(StatusCode::OK, "text/plain", "ok\n"),
        (&hyper::Method::GET, "/metrics") => {
            let mut text = b.metrics.render(b.live_tokens());
            text.push_str(&secret_ages(b));
            return full(StatusCode::OK, "text/plain; version=0.0.4", text);
        }
        _ => {}
    }
    let proxied = path
        .strip_prefix("/proxy/")
        .map(|rest| rest.split_once('/').unwrap_or((rest, "")))
        .filter(|(svc, _)| !svc.is_empty());
    let (service, upstream_path) = if let Some((svc, tail)) = proxied {
        let mut tail = format!("/{tail}");
        // An SDK whose own default base URL is the origin (Groq's SDK: `https://api.groq.com`,
        // then `/openai/v1/...`) puts in front the path the service's base URL already ends
        // with (`https://api.groq.com/openai`): taken once, not twice.
        if let Ok(s) = b.service(svc)
            && let Some(rest) = links::after_base_path(&s.config.base_url, &tail)
            && rest.starts_with('/')
            && rest.len() < tail.len()
        {
            tail = rest.to_owned();
        }
        (Some(svc.to_owned()), tail)
    } else if path == "/v1" || path.starts_with("/v1/") {
        (None, path.clone())
    } else {
        let r = Refusal::new(
            ErrorCode::BadRequest,
            format!(
                "no route for {path:?}: use /proxy/SERVICE/... or /v1/... (with base_url \
                 http://{}/v1), /healthz or /metrics",
                b.served()
                    .config
                    .gateway
                    .map(|g| g.to_string())
                    .unwrap_or_default()
            ),
        );
        let mut resp = refusal_response(&r, None);
        *resp.status_mut() = StatusCode::NOT_FOUND;
        return resp;
    };
    let (token, query) = extract_token(req.headers(), req.uri().query());
    // Where the caller reached the gateway, for the upstream's own URLs in the answer (`links`).
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let token = token.map(str::to_owned);
    let target = match &query {
        Some(q) => format!("{upstream_path}?{q}"),
        None => upstream_path,
    };
    let method = req.method().as_str().to_owned();
    let mut headers = Vec::with_capacity(req.headers().len());
    for (k, v) in req.headers() {
        match v.to_str() {
            Ok(v) => headers.push((k.as_str().to_owned(), v.to_owned())),
            Err(_) => {
                let r = Refusal::bad_request(format!(
                    "header {} is not valid text",
                    crate::clip(k.as_str(), crate::MAX_QUOTED_NAME)
                ));
                return refuse_early(b, peer, &service, &method, StatusCode::BAD_REQUEST, r);
            }
        }
    }
    // The request body is read whole, within the limit, before an activation is taken: a body
    // over the limit is refused for free.
    let max = b.served().config.max_body;
    let idle = b.served().config.gateway_idle_timeout;
    // A client that waits for `100 Continue` before sending its body (curl does, for a large
    // one) is told at once when the length it declares is over the limit, and sends nothing.
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let waits = req
        .headers()
        .get(hyper::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if waits && declared.is_some_and(|n| n > max as u64) {
        let (status, r) = body_too_large(max);
        return refuse_early(b, peer, &service, &method, status, r);
    }
    let body = match read_body(req.into_body(), max, idle).await {
        Ok(body) => body,
        Err((status, r)) => return refuse_early(b, peer, &service, &method, status, r),
    };
    let act = activate(
        b,
        peer,
        CallTarget {
            token: token.as_deref(),
            service: service.as_deref(),
            method: &method,
            path: &target,
            headers: &headers,
            body: &body,
            allow_one_shot: false,
        },
    )
    .await;
    let act = match act {
        Ok(a) => a,
        Err(r) => {
            let remaining = token.as_deref().and_then(|t| remaining_of(b, t));
            return refusal_response(&r, remaining);
        }
    };
    let svc = match b.service(&act.claims.service) {
        Ok(svc) => svc,
        Err(refusal) => {
            act.audit_answer(Err(&refusal));
            return refusal_response(&refusal, None);
        }
    };
    let out = Outgoing {
        method: act.method,
        path: &act.path,
        headers: &headers,
        body,
    };
    let started = Instant::now();
    let upstream = proxy::send(&svc, out).await;
    b.metrics.upstream(&act.claims.service, started.elapsed());
    let upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            let refusal = upstream_refusal(&act.claims.service, &e);
            act.audit_answer(Err(&refusal));
            return refusal_response(&refusal, Some(act.remaining));
        }
    };
    // An answer known to be over the limit is refused whole, while a clear refusal can still be
    // sent; one of unknown length is cut off where it passes the limit (`stream_body`).
    if upstream.content_length().is_some_and(|n| n > max as u64) {
        let refusal = upstream_refusal(&act.claims.service, &proxy::ProxyError::TooLarge(max));
        act.audit_answer(Err(&refusal));
        return refusal_response(&refusal, Some(act.remaining));
    }
    act.audit_answer(Ok(upstream.status().as_u16()));
    let mut resp = Response::builder().status(upstream.status().as_u16());
    // Made only for an answer that can need it: most have no such header, and most services no
    // `rewrite_urls`.
    let names_itself = [
        hyper::header::LOCATION,
        hyper::header::CONTENT_LOCATION,
        hyper::header::LINK,
    ]
    .iter()
    .any(|h| upstream.headers().contains_key(h));
    let rebase = (names_itself || svc.config.rewrite_urls)
        .then(|| Rebase::new(&svc.config.base_url, &act.claims.service, host.as_deref()));
    let no_retry = act.remaining == 0 && upstream.status().as_u16() >= 400;
    if no_retry {
        resp = resp.header(SHOULD_RETRY, "false");
    }
    for (k, v) in proxy::response_headers(&upstream, &svc.scrubber) {
        if no_retry && k == SHOULD_RETRY {
            continue;
        }
        let new = rebase.as_ref().and_then(|r| match k.as_str() {
            "location" | "content-location" => r.url(&v),
            "link" => r.link(&v),
            _ => None,
        });
        let v = new.unwrap_or(v);
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(&v),
        ) {
            resp = resp.header(k, v);
        }
    }
    resp = resp.header(REMAINING_HEADER, act.remaining);
    let remaining = act.remaining;
    let content_type = upstream
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let body_rebase = rebase
        .as_ref()
        .filter(|_| svc.config.rewrite_urls && links::is_json(content_type))
        .and_then(Rebase::body);
    let metering = act.budgeted.then(|| Metering {
        meter: Some(UsageMeter::new(content_type)),
        status: upstream.status().as_u16(),
        broker: b.clone(),
        act,
    });
    let body = stream_body(svc.clone(), upstream, max, metering, body_rebase);
    resp.body(body).unwrap_or_else(|_| {
        refusal_response(
            &Refusal::internal("could not build the response"),
            Some(remaining),
        )
    })
}

/// A budgeted token's answer on its way: what it used is read as it passes and charged when the
/// body ends, or when the caller goes away before that (whatever was reported by then).
struct Metering {
    broker: Broker,
    act: crate::handlers::call::Activation,
    status: u16,
    meter: Option<UsageMeter>,
}

impl Drop for Metering {
    fn drop(&mut self) {
        if let Some(m) = self.meter.take() {
            self.act.charge(&self.broker, self.status, m.finish());
        }
    }
}

/// The upstream body, passed on chunk by chunk through the scrubber (then `rebase`, when the
/// service's own URLs in it are pointed at the gateway), within the size limit. The stream holds
/// its service snapshot, so a reload mid-stream changes nothing for it.
fn stream_body(
    svc: Arc<Service>,
    upstream: reqwest::Response,
    max: usize,
    metering: Option<Metering>,
    rebase: Option<BodyRebase>,
) -> Body {
    struct State {
        svc: Arc<Service>,
        chunks: futures_util::stream::BoxStream<'static, reqwest::Result<Bytes>>,
        held: Vec<u8>,
        seen: usize,
        max: usize,
        done: bool,
        metering: Option<Metering>,
        rebase: Option<BodyRebase>,
    }
    impl State {
        /// Reads the scrubbed bytes the caller gets for their usage, so no copy of the key sits
        /// in the meter's buffer.
        fn meter(&mut self, passed: &[u8]) {
            if let Some(m) = self.metering.as_mut().and_then(|m| m.meter.as_mut()) {
                m.feed(passed);
            }
        }
    }
    let state = State {
        svc,
        chunks: upstream.bytes_stream().boxed(),
        held: Vec::new(),
        seen: 0,
        max,
        done: false,
        metering,
        rebase,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            let next = st.chunks.next().await;
            let mut scrub = StreamScrubber::resume(&st.svc.scrubber, std::mem::take(&mut st.held));
            match next {
                Some(Ok(chunk)) => {
                    st.seen += chunk.len();
                    if st.seen > st.max {
                        tracing::warn!(service = %st.svc.config.name, max = st.max, "upstream body over the limit; cut off");
                        st.done = true;
                        return Some((
                            Err(std::io::Error::other("upstream body over the limit")),
                            st,
                        ));
                    }
                    let mut out = scrub.push(&chunk);
                    st.held = scrub.into_held();
                    if let Some(r) = st.rebase.as_mut() {
                        out = r.push(&out);
                    }
                    st.meter(&out);
                    if out.is_empty() {
                        continue;
                    }
                    return Some((Ok(Frame::data(Bytes::from(out))), st));
                }
                Some(Err(_)) => {
                    st.done = true;
                    return Some((
                        Err(std::io::Error::other("the upstream's answer was cut off")),
                        st,
                    ));
                }
                None => {
                    st.done = true;
                    let mut rest = scrub.finish();
                    if let Some(mut r) = st.rebase.take() {
                        rest = r.push(&rest);
                        rest.extend(r.finish());
                    }
                    st.meter(&rest);
                    if rest.is_empty() {
                        return None;
                    }
                    return Some((Ok(Frame::data(Bytes::from(rest))), st));
                }
            }
        }
    });
    BodyExt::boxed_unsync(StreamBody::new(stream))
}

/// How much of a body over the limit is read and thrown away before the refusal goes back.
const DRAIN_MAX: usize = 64 * 1024 * 1024;

/// Reads a request body whole, within `max` bytes, each piece within `idle`.
///
/// A body over the limit is read on and thrown away (up to [`DRAIN_MAX`] more) before the
/// refusal is sent, as nginx's lingering close does: a client still sending when the connection
/// closes gets a reset, which its SDK reports as a network error instead of Till's 413.
async fn read_body(
    mut body: Incoming,
    max: usize,
    idle: std::time::Duration,
) -> Result<Bytes, (StatusCode, Refusal)> {
    let mut kept = bytes::BytesMut::new();
    let mut seen = 0usize;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => break,
            Ok(Some(Err(_))) => {
                let r = Refusal::bad_request("the request body was cut off");
                return Err((StatusCode::BAD_REQUEST, r));
            }
            Err(_) => {
                let r = Refusal::bad_request(format!(
                    "the request body stalled for {}s; send it whole",
                    idle.as_secs()
                ));
                return Err((StatusCode::REQUEST_TIMEOUT, r));
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen <= max {
            kept.extend_from_slice(&data);
        } else if seen > max.saturating_add(DRAIN_MAX) {
            break;
        }
    }
    if seen > max {
        return Err(body_too_large(max));
    }
    Ok(kept.freeze())
}

fn body_too_large(max: usize) -> (StatusCode, Refusal) {
    let r = Refusal::bad_request(format!(
        "the request body is over the limit of {max} bytes (daemon.max_body)"
    ));
    (StatusCode::PAYLOAD_TOO_LARGE, r)
}

/// A request refused before `activate` (which records its own refusals): its `deny` line, and
/// the answer with `status`.
fn refuse_early(
    b: &Broker,
    peer: &Peer,
    service: &Option<String>,
    method: &str,
    status: StatusCode,
    refusal: Refusal,
) -> Response<Body> {
    let event = crate::audit::Event {
        service: service.clone(),
        method: Some(method.to_owned()),
        ..Default::default()
    };
    let mut resp = refusal_response(&b.deny(peer, event, refusal), None);
    *resp.status_mut() = status;
    resp
}

/// `till_secret_age_seconds{service}`: how old each key is, for alerting on `max_age`.
fn secret_ages(b: &Broker) -> String {
    use std::fmt::Write as _;
    let now = std::time::SystemTime::now();
    let mut out = String::from(
        "# HELP till_secret_age_seconds Age of each service's master credential.\n# TYPE till_secret_age_seconds gauge\n",
    );
    for (name, s) in &b.served().services {
        let age = now
            .duration_since(s.secret_since)
            .unwrap_or_default()
            .as_secs();
        let _ = writeln!(out, "till_secret_age_seconds{{service=\"{name}\"}} {age}");
    }
    out
}

/// Activations left on a token, for the header on a refusal (when the token is ours and known).
fn remaining_of(b: &Broker, token: &str) -> Option<u32> {
    let claims = b.keyring.verify(token).ok()?;
    b.tokens()
        .get(&claims.id)
        .map(|r| r.uses.saturating_sub(r.used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_found_where_each_sdk_puts_it() {
        let mut h = hyper::HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer till_abc"));
        assert_eq!(extract_token(&h, None).0, Some("till_abc"));
        h.insert("authorization", HeaderValue::from_static("token till_gh"));
        assert_eq!(extract_token(&h, None).0, Some("till_gh"));
        let mut h = hyper::HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("till_anthropic"));
        assert_eq!(extract_token(&h, None).0, Some("till_anthropic"));
        let mut h = hyper::HeaderMap::new();
        h.insert("x-goog-api-key", HeaderValue::from_static("till_gemini"));
        assert_eq!(extract_token(&h, None).0, Some("till_gemini"));
        let h = hyper::HeaderMap::new();
        let (t, q) = extract_token(&h, Some("alt=sse&key=till_q&x=1"));
        assert_eq!((t, q.as_deref()), (Some("till_q"), Some("alt=sse&x=1")));
        let (t, q) = extract_token(&h, Some("key=till_only"));
        assert_eq!((t, q), (Some("till_only"), None));
        // A real key someone pasted is not a Till token and is never taken as one.
        let mut h = hyper::HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer sk-real"));
        assert_eq!(extract_token(&h, None).0, None);
    }
}
