//! Malformed input on the native socket: each gets a clear error, and the daemon keeps serving.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::Value;
use till_tests::{TestDaemon, Upstream};

fn frame(json: &[u8]) -> Vec<u8> {
    let mut out = (json.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(json);
    out
}

fn read_reply(s: &mut UnixStream) -> Value {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("reply length");
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).expect("reply body");
    serde_json::from_slice(&buf).expect("reply is JSON")
}

fn connect(d: &TestDaemon) -> UnixStream {
    let s = UnixStream::connect(&d.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s
}

fn hello(s: &mut UnixStream) {
    s.write_all(&frame(
        br#"{"type":"hello","protocol_version":1,"client":"raw test"}"#,
    ))
    .expect("write hello");
    assert_eq!(read_reply(s)["type"], "hello");
}

fn assert_error(v: &Value, code: &str, contains: &str) {
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["code"], code, "{v}");
    let msg = v["message"].as_str().expect("message");
    assert!(
        msg.contains(contains),
        "{msg:?} should mention {contains:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_clear_errors_and_the_daemon_keeps_serving() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    // A well-behaved client stays connected throughout.
    let mut bystander = d.client().await;

    // Garbage JSON after a good hello: an error, and the same connection still works.
    let mut s = connect(&d);
    hello(&mut s);
    s.write_all(&frame(b"\x00\xffnot json at all"))
        .expect("write");
    assert_error(&read_reply(&mut s), "bad_frame", "not a valid request");
    s.write_all(&frame(br#"{"type":"launch_missiles"}"#))
        .expect("write");
    assert_error(&read_reply(&mut s), "bad_frame", "unknown variant");
    s.write_all(&frame(br#"{"type":"status"}"#)).expect("write");
    assert_eq!(read_reply(&mut s)["type"], "status");

    // Not a hello first.
    let mut s = connect(&d);
    s.write_all(&frame(br#"{"type":"status"}"#)).expect("write");
    assert_error(
        &read_reply(&mut s),
        "bad_request",
        "first message must be hello",
    );

    // A wrong protocol version says what to upgrade.
    let mut s = connect(&d);
    s.write_all(&frame(
        br#"{"type":"hello","protocol_version":999,"client":"future"}"#,
    ))
    .expect("write");
    assert_error(
        &read_reply(&mut s),
        "version_mismatch",
        "upgrade the daemon",
    );

    // A frame over the limit: refused from its length prefix, before anything is allocated.
    let mut s = connect(&d);
    hello(&mut s);
    s.write_all(&(u32::MAX).to_be_bytes()).expect("write");
    assert_error(&read_reply(&mut s), "bad_frame", "larger than the limit");

    // A truncated frame: the length says 100, 10 bytes come, then the writer closes.
    let mut s = connect(&d);
    hello(&mut s);
    s.write_all(&100u32.to_be_bytes()).expect("write");
    s.write_all(b"{\"type\":\"s").expect("write");
    s.shutdown(Shutdown::Write).expect("shutdown");
    assert_error(&read_reply(&mut s), "bad_frame", "truncated");

    // Random bytes as the very first frame.
    let mut s = connect(&d);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let v = read_reply(&mut s);
    assert_eq!(v["type"], "error");

    bystander
        .status()
        .await
        .expect("the bystander is still served");
    let fresh = d
        .client()
        .await
        .status()
        .await
        .expect("new connections are served");
    assert_eq!(fresh.version, env!("CARGO_PKG_VERSION"));
}

/// A stopping daemon tells an idle connection why it closes: a request already on its way then
/// reads as not served, and a client checking its idle connection sees it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_daemon_says_so_on_idle_connections() {
    let up = Upstream::start(None).await;
    let mut d = TestDaemon::start(&up);
    let mut s = connect(&d);
    hello(&mut s);
    assert!(d.terminate().success());
    assert_error(&read_reply(&mut s), "shutting_down", "was not served");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("then the end");
    assert!(rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_it_waits_logs_once_and_recovers() {
    let up = Upstream::start(None).await;
    // About 30 connections' worth of descriptors beyond what the daemon itself holds.
    let d = TestDaemon::start_with_fd_limit(&up, 48, 48);
    let held: Vec<UnixStream> = (0..60)
        .map(|_| UnixStream::connect(&d.socket).expect("connect"))
        .collect();
    d.wait_log("accept failed").await;
    // The connections it took are still served meanwhile: one says hello.
    let mut first = held.into_iter();
    let mut s = first.next().expect("a connection");
    s.write_all(&frame(
        br#"{"type":"hello","protocol_version":1,"client":"t"}"#,
    ))
    .expect("hello");
    assert_eq!(read_reply(&mut s)["type"], "hello");
    drop(s);
    drop(first);
    d.wait_log("accepting connections again").await;
    let mut c = d.client().await;
    c.status().await.expect("status after recovery");
    // One line when an episode starts and one when it ends, however many tries it took. (As the
    // connections close one by one, the daemon may recover and run out again: a new episode.)
    let log = d.log_text();
    let (failed, recovered) = (
        log.matches("accept failed").count(),
        log.matches("accepting connections again").count(),
    );
    assert!(
        failed >= 1 && failed == recovered,
        "one line per episode and per recovery, not one per try:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_limit_on_open_files_is_raised_to_the_hard_one() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_with_fd_limit(&up, 256, 4096);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.child.id())).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("the open files line");
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers, ["4096", "4096"], "{line}");
}

/// Names a caller sends are quoted clipped, in refusals and in the trail: a peer cannot write
/// megabytes into the audit trail (or flush its history out through rotation) with one request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_name_cannot_bloat_the_trail_or_the_refusal() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    let mut c = d.client().await;
    let huge = "s".repeat(1 << 20);
    let before = d.audit_text().len();

    let call = till_protocol::CallRequest {
        service: Some(huge.clone()),
        method: "GET".into(),
        path: "/x".into(),
        ..Default::default()
    };
    let mint = till_protocol::MintRequest {
        service: huge.clone(),
        ..Default::default()
    };
    let header = till_protocol::CallRequest {
        service: Some("echo".into()),
        method: "GET".into(),
        path: "/x".into(),
        headers: vec![(format!("bad header {huge}"), "v".into())],
        ..Default::default()
    };
    let refusals = [
        c.call(call).await.map(|_| ()),
        c.mint(mint).await.map(|_| ()),
        c.call(header).await.map(|_| ()),
    ];
    for r in refusals {
        let Err(till_client::ClientError::Refused { message, .. }) = r else {
            panic!("expected a refusal, got {r:?}");
        };
        assert!(message.len() < 1024, "{} bytes", message.len());
        assert!(
            message.contains(" bytes]"),
            "the name is clipped: {message}"
        );
    }
    let trail = d.audit_text();
    let grown = &trail[before..];
    assert_eq!(
        grown.lines().filter(|l| l.contains("\"deny\"")).count(),
        3,
        "{grown}"
    );
    assert!(
        grown.len() < 16 * 1024,
        "the trail grew by {} bytes",
        grown.len()
    );
    assert!(d.till(&["audit", "verify"]).status.success());
}

/// One uid holds at most `socket_max_connections` connections to the native and MCP sockets
/// together; past that each socket answers with a refusal that says why (an error frame, a
/// JSON-RPC error), the open ones keep working, and one that closes makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_uid_to_the_sockets_are_capped() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, "socket_max_connections = 3");
    let mut held: Vec<UnixStream> = (0..3).map(|_| connect(&d)).collect();
    for s in &mut held {
        hello(s);
    }
    // The native socket: what the CLI shows.
    let out = d.till(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already holds 3 connections") && err.contains("socket_max_connections"),
        "{err}"
    );
    // A raw client gets the error frame in place of its hello.
    let mut fourth = connect(&d);
    fourth
        .write_all(&frame(
            br#"{"type":"hello","protocol_version":1,"client":"raw test"}"#,
        ))
        .expect("write hello");
    assert_error(
        &read_reply(&mut fourth),
        "too_many_connections",
        "socket_max_connections",
    );
    // The MCP socket counts toward the same cap: a JSON-RPC error, then the close.
    let mut mcp = UnixStream::connect(d.dir.join("mcp.sock")).expect("connect mcp");
    mcp.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    mcp.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"initialize\",\"params\":{}}\n")
        .expect("write");
    let mut answer = String::new();
    mcp.read_to_string(&mut answer).expect("read to the close");
    let v: Value = serde_json::from_str(answer.trim()).expect("one JSON-RPC line");
    assert_eq!(v["error"]["code"], -32000, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("socket_max_connections")),
        "{v}"
    );
    // The open ones still work.
    held[0]
        .write_all(&frame(br#"{"type":"status"}"#))
        .expect("write");
    assert_eq!(read_reply(&mut held[0])["type"], "status");
    // One closes; then a new one is let in (once the daemon has seen the close).
    held.pop().expect("held").shutdown(Shutdown::Both).ok();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = d.till(&["status"]);
        if out.status.success() {
            break;
        }
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("socket_max_connections"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no room after a connection closed"
        );
    }
}
