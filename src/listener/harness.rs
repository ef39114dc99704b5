//! A socket-free STUN/TURN port for the fuzzer and tests: two allocation tables (shards)
//! sharing one quota and port pool, fed through the same [`dispatch`] the UDP shards and
//! stream connections use, with a fake clock and fake relay sockets that record what they
//! would send. Why: the request handling, the ChannelData/Send path and the timers can then be
//! driven with arbitrary input and their invariants checked from outside.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{dispatch, PeerCounts, PortCtx, SendToPeer};
use crate::auth::Auth;
use crate::config::{AuthConfig, TurnConfig};
use crate::metrics::Metrics;
use crate::turn::core::{
    to_client, AllocAudit, Bind, DeleteReason, Dropped, Env, Event, Frame, Outcome, Pool,
    PoolAudit, Relay, RelayKind, Settings, Table, Tids, View, CHANNEL_COOLDOWN, CHANNEL_LIFETIME,
    PERMISSION_LIFETIME, RESERVATION_LIFETIME,
};

/// The shared TURN secret of the harness (REST credentials are derived from it).
pub const SECRET: &str = "fuzz-secret";
/// The realm the harness's tables announce.
pub const REALM: &str = "fuzz.realm";
/// A static long-term user and password the harness accepts besides REST credentials.
pub const STATIC_USER: (&str, &str) = ("alice", "wonder");
/// The server's IPv4 address (relays bind here).
pub const SERVER_V4: [u8; 4] = [203, 0, 113, 10];
/// The server's IPv6 address (relays bind here).
pub const SERVER_V6: [u16; 8] = [0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10];
/// First relay port of the harness's pool.
pub const PORT_MIN: u16 = 50000;

/// A datagram a fake relay socket would have sent to a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The client whose allocation relayed it.
    pub client: SocketAddr,
    /// The relay socket's address.
    pub relay: SocketAddr,
    /// The peer it went to.
    pub peer: SocketAddr,
    /// The payload.
    pub data: Vec<u8>,
}

type Log = Arc<Mutex<Vec<(SocketAddr, SocketAddr, Vec<u8>)>>>;
type Views = Arc<Mutex<HashMap<SocketAddr, Arc<View>>>>;
type Addrs = Arc<Mutex<HashSet<SocketAddr>>>;

/// What a client would receive because a peer sent a datagram to a relay address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The client the relay forwarded it to.
    pub client: SocketAddr,
    /// The frame as sent: ChannelData or a Data indication.
    pub frame: Vec<u8>,
}

/// Why a peer datagram reached no client in [`TurnPort::peer_input`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMiss {
    /// No relay socket is bound on that address.
    NoSocket,
    /// The address is an RFC 6062 TCP relay: peers connect, datagrams go nowhere.
    TcpRelay,
    /// The peer→client decision dropped it.
    Dropped(Dropped),
}

/// A relay socket that binds nothing: it remembers its port as open until dropped and logs
/// what it is asked to send.
struct FakeRelay {
    addr: SocketAddr,
    open: Addrs,
    log: Log,
    views: Views,
    /// The TCP (RFC 6062) relays' addresses: datagrams never reach them.
    tcp: Addrs,
}

impl Relay for FakeRelay {
    type Sink = ();
    fn local_addr(&self) -> SocketAddr {
        self.addr
    }
    fn attach(&self, _: &()) {}
    fn publish(&self, view: Arc<View>) {
        lock(&self.views).insert(self.addr, view);
    }
    fn set_dont_fragment(&self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SendToPeer for FakeRelay {
    fn send_to_peer(&self, payload: &[u8], peer: SocketAddr) -> bool {
        lock(&self.log).push((self.addr, peer, payload.to_vec()));
        true
    }
}

impl Drop for FakeRelay {
    fn drop(&mut self) {
        lock(&self.open).remove(&self.addr);
        lock(&self.views).remove(&self.addr);
        lock(&self.tcp).remove(&self.addr);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Limits of a harness port, chosen by the fuzzer.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `turn.max_allocations_per_user`.
    pub max_per_user: u32,
    /// `turn.max_allocations`.
    pub max_total: u32,
    /// Size of the relay port range.
    pub ports: u16,
    /// `turn.max_lifetime_secs`.
    pub max_lifetime: u32,
    /// `turn.max_allocation_age_secs`.
    pub max_age: u64,
}

/// The harness: a TURN port with two shards, stream connections (each its own table, as
/// TCP/TLS clients have), a fake clock and fake relays.
pub struct TurnPort {
    shards: Vec<Table<FakeRelay>>,
    /// Stream connections by client address, each with its one-allocation table.
    streams: HashMap<SocketAddr, Table<FakeRelay>>,
    settings: Arc<Settings>,
    /// The next RFC 6062 CONNECTION-ID a finished connect hands out.
    next_conn: u32,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    auth: Arc<Auth>,
    limits: Limits,
    software: String,
    now: Instant,
    unix: u64,
    open: Addrs,
    log: Log,
    views: Views,
    tcp: Addrs,
    events: EventLog,
}

/// The allocation events the tables returned: ids created and not yet ended, and the first
/// inconsistency seen (an end without a start, a start twice).
#[derive(Default)]
struct EventLog {
    live: HashSet<String>,
    wrong: Option<String>,
}

impl EventLog {
    fn take(&mut self, t: &mut Table<FakeRelay>) {
        while let Some(e) = t.poll_event() {
            let (id, ok) = match e {
                Event::Created { allocation, .. } => {
                    let fresh = self.live.insert(allocation.clone());
                    (allocation, fresh)
                }
                Event::Ended { allocation, .. } => {
                    let known = self.live.remove(&allocation);
                    (allocation, known)
                }
            };
            if !ok && self.wrong.is_none() {
                self.wrong = Some(format!("inconsistent events for allocation {id}"));
            }
        }
    }
}

/// Open a fake relay socket for the table's [`Bind`]: refused when the address is taken.
fn fake_bind(
    open: &Addrs,
    log: &Log,
    views: &Views,
    tcp: &Addrs,
    b: Bind,
) -> std::io::Result<FakeRelay> {
    let a = b.addr;
    if !lock(open).insert(a) {
        return Err(std::io::ErrorKind::AddrInUse.into());
    }
    if b.kind == RelayKind::Tcp {
        lock(tcp).insert(a);
    }
    Ok(FakeRelay {
        addr: a,
        open: open.clone(),
        log: log.clone(),
        views: views.clone(),
        tcp: tcp.clone(),
    })
}

/// Which transport a harness input arrives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A datagram on the UDP port (routed to a shard by the client's port).
    Udp,
    /// A message on the client's TCP connection (its own table, which may hold a TCP relay).
    Stream,
}

impl TurnPort {
    /// A port with these limits, at Unix time `unix`.
    pub fn new(limits: Limits, unix: u64) -> TurnPort {
        let cfg = TurnConfig {
            realm: REALM.into(),
            listen: vec![
                SocketAddr::from((SERVER_V4, 3478)),
                SocketAddr::from((SERVER_V6, 3478)),
            ],
            relay_port_min: PORT_MIN,
            relay_port_max: PORT_MIN.saturating_add(limits.ports.max(1) - 1),
            max_allocations_per_user: limits.max_per_user,
            max_allocations: limits.max_total,
            max_lifetime_secs: limits.max_lifetime.max(1),
            // Config validation keeps the default within 1..=max_lifetime_secs.
            default_lifetime_secs: limits.max_lifetime.clamp(1, 600),
            max_allocation_age_secs: limits.max_age,
            allow_peers: vec!["198.51.100.0/24".into(), "2001:db8:1::/48".into()],
            ..Default::default()
        };
        let auth = Arc::new(Auth::new(&AuthConfig {
            turn_secrets: vec![SECRET.into()],
            turn_users: [(STATIC_USER.0.to_string(), STATIC_USER.1.into())].into(),
            ..Default::default()
        }));
        let metrics = Arc::new(Metrics::new());
        let settings = Arc::new(Settings::from_config(&cfg, false));
        let pool = Arc::new(Pool::new());
        let shards = (0..2)
            .map(|_| {
                Table::new(
                    settings.clone(),
                    auth.clone(),
                    metrics.clone(),
                    pool.clone(),
                    "udp",
                    (),
                )
            })
            .collect();
        TurnPort {
            shards,
            streams: HashMap::new(),
            settings,
            next_conn: 1,
            pool,
            metrics,
            auth,
            limits,
            software: cfg.software,
            now: Instant::now(),
            unix,
            open: Default::default(),
            log: Default::default(),
            views: Default::default(),
            tcp: Default::default(),
            events: EventLog::default(),
        }
    }

    /// The limits the port was made with.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// REST credentials (username, password) for `user`, valid until `expiry` (Unix time).
    pub fn rest_credentials(&self, user: &str, expiry: u64) -> (String, String) {
        let c = self
            .auth
            .turn_credentials_for(Some(user), expiry.saturating_sub(1), 1);
        (c.username, c.password)
    }

    /// The fake monotonic clock.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The fake Unix clock.
    pub fn unix(&self) -> u64 {
        self.unix
    }

    fn shard_of(client: SocketAddr) -> usize {
        usize::from(client.port() % 2)
    }

    /// One datagram from `client` on the TURN port; returns the response (empty when none)
    /// and what the relays sent to peers because of it.
    pub fn input(
        &mut self,
        client: SocketAddr,
        pkt: &[u8],
    ) -> (Vec<u8>, Option<Outcome>, Vec<Sent>) {
        self.input_on(Transport::Udp, client, pkt)
    }

    /// One message from `client` on `transport` (a stream message is one whole frame, as the
    /// stream framer hands it over); returns what [`TurnPort::input`] returns.
    pub fn input_on(
        &mut self,
        transport: Transport,
        client: SocketAddr,
        pkt: &[u8],
    ) -> (Vec<u8>, Option<Outcome>, Vec<Sent>) {
        let local = match client.ip() {
            IpAddr::V4(_) => IpAddr::from(SERVER_V4),
            IpAddr::V6(_) => IpAddr::from(SERVER_V6),
        };
        let env = Env {
            now: self.now,
            unix: self.unix,
            draining: false,
            local: Some(local),
        };
        let ctx = PortCtx {
            metrics: &self.metrics,
            software: &self.software,
            mapped_address: true,
            local: Some(SocketAddr::new(local, 3478)),
        };
        let mut out = Vec::new();
        let mut counts = PeerCounts::default();
        let label = match transport {
            Transport::Udp => "udp",
            Transport::Stream => "tcp",
        };
        let table = match transport {
            Transport::Udp => &mut self.shards[Self::shard_of(client)],
            Transport::Stream => self.streams.entry(client).or_insert_with(|| {
                let mut t = Table::new(
                    self.settings.clone(),
                    self.auth.clone(),
                    self.metrics.clone(),
                    self.pool.clone(),
                    "tcp",
                    (),
                );
                t.set_stream();
                t
            }),
        };
        let mut outcome = dispatch(
            &ctx,
            Some(&mut *table),
            || env,
            self.now,
            client,
            pkt,
            &mut out,
            &mut counts,
        );
        // The table asks for relay sockets; the fake ones are answered at once.
        while let Some(Outcome::Bind(b)) = outcome {
            let r = fake_bind(&self.open, &self.log, &self.views, &self.tcp, b);
            outcome = Some(table.bound(env, b.id, r, &mut out));
        }
        counts.flush(&self.metrics, label);
        self.drain_events();
        let sent = std::mem::take(&mut *lock(&self.log))
            .into_iter()
            .map(|(relay, peer, data)| Sent {
                client,
                relay,
                peer,
                data,
            })
            .collect();
        (out, outcome, sent)
    }

    /// The shell's TCP connect for the stream client's pending RFC 6062 Connect finished
    /// (`ok`: connected, a fresh CONNECTION-ID; otherwise failed or timed out); returns the
    /// Connect response, empty when nothing was pending.
    pub fn connect_done(&mut self, client: SocketAddr, ok: bool) -> (Vec<u8>, Outcome) {
        let mut out = Vec::new();
        let id = ok.then(|| {
            self.next_conn = self.next_conn.wrapping_add(1);
            self.next_conn
        });
        let outcome = match self.streams.get_mut(&client) {
            Some(t) => t.connect_done(client, id, &mut out),
            None => Outcome::Ignored,
        };
        (out, outcome)
    }

    /// The stream client's connection closed: its table and allocation go, as in the shell.
    pub fn close_stream(&mut self, client: SocketAddr) {
        if let Some(mut t) = self.streams.remove(&client) {
            t.clear(DeleteReason::Closed);
            self.events.take(&mut t);
        }
    }

    /// Drain every table's allocation events, as the shells forward them to webhooks.
    fn drain_events(&mut self) {
        for t in self.shards.iter_mut().chain(self.streams.values_mut()) {
            self.events.take(t);
        }
    }

    /// Whether `relay` is an RFC 6062 TCP relay (peers reach it by connecting, not by datagram).
    pub fn is_tcp_relay(&self, relay: SocketAddr) -> bool {
        lock(&self.tcp).contains(&relay)
    }

    /// A datagram from `peer` arriving at the relay address `relay`, routed as the relay
    /// shells route it: through `turn::core::to_client` with the allocation's last published
    /// [`View`] at the current time; the error says why nothing reaches a client.
    pub fn peer_input(
        &self,
        relay: SocketAddr,
        peer: SocketAddr,
        data: &[u8],
    ) -> Result<Delivered, PeerMiss> {
        if self.is_tcp_relay(relay) {
            return Err(PeerMiss::TcpRelay);
        }
        let view = lock(&self.views)
            .get(&relay)
            .cloned()
            .ok_or(PeerMiss::NoSocket)?;
        // The harness sets no bandwidth cap, so a fresh bucket per datagram is never used.
        let mut bucket = None;
        let mut tids = Tids::new(7);
        let mut out = Vec::new();
        let d = to_client(
            &view,
            &mut bucket,
            self.now,
            peer,
            data,
            &mut tids,
            &mut out,
        )
        .map_err(PeerMiss::Dropped)?;
        let frame = match d.frame {
            Frame::Channel(header) => {
                let mut f = header.to_vec();
                f.extend_from_slice(data);
                f
            }
            Frame::Indication => out,
        };
        Ok(Delivered {
            client: d.client,
            frame,
        })
    }

    /// Move both clocks by `d` (forwards) and run every timer that came due, as the shard
    /// loop does when its deadline passes.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        self.unix = self.unix.saturating_add(d.as_secs());
        self.run_timers();
    }

    /// Step only the Unix clock (an NTP step); the monotonic clock does not move.
    pub fn jump_unix(&mut self, secs: i64) {
        self.unix = self.unix.saturating_add_signed(secs);
    }

    fn run_timers(&mut self) {
        let env = Env {
            now: self.now,
            unix: self.unix,
            draining: false,
            local: None,
        };
        for t in self.shards.iter_mut().chain(self.streams.values_mut()) {
            if t.next_deadline().is_some_and(|d| d <= self.now) {
                t.handle_timeout(env);
            }
        }
        self.drain_events();
    }

    /// Every allocation of both shards and every stream connection.
    pub fn allocations(&self) -> Vec<AllocAudit> {
        self.shards
            .iter()
            .chain(self.streams.values())
            .flat_map(|t| t.audit())
            .collect()
    }

    /// The shared pool's counters.
    pub fn pool(&self) -> PoolAudit {
        self.pool.audit()
    }

    /// Relay sockets still open.
    pub fn open_relays(&self) -> usize {
        lock(&self.open).len()
    }

    /// Long enough for everything the port holds to expire: the longest lifetime a request
    /// can grant, permission and channel lifetimes with the cool-down, and reservations.
    pub fn everything_expires(&self) -> Duration {
        Duration::from_secs(u64::from(self.limits.max_lifetime.max(600)) + 1)
            + PERMISSION_LIFETIME
            + CHANNEL_LIFETIME
            + CHANNEL_COOLDOWN
            + RESERVATION_LIFETIME
    }

    /// Check the invariants that must hold after every input: nothing outlives its lifetime,
    /// quotas hold, and the shared pool matches the allocations that exist.
    pub fn check(&self) -> Result<(), String> {
        let allocs = self.allocations();
        if let Some(e) = &self.events.wrong {
            return Err(e.clone());
        }
        if self.events.live.len() != allocs.len() {
            return Err(format!(
                "{} allocations created and not ended by events, {} exist",
                self.events.live.len(),
                allocs.len()
            ));
        }
        let pool = self.pool();
        let now = self.now;
        let mut per_user: HashMap<&str, u32> = HashMap::new();
        for a in &allocs {
            if a.expires <= now {
                return Err(format!("{} outlived its lifetime", a.client));
            }
            for (ip, exp) in &a.perms {
                if *exp <= now {
                    return Err(format!("{}: permission for {ip} outlived it", a.client));
                }
                if *exp > now + PERMISSION_LIFETIME {
                    return Err(format!("{}: permission for {ip} too long", a.client));
                }
            }
            for (num, peer, exp, cool) in &a.chans {
                if *exp > now + CHANNEL_LIFETIME {
                    return Err(format!("{}: channel {num:#x} to {peer} too long", a.client));
                }
                match cool {
                    Some(c) if *c <= now => {
                        return Err(format!("{}: channel {num:#x} cool-down stuck", a.client));
                    }
                    None if *exp <= now => {
                        return Err(format!("{}: channel {num:#x} outlived it", a.client));
                    }
                    _ => {}
                }
            }
            *per_user.entry(&a.quota_user).or_default() += 1;
        }
        if allocs.len() as u32 > self.limits.max_total {
            return Err(format!("{} allocations over the cap", allocs.len()));
        }
        if let Some((u, n)) = per_user
            .iter()
            .find(|(_, n)| **n > self.limits.max_per_user)
        {
            return Err(format!("user {u} holds {n} allocations"));
        }
        if pool.total as usize != allocs.len() {
            return Err(format!("pool counts {} of {}", pool.total, allocs.len()));
        }
        for (u, n) in &per_user {
            if pool.per_user.get(*u) != Some(n) {
                return Err(format!(
                    "pool counts {:?} for {u}, {n} exist",
                    pool.per_user.get(*u)
                ));
            }
        }
        if pool.per_user.len() != per_user.len() {
            return Err(format!("pool keeps users {:?}", pool.per_user));
        }
        let relay_ports: HashSet<u16> = allocs.iter().map(|a| a.relay.port()).collect();
        if relay_ports.len() != allocs.len() {
            return Err("two allocations share a relay port".into());
        }
        if !relay_ports.is_subset(&pool.ports)
            || pool.ports.len() != allocs.len() + pool.reservations
        {
            return Err(format!(
                "pool ports {} for {} allocations and {} reservations",
                pool.ports.len(),
                allocs.len(),
                pool.reservations
            ));
        }
        if self.open_relays() != pool.ports.len() {
            return Err(format!(
                "{} relay sockets open, {} ports taken",
                self.open_relays(),
                pool.ports.len()
            ));
        }
        if let Some((c, t)) = self.streams.iter().find(|(_, t)| t.len() > 1) {
            return Err(format!("stream {c} holds {} allocations", t.len()));
        }
        let gauge = |t: &str| {
            self.metrics
                .turn_allocations_active
                .with_label_values(&[t])
                .get()
        };
        let on_streams: usize = self.streams.values().map(|t| t.len()).sum();
        if gauge("tcp") != on_streams as i64 || gauge("udp") + gauge("tcp") != allocs.len() as i64 {
            return Err(format!(
                "allocation gauges {}/{}, {} exist ({on_streams} on streams)",
                gauge("udp"),
                gauge("tcp"),
                allocs.len()
            ));
        }
        let perms: usize = allocs.iter().map(|a| a.perms.len()).sum();
        let chans = allocs
            .iter()
            .flat_map(|a| &a.chans)
            .filter(|c| c.3.is_none())
            .count();
        if self.metrics.turn_permissions_active.get() != perms as i64
            || self.metrics.turn_channels_active.get() != chans as i64
        {
            return Err(format!(
                "gauges say {} permissions and {} channels, {perms} and {chans} exist",
                self.metrics.turn_permissions_active.get(),
                self.metrics.turn_channels_active.get()
            ));
        }
        Ok(())
    }

    /// Check that the port holds nothing at all: no allocation, quota, port, reservation,
    /// socket or gauge.
    pub fn check_empty(&self) -> Result<(), String> {
        self.check()?;
        let pool = self.pool();
        if !self.allocations().is_empty()
            || pool.total != 0
            || !pool.per_user.is_empty()
            || !pool.ports.is_empty()
            || pool.reservations != 0
            || self.open_relays() != 0
        {
            return Err(format!(
                "not empty: {} allocations, pool {pool:?}, {} sockets",
                self.allocations().len(),
                self.open_relays()
            ));
        }
        Ok(())
    }

    /// Shut the port down as the server does, releasing everything.
    pub fn shutdown(&mut self) {
        for t in self.shards.iter_mut().chain(self.streams.values_mut()) {
            t.clear(DeleteReason::Shutdown);
        }
        self.drain_events();
    }
}
