//! Messages between nodes on the Redis bus: one JSON envelope per PUBLISH, carrying, in order,
//! every message one node had queued for another.

use serde::{Deserialize, Serialize};

use crate::signaling::room::ConnId;

/// What one PUBLISH carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Sending node.
    pub from: String,
    /// Messages in the order the sender queued them.
    pub msgs: Vec<Wire>,
}

/// Who a forwarded request speaks for: the user of the session on the connection's node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Who {
    /// User id.
    pub user: String,
    /// The room the session is limited to.
    pub limit: Option<String>,
}

/// One message. Requests go from a connection's node (the edge) to the room's owner; frames,
/// closes and answers go back. Connection ids are the edge's own: with the edge's node id
/// they name a connection in the whole cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wire {
    /// `join` a room.
    Join {
        /// Request number, echoed in the answer.
        req: u64,
        /// Edge connection.
        conn: ConnId,
        /// Session.
        who: Who,
        /// Room id.
        room: String,
    },
    /// `resume` a seat.
    Resume {
        /// Request number.
        req: u64,
        /// Edge connection.
        conn: ConnId,
        /// Session.
        who: Who,
        /// Resume token.
        token: String,
        /// The client's last seen `seq`.
        last: u64,
        /// The client's request `id`, raw JSON, for the `resumed` frame.
        id: Option<String>,
    },
    /// `leave` the room.
    Leave {
        /// Request number.
        req: u64,
        /// Edge connection.
        conn: ConnId,
    },
    /// `signal`: answered by an `ack` or `error` frame, not an `Answer`.
    Signal {
        /// Edge connection.
        conn: ConnId,
        /// The owner epoch the edge seated it under, echoed when the owner has no such seat.
        epoch: u64,
        /// Target peer.
        to: Option<String>,
        /// Raw JSON data, relayed byte for byte.
        data: String,
        /// The client's request `id`, raw JSON.
        id: Option<String>,
    },
    /// The edge connection dropped: keep its seat for the resume window.
    Disconnect {
        /// Edge connection.
        conn: ConnId,
    },
    /// A frame for an edge connection, rendered by the owner.
    Frame {
        /// Edge connection.
        conn: ConnId,
        /// The owner's lease epoch when it seated the connection: edges drop frames from an
        /// owner older than the one they seated it with (fencing on the data path).
        epoch: u64,
        /// Frame type, for metrics.
        kind: String,
        /// Wire text.
        text: String,
    },
    /// Close an edge connection: its seat is gone (replaced, kicked, room closed).
    Close {
        /// Edge connection.
        conn: ConnId,
        /// The close code to use (4001 replaced when absent, from older nodes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<u16>,
        /// The owner's epoch for the seat, fenced like `Frame`.
        epoch: u64,
    },
    /// Close an edge connection so that its client resumes: the room moved.
    Moved {
        /// Edge connection.
        conn: ConnId,
        /// The owner's epoch for the seat, fenced like `Frame`.
        epoch: u64,
    },
    /// The owner's answer to a `Join`, `Resume` or `Leave`.
    Answer {
        /// Request number.
        req: u64,
        /// The owner's lease epoch for the room.
        epoch: u64,
        /// Success: the `joined` object (or `null`).
        ok: Option<serde_json::Value>,
        /// Failure: error code and message.
        err: Option<(String, String)>,
    },
    /// A node's own liveness probe through Redis.
    Ping,
    /// A PeerJS message between nodes (relayed frames, hand-overs, takeovers).
    Peerjs(crate::peerjs::router::RemoteMsg),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips() {
        let e = Envelope {
            from: "n1".into(),
            msgs: vec![
                Wire::Signal {
                    conn: 7,
                    epoch: 2,
                    to: None,
                    data: r#"{"a":1e-400}"#.into(),
                    id: Some("\"x\"".into()),
                },
                Wire::Answer {
                    req: 1,
                    epoch: 3,
                    ok: None,
                    err: Some(("unknown_room".into(), "unknown room".into())),
                },
                Wire::Ping,
            ],
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Envelope>(&s).unwrap(), e);
    }
}
