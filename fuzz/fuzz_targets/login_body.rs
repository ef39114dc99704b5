//! `POST /v1/login` through the real router: any body, content type and Authorization header
//! gets a typed JSON error or a session that verifies, never a panic or a 500.
#![no_main]

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use switchboard::server::Shared;
use switchboard::Config;
use tower::ServiceExt;

#[derive(Arbitrary, Debug)]
enum ContentType<'a> {
    Json,
    JsonCharset,
    None,
    Other(&'a str),
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    content_type: ContentType<'a>,
    authorization: Option<&'a str>,
    body: &'a [u8],
}

fn env() -> &'static (tokio::runtime::Runtime, Arc<Shared>) {
    static E: OnceLock<(tokio::runtime::Runtime, Arc<Shared>)> = OnceLock::new();
    E.get_or_init(|| {
        // Open names and HS256 JWTs: both answer in microseconds (the argon2 `users` backend
        // would spend the fuzzer's time hashing; its body parsing is shared with these).
        let cfg = Config::from_toml(
            "[http]\nlisten = \"127.0.0.1:0\"\n[auth]\nbackends = [\"open\", \"jwt\"]\n\
             login_rate_per_minute = 4000000000\nturn_secrets = [\"t\"]\n\
             [auth.jwt]\nhs256_secret = \"k\"\n",
        )
        .expect("fuzz config");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        (rt, Shared::unbound(cfg).expect("shared state"))
    })
}

fuzz_target!(|input: Input<'_>| {
    let (rt, shared) = env();
    let mut b = Request::post("/v1/login");
    match input.content_type {
        ContentType::Json => b = b.header(header::CONTENT_TYPE, "application/json"),
        ContentType::JsonCharset => {
            b = b.header(header::CONTENT_TYPE, "Application/JSON; charset=utf-8")
        }
        ContentType::None => {}
        ContentType::Other(v) => b = b.header(header::CONTENT_TYPE, v),
    }
    if let Some(a) = input.authorization {
        b = b.header(header::AUTHORIZATION, a);
    }
    let Ok(mut req) = b.body(Body::from(input.body.to_vec())) else {
        return; // a header value the HTTP layer itself refuses never reaches us
    };
    let peer: SocketAddr = "192.0.2.7:40000".parse().expect("literal");
    req.extensions_mut().insert(ConnectInfo(peer));
    let app = switchboard::http::router(shared.clone());
    let (status, body) = rt.block_on(async {
        let resp = app.oneshot(req).await.expect("infallible router");
        let status = resp.status().as_u16();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, body)
    });
    let v: serde_json::Value = serde_json::from_slice(&body).expect("every answer is JSON");
    match status {
        200 => {
            let token = v["token"].as_str().expect("token");
            let now = switchboard::auth::unix_now();
            let s = shared
                .auth
                .verify_session(token, now)
                .expect("issued token verifies");
            assert_eq!(v["userId"], s.user.as_str());
        }
        400 | 401 | 413 | 415 | 429 => {
            assert!(v["error"]["code"].is_string(), "typed error: {v}");
        }
        other => panic!("unexpected status {other}: {v}"),
    }
});
