//! `services`: what can be minted for, with ceilings and limits. Never a secret or its source.

use till_protocol::{Response, ServiceInfo, ServicesReply};

use crate::broker::{Broker, Refusal};
use crate::peer::Peer;

pub async fn handle(b: &Broker, _peer: &Peer) -> Result<Response, Refusal> {
    let services = b
        .served()
        .services
        .values()
        .map(|s| ServiceInfo {
            name: s.config.name.clone(),
            base_url: s.config.base_url.to_string(),
            inject: s.config.inject.describe(),
            allow: s.config.allow.iter().map(ToString::to_string).collect(),
            max_uses: s.config.max_uses,
            max_ttl_secs: s.config.max_ttl.as_secs(),
        })
        .collect();
    Ok(Response::Services(ServicesReply { services }))
}
