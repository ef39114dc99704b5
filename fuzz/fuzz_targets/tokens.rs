//! Session tokens and JWTs: any string, and any payload under a valid signature (a stranger
//! cannot sign, but the parsers behind the signature check must not trust what they read).
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use switchboard::auth::jwt::JwtVerifier;
use switchboard::auth::{hmac_sha256, Auth};
use switchboard::config::{AuthConfig, JwtConfig};

const SESSION_KEY: &str = "fuzz-session-key";
const JWT_KEY: &str = "fuzz-jwt-key";

#[derive(Arbitrary, Debug)]
enum Input<'a> {
    /// A session token as a client sends it.
    Session(&'a str, u64),
    /// A session payload signed with the server's key.
    SignedSession(&'a [u8], u64),
    /// A JWT as a client sends it.
    Jwt(&'a str, u64),
    /// A JWT header and claims signed with the HS256 key.
    SignedJwt(&'a [u8], &'a [u8], u64),
}

fn auth() -> &'static (Auth, JwtVerifier) {
    static A: OnceLock<(Auth, JwtVerifier)> = OnceLock::new();
    A.get_or_init(|| {
        let cfg = AuthConfig {
            session_keys: vec![SESSION_KEY.into()],
            ..Default::default()
        };
        let jwt = JwtConfig {
            hs256_secret: Some(JWT_KEY.into()),
            leeway_secs: 30,
            ..Default::default()
        };
        (
            Auth::new(&cfg),
            JwtVerifier::from_config(&jwt).expect("HS256 key"),
        )
    })
}

fn check_session(a: &Auth, token: &str, now: u64) {
    if let Ok(s) = a.verify_session(token, now) {
        assert!(s.expires_at > now, "accepted an expired session");
        assert!(
            a.session_end(&s) > now,
            "accepted a session past its maximum age"
        );
        if let Ok((t, r)) = a.renew_session(&s, now) {
            assert_eq!(r.user, s.user);
            assert!(r.expires_at <= a.session_end(&s));
            let back = a.verify_session(&t, now).expect("a renewed token verifies");
            assert_eq!(back, r);
        }
    }
}

fuzz_target!(|input: Input<'_>| {
    let (a, jwt) = auth();
    match input {
        Input::Session(t, now) => check_session(a, t, now),
        Input::SignedSession(payload, now) => {
            let body = URL_SAFE_NO_PAD.encode(payload);
            let sig = hmac_sha256(SESSION_KEY.as_bytes(), body.as_bytes());
            let t = format!("sb1.{body}.{}", URL_SAFE_NO_PAD.encode(sig));
            check_session(a, &t, now);
        }
        Input::Jwt(t, now) => {
            if let Ok(c) = jwt.verify(t, now) {
                panic!("an unsigned JWT verified: {c:?}");
            }
        }
        Input::SignedJwt(h, c, now) => {
            let signing = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(h),
                URL_SAFE_NO_PAD.encode(c)
            );
            let sig = hmac_sha256(JWT_KEY.as_bytes(), signing.as_bytes());
            let t = format!("{signing}.{}", URL_SAFE_NO_PAD.encode(sig));
            if let Ok(c) = jwt.verify(&t, now) {
                assert!(!c.sub.is_empty() && c.sub.len() <= 256);
                assert!(c.exp.saturating_add(30) > now, "accepted an expired JWT");
            }
        }
    }
});
