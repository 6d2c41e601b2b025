//! `tilld --dev`: the try-it-now mode, as `vault server -dev` is for Vault. A temporary state dir,
//! the gateway on, and a built-in `echo` service — a small upstream inside the daemon, on loopback,
//! that answers with what it received — holding a generated dummy key, so a newcomer can mint, call,
//! and watch the key being injected and scrubbed without owning a real key. Nothing here runs
//! unless `--dev` is given.

use std::convert::Infallible;
use std::path::Path;

use anyhow::{Context, Result};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// Serves the echo upstream on `listener` (bound to 127.0.0.1 by the caller), on the runtime.
pub fn serve_echo(listener: std::net::TcpListener) -> Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(echo(req).await)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

async fn echo(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
            )
        })
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let reply = serde_json::json!({
        "echo": "this is tilld --dev's built-in upstream; it shows what it received",
        "method": method,
        "path": target,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    let mut resp = Response::new(Full::new(Bytes::from(
        serde_json::to_string_pretty(&reply).unwrap_or_default() + "\n",
    )));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Writes the dev config (and a generated dummy key) into `dir` and returns its path.
pub fn write_config(dir: &Path, echo: std::net::SocketAddr) -> Result<std::path::PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut raw = [0u8; 24];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let key = format!(
        "sk-dev-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    );
    let key_path = dir.join("echo.key");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)?;
    writeln!(f, "{key}")?;
    let d = dir.display();
    let text = format!(
        r#"# Written by tilld --dev; removed when it stops.
[daemon]
socket = "{d}/till.sock"
state_dir = "{d}/state"
gateway = "127.0.0.1:0"

[services.echo]
base_url = "http://{echo}"
secret = {{ file = "{d}/echo.key" }}
allow = ["* /**"]
max_uses = 100
"#
    );
    let path = dir.join("till.toml");
    std::fs::write(&path, text).context("cannot write the dev config")?;
    Ok(path)
}

/// What a newcomer should type next.
pub fn banner(dir: &Path, gateway: Option<std::net::SocketAddr>) -> String {
    let g = gateway.map(|g| g.to_string()).unwrap_or_default();
    format!(
        r#"
tilld is running in dev mode: a temporary state in {d}, a built-in `echo` service holding a
generated dummy key, and the HTTP gateway on http://{g}. Everything is removed when it stops.

In another terminal:

    export TILL_SOCKET={d}/till.sock

    # 1. One request through Till: the echo upstream shows the key it received, Till scrubs it.
    till call echo POST /hello -d '{{"hi": "till"}}'

    # 2. A token with 2 activations, spent through the gateway as an SDK would.
    TOKEN=$(till mint echo --allow 'GET /**' --uses 2)
    curl -s http://{g}/proxy/echo/models -H "Authorization: Bearer $TOKEN"

    # 3. What happened, in the tamper-evident trail.
    till audit
"#,
        d = dir.display()
    )
}
