//! The audit trail: one JSON object per line, hash-chained, appended by a writer thread.
//!
//! Each line's `hash` is SHA-256 over the line as it reads without its `hash` field (that is, the
//! JSON object ending in `"prev":"…"}`), and `prev` is the hash of the line before, so an edited,
//! removed or reordered line breaks the chain from there on. The writer owns the file; callers send
//! an event and wait for the line to be written (`write(2)`, which survives a crash of the daemon)
//! before they reply or act. A failed write fails the request: no audit, no activation.
//!
//! Events never carry a secret, a whole token, a request body or a query string.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::peer::Peer;

use till_protocol::audit::{GENESIS, checkpoint_message, line_hash};

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Mint,
    Activate,
    /// How the upstream answered an activation (`status`), or why it did not (`reason`): written
    /// once the answer's head is in, before the caller sees it.
    Answer,
    /// LLM tokens an answer used, charged to a budget (only for tokens with one).
    Charge,
    Deny,
    Revoke,
    Reload,
    Start,
    Stop,
    Alert,
    /// A signed checkpoint: the daemon's audit key over the chain so far.
    Checkpoint,
}

impl EventKind {
    pub const ALL: [EventKind; 11] = [
        EventKind::Mint,
        EventKind::Activate,
        EventKind::Answer,
        EventKind::Charge,
        EventKind::Deny,
        EventKind::Revoke,
        EventKind::Reload,
        EventKind::Start,
        EventKind::Stop,
        EventKind::Alert,
        EventKind::Checkpoint,
    ];

    /// The name in the trail's `event` field.
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// One event before it is numbered and chained.
#[derive(Debug, Clone, Default)]
pub struct Event {
    pub token_id: Option<String>,
    pub service: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub status: Option<u16>,
    pub peer: Option<PeerJson>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerJson {
    pub uid: u32,
    pub pid: Option<i32>,
    pub exe: Option<String>,
    /// The MCP client's declared name, when the peer spoke MCP (a claim, not proof).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

impl From<&Peer> for PeerJson {
    fn from(p: &Peer) -> Self {
        PeerJson {
            uid: p.uid,
            pid: p.pid,
            exe: p.exe.clone(),
            client: p.client.clone(),
        }
    }
}

#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    ts: String,
    event: EventKind,
    token_id: &'a Option<String>,
    service: &'a Option<String>,
    method: &'a Option<String>,
    path: &'a Option<String>,
    status: Option<u16>,
    peer: &'a Option<PeerJson>,
    reason: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sig: Option<String>,
    prev: &'a str,
}

/// The most bytes of each field an audit line carries. Fields can hold what a caller sent (a service
/// name, a path, a refusal quoting either); a line stays small whatever they sent.
const MAX_NAME: usize = crate::MAX_QUOTED_NAME;
const MAX_PATH: usize = 8 * 1024;
const MAX_REASON: usize = 2 * 1024;

impl Event {
    fn clipped(&self) -> Option<Event> {
        let over = |f: &Option<String>, max: usize| f.as_ref().is_some_and(|s| s.len() > max);
        if !(over(&self.token_id, MAX_NAME)
            || over(&self.service, MAX_NAME)
            || over(&self.method, MAX_NAME)
            || over(&self.path, MAX_PATH)
            || over(&self.reason, MAX_REASON))
        {
            return None;
        }
        let clip =
            |f: &Option<String>, max: usize| f.as_deref().map(|s| crate::clip(s, max).into_owned());
        Some(Event {
            token_id: clip(&self.token_id, MAX_NAME),
            service: clip(&self.service, MAX_NAME),
            method: clip(&self.method, MAX_NAME),
            path: clip(&self.path, MAX_PATH),
            status: self.status,
            peer: self.peer.clone(),
            reason: clip(&self.reason, MAX_REASON),
        })
    }
}

/// A checkpoint is written after this many events (and by a timer, and at start and stop).
pub const CHECKPOINT_EVERY: u64 = 100;
/// The trail's head ([`Head`]), in the state directory.
const HEAD_FILE: &str = "audit.head";

struct Writer {
    path: PathBuf,
    /// Bytes in the current file, and the size at which it is rotated (0: never).
    size: u64,
    max_bytes: u64,
    keep: u32,
    file: File,
    seq: u64,
    prev: String,
    signer: ed25519_dalek::SigningKey,
    since_checkpoint: u64,
    /// Where the last checkpoint is remembered (see [`Head`]).
    head: File,
    /// Why the last append failed, while it is the last: for `till status` and the alert.
    failing: Failing,
}

impl Writer {
    fn append(&mut self, kind: EventKind, event: &Event) -> Result<(), String> {
        let seq = self.seq + 1;
        let sig = matches!(kind, EventKind::Checkpoint).then(|| {
            use base64::Engine as _;
            use ed25519_dalek::Signer as _;
            let s = self.signer.sign(&checkpoint_message(seq, &self.prev));
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s.to_bytes())
        });
        let clipped = event.clipped();
        let event = clipped.as_ref().unwrap_or(event);
        let (line, hash) = chain_line(seq, kind, event, &self.prev, sig);
        append_whole(&mut self.file, self.size, line.as_bytes(), |f, b| {
            f.write_all(b)
        })
        .map_err(|e| {
            tracing::error!(error = %e, "audit write failed");
            self.failing.send_replace(Some(e.to_string()));
            "the audit trail could not be written".to_string()
        })?;
        if self.failing.borrow().is_some() {
            tracing::warn!("the audit trail can be written again");
            self.failing.send_replace(None);
        }
        self.size += line.len() as u64;
        self.seq = seq;
        self.prev = hash;
        self.since_checkpoint = if matches!(kind, EventKind::Checkpoint) {
            0
        } else {
            self.since_checkpoint + 1
        };
        Ok(())
    }

    /// Closes the file with a checkpoint, shifts it to `.1` (`.1` to `.2`, ...; the oldest beyond
    /// `keep` is deleted) and starts a new file with a checkpoint that continues the chain.
    fn rotate(&mut self) -> Result<(), String> {
        self.checkpoint()?;
        let _ = std::fs::remove_file(rotated(&self.path, self.keep));
        for n in (1..self.keep).rev() {
            let _ = std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1));
        }
        let fail = |e: std::io::Error| {
            tracing::error!(error = %e, "audit rotation failed");
            "the audit trail could not be rotated".to_string()
        };
        std::fs::rename(&self.path, rotated(&self.path, 1)).map_err(fail)?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(fail)?;
        self.size = 0;
        let reason = Some(format!(
            "continues {}.1 (rotated at {} bytes)",
            self.path.display(),
            self.max_bytes
        ));
        self.append(
            EventKind::Checkpoint,
            &Event {
                reason,
                ..Event::default()
            },
        )?;
        self.remember_head();
        Ok(())
    }

    fn checkpoint(&mut self) -> Result<(), String> {
        let reason = Some(format!(
            "{} event(s) since the last checkpoint",
            self.since_checkpoint
        ));
        self.append(
            EventKind::Checkpoint,
            &Event {
                reason,
                ..Event::default()
            },
        )?;
        self.remember_head();
        Ok(())
    }

    /// Records the line just written as the trail's head. A failure is logged, not returned: the
    /// event is in the trail, and the next checkpoint tries again.
    fn remember_head(&mut self) {
        let head = Head {
            path: self.path.display().to_string(),
            seq: self.seq,
            hash: self.prev.clone(),
        };
        if let Err(e) = head.write(&self.head) {
            tracing::warn!(error = %e, "could not record the audit trail's head");
        }
    }
}

/// The trail's head as of the last checkpoint, kept in the state directory. At the next start the
/// trail must still reach it: a trail cut back or removed while tilld was stopped does not, and
/// then the new lines continue the chain from the head (so `till audit verify` reports the gap)
/// and an alert says what happened. Whoever can rewrite the state directory as well is not
/// stopped by this; someone who can only edit the log directory, or a log rotator, is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
struct Head {
    path: String,
    seq: u64,
    hash: String,
}

impl Head {
    /// The record's size on disk: one write at offset 0, padded, so it never shrinks and is
    /// rewritten in place (a small write within one page, no rename).
    const SIZE: usize = 4096;

    fn write(&self, file: &File) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut buf = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        if buf.len() >= Self::SIZE {
            return Err(std::io::Error::other(
                "the trail's path is too long to record",
            ));
        }
        buf.resize(Self::SIZE, b' ');
        buf[Self::SIZE - 1] = b'\n';
        file.write_all_at(&buf, 0)
    }

    /// The recorded head: `Ok(None)` when there is none yet (a first start, or a state dir from
    /// before heads were kept), `Err` when the file holds something that is not one.
    fn read(file: &File) -> Result<Option<Head>, ()> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; Self::SIZE];
        let n = file.read_at(&mut buf, 0).map_err(|_| ())?;
        let text = buf[..n].trim_ascii();
        if text.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(text).map(Some).map_err(|_| ())
    }
}

/// Whether the trail at `path`, whose last line is `(seq, hash)`, still holds `head`: its line
/// numbered `head.seq`, with that hash (lines after it are events written after the last
/// checkpoint, before a crash).
fn reaches(path: &Path, last: (u64, &str), head: &Head) -> std::io::Result<bool> {
    if last.0 < head.seq {
        return Ok(false);
    }
    if last.0 == head.seq {
        return Ok(last.1 == head.hash);
    }
    let seq_hash = |l: &str| {
        let v = serde_json::from_str::<serde_json::Value>(l).ok()?;
        Some((v["seq"].as_u64()?, v["hash"].as_str()?.to_owned()))
    };
    let found = tail_file(path, 1, usize::MAX, |l| match seq_hash(l) {
        Some((s, _)) if s > head.seq => Scan::Skip,
        Some((s, _)) if s == head.seq => Scan::Keep,
        _ => Scan::Stop,
    })?;
    Ok(found
        .first()
        .and_then(|l| seq_hash(l))
        .is_some_and(|(_, h)| h == head.hash))
}

/// Why appends fail (see [`Audit::failure`]), shared by the writer and the readers.
type Failing = Arc<tokio::sync::watch::Sender<Option<String>>>;

#[derive(Clone)]
pub struct Audit {
    writer: Arc<Mutex<Writer>>,
    failing: Failing,
    path: PathBuf,
    /// Set at open when the trail did not reach its recorded head: what happened, for the alert
    /// and for `till status`.
    discontinuity: Option<Arc<str>>,
}

impl Audit {
    /// Opens the trail for appending, continuing the chain from its last line.
    /// `max_bytes`: rotate past this size (0: never); `keep`: rotated files kept; `state_dir`:
    /// where the trail's head is remembered (`Head`).
    pub fn open(
        path: &Path,
        signer: ed25519_dalek::SigningKey,
        max_bytes: u64,
        keep: u32,
        state_dir: &Path,
    ) -> Result<Audit> {
        if let Some(dir) = path.parent() {
            crate::create_private_dir(dir)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot open the audit trail {}", path.display()))?;
        let (mut seq, mut prev) = last_link(&mut file)?;
        if ends_cut_short(&file)? {
            // The next line starts on a line of its own, after the cut one (which stays, and
            // `till audit verify` names it).
            file.write_all(b"\n")?;
        }
        let head_path = state_dir.join(HEAD_FILE);
        let head_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&head_path)
            .with_context(|| format!("cannot open {}", head_path.display()))?;
        let mut discontinuity = None;
        match Head::read(&head_file) {
            Err(()) => {
                let what = format!(
                    "{} is damaged, so tilld cannot tell whether lines were removed from the audit \
                     trail {} while it was stopped. `till audit verify` still checks the chain and \
                     its signed checkpoints; the head is written again at the next checkpoint",
                    head_path.display(),
                    path.display(),
                );
                tracing::error!("{what}");
                discontinuity = Some(Arc::from(what));
            }
            Ok(None) => {}
            Ok(Some(head)) if head.path != path.display().to_string() => {
                // The config names another file now: a trail of its own, chained from its start.
                tracing::warn!(
                    was = %head.path,
                    now = %path.display(),
                    "the audit trail moved; the new one is a chain of its own"
                );
            }
            Ok(Some(head)) if rotated_at(path, &head)? => (seq, prev) = (head.seq, head.hash),
            Ok(Some(head)) if !reaches(path, (seq, &prev), &head)? => {
                let what = format!(
                    "the audit trail {} does not reach where tilld left it (line {} at its last \
                     checkpoint; the file now ends at line {seq}): lines were removed, or the file \
                     was replaced, while tilld was stopped. Its new lines continue from line {}, so \
                     `till audit verify` shows the gap. If a log rotator moved the file, set \
                     audit_max_bytes and let tilld rotate it instead",
                    path.display(),
                    head.seq,
                    head.seq,
                );
                tracing::error!("{what}");
                discontinuity = Some(Arc::from(what));
                (seq, prev) = (head.seq, head.hash);
            }
            Ok(Some(_)) => {}
        }
        let failing: Failing = Arc::new(tokio::sync::watch::Sender::new(None));
        Ok(Audit {
            failing: failing.clone(),
            writer: Arc::new(Mutex::new(Writer {
                path: path.to_owned(),
                size: file.metadata().map(|m| m.len()).unwrap_or(0),
                max_bytes,
                keep: keep.max(1),
                file,
                seq,
                prev,
                signer,
                since_checkpoint: 0,
                head: head_file,
                failing,
            })),
            path: path.to_owned(),
            discontinuity,
        })
    }

    /// Why the last line could not be written, while no line since could: every request that
    /// needs one is refused meanwhile.
    pub fn failure(&self) -> Option<String> {
        self.failing.borrow().as_deref().map(|e| self.warning(e))
    }

    /// [`Audit::failure`] said for `till status` and the alert.
    pub fn warning(&self, failure: &str) -> String {
        format!(
            "the audit trail {} cannot be written ({failure}): Till refuses every request that \
             needs an audit line until it can; if its disk is full, free space (no restart needed)",
            self.path.display()
        )
    }

    /// Why the last line could not be written, as it changes.
    pub fn watch_failure(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.failing.subscribe()
    }

    /// What [`Audit::open`] found if the trail did not reach its recorded head.
    pub fn discontinuity(&self) -> Option<&str> {
        self.discontinuity.as_deref()
    }

    /// Appends an event; returns once its line is written. Lines never interleave: numbering,
    /// chaining and the write happen under one lock.
    pub fn record(&self, kind: EventKind, event: Event) -> Result<(), String> {
        let started = std::time::Instant::now();
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        w.append(kind, &event)?;
        // Start and stop are always followed by a checkpoint, so a stopped daemon's trail ends
        // signed; otherwise every CHECKPOINT_EVERY events.
        if matches!(kind, EventKind::Start | EventKind::Stop)
            || w.since_checkpoint >= CHECKPOINT_EVERY
        {
            w.checkpoint()?;
        }
        if w.max_bytes > 0 && w.size >= w.max_bytes && w.path.is_file() {
            w.rotate()?;
        }
        drop(w);
        crate::metrics::audit_write(started.elapsed());
        Ok(())
    }

    /// Writes a checkpoint if anything was appended since the last one (the minute timer, and
    /// `till audit verify` before it reads the live trail).
    pub fn checkpoint(&self) -> Result<(), String> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if w.since_checkpoint > 0 {
            w.checkpoint()?;
        }
        Ok(())
    }

    /// The key that signs checkpoints, for verifiers.
    pub fn public_key(&self) -> ed25519_dalek::VerifyingKey {
        self.writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .signer
            .verifying_key()
    }

    /// The last `n` lines of the trail that `judge` keeps, oldest first, at most `max_bytes` of
    /// them. The file is read backwards from its end and no further than needed: `judge` says
    /// `Stop` at the first line too old to matter, so a follower asking for what came after
    /// the last line it saw costs a read of the new lines only, not of the whole trail.
    pub async fn tail(
        &self,
        n: usize,
        max_bytes: usize,
        judge: impl Fn(&str) -> Scan + Send + 'static,
    ) -> Result<Vec<String>, String> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            tail_file(&path, n, max_bytes, judge).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// What [`Audit::tail`] does with a line, newest first.
pub enum Scan {
    Keep,
    Skip,
    /// This line and every older one are out of the window.
    Stop,
}

/// Appends `line` to a file that holds `good_len` bytes, with `write`; when that fails, cuts the
/// file back to `good_len`. A full disk fails a write midway: left in the file, the first part of
/// the line would run into the next line written, and `till audit verify` would report an edited
/// trail where there was only a full disk.
fn append_whole(
    file: &mut File,
    good_len: u64,
    line: &[u8],
    write: impl FnOnce(&mut File, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let Err(e) = write(file, line) else {
        return Ok(());
    };
    if let Err(undo) = file.set_len(good_len) {
        tracing::error!(error = %undo, "could not cut a partly written audit line off the trail");
    }
    Err(e)
}

/// Reads the trail backwards: the current file, then the rotated ones (`.1`, `.2`, …), newest
/// first, until `n` lines are kept, `max_bytes` is reached or `judge` says `Stop`. So a follower
/// whose last line was rotated away meanwhile still gets every line after it.
fn tail_file(
    path: &Path,
    n: usize,
    max_bytes: usize,
    judge: impl Fn(&str) -> Scan,
) -> std::io::Result<Vec<String>> {
    tail_file_with(path, n, max_bytes, judge, |_| {})
}

/// [`tail_file`], calling `between(i)` after the file at `i` (0: the current one) is read: the
/// tests rotate the trail there.
///
/// One rotation while this reads is harmless: the file read first is found again as `.1` and
/// skipped. Two would put the lines of a file newer than the first behind its lines. So when the
/// current file is no longer the one read first, it reads again. A rotation comes once per
/// `audit_max_bytes` of trail, so the second reading finds them still.
fn tail_file_with(
    path: &Path,
    n: usize,
    max_bytes: usize,
    judge: impl Fn(&str) -> Scan,
    mut between: impl FnMut(u32),
) -> std::io::Result<Vec<String>> {
    use std::os::unix::fs::MetadataExt;
    const ATTEMPTS: u32 = 3;
    // Between a rotation's rename and its new file, the current file is briefly missing.
    let missing = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    for attempt in 1..=ATTEMPTS {
        let (lines, first) = match tail_once(path, n, max_bytes, &judge, &mut between) {
            Ok(read) => read,
            Err(e) if missing(&e) && attempt < ATTEMPTS => continue,
            Err(e) => return Err(e),
        };
        match std::fs::metadata(path) {
            Ok(now) if (now.dev(), now.ino()) == first => return Ok(lines),
            Ok(_) => {}
            Err(e) if missing(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(
        "the audit trail kept rotating while it was read",
    ))
}

/// One reading of [`tail_file_with`]: the lines, and the file it read first.
fn tail_once(
    path: &Path,
    n: usize,
    max_bytes: usize,
    judge: &impl Fn(&str) -> Scan,
    between: &mut impl FnMut(u32),
) -> std::io::Result<(Vec<String>, (u64, u64))> {
    use std::os::unix::fs::MetadataExt;
    let mut kept = Kept {
        lines: Vec::new(),
        bytes: 0,
        n,
        max_bytes,
    };
    // The current file must be there; a rotated one may not (rotation renames them one by one).
    // A file seen twice (a rotation while this reads renamed the current one to `.1`, and so on)
    // is read once: nothing is missed, and nothing is read twice.
    let mut seen = Vec::new();
    for i in 0u32.. {
        let file = if i == 0 {
            File::open(path)?
        } else {
            match File::open(rotated(path, i)) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => return Err(e),
            }
        };
        let meta = file.metadata()?;
        if seen.contains(&(meta.dev(), meta.ino())) {
            continue;
        }
        seen.push((meta.dev(), meta.ino()));
        let more = tail_one(&file, meta.len(), judge, &mut kept)?;
        between(i);
        if !more {
            break;
        }
    }
    kept.lines.reverse();
    Ok((kept.lines, seen[0]))
}

/// The lines [`tail_file`] keeps, newest first, and its limits.
struct Kept {
    lines: Vec<String>,
    bytes: usize,
    n: usize,
    max_bytes: usize,
}

impl Kept {
    /// Keeps `line`; returns whether there is room for more.
    fn push(&mut self, line: &str) -> bool {
        self.bytes += line.len();
        if self.bytes > self.max_bytes {
            return false;
        }
        self.lines.push(line.to_owned());
        self.lines.len() < self.n
    }
}

/// One file of [`tail_file`], newest line first, into `kept`. Returns whether older lines may
/// still be wanted.
fn tail_one(
    file: &File,
    len: u64,
    judge: &impl Fn(&str) -> Scan,
    kept: &mut Kept,
) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    const BLOCK: u64 = 64 * 1024;
    if kept.lines.len() >= kept.n {
        return Ok(false);
    }
    let mut pos = len;
    // The end of a line whose start is in a block not read yet (with its newline).
    let mut carry: Vec<u8> = Vec::new();
    // A last line without its newline is still being written: not a line yet.
    let mut complete_only = true;
    while pos > 0 {
        let start = pos.saturating_sub(BLOCK);
        let mut buf = vec![0u8; (pos - start) as usize];
        file.read_exact_at(&mut buf, start)?;
        buf.extend_from_slice(&carry);
        pos = start;
        let lines_from = if start == 0 {
            0
        } else {
            match buf.iter().position(|&b| b == b'\n') {
                Some(i) => i + 1,
                None => {
                    carry = buf;
                    continue;
                }
            }
        };
        let mut region = &buf[lines_from..];
        if std::mem::take(&mut complete_only) && !region.ends_with(b"\n") {
            let cut = region
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            region = &region[..cut];
        }
        for line in region.rsplit(|&b| b == b'\n') {
            let Ok(line) = std::str::from_utf8(line) else {
                continue;
            };
            if line.is_empty() {
                continue;
            }
            match judge(line) {
                Scan::Skip => {}
                Scan::Stop => return Ok(false),
                Scan::Keep => {
                    if !kept.push(line) {
                        return Ok(false);
                    }
                }
            }
        }
        buf.truncate(lines_from);
        carry = buf;
    }
    Ok(true)
}

/// Finds the seq and hash of the last complete line, to continue the chain after a restart.
///
/// Read as bytes: the last 64 KiB may start inside a multi-byte character (a note in Japanese),
/// which a read into a `String` refuses, and that refusal would stop tilld from starting. A last
/// line without its newline was cut short (a crash, a full disk) and is not a link: the chain
/// goes on from the line before it.
fn last_link(file: &mut File) -> Result<(u64, String)> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok((0, GENESIS.into()));
    }
    let start = len.saturating_sub(64 * 1024);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let complete = match tail.iter().rposition(|&b| b == b'\n') {
        Some(end) => &tail[..end],
        None => &[][..],
    };
    let last = complete
        .rsplit(|&b| b == b'\n')
        .find(|l| !l.trim_ascii().is_empty());
    let parsed = last.and_then(|l| serde_json::from_slice::<serde_json::Value>(l).ok());
    match parsed {
        Some(v) => {
            let seq = v["seq"].as_u64().unwrap_or(0);
            let hash = v["hash"].as_str().unwrap_or(GENESIS).to_owned();
            Ok((seq, hash))
        }
        None => {
            tracing::error!("the audit trail's last line is unreadable; the chain restarts here");
            Ok((0, GENESIS.into()))
        }
    }
}

/// The trail's `n`th rotated file: `path.n`, `.1` the newest.
fn rotated(path: &Path, n: u32) -> PathBuf {
    PathBuf::from(format!("{}.{n}", path.display()))
}

/// Whether the current file is empty and `.1` ends at `head`: a crash between a rotation's rename
/// and the first line of its new file. The chain goes on from the head, and nothing is missing.
fn rotated_at(path: &Path, head: &Head) -> std::io::Result<bool> {
    if std::fs::metadata(path)?.len() > 0 {
        return Ok(false);
    }
    let Ok(mut previous) = File::open(rotated(path, 1)) else {
        return Ok(false);
    };
    let (seq, hash) = last_link(&mut previous).map_err(std::io::Error::other)?;
    Ok(seq == head.seq && hash == head.hash)
}

/// Whether the file's last byte is not a newline: its last line was cut short.
fn ends_cut_short(file: &File) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(false);
    }
    let mut last = [0u8];
    file.read_exact_at(&mut last, len - 1)?;
    Ok(last[0] != b'\n')
}

/// Serialises one event into its chained line. Returns the line (with newline) and its hash.
fn chain_line(
    seq: u64,
    kind: EventKind,
    e: &Event,
    prev: &str,
    sig: Option<String>,
) -> (String, String) {
    let line = Line {
        seq,
        ts: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        event: kind,
        token_id: &e.token_id,
        service: &e.service,
        method: &e.method,
        path: &e.path,
        status: e.status,
        peer: &e.peer,
        reason: &e.reason,
        sig,
        prev,
    };
    let body = serde_json::to_string(&line).unwrap_or_default();
    let hash = line_hash(&body);
    let mut out = String::with_capacity(body.len() + 80);
    out.push_str(&body[..body.len() - 1]);
    out.push_str(",\"hash\":\"");
    out.push_str(&hash);
    out.push_str("\"}\n");
    (out, hash)
}

#[cfg(test)]
mod tests {
    use till_protocol::audit::verify_chain;

    use super::*;

    /// The backward reader agrees with reading the whole file forwards: lines across block
    /// boundaries, a line longer than a block, a last line still being written, `n`, the byte
    /// budget and `Stop`.
    #[test]
    fn tail_reads_backwards_as_a_forward_read_would() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.jsonl");
        let mut text = String::new();
        for i in 0..3000u32 {
            let pad = if i == 1700 {
                200_000
            } else {
                (i as usize * 37) % 300
            };
            text.push_str(&format!("{i} {}\n", "x".repeat(pad)));
        }
        std::fs::write(&path, format!("{text}9999 half-writ")).expect("write");
        let all: Vec<&str> = text.lines().collect();
        let seq = |l: &str| l.split(' ').next().and_then(|n| n.parse::<u32>().ok());
        for n in [1, 5, 100, 1299, 1301, 2999, 3000, 5000] {
            let got = tail_file(&path, n, usize::MAX, |_| Scan::Keep).expect("tail");
            assert_eq!(got, all[all.len().saturating_sub(n)..], "n = {n}");
        }
        let even = |l: &str| {
            if seq(l).is_some_and(|s| s % 2 == 0) {
                Scan::Keep
            } else {
                Scan::Skip
            }
        };
        let got = tail_file(&path, 10, usize::MAX, even).expect("tail");
        let want: Vec<&str> = all
            .iter()
            .copied()
            .filter(|l| seq(l).is_some_and(|s| s % 2 == 0))
            .collect();
        assert_eq!(got, want[want.len() - 10..]);
        let after = |l: &str| match seq(l) {
            Some(s) if s <= 1650 => Scan::Stop,
            _ => Scan::Keep,
        };
        let got = tail_file(&path, usize::MAX, usize::MAX, after).expect("tail");
        assert_eq!(got, all[1651..]);
        let got = tail_file(&path, usize::MAX, 10_000, |_| Scan::Keep).expect("tail");
        let size: usize = got.iter().map(String::len).sum();
        assert!(size <= 10_000 && size > 9_000, "{size}");
        assert_eq!(got.last().map(String::as_str), all.last().copied());
    }

    /// A write that fails midway (a full disk) leaves nothing of its line: the next line written
    /// follows the last whole one, and the trail still verifies.
    #[test]
    fn a_line_that_fails_midway_is_cut_off() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.jsonl");
        let text = trail(3);
        std::fs::write(&path, &text).expect("write");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        let half_then_full = |f: &mut File, b: &[u8]| {
            f.write_all(&b[..b.len() / 2])?;
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
        };
        let err = append_whole(
            &mut file,
            text.len() as u64,
            b"{\"seq\":4,\"x\":1}\n",
            half_then_full,
        )
        .expect_err("the write fails");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), text);
        // Appending goes on from the cut (O_APPEND writes at the new end).
        append_whole(&mut file, text.len() as u64, b"next\n", |f, b| {
            f.write_all(b)
        })
        .expect("write");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            format!("{text}next\n")
        );
    }

    #[test]
    fn every_kind_has_its_own_name() {
        let names: std::collections::BTreeSet<String> =
            EventKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), EventKind::ALL.len());
        assert!(names.iter().all(|n| !n.is_empty()));
        // A new kind breaks this match: the reminder to add it to ALL, without which it would
        // be refused as a filter.
        for k in EventKind::ALL {
            match k {
                EventKind::Mint
                | EventKind::Activate
                | EventKind::Answer
                | EventKind::Charge
                | EventKind::Deny
                | EventKind::Revoke
                | EventKind::Reload
                | EventKind::Start
                | EventKind::Stop
                | EventKind::Alert
                | EventKind::Checkpoint => {}
            }
        }
    }

    /// Lines `from..to`, each its own number: a stand-in trail whose order shows.
    fn numbered(from: u32, to: u32) -> String {
        (from..to).map(|i| format!("{i}\n")).collect()
    }

    /// The numbers of lines from [`numbered`].
    fn numbers(lines: &[String]) -> Vec<u32> {
        lines.iter().map(|l| l.parse().expect("number")).collect()
    }

    /// Lines rotated into `.1` and `.2` are read after the current file's, newest first, as
    /// if the three were one file; a follower's window reaches back into them.
    #[test]
    fn tail_reads_on_into_the_rotated_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.jsonl");
        std::fs::write(rotated(&path, 2), numbered(0, 100)).expect("write");
        std::fs::write(rotated(&path, 1), numbered(100, 250)).expect("write");
        std::fs::write(&path, numbered(250, 260)).expect("write");
        let got = tail_file(&path, 200, usize::MAX, |_| Scan::Keep).expect("tail");
        assert_eq!(numbers(&got), (60..260).collect::<Vec<_>>());
        let got = tail_file(&path, usize::MAX, usize::MAX, |_| Scan::Keep).expect("tail");
        assert_eq!(got.len(), 260);
        let after_240 = |l: &str| {
            if l.parse::<u32>().is_ok_and(|s| s <= 240) {
                Scan::Stop
            } else {
                Scan::Keep
            }
        };
        let got = tail_file(&path, usize::MAX, usize::MAX, after_240).expect("tail");
        assert_eq!(numbers(&got), (241..260).collect::<Vec<_>>());
        // The rotated files are numbered without gaps: after a missing `.1`, `.2` is not read.
        std::fs::remove_file(rotated(&path, 1)).expect("rm");
        let got = tail_file(&path, usize::MAX, usize::MAX, |_| Scan::Keep).expect("tail");
        assert_eq!(got.len(), 10);
    }

    /// Two rotations while a follower reads: the lines still come back in order, none twice,
    /// none missing. (Read once, the file written after the first rotation came back as older
    /// than the file read first.)
    #[test]
    fn tail_survives_two_rotations_during_a_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.jsonl");
        std::fs::write(rotated(&path, 1), numbered(0, 100)).expect("write");
        std::fs::write(&path, numbered(100, 200)).expect("write");
        let rotate = |next: String| {
            for n in (1..3).rev() {
                let _ = std::fs::rename(rotated(&path, n), rotated(&path, n + 1));
            }
            std::fs::rename(&path, rotated(&path, 1)).expect("rename");
            std::fs::write(&path, next).expect("write");
        };
        let mut rotations = 0;
        let got = tail_file_with(
            &path,
            usize::MAX,
            usize::MAX,
            |_| Scan::Keep,
            |i| {
                // After the current file is read: two rotations before the next is opened.
                if i == 0 && rotations == 0 {
                    rotations += 1;
                    rotate(numbered(200, 250));
                    rotate(numbered(250, 300));
                }
            },
        )
        .expect("tail");
        assert_eq!(rotations, 1);
        assert_eq!(numbers(&got), (0..300).collect::<Vec<_>>());
    }

    /// A read that lands between a rotation's rename and its new file reads again once the new
    /// file is there; if it never comes, the read fails instead of answering with what it has.
    #[test]
    fn tail_reads_again_when_the_current_file_is_missing() {
        for created in [true, false] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("t.jsonl");
            std::fs::write(rotated(&path, 1), numbered(0, 100)).expect("write");
            std::fs::write(&path, numbered(100, 200)).expect("write");
            let got = tail_file_with(
                &path,
                usize::MAX,
                usize::MAX,
                |_| Scan::Keep,
                |i| {
                    if i == 0 && !rotated(&path, 2).exists() {
                        // The rotation's first half: the files shifted, no current file yet.
                        std::fs::rename(rotated(&path, 1), rotated(&path, 2)).expect("rename");
                        std::fs::rename(&path, rotated(&path, 1)).expect("rename");
                    }
                    if i == 2 && created && !path.exists() {
                        std::fs::write(&path, numbered(200, 210)).expect("write");
                    }
                },
            );
            if created {
                assert_eq!(numbers(&got.expect("tail")), (0..210).collect::<Vec<_>>());
            } else {
                assert_eq!(
                    got.expect_err("no current file").kind(),
                    std::io::ErrorKind::NotFound
                );
            }
        }
    }

    /// The trail's last 64 KiB may begin inside a multi-byte character: the chain still goes on
    /// from the last line. (Read into a `String`, that window was refused, and tilld did not
    /// start.) A last line cut short is not a link.
    #[test]
    fn last_link_reads_any_window_and_skips_a_cut_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.jsonl");
        let mut prev = GENESIS.to_string();
        let mut text = String::new();
        let mut seq = 0;
        while text.len() < 100 * 1024 {
            seq += 1;
            let e = Event {
                reason: Some("日本語のメモ".repeat(10)),
                ..Event::default()
            };
            let (line, hash) = chain_line(seq, EventKind::Mint, &e, &prev, None);
            text.push_str(&line);
            prev = hash;
        }
        // Pad the last line until the window's first byte is inside a character.
        let mut pad = 0;
        let bytes = loop {
            let e = Event {
                reason: Some("x".repeat(pad)),
                ..Event::default()
            };
            let (line, hash) = chain_line(seq + 1, EventKind::Mint, &e, &prev, None);
            let all = format!("{text}{line}");
            if all.as_bytes()[all.len() - 64 * 1024] & 0xC0 == 0x80 {
                break (all.into_bytes(), hash);
            }
            pad += 1;
        };
        let (all, last_hash) = bytes;
        std::fs::write(&path, &all).expect("write");
        let mut file = File::open(&path).expect("open");
        assert_eq!(
            last_link(&mut file).expect("last link"),
            (seq + 1, last_hash.clone())
        );
        // A line cut short after it: the chain goes on from the last whole line.
        let mut cut = all;
        cut.extend_from_slice(b"{\"seq\":");
        std::fs::write(&path, &cut).expect("write");
        let mut file = File::open(&path).expect("open");
        assert_eq!(
            last_link(&mut file).expect("last link"),
            (seq + 1, last_hash)
        );
        assert!(ends_cut_short(&file).expect("read"));
    }

    /// The head remembered in the state directory: a restart on the same trail continues it; a
    /// trail cut back or removed while the daemon was down is reported, and its new lines chain
    /// from the head, so the chain shows the gap; lines written after the last checkpoint (a
    /// crash) and a trail moved by the config are not a discontinuity.
    #[test]
    fn a_trail_cut_back_or_removed_while_stopped_is_found_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("state");
        let path = dir.path().join("audit.jsonl");
        let key = || ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let open = |p: &Path| Audit::open(p, key(), 0, 1, &state).expect("open");
        let mint = |a: &Audit, n: u32| {
            for i in 0..n {
                let e = Event {
                    token_id: Some(format!("t{i}")),
                    ..Event::default()
                };
                a.record(EventKind::Mint, e).expect("record");
            }
        };
        let stop = |a: Audit| {
            a.record(EventKind::Stop, Event::default()).expect("stop");
        };
        let chain = |p: &Path| verify_chain(&std::fs::read_to_string(p).expect("read"));

        // A first life, then a restart: continued.
        let a = open(&path);
        assert!(a.discontinuity().is_none());
        a.record(EventKind::Start, Event::default()).expect("start");
        mint(&a, 3);
        stop(a);
        let first_life = std::fs::read_to_string(&path).expect("read");
        let a = open(&path);
        assert!(a.discontinuity().is_none());
        mint(&a, 2);
        stop(a);
        assert_eq!(chain(&path), Ok(11));

        // A crash: lines after the last checkpoint. Still continued.
        let a = open(&path);
        mint(&a, 2);
        drop(a);
        let a = open(&path);
        assert!(a.discontinuity().is_none());
        stop(a);
        assert_eq!(chain(&path), Ok(15));

        // A crash between a rotation's rename and its new file's first line: nothing is missing.
        let a = open(&path);
        stop(a);
        let whole = std::fs::read_to_string(&path).expect("read");
        let rotated = rotated(&path, 1);
        std::fs::rename(&path, &rotated).expect("rename");
        std::fs::write(&path, "").expect("empty");
        let a = open(&path);
        assert!(a.discontinuity().is_none());
        stop(a);
        let both = whole + &std::fs::read_to_string(&path).expect("read");
        assert_eq!(verify_chain(&both), Ok(19));
        std::fs::write(&path, &both).expect("put back");
        std::fs::remove_file(&rotated).expect("rm");

        // Cut back to the end of the first life while stopped: found, and the chain shows where.
        std::fs::write(&path, &first_life).expect("cut");
        let a = open(&path);
        let what = a.discontinuity().expect("a discontinuity").to_owned();
        assert!(what.contains("line 19 at its last checkpoint"), "{what}");
        assert!(what.contains("ends at line 7"), "{what}");
        stop(a);
        assert_eq!(chain(&path).map_err(|e| e.0), Err(8));
        // And told once: the next start finds the trail where this one left it.
        let a = open(&path);
        assert!(a.discontinuity().is_none());
        stop(a);

        // Removed while stopped: the new file's first line does not start a chain.
        std::fs::remove_file(&path).expect("rm");
        let a = open(&path);
        assert!(a.discontinuity().is_some());
        stop(a);
        assert_eq!(chain(&path).map_err(|e| e.0), Err(1));

        // The config names another file: a trail of its own, not a discontinuity.
        let moved = dir.path().join("elsewhere.jsonl");
        let a = open(&moved);
        assert!(a.discontinuity().is_none());
        stop(a);
        assert_eq!(chain(&moved), Ok(2));

        // A head that does not read (a damaged file): said, since the check cannot be made; the
        // trail goes on from its own last line, and the next checkpoint writes the head again.
        let head = state.join("audit.head");
        let mut bytes = std::fs::read(&head).expect("head");
        bytes[..8].copy_from_slice(b"garbage!");
        std::fs::write(&head, bytes).expect("damage");
        let a = open(&moved);
        let what = a.discontinuity().expect("said").to_owned();
        assert!(what.contains("audit.head is damaged"), "{what}");
        stop(a);
        assert_eq!(chain(&moved), Ok(4));
        let a = open(&moved);
        assert!(a.discontinuity().is_none());
        stop(a);
    }

    fn trail(n: u64) -> String {
        let mut prev = GENESIS.to_string();
        let mut out = String::new();
        for seq in 1..=n {
            let e = Event {
                token_id: Some(format!("t{seq}")),
                ..Event::default()
            };
            let (line, hash) = chain_line(seq, EventKind::Mint, &e, &prev, None);
            out.push_str(&line);
            prev = hash;
        }
        out
    }

    #[test]
    fn untouched_trail_verifies_and_edits_do_not() {
        let t = trail(5);
        assert_eq!(verify_chain(&t), Ok(5));
        let lines: Vec<&str> = t.lines().collect();
        let edited = t.replacen("\"t3\"", "\"t9\"", 1);
        assert_eq!(verify_chain(&edited).map_err(|e| e.0), Err(3));
        let removed: String = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 1)
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        assert_eq!(verify_chain(&removed).map_err(|e| e.0), Err(2));
        let swapped = format!(
            "{}\n{}\n{}\n{}\n{}\n",
            lines[0], lines[2], lines[1], lines[3], lines[4]
        );
        assert_eq!(verify_chain(&swapped).map_err(|e| e.0), Err(2));
    }

    #[test]
    fn an_emptied_trail_does_not_verify() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        let (line, why) = till_protocol::audit::verify_trail("", &[key]).expect_err("empty");
        assert_eq!(line, 1);
        assert!(why.contains("empty"), "{why}");
    }
}
