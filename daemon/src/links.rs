//! The upstream's own URLs in an answer, pointed back at the gateway.
//!
//! An upstream names itself in what it answers: a redirect's `Location`, the next page in `Link`,
//! and for hypermedia APIs such as GitHub's, `url` fields in the JSON body. A client that follows
//! one of those as it is goes to the upstream directly, with its Till token as the key, and fails
//! (PyGithub refuses to, and stops). So the gateway rewrites them, as a reverse proxy's
//! `proxy_redirect` does: `{base_url}/rest` becomes `http://{gateway}/proxy/{service}/rest`, and
//! the client's next request comes back through Till (scope-checked and counted like any other).
//!
//! Headers are rewritten for every service: they are protocol, not content. JSON bodies only for a
//! service with `rewrite_urls` (the github preset), since a body also carries what people wrote.

use memchr::memmem;
use reqwest::Url;

/// What follows a base URL's own path in `path` (path, query and fragment), if `path` is under it:
/// `/v1/x` for `/openai/v1/x` under `https://api.groq.com/openai`. The one rule for "under the base
/// URL" (the gateway's links and routes, the hint for a URL given as a path).
pub fn after_base_path<'p>(base: &Url, path: &'p str) -> Option<&'p str> {
    let rest = path.strip_prefix(base.path().trim_end_matches('/'))?;
    (rest.is_empty() || rest.starts_with(['/', '?', '#'])).then_some(rest)
}

/// Rewrites URLs under one service's base URL to the gateway's route for that service.
pub struct Rebase<'a> {
    base: &'a Url,
    /// The gateway's route for the service: `/proxy/github`.
    route: String,
    /// `http://{authority}{route}`, when the request said under which authority it reached the
    /// gateway (its `Host`); absolute URLs are left alone without it.
    public: Option<String>,
}

impl<'a> Rebase<'a> {
    /// `host` is the request's `Host` header, used only if it is a plain `host[:port]`.
    pub fn new(base: &'a Url, service: &str, host: Option<&str>) -> Rebase<'a> {
        let route = format!("/proxy/{service}");
        let public = host
            .filter(|h| {
                h.parse::<hyper::http::uri::Authority>()
                    .is_ok_and(|a| a.as_str() == *h && !h.contains('@'))
            })
            .map(|h| format!("http://{h}{route}"));
        Rebase {
            base,
            route,
            public,
        }
    }

    /// One URL from a `Location` or `Content-Location` header: absolute, or a path on the
    /// upstream's origin. `None` when it is not under the base URL (left as it is).
    pub fn url(&self, value: &str) -> Option<String> {
        if value.starts_with('/') && !value.starts_with("//") {
            let rest = after_base_path(self.base, value)?;
            return Some(format!("{}{rest}", self.route));
        }
        let public = self.public.as_ref()?;
        let url = Url::parse(value).ok()?;
        if url.origin() != self.base.origin() {
            return None;
        }
        let path_on = &url[url::Position::BeforePath..];
        let rest = after_base_path(self.base, path_on)?;
        Some(format!("{public}{rest}"))
    }

    /// A `Link` header: each `<URL>` in it rewritten where it is under the base URL.
    pub fn link(&self, value: &str) -> Option<String> {
        let mut out = String::with_capacity(value.len() + 32);
        let mut rest = value;
        let mut changed = false;
        while let Some(open) = rest.find('<') {
            let Some(close) = rest[open..].find('>').map(|c| open + c) else {
                break;
            };
            out.push_str(&rest[..=open]);
            let target = &rest[open + 1..close];
            match self.url(target) {
                Some(new) => {
                    out.push_str(&new);
                    changed = true;
                }
                None => out.push_str(target),
            }
            rest = &rest[close..];
        }
        out.push_str(rest);
        changed.then_some(out)
    }

    /// A rewriter for a JSON body, when the gateway's authority is known.
    pub fn body(&self) -> Option<BodyRebase> {
        Some(BodyRebase {
            // The base URL as it appears in answers: `https://api.github.com`.
            from: self.base.as_str().trim_end_matches('/').as_bytes().to_vec(),
            to: self.public.clone()?.into_bytes(),
            held: Vec::new(),
        })
    }
}

/// Whether a body of this content type is rewritten: JSON (`application/json`, `...+json`).
pub fn is_json(content_type: Option<&str>) -> bool {
    let Some(ct) = content_type else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.to_ascii_lowercase().ends_with("+json")
}

/// Rewrites the base URL in a body that arrives in pieces. Only where the base URL ends (the next
/// byte cannot continue a host, port or path segment: `https://api.github.com.evil` and
/// `https://api.github.com:8443` stay as they are), and across chunk boundaries: the tail of a
/// chunk that could be the start of a match is held back until the next one says.
pub struct BodyRebase {
    from: Vec<u8>,
    to: Vec<u8>,
    held: Vec<u8>,
}

impl BodyRebase {
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(buf.len());
        let mut rest = buf.as_slice();
        while let Some(at) = memmem::find(rest, &self.from) {
            let after = at + self.from.len();
            out.extend_from_slice(&rest[..at]);
            let Some(&next) = rest.get(after) else {
                // The match ends the chunk: what follows decides.
                self.held = rest[at..].to_vec();
                return out;
            };
            if ends_url_prefix(next) {
                out.extend_from_slice(&self.to);
            } else {
                out.extend_from_slice(&self.from);
            }
            rest = &rest[after..];
        }
        let keep = (1..self.from.len().min(rest.len() + 1))
            .rev()
            .find(|&k| self.from.starts_with(&rest[rest.len() - k..]))
            .unwrap_or(0);
        out.extend_from_slice(&rest[..rest.len() - keep]);
        self.held = rest[rest.len() - keep..].to_vec();
        out
    }

    /// The end of the body: what was held back, rewritten if it is the base URL itself.
    pub fn finish(self) -> Vec<u8> {
        if self.held == self.from {
            self.to
        } else {
            self.held
        }
    }
}

/// Whether `b`, right after the base URL, ends it: it cannot go on as a host name, a port or a
/// path segment.
fn ends_url_prefix(b: u8) -> bool {
    !(b.is_ascii_alphanumeric() || b".-_~:@%".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rebase(base: &Url) -> Rebase<'_> {
        Rebase::new(base, "github", Some("127.0.0.1:8719"))
    }

    fn url(s: &str) -> Url {
        Url::parse(s).expect("url")
    }

    #[test]
    fn urls_under_the_base_url_come_back_through_the_gateway() {
        let base = url("https://api.github.com");
        let r = rebase(&base);
        let cases = [
            (
                "https://api.github.com/repos/a/b",
                Some("http://127.0.0.1:8719/proxy/github/repos/a/b"),
            ),
            (
                "https://api.github.com:443/x?page=2",
                Some("http://127.0.0.1:8719/proxy/github/x?page=2"),
            ),
            ("/repos/a/b", Some("/proxy/github/repos/a/b")),
            ("https://codeload.github.com/a/b", None),
            ("http://api.github.com/x", None),
            ("https://api.github.com.evil.example/x", None),
            ("//evil.example/x", None),
            ("not a url", None),
        ];
        for (from, to) in cases {
            assert_eq!(r.url(from).as_deref(), to, "{from}");
        }
        let ghe_base = url("https://ghe.example/api/v3/");
        let ghe = rebase(&ghe_base);
        assert_eq!(
            ghe.url("https://ghe.example/api/v3/repos?x=1").as_deref(),
            Some("http://127.0.0.1:8719/proxy/github/repos?x=1")
        );
        assert_eq!(ghe.url("https://ghe.example/api/v30/repos"), None);
        assert_eq!(ghe.url("/login"), None);
    }

    #[test]
    fn a_host_header_that_is_not_a_plain_authority_is_not_used() {
        let base = Url::parse("https://api.github.com").expect("url");
        for host in ["evil.example/path", "a@b", "", "x y"] {
            let r = Rebase::new(&base, "github", Some(host));
            assert_eq!(r.url("https://api.github.com/x"), None, "{host}");
            assert!(r.body().is_none());
        }
    }

    #[test]
    fn link_headers_keep_their_parameters() {
        let base = url("https://api.github.com");
        let r = rebase(&base);
        let link = r#"<https://api.github.com/repositories/1/issues?page=2>; rel="next", <https://elsewhere.example/p>; rel="help""#;
        assert_eq!(
            r.link(link).as_deref(),
            Some(
                r#"<http://127.0.0.1:8719/proxy/github/repositories/1/issues?page=2>; rel="next", <https://elsewhere.example/p>; rel="help""#
            )
        );
        assert_eq!(r.link(r#"<https://elsewhere.example/p>; rel="x""#), None);
    }

    #[test]
    fn bodies_are_rewritten_whatever_the_chunking() {
        let base = url("https://api.github.com");
        let r = rebase(&base);
        let body = br#"{"url":"https://api.github.com/repos/a","x":"https://api.github.com.evil/","y":"https://api.github.com","z":"https://api.github.co"} https://api.github.com"#;
        let want = br#"{"url":"http://127.0.0.1:8719/proxy/github/repos/a","x":"https://api.github.com.evil/","y":"http://127.0.0.1:8719/proxy/github","z":"https://api.github.co"} http://127.0.0.1:8719/proxy/github"#;
        for size in 1..body.len() {
            let mut b = r.body().expect("rewriter");
            let mut out = Vec::new();
            for chunk in body.chunks(size) {
                out.extend(b.push(chunk));
            }
            out.extend(b.finish());
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(want),
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn json_content_types() {
        for (ct, json) in [
            (Some("application/json; charset=utf-8"), true),
            (Some("application/vnd.github+json"), true),
            (Some("Application/JSON"), true),
            (Some("text/html"), false),
            (Some("application/octet-stream"), false),
            (None, false),
        ] {
            assert_eq!(is_json(ct), json, "{ct:?}");
        }
    }
}
