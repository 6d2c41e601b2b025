//! A million short-lived tokens: minted, spent and dead, through a daemon whose retention is one
//! second. Prints the store's size and the tokens held as the run goes; bounded means the figures
//! level off instead of growing with every token ever minted. `CHURN_N` sets the count.
//! Run with `scripts/bench` (release binaries).

use std::time::Instant;

use till_protocol::CallRequest;
use till_tests::{Client, Upstream, standard_config};

const CONCURRENCY: usize = 16;

fn main() {
    till_tests::run_bench(bench);
}

async fn bench(up: Upstream) {
    let total: usize = std::env::var("CHURN_N")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        tmp.path().join("till.toml"),
        standard_config(tmp.path(), &up.url(), "retention = \"1s\""),
    )
    .expect("config");
    let d = till_tests::TestDaemon::start_in(tmp.path());
    let store = tmp.path().join("state/till.redb");
    println!(
        "{total} one-shot tokens (each minted, spent once, then dead), concurrency {CONCURRENCY}, retention 1 s\n"
    );
    println!(
        "{:>10}  {:>12}  {:>14}  {:>10}",
        "tokens", "store MiB", "tokens held", "tokens/s"
    );
    let start = Instant::now();
    let step = total / 10;
    let mut done = 0;
    while done < total {
        let tasks: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let socket = d.socket.clone();
                tokio::spawn(async move {
                    let mut c = Client::connect(&socket).await.expect("connect");
                    for _ in 0..step / CONCURRENCY {
                        c.call(CallRequest {
                            service: Some("echo".into()),
                            method: "GET".into(),
                            path: "/churn".into(),
                            ..CallRequest::default()
                        })
                        .await
                        .expect("one-shot call");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        done += step / CONCURRENCY * CONCURRENCY;
        let held = d.client().await.tokens(true).await.expect("tokens").count;
        let size =
            std::fs::metadata(&store).map(|m| m.len()).unwrap_or(0) as f64 / (1024.0 * 1024.0);
        println!(
            "{done:>10}  {size:>12.1}  {held:>14}  {:>10.0}",
            done as f64 / start.elapsed().as_secs_f64()
        );
    }
}
