//! Budgets of LLM tokens: charged from the usage the answers report, over the socket and the
//! gateway (streams included), shared with narrowed tokens, and refused where no usage is reported.

use till_protocol::{CallRequest, ErrorCode, MintRequest};
use till_tests::{ClientError, TestDaemon, Upstream, http, standard_config};

/// The standard daemon with the gateway on and `llm`, an OpenAI-compatible service whose answers
/// report usage (the test upstream's chat completions use 4 LLM tokens each).
fn daemon(up: &Upstream) -> (tempfile::TempDir, TestDaemon) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut text = standard_config(tmp.path(), &up.url(), "gateway = \"127.0.0.1:0\"");
    text.push_str(&format!(
        "\n[services.llm]\nbase_url = \"{}\"\nsecret = {{ file = \"{}/echo.key\" }}\nallow = [\"POST /v1/chat/completions\"]\nllm_usage = true\n",
        up.url(),
        tmp.path().display()
    ));
    std::fs::write(tmp.path().join("till.toml"), text).expect("config");
    let d = TestDaemon::start_in(tmp.path());
    (tmp, d)
}

fn mint_req(budget: Option<u64>, from: Option<String>) -> MintRequest {
    MintRequest {
        service: "llm".into(),
        uses: Some(10),
        budget,
        from,
        ..MintRequest::default()
    }
}

fn chat(token: &str) -> CallRequest {
    CallRequest {
        token: Some(token.into()),
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#.to_vec(),
        ..CallRequest::default()
    }
}

fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (ErrorCode, String) {
    match r {
        Err(ClientError::Refused { code, message }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_is_charged_from_reported_usage_and_then_refuses() {
    let up = Upstream::start(None).await;
    let (_tmp, d) = daemon(&up);
    let mut c = d.client().await;
    let t = c.mint(mint_req(Some(10), None)).await.expect("mint");
    assert_eq!(t.info.budget, Some(10));
    // 4 LLM tokens each: 0 → 4 → 8 → 12. The call that crosses the budget completes.
    for _ in 0..3 {
        assert_eq!(c.call(chat(&t.token)).await.expect("call").status, 200);
    }
    let (code, message) = refusal(c.call(chat(&t.token)).await);
    assert_eq!(code, ErrorCode::Exhausted);
    assert!(
        message.contains("budget of 10 LLM tokens is spent (12 used)"),
        "{message}"
    );
    assert_eq!(up.hits(), 3, "the refused call sent nothing");
    let out = d.till(&["inspect", &t.info.id]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("budget       0 LLM tokens left of 10 (12 used)") && shown.contains("spent"),
        "{shown}"
    );
    let charges: Vec<String> = d
        .audit_text()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|v| v["event"] == "charge")
        .map(|v| v["reason"].as_str().unwrap_or("").to_owned())
        .collect();
    let id = &t.info.id;
    assert_eq!(
        charges,
        [4, 8, 12].map(|n| format!("4 LLM token(s) charged ({id}: {n} of 10 used)")),
    );

    // Only services whose answers report usage take a budget.
    let mut echo = mint_req(Some(10), None);
    echo.service = "echo".into();
    let (code, message) = refusal(c.mint(echo).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("llm_usage = true"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_through_the_gateway_are_charged_and_unreported_usage_fails_closed() {
    let up = Upstream::start(None).await;
    let (_tmp, d) = daemon(&up);
    let g = d.gateway_url().await;
    let mut c = d.client().await;
    let stream = |t: &str, usage: bool| {
        let mut body = serde_json::json!({"model": "m", "stream": true, "messages": []});
        if usage {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        http()
            .post(format!("{g}/v1/chat/completions"))
            .bearer_auth(t)
            .json(&body)
            .send()
    };
    let t = c.mint(mint_req(Some(5), None)).await.expect("mint").token;
    for _ in 0..2 {
        let r = stream(&t, true).await.expect("send");
        assert_eq!(r.status(), 200);
        let text = r.text().await.expect("body");
        assert!(text.contains("\"total_tokens\":4"), "{text}");
    }
    let r = stream(&t, true).await.expect("send");
    assert_eq!(r.status(), 429);
    let body = r.text().await.expect("body");
    assert!(
        body.contains("budget of 5 LLM tokens is spent (8 used)"),
        "{body}"
    );

    // A stream that reports no usage leaves the budget unkeepable: the next call is refused,
    // with what to do about it.
    let t = c
        .mint(mint_req(Some(1000), None))
        .await
        .expect("mint")
        .token;
    let r = stream(&t, false).await.expect("send");
    assert_eq!(r.status(), 200);
    r.text().await.expect("the whole stream");
    let r = stream(&t, false).await.expect("send");
    assert_eq!(r.status(), 429);
    let body = r.text().await.expect("body");
    assert!(body.contains("include_usage"), "{body}");
    assert_eq!(up.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrowed_token_spends_its_parents_budget() {
    let up = Upstream::start(None).await;
    let (_tmp, d) = daemon(&up);
    let mut c = d.client().await;
    let parent = c.mint(mint_req(Some(10), None)).await.expect("mint");
    let (code, message) = refusal(c.mint(mint_req(Some(11), Some(parent.token.clone()))).await);
    assert_eq!(code, ErrorCode::OverCeiling);
    assert!(
        message.contains("10 LLM tokens of budget left"),
        "{message}"
    );
    let mut child_req = mint_req(None, Some(parent.token.clone()));
    child_req.uses = Some(5);
    let child = c.mint(child_req).await.expect("narrowed").token;
    for _ in 0..3 {
        c.call(chat(&child)).await.expect("the child spends");
    }
    let (code, _) = refusal(c.call(chat(&parent.token)).await);
    assert_eq!(
        code,
        ErrorCode::Exhausted,
        "the parent's budget went to its child"
    );
    let (code, message) = refusal(c.call(chat(&child)).await);
    assert_eq!(code, ErrorCode::Exhausted);
    assert!(
        message.contains("narrowed from") && message.contains("budget"),
        "{message}"
    );
    assert_eq!(up.hits(), 3);
}
