//! `reload` (re-read the config and secrets) and `rotate` (replace one service's key), both admin.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use till_protocol::{ErrorCode, ReloadReply, Response, RotateRequest};

use crate::broker::{Broker, Refusal};
use crate::peer::Peer;
use crate::secret::MIN_SECRET_BYTES;

pub async fn handle(b: &Broker, peer: &Peer) -> Result<Response, Refusal> {
    b.require_admin(peer, "reloading the config")?;
    let summary = crate::reload::reload(b, peer, &format!("till reload by uid {}", peer.uid))
        .map_err(|e| Refusal::new(ErrorCode::BadRequest, e))?;
    Ok(Response::Reloaded(ReloadReply { summary }))
}

/// Writes the new key where the service reads it (a file, replaced atomically, 0600), then
/// reloads. A key from the environment or a systemd credential is rotated at its source.
pub async fn rotate(b: &Broker, peer: &Peer, req: RotateRequest) -> Result<Response, Refusal> {
    b.require_admin(peer, "rotating a key")?;
    let svc = b.service(&req.service)?;
    let secret = req.secret.trim();
    if secret.len() < MIN_SECRET_BYTES || secret.chars().any(char::is_control) {
        return Err(Refusal::bad_request(format!(
            "the new key must be at least {MIN_SECRET_BYTES} bytes without control characters"
        )));
    }
    let Some(path) = svc.config.secret.file.clone() else {
        return Err(Refusal::bad_request(format!(
            "service {}'s key comes from {}; change it there and run `till reload` (or send SIGHUP)",
            req.service,
            svc.config.secret.describe()
        )));
    };
    let tmp = path.with_extension("till-rotate");
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(secret.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        tracing::error!(path = %path.display(), error = %e, "cannot write the rotated key");
        return Err(Refusal::internal(format!(
            "cannot write {}: {e}; the old key keeps serving",
            path.display()
        )));
    }
    let summary = crate::reload::reload(
        b,
        peer,
        &format!("till rotate {} by uid {}", req.service, peer.uid),
    )
    .map_err(|e| Refusal::new(ErrorCode::BadRequest, e))?;
    Ok(Response::Reloaded(ReloadReply { summary }))
}
