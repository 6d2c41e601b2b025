//! The audit trail's hash chain, shared by the daemon (which writes it) and the CLI (which checks
//! it with `till audit verify`). No I/O.
//!
//! Each line is one JSON object ending in `"prev":"<hex>","hash":"<hex>"}`. `hash` is SHA-256 over the
//! line as it reads without its `hash` field (the object ending `"prev":"…"}`); `prev` is the hash of
//! the line before (the first line's is [`GENESIS`]); `seq` counts up by one.

use sha2::{Digest, Sha256};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The chain hash of a line's body (the line without its `hash` field), as lowercase hex.
pub fn line_hash(body: &str) -> String {
    use std::fmt::Write as _;
    Sha256::digest(body.as_bytes())
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Checks a whole trail's chain; returns the number of lines, or the 1-based number of the first
/// bad line and why.
///
/// A trail starts at [`GENESIS`], or, when it is a rotated file's successor, with a checkpoint
/// that continues the previous file's chain ([`verify_trail`] checks that checkpoint's signature, so
/// cutting lines off the head is still caught).
pub fn verify_chain(text: &str) -> Result<u64, (usize, String)> {
    let mut prev = GENESIS.to_string();
    if let Some(first) = text.lines().next()
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(first)
        && v["event"] == "checkpoint"
        && let Some(p) = v["prev"].as_str()
    {
        prev = p.to_owned();
    }
    let mut expected_seq: Option<u64> = None;
    let mut count = 0;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let Some(cut) = line.rfind(",\"hash\":\"") else {
            return Err((n, "no hash field".into()));
        };
        let body = format!("{}}}", &line[..cut]);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| (n, format!("not JSON: {e}")))?;
        let claimed = v["hash"].as_str().unwrap_or("");
        if line_hash(&body) != claimed {
            return Err((
                n,
                "the line was edited: its hash does not match its content".into(),
            ));
        }
        let line_prev = v["prev"].as_str().unwrap_or("");
        let seq = v["seq"].as_u64().unwrap_or(0);
        if line_prev != prev {
            return Err((
                n,
                "the chain breaks here: a line before it was removed, inserted or reordered".into(),
            ));
        }
        if let Some(exp) = expected_seq
            && seq != exp
        {
            return Err((n, format!("sequence {seq} where {exp} was expected")));
        }
        expected_seq = Some(seq + 1);
        prev = claimed.to_owned();
        count += 1;
    }
    Ok(count)
}

/// Prefix of what a checkpoint's signature covers, so it can never pass for a token's.
const CHECKPOINT_DOMAIN: &[u8] = b"till-audit-checkpoint-v1\0";

/// What a checkpoint line signs: its own `seq` and `prev`, which is the hash of the whole chain
/// before it.
pub fn checkpoint_message(seq: u64, prev: &str) -> Vec<u8> {
    let mut m = CHECKPOINT_DOMAIN.to_vec();
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(prev.as_bytes());
    m
}

/// What a trail that verified holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub events: u64,
    pub checkpoints: u64,
}

/// Checks the chain (see [`verify_chain`]) and every checkpoint's signature against `keys` (the
/// daemon's audit key), and that the trail ends with a checkpoint: a trail cut short after its last
/// checkpoint would otherwise verify. Errors name the first bad line (1-based).
pub fn verify_trail(
    text: &str,
    keys: &[ed25519_dalek::VerifyingKey],
) -> Result<Report, (usize, String)> {
    use base64::Engine as _;
    if text.is_empty() {
        return Err((
            1,
            "the file is empty, but every trail tilld writes starts with a signed checkpoint: it was \
             emptied, or it is not a Till trail"
                .into(),
        ));
    }
    let events = verify_chain(text)?;
    let mut checkpoints = 0;
    let mut last_is_checkpoint = false;
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| (i + 1, e.to_string()))?;
        last_is_checkpoint = v["event"] == "checkpoint";
        if !last_is_checkpoint {
            continue;
        }
        let sig = v["sig"]
            .as_str()
            .and_then(|s| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(s)
                    .ok()
            })
            .and_then(|b| ed25519_dalek::Signature::try_from(b.as_slice()).ok())
            .ok_or((
                i + 1,
                "a checkpoint without a readable signature".to_string(),
            ))?;
        let msg = checkpoint_message(
            v["seq"].as_u64().unwrap_or(0),
            v["prev"].as_str().unwrap_or(""),
        );
        if !keys.iter().any(|k| k.verify_strict(&msg, &sig).is_ok()) {
            return Err((
                i + 1,
                "the checkpoint's signature does not verify with the daemon's audit key: forged, or \
                 the chain before it was rewritten"
                    .into(),
            ));
        }
        checkpoints += 1;
    }
    let lines = text.lines().count();
    if !text.is_empty() && !text.ends_with('\n') {
        return Err((
            lines,
            "the last line is incomplete: the trail was truncated".into(),
        ));
    }
    if !last_is_checkpoint {
        return Err((
            lines,
            "the trail ends without a signed checkpoint, so its tail could have been cut off \
             (tilld checkpoints at start, at stop, every 100 events and every minute)"
                .into(),
        ));
    }
    Ok(Report {
        events,
        checkpoints,
    })
}
