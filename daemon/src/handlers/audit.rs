//! `audit`: the last events of the trail (admins only).

use till_protocol::{AuditReply, AuditRequest, Response};

use crate::audit::{EventKind, Scan};
use crate::broker::{Broker, Refusal};
use crate::peer::Peer;

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 100_000;

pub async fn handle(b: &Broker, peer: &Peer, req: AuditRequest) -> Result<Response, Refusal> {
    b.require_admin(peer, "reading the audit trail")?;
    if req.checkpoint {
        b.audit
            .checkpoint()
            .map_err(|e| Refusal::internal(format!("{e}; no checkpoint was written")))?;
    }
    let n = req.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT);
    let since = match &req.since {
        Some(s) => Some(since(s)?),
        None => None,
    };
    // A misspelt kind would match nothing, and an empty answer would read as "none happened".
    if let Some(e) = &req.event {
        let names: Vec<String> = EventKind::ALL.iter().map(|k| k.name()).collect();
        if !names.contains(e) {
            return Err(Refusal::bad_request(format!(
                "event = {:?} is no kind of event; the kinds are {}",
                crate::clip(e, crate::MAX_QUOTED_NAME),
                names.join(", ")
            )));
        }
    }
    // Lines are in `seq` and time order, so the first one (from the end) at or before the window
    // ends the scan.
    // The daemon writes compact JSON, so a line about token T holds `"token_id":"T"` verbatim:
    // lines without every wanted field are skipped before they are parsed (unless the window
    // needs each line's seq or time).
    let needles: Vec<String> = [
        ("token_id", &req.token),
        ("service", &req.service),
        ("event", &req.event),
    ]
    .into_iter()
    .filter_map(|(k, want)| {
        let want = serde_json::to_string(want.as_ref()?).ok()?;
        Some(format!("\"{k}\":{want}"))
    })
    .collect();
    let windowed = req.after_seq.is_some() || since.is_some();
    let judge = move |line: &str| -> Scan {
        if !windowed && !needles.iter().all(|n| line.contains(n.as_str())) {
            return Scan::Skip;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            return Scan::Skip;
        };
        if req
            .after_seq
            .is_some_and(|a| v["seq"].as_u64().is_some_and(|s| s <= a))
        {
            return Scan::Stop;
        }
        if since.is_some_and(|t| {
            v["ts"]
                .as_str()
                .and_then(|ts| humantime::parse_rfc3339_weak(ts).ok())
                .is_some_and(|ts| ts < t)
        }) {
            return Scan::Stop;
        }
        let is = |field: &str, want: &Option<String>| {
            want.as_ref()
                .is_none_or(|w| v[field].as_str() == Some(w.as_str()))
        };
        if is("token_id", &req.token) && is("service", &req.service) && is("event", &req.event) {
            Scan::Keep
        } else {
            Scan::Skip
        }
    };
    // A follower that falls further behind than one reply holds sees the newest lines.
    let lines = b
        .audit
        .tail(n, super::MAX_REPLY_BYTES, judge)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "cannot read the audit trail");
            Refusal::internal("the audit trail could not be read; see the daemon's log")
        })?;
    Ok(Response::Audit(AuditReply { lines }))
}

/// `since`: a time (RFC 3339), or how long ago, as `journalctl` and `docker logs` take it (`90m`,
/// `2h`, `1d`).
fn since(s: &str) -> Result<std::time::SystemTime, Refusal> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    humantime::parse_duration(s)
        .ok()
        .and_then(|ago| std::time::SystemTime::now().checked_sub(ago))
        .ok_or_else(|| {
            Refusal::bad_request(format!(
                "since = {:?}: write a time like 2026-11-27T18:00:00Z, or how long ago, like 1h",
                crate::clip(s, crate::MAX_QUOTED_NAME)
            ))
        })
}
