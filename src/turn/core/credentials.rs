//! The RFC 8489 long-term credential mechanism for the table: nonces signed with the pool's
//! key, the checks of §9.2.4, and signing responses with the key a request proved.

use std::net::SocketAddr;

use super::allocation::{Alg, Key};
use super::{reject, Env, Reject, Relay, Table};
use crate::auth::{hmac_sha256, AuthError};
use crate::stun::codec::{attr, long_term_key, long_term_key_sha256, method, Encoder, Message};

/// Prefix marking an RFC 8489 nonce that carries the security feature set; `gAAA` sets the
/// "password algorithms" bit, so clients may use MESSAGE-INTEGRITY-SHA256.
const NONCE_COOKIE: &str = "obMatJos2gAAA";

/// PASSWORD-ALGORITHM numbers (RFC 8489 §18.5).
pub(super) const ALG_MD5: u16 = 0x0001;
pub(super) const ALG_SHA256: u16 = 0x0002;

impl<R: Relay> Table<R> {
    pub(super) fn make_nonce(&self, unix: u64) -> String {
        let mac = hmac_sha256(self.pool.nonce_key(), &unix.to_be_bytes());
        let mut s = String::with_capacity(NONCE_COOKIE.len() + 32);
        s.push_str(NONCE_COOKIE);
        s.push_str(&format!("{unix:016x}"));
        for b in &mac[..8] {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Whether a nonce is ours and still fresh.
    pub(super) fn nonce_fresh(&self, nonce: &[u8], unix: u64) -> Result<(), Reject> {
        let stale = reject(438, "Stale Nonce");
        let s = std::str::from_utf8(nonce).map_err(|_| reject(438, "Stale Nonce"))?;
        let rest = s
            .strip_prefix(NONCE_COOKIE)
            .ok_or(reject(438, "Stale Nonce"))?;
        if rest.len() != 32 {
            return Err(stale);
        }
        let ts = u64::from_str_radix(&rest[..16], 16).map_err(|_| reject(438, "Stale Nonce"))?;
        let want = self.make_nonce(ts);
        if !crate::auth::secret_eq(want.as_bytes(), s.as_bytes()) {
            return Err(stale);
        }
        if ts > unix.saturating_add(5) || unix.saturating_sub(ts) >= self.settings.nonce_lifetime {
            return Err(stale);
        }
        Ok(())
    }

    pub(super) fn auth_fail(&self, e: AuthError) -> Reject {
        self.metrics
            .auth_failures
            .with_label_values(&[e.reason()])
            .inc();
        reject(401, "Unauthorized")
    }

    /// RFC 8489 §9.2.4 long-term credential checks.
    pub(super) fn authenticate(
        &self,
        env: Env,
        client: SocketAddr,
        msg: &Message<'_>,
    ) -> Result<(Key, Alg), Reject> {
        if !msg.has_integrity() && !msg.has_integrity_sha256() {
            return Err(self.auth_fail(AuthError::Missing));
        }
        let (Some(user), Some(realm), Some(nonce)) = (
            msg.get(attr::USERNAME),
            msg.get(attr::REALM),
            msg.get(attr::NONCE),
        ) else {
            return Err(reject(400, "Bad Request"));
        };
        let alg = if msg.has_integrity_sha256() {
            Alg::Sha256
        } else {
            Alg::Md5
        };
        if let Some(pa) = msg.get(attr::PASSWORD_ALGORITHM) {
            let num = pa.get(0..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
            match (num, alg) {
                (Some(ALG_MD5), Alg::Md5) | (Some(ALG_SHA256), Alg::Sha256) => {}
                (Some(ALG_MD5 | ALG_SHA256), _) if msg.has_integrity() => {}
                _ => return Err(reject(400, "Bad Request")),
            }
        }
        self.nonce_fresh(nonce, env.unix)?;
        let user = std::str::from_utf8(user).map_err(|_| self.auth_fail(AuthError::Malformed))?;
        if realm != self.settings.realm.as_bytes() {
            return Err(self.auth_fail(AuthError::UnknownUser));
        }
        let verify = |k: &Key| match alg {
            Alg::Md5 => msg.verify_integrity(&k.md5),
            Alg::Sha256 => msg.verify_integrity_sha256(&k.sha256),
        };
        // Requests on an existing allocation are checked with the key it was created with.
        if let Some(a) = self.allocs.get(&client) {
            if msg.method() != method::ALLOCATE {
                if a.key.username != user {
                    self.metrics
                        .auth_failures
                        .with_label_values(&["wrong_credentials"])
                        .inc();
                    return Err(reject(441, "Wrong Credentials"));
                }
                if !verify(&a.key) {
                    return Err(self.auth_fail(AuthError::BadSignature));
                }
                return Ok((a.key.clone(), alg));
            }
        }
        let passwords = self
            .auth
            .turn_passwords(user, Some(env.unix))
            .map_err(|e| self.auth_fail(e))?;
        let realm = self.settings.realm.as_str();
        for pw in passwords {
            let k = Key {
                username: user.to_string(),
                md5: long_term_key(user, realm, &pw),
                sha256: long_term_key_sha256(user, realm, &pw),
            };
            if verify(&k) {
                return Ok((k, alg));
            }
        }
        Err(self.auth_fail(AuthError::BadSignature))
    }
}

pub(super) fn sign(e: &mut Encoder<'_>, key: &Key, alg: Alg) {
    match alg {
        Alg::Md5 => e.integrity(&key.md5),
        Alg::Sha256 => e.integrity_sha256(&key.sha256),
    };
}

pub(super) fn finish(e: Encoder<'_>, req: &Message<'_>) {
    close(e, req.has_fingerprint())
}

/// Close an answer like its request: with FINGERPRINT when the request had one.
pub(super) fn close(e: Encoder<'_>, fingerprint: bool) {
    if fingerprint {
        e.finish_with_fingerprint()
    } else {
        e.finish()
    }
}

#[cfg(test)]
#[path = "credentials_tests.rs"]
mod tests;
