//! A socket-free harness for the table's tests: a fake relay socket, credentials, and a
//! client that sends requests and decodes the answers.

pub(super) use super::*;
pub(super) use crate::auth::Auth;
pub(super) use crate::config::{AuthConfig, TurnConfig};
pub(super) use crate::metrics::Metrics;
pub(super) use crate::stun::codec::{
    attr, decode_error_code, decode_u32, long_term_key, long_term_key_sha256, method, Class,
    Encoder, Message,
};
pub(super) use std::collections::HashSet;
pub(super) use std::net::{IpAddr, SocketAddr};
pub(super) use std::sync::Arc;
pub(super) use std::sync::Mutex as StdMutex;
pub(super) use std::time::{Duration, Instant};

#[derive(Debug)]
pub(super) struct Fake {
    pub(super) addr: SocketAddr,
    pub(super) view: Arc<StdMutex<Option<Arc<View>>>>,
    pub(super) open: Arc<StdMutex<HashSet<u16>>>,
    /// Whether DF can be set on this socket.
    pub(super) df: bool,
}

impl Relay for Fake {
    type Sink = ();
    fn local_addr(&self) -> SocketAddr {
        self.addr
    }
    fn attach(&self, _: &()) {}
    fn publish(&self, view: Arc<View>) {
        *self.view.lock().unwrap() = Some(view);
    }
    fn set_dont_fragment(&self) -> std::io::Result<()> {
        if self.df {
            Ok(())
        } else {
            Err(std::io::ErrorKind::Unsupported.into())
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.open.lock().unwrap().remove(&self.addr.port());
    }
}

pub(super) const SECRET: &str = "s3cret";

pub(super) const REALM: &str = "test.realm";

pub(super) struct H {
    pub(super) t: Table<Fake>,
    pub(super) env: Env,
    pub(super) open: Arc<StdMutex<HashSet<u16>>>,
    pub(super) views: Arc<StdMutex<Option<Arc<View>>>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) auth: Arc<Auth>,
    pub(super) nonce: Vec<u8>,
    pub(super) busy: HashSet<u16>,
    /// The address the last relay socket was bound to.
    pub(super) last_bind: Arc<StdMutex<Option<SocketAddr>>>,
    /// Relay sockets refuse DF.
    pub(super) no_df: bool,
}

pub(super) fn cfg() -> TurnConfig {
    TurnConfig {
        realm: REALM.into(),
        relay_port_min: 50000,
        relay_port_max: 50009,
        max_allocations_per_user: 3,
        allow_peers: vec!["127.0.0.0/8".into()],
        ..Default::default()
    }
}

pub(super) fn harness(t: TurnConfig) -> H {
    harness_on(t, "udp")
}

/// A harness whose table serves `transport` (`udp|tcp|tls`).
pub(super) fn harness_on(t: TurnConfig, transport: &'static str) -> H {
    let auth = Arc::new(Auth::new(&AuthConfig {
        turn_secrets: vec![SECRET.into()],
        turn_users: [("alice".to_string(), "wonder".into())].into(),
        ..Default::default()
    }));
    let metrics = Arc::new(Metrics::new());
    let settings = Arc::new(Settings::from_config(&t, false));
    H {
        t: Table::new(
            settings,
            auth.clone(),
            metrics.clone(),
            Arc::new(Pool::new()),
            transport,
            (),
        ),
        env: Env {
            now: Instant::now(),
            unix: 1_700_000_000,
            draining: false,
            local: None,
        },
        open: Default::default(),
        views: Default::default(),
        metrics,
        auth,
        nonce: Vec::new(),
        busy: HashSet::new(),
        last_bind: Default::default(),
        no_df: false,
    }
}

pub(super) fn client(n: u16) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], n))
}

/// A response, decoded enough to assert on.
pub(super) struct Resp {
    pub(super) raw: Vec<u8>,
    pub(super) outcome: Outcome,
}

impl Resp {
    pub(super) fn msg(&self) -> Message<'_> {
        Message::parse(&self.raw).expect("response parses")
    }
    pub(super) fn code(&self) -> Option<u16> {
        let m = self.msg();
        m.get(attr::ERROR_CODE)
            .map(|v| decode_error_code(v).unwrap().0)
    }
}

#[derive(Clone)]
pub(super) struct Creds {
    pub(super) user: String,
    pub(super) pass: String,
    pub(super) sha256: bool,
}

pub(super) fn rest(h: &H, expiry_from_now: i64) -> Creds {
    let c = h.auth.turn_credentials_for(
        Some("bob"),
        (h.env.unix as i64 + expiry_from_now - 100) as u64,
        100,
    );
    Creds {
        user: c.username,
        pass: c.password,
        sha256: false,
    }
}

impl H {
    pub(super) fn bind(
        &self,
    ) -> impl FnMut(SocketAddr, RelayKind) -> std::io::Result<Fake> + 'static {
        let open = self.open.clone();
        let views = self.views.clone();
        let busy = self.busy.clone();
        let last = self.last_bind.clone();
        let df = !self.no_df;
        move |a: SocketAddr, _| {
            if busy.contains(&a.port()) || !open.lock().unwrap().insert(a.port()) {
                return Err(std::io::Error::from(std::io::ErrorKind::AddrInUse));
            }
            *last.lock().unwrap() = Some(a);
            Ok(Fake {
                addr: a,
                view: views.clone(),
                open: open.clone(),
                df,
            })
        }
    }

    pub(super) fn send(
        &mut self,
        from: SocketAddr,
        m: u16,
        tid: [u8; 12],
        creds: Option<&Creds>,
        attrs: &[(u16, Vec<u8>)],
        peers: &[SocketAddr],
    ) -> Resp {
        let buf = self.encode(m, tid, creds, attrs, peers);
        let msg = Message::parse(&buf).unwrap();
        let mut out = Vec::new();
        let outcome = self.request(from, &msg, &mut out);
        Resp { raw: out, outcome }
    }

    /// A request as `send` encodes it (with the last nonce), for tests that drive the table
    /// step by step.
    pub(super) fn encode(
        &self,
        m: u16,
        tid: [u8; 12],
        creds: Option<&Creds>,
        attrs: &[(u16, Vec<u8>)],
        peers: &[SocketAddr],
    ) -> Vec<u8> {
        let mut buf = Vec::new();
        {
            let mut e = Encoder::new(&mut buf, m, Class::Request, &tid);
            for (t, v) in attrs {
                e.attr(*t, v);
            }
            for p in peers {
                e.xor_address(attr::XOR_PEER_ADDRESS, *p);
            }
            if let Some(c) = creds {
                e.attr(attr::USERNAME, c.user.as_bytes());
                e.attr(attr::REALM, REALM.as_bytes());
                e.attr(attr::NONCE, &self.nonce);
                if c.sha256 {
                    e.attr(attr::PASSWORD_ALGORITHM, &[0, 2, 0, 0]);
                    e.integrity_sha256(&long_term_key_sha256(&c.user, REALM, &c.pass));
                } else {
                    e.integrity(&long_term_key(&c.user, REALM, &c.pass));
                }
            }
            e.finish_with_fingerprint();
        }
        buf
    }

    /// One request through the table, as a shell drives it: each relay socket the table asks
    /// for is opened by the fake binder and handed back with `bound`.
    pub(super) fn request(
        &mut self,
        from: SocketAddr,
        msg: &Message<'_>,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let env = self.env;
        let mut bind = self.bind();
        let mut outcome = self.t.handle_request(env, from, msg, out);
        while let Outcome::Bind(b) = outcome {
            assert!(out.is_empty(), "a Bind comes before any answer");
            let r = bind(b.addr, b.kind);
            outcome = self.t.bound(env, b.id, r, out);
        }
        outcome
    }

    /// Fetch a nonce with an unauthenticated request, as clients do.
    pub(super) fn challenge(&mut self, from: SocketAddr) -> Resp {
        let r = self.send(from, method::ALLOCATE, [9; 12], None, &udp(), &[]);
        assert_eq!(r.code(), Some(401));
        self.nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
        r
    }

    pub(super) fn allocate(&mut self, from: SocketAddr, c: &Creds, tid: u8) -> Resp {
        self.challenge(from);
        self.send(from, method::ALLOCATE, [tid; 12], Some(c), &udp(), &[])
    }

    /// CreatePermission for one peer with the client's credentials.
    pub(super) fn permit(
        &mut self,
        from: SocketAddr,
        c: &Creds,
        tid: u8,
        peer: SocketAddr,
    ) -> Resp {
        self.send(
            from,
            method::CREATE_PERMISSION,
            [tid; 12],
            Some(c),
            &[],
            &[peer],
        )
    }

    pub(super) fn view(&self) -> Arc<View> {
        self.views.lock().unwrap().clone().unwrap()
    }

    pub(super) fn metric(&self, needle: &str) -> bool {
        self.metrics.render().lines().any(|l| l == needle)
    }
}

pub(super) fn udp() -> Vec<(u16, Vec<u8>)> {
    vec![(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])]
}

pub(super) fn peer(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub(super) fn send_ind(to: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut e = Encoder::new(&mut buf, method::SEND, Class::Indication, &[7; 12]);
    e.xor_address(attr::XOR_PEER_ADDRESS, to);
    e.attr(attr::DATA, data);
    e.finish();
    buf
}

pub(super) fn chan_attr(n: u16) -> Vec<(u16, Vec<u8>)> {
    let b = n.to_be_bytes();
    vec![(attr::CHANNEL_NUMBER, vec![b[0], b[1], 0, 0])]
}

impl H {
    pub(super) fn view_relay(&self) -> SocketAddr {
        let a = self.t.relayed_address(client(1)).unwrap();
        SocketAddr::new(IpAddr::from([127, 0, 0, 1]), a.port())
    }
}
