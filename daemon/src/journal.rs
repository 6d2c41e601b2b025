//! The store's journals: what makes a durable write one small in-place write and one
//! `fdatasync`, instead of a B-tree commit (on this machine about 9 scattered page writes before
//! the sync, 1.5–2× the cost of syncing one block).
//!
//! A journal is a fixed-size file, zero-filled when created, so writing into it never changes its
//! size or block allocation and `fdatasync` has no metadata to commit. Every batch of store writes
//! becomes one record (magic, sequence number, payload length, checksum, payload), written after the
//! previous one from offset 0; a batch that must be durable is synced, and the sync carries every
//! record written before it. The store numbers the records and keeps two journals, writing one
//! while redb checkpoints what the other holds (see `store.rs`).
//!
//! At open, records are read from offset 0 while each is intact (checksum) and numbered one after
//! the previous. Whatever follows is a torn record that was never acknowledged, or the remains of
//! an earlier lap, numbered lower (a journal is only written again once a checkpoint holds it).
//! The numbers of intact records found further on are returned too (`Opened::later`): an earlier
//! lap's, which the store's checkpoint already holds, or, if the file was damaged after it was
//! written, records written after the damaged one. The store reports those, and does not replay
//! them: past a damaged record the file has no structure to trust (see `store.rs`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

/// A journal's size: 8 MiB, about 20,000 single-token records.
pub const SIZE: u64 = 8 << 20;
const MAGIC: [u8; 4] = *b"TLJ1";
/// Magic, sequence number, payload length, the first 16 bytes of SHA-256 over the three after it.
const HEADER: usize = 4 + 8 + 4 + 16;

/// One write of a batch: a record's new bytes, or `None` for a removal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: [u8; 16],
    pub value: Option<Vec<u8>>,
}

/// A record read back at open: its sequence number and its entries.
pub type Replayed = (u64, Vec<Entry>);

/// What a journal holds when it is opened.
pub struct Opened {
    /// The intact, consecutively numbered records from offset 0, oldest first.
    pub records: Vec<Replayed>,
    /// The numbers of intact records after the first that is not (see the module docs).
    pub later: Vec<u64>,
}

pub struct Journal {
    file: File,
    head: u64,
}

impl Journal {
    /// Opens the journal at `path` (creating it zero-filled if absent or not whole) and returns its
    /// intact, consecutively numbered records from offset 0, oldest first. The journal is then
    /// positioned at offset 0: the caller must checkpoint what it needs of them before appending.
    pub fn open(path: &Path) -> io::Result<(Journal, Opened)> {
        let existing = std::fs::metadata(path).map(|m| m.len()).ok();
        let file = if existing == Some(SIZE) {
            OpenOptions::new().read(true).write(true).open(path)?
        } else {
            // Absent, or cut short while being created (before any record was written into it).
            create_zeroed(path)?
        };
        let mut bytes = vec![0u8; SIZE as usize];
        file.read_exact_at(&mut bytes, 0)?;
        let mut records: Vec<Replayed> = Vec::new();
        let mut at = 0usize;
        while let Some((seq, payload, len)) = read_record(&bytes[at..]) {
            if records.last().is_some_and(|(p, _)| seq != p + 1) {
                break;
            }
            let Some(entries) = decode(payload) else {
                break;
            };
            records.push((seq, entries));
            at += len;
        }
        // From there on, any intact record (the one the run stopped at, if it is intact but out of
        // sequence, included): found by its magic, trusted for its checksum.
        let mut later = Vec::new();
        let mut from = at;
        while let Some(i) = bytes
            .get(from..)
            .and_then(|rest| memchr::memmem::find(rest, &MAGIC))
        {
            let start = from + i;
            match read_record(&bytes[start..]) {
                Some((seq, _, len)) => {
                    later.push(seq);
                    from = start + len;
                }
                None => from = start + 1,
            }
        }
        Ok((Journal { file, head: 0 }, Opened { records, later }))
    }

    /// Whether a record with this payload fits before the end of the file.
    pub fn fits(&self, payload: &[u8]) -> bool {
        self.head + (HEADER + payload.len()) as u64 <= SIZE
    }

    /// Whether less than half the file is written (the store switches journals past that).
    pub fn under_half(&self) -> bool {
        self.head < SIZE / 2
    }

    /// Whether nothing has been written since the last rewind.
    pub fn is_empty(&self) -> bool {
        self.head == 0
    }

    /// Writes record `seq` after the last; with `sync`, waits until it (and every record before
    /// it) is on disk. The caller checks [`Journal::fits`] first.
    pub fn append(&mut self, seq: u64, payload: &[u8], sync: bool) -> io::Result<()> {
        let mut rec = Vec::with_capacity(HEADER + payload.len());
        rec.extend_from_slice(&MAGIC);
        rec.extend_from_slice(&seq.to_be_bytes());
        rec.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        rec.extend_from_slice(&checksum(seq, payload));
        rec.extend_from_slice(payload);
        self.file.write_all_at(&rec, self.head)?;
        if sync {
            self.file.sync_data()?;
        }
        self.head += rec.len() as u64;
        Ok(())
    }

    /// Flushes what was written without a sync (before a journal is left for the other).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Starts again at offset 0, once a checkpoint holds every record in it.
    pub fn rewind(&mut self) {
        self.head = 0;
    }
}

/// Whether a record with this payload fits in an empty journal.
pub fn fits_empty(payload: &[u8]) -> bool {
    (HEADER + payload.len()) as u64 <= SIZE
}

fn create_zeroed(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    let zeros = vec![0u8; 1 << 20];
    for i in 0..SIZE / zeros.len() as u64 {
        file.write_all_at(&zeros, i * zeros.len() as u64)?;
    }
    file.sync_all()?;
    // The new directory entry must survive a crash too, or the records written into it would not.
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(file)
}

fn checksum(seq: u64, payload: &[u8]) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(seq.to_be_bytes());
    h.update((payload.len() as u32).to_be_bytes());
    h.update(payload);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize()[..16]);
    out
}

/// The record at the start of `bytes`, if one is there whole: (seq, payload, record length).
fn read_record(bytes: &[u8]) -> Option<(u64, &[u8], usize)> {
    let header = bytes.get(..HEADER)?;
    if header[..4] != MAGIC {
        return None;
    }
    let seq = u64::from_be_bytes(header[4..12].try_into().ok()?);
    let len = u32::from_be_bytes(header[12..16].try_into().ok()?) as usize;
    let payload = bytes.get(HEADER..HEADER.checked_add(len)?)?;
    if header[16..] != checksum(seq, payload) {
        return None;
    }
    Some((seq, payload, HEADER + len))
}

/// A batch as a payload: per entry, the key, 1 and the value's length and bytes, or 0 (removed).
pub fn encode<'a>(entries: impl Iterator<Item = (&'a [u8; 16], Option<&'a [u8]>)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in entries {
        out.extend_from_slice(key);
        match value {
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(v);
            }
            None => out.push(0),
        }
    }
    out
}

fn decode(mut payload: &[u8]) -> Option<Vec<Entry>> {
    let mut entries = Vec::new();
    while !payload.is_empty() {
        let key: [u8; 16] = payload.get(..16)?.try_into().ok()?;
        let tag = *payload.get(16)?;
        payload = &payload[17..];
        let value = match tag {
            0 => None,
            1 => {
                let len = u32::from_be_bytes(payload.get(..4)?.try_into().ok()?) as usize;
                let v = payload.get(4..4 + len)?.to_vec();
                payload = &payload[4 + len..];
                Some(v)
            }
            _ => return None,
        };
        entries.push(Entry { key, value });
    }
    Some(entries)
}

/// Where each record read from offset 0 starts, and its length (for tests that damage one).
#[cfg(test)]
pub fn record_spans(path: &Path) -> Vec<(usize, usize)> {
    let bytes = std::fs::read(path).expect("journal");
    let mut spans = Vec::new();
    let mut at = 0;
    while let Some((_, _, len)) = read_record(&bytes[at..]) {
        spans.push((at, len));
        at += len;
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: u8) -> Vec<u8> {
        let key = [n; 16];
        let value = vec![n; 300];
        let gone = [n.wrapping_add(100); 16];
        encode([(&key, Some(value.as_slice())), (&gone, None)].into_iter())
    }

    fn seqs(r: &[Replayed]) -> Vec<u64> {
        r.iter().map(|r| r.0).collect()
    }

    #[test]
    fn records_come_back_in_order_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j");
        let (mut j, opened) = Journal::open(&path).expect("open");
        assert!(opened.records.is_empty());
        for n in 1..=5u8 {
            j.append(u64::from(n) + 10, &batch(n), n % 2 == 0)
                .expect("append");
        }
        drop(j);
        let (_, opened) = Journal::open(&path).expect("reopen");
        let replay = opened.records;
        assert_eq!(seqs(&replay), [11, 12, 13, 14, 15]);
        assert!(opened.later.is_empty());
        assert_eq!(replay[0].1[0].value.as_deref(), Some(&[1u8; 300][..]));
        assert_eq!(replay[0].1[1].value, None);

        // Tear the fourth record: the fifth, after it, is not trusted either.
        let rec_len = (HEADER + batch(1).len()) as u64;
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.write_all_at(&[0xff; 8], rec_len * 3 + HEADER as u64 + 20)
            .expect("tear");
        let (_, opened) = Journal::open(&path).expect("reopen");
        assert_eq!(seqs(&opened.records), [11, 12, 13]);
        // ...but it is seen, for the store to report.
        assert_eq!(opened.later, [15]);
    }

    #[test]
    fn a_new_lap_ends_where_the_old_records_begin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j");
        let (mut j, _) = Journal::open(&path).expect("open");
        for n in 1..=6u8 {
            j.append(u64::from(n), &batch(n), true).expect("append");
        }
        // A checkpoint took 1..=6; the next lap overwrites the start of the file.
        j.rewind();
        j.append(20, &batch(7), true).expect("append");
        j.append(21, &batch(8), true).expect("append");
        drop(j);
        let (_, opened) = Journal::open(&path).expect("reopen");
        assert_eq!(seqs(&opened.records), [20, 21]);
        // The earlier lap's remains, which a checkpoint holds.
        assert_eq!(opened.later, [3, 4, 5, 6]);
    }

    #[test]
    fn a_journal_cut_short_at_creation_is_made_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j");
        std::fs::write(&path, b"partial").expect("write");
        let (_, opened) = Journal::open(&path).expect("open");
        assert!(opened.records.is_empty() && opened.later.is_empty());
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), SIZE);
    }
}
