//! What the core hands the shell: room events serialized once and shared, frames addressed
//! to one connection, and the actions (send, close) the shell carries out.

use serde_json::value::RawValue;
use serde_json::Value;
use std::sync::Arc;

use super::ConnId;

/// A room event serialized once and shared by every recipient and buffer that holds it.
///
/// The text is a JSON object without its closing brace, so that each recipient's own `seq` is
/// appended when the frame is written: `{"type":"signal","from":"…","data":…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    kind: &'static str,
    pub(super) body: Arc<str>,
}

impl Event {
    /// Serialize a server-built event object (rare events: joins, leaves, reconnects).
    pub(super) fn from_value(kind: &'static str, v: &Value) -> Event {
        let mut s = v.to_string();
        // `v` is always an object built by this module, so the last byte is `}`.
        s.pop();
        Event {
            kind,
            body: s.into(),
        }
    }

    /// The relayed `signal`: `data` is copied byte for byte, never re-encoded.
    pub(super) fn signal(from: &str, data: &RawValue) -> Event {
        let from = Value::from(from).to_string();
        let mut s = String::with_capacity(34 + from.len() + data.get().len());
        s.push_str("{\"type\":\"signal\",\"from\":");
        s.push_str(&from);
        s.push_str(",\"data\":");
        s.push_str(data.get());
        Event {
            kind: "signal",
            body: s.into(),
        }
    }

    /// The frame `type`, for metrics.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Bytes this event occupies in a buffer (shared, so counted once per holder at most).
    pub fn len(&self) -> usize {
        self.body.len()
    }

    /// Whether the serialized body is empty (never, for a built event).
    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }

    /// The text one recipient gets: the shared body with its `seq` appended.
    pub fn render(&self, seq: u64) -> String {
        let mut s = String::with_capacity(self.body.len() + 28);
        s.push_str(&self.body);
        s.push_str(",\"seq\":");
        s.push_str(itoa(seq).as_str());
        s.push('}');
        s
    }
}

fn itoa(n: u64) -> String {
    n.to_string()
}

/// One frame for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A room event with the recipient's sequence number.
    Event {
        /// Per-recipient sequence number.
        seq: u64,
        /// The shared serialized event.
        event: Event,
    },
    /// A complete frame addressed to one connection (the `resumed` reply).
    Text {
        /// The frame `type`, for metrics.
        kind: &'static str,
        /// The whole JSON text.
        text: Arc<str>,
    },
}

impl Frame {
    /// The frame `type`, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Event { event, .. } => event.kind,
            Frame::Text { kind, .. } => kind,
        }
    }

    /// Bytes counted against outbox budgets.
    pub fn len(&self) -> usize {
        match self {
            Frame::Event { event, .. } => event.len() + 24,
            Frame::Text { text, .. } => text.len(),
        }
    }

    /// Whether the frame is empty (never, for a built frame).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The wire text.
    pub fn render(&self) -> String {
        match self {
            Frame::Event { seq, event } => event.render(*seq),
            Frame::Text { text, .. } => text.to_string(),
        }
    }
}

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send a frame on a connection.
    Send(ConnId, Frame),
    /// Close a connection after sending what was queued; its seat is gone, so it must not
    /// resume.
    Close(ConnId, CloseReason),
}

/// Why the server ends a connection whose seat is gone; each has its own close code, so a
/// client knows not to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer connection of the same identity took the seat (4001).
    Replaced,
    /// Removed through the server API, or its user was revoked (4005).
    Kicked,
    /// Its room was closed through the server API (4006).
    RoomClosed,
}

impl CloseReason {
    /// WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::Replaced => 4001,
            CloseReason::Kicked => 4005,
            CloseReason::RoomClosed => 4006,
        }
    }

    /// The reason a close code stands for (across the cluster bus).
    pub fn from_code(code: u16) -> Option<CloseReason> {
        [
            CloseReason::Replaced,
            CloseReason::Kicked,
            CloseReason::RoomClosed,
        ]
        .into_iter()
        .find(|r| r.code() == code)
    }

    /// Close frame reason text.
    pub fn text(self) -> &'static str {
        match self {
            CloseReason::Replaced => "replaced",
            CloseReason::Kicked => "kicked",
            CloseReason::RoomClosed => "room closed",
        }
    }
}

/// A complete frame for one connection, outside the room's sequence (it will not resume).
pub(super) fn direct(kind: &'static str, v: &Value) -> Frame {
    Frame::Text {
        kind,
        text: v.to_string().into(),
    }
}
