//! `status`: version, uptime, socket, counts.

use till_protocol::{Response, StatusReply};

use crate::broker::{Broker, Refusal};
use crate::peer::Peer;

pub async fn handle(b: &Broker, _peer: &Peer) -> Result<Response, Refusal> {
    let live = b.live_tokens();
    Ok(Response::Status(StatusReply {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_secs: b.started.elapsed().as_secs(),
        socket: b.served().config.socket.display().to_string(),
        gateway: b.served().config.gateway.map(|g| format!("http://{g}")),
        live_tokens: live,
        services: b.served().services.len() as u64,
        audit_log: Some(b.served().config.audit_log.display().to_string()),
        warnings: b
            .store
            .failure()
            .map(|e| crate::store::Store::warning(&e))
            .into_iter()
            .chain(b.audit.failure())
            .chain(b.audit.discontinuity().map(str::to_owned))
            .chain(b.store.damage().map(str::to_owned))
            .chain(b.stale_keys())
            .collect(),
    }))
}
