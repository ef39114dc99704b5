//! The process-wide relay port pool and allocation quotas: which relay ports are taken,
//! EVEN-PORT reservations waiting for their token, and allocation counts per user and in all.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::allocation::Pending;
use super::{reject, Bind, Reject, Relay, Table};

/// How long an EVEN-PORT reservation is kept (RFC 8656 §7.2: about 30 seconds).
pub const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);

/// Ports an Allocate tries before it gives up with 508 (another process may hold some).
const BIND_TRIES: u32 = 32;

/// Counters shared by every table of the process: allocation quotas, used relay ports and the
/// nonce key. Only control messages touch it, so a plain mutex is the clear choice.
#[derive(Debug)]
pub struct Pool {
    inner: Mutex<PoolInner>,
    nonce_key: [u8; 32],
}

/// The shared counters of a [`Pool`] at one instant (see [`Pool::audit`]).
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct PoolAudit {
    /// Allocations counted process-wide.
    pub total: u32,
    /// Allocations counted per quota user.
    pub per_user: HashMap<String, u32>,
    /// Relay ports taken (allocations and EVEN-PORT reservations).
    pub ports: HashSet<u16>,
    /// EVEN-PORT reservations not yet redeemed or expired.
    pub reservations: usize,
}

#[derive(Default)]
struct PoolInner {
    total: u32,
    per_user: HashMap<String, u32>,
    ports: HashSet<u16>,
    /// EVEN-PORT reservations: token → (relay socket, expiry). Shared because the client
    /// redeems the token on another 5-tuple (another connection, for stream transports).
    reservations: HashMap<[u8; 8], Reservation>,
    /// Allocations of each user on the other nodes of the cluster, as last read from Redis.
    remote: HashMap<String, u32>,
}

impl std::fmt::Debug for PoolInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolInner")
            .field("total", &self.total)
            .field("ports", &self.ports.len())
            .field("reservations", &self.reservations.len())
            .finish()
    }
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new()
    }
}

impl Pool {
    /// A fresh pool with a random nonce key.
    pub fn new() -> Pool {
        Pool {
            inner: Mutex::new(PoolInner::default()),
            nonce_key: rand::random(),
        }
    }
    /// A fresh pool whose nonces are signed with `nonce_key`: nodes of a cluster share it,
    /// so a NONCE handed out with a 300 redirect is good at the alternate node.
    pub fn with_nonce_key(nonce_key: [u8; 32]) -> Pool {
        Pool {
            inner: Mutex::new(PoolInner::default()),
            nonce_key,
        }
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolInner> {
        // A poisoned lock only means another table panicked mid-update of plain counters.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Allocations currently counted process-wide.
    pub fn total(&self) -> u32 {
        self.lock().total
    }

    /// A copy of the shared counters, so fuzzers and tests can check them against the
    /// allocations that really exist.
    #[doc(hidden)]
    pub fn audit(&self) -> PoolAudit {
        let p = self.lock();
        PoolAudit {
            total: p.total,
            per_user: p.per_user.clone(),
            ports: p.ports.clone(),
            reservations: p.reservations.len(),
        }
    }

    /// Allocations per user on this node, which cluster mode publishes for the others.
    pub fn users(&self) -> HashMap<String, u32> {
        self.lock().per_user.clone()
    }

    /// Allocations per user on the other nodes (cluster mode); they count towards
    /// `turn.max_allocations_per_user` here. An empty map makes the quota per node again.
    pub fn set_remote(&self, remote: HashMap<String, u32>) {
        self.lock().remote = remote;
    }

    /// The key nonces are signed with, the same for every table so a nonce from one listener
    /// is good on another.
    pub(super) fn nonce_key(&self) -> &[u8; 32] {
        &self.nonce_key
    }

    /// Count one more allocation of `user`, unless that passes the per-user or total cap.
    pub(super) fn take_quota(
        &self,
        user: &str,
        max_per_user: u32,
        max_total: u32,
    ) -> Result<(), QuotaFull> {
        let mut p = self.lock();
        let here = p.per_user.get(user).copied().unwrap_or(0);
        let there = p.remote.get(user).copied().unwrap_or(0);
        if here.saturating_add(there) >= max_per_user {
            return Err(QuotaFull::User);
        }
        if p.total >= max_total {
            return Err(QuotaFull::Total);
        }
        p.total += 1;
        *p.per_user.entry(user.to_string()).or_insert(0) += 1;
        Ok(())
    }

    /// Give back one allocation of `user` counted by [`Pool::take_quota`].
    pub(super) fn unquota(&self, user: &str) {
        let mut p = self.lock();
        p.total = p.total.saturating_sub(1);
        if let Some(n) = p.per_user.get_mut(user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                p.per_user.remove(user);
            }
        }
    }

    /// Mark a free port in `lo..=hi` used, starting the search at a random place: an even one
    /// when `even`, and the next one too when `pair`. `None` when none is free.
    pub(super) fn take_port(&self, lo: u32, hi: u32, even: bool, pair: bool) -> Option<u16> {
        let span = hi - lo + 1;
        let mut p = self.lock();
        let start: u32 = rand::random::<u32>() % span;
        let mut found = None;
        for i in 0..span {
            let port = lo + (start + i) % span;
            if even && port % 2 == 1 {
                continue;
            }
            if p.ports.contains(&(port as u16)) {
                continue;
            }
            if pair && (port + 1 > hi || p.ports.contains(&((port + 1) as u16))) {
                continue;
            }
            found = Some(port as u16);
            break;
        }
        let port = found?;
        p.ports.insert(port);
        if pair {
            p.ports.insert(port + 1);
        }
        Some(port)
    }

    /// Mark `port` free again.
    pub(super) fn release_port(&self, port: u16) {
        self.lock().ports.remove(&port);
    }

    /// Keep `relay` (bound to `port`) for whoever presents `token` before `expires`.
    pub(super) fn reserve(
        &self,
        token: [u8; 8],
        relay: Box<dyn std::any::Any + Send>,
        port: u16,
        expires: Instant,
    ) {
        self.lock()
            .reservations
            .insert(token, (relay, port, expires));
    }

    /// Redeem a reservation: its relay socket, port and expiry. The port stays marked used.
    pub(super) fn take_reservation(&self, token: &[u8; 8]) -> Option<Reservation> {
        self.lock().reservations.remove(token)
    }

    /// Release reservations (if not redeemed yet) and their ports.
    pub(super) fn drop_reservations(&self, tokens: &[[u8; 8]]) {
        let mut gone = Vec::new();
        {
            let mut p = self.lock();
            for t in tokens {
                if let Some((r, port, _)) = p.reservations.remove(t) {
                    p.ports.remove(&port);
                    gone.push(r);
                }
            }
        }
        // Sockets close outside the lock.
        drop(gone);
    }
}

/// Which cap refused an allocation.
pub(super) enum QuotaFull {
    /// `turn.max_allocations_per_user`.
    User,
    /// `turn.max_allocations`.
    Total,
}

/// A reserved relay socket (type-erased, since the pool is shared by tables of every relay
/// type), its port and when the reservation lapses.
pub(super) type Reservation = (Box<dyn std::any::Any + Send>, u16, Instant);

impl<R: Relay> Table<R> {
    pub(super) fn unquota(&self, user: &str) {
        self.pool.unquota(user);
    }

    pub(super) fn release_port(&self, port: u16) {
        self.pool.release_port(port);
    }

    /// Release reservations (if not redeemed yet) and their ports.
    pub(super) fn drop_reservations(&self, tokens: &[[u8; 8]]) {
        self.pool.drop_reservations(tokens);
    }

    /// Take the next port to try for the pending Allocate `p`, as the [`Bind`] the shell
    /// answers; 508 once `BIND_TRIES` ports were tried or the pool has none left.
    pub(super) fn pick_port(&mut self, p: &mut Pending<R>) -> Result<Bind, Reject> {
        let (lo, hi) = (self.settings.port_min as u32, self.settings.port_max as u32);
        if p.tries >= BIND_TRIES {
            return Err(reject(508, "Insufficient Capacity"));
        }
        p.tries += 1;
        p.port = 0;
        let picked = self
            .pool
            .take_port(lo, hi, p.even, p.pair)
            .ok_or(reject(508, "Insufficient Capacity"))?;
        p.port = picked;
        Ok(Bind {
            id: p.id,
            addr: SocketAddr::new(p.bind_ip, picked),
            kind: p.kind,
        })
    }
}

/// The name a per-user quota counts: the user part of a REST `expiry:user` name, else the name.
pub(super) fn quota_name(username: &str) -> &str {
    match username.split_once(':') {
        Some((exp, user)) if exp.bytes().all(|b| b.is_ascii_digit()) && !user.is_empty() => user,
        _ => username,
    }
}

#[cfg(test)]
#[path = "ports_tests.rs"]
mod tests;
