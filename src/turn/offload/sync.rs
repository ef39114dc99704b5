//! Mirrors the forwarding table into the kernel: the control plane publishes one immutable
//! [`View`] per allocation on every change (ChannelBind, refresh, permission or channel
//! expiry), and [`ChannelSync`] turns each one into installs and removals, so a binding is
//! in the kernel exactly while user space would relay it.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{ChannelRoute, Offload};
use crate::metrics::Metrics;
use crate::turn::core::View;

fn v4(a: SocketAddr) -> Option<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(_) => None,
    }
}

/// The routes the kernel may carry for one allocation's `view` at `now`: its live channels
/// whose peer also holds a live permission, for an IPv4 client on a UDP listener (`listener`,
/// whose wildcard IP is replaced by the address the client used) and an IPv4 relay socket
/// (`relay`). A bandwidth-capped allocation gets none: its bucket lives in user space.
pub fn desired_routes(
    view: &View,
    relay: SocketAddr,
    listener: SocketAddr,
    now: Instant,
) -> Vec<ChannelRoute> {
    let (Some(client), Some(relay)) = (view.client.and_then(v4), v4(relay)) else {
        return Vec::new();
    };
    if view.max_bps != 0 || relay.ip().is_unspecified() {
        return Vec::new();
    }
    let listen_ip = match (listener.ip(), view.local) {
        (IpAddr::V4(ip), _) if !ip.is_unspecified() => ip,
        (_, Some(IpAddr::V4(ip))) if !ip.is_unspecified() => ip,
        _ => return Vec::new(),
    };
    let listener = SocketAddrV4::new(listen_ip, listener.port());
    view.channels
        .iter()
        .filter(|(peer, _, exp)| *exp > now && view.permits(peer.ip(), now))
        .filter_map(|(peer, channel, _)| {
            Some(ChannelRoute {
                client,
                listener,
                channel: *channel,
                relay,
                peer: v4(*peer)?,
            })
        })
        .collect()
}

/// What to remove from `old` and install from `new` (an unchanged route is left alone, so
/// its counters keep running).
pub fn diff(old: &[ChannelRoute], new: &[ChannelRoute]) -> (Vec<ChannelRoute>, Vec<ChannelRoute>) {
    let gone = old.iter().filter(|r| !new.contains(r)).copied().collect();
    let added = new.iter().filter(|r| !old.contains(r)).copied().collect();
    (gone, added)
}

/// Keeps one allocation's routes in the kernel in step with what its relay socket is told.
/// The relay calls [`ChannelSync::publish`] next to storing each new view; dropping the
/// sync (allocation deleted) takes every route back. Routes that fail to install stay with
/// user space.
pub struct ChannelSync {
    offload: Arc<Offload>,
    metrics: Option<Arc<Metrics>>,
    relay: SocketAddr,
    listener: SocketAddr,
    installed: Mutex<Vec<ChannelRoute>>,
}

impl std::fmt::Debug for ChannelSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelSync")
            .field("relay", &self.relay)
            .field("listener", &self.listener)
            .finish()
    }
}

impl ChannelSync {
    /// A sync for the relay socket bound at `relay`, whose client talks to the UDP listener
    /// bound at `listener`; the last counts of removed routes go to `metrics`.
    pub fn new(
        offload: Arc<Offload>,
        metrics: Option<Arc<Metrics>>,
        relay: SocketAddr,
        listener: SocketAddr,
    ) -> ChannelSync {
        ChannelSync {
            offload,
            metrics,
            relay,
            listener,
            installed: Mutex::new(Vec::new()),
        }
    }

    /// Apply a newly published view; what the kernel relays for it is credited to the
    /// view's usage account.
    pub fn publish(&self, view: &View, now: Instant) {
        let want = desired_routes(view, self.relay, self.listener, now);
        self.set(want, Some(&view.usage));
    }

    /// Take every route back (the allocation is being deleted), so that its usage is
    /// complete before the `allocation.ended` webhook reads it.
    pub fn clear(&self) {
        self.set(Vec::new(), None);
    }

    /// The routes currently in the kernel for this allocation.
    pub fn installed(&self) -> Vec<ChannelRoute> {
        self.installed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, want: Vec<ChannelRoute>, usage: Option<&Arc<crate::turn::core::Usage>>) {
        let mut installed = self.installed.lock().unwrap_or_else(|p| p.into_inner());
        let (gone, added) = diff(&installed, &want);
        for r in &gone {
            self.take_back(r);
        }
        installed.retain(|r| !gone.contains(r));
        for r in added {
            match self.offload.install_counted(&r, usage.cloned()) {
                Ok(()) => installed.push(r),
                Err(e) => {
                    tracing::debug!(error = %e, channel = r.channel, "channel stays in user space")
                }
            }
        }
    }

    fn take_back(&self, r: &ChannelRoute) {
        if let Some(last) = self.offload.remove(r) {
            if let Some(m) = &self.metrics {
                Offload::record_metrics(&[(*r, last)], m);
            }
        }
    }
}

impl Drop for ChannelSync {
    fn drop(&mut self) {
        let installed =
            std::mem::take(&mut *self.installed.lock().unwrap_or_else(|p| p.into_inner()));
        for r in &installed {
            self.take_back(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn view(now: Instant) -> View {
        View {
            client: Some(sa("203.0.113.21:40000")),
            perms: vec![
                (
                    "203.0.113.30".parse().unwrap(),
                    now + Duration::from_secs(300),
                ),
                (
                    "203.0.113.31".parse().unwrap(),
                    now - Duration::from_secs(1),
                ),
            ],
            channels: vec![
                (
                    sa("203.0.113.30:3480"),
                    0x4001,
                    now + Duration::from_secs(600),
                ),
                // Permission expired: user space would drop it, so the kernel must not relay.
                (
                    sa("203.0.113.31:3480"),
                    0x4002,
                    now + Duration::from_secs(600),
                ),
                // Channel expired.
                (
                    sa("203.0.113.30:3481"),
                    0x4003,
                    now - Duration::from_secs(1),
                ),
            ],
            max_bps: 0,
            local: Some("203.0.113.10".parse().unwrap()),
            owner: None,
            ..Default::default()
        }
    }

    #[test]
    fn only_live_channels_with_live_permissions_are_offloaded() {
        let now = Instant::now();
        let r = desired_routes(
            &view(now),
            sa("203.0.113.10:50000"),
            sa("0.0.0.0:3478"),
            now,
        );
        assert_eq!(
            r,
            vec![ChannelRoute {
                client: "203.0.113.21:40000".parse().unwrap(),
                listener: "203.0.113.10:3478".parse().unwrap(),
                channel: 0x4001,
                relay: "203.0.113.10:50000".parse().unwrap(),
                peer: "203.0.113.30:3480".parse().unwrap(),
            }],
            "the wildcard listener takes the address the client used"
        );
        // Later, the one that was live has expired too.
        let later = now + Duration::from_secs(301);
        assert!(desired_routes(
            &view(now),
            sa("203.0.113.10:50000"),
            sa("0.0.0.0:3478"),
            later
        )
        .is_empty());
    }

    #[test]
    fn capped_ipv6_and_unknown_local_addresses_stay_in_user_space() {
        let now = Instant::now();
        let relay = sa("203.0.113.10:50000");
        let mut v = view(now);
        v.max_bps = 100_000;
        assert!(desired_routes(&v, relay, sa("0.0.0.0:3478"), now).is_empty());
        let mut v = view(now);
        v.local = None;
        assert!(desired_routes(&v, relay, sa("0.0.0.0:3478"), now).is_empty());
        assert_eq!(
            desired_routes(&v, relay, sa("203.0.113.10:3478"), now).len(),
            1
        );
        let mut v = view(now);
        v.client = Some(sa("[2001:db8::1]:40000"));
        assert!(desired_routes(&v, relay, sa("0.0.0.0:3478"), now).is_empty());
        assert!(desired_routes(
            &view(now),
            sa("[2001:db8::10]:50000"),
            sa("0.0.0.0:3478"),
            now
        )
        .is_empty());
        let reserved = View::default();
        assert!(desired_routes(&reserved, relay, sa("0.0.0.0:3478"), now).is_empty());
    }

    #[test]
    fn diff_keeps_unchanged_routes() {
        let now = Instant::now();
        let a = desired_routes(
            &view(now),
            sa("203.0.113.10:50000"),
            sa("0.0.0.0:3478"),
            now,
        );
        let mut b = a.clone();
        b[0].channel = 0x4005;
        assert_eq!(diff(&a, &a), (vec![], vec![]));
        assert_eq!(diff(&a, &b), (a.clone(), b.clone()));
        assert_eq!(diff(&a, &[]), (a.clone(), vec![]));
    }
}
