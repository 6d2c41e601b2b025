//! The store's durable commit against the device's floor (one small pwrite + fdatasync), in the
//! same run: what one activation's commit costs at concurrency 1, and how group commit scales.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use tilld::store::{Store, TokenRecord};

const N: usize = 2000;

fn p50(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e6
}

fn record(i: u32) -> TokenRecord {
    TokenRecord {
        id: [7; 16],
        key_id: "0011223344556677".into(),
        service: "openai".into(),
        rules: vec!["POST /v1/chat/completions".into()],
        uses: 1_000_000,
        used: i,
        issued_at: 1_700_000_000,
        expires_at: Some(1_700_003_600),
        parent: None,
        holder_uid: Some(1000),
        minted_by_uid: Some(1000),
        note: None,
        revoked_at: None,
        last_used_at: None,
        canary: false,
        budget: None,
        budget_used: 0,
        budget_lost: false,
        revocation_unsaved: false,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = std::fs::File::create(dir.path().join("floor")).expect("floor");
    let mut floor = Vec::with_capacity(N);
    for i in 0..N {
        let t = Instant::now();
        f.write_at(&[i as u8; 4096], 0).expect("pwrite");
        f.sync_data().expect("fdatasync");
        floor.push(t.elapsed());
    }
    let (store, _, _thread) = Store::open(dir.path()).expect("store");
    let fl = p50(floor);
    println!("pwrite 4 KiB + fdatasync (floor)            p50 {fl:>7.1} µs");
    for (label, preload) in [("empty store", 0u32), ("30,000 tokens", 30_000)] {
        for i in 0..preload {
            let mut r = record(0);
            r.id[..4].copy_from_slice(&i.to_be_bytes());
            r.id[4] = 0xee;
            store.put(&r);
        }
        let mut commits = Vec::with_capacity(N);
        for i in 0..N {
            let t = Instant::now();
            store
                .put_durable(&record(i as u32))
                .wait()
                .await
                .expect("commit");
            commits.push(t.elapsed());
        }
        let co = p50(commits);
        println!(
            "store durable commit, c=1, {label:<14}  p50 {co:>7.1} µs  ({:.2}x the floor)",
            co / fl
        );
    }

    for conc in [16usize] {
        let start = Instant::now();
        let tasks: Vec<_> = (0..conc)
            .map(|t| {
                let s = store.clone();
                tokio::spawn(async move {
                    for i in 0..N / 4 {
                        let mut r = record(i as u32);
                        r.id = [t as u8; 16];
                        s.put_durable(&r).wait().await.expect("commit");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        let rate = (conc * N / 4) as f64 / start.elapsed().as_secs_f64();
        println!("store durable commits, c={conc:<3}      {rate:>8.0} /s (group commit)");
    }
    std::io::stdout().flush().ok();
}
