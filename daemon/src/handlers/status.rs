//! `status`: version, uptime, socket, counts.

use till_protocol::{Response, StatusReply, TokenState};

use crate::broker::{Broker, Refusal, now_secs};
use crate::peer::Peer;

pub async fn handle(b: &Broker, _peer: &Peer) -> Result<Response, Refusal> {
    let now = now_secs();
    let live = b
        .tokens()
        .values()
        .filter(|r| r.state(now) == TokenState::Live)
        .count() as u64;
    Ok(Response::Status(StatusReply {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_secs: b.started.elapsed().as_secs(),
        socket: b.config.socket.display().to_string(),
        gateway: None,
        live_tokens: live,
        services: b.services.len() as u64,
    }))
}
