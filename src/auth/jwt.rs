//! Verification of JWTs minted by the operator's own app backend, on the `jsonwebtoken`
//! crate: HS256 with a shared secret, RS256, ES256 or EdDSA with a PEM public key. Each
//! configured key has one pinned `Validation` whose only algorithm is fixed by the key,
//! never by the token, so `none` and algorithm confusion are refused. A token that names a
//! `kid` is checked only against the key configured with that id.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::path::Path;

use crate::config::JwtConfig;
use crate::secret::Secret;

/// Why a JWT was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts, unparsable JSON, or an algorithm nobody implements.
    #[error("malformed token")]
    Malformed,
    /// `alg` does not match any configured key.
    #[error("token algorithm {0} is not accepted")]
    Algorithm(String),
    /// The token names a `kid` that no configured key has.
    #[error("token key id is not configured")]
    UnknownKey,
    /// The signature does not verify.
    #[error("bad signature")]
    Signature,
    /// `exp` is missing or has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iss` or `aud` does not match the configuration.
    #[error("token issuer or audience mismatch")]
    Claims,
    /// `sub` is missing or empty.
    #[error("token has no subject")]
    NoSubject,
}

/// The key loading error, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("JWT public key file {path}: {message}")]
pub struct KeyError {
    path: String,
    message: String,
}

/// One configured key with its pinned validation.
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // DecodingKey holds the HS256 secret: never print it.
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// A verifier built once from config (and again on SIGHUP).
#[derive(Debug)]
pub struct JwtVerifier {
    keys: Vec<Key>,
    leeway: u64,
    /// The issuer's fetched key set (`auth.jwt.jwks_url`), which outlives reloads.
    jwks: Option<std::sync::Arc<super::jwks::Jwks>>,
    /// The pinned validation of each algorithm a JWKS key may have.
    jwks_validation: Vec<(Algorithm, Validation)>,
}

/// The claims switchboard uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `sub`: becomes the user id.
    pub sub: String,
    /// `room`: the only room the session may join.
    pub room: Option<String>,
    /// `exp`.
    pub exp: u64,
    /// `admin: true`: the app backend grants this token the server API (`/v1/admin/`).
    pub admin: bool,
}

#[derive(Deserialize)]
struct RawClaims {
    sub: Option<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
    room: Option<String>,
    #[serde(default)]
    admin: Option<bool>,
}

impl JwtVerifier {
    /// Load keys from config; a bad key file is an error naming it.
    pub fn from_config(cfg: &JwtConfig) -> Result<JwtVerifier, KeyError> {
        let mut keys = Vec::new();
        let mut add = |kid: Option<&str>, secret: Option<&Secret>, file: Option<&Path>| {
            let (alg, key) = match (secret, file) {
                (Some(s), _) => (
                    Algorithm::HS256,
                    DecodingKey::from_secret(s.expose().as_bytes()),
                ),
                (None, Some(p)) => load_public_key(p)?,
                (None, None) => return Ok(()),
            };
            keys.push(Key {
                kid: kid.map(str::to_string),
                alg,
                key,
                validation: validation(cfg, alg),
            });
            Ok::<(), KeyError>(())
        };
        add(None, cfg.hs256_secret.as_ref(), None)?;
        add(None, None, cfg.public_key_file.as_deref())?;
        for k in &cfg.keys {
            add(
                Some(&k.kid),
                k.hs256_secret.as_ref(),
                k.public_key_file.as_deref(),
            )?;
        }
        Ok(JwtVerifier {
            keys,
            leeway: cfg.leeway_secs,
            jwks: None,
            jwks_validation: [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA]
                .into_iter()
                .map(|a| (a, validation(cfg, a)))
                .collect(),
        })
    }

    /// Also verify with the keys of `jwks`, picked by the token's `kid`.
    pub fn with_jwks(mut self, jwks: Option<std::sync::Arc<super::jwks::Jwks>>) -> JwtVerifier {
        self.jwks = jwks;
        self
    }

    /// The fetched key set, if one is configured.
    pub fn jwks(&self) -> Option<&std::sync::Arc<super::jwks::Jwks>> {
        self.jwks.as_ref()
    }

    /// Verify signature and claims at `now_unix`.
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<Claims, JwtError> {
        let token = token.trim();
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
        let fetched = self.jwks.as_ref().map(|j| j.all()).unwrap_or_default();
        let jwks_validation = |alg: Algorithm| {
            self.jwks_validation
                .iter()
                .find(|(a, _)| *a == alg)
                .map(|(_, v)| v)
        };
        fn configured(k: &Key) -> (Algorithm, &DecodingKey, &Validation) {
            (k.alg, &k.key, &k.validation)
        }
        // A named kid picks its key: configured first, then the issuer's set; keys configured
        // without a kid stand in for ids neither knows.
        let mut unknown_kid = false;
        let candidates: Vec<(Algorithm, &DecodingKey, &Validation)> = match &header.kid {
            Some(kid) => {
                let named: Vec<_> = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                    .map(configured)
                    .collect();
                if !named.is_empty() {
                    named
                } else if let Some(j) = fetched.iter().find(|j| &j.kid == kid) {
                    jwks_validation(j.alg)
                        .map(|v| (j.alg, &j.key, v))
                        .into_iter()
                        .collect()
                } else {
                    unknown_kid = true;
                    self.keys
                        .iter()
                        .filter(|k| k.kid.is_none())
                        .map(configured)
                        .collect()
                }
            }
            None => self
                .keys
                .iter()
                .map(configured)
                .chain(
                    fetched
                        .iter()
                        .filter_map(|j| jwks_validation(j.alg).map(|v| (j.alg, &j.key, v))),
                )
                .collect(),
        };
        let r = self.try_keys(token, &header, &candidates, now_unix);
        if unknown_kid && r.is_err() {
            if let Some(j) = &self.jwks {
                // Perhaps the issuer rotated: ask for a (rate-limited) refresh.
                j.unknown_kid();
                return Err(JwtError::UnknownKey);
            }
        }
        r
    }

    /// Verify `token` with each candidate key of the header's algorithm.
    fn try_keys(
        &self,
        token: &str,
        header: &jsonwebtoken::Header,
        candidates: &[(Algorithm, &DecodingKey, &Validation)],
        now_unix: u64,
    ) -> Result<Claims, JwtError> {
        if candidates.is_empty() {
            return Err(JwtError::UnknownKey);
        }
        let mut last = None;
        for (_, key, validation) in candidates.iter().filter(|(a, _, _)| *a == header.alg) {
            match jsonwebtoken::decode::<RawClaims>(token, key, validation) {
                Ok(data) => return self.check_time(data.claims, now_unix),
                Err(e) => {
                    let e = map_error(e.kind());
                    // A signature that verifies under one key outranks a mismatch under another.
                    if last.is_none() || e != JwtError::Signature {
                        last = Some(e);
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| JwtError::Algorithm(format!("{:?}", header.alg))))
    }

    /// `exp`/`nbf` against the caller's clock (the crate also checks its own, at the
    /// same leeway), and the subject.
    fn check_time(&self, c: RawClaims, now_unix: u64) -> Result<Claims, JwtError> {
        let exp = c.exp.ok_or(JwtError::Expired)?;
        if exp.saturating_add(self.leeway) <= now_unix {
            return Err(JwtError::Expired);
        }
        if c.nbf
            .is_some_and(|nbf| nbf > now_unix.saturating_add(self.leeway))
        {
            return Err(JwtError::NotYetValid);
        }
        let sub = c
            .sub
            .filter(|s| !s.is_empty() && s.len() <= 256)
            .ok_or(JwtError::NoSubject)?;
        Ok(Claims {
            sub,
            room: c.room.filter(|r| !r.is_empty()),
            exp,
            admin: c.admin == Some(true),
        })
    }
}

/// The pinned validation for one key: its algorithm only, `exp` required, `nbf` checked,
/// `iss`/`aud` required when configured (and a token with an `aud` refused when none is).
fn validation(cfg: &JwtConfig, alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = cfg.leeway_secs;
    v.validate_exp = true;
    v.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    if let Some(iss) = &cfg.issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    // `validate_aud` stays on (the crate's default): with no audience configured, the crate
    // refuses any token that carries an `aud`, since it was minted for some other service.
    if let Some(aud) = &cfg.audience {
        v.set_audience(&[aud]);
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    v
}

fn map_error(kind: &ErrorKind) -> JwtError {
    match kind {
        ErrorKind::InvalidSignature => JwtError::Signature,
        ErrorKind::InvalidAlgorithm => JwtError::Algorithm("mismatch".into()),
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => JwtError::Claims,
        ErrorKind::MissingRequiredClaim(c) if c == "exp" => JwtError::Expired,
        ErrorKind::MissingRequiredClaim(c) if c == "sub" => JwtError::NoSubject,
        ErrorKind::MissingRequiredClaim(_) => JwtError::Claims,
        _ => JwtError::Malformed,
    }
}

/// A PEM public key: RSA (RS256), P-256 (ES256) or Ed25519 (EdDSA), by its own type.
fn load_public_key(path: &Path) -> Result<(Algorithm, DecodingKey), KeyError> {
    let err = |message: String| KeyError {
        path: path.display().to_string(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((Algorithm::RS256, k));
    }
    if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
        return Ok((Algorithm::EdDSA, k));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
        return Ok((Algorithm::ES256, k));
    }
    Err(err(
        "expected a PEM public key: RSA (RS256), P-256 (ES256) or Ed25519 (EdDSA)".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::JwtKeyConfig;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn hs(secret: &str) -> JwtVerifier {
        JwtVerifier::from_config(&JwtConfig {
            hs256_secret: Some(secret.into()),
            ..Default::default()
        })
        .unwrap()
    }

    fn now() -> u64 {
        crate::auth::unix_now()
    }

    fn mint(secret: &str, kid: Option<&str>, claims: serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = kid.map(str::to_string);
        encode(&h, &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    #[test]
    fn hs256_round_trip_and_claim_checks() {
        let v = hs("s3cret");
        let t0 = now();
        let t = mint(
            "s3cret",
            None,
            serde_json::json!({"sub":"u1","exp":t0 + 100,"room":"r"}),
        );
        let c = v.verify(&t, t0).unwrap();
        assert_eq!(c.sub, "u1");
        assert_eq!(c.room.as_deref(), Some("r"));
        assert_eq!(v.verify(&t, t0 + 100), Err(JwtError::Expired));
        assert_eq!(hs("other").verify(&t, t0), Err(JwtError::Signature));
        let nbf = mint(
            "s3cret",
            None,
            serde_json::json!({"sub":"u","exp":t0 + 500,"nbf":t0 + 300}),
        );
        assert_eq!(v.verify(&nbf, t0), Err(JwtError::NotYetValid));
        let nosub = mint("s3cret", None, serde_json::json!({"exp":t0 + 500}));
        assert_eq!(v.verify(&nosub, t0), Err(JwtError::NoSubject));
        let noexp = mint("s3cret", None, serde_json::json!({"sub":"u"}));
        assert_eq!(v.verify(&noexp, t0), Err(JwtError::Expired));
        let old = mint("s3cret", None, serde_json::json!({"sub":"u","exp":t0 - 10}));
        assert_eq!(
            v.verify(&old, t0 - 20),
            Err(JwtError::Expired),
            "crate clock too"
        );
    }

    #[test]
    fn none_and_confused_algorithms_are_refused() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        let v = hs("s3cret");
        let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
        let p = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"u","exp":{}}}"#, now() + 99));
        assert!(v.verify(&format!("{h}.{p}."), now()).is_err());
        let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#);
        assert_eq!(
            v.verify(&format!("{h}.{p}.AAAA"), now()),
            Err(JwtError::Algorithm("RS256".into()))
        );
        assert_eq!(v.verify("a.b", 1), Err(JwtError::Malformed));
        assert_eq!(v.verify("!!.!!.!!", 1), Err(JwtError::Malformed));
    }

    #[test]
    fn issuer_and_audience_are_enforced() {
        let v = JwtVerifier::from_config(&JwtConfig {
            hs256_secret: Some("k".into()),
            issuer: Some("app".into()),
            audience: Some("sb".into()),
            ..Default::default()
        })
        .unwrap();
        let exp = now() + 60;
        let good = mint(
            "k",
            None,
            serde_json::json!({"sub":"u","exp":exp,"iss":"app","aud":["x","sb"]}),
        );
        assert!(v.verify(&good, now()).is_ok());
        let bad = mint(
            "k",
            None,
            serde_json::json!({"sub":"u","exp":exp,"iss":"app","aud":"x"}),
        );
        assert_eq!(v.verify(&bad, now()), Err(JwtError::Claims));
        let no_iss = mint(
            "k",
            None,
            serde_json::json!({"sub":"u","exp":exp,"aud":"sb"}),
        );
        assert_eq!(v.verify(&no_iss, now()), Err(JwtError::Claims));
    }

    /// docs/security.md: a token minted for another service (it carries an `aud`) is refused
    /// when no audience is configured; with one configured, `aud` is required and matched.
    #[test]
    fn audience_is_checked_with_and_without_one_configured() {
        let exp = now() + 60;
        let none = hs("k");
        let plain = mint("k", None, serde_json::json!({"sub":"u","exp":exp}));
        assert!(
            none.verify(&plain, now()).is_ok(),
            "no aud, none configured"
        );
        for aud in [
            serde_json::json!("other-service"),
            serde_json::json!(["a", "b"]),
        ] {
            let t = mint(
                "k",
                None,
                serde_json::json!({"sub":"u","exp":exp,"aud":aud}),
            );
            assert_eq!(
                none.verify(&t, now()),
                Err(JwtError::Claims),
                "a token for {aud} with no audience configured"
            );
        }
        let sb = JwtVerifier::from_config(&JwtConfig {
            hs256_secret: Some("k".into()),
            audience: Some("sb".into()),
            ..Default::default()
        })
        .unwrap();
        let ok = mint(
            "k",
            None,
            serde_json::json!({"sub":"u","exp":exp,"aud":"sb"}),
        );
        assert!(sb.verify(&ok, now()).is_ok());
        let wrong = mint(
            "k",
            None,
            serde_json::json!({"sub":"u","exp":exp,"aud":"other"}),
        );
        assert_eq!(sb.verify(&wrong, now()), Err(JwtError::Claims), "wrong aud");
        assert_eq!(
            sb.verify(&plain, now()),
            Err(JwtError::Claims),
            "aud missing"
        );
    }

    #[test]
    fn kid_selects_its_key_and_unknown_kids_are_refused() {
        let v = JwtVerifier::from_config(&JwtConfig {
            keys: vec![
                JwtKeyConfig {
                    kid: "a".into(),
                    hs256_secret: Some("secret-a".into()),
                    ..Default::default()
                },
                JwtKeyConfig {
                    kid: "b".into(),
                    hs256_secret: Some("secret-b".into()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        })
        .unwrap();
        let c = serde_json::json!({"sub":"u","exp":now() + 60});
        assert!(v
            .verify(&mint("secret-a", Some("a"), c.clone()), now())
            .is_ok());
        assert!(v
            .verify(&mint("secret-b", Some("b"), c.clone()), now())
            .is_ok());
        // Signed with b's secret but claiming a: only a's key is tried.
        assert_eq!(
            v.verify(&mint("secret-b", Some("a"), c.clone()), now()),
            Err(JwtError::Signature)
        );
        assert_eq!(
            v.verify(&mint("secret-a", Some("zz"), c.clone()), now()),
            Err(JwtError::UnknownKey)
        );
        // No kid: every key is a candidate.
        assert!(v.verify(&mint("secret-b", None, c), now()).is_ok());
        assert!(!format!("{v:?}").contains("secret-a"));
    }
}
