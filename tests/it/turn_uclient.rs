//! coturn's `turnutils_uclient` relays through switchboard to `turnutils_peer` with no loss.

use crate::support::turn_common;
use turn_common::*;

fn assert_clean(r: &Report, want: u64) {
    assert_eq!(r.sent, want, "messages sent\n{}", r.output);
    assert_eq!(r.received, want, "messages echoed back\n{}", r.output);
    assert_eq!(r.lost, 0, "lost packets\n{}", r.output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_credentials_with_channels_and_rtcp_pair() {
    let server = start("max_allocations_per_user = 100").await;
    let peer = start_peer().await;
    // Without -c the client allocates an RTP/RTCP pair with EVEN-PORT and RESERVATION-TOKEN.
    let r = uclient(
        udp_addr(&server),
        peer.port,
        &["-W", SECRET, "-n", "30", "-l", "120", "-z", "5"],
    )
    .await;
    assert_clean(&r, 60);
    let to_client = "switchboard_turn_relayed_packets_total{direction=\"to_client\"}";
    let to_peer = "switchboard_turn_relayed_packets_total{direction=\"to_peer\"}";
    assert_eq!(metric_reaches(&server, to_client, 60).await, 60);
    assert_eq!(metric_reaches(&server, to_peer, 60).await, 60);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_user_with_send_indications() {
    let server = start("").await;
    let peer = start_peer().await;
    let r = uclient(
        udp_addr(&server),
        peer.port,
        &[
            "-u", USER, "-w", PASS, "-s", "-c", "-n", "30", "-l", "120", "-z", "5",
        ],
    )
    .await;
    assert_clean(&r, 30);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_credentials_with_send_indications_and_dont_fragment() {
    let server = start("").await;
    let peer = start_peer().await;
    let r = uclient(
        udp_addr(&server),
        peer.port,
        &[
            "-W", SECRET, "-s", "-g", "-c", "-n", "20", "-l", "200", "-z", "5",
        ],
    )
    .await;
    assert_clean(&r, 20);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_clients() {
    let server = start("max_allocations_per_user = 100").await;
    let peer = start_peer().await;
    let r = uclient(
        udp_addr(&server),
        peer.port,
        &["-W", SECRET, "-m", "20", "-n", "10", "-l", "120", "-z", "5"],
    )
    .await;
    assert_clean(&r, 20 * 10);
    // Every client allocated, and released its allocation with Refresh LIFETIME 0.
    let text = server.shared().metrics.render();
    let created = metric(
        &text,
        "switchboard_turn_allocations_created_total{transport=\"udp\"}",
    );
    // uclient may exit before its last Refresh is processed: wait for the count.
    let released = metric_reaches(
        &server,
        "switchboard_turn_allocations_deleted_total{reason=\"refreshed_zero\"}",
        20,
    )
    .await;
    assert!(created >= 20 && released >= 20, "{text}");
    let to_client = "switchboard_turn_relayed_packets_total{direction=\"to_client\"}";
    assert_eq!(metric_reaches(&server, to_client, 200).await, 200);
    server.shutdown();
}

/// With four UDP shards the kernel spreads clients over four sockets; every client's requests
/// and ChannelData must keep reaching the shard that owns its allocation, or packets are lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_shards_keep_each_client_on_its_allocation() {
    let server = start("max_allocations_per_user = 100\nshards = 4").await;
    let peer = start_peer().await;
    let r = uclient(
        udp_addr(&server),
        peer.port,
        &[
            "-W", SECRET, "-m", "24", "-n", "10", "-l", "120", "-z", "5", "-c",
        ],
    )
    .await;
    assert_clean(&r, 24 * 10);
    let text = server.shared().metrics.render();
    let created = metric(
        &text,
        "switchboard_turn_allocations_created_total{transport=\"udp\"}",
    );
    assert!(created >= 24, "{text}");
    assert_eq!(
        metric(&text, "switchboard_dropped_total{reason=\"no_permission\"}"),
        0,
        "{text}"
    );
}
