//! `pubkey`: the signing public keys, for offline verification.

use till_protocol::{PubkeyReply, Response};

use crate::broker::{Broker, Refusal};
use crate::peer::Peer;

pub async fn handle(b: &Broker, _peer: &Peer) -> Result<Response, Refusal> {
    Ok(Response::Pubkey(PubkeyReply {
        keys: b.keyring.public_keys(),
    }))
}
