//! `call_api` through `till mcp` (an rmcp client on stdio → the relay → mcp.sock → tilld) against the
//! same call through the native socket, interleaved in one run, against a local upstream.
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
    let cmd = tokio::process::Command::new(bin("till")).configure(|c| {
        c.arg("--socket").arg(&d.socket).arg("mcp");
    });
    let mcp = ().serve(TokioChildProcess::new(cmd).expect("spawn")).await.expect("initialize");
    // The same MCP client straight on mcp.sock, without the relay: what rmcp itself costs.
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
    for _ in 0..200 {
        native.call(call.clone()).await.expect("warm");
        mcp.call_tool(CallToolRequestParams::new("call_api").with_arguments(args.clone()))
            .await
            .expect("warm");
        direct
            .call_tool(CallToolRequestParams::new("call_api").with_arguments(args.clone()))
            .await
            .expect("warm");
    }
    let (mut socket_s, mut mcp_s, mut direct_s) = (
        Vec::with_capacity(N),
        Vec::with_capacity(N),
        Vec::with_capacity(N),
    );
    for _ in 0..N {
        let t = Instant::now();
        native.call(call.clone()).await.expect("call");
        socket_s.push(t.elapsed());
        let t = Instant::now();
        let r = mcp
            .call_tool(CallToolRequestParams::new("call_api").with_arguments(args.clone()))
            .await
            .expect("call_api");
        mcp_s.push(t.elapsed());
        assert_ne!(r.is_error, Some(true));
        let t = Instant::now();
        direct
            .call_tool(CallToolRequestParams::new("call_api").with_arguments(args.clone()))
            .await
            .expect("call_api");
        direct_s.push(t.elapsed());
    }
    let (s, m, dm) = (p50(socket_s), p50(mcp_s), p50(direct_s));
    println!("call through the native socket, c=1          p50 {s:>8.1} µs");
    println!("call_api through till mcp (stdio relay), c=1  p50 {m:>8.1} µs");
    println!(
        "  added by the MCP path (p50 difference)          {:>8.1} µs",
        m - s
    );
    println!(
        "call_api straight on mcp.sock (no relay), c=1 p50 {dm:>8.1} µs  (rmcp's own share: {:.1} µs)",
        dm - s
    );
    mcp.cancel().await.expect("close");
}
