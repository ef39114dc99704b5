//! A minimal TURN client over a byte stream (TCP, or TLS on a TURN or shared port): STUN
//! framing and long-term-credential requests. Written once for the stream tests; what each adds
//! (relay bursts, a stalled reader, RFC 6062 connections) stays in its own file as an `impl`.

use std::net::SocketAddr;

use switchboard::stun::codec::{attr, decode_error_code, long_term_key, Class, Encoder, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::turn_common::{PASS, USER};

/// The client: its stream, the nonce it last saw, its transaction counter and credentials.
pub struct StreamTurn<S> {
    /// The byte stream, for tests that write or read past the client.
    pub s: S,
    /// The server's nonce, empty until a response hands one out.
    pub nonce: Vec<u8>,
    tid: u8,
    /// The long-term username (the static test user unless a test sets REST credentials).
    pub user: String,
    /// Its password.
    pub pass: String,
}

impl<S: AsyncRead + AsyncWrite + Unpin> StreamTurn<S> {
    /// A client on `s` with the static test user of `turn_common`.
    pub fn new(s: S) -> Self {
        StreamTurn {
            s,
            nonce: Vec::new(),
            tid: 0,
            user: USER.into(),
            pass: PASS.into(),
        }
    }

    /// The next STUN message or ChannelData frame (padded to 4 bytes, as on a stream).
    pub async fn read_frame(&mut self) -> Vec<u8> {
        let mut f = vec![0u8; 4];
        self.s.read_exact(&mut f).await.expect("read header");
        let len = u16::from_be_bytes([f[2], f[3]]) as usize;
        let body = if f[0] & 0xC0 == 0 {
            16 + len
        } else {
            (len + 3) & !3
        };
        f.resize(4 + body, 0);
        self.s.read_exact(&mut f[4..]).await.expect("read body");
        f
    }

    /// One request and its response (other frames are skipped); signed once a nonce is known,
    /// and any NONCE in the response is kept for the next request.
    pub async fn request(
        &mut self,
        m: u16,
        attrs: &[(u16, Vec<u8>)],
        peer: Option<SocketAddr>,
    ) -> Vec<u8> {
        self.tid = self.tid.wrapping_add(1);
        let tid = [self.tid; 12];
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf, m, Class::Request, &tid);
        for (t, v) in attrs {
            e.attr(*t, v);
        }
        if let Some(p) = peer {
            e.xor_address(attr::XOR_PEER_ADDRESS, p);
        }
        if !self.nonce.is_empty() {
            e.attr(attr::USERNAME, self.user.as_bytes());
            e.attr(attr::REALM, b"switchboard");
            e.attr(attr::NONCE, &self.nonce);
            e.integrity(&long_term_key(&self.user, "switchboard", &self.pass));
        }
        e.finish();
        self.s.write_all(&buf).await.expect("write");
        loop {
            let f = self.read_frame().await;
            if f.len() >= 20 && f[8..20] == tid {
                if let Some(n) = Message::parse(&f).ok().and_then(|m| m.get(attr::NONCE)) {
                    self.nonce = n.to_vec();
                }
                return f;
            }
        }
    }

    /// A request, retried once after the 401 that hands out the nonce.
    pub async fn authed(
        &mut self,
        m: u16,
        attrs: &[(u16, Vec<u8>)],
        peer: Option<SocketAddr>,
    ) -> Vec<u8> {
        let r = self.request(m, attrs, peer).await;
        if error_code(&r) == Some(401) {
            return self.request(m, attrs, peer).await;
        }
        r
    }
}

/// The ERROR-CODE of a response frame, if it has one.
pub fn error_code(f: &[u8]) -> Option<u16> {
    let m = Message::parse(f).ok()?;
    decode_error_code(m.get(attr::ERROR_CODE)?)
        .ok()
        .map(|(code, _)| code)
}
