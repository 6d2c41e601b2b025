//! Test support: a real `tilld` on a temp socket and state dir, and a real HTTP upstream on
//! 127.0.0.1. Readiness is `READY=1` on a notify socket, exactly as systemd sees it: nothing polls.
//!
//! The binaries come from the workspace's target dir; `scripts/test` builds them first.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

type UpBody = BoxBody<Bytes, Infallible>;

pub use till_client::{Client, ClientError};

/// The master credential of the `echo` service in every test daemon.
pub const SECRET: &str = "sk-live-TESTSECRET-0123456789abcdef";
/// The master credential of the `other` service.
pub const OTHER_SECRET: &str = "sk-other-SECRET-fedcba9876543210";

/// Path of a workspace binary (`tilld`, `till`, `examples/mint_and_call`), next to the test
/// executable's `deps/` dir.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (scripts/test does: `cargo build --workspace --bins`, and the example)",
        path.display()
    );
    path
}

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path_and_query: String,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

/// The CA that signed [`Upstream::start_tls`]'s certificate, for a service's `ca_file`.
pub fn tls_ca() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tls/ca.pem")
}

/// A real HTTP server on 127.0.0.1 that echoes each request (headers included, so a leaked key
/// would show) and counts them. Special paths:
/// - `/redirect`: 302 to `redirect_to`;
/// - `/stream`: server-sent events; the first event echoes the Authorization header split across
///   two chunks, the second comes only after [`Upstream::release`];
/// - `/slow`: never answers;
/// - `/v1/chat/completions`: an OpenAI-compatible endpoint that accepts only `Bearer SECRET`;
/// - `/v1/messages`: an Anthropic Messages endpoint that accepts only `x-api-key: OTHER_SECRET`;
/// - `/v1/models/M:generateContent` (and `v1beta`, and `:streamGenerateContent`): Gemini,
///   accepting only `x-goog-api-key: OTHER_SECRET`;
/// - `/repos/acme/...`, `/repositories/1/...`: a small GitHub (`fn github` below);
/// - `/status/NNN`: that status, with `x-should-retry: true` as OpenAI sends on a 5xx.
pub struct Upstream {
    pub addr: SocketAddr,
    scheme: &'static str,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    hits: watch::Receiver<u64>,
    gate: Arc<Notify>,
}

impl Upstream {
    pub async fn start(redirect_to: Option<String>) -> Upstream {
        Self::serve(redirect_to, None).await
    }

    /// The same server over TLS, with the certificate for 127.0.0.1 in `tests/fixtures/tls`
    /// (signed by the test CA there, `tls_ca()`, which nothing trusts unless told to).
    pub async fn start_tls() -> Upstream {
        let _ = rustls::crypto::ring::default_provider().install_default();
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tls");
        let certs = CertificateDer::pem_file_iter(dir.join("server.pem"))
            .expect("server.pem")
            .collect::<Result<Vec<_>, _>>()
            .expect("certificates");
        let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).expect("server.key");
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
        Self::serve(
            None,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        )
        .await
    }

    async fn serve(
        redirect_to: Option<String>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (tx, hits) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let seen2 = seen.clone();
        let gate = Arc::new(Notify::new());
        let gate2 = gate.clone();
        let scheme = if tls.is_some() { "https" } else { "http" };
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen2.clone();
                let tx = tx.clone();
                let redirect_to = redirect_to.clone();
                let gate = gate2.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        let tx = tx.clone();
                        let redirect_to = redirect_to.clone();
                        let gate = gate.clone();
                        async move {
                            Ok::<_, Infallible>(echo(req, &seen, &tx, redirect_to, gate).await)
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        // A client that refuses the certificate ends the handshake: no request.
                        Some(tls) => match tls.accept(stream).await {
                            Ok(s) => http.serve_connection(TokioIo::new(s), svc).await,
                            Err(_) => return,
                        },
                        None => http.serve_connection(TokioIo::new(stream), svc).await,
                    };
                });
            }
        });
        Upstream {
            addr,
            scheme,
            seen,
            hits,
            gate,
        }
    }

    /// Lets the `/stream` response send its second event.
    pub fn release(&self) {
        self.gate.notify_one();
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub fn hits(&self) -> u64 {
        *self.hits.borrow()
    }

    /// Waits until the upstream has answered at least `n` requests.
    pub async fn wait_hits(&self, n: u64) {
        let mut rx = self.hits.clone();
        tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|h| *h >= n))
            .await
            .expect("upstream hits in time")
            .expect("upstream alive");
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

async fn echo(
    req: Request<Incoming>,
    seen: &Mutex<Vec<Seen>>,
    tx: &watch::Sender<u64>,
    redirect_to: Option<String>,
    gate: Arc<Notify>,
) -> Response<UpBody> {
    let method = req.method().to_string();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let echo = serde_json::json!({
        "method": method,
        "path": path_and_query,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    let auth = headers.get("authorization").cloned().unwrap_or_default();
    seen.lock().expect("seen").push(Seen {
        method,
        path_and_query: path_and_query.clone(),
        headers,
        body,
    });
    tx.send_modify(|h| *h += 1);
    if path_and_query.starts_with("/slow") {
        std::future::pending::<()>().await;
    }
    // Groq serves the same under `/openai`.
    if ["/v1/chat/completions", "/openai/v1/chat/completions"]
        .iter()
        .any(|p| path_and_query.starts_with(p))
    {
        return chat_completion(&auth, &echo["body"]);
    }
    if path_and_query.starts_with("/repos/acme/") || path_and_query.starts_with("/repositories/1/")
    {
        let host = echo["headers"]["host"].as_str().unwrap_or_default();
        return github(&path_and_query, &format!("http://{host}"));
    }
    if let Some(code) = path_and_query
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
    {
        // An upstream error as OpenAI sends one, inviting the SDK to retry.
        return Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .header("x-should-retry", "true")
            .body(
                Full::new(Bytes::from_static(
                    br#"{"error":{"message":"upstream error"}}"#,
                ))
                .boxed(),
            )
            .expect("response");
    }
    let gemini_model = ["/v1/models/", "/v1beta/models/"]
        .iter()
        .any(|p| path_and_query.starts_with(p));
    if gemini_model
        && [":generateContent", ":streamGenerateContent"]
            .iter()
            .any(|m| path_and_query.contains(m))
    {
        let key = echo["headers"]["x-goog-api-key"]
            .as_str()
            .unwrap_or_default();
        return gemini(&path_and_query, key);
    }
    if path_and_query.starts_with("/v1/messages") {
        return anthropic_message(echo["headers"]["x-api-key"].as_str().unwrap_or_default());
    }
    if let Some(query) = path_and_query.strip_prefix("/drip?") {
        // `n` events, one every `ms` milliseconds: an answer that takes long but never goes quiet
        // for long, as an LLM's streamed completion does.
        let arg = |name: &str| -> u64 {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or(1)
        };
        let (n, every) = (arg("n"), Duration::from_millis(arg("ms")));
        let stream = futures_util::stream::unfold(0u64, move |i| async move {
            if i == n {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(every).await;
            }
            let c = Bytes::from(format!("data: {i}\n\n"));
            Some((Ok::<_, Infallible>(hyper::body::Frame::data(c)), i + 1))
        });
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(StreamBody::new(stream).boxed())
            .expect("response");
    }
    if path_and_query.starts_with("/stream") {
        // The key, echoed in two chunks split mid-key, then a second event after the gate opens.
        let (first, second) = auth.split_at(auth.len() / 2);
        let chunks = vec![
            format!("data: {{\"auth\": \"{first}"),
            format!("{second}\"}}\n\n"),
        ];
        let stream =
            futures_util::stream::unfold((chunks, 0usize, gate), |(chunks, i, gate)| async move {
                if i < chunks.len() {
                    let c = Bytes::from(chunks[i].clone());
                    return Some((
                        Ok::<_, Infallible>(hyper::body::Frame::data(c)),
                        (chunks, i + 1, gate),
                    ));
                }
                if i == chunks.len() {
                    gate.notified().await;
                    let c = Bytes::from_static(b"data: second\n\ndata: [DONE]\n\n");
                    return Some((Ok(hyper::body::Frame::data(c)), (chunks, i + 1, gate)));
                }
                None
            });
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(StreamBody::new(stream).boxed())
            .expect("response");
    }
    let mut resp = Response::builder().header("content-type", "application/json");
    if let Ok(v) = hyper::header::HeaderValue::from_str(&auth) {
        resp = resp.header("x-echo-authorization", v);
    }
    if path_and_query.starts_with("/redirect")
        && let Some(to) = redirect_to
    {
        resp = resp.status(302).header("location", format!("{to}/stolen"));
    }
    resp.body(Full::new(Bytes::from(echo.to_string())).boxed())
        .expect("response")
}

/// A small GitHub: the answers name their own origin in absolute URLs, as api.github.com does
/// (`url` fields, `Link` pagination by repository id, a 301 for a renamed repository), which
/// clients such as PyGithub follow. `acme/till` has five open issues, three on the first page.
fn github(path_and_query: &str, origin: &str) -> Response<UpBody> {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let issue = |n: u32| {
        serde_json::json!({
            "number": n,
            "title": format!("issue {n}"),
            "state": "open",
            "url": format!("{origin}/repos/acme/till/issues/{n}"),
        })
    };
    let json = |body: serde_json::Value| {
        Response::builder()
            .header("content-type", "application/json; charset=utf-8")
            .body(Full::new(Bytes::from(body.to_string())).boxed())
            .expect("response")
    };
    match path {
        "/repos/acme/till" => json(serde_json::json!({
            "id": 1,
            "name": "till",
            "full_name": "acme/till",
            "url": format!("{origin}/repos/acme/till"),
            "issues_url": format!("{origin}/repos/acme/till/issues{{/number}}"),
        })),
        "/repos/acme/old-till" => Response::builder()
            .status(301)
            .header("location", format!("{origin}/repos/acme/till"))
            .body(Full::new(Bytes::new()).boxed())
            .expect("response"),
        "/repos/acme/till/issues" => {
            let next = format!("{origin}/repositories/1/issues?state=open&page=2");
            let mut resp = json(serde_json::json!([issue(1), issue(2), issue(3)]));
            let link = format!(r#"<{next}>; rel="next", <{next}>; rel="last""#);
            resp.headers_mut()
                .insert("link", link.parse().expect("link header"));
            resp
        }
        "/repositories/1/issues" if query.contains("page=2") => {
            json(serde_json::json!([issue(4), issue(5)]))
        }
        _ => Response::builder()
            .status(404)
            .header("content-type", "application/json; charset=utf-8")
            .body(Full::new(Bytes::from_static(br#"{"message":"Not Found"}"#)).boxed())
            .expect("response"),
    }
}

/// A Gemini `generateContent` answer (or `streamGenerateContent?alt=sse`, two events) that
/// accepts only the `other` service's real key, in `x-goog-api-key`.
fn gemini(path_and_query: &str, key: &str) -> Response<UpBody> {
    if key != OTHER_SECRET {
        let body =
            r#"{"error":{"code":400,"message":"API key not valid.","status":"INVALID_ARGUMENT"}}"#;
        return Response::builder()
            .status(400)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())).boxed())
            .expect("response");
    }
    let answer = |text: &str| {
        serde_json::json!({
            "candidates": [{"content": {"parts": [{"text": text}], "role": "model"},
                            "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4, "totalTokenCount": 7},
            "modelVersion": "gemini-2.0-flash",
        })
    };
    if path_and_query.contains(":streamGenerateContent") {
        let events = format!(
            "data: {}\r\n\r\ndata: {}\r\n\r\n",
            answer("hello from "),
            answer("upstream")
        );
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Full::new(Bytes::from(events)).boxed())
            .expect("response");
    }
    Response::builder()
        .header("content-type", "application/json; charset=UTF-8")
        .body(Full::new(Bytes::from(answer("hello from upstream").to_string())).boxed())
        .expect("response")
}

/// An Anthropic Messages API answer that accepts only the `other` service's real key.
fn anthropic_message(key: &str) -> Response<UpBody> {
    let (status, body) = if key == OTHER_SECRET {
        (
            200,
            serde_json::json!({"id": "msg_1", "type": "message", "role": "assistant",
                "model": "test-model", "content": [{"type": "text", "text": "hello from upstream"}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 1, "output_tokens": 3}}),
        )
    } else {
        (
            401,
            serde_json::json!({"type": "error", "error": {"type": "authentication_error",
                "message": "invalid x-api-key"}}),
        )
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("response")
}

/// An OpenAI-compatible chat completion that accepts only the real key; streams when asked.
fn chat_completion(auth: &str, body: &serde_json::Value) -> Response<UpBody> {
    if auth != format!("Bearer {SECRET}") {
        let err = serde_json::json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}});
        return Response::builder()
            .status(401)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(err.to_string())).boxed())
            .expect("response");
    }
    let req: serde_json::Value =
        serde_json::from_str(body.as_str().unwrap_or("{}")).unwrap_or_default();
    let model = req["model"].as_str().unwrap_or("test-model").to_owned();
    if req["stream"].as_bool() == Some(true) {
        let mut out = String::new();
        for piece in ["hello", " from", " upstream"] {
            let chunk = serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]});
            out.push_str(&format!("data: {chunk}\n\n"));
        }
        if req["stream_options"]["include_usage"].as_bool() == Some(true) {
            let chunk = serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}});
            out.push_str(&format!("data: {chunk}\n\n"));
        }
        out.push_str("data: [DONE]\n\n");
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Full::new(Bytes::from(out)).boxed())
            .expect("response");
    }
    let reply = serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello from upstream"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}});
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(reply.to_string())).boxed())
        .expect("response")
}

/// A running `tilld` with its own temp dir, socket, state, audit trail and log.
pub struct TestDaemon {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub audit: PathBuf,
    pub log: PathBuf,
    pub child: Child,
    _tmp: Option<tempfile::TempDir>,
}

/// `tilld --config CONFIG`.
fn tilld_on(config: &Path) -> Command {
    let mut cmd = Command::new(bin("tilld"));
    cmd.arg("--config").arg(config);
    cmd
}

/// The config every test daemon starts from: `echo` (bearer, `* /**`), `other` (a header
/// key, `GET /**`), `q` (key in the query) and `basic` (basic auth), all on `upstream`.
pub fn standard_config(dir: &Path, upstream: &str, extra_daemon: &str) -> String {
    for (name, secret) in [("echo.key", SECRET), ("other.key", OTHER_SECRET)] {
        let p = dir.join(name);
        std::fs::write(&p, format!("{secret}\n")).expect("write key");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    }
    let d = dir.display();
    format!(
        r#"[daemon]
socket = "{d}/till.sock"
state_dir = "{d}/state"
audit_log = "{d}/audit.jsonl"
{extra_daemon}

[services.echo]
base_url = "{upstream}"
secret = {{ file = "{d}/echo.key" }}
allow = ["* /**"]
max_uses = 1000

[services.other]
base_url = "{upstream}/other"
inject = {{ header = "x-api-key" }}
secret = {{ file = "{d}/other.key" }}
allow = ["GET /**"]
max_uses = 5
max_ttl = "1h"

[services.q]
base_url = "{upstream}"
inject = {{ query = "key" }}
secret = {{ file = "{d}/echo.key" }}
allow = ["GET /**"]

[services.basic]
base_url = "{upstream}"
inject = {{ basic_user = "api" }}
secret = {{ file = "{d}/echo.key" }}
allow = ["GET /**"]
"#
    )
}

impl TestDaemon {
    /// A fresh temp dir with the standard config for `upstream`.
    pub fn start(upstream: &Upstream) -> TestDaemon {
        Self::start_extra(upstream, "")
    }

    pub fn start_extra(upstream: &Upstream, extra_daemon: &str) -> TestDaemon {
        Self::start_fresh(upstream, extra_daemon, "", tilld_on)
    }

    /// The standard config with `extra_daemon` in its `[daemon]` section and `more` at its end
    /// (`{dir}` in it becomes the daemon's directory, where `echo.key` is).
    pub fn start_with(upstream: &Upstream, extra_daemon: &str, more: &str) -> TestDaemon {
        Self::start_fresh(upstream, extra_daemon, more, tilld_on)
    }

    /// A fresh temp dir (kept as long as the daemon) with the standard config for `upstream`:
    /// `extra_daemon` in its `[daemon]` section, `more` at its end (`{dir}` in it becomes the
    /// directory, where `echo.key` is), and `tilld` started on it by `command`.
    fn start_fresh(
        upstream: &Upstream,
        extra_daemon: &str,
        more: &str,
        command: impl FnOnce(&Path) -> Command,
    ) -> TestDaemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        let config = standard_config(&dir, &upstream.url(), extra_daemon)
            + &more.replace("{dir}", &dir.display().to_string());
        std::fs::write(dir.join("till.toml"), config).expect("config");
        let started = Self::try_start_with(&dir, command);
        let mut d = started.unwrap_or_else(|msg| panic!("tilld did not become ready: {msg}"));
        d._tmp = Some(tmp);
        d
    }

    /// As [`TestDaemon::start`], with `more` appended to the config (services, say; `{dir}` in it
    /// becomes the daemon's directory, where `echo.key` is) and these variables added to the
    /// daemon's environment.
    pub fn start_with_env(upstream: &Upstream, more: &str, env: &[(&str, &str)]) -> TestDaemon {
        Self::start_fresh(upstream, "", more, |config| {
            let mut cmd = tilld_on(config);
            cmd.envs(env.iter().copied());
            cmd
        })
    }

    /// As [`TestDaemon::start`], in a process started with these limits on open descriptors.
    pub fn start_with_fd_limit(upstream: &Upstream, soft: u32, hard: u32) -> TestDaemon {
        let script =
            format!("ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$0\" --config \"$1\"");
        Self::start_fresh(upstream, "", "", |config| {
            let mut cmd = Command::new("bash");
            cmd.arg("-c").arg(&script).arg(bin("tilld")).arg(config);
            cmd
        })
    }

    /// Waits (60 s at most) until the daemon's log contains `needle`.
    pub async fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log within 60 s:\n{}",
                self.log_text()
            );
            tokio::task::yield_now().await;
        }
    }

    /// Starts `tilld --config CONFIG` in the working directory `dir` (CONFIG relative to it).
    pub fn start_in_cwd(dir: &Path, config: &str) -> TestDaemon {
        let started = Self::try_start_with(dir, |_| {
            let mut cmd = tilld_on(Path::new(config));
            cmd.current_dir(dir);
            cmd
        });
        started.unwrap_or_else(|msg| panic!("tilld did not become ready: {msg}"))
    }

    /// Starts `tilld` on `dir/till.toml` (state kept across restarts in `dir/state`).
    pub fn start_in(dir: &Path) -> TestDaemon {
        match Self::try_start_in(dir) {
            Ok(d) => d,
            Err(msg) => panic!("tilld did not become ready: {msg}"),
        }
    }

    /// Starts `tilld` and waits for `READY=1`; on failure returns its exit status and log.
    pub fn try_start_in(dir: &Path) -> Result<TestDaemon, String> {
        Self::try_start_with(dir, tilld_on)
    }

    /// Starts `tilld` as systemd's socket activation would: the listening sockets `fds` (already
    /// bound by the caller) become fds 3, 4, ... of the daemon, with `LISTEN_FDS` and `LISTEN_PID`.
    pub fn start_activated(dir: &Path, fds: &[std::os::fd::RawFd]) -> TestDaemon {
        // bash sets LISTEN_PID to its own pid, which exec keeps; its redirections move the sockets
        // to fds 3.. in the exec'd daemon (dash refuses fds above 9, hence bash).
        let redirects: String = fds
            .iter()
            .enumerate()
            .map(|(i, fd)| format!(" {}<&{fd}", 3 + i))
            .collect();
        let script = format!(
            "LISTEN_PID=$$ LISTEN_FDS={} exec \"$0\" --config \"$1\"{redirects}",
            fds.len()
        );
        match Self::try_start_with(dir, |config| {
            let mut cmd = Command::new("bash");
            cmd.arg("-c").arg(&script).arg(bin("tilld")).arg(config);
            cmd
        }) {
            Ok(d) => d,
            Err(msg) => panic!("socket-activated tilld did not become ready: {msg}"),
        }
    }

    fn try_start_with(
        dir: &Path,
        command: impl FnOnce(&Path) -> Command,
    ) -> Result<TestDaemon, String> {
        let notify_path = dir.join(format!("notify-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let log = dir.join("tilld.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log");
        let config = dir.join("till.toml");
        let mut child = command(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            // Tests log at debug, so a secret in any log line would be seen; benchmarks set TILL_LOG.
            .env(
                "TILL_LOG",
                std::env::var("TILL_LOG").unwrap_or_else(|_| "debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("spawn tilld");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 256];
        loop {
            // The short read timeout only lets us notice a daemon that died before READY=1.
            match notify.recv(&mut buf) {
                Ok(n) if buf[..n].windows(7).any(|w| w == b"READY=1") => break,
                _ => {}
            }
            if let Ok(Some(status)) = child.try_wait() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("tilld exited with {status}:\n{text}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("no READY=1 within 60 s".into());
            }
        }
        let _ = std::fs::remove_file(&notify_path);
        Ok(TestDaemon {
            dir: dir.to_owned(),
            socket: dir.join("till.sock"),
            config,
            audit: dir.join("audit.jsonl"),
            log,
            child,
            _tmp: None,
        })
    }

    /// The gateway's base URL (the daemon must have been started with `gateway = ...`).
    pub async fn gateway_url(&self) -> String {
        self.client()
            .await
            .status()
            .await
            .expect("status")
            .gateway
            .expect("this daemon serves no gateway")
    }

    /// Mints a token for `service` with one rule and `uses` activations.
    pub async fn mint(&self, service: &str, rule: &str, uses: u32) -> till_protocol::MintReply {
        self.mint_rules(service, &[rule], uses).await
    }

    /// Mints a token for `service` with these rules and `uses` activations.
    pub async fn mint_rules(
        &self,
        service: &str,
        rules: &[&str],
        uses: u32,
    ) -> till_protocol::MintReply {
        self.client()
            .await
            .mint(till_protocol::MintRequest {
                service: service.into(),
                allow: rules.iter().map(|r| (*r).to_owned()).collect(),
                uses: Some(uses),
                ..till_protocol::MintRequest::default()
            })
            .await
            .expect("mint")
    }

    /// Every token the daemon knows (spent, expired and revoked ones too).
    pub async fn all_tokens(&self) -> Vec<till_protocol::TokenInfo> {
        self.client()
            .await
            .tokens(true)
            .await
            .expect("tokens")
            .tokens
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.socket)
            .await
            .expect("connect to tilld")
    }

    /// `till audit verify` passes on this daemon's trail.
    pub fn assert_trail_verifies(&self) {
        let out = self.till(&["audit", "verify"]);
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs the `till` CLI against this daemon.
    pub fn till(&self, args: &[&str]) -> Output {
        self.till_command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run till")
    }

    /// `till --socket <this daemon's> args...`, to be given its stdio and run.
    pub fn till_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("till"));
        c.arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("TILL_TOKEN");
        c
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        signal(&self.child, libc::SIGTERM);
        self.child.wait().expect("wait tilld")
    }

    /// Takes the temp dir so it outlives this daemon (for restarts on the same state).
    pub fn keep_dir(&mut self) -> Option<tempfile::TempDir> {
        self._tmp.take()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn audit_text(&self) -> String {
        std::fs::read_to_string(&self.audit).unwrap_or_default()
    }
}

/// A small tmpfs mounted for a test (a full disk on demand), unmounted however the test ends.
pub struct Mounted(PathBuf);

impl Mounted {
    /// Mounts a tmpfs of `size` (as `mount -o size=` reads it) on the directory `at`; `None` when
    /// this process may not (not root, or a machine that forbids it): the caller skips.
    pub fn tmpfs(at: &Path, size: &str) -> Option<Mounted> {
        if !std::fs::metadata("/proc/self")
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        {
            return None;
        }
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .ok()?;
        mounted.success().then(|| Mounted(at.to_owned()))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A listening socket at `path` as systemd's socket activation makes one: the listener (kept by
/// the caller, as systemd keeps it across restarts) and an inheritable duplicate at fd 100 or
/// above, for [`TestDaemon::start_activated`].
pub fn activation_socket(path: &Path) -> (std::os::unix::net::UnixListener, i32) {
    use std::os::fd::AsRawFd;
    let l = std::os::unix::net::UnixListener::bind(path).expect("bind");
    #[allow(unsafe_code)]
    // SAFETY: fcntl on an fd this process owns; F_DUPFD returns a new fd (no CLOEXEC) at or above
    // 100, out of the way of the 3.. the daemon will receive.
    let dup = unsafe { libc::fcntl(l.as_raw_fd(), libc::F_DUPFD, 100) };
    assert!(dup >= 100, "dup failed");
    (l, dup)
}

/// Runs a benchmark: the upstream (another server) on its own runtime, the bench client on a
/// current-thread runtime as the `till` CLI uses, so its figures are not a scheduler's.
pub fn run_bench<F, Fut>(bench: F)
where
    F: FnOnce(Upstream) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let upstream_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("upstream runtime");
    let up = upstream_rt.block_on(Upstream::start(None));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench(up));
}

/// A daemon for benchmarks: the standard config with room for a billion activations per token.
pub fn bench_daemon(up: &Upstream) -> (tempfile::TempDir, TestDaemon) {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The audit trail where it is by default, in the state directory: the tests' configs keep it
    // beside till.toml, whose directory the reload watcher watches, so every audit line would
    // also wake the watcher.
    let text = standard_config(tmp.path(), &up.url(), "")
        .replace("max_uses = 1000", "max_uses = 1000000000")
        .replace("/audit.jsonl\"", "/state/audit.jsonl\"");
    std::fs::write(tmp.path().join("till.toml"), text).expect("config");
    let mut d = TestDaemon::start_in(tmp.path());
    d.audit = tmp.path().join("state/audit.jsonl");
    (tmp, d)
}

/// An HTTP client for talking to the gateway (reqwest with ring, as the daemon uses).
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
}

/// Peak resident memory of a process, in KiB (`VmHWM` from /proc).
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[allow(unsafe_code)]
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) with a pid we spawned and a valid signal number; no memory is involved.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
