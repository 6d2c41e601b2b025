//! Alerts and a trail that cannot be flooded: refusal bursts, canaries, keys in requests.

use till_protocol::{CallRequest, ErrorCode, MintRequest};
use till_tests::{ClientError, SECRET, TestDaemon, Upstream, http, standard_config};

fn daemon_with(up: &Upstream, alerts: &str) -> (tempfile::TempDir, TestDaemon) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut text = standard_config(tmp.path(), &up.url(), "gateway = \"127.0.0.1:0\"");
    text.push_str(&format!(
        "\n[alerts]\n{}\n",
        alerts.replace("{dir}", &tmp.path().display().to_string())
    ));
    std::fs::write(tmp.path().join("till.toml"), text).expect("config");
    let d = TestDaemon::start_in(tmp.path());
    (tmp, d)
}

/// A one-shot call to `echo` whose body carries the master key itself.
fn carrying_the_master_key() -> CallRequest {
    CallRequest {
        service: Some("echo".into()),
        method: "POST".into(),
        path: "/v1/x".into(),
        body: format!("{{\"api_key\": \"{SECRET}\"}}").into_bytes(),
        ..CallRequest::default()
    }
}

fn lines_with(trail: &str, needle: &str) -> usize {
    trail.lines().filter(|l| l.contains(needle)).count()
}

/// The JSON the alert command wrote to `dir/alert.json`, once it is whole (the command runs in
/// the background: this polls for its output, up to a deadline).
async fn alert_from_command(dir: &std::path::Path) -> serde_json::Value {
    let path = dir.join("alert.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Ok(v) = serde_json::from_str(&text)
        {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the alert command never ran"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_flood_raises_one_alert_and_does_not_grow_the_trail() {
    let up = Upstream::start(None).await;
    let (_tmp, d) = daemon_with(&up, "refusal_burst = 20");
    let mut c = d.client().await;
    for _ in 0..300 {
        let r = c
            .call(CallRequest {
                token: Some("till_garbage".into()),
                method: "GET".into(),
                path: "/x".into(),
                ..CallRequest::default()
            })
            .await;
        assert_eq!(code(r), ErrorCode::BadToken);
    }
    let trail = d.audit_text();
    assert_eq!(
        lines_with(&trail, "\"event\":\"alert\""),
        1,
        "one alert for the burst"
    );
    assert!(trail.contains("refusal_burst"));
    let denies = lines_with(&trail, "\"event\":\"deny\"");
    assert!(
        denies <= 21,
        "{denies} deny lines for 300 refusals: the flood is counted, not written"
    );
    let g = d.gateway_url().await;
    let metrics = http()
        .get(format!("{g}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("till_refusals_total{reason=\"bad_token\"} 300"),
        "every refusal is counted"
    );
    assert!(metrics.contains("till_alerts_total{kind=\"refusal_burst\"} 1"));
    assert_eq!(up.hits(), 0);
}

/// An agent runs `till` once per shell command: a loop of refused calls comes from a new process
/// each time, and is still one uid's burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_flood_from_many_processes_of_one_uid_is_one_burst() {
    let up = Upstream::start(None).await;
    let (_tmp, d) = daemon_with(&up, "refusal_burst = 5");
    for _ in 0..12 {
        let out = d.till(&["call", "echo", "GET", "/x", "--token", "till_garbage"]);
        assert_eq!(out.status.code(), Some(1));
    }
    let trail = d.audit_text();
    assert_eq!(lines_with(&trail, "\"event\":\"alert\""), 1, "{trail}");
    assert!(trail.contains("refusal_burst"));
    let denies = lines_with(&trail, "\"event\":\"deny\"");
    assert!(denies <= 6, "{denies} deny lines for 12 refusals");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_raises_an_alert_and_revokes_the_presenters_tokens() {
    let up = Upstream::start(None).await;
    let (tmp, d) = daemon_with(
        &up,
        "revoke_peer_on = [\"canary\"]\ncommand = \"cat > {dir}/alert.json\"",
    );
    let mut c = d.client().await;
    let mint = |canary| MintRequest {
        service: "echo".into(),
        allow: vec!["GET /x".into()],
        uses: Some(5),
        canary,
        ..MintRequest::default()
    };
    let honest = c.mint(mint(false)).await.expect("mint").token;
    let canary = c.mint(mint(true)).await.expect("mint canary").token;
    let call = |t: &str| CallRequest {
        token: Some(t.to_owned()),
        method: "GET".into(),
        path: "/x".into(),
        ..CallRequest::default()
    };
    c.call(call(&honest)).await.expect("the honest token works");
    match c.call(call(&canary)).await {
        Err(ClientError::Refused {
            code: ErrorCode::Revoked,
            message,
        }) => {
            assert!(
                !message.contains("canary"),
                "the tripwire does not give itself away: {message}"
            )
        }
        r => panic!("{r:?}"),
    }
    assert_eq!(
        code(c.call(call(&honest)).await),
        ErrorCode::Revoked,
        "the presenter's other tokens stop working"
    );
    let trail = d.audit_text();
    assert!(
        trail.contains("\"event\":\"alert\"")
            && trail.contains("canary: a canary token was presented")
    );
    assert!(trail.contains("revoked the") && trail.contains("minted by uid"));
    assert_eq!(up.hits(), 1);

    // The alert command got the alert's JSON.
    assert_eq!(alert_from_command(tmp.path()).await["alert"], "canary");

    // A loop presenting it raises no more alerts for a while (no process, webhook call or trail
    // line per try), but the revocation still holds for tokens minted meanwhile.
    for _ in 0..20 {
        assert_eq!(code(c.call(call(&canary)).await), ErrorCode::Revoked);
    }
    let fresh = c.mint(mint(false)).await.expect("mint").token;
    assert_eq!(code(c.call(call(&canary)).await), ErrorCode::Revoked);
    assert_eq!(
        code(c.call(call(&fresh)).await),
        ErrorCode::Revoked,
        "minted after the alert, revoked at the next presentation"
    );
    let trail = d.audit_text();
    assert_eq!(
        trail
            .matches("\"reason\":\"canary: a canary token was presented")
            .count(),
        1,
        "{trail}"
    );
    assert_eq!(
        trail.matches("live token(s) minted by uid").count(),
        2,
        "the first revocation, and the one that found the fresh token: {trail}"
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_key_in_a_request_is_refused_and_raises_an_alert() {
    let up = Upstream::start(None).await;
    let (_tmp, d) = daemon_with(&up, "");
    let mut c = d.client().await;
    let r = c.call(carrying_the_master_key()).await;
    assert_eq!(code(r), ErrorCode::BadRequest);
    assert_eq!(up.hits(), 0, "never forwarded");
    let trail = d.audit_text();
    assert!(trail.contains("credential_in_request"));
    assert!(!trail.contains(SECRET) && !d.log_text().contains(SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_match_the_trail() {
    let up = Upstream::start(None).await;
    let (_tmp, d) = daemon_with(&up, "");
    let mut c = d.client().await;
    let t = c
        .mint(MintRequest {
            service: "echo".into(),
            allow: vec!["GET /m".into()],
            uses: Some(3),
            ..MintRequest::default()
        })
        .await
        .expect("mint")
        .token;
    for path in ["/m", "/m", "/nope", "/m", "/m"] {
        let _ = c
            .call(CallRequest {
                token: Some(t.clone()),
                method: "GET".into(),
                path: path.into(),
                ..CallRequest::default()
            })
            .await;
    }
    let g = d.gateway_url().await;
    let text = http()
        .get(format!("{g}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let python = std::env::var("TILL_TEST_PYTHON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target/py/bin/python").into());
    let mut child = std::process::Command::new(python)
        .arg("-c")
        .arg(
            "import sys, json\nfrom prometheus_client.parser import text_string_to_metric_families as p\n\
             out = {}\nfor fam in p(sys.stdin.read()):\n    for s in fam.samples:\n        out[s.name + json.dumps(s.labels, sort_keys=True)] = s.value\nprint(json.dumps(out))",
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("parse");
    assert!(
        out.status.success(),
        "the Prometheus parser refused /metrics: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let trail = d.audit_text();
    let mints = lines_with(&trail, "\"event\":\"mint\"") as f64;
    let activations = lines_with(&trail, "\"event\":\"activate\"") as f64;
    let denies = lines_with(&trail, "\"event\":\"deny\"") as f64;
    assert_eq!(m["till_mints_total{}"].as_f64(), Some(mints));
    assert_eq!(m["till_activations_total{}"].as_f64(), Some(activations));
    let refusals: f64 = m
        .as_object()
        .expect("map")
        .iter()
        .filter(|(k, _)| k.starts_with("till_refusals_total"))
        .map(|(_, v)| v.as_f64().unwrap_or(0.0))
        .sum();
    assert_eq!(refusals, denies);
    assert_eq!((mints, activations, denies), (1.0, 3.0, 2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_kill_9_under_load_the_trail_verifies_and_holds_every_activation() {
    let up = Upstream::start(None).await;
    let mut d = TestDaemon::start(&up);
    let tmp = d.keep_dir();
    let token = d.mint("echo", "GET /load", 1000).await.token;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (socket, token) = (d.socket.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(mut c) = till_tests::Client::connect(&socket).await else {
                return;
            };
            while c
                .call(CallRequest {
                    token: Some(token.clone()),
                    method: "GET".into(),
                    path: "/load".into(),
                    ..CallRequest::default()
                })
                .await
                .is_ok()
            {}
        }));
    }
    up.wait_hits(200).await;
    d.kill9();
    for t in tasks {
        t.await.expect("task");
    }
    let received = up
        .seen()
        .iter()
        .filter(|s| s.path_and_query == "/load")
        .count();
    // The chain holds to the last line the daemon wrote before it died.
    let trail = d.audit_text();
    till_protocol::audit::verify_chain(&trail).expect("the chain verifies up to the last line");
    let activations = lines_with(&trail, "\"event\":\"activate\"");
    assert!(
        activations >= received,
        "{activations} activate events for {received} requests the upstream received"
    );
    // A restart continues the chain and signs it; the whole trail then verifies, checkpoints too.
    let d2 = TestDaemon::start_in(&d.dir);
    let out = d2.till(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trail_rotates_by_size_without_breaking_the_chain() {
    let up = Upstream::start(None).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = standard_config(
        tmp.path(),
        &up.url(),
        "audit_max_bytes = 4000\naudit_keep = 3",
    );
    std::fs::write(tmp.path().join("till.toml"), text).expect("config");
    let d = TestDaemon::start_in(tmp.path());
    let mut c = d.client().await;
    for _ in 0..40 {
        c.mint(MintRequest {
            service: "echo".into(),
            allow: vec!["GET /r".into()],
            ..MintRequest::default()
        })
        .await
        .expect("mint");
    }
    let trail = d.audit.display().to_string();
    let (r1, r2) = (format!("{trail}.1"), format!("{trail}.2"));
    assert!(std::path::Path::new(&r2).exists(), "rotated at least twice");
    assert!(
        !std::path::Path::new(&format!("{trail}.4")).exists(),
        "no more than audit_keep files"
    );
    // Each file, and the files together, verify; the live one starts with a signed checkpoint.
    let out = d.till(&["audit", "verify", &r2, &r1]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.till(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.till(&["audit", "verify", &r1, &trail]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A head cut off a file is caught: its first line is no longer the signed checkpoint. (`.1`
    // rather than the live file, which may hold nothing yet but the checkpoint that opened it.)
    let live = std::fs::read_to_string(&r1).expect("trail");
    assert!(live.lines().count() > 2, "{live}");
    let cut = tmp.path().join("cut.jsonl");
    std::fs::write(
        &cut,
        live.lines()
            .skip(1)
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    )
    .expect("write");
    let out = d.till(&["audit", "verify", cut.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 1:"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `till audit` reads on into the rotated files: every line they and the live file hold, in
    // order, without a gap; and with a `--limit` past the live file's lines, just that many of the
    // newest. (How many lines fit in a file depends on the line size, which depends on the
    // caller's exe path: count them, don't assume.)
    let lines_in = |f: &str| std::fs::read_to_string(f).expect("trail").lines().count();
    let live = lines_in(&trail);
    let r3 = format!("{trail}.3");
    let all = live + lines_in(&r1) + lines_in(&r2) + lines_in(&r3);
    let seqs_of = |limit: usize| -> Vec<u64> {
        let out = d.till(&["audit", "--json", "--limit", &limit.to_string()]);
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).expect("json")["seq"]
                    .as_u64()
                    .expect("seq")
            })
            .collect()
    };
    let every = seqs_of(1000);
    assert_eq!(every.len(), all, "{every:?}");
    assert!(every.windows(2).all(|w| w[1] == w[0] + 1), "{every:?}");
    let some = seqs_of(live + 5);
    assert_eq!(some.len(), live + 5);
    assert_eq!(some, every[every.len() - live - 5..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_reaches_the_webhook_directly_even_with_a_proxy_in_the_environment() {
    let up = Upstream::start(None).await;
    let hook = Upstream::start(None).await;
    let proxy = Upstream::start(None).await;
    let p = proxy.url();
    let env = [("HTTP_PROXY", p.as_str()), ("http_proxy", p.as_str())];
    let alerts = format!("\n[alerts]\nwebhook = \"{}/till-alerts\"\n", hook.url());
    let d = TestDaemon::start_with_env(&up, &alerts, &env);
    let mut c = d.client().await;
    let r = c.call(carrying_the_master_key()).await;
    assert_eq!(code(r), ErrorCode::BadRequest);
    hook.wait_hits(1).await;
    let seen = hook.seen();
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path_and_query, "/till-alerts");
    let body = String::from_utf8_lossy(&seen[0].body);
    assert!(body.contains("credential_in_request"), "{body}");
    assert!(!body.contains(SECRET), "{body}");
    assert_eq!(
        proxy.hits(),
        0,
        "the alert went to the webhook, not through the proxy"
    );
}

/// The alert command runs with tilld's environment less every variable a key is, or may be, in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_command_never_sees_a_key_from_the_environment() {
    let up = Upstream::start(None).await;
    let more = format!(
        "\n[services.envkey]\nbase_url = \"{}\"\nsecret = {{ env = \"TILL_TEST_ENV_KEY\" }}\nallow = [\"GET /**\"]\n\n[alerts]\ncommand = \"env > {{dir}}/alert.tmp && mv {{dir}}/alert.tmp {{dir}}/alert.env\"\n",
        up.url()
    );
    let d = TestDaemon::start_with_env(
        &up,
        &more,
        &[
            ("TILL_TEST_ENV_KEY", "sk-env-key-0123456789abcdef"),
            ("OPENAI_API_KEY", "sk-openai-key-0123456789abcdef"),
            ("TILL_TEST_UNRELATED", "kept"),
        ],
    );
    let mut c = d.client().await;
    assert_eq!(
        code(c.call(carrying_the_master_key()).await),
        ErrorCode::BadRequest
    );
    let path = d.dir.join("alert.env");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let env = loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the alert command never ran"
        );
        tokio::task::yield_now().await;
    };
    assert!(env.contains("TILL_TEST_UNRELATED=kept"), "{env}");
    for gone in [
        "TILL_TEST_ENV_KEY",
        "sk-env-key",
        "OPENAI_API_KEY",
        "sk-openai-key",
    ] {
        assert!(!env.contains(gone), "{gone} reached the alert command");
    }
}

/// Lines cut off the trail while tilld was stopped are found at the next start: an alert (in the
/// trail and to the alert command), a warning in `till status`, and `till audit verify` names
/// the line after the gap, because the new lines chain from where the daemon left off. A clean
/// restart raises nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trail_cut_back_while_stopped_is_found_at_the_next_start() {
    let up = Upstream::start(None).await;
    let (tmp, mut d) = daemon_with(
        &up,
        "command = \"cat > {dir}/alert.tmp && mv {dir}/alert.tmp {dir}/alert.json\"",
    );
    assert!(d.terminate().success());
    let first_life = d.audit_text();
    let warnings = |d: &TestDaemon| {
        let out = d.till(&["status", "--json"]);
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        v["warnings"].as_array().expect("warnings").clone()
    };

    // A clean restart, then events someone would rather were not in the trail.
    let mut d = TestDaemon::start_in(tmp.path());
    assert_eq!(warnings(&d), Vec::<serde_json::Value>::new());
    d.mint("echo", "GET /a", 1).await;
    d.mint("echo", "GET /b", 1).await;
    assert!(d.terminate().success());
    assert_eq!(lines_with(&d.audit_text(), "\"event\":\"alert\""), 0);
    std::fs::write(&d.audit, &first_life).expect("cut the trail back");

    let d = TestDaemon::start_in(tmp.path());
    let w = warnings(&d);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].as_str()
            .is_some_and(|s| s.contains("does not reach where tilld left it")),
        "{w:?}"
    );
    let trail = d.audit_text();
    assert_eq!(
        lines_with(&trail, "\"reason\":\"trail_discontinuity: the audit trail"),
        1,
        "{trail}"
    );
    let out = d.till(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let after_gap = first_life.lines().count() + 1;
    assert!(
        stderr.contains(&format!("line {after_gap}: the chain breaks here")),
        "{stderr}"
    );

    // The alert command got it too.
    assert_eq!(
        alert_from_command(tmp.path()).await["alert"],
        "trail_discontinuity"
    );
}
