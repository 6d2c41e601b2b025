//! `till.toml`: parsed once with `deny_unknown_fields`, then validated into [`Config`].
//!
//! Resolution: `--config PATH`, else `$TILL_CONFIG`, else the default file (if it exists), else the
//! built-in defaults, which serve a preset for every provider key found in the daemon's environment.
//! Loading is all-or-nothing: a config whose secrets cannot all be read is an error, never half-served.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use reqwest::Url;
use reqwest::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use till_protocol::{Rule, paths};

use crate::presets::{self, PRESETS};
use crate::secret::{Secret, SecretSource};

const DEFAULT_MAX_USES: u32 = 100;
const DEFAULT_MAX_TTL: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// As nginx's `client_header_timeout` (60 s) and hyper's own default (30 s): long enough for any
/// SDK's pooled connection between requests, short enough that idle or stalled connections do
/// not pile up.
const DEFAULT_GATEWAY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Per uid. Every local user can reach the gateway, and each open connection holds about 30 KB
/// (measured); without a bound, one user's idle connections could take the daemon's memory.
const DEFAULT_MAX_CONNECTIONS: usize = 4096;
const DEFAULT_MAX_BODY: usize = 8 * 1024 * 1024;
const MAX_BODY_LIMIT: usize = 11 * 1024 * 1024;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    daemon: DaemonSection,
    #[serde(default)]
    defaults: DefaultsSection,
    #[serde(default)]
    services: BTreeMap<String, ServiceSection>,
    /// Which peers may mint for which services. None: every peer that can reach the socket.
    #[serde(default)]
    peers: Vec<PeerSection>,
    #[serde(default)]
    alerts: AlertsSection,
}

/// `[alerts]`: when to raise an `alert` event (always also a warning in the log).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertsSection {
    /// Refusals from one peer within 10 s that raise an alert; later ones in the window are
    /// counted, not logged one by one. Default 20; 0 turns the limit off.
    refusal_burst: Option<u32>,
    /// Alerts that also revoke every token the offending uid minted: any of "refusal_burst",
    /// "canary", "holder_mismatch", "credential_in_request".
    #[serde(default)]
    revoke_peer_on: Vec<String>,
    /// A command run for each alert, with the alert's JSON on stdin.
    command: Option<String>,
    /// An http://127.0.0.1 URL each alert's JSON is POSTed to.
    webhook: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Alerts {
    pub refusal_burst: u32,
    pub revoke_peer_on: Vec<String>,
    pub command: Option<String>,
    pub webhook: Option<Url>,
}

/// `[[peers]]`: one of `uid`, `gid` or `group`, and the services it may mint for (`"*"`: all).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerSection {
    uid: Option<u32>,
    gid: Option<u32>,
    group: Option<String>,
    services: Vec<String>,
}

/// Who a `[[peers]]` rule is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMatch {
    Uid(u32),
    Gid(u32),
}

#[derive(Debug, Clone)]
pub struct PeerRule {
    pub who: PeerMatch,
    /// Service names; `"*"` means every service.
    pub services: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DaemonSection {
    socket: Option<PathBuf>,
    mcp_socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    audit_log: Option<PathBuf>,
    gateway: Option<String>,
    /// Serve the gateway on a non-loopback address. Anyone who can reach it and holds a token
    /// can spend it; off unless said here.
    #[serde(default)]
    gateway_allow_non_loopback: bool,
    /// How long the gateway waits for a request's headers (on a new connection, or between
    /// requests on a kept-alive one) before it closes the connection.
    gateway_idle_timeout: Option<String>,
    /// The most gateway connections one uid may hold open at once.
    gateway_max_connections: Option<usize>,
    /// The most connections one uid may hold open to the native and MCP sockets together.
    socket_max_connections: Option<usize>,
    admin_uids: Option<Vec<u32>>,
    max_body: Option<usize>,
    /// How long a spent, expired or revoked token's final state is kept for `till tokens --all`.
    retention: Option<String>,
    /// Rotate the audit trail past this many bytes (0: never). Default 100 MiB.
    audit_max_bytes: Option<u64>,
    /// Rotated trail files kept (audit.jsonl.1 ... .N). Default 10.
    audit_keep: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultsSection {
    uses: Option<u32>,
    ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSection {
    preset: Option<String>,
    base_url: Option<String>,
    inject: Option<InjectSection>,
    secret: Option<SecretSource>,
    allow: Option<Vec<String>>,
    max_uses: Option<u32>,
    max_ttl: Option<String>,
    #[serde(default)]
    insecure_http: bool,
    timeout: Option<String>,
    connect_timeout: Option<String>,
    /// Warn (log, status, metric) when the key is older than this (file age; for an env key, the
    /// time since the daemon read it).
    max_age: Option<String>,
    /// PEM certificates trusted for this service's HTTPS origin, besides the system's (an internal
    /// API with a private CA).
    ca_file: Option<PathBuf>,
    /// Its answers report LLM usage (`usage`, `usageMetadata`), so tokens may carry a budget.
    /// Presets say it for themselves; for an OpenAI-compatible server of your own, say it here.
    llm_usage: Option<bool>,
    /// The gateway rewrites the service's own URLs in its JSON answers (GitHub's `url` fields) to
    /// the gateway, so clients that follow them come back through Till. The github preset says
    /// so; `Location` and `Link` headers are rewritten for every service.
    rewrite_urls: Option<bool>,
}

/// `{ header = "Authorization", value = "Bearer {secret}" }`, `{ query = "key" }` or
/// `{ basic_user = "api" }` (HTTP basic auth with the secret as password).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectSection {
    header: Option<String>,
    value: Option<String>,
    query: Option<String>,
    basic_user: Option<String>,
}

/// How the master credential is put on an upstream request.
#[derive(Debug, Clone)]
pub enum Inject {
    /// A header whose value is `template` with `{secret}` replaced.
    Header {
        name: HeaderName,
        template: String,
    },
    Query {
        param: String,
    },
    Basic {
        user: String,
    },
}

impl Inject {
    pub fn describe(&self) -> String {
        match self {
            Inject::Header { name, .. } => format!("header {name}"),
            Inject::Query { param } => format!("query parameter {param}"),
            Inject::Basic { user } => format!("basic auth as {user}"),
        }
    }
}

/// A validated service. Holds where the secret comes from, never the secret.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub name: String,
    /// Scheme, host, port and an optional path prefix. Its origin is where the key may go.
    pub base_url: Url,
    pub inject: Inject,
    pub secret: SecretSource,
    pub allow: Vec<Rule>,
    pub max_uses: u32,
    pub max_ttl: Duration,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub max_age: Option<Duration>,
    pub default_headers: Vec<(HeaderName, HeaderValue)>,
    /// Extra trusted roots for the HTTPS origin (read when the service's client is built).
    pub ca_file: Option<PathBuf>,
    /// Tokens for it may carry a budget of LLM tokens (its answers report their usage).
    pub llm_usage: bool,
    /// The gateway points the service's own URLs in its JSON answers back at itself.
    pub rewrite_urls: bool,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub mcp_socket: PathBuf,
    pub state_dir: PathBuf,
    pub audit_log: PathBuf,
    pub gateway: Option<SocketAddr>,
    pub gateway_idle_timeout: Duration,
    pub gateway_max_connections: usize,
    pub socket_max_connections: usize,
    pub admin_uids: Vec<u32>,
    pub default_uses: u32,
    pub default_ttl: Duration,
    pub max_body: usize,
    /// How long a dead token's final state is kept before it is swept.
    pub retention: Duration,
    pub audit_max_bytes: u64,
    pub audit_keep: u32,
    pub services: BTreeMap<String, ServiceConfig>,
    /// `[[peers]]`; empty means no per-peer limits.
    pub peers: Vec<PeerRule>,
    pub alerts: Alerts,
    /// The file this came from; `None` for the built-in defaults.
    pub source: Option<PathBuf>,
}

/// A config with every secret read: what the daemon serves.
pub struct Loaded {
    pub config: Config,
    pub secrets: BTreeMap<String, Secret>,
}

impl Config {
    /// Finds and parses the config (see the module docs for the order).
    pub fn resolve(explicit: Option<&Path>, uid: u32) -> Result<Config> {
        if let Some(path) = explicit {
            return Config::from_file(path);
        }
        if let Some(path) = std::env::var_os("TILL_CONFIG").filter(|v| !v.is_empty()) {
            return Config::from_file(Path::new(&path));
        }
        let default = paths::default_config_file(uid);
        if default.exists() {
            return Config::from_file(&default);
        }
        Config::builtin(uid)
    }

    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut cfg = Config::parse(&text, crate::sys::uid())
            .with_context(|| format!("invalid config file {}", path.display()))?;
        cfg.source = Some(path.to_owned());
        Ok(cfg)
    }

    pub fn parse(text: &str, uid: u32) -> Result<Config> {
        let file: FileConfig = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
        build(file, uid)
    }

    /// The built-in defaults: a preset service for every provider key in the environment.
    pub fn builtin(uid: u32) -> Result<Config> {
        let mut file = FileConfig::default();
        for preset in PRESETS {
            if let Some(var) = preset
                .env
                .iter()
                .find(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
            {
                file.services.insert(
                    preset.name.to_owned(),
                    ServiceSection {
                        preset: Some(preset.name.to_owned()),
                        base_url: None,
                        inject: None,
                        secret: Some(SecretSource::env(var)),
                        allow: None,
                        max_uses: None,
                        max_ttl: None,
                        insecure_http: false,
                        timeout: None,
                        connect_timeout: None,
                        max_age: None,
                        ca_file: None,
                        llm_usage: None,
                        rewrite_urls: None,
                    },
                );
            }
        }
        build(file, uid)
    }

    /// Reads every service's secret. All or nothing.
    pub fn load_secrets(self) -> Result<Loaded> {
        let mut secrets = BTreeMap::new();
        for (name, svc) in &self.services {
            let secret = svc
                .secret
                .load()
                .with_context(|| format!("service {name}: cannot load its secret"))?;
            secrets.insert(name.clone(), secret);
        }
        Ok(Loaded {
            config: self,
            secrets,
        })
    }
}

/// toml's own rendering quotes the offending line, and serde's message can quote a mistyped
/// value: either could be a key someone pasted where a `{ file = ... }` belongs, and this error goes
/// to the log, the trail (a refused reload) and `till reload`'s reply. So: the line and column, and
/// the message with every double-quoted value masked (field names are in backticks and stay).
fn parse_error(text: &str, e: &toml::de::Error) -> anyhow::Error {
    let mut masked = String::new();
    let mut quoted = false;
    for c in e.message().chars() {
        if c == '"' {
            if !quoted {
                masked.push_str("\"…\"");
            }
            quoted = !quoted;
        } else if !quoted {
            masked.push(c);
        }
    }
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            anyhow!("line {line}, column {column}: {}", masked.trim())
        }
        None => anyhow!("{}", masked.trim()),
    }
}

fn duration(key: &str, value: &Option<String>, default: Duration) -> Result<Duration> {
    match value {
        None => Ok(default),
        Some(s) => {
            let d = humantime::parse_duration(s)
                .map_err(|e| anyhow!("{key} = {s:?}: {e} (write e.g. \"30s\", \"15m\", \"1h\")"))?;
            if d.is_zero() {
                bail!("{key} must be longer than zero");
            }
            Ok(d)
        }
    }
}

fn build(file: FileConfig, uid: u32) -> Result<Config> {
    let d = file.daemon;
    let socket = d.socket.unwrap_or_else(|| paths::default_socket(uid));
    let mcp_socket = d
        .mcp_socket
        .unwrap_or_else(|| paths::mcp_socket_beside(&socket));
    let state_dir = d.state_dir.unwrap_or_else(|| paths::default_state_dir(uid));
    let audit_log = d.audit_log.unwrap_or_else(|| state_dir.join("audit.jsonl"));
    let gateway = match d.gateway {
        None => None,
        Some(g) => {
            let addr: SocketAddr = g.parse().map_err(|_| {
                anyhow!("daemon.gateway = {g:?}: write an address like \"127.0.0.1:8719\"")
            })?;
            if !addr.ip().is_loopback() {
                if !d.gateway_allow_non_loopback {
                    bail!(
                        "daemon.gateway = {g:?}: the gateway listens on loopback only (127.0.0.1 or \
                         ::1); set gateway_allow_non_loopback = true to serve it elsewhere"
                    );
                }
                tracing::warn!(gateway = %addr, "the gateway is served on a non-loopback address");
            }
            Some(addr)
        }
    };
    let mut admin_uids = d.admin_uids.unwrap_or_else(|| vec![0, uid]);
    admin_uids.dedup();
    let default_uses = file.defaults.uses.unwrap_or(1);
    if default_uses == 0 {
        bail!("defaults.uses must be at least 1");
    }
    let default_ttl = duration("defaults.ttl", &file.defaults.ttl, DEFAULT_TTL)?;
    let max_body = d.max_body.unwrap_or(DEFAULT_MAX_BODY);
    if max_body > MAX_BODY_LIMIT {
        // A reply carries the body base64-encoded inside one frame of at most 16 MiB.
        bail!("daemon.max_body = {max_body}: at most {MAX_BODY_LIMIT} bytes");
    }

    let mut services = BTreeMap::new();
    for (name, section) in file.services {
        let svc = build_service(&name, section).with_context(|| format!("services.{name}"))?;
        services.insert(name, svc);
    }
    let mut peers = Vec::new();
    for (i, p) in file.peers.into_iter().enumerate() {
        let who = match (p.uid, p.gid, &p.group) {
            (Some(u), None, None) => PeerMatch::Uid(u),
            (None, Some(g), None) => PeerMatch::Gid(g),
            (None, None, Some(name)) => PeerMatch::Gid(group_id(name).ok_or_else(|| {
                anyhow!("peers[{i}].group = {name:?}: no such group in /etc/group")
            })?),
            _ => bail!("peers[{i}]: write exactly one of uid, gid or group"),
        };
        for s in &p.services {
            if s != "*" && !services.contains_key(s) {
                bail!("peers[{i}].services: {s:?} is not a configured service");
            }
        }
        peers.push(PeerRule {
            who,
            services: p.services,
        });
    }
    const ALERT_KINDS: [&str; 4] = [
        "refusal_burst",
        "canary",
        "holder_mismatch",
        "credential_in_request",
    ];
    for k in &file.alerts.revoke_peer_on {
        if !ALERT_KINDS.contains(&k.as_str()) {
            bail!(
                "alerts.revoke_peer_on: {k:?} is not one of {}",
                ALERT_KINDS.join(", ")
            );
        }
    }
    let webhook = match &file.alerts.webhook {
        Some(w) => {
            let u = Url::parse(w).map_err(|e| anyhow!("alerts.webhook = {w:?}: {e}"))?;
            if u.scheme() != "http" || !is_loopback(&u) {
                bail!("alerts.webhook = {w:?}: alerts go to http:// on loopback only");
            }
            Some(u)
        }
        None => None,
    };
    let alerts = Alerts {
        refusal_burst: file.alerts.refusal_burst.unwrap_or(20),
        revoke_peer_on: file.alerts.revoke_peer_on,
        command: file.alerts.command,
        webhook,
    };
    Ok(Config {
        socket,
        mcp_socket,
        state_dir,
        audit_log,
        gateway,
        gateway_idle_timeout: duration(
            "daemon.gateway_idle_timeout",
            &d.gateway_idle_timeout,
            DEFAULT_GATEWAY_IDLE_TIMEOUT,
        )?,
        gateway_max_connections: match d.gateway_max_connections {
            Some(0) => bail!("daemon.gateway_max_connections must be at least 1"),
            n => n.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        },
        socket_max_connections: match d.socket_max_connections {
            Some(0) => bail!("daemon.socket_max_connections must be at least 1"),
            n => n.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        },
        admin_uids,
        default_uses,
        default_ttl,
        max_body,
        retention: duration("daemon.retention", &d.retention, DEFAULT_RETENTION)?,
        audit_max_bytes: d.audit_max_bytes.unwrap_or(100 * 1024 * 1024),
        audit_keep: d.audit_keep.unwrap_or(10),
        services,
        peers,
        alerts,
        source: None,
    })
}

/// A group's id from `/etc/group` (no NSS: the daemon's config names local groups).
fn group_id(name: &str) -> Option<u32> {
    group_id_in(&std::fs::read("/etc/group").ok()?, name)
}

/// The same from the file's bytes: a line in another encoding (a member's name in Latin-1)
/// must not hide every group, as a read into a `String` did.
fn group_id_in(text: &[u8], name: &str) -> Option<u32> {
    text.split(|&b| b == b'\n').find_map(|l| {
        let mut f = l.split(|&b| b == b':');
        (f.next()? == name.as_bytes())
            .then(|| std::str::from_utf8(f.nth(1)?).ok()?.parse().ok())
            .flatten()
    })
}

fn build_service(name: &str, s: ServiceSection) -> Result<ServiceConfig> {
    if name.is_empty()
        || name.len() > 32
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        bail!("a service name is 1 to 32 of a-z, 0-9, '-' and '_'");
    }
    let preset = match &s.preset {
        Some(p) => Some(presets::find(p).ok_or_else(|| {
            let names: Vec<_> = PRESETS.iter().map(|p| p.name).collect();
            anyhow!(
                "preset = {p:?} is not a preset; choose one of {}",
                names.join(", ")
            )
        })?),
        None => None,
    };
    let base = s
        .base_url
        .as_deref()
        .or(preset.map(|p| p.base_url))
        .ok_or_else(|| anyhow!("base_url is missing (or set preset = \"...\")"))?;
    let base_url = Url::parse(base).map_err(|e| anyhow!("base_url = {base:?}: {e}"))?;
    check_origin(&base_url, s.insecure_http).with_context(|| format!("base_url = {base:?}"))?;
    if let Some(ca) = &s.ca_file
        && base_url.scheme() != "https"
    {
        bail!(
            "ca_file = {:?}: certificates are for an https base_url, and {base:?} is not one",
            ca.display()
        );
    }

    let inject = match (&s.inject, preset) {
        (Some(i), _) => build_inject(i).context("inject")?,
        (None, Some(p)) => Inject::Header {
            name: HeaderName::from_static(p.header.unwrap_or("authorization")),
            template: if p.header.is_some() {
                "{secret}".into()
            } else {
                "Bearer {secret}".into()
            },
        },
        (None, None) => Inject::Header {
            name: HeaderName::from_static("authorization"),
            template: "Bearer {secret}".into(),
        },
    };
    let secret = match (s.secret, preset) {
        (Some(src), _) => src,
        (None, Some(p)) => SecretSource::env(p.env[0]),
        (None, None) => bail!(
            "secret is missing: write secret = {{ file = \"/path\" }}, {{ env = \"VAR\" }} or {{ credential = \"name\" }}"
        ),
    };
    secret.validate().context("secret")?;

    let allow_src: Vec<String> = match (s.allow, preset) {
        (Some(a), _) => a,
        (None, Some(p)) => p.allow.iter().map(|r| (*r).to_owned()).collect(),
        (None, None) => {
            bail!("allow is missing: list the rules tokens may have, e.g. allow = [\"GET /v1/**\"]")
        }
    };
    if allow_src.is_empty() {
        bail!("allow is empty: no token could ever be minted for this service");
    }
    let allow = allow_src
        .iter()
        .enumerate()
        .map(|(i, r)| Rule::parse(r).map_err(|e| anyhow!("allow[{i}] = {r:?}: {e}")))
        .collect::<Result<Vec<_>>>()?;
    let max_uses = s.max_uses.unwrap_or(DEFAULT_MAX_USES);
    if max_uses == 0 {
        bail!("max_uses must be at least 1");
    }
    let default_headers = preset
        .map(|p| {
            p.default_headers
                .iter()
                .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
                .collect()
        })
        .unwrap_or_default();
    Ok(ServiceConfig {
        name: name.to_owned(),
        base_url,
        inject,
        secret,
        allow,
        max_uses,
        max_ttl: duration("max_ttl", &s.max_ttl, DEFAULT_MAX_TTL)?,
        timeout: duration("timeout", &s.timeout, DEFAULT_TIMEOUT)?,
        connect_timeout: duration(
            "connect_timeout",
            &s.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        )?,
        max_age: match &s.max_age {
            Some(_) => Some(duration("max_age", &s.max_age, Duration::ZERO)?),
            None => None,
        },
        default_headers,
        ca_file: s.ca_file,
        llm_usage: s.llm_usage.unwrap_or(preset.is_some_and(|p| p.llm_usage)),
        rewrite_urls: s
            .rewrite_urls
            .unwrap_or(preset.is_some_and(|p| p.rewrite_urls)),
    })
}

/// Whether a URL's host is this machine: `localhost` or a loopback address. (The url crate has
/// already lowercased the name of an http or https URL.)
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// The key may only travel over TLS, or in the clear to loopback, or where the operator said
/// `insecure_http = true`. No userinfo, query or fragment: the base URL is an origin plus a prefix.
fn check_origin(url: &Url, insecure_http: bool) -> Result<()> {
    if !url.username().is_empty() || url.password().is_some() {
        bail!("must not carry a user name or password; use secret and inject");
    }
    if url.query().is_some() || url.fragment().is_some() {
        bail!("must not have a query or fragment");
    }
    url.host().ok_or_else(|| anyhow!("has no host"))?;
    match url.scheme() {
        "https" => Ok(()),
        "http" => {
            if is_loopback(url) || insecure_http {
                Ok(())
            } else {
                bail!(
                    "plain http to a non-loopback host would send the key in the clear; use https or set insecure_http = true"
                )
            }
        }
        other => bail!("scheme {other:?} is not http or https"),
    }
}

fn build_inject(i: &InjectSection) -> Result<Inject> {
    match (&i.header, &i.query, &i.basic_user) {
        (Some(h), None, None) => {
            let name = HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| anyhow!("header = {h:?} is not a valid header name"))?;
            let template = i.value.clone().unwrap_or_else(|| "{secret}".into());
            if template.matches("{secret}").count() != 1 {
                bail!("value = {template:?} must contain {{secret}} exactly once");
            }
            Ok(Inject::Header { name, template })
        }
        (None, Some(q), None) if i.value.is_none() => {
            if q.is_empty()
                || !q
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                bail!("query = {q:?} must be a plain parameter name");
            }
            Ok(Inject::Query { param: q.clone() })
        }
        (None, None, Some(u)) if i.value.is_none() => {
            if u.contains(':') {
                bail!("basic_user must not contain ':'");
            }
            Ok(Inject::Basic { user: u.clone() })
        }
        _ => bail!(
            "write exactly one of {{ header = \"Name\", value = \"Bearer {{secret}}\" }}, {{ query = \"key\" }} or {{ basic_user = \"name\" }}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line that is not UTF-8 hides no other group.
    #[test]
    fn group_ids_are_read_past_a_line_in_another_encoding() {
        let text = b"root:x:0:\nstaff:x:50:jos\xe9\ntill-agents:x:998:alice\n";
        assert_eq!(group_id_in(text, "till-agents"), Some(998));
        assert_eq!(group_id_in(text, "staff"), Some(50));
        assert_eq!(group_id_in(text, "nobody-here"), None);
    }

    #[test]
    fn spec_example_parses() {
        let text = include_str!("../../examples/till.toml");
        let cfg = Config::parse(text, 1000).expect("examples/till.toml must keep loading");
        assert!(cfg.services.contains_key("openai"));
        assert!(cfg.services.contains_key("github"));
    }

    #[test]
    fn system_example_parses() {
        // [[peers]] names the till-agents group, which this machine may not have.
        let text = include_str!("../../examples/system-till.toml")
            .replace("group = \"till-agents\"", "gid = 998");
        let cfg = Config::parse(&text, 0).expect("examples/system-till.toml must keep loading");
        assert_eq!(cfg.peers.len(), 1);
        assert_eq!(cfg.admin_uids, vec![0]);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::parse("[daemon]\nsocket = \"/tmp/x\"\nsokcet = 1\n", 1000)
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("sokcet") && err.contains("line 3"), "{err}");
    }

    #[test]
    fn a_pasted_key_never_comes_back_in_the_error() {
        let text = "[services.x]\nbase_url = \"https://example.com\"\nsecret = \"sk-live-PASTED-0123456789\"\nallow = [\"GET /**\"]\n";
        let err = format!(
            "{:#}",
            Config::parse(text, 1000).expect_err("a string is not a source")
        );
        assert!(!err.contains("PASTED"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn plain_http_to_remote_host_is_refused() {
        let text = "[services.x]\nbase_url = \"http://example.com\"\nsecret = { env = \"X\" }\nallow = [\"GET /**\"]\n";
        let err = format!("{:#}", Config::parse(text, 1000).expect_err("http"));
        assert!(err.contains("insecure_http"), "{err}");
        let ok = text.replace("allow", "insecure_http = true\nallow");
        assert!(Config::parse(&ok, 1000).is_ok());
        let local = text.replace("example.com", "127.0.0.1:9");
        assert!(Config::parse(&local, 1000).is_ok());
    }

    #[test]
    fn bad_rule_names_the_key() {
        let text = "[services.x]\nbase_url = \"https://example.com\"\nsecret = { env = \"X\" }\nallow = [\"GET /ok\", \"GET /a/../b\"]\n";
        let err = format!("{:#}", Config::parse(text, 1000).expect_err("rule"));
        assert!(
            err.contains("services.x") && err.contains("allow[1]"),
            "{err}"
        );
    }

    #[test]
    fn gateway_must_be_loopback() {
        assert!(Config::parse("[daemon]\ngateway = \"0.0.0.0:8719\"\n", 1000).is_err());
        assert!(Config::parse("[daemon]\ngateway = \"127.0.0.1:8719\"\n", 1000).is_ok());
    }
}
