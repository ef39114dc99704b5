//! The login as the tests call it over HTTP: nearly every part's tests log in first, so the
//! request and its JSON answer are written once.

use serde_json::{json, Value};
use std::net::SocketAddr;

/// `POST /v1/login` on `http` with `body`: the status and the JSON answer (`Null` when the
/// answer is not JSON), so that a test can assert refusals as well as sessions.
pub async fn post_login(http: SocketAddr, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("http://{http}/v1/login"))
        .json(body)
        .send()
        .await
        .expect("login request sent");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The session answer of an open-mode login as `name` (panics unless it is a 200).
pub async fn login(http: SocketAddr, name: &str) -> Value {
    let (status, v) = post_login(http, &json!({ "name": name })).await;
    assert_eq!(status, 200, "login as {name}: {v}");
    v
}

/// The session token of an open-mode login as `name`.
pub async fn login_token(http: SocketAddr, name: &str) -> String {
    login(http, name).await["token"]
        .as_str()
        .expect("login returns a token")
        .to_string()
}
