//! The per-connection request handler without a socket: fuzz targets and load tools feed it
//! frame texts and read back the replies and what the bus delivered, exactly as `serve` does.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use super::{finish, handle, Conn, Signaling};
use crate::signaling::bus::{Outbound, Outbox};
use crate::signaling::room::ConnId;
use crate::signaling::Deps;

/// One connection, as `serve` holds it.
pub struct Client {
    conn: Conn,
    outbox: Arc<Outbox>,
    left_cleanly: bool,
    ip: IpAddr,
}

impl Client {
    /// Open a connection from `ip` (counted against the per-IP cap; `None` when refused).
    pub fn connect(sig: &Signaling, deps: &Deps, ip: IpAddr) -> Option<Client> {
        if !sig.admit(ip) {
            return None;
        }
        deps.metrics.ws_connections_active.inc();
        let (id, outbox) = sig.open();
        Some(Client {
            conn: Conn {
                id,
                host: None,
                room: None,
                ice_due: None,
                session: None,
            },
            outbox,
            left_cleanly: true,
            ip,
        })
    }

    /// The connection id the room core sees.
    pub fn id(&self) -> ConnId {
        self.conn.id
    }

    /// The room this connection believes it holds a seat in.
    pub fn room(&self) -> Option<&str> {
        self.conn.room.as_deref()
    }

    /// Handle one text frame at `now`; the direct replies, in order. `None` when the handler
    /// would wait (only cluster forwarding does; a single node answers at once).
    pub fn frame(
        &mut self,
        sig: &Signaling,
        deps: &Deps,
        text: &str,
        now: Instant,
    ) -> Option<Vec<String>> {
        use futures_util::FutureExt;
        let c = sig.counters(&deps.metrics);
        let replies = handle(
            sig,
            deps,
            c,
            &mut self.conn,
            text,
            &mut self.left_cleanly,
            now,
        )
        .now_or_never()?;
        Some(replies.into_iter().map(|r| r.text).collect())
    }

    /// Take what the bus delivered; `Err` with what was taken once the outbox overflowed
    /// (the connection must then close, as `serve` does).
    pub fn delivered(&self) -> Result<Vec<Outbound>, Vec<Outbound>> {
        let mut got = Vec::new();
        loop {
            match self.outbox.try_pop() {
                Ok(Some(o)) => got.push(o),
                Ok(None) => return Ok(got),
                Err(_) => return Err(got),
            }
        }
    }

    /// The socket went away at `now` (or the client closed it): keep the seat for the resume
    /// window unless the client left cleanly.
    pub fn close(self, sig: &Signaling, deps: &Deps, now: Instant) {
        finish(sig, deps, &self.conn, self.ip, self.left_cleanly, now);
    }
}

/// Run every room deadline due at `now` on the shard of `room`, and release the quota of the
/// rooms that closed, as the shard timer task does. Returns (peers expired, rooms closed).
pub fn tick(sig: &Signaling, deps: &Deps, room: &str, now: Instant) -> (usize, usize) {
    let done = sig.apply(&deps.metrics, room, |h, out| h.tick(now, out));
    let closed = done.closed.len();
    for creator in done.closed {
        sig.release_room(&creator);
    }
    (done.expired, closed)
}

/// Open rooms and seated peers on the shard of `room`.
pub fn counts(sig: &Signaling, deps: &Deps, room: &str) -> (usize, usize) {
    sig.apply(&deps.metrics, room, |h, _| (h.room_count(), h.peer_count()))
}
