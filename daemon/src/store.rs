//! Durable state: every token's record (claims, activations used, revocation) in redb, with a
//! journal in front of it.
//!
//! Why redb: pure Rust (no C build), one fdatasync per commit like SQLite in WAL/FULL mode with the
//! same latency here, and an exclusive file lock that stops two daemons sharing a state dir. Why a
//! journal: a redb commit writes several scattered pages before its sync; a journal record is one
//! in-place write (see `journal.rs`). Every batch is one journal record, synced if the batch must
//! be durable; its waiters are answered, and then it is written to redb without a sync (redb is
//! only read at start). Every 250 ms while anything changed, at a clean shutdown, and when the
//! journal is full, a checkpoint makes redb durable and notes the last journal record it includes;
//! at open, the records after it are replayed.
//!
//! The committer is a thread that owns the database and the journal. Jobs go into one queue; the
//! committer takes everything waiting and writes it as one record (group commit): under 16
//! concurrent activations that is one fsync for up to 16 of them. A job with an `ack` needs
//! durability (an activation, a revocation): it wakes the committer, and its record is synced. A
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

use crate::journal::{self, Journal};

const TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tokens");
/// `journal_seq`: the last journal record the latest durable commit includes.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const JOURNAL_SEQ: &str = "journal_seq";

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
        let after = tx.open_table(META)?.get(JOURNAL_SEQ)?.map(|v| v.value());
        tx.commit()?;
        // Replay what the journal holds beyond redb's last checkpoint, and checkpoint it.
        let jpath = dir.join("till.journal");
        let (mut journal, replay) = Journal::open(&jpath, after.unwrap_or(0))
            .with_context(|| format!("cannot open the store's journal {}", jpath.display()))?;
        if !replay.is_empty() {
            tracing::info!(
                records = replay.len(),
                "replaying the store's journal after an unclean stop"
            );
        }
        let entries: Vec<Job> = replay
            .into_iter()
            .flat_map(|(_, entries)| entries)
            .map(|e| Job {
                key: e.key,
                value: e.value,
                ack: None,
            })
            .collect();
        checkpoint(&db, &mut journal, &entries)?;
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
            .spawn(move || committer(db, journal, &committer_shared))?;
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

/// How often redb is checkpointed while anything changed. A checkpoint writes every page changed
/// since the last one and syncs; doing it often keeps each one short (a few ms under load, not
/// the tens of ms that a journal's worth of changes takes), and the batch that finds the journal
/// full pays for one only if a checkpoint has not come first.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

fn committer(db: Database, mut journal: Journal, shared: &Shared) {
    let mut last_checkpoint = std::time::Instant::now();
    let mut changed = false;
    // False once a batch the journal holds could not be written to redb: no checkpoint may then
    // claim to include it (it stays in the journal, for the replay at the next start).
    let mut whole = true;
    loop {
        let (mut batch, closed) = {
            let mut q = shared.lock();
            while q.jobs.is_empty() && !q.closed {
                if !changed {
                    q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                let due = CHECKPOINT_EVERY.saturating_sub(last_checkpoint.elapsed());
                if due.is_zero() {
                    break;
                }
                q = shared
                    .wake
                    .wait_timeout(q, due)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if !q.jobs.is_empty() && q.jobs.iter().all(|j| j.ack.is_none()) && !q.closed {
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
            let durable = batch.iter().any(|j| j.ack.is_some());
            let result = write_batch(&db, &mut journal, &batch, durable, whole).map_err(|e| {
                tracing::error!(error = %format!("{e:#}"), "store commit failed");
                "the daemon could not record this durably".to_string()
            });
            for job in &mut batch {
                if let Some(ack) = job.ack.take() {
                    let _ = ack.send(result.clone().map(|_| ()));
                }
            }
            // The waiters have their answer; redb catches up after (it is read only at start,
            // and the journal holds the batch until a checkpoint does).
            if result == Ok(false) {
                if let Err(e) = apply_lazily(&db, &batch) {
                    tracing::error!(error = %format!("{e:#}"), "store write failed");
                    whole = false;
                }
                changed = true;
            }
        }
        // The last checkpoint, at a clean shutdown, leaves redb whole and nothing to replay.
        if whole && (closed || (changed && last_checkpoint.elapsed() >= CHECKPOINT_EVERY)) {
            match checkpoint(&db, &mut journal, &[]) {
                Ok(()) => changed = false,
                Err(e) => tracing::error!(error = %format!("{e:#}"), "store checkpoint failed"),
            }
            last_checkpoint = std::time::Instant::now();
        }
        if closed && shared.lock().jobs.is_empty() {
            return;
        }
    }
}

/// Makes one batch durable: one journal record, synced if `durable`; `Ok(false)` means redb has
/// yet to be written. A batch that does not fit in what is left of the journal is a checkpoint
/// instead (`Ok(true)`), which only a `whole` store may take.
fn write_batch(
    db: &Database,
    journal: &mut Journal,
    batch: &[Job],
    durable: bool,
    whole: bool,
) -> Result<bool> {
    let payload = journal::encode(batch.iter().map(|j| (&j.key, j.value.as_deref())));
    if !journal.fits(&payload) {
        anyhow::ensure!(
            whole,
            "the journal is full and an earlier write to redb failed"
        );
        checkpoint(db, journal, batch)?;
        return Ok(true);
    }
    journal
        .append(&payload, durable)
        .context("cannot write the store's journal")?;
    Ok(false)
}

/// Writes a batch to redb without a sync.
fn apply_lazily(db: &Database, batch: &[Job]) -> Result<()> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::None)?;
    apply(&tx, batch)?;
    tx.commit()?;
    Ok(())
}

/// A durable redb commit of `batch` that also notes the last journal record it includes (all of
/// them: each batch is written to redb before the next is taken); the journal then starts again
/// from its beginning.
fn checkpoint(db: &Database, journal: &mut Journal, batch: &[Job]) -> Result<()> {
    let tx = db.begin_write()?;
    apply(&tx, batch)?;
    tx.open_table(META)?
        .insert(JOURNAL_SEQ, journal.last_seq())?;
    tx.commit()?;
    journal.rewind();
    Ok(())
}

fn apply(tx: &redb::WriteTransaction, batch: &[Job]) -> Result<()> {
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
    Ok(())
}
