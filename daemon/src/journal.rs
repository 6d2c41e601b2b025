//! The store's journal: what makes a durable write one small in-place write and one `fdatasync`,
//! instead of a B-tree commit (on this machine 6–9 scattered page writes and a header before the
//! sync, 1.5–2× the cost of syncing one block).
//!
//! A fixed-size file, zero-filled when created, so writing into it never changes its size or block
//! allocation and `fdatasync` has no metadata to commit. Every batch of store writes becomes one
//! record (magic, sequence number, payload length, checksum, payload), written after the previous
//! one; a batch that must be durable is synced, and the sync carries every record written before it.
//! When the next record does not fit, the store checkpoints (a durable redb commit that notes the
//! last sequence number it includes) and writing starts again at offset 0.
//!
//! At open, records are read from offset 0 while each is intact (checksum) and numbered one after
//! the previous; those newer than redb's checkpoint are replayed in order. Whatever follows is a
//! torn record that was never acknowledged, or the remains of the previous lap, numbered lower.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

/// The journal's size: 8 MiB, about 20,000 single-token records between checkpoints.
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

pub struct Journal {
    file: File,
    head: u64,
    next_seq: u64,
}

impl Journal {
    /// Opens the journal at `path` (creating it zero-filled if absent or not whole) and returns the
    /// intact records numbered above `after` (redb's checkpoint), oldest first. The journal is then
    /// positioned at offset 0: the caller must checkpoint the replayed records before appending.
    pub fn open(path: &Path, after: u64) -> io::Result<(Journal, Vec<Replayed>)> {
        let existing = std::fs::metadata(path).map(|m| m.len()).ok();
        let file = if existing == Some(SIZE) {
            OpenOptions::new().read(true).write(true).open(path)?
        } else {
            // Absent, or cut short while being created (before any record was written into it).
            create_zeroed(path)?
        };
        let mut bytes = vec![0u8; SIZE as usize];
        file.read_exact_at(&mut bytes, 0)?;
        let mut replay = Vec::new();
        let mut last_seq = after;
        let mut prev: Option<u64> = None;
        let mut at = 0usize;
        while let Some((seq, payload, len)) = read_record(&bytes[at..]) {
            if prev.is_some_and(|p| seq != p + 1) {
                break;
            }
            let Some(entries) = decode(payload) else {
                break;
            };
            prev = Some(seq);
            last_seq = last_seq.max(seq);
            if seq > after {
                replay.push((seq, entries));
            }
            at += len;
        }
        Ok((
            Journal {
                file,
                head: 0,
                next_seq: last_seq + 1,
            },
            replay,
        ))
    }

    /// The sequence number of the last record written (or replayed, or checkpointed).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Whether a record with this payload fits before the end of the file.
    pub fn fits(&self, payload: &[u8]) -> bool {
        self.head + (HEADER + payload.len()) as u64 <= SIZE
    }

    /// Writes one record after the last; with `sync`, waits until it (and every record before it)
    /// is on disk. The caller checks [`Journal::fits`] first.
    pub fn append(&mut self, payload: &[u8], sync: bool) -> io::Result<u64> {
        let seq = self.next_seq;
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
        self.next_seq += 1;
        Ok(seq)
    }

    /// Starts again at offset 0, once a checkpoint holds every record written so far.
    pub fn rewind(&mut self) {
        self.head = 0;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: u8) -> Vec<u8> {
        let key = [n; 16];
        let value = vec![n; 300];
        let gone = [n.wrapping_add(100); 16];
        encode([(&key, Some(value.as_slice())), (&gone, None)].into_iter())
    }

    #[test]
    fn records_replay_in_order_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j");
        let (mut j, replay) = Journal::open(&path, 0).expect("open");
        assert!(replay.is_empty());
        for n in 1..=5 {
            assert_eq!(j.append(&batch(n), n % 2 == 0).expect("append"), n as u64);
        }
        drop(j);
        let (j, replay) = Journal::open(&path, 2).expect("reopen");
        assert_eq!(replay.iter().map(|r| r.0).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(replay[0].1[0].value.as_deref(), Some(&[3u8; 300][..]));
        assert_eq!(replay[0].1[1].value, None);
        assert_eq!(j.last_seq(), 5);
        drop(j);

        // Tear the fourth record: the fifth, after it, is not trusted either.
        let rec_len = (HEADER + batch(1).len()) as u64;
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.write_all_at(&[0xff; 8], rec_len * 3 + HEADER as u64 + 20)
            .expect("tear");
        let (j, replay) = Journal::open(&path, 0).expect("reopen");
        assert_eq!(replay.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(j.last_seq(), 3);
    }

    #[test]
    fn a_new_lap_ends_where_the_old_records_begin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j");
        let (mut j, _) = Journal::open(&path, 0).expect("open");
        for n in 1..=6 {
            j.append(&batch(n), true).expect("append");
        }
        // A checkpoint took 1..=6; the next lap overwrites the start of the file.
        j.rewind();
        j.append(&batch(7), true).expect("append");
        j.append(&batch(8), true).expect("append");
        drop(j);
        let (j, replay) = Journal::open(&path, 6).expect("reopen");
        assert_eq!(replay.iter().map(|r| r.0).collect::<Vec<_>>(), [7, 8]);
        assert_eq!(j.last_seq(), 8);
    }

    #[test]
    fn a_journal_cut_short_at_creation_is_made_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j");
        std::fs::write(&path, b"partial").expect("write");
        let (j, replay) = Journal::open(&path, 9).expect("open");
        assert!(replay.is_empty());
        assert_eq!(j.last_seq(), 9);
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), SIZE);
    }
}
