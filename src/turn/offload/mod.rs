//! Kernel fast path for ChannelData (`turn.kernel_offload`): an eBPF program at TC ingress
//! relays bound channels between client and peer without waking user space, which stays
//! the fallback for everything else (requests, Send/Data indications, TCP/TLS, IPv6,
//! bandwidth-capped allocations, and any packet the program does not own).
//!
//! The control plane drives it through a narrow API: [`Offload::install`] on ChannelBind
//! (and on a refresh that re-creates an expired binding), [`Offload::remove`] on channel
//! expiry, allocation delete or refresh failure, and [`Offload::take_deltas`] to fold the
//! kernel's per-channel counters into metrics and bandwidth accounting. The maps are LRU
//! caches: an evicted entry sends packets back to user space, never to a drop. The kernel
//! never checks lifetimes, so removing entries on time is the control plane's job.
//!
//! Without the `kernel-offload` cargo feature the kernel half is not built; `auto` then
//! falls back at start-up and `on` refuses to start.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};

use crate::turn::core::Usage;

#[cfg(feature = "kernel-offload")]
mod kernel;
mod sync;

pub use sync::{desired_routes, diff, ChannelSync};

pub use crate::config::{OffloadAttach, OffloadMode};

/// How long the kernel may use a route without hearing from user space: each map entry
/// carries this deadline (checked against `bpf_ktime_get_ns`), and [`Offload::take_deltas`]
/// pushes it forward while the process lives. Why: after a SIGKILL on a kernel that keeps
/// the program attached (clsact, before 6.6), relaying stops by then instead of never.
pub const KERNEL_LEASE: std::time::Duration = std::time::Duration::from_secs(15);

/// How old a route's deadline may get before [`Offload::take_deltas`] renews it.
const RENEW_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Detach the kernel program everywhere now, whoever still holds the offload; the binary
/// calls it on every way out of `main` that runs, because a clsact attachment would outlive
/// the process. Routes fall back to user space. Without the feature it does nothing.
pub fn detach_all() {
    #[cfg(feature = "kernel-offload")]
    kernel::detach_all();
}

/// One channel binding as the kernel forwards it (IPv4 over UDP only): what arrives from
/// the client and where it goes, and the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelRoute {
    /// The client's address as the server sees it (after any NAT).
    pub client: SocketAddrV4,
    /// The local address the client sends to: a concrete address, never a wildcard.
    pub listener: SocketAddrV4,
    /// The channel number (0x4000–0x4FFF).
    pub channel: u16,
    /// The relay socket's local (bound) address; peers send to it.
    pub relay: SocketAddrV4,
    /// The peer bound to the channel.
    pub peer: SocketAddrV4,
}

/// Packets and payload bytes relayed by the kernel for one channel, per direction
/// (`up`: client to peer, `down`: peer to client). Bytes count application data, as the
/// user-space relay does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChannelCounters {
    /// Datagrams from the client relayed to the peer.
    pub up_packets: u64,
    /// Their payload bytes.
    pub up_bytes: u64,
    /// Datagrams from the peer relayed to the client.
    pub down_packets: u64,
    /// Their payload bytes.
    pub down_bytes: u64,
}

impl ChannelCounters {
    /// What moved between `last` and `now`, taking a counter that went down as a reset
    /// (the kernel's slot was evicted and started again from zero).
    pub fn delta(last: ChannelCounters, now: ChannelCounters) -> ChannelCounters {
        fn d(last: u64, now: u64) -> u64 {
            if now >= last {
                now - last
            } else {
                now
            }
        }
        ChannelCounters {
            up_packets: d(last.up_packets, now.up_packets),
            up_bytes: d(last.up_bytes, now.up_bytes),
            down_packets: d(last.down_packets, now.down_packets),
            down_bytes: d(last.down_bytes, now.down_bytes),
        }
    }

    /// Whether nothing moved.
    pub fn is_zero(&self) -> bool {
        *self == ChannelCounters::default()
    }

    fn add(&mut self, o: ChannelCounters) {
        self.up_packets += o.up_packets;
        self.up_bytes += o.up_bytes;
        self.down_packets += o.down_packets;
        self.down_bytes += o.down_bytes;
    }
}

/// Why the kernel path cannot be used (start-up) or cannot take a binding (install).
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    /// This binary was built without the `kernel-offload` feature.
    #[error("this build has no kernel offload (built without the kernel-offload feature)")]
    NotBuilt,
    /// The program or its maps could not be loaded (no CAP_BPF/CAP_NET_ADMIN, old kernel,
    /// verifier refusal).
    #[error("cannot load the eBPF program: {0}")]
    Load(String),
    /// The program could not be attached at TC ingress of an interface.
    #[error("cannot attach to {iface}: {reason}")]
    Attach {
        /// Interface name.
        iface: String,
        /// What the kernel said.
        reason: String,
    },
    /// No interface to attach to carries the listener addresses.
    #[error("no interface carries the listener addresses {0:?}")]
    NoInterfaces(Vec<IpAddr>),
    /// No local interface holds this address, so the kernel cannot send from it.
    #[error("no interface holds {0}")]
    NoInterface(std::net::Ipv4Addr),
    /// The peer is one of this host's own addresses (relay to relay): the datagram must be
    /// delivered locally, which a redirect out of an interface cannot do.
    #[error("peer {0} is a local address")]
    LocalPeer(std::net::Ipv4Addr),
    /// A map update failed (the route stays with user space).
    #[error("map update failed: {0}")]
    Map(String),
}

/// User-space state of one installed route: its counter slot, what was last read, and the
/// allocation's usage account that the kernel's counts are credited to.
#[derive(Debug)]
struct Slot {
    route: ChannelRoute,
    id: u32,
    last: ChannelCounters,
    usage: Option<Arc<Usage>>,
    /// When its kernel deadline was last set ([`KERNEL_LEASE`] from then).
    renewed: std::time::Instant,
}

/// The kernel deadline of a route installed or renewed now.
#[cfg(feature = "kernel-offload")]
fn lease_deadline() -> u64 {
    kernel::monotonic_ns().saturating_add(KERNEL_LEASE.as_nanos() as u64)
}
#[cfg(not(feature = "kernel-offload"))]
fn lease_deadline() -> u64 {
    0
}

fn credit(usage: &Option<Arc<Usage>>, d: ChannelCounters) {
    if let Some(u) = usage {
        if d.up_packets > 0 {
            u.to_peer(d.up_packets, d.up_bytes);
        }
        if d.down_packets > 0 {
            u.to_client(d.down_packets, d.down_bytes);
        }
    }
}

/// The loaded and attached kernel fast path; dropping it detaches the program.
pub struct Offload {
    #[cfg(feature = "kernel-offload")]
    kernel: kernel::Kernel,
    routes: Mutex<Routes>,
    /// Held by [`Offload::take_deltas`] only, so two readers never interleave.
    reader: Mutex<()>,
}

/// What the kernel's upstream map is keyed by: one client, listener and channel.
type RouteKey = (SocketAddrV4, SocketAddrV4, u16);

fn key_of(r: &ChannelRoute) -> RouteKey {
    (r.client, r.listener, r.channel)
}

#[derive(Debug, Default)]
struct Routes {
    by_client: HashMap<RouteKey, Slot>,
    next_id: u32,
}

impl Routes {
    /// Take out the slot installed for exactly `route`. A newer route under the same key
    /// (another peer or relay for that client's channel) is not `route`'s to remove: its
    /// install already took `route`'s kernel entries back, so nothing is left to do.
    fn take(&mut self, route: &ChannelRoute) -> Option<Slot> {
        let key = key_of(route);
        if self.by_client.get(&key)?.route != *route {
            return None;
        }
        self.by_client.remove(&key)
    }
}

impl std::fmt::Debug for Offload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offload")
            .field("interfaces", &self.interfaces())
            .finish()
    }
}

impl Offload {
    /// Load the program and attach it at TC ingress of every interface that carries one of
    /// `addrs` (a wildcard means every interface with an IPv4 address except loopback).
    /// Needs CAP_BPF and CAP_NET_ADMIN (or root); runs in the caller's network namespace.
    pub fn start(addrs: &[IpAddr]) -> Result<Offload, OffloadError> {
        Offload::start_with(addrs, OffloadAttach::Auto)
    }

    /// [`Offload::start`] with an explicit attachment (`turn.kernel_offload_attach`).
    pub fn start_with(addrs: &[IpAddr], attach: OffloadAttach) -> Result<Offload, OffloadError> {
        #[cfg(feature = "kernel-offload")]
        {
            let kernel = kernel::Kernel::start(addrs, attach)?;
            Ok(Offload {
                kernel,
                routes: Mutex::new(Routes::default()),
                reader: Mutex::new(()),
            })
        }
        #[cfg(not(feature = "kernel-offload"))]
        {
            let _ = (addrs, attach);
            Err(OffloadError::NotBuilt)
        }
    }

    /// Apply `mode` at start-up: `Off` gives `None`; `Auto` gives `None` with one warning
    /// when the kernel path cannot start; `On` turns that into an error (exit 2).
    pub fn enable(mode: OffloadMode, addrs: &[IpAddr]) -> Result<Option<Offload>, OffloadError> {
        Offload::enable_with(mode, OffloadAttach::Auto, addrs)
    }

    /// [`Offload::enable`] with an explicit attachment (`turn.kernel_offload_attach`).
    pub fn enable_with(
        mode: OffloadMode,
        attach: OffloadAttach,
        addrs: &[IpAddr],
    ) -> Result<Option<Offload>, OffloadError> {
        match mode {
            OffloadMode::Off => Ok(None),
            OffloadMode::Auto => match Offload::start_with(addrs, attach) {
                Ok(o) => {
                    tracing::info!(interfaces = ?o.interfaces(), "turn kernel offload active");
                    Ok(Some(o))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "turn kernel offload unavailable; relaying in user space");
                    Ok(None)
                }
            },
            OffloadMode::On => {
                let o = Offload::start_with(addrs, attach)?;
                tracing::info!(interfaces = ?o.interfaces(), "turn kernel offload active");
                Ok(Some(o))
            }
        }
    }

    /// Interfaces the program is attached to.
    pub fn interfaces(&self) -> Vec<String> {
        #[cfg(feature = "kernel-offload")]
        {
            self.kernel.interfaces()
        }
        #[cfg(not(feature = "kernel-offload"))]
        {
            Vec::new()
        }
    }

    /// Hand a channel binding to the kernel (ChannelBind, or a refresh of one that had
    /// been removed). Installing the same route again keeps its counters. On error the
    /// binding simply stays with user space.
    pub fn install(&self, route: &ChannelRoute) -> Result<(), OffloadError> {
        self.install_counted(route, None)
    }

    /// [`Offload::install`] for an allocation whose usage account (`allocation.ended`
    /// webhook) is credited with what the kernel relays on this route.
    pub fn install_counted(
        &self,
        route: &ChannelRoute,
        usage: Option<Arc<Usage>>,
    ) -> Result<(), OffloadError> {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let key = key_of(route);
        let (id, last) = match routes.by_client.get(&key) {
            Some(old) => {
                if old.route != *route {
                    // Another peer or relay for the same channel: drop the old reverse entry.
                    self.kernel_remove(&old.route, false);
                }
                (old.id, old.last)
            }
            None => {
                routes.next_id = routes.next_id.wrapping_add(1);
                (routes.next_id, ChannelCounters::default())
            }
        };
        if let Err(e) = self.kernel_install(route, id, lease_deadline()) {
            // Leave nothing half-installed: the binding goes back to user space whole.
            if let Some(old) = routes.by_client.remove(&key) {
                self.kernel_remove(&old.route, true);
                self.kernel_forget(old.id);
            }
            self.kernel_remove(route, true);
            return Err(e);
        }
        routes.by_client.insert(
            key,
            Slot {
                route: *route,
                id,
                last,
                usage,
                renewed: std::time::Instant::now(),
            },
        );
        Ok(())
    }

    /// Take a channel binding back to user space (expiry, delete, refresh failure,
    /// permission loss). Returns what the kernel relayed for it since the last
    /// [`Offload::take_deltas`] (already credited to its usage), so accounting loses
    /// nothing; `None` if it was not installed.
    pub fn remove(&self, route: &ChannelRoute) -> Option<ChannelCounters> {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let slot = routes.take(route)?;
        let now = self.kernel_read(slot.id);
        self.kernel_remove(&slot.route, true);
        self.kernel_forget(slot.id);
        let d = ChannelCounters::delta(slot.last, now.unwrap_or(slot.last));
        credit(&slot.usage, d);
        Some(d)
    }

    /// Per installed route, what the kernel relayed since the previous call (routes with
    /// no traffic are left out), already credited to the route's allocation usage; the
    /// caller adds them to the metrics. Called once a second, it also renews each route's
    /// kernel deadline ([`KERNEL_LEASE`]) once it is [`RENEW_AFTER`] old.
    ///
    /// The shards take the route table's lock on every ChannelBind and expiry, so this holds
    /// it only to copy the table and then once per route whose counters moved, never across
    /// the kernel reads: a route installed, replaced or removed in between is recognised by
    /// its counter slot and left to whoever changed it (`remove` credits its last counts).
    pub fn take_deltas(&self) -> Vec<(ChannelRoute, ChannelCounters)> {
        // One reader at a time, so `last` only moves forward; the shards never take this.
        let _reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let at = std::time::Instant::now();
        let snapshot: Vec<(RouteKey, u32, ChannelCounters, bool)> = {
            let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            routes
                .by_client
                .iter()
                .map(|(k, s)| {
                    let due = at.saturating_duration_since(s.renewed) >= RENEW_AFTER;
                    (*k, s.id, s.last, due)
                })
                .collect()
        };
        let mut out = Vec::new();
        for (key, id, last, due) in snapshot {
            let now = self.kernel_read(id);
            let moved = now.is_some_and(|n| n != last);
            if !moved && !due {
                continue;
            }
            let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            let Some(slot) = routes.by_client.get_mut(&key).filter(|s| s.id == id) else {
                continue;
            };
            if let Some(now) = now.filter(|_| moved) {
                let d = ChannelCounters::delta(slot.last, now);
                slot.last = now;
                credit(&slot.usage, d);
                if !d.is_zero() {
                    out.push((slot.route, d));
                }
            }
            if due {
                // Still installed under the lock, so this cannot bring back a removed route.
                match self.kernel_install(&slot.route, id, lease_deadline()) {
                    Ok(()) => slot.renewed = at,
                    Err(e) => tracing::debug!(error = %e, "kernel route not renewed"),
                }
            }
        }
        out
    }

    /// Add what the kernel relayed to the relay metrics (`turn_relayed_packets_total`,
    /// `turn_relayed_bytes_total`), so dashboards count offloaded traffic like any other.
    /// The control plane calls this with the same deltas it credits to allocations.
    pub fn record_metrics(deltas: &[(ChannelRoute, ChannelCounters)], m: &crate::metrics::Metrics) {
        let t = Offload::sum(deltas);
        m.relay_packets_to_peer.inc_by(t.up_packets);
        m.relay_bytes_to_peer.inc_by(t.up_bytes);
        m.relay_packets_to_client.inc_by(t.down_packets);
        m.relay_bytes_to_client.inc_by(t.down_bytes);
        // Only ChannelData from UDP clients is offloaded.
        m.relay_bytes_by_transport.to_peer("udp").inc_by(t.up_bytes);
        m.relay_bytes_by_transport
            .to_client("udp")
            .inc_by(t.down_bytes);
        m.offload_packets_to_peer.inc_by(t.up_packets);
        m.offload_packets_to_client.inc_by(t.down_packets);
    }

    /// Totals of everything the kernel relayed, summed over `take_deltas` results; a
    /// convenience for callers that keep no accounting of their own.
    pub fn sum(deltas: &[(ChannelRoute, ChannelCounters)]) -> ChannelCounters {
        let mut t = ChannelCounters::default();
        for (_, d) in deltas {
            t.add(*d);
        }
        t
    }

    /// How many routes are installed.
    pub fn len(&self) -> usize {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_client
            .len()
    }

    /// Whether no route is installed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[cfg(feature = "kernel-offload")]
    fn kernel_install(
        &self,
        route: &ChannelRoute,
        id: u32,
        deadline: u64,
    ) -> Result<(), OffloadError> {
        self.kernel.install(route, id, deadline)
    }
    #[cfg(not(feature = "kernel-offload"))]
    fn kernel_install(&self, _: &ChannelRoute, _: u32, _: u64) -> Result<(), OffloadError> {
        Err(OffloadError::NotBuilt)
    }

    #[cfg(feature = "kernel-offload")]
    fn kernel_remove(&self, route: &ChannelRoute, both: bool) {
        self.kernel.remove(route, both)
    }
    #[cfg(not(feature = "kernel-offload"))]
    fn kernel_remove(&self, _: &ChannelRoute, _: bool) {}

    #[cfg(feature = "kernel-offload")]
    fn kernel_read(&self, id: u32) -> Option<ChannelCounters> {
        self.kernel.read(id)
    }
    #[cfg(not(feature = "kernel-offload"))]
    fn kernel_read(&self, _: u32) -> Option<ChannelCounters> {
        None
    }

    #[cfg(feature = "kernel-offload")]
    fn kernel_forget(&self, id: u32) {
        self.kernel.forget(id)
    }
    #[cfg(not(feature = "kernel-offload"))]
    fn kernel_forget(&self, _: u32) {}
}

// The handle is shared between the listener and relay tasks.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Offload>();
};

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(route: ChannelRoute, id: u32) -> Slot {
        Slot {
            route,
            id,
            last: ChannelCounters::default(),
            usage: None,
            renewed: std::time::Instant::now(),
        }
    }

    #[test]
    fn removing_an_older_route_leaves_a_newer_one_with_the_same_key() {
        let old = ChannelRoute {
            client: "203.0.113.21:40000".parse().unwrap(),
            listener: "203.0.113.10:3478".parse().unwrap(),
            channel: 0x4001,
            relay: "203.0.113.10:50000".parse().unwrap(),
            peer: "203.0.113.30:3480".parse().unwrap(),
        };
        // The same client, listener and channel, later bound to another peer and relay (a
        // new allocation from the same 5-tuple, or the channel rebound after its cooldown).
        let new = ChannelRoute {
            relay: "203.0.113.10:50002".parse().unwrap(),
            peer: "203.0.113.31:3480".parse().unwrap(),
            ..old
        };
        let mut r = Routes::default();
        r.by_client.insert(key_of(&new), slot(new, 2));
        assert!(
            r.take(&old).is_none(),
            "the older route is not installed any more"
        );
        assert_eq!(r.by_client.get(&key_of(&new)).map(|s| s.id), Some(2));
        assert_eq!(r.take(&new).map(|s| s.route), Some(new));
        assert!(r.by_client.is_empty());
    }

    #[test]
    fn deltas_take_a_drop_as_a_reset() {
        let a = ChannelCounters {
            up_packets: 10,
            up_bytes: 1000,
            down_packets: 5,
            down_bytes: 500,
        };
        let b = ChannelCounters {
            up_packets: 12,
            up_bytes: 1200,
            down_packets: 2,
            down_bytes: 100,
        };
        let d = ChannelCounters::delta(a, b);
        assert_eq!(d.up_packets, 2);
        assert_eq!(d.up_bytes, 200);
        assert_eq!(d.down_packets, 2, "evicted slot restarted from zero");
        assert_eq!(d.down_bytes, 100);
        assert!(ChannelCounters::delta(b, b).is_zero());
    }

    #[test]
    fn kernel_deltas_land_in_the_relay_metrics() {
        let m = crate::metrics::Metrics::new();
        let route = ChannelRoute {
            client: "203.0.113.21:40000".parse().unwrap(),
            listener: "203.0.113.10:3478".parse().unwrap(),
            channel: 0x4001,
            relay: "203.0.113.10:50000".parse().unwrap(),
            peer: "203.0.113.30:3480".parse().unwrap(),
        };
        let d = ChannelCounters {
            up_packets: 3,
            up_bytes: 300,
            down_packets: 2,
            down_bytes: 40,
        };
        Offload::record_metrics(&[(route, d), (route, d)], &m);
        assert_eq!(m.relay_packets_to_peer.get(), 6);
        assert_eq!(m.relay_bytes_to_peer.get(), 600);
        assert_eq!(m.relay_packets_to_client.get(), 4);
        assert_eq!(m.relay_bytes_to_client.get(), 80);
        assert_eq!(m.offload_packets_to_peer.get(), 6);
        assert_eq!(m.offload_packets_to_client.get(), 4);
    }

    #[test]
    fn kernel_counts_are_credited_to_the_allocation_usage() {
        // The usage credit follows what was read; nothing read, nothing credited.
        let u = Arc::new(Usage::default());
        credit(&Some(u.clone()), ChannelCounters::default());
        assert_eq!(
            u.packets_to_peer.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        credit(
            &Some(u.clone()),
            ChannelCounters {
                up_packets: 2,
                up_bytes: 10,
                down_packets: 1,
                down_bytes: 7,
            },
        );
        assert_eq!(
            u.packets_to_peer.load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        assert_eq!(
            u.bytes_to_client.load(std::sync::atomic::Ordering::Relaxed),
            7
        );
    }

    #[test]
    fn mode_parses_from_toml_strings() {
        #[derive(serde::Deserialize)]
        struct T {
            m: OffloadMode,
        }
        for (s, m) in [
            ("off", OffloadMode::Off),
            ("auto", OffloadMode::Auto),
            ("on", OffloadMode::On),
        ] {
            let t: T = toml::from_str(&format!("m = \"{s}\"")).unwrap();
            assert_eq!(t.m, m);
        }
        assert!(toml::from_str::<T>("m = \"yes\"").is_err());
    }

    #[cfg(not(feature = "kernel-offload"))]
    #[test]
    fn without_the_feature_auto_falls_back_and_on_fails() {
        let addrs = ["127.0.0.1".parse().unwrap()];
        assert!(Offload::enable(OffloadMode::Off, &addrs).unwrap().is_none());
        assert!(Offload::enable(OffloadMode::Auto, &addrs)
            .unwrap()
            .is_none());
        assert!(matches!(
            Offload::enable(OffloadMode::On, &addrs),
            Err(OffloadError::NotBuilt)
        ));
    }
}
