//! The cluster `Bus`: frames for connections on this node go to their outboxes as in the
//! single-node mode; frames for connections on other nodes (seated here through a proxy id)
//! are rendered and queued, in order, for the publisher, which sends them to that node.

use prometheus::IntCounter;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::mpsc;

use super::wire::Wire;
use crate::peerjs::router::RemoteMsg;
use crate::signaling::bus::{Bus, Delivery, LocalBus, Outbox};
use crate::signaling::room::{Action, ConnId, RoomState};

/// What one queued item costs besides its strings (JSON field names, the queue's own node).
const OVERHEAD: usize = 64;

/// Bytes an item holds in the publisher queue, about what it takes in the envelope. The queue
/// is bounded by this, not by a count: a count lets a few large frames (signals carry SDP of
/// up to the signaling frame cap) take far more memory than the bound suggests.
pub fn weight(out: &Out) -> usize {
    OVERHEAD
        + match out {
            Out::Publish(node, w) => node.len() + wire_weight(w),
            Out::Mirror(room, _, state) => {
                room.len()
                    + state
                        .as_ref()
                        .map_or(0, |s| s.creator.len() + s.peers.len() * 4 * OVERHEAD)
            }
            Out::Release(room, _, _) => room.len(),
        }
}

fn wire_weight(w: &Wire) -> usize {
    let who = |w: &super::wire::Who| w.user.len() + w.limit.as_ref().map_or(0, String::len);
    match w {
        Wire::Join { who: p, room, .. } => who(p) + room.len(),
        Wire::Resume {
            who: p, token, id, ..
        } => who(p) + token.len() + id.as_ref().map_or(0, String::len),
        Wire::Signal { to, data, id, .. } => {
            to.as_ref().map_or(0, String::len) + data.len() + id.as_ref().map_or(0, String::len)
        }
        Wire::Frame { kind, text, .. } => kind.len() + text.len(),
        Wire::Peerjs(m) => match m {
            RemoteMsg::Relay { src, dst, text, .. } | RemoteMsg::Miss { src, dst, text, .. } => {
                src.len() + dst.len() + text.len()
            }
            RemoteMsg::Here { id } | RemoteMsg::Kick { id } => id.len(),
        },
        Wire::Answer { ok, err, .. } => {
            ok.as_ref().map_or(0, |v| v.to_string().len())
                + err.as_ref().map_or(0, |(c, m)| c.len() + m.len())
        }
        _ => 0,
    }
}

/// Work for the publisher task, in order.
#[derive(Debug)]
pub enum Out {
    /// Send a message to a node.
    Publish(Arc<str>, Wire),
    /// Write (or delete) a room's mirror, fenced by its epoch.
    Mirror(String, u64, Option<RoomState>),
    /// Give a room's lease up (after what was queued before); `true` also deletes its mirror.
    Release(String, u64, bool),
}

/// A connection of another node seated in a room owned here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    /// The edge node.
    pub node: Arc<str>,
    /// The connection id on that node.
    pub conn: ConnId,
    /// The room it sits in.
    pub room: String,
    /// This node's lease epoch for the room when the seat was made; every message to the edge
    /// carries it, so the edge can drop those of an owner that was superseded.
    pub epoch: u64,
}

#[derive(Debug, Default)]
struct Proxies {
    by_id: HashMap<ConnId, Proxy>,
    by_edge: HashMap<(Arc<str>, ConnId), ConnId>,
}

/// The shared half of the cluster bus: the publisher queue and the proxy table.
#[derive(Debug)]
pub struct Remote {
    tx: mpsc::UnboundedSender<Out>,
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
    proxies: Mutex<Proxies>,
    /// Counts items dropped because the queue was full (`cluster_queue_full`).
    full: IntCounter,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The receiving end of the publisher queue.
#[derive(Debug)]
pub struct Queue {
    /// Queued work.
    pub rx: mpsc::UnboundedReceiver<Out>,
    /// Bytes (`weight`) queued and not yet taken (shared with `Remote`).
    pub queued: Arc<AtomicUsize>,
}

impl Queue {
    /// The publisher took these items: their bytes leave the bound.
    pub fn taken(&self, items: &[Out]) {
        let n: usize = items.iter().map(weight).sum();
        self.queued.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Remote {
    /// A proxy table and the publisher queue, holding up to `max_bytes` (by `weight`); what
    /// does not fit is dropped and counted on `full` (Redis is too slow or away; the frames
    /// stay in resume buffers and their clients resume).
    pub fn new(max_bytes: usize, full: IntCounter) -> (Arc<Remote>, Queue) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        (
            Arc::new(Remote {
                tx,
                queued: queued.clone(),
                max_bytes,
                proxies: Mutex::default(),
                full,
            }),
            Queue { rx, queued },
        )
    }

    /// Queue work for the publisher; `false` when dropped.
    pub fn send(&self, out: Out) -> bool {
        let w = weight(&out);
        let before = self.queued.fetch_add(w, Ordering::Relaxed);
        if before + w > self.max_bytes {
            self.queued.fetch_sub(w, Ordering::Relaxed);
            self.full.inc();
            return false;
        }
        if self.tx.send(out).is_err() {
            self.queued.fetch_sub(w, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Queue a message for `node`.
    pub fn publish(&self, node: &Arc<str>, w: Wire) -> bool {
        self.send(Out::Publish(node.clone(), w))
    }

    /// The proxy id of an edge connection, if it is seated here.
    pub fn proxy_of(&self, node: &Arc<str>, conn: ConnId) -> Option<ConnId> {
        lock(&self.proxies)
            .by_edge
            .get(&(node.clone(), conn))
            .copied()
    }

    /// The edge connection behind a proxy id.
    pub fn proxy(&self, id: ConnId) -> Option<Proxy> {
        lock(&self.proxies).by_id.get(&id).cloned()
    }

    /// Record a proxy.
    pub fn add_proxy(&self, id: ConnId, p: Proxy) {
        let mut t = lock(&self.proxies);
        t.by_edge.insert((p.node.clone(), p.conn), id);
        t.by_id.insert(id, p);
    }

    /// Forget a proxy.
    pub fn remove_proxy(&self, id: ConnId) -> Option<Proxy> {
        let mut t = lock(&self.proxies);
        let p = t.by_id.remove(&id)?;
        t.by_edge.remove(&(p.node.clone(), p.conn));
        Some(p)
    }

    /// Every proxy (to drop them all when Redis is lost).
    pub fn take_proxies(&self) -> Vec<(ConnId, Proxy)> {
        let mut t = lock(&self.proxies);
        t.by_edge.clear();
        t.by_id.drain().collect()
    }
}

/// The bus of a node in cluster mode.
#[derive(Debug)]
pub struct ClusterBus {
    /// This node's connections.
    pub local: Arc<LocalBus>,
    /// Connections of other nodes.
    pub remote: Arc<Remote>,
}

impl Bus for ClusterBus {
    fn attach(&self, conn: ConnId, outbox: Arc<Outbox>) {
        self.local.attach(conn, outbox);
    }

    fn detach(&self, conn: ConnId) {
        self.local.detach(conn);
    }

    fn deliver(&self, actions: Vec<Action>) -> Delivery {
        // Order is kept per recipient: local and remote recipients are disjoint.
        let mut local = Vec::with_capacity(actions.len());
        {
            let t = lock(&self.remote.proxies);
            if t.by_id.is_empty() {
                drop(t);
                return self.local.deliver(actions);
            }
            let mut closed = Vec::new();
            for a in actions {
                let c = match &a {
                    Action::Send(c, _) | Action::Close(c, _) => *c,
                };
                let Some(p) = t.by_id.get(&c) else {
                    local.push(a);
                    continue;
                };
                let w = match a {
                    Action::Send(_, f) => Wire::Frame {
                        conn: p.conn,
                        epoch: p.epoch,
                        kind: f.kind().to_string(),
                        text: f.render(),
                    },
                    Action::Close(_, why) => {
                        closed.push(c);
                        Wire::Close {
                            conn: p.conn,
                            code: Some(why.code()),
                            epoch: p.epoch,
                        }
                    }
                };
                self.remote.publish(&p.node, w);
            }
            drop(t);
            for c in closed {
                self.remote.remove_proxy(c);
            }
        }
        self.local.deliver(local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(text: &str) -> Wire {
        Wire::Frame {
            conn: 1,
            epoch: 1,
            kind: "signal".into(),
            text: text.into(),
        }
    }

    #[test]
    fn the_publisher_queue_is_bounded_by_bytes() {
        let full = IntCounter::new("full", "queue full").unwrap();
        let (r, mut q) = Remote::new(1 << 20, full.clone());
        let node: Arc<str> = "n2".into();
        // 64 KiB frames: about 16 fit in 1 MiB, whatever the count bound would allow.
        let big = "x".repeat(64 * 1024);
        let sent = (0..100).filter(|_| r.publish(&node, frame(&big))).count();
        assert_eq!(
            sent, 15,
            "1 MiB holds 15 frames of 64 KiB and their overhead"
        );
        assert_eq!(full.get(), 100 - sent as u64, "each drop is counted");
        assert!(q.queued.load(Ordering::Relaxed) <= 1 << 20);
        // Small messages still fit in what is left, then the queue is full for them too.
        let small = (0..100_000)
            .filter(|_| r.publish(&node, frame("hi")))
            .count();
        assert!(small > 0 && small < 100_000, "{small} small frames fit");
        // Once the publisher took everything, the bound is free again.
        let mut got = Vec::new();
        while let Ok(x) = q.rx.try_recv() {
            got.push(x);
        }
        assert_eq!(got.len(), sent + small);
        q.taken(&got);
        assert_eq!(q.queued.load(Ordering::Relaxed), 0);
        assert!(r.publish(&node, frame(&big)));
    }
}
