//! Live reload: the config and every secret file are re-read on SIGHUP, on `till reload`, and when
//! a watched file changes. All or nothing: a config that does not parse, or whose secrets cannot all
//! be read, is refused (logged and audited with the reason) and the old one keeps serving.
//!
//! What a reload changes: services (added, removed: their live tokens are refused as "no service
//! named ..."; ceilings: they apply to tokens minted afterwards), keys (new requests use the new key;
//! requests in flight finish with the one they started with), limits and policy. What it cannot
//! change without a restart (sockets, state dir, trail, gateway address) is kept, with a warning.
//!
//! Watching: `notify` (inotify) on the *directories* of the config and of every secret file, since
//! editors and secret managers replace files by rename. An event for an entry that a watched file
//! is a symlink through reloads if the file now resolves to something else (a Kubernetes `..data`
//! symlink swap).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio_util::sync::CancellationToken;

use crate::audit::{Event, EventKind, PeerJson};
use crate::broker::{Broker, Served};
use crate::config::Config;
use crate::peer::Peer;

/// Events closer together than this are one change (an editor's write, rename and chmod).
const SETTLE: Duration = Duration::from_millis(100);

/// Re-reads everything and swaps it in. Returns a summary, or why the new config was refused.
pub fn reload(b: &Broker, peer: &Peer, why: &str) -> Result<String, String> {
    let old = b.served();
    let result = (|| -> anyhow::Result<(Served, Vec<String>)> {
        let mut next = match &old.config.source {
            Some(path) => Config::from_file(path)?,
            None => Config::builtin(crate::sys::uid())?,
        };
        let mut kept = Vec::new();
        let o = &old.config;
        if next.socket != o.socket || next.mcp_socket != o.mcp_socket {
            kept.push("socket paths");
            next.socket = o.socket.clone();
            next.mcp_socket = o.mcp_socket.clone();
        }
        if next.state_dir != o.state_dir || next.audit_log != o.audit_log {
            kept.push("state_dir and audit_log");
            next.state_dir = o.state_dir.clone();
            next.audit_log = o.audit_log.clone();
        }
        if next.gateway != o.gateway
            && !(o.gateway.is_some_and(|g| g.port() != 0)
                && next.gateway.is_some_and(|g| g.port() == 0))
        {
            kept.push("the gateway address");
        }
        next.gateway = o.gateway;
        next.source = o.source.clone();
        let warnings = kept
            .into_iter()
            .map(|k| format!("{k} changed; that takes a restart, the old value is kept"))
            .collect();
        Ok((Served::build(next.load_secrets()?)?, warnings))
    })();
    let mut event = Event {
        peer: Some(PeerJson::from(peer)),
        ..Event::default()
    };
    match result {
        Ok((next, warnings)) => {
            let before: BTreeSet<&String> = old.services.keys().collect();
            let after: BTreeSet<&String> = next.services.keys().collect();
            let added: Vec<&str> = after.difference(&before).map(|s| s.as_str()).collect();
            let removed: Vec<&str> = before.difference(&after).map(|s| s.as_str()).collect();
            let mut summary = format!("reloaded ({why}): {} service(s)", next.services.len());
            if !added.is_empty() {
                summary.push_str(&format!(", added {}", added.join(", ")));
            }
            if !removed.is_empty() {
                summary.push_str(&format!(", removed {}", removed.join(", ")));
            }
            for w in &warnings {
                tracing::warn!("{w}");
                summary.push_str(&format!("; {w}"));
            }
            // Audited before it takes effect: a reload that cannot be audited does not happen, and
            // whoever sees the new config can find its line in the trail.
            event.reason = Some(summary.clone());
            b.audit(EventKind::Reload, event).map_err(|r| r.message)?;
            b.replace_served(next);
            for w in b.stale_keys() {
                tracing::warn!("{w}");
            }
            tracing::info!("{summary}");
            Ok(summary)
        }
        Err(e) => {
            // The cause chain names keys, lines and paths, never a secret's bytes.
            let why_not = format!("{e:#}");
            tracing::error!(reason = %why_not, "reload refused; the old config keeps serving");
            event.reason = Some(format!("refused ({why}): {why_not}"));
            let _ = b.audit(EventKind::Reload, event);
            Err(format!(
                "the new config was refused and the old one keeps serving: {why_not}"
            ))
        }
    }
}

/// The files whose change means a reload: the config and every secret file it names. Absolute,
/// as the paths of inotify's events are (`tilld --config till.toml` names a relative one).
fn watched_files(b: &Broker) -> BTreeSet<PathBuf> {
    let served = b.served();
    let mut files = BTreeSet::new();
    if let Some(p) = &served.config.source {
        files.insert(p.clone());
    }
    for svc in served.config.services.values() {
        if let Ok(Some(p)) = svc.secret.path() {
            files.insert(p);
        }
    }
    files
        .into_iter()
        .map(|p| std::path::absolute(&p).unwrap_or(p))
        .collect()
}

/// Whether an event can mean a file's content changed. inotify also reports every open of a
/// watched file, the daemon's own reads during a reload included: taken for changes, those made
/// each reload trigger the next, forever.
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    match kind {
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
    }
}

/// Watches the directories of `files` that are not watched yet.
fn watch_new_dirs(
    watcher: &mut notify::RecommendedWatcher,
    files: &BTreeSet<PathBuf>,
    watching: &mut BTreeSet<PathBuf>,
) {
    for d in dirs(files) {
        if watching.contains(&d) {
            continue;
        }
        match watcher.watch(&d, RecursiveMode::NonRecursive) {
            Ok(()) => {
                watching.insert(d);
            }
            Err(e) => tracing::warn!(dir = %d.display(), error = %e, "cannot watch"),
        }
    }
}

/// The entries, beside a watched file, that the file is a relative symlink through: for
/// Kubernetes' `key -> ..data/key`, the `..data` beside it. Only events for these (or for the files
/// themselves) are worth a look: the others, such as an audit trail's appends, are passed over at
/// the cost of a set lookup.
fn symlinked_through(files: &BTreeSet<PathBuf>) -> BTreeSet<PathBuf> {
    files
        .iter()
        .filter_map(|f| {
            let target = std::fs::read_link(f).ok()?;
            match target.components().next()? {
                std::path::Component::Normal(first) => Some(f.parent()?.join(first)),
                _ => None,
            }
        })
        .collect()
}

/// What each watched file resolves to (symlinks followed): device, inode, modification time and
/// size; `None` for a file that cannot be read.
type Stamp = Option<(u64, u64, i64, i64, u64)>;

fn stamps(files: &BTreeSet<PathBuf>) -> std::collections::BTreeMap<PathBuf, Stamp> {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|f| {
            let stamp = std::fs::metadata(f)
                .ok()
                .map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.size()));
            (f.clone(), stamp)
        })
        .collect()
}

fn dirs(files: &BTreeSet<PathBuf>) -> BTreeSet<PathBuf> {
    files
        .iter()
        .filter_map(|f| f.parent().map(Path::to_owned))
        .collect()
}

/// Reloads on SIGHUP and when a watched file changes, until `shutdown`.
pub fn spawn(b: Broker, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && is_change(&ev.kind)
        {
            for p in ev.paths {
                let _ = tx.send(p);
            }
        }
    })?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut files = watched_files(&b);
    let audit_dir = b.served().config.audit_log.parent().map(Path::to_owned);
    if let Some(d) = audit_dir.filter(|d| dirs(&files).contains(d)) {
        // inotify reports every write in a watched directory, the trail's appends included.
        tracing::warn!(
            dir = %d.display(),
            "the audit trail is in a directory watched for config changes, so each audit line \
             also wakes the watcher; move `audit_log` out of it (by default it is in `state_dir`) \
             to save that work on every request"
        );
    }
    let mut seen = stamps(&files);
    let mut via = symlinked_through(&files);
    let mut watching = BTreeSet::new();
    // The first watches are in place before this returns, so before the daemon says it is ready:
    // a change made right after start is not missed.
    watch_new_dirs(&mut watcher, &files, &mut watching);
    tokio::spawn(async move {
        let daemon = Peer::daemon();
        loop {
            watch_new_dirs(&mut watcher, &files, &mut watching);
            let why = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = hup.recv() => "SIGHUP".to_string(),
                Some(path) = rx.recv() => {
                    // Another entry of a watched directory may be how a watched file changes:
                    // Kubernetes swaps a `..data` symlink that the file's own symlink goes
                    // through. Then what the file resolves to is new.
                    let changed = if files.contains(&path) {
                        Some(path)
                    } else if via.contains(&path) {
                        let now = stamps(&files);
                        files.iter().find(|f| now.get(*f) != seen.get(*f)).cloned()
                    } else {
                        None
                    };
                    let Some(changed) = changed else {
                        continue;
                    };
                    // Let the rest of this change arrive (write, rename, chmod), then reload once.
                    tokio::time::sleep(SETTLE).await;
                    while rx.try_recv().is_ok() {}
                    format!("{} changed", changed.display())
                }
            };
            let _ = reload(&b, &daemon, &why);
            files = watched_files(&b);
            seen = stamps(&files);
            via = symlinked_through(&files);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use notify::EventKind;
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, MetadataKind, ModifyKind, RemoveKind,
        RenameMode,
    };

    use super::is_change;

    #[test]
    fn opening_or_reading_a_watched_file_is_no_change() {
        // What the daemon's own reload does to the files it watches: it must not trigger another.
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Any),
            EventKind::Any,
            EventKind::Other,
        ] {
            assert!(!is_change(&kind), "{kind:?}");
        }
        for kind in [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Permissions)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Remove(RemoveKind::File),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
        ] {
            assert!(is_change(&kind), "{kind:?}");
        }
    }
}
