//! `pubkey`: the signing public keys, for offline verification.

use till_protocol::{PubkeyReply, Response};

use crate::audit::{Event, EventKind, PeerJson};
use crate::broker::{Broker, Refusal};
use crate::peer::Peer;

pub async fn handle(b: &Broker, _peer: &Peer) -> Result<Response, Refusal> {
    Ok(Response::Pubkey(PubkeyReply {
        keys: b.keyring.public_keys(),
        audit_key: Some(audit_key(b)),
    }))
}

/// `rotate-signing-key` (admin): a new key signs from now on; the old one keeps verifying the
/// tokens it signed until the last of them expires, then retires.
pub async fn rotate(b: &Broker, peer: &Peer) -> Result<Response, Refusal> {
    b.require_admin(peer, "rotating the signing key")?;
    let now = crate::broker::now_secs();
    let old = b.keyring.current_id().to_string();
    let retire_at = b
        .tokens()
        .values()
        .filter(|r| r.key_id == old)
        .filter_map(|r| r.expires_at)
        .max()
        .unwrap_or(now)
        .max(now);
    let (old, new) = b.keyring.rotate(retire_at).map_err(|e| {
        tracing::error!(error = %format!("{e:#}"), "signing-key rotation failed");
        Refusal::internal("the signing key could not be rotated; the old one stays current (see the daemon's log)")
    })?;
    b.audit(
        EventKind::Reload,
        Event {
            peer: Some(PeerJson::from(peer)),
            reason: Some(format!(
                "signing key rotated: {new} is current; {old} retires at {retire_at}"
            )),
            ..Event::default()
        },
    )?;
    Ok(Response::Pubkey(PubkeyReply {
        keys: b.keyring.public_keys(),
        audit_key: Some(audit_key(b)),
    }))
}

fn audit_key(b: &Broker) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b.audit.public_key().as_bytes())
}
