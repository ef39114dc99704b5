//! The `Bus` routes the room core's output to connections, and each connection's `Outbox`
//! queues it, bounded in frames and bytes. In-process by default; a cluster implementation can
//! carry the same actions to connections on other nodes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

use super::room::{Action, Budget, ConnId, Frame};

/// What a connection task is told to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    /// Send this frame.
    Frame(Frame),
    /// Close the connection: its seat is gone (replaced, kicked, room closed).
    Close(super::room::CloseReason),
    /// Close the connection so that its client resumes: the room moved to another node.
    Moved,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Outbound>,
    bytes: usize,
    /// Set when a push did not fit: the task sends what is queued, then closes.
    overflowed: bool,
}

/// A connection's queue of outgoing frames, bounded in frames, in bytes, and by a node-wide
/// byte budget. Frames hold the shared serialized events, not copies.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    ready: Notify,
    max_frames: usize,
    max_bytes: usize,
    total: Arc<Budget>,
}

/// Why a frame did not enter an outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The connection's own frame or byte bound.
    Full,
    /// The node-wide outbox byte budget.
    Total,
    /// The outbox already overflowed and is closing.
    Closing,
}

impl Outbox {
    /// An empty outbox; `total` is shared by every outbox of the node.
    pub fn new(max_frames: usize, max_bytes: usize, total: Arc<Budget>) -> Outbox {
        Outbox {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            max_frames: max_frames.max(1),
            max_bytes,
            total,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        match self.queue.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Queue an item. A frame that does not fit marks the outbox overflowed: the connection
    /// sends what is queued and closes, so its client resumes and gets the rest replayed in
    /// order rather than silently missing frames.
    pub fn push(&self, item: Outbound) -> Result<(), Refused> {
        let n = match &item {
            Outbound::Frame(f) => f.len(),
            Outbound::Close(_) | Outbound::Moved => 0,
        };
        let mut q = self.lock();
        if q.overflowed {
            return Err(Refused::Closing);
        }
        if q.items.len() >= self.max_frames || q.bytes + n > self.max_bytes {
            q.overflowed = true;
            drop(q);
            self.ready.notify_one();
            return Err(Refused::Full);
        }
        if !self.total.try_take(n) {
            q.overflowed = true;
            drop(q);
            self.ready.notify_one();
            return Err(Refused::Total);
        }
        q.bytes += n;
        q.items.push_back(item);
        drop(q);
        self.ready.notify_one();
        Ok(())
    }

    /// The next item without waiting; `Err(Ended)` once overflowed and drained.
    pub fn try_pop(&self) -> Result<Option<Outbound>, Ended> {
        let mut q = self.lock();
        match q.items.pop_front() {
            Some(item) => {
                if let Outbound::Frame(f) = &item {
                    let n = f.len();
                    q.bytes -= n;
                    self.total.give(n);
                }
                if q.items.is_empty() {
                    // An idle connection holds no queue memory.
                    q.items = VecDeque::new();
                }
                Ok(Some(item))
            }
            None if q.overflowed => Err(Ended),
            None => Ok(None),
        }
    }

    /// Wait for the next item; `None` once overflowed and drained.
    pub async fn recv(&self) -> Option<Outbound> {
        loop {
            match self.try_pop() {
                Ok(Some(item)) => return Some(item),
                Err(Ended) => return None,
                Ok(None) => self.ready.notified().await,
            }
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let q = self.lock();
        self.total.give(q.bytes);
    }
}

/// The outbox overflowed and everything queued before that has been taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended;

/// What one `deliver` call refused.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Frames refused by a connection's own bound.
    pub full: usize,
    /// Frames refused by the node-wide budget.
    pub total: usize,
    /// Frames for a connection that is closing after an overflow (they wait in its resume
    /// buffer).
    pub closing: usize,
}

/// Delivers core actions to the connections they name, wherever those live.
///
/// The signaling service calls `deliver` while it holds the serialization of the room that
/// produced the actions, so an implementation only has to keep the order of the actions it is
/// given for each connection: then every recipient's frames arrive in `seq` order. A cluster
/// bus would publish them, in that order, to the node that holds the connection.
pub trait Bus: Send + Sync + 'static {
    /// Register a local connection's outbox.
    fn attach(&self, conn: ConnId, outbox: Arc<Outbox>);
    /// Forget a connection.
    fn detach(&self, conn: ConnId);
    /// Deliver actions in order and say what was refused.
    fn deliver(&self, actions: Vec<Action>) -> Delivery;
}

const BUS_SHARDS: usize = 64;

/// The single-node bus: connection → outbox maps, sharded by connection id so that rooms on
/// different hub shards do not contend on one lock.
#[derive(Debug)]
pub struct LocalBus {
    conns: Vec<Mutex<HashMap<ConnId, Arc<Outbox>>>>,
}

impl Default for LocalBus {
    fn default() -> Self {
        LocalBus {
            conns: (0..BUS_SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl LocalBus {
    fn map(&self, conn: ConnId) -> MutexGuard<'_, HashMap<ConnId, Arc<Outbox>>> {
        let m = &self.conns[(conn % BUS_SHARDS as u64) as usize];
        match m.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The outbox of a connection of this node.
    pub fn outbox(&self, conn: ConnId) -> Option<Arc<Outbox>> {
        self.map(conn).get(&conn).cloned()
    }
}

impl Bus for LocalBus {
    fn attach(&self, conn: ConnId, outbox: Arc<Outbox>) {
        self.map(conn).insert(conn, outbox);
    }

    fn detach(&self, conn: ConnId) {
        self.map(conn).remove(&conn);
    }

    fn deliver(&self, actions: Vec<Action>) -> Delivery {
        let mut d = Delivery::default();
        // Consecutive actions for one connection (a resume replay) share one lookup.
        let mut last: Option<(ConnId, Option<Arc<Outbox>>)> = None;
        for a in actions {
            let (conn, item) = match a {
                Action::Send(c, f) => (c, Outbound::Frame(f)),
                Action::Close(c, why) => (c, Outbound::Close(why)),
            };
            let ob = match &last {
                Some((c, ob)) if *c == conn => ob.clone(),
                _ => {
                    let ob = self.outbox(conn);
                    last = Some((conn, ob.clone()));
                    ob
                }
            };
            // A connection that is already gone has its frames in its resume buffer.
            let Some(ob) = ob else { continue };
            match ob.push(item) {
                Ok(()) => {}
                Err(Refused::Full) => d.full += 1,
                Err(Refused::Total) => d.total += 1,
                Err(Refused::Closing) => d.closing += 1,
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signaling::room::Frame;

    fn text(n: usize) -> Outbound {
        Outbound::Frame(Frame::Text {
            kind: "signal",
            text: "x".repeat(n).into(),
        })
    }

    #[test]
    fn outbox_bounds_frames_bytes_and_total_then_drains_and_ends() {
        let total = Arc::new(Budget::new(250));
        let a = Outbox::new(3, 200, total.clone());
        a.push(text(100)).unwrap();
        a.push(text(100)).unwrap();
        assert_eq!(a.push(text(1)), Err(Refused::Full), "byte bound");
        assert_eq!(a.push(text(1)), Err(Refused::Closing));
        let b = Outbox::new(3, 200, total.clone());
        assert_eq!(b.push(text(100)), Err(Refused::Total), "node-wide bound");
        assert!(matches!(a.try_pop(), Ok(Some(_))));
        assert!(matches!(a.try_pop(), Ok(Some(_))));
        assert_eq!(a.try_pop(), Err(Ended), "overflowed and drained");
        assert_eq!(total.used(), 0);
        let c = Outbox::new(2, 1000, total.clone());
        c.push(text(10)).unwrap();
        c.push(text(10)).unwrap();
        assert_eq!(c.push(text(10)), Err(Refused::Full), "frame bound");
        drop(c);
        assert_eq!(total.used(), 0, "a dropped outbox returns its bytes");
    }
}
