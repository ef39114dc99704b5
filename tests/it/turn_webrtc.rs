//! The webrtc-rs `turn` client allocates through switchboard, creates a permission, relays
//! to a UDP echo peer and reads the echo back.

use crate::support::turn_common;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use turn::client::{Client, ClientConfig};
use turn_common::*;
use webrtc_util::Conn;

async fn relay_round_trip(username: String, password: String) {
    let server = start("").await;
    let addr = udp_addr(&server);
    let peer = echo_peer().await;
    let conn = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind client"));
    let client = Client::new(ClientConfig {
        stun_serv_addr: addr.to_string(),
        turn_serv_addr: addr.to_string(),
        username,
        password,
        realm: "switchboard".into(),
        software: String::new(),
        rto_in_ms: 0,
        conn,
        vnet: None,
    })
    .await
    .expect("client");
    client.listen().await.expect("listen");
    let mapped = client.send_binding_request().await.expect("binding");
    assert!(mapped.ip().is_loopback());
    let relay = client.allocate().await.expect("allocate");
    let relayed = relay.local_addr().expect("relayed address");
    assert!(relayed.ip().is_loopback(), "{relayed}");
    let mut buf = vec![0u8; 1500];
    for i in 0..5u8 {
        let msg = [b'e', b'c', b'h', b'o', i];
        // The first send creates the permission (CreatePermission) before relaying.
        relay.send_to(&msg, peer).await.expect("send through relay");
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), relay.recv_from(&mut buf))
            .await
            .expect("echo arrives in time")
            .expect("recv through relay");
        assert_eq!(from, peer);
        assert_eq!(&buf[..n], &msg);
    }
    let sample = "switchboard_turn_relayed_packets_total{direction=\"to_client\"}";
    assert_eq!(metric_reaches(&server, sample, 5).await, 5);
    let text = server.shared().metrics.render();
    assert!(metric(&text, "switchboard_turn_permissions_active") >= 1);
    relay.close().await.expect("close relay");
    client.close().await.expect("close client");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_rs_client_relays_with_rest_credentials() {
    let user = format!("{}:carol", switchboard::auth::unix_now() + 600);
    let pass = switchboard::auth::rest_password(SECRET.as_bytes(), &user);
    relay_round_trip(user, pass).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_rs_client_relays_with_static_user() {
    relay_round_trip(USER.into(), PASS.into()).await;
}
