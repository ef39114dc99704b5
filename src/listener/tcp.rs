//! The TCP shell of the STUN/TURN port: stream framing (RFC 8489 §6.2.2 / RFC 8656 §12.5),
//! one task per connection, idle timeouts so slow or silent clients cannot pile up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::server::{shutdown_signal, Shared};
use crate::stun::{binding, Message};

/// Bind a TCP listener with SO_REUSEADDR so restarts do not wait for TIME_WAIT.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// One frame on a STUN/TURN stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A STUN message of this many bytes.
    Stun(usize),
    /// ChannelData: total bytes to consume (header, payload and padding to 4).
    ChannelData {
        /// Bytes to consume.
        consumed: usize,
        /// Header plus payload, without padding.
        len: usize,
    },
}

/// Why a stream cannot be framed; the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first byte is neither STUN nor ChannelData.
    #[error("stream does not carry STUN or ChannelData")]
    Garbage,
}

/// Find the next frame at the start of `buf`: `Ok(None)` means more bytes are needed.
pub fn next_frame(buf: &[u8]) -> Result<Option<Frame>, FrameError> {
    let Some(&b0) = buf.first() else {
        return Ok(None);
    };
    match b0 & 0xC0 {
        0x00 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            let len = 20 + u16::from_be_bytes([buf[2], buf[3]]) as usize;
            if buf.len() >= 8 && buf[4..8] != crate::stun::codec::MAGIC_COOKIE.to_be_bytes() {
                return Err(FrameError::Garbage);
            }
            Ok((buf.len() >= len).then_some(Frame::Stun(len)))
        }
        0x40 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            // Channel numbers 0x5000..=0x7FFF are reserved (RFC 8656 §12).
            if b0 >= 0x50 {
                return Err(FrameError::Garbage);
            }
            let len = 4 + u16::from_be_bytes([buf[2], buf[3]]) as usize;
            let consumed = (len + 3) & !3;
            Ok((buf.len() >= consumed).then_some(Frame::ChannelData { consumed, len }))
        }
        _ => Err(FrameError::Garbage),
    }
}

/// Accept connections until shutdown.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let mut shutdown = std::pin::pin!(shutdown_signal(shared.lifecycle.subscribe()));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "tcp accept error");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        let shared = shared.clone();
        tokio::spawn(async move {
            serve_stream(shared, stream, peer, local).await;
        });
    }
}

/// Serve STUN over one framed stream (TCP or TLS) until it closes, idles out or errs.
pub async fn serve_stream<S>(
    shared: Arc<Shared>,
    mut stream: S,
    peer: SocketAddr,
    local: Option<SocketAddr>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let idle = Duration::from_secs(shared.config.turn.tcp_idle_timeout_secs.max(1));
    let mut shutdown = std::pin::pin!(shutdown_signal(shared.lifecycle.subscribe()));
    let software = shared.config.turn.software.clone();
    let m = &shared.metrics;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    loop {
        // Drain every complete frame already buffered.
        loop {
            let frame = match next_frame(&buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    m.drops.with_label_values(&["stream_garbage"]).inc();
                    tracing::debug!(%peer, error = %e, "closing stream");
                    return;
                }
            };
            match frame {
                Frame::Stun(len) => {
                    match Message::parse(&buf[..len]) {
                        Ok(msg) => {
                            out.clear();
                            let o = binding::respond(&msg, peer, local, &software, &mut out);
                            if o != binding::Outcome::Ignored {
                                m.stun_requests.with_label_values(&[o.label()]).inc();
                            }
                        }
                        Err(_) => {
                            m.stun_requests.with_label_values(&["malformed"]).inc();
                        }
                    }
                    buf.drain(..len);
                    if !out.is_empty() {
                        let w = tokio::time::timeout(idle, stream.write_all(&out)).await;
                        if !matches!(w, Ok(Ok(()))) {
                            return;
                        }
                        out.clear();
                    }
                }
                Frame::ChannelData { consumed, .. } => {
                    // No allocation on this connection: nothing to relay.
                    m.drops.with_label_values(&["no_allocation"]).inc();
                    buf.drain(..consumed);
                }
            }
        }
        let n = tokio::select! {
            r = tokio::time::timeout(idle, stream.read(&mut chunk)) => match r {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(n)) => n,
                Err(_) => {
                    m.drops.with_label_values(&["stream_idle"]).inc();
                    return;
                }
            },
            _ = &mut shutdown => return,
        };
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing() {
        assert_eq!(next_frame(&[]), Ok(None));
        assert_eq!(next_frame(&[0x00, 0x01, 0x00]), Ok(None));
        let mut req = Vec::new();
        binding::request(&[1; 12], false, &mut req);
        assert_eq!(next_frame(&req), Ok(Some(Frame::Stun(20))));
        assert_eq!(next_frame(&req[..10]), Ok(None));
        // ChannelData of 5 payload bytes is padded to 12 on streams.
        let cd = [0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0];
        assert_eq!(
            next_frame(&cd),
            Ok(Some(Frame::ChannelData {
                consumed: 12,
                len: 9
            }))
        );
        assert_eq!(next_frame(&cd[..9]), Ok(None));
        assert_eq!(next_frame(b"\x80 not stun"), Err(FrameError::Garbage));
        assert_eq!(
            next_frame(b"\x7f\x00\x00\x04abcd"),
            Err(FrameError::Garbage)
        );
        // A TLS ClientHello on the plain port: 0x16 0x03 looks like STUN until the cookie.
        assert_eq!(
            next_frame(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
            Err(FrameError::Garbage)
        );
        let mut bad_cookie = req.clone();
        bad_cookie[5] ^= 0xff;
        assert_eq!(next_frame(&bad_cookie), Err(FrameError::Garbage));
    }
}
