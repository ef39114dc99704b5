//! What one node knows about the TURN side of the cluster, and the decisions it takes from
//! that knowledge alone: which node a login points at, and where a redirected Allocate goes.
//!
//! Sans-IO: the cluster shell (`src/cluster/members.rs`) reads the records from Redis and
//! swaps a [`Snapshot`] into [`Live`]; the TURN core and the login path only read it, so
//! neither ever waits on Redis. Public address discovery writes its results here too.

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

/// Whether a node takes new allocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Takes new allocations and logins.
    Ready,
    /// Shutting down: keeps its allocations, takes no new ones.
    Draining,
}

/// One node's published record (JSON in Redis, and the rows of `GET /v1/admin/nodes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node id (`cluster.node_id`).
    pub node: String,
    /// `ready` or `draining`.
    pub state: NodeState,
    /// Host put in this node's own URIs: a per-node name or an IP literal (`[v6]` bracketed).
    pub host: String,
    /// The `turn:`/`turns:` URIs that reach this node (udp, tcp, tls).
    pub uris: Vec<String>,
    /// Public addresses, at most one per family.
    pub addrs: Vec<IpAddr>,
    /// UDP/TCP port of STUN/TURN (0: none).
    pub port: u16,
    /// TLS port (0: none).
    pub tls_port: u16,
    /// Allocations held now.
    pub allocations: u64,
    /// `turn.capacity_allocations`: allocations above which the node redirects.
    pub capacity: u64,
    /// Packets relayed per second (both directions), over the last refresh period.
    pub packets_per_sec: f64,
    /// CPU share of the relay shards, 0..=1 of the whole host.
    pub cpu: f64,
    /// When the record was built (Unix milliseconds, the publisher's clock): logins placed
    /// after it are not in `allocations` yet.
    #[serde(default)]
    pub at_ms: u64,
}

impl NodeRecord {
    /// Load in 0..=1+ (allocations over capacity), what placement compares.
    pub fn load(&self) -> f64 {
        self.allocations as f64 / self.capacity.max(1) as f64
    }

    fn addr_of(&self, v6: bool) -> Option<IpAddr> {
        self.addrs.iter().copied().find(|a| a.is_ipv6() == v6)
    }
}

/// Every live node record this node knows of, itself included.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Records, each fresh within the membership TTL.
    pub nodes: Vec<NodeRecord>,
}

/// Where a redirected Allocate is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alternate {
    /// ALTERNATE-SERVER.
    pub addr: SocketAddr,
    /// ALTERNATE-DOMAIN, for TLS: the name to check the certificate against.
    pub domain: Option<String>,
}

/// Why an Allocate is turned away with 300.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedirectReason {
    /// This node drains.
    Draining,
    /// This node holds `turn.capacity_allocations`.
    Capacity,
}

impl RedirectReason {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            RedirectReason::Draining => "draining",
            RedirectReason::Capacity => "capacity",
        }
    }
}

/// Pick the node an Allocate that this node turns away should try: a ready node other than
/// `me`, below its capacity, with a public address of the client's family (libwebrtc refuses
/// a change of family), least loaded first. `tls` needs a TLS port and names the domain.
pub fn alternate(
    snap: &Snapshot,
    me: &str,
    v6: bool,
    tls: bool,
    tls_domain: Option<&str>,
) -> Option<Alternate> {
    let n = snap
        .nodes
        .iter()
        .filter(|n| n.node != me && n.state == NodeState::Ready)
        .filter(|n| n.allocations < n.capacity)
        .filter(|n| if tls { n.tls_port != 0 } else { n.port != 0 })
        .filter(|n| n.addr_of(v6).is_some())
        .min_by(|a, b| a.load().total_cmp(&b.load()))?;
    let ip = n.addr_of(v6)?;
    let port = if tls { n.tls_port } else { n.port };
    let domain = tls.then(|| {
        tls_domain
            .map(str::to_string)
            .unwrap_or_else(|| n.host.trim_matches(['[', ']']).to_string())
    });
    Some(Alternate {
        addr: SocketAddr::new(ip, port),
        domain,
    })
}

/// The Allocate decision before anything is bound: `None` to go on here, else the reason to
/// answer 300 and where to. A draining node with no alternate answers with the static
/// `turn.alternate_server` or 508 (the caller's business); a full node with none goes on.
pub fn redirect(
    draining: bool,
    allocations: u64,
    capacity: u64,
    pick: impl FnOnce() -> Option<Alternate>,
) -> Option<(RedirectReason, Option<Alternate>)> {
    if draining {
        return Some((RedirectReason::Draining, pick()));
    }
    if capacity > 0 && allocations >= capacity {
        return pick().map(|a| (RedirectReason::Capacity, Some(a)));
    }
    None
}

/// Loads within this share of capacity of the least loaded node count as equal.
pub const LOAD_BAND: f64 = 0.02;

/// Placement at login. Load is `allocations` over capacity, plus the logins this node pointed
/// at a node after its record was built (`pending`: Unix ms of each), so a burst counts
/// before the records catch up. Records are up to a refresh old and other nodes place logins
/// too, so "the one least loaded" would herd every node onto the same stale minimum: the
/// ready nodes with room (all ready nodes when none has any) within [`LOAD_BAND`] of the
/// minimum are equals, and among them the one this
/// node pointed fewest logins at (`placed`) wins, then an order of this node's own (`salt`). That is round-robin
/// among equals on every node, and the sum over nodes stays even.
pub fn least_loaded<'a>(
    snap: &'a Snapshot,
    pending: &HashMap<String, Vec<u64>>,
    placed: &HashMap<String, u64>,
    salt: u64,
) -> Option<&'a NodeRecord> {
    let score = |n: &NodeRecord| {
        let newer = pending
            .get(&n.node)
            .map_or(0, |v| v.iter().filter(|t| **t >= n.at_ms).count() as u64);
        (n.allocations + newer) as f64 / n.capacity.max(1) as f64
    };
    // A node at its capacity is placed only when every ready node is.
    let has_room = snap
        .nodes
        .iter()
        .any(|n| n.state == NodeState::Ready && n.allocations < n.capacity);
    let ready = || {
        snap.nodes
            .iter()
            .filter(|n| n.state == NodeState::Ready)
            .filter(move |n| !has_room || n.allocations < n.capacity)
    };
    let min = ready().map(score).min_by(f64::total_cmp)?;
    let count = |n: &NodeRecord| placed.get(&n.node).copied().unwrap_or(0);
    ready()
        .filter(|n| score(n) <= min + LOAD_BAND)
        .min_by(|a, b| {
            count(a)
                .cmp(&count(b))
                .then(mix(salt, &a.node).cmp(&mix(salt, &b.node)))
                .then(a.node.cmp(&b.node))
        })
}

/// Who this node is in the cluster, for redirects.
#[derive(Debug, Clone, Default)]
pub struct ClusterId {
    /// This node's id.
    pub me: String,
    /// `public.turns_host`: the shared TLS name for ALTERNATE-DOMAIN.
    pub tls_domain: Option<String>,
}

/// Users whose placement is remembered at once; beyond it, expired ones go, then all.
const MAX_STICKY: usize = 200_000;

/// The nonce key of every node of a cluster: derived from the last (longest-lived, since
/// rotation prepends) `auth.turn_secrets` entry, so that the NONCE of a 300 answer is good at
/// the node it names and the client's next Allocate there needs no new challenge. `None`
/// outside cluster mode (a random key per process).
pub fn shared_nonce_key(config: &crate::config::Config) -> Option<[u8; 32]> {
    use sha2::Digest;
    if !config.cluster.enabled() {
        return None;
    }
    let secret = config.auth.turn_secrets.last()?;
    let mut h = sha2::Sha256::new();
    h.update(b"switchboard cluster nonce key v1\0");
    h.update(secret.expose().as_bytes());
    Some(h.finalize().into())
}

/// FNV-1a of `id` from `salt`: each node walks the ready nodes in its own order, so nodes
/// that all start counting at zero do not all pick the same first node.
fn mix(salt: u64, id: &str) -> u64 {
    id.bytes().fold(salt ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Now in Unix milliseconds, the clock of [`NodeRecord::at_ms`] and [`Live::place`].
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The live, shared part of the relay settings: what discovery and membership learn while
/// the server runs. Writers swap whole values; readers never block.
#[derive(Debug, Default)]
pub struct Live {
    /// Set once in cluster mode: this node's id and the shared TLS name.
    pub cluster: std::sync::OnceLock<ClusterId>,
    /// `turn.capacity_allocations` (or `turn.max_allocations`).
    pub capacity: u64,
    /// Discovered `(public, local)` pairs for `turn.relay_ip = "auto"`.
    pub discovered: ArcSwap<Vec<(IpAddr, Option<IpAddr>)>>,
    /// The cluster's node records.
    pub members: ArcSwap<Snapshot>,
    /// When this node pointed logins at each node recently (Unix ms, see [`least_loaded`]).
    pub pending: Mutex<HashMap<String, Vec<u64>>>,
    /// Logins this node pointed at each node, ever (round-robin among equals).
    pub placed: Mutex<HashMap<String, u64>>,
    /// The node each user's last login pointed at, until the login ends (Unix seconds):
    /// refreshes keep a session on its node unless that node drains or leaves.
    pub sticky: Mutex<HashMap<String, (String, u64)>>,
}

impl Live {
    /// Replace the membership snapshot; pending logins older than every record are dropped.
    pub fn set_members(&self, s: Snapshot) {
        let oldest = s.nodes.iter().map(|n| n.at_ms).min().unwrap_or(u64::MAX);
        self.members.store(std::sync::Arc::new(s));
        let mut p = match self.pending.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
        p.retain(|_, v| {
            v.retain(|t| *t >= oldest);
            !v.is_empty()
        });
    }

    /// The discovered public address of one family.
    pub fn discovered_public(&self, v6: bool) -> Option<IpAddr> {
        self.discovered
            .load()
            .iter()
            .map(|(p, _)| *p)
            .find(|p| p.is_ipv6() == v6)
    }

    /// Placement for one login at `now_ms` (Unix ms): the least loaded ready node, counted
    /// as pending until a record built after it arrives.
    pub fn place(&self, now_ms: u64) -> Option<NodeRecord> {
        let snap = self.members.load();
        let mut p = match self.pending.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
        let mut placed = match self.placed.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
        let salt = self.cluster.get().map_or(0, |c| mix(0, &c.me));
        let n = least_loaded(&snap, &p, &placed, salt)?.clone();
        p.entry(n.node.clone()).or_default().push(now_ms);
        *placed.entry(n.node.clone()).or_insert(0) += 1;
        Some(n)
    }

    /// Placement for a user: on refresh (`refresh`), the node its login was pointed at while
    /// that node is ready; else a new [`Live::place`], remembered until `until` (Unix s).
    pub fn place_for(
        &self,
        user: &str,
        refresh: bool,
        now_ms: u64,
        until: u64,
    ) -> Option<NodeRecord> {
        let mut st = match self.sticky.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
        let now_s = now_ms / 1000;
        if refresh {
            if let Some((node, _)) = st.get(user).filter(|(_, end)| *end > now_s) {
                if let Some(n) = self.node(node).filter(|n| n.state == NodeState::Ready) {
                    return Some(n);
                }
            }
        }
        let n = self.place(now_ms)?;
        if st.len() >= MAX_STICKY {
            st.retain(|_, (_, end)| *end > now_s);
            if st.len() >= MAX_STICKY {
                st.clear();
            }
        }
        st.insert(user.to_string(), (n.node.clone(), until));
        Some(n)
    }

    /// A node's record by id.
    pub fn node(&self, id: &str) -> Option<NodeRecord> {
        self.members
            .load()
            .nodes
            .iter()
            .find(|n| n.node == id)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, ip: &str, state: NodeState, allocs: u64, cap: u64) -> NodeRecord {
        NodeRecord {
            node: id.into(),
            state,
            host: ip.into(),
            uris: vec![],
            addrs: vec![ip.parse().unwrap()],
            port: 3478,
            tls_port: 5349,
            allocations: allocs,
            capacity: cap,
            packets_per_sec: 0.0,
            cpu: 0.0,
            at_ms: 1000,
        }
    }

    fn snap() -> Snapshot {
        Snapshot {
            nodes: vec![
                rec("a", "203.0.113.11", NodeState::Ready, 5, 10),
                rec("b", "203.0.113.12", NodeState::Ready, 9, 10),
                rec("c", "203.0.113.13", NodeState::Ready, 2, 10),
                rec("d", "2001:db8::4", NodeState::Ready, 0, 10),
                rec("e", "203.0.113.15", NodeState::Draining, 0, 10),
                rec("f", "203.0.113.16", NodeState::Ready, 10, 10),
            ],
        }
    }

    #[test]
    fn alternate_is_a_ready_node_with_room_of_the_same_family_least_loaded_first() {
        let s = snap();
        // c is the least loaded v4 node; e drains, f is full, d is v6, a is me.
        let a = alternate(&s, "a", false, false, None).unwrap();
        assert_eq!(a.addr, "203.0.113.13:3478".parse().unwrap());
        assert_eq!(a.domain, None);
        let a = alternate(&s, "c", false, false, None).unwrap();
        assert_eq!(a.addr, "203.0.113.11:3478".parse().unwrap());
        let a = alternate(&s, "a", true, false, None).unwrap();
        assert_eq!(a.addr, "[2001:db8::4]:3478".parse().unwrap());
        assert_eq!(
            alternate(&s, "d", true, false, None),
            None,
            "no other v6 node"
        );
    }

    #[test]
    fn tls_alternate_carries_the_domain_and_the_tls_port() {
        let s = snap();
        let a = alternate(&s, "a", false, true, Some("turn.example.com")).unwrap();
        assert_eq!(a.addr, "203.0.113.13:5349".parse().unwrap());
        assert_eq!(a.domain.as_deref(), Some("turn.example.com"));
        let mut s2 = s.clone();
        s2.nodes[2].host = "c.turn.example.com".into();
        let a = alternate(&s2, "a", false, true, None).unwrap();
        assert_eq!(a.domain.as_deref(), Some("c.turn.example.com"));
        s2.nodes.iter_mut().for_each(|n| n.tls_port = 0);
        assert_eq!(alternate(&s2, "a", false, true, None), None);
    }

    #[test]
    fn redirect_only_when_draining_or_full() {
        let s = snap();
        let pick = || alternate(&s, "a", false, false, None);
        assert_eq!(redirect(false, 5, 10, pick), None);
        assert_eq!(
            redirect(false, 50, 0, pick),
            None,
            "capacity 0: no soft cap"
        );
        let (r, a) = redirect(false, 10, 10, pick).unwrap();
        assert_eq!(r, RedirectReason::Capacity);
        assert_eq!(a.unwrap().addr.ip().to_string(), "203.0.113.13");
        let (r, _) = redirect(true, 0, 10, pick).unwrap();
        assert_eq!(r, RedirectReason::Draining);
        // Full with nowhere to go: stay (the hard cap answers 508 later); draining: no alt.
        let empty = Snapshot::default();
        assert_eq!(
            redirect(false, 10, 10, || alternate(&empty, "a", false, false, None)),
            None
        );
        assert_eq!(
            redirect(true, 0, 10, || alternate(&empty, "a", false, false, None)),
            Some((RedirectReason::Draining, None))
        );
    }

    #[test]
    fn placement_prefers_a_node_clearly_less_loaded_over_round_robin() {
        let s = Snapshot {
            nodes: vec![
                rec("a", "203.0.113.11", NodeState::Ready, 30, 100),
                rec("b", "203.0.113.12", NodeState::Ready, 10, 100),
                rec("c", "203.0.113.13", NodeState::Ready, 11, 100),
            ],
        };
        let live = Live::default();
        live.set_members(s);
        let mut count: HashMap<String, u32> = HashMap::new();
        for i in 0..20 {
            *count.entry(live.place(2000 + i).unwrap().node).or_default() += 1;
        }
        // b and c fill up to a's load first (10 + 11 + 20 = 41 = 2 × 20.5).
        assert_eq!(count.get("a"), None, "{count:?}");
        assert!(count["b"].abs_diff(count["c"]) <= 2, "{count:?}");
        // A full node is left out while another has room, whatever the pending guesses say.
        let s = Snapshot {
            nodes: vec![
                rec("a", "203.0.113.11", NodeState::Ready, 2, 2),
                rec("b", "203.0.113.12", NodeState::Ready, 1, 2),
            ],
        };
        let live = Live::default();
        live.set_members(s);
        for i in 0..5 {
            assert_eq!(live.place(2000 + i).unwrap().node, "b");
        }
    }

    #[test]
    fn refreshes_keep_a_user_on_its_node_until_it_drains() {
        let live = Live::default();
        live.set_members(snap());
        let first = live.place_for("ann", false, 5_000, 100).unwrap().node;
        for t in 0..5 {
            assert_eq!(
                live.place_for("ann", true, 6_000 + t, 100).unwrap().node,
                first
            );
            // Other logins move on meanwhile.
            live.place_for("bob", false, 6_000 + t, 100);
        }
        let mut s = snap();
        s.nodes
            .iter_mut()
            .filter(|n| n.node == first)
            .for_each(|n| n.state = NodeState::Draining);
        live.set_members(s);
        assert_ne!(live.place_for("ann", true, 7_000, 100).unwrap().node, first);
        // A login past its end is placed afresh.
        assert!(live.place_for("ann", true, 200_000, 300).is_some());
    }

    #[test]
    fn placement_spreads_a_burst_through_pending_counts() {
        let s = Snapshot {
            nodes: vec![
                rec("a", "203.0.113.11", NodeState::Ready, 0, 100),
                rec("b", "203.0.113.12", NodeState::Ready, 0, 100),
                rec("c", "203.0.113.13", NodeState::Ready, 0, 100),
                rec("d", "203.0.113.14", NodeState::Draining, 0, 100),
            ],
        };
        let live = Live::default();
        live.set_members(s);
        let mut count: HashMap<String, u32> = HashMap::new();
        for i in 0..300 {
            *count.entry(live.place(2000 + i).unwrap().node).or_default() += 1;
        }
        assert_eq!(count.get("d"), None, "a draining node is never placed");
        for n in ["a", "b", "c"] {
            assert_eq!(count[n], 100, "{count:?}");
        }
        // Records built after the logins replace their pending counts.
        let mut s = (**live.members.load()).clone();
        s.nodes.iter_mut().for_each(|n| n.at_ms = 3000);
        s.nodes[0].allocations = 50;
        live.set_members(s);
        assert!(live.pending.lock().unwrap().is_empty());
        assert_ne!(live.place(3001).unwrap().node, "a");
        // Logins placed after a node's record count against it; older ones do not.
        let mut b = rec("b", "203.0.113.12", NodeState::Ready, 0, 100);
        b.at_ms = 2500;
        let mut c = rec("c", "203.0.113.13", NodeState::Ready, 1, 100);
        c.at_ms = 3000;
        let snap = Snapshot { nodes: vec![b, c] };
        let logins = vec![2600, 2700, 2800, 2900, 2950];
        let pending: HashMap<String, Vec<u64>> =
            [("b".into(), logins.clone()), ("c".into(), logins)].into();
        // Without the pending logins b would win (less loaded, and pointed at less often).
        let placed: HashMap<String, u64> = [("c".into(), 1)].into();
        for salt in [0, 1, 2, 3] {
            assert_eq!(
                least_loaded(&snap, &pending, &placed, salt).unwrap().node,
                "c"
            );
            assert_eq!(
                least_loaded(&snap, &HashMap::new(), &placed, salt)
                    .unwrap()
                    .node,
                "b"
            );
        }
    }
}
