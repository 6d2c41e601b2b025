//! Alerts: something looks wrong; say so in the trail (`alert`), in the log (a warning), and, when
//! configured, to a command or a loopback webhook; and, when the rule says so, revoke every token
//! the offending uid minted.
//!
//! Kinds: `refusal_burst` (more refusals from one peer in 10 s than `alerts.refusal_burst`; later
//! refusals in that window are counted, not logged one by one, so a flood cannot fill the disk),
//! `canary` (a token minted as a tripwire was presented), `holder_mismatch` (a token spent by
//! another uid than the one that minted it), `credential_in_request` (a request carried a master
//! credential Till holds), `trail_discontinuity` (at start, the audit trail did not reach where
//! tilld left it: see `audit::Head`; raised by the daemon itself, so never a revocation),
//! `audit_unwritable` (the trail cannot be written, so every request is refused; raised by the
//! daemon once per failure, never a revocation), `store_unwritable` (the store cannot write, so
//! activations are refused; likewise), `store_damaged` (at start, the store's journals were
//! damaged and some records could not be replayed; raised by the daemon).

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::json;
use till_protocol::TokenId;

use crate::audit::{Event, EventKind, PeerJson};
use crate::broker::{Broker, now_secs};
use crate::peer::{Peer, UNKNOWN_UID};

const WINDOW_SECS: u64 = 10;

/// The alert for a trail cut back or replaced while tilld was stopped.
pub const TRAIL_DISCONTINUITY: &str = "trail_discontinuity";

/// The alert for a store whose journals were found damaged at start: some activation counts or
/// revocations made just before the stop are lost.
pub const STORE_DAMAGED: &str = "store_damaged";

/// The alert for a store that cannot write (a full disk, a failed checkpoint): activations,
/// revocations and mints are refused. Raised once each time it starts failing.
pub const STORE_UNWRITABLE: &str = "store_unwritable";

/// The alert for a trail that cannot be written (a full disk): every request is refused. Raised
/// once per failure; its own trail line cannot be written, the log, command and webhook can.
pub const AUDIT_UNWRITABLE: &str = "audit_unwritable";

/// Raises `kind` each time `failure` turns from nothing to something, saying `say(failure)`,
/// until `shutdown`: once per failure, not once per request that meets it. Watched rather than
/// raised by those requests, since a failure can start with none in flight (a store checkpoint
/// fails on its own schedule).
pub fn watch_failure(
    b: Broker,
    kind: &'static str,
    mut failure: tokio::sync::watch::Receiver<Option<String>>,
    say: impl Fn(&str) -> String + Send + 'static,
    shutdown: tokio_util::sync::CancellationToken,
) {
    tokio::spawn(async move {
        let mut failing = failure.borrow_and_update().is_some();
        loop {
            tokio::select! {
                changed = failure.changed() => if changed.is_err() {
                    return;
                },
                _ = shutdown.cancelled() => return,
            }
            let now = failure.borrow_and_update().clone();
            if let (Some(e), false) = (&now, failing) {
                raise(&b, kind, &Peer::daemon(), None, say(e));
            }
            failing = now.is_some();
        }
    });
}

#[derive(Default)]
struct Window {
    start: u64,
    count: u32,
    suppressed: u64,
}

/// Refusal windows and alert windows, per uid. Not per process: an agent runs `till` once per
/// command, so each refusal of a loop would come from a new pid, and no burst would ever be seen.
#[derive(Default)]
pub struct Bursts {
    windows: Mutex<HashMap<u32, Window>>,
    alerts: Mutex<HashMap<(&'static str, u32), Window>>,
}

/// What to do with one refusal.
pub enum Refusals {
    /// Write its `deny` line.
    Log,
    /// Write its line, then raise the burst alert (the limit was just reached).
    LogAndAlert,
    /// Count it only.
    Suppress,
}

impl Bursts {
    /// Counts a refusal from `peer`'s uid; returns what to write, and how many refusals of the
    /// uid's previous window went unlogged (to be summed up in one line).
    pub fn refusal(&self, peer: &Peer, limit: u32) -> (Refusals, u64) {
        if limit == 0 {
            return (Refusals::Log, 0);
        }
        let now = now_secs();
        let mut map = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, w| now < w.start + WINDOW_SECS);
        }
        let w = map.entry(peer.uid).or_default();
        let mut carried = 0;
        if now >= w.start + WINDOW_SECS {
            carried = w.suppressed;
            *w = Window {
                start: now,
                count: 0,
                suppressed: 0,
            };
        }
        w.count += 1;
        let what = if w.count < limit {
            Refusals::Log
        } else if w.count == limit {
            Refusals::LogAndAlert
        } else {
            w.suppressed += 1;
            Refusals::Suppress
        };
        (what, carried)
    }

    /// Whether an alert of `kind` from `peer`'s uid is raised (`Some`, with how many of the
    /// previous window's went unraised) or only counted: one per kind and uid every
    /// `WINDOW_SECS`. Keyed by uid, not pid: a loop of `till call`s is a new pid each time.
    fn alert(&self, kind: &'static str, peer: &Peer) -> Option<u64> {
        let now = now_secs();
        let mut map = self.alerts.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, w| now < w.start + WINDOW_SECS);
        }
        let w = map.entry((kind, peer.uid)).or_default();
        if w.count > 0 && now < w.start + WINDOW_SECS {
            w.suppressed += 1;
            return None;
        }
        let carried = w.suppressed;
        *w = Window {
            start: now,
            count: 1,
            suppressed: 0,
        };
        Some(carried)
    }
}

/// Every environment variable that holds, or may hold, a master key: the ones services read now,
/// and every preset's (a reload may have stopped reading one that is still set).
fn key_variables(b: &Broker) -> Vec<String> {
    let mut names: Vec<String> = b
        .served()
        .services
        .values()
        .filter_map(|s| s.config.secret.env.clone())
        .collect();
    for p in crate::presets::PRESETS {
        names.extend(p.env.iter().map(|e| (*e).to_owned()));
    }
    names.sort();
    names.dedup();
    names
}

/// Raises an alert: the trail, the log, the command and webhook; then the revocation if the rule
/// asks for it. Never fails the request that triggered it. The same alert from the same uid is
/// raised once in `WINDOW_SECS` and counted meanwhile (the next one says how many): a loop
/// presenting a canary must not start a process, a webhook call and a trail line per try. The
/// revocation is done every time (tokens minted meanwhile go too).
pub fn raise(b: &Broker, kind: &'static str, peer: &Peer, token: Option<TokenId>, what: String) {
    b.metrics.refusal_alert(kind);
    let Some(carried) = b.bursts.alert(kind, peer) else {
        revoke_if_asked(b, kind, peer, false);
        return;
    };
    let what = if carried > 0 {
        format!(
            "{what} (and {carried} more time(s) from this uid in the previous window, not raised one by one)"
        )
    } else {
        what
    };
    tracing::warn!(alert = kind, uid = peer.uid, "{what}");
    let event = Event {
        token_id: token.map(|t| t.to_string()),
        peer: Some(PeerJson::from(peer)),
        reason: Some(format!("{kind}: {what}")),
        ..Event::default()
    };
    if let Err(e) = b.audit.record(EventKind::Alert, event) {
        tracing::error!(error = %e, "could not audit an alert");
    }
    let cfg = b.served().config.alerts.clone();
    let payload = json!({
        "alert": kind,
        "message": what,
        "token_id": token.map(|t| t.to_string()),
        "peer": PeerJson::from(peer),
    })
    .to_string();
    if let Some(cmd) = cfg.command.clone() {
        let payload = payload.clone();
        let keys = key_variables(b);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut command = tokio::process::Command::new("/bin/sh");
            // The command runs with tilld's environment, less every variable a key may be in.
            for k in &keys {
                command.env_remove(k);
            }
            let child = command
                .arg("-c")
                .arg(&cmd)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn();
            match child {
                Ok(mut c) => {
                    if let Some(mut stdin) = c.stdin.take() {
                        let _ = stdin.write_all(payload.as_bytes()).await;
                    }
                    let _ = c.wait().await;
                }
                Err(e) => tracing::warn!(error = %e, "the alert command could not be started"),
            }
        });
    }
    if let Some(url) = cfg.webhook.clone() {
        let payload = payload.clone();
        tokio::spawn(async move {
            // The webhook is on loopback (the config allows nothing else): a proxy from the
            // environment would never reach it.
            let client = reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build();
            if let Ok(c) = client {
                let sent = c
                    .post(url)
                    .header("content-type", "application/json")
                    .body(payload)
                    .timeout(std::time::Duration::from_secs(5))
                    .send()
                    .await;
                if sent.is_err() {
                    tracing::warn!("the alert webhook could not be reached");
                }
            }
        });
    }
    revoke_if_asked(b, kind, peer, true);
}

/// `revoke_peer_on`: every live token the peer's uid minted. Written to the trail when the alert
/// was raised, or when it revoked anything.
fn revoke_if_asked(b: &Broker, kind: &'static str, peer: &Peer, raised: bool) {
    let cfg = &b.served().config.alerts;
    if !cfg.revoke_peer_on.iter().any(|k| k == kind) || peer.uid == UNKNOWN_UID {
        return;
    }
    let n = b.revoke_minted_by(peer.uid, kind, raised);
    if raised || n > 0 {
        tracing::warn!(
            alert = kind,
            uid = peer.uid,
            revoked = n,
            "revoked every token this uid minted"
        );
    }
}
