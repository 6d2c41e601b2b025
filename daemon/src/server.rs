//! The native socket: accept, read the peer's credentials, handshake, then one request at a time.
//!
//! Bad input never takes the connection's neighbours down: a frame that is not a valid request gets
//! a `bad_frame` reply and the connection lives on; a frame over the limit or cut short gets a reply
//! and the connection is closed (the stream cannot be resynchronised). Logs carry sizes and kinds,
//! never payload bytes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use till_protocol::io::{FrameError, FrameStream};
use till_protocol::{
    ErrorCode, ErrorReply, HelloReply, MAX_FRAME_BYTES, PROTOCOL_VERSION, Request, Response,
};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::broker::Broker;
use crate::handlers::dispatch;
use crate::peer::Peer;

/// How long a connection keeps reading its socket directly after a reply, for the next request
/// (see `till_protocol::io`). Covers a client that turns a reply into its next request without
/// sleeping; a slower one costs this much CPU once, then waits as usual.
const BUSY_POLL: Duration = Duration::from_micros(100);

/// Takes the single-instance lock for `socket` (a `flock` on `<socket>.lock`), held as long as the
/// returned file lives. A second daemon on the same socket fails here, before it touches anything.
pub fn lock(socket: &Path) -> Result<std::fs::File> {
    if let Some(dir) = socket.parent() {
        crate::create_private_dir(dir)?;
    }
    let lock_path = socket.with_file_name(format!(
        "{}.lock",
        socket
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("till.sock")
    ));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open lock file {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        bail!(
            "another tilld is already serving {} (it holds {}); stop it first",
            socket.display(),
            lock_path.display()
        );
    }
    Ok(lock)
}

/// Binds a Unix socket 0600 (under a umask, so it is never more open, even for an instant),
/// removing a stale socket file first. Call with the lock held.
pub fn bind_unix(socket: &Path) -> Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        crate::create_private_dir(dir)?;
    }
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            bail!(
                "something is already listening on {}; stop it first",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("cannot remove stale socket {}", socket.display()))?;
        tracing::info!(socket = %socket.display(), "removed a stale socket file");
    }
    let std_listener =
        crate::sys::with_umask(0o177, || std::os::unix::net::UnixListener::bind(socket))
            .with_context(|| format!("cannot bind {}", socket.display()))?;
    std_listener.set_nonblocking(true)?;
    Ok(UnixListener::from_std(std_listener)?)
}

/// The lock, then the native socket.
pub fn bind(socket: &Path) -> Result<(UnixListener, std::fs::File)> {
    let lock = lock(socket)?;
    Ok((bind_unix(socket)?, lock))
}

/// What an accept loop does when `accept` fails: mostly EMFILE or ENFILE, out of descriptors. The
/// waiting connection stays queued, so trying again at once fails again at once: a loop that only
/// yielded would spin a core and write a log line per try. It waits instead, and logs the first
/// failure and the recovery, not each try in between. The connections already open keep being
/// served meanwhile.
#[derive(Default)]
pub struct AcceptFailures(u64);

/// How long an accept loop waits after a failure before it tries again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

impl AcceptFailures {
    pub async fn failed(&mut self, e: &std::io::Error, listener: &str) {
        if self.0 == 0 {
            tracing::warn!(
                error = %e,
                listener,
                "accept failed; retrying every {ACCEPT_RETRY:?}, without logging each try, while \
                 the connections already open are served"
            );
        }
        self.0 += 1;
        tokio::time::sleep(ACCEPT_RETRY).await;
    }

    pub fn succeeded(&mut self, listener: &str) {
        if self.0 > 0 {
            tracing::warn!(listener, tries = self.0, "accepting connections again");
            self.0 = 0;
        }
    }
}

/// Open connections per uid, and whether the cap was reported since it was last left. Every local
/// user may reach the gateway, and every member of the socket's group the sockets; each connection
/// holds memory (15-30 KB) and a descriptor, so without a cap one uid could take them all, and
/// with the descriptors, everyone else's access.
pub struct OpenConnections {
    counts: Mutex<HashMap<u32, (usize, bool)>>,
    /// What is counted ("gateway connections"), and the config key that sets the cap.
    what: &'static str,
    key: &'static str,
}

/// One counted connection, until dropped.
pub struct Held {
    open: Arc<OpenConnections>,
    uid: u32,
}

impl OpenConnections {
    pub fn new(what: &'static str, key: &'static str) -> OpenConnections {
        OpenConnections {
            counts: Mutex::default(),
            what,
            key,
        }
    }

    /// Counts a connection of `uid`, unless it already holds `max`.
    pub fn take(self: &Arc<Self>, uid: u32, max: usize) -> Option<Held> {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let (n, reported) = map.entry(uid).or_default();
        if *n >= max {
            if !std::mem::replace(reported, true) {
                tracing::warn!(
                    uid,
                    max,
                    "uid {uid} holds {max} {}, the most one uid may ({}); more are refused \
                     until some close",
                    self.what,
                    self.key
                );
            }
            return None;
        }
        *n += 1;
        Some(Held {
            open: self.clone(),
            uid,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut map = self.open.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((n, reported)) = map.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.uid);
            } else {
                *reported = false;
            }
        }
    }
}

/// Accepts on a Unix socket until `shutdown` fires, reads each peer's credentials, and runs
/// `serve_one(stream, peer)` for it on `tracker`; or, for a peer whose uid already holds
/// `daemon.socket_max_connections` (counted over both sockets), `refuse(stream, message)`.
/// Shared by the native and the MCP socket.
pub async fn accept_unix<F, Fut, R, RFut>(
    listener: UnixListener,
    broker: Broker,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    name: &'static str,
    serve_one: F,
    refuse: R,
) where
    F: Fn(UnixStream, Peer) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
    R: Fn(UnixStream, String) -> RFut,
    RFut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut failing = AcceptFailures::default();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                failing.succeeded(name);
                stream
            }
            Err(e) => {
                failing.failed(&e, name).await;
                continue;
            }
        };
        let peer = match Peer::from_unix(&stream) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, socket = name, "cannot read peer credentials; closing");
                continue;
            }
        };
        let max = broker.served().config.socket_max_connections;
        let Some(held) = broker.socket_connections.take(peer.uid, max) else {
            let message = format!(
                "uid {} already holds {max} connections to tilld's sockets, the most one uid \
                 may (daemon.socket_max_connections); close some, or reuse them",
                peer.uid
            );
            tracker.spawn(refuse(stream, message));
            continue;
        };
        let span = tracing::info_span!("conn", socket = name, id = peer.conn, uid = peer.uid, pid = ?peer.pid);
        let conn = serve_one(stream, peer);
        tracker.spawn(
            async move {
                conn.await;
                drop(held);
            }
            .instrument(span),
        );
    }
}

/// Lets a refused peer's first message arrive (briefly) before the answer and the close, so
/// that closing with it unread does not lose the answer (a socket closed with unread bytes resets
/// its peer). For the sockets and the gateway alike.
pub async fn read_briefly(stream: &mut (impl tokio::io::AsyncRead + Unpin)) {
    use tokio::io::AsyncReadExt;
    let mut scratch = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut scratch)).await;
}

/// Serves the native protocol until `shutdown` fires.
pub async fn serve(
    listener: UnixListener,
    broker: Broker,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let s = shutdown.clone();
    let b = broker.clone();
    accept_unix(
        listener,
        broker,
        shutdown,
        tracker,
        "till.sock",
        move |stream, peer| connection(stream, peer, b.clone(), s.clone()),
        |mut stream: UnixStream, message: String| async move {
            read_briefly(&mut stream).await;
            let mut framed = FrameStream::new(stream);
            let _ = framed
                .send_json(&error(ErrorCode::TooManyConnections, message))
                .await;
        },
    )
    .await;
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error(ErrorReply {
        code,
        message: message.into(),
    })
}

/// What a broken frame means to the peer; the connection closes after it.
fn frame_error(e: &FrameError) -> Response {
    let message = match e {
        FrameError::TooBig(_) => format!(
            "frame larger than the limit of {MAX_FRAME_BYTES} bytes; closing the connection"
        ),
        FrameError::Truncated => "truncated frame: the connection ended mid-frame".to_owned(),
        FrameError::Io(_) => "unreadable frame; closing the connection".to_owned(),
    };
    error(ErrorCode::BadFrame, message)
}

async fn connection(stream: UnixStream, peer: Peer, broker: Broker, shutdown: CancellationToken) {
    let mut framed = FrameStream::new(stream).busy_poll(BUSY_POLL, &crate::broker::REQUESTS);
    let first = tokio::select! {
        _ = shutdown.cancelled() => return,
        f = framed.next() => f,
    };
    let hello = match first {
        None => return,
        Some(Err(e)) => {
            tracing::debug!(error = %e, "bad first frame");
            let _ = framed.send_json(&frame_error(&e)).await;
            return;
        }
        Some(Ok(bytes)) => serde_json::from_slice::<Request>(&bytes),
    };
    let reply = match hello {
        Ok(Request::Hello(h)) if h.protocol_version == PROTOCOL_VERSION => None,
        Ok(Request::Hello(h)) => Some(error(
            ErrorCode::VersionMismatch,
            format!(
                "this daemon speaks protocol {PROTOCOL_VERSION} (tilld {}) and the client speaks {}; \
                 upgrade the {} so both match",
                env!("CARGO_PKG_VERSION"),
                h.protocol_version,
                if h.protocol_version < PROTOCOL_VERSION {
                    "client"
                } else {
                    "daemon"
                }
            ),
        )),
        Ok(_) => Some(error(
            ErrorCode::BadRequest,
            "the first message must be hello",
        )),
        Err(e) => Some(error(
            ErrorCode::BadFrame,
            format!("the first message is not a valid hello: {e}"),
        )),
    };
    if let Some(r) = reply {
        let _ = framed.send_json(&r).await;
        return;
    }
    let hello = Response::Hello(HelloReply {
        protocol_version: PROTOCOL_VERSION,
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
    });
    if framed.send_json(&hello).await.is_err() {
        return;
    }
    loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => {
                // Said unasked, so that a request already on its way is known not to have been
                // served (a bare close would leave its sender guessing), and a client checking its
                // idle connection sees it is gone.
                let bye = error(
                    ErrorCode::ShuttingDown,
                    "tilld is stopping, so this request was not served: send it again once tilld \
                     is back (a restart takes a moment)",
                );
                let _ = framed.send_json(&bye).await;
                break;
            }
            f = framed.next() => f,
        };
        let bytes = match frame {
            None => break,
            Some(Err(e)) => {
                tracing::info!(error = %e, "broken frame; closing");
                let _ = framed.send_json(&frame_error(&e)).await;
                break;
            }
            Some(Ok(b)) => b,
        };
        let resp = match serde_json::from_slice::<Request>(&bytes) {
            Ok(req) => {
                let verb = req.verb();
                let resp = dispatch(&broker, &peer, req)
                    .instrument(tracing::debug_span!("req", verb))
                    .await;
                if let Response::Error(e) = &resp {
                    tracing::info!(verb, code = e.code.as_str(), "refused");
                }
                resp
            }
            Err(e) => {
                tracing::info!(size = bytes.len(), kind = ?e.classify(), "undecodable request");
                error(ErrorCode::BadFrame, format!("not a valid request: {e}"))
            }
        };
        if framed.send_json(&resp).await.is_err() {
            break;
        }
    }
}
