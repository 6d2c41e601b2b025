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
pub fn verify_chain(text: &str) -> Result<u64, (usize, String)> {
    let mut prev = GENESIS.to_string();
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
