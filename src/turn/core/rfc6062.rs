//! RFC 6062 in the table: TCP relays' Connect (a permission, then the shell's connect) and
//! ConnectionBind (the data connection claims a peer connection).

use std::net::SocketAddr;

use super::allocation::{Alg, Key};
use super::allocations::PERMISSION_LIFETIME;
use super::credentials::sign;
use super::{reject, Env, Outcome, Reject, Relay, RelayKind, Table};
use crate::stun::codec::{attr, decode_u32, method, Class, Encoder, Message};

impl<R: Relay> Table<R> {
    /// RFC 6062 §5.2 Connect: validate, install a permission for the peer, and leave the TCP
    /// connect to the shell.
    pub(super) fn connect(
        &mut self,
        env: Env,
        client: SocketAddr,
        msg: &Message<'_>,
        alg: Alg,
    ) -> Result<SocketAddr, Reject> {
        let Some(a) = self.allocs.get(&client) else {
            return Err(reject(437, "Allocation Mismatch"));
        };
        if a.kind != RelayKind::Tcp {
            return Err(reject(400, "Bad Request"));
        }
        let peer = msg
            .xor_address(attr::XOR_PEER_ADDRESS)
            .ok_or(reject(400, "Bad Request"))?
            .map_err(|_| reject(400, "Bad Request"))?;
        self.check_peer(a, peer)?;
        if a.pending_connect.is_some() {
            return Err(reject(446, "Connection Already Exists"));
        }
        let Some(a) = self.allocs.get_mut(&client) else {
            return Err(reject(437, "Allocation Mismatch"));
        };
        if !a.permissions_fit(&[peer.ip()]) {
            return Err(reject(508, "Insufficient Capacity"));
        }
        if a.grant_permission(peer.ip(), env.now + PERMISSION_LIFETIME) {
            self.metrics.turn_permissions_active.inc();
        }
        a.pending_connect = Some((msg.transaction_id(), msg.has_fingerprint(), alg));
        if let Some(a) = self.allocs.get(&client) {
            self.publish(client, a);
        }
        self.reschedule(client);
        Ok(peer)
    }

    /// RFC 6062 §5.4 ConnectionBind on a connection with no allocation: answer success and
    /// hand the connection id to the shell, which claims the peer connection.
    pub(super) fn connection_bind(
        &mut self,
        env: Env,
        msg: &Message<'_>,
        key: &Key,
        alg: Alg,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let id = match msg.get(attr::CONNECTION_ID).map(decode_u32) {
            Some(Ok(id)) if self.allocs.is_empty() => id,
            _ => {
                let req = super::Req::of(msg);
                return self.error(out, req, Some(key), alg, reject(400, "Bad Request"), env);
            }
        };
        self.signed_success(out, method::CONNECTION_BIND, None, msg, key, alg);
        self.bind_user = Some(key.username.clone());
        Outcome::ConnectionBind(id)
    }

    /// The shell's TCP connect for a Connect request finished: answer with CONNECTION-ID, or
    /// 447 Connection Timeout or Failure.
    pub fn connect_done(
        &mut self,
        client: SocketAddr,
        result: Option<u32>,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let Some(a) = self.allocs.get_mut(&client) else {
            return Outcome::Ignored;
        };
        let Some((tid, fp, alg)) = a.pending_connect.take() else {
            return Outcome::Ignored;
        };
        let key = a.key.clone();
        let (class, code) = match result {
            Some(_) => (Class::Success, None),
            None => (Class::Error, Some(447)),
        };
        let mut e = Encoder::new(out, method::CONNECT, class, &tid);
        match (result, code) {
            (Some(id), _) => {
                e.u32_attr(attr::CONNECTION_ID, id);
            }
            (None, Some(c)) => {
                e.error_code(c, "Connection Timeout or Failure");
            }
            _ => {}
        }
        e.software(&self.settings.software);
        sign(&mut e, &key, alg);
        if fp {
            e.finish_with_fingerprint();
        } else {
            e.finish();
        }
        match code {
            Some(c) => {
                self.count_error(c);
                Outcome::Error(c)
            }
            None => Outcome::Success,
        }
    }
}

#[cfg(test)]
#[path = "rfc6062_tests.rs"]
mod tests;
