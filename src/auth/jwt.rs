//! Verification of JWTs minted by the operator's own app backend: HS256 with a shared
//! secret, RS256 or EdDSA (Ed25519) with a PEM public key. The algorithm is fixed by the
//! configured key, never by the token, so `none` and algorithm confusion are refused.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{UnparsedPublicKey, ED25519, RSA_PKCS1_2048_8192_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::SubjectPublicKeyInfoDer;
use serde::Deserialize;
use std::path::Path;
use subtle::ConstantTimeEq;

use crate::config::JwtConfig;

/// Why a JWT was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts, or unparsable JSON.
    #[error("malformed token")]
    Malformed,
    /// `alg` does not match the configured key.
    #[error("token algorithm {0} is not accepted")]
    Algorithm(String),
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

#[derive(Debug, Clone)]
enum Key {
    Hs256(Vec<u8>),
    Rs256(Vec<u8>),
    Ed25519(Vec<u8>),
}

/// A verifier built once from config.
#[derive(Debug, Clone)]
pub struct JwtVerifier {
    keys: Vec<Key>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
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
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct RawClaims {
    sub: Option<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
    iss: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    room: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

impl JwtVerifier {
    /// Load keys from config; a bad key file is an error naming it.
    pub fn from_config(cfg: &JwtConfig) -> Result<JwtVerifier, KeyError> {
        let mut keys = Vec::new();
        if let Some(s) = &cfg.hs256_secret {
            keys.push(Key::Hs256(s.as_bytes().to_vec()));
        }
        if let Some(p) = &cfg.public_key_file {
            keys.push(load_public_key(p)?);
        }
        Ok(JwtVerifier {
            keys,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway: cfg.leeway_secs,
        })
    }

    /// Verify signature and claims at `now_unix`.
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<Claims, JwtError> {
        let mut parts = token.trim().split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header: Header = decode_json(h)?;
        let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| JwtError::Malformed)?;
        let signed = &token.trim()[..h.len() + 1 + p.len()];
        let mut alg_known = false;
        let mut ok = false;
        for k in &self.keys {
            match (k, header.alg.as_str()) {
                (Key::Hs256(secret), "HS256") => {
                    alg_known = true;
                    let want = super::hmac_sha256(secret, signed.as_bytes());
                    ok |= bool::from(want.as_slice().ct_eq(&sig));
                }
                (Key::Rs256(der), "RS256") => {
                    alg_known = true;
                    ok |= UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, der)
                        .verify(signed.as_bytes(), &sig)
                        .is_ok();
                }
                (Key::Ed25519(raw), "EdDSA") => {
                    alg_known = true;
                    ok |= UnparsedPublicKey::new(&ED25519, raw)
                        .verify(signed.as_bytes(), &sig)
                        .is_ok();
                }
                _ => {}
            }
        }
        if !alg_known {
            return Err(JwtError::Algorithm(header.alg));
        }
        if !ok {
            return Err(JwtError::Signature);
        }
        let c: RawClaims = decode_json(p)?;
        let exp = c.exp.ok_or(JwtError::Expired)?;
        if exp.saturating_add(self.leeway) <= now_unix {
            return Err(JwtError::Expired);
        }
        if let Some(nbf) = c.nbf {
            if nbf > now_unix.saturating_add(self.leeway) {
                return Err(JwtError::NotYetValid);
            }
        }
        if let Some(iss) = &self.issuer {
            if c.iss.as_deref() != Some(iss.as_str()) {
                return Err(JwtError::Claims);
            }
        }
        if let Some(aud) = &self.audience {
            let matches = match &c.aud {
                Some(Audience::One(a)) => a == aud,
                Some(Audience::Many(v)) => v.iter().any(|a| a == aud),
                None => false,
            };
            if !matches {
                return Err(JwtError::Claims);
            }
        }
        let sub = c
            .sub
            .filter(|s| !s.is_empty() && s.len() <= 256)
            .ok_or(JwtError::NoSubject)?;
        Ok(Claims {
            sub,
            room: c.room.filter(|r| !r.is_empty()),
            exp,
        })
    }
}

fn decode_json<T: for<'de> Deserialize<'de>>(part: &str) -> Result<T, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)
}

fn load_public_key(path: &Path) -> Result<Key, KeyError> {
    let err = |message: String| KeyError {
        path: path.display().to_string(),
        message,
    };
    let spki = SubjectPublicKeyInfoDer::from_pem_file(path)
        .map_err(|e| err(format!("expected a PEM `PUBLIC KEY`: {e}")))?;
    let (oid, key) = split_spki(spki.as_ref()).ok_or_else(|| err("malformed SPKI".into()))?;
    if oid == OID_RSA {
        Ok(Key::Rs256(key.to_vec()))
    } else if oid == OID_ED25519 {
        Ok(Key::Ed25519(key.to_vec()))
    } else {
        Err(err(
            "only RSA (RS256) and Ed25519 (EdDSA) keys are supported".into(),
        ))
    }
}

/// One DER TLV: (tag, value, rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&l0, rest) = rest.split_first()?;
    let (len, rest) = if l0 < 0x80 {
        (l0 as usize, rest)
    } else {
        let n = (l0 & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// SubjectPublicKeyInfo → (algorithm OID, subjectPublicKey bits without the unused-bits byte).
fn split_spki(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (0x30, spki, _) = tlv(der)? else {
        return None;
    };
    let (0x30, alg, rest) = tlv(spki)? else {
        return None;
    };
    let (0x06, oid, _) = tlv(alg)? else {
        return None;
    };
    let (0x03, bits, _) = tlv(rest)? else {
        return None;
    };
    let (&unused, key) = bits.split_first()?;
    (unused == 0).then_some((oid, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs(secret: &str) -> JwtVerifier {
        JwtVerifier::from_config(&JwtConfig {
            hs256_secret: Some(secret.into()),
            ..Default::default()
        })
        .unwrap()
    }

    fn mint_hs(secret: &str, header: &str, claims: &str) -> String {
        let h = URL_SAFE_NO_PAD.encode(header);
        let p = URL_SAFE_NO_PAD.encode(claims);
        let sig = super::super::hmac_sha256(secret.as_bytes(), format!("{h}.{p}").as_bytes());
        format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    #[test]
    fn hs256_round_trip_and_claim_checks() {
        let v = hs("s3cret");
        let t = mint_hs(
            "s3cret",
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"u1","exp":200,"room":"r"}"#,
        );
        let c = v.verify(&t, 100).unwrap();
        assert_eq!(c.sub, "u1");
        assert_eq!(c.room.as_deref(), Some("r"));
        assert_eq!(v.verify(&t, 200), Err(JwtError::Expired));
        assert_eq!(hs("other").verify(&t, 100), Err(JwtError::Signature));
        let nbf = mint_hs(
            "s3cret",
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"u","exp":500,"nbf":300}"#,
        );
        assert_eq!(v.verify(&nbf, 100), Err(JwtError::NotYetValid));
        let nosub = mint_hs("s3cret", r#"{"alg":"HS256"}"#, r#"{"exp":500}"#);
        assert_eq!(v.verify(&nosub, 100), Err(JwtError::NoSubject));
        let noexp = mint_hs("s3cret", r#"{"alg":"HS256"}"#, r#"{"sub":"u"}"#);
        assert_eq!(v.verify(&noexp, 100), Err(JwtError::Expired));
    }

    #[test]
    fn none_and_confused_algorithms_are_refused() {
        let v = hs("s3cret");
        let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
        let p = URL_SAFE_NO_PAD.encode(r#"{"sub":"u","exp":999}"#);
        assert_eq!(
            v.verify(&format!("{h}.{p}."), 1),
            Err(JwtError::Algorithm("none".into()))
        );
        let rs = mint_hs("s3cret", r#"{"alg":"RS256"}"#, r#"{"sub":"u","exp":999}"#);
        assert_eq!(v.verify(&rs, 1), Err(JwtError::Algorithm("RS256".into())));
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
        let good = mint_hs(
            "k",
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"u","exp":9,"iss":"app","aud":["x","sb"]}"#,
        );
        assert!(v.verify(&good, 1).is_ok());
        let bad = mint_hs(
            "k",
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"u","exp":9,"iss":"app","aud":"x"}"#,
        );
        assert_eq!(v.verify(&bad, 1), Err(JwtError::Claims));
    }
}
