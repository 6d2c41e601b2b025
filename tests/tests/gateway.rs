//! The HTTP gateway: a Till token where an SDK puts its key, the real key injected, nothing leaked.

use std::io::{Read, Write};

use futures_util::StreamExt;
use till_protocol::MintRequest;
use till_tests::{OTHER_SECRET, SECRET, TestDaemon, Upstream, http, peak_rss_kib};

const GATEWAY: &str = "gateway = \"127.0.0.1:0\"";

async fn mint(d: &TestDaemon, service: &str, allow: &[&str], uses: u32) -> String {
    d.client()
        .await
        .mint(MintRequest {
            service: service.into(),
            allow: allow.iter().map(|s| (*s).to_owned()).collect(),
            uses: Some(uses),
            ..MintRequest::default()
        })
        .await
        .expect("mint")
        .token
}

/// Writes `request` whole on a new connection, then reads until the gateway closes it.
async fn raw_http(addr: String, request: Vec<u8>) -> String {
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.write_all(&request).expect("the whole request is taken");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("the answer");
        answer
    })
    .await
    .expect("raw request")
}

async fn error_of(resp: reqwest::Response) -> (u16, String, serde_json::Value) {
    let status = resp.status().as_u16();
    let remaining = resp
        .headers()
        .get("till-activations-remaining")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    let body: serde_json::Value =
        serde_json::from_slice(&resp.bytes().await.expect("body")).expect("JSON error body");
    (status, remaining, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_goes_where_each_sdk_puts_its_key() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, GATEWAY);
    let g = d.gateway_url().await;
    let h = http();

    // OpenAI style: Bearer, /v1 routes by the token's own service.
    let t = mint(&d, "echo", &["POST /v1/echo"], 2).await;
    let resp = h
        .post(format!("{g}/v1/echo"))
        .bearer_auth(&t)
        .body("{\"hi\":1}")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["till-activations-remaining"], "1");
    let body = resp.text().await.expect("body");
    assert!(!body.contains(SECRET) && !body.contains(&t), "{body}");
    assert!(body.contains("[redacted by till]"));

    // Anthropic style: x-api-key, on /proxy/{service}.
    let t = mint(&d, "other", &["GET /v1/messages"], 1).await;
    let resp = h
        .get(format!("{g}/proxy/other/v1/messages"))
        .header("x-api-key", &t)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.expect("body");
    assert!(!body.contains(OTHER_SECRET), "{body}");

    // Gemini style: ?key= (removed from the query) and x-goog-api-key.
    let t = mint(&d, "q", &["GET /v1beta/models"], 2).await;
    let resp = h
        .get(format!("{g}/proxy/q/v1beta/models?alt=json&key={t}"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let resp = h
        .get(format!("{g}/proxy/q/v1beta/models"))
        .header("x-goog-api-key", &t)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);

    // GitHub style: Authorization: token.
    let t = mint(&d, "basic", &["GET /user"], 1).await;
    let resp = h
        .get(format!("{g}/proxy/basic/user"))
        .header("authorization", format!("token {t}"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);

    let seen = up.seen();
    assert_eq!(seen.len(), 5);
    assert_eq!(seen[0].headers["authorization"], format!("Bearer {SECRET}"));
    assert_eq!(seen[1].headers["x-api-key"], OTHER_SECRET);
    assert_eq!(seen[1].path_and_query, "/other/v1/messages");
    assert_eq!(
        seen[2].path_and_query,
        format!("/v1beta/models?alt=json&key={SECRET}")
    );
    assert!(
        !seen[3].headers.contains_key("x-goog-api-key"),
        "the token header is removed"
    );
    assert!(seen[4].headers["authorization"].starts_with("Basic "));
    for s in &seen {
        for v in s.headers.values() {
            assert!(
                !v.contains("till_"),
                "a Till token reached the upstream: {v}"
            );
        }
        assert!(!s.path_and_query.contains("till_"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_json_sdks_understand_and_send_nothing() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, GATEWAY);
    let g = d.gateway_url().await;
    let h = http();
    let t = mint(&d, "echo", &["GET /v1/models"], 1).await;

    let (status, _, body) =
        error_of(h.get(format!("{g}/v1/models")).send().await.expect("send")).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "bad_token");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("Authorization: Bearer")
    );

    // Naming a service is no substitute for a token: the gateway never mints one-shot tokens.
    let (status, _, body) = error_of(
        h.get(format!("{g}/proxy/echo/v1/models"))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("bad_token"))
    );

    let (status, _, body) = error_of(
        h.get(format!("{g}/v1/files"))
            .bearer_auth(&t)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (403, Some("till_out_of_scope"))
    );

    let (status, _, body) = error_of(
        h.get(format!("{g}/proxy/other/v1/models"))
            .bearer_auth(&t)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("wrong_service"))
    );

    let (status, _, _) = error_of(
        h.get(format!("{g}/v1/a%2e%2e/b"))
            .bearer_auth(&t)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 400);

    let (status, _, _) =
        error_of(h.get(format!("{g}/elsewhere")).send().await.expect("send")).await;
    assert_eq!(status, 404);
    // `/proxy/` without a service is no route either, and says which routes there are.
    let (status, _, body) = error_of(
        h.get(format!("{g}/proxy//models"))
            .bearer_auth(&t)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("/proxy/SERVICE/")),
        "{body}"
    );

    let resp = h
        .get(format!("{g}/v1/models"))
        .bearer_auth(&t)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["till-activations-remaining"], "0");
    let (status, remaining, body) = error_of(
        h.get(format!("{g}/v1/models"))
            .bearer_auth(&t)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(
        (status, remaining.as_str(), body["error"]["code"].as_str()),
        (429, "0", Some("exhausted"))
    );

    let forged = format!("{}x", &t[..t.len() - 1]);
    let (status, _, _) = error_of(
        h.get(format!("{g}/v1/models"))
            .bearer_auth(&forged)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        up.hits(),
        1,
        "only the one good request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pass_through_as_they_arrive_and_are_scrubbed() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, GATEWAY);
    let g = d.gateway_url().await;
    let t = mint(&d, "echo", &["GET /stream"], 1).await;
    let resp = http()
        .get(format!("{g}/proxy/echo/stream"))
        .bearer_auth(&t)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut got = Vec::new();
    // The first event (the key split across two upstream chunks) arrives before the upstream is
    // allowed to send the second: nothing is buffered whole.
    while !got.ends_with(b"\n\n") {
        got.extend_from_slice(&body.next().await.expect("first event").expect("chunk"));
    }
    let first = String::from_utf8_lossy(&got).into_owned();
    assert!(
        !first.contains(SECRET) && !first.contains("TESTSECRET"),
        "{first}"
    );
    assert!(first.contains("[redacted by till]"), "{first}");
    up.release();
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.expect("chunk"));
    }
    let all = String::from_utf8_lossy(&got);
    assert!(all.ends_with("data: second\n\ndata: [DONE]\n\n"), "{all}");
    let info = d.client().await.inspect(&t).await.expect("inspect");
    assert_eq!(info.used, 1, "one streamed request is one activation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destination_cannot_be_changed_and_redirects_are_not_followed() {
    let thief = Upstream::start(None).await;
    let up = Upstream::start(Some(thief.url())).await;
    let d = TestDaemon::start_extra(&up, GATEWAY);
    let g = d.gateway_url().await;
    let t = mint(&d, "echo", &["GET /**"], 10).await;

    let resp = http()
        .get(format!("{g}/proxy/echo/redirect"))
        .bearer_auth(&t)
        .send()
        .await
        .expect("send");
    assert_eq!(
        resp.status(),
        302,
        "the redirect goes back to the caller, not followed"
    );

    // Host header and an absolute-form request line naming the thief: the request still goes to
    // the pinned origin.
    let addr = g.trim_start_matches("http://").to_owned();
    let thief_host = thief.addr.to_string();
    let raw = format!(
        "GET http://{thief_host}/proxy/echo/x HTTP/1.1\r\nHost: {thief_host}\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n"
    );
    let reply = raw_http(addr, raw.into_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(thief.hits(), 0, "the other origin was never contacted");
    let seen = up.seen();
    assert_eq!(seen.last().expect("seen").path_and_query, "/x");
    assert_eq!(
        seen.last().expect("seen").headers["host"],
        up.addr.to_string()
    );
    // A header the caller's `Connection` names is for its hop to Till only: not forwarded.
    let raw = format!(
        "GET /proxy/echo/y HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nConnection: close, x-hop\r\nx-hop: 1\r\nx-kept: 2\r\nX-Forwarded-Prefix: /evil\r\nX-Forwarded-Host: evil.example\r\nForwarded: host=evil.example\r\n\r\n"
    );
    let reply = raw_http(g.trim_start_matches("http://").to_owned(), raw.into_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let headers = up.seen().last().expect("seen").headers.clone();
    assert_eq!(headers.get("x-kept").map(String::as_str), Some("2"));
    assert!(!headers.contains_key("x-hop"), "{headers:?}");
    // Nor what the caller says of where the request came from: Till is the upstream's client.
    for h in ["x-forwarded-prefix", "x-forwarded-host", "forwarded"] {
        assert!(!headers.contains_key(h), "{h}: {headers:?}");
    }
}

/// Headers and parameters that some servers take as the request's method or path
/// (`X-HTTP-Method-Override` in Google's APIs and many frameworks, `X-Original-URL` in IIS and
/// Symfony, `_method` in Rails, Laravel and Symfony) would carry a request past the rules it was
/// checked against: refused with the reason, nothing spent, nothing sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_and_path_overrides_are_refused() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, GATEWAY);
    let g = d.gateway_url().await;
    let t = mint(&d, "echo", &["POST /files/*"], 10).await;
    let post = |url: String| http().post(url).bearer_auth(&t);
    for (name, value) in [
        ("x-http-method-override", "DELETE"),
        ("X-HTTP-Method", "DELETE"),
        ("x-method-override", "DELETE"),
        ("x-original-url", "/admin"),
        ("X-Rewrite-URL", "/admin"),
    ] {
        let resp = post(format!("{g}/proxy/echo/files/1"))
            .header(name, value)
            .send()
            .await
            .expect("send");
        let (status, _, body) = error_of(resp).await;
        assert_eq!(status, 400, "{name}: {body}");
        let msg = body["error"]["message"].as_str().expect("message");
        assert!(msg.contains(&name.to_ascii_lowercase()), "{msg}");
    }
    let resp = post(format!("{g}/proxy/echo/files/1?x=1&_method=DELETE"))
        .send()
        .await
        .expect("send");
    let (status, _, body) = error_of(resp).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("_method"), "{body}");
    let resp = post(format!("{g}/proxy/echo/files/1"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("name=x&_method=delete")
        .send()
        .await
        .expect("send");
    assert_eq!(error_of(resp).await.0, 400);
    let form = |file: &str, field: &str| {
        format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"{field}\"\r\n\r\ndelete\r\n\
             --XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"edit.html.erb\"\r\n\
             Content-Type: text/html\r\n\r\n{file}\r\n--XyZ--\r\n"
        )
    };
    let multipart = |body: String| {
        post(format!("{g}/proxy/echo/files/1"))
            .header("content-type", "multipart/form-data; boundary=XyZ")
            .body(body)
            .send()
    };
    let resp = multipart(form("<p>hello</p>", "_method"))
        .await
        .expect("send");
    assert_eq!(error_of(resp).await.0, 400);
    // A file that holds the text (a Rails view) is content, not a field.
    let view = r#"<input type="hidden" name="_method" value="patch">"#;
    let resp = multipart(form(view, "note")).await.expect("send");
    assert_eq!(resp.status(), 200);
    // A JSON body is the payload, whatever keys it has.
    let resp = post(format!("{g}/proxy/echo/files/1"))
        .header("content-type", "application/json")
        .body(r#"{"_method": "DELETE"}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(up.hits(), 2);
    assert_eq!(d.client().await.inspect(&t).await.expect("inspect").used, 2);
}

/// The upstream's own URLs in its answers (a redirect's `Location`, the next page in `Link`, and
/// for the github preset the `url` fields of its JSON) name the gateway instead, so a client that
/// follows them comes back through Till with its token, and not to the upstream without a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_own_urls_come_back_through_the_gateway() {
    let up = Upstream::start(None).await;
    let more = format!(
        r#"
[services.github]
preset = "github"
base_url = "{u}"
secret = {{ file = "{{dir}}/other.key" }}

[services.plain]
preset = "github"
base_url = "{u}"
secret = {{ file = "{{dir}}/other.key" }}
rewrite_urls = false
"#,
        u = up.url()
    );
    let d = TestDaemon::start_with(&up, GATEWAY, &more);
    let g = d.gateway_url().await;
    let rules = ["GET /repos/acme/**", "GET /repositories/*/issues"];
    let t = mint(&d, "github", &rules, 10).await;
    let get = |url: String| {
        http()
            .get(url)
            .header("authorization", format!("token {t}"))
            .send()
    };

    let moved = get(format!("{g}/proxy/github/repos/acme/old-till"))
        .await
        .expect("send");
    assert_eq!(moved.status(), 301);
    let location = moved.headers()["location"].to_str().expect("text");
    assert_eq!(location, format!("{g}/proxy/github/repos/acme/till"));
    let repo: serde_json::Value = get(location.to_owned())
        .await
        .expect("send")
        .json()
        .await
        .expect("JSON");
    assert_eq!(repo["full_name"], "acme/till");
    assert_eq!(repo["url"], format!("{g}/proxy/github/repos/acme/till"));
    assert_eq!(
        repo["issues_url"],
        format!("{g}/proxy/github/repos/acme/till/issues{{/number}}")
    );

    let page1 = get(format!(
        "{}/issues?state=open",
        repo["url"].as_str().expect("url")
    ))
    .await
    .expect("send");
    let next = format!("{g}/proxy/github/repositories/1/issues?state=open&page=2");
    assert_eq!(
        page1.headers()["link"].to_str().expect("text"),
        format!(r#"<{next}>; rel="next", <{next}>; rel="last""#)
    );
    let issues: Vec<serde_json::Value> = page1.json().await.expect("JSON");
    assert_eq!(
        issues[0]["url"],
        format!("{g}/proxy/github/repos/acme/till/issues/1")
    );
    let page2: Vec<serde_json::Value> = get(next).await.expect("send").json().await.expect("JSON");
    assert_eq!(page2.len(), 2);
    assert_eq!(d.client().await.inspect(&t).await.expect("inspect").used, 4);
    assert!(
        up.seen()
            .iter()
            .all(|s| s.headers["authorization"] == format!("Bearer {OTHER_SECRET}"))
    );

    // With `rewrite_urls = false` the body is the upstream's, byte for byte; headers are still
    // rewritten (they are protocol, not content).
    let t = mint(&d, "plain", &rules, 1).await;
    let page1 = http()
        .get(format!("{g}/proxy/plain/repos/acme/till/issues"))
        .header("authorization", format!("token {t}"))
        .send()
        .await
        .expect("send");
    assert!(
        page1.headers()["link"]
            .to_str()
            .expect("text")
            .starts_with(&format!("<{g}/proxy/plain/repositories/1/issues?"))
    );
    let issues: Vec<serde_json::Value> = page1.json().await.expect("JSON");
    assert_eq!(
        issues[0]["url"],
        format!("{}/repos/acme/till/issues/1", up.url())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_are_502_and_504_with_a_clear_body() {
    let up = Upstream::start(None).await;
    let more = format!(
        "\n[services.down]\nbase_url = \"http://127.0.0.1:1\"\nsecret = {{ file = \"{{dir}}/echo.key\" }}\nallow = [\"GET /**\"]\n\n[services.slow]\nbase_url = \"{}\"\nsecret = {{ file = \"{{dir}}/echo.key\" }}\nallow = [\"GET /**\"]\ntimeout = \"1s\"\n",
        up.url()
    );
    let d = TestDaemon::start_with(&up, GATEWAY, &more);
    let g = d.gateway_url().await;
    let t = mint(&d, "down", &["GET /x"], 1).await;
    let (status, _, body) = error_of(
        http()
            .get(format!("{g}/proxy/down/x"))
            .bearer_auth(&t)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 502);
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("could not reach the upstream"),
        "{body}"
    );
    let t = mint(&d, "slow", &["GET /slow"], 1).await;
    let (status, _, body) = error_of(
        http()
            .get(format!("{g}/proxy/slow/slow"))
            .bearer_auth(&t)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 504, "{body}");
    assert!(!body.to_string().contains(SECRET));
    // Both activations were spent, and the trail says why neither got an answer.
    let reasons: Vec<String> = d
        .audit_text()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|v| v["event"] == "answer")
        .map(|v| format!("{} {}", v["service"], v["reason"]))
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].starts_with("\"down\" \"upstream_failed:"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].starts_with("\"slow\" \"upstream_timeout:"),
        "{reasons:?}"
    );
}

/// SDKs retry a 429 or a 5xx by themselves unless told `x-should-retry: false`. Till tells them
/// when a retry cannot succeed: a refusal of the token (it would come again), and an upstream
/// failure or error answer once no activation is left (the retry would be refused as spent, and
/// hide the failure). While activations are left, an upstream failure may be retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdks_are_told_when_a_retry_cannot_succeed() {
    let up = Upstream::start(None).await;
    let more = "\n[services.down]\nbase_url = \"http://127.0.0.1:1\"\nsecret = { file = \"{dir}/echo.key\" }\nallow = [\"GET /**\"]\n";
    let d = TestDaemon::start_with(&up, GATEWAY, more);
    let g = d.gateway_url().await;
    let should_retry = |resp: &reqwest::Response| {
        let all: Vec<String> = resp
            .headers()
            .get_all("x-should-retry")
            .iter()
            .map(|v| v.to_str().expect("text").to_owned())
            .collect();
        (resp.status().as_u16(), all.join(","))
    };
    let get = |path: &str, token: &str| http().get(format!("{g}{path}")).bearer_auth(token).send();

    let t = mint(&d, "echo", &["GET /status/*"], 2).await;
    let first = get("/proxy/echo/status/500", &t).await.expect("send");
    assert_eq!(
        should_retry(&first),
        (500, "true".into()),
        "the upstream's own word"
    );
    let last = get("/proxy/echo/status/500", &t).await.expect("send");
    assert_eq!(should_retry(&last), (500, "false".into()));
    let spent = get("/proxy/echo/status/500", &t).await.expect("send");
    assert_eq!(should_retry(&spent), (429, "false".into()));
    let bad = get("/proxy/echo/status/500", "till_bogus")
        .await
        .expect("send");
    assert_eq!(should_retry(&bad), (401, "false".into()));

    let t = mint(&d, "down", &["GET /x"], 2).await;
    let first = get("/proxy/down/x", &t).await.expect("send");
    assert_eq!(should_retry(&first), (502, String::new()));
    let last = get("/proxy/down/x", &t).await.expect("send");
    assert_eq!(should_retry(&last), (502, "false".into()));
    assert_eq!(up.hits(), 2);
}

/// A caller that goes away before the upstream answers still leaves an `answer` line: the trail
/// says what became of every activation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_leaves_before_the_answer_is_in_the_trail() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, GATEWAY);
    let g = d.gateway_url().await;
    let t = mint(&d, "echo", &["GET /slow"], 1).await;
    let request = http().get(format!("{g}/proxy/echo/slow")).bearer_auth(&t);
    let caller = tokio::spawn(async move { request.send().await });
    // Once the upstream has the request, the caller gives up (its connection closes).
    up.wait_hits(1).await;
    caller.abort();
    assert!(caller.await.is_err_and(|e| e.is_cancelled()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let answer = loop {
        let answer = d
            .audit_text()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
            .find(|v| v["event"] == "answer");
        if let Some(a) = answer {
            break a;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no answer line:\n{}",
            d.audit_text()
        );
        tokio::task::yield_now().await;
    };
    assert!(
        answer["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("caller_gone:")),
        "{answer}"
    );
    assert_eq!(answer["path"], "/slow");
}

/// A service's `timeout` bounds how long its answer takes to start and each silence within it,
/// not the whole: an answer that keeps coming for longer passes through whole (a long streamed
/// completion), and one that goes quiet for longer is cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_answer_that_keeps_coming_is_not_cut_off_and_a_stalled_one_is() {
    let up = Upstream::start(None).await;
    let more = format!(
        "\n[services.paced]\nbase_url = \"{}\"\nsecret = {{ file = \"{{dir}}/echo.key\" }}\nallow = [\"GET /**\"]\ntimeout = \"1s\"\n",
        up.url()
    );
    let d = TestDaemon::start_with(&up, GATEWAY, &more);
    let g = d.gateway_url().await;
    // 15 events 100 ms apart: 1.4 s in all, longer than the timeout, and never near 1 s without
    // one (room for a slow machine).
    let whole: String = (0..15).map(|i| format!("data: {i}\n\n")).collect();
    let t = mint(&d, "paced", &["GET /drip", "GET /stream"], 4).await;
    let started = std::time::Instant::now();
    let resp = http()
        .get(format!("{g}/proxy/paced/drip?n=15&ms=100"))
        .bearer_auth(&t)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.expect("the whole stream");
    assert_eq!(body, whole);
    assert!(started.elapsed() > std::time::Duration::from_millis(1400));
    // The same through the socket, which reads the whole answer before replying.
    let mut c = d.client().await;
    let reply = c
        .call(till_protocol::CallRequest {
            token: Some(t.clone()),
            method: "GET".into(),
            path: "/drip?n=15&ms=100".into(),
            ..till_protocol::CallRequest::default()
        })
        .await
        .expect("call");
    assert_eq!(reply.status, 200);
    assert_eq!(String::from_utf8_lossy(&reply.body), whole);
    // `/stream` sends its first event, then nothing until released (never, here): cut off after
    // the timeout, on the gateway (the stream ends in an error) and on the socket (a refusal).
    let resp = http()
        .get(format!("{g}/proxy/paced/stream"))
        .bearer_auth(&t)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let got = tokio::time::timeout(std::time::Duration::from_secs(30), resp.bytes())
        .await
        .expect("cut off, not left hanging");
    assert!(got.is_err(), "a stalled stream ends in an error");
    let refused = c
        .call(till_protocol::CallRequest {
            token: Some(t),
            method: "GET".into(),
            path: "/stream".into(),
            ..till_protocol::CallRequest::default()
        })
        .await
        .expect_err("stalled");
    let message = refused.to_string();
    assert!(message.contains("stopped for longer than 1s"), "{message}");
    assert!(!message.contains(SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_streams_hold_with_bounded_memory() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, GATEWAY);
    let g = d.gateway_url().await;
    let t = mint(&d, "echo", &["GET /stream"], 100).await;
    let h = http();
    let rss_before = peak_rss_kib(d.child.id());
    let mut streams = Vec::new();
    for _ in 0..100 {
        let resp = h
            .get(format!("{g}/proxy/echo/stream"))
            .bearer_auth(&t)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200);
        let mut body = resp.bytes_stream();
        let mut first = Vec::new();
        while !first.ends_with(b"\n\n") {
            first.extend_from_slice(&body.next().await.expect("event").expect("chunk"));
        }
        streams.push(body);
    }
    // All 100 are open and waiting for their second event at once.
    let rss_open = peak_rss_kib(d.child.id());
    for _ in 0..100 {
        up.release();
    }
    for mut s in streams {
        let mut rest = Vec::new();
        while let Some(c) = s.next().await {
            rest.extend_from_slice(&c.expect("chunk"));
        }
        assert!(String::from_utf8_lossy(&rest).ends_with("[DONE]\n\n"));
    }
    let rss_after = peak_rss_kib(d.child.id());
    eprintln!(
        "tilld peak RSS: {rss_before} KiB before, {rss_open} KiB with 100 open streams, {rss_after} KiB after"
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "100 streams grew the daemon by more than 64 MiB"
    );
    assert_eq!(
        d.client().await.inspect(&t).await.expect("inspect").used,
        100
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_metrics() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, GATEWAY);
    let g = d.gateway_url().await;
    let h = http();
    assert_eq!(
        h.get(format!("{g}/healthz"))
            .send()
            .await
            .expect("send")
            .text()
            .await
            .expect("body"),
        "ok\n"
    );
    let t = mint(&d, "echo", &["GET /a"], 2).await;
    h.get(format!("{g}/proxy/echo/a"))
        .bearer_auth(&t)
        .send()
        .await
        .expect("send");
    h.get(format!("{g}/proxy/echo/b"))
        .bearer_auth(&t)
        .send()
        .await
        .expect("send");
    let text = h
        .get(format!("{g}/metrics"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("body");
    assert!(text.contains("till_mints_total 1\n"), "{text}");
    assert!(text.contains("till_activations_total 1\n"), "{text}");
    assert!(
        text.contains("till_refusals_total{reason=\"out_of_scope\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("till_live_tokens 1\n"), "{text}");
    assert!(
        text.contains("till_upstream_seconds_count{service=\"echo\"} 1\n"),
        "{text}"
    );
}

/// A connection that sends no request, stalls in its headers, or idles after one, is closed after
/// `gateway_idle_timeout`; the gateway goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_stalled_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, &format!("{GATEWAY}\ngateway_idle_timeout = \"1s\""));
    let g = d.gateway_url().await;
    let addr = g.trim_start_matches("http://").to_owned();
    for first in [
        &b""[..],
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        s.write_all(first).await.expect("write");
        let mut got = Vec::new();
        // The guard only turns a hang into a failure; the server closes after about 1 s.
        let closed =
            tokio::time::timeout(std::time::Duration::from_secs(30), s.read_to_end(&mut got)).await;
        assert!(
            matches!(closed, Ok(Ok(_))),
            "{:?}: not closed by the gateway",
            String::from_utf8_lossy(first)
        );
        let answered = String::from_utf8_lossy(&got);
        assert_eq!(
            answered.starts_with("HTTP/1.1 200"),
            first.ends_with(b"\r\n\r\n"),
            "{answered}"
        );
    }
    // A body that stops coming: 408, nothing spent or sent.
    let t = mint(&d, "echo", &["POST /x"], 1).await;
    let stalled = format!(
        "POST /proxy/echo/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Length: 10\r\n\r\nabc"
    );
    let answer = raw_http(addr, stalled.into_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("stalled"), "{answer}");
    assert_eq!(up.hits(), 0);
    let ok = http()
        .get(format!("{g}/healthz"))
        .send()
        .await
        .expect("send");
    assert_eq!(ok.status(), 200);
}

/// `max_body` bounds both ways: a request body over it is refused with 413 before anything is
/// spent or sent (and is in the trail); an answer over it is cut off, not passed on whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_body_are_refused_or_cut_off() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, &format!("{GATEWAY}\nmax_body = 2048"));
    let g = d.gateway_url().await;
    let t = mint(&d, "echo", &["POST /v1/echo"], 1).await;

    // As Python's http.client and httpx do: send the whole body, then read the answer. Closing
    // before the client is done sending would reset the connection and lose the refusal.
    let addr = g.trim_start_matches("http://").to_owned();
    let auth = format!("Bearer {t}");
    let big = 32 << 20;
    let mut request = format!(
        "POST /proxy/echo/v1/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {auth}\r\nContent-Length: {big}\r\n\r\n"
    )
    .into_bytes();
    request.resize(request.len() + big, b'x');
    let raw = raw_http(addr.clone(), request).await;
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    assert!(raw.contains("over the limit of 2048 bytes"), "{raw}");
    assert!(up.seen().is_empty(), "nothing went upstream");
    let deny = d
        .audit_text()
        .lines()
        .filter(|l| l.contains("\"deny\"") && l.contains("over the limit"))
        .count();
    assert_eq!(deny, 1, "the refusal is in the trail");

    // As curl does with a large body: the head, then wait for `100 Continue`. The refusal comes
    // instead, and no byte of the body is sent (here, none ever is).
    let head = format!(
        "POST /proxy/echo/v1/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {auth}\r\nContent-Length: {big}\r\nExpect: 100-continue\r\n\r\n"
    );
    let raw = raw_http(addr.clone(), head.into_bytes()).await;
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    assert!(up.seen().is_empty(), "nothing went upstream");

    // Within the limit going up; the echo coming back (the body plus every header) is over it,
    // and says so in its length: refused whole, the activation spent (the request went).
    let resp = http()
        .post(format!("{g}/proxy/echo/v1/echo"))
        .bearer_auth(&t)
        .body(vec![b'y'; 2000])
        .send()
        .await
        .expect("send");
    let (status, remaining, body) = error_of(resp).await;
    assert_eq!((status, remaining.as_str()), (502, "0"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("larger than the limit of 2048 bytes"),
        "{body}"
    );
    assert_eq!(up.seen().len(), 1);
}

/// One uid holds at most `gateway_max_connections` connections: past that a new one gets a 503
/// that says why, the open ones keep working, and one closing makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_uid_are_capped() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, &format!("{GATEWAY}\ngateway_max_connections = 3"));
    let g = d.gateway_url().await;
    let addr = g.trim_start_matches("http://").to_owned();
    let get = |conn: &mut std::net::TcpStream, close: bool| {
        let extra = if close { "Connection: close\r\n" } else { "" };
        conn.write_all(format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{extra}\r\n").as_bytes())
            .expect("write");
        let mut buf = [0u8; 4096];
        let n = conn.read(&mut buf).expect("read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let (a, held) = tokio::task::spawn_blocking(move || {
        let mut held: Vec<std::net::TcpStream> = (0..3)
            .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
            .collect();
        for c in &mut held {
            let answer = get(c, false);
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
        let mut fourth = std::net::TcpStream::connect(&addr).expect("connect");
        fourth
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        let mut refused = String::new();
        fourth
            .read_to_string(&mut refused)
            .expect("read to the close");
        (refused, (addr, held))
    })
    .await
    .expect("clients");
    assert!(a.starts_with("HTTP/1.1 503"), "{a}");
    assert!(
        a.contains("already holds 3 connections") && a.contains("gateway_max_connections"),
        "{a}"
    );
    let (addr, mut held) = held;
    tokio::task::spawn_blocking(move || {
        // The open ones still work.
        let answer = get(&mut held[0], false);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // One closes (the daemon closes it after answering); then a new one is let in.
        let answer = get(&mut held[1], true);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let mut c = std::net::TcpStream::connect(&addr).expect("connect");
            let answer = get(&mut c, true);
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
            assert!(
                std::time::Instant::now() < deadline,
                "no room after a connection closed"
            );
        }
    })
    .await
    .expect("clients");
}
