//! How PeerJS reaches other nodes without knowing the cluster: [`PeerjsRouter`] is owned here
//! and implemented by `crate::cluster::Cluster`, so imports point one way (the cluster hands
//! bus messages to [`super::PeerJs`]; PeerJS sees only this trait). Without cluster mode there
//! is no router and every id is local to the node.

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A PeerJS message between nodes, carried in order on the cluster bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteMsg {
    /// A relayed message for `dst`, connected on the receiving node; `text` is already stamped
    /// with the server's `src`.
    Relay {
        /// The sending id (for the `EXPIRE` of a message that has to be held after all).
        src: String,
        /// The target id.
        dst: String,
        /// `LEAVE`/`EXPIRE`: dropped, not held, when the target is not connected.
        droppable: bool,
        /// The frame text.
        text: String,
    },
    /// The answer to a `Relay` whose target is not connected on the node any more: the sender's
    /// node holds it (or drops it) as for an id that is nowhere.
    Miss {
        /// As in `Relay`.
        src: String,
        /// As in `Relay`.
        dst: String,
        /// As in `Relay`.
        droppable: bool,
        /// As in `Relay`.
        text: String,
    },
    /// `id` just connected on the sending node: send it what is held for it.
    Here {
        /// The id.
        id: String,
    },
    /// The holder of `id` reconnected on the sending node: close the socket here.
    Kick {
        /// The id.
        id: String,
    },
}

/// What a cluster-wide claim of an id came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// The id is this node's now. `waiting`: nodes holding messages for it; `previous`: the node
    /// whose socket the holder left behind (taken over from there).
    Mine {
        /// Nodes that hold messages for the id.
        waiting: Vec<String>,
        /// Another node that held the id for the same holder.
        previous: Option<String>,
    },
    /// Another holder has the id somewhere in the cluster.
    Taken,
    /// Redis is away: the id is served on this node only.
    Unavailable,
}

/// Where an id is, as the cluster-wide registry says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// Held by this node.
    Here,
    /// Held by that node.
    On(String),
    /// Nowhere: this node is now told when it connects (a `Here` message).
    Nowhere,
    /// Redis is away.
    Unavailable,
}

/// The cluster operations PeerJS needs: the id registry and the bus.
pub trait PeerjsRouter: Send + Sync + std::fmt::Debug {
    /// Claim `id` for this node for `holder` (a token hash or a session user).
    fn claim<'a>(&'a self, id: &'a str, holder: &'a str) -> BoxFuture<'a, Claimed>;
    /// Give up ids this node no longer holds (in the background; only this node's claims go).
    fn release(&self, ids: Vec<String>);
    /// Find the node of `id`; when it is nowhere, ask to be told when it connects.
    fn locate<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Located>;
    /// Queue `msg` for `node`, in order after what was queued before; `false` when the cluster
    /// is down (Redis away) or the queue is full.
    fn send(&self, node: &str, msg: RemoteMsg) -> bool;
    /// Refresh this node's claims of `(id, holder)`; returns the ids another node holds now.
    fn refresh(&self, ids: Vec<(String, String)>) -> BoxFuture<'_, Vec<String>>;
    /// How often claims are refreshed (a third of their lifetime).
    fn refresh_every(&self) -> Duration;
}
