//! `audit`: the last events of the trail (admins only).

use till_protocol::{AuditReply, AuditRequest, Response};

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
        Some(s) => Some(humantime::parse_rfc3339_weak(s).map_err(|_| {
            Refusal::bad_request(format!(
                "since = {s:?}: write a time like 2026-11-27T18:00:00Z"
            ))
        })?),
        None => None,
    };
    let keep = move |line: &str| -> bool {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            return false;
        };
        let is = |field: &str, want: &Option<String>| {
            want.as_ref()
                .is_none_or(|w| v[field].as_str() == Some(w.as_str()))
        };
        is("token_id", &req.token)
            && is("service", &req.service)
            && is("event", &req.event)
            && req
                .after_seq
                .is_none_or(|a| v["seq"].as_u64().is_some_and(|s| s > a))
            && since.is_none_or(|t| {
                v["ts"]
                    .as_str()
                    .and_then(|ts| humantime::parse_rfc3339_weak(ts).ok())
                    .is_some_and(|ts| ts >= t)
            })
    };
    let lines = b.audit.tail(n, keep).await.map_err(|e| {
        tracing::error!(error = %e, "cannot read the audit trail");
        Refusal::internal("the audit trail could not be read; see the daemon's log")
    })?;
    Ok(Response::Audit(AuditReply { lines }))
}
