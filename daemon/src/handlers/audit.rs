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
    let lines = b.audit.tail(n).await.map_err(|e| {
        tracing::error!(error = %e, "cannot read the audit trail");
        Refusal::internal("the audit trail could not be read; see the daemon's log")
    })?;
    Ok(Response::Audit(AuditReply { lines }))
}
