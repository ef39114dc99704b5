//! Socket-free tests of every TURN method and error path of the allocation table.

use super::*;
use crate::config::{AuthConfig, TurnConfig};
use crate::stun::codec::decode_error_code;
use std::sync::Mutex as StdMutex;

#[derive(Debug)]
struct Fake {
    addr: SocketAddr,
    view: Arc<StdMutex<Option<Arc<View>>>>,
    open: Arc<StdMutex<HashSet<u16>>>,
    /// Whether DF can be set on this socket.
    df: bool,
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

const SECRET: &str = "s3cret";
const REALM: &str = "test.realm";

struct H {
    t: Table<Fake>,
    env: Env,
    open: Arc<StdMutex<HashSet<u16>>>,
    views: Arc<StdMutex<Option<Arc<View>>>>,
    metrics: Arc<Metrics>,
    auth: Arc<Auth>,
    nonce: Vec<u8>,
    busy: HashSet<u16>,
    /// The address the last relay socket was bound to.
    last_bind: Arc<StdMutex<Option<SocketAddr>>>,
    /// Relay sockets refuse DF.
    no_df: bool,
}

fn cfg() -> TurnConfig {
    TurnConfig {
        realm: REALM.into(),
        relay_port_min: 50000,
        relay_port_max: 50009,
        max_allocations_per_user: 3,
        allow_peers: vec!["127.0.0.0/8".into()],
        ..Default::default()
    }
}

fn harness(t: TurnConfig) -> H {
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
            "udp",
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

fn client(n: u16) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], n))
}

/// A response, decoded enough to assert on.
struct Resp {
    raw: Vec<u8>,
    outcome: Outcome,
}

impl Resp {
    fn msg(&self) -> Message<'_> {
        Message::parse(&self.raw).expect("response parses")
    }
    fn code(&self) -> Option<u16> {
        let m = self.msg();
        m.get(attr::ERROR_CODE)
            .map(|v| decode_error_code(v).unwrap().0)
    }
}

#[derive(Clone)]
struct Creds {
    user: String,
    pass: String,
    sha256: bool,
}

fn rest(h: &H, expiry_from_now: i64) -> Creds {
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
    fn bind(&self) -> impl FnMut(SocketAddr, RelayKind) -> std::io::Result<Fake> + 'static {
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

    fn send(
        &mut self,
        from: SocketAddr,
        m: u16,
        tid: [u8; 12],
        creds: Option<&Creds>,
        attrs: &[(u16, Vec<u8>)],
        peers: &[SocketAddr],
    ) -> Resp {
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
        let msg = Message::parse(&buf).unwrap();
        let mut out = Vec::new();
        let env = self.env;
        let mut bind = self.bind();
        let outcome = self.t.handle_request(env, from, &msg, &mut out, &mut bind);
        Resp { raw: out, outcome }
    }

    /// Fetch a nonce with an unauthenticated request, as clients do.
    fn challenge(&mut self, from: SocketAddr) -> Resp {
        let r = self.send(from, method::ALLOCATE, [9; 12], None, &udp(), &[]);
        assert_eq!(r.code(), Some(401));
        self.nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
        r
    }

    fn allocate(&mut self, from: SocketAddr, c: &Creds, tid: u8) -> Resp {
        self.challenge(from);
        self.send(from, method::ALLOCATE, [tid; 12], Some(c), &udp(), &[])
    }

    fn view(&self) -> Arc<View> {
        self.views.lock().unwrap().clone().unwrap()
    }

    fn metric(&self, needle: &str) -> bool {
        self.metrics.render().lines().any(|l| l == needle)
    }
}

fn udp() -> Vec<(u16, Vec<u8>)> {
    vec![(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])]
}

fn peer(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn no_credentials_gets_401_with_realm_nonce_and_algorithms() {
    let mut h = harness(cfg());
    let r = h.challenge(client(1));
    let m = r.msg();
    assert_eq!(m.get(attr::REALM).unwrap(), REALM.as_bytes());
    assert!(m.get(attr::NONCE).unwrap().starts_with(b"obMatJos2"));
    assert_eq!(
        m.get(attr::PASSWORD_ALGORITHMS).unwrap(),
        &[0, 1, 0, 0, 0, 2, 0, 0]
    );
    assert!(!m.has_integrity());
    assert!(h.metric("switchboard_auth_failures_total{reason=\"missing\"} 1"));
    assert!(h.metric("switchboard_turn_error_responses_total{code=\"401\"} 1"));
}

#[test]
fn allocate_success_with_rest_credentials() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    let r = h.allocate(client(1), &c, 1);
    assert_eq!(r.outcome, Outcome::Success, "{:?}", r.code());
    let m = r.msg();
    assert_eq!(m.class(), Class::Success);
    let relayed = m.xor_address(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap();
    assert_eq!(relayed.ip(), IpAddr::from([127, 0, 0, 1]));
    assert!((50000..=50009).contains(&relayed.port()));
    assert_eq!(
        m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(),
        client(1)
    );
    assert_eq!(decode_u32(m.get(attr::LIFETIME).unwrap()).unwrap(), 600);
    assert!(m.verify_integrity(&long_term_key(&c.user, REALM, &c.pass)));
    assert!(m.has_fingerprint());
    assert_eq!(h.t.relayed_address(client(1)), Some(relayed));
    assert_eq!(h.view().client, Some(client(1)));
    assert!(h.metric("switchboard_turn_allocations_active{transport=\"udp\"} 1"));
    assert!(h.metric("switchboard_turn_allocations_created_total{transport=\"udp\"} 1"));
}

#[test]
fn static_user_and_sha256_integrity() {
    let mut h = harness(cfg());
    let c = Creds {
        user: "alice".into(),
        pass: "wonder".into(),
        sha256: true,
    };
    let r = h.allocate(client(1), &c, 1);
    assert_eq!(r.outcome, Outcome::Success, "{:?}", r.code());
    let m = r.msg();
    assert!(m.verify_integrity_sha256(&long_term_key_sha256("alice", REALM, "wonder")));
    assert!(!m.has_integrity());
    let bad = Creds {
        pass: "nope".into(),
        ..c
    };
    let r = h.allocate(client(2), &bad, 2);
    assert_eq!(r.code(), Some(401));
    // Unknown PASSWORD-ALGORITHM is a bad request.
    h.challenge(client(3));
    let mut buf = Vec::new();
    let mut e = Encoder::new(&mut buf, method::ALLOCATE, Class::Request, &[4; 12]);
    e.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    e.attr(attr::USERNAME, b"alice");
    e.attr(attr::REALM, REALM.as_bytes());
    e.attr(attr::NONCE, &h.nonce);
    e.attr(attr::PASSWORD_ALGORITHM, &[0, 9, 0, 0]);
    e.integrity_sha256(&long_term_key_sha256("alice", REALM, "wonder"));
    e.finish();
    let msg = Message::parse(&buf).unwrap();
    let mut out = Vec::new();
    let env = h.env;
    let mut b = h.bind();
    let o = h.t.handle_request(env, client(3), &msg, &mut out, &mut b);
    assert_eq!(o, Outcome::Error(400));
}

#[test]
fn wrong_expired_unknown_credentials_get_401() {
    let mut h = harness(cfg());
    let mut forged = rest(&h, 3600);
    forged.pass = "Zm9yZ2Vk".into();
    assert_eq!(h.allocate(client(1), &forged, 1).code(), Some(401));
    assert!(h.metric("switchboard_auth_failures_total{reason=\"bad_signature\"} 1"));
    let expired = rest(&h, -10);
    let r = h.allocate(client(2), &expired, 2);
    assert_eq!(r.code(), Some(401));
    assert!(r.msg().get(attr::NONCE).is_some());
    assert!(h.metric("switchboard_auth_failures_total{reason=\"expired\"} 1"));
    let unknown = Creds {
        user: "mallory".into(),
        pass: "x".into(),
        sha256: false,
    };
    assert_eq!(h.allocate(client(3), &unknown, 3).code(), Some(401));
    let wrong_realm = {
        let c = rest(&h, 3600);
        h.challenge(client(4));
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf, method::ALLOCATE, Class::Request, &[5; 12]);
        e.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        e.attr(attr::USERNAME, c.user.as_bytes());
        e.attr(attr::REALM, b"other");
        e.attr(attr::NONCE, &h.nonce);
        e.integrity(&long_term_key(&c.user, "other", &c.pass));
        e.finish();
        buf
    };
    let msg = Message::parse(&wrong_realm).unwrap();
    let mut out = Vec::new();
    let env = h.env;
    let mut b = h.bind();
    assert_eq!(
        h.t.handle_request(env, client(4), &msg, &mut out, &mut b),
        Outcome::Error(401)
    );
}

#[test]
fn integrity_without_username_is_400() {
    let mut h = harness(cfg());
    let mut buf = Vec::new();
    let mut e = Encoder::new(&mut buf, method::ALLOCATE, Class::Request, &[5; 12]);
    e.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    e.integrity(b"whatever");
    e.finish();
    let msg = Message::parse(&buf).unwrap();
    let mut out = Vec::new();
    let env = h.env;
    let mut b = h.bind();
    assert_eq!(
        h.t.handle_request(env, client(1), &msg, &mut out, &mut b),
        Outcome::Error(400)
    );
}

#[test]
fn stale_and_forged_nonces_get_438_with_fresh_nonce() {
    let mut h = harness(cfg());
    let c = rest(&h, 100_000);
    h.challenge(client(1));
    let old = h.nonce.clone();
    h.env.unix += 601;
    h.env.now += Duration::from_secs(601);
    let r = h.send(client(1), method::ALLOCATE, [1; 12], Some(&c), &udp(), &[]);
    assert_eq!(r.code(), Some(438));
    let fresh = r.msg().get(attr::NONCE).unwrap().to_vec();
    assert_ne!(fresh, old);
    assert_eq!(r.msg().get(attr::REALM).unwrap(), REALM.as_bytes());
    h.nonce = fresh;
    let r = h.send(client(1), method::ALLOCATE, [2; 12], Some(&c), &udp(), &[]);
    assert_eq!(r.outcome, Outcome::Success);
    // A nonce we never issued is refused the same way.
    h.nonce = b"obMatJos2gAAA0000000000000000000000000000000000".to_vec();
    let r = h.send(client(2), method::ALLOCATE, [3; 12], Some(&c), &udp(), &[]);
    assert_eq!(r.code(), Some(438));
    h.nonce = b"plain".to_vec();
    let r = h.send(client(2), method::ALLOCATE, [3; 12], Some(&c), &udp(), &[]);
    assert_eq!(r.code(), Some(438));
}

#[test]
fn allocate_errors_transport_family_and_malformed() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    h.challenge(client(1));
    let tcp = vec![(attr::REQUESTED_TRANSPORT, vec![6, 0, 0, 0])];
    let r = h.send(client(1), method::ALLOCATE, [1; 12], Some(&c), &tcp, &[]);
    assert_eq!(r.code(), Some(442));
    assert!(r
        .msg()
        .verify_integrity(&long_term_key(&c.user, REALM, &c.pass)));
    let r = h.send(client(1), method::ALLOCATE, [2; 12], Some(&c), &[], &[]);
    assert_eq!(r.code(), Some(400), "missing REQUESTED-TRANSPORT");
    let bad_len = vec![(attr::REQUESTED_TRANSPORT, vec![17, 0])];
    let r = h.send(
        client(1),
        method::ALLOCATE,
        [3; 12],
        Some(&c),
        &bad_len,
        &[],
    );
    assert_eq!(r.code(), Some(400));
    let mut a = udp();
    a.push((attr::LIFETIME, vec![0, 0, 1]));
    let r = h.send(client(1), method::ALLOCATE, [4; 12], Some(&c), &a, &[]);
    assert_eq!(r.code(), Some(400), "short LIFETIME");
    let mut a = udp();
    a.push((attr::REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0]));
    let r = h.send(client(1), method::ALLOCATE, [5; 12], Some(&c), &a, &[]);
    assert_eq!(r.code(), Some(440), "no IPv6 relay address configured");
    let mut a = udp();
    a.push((attr::REQUESTED_ADDRESS_FAMILY, vec![7, 0, 0, 0]));
    let r = h.send(client(1), method::ALLOCATE, [6; 12], Some(&c), &a, &[]);
    assert_eq!(r.code(), Some(440));
    let mut a = udp();
    a.push((attr::RESERVATION_TOKEN, vec![1; 8]));
    a.push((attr::EVEN_PORT, vec![0]));
    let r = h.send(client(1), method::ALLOCATE, [7; 12], Some(&c), &a, &[]);
    assert_eq!(r.code(), Some(400), "EVEN-PORT with RESERVATION-TOKEN");
    let mut a = udp();
    a.push((attr::RESERVATION_TOKEN, vec![1; 8]));
    let r = h.send(client(1), method::ALLOCATE, [8; 12], Some(&c), &a, &[]);
    assert_eq!(r.code(), Some(508), "unknown reservation token");
    let mut a = udp();
    a.push((0x7777, vec![1, 2, 3, 4]));
    let r = h.send(client(1), method::ALLOCATE, [10; 12], Some(&c), &a, &[]);
    assert_eq!(r.code(), Some(420));
    assert_eq!(
        r.msg().get(attr::UNKNOWN_ATTRIBUTES).unwrap(),
        &[0x77, 0x77]
    );
    // After all that, a good request still works.
    let r = h.send(client(1), method::ALLOCATE, [11; 12], Some(&c), &udp(), &[]);
    assert_eq!(r.outcome, Outcome::Success);
    assert_eq!(h.t.len(), 1);
}

#[test]
fn lifetime_is_clamped_and_dont_fragment_accepted() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    h.challenge(client(1));
    let mut a = udp();
    a.push((attr::LIFETIME, 99_999u32.to_be_bytes().to_vec()));
    a.push((attr::DONT_FRAGMENT, vec![]));
    let r = h.send(client(1), method::ALLOCATE, [1; 12], Some(&c), &a, &[]);
    assert_eq!(
        decode_u32(r.msg().get(attr::LIFETIME).unwrap()).unwrap(),
        3600
    );
    let mut a = udp();
    a.push((attr::LIFETIME, 5u32.to_be_bytes().to_vec()));
    let r = h.send(client(2), method::ALLOCATE, [2; 12], Some(&c), &a, &[]);
    assert_eq!(
        decode_u32(r.msg().get(attr::LIFETIME).unwrap()).unwrap(),
        600
    );
}

#[test]
fn second_allocate_is_437_but_retransmit_gets_cached_response() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    let first = h.allocate(client(1), &c, 1);
    assert_eq!(first.outcome, Outcome::Success);
    let again = h.send(client(1), method::ALLOCATE, [1; 12], Some(&c), &udp(), &[]);
    assert_eq!(again.outcome, Outcome::Retransmit);
    assert_eq!(again.raw, first.raw);
    let other = h.send(client(1), method::ALLOCATE, [2; 12], Some(&c), &udp(), &[]);
    assert_eq!(other.code(), Some(437));
    assert_eq!(h.t.len(), 1);
}

#[test]
fn refresh_extends_and_zero_deletes() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    h.allocate(client(1), &c, 1);
    let port = h.t.relayed_address(client(1)).unwrap().port();
    assert!(h.open.lock().unwrap().contains(&port));
    let life = |v: u32| vec![(attr::LIFETIME, v.to_be_bytes().to_vec())];
    let r = h.send(
        client(1),
        method::REFRESH,
        [2; 12],
        Some(&c),
        &life(1200),
        &[],
    );
    assert_eq!(r.outcome, Outcome::Success);
    assert_eq!(
        decode_u32(r.msg().get(attr::LIFETIME).unwrap()).unwrap(),
        1200
    );
    let r = h.send(client(1), method::REFRESH, [3; 12], Some(&c), &life(0), &[]);
    assert_eq!(decode_u32(r.msg().get(attr::LIFETIME).unwrap()).unwrap(), 0);
    assert!(h.t.is_empty());
    assert!(
        !h.open.lock().unwrap().contains(&port),
        "relay socket freed"
    );
    assert!(h.metric("switchboard_turn_allocations_deleted_total{reason=\"refreshed_zero\"} 1"));
    let r = h.send(
        client(1),
        method::REFRESH,
        [4; 12],
        Some(&c),
        &life(600),
        &[],
    );
    assert_eq!(r.code(), Some(437), "no allocation");
    let fam = vec![(attr::REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0])];
    h.allocate(client(2), &c, 5);
    let r = h.send(client(2), method::REFRESH, [6; 12], Some(&c), &fam, &[]);
    assert_eq!(r.code(), Some(443));
}

#[test]
fn requests_on_an_allocation_use_its_stored_key_even_after_expiry() {
    let mut h = harness(cfg());
    let c = rest(&h, 60);
    h.allocate(client(1), &c, 1);
    // The REST username expires; the allocation keeps refreshing with its stored key.
    h.env.unix += 120;
    h.env.now += Duration::from_secs(120);
    h.challenge(client(9));
    let life = vec![(attr::LIFETIME, 600u32.to_be_bytes().to_vec())];
    let r = h.send(client(1), method::REFRESH, [2; 12], Some(&c), &life, &[]);
    assert_eq!(r.outcome, Outcome::Success, "{:?}", r.code());
    // A new allocation with the same expired username is refused.
    assert_eq!(h.allocate(client(2), &c, 3).code(), Some(401));
    // Another user's valid credentials on this 5-tuple are 441.
    let other = rest(&h, 3600);
    let r = h.send(
        client(1),
        method::REFRESH,
        [4; 12],
        Some(&other),
        &life,
        &[],
    );
    assert_eq!(r.code(), Some(441));
    // The right username with a wrong password is 401.
    let forged = Creds {
        pass: "bad".into(),
        ..c.clone()
    };
    let r = h.send(
        client(1),
        method::REFRESH,
        [5; 12],
        Some(&forged),
        &life,
        &[],
    );
    assert_eq!(r.code(), Some(401));
}

#[test]
fn create_permission_several_peers_denied_and_mismatch() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    h.allocate(client(1), &c, 1);
    let r = h.send(
        client(1),
        method::CREATE_PERMISSION,
        [2; 12],
        Some(&c),
        &[],
        &[
            peer(1000),
            SocketAddr::from(([127, 0, 0, 2], 1)),
            peer(2000),
        ],
    );
    assert_eq!(r.outcome, Outcome::Success, "{:?}", r.code());
    let v = h.view();
    assert_eq!(v.perms.len(), 2);
    assert!(v.permits(IpAddr::from([127, 0, 0, 2]), h.env.now));
    assert!(h.metric("switchboard_turn_permissions_active 2"));
    let r = h.send(
        client(1),
        method::CREATE_PERMISSION,
        [3; 12],
        Some(&c),
        &[],
        &[SocketAddr::from(([10, 0, 0, 1], 5))],
    );
    assert_eq!(r.code(), Some(403));
    let r = h.send(
        client(1),
        method::CREATE_PERMISSION,
        [4; 12],
        Some(&c),
        &[],
        &[SocketAddr::from(([169, 254, 169, 254], 80))],
    );
    assert_eq!(r.code(), Some(403));
    let r = h.send(
        client(1),
        method::CREATE_PERMISSION,
        [5; 12],
        Some(&c),
        &[],
        &["[2001:db8::1]:5".parse().unwrap()],
    );
    assert_eq!(r.code(), Some(443));
    let r = h.send(
        client(1),
        method::CREATE_PERMISSION,
        [6; 12],
        Some(&c),
        &[],
        &[],
    );
    assert_eq!(r.code(), Some(400), "no XOR-PEER-ADDRESS");
    let r = h.send(
        client(1),
        method::CREATE_PERMISSION,
        [7; 12],
        Some(&c),
        &[(attr::XOR_PEER_ADDRESS, vec![0, 1, 0])],
        &[],
    );
    assert_eq!(r.code(), Some(400), "malformed XOR-PEER-ADDRESS");
    let r = h.send(
        client(2),
        method::CREATE_PERMISSION,
        [8; 12],
        Some(&c),
        &[],
        &[peer(1)],
    );
    assert_eq!(r.code(), Some(437), "no allocation on this 5-tuple");
}

#[test]
fn permissions_expire_after_300_seconds_unless_refreshed() {
    let mut h = harness(cfg());
    let c = rest(&h, 100_000);
    h.allocate(client(1), &c, 1);
    h.send(
        client(1),
        method::CREATE_PERMISSION,
        [2; 12],
        Some(&c),
        &[],
        &[peer(1)],
    );
    let deadline = h.t.next_deadline().unwrap();
    assert_eq!(deadline, h.env.now + PERMISSION_LIFETIME);
    h.env.now = deadline;
    h.t.handle_timeout(h.env);
    assert!(h.view().perms.is_empty());
    assert!(h.metric("switchboard_turn_permissions_active 0"));
    let send = send_ind(peer(1), b"x");
    let m = Message::parse(&send).unwrap();
    assert!(h.t.send_indication(h.env.now, client(1), &m).is_none());
}

fn send_ind(to: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut e = Encoder::new(&mut buf, method::SEND, Class::Indication, &[7; 12]);
    e.xor_address(attr::XOR_PEER_ADDRESS, to);
    e.attr(attr::DATA, data);
    e.finish();
    buf
}

fn chan_attr(n: u16) -> Vec<(u16, Vec<u8>)> {
    let b = n.to_be_bytes();
    vec![(attr::CHANNEL_NUMBER, vec![b[0], b[1], 0, 0])]
}

#[test]
fn channel_bind_rules_and_channel_data() {
    let mut h = harness(cfg());
    let c = rest(&h, 100_000);
    h.allocate(client(1), &c, 1);
    let r = h.send(
        client(1),
        method::CHANNEL_BIND,
        [2; 12],
        Some(&c),
        &chan_attr(0x4000),
        &[peer(1000)],
    );
    assert_eq!(r.outcome, Outcome::Success, "{:?}", r.code());
    let v = h.view();
    assert_eq!(v.channel_for(peer(1000), h.env.now), Some(0x4000));
    assert!(
        v.permits(peer(1000).ip(), h.env.now),
        "bind installs permission"
    );
    // Rebinding the same pair refreshes it.
    let r = h.send(
        client(1),
        method::CHANNEL_BIND,
        [3; 12],
        Some(&c),
        &chan_attr(0x4000),
        &[peer(1000)],
    );
    assert_eq!(r.outcome, Outcome::Success);
    for (tid, num, p, code) in [
        (4u8, 0x4000u16, peer(1001), 400u16), // channel bound to another peer
        (5, 0x4001, peer(1000), 400),         // peer bound to another channel
        (6, 0x3FFF, peer(1002), 400),         // below the range
        (7, 0x8000, peer(1002), 400),         // above the range
        (8, 0x4002, SocketAddr::from(([10, 1, 1, 1], 1)), 403),
        (9, 0x4003, "[::1]:5".parse().unwrap(), 443),
    ] {
        let r = h.send(
            client(1),
            method::CHANNEL_BIND,
            [tid; 12],
            Some(&c),
            &chan_attr(num),
            &[p],
        );
        assert_eq!(r.code(), Some(code), "channel {num:#x} peer {p}");
    }
    let r = h.send(
        client(1),
        method::CHANNEL_BIND,
        [10; 12],
        Some(&c),
        &[],
        &[peer(1003)],
    );
    assert_eq!(r.code(), Some(400), "missing CHANNEL-NUMBER");
    let r = h.send(
        client(1),
        method::CHANNEL_BIND,
        [11; 12],
        Some(&c),
        &chan_attr(0x4005),
        &[],
    );
    assert_eq!(r.code(), Some(400), "missing XOR-PEER-ADDRESS");
    // ChannelData goes to the bound peer; unknown channels and other clients are dropped.
    let pkt = [0x40, 0x00, 0x00, 0x03, b'a', b'b', b'c', 0];
    let (relay, to, data) = h.t.channel_data(h.env.now, client(1), &pkt).unwrap();
    assert_eq!((to, data), (peer(1000), &b"abc"[..]));
    assert_eq!(relay.local_addr(), h.view_relay());
    assert!(h
        .t
        .channel_data(h.env.now, client(1), &[0x40, 0x01, 0, 1, 9])
        .is_none());
    assert!(h.t.channel_data(h.env.now, client(2), &pkt).is_none());
    assert!(h
        .t
        .channel_data(h.env.now, client(1), &[0x40, 0x00, 0, 9, 1])
        .is_none());
    assert!(h.metric("switchboard_turn_channels_active 1"));
    // Expiry: after 600 s the channel stops relaying and is in cool-down for 300 s.
    let life = vec![(attr::LIFETIME, 3600u32.to_be_bytes().to_vec())];
    let r = h.send(client(1), method::REFRESH, [20; 12], Some(&c), &life, &[]);
    assert_eq!(r.outcome, Outcome::Success);
    h.env.now += CHANNEL_LIFETIME;
    h.env.unix += CHANNEL_LIFETIME.as_secs();
    h.t.handle_timeout(h.env);
    h.challenge(client(9));
    assert!(h.t.channel_data(h.env.now, client(1), &pkt).is_none());
    assert!(h.metric("switchboard_turn_channels_active 0"));
    let r = h.send(
        client(1),
        method::CHANNEL_BIND,
        [12; 12],
        Some(&c),
        &chan_attr(0x4000),
        &[peer(1009)],
    );
    assert_eq!(
        r.code(),
        Some(400),
        "cool-down keeps the number for its peer"
    );
    let r = h.send(
        client(1),
        method::CHANNEL_BIND,
        [13; 12],
        Some(&c),
        &chan_attr(0x4000),
        &[peer(1000)],
    );
    assert_eq!(r.outcome, Outcome::Success, "same pair may rebind");
    assert!(h.metric("switchboard_turn_channels_active 1"));
}

impl H {
    fn view_relay(&self) -> SocketAddr {
        let a = self.t.relayed_address(client(1)).unwrap();
        SocketAddr::new(IpAddr::from([127, 0, 0, 1]), a.port())
    }
}

#[test]
fn send_indication_needs_permission_and_respects_bandwidth_cap() {
    let mut t = cfg();
    t.max_bps_per_allocation = 100;
    let mut h = harness(t);
    let c = rest(&h, 100_000);
    h.allocate(client(1), &c, 1);
    let ind = send_ind(peer(7), &[1u8; 60]);
    let m = Message::parse(&ind).unwrap();
    assert!(
        h.t.send_indication(h.env.now, client(1), &m).is_none(),
        "no permission yet"
    );
    h.send(
        client(1),
        method::CREATE_PERMISSION,
        [2; 12],
        Some(&c),
        &[],
        &[peer(7)],
    );
    let (_, to, data) = h.t.send_indication(h.env.now, client(1), &m).unwrap();
    assert_eq!((to, data.len()), (peer(7), 60));
    assert!(
        h.t.send_indication(h.env.now, client(1), &m).is_none(),
        "over 100 B/s"
    );
    let later = h.env.now + Duration::from_secs(1);
    assert!(h.t.send_indication(later, client(1), &m).is_some());
    assert!(h.t.send_indication(later, client(2), &m).is_none());
}

#[test]
fn allocation_expires_and_frees_socket_and_quota() {
    let mut h = harness(cfg());
    let c = rest(&h, 100_000);
    h.allocate(client(1), &c, 1);
    let port = h.t.relayed_address(client(1)).unwrap().port();
    h.env.now += Duration::from_secs(600);
    h.t.handle_timeout(h.env);
    assert!(h.t.is_empty());
    assert!(!h.open.lock().unwrap().contains(&port));
    assert_eq!(h.t.next_deadline(), None);
    assert!(h.metric("switchboard_turn_allocations_deleted_total{reason=\"expired\"} 1"));
    assert!(h.metric("switchboard_turn_allocations_active{transport=\"udp\"} 0"));
    assert_eq!(h.t.pool.total(), 0);
}

#[test]
fn per_user_quota_486_and_total_508() {
    let mut t = cfg();
    t.max_allocations = 4;
    let mut h = harness(t);
    let c = rest(&h, 3600);
    for i in 1..=3 {
        assert_eq!(h.allocate(client(i), &c, i as u8).outcome, Outcome::Success);
    }
    let r = h.allocate(client(4), &c, 4);
    assert_eq!(r.code(), Some(486));
    assert!(r
        .msg()
        .verify_integrity(&long_term_key(&c.user, REALM, &c.pass)));
    // A fresh REST credential for the same user counts against the same quota.
    let c2 = rest(&h, 7200);
    assert_eq!(h.allocate(client(5), &c2, 5).code(), Some(486));
    let alice = Creds {
        user: "alice".into(),
        pass: "wonder".into(),
        sha256: false,
    };
    assert_eq!(h.allocate(client(6), &alice, 6).outcome, Outcome::Success);
    assert_eq!(h.allocate(client(7), &alice, 7).code(), Some(508));
    // Releasing one makes room again.
    h.t.delete(client(1), DeleteReason::Closed);
    assert_eq!(h.allocate(client(8), &c, 8).outcome, Outcome::Success);
}

#[test]
fn port_exhaustion_and_busy_ports_give_508() {
    let mut t = cfg();
    t.relay_port_min = 50000;
    t.relay_port_max = 50001;
    t.max_allocations_per_user = 10;
    let mut h = harness(t);
    h.busy.insert(50000);
    let c = rest(&h, 3600);
    assert_eq!(h.allocate(client(1), &c, 1).outcome, Outcome::Success);
    assert_eq!(h.t.relayed_address(client(1)).unwrap().port(), 50001);
    assert_eq!(h.allocate(client(2), &c, 2).code(), Some(508));
    assert_eq!(
        h.t.pool.total(),
        1,
        "refused allocation gives its quota back"
    );
}

#[test]
fn even_port_with_reservation() {
    let mut t = cfg();
    t.max_allocations_per_user = 10;
    let mut h = harness(t);
    let c = rest(&h, 3600);
    h.challenge(client(1));
    let mut a = udp();
    a.push((attr::EVEN_PORT, vec![0x80]));
    let r = h.send(client(1), method::ALLOCATE, [1; 12], Some(&c), &a, &[]);
    assert_eq!(r.outcome, Outcome::Success, "{:?}", r.code());
    let port = h.t.relayed_address(client(1)).unwrap().port();
    assert_eq!(port % 2, 0);
    let token = r.msg().get(attr::RESERVATION_TOKEN).unwrap().to_vec();
    assert_eq!(token.len(), 8);
    assert!(h.open.lock().unwrap().contains(&(port + 1)));
    let mut a = udp();
    a.push((attr::RESERVATION_TOKEN, token.clone()));
    let r = h.send(client(2), method::ALLOCATE, [2; 12], Some(&c), &a, &[]);
    assert_eq!(r.outcome, Outcome::Success, "{:?}", r.code());
    assert_eq!(h.t.relayed_address(client(2)).unwrap().port(), port + 1);
    let r = h.send(client(3), method::ALLOCATE, [3; 12], Some(&c), &a, &[]);
    assert_eq!(r.code(), Some(508), "token used up");
    // An unused reservation is released after 30 s.
    let mut a = udp();
    a.push((attr::EVEN_PORT, vec![0x80]));
    h.send(client(4), method::ALLOCATE, [4; 12], Some(&c), &a, &[]);
    let p4 = h.t.relayed_address(client(4)).unwrap().port();
    assert!(h.open.lock().unwrap().contains(&(p4 + 1)));
    h.env.now += RESERVATION_LIFETIME;
    h.t.handle_timeout(h.env);
    assert!(!h.open.lock().unwrap().contains(&(p4 + 1)));
    // EVEN-PORT without R: even port, no token.
    let mut a = udp();
    a.push((attr::EVEN_PORT, vec![0x00]));
    let r = h.send(client(5), method::ALLOCATE, [5; 12], Some(&c), &a, &[]);
    assert!(r.msg().get(attr::RESERVATION_TOKEN).is_none());
    assert_eq!(h.t.relayed_address(client(5)).unwrap().port() % 2, 0);
}

#[test]
fn draining_refuses_new_allocations() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    h.allocate(client(1), &c, 1);
    h.env.draining = true;
    assert_eq!(h.allocate(client(2), &c, 2).code(), Some(508));
    // Existing allocations still refresh.
    let r = h.send(client(1), method::REFRESH, [3; 12], Some(&c), &[], &[]);
    assert_eq!(r.outcome, Outcome::Success);
    let mut t = cfg();
    t.alternate_server = Some("192.0.2.9:3478".parse().unwrap());
    let mut h = harness(t);
    h.env.draining = true;
    let r = h.allocate(client(1), &c, 1);
    assert_eq!(r.code(), Some(300));
    let alt = r.msg().get(attr::ALTERNATE_SERVER).unwrap().to_vec();
    assert_eq!(
        crate::stun::codec::decode_address(&alt).unwrap(),
        "192.0.2.9:3478".parse().unwrap()
    );
}

#[test]
fn advertised_relay_ip_differs_from_bind_ip() {
    let mut t = cfg();
    t.relay_bind = Some("127.0.0.1".parse().unwrap());
    t.relay_ip = vec!["203.0.113.10".parse().unwrap()];
    let mut h = harness(t);
    let c = rest(&h, 3600);
    let r = h.allocate(client(1), &c, 1);
    let relayed = r
        .msg()
        .xor_address(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(relayed.ip(), "203.0.113.10".parse::<IpAddr>().unwrap());
    assert_eq!(h.view_relay().port(), relayed.port());
}

#[test]
fn wildcard_listener_binds_and_reports_the_address_the_request_reached() {
    let mut t = cfg();
    t.listen = vec!["0.0.0.0:3478".parse().unwrap()];
    let mut h = harness(t.clone());
    let c = rest(&h, 3600);
    // No local address known: nothing truthful to report, so no relay (never 0.0.0.0).
    assert_eq!(h.allocate(client(1), &c, 1).code(), Some(440));
    for (n, local) in [(10, "203.0.113.10"), (11, "203.0.113.11")] {
        h.env.local = Some(local.parse().unwrap());
        let r = h.allocate(client(n), &c, 2);
        let relayed = r
            .msg()
            .xor_address(attr::XOR_RELAYED_ADDRESS)
            .unwrap()
            .unwrap();
        assert_eq!(relayed.ip().to_string(), local);
        assert_eq!(
            *h.last_bind.lock().unwrap(),
            Some(relayed),
            "bound where reported"
        );
        assert_eq!(h.view().local, Some(local.parse().unwrap()));
    }
    // 1:1 NAT: the private address the request reached maps to its public pair.
    t.relay_ip = vec![
        "198.51.100.1/10.0.0.5".parse().unwrap(),
        "198.51.100.2/10.0.1.5".parse().unwrap(),
    ];
    let mut h = harness(t);
    let c = rest(&h, 3600);
    for (n, local, public) in [
        (20, "10.0.0.5", "198.51.100.1"),
        (21, "10.0.1.5", "198.51.100.2"),
    ] {
        h.env.local = Some(local.parse().unwrap());
        let r = h.allocate(client(n), &c, 3);
        let relayed = r
            .msg()
            .xor_address(attr::XOR_RELAYED_ADDRESS)
            .unwrap()
            .unwrap();
        assert_eq!(relayed.ip().to_string(), public);
        let bound = h.last_bind.lock().unwrap().unwrap();
        assert_eq!(bound.ip().to_string(), local);
    }
}

#[test]
fn relay_to_own_address_only_on_relay_ports() {
    let mut t = cfg();
    t.allow_peers.push("203.0.113.0/24".into());
    let mut s = Settings::from_config(&t, false);
    s.policy
        .set_own(&["203.0.113.10".parse().unwrap()], 50000..=50009);
    let mut h = harness(t);
    h.t.settings = Arc::new(s);
    let c = rest(&h, 3600);
    h.allocate(client(1), &c, 1);
    let own_http: SocketAddr = "203.0.113.10:8080".parse().unwrap();
    let own_relay: SocketAddr = "203.0.113.10:50003".parse().unwrap();
    let r = h.send(
        client(1),
        method::CREATE_PERMISSION,
        [2; 12],
        Some(&c),
        &[],
        &[own_http],
    );
    assert_eq!(r.code(), Some(403));
    let r = h.send(
        client(1),
        method::CREATE_PERMISSION,
        [3; 12],
        Some(&c),
        &[],
        &[own_relay],
    );
    assert_eq!(r.code(), None);
    let ch = vec![(attr::CHANNEL_NUMBER, vec![0x40, 0x00, 0, 0])];
    let r = h.send(
        client(1),
        method::CHANNEL_BIND,
        [4; 12],
        Some(&c),
        &ch,
        &[own_http],
    );
    assert_eq!(r.code(), Some(403));
    // A Send indication to the permitted IP but a non-relay port is dropped.
    let mut buf = Vec::new();
    let mut e = Encoder::new(&mut buf, method::SEND, Class::Indication, &[5; 12]);
    e.xor_address(attr::XOR_PEER_ADDRESS, own_http);
    e.attr(attr::DATA, b"GET / HTTP/1.0");
    e.finish();
    let m = Message::parse(&buf).unwrap();
    let now = h.env.now;
    assert!(h.t.send_indication(now, client(1), &m).is_none());
}

#[test]
fn unknown_method_and_non_requests() {
    let mut h = harness(cfg());
    let r = h.send(client(1), 0x0123, [1; 12], None, &[], &[]);
    assert_eq!(r.code(), Some(400));
    let mut buf = Vec::new();
    Encoder::new(&mut buf, method::ALLOCATE, Class::Success, &[1; 12]).finish();
    let m = Message::parse(&buf).unwrap();
    let mut out = Vec::new();
    let env = h.env;
    let mut b = h.bind();
    assert_eq!(
        h.t.handle_request(env, client(1), &m, &mut out, &mut b),
        Outcome::Ignored
    );
    assert!(out.is_empty());
}

#[test]
fn dropping_the_table_frees_everything() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    h.allocate(client(1), &c, 1);
    h.send(
        client(1),
        method::CREATE_PERMISSION,
        [2; 12],
        Some(&c),
        &[],
        &[peer(1)],
    );
    let open = h.open.clone();
    let metrics = h.metrics.clone();
    drop(h);
    assert!(open.lock().unwrap().is_empty());
    let text = metrics.render();
    assert!(text.contains("switchboard_turn_allocations_deleted_total{reason=\"shutdown\"} 1"));
    assert!(text.contains("switchboard_turn_permissions_active 0"));
}

#[test]
fn tcp_relays_only_over_streams_and_connect_flow() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    h.challenge(client(1));
    let tcp = vec![(attr::REQUESTED_TRANSPORT, vec![6, 0, 0, 0])];
    let r = h.send(client(1), method::ALLOCATE, [1; 12], Some(&c), &tcp, &[]);
    assert_eq!(r.code(), Some(442), "TCP relay over UDP");
    let r = h.send(
        client(1),
        method::CONNECT,
        [2; 12],
        Some(&c),
        &[],
        &[peer(5)],
    );
    assert_eq!(
        r.code(),
        Some(400),
        "Connect is unknown on a datagram transport"
    );
    h.t.set_stream();
    let mut bad = tcp.clone();
    bad.push((attr::EVEN_PORT, vec![0]));
    let r = h.send(client(1), method::ALLOCATE, [3; 12], Some(&c), &bad, &[]);
    assert_eq!(r.code(), Some(400), "EVEN-PORT with a TCP relay");
    let r = h.send(client(1), method::ALLOCATE, [4; 12], Some(&c), &tcp, &[]);
    assert_eq!(r.outcome, Outcome::Success, "{:?}", r.code());
    let r = h.send(
        client(1),
        method::CONNECT,
        [5; 12],
        Some(&c),
        &[],
        &[SocketAddr::from(([10, 0, 0, 1], 80))],
    );
    assert_eq!(r.code(), Some(403));
    let r = h.send(client(1), method::CONNECT, [6; 12], Some(&c), &[], &[]);
    assert_eq!(r.code(), Some(400), "no XOR-PEER-ADDRESS");
    let r = h.send(
        client(1),
        method::CHANNEL_BIND,
        [20; 12],
        Some(&c),
        &chan_attr(0x4000),
        &[peer(5)],
    );
    assert_eq!(r.code(), Some(400), "no channels on a TCP relay");
    let r = h.send(
        client(1),
        method::CONNECT,
        [7; 12],
        Some(&c),
        &[],
        &[peer(5)],
    );
    assert_eq!(r.outcome, Outcome::Connect(peer(5)));
    assert!(r.raw.is_empty());
    assert!(
        h.view().permits(peer(5).ip(), h.env.now),
        "Connect installs a permission"
    );
    let r = h.send(
        client(1),
        method::CONNECT,
        [8; 12],
        Some(&c),
        &[],
        &[peer(6)],
    );
    assert_eq!(r.code(), Some(446), "one Connect at a time");
    let mut out = Vec::new();
    assert_eq!(
        h.t.connect_done(client(1), Some(77), &mut out),
        Outcome::Success
    );
    let m = Message::parse(&out).unwrap();
    assert_eq!(m.transaction_id(), [7; 12]);
    assert_eq!(decode_u32(m.get(attr::CONNECTION_ID).unwrap()).unwrap(), 77);
    assert!(m.verify_integrity(&long_term_key(&c.user, REALM, &c.pass)));
    h.send(
        client(1),
        method::CONNECT,
        [9; 12],
        Some(&c),
        &[],
        &[peer(6)],
    );
    let mut out = Vec::new();
    assert_eq!(
        h.t.connect_done(client(1), None, &mut out),
        Outcome::Error(447)
    );
    assert_eq!(
        h.t.connect_done(client(1), None, &mut out),
        Outcome::Ignored
    );
    // ConnectionBind comes on a fresh connection (a table without allocation).
    let cid = vec![(attr::CONNECTION_ID, 77u32.to_be_bytes().to_vec())];
    let r = h.send(
        client(1),
        method::CONNECTION_BIND,
        [10; 12],
        Some(&c),
        &cid,
        &[],
    );
    assert_eq!(
        r.code(),
        Some(400),
        "the control connection cannot become a data one"
    );
    let mut fresh = harness(cfg());
    fresh.t.set_stream();
    fresh.challenge(client(2));
    let r = fresh.send(
        client(2),
        method::CONNECTION_BIND,
        [11; 12],
        Some(&c),
        &[],
        &[],
    );
    assert_eq!(r.code(), Some(400), "missing CONNECTION-ID");
    let r = fresh.send(
        client(2),
        method::CONNECTION_BIND,
        [12; 12],
        Some(&c),
        &cid,
        &[],
    );
    assert_eq!(r.outcome, Outcome::ConnectionBind(77));
    assert_eq!(r.msg().class(), Class::Success);
    let r = fresh.send(
        client(2),
        method::CONNECTION_BIND,
        [13; 12],
        None,
        &cid,
        &[],
    );
    assert_eq!(r.code(), Some(401));
}

#[test]
fn dont_fragment_is_applied_or_answered_420() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    let mut a = udp();
    a.push((attr::DONT_FRAGMENT, vec![]));
    h.challenge(client(1));
    let r = h.send(client(1), method::ALLOCATE, [1; 12], Some(&c), &a, &[]);
    assert_eq!(r.outcome, Outcome::Success, "DF set on the relay socket");
    // A relay that cannot set DF: 420 naming DONT-FRAGMENT, nothing kept.
    h.no_df = true;
    h.challenge(client(2));
    let r = h.send(client(2), method::ALLOCATE, [2; 12], Some(&c), &a, &[]);
    assert_eq!(r.code(), Some(420));
    assert_eq!(
        r.msg().get(attr::UNKNOWN_ATTRIBUTES).unwrap(),
        &[0x00, 0x1A]
    );
    assert!(r
        .msg()
        .verify_integrity(&long_term_key(&c.user, REALM, &c.pass)));
    assert_eq!(h.t.len(), 1);
    assert_eq!(
        h.open.lock().unwrap().len(),
        1,
        "the refused relay socket is closed"
    );
    // Without DF the same client is served, and the quota was given back.
    let r = h.send(client(2), method::ALLOCATE, [3; 12], Some(&c), &udp(), &[]);
    assert_eq!(r.outcome, Outcome::Success);
    assert!(h.metric("switchboard_turn_error_responses_total{code=\"420\"} 1"));
}

#[test]
fn refresh_never_extends_an_allocation_past_its_maximum_age() {
    let mut t = cfg();
    t.max_allocation_age_secs = 1000;
    let mut h = harness(t);
    let c = rest(&h, 3600);
    h.allocate(client(1), &c, 1);
    h.allocate(client(2), &c, 2);
    let life = vec![(attr::LIFETIME, 600u32.to_be_bytes().to_vec())];
    // Refreshed every 300 s, as a client does: granted lifetimes shrink to the cap.
    let mut granted = Vec::new();
    for i in 0..3u8 {
        h.env.now += Duration::from_secs(300);
        let r = h.send(
            client(1),
            method::REFRESH,
            [10 + i; 12],
            Some(&c),
            &life,
            &[],
        );
        assert_eq!(r.outcome, Outcome::Success);
        granted.push(decode_u32(r.msg().get(attr::LIFETIME).unwrap()).unwrap());
        let r = h.send(
            client(2),
            method::REFRESH,
            [20 + i; 12],
            Some(&c),
            &life,
            &[],
        );
        assert_eq!(r.outcome, Outcome::Success);
    }
    assert_eq!(granted, [600, 400, 100]);
    // At the cap a refresh is refused and the allocation is gone.
    h.env.now += Duration::from_secs(100);
    let r = h.send(client(1), method::REFRESH, [30; 12], Some(&c), &life, &[]);
    assert_eq!(r.code(), Some(437));
    assert_eq!(h.t.relayed_address(client(1)), None);
    // The other one, not refreshed again, expires at the cap on its timer.
    h.t.handle_timeout(h.env);
    assert!(h.t.is_empty());
    assert!(h.metric("switchboard_turn_allocations_deleted_total{reason=\"max_age\"} 2"));
    // A fresh Allocate with valid credentials is served at once.
    let r = h.allocate(client(1), &c, 40);
    assert_eq!(r.outcome, Outcome::Success);
}

#[test]
fn timer_queue_follows_each_allocations_earliest_deadline() {
    let mut h = harness(cfg());
    let c = rest(&h, 100_000);
    let t0 = h.env.now;
    h.allocate(client(1), &c, 1);
    // Default lifetime is the only deadline.
    let life = Duration::from_secs(cfg().default_lifetime_secs as u64);
    assert_eq!(h.t.next_deadline(), Some(t0 + life));
    h.env.now += Duration::from_secs(10);
    h.allocate(client(2), &c, 2);
    h.send(
        client(2),
        method::CREATE_PERMISSION,
        [3; 12],
        Some(&c),
        &[],
        &[peer(1)],
    );
    let perm_due = h.env.now + PERMISSION_LIFETIME;
    assert_eq!(h.t.next_deadline(), Some((t0 + life).min(perm_due)));
    // Early calls are harmless: nothing is due, nothing changes.
    h.t.handle_timeout(h.env);
    assert_eq!(h.t.len(), 2);
    // Refresh of client 1 moves its deadline; the queue now shows client 2's.
    h.send(
        client(1),
        method::REFRESH,
        [4; 12],
        Some(&c),
        &[(attr::LIFETIME, 3600u32.to_be_bytes().to_vec())],
        &[],
    );
    let c2_alloc = h.env.now - Duration::from_secs(0) + life;
    assert_eq!(h.t.next_deadline(), Some(perm_due.min(c2_alloc)));
    // Refresh 0 removes client 1's entry from the queue.
    h.send(
        client(1),
        method::REFRESH,
        [5; 12],
        Some(&c),
        &[(attr::LIFETIME, 0u32.to_be_bytes().to_vec())],
        &[],
    );
    assert_eq!(h.t.len(), 1);
    assert_eq!(h.t.next_deadline(), Some(perm_due.min(c2_alloc)));
    h.env.now = c2_alloc.max(perm_due);
    h.t.handle_timeout(h.env);
    assert!(h.t.is_empty());
    assert_eq!(h.t.next_deadline(), None);
}

#[test]
fn mass_expiry_deletes_every_allocation_in_one_pass() {
    let mut t = cfg();
    t.relay_port_min = 40000;
    t.relay_port_max = 49999;
    t.max_allocations_per_user = 100_000;
    let mut h = harness(t);
    let c = rest(&h, 100_000);
    let n = 3000u16;
    for i in 0..n {
        let r = h.allocate(client(1000 + i), &c, 1);
        assert_eq!(r.outcome, Outcome::Success);
    }
    assert_eq!(h.t.len(), n as usize);
    let due = h.t.next_deadline().unwrap();
    h.env.now = due + Duration::from_secs(3600);
    let start = std::time::Instant::now();
    h.t.handle_timeout(h.env);
    let took = start.elapsed();
    assert!(h.t.is_empty());
    assert_eq!(h.t.next_deadline(), None);
    assert!(h.metric("switchboard_turn_allocations_deleted_total{reason=\"expired\"} 3000"));
    // O(n log n): 3000 deletions take milliseconds, not the seconds a rescan per deletion did.
    assert!(took < Duration::from_secs(2), "mass expiry took {took:?}");
}

#[test]
fn channel_cooldown_is_a_deadline_of_its_own() {
    let mut h = harness(cfg());
    let c = rest(&h, 100_000);
    h.allocate(client(1), &c, 1);
    h.send(
        client(1),
        method::REFRESH,
        [2; 12],
        Some(&c),
        &[(attr::LIFETIME, 3600u32.to_be_bytes().to_vec())],
        &[],
    );
    h.send(
        client(1),
        method::CHANNEL_BIND,
        [3; 12],
        Some(&c),
        &chan_attr(0x4001),
        &[peer(7)],
    );
    let bound = h.env.now;
    // The permission the channel installed expires first.
    assert_eq!(h.t.next_deadline(), Some(bound + PERMISSION_LIFETIME));
    h.env.now = bound + PERMISSION_LIFETIME;
    h.t.handle_timeout(h.env);
    assert_eq!(h.t.next_deadline(), Some(bound + CHANNEL_LIFETIME));
    h.env.now = bound + CHANNEL_LIFETIME;
    h.t.handle_timeout(h.env);
    assert!(h.view().channels.is_empty());
    // The expired binding stays reserved through its cool-down, which is the next deadline.
    assert_eq!(
        h.t.next_deadline(),
        Some(bound + CHANNEL_LIFETIME + CHANNEL_COOLDOWN)
    );
    h.env.now = bound + CHANNEL_LIFETIME + CHANNEL_COOLDOWN;
    h.t.handle_timeout(h.env);
    assert_eq!(h.t.next_deadline(), Some(bound + Duration::from_secs(3600)));
}
