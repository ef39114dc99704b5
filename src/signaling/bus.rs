//! The `Bus` routes the room core's output to connections. In-process by default; a cluster
//! implementation can carry the same actions between nodes.

use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::mpsc;

use super::room::{Action, ConnId};

/// What a connection task is told to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    /// Send this JSON text frame.
    Frame(String),
    /// Close the connection.
    Close,
}

/// Delivers core actions to the connections they name, wherever those live.
pub trait Bus: Send + Sync + 'static {
    /// Register a local connection's outbox.
    fn attach(&self, conn: ConnId, tx: mpsc::Sender<Outbound>);
    /// Forget a connection.
    fn detach(&self, conn: ConnId);
    /// Deliver actions and return how many were dropped. A connection whose outbox is full
    /// is detached: its task sends what is queued, then closes so the client resumes and gets
    /// the rest replayed in order, rather than silently missing frames.
    fn deliver(&self, actions: Vec<Action>) -> usize;
}

/// The single-node bus: a map from connection to its outbox.
#[derive(Debug, Default)]
pub struct LocalBus {
    conns: Mutex<HashMap<ConnId, mpsc::Sender<Outbound>>>,
}

impl LocalBus {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<ConnId, mpsc::Sender<Outbound>>> {
        match self.conns.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

impl Bus for LocalBus {
    fn attach(&self, conn: ConnId, tx: mpsc::Sender<Outbound>) {
        self.map().insert(conn, tx);
    }

    fn detach(&self, conn: ConnId) {
        self.map().remove(&conn);
    }

    fn deliver(&self, actions: Vec<Action>) -> usize {
        let mut map = self.map();
        let mut dropped = 0;
        for a in actions {
            let (conn, msg) = match a {
                Action::Send(c, v) => (c, Outbound::Frame(v.to_string())),
                Action::Close(c) => (c, Outbound::Close),
            };
            if let Some(tx) = map.get(&conn) {
                if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(msg) {
                    dropped += 1;
                    // Dropping the only sender ends the task's outbox after what is queued.
                    map.remove(&conn);
                }
            } else if matches!(msg, Outbound::Frame(_)) {
                // Detached after an overflow: the frame waits in the resume buffer.
                dropped += 1;
            }
        }
        dropped
    }
}
