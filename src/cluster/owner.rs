//! Messages that arrive from other nodes: requests this node answers as a room's owner, and
//! frames, closes and answers for this node's own connections.

use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

use super::bus::Proxy;
use super::lease::Owner;
use super::wire::{Envelope, Who, Wire};
use super::{lock, Answer, Cluster};
use crate::signaling::bus::Outbound;
use crate::signaling::conn::with_id_text;
use crate::signaling::room::{token_room, Action, ConnId, Frame, Hub, Member, RoomError};
use crate::signaling::service::static_kind;

fn error_text(code: &str, message: &str, id: Option<&RawValue>) -> String {
    with_id_text(
        &json!({"type": "error", "code": code, "message": message}),
        id,
    )
}

fn raw(id: &Option<String>) -> Option<Box<RawValue>> {
    id.as_ref()
        .and_then(|s| RawValue::from_string(s.clone()).ok())
}

impl Cluster {
    fn epoch_of(&self, room: &str) -> u64 {
        lock(&self.owned).get(room).copied().unwrap_or(0)
    }

    fn answer(&self, node: &Arc<str>, req: u64, epoch: u64, r: Result<Value, RoomError>) {
        let (ok, err) = match r {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some((e.code().to_string(), e.to_string()))),
        };
        self.remote.publish(
            node,
            Wire::Answer {
                req,
                epoch,
                ok,
                err,
            },
        );
    }

    fn not_owner(&self, node: &Arc<str>, req: u64) {
        self.remote.publish(
            node,
            Wire::Answer {
                req,
                epoch: 0,
                ok: None,
                err: Some(("not_owner".into(), "room not here".into())),
            },
        );
    }

    fn frame_to(&self, node: &Arc<str>, conn: ConnId, epoch: u64, kind: &str, text: String) {
        self.remote.publish(
            node,
            Wire::Frame {
                conn,
                epoch,
                kind: kind.to_string(),
                text,
            },
        );
    }

    /// Seats a connection of another node in `room` as a proxy and runs `seat` (a join or a
    /// resume) for it on the hub. The answer goes back before anything else the seat is sent,
    /// and the proxy goes again when the hub refuses; true when seated.
    fn seat_proxy(
        &self,
        from: &Arc<str>,
        req: u64,
        conn: ConnId,
        room: &str,
        who: Who,
        seat: impl FnOnce(&mut Hub, ConnId, &Member, &mut Vec<Action>) -> Result<Value, RoomError>,
    ) -> bool {
        let member = Member {
            user: who.user,
            room_limit: who.limit,
        };
        let p = self.sig.new_conn_id();
        let epoch = self.epoch_of(room);
        self.remote.add_proxy(
            p,
            Proxy {
                node: from.clone(),
                conn,
                room: room.to_string(),
                epoch,
            },
        );
        let seated = self.sig.apply(&self.metrics, room, |h, out| {
            let r = seat(h, p, &member, out);
            let ok = r.is_ok();
            self.answer(from, req, epoch, r);
            ok
        });
        if !seated {
            self.remote.remove_proxy(p);
        }
        seated
    }

    /// Handle one envelope, in order.
    pub(crate) fn handle(&self, env: Envelope) {
        let from: Arc<str> = env.from.as_str().into();
        for w in env.msgs {
            self.handle_one(&from, w);
        }
    }

    fn handle_one(&self, from: &Arc<str>, w: Wire) {
        let now = Instant::now();
        let sig = &self.sig;
        match w {
            Wire::Peerjs(m) => self.peerjs_in(from, m),
            Wire::Join {
                req,
                conn,
                who,
                room,
            } => {
                if !self.has_room(&room) || self.lifecycle.is_draining() {
                    return self.not_owner(from, req);
                }
                let seated = self.seat_proxy(from, req, conn, &room, who, |h, p, m, out| {
                    h.join(p, m, &room, out)
                });
                if seated {
                    self.mirror(&room);
                }
            }
            Wire::Resume {
                req,
                conn,
                who,
                token,
                last,
                id,
            } => {
                let Some(room) = token_room(&token).map(str::to_string) else {
                    return self.answer(from, req, 0, Err(RoomError::BadResume));
                };
                if !self.has_room(&room) {
                    return self.not_owner(from, req);
                }
                // A resume from a connection that is seated already takes its seat over.
                if let Some(old) = self.remote.proxy_of(from, conn) {
                    self.remote.remove_proxy(old);
                }
                let id = raw(&id);
                let seated = self.seat_proxy(from, req, conn, &room, who, |h, p, m, out| {
                    let reply = |v| with_id_text(&v, id.as_deref());
                    h.resume(p, m, &token, last, reply, out)
                        .map(|()| Value::Null)
                });
                let outcome = if seated { "resumed" } else { "rejected" };
                self.metrics.resumes.with_label_values(&[outcome]).inc();
            }
            Wire::Leave { req, conn } => {
                let Some(p) = self.remote.proxy_of(from, conn) else {
                    return self.answer(from, req, 0, Err(RoomError::NotInRoom));
                };
                let Some(proxy) = self.remote.remove_proxy(p) else {
                    return;
                };
                let room = proxy.room;
                sig.apply(&self.metrics, &room, |h, out| {
                    let r = h.leave(now, p, out);
                    self.answer(from, req, proxy.epoch, r.map(|()| Value::Null));
                });
                self.mirror(&room);
            }
            Wire::Signal {
                conn,
                epoch,
                to,
                data,
                id,
            } => {
                let id = raw(&id);
                let Some(p) = self.remote.proxy_of(from, conn) else {
                    let e = RoomError::NotInRoom;
                    return self.frame_to(
                        from,
                        conn,
                        epoch,
                        "error",
                        error_text(e.code(), &e.to_string(), id.as_deref()),
                    );
                };
                let Some(proxy) = self.remote.proxy(p) else {
                    return;
                };
                let Ok(data) = RawValue::from_string(data) else {
                    return self.frame_to(
                        from,
                        conn,
                        proxy.epoch,
                        "error",
                        error_text("bad_request", "`data` is not JSON", id.as_deref()),
                    );
                };
                sig.apply(&self.metrics, &proxy.room, |h, out| {
                    match h.signal(p, to.as_deref(), &data, out) {
                        Ok(()) => {
                            if let Some(i) = id.as_deref() {
                                let t = with_id_text(&json!({"type": "ack"}), Some(i));
                                self.frame_to(from, conn, proxy.epoch, "ack", t);
                            }
                        }
                        Err(e) => self.frame_to(
                            from,
                            conn,
                            proxy.epoch,
                            "error",
                            error_text(e.code(), &e.to_string(), id.as_deref()),
                        ),
                    }
                });
            }
            Wire::Disconnect { conn } => {
                let Some(p) = self.remote.proxy_of(from, conn) else {
                    return;
                };
                if let Some(proxy) = self.remote.remove_proxy(p) {
                    sig.apply(&self.metrics, &proxy.room, |h, out| {
                        h.disconnect(now, p, out)
                    });
                }
            }
            w @ (Wire::Frame { .. } | Wire::Close { .. } | Wire::Moved { .. }) => {
                self.to_edge(from, w)
            }
            Wire::Answer {
                req,
                epoch,
                ok,
                err,
            } => {
                let a = match (ok, err) {
                    (_, Some((code, message))) => Answer::Err(code, message),
                    (ok, None) => Answer::Ok(ok.unwrap_or(Value::Null)),
                };
                let Some(p) = lock(&self.pending).remove(&req) else {
                    return;
                };
                if let (Answer::Ok(_), Some((conn, room))) = (&a, p.seat) {
                    let owner = Owner {
                        epoch,
                        node: from.to_string(),
                    };
                    lock(&self.seats).insert(conn, (room, owner));
                }
                let _ = p.tx.send((epoch, a));
            }
            Wire::Ping => {}
        }
    }

    /// A frame, close or move from an owner for a connection of this node. It is taken only
    /// from the owner the connection is seated with, at that owner's epoch or later: a node
    /// that lost the room (it paused, or Redis was away from it) and has not noticed yet must
    /// not reach connections that resumed elsewhere, nor ones this node now serves itself.
    pub(crate) fn to_edge(&self, from: &str, w: Wire) {
        let (conn, epoch) = match &w {
            Wire::Frame { conn, epoch, .. }
            | Wire::Close { conn, epoch, .. }
            | Wire::Moved { conn, epoch } => (*conn, *epoch),
            _ => return,
        };
        let mut seats = lock(&self.seats);
        let current = seats
            .get(&conn)
            .is_some_and(|(_, o)| o.node == from && epoch >= o.epoch);
        if !current {
            drop(seats);
            self.metrics
                .drops
                .with_label_values(&["cluster_fenced"])
                .inc();
            return;
        }
        let item = match w {
            Wire::Frame { kind, text, .. } => Outbound::Frame(Frame::Text {
                kind: static_kind(&kind),
                text: text.into(),
            }),
            Wire::Close { code, .. } => {
                seats.remove(&conn);
                let why = code
                    .and_then(crate::signaling::room::CloseReason::from_code)
                    .unwrap_or(crate::signaling::room::CloseReason::Replaced);
                Outbound::Close(why)
            }
            _ => {
                seats.remove(&conn);
                Outbound::Moved
            }
        };
        drop(seats);
        self.push(conn, item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use crate::signaling::bus::Bus;
    use crate::signaling::room::Budget;

    fn frame(epoch: u64, text: &str) -> Wire {
        Wire::Frame {
            conn: 7,
            epoch,
            kind: "signal".into(),
            text: text.into(),
        }
    }

    fn popped(ob: &crate::signaling::bus::Outbox) -> Vec<Outbound> {
        let mut v = Vec::new();
        while let Ok(Some(x)) = ob.try_pop() {
            v.push(x);
        }
        v
    }

    fn text(o: &Outbound) -> Option<&str> {
        match o {
            Outbound::Frame(Frame::Text { text, .. }) => Some(text),
            _ => None,
        }
    }

    #[tokio::test]
    async fn edges_drop_frames_from_a_superseded_owner() {
        let mut config = Config::default();
        config.cluster.redis_url = "redis://127.0.0.1:1/".into();
        config.cluster.node_id = "edge".into();
        let metrics = Arc::new(Metrics::new());
        let deps = crate::cluster::Deps {
            metrics: metrics.clone(),
            lifecycle: Arc::new(crate::lifecycle::Lifecycle::new()),
        };
        let (_, cl) = Cluster::build(&config, deps).unwrap();
        let ob = Arc::new(crate::signaling::bus::Outbox::new(
            64,
            1 << 20,
            Arc::new(Budget::new(1 << 20)),
        ));
        cl.local.attach(7, ob.clone());
        let fenced = || metrics.drops.with_label_values(&["cluster_fenced"]).get();

        // No seat: nobody may write to the connection through the bus.
        cl.to_edge("a", frame(1, "unseated"));
        assert!(popped(&ob).is_empty());
        assert_eq!(fenced(), 1);

        // Seated with owner `a` at epoch 3, then the room moved to `b` at epoch 4 and the
        // connection resumed there.
        let seat = |node: &str, epoch| {
            let o = Owner {
                epoch,
                node: node.into(),
            };
            lock(&cl.seats).insert(7, ("r".into(), o));
        };
        seat("a", 3);
        cl.to_edge("a", frame(3, "from a"));
        seat("b", 4);
        cl.to_edge("a", frame(3, "stale a"));
        cl.to_edge("b", frame(4, "from b"));
        cl.to_edge("b", frame(3, "b at an older epoch"));
        let got: Vec<_> = popped(&ob)
            .iter()
            .filter_map(text)
            .map(String::from)
            .collect();
        assert_eq!(got, ["from a", "from b"]);
        assert_eq!(fenced(), 3);

        // The old owner's close and move do not end the connection; the current owner's do.
        cl.to_edge("a", Wire::Moved { conn: 7, epoch: 3 });
        cl.to_edge(
            "a",
            Wire::Close {
                conn: 7,
                code: None,
                epoch: 3,
            },
        );
        assert!(popped(&ob).is_empty());
        assert!(cl.is_remote(7));
        cl.to_edge("b", Wire::Moved { conn: 7, epoch: 4 });
        assert_eq!(popped(&ob), [Outbound::Moved]);
        assert!(!cl.is_remote(7), "the seat is gone with the move");
        cl.to_edge("b", frame(4, "after the move"));
        assert!(popped(&ob).is_empty());
        assert_eq!(fenced(), 6);
    }
}
