//! Messages that arrive from other nodes: requests this node answers as a room's owner, and
//! frames, closes and answers for this node's own connections.

use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

use super::bus::Proxy;
use super::wire::{Envelope, Wire};
use super::{lock, Answer, Cluster};
use crate::server::Shared;
use crate::signaling::bus::Outbound;
use crate::signaling::conn::with_id_text;
use crate::signaling::room::{token_room, ConnId, Frame, Member, RoomError};
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
    fn answer(&self, node: &Arc<str>, req: u64, room: &str, r: Result<Value, RoomError>) {
        let epoch = lock(&self.owned).get(room).copied().unwrap_or(0);
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

    fn frame_to(&self, node: &Arc<str>, conn: ConnId, kind: &str, text: String) {
        self.remote.publish(
            node,
            Wire::Frame {
                conn,
                kind: kind.to_string(),
                text,
            },
        );
    }

    /// Handle one envelope, in order.
    pub(crate) fn handle(&self, shared: &Shared, env: Envelope) {
        let from: Arc<str> = env.from.as_str().into();
        for w in env.msgs {
            self.handle_one(shared, &from, w);
        }
    }

    fn handle_one(&self, shared: &Shared, from: &Arc<str>, w: Wire) {
        let now = Instant::now();
        let sig = &self.sig;
        match w {
            Wire::Join {
                req,
                conn,
                who,
                room,
            } => {
                if !self.has_room(&room) || shared.lifecycle.is_draining() {
                    return self.not_owner(from, req);
                }
                let member = Member {
                    user: who.user,
                    room_limit: who.limit,
                };
                let p = sig.new_conn_id();
                self.remote.add_proxy(
                    p,
                    Proxy {
                        node: from.clone(),
                        conn,
                        room: room.clone(),
                    },
                );
                let ok = sig.apply(shared, &room, |h, out| {
                    let r = h.join(p, &member, &room, out);
                    let ok = r.is_ok();
                    // Answered before anything else this seat is sent.
                    self.answer(from, req, &room, r);
                    ok
                });
                if ok {
                    self.mirror(&room);
                } else {
                    self.remote.remove_proxy(p);
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
                    return self.answer(from, req, "", Err(RoomError::BadResume));
                };
                if !self.has_room(&room) {
                    return self.not_owner(from, req);
                }
                let member = Member {
                    user: who.user,
                    room_limit: who.limit,
                };
                // A resume from a connection that is seated already takes its seat over.
                if let Some(old) = self.remote.proxy_of(from, conn) {
                    self.remote.remove_proxy(old);
                }
                let p = sig.new_conn_id();
                self.remote.add_proxy(
                    p,
                    Proxy {
                        node: from.clone(),
                        conn,
                        room: room.clone(),
                    },
                );
                let id = raw(&id);
                let ok = sig.apply(shared, &room, |h, out| {
                    let r = h.resume(
                        p,
                        &member,
                        &token,
                        last,
                        |v| with_id_text(&v, id.as_deref()),
                        out,
                    );
                    let ok = r.is_ok();
                    self.answer(from, req, &room, r.map(|()| Value::Null));
                    ok
                });
                let outcome = if ok { "resumed" } else { "rejected" };
                shared.metrics.resumes.with_label_values(&[outcome]).inc();
                if !ok {
                    self.remote.remove_proxy(p);
                }
            }
            Wire::Leave { req, conn } => {
                let Some(p) = self.remote.proxy_of(from, conn) else {
                    return self.answer(from, req, "", Err(RoomError::NotInRoom));
                };
                let Some(proxy) = self.remote.remove_proxy(p) else {
                    return;
                };
                let room = proxy.room;
                sig.apply(shared, &room, |h, out| {
                    let r = h.leave(now, p, out);
                    self.answer(from, req, &room, r.map(|()| Value::Null));
                });
                self.mirror(&room);
            }
            Wire::Signal { conn, to, data, id } => {
                let id = raw(&id);
                let Some(p) = self.remote.proxy_of(from, conn) else {
                    let e = RoomError::NotInRoom;
                    return self.frame_to(
                        from,
                        conn,
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
                        "error",
                        error_text("bad_request", "`data` is not JSON", id.as_deref()),
                    );
                };
                sig.apply(shared, &proxy.room, |h, out| {
                    match h.signal(p, to.as_deref(), &data, out) {
                        Ok(()) => {
                            if let Some(i) = id.as_deref() {
                                let t = with_id_text(&json!({"type": "ack"}), Some(i));
                                self.frame_to(from, conn, "ack", t);
                            }
                        }
                        Err(e) => self.frame_to(
                            from,
                            conn,
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
                    sig.apply(shared, &proxy.room, |h, out| h.disconnect(now, p, out));
                }
            }
            Wire::Frame { conn, kind, text } => {
                self.push(
                    conn,
                    Outbound::Frame(Frame::Text {
                        kind: static_kind(&kind),
                        text: text.into(),
                    }),
                );
            }
            Wire::Close { conn, code } => {
                lock(&self.seats).remove(&conn);
                let why = code
                    .and_then(crate::signaling::room::CloseReason::from_code)
                    .unwrap_or(crate::signaling::room::CloseReason::Replaced);
                self.push(conn, Outbound::Close(why));
            }
            Wire::Moved { conn } => {
                lock(&self.seats).remove(&conn);
                self.push(conn, Outbound::Moved);
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
                if let Some(tx) = lock(&self.pending).remove(&req) {
                    let _ = tx.send((epoch, a));
                }
            }
            Wire::Ping => {}
        }
    }
}
