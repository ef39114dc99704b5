//! One TURN allocation as a state machine (quinn-proto's connection to the table's endpoint):
//! its key, lifetime, permissions, channels and cached Allocate response, with its own timer
//! logic. It does no I/O and reads no clock.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::{Bucket, RelayKind, Req, CHANNEL_COOLDOWN, MAX_PERMISSIONS};

/// The long-term key an allocation was created with; later requests on it are checked
/// against this key rather than re-deriving one from a possibly expired username.
#[derive(Clone)]
pub(super) struct Key {
    pub(super) username: String,
    pub(super) md5: [u8; 16],
    pub(super) sha256: [u8; 32],
}

/// Which integrity algorithm the request used, so the response uses the same.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Alg {
    Md5,
    Sha256,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Chan {
    pub(super) num: u16,
    pub(super) peer: SocketAddr,
    pub(super) expires: Instant,
    /// Expired binding kept until this instant so it is not rebound differently.
    pub(super) cooldown_until: Option<Instant>,
}

/// One allocation: a state machine in the endpoint → connection style. The table routes
/// requests and timeouts to it by client 5-tuple; it reports its earliest deadline
/// ([`Alloc::poll_timeout`]) and what a timeout did ([`Alloc::handle_timeout`]).
pub(super) struct Alloc<R> {
    pub(super) relay: R,
    pub(super) kind: RelayKind,
    /// Connect request waiting for the shell's TCP connect: transaction id, fingerprint, alg.
    pub(super) pending_connect: Option<([u8; 12], bool, Alg)>,
    pub(super) advertised: SocketAddr,
    /// The server address the client sends to (its replies and peer data leave from it).
    pub(super) client_local: Option<IpAddr>,
    pub(super) expires: Instant,
    /// Creation time: `turn.max_allocation_age_secs` counts from here.
    pub(super) born: Instant,
    pub(super) key: Key,
    pub(super) quota_user: String,
    pub(super) perms: Vec<(IpAddr, Instant)>,
    pub(super) chans: Vec<Chan>,
    pub(super) alloc_tid: [u8; 12],
    pub(super) alloc_resp: Vec<u8>,
    pub(super) bucket: Bucket,
    pub(super) span: tracing::Span,
    /// Id in webhook events.
    pub(super) id: String,
    pub(super) created: Instant,
    pub(super) usage: std::sync::Arc<super::Usage>,
    /// The deadline this allocation holds in the table's timer queue: the earliest of its
    /// lifetime, permissions, channels and channel cool-downs.
    pub(super) timer: Option<Instant>,
}

impl<R> Alloc<R> {
    /// Whether granting all of `ips` keeps this allocation within `MAX_PERMISSIONS`: a request
    /// is refused whole (508) rather than granted in part, so callers ask before granting.
    pub(super) fn permissions_fit(&self, ips: &[IpAddr]) -> bool {
        let new = ips
            .iter()
            .filter(|ip| !self.perms.iter().any(|(p, _)| p == *ip))
            .count();
        self.perms.len() + new <= MAX_PERMISSIONS
    }

    /// Install the permission for `ip` until `exp`, or extend it; true when it is new, for the
    /// caller to count (the caller has checked the cap with `permissions_fit`).
    pub(super) fn grant_permission(&mut self, ip: IpAddr, exp: Instant) -> bool {
        match self.perms.iter_mut().find(|(p, _)| *p == ip) {
            Some(p) => {
                p.1 = p.1.max(exp);
                false
            }
            None => {
                self.perms.push((ip, exp));
                true
            }
        }
    }

    /// Earliest instant at which something of this allocation expires. Bounded work: at most
    /// `MAX_PERMISSIONS` + `MAX_CHANNELS` entries of this one allocation are looked at.
    pub(super) fn poll_timeout(&self) -> Instant {
        let mut d = self.expires;
        for (_, e) in &self.perms {
            d = d.min(*e);
        }
        for c in &self.chans {
            d = d.min(c.cooldown_until.unwrap_or(c.expires));
        }
        d
    }

    /// Expire what is due at `now`: the whole allocation, or permissions and channels (an
    /// expired channel stays reserved for its cool-down). Calling it early does nothing.
    pub(super) fn handle_timeout(&mut self, now: Instant) -> Expiry {
        if self.expires <= now {
            return Expiry::Expired;
        }
        let before = self.perms.len();
        self.perms.retain(|(_, e)| *e > now);
        let perms = (before - self.perms.len()) as i64;
        let mut chans = 0i64;
        for c in self.chans.iter_mut() {
            if c.cooldown_until.is_none() && c.expires <= now {
                c.cooldown_until = Some(c.expires + CHANNEL_COOLDOWN);
                chans += 1;
            }
        }
        self.chans
            .retain(|c| c.cooldown_until.is_none_or(|until| until > now));
        if perms > 0 || chans > 0 {
            Expiry::Changed { perms, chans }
        } else {
            Expiry::Nothing
        }
    }
}

/// What [`Alloc::handle_timeout`] did, for the table's counters and snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expiry {
    /// The lifetime ran out: the table deletes the allocation.
    Expired,
    /// Permissions and/or channels expired: the table republishes the snapshot.
    Changed {
        /// Permissions removed.
        perms: i64,
        /// Channels that went into cool-down.
        chans: i64,
    },
    /// Nothing was due.
    Nothing,
}

/// An Allocate between its checks and its relay socket: everything its answer needs, kept
/// while the shell binds the socket(s) the table asked for.
pub(super) struct Pending<R> {
    pub(super) id: u64,
    pub(super) client: SocketAddr,
    pub(super) req: Req,
    pub(super) key: Key,
    pub(super) alg: Alg,
    pub(super) kind: RelayKind,
    pub(super) lifetime: u32,
    pub(super) quota_user: String,
    /// Where the relay binds, and the address advertised for it (unused when redeeming a
    /// reservation, whose socket's own address decides).
    pub(super) bind_ip: IpAddr,
    pub(super) adv_ip: IpAddr,
    /// The socket came from an EVEN-PORT reservation (RESERVATION-TOKEN).
    pub(super) redeemed: bool,
    /// EVEN-PORT: the port must be even; `pair`: reserve the next one too (R bit).
    pub(super) even: bool,
    pub(super) pair: bool,
    pub(super) dont_fragment: bool,
    /// Ports picked so far (the table gives up after `BIND_TRIES`).
    pub(super) tries: u32,
    /// The port of the current try.
    pub(super) port: u16,
    /// With `pair`: the first (even) socket, bound while the second is asked for.
    pub(super) first: Option<R>,
}
