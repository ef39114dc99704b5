//! The sans-IO PeerJS core: which id is held by which connection (and token or user), the
//! messages held for ids that are not connected, their deadlines, and the one `EXPIRE` per
//! sender and target that answers them. It never touches a socket or the clock: callers pass
//! `now` and carry out the returned deliveries.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// A connection handle the shell assigns; the core only compares them.
pub type ConnKey = u64;

/// The bounds of the core, from `[peerjs]`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Ids registered at once (the reference server's `concurrent_limit`).
    pub max_peers: usize,
    /// How long a message for an id that is not connected is held before `EXPIRE`.
    pub expire_after: Duration,
    /// Messages held for one id.
    pub max_held_per_peer: usize,
    /// Bytes held for all ids together.
    pub max_held_bytes: usize,
    /// How long a dropped session user keeps its id reserved (session auth only).
    pub resume_window: Duration,
}

/// A frame for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deliver {
    /// The connection to write to.
    pub conn: ConnKey,
    /// The JSON text of the frame.
    pub text: String,
}

/// The answer to a new connection asking for an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    /// The id is now this connection's; send `OPEN`, then the deliveries that were held.
    Open(Vec<Deliver>),
    /// The holder came back (same token, or same session user) and took the id over from
    /// `old`, which must be closed; send `OPEN`, then the held deliveries.
    TakenBack {
        /// The replaced connection, if it was still registered.
        old: Option<ConnKey>,
        /// Messages that were held for the id.
        held: Vec<Deliver>,
    },
    /// Someone else holds the id: answer `ID-TAKEN` and close.
    IdTaken,
    /// `max_peers` ids are registered.
    Full,
}

/// What became of a relayed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relayed {
    /// Written to the target's connection.
    Deliver(Deliver),
    /// Held until the target connects or the deadline passes.
    Held,
    /// Not held (a `LEAVE`/`EXPIRE` to an absent id, as the reference server does).
    Dropped,
    /// The hold bounds are reached: the sender gets this `EXPIRE` at once.
    Refused(Deliver),
    /// The target is connected on that node (cluster mode): send it there, in order.
    Remote {
        /// The node holding the target.
        node: String,
        /// The frame text.
        text: String,
    },
}

/// A message that was held for an id, handed over when the id connected on another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handed {
    /// The sending id.
    pub src: String,
    /// The frame text.
    pub text: String,
}

/// An id that stopped being held, for `peer.left` webhooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freed {
    /// The PeerJS id.
    pub id: String,
    /// Its session user (`None` under open auth).
    pub user: Option<String>,
    /// `left`, `timeout` (a reservation ran out), `kicked` or `revoked`.
    pub reason: &'static str,
}

#[derive(Debug)]
struct Client {
    /// `None` while a session user's dropped id is reserved for its resume window.
    conn: Option<ConnKey>,
    token: String,
    user: Option<String>,
    /// When a reserved id is freed.
    reserved_until: Option<Instant>,
}

#[derive(Debug)]
struct Held {
    src: String,
    text: String,
}

#[derive(Debug)]
struct Queue {
    msgs: VecDeque<Held>,
    deadline: Instant,
}

/// Deadlines of the core, in one ordered set: the earliest is the next timeout.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// A queue of held messages expires.
    Queue(String),
    /// A reserved id is freed.
    Reserve(String),
}

/// The PeerJS realm: ids, tokens, held messages.
#[derive(Debug)]
pub struct Core {
    limits: Limits,
    clients: HashMap<String, Client>,
    queues: HashMap<String, Queue>,
    timers: BTreeSet<(Instant, Timer)>,
    held_bytes: usize,
    freed: Vec<Freed>,
    /// Ids connected on other nodes, as last located (cluster mode): a cache, corrected when a
    /// node answers that the id is not there any more.
    remotes: HashMap<String, String>,
}

/// `{"type":"EXPIRE","src":<target>,"dst":<sender>}`: the target did not connect in time.
pub fn expire_text(target: &str, sender: &str) -> String {
    serde_json::json!({"type": "EXPIRE", "src": target, "dst": sender}).to_string()
}

impl Core {
    /// An empty realm.
    pub fn new(limits: Limits) -> Core {
        Core {
            limits,
            clients: HashMap::new(),
            queues: HashMap::new(),
            timers: BTreeSet::new(),
            held_bytes: 0,
            freed: Vec::new(),
            remotes: HashMap::new(),
        }
    }

    /// Whether the shell must locate `dst` in the cluster before relaying to it: it is not
    /// connected here, nothing is held for it, and no node is known to hold it.
    pub fn needs_lookup(&self, dst: &str) -> bool {
        self.conn_of(dst).is_none()
            && !self.queues.contains_key(dst)
            && !self.remotes.contains_key(dst)
    }

    /// `id` is connected on `node`. The cache is bounded: past its bound it starts over.
    pub fn set_remote(&mut self, id: &str, node: &str) {
        if self.remotes.len() >= self.limits.max_peers.max(1024) * 2 {
            self.remotes.clear();
        }
        self.remotes.insert(id.to_string(), node.to_string());
    }

    /// `id` is not where it was located any more.
    pub fn forget_remote(&mut self, id: &str) {
        self.remotes.remove(id);
    }

    /// `id` connected on `node`: what was held for it goes there, in order, and so does what
    /// follows.
    pub fn arrived_remote(&mut self, id: &str, node: &str) -> Vec<Handed> {
        if self.clients.contains_key(id) {
            return Vec::new();
        }
        self.set_remote(id, node);
        self.unhold(id)
            .into_iter()
            .map(|h| Handed {
                src: h.src,
                text: h.text,
            })
            .collect()
    }

    /// Every registered id (connected or reserved) with its token and session user, for the
    /// cluster-wide claims that the shell refreshes.
    pub fn claims(&self) -> Vec<(String, String, Option<String>)> {
        self.clients
            .iter()
            .map(|(id, c)| (id.clone(), c.token.clone(), c.user.clone()))
            .collect()
    }

    /// Ids with a live connection (for discovery).
    pub fn ids(&self) -> Vec<String> {
        self.clients
            .iter()
            .filter(|(_, c)| c.conn.is_some())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The connection holding `id`, if one is connected.
    pub fn conn_of(&self, id: &str) -> Option<ConnKey> {
        self.clients.get(id).and_then(|c| c.conn)
    }

    /// Whether `id` is registered here, connected or reserved.
    pub fn is_registered(&self, id: &str) -> bool {
        self.clients.contains_key(id)
    }

    /// Connections of `user` (for revocation).
    pub fn conns_of_user(&self, user: &str) -> Vec<ConnKey> {
        self.clients
            .values()
            .filter(|c| c.user.as_deref() == Some(user))
            .filter_map(|c| c.conn)
            .collect()
    }

    /// The ids freed since the last call.
    pub fn drain_freed(&mut self) -> Vec<Freed> {
        std::mem::take(&mut self.freed)
    }

    /// Bytes of held messages (for tests and metrics).
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// `conn` asks for `id` with `token`; `user` is its session user under session auth.
    /// The rules of the reference server: a free id is given; the holder's token takes it
    /// back even while the old socket is registered; any other token gets `ID-TAKEN`. Under
    /// session auth the user decides instead of the token, and a dropped user's id stays
    /// reserved for it during the resume window.
    pub fn register(
        &mut self,
        id: &str,
        token: &str,
        user: Option<&str>,
        conn: ConnKey,
    ) -> Registered {
        if let Some(c) = self.clients.get_mut(id) {
            let same = match (&c.user, user) {
                (Some(held), Some(u)) => held == u,
                (None, None) => c.token == token,
                _ => false,
            };
            if !same {
                return Registered::IdTaken;
            }
            let old = c.conn.replace(conn);
            c.token = token.to_string();
            if let Some(until) = c.reserved_until.take() {
                self.timers.remove(&(until, Timer::Reserve(id.to_string())));
            }
            let held = self.take_held(id, conn);
            return Registered::TakenBack { old, held };
        }
        if self.clients.len() >= self.limits.max_peers {
            return Registered::Full;
        }
        self.remotes.remove(id);
        self.clients.insert(
            id.to_string(),
            Client {
                conn: Some(conn),
                token: token.to_string(),
                user: user.map(str::to_string),
                reserved_until: None,
            },
        );
        Registered::Open(self.take_held(id, conn))
    }

    fn take_held(&mut self, id: &str, conn: ConnKey) -> Vec<Deliver> {
        self.unhold(id)
            .into_iter()
            .map(|h| Deliver { conn, text: h.text })
            .collect()
    }

    /// Everything held for `id`, in order, with its expiry timer and its bytes given back.
    fn unhold(&mut self, id: &str) -> Vec<Held> {
        let Some(q) = self.queues.remove(id) else {
            return Vec::new();
        };
        self.timers
            .remove(&(q.deadline, Timer::Queue(id.to_string())));
        let msgs: Vec<Held> = q.msgs.into_iter().collect();
        self.held_bytes -= msgs.iter().map(|h| h.text.len()).sum::<usize>();
        msgs
    }

    /// `conn`, holding `id`, is gone. Only the current holder frees the id (a socket that was
    /// taken over frees nothing). A session user's id stays reserved for the resume window.
    /// Returns whether `conn` held the id.
    pub fn unregister(&mut self, now: Instant, id: &str, conn: ConnKey) -> bool {
        let Some(c) = self.clients.get_mut(id) else {
            return false;
        };
        if c.conn != Some(conn) {
            return false;
        }
        if c.user.is_some() && !self.limits.resume_window.is_zero() {
            c.conn = None;
            let until = now + self.limits.resume_window;
            c.reserved_until = Some(until);
            self.timers.insert((until, Timer::Reserve(id.to_string())));
        } else if let Some(c) = self.clients.remove(id) {
            self.freed.push(Freed {
                id: id.to_string(),
                user: c.user,
                reason: "left",
            });
        }
        true
    }

    /// Free `id` at once, whatever its state, for `reason` (`kicked`, `revoked`, `left`).
    pub fn remove(&mut self, id: &str, reason: &'static str) -> Option<ConnKey> {
        let c = self.clients.remove(id)?;
        if let Some(until) = c.reserved_until {
            self.timers.remove(&(until, Timer::Reserve(id.to_string())));
        }
        self.freed.push(Freed {
            id: id.to_string(),
            user: c.user,
            reason,
        });
        c.conn
    }

    /// Relay `text` (already stamped with `src`) of type `ty` from `src` to `dst`.
    pub fn relay(&mut self, now: Instant, src: &str, ty: &str, dst: &str, text: String) -> Relayed {
        if let Some(conn) = self.conn_of(dst) {
            return Relayed::Deliver(Deliver { conn, text });
        }
        // Behind held messages, a message waits its turn even when the target's node is known.
        if !self.queues.contains_key(dst) {
            if let Some(node) = self.remotes.get(dst) {
                return Relayed::Remote {
                    node: node.clone(),
                    text,
                };
            }
        }
        if ty == "LEAVE" || ty == "EXPIRE" {
            return Relayed::Dropped;
        }
        let refuse = |core: &Core| {
            let conn = core.conn_of(src);
            conn.map_or(Relayed::Dropped, |conn| {
                Relayed::Refused(Deliver {
                    conn,
                    text: expire_text(dst, src),
                })
            })
        };
        let held = self.queues.get(dst).map_or(0, |q| q.msgs.len());
        if held >= self.limits.max_held_per_peer
            || self.held_bytes + text.len() > self.limits.max_held_bytes
        {
            return refuse(self);
        }
        let q = self.queues.entry(dst.to_string()).or_insert_with(|| {
            let deadline = now + self.limits.expire_after;
            self.timers
                .insert((deadline, Timer::Queue(dst.to_string())));
            Queue {
                msgs: VecDeque::new(),
                deadline,
            }
        });
        self.held_bytes += text.len();
        q.msgs.push_back(Held {
            src: src.to_string(),
            text,
        });
        Relayed::Held
    }

    /// The earliest deadline, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|(at, _)| *at)
    }

    /// Everything due at `now`: expired queues answer each sender with one `EXPIRE` per
    /// target; expired reservations free their ids. Calling it early is harmless.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Deliver> {
        let mut out = Vec::new();
        while let Some(&(at, _)) = self.timers.first() {
            if at > now {
                break;
            }
            let Some((_, timer)) = self.timers.pop_first() else {
                break;
            };
            match timer {
                Timer::Queue(dst) => {
                    let Some(q) = self.queues.remove(&dst) else {
                        continue;
                    };
                    let mut seen = HashSet::new();
                    for h in q.msgs {
                        self.held_bytes -= h.text.len();
                        if seen.insert(h.src.clone()) {
                            if let Some(conn) = self.conn_of(&h.src) {
                                out.push(Deliver {
                                    conn,
                                    text: expire_text(&dst, &h.src),
                                });
                            }
                        }
                    }
                }
                Timer::Reserve(id) => {
                    if self
                        .clients
                        .get(&id)
                        .is_some_and(|c| c.conn.is_none() && c.reserved_until == Some(at))
                    {
                        if let Some(c) = self.clients.remove(&id) {
                            self.freed.push(Freed {
                                id,
                                user: c.user,
                                reason: "timeout",
                            });
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_peers: 3,
            expire_after: Duration::from_secs(5),
            max_held_per_peer: 2,
            max_held_bytes: 1000,
            resume_window: Duration::from_secs(30),
        }
    }

    fn open(r: Registered) -> Vec<Deliver> {
        match r {
            Registered::Open(h) => h,
            other => panic!("expected Open, got {other:?}"),
        }
    }

    #[test]
    fn a_free_id_opens_and_another_token_gets_id_taken() {
        let mut c = Core::new(limits());
        assert!(open(c.register("a", "tok1", None, 1)).is_empty());
        assert_eq!(c.register("a", "tok2", None, 2), Registered::IdTaken);
        assert_eq!(c.conn_of("a"), Some(1));
    }

    #[test]
    fn the_holders_token_takes_the_id_back_while_the_old_socket_is_registered() {
        let t = Instant::now();
        let mut c = Core::new(limits());
        open(c.register("a", "tok", None, 1));
        assert_eq!(
            c.register("a", "tok", None, 2),
            Registered::TakenBack {
                old: Some(1),
                held: vec![]
            }
        );
        // The replaced socket closing later frees nothing.
        assert!(!c.unregister(t, "a", 1));
        assert_eq!(c.conn_of("a"), Some(2));
        // The holder closing frees the id in open mode.
        assert!(c.unregister(t, "a", 2));
        assert_eq!(c.conn_of("a"), None);
        assert!(open(c.register("a", "other", None, 3)).is_empty());
    }

    #[test]
    fn session_ids_bind_to_the_user_and_stay_reserved_for_the_resume_window() {
        let t = Instant::now();
        let mut c = Core::new(limits());
        open(c.register("a", "s1", Some("ann"), 1));
        // Another user, even with the same token text, cannot take it.
        assert_eq!(c.register("a", "s1", Some("bob"), 2), Registered::IdTaken);
        // An open-mode connection cannot either.
        assert_eq!(c.register("a", "s1", None, 2), Registered::IdTaken);
        // Ann with a fresh session token takes it back.
        assert!(matches!(
            c.register("a", "s2", Some("ann"), 3),
            Registered::TakenBack { old: Some(1), .. }
        ));
        // Dropped: reserved for Ann only.
        assert!(c.unregister(t, "a", 3));
        assert_eq!(c.register("a", "x", Some("bob"), 4), Registered::IdTaken);
        assert_eq!(c.poll_timeout(), Some(t + Duration::from_secs(30)));
        assert!(matches!(
            c.register("a", "s3", Some("ann"), 5),
            Registered::TakenBack { old: None, .. }
        ));
        // Dropped again: once the window passes, the id is free for anyone.
        assert!(c.unregister(t, "a", 5));
        c.handle_timeout(t + Duration::from_secs(29));
        assert_eq!(c.register("a", "x", Some("bob"), 6), Registered::IdTaken);
        assert!(c.drain_freed().is_empty());
        c.handle_timeout(t + Duration::from_secs(30));
        assert_eq!(
            c.drain_freed(),
            vec![Freed {
                id: "a".into(),
                user: Some("ann".into()),
                reason: "timeout"
            }]
        );
        assert!(open(c.register("a", "x", Some("bob"), 7)).is_empty());
    }

    #[test]
    fn held_messages_reach_the_target_when_it_connects() {
        let t = Instant::now();
        let mut c = Core::new(limits());
        open(c.register("a", "tok", None, 1));
        assert_eq!(c.relay(t, "a", "OFFER", "b", "m1".into()), Relayed::Held);
        assert_eq!(
            c.relay(t, "a", "CANDIDATE", "b", "m2".into()),
            Relayed::Held
        );
        assert_eq!(c.held_bytes(), 4);
        let held = open(c.register("b", "tok", None, 2));
        assert_eq!(
            held,
            vec![
                Deliver {
                    conn: 2,
                    text: "m1".into()
                },
                Deliver {
                    conn: 2,
                    text: "m2".into()
                }
            ]
        );
        assert_eq!(c.held_bytes(), 0);
        assert_eq!(c.poll_timeout(), None);
        // Now connected: delivered at once.
        assert_eq!(
            c.relay(t, "a", "ANSWER", "b", "m3".into()),
            Relayed::Deliver(Deliver {
                conn: 2,
                text: "m3".into()
            })
        );
    }

    #[test]
    fn an_expired_queue_answers_one_expire_per_sender_and_target() {
        let t = Instant::now();
        let mut c = Core::new(limits());
        open(c.register("a", "tok", None, 1));
        open(c.register("c", "tok", None, 3));
        c.relay(t, "a", "OFFER", "b", "m1".into());
        c.relay(t, "a", "CANDIDATE", "b", "m2".into());
        c.relay(t, "a", "OFFER", "z", "m3".into());
        assert_eq!(
            c.relay(t, "c", "OFFER", "b", "m4".into()),
            Relayed::Refused(Deliver {
                conn: 3,
                text: expire_text("b", "c")
            })
        );
        assert!(c.handle_timeout(t + Duration::from_millis(4999)).is_empty());
        let mut out = c.handle_timeout(t + Duration::from_secs(5));
        out.sort_by(|x, y| x.text.cmp(&y.text));
        assert_eq!(
            out,
            vec![
                Deliver {
                    conn: 1,
                    text: expire_text("b", "a")
                },
                Deliver {
                    conn: 1,
                    text: expire_text("z", "a")
                },
            ]
        );
        assert_eq!(c.held_bytes(), 0);
        assert_eq!(c.poll_timeout(), None);
        // The target connecting later gets nothing stale.
        assert!(open(c.register("b", "tok", None, 2)).is_empty());
    }

    #[test]
    fn leave_and_expire_to_an_absent_id_are_not_held_and_bytes_are_bounded() {
        let t = Instant::now();
        let mut c = Core::new(limits());
        open(c.register("a", "tok", None, 1));
        assert_eq!(c.relay(t, "a", "LEAVE", "b", "x".into()), Relayed::Dropped);
        assert_eq!(c.relay(t, "a", "EXPIRE", "b", "x".into()), Relayed::Dropped);
        assert_eq!(c.poll_timeout(), None);
        let big = "x".repeat(999);
        assert_eq!(c.relay(t, "a", "OFFER", "b", big.clone()), Relayed::Held);
        assert_eq!(
            c.relay(t, "a", "OFFER", "q", "yy".into()),
            Relayed::Refused(Deliver {
                conn: 1,
                text: expire_text("q", "a")
            })
        );
        assert_eq!(c.held_bytes(), 999);
    }

    #[test]
    fn remote_ids_are_relayed_to_their_node_but_never_ahead_of_held_messages() {
        let t = Instant::now();
        let mut c = Core::new(limits());
        open(c.register("a", "tok", None, 1));
        assert!(c.needs_lookup("b"));
        assert!(!c.needs_lookup("a"), "local ids need no lookup");
        // Nowhere: held; the queue alone decides afterwards.
        assert_eq!(c.relay(t, "a", "OFFER", "b", "m1".into()), Relayed::Held);
        assert!(!c.needs_lookup("b"));
        // A node is learnt while messages are held: new ones queue behind them.
        c.set_remote("b", "n2");
        assert_eq!(c.relay(t, "a", "OFFER", "b", "m2".into()), Relayed::Held);
        // b connected on n2: the held messages go there in order, then the rest directly.
        assert_eq!(
            c.arrived_remote("b", "n2"),
            vec![
                Handed {
                    src: "a".into(),
                    text: "m1".into()
                },
                Handed {
                    src: "a".into(),
                    text: "m2".into()
                }
            ]
        );
        assert_eq!(c.held_bytes(), 0);
        assert_eq!(c.poll_timeout(), None, "the queue's deadline went with it");
        assert_eq!(
            c.relay(t, "a", "LEAVE", "b", "m3".into()),
            Relayed::Remote {
                node: "n2".into(),
                text: "m3".into()
            }
        );
        // The node answered that b is gone: held again, as for an id that is nowhere.
        c.forget_remote("b");
        assert_eq!(c.relay(t, "a", "OFFER", "b", "m4".into()), Relayed::Held);
        // b registering here drops the stale node and takes what is held.
        c.set_remote("b", "n2");
        assert_eq!(open(c.register("b", "tok", None, 2)).len(), 1);
        assert_eq!(
            c.relay(t, "a", "OFFER", "b", "m5".into()),
            Relayed::Deliver(Deliver {
                conn: 2,
                text: "m5".into()
            })
        );
        // A local id is never handed to another node.
        assert!(c.arrived_remote("b", "n3").is_empty());
        let mut claims = c.claims();
        claims.sort();
        assert_eq!(
            claims,
            vec![
                ("a".into(), "tok".into(), None),
                ("b".into(), "tok".into(), None)
            ]
        );
    }

    #[test]
    fn max_peers_bounds_registrations_and_expire_text_is_the_peerjs_shape() {
        let mut c = Core::new(limits());
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            open(c.register(id, "tok", None, i as u64));
        }
        assert_eq!(c.register("d", "tok", None, 9), Registered::Full);
        assert_eq!(c.remove("a", "kicked"), Some(0));
        assert_eq!(
            c.drain_freed(),
            vec![Freed {
                id: "a".into(),
                user: None,
                reason: "kicked"
            }]
        );
        assert!(open(c.register("d", "tok", None, 9)).is_empty());
        let v: serde_json::Value = serde_json::from_str(&expire_text("b", "a")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "EXPIRE", "src": "b", "dst": "a"})
        );
    }
}
