//! The server side of a WebSocket (RFC 6455) that holds no buffer while idle: a signaling node
//! mostly holds idle sockets, so their memory sets how many users a node serves.
//!
//! Reads land in a per-thread scratch buffer when the socket is readable; only the bytes of a
//! frame not yet complete stay with the connection, and that buffer is freed as soon as it is
//! consumed. Writes are encoded into a buffer that is freed once it is on the wire. Pings are
//! answered, a close is echoed, and frames are checked the way the RFC asks of a server
//! (masked, no reserved bits or opcodes, control frames short and unfragmented, text UTF-8).
//! A frame or message over the size limit is refused from its header, before its payload is
//! read.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes one read takes from the kernel (per thread, shared by every socket it serves).
const SCRATCH: usize = 16 * 1024;
/// Encoded frames kept before `feed` writes them out (a flush writes earlier).
const WRITE_BUFFER: usize = 16 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// One WebSocket message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message (valid UTF-8).
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// A ping (already answered with a pong).
    Ping(Vec<u8>),
    /// A pong.
    Pong(Vec<u8>),
    /// A close, with its code and reason if it had them (already echoed).
    Close(Option<(u16, String)>),
}

/// Why a socket stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A frame or message larger than the limit (close with 1009).
    #[error("message too large")]
    TooBig,
    /// The peer broke the protocol (close with 1002).
    #[error("websocket protocol error: {0}")]
    Protocol(&'static str),
    /// The connection failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A fragmented message being assembled.
#[derive(Debug)]
struct Partial {
    text: bool,
    data: Vec<u8>,
}

/// A server-side WebSocket over `S`, after the HTTP upgrade.
#[derive(Debug)]
pub struct Socket<S> {
    io: S,
    /// Received bytes not yet parsed into a frame; no allocation between frames.
    inbuf: Vec<u8>,
    /// How much of `inbuf` is parsed already.
    consumed: usize,
    /// A fragmented message in progress (boxed: rare, and the socket stays small without it).
    message: Option<Box<Partial>>,
    /// Encoded frames not yet written; no allocation once written.
    out: Vec<u8>,
    /// Largest frame or message accepted.
    max_message: usize,
    /// A close frame was queued; nothing more is sent.
    closed: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Socket<S> {
    /// A socket over an upgraded connection, refusing frames and messages over `max_message`.
    pub fn new(io: S, max_message: usize) -> Socket<S> {
        Socket {
            io,
            inbuf: Vec::new(),
            consumed: 0,
            message: None,
            out: Vec::new(),
            max_message,
            closed: false,
        }
    }

    /// Heap bytes this socket holds now (its buffers' capacities), for memory tests.
    pub fn held_bytes(&self) -> usize {
        self.inbuf.capacity()
            + self.out.capacity()
            + self
                .message
                .as_ref()
                .map_or(0, |m| std::mem::size_of::<Partial>() + m.data.capacity())
    }

    /// The next message; `None` when the peer closed the connection without a close frame.
    pub async fn recv(&mut self) -> Option<Result<Message, Error>> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, Error>>> {
        loop {
            match self.parse() {
                Ok(Some(m)) => {
                    if matches!(m, Message::Ping(_) | Message::Close(_)) {
                        // Best effort: the answer goes out now if the socket takes it, else
                        // with the next write.
                        let _ = self.poll_write_out(cx);
                    }
                    return Poll::Ready(Some(Ok(m)));
                }
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            let io = &mut self.io;
            let inbuf = &mut self.inbuf;
            let read = SCRATCH_BUF.with(|b| -> Poll<io::Result<usize>> {
                let mut b = b.borrow_mut();
                let mut rb = ReadBuf::new(&mut b[..]);
                ready!(Pin::new(io).poll_read(cx, &mut rb))?;
                inbuf.extend_from_slice(rb.filled());
                Poll::Ready(Ok(rb.filled().len()))
            });
            match ready!(read) {
                Ok(0) => {
                    return Poll::Ready(if self.inbuf.len() > self.consumed {
                        Some(Err(Error::Protocol("connection closed inside a frame")))
                    } else {
                        None
                    })
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }

    /// One message out of the received bytes, if a whole frame is there.
    fn parse(&mut self) -> Result<Option<Message>, Error> {
        loop {
            let buf = &self.inbuf[self.consumed..];
            let Some((head, len)) = header(buf, self.max_message)? else {
                self.compact();
                return Ok(None);
            };
            if buf.len() < head.size + len {
                self.compact();
                return Ok(None);
            }
            let start = self.consumed + head.size;
            let payload = &mut self.inbuf[start..start + len];
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= head.mask[i & 3];
            }
            let payload = payload.to_vec();
            self.consumed = start + len;
            if self.consumed == self.inbuf.len() {
                // Nothing left over: give the buffer back.
                self.inbuf = Vec::new();
                self.consumed = 0;
            }
            if let Some(m) = self.frame(head.fin, head.opcode, payload)? {
                return Ok(Some(m));
            }
        }
    }

    /// Drop the parsed bytes before more are appended; a partial frame keeps only its own.
    fn compact(&mut self) {
        if self.consumed > 0 {
            self.inbuf.drain(..self.consumed);
            self.consumed = 0;
            self.inbuf.shrink_to_fit();
        }
    }

    /// A complete frame: a message, or `None` while a fragmented one is assembled.
    fn frame(&mut self, fin: bool, opcode: u8, payload: Vec<u8>) -> Result<Option<Message>, Error> {
        match opcode {
            0x0 => {
                let Some(m) = self.message.as_mut() else {
                    return Err(Error::Protocol("continuation without a message"));
                };
                if m.data.len() + payload.len() > self.max_message {
                    return Err(Error::TooBig);
                }
                m.data.extend_from_slice(&payload);
                if !fin {
                    return Ok(None);
                }
                let Some(m) = self.message.take() else {
                    return Ok(None);
                };
                let Partial { text, data } = *m;
                data_message(text, data).map(Some)
            }
            0x1 | 0x2 => {
                if self.message.is_some() {
                    return Err(Error::Protocol("a new message inside a fragmented one"));
                }
                if fin {
                    return data_message(opcode == 0x1, payload).map(Some);
                }
                self.message = Some(Box::new(Partial {
                    text: opcode == 0x1,
                    data: payload,
                }));
                Ok(None)
            }
            0x8 => {
                let close = match payload.len() {
                    0 => None,
                    1 => return Err(Error::Protocol("a close frame of one byte")),
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        let reason = String::from_utf8(payload[2..].to_vec())
                            .map_err(|_| Error::Protocol("close reason is not UTF-8"))?;
                        Some((code, reason))
                    }
                };
                if !self.closed {
                    let echo = close.as_ref().map_or(1000, |(c, _)| *c);
                    self.encode_close(echo, "");
                }
                Ok(Some(Message::Close(close)))
            }
            0x9 => {
                if !self.closed {
                    encode(&mut self.out, 0xA, &payload);
                }
                Ok(Some(Message::Ping(payload)))
            }
            0xA => Ok(Some(Message::Pong(payload))),
            _ => Err(Error::Protocol("reserved opcode")),
        }
    }

    fn encode_close(&mut self, code: u16, reason: &str) {
        let mut p = Vec::with_capacity(2 + reason.len());
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(reason.as_bytes());
        encode(&mut self.out, 0x8, &p);
        self.closed = true;
    }

    /// Queue a message; written out once `WRITE_BUFFER` bytes are queued, or by `flush`.
    pub async fn feed(&mut self, m: Message) -> Result<(), Error> {
        self.queue(m);
        if self.out.len() >= WRITE_BUFFER {
            poll_fn(|cx| self.poll_write_out(cx)).await?;
        }
        Ok(())
    }

    /// Write every queued frame and flush the connection.
    pub async fn flush(&mut self) -> Result<(), Error> {
        poll_fn(|cx| self.poll_write_out(cx)).await?;
        poll_fn(|cx| Pin::new(&mut self.io).poll_flush(cx)).await?;
        Ok(())
    }

    /// Send one message now.
    pub async fn send(&mut self, m: Message) -> Result<(), Error> {
        self.queue(m);
        self.flush().await
    }

    fn queue(&mut self, m: Message) {
        if self.closed {
            return;
        }
        match m {
            Message::Text(t) => encode(&mut self.out, 0x1, t.as_bytes()),
            Message::Binary(b) => encode(&mut self.out, 0x2, &b),
            Message::Ping(p) => encode(&mut self.out, 0x9, &p),
            Message::Pong(p) => encode(&mut self.out, 0xA, &p),
            Message::Close(c) => {
                let (code, reason) = c.unwrap_or((1000, String::new()));
                self.encode_close(code, &reason);
            }
        }
    }

    /// Write `out` until it is empty (then free it) or the connection would block.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut at = 0;
        let r = loop {
            if at == self.out.len() {
                break Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.io).poll_write(cx, &self.out[at..]) {
                Poll::Ready(Ok(0)) => {
                    break Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => at += n,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Pending => break Poll::Pending,
            }
        };
        if at == self.out.len() {
            self.out = Vec::new();
        } else if at > 0 {
            self.out.drain(..at);
        }
        r
    }
}

/// A text or binary message, its text checked.
fn data_message(text: bool, data: Vec<u8>) -> Result<Message, Error> {
    if text {
        String::from_utf8(data)
            .map(Message::Text)
            .map_err(|_| Error::Protocol("text is not UTF-8"))
    } else {
        Ok(Message::Binary(data))
    }
}

/// A frame header as read.
struct Head {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    size: usize,
}

/// The header at the start of `buf` and its payload length, `None` until it is all there.
/// A payload over `max` is refused here, before any of it is read.
fn header(buf: &[u8], max: usize) -> Result<Option<(Head, usize)>, Error> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(Error::Protocol("reserved bits set"));
    }
    if b1 & 0x80 == 0 {
        return Err(Error::Protocol("a client frame must be masked"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    let (len, ext) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 2),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                (u64::from_be_bytes(a), 8)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 0),
    };
    if opcode >= 0x8 && (!fin || len > 125) {
        return Err(Error::Protocol("a control frame must be short and whole"));
    }
    let len = usize::try_from(len).map_err(|_| Error::TooBig)?;
    if len > max {
        return Err(Error::TooBig);
    }
    let size = 2 + ext + 4;
    let Some(m) = buf.get(2 + ext..size) else {
        return Ok(None);
    };
    Ok(Some((
        Head {
            fin,
            opcode,
            mask: [m[0], m[1], m[2], m[3]],
            size,
        },
        len,
    )))
}

/// Append one unmasked (server) frame.
fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let n = payload.len();
    out.reserve(n + 10);
    out.push(0x80 | opcode);
    if n < 126 {
        out.push(n as u8);
    } else if let Ok(n16) = u16::try_from(n) {
        out.push(126);
        out.extend_from_slice(&n16.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    use base64::Engine;
    use sha1::Digest;
    let mut h = sha1::Sha1::new();
    h.update(key);
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A masked client frame.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut v = vec![if fin { 0x80 } else { 0 } | opcode];
        let n = payload.len();
        if n < 126 {
            v.push(0x80 | n as u8);
        } else if n < 65536 {
            v.push(0x80 | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            v.push(0x80 | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        v
    }

    #[test]
    fn accept_key_is_the_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn frames_split_anywhere_parse_and_an_idle_socket_holds_no_buffer() {
        let (client, server) = tokio::io::duplex(64);
        let mut s = Socket::new(server, 70_000);
        let (mut cr, mut cw) = tokio::io::split(client);
        let big = "x".repeat(66_000);
        let mut wire = client_frame(true, 0x1, b"hello");
        wire.extend(client_frame(false, 0x1, b"par"));
        wire.extend(client_frame(true, 0x9, b"p"));
        wire.extend(client_frame(true, 0x0, "té".as_bytes()));
        wire.extend(client_frame(true, 0x2, &[1, 2, 3]));
        wire.extend(client_frame(true, 0x1, big.as_bytes()));
        let writer = tokio::spawn(async move {
            // Dribbled in odd pieces, so that headers and payloads split anywhere.
            for c in wire.chunks(7) {
                cw.write_all(c).await.unwrap();
            }
            cw
        });
        assert_eq!(
            s.recv().await.unwrap().unwrap(),
            Message::Text("hello".into())
        );
        assert_eq!(
            s.recv().await.unwrap().unwrap(),
            Message::Ping(b"p".to_vec())
        );
        assert_eq!(
            s.recv().await.unwrap().unwrap(),
            Message::Text("parté".into())
        );
        assert_eq!(
            s.recv().await.unwrap().unwrap(),
            Message::Binary(vec![1, 2, 3])
        );
        assert_eq!(s.recv().await.unwrap().unwrap(), Message::Text(big));
        assert_eq!(s.held_bytes(), 0, "nothing held between messages");
        let mut cw = writer.await.unwrap();
        s.send(Message::Text("hi".into())).await.unwrap();
        assert_eq!(s.held_bytes(), 0, "the write buffer is given back");
        let mut got = [0u8; 7];
        cr.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..3], &[0x8A, 1, b'p'], "the ping was answered");
        assert_eq!(&got[3..], &[0x81, 2, b'h', b'i']);
        cw.write_all(&client_frame(true, 0x8, &[0x03, 0xE8, b'b', b'y', b'e']))
            .await
            .unwrap();
        assert_eq!(
            s.recv().await.unwrap().unwrap(),
            Message::Close(Some((1000, "bye".into())))
        );
        let mut echo = [0u8; 4];
        cr.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, [0x88, 2, 0x03, 0xE8], "the close is echoed");
        drop(cw);
        drop(cr);
        assert!(s.recv().await.is_none());
    }

    #[tokio::test]
    async fn oversized_unmasked_and_reserved_frames_are_refused() {
        for (wire, too_big) in [
            // Refused from the header: the 1 MB payload is never sent.
            (client_frame(true, 0x1, &[])[..2].to_vec(), false),
            (
                {
                    let mut h = vec![0x81, 0x80 | 127];
                    h.extend_from_slice(&1_000_000u64.to_be_bytes());
                    h
                },
                true,
            ),
            (vec![0x81, 0x05, b'h', b'e', b'l', b'l', b'o'], false),
            (client_frame(true, 0x3, b""), false),
            (client_frame(true, 0x1 | 0x40, b"x"), false),
            (client_frame(false, 0x9, b"x"), false),
            (client_frame(true, 0x1, &[0xff, 0xfe]), false),
        ] {
            let (mut client, server) = tokio::io::duplex(1024);
            let mut s = Socket::new(server, 1024);
            client.write_all(&wire).await.unwrap();
            if wire.len() == 2 {
                // An empty masked-less header cut short: no frame yet, then EOF inside it.
                drop(client);
                assert!(matches!(s.recv().await, Some(Err(_))));
                continue;
            }
            match s.recv().await {
                Some(Err(Error::TooBig)) => assert!(too_big),
                Some(Err(Error::Protocol(_))) => assert!(!too_big, "{wire:?}"),
                other => panic!("{wire:?}: {other:?}"),
            }
        }
    }
}
