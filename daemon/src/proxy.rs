//! The upstream side: build the request for the service's pinned origin, inject the key, send it,
//! read the answer within limits, and scrub every form of the key out of it.
//!
//! Redirects are never followed (the 3xx goes back to the caller as it is), so the key cannot be
//! carried to another origin. Upstream requests ask for `accept-encoding: identity`, because a
//! compressed body could hide the key from the scrubber; a compressed answer anyway is refused.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use memchr::memmem;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, Url};
use till_protocol::{Method, RequestPath};
use zeroize::Zeroizing;

use crate::broker::Service;
use crate::config::{Inject, ServiceConfig};
use crate::secret::Secret;

pub const REDACTED: &[u8] = b"[redacted by till]";

/// Headers that describe one hop, or carry a credential, or would let the caller steer the
/// request: never forwarded from the caller.
const DROPPED_REQUEST_HEADERS: &[&str] = &[
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "accept-encoding",
    "authorization",
    "x-api-key",
    "x-goog-api-key",
    "cookie",
    "forwarded",
];

const DROPPED_RESPONSE_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

pub struct UpstreamReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("header {0:?} is not a valid HTTP header")]
    BadHeader(String),
    #[error("the upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the upstream's answer stopped for longer than {0:?} before it was complete")]
    Stalled(Duration),
    #[error("could not reach the upstream: {0}")]
    Connect(String),
    #[error("the upstream's answer is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("the upstream sent a {0}-encoded body, which Till cannot check for the key")]
    Encoded(String),
    #[error("the upstream request failed: {0}")]
    Other(String),
}

/// Every form in which the key could come back: raw, as injected, base64 for basic auth, URL- and
/// JSON-escaped. Held zeroized.
pub struct Scrubber {
    needles: Vec<Zeroizing<Vec<u8>>>,
}

impl Scrubber {
    pub fn new(secret: &Secret, inject: &Inject) -> Scrubber {
        let raw = secret.expose();
        let mut needles = vec![Zeroizing::new(raw.to_vec())];
        if let Inject::Basic { user } = inject {
            let mut pair = Zeroizing::new(user.as_bytes().to_vec());
            pair.push(b':');
            pair.extend_from_slice(raw);
            needles.push(Zeroizing::new(
                STANDARD.encode(pair.as_slice()).into_bytes(),
            ));
        }
        if let Ok(s) = std::str::from_utf8(raw) {
            let url = Zeroizing::new(
                url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>(),
            );
            // Percent-escapes in lower case too (`%2f`): servers that echo a URL differ.
            needles.push(Zeroizing::new(lower_hex_escapes(&url).into_bytes()));
            needles.push(Zeroizing::new(url.as_bytes().to_vec()));
            if let Ok(json) = serde_json::to_string(s) {
                let json = Zeroizing::new(json);
                let inner = &json[1..json.len() - 1];
                // PHP's json_encode writes `/` as `\/`: a base64 key echoed by such an upstream.
                needles.push(Zeroizing::new(inner.replace('/', "\\/").into_bytes()));
                needles.push(Zeroizing::new(inner.as_bytes().to_vec()));
            }
        }
        needles.sort_by(|a, b| a.as_slice().cmp(b.as_slice()));
        needles.dedup_by(|a, b| a.as_slice() == b.as_slice());
        Scrubber { needles }
    }

    /// The length of the longest suffix of `data` that is a proper prefix of some form of the key.
    pub fn partial_suffix(&self, data: &[u8]) -> usize {
        let longest = self.needles.iter().map(|n| n.len()).max().unwrap_or(0);
        for k in (1..longest.min(data.len() + 1)).rev() {
            let tail = &data[data.len() - k..];
            if self
                .needles
                .iter()
                .any(|n| n.len() > k && n.starts_with(tail))
            {
                return k;
            }
        }
        0
    }

    /// Whether `data` holds any form of the key.
    pub fn contains(&self, data: &[u8]) -> bool {
        self.needles.iter().any(|n| memmem::find(data, n).is_some())
    }

    /// Replaces every occurrence of every form of the key.
    pub fn scrub(&self, data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        for needle in &self.needles {
            if memmem::find(&out, needle).is_none() {
                continue;
            }
            let mut next = Vec::with_capacity(out.len());
            let mut rest = out.as_slice();
            while let Some(at) = memmem::find(rest, needle) {
                next.extend_from_slice(&rest[..at]);
                next.extend_from_slice(REDACTED);
                rest = &rest[at + needle.len()..];
            }
            next.extend_from_slice(rest);
            out = next;
        }
        out
    }
}

/// `s` with the hex digits of its percent-escapes in lower case.
fn lower_hex_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut left = 0;
    for c in s.chars() {
        if c == '%' {
            left = 2;
            out.push(c);
        } else if left > 0 {
            left -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// One reqwest client per service: its own connect timeout, no redirects, its extra trusted
/// roots (`ca_file`), and a proxy only for an HTTPS origin on another host.
///
/// reqwest would honour `HTTP_PROXY` and friends for every request. A proxy sees a plain-HTTP
/// request whole, key included, and may answer in the upstream's place, so Till never sends one
/// through a proxy; nor a request to this host, which the proxy's loopback is not. For an HTTPS
/// origin elsewhere, the proxy named by `HTTPS_PROXY` (or `ALL_PROXY`, lower case too, minus
/// `NO_PROXY`) only tunnels: it sees `CONNECT host:port`, and TLS, verified against the pinned
/// origin's certificate, runs end to end inside the tunnel. Hosts that reach the Internet only
/// through a proxy need that.
pub fn client_for(svc: &ServiceConfig) -> anyhow::Result<Client> {
    let mut builder = Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(svc.connect_timeout)
        .read_timeout(svc.timeout)
        .user_agent(concat!("till/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &svc.ca_file {
        let shown = path.display();
        let pem = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("ca_file = {shown:?} cannot be read: {e}"))?;
        let roots = reqwest::Certificate::from_pem_bundle(&pem).unwrap_or_default();
        if roots.is_empty() {
            anyhow::bail!("ca_file = {shown:?} holds no PEM certificate");
        }
        // Besides the system's roots, not instead of them.
        builder = builder.tls_certs_merge(roots);
    }
    if svc.base_url.scheme() == "https"
        && !crate::config::is_loopback(&svc.base_url)
        && let Some(url) = https_proxy_from_env()
    {
        // Not the URL itself in the error: it can carry the proxy's own credentials.
        let proxy = reqwest::Proxy::https(url).map_err(|_| {
            anyhow::anyhow!("HTTPS_PROXY (or ALL_PROXY) in tilld's environment is not a valid URL")
        })?;
        builder = builder.proxy(proxy.no_proxy(reqwest::NoProxy::from_env()));
    }
    Ok(builder.build()?)
}

/// The tunnelling proxy for HTTPS requests named in the daemon's environment, if any. Only an
/// `http://` or `https://` proxy: `ALL_PROXY` often names a SOCKS proxy, which Till does not speak,
/// and that must not stop it from starting.
fn https_proxy_from_env() -> Option<String> {
    let url = ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.trim().is_empty())?;
    let lower = url.trim().to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Some(url);
    }
    // Not the URL: it can carry the proxy's own credentials.
    tracing::warn!(
        "the proxy in HTTPS_PROXY or ALL_PROXY is not an http:// or https:// URL, which is all \
         Till can tunnel through; HTTPS origins are reached directly"
    );
    None
}

pub struct Outgoing<'a> {
    pub method: Method,
    pub path: &'a RequestPath,
    pub headers: &'a [(String, String)],
    pub body: bytes::Bytes,
}

/// The URL the request goes to: the base URL with the validated path and query appended, and the
/// key as a query parameter when the service injects it there. Checked against the pinned origin.
fn target_url(svc: &ServiceConfig, path: &RequestPath, secret: &Secret) -> Result<Url, ProxyError> {
    let base = svc.base_url.as_str().trim_end_matches('/');
    let mut s = String::with_capacity(base.len() + 64);
    s.push_str(base);
    s.push_str(&path.path());
    if let Some(q) = path.query() {
        s.push('?');
        s.push_str(q);
    }
    let mut url = Url::parse(&s).map_err(|e| ProxyError::Other(format!("bad URL: {e}")))?;
    if url.origin() != svc.base_url.origin() {
        return Err(ProxyError::Other(
            "the request would leave the service's origin".into(),
        ));
    }
    if let Inject::Query { param } = &svc.inject {
        // A parameter of that name from the caller goes, as a caller's credential header does:
        // the upstream would otherwise see two keys and pick one by rules of its own.
        if url.query_pairs().any(|(k, _)| k == param.as_str()) {
            let kept: Vec<(String, String)> = url
                .query_pairs()
                .filter(|(k, _)| k != param.as_str())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        let value = String::from_utf8_lossy(secret.expose());
        url.query_pairs_mut().append_pair(param, &value);
    }
    Ok(url)
}

fn credential_header(inject: &Inject, secret: &Secret) -> Option<(HeaderName, HeaderValue)> {
    let (name, bytes) = match inject {
        Inject::Header { name, template } => {
            let (before, after) = template.split_once("{secret}").unwrap_or((template, ""));
            let mut v = Zeroizing::new(Vec::with_capacity(template.len() + secret.expose().len()));
            v.extend_from_slice(before.as_bytes());
            v.extend_from_slice(secret.expose());
            v.extend_from_slice(after.as_bytes());
            (name.clone(), v)
        }
        Inject::Basic { user } => {
            let mut pair = Zeroizing::new(user.as_bytes().to_vec());
            pair.push(b':');
            pair.extend_from_slice(secret.expose());
            let v =
                Zeroizing::new(format!("Basic {}", STANDARD.encode(pair.as_slice())).into_bytes());
            (reqwest::header::AUTHORIZATION, v)
        }
        Inject::Query { .. } => return None,
    };
    let mut value = HeaderValue::from_bytes(&bytes).ok()?;
    value.set_sensitive(true);
    Some((name, value))
}

fn request_headers(
    svc: &ServiceConfig,
    caller: &[(String, String)],
    secret: &Secret,
) -> Result<HeaderMap, ProxyError> {
    let mut map = HeaderMap::new();
    let inject_name = match &svc.inject {
        Inject::Header { name, .. } => Some(name.clone()),
        _ => None,
    };
    let hop = nominated(caller.iter().map(|(k, v)| (k.as_str(), v.as_bytes())));
    for (k, v) in caller {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| bad_header(k))?;
        // Till is the upstream's client, not a proxy passing on where a request came from: no
        // `X-Forwarded-*` of the caller's (Prefix and Port steer the links some servers build).
        if DROPPED_REQUEST_HEADERS.contains(&name.as_str())
            || name.as_str().starts_with("x-forwarded-")
            || Some(&name) == inject_name.as_ref()
            || hop.contains(name.as_str())
        {
            continue;
        }
        let value = HeaderValue::from_str(v).map_err(|_| bad_header(k))?;
        map.append(name, value);
    }
    for (k, v) in &svc.default_headers {
        if !map.contains_key(k) {
            map.insert(k.clone(), v.clone());
        }
    }
    map.insert(
        reqwest::header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    if let Some((name, value)) = credential_header(&svc.inject, secret) {
        map.insert(name, value);
    }
    Ok(map)
}

/// The headers a `Connection` header names: they describe this hop only, and a proxy drops them
/// (RFC 9110, 7.6.1). Lower-case names.
fn nominated<'a>(
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> std::collections::HashSet<String> {
    headers
        .filter(|(k, _)| k.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The caller's header, named in the refusal, within reason.
fn bad_header(name: &str) -> ProxyError {
    ProxyError::BadHeader(crate::clip(name, crate::MAX_QUOTED_NAME).into_owned())
}

/// Validates what the caller sent without sending anything (so a bad header is refused before an
/// activation is spent).
pub fn check_headers(headers: &[(String, String)]) -> Result<(), ProxyError> {
    for (k, v) in headers {
        HeaderName::from_bytes(k.as_bytes()).map_err(|_| bad_header(k))?;
        HeaderValue::from_str(v).map_err(|_| bad_header(k))?;
    }
    Ok(())
}

/// Sends the request and returns the upstream's answer with its body unread. Refuses an answer
/// whose body is compressed (the scrubber could not see the key in it).
pub async fn send(svc: &Service, out: Outgoing<'_>) -> Result<reqwest::Response, ProxyError> {
    let cfg = &svc.config;
    let url = target_url(cfg, out.path, &svc.secret)?;
    let headers = request_headers(cfg, out.headers, &svc.secret)?;
    let method = reqwest::Method::from_bytes(out.method.as_str().as_bytes())
        .map_err(|_| ProxyError::Other("bad method".into()))?;
    let mut req = svc.client.request(method, url).headers(headers);
    if !out.body.is_empty() {
        req = req.body(out.body);
    }
    // `timeout` bounds the wait for the answer to start here, and each silence within its body
    // (the client's read timeout), never the whole: a streamed completion that keeps coming for
    // minutes is not cut off, and one that stalls is.
    let resp = tokio::time::timeout(cfg.timeout, req.send())
        .await
        .map_err(|_| ProxyError::Timeout(cfg.timeout))?
        .map_err(|e| classify(e, cfg.timeout))?;
    if let Some(enc) = resp.headers().get(reqwest::header::CONTENT_ENCODING)
        && !enc.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return Err(ProxyError::Encoded(
            String::from_utf8_lossy(enc.as_bytes()).into_owned(),
        ));
    }
    Ok(resp)
}

/// The answer's headers for the caller: hop-by-hop and length dropped, the key scrubbed.
pub fn response_headers(resp: &reqwest::Response, scrubber: &Scrubber) -> Vec<(String, String)> {
    let hop = nominated(
        resp.headers()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_bytes())),
    );
    resp.headers()
        .iter()
        .filter(|(k, _)| {
            !DROPPED_RESPONSE_HEADERS.contains(&k.as_str()) && !hop.contains(k.as_str())
        })
        .map(|(k, v)| {
            let clean = scrubber.scrub(v.as_bytes());
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(&clean).into_owned(),
            )
        })
        .collect()
}

/// Sends the request and reads the whole answer (the socket protocol's `call`).
pub async fn forward(
    svc: &Service,
    out: Outgoing<'_>,
    max_body: usize,
) -> Result<UpstreamReply, ProxyError> {
    let mut resp = send(svc, out).await?;
    let status = resp.status().as_u16();
    let headers = response_headers(&resp, &svc.scrubber);
    let timeout = svc.config.timeout;
    let mut body = Vec::new();
    let stalled_or = |e: reqwest::Error| {
        if e.is_timeout() {
            ProxyError::Stalled(timeout)
        } else {
            classify(e, timeout)
        }
    };
    while let Some(chunk) = resp.chunk().await.map_err(stalled_or)? {
        if body.len() + chunk.len() > max_body {
            return Err(ProxyError::TooLarge(max_body));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(UpstreamReply {
        status,
        headers,
        body: svc.scrubber.scrub(&body),
    })
}

/// Scrubs a body that arrives in chunks, passing each chunk on as soon as it can. A key split
/// across chunks is caught: only the longest tail of a chunk that could be the start of a key is
/// held back until the next chunk (usually nothing, so server-sent events are not delayed).
pub struct StreamScrubber<'a> {
    scrubber: &'a Scrubber,
    held: Vec<u8>,
}

impl<'a> StreamScrubber<'a> {
    pub fn new(scrubber: &'a Scrubber) -> Self {
        StreamScrubber {
            scrubber,
            held: Vec::new(),
        }
    }

    /// Continues a stream whose held-back tail was saved with [`StreamScrubber::into_held`].
    pub fn resume(scrubber: &'a Scrubber, held: Vec<u8>) -> Self {
        StreamScrubber { scrubber, held }
    }

    pub fn into_held(self) -> Vec<u8> {
        self.held
    }

    /// Takes the next chunk; returns what can be passed on now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(chunk);
        let mut out = self.scrubber.scrub(&buf);
        let keep = self.scrubber.partial_suffix(&out);
        self.held = out.split_off(out.len() - keep);
        out
    }

    /// The end of the body: whatever was held back (it was not the start of a key after all).
    pub fn finish(self) -> Vec<u8> {
        self.held
    }
}

/// Why TLS refused the upstream, when it did: the certificate's problem, which is the part a person
/// can act on (rustls's own words for it; never a URL, which can hold a query-injected key).
fn tls_refusal(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(match t {
                rustls::Error::InvalidCertificate(c) => format!(
                    "the upstream's TLS certificate was refused ({c:?}); if a private CA signed \
                     it, name that CA in the service's ca_file"
                ),
                other => format!("the TLS handshake with the upstream failed ({other})"),
            });
        }
        // An io::Error's `source()` skips the error it wraps (rustls's sits two io::Errors deep).
        cur = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

/// Turns a reqwest error into a reason for the caller. reqwest's own text can include the URL, and
/// with a query-injected key the URL holds the key, so it is never passed through.
fn classify(e: reqwest::Error, timeout: Duration) -> ProxyError {
    if e.is_timeout() {
        ProxyError::Timeout(timeout)
    } else if e.is_connect() {
        ProxyError::Connect(
            tls_refusal(&e)
                .unwrap_or_else(|| "connection failed (refused, unreachable or TLS error)".into()),
        )
    } else if e.is_body() || e.is_decode() {
        ProxyError::Other("the upstream's answer was cut off or malformed".into())
    } else {
        ProxyError::Other("the request could not be completed".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_named_by_connection_are_hop_by_hop() {
        let headers = [
            ("Connection", b"close, X-Hop ,keep-alive".as_slice()),
            ("x-hop", b"1".as_slice()),
            ("connection", b"x-other".as_slice()),
        ];
        let hop = nominated(headers.into_iter());
        let mut names: Vec<_> = hop.into_iter().collect();
        names.sort();
        assert_eq!(names, ["close", "keep-alive", "x-hop", "x-other"]);
    }

    #[test]
    fn a_key_split_across_chunks_is_caught() {
        let secret = Secret::new(b"sk-split-0123456789".to_vec());
        let inject = Inject::Header {
            name: reqwest::header::AUTHORIZATION,
            template: "Bearer {secret}".into(),
        };
        let s = Scrubber::new(&secret, &inject);
        let body = b"data: {\"echo\":\"sk-split-0123456789\"}\n\ndata: sk-split-0123456789 end\n\n";
        for cut in 0..body.len() {
            for cut2 in cut..body.len() {
                let mut st = StreamScrubber::new(&s);
                let mut out = st.push(&body[..cut]);
                out.extend(st.push(&body[cut..cut2]));
                out.extend(st.push(&body[cut2..]));
                out.extend(st.finish());
                let text = String::from_utf8(out).expect("utf8");
                assert!(
                    !text.contains("sk-split-0123456789"),
                    "cuts {cut},{cut2}: {text}"
                );
                assert_eq!(text.matches("[redacted by till]").count(), 2);
            }
        }
        // Nothing is held back when the chunk cannot be the start of a key.
        let mut st = StreamScrubber::new(&s);
        assert_eq!(st.push(b"data: hello\n\n"), b"data: hello\n\n");
    }

    #[test]
    fn scrubs_raw_basic_and_escaped_forms() {
        let secret = Secret::new(b"sk-abc/def+ghi".to_vec());
        let s = Scrubber::new(&secret, &Inject::Basic { user: "u".into() });
        let basic = STANDARD.encode("u:sk-abc/def+ghi");
        let body = format!(
            "a sk-abc/def+ghi b {basic} c sk-abc%2Fdef%2Bghi d sk-abc/def+ghisk-abc/def+ghi \
             e sk-abc%2fdef%2bghi f {{\"k\":\"sk-abc\\/def+ghi\"}}"
        );
        let out = String::from_utf8(s.scrub(body.as_bytes())).expect("utf8");
        assert!(!out.contains("sk-abc"), "{out}");
        assert!(!out.contains(&basic), "{out}");
        assert_eq!(out.matches("[redacted by till]").count(), 7, "{out}");
    }
}
