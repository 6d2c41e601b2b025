//! Socket benchmarks against a real `tilld` (release build) and a local upstream on 127.0.0.1.
//! Prints medians and throughput next to baselines measured in the same run:
//! - mint vs. a `status` round trip (the socket's floor);
//! - call (a durable activation + the upstream request) vs. the same request sent directly.
//!
//! Run with `scripts/bench` (it builds the release binaries first).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use till_protocol::{CallRequest, MintRequest};
use till_tests::{Client, TestDaemon, Upstream};

const N: usize = 3000;
const CONCURRENCY: usize = 16;
const PER_TASK: usize = 1500;

fn pct(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p) as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn report(name: &str, samples: &mut [Duration]) -> Duration {
    let p50 = pct(samples, 0.5);
    let p99 = pct(samples, 0.99);
    println!(
        "{name:<44} p50 {:>8.1} µs   p99 {:>8.1} µs",
        us(p50),
        us(p99)
    );
    p50
}

/// A minimal keep-alive HTTP/1.1 GET, so the direct baseline pays no client-library overhead.
fn direct_get(conn: &mut BufReader<TcpStream>, path: &str) {
    // One write per request: piecewise writes would meet Nagle and delayed ACKs.
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-direct\r\n\r\n"
    );
    conn.get_mut().write_all(req.as_bytes()).expect("write");
    let mut len = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        conn.read_line(&mut line).expect("read");
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().expect("length");
        }
    }
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).expect("body");
}

async fn big_token(d: &TestDaemon) -> String {
    let mut c = d.client().await;
    c.mint(MintRequest {
        service: "echo".into(),
        allow: vec!["GET /bench".into()],
        uses: Some(100_000_000),
        ttl_secs: Some(3600),
        ..MintRequest::default()
    })
    .await
    .expect("mint")
    .token
}

fn call(token: &str) -> CallRequest {
    CallRequest {
        token: Some(token.to_owned()),
        method: "GET".into(),
        path: "/bench".into(),
        ..CallRequest::default()
    }
}

async fn throughput<F, Fut>(label: &str, f: F) -> f64
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY).map(|_| tokio::spawn(f())).collect();
    for t in tasks {
        t.await.expect("task");
    }
    let rate = (CONCURRENCY * PER_TASK) as f64 / start.elapsed().as_secs_f64();
    println!("{label:<44} {rate:>10.0} /s   (concurrency {CONCURRENCY})");
    rate
}

/// One small pwrite + fdatasync in the state dir's filesystem: the floor under any durable commit.
fn fsync_floor(dir: &std::path::Path) -> Duration {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(dir.join("floor")).expect("floor");
    let mut samples: Vec<Duration> = (0..N / 2)
        .map(|i| {
            let t = Instant::now();
            f.write_at(&[i as u8; 4096], 0).expect("pwrite");
            f.sync_data().expect("fdatasync");
            t.elapsed()
        })
        .collect();
    pct(&mut samples, 0.5)
}

fn main() {
    till_tests::run_bench(bench);
}

async fn bench(up: Upstream) {
    let (tmp, d) = till_tests::bench_daemon(&up);
    println!(
        "tilld {} (release), upstream {}, {N} samples per line\n",
        env!("CARGO_PKG_VERSION"),
        up.url()
    );

    // --- mint, concurrency 1, against the socket's floor ---
    let mut c = d.client().await;
    for _ in 0..200 {
        c.status().await.expect("warm");
    }
    let mut floor = Vec::with_capacity(N);
    for _ in 0..N {
        let t = Instant::now();
        c.status().await.expect("status");
        floor.push(t.elapsed());
    }
    let floor_p50 = report("socket round trip (status), c=1", &mut floor);
    let mut mints = Vec::with_capacity(N);
    let req = MintRequest {
        service: "echo".into(),
        allow: vec!["GET /bench".into()],
        uses: Some(1),
        ..MintRequest::default()
    };
    for _ in 0..N {
        let t = Instant::now();
        c.mint(req.clone()).await.expect("mint");
        mints.push(t.elapsed());
    }
    let mint_p50 = report("mint, c=1", &mut mints);
    println!(
        "{:<44} {:>8.1} µs over the round trip",
        "  mint's own cost (p50 difference)",
        us(mint_p50) - us(floor_p50)
    );

    let socket = d.socket.clone();
    let mint_rate = throughput("mint", || {
        let socket = socket.clone();
        let req = req.clone();
        async move {
            let mut c = Client::connect(&socket).await.expect("connect");
            for _ in 0..PER_TASK {
                c.mint(req.clone()).await.expect("mint");
            }
        }
    })
    .await;

    // --- call with a durable activation, against the same request sent directly ---
    println!();
    let token = big_token(&d).await;
    let mut direct = BufReader::new(TcpStream::connect(up.addr).expect("connect upstream"));
    direct.get_ref().set_nodelay(true).expect("nodelay");
    for _ in 0..200 {
        direct_get(&mut direct, "/bench");
        c.call(call(&token)).await.expect("warm call");
    }
    // Interleave the two so machine noise hits both alike.
    let mut direct_s = Vec::with_capacity(N);
    let mut till_s = Vec::with_capacity(N);
    for _ in 0..N {
        let t = Instant::now();
        direct_get(&mut direct, "/bench");
        direct_s.push(t.elapsed());
        let t = Instant::now();
        c.call(call(&token)).await.expect("call");
        till_s.push(t.elapsed());
    }
    let direct_p50 = report("upstream directly, c=1", &mut direct_s);
    let till_p50 = report("call through tilld (durable activation), c=1", &mut till_s);
    println!(
        "{:<44} {:>8.1} µs",
        "  added by Till (p50 difference)",
        us(till_p50) - us(direct_p50)
    );

    let addr = up.addr;
    let direct_rate = throughput("upstream directly", move || async move {
        tokio::task::spawn_blocking(move || {
            let mut conn = BufReader::new(TcpStream::connect(addr).expect("connect"));
            conn.get_ref().set_nodelay(true).expect("nodelay");
            for _ in 0..PER_TASK {
                direct_get(&mut conn, "/bench");
            }
        })
        .await
        .expect("direct");
    })
    .await;
    let socket = d.socket.clone();
    let call_rate = throughput("call through tilld (one shared token)", || {
        let socket = socket.clone();
        let token = token.clone();
        async move {
            let mut c = Client::connect(&socket).await.expect("connect");
            for _ in 0..PER_TASK {
                c.call(call(&token)).await.expect("call");
            }
        }
    })
    .await;
    let floor = fsync_floor(tmp.path());
    println!(
        "{:<44} p50 {:>8.1} µs",
        "pwrite 4 KiB + fdatasync (the commit floor)",
        us(floor)
    );
    println!(
        "\nsummary: mint p50 {:.1} µs, {mint_rate:.0} mints/s; call adds {:.1} µs p50 ({:.1} µs above the fsync floor), \
         {call_rate:.0} calls/s ({:.0}% of direct {direct_rate:.0}/s)",
        us(mint_p50),
        us(till_p50) - us(direct_p50),
        us(till_p50) - us(direct_p50) - us(floor),
        100.0 * call_rate / direct_rate
    );
    drop(d);
}
