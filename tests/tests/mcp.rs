//! MCP through a real MCP client (rmcp): `till mcp` over stdio as an agent host launches it, and the
//! gateway's streamable HTTP `/mcp`.

use rmcp::ServiceExt;
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, Implementation,
};
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::{ConfigureCommandExt, StreamableHttpClientTransport, TokioChildProcess};
use serde_json::{Value, json};
use till_tests::{SECRET, TestDaemon, Upstream, bin};

type Session = RunningService<RoleClient, ClientConfig>;

fn agent() -> ClientConfig {
    ClientConfig::new(
        ClientCapabilities::default(),
        Implementation::new("test-agent", "1.0"),
    )
}

async fn stdio_session(socket: &std::path::Path) -> Session {
    stdio_session_with(socket, &[]).await.0
}

/// `till mcp` as an agent host launches it (stdio on pipes), with `args` after `mcp`; also
/// returns its pid.
async fn stdio_session_with(socket: &std::path::Path, args: &[&str]) -> (Session, u32) {
    let cmd = tokio::process::Command::new(bin("till")).configure(|c| {
        c.arg("--socket").arg(socket).arg("mcp").args(args);
    });
    let child = TokioChildProcess::new(cmd).expect("spawn till mcp");
    let pid = child.id().expect("pid");
    let s = agent()
        .serve(child)
        .await
        .expect("initialize through till mcp");
    (s, pid)
}

/// What `pid`'s descriptor `fd` refers to (`pipe:[inode]`).
fn fd_target(pid: u32, fd: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .expect("fd link")
        .display()
        .to_string()
}

/// Whether `pid` holds a descriptor to `target`.
fn holds(pid: u32, target: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|l| l.display().to_string() == target)
}

async fn call(s: &Session, tool: &'static str, args: Value) -> CallToolResult {
    let args = args.as_object().expect("object").clone();
    s.call_tool(CallToolRequestParams::new(tool).with_arguments(args))
        .await
        .expect("a refusal is a tool result, never a protocol error")
}

fn text(r: &CallToolResult) -> String {
    r.content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn structured(r: &CallToolResult) -> Value {
    assert_ne!(r.is_error, Some(true), "unexpected refusal: {}", text(r));
    r.structured_content.clone().expect("structured content")
}

fn refusal(r: &CallToolResult) -> String {
    assert_eq!(
        r.is_error,
        Some(true),
        "expected a refusal, got {}",
        text(r)
    );
    text(r)
}

/// The tools Till serves, by name.
const TOOLS: [&str; 5] = [
    "call_api",
    "list_services",
    "request_token",
    "revoke_token",
    "token_status",
];

/// The names of the tools a session lists, sorted.
async fn tool_names(s: &Session) -> Vec<String> {
    let mut names: Vec<String> = s
        .list_all_tools()
        .await
        .expect("tools")
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    names.sort();
    names
}

/// The whole agent story, on any session: list, mint, call, count, refuse, revoke.
async fn agent_story(s: &Session, d: &TestDaemon, up: &Upstream) {
    let info = s.peer_info().expect("server info");
    let server = info.server_info.as_ref().expect("server implementation");
    assert_eq!(
        (server.name.as_str(), server.version.as_str()),
        ("till", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(tool_names(s).await, TOOLS);

    let services = structured(&call(s, "list_services", json!({})).await);
    assert!(services.to_string().contains("\"echo\""), "{services}");
    assert!(!services.to_string().contains(SECRET));

    let minted = structured(&call(s, "request_token", json!({"service": "echo", "allow": ["POST /v1/x/**"], "uses": 2, "purpose": "mcp test"})).await);
    let token = minted["token"].as_str().expect("token").to_owned();
    let id = minted["id"].as_str().expect("id").to_owned();
    assert_eq!(minted["activations"], 2);

    let hits = up.hits();
    let r = structured(&call(s, "call_api", json!({"token": token, "method": "POST", "path": "/v1/x/y", "query": {"a": "1 2"}, "body": {"hello": "world"}})).await);
    assert_eq!(r["status"], 200);
    assert_eq!(r["activations_remaining"], 1);
    let body = r["body"].as_str().expect("body");
    assert!(
        body.contains("hello") && body.contains("[redacted by till]"),
        "{body}"
    );
    assert_eq!(up.hits(), hits + 1);
    let seen = up.seen();
    let last = seen.last().expect("seen");
    assert_eq!(last.path_and_query, "/v1/x/y?a=1+2");
    assert_eq!(last.headers["content-type"], "application/json");
    assert_eq!(last.headers["authorization"], format!("Bearer {SECRET}"));

    let status = structured(&call(s, "token_status", json!({"token": token})).await);
    assert_eq!(
        (status["used"].as_u64(), status["remaining"].as_u64()),
        (Some(1), Some(1))
    );

    // Refusals: readable, actionable, nothing sent upstream.
    let hits = up.hits();
    let msg = refusal(
        &call(
            s,
            "call_api",
            json!({"token": token, "method": "GET", "path": "/v1/x/y"}),
        )
        .await,
    );
    assert!(
        msg.contains("outside this token's rules") && msg.contains("POST /v1/x/**"),
        "{msg}"
    );
    // A misnamed argument is refused, not ignored: `rules` for `allow` would otherwise mint the
    // service's whole ceiling.
    let live = d.all_tokens().await.len();
    let msg = refusal(
        &call(
            s,
            "request_token",
            json!({"service": "echo", "rules": ["GET /v1/x"]}),
        )
        .await,
    );
    assert!(
        msg.contains("unknown field `rules`") && msg.contains("allow"),
        "{msg}"
    );
    let now = d.all_tokens().await.len();
    assert_eq!(now, live, "nothing was minted");
    let msg = refusal(&call(s, "request_token", json!({"service": "nope"})).await);
    assert!(
        msg.contains("no service named") && msg.contains("list"),
        "{msg}"
    );
    let msg = refusal(
        &call(
            s,
            "request_token",
            json!({"service": "echo", "budget_tokens": 1000}),
        )
        .await,
    );
    assert!(msg.contains("llm_usage = true"), "{msg}");
    let msg = refusal(
        &call(
            s,
            "request_token",
            json!({"service": "other", "allow": ["DELETE /x"]}),
        )
        .await,
    );
    assert!(msg.contains("outside what service other allows"), "{msg}");
    let msg = refusal(
        &call(
            s,
            "call_api",
            json!({"token": "till_garbage", "method": "GET", "path": "/"}),
        )
        .await,
    );
    assert!(msg.contains("malformed token"), "{msg}");
    let msg = refusal(
        &call(
            s,
            "call_api",
            json!({"token": token, "method": "POST", "path": "/v1/x/../admin"}),
        )
        .await,
    );
    assert!(msg.contains(".."), "{msg}");

    let revoked = structured(&call(s, "revoke_token", json!({"id": id})).await);
    assert_eq!(revoked["revoked"][0]["state"], "revoked");
    let msg = refusal(
        &call(
            s,
            "call_api",
            json!({"token": token, "method": "POST", "path": "/v1/x/y"}),
        )
        .await,
    );
    assert!(msg.contains("revoked") && msg.contains("new one"), "{msg}");

    let one = structured(
        &call(
            s,
            "request_token",
            json!({"service": "echo", "allow": ["GET /v1/one"]}),
        )
        .await,
    );
    let t1 = one["token"].as_str().expect("token").to_owned();
    structured(
        &call(
            s,
            "call_api",
            json!({"token": t1, "method": "GET", "path": "/v1/one"}),
        )
        .await,
    );
    let msg = refusal(
        &call(
            s,
            "call_api",
            json!({"token": t1, "method": "GET", "path": "/v1/one"}),
        )
        .await,
    );
    assert!(
        msg.contains("all spent") && msg.contains("ask your user"),
        "{msg}"
    );
    assert_eq!(
        up.hits(),
        hits + 1,
        "only the one good call reached the upstream"
    );

    // A sub-agent's token, narrowed from one the agent holds, spends the parent's budget too.
    let parent = structured(
        &call(
            s,
            "request_token",
            json!({"service": "echo", "allow": ["GET /v1/p/**"], "uses": 3}),
        )
        .await,
    );
    let pt = parent["token"].as_str().expect("token").to_owned();
    let child = structured(
        &call(
            s,
            "request_token",
            json!({"service": "echo", "allow": ["GET /v1/p/c"], "uses": 1, "parent": pt}),
        )
        .await,
    );
    structured(
        &call(
            s,
            "call_api",
            json!({"token": child["token"], "method": "GET", "path": "/v1/p/c"}),
        )
        .await,
    );
    let status = structured(&call(s, "token_status", json!({"token": pt})).await);
    assert_eq!(
        status["used"], 1,
        "the child's call counted against the parent"
    );
    let msg = refusal(
        &call(
            s,
            "request_token",
            json!({"service": "echo", "allow": ["GET /v1/other"], "parent": pt}),
        )
        .await,
    );
    assert!(msg.contains("outside the parent token's rules"), "{msg}");

    // A one-shot call: exactly one activation of a fresh token scoped to exactly this request.
    let before: Vec<String> = d.all_tokens().await.into_iter().map(|t| t.id).collect();
    let r = structured(
        &call(
            s,
            "call_api",
            json!({"service": "echo", "method": "GET", "path": "/v1/once"}),
        )
        .await,
    );
    assert_eq!(r["activations_remaining"], 0);
    let after = d.all_tokens().await;
    let fresh: Vec<_> = after.iter().filter(|t| !before.contains(&t.id)).collect();
    assert_eq!(fresh.len(), 1);
    assert_eq!(
        (fresh[0].rules.clone(), fresh[0].uses, fresh[0].used),
        (vec!["GET /v1/once".to_string()], 1, 1)
    );
    assert_eq!(fresh[0].id, r["token_id"].as_str().expect("id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_through_till_mcp_on_stdio() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    let (s, relay_pid) = stdio_session_with(&d.socket, &[]).await;
    // `till mcp` handed the host's pipes to the daemon, which now reads and answers them itself.
    let stdin = fd_target(relay_pid, 0);
    assert!(stdin.starts_with("pipe:"), "{stdin}");
    assert!(
        holds(d.child.id(), &stdin),
        "the daemon serves the host's stdin directly"
    );
    agent_story(&s, &d, &up).await;
    s.cancel().await.expect("close");
    // The host went away: the daemon lets go of its pipes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while holds(d.child.id(), &stdin) {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon kept the host's pipe"
        );
        tokio::task::yield_now().await;
    }
    let audit = d.audit_text();
    assert!(
        audit.contains("\"client\":\"test-agent\""),
        "the trail names the MCP client"
    );
    assert!(!audit.contains(SECRET) && !d.log_text().contains(SECRET));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.dir.join("mcp.sock"))
            .expect("mcp.sock")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_till_mcp_ends_its_session_in_the_daemon() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    let (s, relay_pid) = stdio_session_with(&d.socket, &[]).await;
    let stdin = fd_target(relay_pid, 0);
    assert!(holds(d.child.id(), &stdin));
    // The host still holds its ends of the pipes; only `till mcp` dies.
    #[allow(unsafe_code)]
    // SAFETY: kill(2) with a pid and a signal number touches no memory.
    let rc = unsafe { libc::kill(relay_pid as i32, libc::SIGKILL) };
    assert_eq!(rc, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while holds(d.child.id(), &stdin) {
        assert!(
            std::time::Instant::now() < deadline,
            "the session outlived `till mcp`"
        );
        tokio::task::yield_now().await;
    }
    drop(s);
    // The daemon keeps serving new sessions.
    let s = stdio_session(&d.socket).await;
    assert_eq!(s.list_all_tools().await.expect("tools").len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_session_outlives_a_daemon_restart() {
    let up = Upstream::start(None).await;
    let mut d = TestDaemon::start(&up);
    let _tmp = d.keep_dir();
    let (s, relay_pid) = stdio_session_with(&d.socket, &[]).await;
    let s = std::sync::Arc::new(s);
    assert_eq!(tool_names(&s).await, TOOLS);

    // A call in flight when the daemon is told to stop is finished, not dropped: the upstream
    // holds its answer until the daemon is shutting down.
    let held = held_call(&s);
    up.wait_hits(1).await;
    till_tests::signal(&d.child, libc::SIGTERM);
    d.wait_log("shutting down: finishing requests in flight")
        .await;
    up.release();
    let answer = structured(&held.await.expect("held call"));
    assert_eq!(answer["status"], 200, "{answer}");
    assert!(
        answer.to_string().contains("data: second"),
        "the whole stream came back: {answer}"
    );
    assert!(d.child.wait().expect("wait tilld").success());

    // With no daemon running, the host's next request waits in its pipe...
    let waiting = tokio::spawn({
        let s = s.clone();
        async move { call(&s, "list_services", json!({})).await }
    });
    // ...and the next daemon answers it, serving the host's pipes itself again.
    let d2 = TestDaemon::start_in(&d.dir);
    let services = structured(&waiting.await.expect("waiting call"));
    assert!(services.to_string().contains("\"echo\""), "{services}");
    assert!(holds(d2.child.id(), &fd_target(relay_pid, 0)));
    let r = structured(
        &call(
            &s,
            "call_api",
            json!({"service": "echo", "method": "GET", "path": "/after-restart"}),
        )
        .await,
    );
    assert_eq!(r["status"], 200, "{r}");
    // The new daemon knows the client from the session's start.
    let audit = d2.audit_text();
    let line = audit
        .lines()
        .find(|l| l.contains("\"event\":\"activate\"") && l.contains("/after-restart"))
        .expect("the activation after the restart");
    assert!(line.contains("\"client\":\"test-agent\""), "{line}");
    assert!(!d2.log_text().contains(SECRET));
    close(s).await;
}

/// The session is served: `list_services` answers with the configured services.
async fn serves(s: &Session) {
    let services = structured(&call(s, "list_services", json!({})).await);
    assert!(services.to_string().contains("\"echo\""), "{services}");
}

/// Ends a session shared with calls that are done by now.
async fn close(s: std::sync::Arc<Session>) {
    std::sync::Arc::into_inner(s)
        .expect("no other holder")
        .cancel()
        .await
        .expect("close");
}

/// A `call_api` to the upstream's `/stream`, whose answer the upstream holds until
/// `Upstream::release`: a call in flight for as long as a test needs one.
fn held_call(s: &std::sync::Arc<Session>) -> tokio::task::JoinHandle<CallToolResult> {
    let s = s.clone();
    tokio::spawn(async move {
        call(
            &s,
            "call_api",
            json!({"service": "echo", "method": "GET", "path": "/stream"}),
        )
        .await
    })
}

/// Bytes waiting in a pipe, asked of its write end (`FIONREAD`).
fn unread_in_pipe(fd: &impl std::os::fd::AsRawFd) -> i32 {
    let mut n: libc::c_int = 0;
    #[allow(unsafe_code)]
    // SAFETY: FIONREAD writes one int through a pointer to a live local.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0, "FIONREAD");
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_a_stopping_daemon_read_and_did_not_serve_goes_to_the_next_one() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let up = Upstream::start(None).await;
    let mut d = TestDaemon::start(&up);
    let _tmp = d.keep_dir();
    // A host speaking raw JSON lines, so it can send half a message.
    let mut relay = tokio::process::Command::new(bin("till"))
        .arg("--socket")
        .arg(&d.socket)
        .arg("mcp")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn till mcp");
    let mut to_host = relay.stdin.take().expect("stdin");
    let mut from_host = tokio::io::BufReader::new(relay.stdout.take().expect("stdout")).lines();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "raw-host", "version": "1"}}});
    to_host
        .write_all(format!("{init}\n").as_bytes())
        .await
        .expect("write");
    let reply = from_host.next_line().await.expect("read").expect("a line");
    assert!(reply.contains("\"result\""), "{reply}");
    to_host
        .write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\n")
        .await
        .expect("write");
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "list_services", "arguments": {}}})
    .to_string();
    let (head, tail) = call.split_at(40);
    to_host.write_all(head.as_bytes()).await.expect("write");
    // The daemon takes the half line out of the pipe; it cannot serve it yet.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while unread_in_pipe(&to_host) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon read nothing"
        );
        tokio::task::yield_now().await;
    }
    assert!(d.terminate().success());
    assert!(
        d.log_text().contains("for the next daemon pending=40"),
        "the stopping daemon handed back the half line"
    );
    let d2 = TestDaemon::start_in(&d.dir);
    to_host
        .write_all(format!("{tail}\n").as_bytes())
        .await
        .expect("write");
    let reply: Value =
        serde_json::from_str(&from_host.next_line().await.expect("read").expect("a line"))
            .expect("json");
    assert_eq!(reply["id"], 2, "{reply}");
    assert_ne!(reply["result"]["isError"], true, "{reply}");
    assert!(reply["result"].to_string().contains("echo"), "{reply}");
    assert!(d2.log_text().contains("resuming an agent host's session"));
    drop(to_host);
    assert!(relay.wait().await.expect("till mcp").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn till_mcp_waiting_for_a_daemon_leaves_with_its_host() {
    use std::io::{BufRead, Write};
    let up = Upstream::start(None).await;
    let mut d = TestDaemon::start(&up);
    // A host as Node runs its servers: stdin and stdout one socket.
    let (host, server_end) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let stdin = std::os::fd::OwnedFd::from(server_end.try_clone().expect("clone"));
    let mut relay = std::process::Command::new(bin("till"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["mcp", "--wait", "10m"])
        .stdin(stdin)
        .stdout(std::os::fd::OwnedFd::from(server_end))
        .spawn()
        .expect("spawn till mcp");
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "node-host", "version": "1"}}});
    (&host)
        .write_all(format!("{init}\n").as_bytes())
        .expect("write");
    let mut reply = String::new();
    std::io::BufReader::new(&host)
        .read_line(&mut reply)
        .expect("read");
    assert!(reply.contains("\"result\""), "{reply}");
    d.kill9();
    // The host goes away while `till mcp` waits for a daemon: it does not wait out its 10 minutes.
    drop(host);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(s) = relay.try_wait().expect("wait") {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = relay.kill();
            break None;
        }
        tokio::task::yield_now().await;
    };
    assert!(status.expect("till mcp outlived its host").success());
}

/// As under systemd: the sockets outlive the daemon, so `till mcp` reaches the listener while no
/// daemon runs, and the next daemon takes the session from its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_session_outlives_a_restart_on_socket_activated_sockets() {
    let up = Upstream::start(None).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::write(
        dir.join("till.toml"),
        till_tests::standard_config(dir, &up.url(), ""),
    )
    .expect("config");
    let (_keep1, fd1) = till_tests::activation_socket(&dir.join("till.sock"));
    let (_keep2, fd2) = till_tests::activation_socket(&dir.join("mcp.sock"));
    let mut d = TestDaemon::start_activated(dir, &[fd1, fd2]);
    let s = stdio_session(&d.socket).await;
    structured(&call(&s, "list_services", json!({})).await);
    assert!(d.terminate().success());
    let d2 = TestDaemon::start_activated(dir, &[fd1, fd2]);
    serves(&s).await;
    assert!(d2.log_text().contains("resuming an agent host's session"));
    s.cancel().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_the_mcp_session_goes_on_and_without_a_daemon_it_says_why() {
    let up = Upstream::start(None).await;
    let mut d = TestDaemon::start(&up);
    let _tmp = d.keep_dir();
    let (s, _) = stdio_session_with(&d.socket, &["--wait", "2s"]).await;
    assert_eq!(tool_names(&s).await, TOOLS);
    d.kill9();
    let mut d2 = TestDaemon::start_in(&d.dir);
    structured(&call(&s, "list_services", json!({})).await);
    // Stopped for good: once the wait is over, every tool says what happened and what to do.
    assert!(d2.terminate().success());
    let msg = refusal(&call(&s, "list_services", json!({})).await);
    assert!(
        msg.contains("stopped during this session") && msg.contains("reconnect"),
        "{msg}"
    );
    s.cancel().await.expect("close");
}

/// A request the daemon was serving when it was killed is answered by `till mcp` at once, with
/// what happened: the host is not left waiting for its own timeout. The session then goes on with
/// the next daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_a_killed_daemon_was_serving_is_answered_with_what_happened() {
    let up = Upstream::start(None).await;
    let mut d = TestDaemon::start(&up);
    let _tmp = d.keep_dir();
    let s = std::sync::Arc::new(stdio_session(&d.socket).await);
    // The upstream holds this call's answer: it is in flight when the daemon dies.
    let held = held_call(&s);
    up.wait_hits(1).await;
    d.wait_log("open MCP requests reported to till mcp open=1")
        .await;
    d.kill9();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(20), held)
        .await
        .expect("answered at once, not left waiting")
        .expect("held call");
    let msg = refusal(&answer);
    assert!(
        msg.contains("stopped while serving this request") && msg.contains("token_status"),
        "{msg}"
    );
    let d2 = TestDaemon::start_in(&d.dir);
    serves(&s).await;
    assert!(!d2.log_text().contains(SECRET));
    close(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_through_till_mcp_relaying_bytes() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    let (s, relay_pid) = stdio_session_with(&d.socket, &["--relay"]).await;
    assert!(!holds(d.child.id(), &fd_target(relay_pid, 0)));
    agent_story(&s, &d, &up).await;
    s.cancel().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_through_streamable_http_mcp() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, "gateway = \"127.0.0.1:0\"");
    let g = d.gateway_url().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let transport = StreamableHttpClientTransport::from_uri(format!("{g}/mcp"));
    let s = agent()
        .serve(transport)
        .await
        .expect("initialize over HTTP");
    agent_story(&s, &d, &up).await;
    s.cancel().await.expect("close");
    let audit = d.audit_text();
    // The HTTP peer is identified from /proc/net/tcp: this test's own uid.
    let uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .expect("uid");
    assert!(
        audit.contains(&format!(
            "\"uid\":{uid},\"pid\":null,\"exe\":\"tcp 127.0.0.1:"
        )),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn till_mcp_answers_with_a_reason_when_the_daemon_is_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = stdio_session(&dir.path().join("none.sock")).await;
    let tools = s.list_all_tools().await.expect("tools");
    assert_eq!(tools.len(), 5);
    let msg = refusal(&call(&s, "list_services", json!({})).await);
    assert!(
        msg.contains("not running") && msg.contains("tilld"),
        "{msg}"
    );
    let msg = refusal(
        &call(
            &s,
            "call_api",
            json!({"service": "openai", "method": "GET", "path": "/v1/models"}),
        )
        .await,
    );
    assert!(msg.contains("start it"), "{msg}");
    s.cancel().await.expect("close");
}

/// An `initialize` POST to the gateway's `/mcp`, which opens a session.
fn initialize(h: &reqwest::Client, gateway: &str) -> reqwest::RequestBuilder {
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"}}});
    h.post(format!("{gateway}/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(init.to_string())
}

/// Any local process can open MCP sessions over HTTP, and each costs the daemon memory until it
/// has been idle for 5 minutes: past the cap a new one is refused with a reason, open ones keep
/// working, and closing one makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamable_http_mcp_sessions_are_capped() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, "gateway = \"127.0.0.1:0\"");
    let g = d.gateway_url().await;
    let h = till_tests::http();
    let open = || initialize(&h, &g).send();
    let mut ids = Vec::new();
    for _ in 0..512 {
        let resp = open().await.expect("initialize");
        assert_eq!(resp.status(), 200);
        ids.push(
            resp.headers()["mcp-session-id"]
                .to_str()
                .expect("id")
                .to_owned(),
        );
    }
    let refused = open().await.expect("initialize");
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.expect("JSON-RPC error");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("512 MCP sessions are open"), "{message}");

    // An open session still works.
    let ping = h
        .post(format!("{g}/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &ids[0])
        .body(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string())
        .send()
        .await
        .expect("notify");
    assert_eq!(ping.status(), 202);

    // Closing one makes room for one.
    let closed = h
        .delete(format!("{g}/mcp"))
        .header("mcp-session-id", &ids[1])
        .send()
        .await
        .expect("delete");
    // 204: the Python MCP SDK takes only 200 or 204 as a closed session (rmcp says 202).
    assert_eq!(closed.status(), 204);
    assert_eq!(open().await.expect("initialize").status(), 200);
    assert_eq!(open().await.expect("initialize").status(), 503);
}

/// The gateway's `/mcp` needs no token: the peer's uid is its identity, and a browser on this
/// machine runs as that uid. So a request a web page makes (it carries the page's `Origin`) is
/// refused unless the page is on this machine, as the MCP spec asks of servers; agent hosts send
/// no `Origin` and are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_pages_of_other_sites_cannot_use_streamable_http_mcp() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, "gateway = \"127.0.0.1:0\"");
    let g = d.gateway_url().await;
    let h = till_tests::http();
    let open = |origin: Option<&str>| {
        let mut req = initialize(&h, &g);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        req.send()
    };
    for origin in ["https://evil.example", "http://evil.example:8719", "null"] {
        let resp = open(Some(origin)).await.expect("send");
        assert_eq!(resp.status(), 403, "{origin}");
    }
    for origin in [
        None,
        Some("http://localhost:3000"),
        Some("http://127.0.0.1:5173"),
    ] {
        let resp = open(origin).await.expect("send");
        assert_eq!(resp.status(), 200, "{origin:?}");
    }
}

/// Every agent-host config shipped in `examples/agents/`, used as the host would: a stdio entry's
/// command (`till`, or Claude Desktop's full path) is launched with its args and `TILL_SOCKET` in
/// its env, as the README there says for a socket off the default; an HTTP entry's URL is reached
/// (its port being this daemon's gateway's). Each serves the five tools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_agent_host_configs_serve_the_tools() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, "gateway = \"127.0.0.1:0\"");
    let g = d.gateway_url().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agents");
    let mut served = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("examples/agents") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let config: Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("JSON");
        let till = &config["mcpServers"]["till"];
        let s = if let Some(url) = till["url"].as_str() {
            assert_eq!(till["type"], "http", "{}", path.display());
            let url = url.replace("http://127.0.0.1:8719", &g);
            agent()
                .serve(StreamableHttpClientTransport::from_uri(url))
                .await
                .expect("initialize over HTTP")
        } else {
            let command = till["command"].as_str().expect("command");
            assert!(command == "till" || command.ends_with("/till"), "{command}");
            let args: Vec<String> = till["args"]
                .as_array()
                .expect("args")
                .iter()
                .map(|a| a.as_str().expect("arg").to_owned())
                .collect();
            let cmd = tokio::process::Command::new(bin("till")).configure(|c| {
                c.args(&args).env("TILL_SOCKET", &d.socket);
            });
            agent()
                .serve(TokioChildProcess::new(cmd).expect("spawn"))
                .await
                .expect("initialize through the host's command")
        };
        assert_eq!(tool_names(&s).await, TOOLS, "{}", path.display());
        s.cancel().await.expect("close");
        served.push(path.file_name().expect("name").to_owned());
    }
    assert_eq!(served.len(), 4, "{served:?}");
}
