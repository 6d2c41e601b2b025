//! A baseline for `scripts/bench-gateway`, not a product: the least a tokio/hyper proxy can do.
//! It swaps in the key and forwards, with nothing of Till (no token check, no durable
//! activation, no audit, no scrubbing), so its figures say what the HTTP stack alone costs on this
//! machine and how much of the gateway's time is Till's own work.
//!
//! Usage: `bare_proxy MODE LISTEN UPSTREAM KEY`, MODE one of
//! - `reqwest`: one shared `reqwest::Client` (pooled connections), as Till's gateway uses;
//! - `legacy`: one shared `hyper_util` client, the pool under reqwest without reqwest's layers;
//! - `conn`: one upstream connection per downstream connection (hyper's client connection), the
//!   cheapest HTTP/1 shape there is.
//!
//! Both buffer the (small) answer and reply with it. Runs until killed.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Reply = Response<Full<Bytes>>;

fn bad_gateway(e: impl std::fmt::Display) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(format!("upstream failed: {e}\n"))));
    *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
    r
}

async fn connect(upstream: &str) -> Result<SendRequest<Full<Bytes>>, Box<dyn std::error::Error>> {
    let up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, listen, upstream, key] = args.as_slice() else {
        eprintln!("usage: bare_proxy reqwest|legacy|conn LISTEN UPSTREAM KEY");
        std::process::exit(2);
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let auth: Arc<str> = format!("Bearer {key}").into();
    let upstream: Arc<str> = upstream.as_str().into();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_nodelay(true);
    let legacy = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Full<Bytes>>(http);
    let listener = TcpListener::bind(listen.as_str()).await.expect("bind");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (mode, client, auth, upstream, legacy) = (
            mode.clone(),
            client.clone(),
            auth.clone(),
            upstream.clone(),
            legacy.clone(),
        );
        tokio::spawn(async move {
            let io = TokioIo::new(stream);
            let server = hyper::server::conn::http1::Builder::new();
            if mode == "legacy" {
                let legacy = legacy.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (legacy, auth, upstream) = (legacy.clone(), auth.clone(), upstream.clone());
                    async move {
                        let out = Request::get(format!("http://{upstream}{}", req.uri().path()))
                            .header("authorization", &*auth)
                            .body(Full::new(Bytes::new()))
                            .expect("request");
                        Ok::<_, Infallible>(match legacy.request(out).await {
                            Ok(r) => match r.into_body().collect().await {
                                Ok(b) => Response::new(Full::new(b.to_bytes())),
                                Err(e) => bad_gateway(e),
                            },
                            Err(e) => bad_gateway(e),
                        })
                    }
                });
                let _ = server.serve_connection(io, svc).await;
            } else if mode == "reqwest" {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (client, auth, upstream) = (client.clone(), auth.clone(), upstream.clone());
                    async move {
                        let url = format!("http://{upstream}{}", req.uri().path());
                        let sent = client.get(url).header("authorization", &*auth).send();
                        Ok::<_, Infallible>(match sent.await {
                            Ok(r) => match r.bytes().await {
                                Ok(b) => Response::new(Full::new(b)),
                                Err(e) => bad_gateway(e),
                            },
                            Err(e) => bad_gateway(e),
                        })
                    }
                });
                let _ = server.serve_connection(io, svc).await;
            } else {
                // This connection's own upstream connection, opened on first use and again after
                // the upstream closes it.
                let sender: Arc<Mutex<Option<SendRequest<Full<Bytes>>>>> = Arc::default();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (sender, auth, upstream) = (sender.clone(), auth.clone(), upstream.clone());
                    async move {
                        let out = Request::get(req.uri().path())
                            .header("host", &*upstream)
                            .header("authorization", &*auth)
                            .body(Full::new(Bytes::new()))
                            .expect("request");
                        let mut slot = sender.lock().await;
                        if slot.as_ref().is_none_or(|s| s.is_closed()) {
                            match connect(&upstream).await {
                                Ok(s) => *slot = Some(s),
                                Err(e) => return Ok::<_, Infallible>(bad_gateway(e)),
                            }
                        }
                        let Some(s) = slot.as_mut() else {
                            return Ok(bad_gateway("no connection"));
                        };
                        Ok(match s.send_request(out).await {
                            Ok(r) => match r.into_body().collect().await {
                                Ok(b) => Response::new(Full::new(b.to_bytes())),
                                Err(e) => bad_gateway(e),
                            },
                            Err(e) => bad_gateway(e),
                        })
                    }
                });
                let _ = server.serve_connection(io, svc).await;
            }
        });
    }
}
