//! Where peer data for an allocation goes: the client's transport, and the bounded
//! outgoing buffer of a stream connection.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;

/// Where peer data for an allocation is delivered (the client's transport).
#[derive(Clone)]
pub enum ClientSink {
    /// The shared UDP listener socket the client talks to; `true` when it is a wildcard
    /// bind, so frames leave from the address the client sent to (IP_PKTINFO).
    Udp(Arc<UdpSocket>, bool),
    /// The bounded outgoing buffer of the client's TCP/TLS connection.
    Stream(Arc<StreamSink>),
}

impl ClientSink {
    /// Deliver one frame (STUN message or ChannelData) to `client`, from `local` on a
    /// wildcard UDP listener; false when dropped.
    pub(super) fn deliver(
        &self,
        frame: &[u8],
        client: SocketAddr,
        local: Option<std::net::IpAddr>,
    ) -> bool {
        match self {
            ClientSink::Udp(s, true) => {
                crate::net::pktinfo::try_send(s, frame, client, local).is_ok()
            }
            ClientSink::Udp(s, false) => s.try_send_to(frame, client).is_ok(),
            ClientSink::Stream(s) => s.push(frame),
        }
    }
}

/// The outgoing byte buffer of one stream connection, shared by its relay task (producer)
/// and its writer task (consumer). It is bounded: when a client stops reading, frames are
/// dropped here instead of piling up, so a stalled client costs only its own packets. The
/// lock is per connection and held for a `memcpy`; buffers are swapped, never reallocated
/// once grown.
#[derive(Debug)]
pub struct StreamSink {
    buf: std::sync::Mutex<Vec<u8>>,
    cap: usize,
    notify: tokio::sync::Notify,
    closed: std::sync::atomic::AtomicBool,
    /// The writer holds bytes it has taken out and not yet written (changed under `buf`'s
    /// lock only).
    writing: std::sync::atomic::AtomicBool,
    /// A plain TCP connection's socket: a batch that finds the writer idle and nothing queued
    /// sends straight to it, sparing the writer task a wake-up. Valid while `closed` is false,
    /// which is read and set under `buf`'s lock; the connection is dropped only after `close`.
    direct: Option<std::os::fd::RawFd>,
}

impl StreamSink {
    /// A sink holding at most `cap` unsent bytes.
    pub fn new(cap: usize) -> StreamSink {
        StreamSink {
            buf: std::sync::Mutex::new(Vec::with_capacity(cap.min(64 * 1024))),
            cap: cap.max(4096),
            notify: tokio::sync::Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
            writing: std::sync::atomic::AtomicBool::new(false),
            direct: None,
        }
    }

    /// A sink for a plain TCP connection whose socket is `fd`: batches may send to it
    /// directly (see [`SinkBatch`]). The caller must call [`close`](Self::close) before the
    /// socket is closed.
    pub fn with_socket(cap: usize, fd: std::os::fd::RawFd) -> StreamSink {
        StreamSink {
            direct: Some(fd),
            ..StreamSink::new(cap)
        }
    }

    /// Queue a frame, padded to 4 bytes as streams require (RFC 8656 §12.5); false if the
    /// buffer is full or the connection is gone.
    pub fn push(&self, frame: &[u8]) -> bool {
        if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        let pad = (4 - frame.len() % 4) % 4;
        {
            let mut b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
            if b.len() + frame.len() + pad > self.cap {
                return false;
            }
            b.extend_from_slice(frame);
            b.extend_from_slice(&[0u8; 3][..pad]);
        }
        self.notify.notify_one();
        true
    }

    /// Take the buffer's lock once for a batch of frames (a shard's receive batch from one
    /// relay socket): one lock and one wake-up of the writer per batch instead of per packet.
    /// `None` when the connection is gone.
    pub fn batch(&self) -> Option<SinkBatch<'_>> {
        if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let queued = buf.len();
        Some(SinkBatch {
            buf,
            sink: self,
            pushed: false,
            queued,
        })
    }

    /// Mark the connection gone; later pushes fail and the writer stops.
    pub fn close(&self) {
        {
            // Under the lock: a batch sending to the socket directly has finished.
            let _b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
            self.closed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.notify.notify_one();
    }

    /// Write queued bytes to `w` until the sink is closed or a write fails; gives the writer
    /// back after a clean close (an RFC 6062 data connection then takes the raw stream).
    pub async fn run_writer<W: tokio::io::AsyncWrite + Unpin>(&self, mut w: W) -> Option<W> {
        use tokio::io::AsyncWriteExt;
        let mut local: Vec<u8> = Vec::with_capacity(64 * 1024);
        loop {
            {
                let mut b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
                std::mem::swap(&mut *b, &mut local);
                self.writing
                    .store(!local.is_empty(), std::sync::atomic::Ordering::Relaxed);
            }
            if local.is_empty() {
                if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                self.notify.notified().await;
                continue;
            }
            if w.write_all(&local).await.is_err() {
                self.close();
                return None;
            }
            local.clear();
        }
        Some(w)
    }
}

/// A [`StreamSink`] locked for a batch of frames; the writer is woken once, when it drops.
pub struct SinkBatch<'a> {
    buf: std::sync::MutexGuard<'a, Vec<u8>>,
    sink: &'a StreamSink,
    pushed: bool,
    /// Bytes queued before this batch.
    queued: usize,
}

impl SinkBatch<'_> {
    /// Queue one frame made of `head` then `body` (a ChannelData header and its payload, so
    /// the payload is copied once), padded to 4 bytes; false if the buffer is full.
    pub fn push(&mut self, head: &[u8], body: &[u8]) -> bool {
        let len = head.len() + body.len();
        let pad = (4 - len % 4) % 4;
        if self.buf.len() + len + pad > self.sink.cap {
            return false;
        }
        self.buf.extend_from_slice(head);
        self.buf.extend_from_slice(body);
        self.buf.extend_from_slice(&[0u8; 3][..pad]);
        self.pushed = true;
        true
    }
}

impl Drop for SinkBatch<'_> {
    fn drop(&mut self) {
        if !self.pushed {
            return;
        }
        // Nothing older is queued or in the writer's hands, so these bytes may go first:
        // send them now without blocking; the writer gets only what the socket did not take.
        if let Some(fd) = self.sink.direct {
            let idle = self.queued == 0
                && !self.sink.writing.load(std::sync::atomic::Ordering::Relaxed)
                && !self.sink.closed.load(std::sync::atomic::Ordering::Relaxed);
            if idle {
                use nix::sys::socket::{send, MsgFlags};
                let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
                match send(fd, &self.buf, flags) {
                    Ok(n) if n == self.buf.len() => {
                        self.buf.clear();
                        return;
                    }
                    Ok(n) => {
                        self.buf.drain(..n);
                    }
                    // Would block, or an error the writer will see and end the connection on.
                    Err(_) => {}
                }
            }
        }
        self.sink.notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_pads_bounds_and_refuses_when_closed() {
        let s = StreamSink::new(4096);
        {
            let mut b = s.batch().unwrap();
            assert!(b.push(&[0x40, 0, 0, 5], &[1, 2, 3, 4, 5]));
            assert!(b.push(&[], &[7; 8]));
            // Past the cap: refused, what was queued stays.
            assert!(!b.push(&[], &[0; 4096]));
        }
        let got = s.buf.lock().unwrap().clone();
        assert_eq!(got.len(), 12 + 8);
        assert_eq!(&got[..12], &[0x40, 0, 0, 5, 1, 2, 3, 4, 5, 0, 0, 0]);
        s.close();
        assert!(s.batch().is_none());
    }

    #[test]
    fn batch_sends_directly_only_when_nothing_is_queued_before_it() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let s = StreamSink::with_socket(4096, b.as_raw_fd());
        // Idle writer, empty buffer: the frame goes straight to the socket.
        assert!(s.batch().unwrap().push(&[0x40, 0, 0, 1], &[9]));
        assert!(s.buf.lock().unwrap().is_empty());
        let mut got = [0u8; 8];
        a.read_exact(&mut got).unwrap();
        assert_eq!(got, [0x40, 0, 0, 1, 9, 0, 0, 0]);
        // A response queued first (for the writer) keeps its place: the batch queues behind it.
        assert!(s.push(&[1, 2, 3, 4]));
        assert!(s.batch().unwrap().push(&[], &[5, 6, 7, 8]));
        assert_eq!(*s.buf.lock().unwrap(), [1, 2, 3, 4, 5, 6, 7, 8]);
        // A busy writer (bytes taken out, not yet written) also keeps the order.
        s.buf.lock().unwrap().clear();
        s.writing.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(s.batch().unwrap().push(&[], &[1; 4]));
        assert_eq!(s.buf.lock().unwrap().len(), 4);
        // Closed: nothing more reaches the socket.
        s.close();
        assert!(s.batch().is_none());
    }
}
