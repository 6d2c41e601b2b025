//! Real SDKs through the gateway: the OpenAI and Anthropic Python SDKs (installed by `scripts/test`
//! into `target/py`; `$TILL_TEST_PYTHON` points at its interpreter), and the examples shipped in
//! `examples/gateway/` that use them.

use std::process::Command;

use till_protocol::{CallRequest, MintRequest};
use till_tests::{OTHER_SECRET, SECRET, TestDaemon, Upstream};

fn python() -> String {
    std::env::var("TILL_TEST_PYTHON").unwrap_or_else(|_| {
        let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/py/bin/python");
        assert!(
            std::path::Path::new(venv).exists(),
            "no Python with the openai SDK: run scripts/test (it makes target/py), or set TILL_TEST_PYTHON"
        );
        venv.to_owned()
    })
}

/// Runs `cmd`, which must succeed; returns what it printed on stdout and stderr.
fn succeed(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().expect("run the command");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    (stdout, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_works_unchanged_with_a_till_token() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, "gateway = \"127.0.0.1:0\"");
    let g = d.gateway_url().await;
    let mut c = d.client().await;
    let mint = |uses| MintRequest {
        service: "echo".into(),
        allow: vec!["POST /v1/chat/completions".into()],
        uses: Some(uses),
        ..MintRequest::default()
    };
    let token = c.mint(mint(3)).await.expect("mint").token;
    let spent = c.mint(mint(1)).await.expect("mint").token;
    c.call(CallRequest {
        token: Some(spent.clone()),
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        body: b"{}".to_vec(),
        ..CallRequest::default()
    })
    .await
    .expect("spend it");

    let (stdout, _) = succeed(
        Command::new(python())
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/openai_sdk.py"))
            .env("TILL_BASE_URL", format!("{g}/v1"))
            .env("TILL_TOKEN", &token)
            .env("TILL_SPENT_TOKEN", &spent),
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(v["plain"], "hello from upstream");
    assert_eq!(v["streamed"], "hello from upstream");
    assert_eq!(v["spent"]["class"], "RateLimitError");
    assert_eq!(v["spent"]["status"], 429);
    let msg = v["spent"]["message"].as_str().expect("message");
    assert!(
        msg.contains("Till:") && msg.contains("activation(s) are all spent"),
        "{msg}"
    );
    assert!(!stdout.contains(SECRET));

    // The upstream accepted the requests only because it got the real key.
    let chats: Vec<_> = up
        .seen()
        .into_iter()
        .filter(|s| s.path_and_query == "/v1/chat/completions")
        .collect();
    assert_eq!(
        chats.len(),
        3,
        "the spent token's SDK call never reached the upstream"
    );
    assert!(
        chats
            .iter()
            .all(|s| s.headers["authorization"] == format!("Bearer {SECRET}"))
    );
    let info = c.inspect(&token).await.expect("inspect");
    assert_eq!((info.used, info.remaining), (2, 1));
}

/// A daemon with the gateway on and the preset `name` as a service of that name, pointed at `up`,
/// its key read from `key_file` in the daemon's dir.
fn with_preset(up: &Upstream, name: &str, key_file: &str) -> TestDaemon {
    let more = format!(
        "\n[services.{name}]\npreset = \"{name}\"\nbase_url = \"{}\"\nsecret = {{ file = \"{{dir}}/{key_file}\" }}\n",
        up.url()
    );
    TestDaemon::start_with(up, "gateway = \"127.0.0.1:0\"", &more)
}

/// Mints a token of `uses` for `service` and `allow`, runs `examples/gateway/{script}` with the
/// token in `key_var` and the gateway's `base` in `base_var`, as the example's docstring says, and
/// returns what it printed (it must succeed).
async fn run_example(
    d: &TestDaemon,
    (service, allow, uses): (&str, &[&str], u32),
    script: &str,
    (key_var, base_var, base): (&str, &str, &str),
) -> String {
    let g = d.gateway_url().await;
    let token = d.mint_rules(service, allow, uses).await.token;
    let (stdout, _) = succeed(
        Command::new(python())
            .arg(format!(
                "{}/../examples/gateway/{script}",
                env!("CARGO_MANIFEST_DIR")
            ))
            .env(key_var, &token)
            .env(base_var, format!("{g}{base}")),
    );
    stdout
}

/// The example shipped in `examples/gateway/openai_sdk.py`, run as its docstring says (only the
/// base URL and the token differ): a reply, a stream, and the refusal of the third call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_openai_example_runs_as_documented() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, "gateway = \"127.0.0.1:0\"");
    let stdout = run_example(
        &d,
        ("echo", &["POST /v1/chat/completions"], 2),
        "openai_sdk.py",
        ("OPENAI_API_KEY", "OPENAI_BASE_URL", "/v1"),
    )
    .await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "hello from upstream");
    assert_eq!(lines[1], "hello from upstream");
    assert!(
        lines[2].starts_with("refused:") && lines[2].contains("activation(s) are all spent"),
        "{stdout}"
    );
    // Refused once: told that a retry cannot succeed, the SDK did not retry (it would twice).
    let denials = d
        .audit_text()
        .lines()
        .filter(|l| l.contains(r#""event":"deny""#))
        .count();
    assert_eq!(denials, 1, "{}", d.audit_text());
    assert!(!stdout.contains(SECRET));
}

/// The example shipped in `examples/gateway/anthropic_sdk.py`, run as its docstring says, against
/// the anthropic preset pointed at the test upstream: the SDK puts the token in `x-api-key`, and
/// the upstream gets the real key there, with the `anthropic-version` header the preset adds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_anthropic_example_runs_as_documented() {
    let up = Upstream::start(None).await;
    let d = with_preset(&up, "anthropic", "other.key");
    let stdout = run_example(
        &d,
        ("anthropic", &["POST /v1/messages"], 1),
        "anthropic_sdk.py",
        (
            "ANTHROPIC_API_KEY",
            "ANTHROPIC_BASE_URL",
            "/proxy/anthropic",
        ),
    )
    .await;
    assert_eq!(stdout.trim(), "hello from upstream");
    let seen = up.seen();
    let sent = seen.last().expect("the upstream was called");
    assert_eq!(sent.path_and_query, "/v1/messages");
    assert_eq!(sent.headers["x-api-key"], OTHER_SECRET);
    assert!(sent.headers.contains_key("anthropic-version"));
    assert!(!stdout.contains(OTHER_SECRET));
    // The gateway's root as the base URL (as Claude Code's ANTHROPIC_BASE_URL is set): the SDK
    // asks for /v1/messages, and the service is the token's own.
    let stdout = run_example(
        &d,
        ("anthropic", &["POST /v1/messages"], 1),
        "anthropic_sdk.py",
        ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", ""),
    )
    .await;
    assert_eq!(stdout.trim(), "hello from upstream");
    assert_eq!(up.seen().len(), 2);
}

/// The example shipped in `examples/gateway/pygithub_example.py`, run as its docstring says, against the
/// github preset pointed at a small GitHub whose answers name its own origin, as api.github.com's
/// do. PyGithub follows the repository's `url` field and the `Link` header's next page; both come
/// back through the gateway (rewritten to it), with the real key injected each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_github_example_runs_as_documented() {
    let up = Upstream::start(None).await;
    let d = with_preset(&up, "github", "other.key");
    let stdout = run_example(
        &d,
        (
            "github",
            &["GET /repos/acme/**", "GET /repositories/*/issues"],
            10,
        ),
        "pygithub_example.py",
        ("GH_TILL_TOKEN", "GITHUB_BASE_URL", "/proxy/github"),
    )
    .await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "1 issue 1",
            "2 issue 2",
            "3 issue 3",
            "4 issue 4",
            "5 issue 5"
        ]
    );
    let seen = up.seen();
    let paths: Vec<&str> = seen
        .iter()
        .map(|s| s.path_and_query.split('?').next().unwrap_or_default())
        .collect();
    assert_eq!(
        paths,
        [
            "/repos/acme/till",
            "/repos/acme/till/issues",
            "/repositories/1/issues"
        ]
    );
    assert!(
        seen.iter()
            .all(|s| s.headers["authorization"] == format!("Bearer {OTHER_SECRET}"))
    );
    assert!(!stdout.contains(OTHER_SECRET));
}

/// The example shipped in `examples/gateway/curl.sh`, run as it says (with `till` on the PATH and
/// the gateway's URL in `TILL_GATEWAY`), against the openai preset pointed at the test upstream:
/// three answers, then the refusal of the fourth request, then health and metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_curl_example_runs_as_documented() {
    let up = Upstream::start(None).await;
    let d = with_preset(&up, "openai", "echo.key");
    let g = d.gateway_url().await;
    let till_dir = till_tests::bin("till")
        .parent()
        .expect("bin dir")
        .to_owned();
    let path = format!(
        "{}:{}",
        till_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (stdout, _) = succeed(
        Command::new("bash")
            .arg(format!(
                "{}/../examples/gateway/curl.sh",
                env!("CARGO_MANIFEST_DIR")
            ))
            .env("PATH", path)
            .env("TILL_GATEWAY", &g)
            .env("TILL_SOCKET", d.socket.as_os_str()),
    );
    assert!(stdout.starts_with("HTTP/1.1 200"), "{stdout}");
    assert!(stdout.contains("HTTP/1.1 429"), "{stdout}");
    assert!(stdout.contains("activation(s) are all spent"), "{stdout}");
    assert!(stdout.contains("ok\n"), "{stdout}");
    assert!(stdout.contains("till_activations_total"), "{stdout}");
    assert!(!stdout.contains(SECRET));
    let paths: Vec<String> = up.seen().iter().map(|s| s.path_and_query.clone()).collect();
    assert_eq!(paths, ["/v1/models", "/v1/models", "/v1/models"]);
}

/// The example shipped in `examples/gateway/gemini_sdk.py`, run as its docstring says, against the
/// gemini preset pointed at the test upstream: Google's SDK puts the token in `x-goog-api-key`,
/// the upstream gets the real key there; a reply, a stream, and the refusal of the third request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_gemini_example_runs_as_documented() {
    let up = Upstream::start(None).await;
    let d = with_preset(&up, "gemini", "other.key");
    let stdout = run_example(
        &d,
        ("gemini", &["POST /v1/models/*"], 2),
        "gemini_sdk.py",
        ("GEMINI_API_KEY", "GEMINI_BASE_URL", "/proxy/gemini"),
    )
    .await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "hello from upstream", "{stdout}");
    assert_eq!(lines[1], "hello from upstream", "{stdout}");
    assert!(
        lines[2].starts_with("refused: 429 RESOURCE_EXHAUSTED Till: ")
            && lines[2].contains("activation(s) are all spent"),
        "{stdout}"
    );
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[0].path_and_query.ends_with(":generateContent"),
        "{}",
        seen[0].path_and_query
    );
    assert!(seen[1].path_and_query.contains(":streamGenerateContent"));
    assert!(
        seen.iter()
            .all(|s| s.headers["x-goog-api-key"] == OTHER_SECRET)
    );
    assert!(!stdout.contains(OTHER_SECRET));
    // The SDK did not retry the refusal (one deny line).
    assert_eq!(d.audit_text().matches(r#""event":"deny""#).count(), 1);
}

/// Groq's own SDK, given the gateway's route for the groq preset as its base URL, asks for
/// `/openai/v1/chat/completions`: it puts in front the path that the preset's base URL
/// (`https://api.groq.com/openai`) already ends with. The gateway takes that path once, so the
/// SDK works, the token's rule is the plain `POST /v1/chat/completions`, and the upstream gets
/// `/openai/v1/chat/completions`, not `/openai/openai/...`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groqs_own_sdk_works_through_the_groq_preset() {
    let up = Upstream::start(None).await;
    let more = format!(
        "\n[services.groq]\npreset = \"groq\"\nbase_url = \"{}/openai\"\nsecret = {{ file = \"{{dir}}/echo.key\" }}\n",
        up.url()
    );
    let d = TestDaemon::start_with(&up, "gateway = \"127.0.0.1:0\"", &more);
    let g = d.gateway_url().await;
    let token = d.mint("groq", "POST /v1/chat/completions", 1).await.token;
    let script = r#"
import os, groq
c = groq.Groq(api_key=os.environ["GROQ_API_KEY"], base_url=os.environ["GROQ_BASE_URL"], max_retries=0)
r = c.chat.completions.create(model="llama-3.3-70b-versatile", messages=[{"role": "user", "content": "hi"}])
print(r.choices[0].message.content)
"#;
    let (stdout, _) = succeed(
        Command::new(python())
            .args(["-c", script])
            .env("GROQ_API_KEY", &token)
            .env("GROQ_BASE_URL", format!("{g}/proxy/groq")),
    );
    assert_eq!(stdout.trim(), "hello from upstream");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path_and_query, "/openai/v1/chat/completions");
    assert_eq!(seen[0].headers["authorization"], format!("Bearer {SECRET}"));
}

/// The official Python MCP SDK (the client many agent frameworks use), over both ways in: stdio
/// through `till mcp` as a host launches it, and streamable HTTP on the gateway's `/mcp`. Each
/// lists the five tools, makes a one-shot call, gets a refusal as a tool error, and closes its
/// session cleanly (the SDK logs a failure for any answer to its DELETE but 200 or 204).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_mcp_sdk_works_over_stdio_and_http() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, "gateway = \"127.0.0.1:0\"");
    let g = d.gateway_url().await;
    let script = r#"
import asyncio, os, sys
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

async def story(r, w, label):
    async with ClientSession(r, w) as s:
        await s.initialize()
        tools = sorted(t.name for t in (await s.list_tools()).tools)
        ok = await s.call_tool("call_api", {"service": "echo", "method": "GET", "path": "/py"})
        bad = await s.call_tool("call_api", {"service": "nope", "method": "GET", "path": "/x"})
        print(label, ",".join(tools), ok.is_error, bad.is_error, bad.content[0].text.split(":")[0])

async def main():
    params = StdioServerParameters(command=os.environ["TILL"], args=["mcp"],
                                   env={"TILL_SOCKET": os.environ["TILL_SOCKET"]})
    async with stdio_client(params) as (r, w):
        await story(r, w, "stdio")
    async with streamable_http_client(os.environ["GATEWAY"] + "/mcp") as streams:
        await story(streams[0], streams[1], "http")

asyncio.run(main())
"#;
    let (stdout, stderr) = succeed(
        Command::new(python())
            .args(["-c", script])
            .env("TILL", till_tests::bin("till"))
            .env("TILL_SOCKET", &d.socket)
            .env("GATEWAY", &g),
    );
    let tools = "call_api,list_services,request_token,revoke_token,token_status";
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            format!("stdio {tools} False True Refused (unknown_service)"),
            format!("http {tools} False True Refused (unknown_service)"),
        ]
    );
    assert!(!stderr.contains("termination failed"), "{stderr}");
    assert_eq!(up.seen().len(), 2);
}
