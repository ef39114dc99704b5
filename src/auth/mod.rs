//! The one place that knows secrets: TURN REST credentials, static TURN users and
//! session tokens. Every credential switchboard issues or checks goes through here.

pub mod jwks;
pub mod jwt;
pub mod login;

use arc_swap::ArcSwap;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha1::Sha1;
use std::collections::BTreeMap;
use std::sync::Arc;
use subtle::ConstantTimeEq;

use crate::config::AuthConfig;
pub use crate::crypto::{hmac_sha256, secret_eq, unix_now};
use crate::secret::Secret;

/// Why a credential was refused; `reason()` gives a low-cardinality metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credential was presented.
    #[error("missing credentials")]
    Missing,
    /// The credential is malformed.
    #[error("malformed credentials")]
    Malformed,
    /// The credential's expiry has passed.
    #[error("credentials expired")]
    Expired,
    /// The signature or password does not match.
    #[error("bad signature or password")]
    BadSignature,
    /// The user is not known.
    #[error("unknown user")]
    UnknownUser,
    /// The login is older than `auth.max_session_age_secs`; the user must log in again.
    #[error("login too old; log in again")]
    TooOld,
    /// The user was revoked through the server API after this credential was issued.
    #[error("credentials revoked")]
    Revoked,
}

impl AuthError {
    /// Metrics label.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Expired => "expired",
            AuthError::BadSignature => "bad_signature",
            AuthError::UnknownUser => "unknown_user",
            AuthError::TooOld => "too_old",
            AuthError::Revoked => "revoked",
        }
    }
}

/// Secrets that can be swapped at run time (SIGHUP) without dropping sessions.
#[derive(Debug, Clone)]
pub struct Secrets {
    /// TURN REST secrets: the first signs new credentials, all verify.
    pub turn: Vec<Secret>,
    /// Static TURN users and their plain passwords.
    pub turn_users: BTreeMap<String, Secret>,
    /// Session-token keys: the first signs, all verify.
    pub session: Vec<Secret>,
    /// API keys for `GET /v1/turn-credentials`.
    pub api_keys: Vec<Secret>,
}

impl Secrets {
    /// Build from config, generating random per-process secrets where none are set.
    pub fn from_config(cfg: &AuthConfig) -> Secrets {
        let or_random = |v: &Vec<Secret>| {
            if v.is_empty() {
                vec![random_secret()]
            } else {
                v.clone()
            }
        };
        Secrets {
            turn: or_random(&cfg.turn_secrets),
            turn_users: cfg.turn_users.clone(),
            session: or_random(&cfg.session_keys),
            api_keys: cfg.api_keys.clone(),
        }
    }
}

fn random_secret() -> Secret {
    let b: [u8; 32] = rand::random();
    Secret::new(URL_SAFE_NO_PAD.encode(b))
}

/// Time-limited TURN credentials handed to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TurnCredentials {
    /// `expiry[:user]`.
    pub username: String,
    /// `base64(HMAC-SHA1(secret, username))`.
    pub password: String,
    /// Seconds the credentials are valid for.
    pub ttl: u64,
    /// Unix time at which they expire.
    pub expires_at: u64,
}

/// What a verified session token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// User id (JWT `sub`, static user name, or open-mode display name).
    #[serde(rename = "u")]
    pub user: String,
    /// Unique id of this login.
    #[serde(rename = "s")]
    pub session_id: String,
    /// The only room this session may join, if limited.
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// Unix expiry.
    #[serde(rename = "e")]
    pub expires_at: u64,
    /// Unix time of the login this session descends from; renewals carry it unchanged,
    /// so `auth.max_session_age_secs` bounds the whole chain. 0 in tokens from before it
    /// was recorded (then the token's own issue time stands in).
    #[serde(rename = "l", default)]
    pub login_at: u64,
}

impl Session {
    /// When this login stops being renewable.
    fn max_age_end(&self, session_ttl: u64, max_age: u64) -> u64 {
        let login = if self.login_at == 0 {
            self.expires_at.saturating_sub(session_ttl)
        } else {
            self.login_at
        };
        login.saturating_add(max_age)
    }
}

/// Users revoked through the server API: credentials issued at or before the revocation
/// second are refused. An entry lives as long as the longest credential it could cover.
#[derive(Debug)]
struct Revocations {
    users: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Bumped on every revocation, so the TURN listeners sweep their tables.
    generation: tokio::sync::watch::Sender<u64>,
}

/// The auth service shared by TURN, the HTTP API and signaling.
pub struct Auth {
    secrets: ArcSwap<Secrets>,
    session_ttl: u64,
    turn_ttl: u64,
    max_session_age: u64,
    revoked: Revocations,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").finish_non_exhaustive()
    }
}

impl Auth {
    /// Build from config.
    pub fn new(cfg: &AuthConfig) -> Auth {
        Auth {
            secrets: ArcSwap::from_pointee(Secrets::from_config(cfg)),
            session_ttl: cfg.session_ttl_secs,
            turn_ttl: cfg.turn_credential_ttl_secs,
            max_session_age: cfg.max_session_age_secs,
            revoked: Revocations {
                users: Default::default(),
                generation: tokio::sync::watch::channel(0).0,
            },
        }
    }

    /// When the login a session descends from happened: renewed tokens keep it, so a
    /// revocation ends the whole chain (older tokens without it: their own issue time).
    pub fn login_time(&self, session: &Session) -> u64 {
        if session.login_at == 0 {
            session.expires_at.saturating_sub(self.session_ttl)
        } else {
            session.login_at
        }
    }

    /// Revoke `user` at `now_unix`: session tokens and TURN credentials issued up to this
    /// second stop verifying, and the TURN listeners are told to end the user's allocations.
    pub fn revoke_user(&self, user: &str, now_unix: u64) {
        {
            let mut m = self.revoked.users.lock().unwrap_or_else(|p| p.into_inner());
            // A renewed chain can outlive one token: keep the entry for the longest of them.
            let keep = self
                .session_ttl
                .max(self.turn_ttl)
                .max(self.max_session_age);
            m.retain(|_, at| at.saturating_add(keep) > now_unix);
            m.insert(user.to_string(), now_unix);
        }
        self.revoked.generation.send_modify(|g| *g += 1);
    }

    /// Changes whenever a user is revoked; TURN listeners wait on it to sweep their tables.
    pub fn revocations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revoked.generation.subscribe()
    }

    /// Whether a credential of `user` issued at `issued_unix` (None: unknown, e.g. a static
    /// TURN user) was revoked.
    pub fn is_revoked(&self, user: &str, issued_unix: Option<u64>) -> bool {
        let m = self.revoked.users.lock().unwrap_or_else(|p| p.into_inner());
        match (m.get(user), issued_unix) {
            (Some(at), Some(issued)) => issued <= *at,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// Whether the TURN username (`expiry:user` REST name, or a static user) was revoked.
    pub fn turn_user_revoked(&self, username: &str) -> bool {
        match username.split_once(':') {
            Some((exp, user)) if !user.is_empty() => {
                let issued = exp
                    .parse::<u64>()
                    .ok()
                    .map(|e| e.saturating_sub(self.turn_ttl));
                self.is_revoked(user, issued)
            }
            _ => self.is_revoked(username, None),
        }
    }

    /// Replace secrets at run time; sessions signed with keys still listed stay valid.
    ///
    /// Where the configuration lists no TURN secret or no session key, the random ones made
    /// at start stay in force: a reload (for a new certificate, say) must not log everyone
    /// out or invalidate every TURN credential handed out so far.
    pub fn reload(&self, cfg: &AuthConfig) {
        let old = self.secrets.load_full();
        let mut new = Secrets::from_config(cfg);
        if cfg.turn_secrets.is_empty() {
            new.turn = old.turn.clone();
        }
        if cfg.session_keys.is_empty() {
            new.session = old.session.clone();
        }
        self.secrets.store(Arc::new(new));
    }

    /// Current secrets snapshot.
    pub fn secrets(&self) -> Arc<Secrets> {
        self.secrets.load_full()
    }

    /// Configured TURN credential lifetime in seconds.
    pub fn turn_ttl(&self) -> u64 {
        self.turn_ttl
    }

    /// Configured session token lifetime in seconds.
    pub fn session_ttl(&self) -> u64 {
        self.session_ttl
    }

    /// Configured longest age of a login in seconds (`auth.max_session_age_secs`).
    pub fn max_session_age(&self) -> u64 {
        self.max_session_age
    }

    /// Whether `key` is one of the configured API keys (constant time over every key).
    pub fn api_key_ok(&self, key: &str) -> bool {
        let secrets = self.secrets.load();
        secrets.api_keys.iter().fold(false, |acc, k| {
            acc | secret_eq(k.expose().as_bytes(), key.as_bytes())
        })
    }

    /// Whether any API key is configured.
    pub fn has_api_keys(&self) -> bool {
        !self.secrets.load().api_keys.is_empty()
    }

    /// Mint coturn-compatible REST credentials for `user`, valid for the configured TTL.
    pub fn turn_credentials(&self, user: Option<&str>, now_unix: u64) -> TurnCredentials {
        self.turn_credentials_for(user, now_unix, self.turn_ttl)
    }

    /// Mint REST credentials with an explicit TTL.
    pub fn turn_credentials_for(
        &self,
        user: Option<&str>,
        now_unix: u64,
        ttl: u64,
    ) -> TurnCredentials {
        let expires_at = now_unix.saturating_add(ttl);
        let username = match user {
            // ':' separates expiry from the user id, so keep it out of the user part.
            Some(u) if !u.is_empty() => format!("{expires_at}:{}", u.replace(':', "_")),
            _ => expires_at.to_string(),
        };
        let secrets = self.secrets.load();
        let password = secrets
            .turn
            .first()
            .map(|s| rest_password(s.expose().as_bytes(), &username))
            .unwrap_or_default();
        TurnCredentials {
            username,
            password,
            ttl,
            expires_at,
        }
    }

    /// Candidate passwords for a TURN username: one per REST secret, or the static password.
    ///
    /// With `now_unix` set, an expired REST username is refused; pass `None` when the
    /// allocation already exists and may outlive its credential (see docs/security.md).
    pub fn turn_passwords(
        &self,
        username: &str,
        now_unix: Option<u64>,
    ) -> Result<Vec<String>, AuthError> {
        if username.is_empty() {
            return Err(AuthError::Missing);
        }
        let secrets = self.secrets.load();
        if self.turn_user_revoked(username) {
            return Err(AuthError::Revoked);
        }
        if let Some(p) = secrets.turn_users.get(username) {
            return Ok(vec![p.expose().to_string()]);
        }
        let expiry_part = username.split(':').next().unwrap_or(username);
        let expiry: u64 = match expiry_part.parse() {
            Ok(e) => e,
            Err(_) => return Err(AuthError::UnknownUser),
        };
        if let Some(now) = now_unix {
            if expiry <= now {
                return Err(AuthError::Expired);
            }
        }
        Ok(secrets
            .turn
            .iter()
            .map(|s| rest_password(s.expose().as_bytes(), username))
            .collect())
    }

    /// Sign a session token for a fresh login of `user`, optionally limited to one room.
    pub fn issue_session(
        &self,
        user: &str,
        room: Option<&str>,
        now_unix: u64,
    ) -> (String, Session) {
        let sid: [u8; 12] = rand::random();
        let session = Session {
            user: user.to_string(),
            session_id: URL_SAFE_NO_PAD.encode(sid),
            room: room.map(str::to_string),
            expires_at: now_unix.saturating_add(self.session_ttl.min(self.max_session_age)),
            login_at: now_unix,
        };
        (self.sign_session(&session), session)
    }

    /// Renew a live session: a new token for the same user, room and login time, expiring
    /// one TTL from `now_unix` but never after the login's maximum age. Refused with
    /// [`AuthError::TooOld`] once that age is reached, so only a new login goes on.
    pub fn renew_session(
        &self,
        old: &Session,
        now_unix: u64,
    ) -> Result<(String, Session), AuthError> {
        let end = old.max_age_end(self.session_ttl, self.max_session_age);
        if end <= now_unix {
            return Err(AuthError::TooOld);
        }
        let session = Session {
            user: old.user.clone(),
            session_id: old.session_id.clone(),
            room: old.room.clone(),
            expires_at: now_unix.saturating_add(self.session_ttl).min(end),
            login_at: if old.login_at == 0 {
                old.expires_at.saturating_sub(self.session_ttl)
            } else {
                old.login_at
            },
        };
        Ok((self.sign_session(&session), session))
    }

    /// When a session must end for good (its login's maximum age), as Unix time.
    pub fn session_end(&self, s: &Session) -> u64 {
        s.max_age_end(self.session_ttl, self.max_session_age)
    }

    fn sign_session(&self, session: &Session) -> String {
        let payload = serde_json::to_vec(session).unwrap_or_default();
        let body = URL_SAFE_NO_PAD.encode(&payload);
        let secrets = self.secrets.load();
        let key = secrets
            .session
            .first()
            .map_or(&[][..], |k| k.expose().as_bytes());
        let sig = hmac_sha256(key, body.as_bytes());
        format!("sb1.{body}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    /// Verify a session token's signature (any current key) and expiry.
    pub fn verify_session(&self, token: &str, now_unix: u64) -> Result<Session, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let mut parts = token.split('.');
        let (Some("sb1"), Some(body), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| AuthError::Malformed)?;
        let secrets = self.secrets.load();
        let ok = secrets.session.iter().fold(false, |acc, key| {
            let want = hmac_sha256(key.expose().as_bytes(), body.as_bytes());
            acc | bool::from(want.as_slice().ct_eq(&sig))
        });
        if !ok {
            return Err(AuthError::BadSignature);
        }
        let payload = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| AuthError::Malformed)?;
        let session: Session =
            serde_json::from_slice(&payload).map_err(|_| AuthError::Malformed)?;
        if session.expires_at <= now_unix {
            return Err(AuthError::Expired);
        }
        if self.session_end(&session) <= now_unix {
            return Err(AuthError::TooOld);
        }
        if self.is_revoked(&session.user, Some(self.login_time(&session))) {
            return Err(AuthError::Revoked);
        }
        Ok(session)
    }
}

/// coturn `static-auth-secret` password: base64(HMAC-SHA1(secret, username)).
pub fn rest_password(secret: &[u8], username: &str) -> String {
    let mut mac = match <Hmac<Sha1> as Mac>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(username.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth_with(secrets: &[&str]) -> Auth {
        let cfg = AuthConfig {
            turn_secrets: secrets.iter().map(|&s| s.into()).collect(),
            session_keys: vec!["0123456789abcdef0123".into()],
            ..Default::default()
        };
        Auth::new(&cfg)
    }

    #[test]
    fn rest_password_matches_coturn_derivation() {
        // Computed independently: printf '%s' 1700000000:alice |
        //   openssl dgst -sha1 -hmac north -binary | base64
        assert_eq!(
            rest_password(b"north", "1700000000:alice"),
            "Cd/49soE35ICqcJF/bCTn8Z4OyE="
        );
    }

    #[test]
    fn issued_turn_credentials_verify_until_expiry() {
        let a = auth_with(&["s1"]);
        let c = a.turn_credentials(Some("bob"), 1000);
        assert_eq!(c.username, format!("{}:bob", 1000 + a.turn_ttl()));
        let pw = a.turn_passwords(&c.username, Some(1001)).unwrap();
        assert_eq!(pw, vec![c.password.clone()]);
        assert_eq!(
            a.turn_passwords(&c.username, Some(c.expires_at)),
            Err(AuthError::Expired)
        );
        assert!(a.turn_passwords(&c.username, None).is_ok());
        assert_eq!(
            a.turn_passwords("nobody", Some(0)),
            Err(AuthError::UnknownUser)
        );
    }

    #[test]
    fn revoked_users_lose_sessions_and_turn_credentials_issued_before() {
        let a = auth_with(&["s"]);
        let (tok, _) = a.issue_session("mallory", None, 100);
        let c = a.turn_credentials(Some("mallory"), 100);
        let (other, _) = a.issue_session("alice", None, 100);
        let mut rx = a.revocations();
        a.revoke_user("mallory", 105);
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        assert_eq!(a.verify_session(&tok, 106), Err(AuthError::Revoked));
        assert_eq!(
            a.turn_passwords(&c.username, Some(106)),
            Err(AuthError::Revoked)
        );
        assert!(a.verify_session(&other, 106).is_ok());
        // A login after the revocation second works again.
        let (fresh, _) = a.issue_session("mallory", None, 106);
        assert!(a.verify_session(&fresh, 107).is_ok());
        assert!(a
            .turn_passwords(
                &a.turn_credentials(Some("mallory"), 106).username,
                Some(107)
            )
            .is_ok());
    }

    #[test]
    fn rotation_accepts_every_listed_secret() {
        let old = auth_with(&["old"]);
        let c = old.turn_credentials(None, 10);
        let both = auth_with(&["new", "old"]);
        let pw = both.turn_passwords(&c.username, Some(11)).unwrap();
        assert!(pw.contains(&c.password));
        let new_only = auth_with(&["new"]);
        assert!(!new_only
            .turn_passwords(&c.username, Some(11))
            .unwrap()
            .contains(&c.password));
    }

    #[test]
    fn reload_without_configured_secrets_keeps_the_random_ones() {
        let a = Auth::new(&AuthConfig::default());
        let (tok, _) = a.issue_session("ann", None, 100);
        let c = a.turn_credentials(Some("ann"), 100);
        a.reload(&AuthConfig::default());
        assert!(a.verify_session(&tok, 101).is_ok());
        assert!(a
            .turn_passwords(&c.username, Some(101))
            .unwrap()
            .contains(&c.password));
        // Configuring secrets does replace them.
        a.reload(&AuthConfig {
            turn_secrets: vec!["configured".into()],
            session_keys: vec!["a-configured-key-16".into()],
            ..Default::default()
        });
        assert_eq!(a.verify_session(&tok, 101), Err(AuthError::BadSignature));
    }

    #[test]
    fn session_tokens_verify_and_resist_tampering() {
        let a = auth_with(&["s"]);
        let (tok, s) = a.issue_session("alice", Some("room1"), 100);
        assert_eq!(a.verify_session(&tok, 101).unwrap(), s);
        assert_eq!(
            a.verify_session(&tok, s.expires_at),
            Err(AuthError::Expired)
        );
        let mut forged = tok.clone();
        forged.replace_range(6..7, if &tok[6..7] == "A" { "B" } else { "A" });
        assert!(a.verify_session(&forged, 101).is_err());
        assert_eq!(a.verify_session("garbage", 1), Err(AuthError::Malformed));
        assert_eq!(a.verify_session("", 1), Err(AuthError::Missing));
        let other = Auth::new(&AuthConfig {
            session_keys: vec!["another-key-of-16-chars".into()],
            ..Default::default()
        });
        assert_eq!(
            other.verify_session(&tok, 101),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn renewal_keeps_the_login_time_and_stops_at_the_max_age() {
        let a = Auth::new(&AuthConfig {
            session_ttl_secs: 600,
            max_session_age_secs: 1000,
            ..Default::default()
        });
        let (_, s0) = a.issue_session("ann", Some("r"), 10_000);
        assert_eq!(s0.login_at, 10_000);
        // Renewed every 300 s, as the WebSocket does: the chain never passes login + 1000.
        let mut s = s0.clone();
        let mut now = 10_000;
        loop {
            now += 300;
            match a.renew_session(&s, now) {
                Ok((tok, next)) => {
                    assert_eq!(next.login_at, 10_000);
                    assert_eq!(next.user, "ann");
                    assert_eq!(next.room.as_deref(), Some("r"));
                    assert!(next.expires_at <= 11_000, "{next:?}");
                    assert_eq!(a.verify_session(&tok, now).unwrap(), next);
                    s = next;
                }
                Err(e) => {
                    assert_eq!(e, AuthError::TooOld);
                    break;
                }
            }
        }
        assert_eq!(now, 11_200);
        assert_eq!(s.expires_at, 11_000);
        // A token minted before login times were recorded counts from its issue time.
        let legacy = Session {
            login_at: 0,
            expires_at: 10_600,
            ..s0
        };
        assert_eq!(a.session_end(&legacy), 11_000);
        assert_eq!(a.renew_session(&legacy, 11_000), Err(AuthError::TooOld));
    }

    #[test]
    fn debug_of_auth_secrets_shows_no_secret() {
        let a = Auth::new(&AuthConfig {
            turn_secrets: vec!["turn-secret-value".into()],
            session_keys: vec!["session-key-value-0123".into()],
            api_keys: vec!["api-key-value".into()],
            turn_users: [("alice".to_string(), "alice-password".into())].into(),
            ..Default::default()
        });
        let dump = format!("{:?} {:?}", a, a.secrets());
        for s in [
            "turn-secret-value",
            "session-key-value-0123",
            "api-key-value",
            "alice-password",
        ] {
            assert!(!dump.contains(s), "{dump}");
        }
        assert!(a.api_key_ok("api-key-value"));
        assert!(!a.api_key_ok("api-key-valuX"));
    }
}
