//! `call_api` through `till mcp` (an rmcp client on stdio, as an agent host launches it) against the
//! same call through the native socket, interleaved in one run, against a local upstream. Also
//! `till mcp --relay` (the byte relay the hand-off replaced) and rmcp straight on mcp.sock.
//! Run with `scripts/bench` (release binaries).

use std::time::{Duration, Instant};

use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use serde_json::json;
use till_protocol::{CallRequest, MintRequest};
use till_tests::{Upstream, bin};

const N: usize = 2000;

fn p50(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e6
}

fn main() {
    till_tests::run_bench(bench);
}

async fn bench(up: Upstream) {
    let (_tmp, d) = till_tests::bench_daemon(&up);
    let mut native = d.client().await;
    let token = native
        .mint(MintRequest {
            service: "echo".into(),
            allow: vec!["GET /bench".into()],
            uses: Some(100_000_000),
            ttl_secs: Some(3600),
            ..MintRequest::default()
        })
        .await
        .expect("mint")
        .token;
    let till_mcp = async |extra: &[&str]| {
        let cmd = tokio::process::Command::new(bin("till")).configure(|c| {
            c.arg("--socket").arg(&d.socket).arg("mcp").args(extra);
        });
        ().serve(TokioChildProcess::new(cmd).expect("spawn"))
            .await
            .expect("initialize")
    };
    let mcp = till_mcp(&[]).await;
    let relayed = till_mcp(&["--relay"]).await;
    // The same MCP client straight on mcp.sock, with no `till mcp`: what rmcp itself costs.
    let direct = ()
        .serve(
            tokio::net::UnixStream::connect(d.dir.join("mcp.sock"))
                .await
                .expect("mcp.sock"),
        )
        .await
        .expect("initialize");
    let args = json!({"token": token, "method": "GET", "path": "/bench"})
        .as_object()
        .expect("object")
        .clone();
    let call = CallRequest {
        token: Some(token.clone()),
        method: "GET".into(),
        path: "/bench".into(),
        ..CallRequest::default()
    };
    let sessions = [&mcp, &relayed, &direct];
    for _ in 0..200 {
        native.call(call.clone()).await.expect("warm");
        for s in sessions {
            s.call_tool(CallToolRequestParams::new("call_api").with_arguments(args.clone()))
                .await
                .expect("warm");
        }
    }
    let mut socket_s = Vec::with_capacity(N);
    let mut mcp_s: [Vec<Duration>; 3] = Default::default();
    for _ in 0..N {
        let t = Instant::now();
        native.call(call.clone()).await.expect("call");
        socket_s.push(t.elapsed());
        for (s, samples) in sessions.iter().zip(mcp_s.iter_mut()) {
            let t = Instant::now();
            let r = s
                .call_tool(CallToolRequestParams::new("call_api").with_arguments(args.clone()))
                .await
                .expect("call_api");
            samples.push(t.elapsed());
            assert_ne!(r.is_error, Some(true));
        }
    }
    let s = p50(socket_s);
    let [m, r, dm] = mcp_s.map(p50);
    println!("call through the native socket, c=1                 p50 {s:>8.1} µs");
    println!(
        "call_api through till mcp (stdio handed over), c=1   p50 {m:>8.1} µs  added {:>6.1} µs",
        m - s
    );
    println!(
        "call_api through till mcp --relay, c=1               p50 {r:>8.1} µs  added {:>6.1} µs",
        r - s
    );
    println!(
        "call_api straight on mcp.sock (rmcp only), c=1       p50 {dm:>8.1} µs  added {:>6.1} µs",
        dm - s
    );
    mcp.cancel().await.expect("close");
    relayed.cancel().await.expect("close");
}
