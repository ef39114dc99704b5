//! The issuer's JSON Web Key Set (`auth.jwt.jwks_url`): fetched at start, refreshed every
//! `jwks_refresh_secs`, and again when a token names a `kid` the cached set lacks, at most
//! once per `jwks_min_interval_secs` however many such tokens arrive. A failed fetch, or a
//! set with no usable key, keeps the last good set. Keys are public keys only, each pinned
//! to the one algorithm its type allows (RSA: RS256, P-256: ES256, Ed25519: EdDSA).

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use crate::config::JwtConfig;

/// The most bytes of a JWKS answer read; a key set is a few KiB.
const MAX_BYTES: usize = 256 * 1024;
/// How long one fetch may take, connect included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// One usable key of the set.
#[derive(Clone)]
pub struct JwkKey {
    /// Its `kid`.
    pub kid: String,
    /// The only algorithm it verifies.
    pub alg: Algorithm,
    /// The public key.
    pub key: DecodingKey,
}

impl std::fmt::Debug for JwkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwkKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// Why a JWKS could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("auth.jwt.jwks_url: {0}")]
pub struct JwksError(String);

/// The cached key set and what refreshes it; shared by every rebuilt login verifier, so a
/// SIGHUP keeps the keys already fetched.
pub struct Jwks {
    url: reqwest::Url,
    client: reqwest::Client,
    keys: arc_swap::ArcSwap<Vec<JwkKey>>,
    /// When the last fetch began; a fetch for an unknown kid waits its turn here.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    refresh: Duration,
    min_interval: Duration,
    /// Woken by a token with an unknown kid (from synchronous callers).
    wake: tokio::sync::Notify,
    ok: prometheus::IntCounter,
    failed: prometheus::IntCounter,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &self.url.as_str())
            .field("keys", &self.keys.load().len())
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// The key set of `cfg.jwks_url` (none configured: `None`), empty until the first fetch.
    /// `fetches` is the `jwks_fetches_total` family.
    pub fn new(
        cfg: &JwtConfig,
        fetches: &prometheus::IntCounterVec,
    ) -> Result<Option<Arc<Jwks>>, JwksError> {
        let Some(u) = &cfg.jwks_url else {
            return Ok(None);
        };
        let url = reqwest::Url::parse(u).map_err(|e| JwksError(e.to_string()))?;
        let client = crate::https_client::build(None, "auth.jwt.jwks_url", FETCH_TIMEOUT)
            .map_err(|e| JwksError(e.to_string()))?;
        Ok(Some(Arc::new(Jwks {
            url,
            client,
            keys: arc_swap::ArcSwap::from_pointee(Vec::new()),
            last_fetch: tokio::sync::Mutex::new(None),
            refresh: Duration::from_secs(cfg.jwks_refresh_secs.max(1)),
            min_interval: Duration::from_secs(cfg.jwks_min_interval_secs.max(1)),
            wake: tokio::sync::Notify::new(),
            ok: fetches.with_label_values(&["ok"]),
            failed: fetches.with_label_values(&["failed"]),
        })))
    }

    /// Every cached key.
    pub fn all(&self) -> Arc<Vec<JwkKey>> {
        self.keys.load_full()
    }

    /// The cached key named `kid`.
    pub fn key(&self, kid: &str) -> Option<JwkKey> {
        self.keys.load().iter().find(|k| k.kid == kid).cloned()
    }

    /// A token named a kid the set lacks: ask the refresh task for a fetch (rate-limited),
    /// without waiting for it.
    pub fn unknown_kid(&self) {
        self.wake.notify_one();
    }

    /// A token named a kid the set lacks: fetch now unless a fetch began less than
    /// `jwks_min_interval_secs` ago (concurrent callers wait for the one fetch in progress).
    /// True when this call fetched a set.
    pub async fn refresh_for_unknown_kid(&self) -> bool {
        self.fetch(true).await
    }

    /// Fetch and swap in the set; `limited` skips the fetch within the minimum interval.
    async fn fetch(&self, limited: bool) -> bool {
        let mut last = self.last_fetch.lock().await;
        if limited && last.is_some_and(|t| t.elapsed() < self.min_interval) {
            return false;
        }
        *last = Some(Instant::now());
        match self.get().await {
            Ok(keys) if !keys.is_empty() => {
                tracing::debug!(url = %self.url, keys = keys.len(), "JWKS fetched");
                self.keys.store(Arc::new(keys));
                self.ok.inc();
                true
            }
            Ok(_) => {
                tracing::warn!(url = %self.url, "JWKS has no usable key; keeping the last good set");
                self.failed.inc();
                false
            }
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e, "JWKS fetch failed; keeping the last good set");
                self.failed.inc();
                false
            }
        }
    }

    async fn get(&self) -> Result<Vec<JwkKey>, String> {
        let mut r = self
            .client
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("status {}", r.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = r.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_BYTES {
                return Err(format!("larger than {MAX_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        parse(&body)
    }

    /// Fetch at once, then every `jwks_refresh_secs` and when woken by an unknown kid,
    /// until `shutdown` fires.
    pub async fn run(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        let stop = crate::lifecycle::shutdown_signal(shutdown);
        tokio::pin!(stop);
        self.fetch(false).await;
        let mut next = Instant::now() + self.refresh;
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep_until(next) => {
                    self.fetch(false).await;
                    next = Instant::now() + self.refresh;
                }
                _ = self.wake.notified() => {
                    self.fetch(true).await;
                }
            }
        }
    }
}

/// The usable keys of a JWKS document. Keys that do not parse, have no `kid`, are meant for
/// encryption, are symmetric or of another curve, or whose `alg` disagrees with their type
/// are skipped; one bad key does not spoil the others.
pub fn parse(body: &[u8]) -> Result<Vec<JwkKey>, String> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut out = Vec::new();
    for v in set.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(v) else {
            continue;
        };
        let Some(kid) = jwk.common.key_id.clone().filter(|k| !k.is_empty()) else {
            continue;
        };
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            continue;
        }
        let (alg, want) = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => (Algorithm::RS256, KeyAlgorithm::RS256),
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                (Algorithm::ES256, KeyAlgorithm::ES256)
            }
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                (Algorithm::EdDSA, KeyAlgorithm::EdDSA)
            }
            _ => continue,
        };
        if jwk.common.key_algorithm.is_some_and(|a| a != want) {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        out.push(JwkKey { kid, alg, key });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_usable_public_keys_with_a_kid_are_kept() {
        // Ed25519 public key (RFC 8037 A.2) and a P-256 key (RFC 7517 A.1).
        let x_ed = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
        let (x, y) = (
            "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
            "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM",
        );
        let doc = serde_json::json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": x_ed, "kid": "ed"},
            {"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": "ec", "use": "sig"},
            {"kty": "OKP", "crv": "Ed25519", "x": x_ed},
            {"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": "enc", "use": "enc"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "OKP", "crv": "Ed25519", "x": x_ed, "kid": "wrong-alg", "alg": "RS256"},
            {"kty": "RSA", "kid": "broken"},
            "not even an object"
        ]});
        let keys = parse(doc.to_string().as_bytes()).unwrap();
        let got: Vec<(&str, Algorithm)> = keys.iter().map(|k| (k.kid.as_str(), k.alg)).collect();
        assert_eq!(
            got,
            vec![("ed", Algorithm::EdDSA), ("ec", Algorithm::ES256)]
        );
        assert!(parse(b"[]").is_err());
        assert!(parse(b"{\"keys\": []}").unwrap().is_empty());
    }
}
