//! The scope grammar: `METHOD /path/pattern`, request-path validation, matching and containment.
//!
//! A pattern is a list of segments: a literal, `*` (exactly one segment) or `**` (any number of trailing
//! segments, zero included; only as the last segment). Request paths are validated, never normalised:
//! anything a server or proxy further along might interpret differently from us (`.`/`..`, also as
//! `..;x`, which servlet containers resolve as `..`; empty segments; percent-encoded dots, slashes,
//! backslashes or percent signs, or bytes that are not UTF-8; control characters) is refused,
//! because a path we would match as `/a/b` must not reach the upstream as `/a/../c`.

use std::fmt;

use thiserror::Error;

/// HTTP methods a rule or a request may name. `Any` is only valid in a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Any,
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
}

impl Method {
    const ALL: [(Method, &'static str); 8] = [
        (Method::Any, "*"),
        (Method::Get, "GET"),
        (Method::Head, "HEAD"),
        (Method::Post, "POST"),
        (Method::Put, "PUT"),
        (Method::Patch, "PATCH"),
        (Method::Delete, "DELETE"),
        (Method::Options, "OPTIONS"),
    ];

    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(m, _)| *m == self)
            .map(|(_, s)| *s)
            .unwrap_or("*")
    }

    /// Parses a method name, case-insensitively. `*` is accepted; callers that need a concrete method
    /// use [`Method::parse_request`].
    pub fn parse(s: &str) -> Result<Method, ScopeError> {
        let upper = s.to_ascii_uppercase();
        Self::ALL
            .iter()
            .find(|(_, name)| *name == upper)
            .map(|(m, _)| *m)
            .ok_or_else(|| ScopeError::Method(s.chars().take(16).collect()))
    }

    /// Parses the method of a concrete request: `*` is not a method.
    pub fn parse_request(s: &str) -> Result<Method, ScopeError> {
        match Self::parse(s)? {
            Method::Any => Err(ScopeError::Method("*".into())),
            m => Ok(m),
        }
    }

    /// Compact code used in the token's byte layout (see docs/TOKEN.md).
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Method> {
        Self::ALL.get(usize::from(code)).map(|(m, _)| *m)
    }

    fn covers(self, other: Method) -> bool {
        self == Method::Any || self == other
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

/// A validated path pattern such as `/repos/acme/*/issues/**`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    segments: Vec<Segment>,
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, ScopeError> {
        if !s.starts_with('/') {
            return Err(ScopeError::Pattern(format!("{s:?} must start with '/'")));
        }
        if s.contains('?') || s.contains('#') {
            return Err(ScopeError::Pattern(format!(
                "{s:?}: a pattern covers the path only, without '?' or '#'"
            )));
        }
        let raw = split_segments(s).map_err(ScopeError::Pattern)?;
        let last = raw.len().saturating_sub(1);
        let mut segments = Vec::with_capacity(raw.len());
        for (i, seg) in raw.into_iter().enumerate() {
            segments.push(match seg {
                "**" if i == last => Segment::Rest,
                "**" => {
                    return Err(ScopeError::Pattern(format!(
                        "{s:?}: '**' may only be the last segment"
                    )));
                }
                "*" => Segment::One,
                lit if lit.contains('*') => {
                    return Err(ScopeError::Pattern(format!(
                        "{s:?}: '*' must be a whole segment"
                    )));
                }
                lit => Segment::Literal(lit.to_owned()),
            });
        }
        Ok(Pattern { segments })
    }

    /// True when `path` (already validated) is matched by this pattern.
    pub fn matches(&self, path: &RequestPath) -> bool {
        for (i, seg) in self.segments.iter().enumerate() {
            match seg {
                Segment::Rest => return true,
                Segment::One if i < path.segments.len() => {}
                Segment::Literal(l) if path.segments.get(i) == Some(l) => {}
                _ => return false,
            }
        }
        self.segments.len() == path.segments.len()
    }

    /// True when every path this `narrower` pattern matches is also matched by `self`.
    pub fn covers(&self, narrower: &Pattern) -> bool {
        for (i, seg) in self.segments.iter().enumerate() {
            let theirs = narrower.segments.get(i);
            match (seg, theirs) {
                (Segment::Rest, _) => return true,
                (Segment::One, Some(Segment::Literal(_) | Segment::One)) => {}
                (Segment::Literal(a), Some(Segment::Literal(b))) if a == b => {}
                _ => return false,
            }
        }
        self.segments.len() == narrower.segments.len()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.segments.is_empty() {
            return f.write_str("/");
        }
        for seg in &self.segments {
            f.write_str("/")?;
            match seg {
                Segment::Literal(l) => f.write_str(l)?,
                Segment::One => f.write_str("*")?,
                Segment::Rest => f.write_str("**")?,
            }
        }
        Ok(())
    }
}

/// One scope rule: a method (or `*`) and a path pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub method: Method,
    pub pattern: Pattern,
}

impl Rule {
    /// Parses `METHOD /pattern`, e.g. `GET /repos/acme/*/issues/**`.
    pub fn parse(s: &str) -> Result<Rule, ScopeError> {
        let s = s.trim();
        let (method, pattern) = s
            .split_once(char::is_whitespace)
            .ok_or_else(|| ScopeError::Rule(s.chars().take(80).collect()))?;
        Ok(Rule {
            method: Method::parse(method)?,
            pattern: Pattern::parse(pattern.trim())?,
        })
    }

    pub fn matches(&self, method: Method, path: &RequestPath) -> bool {
        self.method.covers(method) && self.pattern.matches(path)
    }

    /// True when this rule allows everything `narrower` allows.
    pub fn covers(&self, narrower: &Rule) -> bool {
        self.method.covers(narrower.method) && self.pattern.covers(&narrower.pattern)
    }

    /// The rule that allows exactly one request: this method on this path.
    pub fn exact(method: Method, path: &RequestPath) -> Rule {
        Rule {
            method,
            pattern: Pattern {
                segments: path
                    .segments
                    .iter()
                    .map(|s| Segment::Literal(s.clone()))
                    .collect(),
            },
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.pattern)
    }
}

/// True when every rule in `narrower` is covered by some rule in `ceiling`; otherwise the first
/// rule that is not.
pub fn first_uncovered<'a>(ceiling: &[Rule], narrower: &'a [Rule]) -> Option<&'a Rule> {
    narrower
        .iter()
        .find(|n| !ceiling.iter().any(|c| c.covers(n)))
}

/// A request target that passed validation: the path's segments and the raw query (without `?`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPath {
    segments: Vec<String>,
    query: Option<String>,
}

impl RequestPath {
    /// Validates `/path?query` as it will be appended to the service's base URL. Refuses instead of
    /// normalising; see the module docs for what is refused.
    /// The longest target (path and query) taken, in bytes.
    pub const MAX_LEN: usize = 8192;

    pub fn parse(target: &str) -> Result<RequestPath, ScopeError> {
        let bad = |why: &str| ScopeError::Path(why.to_owned());
        if target.len() > Self::MAX_LEN {
            return Err(ScopeError::Path(format!(
                "the path is longer than {} bytes",
                Self::MAX_LEN
            )));
        }
        if let Some(c) = target.chars().find(|c| c.is_control() || *c == ' ') {
            return Err(ScopeError::Path(format!(
                "the path contains a control or space character ({:?}); percent-encode it",
                c.escape_default().to_string()
            )));
        }
        if !target.is_ascii() {
            return Err(bad(
                "the path must be ASCII; percent-encode other characters",
            ));
        }
        if target.contains('#') {
            return Err(bad(
                "the path contains a '#' fragment, which is never sent upstream",
            ));
        }
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q.to_owned())),
            None => (target, None),
        };
        if path.contains('*') {
            // A literal '*' would read as a wildcard in the one-shot rule minted for this request.
            return Err(bad("the path contains '*'; percent-encode it as %2A"));
        }
        if !path.starts_with('/') {
            return Err(bad(
                "the path must start with '/' (an absolute URL or a host cannot be given)",
            ));
        }
        let segments = split_segments(path)
            .map_err(ScopeError::Path)?
            .into_iter()
            .map(str::to_owned)
            .collect();
        if let Some(q) = &query {
            check_percent(q).map_err(ScopeError::Path)?;
        }
        Ok(RequestPath { segments, query })
    }

    /// The path part, always starting with `/`.
    pub fn path(&self) -> String {
        let mut out = String::new();
        for s in &self.segments {
            out.push('/');
            out.push_str(s);
        }
        if out.is_empty() {
            out.push('/');
        }
        out
    }

    pub fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }
}

/// Splits an absolute path into segments, refusing `.`/`..`, empty segments, backslashes and
/// dangerous percent-encodings. `/` alone is zero segments.
fn split_segments(path: &str) -> Result<Vec<&str>, String> {
    if path == "/" {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for seg in path[1..].split('/') {
        if seg.is_empty() {
            return Err(format!(
                "{path:?} has an empty segment ('//' or a trailing '/'); remove it"
            ));
        }
        // Servlet containers (Tomcat, Jetty, and Spring before it) drop a `;parameter` from a
        // segment before they resolve dot segments, so `..;x` climbs as `..` does there (and
        // `..%3bx`, where the `;` is decoded first).
        let bare = before_parameter(seg);
        if bare == "." || bare == ".." {
            return Err(format!(
                "{path:?} has a '.' or '..' segment (a ';parameter' after one still reads as one \
                 upstream); write the path it means"
            ));
        }
        if seg.contains('\\') {
            return Err(format!("{path:?} contains a backslash"));
        }
        check_percent(seg)?;
        if std::str::from_utf8(&percent_decoded(seg)).is_err() {
            // Overlong forms among them: `%c0%ae` is a '.' to a decoder that accepts them.
            return Err(format!(
                "{path:?}: its percent-encoded bytes are not UTF-8; encode text as UTF-8"
            ));
        }
        out.push(seg);
    }
    Ok(out)
}

/// A segment up to its first `;` (raw or `%3b`): what a servlet container resolves as the segment.
fn before_parameter(seg: &str) -> &str {
    let lower = seg.to_ascii_lowercase();
    let end = [lower.find(';'), lower.find("%3b")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(seg.len());
    &seg[..end]
}

/// The bytes a segment stands for (its `%XX` already checked by [`check_percent`]).
fn percent_decoded(seg: &str) -> Vec<u8> {
    let b = seg.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            seg.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16)),
        ) {
            (b'%', Some(Ok(v))) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Refuses malformed `%XX` and encodings of `.`, `/`, `\`, `%` and control characters: they decode
/// into something a server further along could treat as path structure.
fn check_percent(s: &str) -> Result<(), String> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).unwrap_or("");
            // from_str_radix alone would accept a sign ("%+1"), so check the digits first.
            if hex.len() != 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("malformed percent-encoding at byte {i}"));
            }
            let value = u8::from_str_radix(hex, 16)
                .map_err(|_| format!("malformed percent-encoding at byte {i}"))?;
            if matches!(value, b'.' | b'/' | b'\\' | b'%') || value < 0x20 || value == 0x7f {
                return Err(format!(
                    "percent-encoded '%{hex}' is refused: encoded dots, slashes, backslashes, \
                     percent signs and control characters could change the path upstream"
                ));
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ScopeError {
    #[error(
        "unknown HTTP method {0:?}; use GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS (or * in a rule)"
    )]
    Method(String),
    #[error("a rule is 'METHOD /path', e.g. 'GET /v1/models'; got {0:?}")]
    Rule(String),
    #[error("bad path pattern: {0}")]
    Pattern(String),
    #[error("refused path: {0}")]
    Path(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Rule {
        Rule::parse(s).expect(s)
    }
    fn path(s: &str) -> RequestPath {
        RequestPath::parse(s).expect(s)
    }

    /// Every pattern of up to three segments over `a`, `b` and `*`, with or without a last `**`.
    fn small_patterns() -> Vec<Pattern> {
        let mut out = vec![Pattern { segments: vec![] }];
        let mut frontier = out.clone();
        for _ in 0..3 {
            let mut next = Vec::new();
            for p in &frontier {
                if p.segments.last() == Some(&Segment::Rest) {
                    continue;
                }
                for seg in ["a", "b", "*", "**"] {
                    let mut s = p.to_string();
                    if s == "/" {
                        s.clear();
                    }
                    next.push(Pattern::parse(&format!("{s}/{seg}")).expect("pattern"));
                }
            }
            out.extend(next.iter().cloned());
            frontier = next;
        }
        out
    }

    /// Every path of up to four segments over `a`, `b` and `z`: `z` is a literal no pattern names
    /// (it stands for all others), and four segments is longer than any small pattern, so these
    /// paths tell apart everything the small patterns can.
    fn small_paths() -> Vec<RequestPath> {
        let mut out = vec![path("/")];
        let mut frontier = vec![String::new()];
        for _ in 0..4 {
            let mut next = Vec::new();
            for p in &frontier {
                for seg in ["a", "b", "z"] {
                    let q = format!("{p}/{seg}");
                    out.push(path(&q));
                    next.push(q);
                }
            }
            frontier = next;
        }
        out
    }

    /// Containment is what a ceiling rests on (a token may do nothing its ceiling does not allow):
    /// checked against its meaning, every path matched, on every pair of small patterns. `covers`
    /// must never say yes where a path escapes (unsound), and should not say no where none does.
    #[test]
    fn covers_is_exactly_containment_on_every_small_pattern() {
        let patterns = small_patterns();
        let paths = small_paths();
        assert_eq!(patterns.len(), 1 + 4 + 12 + 36);
        for ceiling in &patterns {
            for narrower in &patterns {
                let contained = paths
                    .iter()
                    .all(|p| !narrower.matches(p) || ceiling.matches(p));
                assert_eq!(
                    ceiling.covers(narrower),
                    contained,
                    "does {ceiling} cover {narrower}?"
                );
            }
        }
    }

    /// Thousands of odd request targets: none panics, and each one accepted is clean (no dot
    /// segment, no empty one, nothing encoded that decodes to path structure) and reads back as
    /// itself; its exact rule matches it and only it among its neighbours.
    #[test]
    fn odd_request_targets_are_refused_or_clean() {
        // Mostly harmless pieces, so that many targets pass and are checked.
        const PIECES: &[&str] = &[
            "/a", "/b", "/a", "/b", "/", "a", "b", ".", "..", ";", "%3b", "%2e", "%2E", "%2f",
            "%5C", "%25", "%41", "%c0", "%ae", "%", "%0", "?", "#", "*", "\\", " ", "\u{0}", "\n",
            "é", "=", "&",
        ];
        let mut rng = crate::TestRng(0x9e37_79b9_7f4a_7c15);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let len = rng.below(6);
            let target: String = std::iter::once("/")
                .chain((0..len).map(|_| PIECES[rng.below(PIECES.len())]))
                .collect();
            let Ok(p) = RequestPath::parse(&target) else {
                continue;
            };
            accepted += 1;
            let shown = p.path();
            for seg in shown.split('/').skip(1) {
                let bare = seg.to_ascii_lowercase().replace("%3b", ";");
                let bare = bare.split(';').next().unwrap_or_default();
                assert!(!seg.is_empty() || shown == "/", "{target:?}");
                assert!(bare != "." && bare != "..", "{target:?}");
                assert!(
                    std::str::from_utf8(&percent_decoded(seg)).is_ok(),
                    "{target:?}"
                );
            }
            let lower = target.to_ascii_lowercase();
            for bad in ["%2e", "%2f", "%5c", "%25", "\\", "#", "*"] {
                assert!(
                    !lower.split('?').next().unwrap_or("").contains(bad),
                    "{target:?}"
                );
            }
            assert!(target.is_ascii() && !target.chars().any(|c| c.is_control() || c == ' '));
            let again = match p.query() {
                Some(q) => format!("{shown}?{q}"),
                None => shown.clone(),
            };
            assert_eq!(RequestPath::parse(&again).as_ref(), Ok(&p), "{target:?}");
            let exact = Rule::exact(Method::Get, &p);
            assert!(exact.matches(Method::Get, &p), "{target:?}");
            assert!(!exact.matches(Method::Post, &p), "{target:?}");
            let longer = path(&format!("{}/x", shown.trim_end_matches('/')));
            assert!(!exact.matches(Method::Get, &longer), "{target:?}");
        }
        // The pieces make both kinds: the test is not vacuous.
        assert!(accepted > 2_000 && accepted < 18_000, "{accepted} accepted");
    }

    #[test]
    fn matching() {
        let r = rule("GET /repos/acme/*/issues/**");
        assert!(r.matches(Method::Get, &path("/repos/acme/till/issues")));
        assert!(r.matches(Method::Get, &path("/repos/acme/till/issues/1/comments")));
        assert!(!r.matches(Method::Post, &path("/repos/acme/till/issues")));
        assert!(!r.matches(Method::Get, &path("/repos/other/till/issues")));
        assert!(!r.matches(Method::Get, &path("/repos/acme/issues")));
        let exact = rule("POST /v1/chat/completions");
        assert!(exact.matches(Method::Post, &path("/v1/chat/completions?x=1")));
        assert!(!exact.matches(Method::Post, &path("/v1/chat/completions/extra")));
        assert!(!exact.matches(Method::Post, &path("/v1/chat")));
        assert!(rule("* /**").matches(Method::Delete, &path("/")));
    }

    #[test]
    fn containment() {
        let ceiling = [
            rule("GET /repos/acme/**"),
            rule("POST /repos/acme/*/issues"),
        ];
        for ok in [
            "GET /repos/acme/x",
            "GET /repos/acme/*/issues/**",
            "GET /repos/acme/**",
            "POST /repos/acme/till/issues",
            "POST /repos/acme/*/issues",
        ] {
            assert_eq!(first_uncovered(&ceiling, &[rule(ok)]), None, "{ok}");
        }
        for bad in [
            "* /repos/acme/x",
            "GET /repos/**",
            "GET /**",
            "POST /repos/acme/*/issues/1",
            "POST /repos/acme/**",
            "DELETE /repos/acme/x",
        ] {
            assert!(first_uncovered(&ceiling, &[rule(bad)]).is_some(), "{bad}");
        }
    }

    #[test]
    fn refused_paths() {
        for bad in [
            "/a/../b",
            "/a/./b",
            // Servlet containers (Tomcat, Jetty) read `..;x` as `..`.
            "/a/..;/b",
            "/a/..;x=1/b",
            "/a/.;/b",
            "/a/..%3b/b",
            "/a/.%3Bx/b",
            // Overlong UTF-8 for '.', and bytes that are not UTF-8 at all.
            "/a/%c0%ae%c0%ae/b",
            "/a/%ff",
            "/a//b",
            "/a/",
            "/a/%2e%2e/b",
            "/a/%2E",
            "/a%2fb",
            "/a%5cb",
            "/a%252e",
            "/a\\b",
            "/a\nb",
            "/a\u{0}b",
            "/a b",
            "a/b",
            "http://evil.example/a",
            "//evil.example/a",
            "/a#frag",
            "/a%zz",
            "/a%2",
            "/a%+1",
            "/a*",
            "/a?x=%0d%0a",
            "/é",
        ] {
            assert!(
                RequestPath::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
        // Percent-encoded UTF-8 text, and parameters after a segment that is not a dot one.
        for good in ["/a/%e2%82%ac", "/a;v=1/b", "/a/...;x", "/a/x%3b"] {
            assert!(RequestPath::parse(good).is_ok(), "{good:?}");
        }
        let p = path("/v1/models?limit=2&q=a%20b");
        assert_eq!(p.path(), "/v1/models");
        assert_eq!(p.query(), Some("limit=2&q=a%20b"));
        assert_eq!(path("/").path(), "/");
    }

    #[test]
    fn rule_round_trip() {
        for s in ["GET /v1/models", "* /**", "POST /repos/*/x/**", "DELETE /"] {
            assert_eq!(rule(s).to_string(), s);
        }
        assert_eq!(rule("get   /a").to_string(), "GET /a");
        assert!(Rule::parse("GET /a/**/b").is_err());
        assert!(Rule::parse("GET /a*").is_err());
        assert!(Rule::parse("FETCH /a").is_err());
        assert!(Rule::parse("/a").is_err());
        assert!(Method::parse_request("*").is_err());
    }

    #[test]
    fn exact_rule_matches_only_its_request() {
        let p = path("/v1/chat/completions?stream=true");
        let r = Rule::exact(Method::Post, &p);
        assert_eq!(r.to_string(), "POST /v1/chat/completions");
        assert!(r.matches(Method::Post, &p));
        assert!(!r.matches(Method::Get, &p));
    }
}
