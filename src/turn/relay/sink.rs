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
}

impl StreamSink {
    /// A sink holding at most `cap` unsent bytes.
    pub fn new(cap: usize) -> StreamSink {
        StreamSink {
            buf: std::sync::Mutex::new(Vec::with_capacity(cap.min(64 * 1024))),
            cap: cap.max(4096),
            notify: tokio::sync::Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
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
        Some(SinkBatch {
            buf: self.buf.lock().unwrap_or_else(|p| p.into_inner()),
            sink: self,
            pushed: false,
        })
    }

    /// Mark the connection gone; later pushes fail and the writer stops.
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
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
        if self.pushed {
            self.sink.notify.notify_one();
        }
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
}
