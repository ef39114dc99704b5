//! `/metrics` after real traffic — a TURN relay by coturn's client, a login, a room join —
//! passes Prometheus's own `promtool check metrics`, and the counters moved by the right amounts.

use crate::support::turn_common;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};
use tokio_tungstenite::tungstenite::Message;
use turn_common::metric;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_after_real_traffic_passes_promtool_and_counts_right() {
    let srv = turn_common::start("").await;
    let http = srv.http_addr();
    let peer = turn_common::start_peer().await;

    // A TURN relay: 10 messages each on an RTP/RTCP pair of allocations, echoed back.
    let r = turn_common::uclient(
        turn_common::udp_addr(&srv),
        peer.port,
        &["-W", turn_common::SECRET, "-n", "10", "-z", "5"],
    )
    .await;
    assert!(
        r.sent > 0 && r.received == r.sent && r.lost == 0,
        "{}",
        r.output
    );

    // A login and a room join.
    let v = crate::support::http::login(http, "metrics").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{http}/v1/ws"))
        .await
        .unwrap();
    for f in [
        json!({"type": "hello", "token": v["token"]}),
        json!({"type": "create", "name": "m"}),
        json!({"type": "join", "room": "m"}),
    ] {
        ws.send(Message::Text(f.to_string().into())).await.unwrap();
    }
    loop {
        if let Message::Text(t) = ws.next().await.unwrap().unwrap() {
            let f: Value = serde_json::from_str(&t).unwrap();
            assert_ne!(f["type"], "error", "{f}");
            if f["type"] == "joined" {
                break;
            }
        }
    }

    // Relay counters are flushed once per batch, just after the packets go out: let the
    // last batch land before scraping.
    let to_client_sample = "switchboard_turn_relayed_packets_total{direction=\"to_client\"}";
    turn_common::metric_reaches(&srv, to_client_sample, r.received).await;
    let text = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/install-test-deps.sh)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Each relayed message crossed the relay once out and once back.
    let to_peer = metric(
        &text,
        "switchboard_turn_relayed_packets_total{direction=\"to_peer\"}",
    );
    let to_client = metric(
        &text,
        "switchboard_turn_relayed_packets_total{direction=\"to_client\"}",
    );
    assert_eq!(to_peer, r.sent, "{text}");
    assert_eq!(to_client, r.received);
    assert_eq!(
        metric(
            &text,
            "switchboard_turn_relayed_bytes_total{direction=\"to_peer\"}"
        ),
        r.sent * 100,
        "uclient's default message size is 100 bytes"
    );
    assert!(
        metric(
            &text,
            "switchboard_turn_allocations_created_total{transport=\"udp\"}"
        ) >= 1
    );
    assert_eq!(
        metric(
            &text,
            "switchboard_logins_total{backend=\"open\",result=\"ok\"}"
        ),
        1
    );
    assert_eq!(
        metric(
            &text,
            "switchboard_turn_credentials_issued_total{via=\"login\"}"
        ),
        1
    );
    assert_eq!(metric(&text, "switchboard_ws_connections_active"), 1);
    assert_eq!(metric(&text, "switchboard_rooms_active"), 1);
    assert_eq!(metric(&text, "switchboard_peers_active"), 1);
    assert_eq!(
        metric(
            &text,
            "switchboard_signaling_frames_total{direction=\"in\",type=\"join\"}"
        ),
        1
    );
    assert_eq!(metric(&text, "switchboard_login_duration_seconds_count"), 1);
    assert!(metric(&text, "switchboard_process_open_fds") > 0);
    srv.shutdown();
    srv.wait().await;
}
