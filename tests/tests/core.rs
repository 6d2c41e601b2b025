//! End-to-end: tokens, activations, refusals and secrecy, through a real `tilld` and a real upstream.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use till_protocol::{CallReply, CallRequest, ErrorCode, MintRequest, RevokeTarget, TokenState};
use till_tests::{Client, ClientError, OTHER_SECRET, SECRET, TestDaemon, Upstream};

fn mint_req(service: &str, allow: &[&str], uses: u32) -> MintRequest {
    MintRequest {
        service: service.into(),
        allow: allow.iter().map(|s| (*s).to_owned()).collect(),
        uses: Some(uses),
        ..MintRequest::default()
    }
}

fn call_req(token: &str, method: &str, path: &str) -> CallRequest {
    CallRequest {
        token: Some(token.into()),
        method: method.into(),
        path: path.into(),
        ..CallRequest::default()
    }
}

/// A call with no token: the daemon mints a one-shot token of `echo` for exactly `GET path`.
fn one_shot_req(path: &str) -> CallRequest {
    CallRequest {
        service: Some("echo".into()),
        method: "GET".into(),
        path: path.into(),
        ..CallRequest::default()
    }
}

/// Mints a one-activation `GET /**` token for `service` and spends it on `GET path`.
async fn call_once(c: &mut Client, service: &str, path: &str) -> Result<CallReply, ClientError> {
    let t = c
        .mint(mint_req(service, &["GET /**"], 1))
        .await
        .expect("mint");
    c.call(call_req(&t.token, "GET", path)).await
}

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_activations_under_64_racing_connections() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    let token = d
        .client()
        .await
        .mint(mint_req("echo", &["GET /race"], 3))
        .await
        .expect("mint")
        .token;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let socket = d.socket.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&socket).await.expect("connect");
            c.call(call_req(&token, "GET", "/race")).await
        }));
    }
    let mut ok = 0;
    let mut exhausted = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(reply) => {
                assert_eq!(reply.status, 200);
                ok += 1;
            }
            Err(ClientError::Refused {
                code: ErrorCode::Exhausted,
                ..
            }) => exhausted += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!((ok, exhausted), (3, 61));
    assert_eq!(up.hits(), 3, "the upstream must see exactly 3 requests");
    let info = d.client().await.inspect(&token).await.expect("inspect");
    assert_eq!(
        (info.used, info.remaining, info.state),
        (3, 0, TokenState::Spent)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_race_never_overspends_and_spent_stays_spent() {
    let up = Upstream::start(None).await;
    let mut d = TestDaemon::start(&up);
    let tmp = d.keep_dir();
    let mut c = d.client().await;
    let uses = 40;
    let token = c
        .mint(mint_req("echo", &["GET /crash"], uses))
        .await
        .expect("mint")
        .token;
    let one_shot = c
        .mint(mint_req("echo", &["GET /once"], 1))
        .await
        .expect("mint")
        .token;
    c.call(call_req(&one_shot, "GET", "/once"))
        .await
        .expect("spend one-shot");
    drop(c);

    // 16 connections spend in a loop; the daemon is killed once the upstream has seen 10.
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let socket = d.socket.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(mut c) = Client::connect(&socket).await else {
                return 0u32;
            };
            let mut honoured = 0;
            while let Ok(r) = c.call(call_req(&token, "GET", "/crash")).await {
                assert_eq!(r.status, 200);
                honoured += 1;
            }
            honoured
        }));
    }
    up.wait_hits(1 + 10).await;
    d.kill9();
    let mut answered_before = 0;
    for t in tasks {
        answered_before += t.await.expect("task");
    }
    let hits_before = up.hits();

    let d2 = TestDaemon::start_in(&d.dir);
    // The activations since the last checkpoint come back from the store's journal.
    assert!(
        d2.log_text().contains("replaying the store's journal"),
        "{}",
        d2.log_text()
    );
    let mut c = d2.client().await;
    assert_eq!(
        code(c.call(call_req(&one_shot, "GET", "/once")).await),
        ErrorCode::Exhausted
    );
    let info = c.inspect(&token).await.expect("inspect after restart");
    assert!(
        u64::from(info.used) >= hits_before - 1,
        "the store lost activations: used {} but the upstream saw {}",
        info.used,
        hits_before - 1
    );
    let mut after = 0;
    while c.call(call_req(&token, "GET", "/crash")).await.is_ok() {
        after += 1;
    }
    let total_upstream = up
        .seen()
        .iter()
        .filter(|s| s.path_and_query == "/crash")
        .count() as u32;
    assert!(
        total_upstream <= uses,
        "upstream saw {total_upstream} > {uses} requests"
    );
    assert!(answered_before + after <= uses);
    assert!(
        hits_before > 10,
        "the kill came mid-race, after the upstream saw 10 calls"
    );
    drop(tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_is_refused_with_its_reason_and_costs_nothing() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    let mut c = d.client().await;
    let token = c
        .mint(mint_req("echo", &["GET /ok/**"], 2))
        .await
        .expect("mint")
        .token;

    // One byte flipped in the claims, and in the signature.
    let raw = URL_SAFE_NO_PAD.decode(&token[5..]).expect("b64");
    for at in [30, raw.len() - 5] {
        let mut bad = raw.clone();
        bad[at] ^= 0x20;
        let t = format!("till_{}", URL_SAFE_NO_PAD.encode(&bad));
        let r = c.call(call_req(&t, "GET", "/ok/x")).await;
        assert_eq!(code(r), ErrorCode::BadToken, "flipped byte {at}");
    }

    // Signed by another key (claiming another key id, and claiming ours).
    let original = till_protocol::Token::decode(&token)
        .expect("decode")
        .into_claims();
    let other = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let mut forged = original.clone();
    forged.key_id = till_protocol::KeyId::of(&other.verifying_key());
    let t = forged.sign(&other).expect("sign");
    assert_eq!(
        code(c.call(call_req(&t, "GET", "/ok/x")).await),
        ErrorCode::BadToken
    );
    let t = original.sign(&other).expect("sign");
    match c.call(call_req(&t, "GET", "/ok/x")).await {
        Err(ClientError::Refused {
            code: ErrorCode::BadToken,
            message,
        }) => {
            assert!(message.contains("signature"), "{message}")
        }
        other => panic!("{other:?}"),
    }

    // Out of scope (path and method), and another service.
    let r = c.call(call_req(&token, "GET", "/elsewhere")).await;
    match r {
        Err(ClientError::Refused {
            code: ErrorCode::OutOfScope,
            message,
        }) => {
            assert!(
                message.contains("GET /ok/**"),
                "the reason names the rules: {message}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        code(c.call(call_req(&token, "POST", "/ok/x")).await),
        ErrorCode::OutOfScope
    );
    let mut wrong = call_req(&token, "GET", "/ok/x");
    wrong.service = Some("other".into());
    assert_eq!(code(c.call(wrong).await), ErrorCode::WrongService);

    // Path tricks are refused before any token logic.
    for p in [
        "/ok/../admin",
        "/ok/%2e%2e/admin",
        "/ok//x",
        "http://evil.example/ok/x",
    ] {
        assert_eq!(
            code(c.call(call_req(&token, "GET", p)).await),
            ErrorCode::BadRequest,
            "{p}"
        );
    }

    // Revoked.
    let revoked = c
        .mint(mint_req("echo", &["GET /ok/**"], 1))
        .await
        .expect("mint");
    c.revoke(RevokeTarget::Token(revoked.info.id.clone()))
        .await
        .expect("revoke");
    assert_eq!(
        code(c.call(call_req(&revoked.token, "GET", "/ok/x")).await),
        ErrorCode::Revoked
    );

    // Expired: minted for one second, used once the clock has passed its expiry.
    let mut short = mint_req("echo", &["GET /ok/**"], 1);
    short.ttl_secs = Some(1);
    let short = c.mint(short).await.expect("mint");
    let expires = short.info.expires_at.expect("expiry");
    while SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        < expires
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        code(c.call(call_req(&short.token, "GET", "/ok/x")).await),
        ErrorCode::Expired
    );

    assert_eq!(up.hits(), 0, "nothing may reach the upstream");
    let info = c.inspect(&token).await.expect("inspect");
    assert_eq!(
        (info.used, info.remaining),
        (0, 2),
        "refusals cost no activation"
    );
    let r = c
        .call(call_req(&token, "GET", "/ok/x"))
        .await
        .expect("the token still works");
    assert_eq!(r.activations_remaining, 1);

    let audit = d.audit_text();
    for reason in [
        "bad_token",
        "out_of_scope",
        "wrong_service",
        "revoked",
        "expired",
    ] {
        assert!(audit.contains(reason), "audit lacks a {reason} denial");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minting_outside_the_ceiling_is_refused() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    let mut c = d.client().await;
    match c.mint(mint_req("other", &["POST /x"], 1)).await {
        Err(ClientError::Refused {
            code: ErrorCode::OverCeiling,
            message,
        }) => {
            assert!(
                message.contains("GET /**"),
                "the reason names the ceiling: {message}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        code(c.mint(mint_req("other", &["GET /x"], 6)).await),
        ErrorCode::OverCeiling
    );
    let mut long = mint_req("other", &["GET /x"], 1);
    long.ttl_secs = Some(7200);
    assert_eq!(code(c.mint(long).await), ErrorCode::OverCeiling);
    assert_eq!(
        code(c.mint(mint_req("nope", &[], 1)).await),
        ErrorCode::UnknownService
    );
    assert_eq!(
        code(c.mint(mint_req("other", &["GET /a/../b"], 1)).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        c.tokens(true).await.expect("tokens").tokens.len(),
        0,
        "nothing was minted"
    );
    // Without --allow: the whole ceiling.
    let m = c
        .mint(mint_req("other", &[], 5))
        .await
        .expect("mint the ceiling");
    assert_eq!(m.info.rules, vec!["GET /**".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_reaches_the_upstream_and_never_the_caller() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    let mut c = d.client().await;

    // Bearer, header, query and basic injection; the upstream echoes everything it received.
    let cases = [
        ("echo", "/v1/echo?x=1", SECRET),
        ("other", "/v1/echo", OTHER_SECRET),
        // A `key` of the caller's own is dropped, as a caller's credential header is.
        ("q", "/v1/echo?key=mine&x=1&Key=2", SECRET),
        ("basic", "/v1/echo", SECRET),
    ];
    for (service, path, secret) in cases {
        let mut req = call_req("", "GET", path);
        req.token = None;
        req.service = Some(service.into());
        // A caller-supplied credential header must be dropped, not forwarded.
        req.headers = vec![
            ("Authorization".into(), "Bearer till_fake".into()),
            ("X-Trace".into(), "1".into()),
        ];
        let reply = c.call(req).await.expect("call");
        assert_eq!(reply.status, 200);
        let body = String::from_utf8_lossy(&reply.body);
        assert!(
            !body.contains(secret),
            "{service}: the key came back in the body: {body}"
        );
        assert!(body.contains("[redacted by till]"), "{service}: {body}");
        for (k, v) in &reply.headers {
            assert!(
                !v.contains(secret),
                "{service}: the key came back in header {k}"
            );
        }
    }
    let seen = up.seen();
    assert_eq!(
        seen[0].headers.get("authorization").map(String::as_str),
        Some(format!("Bearer {SECRET}").as_str())
    );
    assert_eq!(
        seen[0].headers.get("x-trace").map(String::as_str),
        Some("1")
    );
    assert_eq!(seen[0].path_and_query, "/v1/echo?x=1");
    assert_eq!(
        seen[1].headers.get("x-api-key").map(String::as_str),
        Some(OTHER_SECRET)
    );
    assert_eq!(
        seen[1].path_and_query, "/other/v1/echo",
        "the base path prefix is kept"
    );
    assert!(
        !seen[1].headers.contains_key("authorization"),
        "the caller's Authorization is dropped"
    );
    assert_eq!(
        seen[2].path_and_query,
        format!("/v1/echo?x=1&Key=2&key={SECRET}"),
        "one key, the real one"
    );
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("api:{SECRET}"));
    assert_eq!(
        seen[3].headers.get("authorization"),
        Some(&format!("Basic {basic}"))
    );

    // The CLI path too.
    let out = d.till(&["call", "echo", "GET", "/v1/cli"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for stream in [&out.stdout, &out.stderr] {
        assert!(!String::from_utf8_lossy(stream).contains(SECRET));
    }

    // Nowhere in the daemon's own log or the audit trail, at debug level.
    for (name, text) in [("log", d.log_text()), ("audit", d.audit_text())] {
        assert!(!text.is_empty(), "{name} is empty");
        for secret in [SECRET, OTHER_SECRET, &basic] {
            assert!(!text.contains(secret), "the key is in the {name}");
        }
    }
}

/// Each activation's line is followed by its answer: the upstream's status, or why there was none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_activation_is_followed_by_its_answer_in_the_trail() {
    let up = Upstream::start(Some("http://127.0.0.1:9/elsewhere".into())).await;
    let down = "\n[services.down]\nbase_url = \"http://127.0.0.1:1\"\nsecret = { file = \"{dir}/echo.key\" }\nallow = [\"GET /**\"]\n";
    let d = TestDaemon::start_with_env(&up, down, &[]);
    let mut c = d.client().await;
    for (path, status) in [("/v1/echo", 200), ("/redirect", 302)] {
        let reply = call_once(&mut c, "echo", path).await.expect("call");
        assert_eq!(reply.status, status);
    }
    assert_eq!(
        code(call_once(&mut c, "down", "/x").await),
        ErrorCode::UpstreamFailed
    );

    let events: Vec<serde_json::Value> = d
        .audit_text()
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .filter(|v: &serde_json::Value| v["event"] == "activate" || v["event"] == "answer")
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|v| v["event"].as_str()).collect();
    assert_eq!(kinds, ["activate", "answer"].repeat(3));
    for pair in events.chunks(2) {
        for field in ["token_id", "service", "method", "path"] {
            assert_eq!(pair[0][field], pair[1][field], "{field}");
        }
        assert!(
            pair[0]["status"].is_null(),
            "the activation is written before any answer"
        );
    }
    assert_eq!(events[1]["status"], 200);
    assert_eq!(events[3]["status"], 302);
    assert!(events[5]["status"].is_null());
    let why = events[5]["reason"].as_str().expect("a reason");
    assert!(
        why.starts_with("upstream_failed: could not reach the upstream"),
        "{why}"
    );

    let out = d.till(&["audit", "--event", "answer"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("GET /redirect") && shown.contains("status 302"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed_to_another_origin() {
    let thief = Upstream::start(None).await;
    let up = Upstream::start(Some(thief.url())).await;
    let d = TestDaemon::start(&up);
    let mut c = d.client().await;
    let mut req = call_req("", "GET", "/redirect");
    req.token = None;
    req.service = Some("echo".into());
    let reply = c.call(req).await.expect("call");
    assert_eq!(
        reply.status, 302,
        "the redirect goes back to the caller as it is"
    );
    assert_eq!(thief.hits(), 0, "the other origin must never be contacted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_from_the_environment_only_ever_tunnels_https() {
    // A proxy named in tilld's environment would see a plain-HTTP request whole, key included,
    // and could answer in the upstream's place: Till goes to a plain-HTTP origin directly. An
    // HTTPS origin elsewhere is reached through the proxy's tunnel (hosts that reach the Internet
    // only through a proxy need that), and the proxy sees no more than `CONNECT host:port`. An
    // origin on this host never goes through a proxy.
    let proxy = Upstream::start(None).await;
    let up = Upstream::start(None).await;
    let tls = Upstream::start_tls().await;
    let u = proxy.url();
    let u = u.as_str();
    let env = [
        ("HTTP_PROXY", u),
        ("http_proxy", u),
        ("HTTPS_PROXY", u),
        ("https_proxy", u),
        ("ALL_PROXY", u),
        ("all_proxy", u),
    ];
    // A name, not an address: the proxy resolves it (nothing here does), and loopback origins
    // are never proxied.
    let origin = "api.example.com:443";
    let secure = format!(
        r#"
[services.secure]
base_url = "https://api.example.com"
secret = {{ file = "{{dir}}/echo.key" }}
allow = ["GET /**"]

[services.local]
base_url = "{tls}"
ca_file = "{ca}"
secret = {{ file = "{{dir}}/echo.key" }}
allow = ["GET /**"]
"#,
        tls = tls.url(),
        ca = till_tests::tls_ca().display()
    );
    let d = TestDaemon::start_with_env(&up, &secure, &env);
    let mut c = d.client().await;
    let token = c
        .mint(mint_req("echo", &["GET /v1/**"], 2))
        .await
        .expect("mint");
    let reply = c
        .call(call_req(&token.token, "GET", "/v1/models"))
        .await
        .expect("call");
    assert_eq!(reply.status, 200);
    assert_eq!(up.hits(), 1, "the request went to the service's origin");
    assert_eq!(proxy.hits(), 0, "and not through the proxy");

    // The proxy is no TLS server, so the tunnelled request fails, and says so.
    let refused = call_once(&mut c, "secure", "/v1/models").await;
    assert_eq!(code(refused), ErrorCode::UpstreamFailed);
    let seen = proxy.seen();
    assert_eq!(seen.len(), 1, "one tunnel asked for: {seen:?}");
    assert_eq!(seen[0].method, "CONNECT");
    let all = format!("{seen:?}");
    assert!(
        all.contains(origin),
        "the tunnel goes to the pinned origin: {all}"
    );
    assert!(!all.contains(SECRET), "the proxy never sees the key: {all}");
    assert_eq!(up.hits(), 1, "nothing else reached the upstream");

    // An HTTPS origin on this host is reached directly.
    let reply = call_once(&mut c, "local", "/v1/models")
        .await
        .expect("call");
    assert_eq!(reply.status, 200);
    assert_eq!(tls.hits(), 1);
    assert_eq!(proxy.hits(), 1, "still only the one tunnel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_is_reached_only_with_a_certificate_it_trusts() {
    let tls = Upstream::start_tls().await;
    let up = Upstream::start(None).await;
    let more = format!(
        r#"
[services.private]
base_url = "{url}"
ca_file = "{ca}"
secret = {{ file = "{{dir}}/echo.key" }}
allow = ["GET /**"]

[services.untrusted]
base_url = "{url}"
secret = {{ file = "{{dir}}/echo.key" }}
allow = ["GET /**"]
"#,
        url = tls.url(),
        ca = till_tests::tls_ca().display()
    );
    let d = TestDaemon::start_with_env(&up, &more, &[]);
    let mut c = d.client().await;

    // With the CA named in ca_file: over TLS, the key injected, and scrubbed from the echo.
    let reply = call_once(&mut c, "private", "/hello").await.expect("call");
    assert_eq!(reply.status, 200);
    assert_eq!(tls.hits(), 1);
    assert_eq!(
        tls.seen()[0].headers["authorization"],
        format!("Bearer {SECRET}")
    );
    let body = String::from_utf8_lossy(&reply.body);
    assert!(!body.contains(SECRET), "{body}");

    // Without it, the system's roots do not know the CA: refused in the handshake, before any
    // byte of the request (the key included) was sent, with a reason a person can act on.
    match call_once(&mut c, "untrusted", "/hello").await {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::UpstreamFailed);
            assert!(
                message.contains("certificate was refused") && message.contains("ca_file"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(tls.hits(), 1, "the untrusted call never reached HTTP");
    assert!(!d.log_text().contains(SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_0600_single_instance_and_stale_socket_is_replaced() {
    let up = Upstream::start(None).await;
    let mut d = TestDaemon::start(&up);
    let tmp = d.keep_dir();
    let mode = std::fs::metadata(&d.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let state_mode = std::fs::metadata(d.dir.join("state"))
        .expect("state")
        .permissions()
        .mode();
    assert_eq!(state_mode & 0o777, 0o700);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.child.id())).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core line");
    assert!(
        core.split_whitespace().nth(4) == Some("0"),
        "core dumps must be off: {core}"
    );

    let second = TestDaemon::try_start_in(&d.dir);
    match second {
        Err(msg) => assert!(msg.contains("already serving"), "{msg}"),
        Ok(_) => panic!("a second tilld started on the same socket"),
    }
    d.client()
        .await
        .status()
        .await
        .expect("the first one still serves");

    d.kill9();
    assert!(d.socket.exists(), "kill -9 leaves the socket file behind");
    let d2 = TestDaemon::start_in(&d.dir);
    d2.client()
        .await
        .status()
        .await
        .expect("the restarted daemon serves");
    assert!(d2.log_text().contains("removed a stale socket file"));
    drop(tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_cleanly() {
    let up = Upstream::start(None).await;
    let mut d = TestDaemon::start(&up);
    let mut c = d.client().await;
    c.status().await.expect("status");
    // Clients that connected and said nothing do not hold the shutdown up (once the daemon has
    // accepted them: its descriptor count shows it).
    let open_fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", d.child.id()))
            .expect("fd dir")
            .count()
    };
    let before = open_fds();
    let _idle = std::os::unix::net::UnixStream::connect(&d.socket).expect("idle native client");
    let _idle_mcp =
        std::os::unix::net::UnixStream::connect(d.dir.join("mcp.sock")).expect("idle mcp client");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while open_fds() < before + 2 {
        assert!(std::time::Instant::now() < deadline, "not accepted");
        tokio::task::yield_now().await;
    }
    drop(c);
    let status = d.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(!d.socket.exists(), "the socket is removed");
    let audit = d.audit_text();
    assert!(audit.contains("\"event\":\"start\"") && audit.contains("\"event\":\"stop\""));
    assert!(audit.contains("clean shutdown"), "{audit}");
}

/// As an HTTP client's pool does, a `Client` takes a new connection when the daemon has let go of
/// its idle one: a program holding one goes on across `systemctl restart tilld`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_outlives_a_daemon_restart() {
    let up = Upstream::start(None).await;
    let mut d = TestDaemon::start(&up);
    let _tmp = d.keep_dir();
    let mut c = d.client().await;
    let minted = c
        .mint(mint_req("echo", &["GET /a"], 2))
        .await
        .expect("mint");
    assert!(d.terminate().success());
    // With no daemon, a request says where it looked.
    match c.status().await {
        Err(e @ ClientError::Unreachable { .. }) => {
            assert!(
                e.to_string().contains(&d.socket.display().to_string()),
                "{e}"
            )
        }
        other => panic!("expected unreachable, got {other:?}"),
    }
    let _d2 = TestDaemon::start_in(&d.dir);
    let reply = c
        .call(call_req(&minted.token, "GET", "/a"))
        .await
        .expect("the same client, after the restart");
    assert_eq!(reply.status, 200);
    assert_eq!(up.hits(), 1);
    assert_eq!(
        c.inspect(&minted.token).await.expect("inspect").remaining,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_operations_need_an_admin_uid() {
    let up = Upstream::start(None).await;
    // The test runs as some uid that is not 4242, so it is not an admin here.
    let d = TestDaemon::start_extra(&up, "admin_uids = [4242]");
    let mut c = d.client().await;
    let mine = c
        .mint(mint_req("echo", &["GET /a"], 1))
        .await
        .expect("anyone may mint");
    assert_eq!(
        code(c.revoke(RevokeTarget::All).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(c.revoke(RevokeTarget::Service("echo".into())).await),
        ErrorCode::Forbidden
    );
    assert_eq!(code(c.audit(None).await), ErrorCode::Forbidden);
    assert_eq!(c.tokens(false).await.expect("own tokens").tokens.len(), 1);
    c.revoke(RevokeTarget::Token(mine.info.id))
        .await
        .expect("a minter may revoke its own token");
    // Each refusal is a `deny` line saying what was attempted (invariant 5); a refused mint too.
    assert_eq!(
        code(c.mint(mint_req("nope", &["GET /a"], 1)).await),
        ErrorCode::UnknownService
    );
    let denied: Vec<String> = d
        .audit_text()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|v| v["event"] == "deny")
        .map(|v| format!("{} {}", v["service"], v["reason"].as_str().unwrap_or("")))
        .collect();
    let expected = [
        "null revoke refused: forbidden",
        "\"echo\" revoke refused: forbidden",
        "null audit refused: forbidden",
        "\"nope\" mint refused: unknown_service",
    ];
    assert_eq!(denied.len(), expected.len(), "{denied:#?}");
    for (line, want) in denied.iter().zip(expected) {
        assert!(
            line.starts_with(want),
            "{line:?} should start with {want:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_by_service_and_all() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    let mut c = d.client().await;
    let a = c
        .mint(mint_req("echo", &["GET /a"], 1))
        .await
        .expect("mint")
        .token;
    let b = c
        .mint(mint_req("other", &["GET /a"], 1))
        .await
        .expect("mint")
        .token;
    let r = c
        .revoke(RevokeTarget::Service("echo".into()))
        .await
        .expect("revoke service");
    assert_eq!(r.revoked.len(), 1);
    assert_eq!(
        code(c.call(call_req(&a, "GET", "/a")).await),
        ErrorCode::Revoked
    );
    // A name that is no service (a typo) is refused, not "nothing to revoke"; a service with no
    // live token is nothing to revoke.
    let out = d.till(&["revoke", "--service", "ecoh"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no service is named \"ecoh\"") && err.contains("basic, echo, other, q"),
        "{err}"
    );
    let out = d.till(&["revoke", "--service", "q"]);
    assert!(out.status.success());
    c.revoke(RevokeTarget::All).await.expect("revoke all");
    assert_eq!(
        code(c.call(call_req(&b, "GET", "/a")).await),
        ErrorCode::Revoked
    );
    assert_eq!(c.tokens(false).await.expect("tokens").tokens.len(), 0);
    assert_eq!(c.tokens(true).await.expect("tokens").tokens.len(), 2);
    assert_eq!(up.hits(), 0);

    // More than a reply lists: the first thousand, and the count. (Before, a reply listed every
    // one, and past about 55,000 tokens it outgrew the 16 MiB frame: the client got "tilld closed
    // the connection" for a revocation that had happened.)
    for _ in 0..1100 {
        c.mint(mint_req("echo", &["GET /a"], 1))
            .await
            .expect("mint");
    }
    // `till tokens` lists the newest thousand too, and says how many there are.
    let listed = c.tokens(false).await.expect("tokens");
    assert_eq!((listed.tokens.len(), listed.count), (1000, 1100));
    let out = d.till(&["tokens"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the newest 1000 of 1100 tokens"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.till(&["tokens", "--limit", "2000", "--json"]);
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(all.len(), 1100);
    assert!(out.stderr.is_empty());

    let out = d.till(&["revoke", "--all"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 1001, "{text}");
    assert!(
        text.ends_with("and 100 more: 1100 token(s) revoked\n"),
        "{}",
        text.lines().last().unwrap_or_default()
    );
    assert_eq!(c.tokens(false).await.expect("tokens").tokens.len(), 0);
}

/// tilld does not put its socket in a directory that anyone may write to, or that another user
/// owns: they could have made it first (the `/tmp/till-UID` default, when `XDG_RUNTIME_DIR` is
/// unset, is a name anyone can take) and swap the socket for theirs. It says why and does not
/// start. A sticky directory, as `/tmp` is, is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_directory_others_control_is_refused() {
    let up = Upstream::start(None).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let open = tmp.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    let config = till_tests::standard_config(tmp.path(), &up.url(), "").replace(
        &format!("socket = \"{}/till.sock\"", tmp.path().display()),
        &format!("socket = \"{}/till.sock\"", open.display()),
    );
    assert!(config.contains(&format!("{}/till.sock", open.display())));
    std::fs::write(tmp.path().join("till.toml"), config).expect("config");
    let chmod = |mode: u32| {
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };

    chmod(0o777);
    let err = TestDaemon::try_start_in(tmp.path())
        .err()
        .expect("refused: anyone may write to the socket's directory");
    assert!(
        err.contains("refusing to use") && err.contains("mode 777"),
        "{err}"
    );
    assert!(!open.join("till.sock").exists());

    let is_root =
        std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    if is_root {
        chmod(0o700);
        std::os::unix::fs::chown(&open, Some(43212), None).expect("chown");
        let err = TestDaemon::try_start_in(tmp.path())
            .err()
            .expect("refused: another user's directory");
        assert!(err.contains("belongs to uid 43212"), "{err}");
        std::os::unix::fs::chown(&open, Some(0), None).expect("chown back");
    }

    chmod(0o1777);
    let _d = TestDaemon::start_in(tmp.path());
    let mut c = Client::connect(&open.join("till.sock"))
        .await
        .expect("served in a sticky directory");
    c.status().await.expect("status");
}

/// A second tilld on a state_dir another one is using (with a socket of its own, so the socket's
/// lock does not stop it first) is told so; a damaged signing key or store file stops tilld with
/// what happened and what to do (not, for the store, a hint about another daemon).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_or_damaged_state_is_refused_with_what_to_do() {
    let up = Upstream::start(None).await;
    let mut d = TestDaemon::start(&up);
    let tmp = tempfile::tempdir().expect("tempdir");
    let own = format!("state_dir = \"{}/state\"", tmp.path().display());
    let shared = format!("state_dir = \"{}/state\"", d.dir.display());
    let text = till_tests::standard_config(tmp.path(), &up.url(), "");
    assert!(text.contains(&own));
    std::fs::write(tmp.path().join("till.toml"), text.replace(&own, &shared)).expect("config");
    let Err(log) = TestDaemon::try_start_in(tmp.path()) else {
        panic!("a second tilld started on a state_dir in use");
    };
    assert!(
        log.contains("another tilld is using this state_dir"),
        "{log}"
    );

    assert!(d.terminate().success());
    let key = d.dir.join("state/signing.key");
    let good = std::fs::read(&key).expect("signing key");
    std::fs::write(&key, "not a key!").expect("damage the key");
    let Err(log) = TestDaemon::try_start_in(&d.dir) else {
        panic!("tilld started with a damaged signing key");
    };
    assert!(
        log.contains("is not a Till signing key")
            && log.contains("Restore it from a backup")
            && log.contains("every token signed with it will then be refused"),
        "{log}"
    );
    std::fs::write(&key, good).expect("restore the key");

    let store = d.dir.join("state/till.redb");
    let mut bytes = std::fs::read(&store).expect("store");
    bytes[..16].copy_from_slice(b"not a redb file!");
    std::fs::write(&store, bytes).expect("damage the store");
    let Err(log) = TestDaemon::try_start_in(&d.dir) else {
        panic!("tilld started on a damaged store");
    };
    assert!(
        log.contains("is damaged") && log.contains("move till.redb and till.journal.*"),
        "{log}"
    );
    assert!(!log.contains("another tilld"), "{log}");
}

/// A journal damaged while tilld was stopped (a bad sector in the middle of what it wrote last):
/// the next start says so, in `till status` and as the `store_damaged` alert, and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_damaged_while_stopped_is_reported_at_the_next_start() {
    let up = Upstream::start(None).await;
    let mut d = TestDaemon::start(&up);
    let _tmp = d.keep_dir();
    let dir = d.dir.clone();
    // Spend a token a few times (a durable journal record each), then kill the daemon: the
    // journals keep what its last checkpoint (every 250 ms) does not hold yet. If a checkpoint
    // took them all before the kill, again.
    let mut tries = 0;
    let (journal, at, len) = loop {
        tries += 1;
        assert!(
            tries <= 20,
            "a checkpoint took every record before the kill, 20 times"
        );
        let mut c = d.client().await;
        let t = c
            .mint(mint_req("echo", &["GET /**"], 1000))
            .await
            .expect("mint");
        for i in 0..4 {
            c.call(call_req(&t.token, "GET", &format!("/j/{i}")))
                .await
                .expect("call");
        }
        d.kill9();
        let checkpointed = d
            .log_text()
            .match_indices("store checkpoint written seq=")
            .filter_map(|(i, m)| {
                let digits: String = d.log_text()[i + m.len()..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse::<u64>().ok()
            })
            .max()
            .expect("the checkpoint at start is logged");
        let records = journal_records(&dir);
        let target = records
            .iter()
            .find(|(_, _, _, seq)| *seq > checkpointed && records.iter().any(|r| r.3 == seq + 1));
        if let Some((journal, at, len, _)) = target {
            break (journal.clone(), *at, *len);
        }
        d = TestDaemon::start_in(&dir);
    };
    // One byte of that record's payload flipped, as a bad sector would.
    let mut bytes = std::fs::read(&journal).expect("journal");
    bytes[at + len - 2] ^= 0x40;
    std::fs::write(&journal, bytes).expect("damage");

    let d2 = TestDaemon::start_in(&dir);
    let status = d2.client().await.status().await.expect("status");
    assert!(
        status.warnings.iter().any(|w| w
            .contains("cut short by a power failure) while tilld was stopped")
            && w.contains("till revoke --all")),
        "{:?}",
        status.warnings
    );
    assert!(
        d2.log_text().contains("alert=\"store_damaged\""),
        "{}",
        d2.log_text()
    );
    assert!(
        d2.audit_text()
            .lines()
            .any(|l| l.contains("\"event\":\"alert\"") && l.contains("store_damaged: ")),
        "{}",
        d2.audit_text()
    );
    // And it serves.
    d2.client().await.status().await.expect("status");
}

/// The records of the store's journals as they lie on disk (`journal.rs`: magic, sequence
/// number, payload length, checksum, payload), read from offset 0: journal, offset, length, number.
fn journal_records(dir: &std::path::Path) -> Vec<(std::path::PathBuf, usize, usize, u64)> {
    let mut out = Vec::new();
    for name in ["till.journal.a", "till.journal.b"] {
        let path = dir.join("state").join(name);
        let bytes = std::fs::read(&path).expect("journal");
        let mut at = 0;
        while bytes.get(at..at + 4) == Some(b"TLJ1") {
            let seq = u64::from_be_bytes(bytes[at + 4..at + 12].try_into().expect("seq"));
            let len =
                32 + u32::from_be_bytes(bytes[at + 12..at + 16].try_into().expect("len")) as usize;
            out.push((path.clone(), at, len, seq));
            at += len;
        }
    }
    out
}

/// What a [`SmallDisk`] holds: the audit trail, or the state (store and keys). One only, so a
/// test of the one is not also, at some moment, a test of the other.
#[derive(Clone, Copy)]
enum Holds {
    Trail,
    State,
}

/// A `tilld` with its trail or its state on a small tmpfs at `dir/disk`, and an alert command
/// that writes `dir/alert.json` (off the small disk). Fields drop in order: the daemon stops
/// before the tmpfs is unmounted.
struct SmallDisk {
    daemon: TestDaemon,
    disk: std::path::PathBuf,
    _mounted: till_tests::Mounted,
}

impl SmallDisk {
    /// `None` when no tmpfs may be mounted here (the caller skips).
    fn start(dir: &std::path::Path, up: &Upstream, size: &str, holds: Holds) -> Option<Self> {
        let disk = dir.join("disk");
        std::fs::create_dir(&disk).expect("mkdir");
        let mounted = till_tests::Mounted::tmpfs(&disk, size)?;
        let (d, k) = (dir.display(), disk.display());
        let (from, to) = match holds {
            Holds::Trail => (
                format!("audit_log = \"{d}/audit.jsonl\""),
                format!("audit_log = \"{k}/audit.jsonl\""),
            ),
            Holds::State => (
                format!("state_dir = \"{d}/state\""),
                format!("state_dir = \"{k}/state\""),
            ),
        };
        let mut text = till_tests::standard_config(dir, &up.url(), "");
        assert!(text.contains(&from));
        text = text.replace(&from, &to);
        text.push_str(&format!(
            "\n[alerts]\ncommand = \"cat > {d}/alert.tmp && mv {d}/alert.tmp {d}/alert.json\"\n"
        ));
        std::fs::write(dir.join("till.toml"), text).expect("config");
        Some(SmallDisk {
            daemon: TestDaemon::start_in(dir),
            disk,
            _mounted: mounted,
        })
    }
}

/// Fills `disk` to the last byte; returns the filler's path.
fn fill(disk: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let filler = disk.join("filler");
    let mut f = std::fs::File::create(&filler).expect("filler");
    let chunk = vec![0u8; 1 << 20];
    while f.write_all(&chunk).is_ok() {}
    while f.write_all(&[0u8; 1]).is_ok() {}
    filler
}

/// Spends `token` on `GET /{label}/N` until a call is refused, at most `tries` times: each call
/// that goes reaches the upstream, and the refused one sent and spent nothing. Its message.
async fn spend_until_refused(
    c: &mut Client,
    up: &Upstream,
    token: &str,
    label: &str,
    tries: u32,
) -> String {
    for i in 0..tries {
        let hits = up.hits();
        let used = c.inspect(token).await.expect("inspect").used;
        match c
            .call(call_req(token, "GET", &format!("/{label}/{i}")))
            .await
        {
            Ok(_) => assert_eq!(up.hits(), hits + 1),
            Err(ClientError::Refused { message, .. }) => {
                assert_eq!(up.hits(), hits, "a refused call sent nothing");
                let after = c.inspect(token).await.expect("inspect").used;
                assert_eq!(after, used, "a refused call spent nothing");
                return message;
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("no call was refused in {tries} tries");
}

/// The alert the command of [`SmallDisk`] wrote, once it has.
async fn alert_written(dir: &std::path::Path) -> serde_json::Value {
    let path = dir.join("alert.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            return serde_json::from_str(&text).expect("alert JSON");
        }
        assert!(std::time::Instant::now() < deadline, "no alert");
        tokio::task::yield_now().await;
    }
}

/// A full disk under the trail: a request that needs a line in the trail is refused
/// with the reason and changes nothing (no activation, nothing sent); `till status` says why; once
/// there is space again Till goes on, with no restart and no broken line in the trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_with_the_reason_and_recovers() {
    let up = Upstream::start(None).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let Some(small) = SmallDisk::start(dir, &up, "4m", Holds::Trail) else {
        eprintln!("skipped: needs root, and a machine that lets it mount a tmpfs");
        return;
    };
    let (daemon, disk) = (&small.daemon, &small.disk);
    let mut c = daemon.client().await;
    let t = c
        .mint(mint_req("echo", &["GET /**"], 1000))
        .await
        .expect("mint");
    c.call(call_req(&t.token, "GET", "/before"))
        .await
        .expect("call");

    let filler = fill(disk);
    // The trail's last page may hold a few more lines; then a call is refused.
    let message = spend_until_refused(&mut c, &up, &t.token, "full", 200).await;
    assert!(
        message.contains("audit trail could not be written"),
        "{message}"
    );
    let status = c.status().await.expect("status on a full disk");
    assert!(
        status
            .warnings
            .iter()
            .any(|w| w.contains("cannot be written") && w.contains("No space left")),
        "{:?}",
        status.warnings
    );

    // Whoever watches the alerts hears of it, once.
    let alert = alert_written(dir).await;
    assert_eq!(alert["alert"], "audit_unwritable", "{alert}");
    assert!(
        alert["message"]
            .as_str()
            .is_some_and(|m| m.contains("No space left")),
        "{alert}"
    );
    // One alert for the failure, though every request since was refused.
    assert!(c.status().await.is_ok());
    assert!(
        c.call(call_req(&t.token, "GET", "/still-full"))
            .await
            .is_err()
    );
    // A call with no token, for which the daemon mints a one-shot token, is refused the same
    // way, and leaves no token behind: its mint line could not be written either.
    let tokens = c.tokens(true).await.expect("tokens").count;
    let hits = up.hits();
    let message = match c.call(one_shot_req("/one-shot")).await {
        Err(ClientError::Refused { message, .. }) => message,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(
        message.contains("audit trail could not be written"),
        "{message}"
    );
    assert_eq!(up.hits(), hits, "a refused one-shot call sent nothing");
    assert_eq!(
        c.tokens(true).await.expect("tokens").count,
        tokens,
        "a refused one-shot call left a token behind"
    );
    assert_eq!(
        daemon
            .log_text()
            .matches("alert=\"audit_unwritable\"")
            .count(),
        1,
        "{}",
        daemon.log_text()
    );

    std::fs::remove_file(&filler).expect("free the disk");
    c.call(call_req(&t.token, "GET", "/after"))
        .await
        .expect("served again, no restart");
    assert!(c.status().await.expect("status").warnings.is_empty());
    daemon.assert_trail_verifies();
}

/// A full disk under the store alone (the trail elsewhere): once the store cannot write, mints and
/// activations are refused with the reason and nothing is sent; `till status` says why, and the
/// `store_unwritable` alert is raised once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_write_refuses_says_why_and_alerts_once() {
    let up = Upstream::start(None).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let Some(small) = SmallDisk::start(dir, &up, "20m", Holds::State) else {
        eprintln!("skipped: needs root, and a machine that lets it mount a tmpfs");
        return;
    };
    let daemon = &small.daemon;
    let mut c = daemon.client().await;
    let held = c
        .mint(mint_req("echo", &["GET /**"], 1000))
        .await
        .expect("mint");
    fill(&small.disk);
    // The journals were made whole at start, so the store goes on until redb, which must grow
    // to take their records in, cannot: big notes get there sooner.
    let note: String = "🔒".repeat(200);
    let mut refusal = None;
    for _ in 0..40_000 {
        let mut req = mint_req("echo", &["GET /**"], 1);
        req.note = Some(note.clone());
        match c.mint(req).await {
            Ok(_) => {}
            Err(ClientError::Refused { message, .. }) => {
                refusal = Some(message);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let message = refusal.expect("a mint refused once the store could not write");
    assert!(
        message.contains("could not record this durably"),
        "{message}"
    );
    // What still fits in a journal is written, durably; what does not is refused, having sent
    // and spent nothing.
    let message = spend_until_refused(&mut c, &up, &held.token, "a", 1000).await;
    assert!(message.contains("nothing was sent"), "{message}");
    // So is a call with no token, and its one-shot token does not stay behind.
    let mut refused = false;
    for i in 0..1000 {
        let (tokens, hits) = (c.tokens(true).await.expect("tokens").count, up.hits());
        match c.call(one_shot_req(&format!("/b/{i}"))).await {
            Ok(_) => assert_eq!(up.hits(), hits + 1),
            Err(ClientError::Refused { message, .. }) => {
                assert!(message.contains("nothing was sent"), "{message}");
                assert_eq!(up.hits(), hits, "a refused one-shot call sent nothing");
                assert_eq!(
                    c.tokens(true).await.expect("tokens").count,
                    tokens,
                    "a refused one-shot call left a token behind"
                );
                refused = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused, "no one-shot call was refused");
    let status = c.status().await.expect("status");
    assert!(
        status
            .warnings
            .iter()
            .any(|w| w.contains("the store cannot write")),
        "{:?}",
        status.warnings
    );
    let alert = alert_written(dir).await;
    assert_eq!(alert["alert"], "store_unwritable", "{alert}");
    assert_eq!(
        daemon
            .log_text()
            .matches("alert=\"store_unwritable\"")
            .count(),
        1
    );
}
