//! An agent host's stdio, handed over by `till mcp` (`SCM_RIGHTS`) and served here directly, in a
//! way that outlives this daemon: a restart does not end the host's session.
//!
//! Why a transport of our own rather than rmcp's stdio one: on shutdown the daemon must stop
//! reading the host's input at a message boundary, answer every request it already took (the
//! spec's "finish in-flight requests"), and give back the input it read but did not serve. rmcp's
//! transport keeps its read buffer private and its service loop drops open requests when its
//! input ends. So [`HostTransport`] reads whole lines itself, tracks which requests are open, and
//! on drop returns the unread rest; rmcp's codec still writes the answers.
//!
//! The lifeline (the hand-off's connection, which `till mcp` holds) carries [`McpNotice`]s: the
//! host's `initialize` parameters once the session is up, the requests open at each moment
//! (`open`), then either `end` (the host left) or `resume` and the pending input (this daemon is
//! stopping). `till mcp` hands a resumed session to the next daemon with
//! [`till_protocol::MCP_RESUME`]; without any notice (the daemon was killed) it answers the
//! requests last reported open with what happened, and resumes too, with nothing pending.

use std::collections::HashMap;
use std::future::Future;

use rmcp::ServiceExt;
use rmcp::model::{ClientJsonRpcMessage, ClientNotification, ErrorData, RequestId};
use rmcp::model::{InitializeRequestParams, ServerJsonRpcMessage};
use rmcp::service::RoleServer;
use rmcp::transport::Transport;
use rmcp::transport::async_rw::AsyncRwTransport;
use till_protocol::{MCP_MAX_LINE_BYTES, MCP_NOTICE_MAX_BYTES, McpNotice, McpResume, OpenRequest};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::mcp::{Reader, TillMcp, Writer};

/// The requests a session has taken and not yet answered, with their methods.
type Open = watch::Sender<HashMap<RequestId, String>>;

/// rmcp's transport over the host's stdio, reading whole lines itself (see the module docs).
pub struct HostTransport {
    input: BufReader<Reader>,
    /// The line being read; kept across a cancelled read, as rmcp polls `receive` in a `select!`.
    line: Vec<u8>,
    /// Dropping the rest of a line that was over [`MCP_MAX_LINE_BYTES`].
    discarding: bool,
    /// rmcp's own codec for what the daemon writes (its reader is never used).
    out: AsyncRwTransport<RoleServer, tokio::io::Empty, Writer>,
    /// Once cancelled, nothing more is read: the session is draining.
    stop: CancellationToken,
    open: std::sync::Arc<Open>,
    /// Where the unread input goes when the transport is dropped.
    unread: Option<oneshot::Sender<Vec<u8>>>,
}

impl HostTransport {
    fn new(
        input: Reader,
        output: Writer,
        stop: CancellationToken,
        open: std::sync::Arc<Open>,
        unread: oneshot::Sender<Vec<u8>>,
    ) -> Self {
        HostTransport {
            input: BufReader::new(input),
            line: Vec::new(),
            discarding: false,
            out: AsyncRwTransport::new(tokio::io::empty(), output),
            stop,
            open,
            unread: Some(unread),
        }
    }

    /// Reads until `self.line` holds one whole line; false at the end of input (or an error).
    /// Cancel-safe: bytes move from the buffer to `self.line` with no await in between.
    async fn read_line(&mut self) -> bool {
        loop {
            let available = match self.input.fill_buf().await {
                Ok([]) => return false,
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "the agent host's input failed");
                    return false;
                }
            };
            let newline = memchr::memchr(b'\n', available);
            let take = newline.map_or(available.len(), |i| i + 1);
            let whole = newline.is_some();
            if self.discarding {
                self.discarding = !whole;
            } else if self.line.len() + take > MCP_MAX_LINE_BYTES {
                tracing::warn!(
                    limit = MCP_MAX_LINE_BYTES,
                    "an MCP message over the size limit was dropped"
                );
                self.line.clear();
                self.discarding = !whole;
            } else {
                self.line.extend_from_slice(&available[..take]);
                if whole {
                    self.input.consume(take);
                    return true;
                }
            }
            self.input.consume(take);
        }
    }
}

impl Transport<RoleServer> for HostTransport {
    type Error = std::io::Error;

    fn send(
        &mut self,
        item: ServerJsonRpcMessage,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        let answers = match &item {
            ServerJsonRpcMessage::Response(r) => Some(r.id.clone()),
            ServerJsonRpcMessage::Error(e) => e.id.clone(),
            _ => None,
        };
        let open = self.open.clone();
        let sent = self.out.send(item);
        async move {
            let r = sent.await;
            // Only once written: a draining session ends when nothing is open.
            if let Some(id) = answers {
                open.send_modify(|o| {
                    o.remove(&id);
                });
            }
            r
        }
    }

    async fn receive(&mut self) -> Option<ClientJsonRpcMessage> {
        loop {
            let stop = self.stop.clone();
            tokio::select! {
                biased;
                // Draining: the rest of the input is for the next daemon.
                _ = stop.cancelled() => std::future::pending::<()>().await,
                got = self.read_line() => if !got {
                    return None;
                },
            }
            let line = std::mem::take(&mut self.line);
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<ClientJsonRpcMessage>(text) {
                Ok(m) => {
                    match &m {
                        ClientJsonRpcMessage::Request(r) => {
                            let (id, method) = (r.id.clone(), r.request.method().to_owned());
                            self.open.send_modify(|o| {
                                o.insert(id, method);
                            });
                        }
                        // A cancelled request gets no answer.
                        ClientJsonRpcMessage::Notification(n) => {
                            if let ClientNotification::CancelledNotification(c) = &n.notification
                                && let Some(id) = &c.params.request_id
                            {
                                self.open.send_modify(|o| {
                                    o.remove(id);
                                });
                            }
                        }
                        _ => {}
                    }
                    return Some(m);
                }
                Err(e) => {
                    // As rmcp does: input that is not JSON is ignored (answering it can start an
                    // error storm with a peer that echoes), and so is a notification that does not
                    // parse (it gets no answer anyway); other JSON of the wrong shape is an
                    // invalid request.
                    let value = serde_json::from_slice::<serde_json::Value>(text).ok();
                    let Some(value) = value else {
                        tracing::debug!(bytes = text.len(), "ignoring MCP input that is not JSON");
                        continue;
                    };
                    let id = value
                        .get("id")
                        .and_then(|v| serde_json::from_value::<RequestId>(v.clone()).ok());
                    if id.is_none() && value.get("method").is_some() {
                        continue;
                    }
                    // Its kind and place, never its text: serde quotes values, a token perhaps.
                    tracing::debug!(
                        bytes = text.len(),
                        kind = ?e.classify(),
                        column = e.column(),
                        "an MCP message of the wrong shape"
                    );
                    let reply = ServerJsonRpcMessage::error(
                        ErrorData::invalid_request("Invalid request", None),
                        id,
                    );
                    if self.out.send(reply).await.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.out.close().await
    }
}

impl Drop for HostTransport {
    fn drop(&mut self) {
        if let Some(tx) = self.unread.take() {
            let mut rest = std::mem::take(&mut self.line);
            rest.extend_from_slice(self.input.buffer());
            let _ = tx.send(rest);
        }
    }
}

/// Reads what follows [`till_protocol::MCP_RESUME`]: the [`McpResume`] line and its pending bytes.
pub async fn read_resume(
    stream: &mut tokio::net::UnixStream,
) -> Result<(Option<InitializeRequestParams>, Vec<u8>), String> {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    (&mut reader)
        .take(MCP_NOTICE_MAX_BYTES as u64)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("the resume could not be read ({e})"))?;
    let resume: McpResume = serde_json::from_slice(&line)
        .map_err(|e| format!("the resume is not what this daemon reads ({e})"))?;
    if resume.pending > MCP_MAX_LINE_BYTES {
        return Err(format!(
            "the resume carries {} bytes of input, more than {MCP_MAX_LINE_BYTES}",
            resume.pending
        ));
    }
    let client = match resume.client {
        None => None,
        Some(v) => Some(
            serde_json::from_value(v)
                .map_err(|e| format!("the resume's client is not what this daemon reads ({e})"))?,
        ),
    };
    // Grown as the bytes come, not allocated from the claim.
    let mut pending = Vec::new();
    reader
        .take(resume.pending as u64)
        .read_to_end(&mut pending)
        .await
        .map_err(|e| format!("the resume's pending input could not be read ({e})"))?;
    if pending.len() != resume.pending {
        return Err(format!(
            "the resume ended after {} of its {} pending bytes",
            pending.len(),
            resume.pending
        ));
    }
    Ok((client, pending))
}

/// How a handed-over session ended, which decides what the lifeline is told.
enum Ended {
    /// The host closed its input (or its pipes failed): tell `till mcp` to exit.
    HostLeft,
    /// `till mcp` died: nobody to tell.
    Orphaned,
    /// The daemon is stopping: hand back the unread input.
    Draining,
}

/// Serves a handed-over session until the host leaves, `till mcp` dies or the daemon shuts down
/// (then it finishes the requests it took and gives the session back; see the module docs).
/// `resumed`: the session was begun with an earlier daemon, with these `initialize` parameters.
pub async fn serve(
    server: TillMcp,
    input: Reader,
    output: Writer,
    lifeline: tokio::net::UnixStream,
    resumed: Option<Option<InitializeRequestParams>>,
    shutdown: CancellationToken,
) {
    let (mut gone_r, mut lifeline) = lifeline.into_split();
    let gone = async move {
        let mut b = [0u8; 64];
        while matches!(gone_r.read(&mut b).await, Ok(n) if n > 0) {}
    };
    let mut gone = std::pin::pin!(gone);
    let stop = CancellationToken::new();
    let open = std::sync::Arc::new(watch::Sender::new(HashMap::new()));
    let (unread_tx, unread_rx) = oneshot::channel();
    let transport = HostTransport::new(input, output, stop.clone(), open.clone(), unread_tx);

    let running = match resumed {
        Some(client) => rmcp::service::serve_directly(server, transport, client),
        None => {
            let started = tokio::select! {
                r = server.serve(transport) => r,
                _ = &mut gone => return,
                // Stopping before the host initialized: give back all it sent, unless rmcp has
                // already taken its `initialize` (then the host waits on an answer no daemon can
                // give, and only ending the session tells it).
                _ = shutdown.cancelled() => {
                    let nothing_taken = open.borrow().is_empty();
                    let unread = unread_rx.await.unwrap_or_default();
                    tell(&mut lifeline, nothing_taken.then_some(unread)).await;
                    return;
                }
            };
            match started {
                Ok(r) => {
                    if let Some(info) = r.peer().peer_info() {
                        let params = serde_json::to_value(&*info).unwrap_or_default();
                        write_notice(&mut lifeline, &McpNotice::Client { params }, &[]).await;
                    }
                    r
                }
                Err(e) => {
                    tracing::debug!(error = %e, "mcp session ended before initialize");
                    tell(&mut lifeline, None).await;
                    return;
                }
            }
        }
    };
    let ct = running.cancellation_token();
    let mut done = std::pin::pin!(running.waiting());
    // The open requests are reported REPORT_OPEN_AFTER a change, not at once: most requests are
    // answered before then, and need no notice (each would wake `till mcp`).
    let mut changed = open.subscribe();
    let mut told = HashMap::new();
    let report = tokio::time::sleep(REPORT_OPEN_AFTER);
    let mut report = std::pin::pin!(report);
    let mut armed = false;
    let ended = loop {
        tokio::select! {
            r = &mut done => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "mcp session ended");
                }
                break Ended::HostLeft;
            }
            _ = &mut gone => break Ended::Orphaned,
            _ = shutdown.cancelled() => break Ended::Draining,
            Ok(()) = changed.changed() => {
                // A reported request that was answered is reported at once: else, killed in
                // the next 10 ms, this daemon would have `till mcp` answer it a second time.
                let answered = {
                    let now = changed.borrow_and_update();
                    told.keys().any(|id| !now.contains_key(id))
                };
                if answered {
                    armed = false;
                    report_open(&mut lifeline, &open, &mut told).await;
                } else if !armed {
                    report.as_mut().reset(tokio::time::Instant::now() + REPORT_OPEN_AFTER);
                    armed = true;
                }
            }
            () = &mut report, if armed => {
                armed = false;
                report_open(&mut lifeline, &open, &mut told).await;
            }
        }
    };
    match ended {
        Ended::HostLeft => tell(&mut lifeline, None).await,
        Ended::Orphaned => {
            ct.cancel();
            let _ = done.await;
        }
        Ended::Draining => {
            stop.cancel();
            let mut answered = open.subscribe();
            let drained = tokio::select! {
                _ = answered.wait_for(HashMap::is_empty) => true,
                _ = &mut done => false,
                _ = &mut gone => return,
            };
            if !drained {
                tell(&mut lifeline, None).await;
                return;
            }
            ct.cancel();
            let _ = done.await;
            let unread = unread_rx.await.unwrap_or_default();
            tracing::debug!(
                pending = unread.len(),
                "an MCP session handed back to `till mcp` for the next daemon"
            );
            tell(&mut lifeline, Some(unread)).await;
        }
    }
}

/// How long after the set of open requests changes `till mcp` is told of it. A request answered
/// sooner is never reported: if the daemon is killed in that moment, the host waits on it.
const REPORT_OPEN_AFTER: std::time::Duration = std::time::Duration::from_millis(10);

/// Tells `till mcp` the requests open now, unless that is what it was last told (`told`), so
/// that if this daemon is killed the host still hears about them.
async fn report_open(
    lifeline: &mut tokio::net::unix::OwnedWriteHalf,
    open: &Open,
    told: &mut HashMap<RequestId, String>,
) {
    let now = open.borrow().clone();
    if now == *told {
        return;
    }
    let requests = now
        .iter()
        .map(|(id, method)| OpenRequest {
            id: serde_json::to_value(id).unwrap_or_default(),
            method: method.clone(),
        })
        .collect();
    write_notice(lifeline, &McpNotice::Open { requests }, &[]).await;
    tracing::debug!(open = now.len(), "open MCP requests reported to till mcp");
    *told = now;
}

/// `Some(unread)`: resume with the next daemon; `None`: the session is over.
async fn tell(lifeline: &mut tokio::net::unix::OwnedWriteHalf, resume: Option<Vec<u8>>) {
    match resume {
        Some(unread) => {
            let notice = McpNotice::Resume {
                pending: unread.len(),
            };
            write_notice(lifeline, &notice, &unread).await;
        }
        None => write_notice(lifeline, &McpNotice::End, &[]).await,
    }
}

async fn write_notice(
    lifeline: &mut tokio::net::unix::OwnedWriteHalf,
    notice: &McpNotice,
    then: &[u8],
) {
    let mut bytes = serde_json::to_vec(notice).unwrap_or_default();
    bytes.push(b'\n');
    bytes.extend_from_slice(then);
    // `till mcp` may be gone; then nobody is left to tell.
    let _ = lifeline.write_all(&bytes).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt as _;
    use rmcp::model::{EmptyResult, NumberOrString, ServerResult};

    fn transport() -> (
        HostTransport,
        tokio::io::DuplexStream,
        tokio::io::DuplexStream,
        CancellationToken,
        std::sync::Arc<Open>,
        oneshot::Receiver<Vec<u8>>,
    ) {
        let (host_in, input) = tokio::io::duplex(1 << 16);
        let (output, host_out) = tokio::io::duplex(1 << 16);
        let stop = CancellationToken::new();
        let open = std::sync::Arc::new(watch::Sender::new(HashMap::new()));
        let (tx, rx) = oneshot::channel();
        let t = HostTransport::new(
            Box::new(input),
            Box::new(output),
            stop.clone(),
            open.clone(),
            tx,
        );
        (t, host_in, host_out, stop, open, rx)
    }

    #[tokio::test]
    async fn a_draining_session_reads_no_further_and_gives_back_what_it_did_not_serve() {
        let (mut t, mut host_in, _host_out, stop, open, unread) = transport();
        let cut = b"{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"pi";
        let mut sent = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n".to_vec();
        sent.extend_from_slice(cut);
        host_in.write_all(&sent).await.expect("write");

        let first = t.receive().await.expect("a request");
        assert!(
            matches!(first, ClientJsonRpcMessage::Request(ref r) if r.id == NumberOrString::Number(1))
        );
        assert!(open.borrow().contains_key(&NumberOrString::Number(1)));
        // The second line is not whole yet: nothing comes, and the bytes wait in the transport.
        assert!(t.receive().now_or_never().is_none());

        // Answered once written: the drain waits on exactly this.
        let answer = ServerJsonRpcMessage::response(
            ServerResult::EmptyResult(EmptyResult {}),
            NumberOrString::Number(1),
        );
        t.send(answer).await.expect("send");
        assert!(open.borrow().is_empty());

        // Draining: a line completed now is not read; its end stays in the pipe for the next
        // daemon, and the start the transport holds comes back.
        stop.cancel();
        host_in.write_all(b"ng\"}\n").await.expect("write");
        assert!(t.receive().now_or_never().is_none());
        drop(t);
        assert_eq!(unread.await.expect("unread"), cut);
    }

    #[tokio::test]
    async fn a_cancelled_request_is_not_waited_for_and_bad_lines_do_not_end_the_session() {
        let (mut t, mut host_in, mut host_out, _stop, open, _unread) = transport();
        host_in
            .write_all(
                b"not json\n\n{\"jsonrpc\":\"2.0\",\"method\":\"notifications/unknown\"}\n\
                  {\"jsonrpc\":\"2.0\",\"id\":7,\"nope\":1}\n\
                  {\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"ping\"}\n\
                  {\"jsonrpc\":\"2.0\",\"method\":\"notifications/cancelled\",\"params\":{\"requestId\":3}}\n",
            )
            .await
            .expect("write");
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(t.receive().await.expect("a message"));
            if got.len() == 2 {
                assert!(
                    matches!(got[1], ClientJsonRpcMessage::Request(ref r) if r.id == NumberOrString::Number(3))
                );
                assert!(!open.borrow().is_empty());
            }
        }
        // The unknown notification passes (rmcp ignores it), then the ping, then its cancellation.
        assert!(matches!(got[0], ClientJsonRpcMessage::Notification(_)));
        assert!(matches!(got[2], ClientJsonRpcMessage::Notification(_)));
        assert!(open.borrow().is_empty());
        // The line of the wrong shape got an invalid-request error with its id; the others nothing.
        drop(host_in);
        assert!(t.receive().await.is_none(), "end of input ends the session");
        drop(t);
        let mut out = String::new();
        host_out.read_to_string(&mut out).await.expect("read");
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 1, "{out}");
        assert_eq!(lines[0]["id"], 7);
        assert_eq!(lines[0]["error"]["code"], -32600);
    }

    /// rmcp polls `receive` inside a `select!` and drops it whenever another branch is ready, so
    /// a read may stop anywhere: input cut at random, each read tried once and dropped when not
    /// ready, still gives every message whole, once, in order.
    #[tokio::test]
    async fn messages_come_whole_and_in_order_however_input_is_cut_and_reads_dropped() {
        let (mut t, mut host_in, _host_out, _stop, _open, _unread) = transport();
        let all: Vec<u8> = (0..300)
            .map(|i| format!("{{\"jsonrpc\":\"2.0\",\"id\":{i},\"method\":\"ping\"}}\n"))
            .collect::<String>()
            .into_bytes();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut at, mut ids) = (0, Vec::new());
        while ids.len() < 300 {
            if at < all.len() {
                let n = (1 + next() % 40) as usize;
                let end = (at + n).min(all.len());
                host_in.write_all(&all[at..end]).await.expect("write");
                at = end;
            }
            match t.receive().now_or_never() {
                Some(m) => match m.expect("not the end") {
                    ClientJsonRpcMessage::Request(r) => ids.push(r.id),
                    other => panic!("{other:?}"),
                },
                // Everything was written: what is left must all be ready.
                None => assert!(at < all.len(), "lost: got {} of 300", ids.len()),
            }
        }
        let expected: Vec<RequestId> = (0..300).map(NumberOrString::Number).collect();
        assert_eq!(ids, expected);
    }

    /// What the daemon makes of a resume's line and bytes (sent by `till mcp`, or by anyone
    /// else who may connect to `mcp.sock`).
    async fn resume_of(sent: Vec<u8>, hang_up: bool) -> Result<(Option<String>, Vec<u8>), String> {
        let (mut ours, mut theirs) = tokio::net::UnixStream::pair().expect("pair");
        theirs.write_all(&sent).await.expect("write");
        // Held open unless `hang_up`: a whole resume must not need the end of the stream.
        let open = (!hang_up).then_some(theirs);
        let read = read_resume(&mut ours).await;
        drop(open);
        read.map(|(c, p)| (c.map(|c| c.client_info.name), p))
    }

    #[tokio::test]
    async fn a_resume_is_read_whole_or_refused_with_the_reason() {
        let init = serde_json::json!({"protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "claude-code", "version": "2"}});
        let line = |client: serde_json::Value, pending: usize| {
            let mut l = serde_json::to_vec(&McpResume {
                client: (!client.is_null()).then_some(client),
                pending,
            })
            .expect("json");
            l.push(b'\n');
            l
        };
        let mut ok = line(init.clone(), 5);
        ok.extend_from_slice(b"{\"a\":");
        // The bytes after the pending ones are not the resume's (nothing follows in practice).
        assert_eq!(
            resume_of(ok, false).await,
            Ok((Some("claude-code".into()), b"{\"a\":".to_vec()))
        );
        assert_eq!(
            resume_of(line(serde_json::Value::Null, 0), false).await,
            Ok((None, Vec::new()))
        );

        let mut short = line(init.clone(), 10);
        short.extend_from_slice(b"abc");
        let e = resume_of(short, true).await.expect_err("short");
        assert!(e.contains("after 3 of its 10 pending bytes"), "{e}");
        let e = resume_of(line(init.clone(), MCP_MAX_LINE_BYTES + 1), true)
            .await
            .expect_err("too much");
        assert!(e.contains("more than"), "{e}");
        let e = resume_of(b"{\"pending\": \"x\"}\n".to_vec(), true)
            .await
            .expect_err("wrong shape");
        assert!(e.contains("not what this daemon reads"), "{e}");
        let e = resume_of(line(serde_json::json!({"clientInfo": 3}), 0), true)
            .await
            .expect_err("bad client");
        assert!(e.contains("client"), "{e}");
    }

    #[tokio::test]
    async fn a_line_over_the_limit_is_dropped_and_the_next_is_read() {
        let (mut t, mut host_in, _host_out, _stop, _open, _unread) = transport();
        let writer = tokio::spawn(async move {
            let big = vec![b'x'; MCP_MAX_LINE_BYTES + 10];
            host_in.write_all(&big).await.expect("write");
            host_in
                .write_all(b"\n{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"ping\"}\n")
                .await
                .expect("write");
            host_in
        });
        let m = t.receive().await.expect("the ping after the big line");
        assert!(
            matches!(m, ClientJsonRpcMessage::Request(ref r) if r.id == NumberOrString::Number(9))
        );
        assert!(t.line.capacity() <= MCP_MAX_LINE_BYTES + 64 * 1024);
        drop(writer.await.expect("writer"));
    }
}
