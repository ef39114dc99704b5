//! The login API with a real HTTP client, one case per backend, and the credentials it
//! hands out used for real TURN allocations by coturn's `turnutils_uclient`.

use crate::support::turn_common;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use switchboard::{Config, RunningServer, Server};

async fn start(extra: &str) -> RunningServer {
    start_with("", extra).await
}

async fn start_with(http_extra: &str, extra: &str) -> RunningServer {
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n{http_extra}\n[turn]\nlisten = [\"127.0.0.1:0\"]\n{extra}"
    );
    let cfg = Config::from_toml(&text).expect("test config is valid");
    Server::new(cfg).start().await.expect("server starts")
}

fn url(srv: &RunningServer, path: &str) -> String {
    format!("http://{}{path}", srv.http_addr())
}

async fn post_json(srv: &RunningServer, body: Value) -> (u16, Value) {
    crate::support::http::post_login(srv.http_addr(), &body).await
}

async fn post_bearer(srv: &RunningServer, token: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url(srv, "/v1/login"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn now() -> u64 {
    switchboard::auth::unix_now()
}

fn turn_entry(v: &Value) -> &Value {
    v["iceServers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s.get("username").is_some())
        .expect("a TURN entry with credentials")
}

#[tokio::test]
async fn open_login_returns_every_address_in_browser_shape() {
    let srv = start("").await;
    let (status, v) = post_json(&srv, json!({"name": "Ann"})).await;
    assert_eq!(status, 200, "{v}");
    let port = srv.bound().udp[0].port();
    let servers = v["iceServers"].as_array().unwrap();
    assert_eq!(
        servers[0],
        json!({"urls": [format!("stun:127.0.0.1:{port}")]})
    );
    let turn = turn_entry(&v);
    assert_eq!(
        turn["urls"],
        json!([
            format!("turn:127.0.0.1:{port}?transport=udp"),
            format!("turn:127.0.0.1:{port}?transport=tcp")
        ])
    );
    let total: usize = servers
        .iter()
        .map(|s| s["urls"].as_array().unwrap().len())
        .sum();
    assert!(total <= 4);
    let user = turn["username"].as_str().unwrap();
    let (expiry, who) = user.split_once(':').unwrap();
    assert!(expiry.parse::<u64>().unwrap() > now());
    assert!(who.starts_with("Ann#"));
    assert_eq!(v["ttl"], 3600);
    assert_eq!(v["signalingUrl"], format!("ws://{}/v1/ws", srv.http_addr()));
    // The session token verifies and names the same user.
    let token = v["token"].as_str().unwrap();
    let s = srv.shared().auth.verify_session(token, now()).unwrap();
    assert_eq!(s.user, v["userId"].as_str().unwrap());
    assert!(v["expiresAt"].as_u64().unwrap() > now());

    // Fresh iceServers with the session token.
    let r = reqwest::Client::new()
        .get(url(&srv, "/v1/ice-servers"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let fresh: Value = r.json().await.unwrap();
    assert_eq!(turn_entry(&fresh)["urls"], turn["urls"]);
    let r = reqwest::Client::new()
        .get(url(&srv, "/v1/ice-servers"))
        .bearer_auth(format!("{token}x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn turns_is_listed_only_when_enabled_and_public_section_applies() {
    let srv = start(
        "[public]\nhost = \"turn.example.com\"\nturn_port = 3478\nturns_port = 443\n\
         signaling_url = \"wss://app.example.com/v1/ws\"\n",
    )
    .await;
    let (_, v) = post_json(&srv, json!({"name": "b"})).await;
    let turn = turn_entry(&v);
    // turns: is absent: no TLS listener is configured, whatever public.turns_port says.
    assert_eq!(
        turn["urls"],
        json!([
            "turn:turn.example.com:3478?transport=udp",
            "turn:turn.example.com:3478?transport=tcp"
        ])
    );
    assert_eq!(
        v["iceServers"][0]["urls"],
        json!(["stun:turn.example.com:3478"])
    );
    assert_eq!(v["signalingUrl"], "wss://app.example.com/v1/ws");
    srv.shutdown();
    srv.wait().await;

    let srv = start("relay = false\n").await;
    let (_, v) = post_json(&srv, json!({"name": "c"})).await;
    assert_eq!(
        v["iceServers"].as_array().unwrap().len(),
        1,
        "STUN only: {v}"
    );
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn bad_requests_get_precise_errors() {
    let srv = start("").await;
    let c = reqwest::Client::new();
    let r = c
        .post(url(&srv, "/v1/login"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "bad_request");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("malformed JSON"));

    let (s, v) = post_json(&srv, json!({"nom": "x"})).await;
    assert_eq!(s, 400);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("`name`"),
        "{v}"
    );

    let r = c
        .post(url(&srv, "/v1/login"))
        .header("content-type", "text/plain")
        .body("name=x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);

    // The users backend is not enabled here.
    let (s, v) = post_json(&srv, json!({"username": "a", "password": "b"})).await;
    assert_eq!(s, 400, "{v}");
    let (s, _) = post_json(&srv, json!({"name": "bad\u{7}name"})).await;
    assert_eq!(s, 400);
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn users_backend_with_argon2_hash_from_the_cli() {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"correct horse\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let srv = start(&format!(
        "[auth]\nbackends = [\"users\"]\n[[auth.users]]\nname = \"ann\"\npassword_hash = \"{hash}\"\n"
    ))
    .await;
    let (s, v) = post_json(
        &srv,
        json!({"username": "ann", "password": "correct horse"}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["userId"], "ann");
    for body in [
        json!({"username": "ann", "password": "wrong"}),
        json!({"username": "bob", "password": "correct horse"}),
    ] {
        let (s, v) = post_json(&srv, body).await;
        assert_eq!(s, 401);
        assert_eq!(v["error"]["code"], "unauthorized");
    }
    let (s, v) = post_json(&srv, json!({"username": "ann"})).await;
    assert_eq!(s, 400);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`password`"));
    // Open mode is off: a bare name is not a login.
    let (s, _) = post_json(&srv, json!({"name": "ann"})).await;
    assert_eq!(s, 400);
    let m = srv.shared().metrics.render();
    assert_eq!(
        turn_common::metric(
            &m,
            "switchboard_logins_total{backend=\"users\",result=\"denied\"}"
        ),
        2
    );
    srv.shutdown();
    srv.wait().await;
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
}

fn hs_token(secret: &str, claims: &Claims<'_>) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn jwt_hs256_backend_checks_signature_and_time() {
    let srv =
        start("[auth]\nbackends = [\"jwt\"]\n[auth.jwt]\nhs256_secret = \"app-secret\"\n").await;
    let good = hs_token(
        "app-secret",
        &Claims {
            sub: "user-42",
            exp: now() + 60,
            nbf: None,
            room: Some("standup"),
        },
    );
    let (s, v) = post_bearer(&srv, &good).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["userId"], "user-42");
    assert_eq!(v["room"], "standup");
    let sess = srv
        .shared()
        .auth
        .verify_session(v["token"].as_str().unwrap(), now())
        .unwrap();
    assert_eq!(sess.room.as_deref(), Some("standup"));

    let cases = [
        (
            "expired",
            hs_token(
                "app-secret",
                &Claims {
                    sub: "u",
                    exp: now() - 5,
                    nbf: None,
                    room: None,
                },
            ),
        ),
        (
            "wrong key",
            hs_token(
                "other",
                &Claims {
                    sub: "u",
                    exp: now() + 60,
                    nbf: None,
                    room: None,
                },
            ),
        ),
        (
            "not yet valid",
            hs_token(
                "app-secret",
                &Claims {
                    sub: "u",
                    exp: now() + 600,
                    nbf: Some(now() + 300),
                    room: None,
                },
            ),
        ),
    ];
    for (what, t) in cases {
        let (s, v) = post_bearer(&srv, &t).await;
        assert_eq!(s, 401, "{what}: {v}");
    }
    // Tampered payload with the original signature.
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    parts[1] = base64_url(&format!(r#"{{"sub":"admin","exp":{}}}"#, now() + 60));
    let (s, _) = post_bearer(&srv, &parts.join(".")).await;
    assert_eq!(s, 401);
    srv.shutdown();
    srv.wait().await;
}

fn base64_url(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

fn openssl(args: &[&str]) {
    let st = Command::new("openssl")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(st.success(), "openssl {args:?}");
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[tokio::test]
async fn jwt_rs256_and_eddsa_with_public_key_files_refuse_alg_confusion() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // RSA: private key as PKCS#1 DER for the minting crate, public key as PEM for the server.
    openssl(&["genrsa", "-out", p(&d.join("rsa.pem")), "2048"]);
    openssl(&[
        "rsa",
        "-in",
        p(&d.join("rsa.pem")),
        "-traditional",
        "-outform",
        "DER",
        "-out",
        p(&d.join("rsa.der")),
    ]);
    openssl(&[
        "rsa",
        "-in",
        p(&d.join("rsa.pem")),
        "-pubout",
        "-out",
        p(&d.join("rsa.pub")),
    ]);
    openssl(&[
        "genpkey",
        "-algorithm",
        "ed25519",
        "-outform",
        "DER",
        "-out",
        p(&d.join("ed.der")),
    ]);
    openssl(&[
        "pkey",
        "-in",
        p(&d.join("ed.der")),
        "-inform",
        "DER",
        "-pubout",
        "-out",
        p(&d.join("ed.pub")),
    ]);
    let claims = Claims {
        sub: "k",
        exp: now() + 60,
        nbf: None,
        room: None,
    };

    let rsa_der = std::fs::read(d.join("rsa.der")).unwrap();
    let srv = start(&format!(
        "[auth]\nbackends = [\"jwt\"]\n[auth.jwt]\npublic_key_file = {:?}\n",
        p(&d.join("rsa.pub"))
    ))
    .await;
    let rs = encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_der(&rsa_der),
    )
    .unwrap();
    assert_eq!(post_bearer(&srv, &rs).await.0, 200);
    // Algorithm confusion: HS256 "signed" with the public key bytes must not pass.
    let pem = std::fs::read(d.join("rsa.pub")).unwrap();
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&pem),
    )
    .unwrap();
    assert_eq!(post_bearer(&srv, &confused).await.0, 401);
    srv.shutdown();
    srv.wait().await;

    let ed_der = std::fs::read(d.join("ed.der")).unwrap();
    let srv = start(&format!(
        "[auth]\nbackends = [\"jwt\"]\n[auth.jwt]\npublic_key_file = {:?}\n",
        p(&d.join("ed.pub"))
    ))
    .await;
    let ed = encode(
        &Header::new(Algorithm::EdDSA),
        &claims,
        &EncodingKey::from_ed_der(&ed_der),
    )
    .unwrap();
    assert_eq!(post_bearer(&srv, &ed).await.0, 200);
    assert_eq!(
        post_bearer(&srv, &rs).await.0,
        401,
        "an RSA token against an Ed25519 key"
    );
    srv.shutdown();
    srv.wait().await;
}

#[tokio::test]
async fn login_attempts_are_rate_limited_per_ip() {
    let srv = start("[auth]\nlogin_rate_per_minute = 3\n").await;
    for _ in 0..3 {
        assert_eq!(post_json(&srv, json!({"name": "x"})).await.0, 200);
    }
    let r = reqwest::Client::new()
        .post(url(&srv, "/v1/login"))
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limited");
    srv.shutdown();
    srv.wait().await;
}

#[test]
fn open_backend_on_a_public_address_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sb.toml");
    std::fs::write(&cfg, "[http]\nlisten = \"0.0.0.0:0\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.backends"));
}

#[tokio::test]
async fn cors_follows_allowed_origins() {
    let srv = start_with("allowed_origins = [\"https://app.example.com\"]", "").await;
    let c = reqwest::Client::new();
    let ok = c
        .post(url(&srv, "/v1/login"))
        .header("origin", "https://app.example.com")
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let other = c
        .post(url(&srv, "/v1/login"))
        .header("origin", "https://evil.example.net")
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    srv.shutdown();
    srv.wait().await;
}

/// The credentials from /v1/login and from /v1/turn-credentials work for a real Allocate.
#[tokio::test]
async fn issued_credentials_allocate_with_turnutils_uclient() {
    let srv = start("[auth]\napi_keys = [\"k-123\"]\n").await;
    let peer = turn_common::start_peer().await;
    let server = srv.bound().udp[0];

    let (_, v) = post_json(&srv, json!({"name": "media"})).await;
    let turn = turn_entry(&v);
    let (u, pw) = (
        turn["username"].as_str().unwrap(),
        turn["credential"].as_str().unwrap(),
    );
    let r = turn_common::uclient(
        server,
        peer.port,
        &["-u", u, "-w", pw, "-n", "10", "-z", "5"],
    )
    .await;
    assert!(
        r.sent >= 10 && r.received == r.sent && r.lost == 0,
        "{}",
        r.output
    );

    let c = reqwest::Client::new();
    let bad = c
        .get(url(
            &srv,
            "/v1/turn-credentials?service=turn&username=janus&key=wrong",
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    let rest: Value = c
        .get(url(
            &srv,
            "/v1/turn-credentials?service=turn&username=janus&key=k-123",
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rest["ttl"], 3600);
    assert!(rest["uris"].as_array().unwrap().len() >= 2);
    let (u, pw) = (
        rest["username"].as_str().unwrap(),
        rest["password"].as_str().unwrap(),
    );
    assert!(u.ends_with(":janus"));
    let r = turn_common::uclient(
        server,
        peer.port,
        &["-u", u, "-w", pw, "-n", "10", "-z", "5"],
    )
    .await;
    assert!(
        r.sent >= 10 && r.received == r.sent && r.lost == 0,
        "{}",
        r.output
    );
    // A forged password for the same username is refused.
    let r = turn_common::uclient(server, peer.port, &["-u", u, "-w", "Zm9yZ2Vk", "-n", "3"]).await;
    assert_ne!(r.received, 3, "{}", r.output);
    srv.shutdown();
    srv.wait().await;
}

/// An Ed25519 signing key made in the test, and its public JWK `x`.
fn ed25519_key() -> (EncodingKey, String) {
    use base64::Engine;
    use ring::signature::{Ed25519KeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let kp = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(kp.public_key().as_ref());
    (EncodingKey::from_ed_der(pkcs8.as_ref()), x)
}

fn ed_token(key: &EncodingKey, kid: &str, sub: &str) -> String {
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some(kid.to_string());
    encode(&h, &json!({"sub": sub, "exp": now() + 60}), key).unwrap()
}

/// `auth.jwt.jwks_url`: keys come from a JWKS server in the test that rotates them. The first
/// token signed with a rotated-in key logs in (a fetch on the unknown kid), a rotated-out kid
/// stops working, a flood of made-up kids costs at most one fetch per
/// `jwks_min_interval_secs`, and while the URL is down the last good set stays in use.
#[tokio::test]
async fn jwks_keys_are_fetched_rotated_rate_limited_and_kept_while_down() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    let (key_a, x_a) = ed25519_key();
    let (key_b, x_b) = ed25519_key();
    let jwk = |kid: &str, x: &str| json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "use": "sig"});
    let doc = Arc::new(Mutex::new(json!({"keys": [jwk("a", &x_a)]})));
    let hits = Arc::new(AtomicUsize::new(0));
    let down = Arc::new(AtomicBool::new(false));
    let (d, h, dn) = (doc.clone(), hits.clone(), down.clone());
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let (d, h, dn) = (d.clone(), h.clone(), dn.clone());
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                if dn.load(Ordering::SeqCst) {
                    return (axum::http::StatusCode::SERVICE_UNAVAILABLE, String::new());
                }
                let body = d.lock().unwrap().to_string();
                (axum::http::StatusCode::OK, body)
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    const MIN_INTERVAL: u64 = 2;
    let srv = start(&format!(
        "[auth]\nbackends = [\"jwt\"]\n[auth.jwt]\njwks_url = \"http://{jwks_addr}/jwks\"\n\
         jwks_min_interval_secs = {MIN_INTERVAL}\n"
    ))
    .await;
    let wait_interval = || tokio::time::sleep(Duration::from_millis(MIN_INTERVAL * 1000 + 100));

    let (s, v) = post_bearer(&srv, &ed_token(&key_a, "a", "ann")).await;
    assert_eq!(s, 200, "key a from the set: {v}");
    assert_eq!(v["userId"], "ann");
    let (s, _) = post_bearer(&srv, &ed_token(&key_b, "a", "mallory")).await;
    assert_eq!(s, 401, "kid a with another key's signature");

    // The issuer rotates: only key b is published now.
    *doc.lock().unwrap() = json!({"keys": [jwk("b", &x_b)]});
    wait_interval().await;
    let (s, v) = post_bearer(&srv, &ed_token(&key_b, "b", "bob")).await;
    assert_eq!(s, 200, "the first token of the new key logs in: {v}");
    wait_interval().await;
    let (s, _) = post_bearer(&srv, &ed_token(&key_a, "a", "ann")).await;
    assert_eq!(s, 401, "the rotated-out key no longer verifies");

    // Made-up kids: at most one fetch per interval, however many arrive.
    let before = hits.load(Ordering::SeqCst);
    let t = Instant::now();
    for i in 0..20 {
        let (s, _) = post_bearer(&srv, &ed_token(&key_b, &format!("bogus-{i}"), "x")).await;
        assert_eq!(s, 401);
    }
    let fetched = hits.load(Ordering::SeqCst) - before;
    let allowed = 1 + (t.elapsed().as_secs() / MIN_INTERVAL) as usize;
    assert!(
        fetched <= allowed,
        "{fetched} fetches for 20 unknown kids in {:?} (at most {allowed})",
        t.elapsed()
    );

    // The URL goes down: a fetch is tried and fails, and key b keeps working.
    down.store(true, Ordering::SeqCst);
    wait_interval().await;
    let before = hits.load(Ordering::SeqCst);
    let (s, _) = post_bearer(&srv, &ed_token(&key_b, "c", "x")).await;
    assert_eq!(s, 401);
    assert!(hits.load(Ordering::SeqCst) > before, "a fetch was tried");
    let (s, v) = post_bearer(&srv, &ed_token(&key_b, "b", "bob")).await;
    assert_eq!(s, 200, "the last good set stays while the URL is down: {v}");
    let m = srv.shared().metrics.render();
    assert!(
        turn_common::metric(&m, "switchboard_jwks_fetches_total{result=\"failed\"}") >= 1,
        "{m}"
    );
    srv.shutdown();
    srv.wait().await;
}
