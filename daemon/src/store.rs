//! Durable state: every token's record (claims, activations used, revocation) in redb.
//!
//! Why redb: pure Rust (no C build), one fdatasync per commit like SQLite in WAL/FULL mode with the
//! same latency here, and an exclusive file lock that stops two daemons sharing a state dir.
//!
//! The committer is a thread that owns the database. Jobs go into one queue; the committer takes
//! everything waiting and writes it in one transaction (group commit): under 16 concurrent
//! activations that is one fsync for up to 16 of them. A job with an `ack` needs durability (an
//! activation, a revocation): it wakes the committer, and its batch is committed `Immediate`. A
//! mint does not wake anyone (a thread wake-up costs more than the mint itself on a small VM); it
//! rides along with the next durable batch, or the committer's idle tick writes it without fsync.
//! Jobs are queued while the broker holds its state lock, so the queue's order is the order of the
//! changes and a later snapshot of a record always lands after an earlier one.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

const TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tokens");

/// What the daemon remembers about a token. Never the token string, never a secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: [u8; 16],
    pub key_id: String,
    pub service: String,
    pub rules: Vec<String>,
    pub uses: u32,
    pub used: u32,
    pub issued_at: u64,
    pub expires_at: Option<u64>,
    pub parent: Option<[u8; 16]>,
    pub holder_uid: Option<u32>,
    pub minted_by_uid: Option<u32>,
    pub note: Option<String>,
    pub revoked_at: Option<u64>,
    /// When the last activation was taken (for how long a spent token's final state is kept).
    #[serde(default)]
    pub last_used_at: Option<u64>,
    /// A tripwire: presenting it raises the `canary` alert.
    #[serde(default)]
    pub canary: bool,
}

struct Job {
    key: [u8; 16],
    /// The record's new bytes; `None` removes it (a swept token).
    value: Option<Vec<u8>>,
    ack: Option<oneshot::Sender<Result<(), String>>>,
}

struct Queue {
    jobs: Vec<Job>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Closes the queue when the last `Store` handle is dropped, so the committer flushes and exits.
struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_one();
    }
}

#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    _closer: Arc<Closer>,
}

/// Waits for a durable write; dropping it does not cancel the write.
pub struct Durable(oneshot::Receiver<Result<(), String>>);

impl Durable {
    pub async fn wait(self) -> Result<(), String> {
        self.0
            .await
            .unwrap_or_else(|_| Err("the store's committer has stopped".into()))
    }
}

impl Store {
    /// Opens (or creates) the database and returns every stored record. The returned handle must be
    /// joined after the last `Store` clone is dropped, so the final batch is flushed.
    pub fn open(dir: &Path) -> Result<(Store, Vec<TokenRecord>, JoinHandle<()>)> {
        let path = dir.join("till.redb");
        let db = Database::create(&path).with_context(|| {
            format!(
                "cannot open the store {} (is another tilld using this state_dir?)",
                path.display()
            )
        })?;
        let tx = db.begin_write()?;
        tx.open_table(TOKENS)?;
        tx.commit()?;
        let mut records = Vec::new();
        {
            let read = db.begin_read()?;
            let table = read.open_table(TOKENS)?;
            for entry in table.iter()? {
                let (_, v) = entry?;
                match serde_json::from_slice::<TokenRecord>(v.value()) {
                    Ok(r) => records.push(r),
                    Err(e) => tracing::error!(error = %e, "skipping an unreadable token record"),
                }
            }
        }
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: Vec::new(),
                closed: false,
            }),
            wake: Condvar::new(),
        });
        let committer_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("till-store".into())
            .spawn(move || committer(db, &committer_shared))?;
        Ok((
            Store {
                _closer: Arc::new(Closer(shared.clone())),
                shared,
            },
            records,
            handle,
        ))
    }

    fn push(&self, record: &TokenRecord, ack: Option<oneshot::Sender<Result<(), String>>>) {
        self.push_job(
            record.id,
            Some(serde_json::to_vec(record).unwrap_or_default()),
            ack,
        );
    }

    /// Queues the removal of swept records (written with the next batch, like a mint).
    pub fn remove(&self, ids: &[[u8; 16]]) {
        for id in ids {
            self.push_job(*id, None, None);
        }
    }

    fn push_job(
        &self,
        key: [u8; 16],
        value: Option<Vec<u8>>,
        ack: Option<oneshot::Sender<Result<(), String>>>,
    ) {
        let durable = ack.is_some();
        let mut q = self.shared.lock();
        let was_empty = q.jobs.is_empty();
        q.jobs.push(Job { key, value, ack });
        drop(q);
        // A durable job wakes the committer now; the first lazy job starts its idle tick.
        if durable || was_empty {
            self.shared.wake.notify_one();
        }
    }

    /// Queues a write without waiting (mints): it is written with the next durable batch, or after
    /// the committer's idle tick, whichever comes first.
    pub fn put(&self, record: &TokenRecord) {
        self.push(record, None);
    }

    /// Queues a write that must be durable; await the result before acting on it.
    pub fn put_durable(&self, record: &TokenRecord) -> Durable {
        let (ack, rx) = oneshot::channel();
        self.push(record, Some(ack));
        Durable(rx)
    }
}

/// How often an idle committer writes queued mints that no durable write has carried along.
const IDLE_TICK: Duration = Duration::from_millis(50);

fn committer(db: Database, shared: &Shared) {
    loop {
        let (batch, closed) = {
            let mut q = shared.lock();
            while q.jobs.is_empty() && !q.closed {
                q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if q.jobs.iter().all(|j| j.ack.is_none()) && !q.closed {
                // Only mints: gather them for a tick, unless a durable job cuts the wait short.
                q = shared
                    .wake
                    .wait_timeout(q, IDLE_TICK)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            (std::mem::take(&mut q.jobs), q.closed)
        };
        if !batch.is_empty() {
            // The last batch is always durable, so a clean shutdown leaves every mint on disk.
            let durable = closed || batch.iter().any(|j| j.ack.is_some());
            let result = write_batch(&db, &batch, durable).map_err(|e| {
                tracing::error!(error = %e, "store commit failed");
                "the daemon could not record this durably".to_string()
            });
            for job in batch {
                if let Some(ack) = job.ack {
                    let _ = ack.send(result.clone());
                }
            }
        }
        if closed && shared.lock().jobs.is_empty() {
            return;
        }
    }
}

fn write_batch(db: &Database, batch: &[Job], durable: bool) -> Result<()> {
    let mut tx = db.begin_write()?;
    if !durable {
        tx.set_durability(Durability::None)?;
    }
    {
        let mut table = tx.open_table(TOKENS)?;
        for job in batch {
            match &job.value {
                Some(v) => {
                    table.insert(job.key.as_slice(), v.as_slice())?;
                }
                None => {
                    table.remove(job.key.as_slice())?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(())
}
