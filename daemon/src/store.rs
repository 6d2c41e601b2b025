//! Durable state: every token's record (claims, activations used, revocation) in redb, with two
//! journals in front of it.
//!
//! Why redb: pure Rust (no C build), and an exclusive file lock that stops two daemons sharing a
//! state dir. Why journals: a redb commit writes several scattered pages before its sync; a journal
//! record is one in-place write (see `journal.rs`), the write-ahead log every database keeps.
//!
//! Two threads. The committer (`till-store`) takes every job waiting in the queue and writes them as
//! one journal record (group commit: under 16 concurrent activations, one fsync for up to 16 of
//! them). A job with an `ack` needs durability (an activation, a revocation), and its record is
//! synced (the sync also carries every record before it). An activation that is the only call in
//! flight writes the queue itself, on its own thread, when nobody else is writing: no wake-up of
//! the committer and no answer handed back across threads (see `Durable::wait_or_lead`). Otherwise
//! its waiter wakes the committer. A mint does not wake
//! anyone (a thread wake-up costs more than the mint itself on a small VM); it rides along with the
//! next durable batch, or the committer's idle tick writes it without a sync. The committer also
//! keeps the latest value of each record written since the last checkpoint, and hands them over
//! with each request for a checkpoint to the checkpointer (`till-checkpoint`, the thread that owns
//! redb), which writes them in one durable commit that also notes the last journal record it
//! includes (one message per checkpoint, not per write: a thread wake-up per write costs more than
//! the write).
//!
//! The committer writes one journal while the other waits to be checkpointed: every 250 ms (if
//! anything was written), or once the journal is half full, it asks for a checkpoint of everything
//! so far and switches to the other journal, if that one's checkpoint is done (else it goes on in
//! this one; a full journal waits for it). So a checkpoint never holds up a durable write. At open,
//! the intact records of both journals numbered after redb's checkpoint are replayed, in order;
//! one that cannot be (a journal damaged while the daemon was stopped) is reported, not replayed.
//!
//! Jobs are queued while the broker holds its state lock, so the queue's order is the order of the
//! changes and a later snapshot of a record always lands after an earlier one.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::journal::{self, Journal};

const TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tokens");
const JOURNALS: [&str; 2] = ["till.journal.a", "till.journal.b"];
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
    /// The most LLM tokens its answers may use together (the `budget` claim).
    #[serde(default)]
    pub budget: Option<u64>,
    /// LLM tokens its answers (and those of tokens narrowed from it) have used.
    #[serde(default)]
    pub budget_used: u64,
    /// An answer's usage could not be read, so the budget can no longer be kept: spent.
    #[serde(default)]
    pub budget_lost: bool,
    /// Revoked in memory (and refused from then on), but its durable write failed: revoking it
    /// again writes it again. Never stored.
    #[serde(skip)]
    pub revocation_unsaved: bool,
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
    /// When the journal being written was switched to, if it holds any record yet (`None`: it
    /// holds none). A copy of the writer's state, for the committer's timed wait.
    unswitched_since: Option<Instant>,
}

/// Why the store's writes fail, shared by the committer and the checkpointer.
type Failure = Arc<tokio::sync::watch::Sender<Option<String>>>;

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// The journals' side. Lock order: `writer`, then `queue`; never the other way.
    writer: Mutex<Writer>,
    /// Durable writes queued and not yet waited for to the end.
    waiting: std::sync::atomic::AtomicUsize,
    /// Why the last write failed, and when; `None` once a write succeeds again. A watch, so
    /// the daemon can alert when it starts failing (set from the committer's thread).
    failure: Failure,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes everything queued and writes it; acks the waiters. Called with the writer held.
    fn write_queued(&self, w: &mut Writer) {
        let mut batch = std::mem::take(&mut self.lock().jobs);
        if batch.is_empty() {
            return;
        }
        let durable = batch.iter().any(|j| j.ack.is_some());
        let acks: Vec<_> = batch.iter_mut().filter_map(|j| j.ack.take()).collect();
        let entries: Vec<_> = batch.into_iter().map(|j| (j.key, j.value)).collect();
        let result = w.write(entries, durable).map_err(|e| {
            tracing::error!(error = %format!("{e:#}"), "store commit failed");
            self.failure.send_replace(Some(format!(
                "{e:#} (since {})",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            )));
            "the daemon could not record this durably (see `till status`)".to_string()
        });
        // After a failed checkpoint the store is failing until a restart, whatever writes
        // still fit in a journal.
        if result.is_ok() && self.failure.borrow().is_some() && !w.checkpointer.failed() {
            self.failure.send_replace(None);
        }
        for ack in acks {
            let _ = ack.send(result.clone());
        }
        self.mirror(w);
    }

    /// Copies the writer's state for the committer. When the journal gets its first record, the
    /// committer is woken to start the timed wait for the next switch: a write led by its waiter
    /// does not otherwise wake it, and without this a daemon whose writes were all led would
    /// only switch (and checkpoint) when a journal filled up.
    fn mirror(&self, w: &Writer) {
        let since = (!w.journals[w.active].is_empty()).then_some(w.last_switch);
        let mut q = self.lock();
        let started = q.unswitched_since.is_none() && since.is_some();
        q.unswitched_since = since;
        drop(q);
        if started {
            self.wake.notify_one();
        }
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
    /// What the journals lost while the daemon was stopped (a damaged file), found at open.
    damage: Option<Arc<str>>,
}

/// Waits for a durable write; dropping it does not cancel the write (the committer writes it).
#[must_use = "await it before acting on the write (dropped, the committer still writes it)"]
pub struct Durable {
    rx: Option<oneshot::Receiver<Result<(), String>>>,
    shared: Arc<Shared>,
}

impl Durable {
    /// Waits for the committer to write it.
    pub async fn wait(self) -> Result<(), String> {
        self.wait_or_lead(false).await
    }

    /// With `alone` (the caller is the only request in flight) and no other durable write
    /// waiting, writes everything queued (this write included) on this thread: no thread is
    /// woken and no answer handed across threads, which on a small VM costs a third as much as
    /// the sync itself. It blocks this thread for the sync, which is why it is only done when
    /// nothing else could want the thread; under load the committer writes (group commit).
    pub async fn wait_or_lead(mut self, alone: bool) -> Result<(), String> {
        let rx = self.rx.take();
        let led = alone
            && self
                .shared
                .waiting
                .load(std::sync::atomic::Ordering::Relaxed)
                == 1
            && match self.shared.writer.try_lock() {
                Ok(mut w) => {
                    self.shared.write_queued(&mut w);
                    true
                }
                Err(_) => false,
            };
        if !led {
            self.shared.wake.notify_one();
        }
        match rx {
            Some(rx) => rx
                .await
                .unwrap_or_else(|_| Err("the store's committer has stopped".into())),
            None => Err("the store's committer has stopped".into()),
        }
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        self.shared
            .waiting
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if self.rx.is_some() {
            self.shared.wake.notify_one();
        }
    }
}

impl Store {
    /// Opens (or creates) the database and returns every stored record. The returned handle must be
    /// joined after the last `Store` clone is dropped, so the final batch is flushed.
    pub fn open(dir: &Path) -> Result<(Store, Vec<TokenRecord>, JoinHandle<()>)> {
        let path = dir.join("till.redb");
        let db = Database::create(&path).map_err(|e| open_failed(&path, e))?;
        let shown = path.display();
        let after = (|| -> Result<u64> {
            let tx = db.begin_write()?;
            tx.open_table(TOKENS)?;
            let after = tx
                .open_table(META)?
                .get(JOURNAL_SEQ)?
                .map(|v| v.value())
                .unwrap_or(0);
            tx.commit()?;
            Ok(after)
        })()
        .with_context(|| format!("cannot write the store {shown}"))?;
        // Replay what the journals hold beyond redb's last checkpoint, in order and without a
        // gap, and checkpoint it; both journals are then free.
        let mut journals = Vec::new();
        let mut found = Vec::new();
        // Intact records past the checkpoint that cannot be replayed: after a gap, or after a
        // record that is not intact. Only a damaged file leaves them.
        let mut stranded = Vec::new();
        for name in JOURNALS {
            let jpath = dir.join(name);
            let (j, opened) = Journal::open(&jpath)
                .with_context(|| format!("cannot open the store's journal {}", jpath.display()))?;
            journals.push(j);
            found.extend(opened.records.into_iter().filter(|(seq, _)| *seq > after));
            stranded.extend(opened.later.into_iter().filter(|seq| *seq > after));
        }
        found.sort_by_key(|(seq, _)| *seq);
        let mut last = after;
        let mut pending = Pending::default();
        for (seq, entries) in found {
            if seq != last + 1 {
                stranded.push(seq);
                continue;
            }
            last = seq;
            pending.add(entries.into_iter().map(|e| (e.key, e.value)));
        }
        let newest = stranded.iter().copied().max();
        let damage = newest.map(|newest| {
            format!(
                "the store's journals were damaged (or cut short by a power failure) while tilld \
                 was stopped: {} record(s) written after record {last} could not be replayed \
                 (the newest is record {newest}). Activation counts and revocations made in the \
                 moments before the stop may be lost, so a token could be spent again or a \
                 revoked one used; `till revoke --all` if that matters",
                stranded.len(),
            )
        });
        // New records are numbered past every stranded one, which may still be in a journal:
        // a later replay must never take an old record for a new one.
        let next_seq = newest.unwrap_or(last).max(last) + 1;
        if last > after {
            tracing::info!(
                records = last - after,
                "replaying the store's journal after an unclean stop"
            );
        }
        // Noting the stranded records as done: the next replay starts after them.
        pending.checkpoint(&db, next_seq - 1).with_context(|| {
            format!("cannot write what the journals hold into the store {shown}")
        })?;
        tracing::debug!(seq = next_seq - 1, "store checkpoint written");
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
        let failure: Failure = Arc::new(tokio::sync::watch::Sender::new(None));
        let checkpointer = Checkpointer::start(db, failure.clone())?;
        let [a, b]: [Journal; 2] = journals
            .try_into()
            .map_err(|_| anyhow::anyhow!("two journals"))?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: Vec::new(),
                closed: false,
                unswitched_since: None,
            }),
            wake: Condvar::new(),
            writer: Mutex::new(Writer {
                journals: [a, b],
                active: 0,
                next_seq,
                checkpointer,
                last_switch: Instant::now(),
                pending: Pending::default(),
            }),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            failure,
        });
        let committer_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("till-store".into())
            .spawn(move || committer(&committer_shared))?;
        Ok((
            Store {
                _closer: Arc::new(Closer(shared.clone())),
                shared,
                damage: damage.map(Arc::from),
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
        let lazy = ack.is_none();
        let mut q = self.shared.lock();
        let was_empty = q.jobs.is_empty();
        q.jobs.push(Job { key, value, ack });
        drop(q);
        // The first lazy job starts the committer's idle tick. A durable job is led by its waiter
        // (see `Durable::wait`), which wakes the committer only if it cannot write itself.
        if lazy && was_empty {
            self.shared.wake.notify_one();
        }
    }

    /// What the journals lost while the daemon was stopped, if they were found damaged at open:
    /// said in `till status` until the next start, and raised as the `store_damaged` alert.
    pub fn damage(&self) -> Option<&str> {
        self.damage.as_deref()
    }

    /// Why the store's last write failed, while no write has succeeded since.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.borrow().clone()
    }

    /// [`Store::failure`] said for `till status` and the alert.
    pub fn warning(failure: &str) -> String {
        format!(
            "the store cannot write: {failure}. Activations, revocations and mints are refused \
             until it can; if the disk is full, free space and restart tilld"
        )
    }

    /// [`Store::failure`] as it changes.
    pub fn watch_failure(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.shared.failure.subscribe()
    }

    /// Queues a write without waiting (mints): it is written with the next durable batch, or after
    /// the committer's idle tick, whichever comes first.
    pub fn put(&self, record: &TokenRecord) {
        self.push(record, None);
    }

    /// Queues a write that must be durable; await the result before acting on it.
    pub fn put_durable(&self, record: &TokenRecord) -> Durable {
        let (ack, rx) = oneshot::channel();
        self.shared
            .waiting
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.push(record, Some(ack));
        Durable {
            rx: Some(rx),
            shared: self.shared.clone(),
        }
    }
}

/// Why the store could not be opened, and what to do: the hint depends on the cause (another
/// daemon holding the lock, a damaged file, the disk).
fn open_failed(path: &Path, e: redb::DatabaseError) -> anyhow::Error {
    use redb::{DatabaseError, StorageError};
    let shown = path.display();
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            anyhow::anyhow!("cannot open the store {shown}: another tilld is using this state_dir")
        }
        DatabaseError::Storage(StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::InvalidData =>
        {
            damaged(path, &io.to_string())
        }
        DatabaseError::Storage(StorageError::Corrupted(why)) => damaged(path, &why),
        DatabaseError::Storage(StorageError::Io(io)) => {
            anyhow::anyhow!("cannot read the store {shown}: {io}")
        }
        other => anyhow::anyhow!("cannot open the store {shown}: {other}"),
    }
}

/// A store file that is not what tilld wrote, and what to do about it.
fn damaged(path: &Path, why: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "the store {} is damaged ({why}). To start over, move till.redb and till.journal.* out of \
         the state_dir: every token minted so far will then be refused as unknown (agents mint new \
         ones), and the signing key and the audit trail stay. Restoring them from a backup instead \
         would bring back older activation counts: tokens spent since could be spent again",
        path.display()
    )
}

/// How often an idle committer writes queued mints that no durable write has carried along.
const IDLE_TICK: Duration = Duration::from_millis(50);

/// How often a checkpoint is asked for while anything was written. Often, so each is short and a
/// journal is soon free again.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// How soon to try switching journals again when the other one's checkpoint is not done.
const RETRY_SWITCH: Duration = Duration::from_millis(10);

/// The committer thread: writes what no waiter led (batches queued while another was being
/// written, durable writes nobody waits for), lazy mints after an idle tick, the periodic journal
/// switches, and the last batch.
fn committer(shared: &Shared) {
    loop {
        let closed = {
            let mut q = shared.lock();
            while q.jobs.is_empty() && !q.closed {
                let Some(since) = q.unswitched_since else {
                    q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                    continue;
                };
                let due = CHECKPOINT_EVERY.saturating_sub(since.elapsed());
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
            q.closed
        };
        let mut w = shared.writer.lock().unwrap_or_else(|e| e.into_inner());
        shared.write_queued(&mut w);
        if closed {
            // The last checkpoint, at a clean shutdown, leaves redb whole and nothing to replay.
            // No job can come after: the queue closes when the last `Store` handle is gone, and
            // a `Durable` holds no handle.
            if let Err(e) = w.journals[w.active].sync() {
                tracing::error!(error = %e, "cannot sync the store's journal");
            }
            w.hand_over();
            w.checkpointer.send(Work::Finish(w.next_seq - 1));
            w.checkpointer.join();
            return;
        }
        let half = !w.journals[w.active].under_half();
        if !w.journals[w.active].is_empty()
            && (half || w.last_switch.elapsed() >= CHECKPOINT_EVERY)
            && let Err(e) = w.switch(false)
        {
            tracing::error!(error = %format!("{e:#}"), "cannot switch the store's journal");
        }
        shared.mirror(&w);
    }
}

/// The committer's side of the journals.
struct Writer {
    journals: [Journal; 2],
    active: usize,
    next_seq: u64,
    checkpointer: Checkpointer,
    last_switch: Instant,
    /// The latest value of each record written since the last checkpoint was asked for.
    pending: Pending,
}

impl Writer {
    /// Makes one batch durable (a journal record, synced if `durable`; or, for a batch too large
    /// for a journal, a checkpoint that includes it) and hands it to the checkpointer.
    fn write(&mut self, entries: Vec<([u8; 16], Option<Vec<u8>>)>, durable: bool) -> Result<()> {
        let payload = journal::encode(entries.iter().map(|(k, v)| (k, v.as_deref())));
        if !journal::fits_empty(&payload) {
            // Straight to redb (a revocation of very many tokens): what the journal holds is
            // synced first, then one checkpoint includes this batch, and it is waited for.
            self.journals[self.active].sync()?;
            self.pending.add(entries.into_iter());
            self.hand_over();
            self.checkpointer.ask(self.next_seq - 1, self.active);
            anyhow::ensure!(
                self.checkpointer.is_free(self.active, true),
                "redb could not be checkpointed (see the error before this one)"
            );
            self.journals[self.active].rewind();
            return Ok(());
        }
        if !self.journals[self.active].fits(&payload) {
            // The other journal must be free first: wait for its checkpoint if need be.
            self.switch(true)?;
        }
        self.journals[self.active]
            .append(self.next_seq, &payload, durable)
            .context("cannot write the store's journal")?;
        self.next_seq += 1;
        // Kept here until the next checkpoint: handing each batch over would wake the
        // checkpointer's thread once per write.
        self.pending.add(entries.into_iter());
        Ok(())
    }

    /// Gives what was written since the last checkpoint to the checkpointer.
    fn hand_over(&mut self) {
        let batch = std::mem::take(&mut self.pending);
        self.checkpointer.send(Work::Batch(batch));
    }

    /// Asks for a checkpoint of everything written so far and moves to the other journal, if its
    /// own checkpoint is done; else stays (or, with `must`, waits for it).
    fn switch(&mut self, must: bool) -> Result<()> {
        let other = 1 - self.active;
        if !self.checkpointer.is_free(other, must) {
            anyhow::ensure!(
                !must,
                "the store's journals are full and redb could not be checkpointed (see the error \
                 before this one)"
            );
            // Try again shortly (its checkpoint is still being written), not at once.
            let now = Instant::now();
            self.last_switch = now
                .checked_sub(CHECKPOINT_EVERY - RETRY_SWITCH)
                .unwrap_or(now);
            return Ok(());
        }
        // Records written without a sync must be on disk before any record goes to the other
        // journal: otherwise a crash could lose them while keeping later ones, and the replay,
        // which stops at the first gap, would then drop acknowledged writes.
        self.journals[self.active].sync()?;
        self.hand_over();
        self.checkpointer.ask(self.next_seq - 1, self.active);
        self.journals[other].rewind();
        self.active = other;
        self.last_switch = Instant::now();
        Ok(())
    }
}

/// The latest value of each record changed since the last checkpoint.
#[derive(Default)]
struct Pending(std::collections::HashMap<[u8; 16], Option<Vec<u8>>>);

impl Pending {
    fn add(&mut self, entries: impl Iterator<Item = ([u8; 16], Option<Vec<u8>>)>) {
        self.0.extend(entries);
    }

    /// One durable redb commit of every pending record, noting `seq` as the last journal record
    /// it includes.
    fn checkpoint(&mut self, db: &Database, seq: u64) -> Result<()> {
        let tx = db.begin_write()?;
        {
            let mut table = tx.open_table(TOKENS)?;
            for (key, value) in &self.0 {
                match value {
                    Some(v) => {
                        table.insert(key.as_slice(), v.as_slice())?;
                    }
                    None => {
                        table.remove(key.as_slice())?;
                    }
                }
            }
        }
        tx.open_table(META)?.insert(JOURNAL_SEQ, seq)?;
        tx.commit()?;
        self.0.clear();
        Ok(())
    }
}

enum Work {
    /// What was written since the last checkpoint, for the next one.
    Batch(Pending),
    /// Checkpoint through this record; then the journal with this index is free.
    Checkpoint(u64, usize),
    /// The last checkpoint; then stop.
    Finish(u64),
}

struct Free {
    journals: [bool; 2],
    failed: bool,
}

/// The thread that owns redb: gathers batches, writes them at each checkpoint, and says which
/// journals a checkpoint has freed.
struct Checkpointer {
    tx: Option<std::sync::mpsc::Sender<Work>>,
    /// Which journals a checkpoint holds, and whether checkpoints have failed or the thread is
    /// gone (then none is free again, and nobody waits for one: durable writes fail instead).
    free: Arc<(Mutex<Free>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    fn start(db: Database, failure: Failure) -> Result<Checkpointer> {
        let (tx, rx) = std::sync::mpsc::channel::<Work>();
        let free = Arc::new((
            Mutex::new(Free {
                journals: [true, true],
                failed: false,
            }),
            Condvar::new(),
        ));
        let freed = free.clone();
        let thread = std::thread::Builder::new()
            .name("till-checkpoint".into())
            .spawn(move || {
                // However this thread ends (a panic included), nobody may wait for it any more.
                struct Gone(Arc<(Mutex<Free>, Condvar)>);
                impl Drop for Gone {
                    fn drop(&mut self) {
                        let (lock, cv) = &*self.0;
                        lock.lock().unwrap_or_else(|e| e.into_inner()).failed = true;
                        cv.notify_all();
                    }
                }
                let _gone = Gone(freed.clone());
                let mut pending = Pending::default();
                // After a failed checkpoint no later one may claim to include its records: the
                // journals keep them for the replay at the next start, and stay busy.
                let mut failed = false;
                for work in rx {
                    match work {
                        Work::Batch(batch) => pending.add(batch.0.into_iter()),
                        Work::Checkpoint(seq, journal) if !failed => {
                            match pending.checkpoint(&db, seq) {
                                Ok(()) => {
                                    tracing::debug!(seq, "store checkpoint written");
                                    let (lock, cv) = &*freed;
                                    lock.lock().unwrap_or_else(|e| e.into_inner()).journals
                                        [journal] = true;
                                    cv.notify_all();
                                }
                                Err(e) => {
                                    failed = true;
                                    tracing::error!(error = %format!("{e:#}"), "store checkpoint failed");
                                    failure.send_replace(Some(format!(
                                        "a checkpoint into redb failed: {e:#} (since {}); the \
                                         journals keep every record until a restart, and refuse \
                                         writes once full",
                                        humantime::format_rfc3339_seconds(
                                            std::time::SystemTime::now()
                                        )
                                    )));
                                    let (lock, cv) = &*freed;
                                    lock.lock().unwrap_or_else(|e| e.into_inner()).failed = true;
                                    cv.notify_all();
                                }
                            }
                        }
                        Work::Checkpoint(..) => {}
                        Work::Finish(seq) => {
                            if !failed
                                && let Err(e) = pending.checkpoint(&db, seq)
                            {
                                tracing::error!(error = %format!("{e:#}"), "store checkpoint failed");
                            }
                            return;
                        }
                    }
                }
            })?;
        Ok(Checkpointer {
            tx: Some(tx),
            free,
            thread: Some(thread),
        })
    }

    fn send(&self, work: Work) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(work);
        }
    }

    /// Whether a checkpoint has failed (or the thread is gone): the store cannot recover
    /// without a restart.
    fn failed(&self) -> bool {
        self.free.0.lock().unwrap_or_else(|e| e.into_inner()).failed
    }

    /// Whether journal `i` has been checkpointed (with `wait`, waits until it has).
    fn is_free(&self, i: usize, wait: bool) -> bool {
        let (lock, cv) = &*self.free;
        let mut free = lock.lock().unwrap_or_else(|e| e.into_inner());
        while wait && !free.journals[i] && !free.failed {
            free = cv.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        free.journals[i]
    }

    /// Asks for a checkpoint through `seq`, after which journal `journal` is free.
    fn ask(&self, seq: u64, journal: usize) {
        self.free
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .journals[journal] = false;
        self.send(Work::Checkpoint(seq, journal));
    }
}

impl Checkpointer {
    /// Waits for the thread: after `Work::Finish`, once the last checkpoint is written; else (a
    /// panic, a test) as if the process had died there, with what is pending left to the
    /// journals.
    fn join(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u32, note: usize) -> ([u8; 16], Option<Vec<u8>>) {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        let r = TokenRecord {
            id,
            key_id: "0011223344556677".into(),
            service: "openai".into(),
            rules: vec!["POST /v1/chat/completions".into()],
            uses: 10,
            used: i % 10,
            issued_at: 1_700_000_000,
            expires_at: None,
            parent: None,
            holder_uid: None,
            minted_by_uid: None,
            note: Some("n".repeat(note)),
            revoked_at: None,
            last_used_at: None,
            canary: false,
            budget: None,
            budget_used: 0,
            budget_lost: false,
            revocation_unsaved: false,
        };
        (id, Some(serde_json::to_vec(&r).expect("json")))
    }

    /// A writer over the store in `dir`, as `Store::open` makes it; dropping it is a crash.
    fn writer(dir: &Path) -> Writer {
        let db = Database::create(dir.join("till.redb")).expect("db");
        let tx = db.begin_write().expect("tx");
        tx.open_table(TOKENS).expect("table");
        tx.commit().expect("commit");
        let j = |n: &str| Journal::open(&dir.join(n)).expect("journal").0;
        Writer {
            journals: [j(JOURNALS[0]), j(JOURNALS[1])],
            active: 0,
            next_seq: 1,
            checkpointer: Checkpointer::start(db, Arc::new(tokio::sync::watch::Sender::new(None)))
                .expect("checkpointer"),
            last_switch: Instant::now(),
            pending: Pending::default(),
        }
    }

    fn stored(dir: &Path) -> std::collections::BTreeMap<[u8; 16], u32> {
        let (store, records, thread) = Store::open(dir).expect("reopen");
        drop(store);
        thread.join().expect("committer");
        records.into_iter().map(|r| (r.id, r.used)).collect()
    }

    #[test]
    fn acknowledged_writes_survive_a_crash_across_both_journals() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = writer(dir.path());
        for i in 0..300 {
            w.write(vec![record(i, 10)], true).expect("write");
            if i == 100 || i == 200 {
                // A checkpoint of the first journal, then (if it is done) back to it.
                w.switch(true).expect("switch");
            }
        }
        // Later values of the same records, and a removal.
        w.write(vec![record(1_000_005, 10)], true).expect("write");
        w.write(vec![(record(7, 10).0, None)], true).expect("write");
        drop(w);
        let got = stored(dir.path());
        assert_eq!(
            got.len(),
            300,
            "every record, less the removed one, plus one"
        );
        assert!(!got.contains_key(&record(7, 10).0));
        assert_eq!(got[&record(1_000_005, 10).0], 5);
        assert_eq!(got[&record(299, 10).0], 9);
    }

    /// A journal damaged while the daemon was stopped: what comes before the damaged record is
    /// replayed, what comes after is reported, not replayed, and never taken for a later write.
    #[test]
    fn a_damaged_journal_is_replayed_up_to_the_damage_and_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = writer(dir.path());
        for i in 1..=6 {
            w.write(vec![record(i, 10)], true).expect("write");
        }
        drop(w);
        let path = dir.path().join(JOURNALS[0]);
        let spans = journal::record_spans(&path);
        assert_eq!(spans.len(), 6);
        // One byte of the third record's payload flipped, as a bad sector would.
        let mut bytes = std::fs::read(&path).expect("journal");
        let (at, len) = spans[2];
        bytes[at + len - 3] ^= 0x40;
        std::fs::write(&path, bytes).expect("damage");

        let (store, records, thread) = Store::open(dir.path()).expect("reopen");
        let damage = store.damage().expect("the damage is reported").to_owned();
        assert!(
            damage.contains("3 record(s) written after record 2")
                && damage.contains("the newest is record 6"),
            "{damage}"
        );
        let ids: Vec<u32> = records
            .iter()
            .map(|r| u32::from_be_bytes(r.id[..4].try_into().expect("id")))
            .collect();
        assert_eq!(ids, [1, 2], "only what came before the damage");
        // New records are numbered past every old one still in the file.
        let next = store.shared.writer.lock().expect("writer").next_seq;
        assert_eq!(next, 7);
        drop(store);
        thread.join().expect("committer");

        // Reported once: the checkpoint at that start noted the stranded records as done.
        let (store, _, thread) = Store::open(dir.path()).expect("reopen");
        assert!(store.damage().is_none());
        drop(store);
        thread.join().expect("committer");

        // A write numbered so, then a crash: it is replayed, and the old records left in the file
        // after it are not.
        let mut w = writer(dir.path());
        w.next_seq = next;
        w.write(vec![record(100, 10)], true).expect("write");
        drop(w);
        let got = stored(dir.path());
        assert_eq!(
            got.keys()
                .map(|id| u32::from_be_bytes(id[..4].try_into().expect("id")))
                .collect::<Vec<_>>(),
            [1, 2, 100]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_led_by_their_waiters_and_by_the_committer_all_last() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _, thread) = Store::open(dir.path()).expect("open");
        let rec = |i: u32| {
            let (_, v) = record(i, 10);
            serde_json::from_slice::<TokenRecord>(&v.expect("value")).expect("record")
        };
        // Alone: each write is led by its waiter.
        for i in 0..50 {
            store
                .put_durable(&rec(i))
                .wait_or_lead(true)
                .await
                .expect("led write");
        }
        // Many at once, some offering to lead: whoever writes, every one is acknowledged.
        let tasks: Vec<_> = (50..250)
            .map(|i| {
                let s = store.clone();
                let r = rec(i);
                tokio::spawn(async move { s.put_durable(&r).wait_or_lead(i % 2 == 0).await })
            })
            .collect();
        for t in tasks {
            t.await.expect("task").expect("write");
        }
        drop(store);
        thread.join().expect("committer");
        assert_eq!(stored(dir.path()).len(), 250);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_led_by_their_waiters_are_still_checkpointed_on_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _, thread) = Store::open(dir.path()).expect("open");
        let (_, v) = record(1, 10);
        let r: TokenRecord = serde_json::from_slice(&v.expect("value")).expect("record");
        store
            .put_durable(&r)
            .wait_or_lead(true)
            .await
            .expect("led write");
        // The committer switches journals (asking for a checkpoint) once CHECKPOINT_EVERY has
        // passed, though no write woke it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.shared.writer.lock().expect("writer").active == 0 {
            assert!(Instant::now() < deadline, "no switch after a led write");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(store);
        thread.join().expect("committer");
    }

    #[test]
    fn a_batch_too_large_for_a_journal_goes_straight_to_redb() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = writer(dir.path());
        w.write(vec![record(1, 10)], true).expect("write");
        let big: Vec<_> = (100..9_100).map(|i| record(i, 1_000)).collect();
        assert!(!journal::fits_empty(&journal::encode(
            big.iter().map(|(k, v)| (k, v.as_deref()))
        )));
        w.write(big, true).expect("write");
        w.write(vec![record(2, 10)], true).expect("write");
        drop(w);
        let got = stored(dir.path());
        assert_eq!(got.len(), 9_002);
    }
}
