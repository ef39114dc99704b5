//! The server API for app backends: who may use it (bearer admin tokens, compared in
//! constant time) and what its operations do across parts (signaling rooms, auth, TURN).
//! The HTTP routes live in `http::admin`.

use serde::Serialize;

use crate::shared::Shared;

/// Why a server API request was refused; `code()` is the JSON `error.code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// No `Authorization: Bearer` header, or a token that is not listed.
    #[error("a valid admin bearer token is required")]
    Unauthorized,
    /// No such room.
    #[error("unknown room")]
    UnknownRoom,
    /// No such peer in the room.
    #[error("unknown peer")]
    UnknownPeer,
    /// A path parameter is malformed.
    #[error("{0}")]
    BadRequest(String),
}

impl From<crate::signaling::room::RoomError> for AdminError {
    fn from(e: crate::signaling::room::RoomError) -> AdminError {
        use crate::signaling::room::RoomError;
        match e {
            RoomError::UnknownPeer => AdminError::UnknownPeer,
            RoomError::UnknownRoom => AdminError::UnknownRoom,
            other => AdminError::BadRequest(other.to_string()),
        }
    }
}

impl AdminError {
    /// Stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::Unauthorized => "unauthorized",
            AdminError::UnknownRoom => "unknown_room",
            AdminError::UnknownPeer => "unknown_peer",
            AdminError::BadRequest(_) => "bad_request",
        }
    }

    /// Metrics label.
    pub fn result(&self) -> &'static str {
        match self {
            AdminError::Unauthorized => "unauthorized",
            AdminError::UnknownRoom | AdminError::UnknownPeer => "not_found",
            AdminError::BadRequest(_) => "bad_request",
        }
    }
}

/// Check an `Authorization` header value against the admin tokens. Every token is compared
/// (in constant time each), so timing tells nothing about which one nearly matched. With no
/// token configured the API is open only to a `local` client (loopback, not relayed by a
/// proxy): an empty list never opens it to anyone else, whatever the listen address.
pub fn authorize(
    tokens: &[crate::secret::Secret],
    authorization: Option<&[u8]>,
    local: bool,
) -> Result<(), AdminError> {
    if tokens.is_empty() {
        return if local {
            Ok(())
        } else {
            Err(AdminError::Unauthorized)
        };
    }
    let presented = bearer(authorization).ok_or(AdminError::Unauthorized)?;
    let ok = tokens.iter().fold(false, |acc, t| {
        acc | crate::auth::secret_eq(t.expose().as_bytes(), presented)
    });
    if ok {
        Ok(())
    } else {
        Err(AdminError::Unauthorized)
    }
}

/// The token of an `Authorization: Bearer …` header value.
pub fn bearer(authorization: Option<&[u8]>) -> Option<&[u8]> {
    let h = authorization?;
    match h.get(..7) {
        Some(p) if p.eq_ignore_ascii_case(b"bearer ") => Some(h[7..].trim_ascii()),
        _ => None,
    }
}

/// What `POST /v1/admin/users/{user}/revoke` did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Revoked {
    /// The user id.
    pub user: String,
    /// Unix second of the revocation: credentials issued up to it are refused.
    pub revoked_at: u64,
    /// Signaling peers of the user that were removed from their rooms.
    pub peers_removed: usize,
}

/// Revoke `user` now: its session tokens and TURN credentials stop verifying, the TURN
/// listeners end its allocations (they wake on the revocation), and its signaling peers are
/// removed from their rooms (`peer-left {reason:"revoked"}`) and their connections closed.
pub fn revoke_user(shared: &Shared, user: &str) -> Result<Revoked, AdminError> {
    if user.is_empty() || user.len() > 256 {
        return Err(AdminError::BadRequest("user must be 1 to 256 bytes".into()));
    }
    let now = crate::auth::unix_now();
    shared.auth.revoke_user(user, now);
    let peers_removed =
        shared.signaling.remove_user(user, &shared.metrics) + shared.peerjs.revoke_user(user);
    tracing::info!(user, peers_removed, "user revoked through the server API");
    Ok(Revoked {
        user: user.to_string(),
        revoked_at: now,
        peers_removed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_checked() {
        let t = vec![
            crate::secret::Secret::from("0123456789abcdef"),
            crate::secret::Secret::from("fedcba9876543210"),
        ];
        assert_eq!(authorize(&t, None, true), Err(AdminError::Unauthorized));
        assert_eq!(
            authorize(&t, Some(b"Bearer wrong-token-000000"), false),
            Err(AdminError::Unauthorized)
        );
        assert_eq!(
            authorize(&t, Some(b"Basic 0123456789abcdef"), false),
            Err(AdminError::Unauthorized)
        );
        assert_eq!(
            authorize(&t, Some(b"Bearer 0123456789abcde"), false),
            Err(AdminError::Unauthorized)
        );
        assert!(authorize(&t, Some(b"Bearer 0123456789abcdef"), false).is_ok());
        assert!(authorize(&t, Some(b"bearer fedcba9876543210"), false).is_ok());
        // No token: open to a local client only, never to anyone else.
        assert!(authorize(&[], None, true).is_ok());
        assert_eq!(authorize(&[], None, false), Err(AdminError::Unauthorized));
        assert_eq!(
            authorize(&[], Some(b"Bearer 0123456789abcdef"), false),
            Err(AdminError::Unauthorized)
        );
    }
}
