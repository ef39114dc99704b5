//! Allocation state in the table: Allocate, Refresh, CreatePermission and ChannelBind, the
//! snapshots published to relay sockets, the client-to-peer lookups of the data path, the
//! timer queue and deletion.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::allocation::{Alg, Alloc, Chan, Expiry, Key, Pending};
use super::credentials::{close, sign};
use super::ports::{quota_name, QuotaFull};
use super::{
    reject, Bind, DeleteReason, Env, Event, Outcome, Reject, Relay, RelayKind, Req, Table,
};
use crate::stun::codec::{attr, decode_u32, method, Class, Encoder, Message};

/// Permission lifetime (RFC 8656 §9).
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);

/// Channel binding lifetime (RFC 8656 §12).
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);

/// How long an expired channel number and peer stay unavailable for rebinding (RFC 8656 §12).
pub const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);

/// Channel numbers accepted in ChannelBind. RFC 8656 allows 0x4000–0x4FFF and reserves the
/// rest, but RFC 5766 allowed up to 0x7FFF and coturn's clients still pick numbers there; the
/// upper part only matters to the client's own demultiplexing, so we accept it, like coturn.
pub const CHANNEL_NUMBERS: std::ops::RangeInclusive<u16> = 0x4000..=0x7FFF;

/// Permissions one allocation may hold, so one client cannot grow the table without bound.
pub const MAX_PERMISSIONS: usize = 256;

/// Channels one allocation may bind (the protocol allows 4096).
pub const MAX_CHANNELS: usize = 256;

/// UDP in REQUESTED-TRANSPORT.
const PROTO_UDP: u8 = 17;

/// TCP in REQUESTED-TRANSPORT (RFC 6062).
const PROTO_TCP: u8 = 6;

/// Immutable snapshot of one allocation's permissions and channels, read by the relay task
/// on every peer packet (swapped, never mutated, so readers take no lock).
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Where peer data goes; `None` while the socket is only reserved (EVEN-PORT).
    pub client: Option<SocketAddr>,
    /// Installed permissions: peer IP and expiry.
    pub perms: Vec<(IpAddr, Instant)>,
    /// Bound channels: peer, channel number, expiry.
    pub channels: Vec<(SocketAddr, u16, Instant)>,
    /// Bandwidth cap in bytes per second, 0 = unlimited.
    pub max_bps: u64,
    /// The server address the client sends to, so peer data reaches it from that address.
    pub local: Option<IpAddr>,
    /// Username of the credential the allocation was made with: only a ConnectionBind
    /// authenticated as the same user may claim its RFC 6062 peer connections.
    pub owner: Option<Arc<str>>,
    /// The allocation's relay usage, for its `allocation.ended` webhook.
    pub usage: Arc<super::Usage>,
    /// The client's transport (`udp|tcp|tls`), for the relayed-bytes metric.
    pub transport: &'static str,
}

/// What becomes of a datagram a peer sends to a relay address (RFC 8656 §11.4, §12.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRoute {
    /// No live permission for the peer's IP: dropped.
    Denied,
    /// Framed as ChannelData on the live channel bound to exactly that peer.
    Channel(u16),
    /// Wrapped in a Data indication naming the peer.
    Indication,
}

impl View {
    /// How a peer datagram reaches the client, decided once here so that every relay shell
    /// (the UDP shards, the stream clients' relays) and the fuzz harness route alike.
    pub fn route(&self, peer: SocketAddr, now: Instant) -> PeerRoute {
        if !self.permits(peer.ip(), now) {
            return PeerRoute::Denied;
        }
        match self.channel_for(peer, now) {
            Some(ch) => PeerRoute::Channel(ch),
            None => PeerRoute::Indication,
        }
    }
    /// Whether a live permission covers `ip`.
    pub fn permits(&self, ip: IpAddr, now: Instant) -> bool {
        self.perms.iter().any(|(p, exp)| *p == ip && *exp > now)
    }
    /// The live channel bound to `peer`, if any.
    pub fn channel_for(&self, peer: SocketAddr, now: Instant) -> Option<u16> {
        self.channels
            .iter()
            .find(|(p, _, exp)| *p == peer && *exp > now)
            .map(|(_, c, _)| *c)
    }
}

/// A token bucket for the optional per-allocation bandwidth cap (one second of burst).
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: u64,
    tokens: u64,
    last: Instant,
}

impl Bucket {
    /// A bucket allowing `rate` bytes per second; 0 disables the cap.
    pub fn new(rate: u64, now: Instant) -> Bucket {
        Bucket {
            rate,
            tokens: rate,
            last: now,
        }
    }
    /// The rate in bytes per second (0: no cap).
    pub fn rate(&self) -> u64 {
        self.rate
    }
    /// Take `n` bytes if the budget allows.
    pub fn allow(&mut self, now: Instant, n: usize) -> bool {
        if self.rate == 0 {
            return true;
        }
        let el = now.saturating_duration_since(self.last);
        let add = (el.as_micros() as u64).saturating_mul(self.rate) / 1_000_000;
        if add > 0 {
            self.tokens = (self.tokens + add).min(self.rate);
            self.last = now;
        }
        if self.tokens >= n as u64 {
            self.tokens -= n as u64;
            true
        } else {
            false
        }
    }
}

impl<R: Relay> Table<R> {
    /// Put the allocation of `client` in the timer queue at its current earliest deadline.
    pub(super) fn reschedule(&mut self, client: SocketAddr) {
        let Some(a) = self.allocs.get_mut(&client) else {
            return;
        };
        let d = a.poll_timeout();
        if a.timer != Some(d) {
            if let Some(old) = a.timer.replace(d) {
                self.timers.remove(&(old, client));
            }
            self.timers.insert((d, client));
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn allocate(
        &mut self,
        env: Env,
        client: SocketAddr,
        msg: &Message<'_>,
        key: &Key,
        alg: Alg,
        out: &mut Vec<u8>,
    ) -> Result<Outcome, Reject> {
        if self.allocs.contains_key(&client) {
            return Err(reject(437, "Allocation Mismatch"));
        }
        let proto = msg
            .get(attr::REQUESTED_TRANSPORT)
            .ok_or(reject(400, "Bad Request"))?;
        if proto.len() != 4 {
            return Err(reject(400, "Bad Request"));
        }
        let kind = match proto[0] {
            PROTO_UDP => RelayKind::Udp,
            PROTO_TCP if self.stream => RelayKind::Tcp,
            _ => return Err(reject(442, "Unsupported Transport Protocol")),
        };
        if kind == RelayKind::Tcp
            && (msg.get(attr::DONT_FRAGMENT).is_some()
                || msg.get(attr::EVEN_PORT).is_some()
                || msg.get(attr::RESERVATION_TOKEN).is_some())
        {
            return Err(reject(400, "Bad Request"));
        }
        if let Some(df) = msg.get(attr::DONT_FRAGMENT) {
            if !df.is_empty() {
                return Err(reject(400, "Bad Request"));
            }
        }
        let token = msg.get(attr::RESERVATION_TOKEN);
        let even = msg.get(attr::EVEN_PORT);
        let family = msg.get(attr::REQUESTED_ADDRESS_FAMILY);
        if token.is_some() && (even.is_some() || family.is_some()) {
            return Err(reject(400, "Bad Request"));
        }
        let token: Option<[u8; 8]> = match token {
            Some(t) => Some(t.try_into().map_err(|_| reject(400, "Bad Request"))?),
            None => None,
        };
        let reserve_next = match even {
            Some([b]) => b & 0x80 != 0,
            Some(_) => return Err(reject(400, "Bad Request")),
            None => false,
        };
        let v6 = match family {
            None => false,
            Some([0x01, 0, 0, 0]) => false,
            Some([0x02, 0, 0, 0]) => true,
            Some(v) if v.len() == 4 && v[1..] == [0, 0, 0] => {
                return Err(reject(440, "Address Family not Supported"))
            }
            Some(_) => return Err(reject(400, "Bad Request")),
        };
        // LIFETIME 0 deletes on Refresh; on Allocate it is just a short request, which gets
        // the default like any other below it (RFC 8656 §7.2), never an allocation born dead.
        let lifetime = match self.lifetime(msg)? {
            0 => self.settings.default_lifetime,
            l => l,
        }
        .min(self.settings.max_age.min(u32::MAX as u64) as u32);
        if let Some(r) = self.try_alternate(env, client) {
            return Err(r);
        }
        let (bind_ip, adv_ip) = match token {
            Some(_) => (IpAddr::from([0u8; 4]), IpAddr::from([0u8; 4])),
            None => self
                .settings
                .relay_addr(v6, env.local)
                .ok_or(reject(440, "Address Family not Supported"))?,
        };
        let quota_user = quota_name(&key.username).to_string();
        match self.pool.take_quota(
            &quota_user,
            self.settings.max_per_user,
            self.settings.max_total,
        ) {
            Ok(()) => {}
            Err(QuotaFull::User) => {
                self.metrics
                    .turn_allocations_deleted
                    .with_label_values(&["quota"])
                    .inc();
                return Err(reject(486, "Allocation Quota Reached"));
            }
            Err(QuotaFull::Total) => return Err(reject(508, "Insufficient Capacity")),
        }
        self.next_bind += 1;
        let mut p = Pending {
            id: self.next_bind,
            client,
            req: Req::of(msg),
            key: key.clone(),
            alg,
            kind,
            lifetime,
            quota_user,
            bind_ip,
            adv_ip,
            redeemed: token.is_some(),
            even: even.is_some(),
            pair: reserve_next,
            dont_fragment: msg.get(attr::DONT_FRAGMENT).is_some(),
            tries: 0,
            port: 0,
            first: None,
        };
        let Some(t) = token else {
            return match self.pick_port(&mut p) {
                Ok(b) => {
                    self.pending = Some(p);
                    Ok(Outcome::Bind(b))
                }
                Err(e) => {
                    self.unquota(&p.quota_user);
                    Err(e)
                }
            };
        };
        let relay = match self.pool.take_reservation(&t) {
            Some((r, _, exp)) if exp > env.now => r
                .downcast::<R>()
                .map(|b| *b)
                .map_err(|_| reject(508, "Insufficient Capacity")),
            Some((_, port, _)) => {
                self.release_port(port);
                Err(reject(508, "Insufficient Capacity"))
            }
            None => Err(reject(508, "Insufficient Capacity")),
        };
        match relay {
            Ok(r) => Ok(self.finish_allocate(env, p, r, None, out)),
            Err(e) => {
                self.unquota(&p.quota_user);
                Err(e)
            }
        }
    }

    /// The shell's answer to [`Outcome::Bind`] `id`: the socket, or why it could not be bound.
    /// Writes the Allocate answer to `out` (success, or the error it would have got had the
    /// bind been a call) or returns another [`Outcome::Bind`] (the second socket of an
    /// EVEN-PORT pair, or another port after a failure). A stale `id` is ignored.
    pub fn bound(
        &mut self,
        env: Env,
        id: u64,
        result: std::io::Result<R>,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let mut p = match self.pending.take() {
            Some(p) if p.id == id => p,
            other => {
                self.pending = other;
                return Outcome::Ignored;
            }
        };
        let next = match result {
            Ok(r) if p.pair && p.first.is_none() => {
                p.first = Some(r);
                Ok(Bind {
                    id,
                    addr: SocketAddr::new(p.bind_ip, p.port + 1),
                    kind: p.kind,
                })
            }
            Ok(r) => {
                let (relay, token) = match p.first.take() {
                    Some(first) => {
                        let t: [u8; 8] = rand::random();
                        let exp = env.now + super::RESERVATION_LIFETIME;
                        self.pool.reserve(t, Box::new(r), p.port + 1, exp);
                        self.reserved.insert((exp, t));
                        (first, Some(t))
                    }
                    None => (r, None),
                };
                return self.finish_allocate(env, p, relay, token, out);
            }
            Err(e) => {
                if p.first.take().is_none() {
                    tracing::debug!(port = p.port, error = %e, "relay port busy, trying another");
                }
                // Leaving a port another process holds marked as used for this table's
                // lifetime would leak it; release it and rely on the random start.
                self.release_port(p.port);
                if p.pair {
                    self.release_port(p.port + 1);
                }
                self.pick_port(&mut p)
            }
        };
        match next {
            Ok(b) => {
                self.pending = Some(p);
                Outcome::Bind(b)
            }
            Err(rej) => {
                self.unquota(&p.quota_user);
                self.error(out, p.req, Some(&p.key), p.alg, rej, env)
            }
        }
    }

    /// Give back the ports and quota of an Allocate whose Bind was never answered.
    pub(super) fn abandon_pending(&mut self) {
        if let Some(mut p) = self.pending.take() {
            drop(p.first.take());
            if p.port != 0 {
                self.release_port(p.port);
                if p.pair {
                    self.release_port(p.port + 1);
                }
            }
            self.unquota(&p.quota_user);
        }
    }

    /// The relay socket is there: apply DONT-FRAGMENT, install the allocation, answer.
    fn finish_allocate(
        &mut self,
        env: Env,
        p: Pending<R>,
        relay: R,
        new_token: Option<[u8; 8]>,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let Pending {
            client,
            req,
            key,
            alg,
            kind,
            lifetime,
            quota_user,
            adv_ip,
            redeemed,
            dont_fragment,
            ..
        } = p;
        if dont_fragment {
            if let Err(e) = relay.set_dont_fragment() {
                tracing::debug!(error = %e, "DONT-FRAGMENT cannot be applied; 420");
                let port = relay.local_addr().port();
                drop(relay);
                self.release_port(port);
                self.unquota(&quota_user);
                return self.error(
                    out,
                    req,
                    Some(&key),
                    alg,
                    reject(420, "Unknown Attribute"),
                    env,
                );
            }
        }
        relay.attach(&self.sink);
        let local = relay.local_addr();
        let adv_ip = if redeemed {
            self.settings.advertised(local.ip()).unwrap_or(local.ip())
        } else {
            adv_ip
        };
        let advertised = SocketAddr::new(adv_ip, local.port());
        let span = tracing::info_span!("allocation", %client, relay = %advertised, transport = self.transport);
        span.in_scope(|| tracing::debug!(lifetime, user = %quota_user, "allocation created"));
        let tid = req.tid;
        let start = out.len();
        {
            let mut e = Encoder::new(out, method::ALLOCATE, Class::Success, &tid);
            e.xor_address(attr::XOR_RELAYED_ADDRESS, advertised);
            e.xor_address(attr::XOR_MAPPED_ADDRESS, client);
            e.u32_attr(attr::LIFETIME, lifetime);
            if let Some(t) = new_token {
                e.attr(attr::RESERVATION_TOKEN, &t);
            }
            e.software(&self.settings.software);
            sign(&mut e, &key, alg);
            close(e, req.fingerprint);
        }
        let a = Alloc {
            relay,
            kind,
            pending_connect: None,
            advertised,
            client_local: env.local,
            expires: env.now + Duration::from_secs(lifetime as u64),
            born: env.now,
            key,
            quota_user,
            perms: Vec::new(),
            chans: Vec::new(),
            alloc_tid: tid,
            alloc_resp: out[start..].to_vec(),
            bucket: Bucket::new(self.settings.max_bps, env.now),
            span,
            id: super::allocation_id(),
            created: env.now,
            usage: Arc::default(),
            timer: None,
        };
        self.events.push_back(Event::Created {
            allocation: a.id.clone(),
            user: a.quota_user.clone(),
            transport: self.transport,
            relay: kind,
        });
        self.publish(client, &a);
        self.allocs.insert(client, a);
        self.reschedule(client);
        self.metrics
            .turn_allocations_created
            .with_label_values(&[self.transport])
            .inc();
        self.metrics
            .turn_allocations_active
            .with_label_values(&[self.transport])
            .inc();
        Outcome::Success
    }

    pub(super) fn lifetime(&self, msg: &Message<'_>) -> Result<u32, Reject> {
        match msg.get(attr::LIFETIME) {
            None => Ok(self.settings.default_lifetime),
            Some(v) => {
                let l = decode_u32(v).map_err(|_| reject(400, "Bad Request"))?;
                if l == 0 {
                    return Ok(0);
                }
                Ok(l.clamp(self.settings.default_lifetime, self.settings.max_lifetime))
            }
        }
    }

    pub(super) fn refresh(
        &mut self,
        env: Env,
        client: SocketAddr,
        msg: &Message<'_>,
        key: &Key,
        alg: Alg,
        out: &mut Vec<u8>,
    ) -> Result<(), Reject> {
        let lifetime = self.lifetime(msg)?;
        let Some(a) = self.allocs.get_mut(&client) else {
            return Err(reject(437, "Allocation Mismatch"));
        };
        if let Some(f) = msg.get(attr::REQUESTED_ADDRESS_FAMILY) {
            let want_v6 = match f {
                [0x01, 0, 0, 0] => false,
                [0x02, 0, 0, 0] => true,
                _ => return Err(reject(400, "Bad Request")),
            };
            if want_v6 != a.advertised.is_ipv6() {
                return Err(reject(443, "Peer Address Family Mismatch"));
            }
        }
        // However often it is refreshed, an allocation ends at its maximum age.
        // A maximum age past what an `Instant` can hold is no cap at all.
        let end = a
            .born
            .checked_add(Duration::from_secs(self.settings.max_age));
        let left = end.map_or(u64::MAX, |e| e.saturating_duration_since(env.now).as_secs());
        if lifetime > 0 && left == 0 {
            self.delete(client, DeleteReason::MaxAge);
            return Err(reject(437, "Allocation Mismatch: maximum age reached"));
        }
        let lifetime = (lifetime as u64).min(left) as u32;
        if lifetime == 0 {
            self.delete(client, DeleteReason::RefreshedZero);
        } else {
            let until = env.now + Duration::from_secs(lifetime as u64);
            a.expires = end.map_or(until, |e| until.min(e));
            a.span
                .in_scope(|| tracing::debug!(lifetime, "allocation refreshed"));
        }
        self.signed_success(out, method::REFRESH, Some(lifetime), msg, key, alg);
        Ok(())
    }

    /// Validate an XOR-PEER-ADDRESS against the allocation's family and the peer policy.
    pub(super) fn check_peer(&self, a: &Alloc<R>, peer: SocketAddr) -> Result<(), Reject> {
        if peer.is_ipv6() != a.advertised.is_ipv6() {
            return Err(reject(443, "Peer Address Family Mismatch"));
        }
        if !self.settings.policy.permits_peer(peer) {
            return Err(reject(403, "Forbidden"));
        }
        Ok(())
    }

    pub(super) fn create_permission(
        &mut self,
        env: Env,
        client: SocketAddr,
        msg: &Message<'_>,
        key: &Key,
        alg: Alg,
        out: &mut Vec<u8>,
    ) -> Result<(), Reject> {
        let Some(a) = self.allocs.get(&client) else {
            return Err(reject(437, "Allocation Mismatch"));
        };
        let mut peers: Vec<IpAddr> = Vec::new();
        for p in msg.xor_addresses(attr::XOR_PEER_ADDRESS) {
            let p = p.map_err(|_| reject(400, "Bad Request"))?;
            self.check_peer(a, p)?;
            if !peers.contains(&p.ip()) {
                peers.push(p.ip());
            }
        }
        if peers.is_empty() {
            return Err(reject(400, "Bad Request"));
        }
        if !a.permissions_fit(&peers) {
            return Err(reject(508, "Insufficient Capacity"));
        }
        let Some(a) = self.allocs.get_mut(&client) else {
            return Err(reject(437, "Allocation Mismatch"));
        };
        let exp = env.now + PERMISSION_LIFETIME;
        let mut added = 0;
        for ip in peers {
            if a.grant_permission(ip, exp) {
                added += 1;
            }
        }
        self.metrics.turn_permissions_active.add(added);
        if let Some(a) = self.allocs.get(&client) {
            self.publish(client, a);
        }
        self.signed_success(out, method::CREATE_PERMISSION, None, msg, key, alg);
        Ok(())
    }

    pub(super) fn channel_bind(
        &mut self,
        env: Env,
        client: SocketAddr,
        msg: &Message<'_>,
        key: &Key,
        alg: Alg,
        out: &mut Vec<u8>,
    ) -> Result<(), Reject> {
        let Some(a) = self.allocs.get(&client) else {
            return Err(reject(437, "Allocation Mismatch"));
        };
        if a.kind != RelayKind::Udp {
            // Channels carry datagrams; a TCP relay uses data connections (RFC 6062 §5).
            return Err(reject(400, "Bad Request"));
        }
        let num = msg
            .get(attr::CHANNEL_NUMBER)
            .ok_or(reject(400, "Bad Request"))?;
        if num.len() != 4 {
            return Err(reject(400, "Bad Request"));
        }
        let num = u16::from_be_bytes([num[0], num[1]]);
        if !CHANNEL_NUMBERS.contains(&num) {
            return Err(reject(400, "Bad Request"));
        }
        let peer = msg
            .xor_address(attr::XOR_PEER_ADDRESS)
            .ok_or(reject(400, "Bad Request"))?
            .map_err(|_| reject(400, "Bad Request"))?;
        // RFC 8656 §11.2: a channel number is bound to one peer and a peer to one channel,
        // including during the cool-down after expiry.
        for c in &a.chans {
            if (c.num == num) != (c.peer == peer) {
                tracing::debug!(channel = num, %peer, bound = c.num, bound_peer = %c.peer, "channel rebind refused");
                return Err(reject(400, "Bad Request"));
            }
        }
        self.check_peer(a, peer)?;
        let existing = a.chans.iter().any(|c| c.num == num);
        if !existing && a.chans.len() >= MAX_CHANNELS {
            return Err(reject(508, "Insufficient Capacity"));
        }
        let Some(a) = self.allocs.get_mut(&client) else {
            return Err(reject(437, "Allocation Mismatch"));
        };
        let exp = env.now + CHANNEL_LIFETIME;
        match a.chans.iter_mut().find(|c| c.num == num) {
            Some(c) => {
                if c.cooldown_until.take().is_some() {
                    self.metrics.turn_channels_active.inc();
                }
                c.expires = exp;
            }
            None => {
                a.chans.push(Chan {
                    num,
                    peer,
                    expires: exp,
                    cooldown_until: None,
                });
                self.metrics.turn_channels_active.inc();
            }
        }
        if a.grant_permission(peer.ip(), env.now + PERMISSION_LIFETIME) {
            self.metrics.turn_permissions_active.inc();
        }
        a.span
            .in_scope(|| tracing::debug!(channel = num, %peer, "channel bound"));
        if let Some(a) = self.allocs.get(&client) {
            self.publish(client, a);
        }
        self.signed_success(out, method::CHANNEL_BIND, None, msg, key, alg);
        Ok(())
    }

    pub(super) fn publish(&self, client: SocketAddr, a: &Alloc<R>) {
        let view = View {
            client: Some(client),
            perms: a.perms.clone(),
            channels: a
                .chans
                .iter()
                .filter(|c| c.cooldown_until.is_none())
                .map(|c| (c.peer, c.num, c.expires))
                .collect(),
            max_bps: self.settings.max_bps,
            local: a.client_local,
            owner: Some(Arc::from(a.key.username.as_str())),
            usage: a.usage.clone(),
            transport: self.transport,
        };
        a.relay.publish(Arc::new(view));
    }

    /// Client-to-peer relay for a Send indication: `(relay, peer, payload)` or `None` to drop.
    pub fn send_indication<'m>(
        &mut self,
        now: Instant,
        client: SocketAddr,
        msg: &Message<'m>,
    ) -> Option<(&R, SocketAddr, &'m [u8])> {
        if msg.method() != method::SEND || msg.class() != Class::Indication {
            return None;
        }
        let a = self.allocs.get_mut(&client)?;
        let peer = msg.xor_address(attr::XOR_PEER_ADDRESS)?.ok()?;
        let data = msg.get(attr::DATA)?;
        if !a.perms.iter().any(|(p, e)| *p == peer.ip() && *e > now)
            || !self.settings.policy.port_ok(peer)
        {
            return None;
        }
        if !a.bucket.allow(now, data.len()) {
            return None;
        }
        a.usage.to_peer(1, data.len() as u64);
        Some((&a.relay, peer, data))
    }

    /// Client-to-peer relay for ChannelData: `(relay, peer, payload)` or `None` to drop.
    pub fn channel_data<'p>(
        &mut self,
        now: Instant,
        client: SocketAddr,
        pkt: &'p [u8],
    ) -> Option<(&R, SocketAddr, &'p [u8])> {
        if pkt.len() < 4 {
            return None;
        }
        let num = u16::from_be_bytes([pkt[0], pkt[1]]);
        let len = u16::from_be_bytes([pkt[2], pkt[3]]) as usize;
        let payload = pkt.get(4..4 + len)?;
        let a = self.allocs.get_mut(&client)?;
        let c = a
            .chans
            .iter()
            .find(|c| c.num == num && c.cooldown_until.is_none() && c.expires > now)?;
        let peer = c.peer;
        if !a.perms.iter().any(|(p, e)| *p == peer.ip() && *e > now) {
            return None;
        }
        if !a.bucket.allow(now, payload.len()) {
            return None;
        }
        a.usage.to_peer(1, payload.len() as u64);
        Some((&a.relay, peer, payload))
    }

    /// Expire allocations, permissions, channels and reservations due at `env.now`. Only
    /// allocations whose deadline has come are looked at; calling it early does nothing.
    pub fn handle_timeout(&mut self, env: Env) {
        let now = env.now;
        let mut perms_gone = 0i64;
        let mut chans_gone = 0i64;
        while let Some(&(t, client)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            let Some(a) = self.allocs.get_mut(&client) else {
                continue;
            };
            a.timer = None;
            match a.handle_timeout(now) {
                Expiry::Expired => {
                    // Aged out when the lifetime ran to the maximum age, not merely when
                    // the deletion comes late (a clock jump past both deadlines).
                    let aged = a
                        .born
                        .checked_add(Duration::from_secs(self.settings.max_age))
                        .is_some_and(|end| a.expires >= end);
                    let reason = if aged {
                        DeleteReason::MaxAge
                    } else {
                        DeleteReason::Expired
                    };
                    self.delete(client, reason);
                    continue;
                }
                Expiry::Changed { perms, chans } => {
                    perms_gone += perms;
                    chans_gone += chans;
                    if let Some(a) = self.allocs.get(&client) {
                        self.publish(client, a);
                    }
                }
                Expiry::Nothing => {}
            }
            self.reschedule(client);
        }
        self.metrics.turn_permissions_active.sub(perms_gone);
        self.metrics.turn_channels_active.sub(chans_gone);
        let mut due = Vec::new();
        while let Some(&(t, token)) = self.reserved.first() {
            if t > now {
                break;
            }
            self.reserved.pop_first();
            due.push(token);
        }
        if !due.is_empty() {
            self.drop_reservations(&due);
        }
    }

    /// Remove the allocation of `client` (connection closed, or shutdown), freeing its socket.
    pub fn delete(&mut self, client: SocketAddr, reason: DeleteReason) -> bool {
        let Some(a) = self.allocs.remove(&client) else {
            return false;
        };
        a.span
            .in_scope(|| tracing::debug!(reason = reason.label(), "allocation deleted"));
        self.metrics
            .turn_permissions_active
            .sub(a.perms.len() as i64);
        self.metrics.turn_channels_active.sub(
            a.chans
                .iter()
                .filter(|c| c.cooldown_until.is_none())
                .count() as i64,
        );
        self.metrics
            .turn_allocations_deleted
            .with_label_values(&[reason.label()])
            .inc();
        self.metrics
            .turn_allocations_active
            .with_label_values(&[self.transport])
            .dec();
        self.unquota(&a.quota_user);
        self.release_port(a.relay.local_addr().port());
        a.relay.retire();
        self.events.push_back(Event::Ended {
            allocation: a.id.clone(),
            user: a.quota_user.clone(),
            transport: self.transport,
            relay: a.kind,
            reason,
            created: a.created,
            usage: a.usage.clone(),
        });
        if let Some(t) = a.timer {
            self.timers.remove(&(t, client));
        }
        drop(a);
        true
    }

    /// Delete every allocation (server shutdown or connection close).
    pub fn clear(&mut self, reason: DeleteReason) {
        self.abandon_pending();
        let all: Vec<SocketAddr> = self.allocs.keys().copied().collect();
        for c in all {
            self.delete(c, reason);
        }
        let mine: Vec<[u8; 8]> = std::mem::take(&mut self.reserved)
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        self.drop_reservations(&mine);
    }
}

#[cfg(test)]
#[path = "allocations_tests.rs"]
mod tests;
