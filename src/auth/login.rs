//! Login backends (open, static users with argon2id, operator JWTs) and the per-IP
//! login rate limiter. HTTP concerns stay in `http::login`; this decides who someone is.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::Quota;
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use super::jwt::{JwtError, JwtVerifier, KeyError};
use crate::config::{AuthConfig, Backend};

/// Who logged in, and what the session may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Stable user id: JWT `sub`, static user name, or open-mode name with a random suffix.
    pub user: String,
    /// The only room the session may join, if limited (JWT `room` claim).
    pub room: Option<String>,
    /// The backend that vouched for it.
    pub backend: Backend,
}

/// What the client presented.
#[derive(Debug, Clone)]
pub enum Credentials<'a> {
    /// `open`: a display name.
    Name(&'a str),
    /// `users`: a name and password.
    Password {
        /// Login name.
        username: &'a str,
        /// Plain password.
        password: &'a str,
    },
    /// `jwt`: a bearer token.
    Bearer(&'a str),
}

/// Why a login failed; maps to 400 or 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// The backend for these credentials is not enabled.
    #[error("the {0} login backend is not enabled")]
    BackendDisabled(&'static str),
    /// A display name was empty, too long or had control characters.
    #[error("name must be 1 to 64 printable characters")]
    BadName,
    /// Unknown user or wrong password.
    #[error("invalid username or password")]
    BadPassword,
    /// The JWT was refused.
    #[error("invalid token: {0}")]
    Jwt(#[from] JwtError),
}

/// Label for metrics.
pub fn backend_label(b: Backend) -> &'static str {
    match b {
        Backend::Open => "open",
        Backend::Users => "users",
        Backend::Jwt => "jwt",
    }
}

/// The configured backends.
#[derive(Debug)]
pub struct Login {
    backends: Vec<Backend>,
    users: HashMap<String, crate::secret::Secret>,
    jwt: Option<JwtVerifier>,
    /// A valid hash verified when the user is unknown, so timing does not reveal names.
    dummy_hash: String,
}

impl Login {
    /// Whether `token` is a valid JWT from the app backend that carries `admin: true`, so
    /// a backend can call the server API with a short-lived token instead of a static one.
    pub fn admin_jwt(&self, token: &str, now_unix: u64) -> bool {
        self.jwt
            .as_ref()
            .and_then(|v| v.verify(token, now_unix).ok())
            .is_some_and(|c| c.admin)
    }

    /// Build from config; a bad JWT key file is an error naming it.
    pub fn new(cfg: &AuthConfig) -> Result<Login, KeyError> {
        let jwt = if cfg.backends.contains(&Backend::Jwt) {
            Some(JwtVerifier::from_config(&cfg.jwt)?)
        } else {
            None
        };
        Ok(Login {
            backends: cfg.backends.clone(),
            users: cfg
                .users
                .iter()
                .map(|u| (u.name.clone(), u.password_hash.clone()))
                .collect(),
            jwt,
            dummy_hash: hash_password("switchboard-timing-equaliser").unwrap_or_default(),
        })
    }

    /// Also verify JWTs with the issuer's fetched key set (`auth.jwt.jwks_url`), which
    /// is built once at start and handed to every rebuilt `Login`.
    pub fn with_jwks(mut self, jwks: Option<std::sync::Arc<super::jwks::Jwks>>) -> Login {
        self.jwt = self.jwt.map(|v| v.with_jwks(jwks));
        self
    }

    /// [`Login::authenticate`] for a bearer JWT; when its `kid` is not in the fetched key
    /// set, fetch the set again (at most once per `auth.jwt.jwks_min_interval_secs`) and try
    /// once more, so the first token signed with a rotated-in key logs in.
    pub async fn authenticate_bearer(
        &self,
        token: &str,
        now_unix: u64,
    ) -> Result<Identity, LoginError> {
        let c = Credentials::Bearer(token);
        let r = self.authenticate(&c, now_unix);
        match (&r, self.jwt.as_ref().and_then(|v| v.jwks())) {
            (Err(LoginError::Jwt(JwtError::UnknownKey)), Some(jwks)) => {
                jwks.refresh_for_unknown_kid().await;
                self.authenticate(&c, now_unix)
            }
            _ => r,
        }
    }

    /// Whether a backend is enabled.
    pub fn enabled(&self, b: Backend) -> bool {
        self.backends.contains(&b)
    }

    /// Check credentials and say who this is.
    pub fn authenticate(&self, c: &Credentials<'_>, now_unix: u64) -> Result<Identity, LoginError> {
        match *c {
            Credentials::Name(name) => {
                if !self.enabled(Backend::Open) {
                    return Err(LoginError::BackendDisabled("open"));
                }
                let name = name.trim();
                if name.is_empty()
                    || name.chars().count() > 64
                    || name.chars().any(char::is_control)
                {
                    return Err(LoginError::BadName);
                }
                // Two people picking the same name must not replace each other in a room.
                let suffix: [u8; 3] = rand::random();
                let hex: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
                Ok(Identity {
                    user: format!("{name}#{hex}"),
                    room: None,
                    backend: Backend::Open,
                })
            }
            Credentials::Password { username, password } => {
                if !self.enabled(Backend::Users) {
                    return Err(LoginError::BackendDisabled("users"));
                }
                let (hash, known) = match self.users.get(username) {
                    Some(h) => (h.expose(), true),
                    None => (self.dummy_hash.as_str(), false),
                };
                if verify_password(hash, password) && known {
                    Ok(Identity {
                        user: username.to_string(),
                        room: None,
                        backend: Backend::Users,
                    })
                } else {
                    Err(LoginError::BadPassword)
                }
            }
            Credentials::Bearer(token) => {
                let Some(v) = self.jwt.as_ref() else {
                    return Err(LoginError::BackendDisabled("jwt"));
                };
                let c = v.verify(token, now_unix)?;
                Ok(Identity {
                    user: c.sub,
                    room: c.room,
                    backend: Backend::Jwt,
                })
            }
        }
    }
}

/// An argon2id PHC string for `password` (what `switchboard hash-password` prints).
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// Constant-time check of a password against a PHC hash; malformed hashes never verify.
pub fn verify_password(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(h) => Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// Per-IP login limiter (GCRA from `governor`): `per_minute` attempts, refilled
/// continuously, keyed by address (IPv6 by /64).
///
/// Memory stays bounded: once the table holds [`MAX_KEYS`] addresses, keys whose state is
/// back to "fresh" (their tokens refilled) are dropped, at most once a second.
pub struct RateLimiter<C: Clock + Clone = DefaultClock> {
    inner: governor::RateLimiter<IpAddr, HashMapStateStore<IpAddr>, C, NoOpMiddleware<C::Instant>>,
    clock: C,
    last_prune: Mutex<Option<C::Instant>>,
}

impl<C: Clock + Clone> std::fmt::Debug for RateLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("keys", &self.inner.len())
            .finish_non_exhaustive()
    }
}

/// Addresses tracked before fresh ones are pruned.
pub const MAX_KEYS: usize = 100_000;

impl RateLimiter {
    /// Allow `per_minute` attempts per IP.
    pub fn new(per_minute: u32) -> RateLimiter {
        RateLimiter::with_clock(per_minute, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimiter<C> {
    /// Allow `per_minute` attempts per IP, on an explicit clock (tests use a fake one).
    pub fn with_clock(per_minute: u32, clock: C) -> RateLimiter<C> {
        let n = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        RateLimiter {
            inner: governor::RateLimiter::new(
                Quota::per_minute(n),
                HashMapStateStore::default(),
                clock.clone(),
            ),
            clock,
            last_prune: Mutex::new(None),
        }
    }

    /// Take one attempt; `Err(retry_after)` when the IP is over its rate.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        if self.inner.len() >= MAX_KEYS {
            let now = self.clock.now();
            let mut last = self.last_prune.lock().unwrap_or_else(|p| p.into_inner());
            let due = last
                .is_none_or(|l| Duration::from(now.duration_since(l)) >= Duration::from_secs(1));
            if due {
                *last = Some(now);
                self.inner.retain_recent();
            }
        }
        let key = crate::net::ip_key(ip);
        self.inner.check_key(&key).map_err(|not_until| {
            not_until
                .wait_time_from(self.clock.now())
                .max(Duration::from_secs(1))
        })
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Whether no address is tracked.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UserEntry;

    #[test]
    fn users_backend_checks_argon2_hashes() {
        let hash = hash_password("hunter22").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        let cfg = AuthConfig {
            backends: vec![Backend::Users],
            users: vec![UserEntry {
                name: "ann".into(),
                password_hash: hash.into(),
            }],
            ..Default::default()
        };
        let l = Login::new(&cfg).unwrap();
        let ok = l
            .authenticate(
                &Credentials::Password {
                    username: "ann",
                    password: "hunter22",
                },
                0,
            )
            .unwrap();
        assert_eq!(ok.user, "ann");
        for (u, p) in [("ann", "wrong"), ("bob", "hunter22")] {
            assert_eq!(
                l.authenticate(
                    &Credentials::Password {
                        username: u,
                        password: p
                    },
                    0
                ),
                Err(LoginError::BadPassword)
            );
        }
        assert_eq!(
            l.authenticate(&Credentials::Name("x"), 0),
            Err(LoginError::BackendDisabled("open"))
        );
        assert!(!verify_password("not a phc string", "x"));
    }

    #[test]
    fn open_names_are_validated_and_made_unique() {
        let l = Login::new(&AuthConfig::default()).unwrap();
        let a = l.authenticate(&Credentials::Name("Ann"), 0).unwrap();
        let b = l.authenticate(&Credentials::Name("Ann"), 0).unwrap();
        assert!(a.user.starts_with("Ann#"));
        assert_ne!(a.user, b.user);
        for bad in ["", "   ", "a\nb", &"x".repeat(65)] {
            assert_eq!(
                l.authenticate(&Credentials::Name(bad), 0),
                Err(LoginError::BadName)
            );
        }
    }

    #[test]
    fn rate_limiter_refills() {
        let clock = governor::clock::FakeRelativeClock::default();
        let r = RateLimiter::with_clock(2, clock.clone());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(r.check(ip).is_ok());
        assert!(r.check(ip).is_ok());
        let wait = r.check(ip).unwrap_err();
        assert_eq!(wait, Duration::from_secs(30));
        assert!(r.check("192.0.2.2".parse().unwrap()).is_ok());
        clock.advance(Duration::from_secs(31));
        assert!(r.check(ip).is_ok());
        // One IPv6 /64 is one key.
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        assert!(r.check(a).is_ok());
        assert!(r.check(b).is_ok());
        assert!(r.check(a).is_err());
    }

    #[test]
    fn rate_limiter_memory_is_bounded() {
        let clock = governor::clock::FakeRelativeClock::default();
        let r = RateLimiter::with_clock(30, clock.clone());
        for i in 0..MAX_KEYS as u32 {
            let _ = r.check(IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(r.len(), MAX_KEYS);
        // Every one of those is fresh again once refilled, so one more check prunes.
        clock.advance(Duration::from_secs(61));
        assert!(r.check("198.51.100.1".parse().unwrap()).is_ok());
        assert!(r.len() <= 1, "{}", r.len());
    }
}
