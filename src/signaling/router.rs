//! How the signaling part reaches other nodes without knowing the cluster: [`RoomRouter`] is
//! owned here and implemented by `crate::cluster::Cluster`, so imports point one way (the
//! cluster uses signaling's hub; signaling sees only this trait). Without cluster mode there is
//! no router and every room is local.

use futures_util::future::BoxFuture;
use serde_json::Value;

use crate::signaling::room::{ConnId, Member, RoomError};

/// The owner's answer to a forwarded request.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Done; the `joined` object for a join.
    Ok(Value),
    /// Refused with this error code and message.
    Err(String, String),
}

/// A `resume` as the client sent it.
#[derive(Debug, Clone)]
pub struct ResumeRequest<'a> {
    /// Resume token (`<room>.<random>`).
    pub token: &'a str,
    /// The client's last seen `seq`.
    pub last: u64,
    /// The request `id`, raw JSON.
    pub id: Option<String>,
}

/// Where a room request runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// On this node's hub.
    Local,
    /// Forwarded; the owner answered.
    Remote(Answer),
}

/// Room requests that may run on another node: the connection task asks before running a
/// request on this node's hub, and the service reports what its timers did.
pub trait RoomRouter: Send + Sync + std::fmt::Debug {
    /// Whether this connection's seat lives on another node.
    fn is_remote(&self, conn: ConnId) -> bool;
    /// Take ownership of a new room before creating it here.
    fn claim<'a>(&'a self, room: &'a str) -> BoxFuture<'a, Result<(), RoomError>>;
    /// Give back a claim whose room was not created after all.
    fn unclaim(&self, room: &str);
    /// A room this node owned was closed.
    fn closed(&self, room: &str);
    /// A room this node owns changed its seats: refresh what a takeover would restore.
    fn mirror(&self, room: &str);
    /// A join: run here ([`Route::Local`]) or forwarded to the owner.
    fn join<'a>(
        &'a self,
        conn: ConnId,
        member: &'a Member,
        room: &'a str,
    ) -> BoxFuture<'a, Result<Route, RoomError>>;
    /// A resume: run here or forwarded to the owner.
    fn resume<'a>(
        &'a self,
        conn: ConnId,
        member: &'a Member,
        room: &'a str,
        r: ResumeRequest<'a>,
    ) -> BoxFuture<'a, Result<Route, RoomError>>;
    /// A signal from a seat on another node, forwarded in order.
    fn signal(
        &self,
        conn: ConnId,
        to: Option<&str>,
        data: &str,
        id: Option<&str>,
    ) -> Result<(), RoomError>;
    /// A leave from a seat on another node.
    fn leave(&self, conn: ConnId) -> BoxFuture<'_, Result<Answer, RoomError>>;
    /// The connection of a seat on another node ended.
    fn gone(&self, conn: ConnId, cleanly: bool);
}
