//! Frames over a Unix socket, shared by the daemon and its clients (feature `io`).
//!
//! [`FrameStream`] reads and writes the native protocol's frames (a 4-byte big-endian length, then
//! that many bytes of JSON) on a tokio `UnixStream`, one request or reply at a time.
//!
//! It can also busy-poll. On a VM, waking a thread whose vCPU has gone idle costs tens of
//! microseconds (≈ 30 µs each way on our 2-vCPU machine, `scripts/pingpong.py`), which is more than
//! a mint's whole work. For a short window after each frame it sends, a busy-polling stream reads the
//! socket directly, yielding to the runtime between tries, so a reply that comes back quickly is
//! taken without any thread going to sleep and being woken. A process's streams share one
//! [`BusyPoll`]: at most one of them spins at a time, and only while the process has no other
//! request in flight (so under load nobody spins: the next request comes anyway, and the CPU is
//! better spent on the ones in flight), and never in a process limited to one CPU, where the peer
//! could not answer while we spin. A window that passes with nothing read costs its CPU time and
//! nothing else: the stream then waits as any other would. (On a machine so loaded that both ends
//! share a CPU, the window is also the most a spin can delay the answer.)

use std::io::{self, Read};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::MAX_FRAME_BYTES;

/// Why a frame could not be read. After any of these the stream cannot be resynchronised.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("a frame of {0} bytes is over the limit of {MAX_FRAME_BYTES} bytes")]
    TooBig(usize),
    #[error("the connection ended in the middle of a frame")]
    Truncated,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Who may busy-poll among a process's streams: requests in flight are counted with
/// [`BusyPoll::start`]; a stream spins only while at most `idle_at` are (the daemon counts none
/// once it has handled a request, a client its own), and only one stream spins at a time.
#[derive(Debug)]
pub struct BusyPoll {
    in_flight: AtomicUsize,
    spinning: AtomicBool,
    idle_at: usize,
}

impl BusyPoll {
    pub const fn new(idle_at: usize) -> BusyPoll {
        BusyPoll {
            in_flight: AtomicUsize::new(0),
            spinning: AtomicBool::new(false),
            idle_at,
        }
    }

    /// Counts one request in flight until the returned guard is dropped (a panic or a cancelled
    /// future included).
    pub fn start(&'static self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) <= self.idle_at
    }

    /// The one spinner's place, if it is free and spinning is worth it now.
    fn take(&'static self) -> Option<Spinning> {
        (several_cpus()
            && self.idle()
            && self
                .spinning
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok())
        .then_some(Spinning(self))
    }
}

/// Whether this process may run on more than one CPU (its affinity mask and cgroup quota
/// counted). On one CPU the peer can only answer once this thread stops, so spinning would only
/// delay the answer it waits for (by the whole window, measured: mint 395 µs instead of 47 under
/// `taskset -c 0`).
fn several_cpus() -> bool {
    static SEVERAL: OnceLock<bool> = OnceLock::new();
    *SEVERAL.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() > 1))
}

/// One request in flight, counted in its [`BusyPoll`] until dropped.
#[derive(Debug)]
pub struct InFlight(&'static BusyPoll);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Holds the spinner's place; given back when dropped, a cancelled read included.
struct Spinning(&'static BusyPoll);

impl Drop for Spinning {
    fn drop(&mut self) {
        self.0.spinning.store(false, Ordering::Release);
    }
}

/// The busy-poll settings of a [`FrameStream`].
#[derive(Clone, Copy)]
struct Spin {
    window: Duration,
    shared: &'static BusyPoll,
}

/// A Unix socket carrying length-prefixed frames. Not `Clone`; one request at a time.
pub struct FrameStream {
    stream: UnixStream,
    buf: BytesMut,
    spin: Option<Spin>,
    /// The end of the current busy-poll window, set by each send and cleared by the next frame.
    spin_until: Option<Instant>,
}

// By hand: never the buffered bytes, which can hold a token.
impl std::fmt::Debug for FrameStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameStream")
            .field("buffered", &self.buf.len())
            .field("busy_poll", &self.spin.map(|s| s.window))
            .finish()
    }
}

impl FrameStream {
    pub fn new(stream: UnixStream) -> FrameStream {
        FrameStream {
            stream,
            buf: BytesMut::with_capacity(8 * 1024),
            spin: None,
            spin_until: None,
        }
    }

    /// After each send, read the socket directly for up to `window`, when `shared` allows it.
    pub fn busy_poll(mut self, window: Duration, shared: &'static BusyPoll) -> FrameStream {
        self.spin = Some(Spin { window, shared });
        self
    }

    /// Whether a request could go out on this connection now, seen without waiting: not once the
    /// peer has closed it, or has sent something between requests (a stopping daemon's
    /// `shutting_down`). The check an HTTP pool makes before it reuses a connection; it costs one
    /// non-blocking read(2), past tokio's readiness cache, which may not have seen the close yet.
    #[allow(clippy::unused_io_amount)]
    pub fn usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut scratch = [0u8; 64];
        match (&*socket2::SockRef::from(&self.stream)).read(&mut scratch) {
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            // The end of the stream, or bytes nobody asked for (after which replies would not
            // line up with requests): how many does not matter.
            Ok(_) => false,
        }
    }

    /// Sends `msg` as one JSON frame, in one write.
    pub async fn send_json<T: Serialize>(&mut self, msg: &T) -> io::Result<()> {
        let mut out = vec![0u8; 4];
        serde_json::to_writer(&mut out, msg).map_err(io::Error::other)?;
        // The peer would refuse it on the prefix and close: say so here, having sent nothing.
        if out.len() - 4 > MAX_FRAME_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                FrameError::TooBig(out.len() - 4),
            ));
        }
        let len = (out.len() - 4) as u32;
        out[..4].copy_from_slice(&len.to_be_bytes());
        self.send_raw(&out).await
    }

    /// Writes bytes that are already a whole frame (length prefix included).
    async fn send_raw(&mut self, frame: &[u8]) -> io::Result<()> {
        self.stream.write_all(frame).await?;
        self.spin_until = self.spin.map(|s| Instant::now() + s.window);
        Ok(())
    }

    /// The next frame's payload; `None` when the peer closed the connection between frames.
    pub async fn next(&mut self) -> Option<Result<BytesMut, FrameError>> {
        loop {
            match self.decode() {
                Ok(Some(frame)) => {
                    self.spin_until = None;
                    return Some(Ok(frame));
                }
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            match self.fill().await {
                Ok(0) if self.buf.is_empty() => return None,
                Ok(0) => return Some(Err(FrameError::Truncated)),
                Ok(_) => {}
                Err(e) => return Some(Err(e.into())),
            }
        }
    }

    fn decode(&mut self) -> Result<Option<BytesMut>, FrameError> {
        let Some(&[a, b, c, d]) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        // Refused on the prefix alone, before anything is allocated for it.
        if len > MAX_FRAME_BYTES {
            return Err(FrameError::TooBig(len));
        }
        if self.buf.len() < 4 + len {
            self.buf.reserve(4 + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(4);
        Ok(Some(self.buf.split_to(len)))
    }

    /// Reads what the socket has into the buffer: busy-polling inside the window, else waiting.
    /// `Ok(0)` is the end of the stream.
    async fn fill(&mut self) -> io::Result<usize> {
        if let (Some(spin), Some(until)) = (self.spin, self.spin_until)
            && let Some(_spinning) = spin.shared.take()
        {
            let mut scratch = [0u8; 4096];
            while spin.shared.idle() && Instant::now() < until {
                // A plain read(2) on the (non-blocking) socket, past tokio's readiness cache: the
                // point is to see the bytes before the runtime's poller is told of them.
                match (&*socket2::SockRef::from(&self.stream)).read(&mut scratch) {
                    Ok(n) => {
                        self.buf.extend_from_slice(&scratch[..n]);
                        return Ok(n);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => return Err(e),
                }
                tokio::task::yield_now().await;
            }
        }
        self.spin_until = None;
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(8 * 1024);
        }
        self.stream.read_buf(&mut self.buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static SPIN: BusyPoll = BusyPoll::new(usize::MAX);

    #[tokio::test]
    async fn a_connection_is_usable_until_the_peer_closes_or_speaks_unasked() {
        let (mut s, peer) = pair(false).await;
        assert!(s.usable(), "idle and open");
        drop(peer);
        assert!(!s.usable(), "closed by the peer");
        let (mut s, mut peer) = pair(false).await;
        peer.write_all(b"\0\0\0\x02{}").await.expect("write");
        // Read by a plain read(2): tokio's readiness need not have seen the bytes.
        assert!(!s.usable(), "a frame nobody asked for");
    }

    async fn pair(spin: bool) -> (FrameStream, UnixStream) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let s = FrameStream::new(a);
        let s = if spin {
            s.busy_poll(Duration::from_secs(5), &SPIN)
        } else {
            s
        };
        (s, b)
    }

    #[tokio::test]
    async fn frames_cut_anywhere_are_reassembled_with_and_without_busy_poll() {
        for spin in [false, true] {
            let (mut s, mut peer) = pair(spin).await;
            s.send_json(&"ping").await.expect("send");
            let mut wire = crate::encode_frame(&"first");
            wire.extend(crate::encode_frame(&"second"));
            // One byte at a time: every cut, the length prefix's included.
            let writer = tokio::spawn(async move {
                // Take our ping first: a socket closed with unread bytes resets its peer.
                let mut ping = [0u8; 10];
                peer.read_exact(&mut ping).await.expect("ping");
                for byte in wire {
                    peer.write_all(&[byte]).await.expect("write");
                    tokio::task::yield_now().await;
                }
                peer
            });
            let first = s.next().await.expect("frame").expect("ok");
            assert_eq!(&first[..], b"\"first\"", "spin={spin}");
            let second = s.next().await.expect("frame").expect("ok");
            assert_eq!(&second[..], b"\"second\"", "spin={spin}");
            drop(writer.await.expect("writer"));
            assert!(s.next().await.is_none(), "a clean close between frames");
        }
    }

    #[tokio::test]
    async fn a_busy_polled_reply_is_read_and_the_peer_gets_our_frame() {
        let (mut s, peer) = pair(true).await;
        let mut peer = FrameStream::new(peer);
        s.send_json(&"question").await.expect("send");
        let got = peer.next().await.expect("frame").expect("ok");
        assert_eq!(&got[..], b"\"question\"");
        peer.send_json(&"answer").await.expect("reply");
        let got = s.next().await.expect("frame").expect("ok");
        assert_eq!(&got[..], b"\"answer\"");
    }

    #[tokio::test]
    async fn an_oversized_prefix_and_a_cut_frame_are_errors() {
        let (mut s, mut peer) = pair(true).await;
        s.send_json(&"x").await.expect("send");
        peer.write_all(&u32::MAX.to_be_bytes())
            .await
            .expect("write");
        assert!(
            matches!(s.next().await, Some(Err(FrameError::TooBig(n))) if n == u32::MAX as usize)
        );

        let (mut s, mut peer) = pair(false).await;
        peer.write_all(&10u32.to_be_bytes()).await.expect("write");
        peer.write_all(b"abc").await.expect("write");
        drop(peer);
        assert!(matches!(s.next().await, Some(Err(FrameError::Truncated))));
    }
}
