//! A small TURN client for lab hosts, on a socket opened inside a namespace: it shows exactly
//! which address every response came from, which real clients hide.

use std::net::SocketAddr;
use std::time::Duration;

use switchboard::stun::codec::{
    attr, decode_error_code, long_term_key, method, Class, Encoder, Message,
};
use tokio::net::UdpSocket;

/// One TURN client socket talking to one server address.
pub struct Client {
    /// The client socket (inside a lab namespace).
    pub sock: UdpSocket,
    /// The server address requests go to.
    pub server: SocketAddr,
    user: String,
    pass: String,
    realm: String,
    nonce: Vec<u8>,
    tid: u8,
}

/// A response and the address it came from.
pub struct Resp {
    /// Raw message.
    pub raw: Vec<u8>,
    /// Source address of the datagram.
    pub from: SocketAddr,
}

impl Resp {
    /// Parsed message.
    pub fn msg(&self) -> Message<'_> {
        Message::parse(&self.raw).expect("valid STUN from the server")
    }
    /// Error code, if an error response.
    pub fn code(&self) -> Option<u16> {
        let m = self.msg();
        (m.class() == Class::Error)
            .then(|| m.get(attr::ERROR_CODE))
            .flatten()
            .and_then(|v| decode_error_code(v).ok())
            .map(|(c, _)| c)
    }
    /// An XOR address attribute.
    pub fn addr(&self, typ: u16) -> Option<SocketAddr> {
        self.msg().xor_address(typ).and_then(|r| r.ok())
    }
}

impl Client {
    /// A client for `server` with long-term credentials.
    pub fn new(sock: UdpSocket, server: SocketAddr, user: &str, pass: &str) -> Client {
        Client {
            sock,
            server,
            user: user.into(),
            pass: pass.into(),
            realm: String::new(),
            nonce: Vec::new(),
            tid: 0,
        }
    }

    /// Send a request (signed once a nonce is known) and wait for its response; a 401
    /// challenge or a 438 stale nonce is answered once with a signed retry.
    pub async fn request(
        &mut self,
        m: u16,
        attrs: &[(u16, Vec<u8>)],
        peer: Option<SocketAddr>,
    ) -> Resp {
        let signed = !self.nonce.is_empty();
        let r = self.request_once(m, attrs, peer).await;
        match r.code() {
            Some(401) if !signed => self.request_once(m, attrs, peer).await,
            Some(438) => self.request_once(m, attrs, peer).await,
            _ => r,
        }
    }

    async fn request_once(
        &mut self,
        m: u16,
        attrs: &[(u16, Vec<u8>)],
        peer: Option<SocketAddr>,
    ) -> Resp {
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
        if !self.nonce.is_empty() && m != method::BINDING {
            e.attr(attr::USERNAME, self.user.as_bytes());
            e.attr(attr::REALM, self.realm.as_bytes());
            e.attr(attr::NONCE, &self.nonce);
            e.integrity(&long_term_key(&self.user, &self.realm, &self.pass));
        }
        e.finish_with_fingerprint();
        for _ in 0..6 {
            self.sock.send_to(&buf, self.server).await.expect("send");
            let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
            let mut rb = vec![0u8; 4096];
            while let Ok(Ok((n, from))) =
                tokio::time::timeout_at(deadline, self.sock.recv_from(&mut rb)).await
            {
                if n >= 20 && rb[8..20] == tid {
                    let r = Resp {
                        raw: rb[..n].to_vec(),
                        from,
                    };
                    let msg = r.msg();
                    if let Some(v) = msg.get(attr::NONCE) {
                        self.nonce = v.to_vec();
                    }
                    if let Some(v) = msg.get(attr::REALM) {
                        self.realm = String::from_utf8_lossy(v).into_owned();
                    }
                    return r;
                }
            }
        }
        panic!("no response from {}", self.server);
    }

    /// Binding request: the response (XOR-MAPPED-ADDRESS and source address).
    pub async fn binding(&mut self) -> Resp {
        self.request(method::BINDING, &[], None).await
    }

    /// Allocate a UDP relay (challenge, then signed).
    pub async fn allocate(&mut self) -> Resp {
        let t = vec![(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])];
        self.request(method::ALLOCATE, &t, None).await
    }

    /// Transactions (request/response round trips) this client has made so far.
    pub fn transactions(&self) -> u8 {
        self.tid
    }

    /// One Allocate, no retry: what the server answers to the nonce and realm this client
    /// holds (after a 300, those of the redirecting node).
    pub async fn allocate_once(&mut self) -> Resp {
        let t = vec![(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])];
        self.request_once(method::ALLOCATE, &t, None).await
    }

    /// CreatePermission for `peer`.
    pub async fn permit(&mut self, peer: SocketAddr) -> Resp {
        self.request(method::CREATE_PERMISSION, &[], Some(peer))
            .await
    }

    /// ChannelBind `peer` to `channel`.
    pub async fn channel_bind(&mut self, peer: SocketAddr, channel: u16) -> Resp {
        let ch = channel.to_be_bytes();
        let v = vec![(attr::CHANNEL_NUMBER, vec![ch[0], ch[1], 0, 0])];
        self.request(method::CHANNEL_BIND, &v, Some(peer)).await
    }

    /// Send indication carrying `data` to `peer`.
    pub async fn send(&self, peer: SocketAddr, data: &[u8]) {
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf, method::SEND, Class::Indication, &[0x5e; 12]);
        e.xor_address(attr::XOR_PEER_ADDRESS, peer);
        e.attr(attr::DATA, data);
        e.finish();
        self.sock.send_to(&buf, self.server).await.expect("send");
    }

    /// Wait for a Data indication: `(peer, data, datagram source)`, or `None` on timeout.
    pub async fn recv_data(&self, wait: Duration) -> Option<(SocketAddr, Vec<u8>, SocketAddr)> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut rb = vec![0u8; 4096];
        while let Ok(Ok((n, from))) =
            tokio::time::timeout_at(deadline, self.sock.recv_from(&mut rb)).await
        {
            let Ok(m) = Message::parse(&rb[..n]) else {
                continue;
            };
            if m.method() == method::DATA && m.class() == Class::Indication {
                let peer = m.xor_address(attr::XOR_PEER_ADDRESS)?.ok()?;
                let data = m.get(attr::DATA)?.to_vec();
                return Some((peer, data, from));
            }
        }
        None
    }
}
