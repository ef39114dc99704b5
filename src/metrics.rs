//! One Prometheus registry per server, with the whole metric catalogue registered at start-up.
//!
//! Labels are low-cardinality by construction: never a username, room id, peer id or IP.
//! Hot-path counters are pre-resolved handles, so incrementing one is a single atomic add.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric switchboard exports (documented in docs/operations.md).
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// STUN Binding requests by result (`success|error|ignored|malformed`).
    pub stun_requests: IntCounterVec,
    /// Active allocations by transport (`udp|tcp|tls`).
    pub turn_allocations_active: IntGaugeVec,
    /// Allocations created by transport.
    pub turn_allocations_created: IntCounterVec,
    /// Allocations deleted by reason (`expired|refreshed_zero|quota|shutdown|closed|revoked`).
    pub turn_allocations_deleted: IntCounterVec,
    /// TURN requests answered with an error, by code.
    pub turn_errors: IntCounterVec,
    /// Active permissions.
    pub turn_permissions_active: IntGauge,
    /// Active channel bindings.
    pub turn_channels_active: IntGauge,
    /// Relayed packets client to peer.
    pub relay_packets_to_peer: IntCounter,
    /// Relayed packets peer to client.
    pub relay_packets_to_client: IntCounter,
    /// Of the relayed packets client to peer, those the kernel fast path relayed.
    pub offload_packets_to_peer: IntCounter,
    /// Of the relayed packets peer to client, those the kernel fast path relayed.
    pub offload_packets_to_client: IntCounter,
    /// Relayed payload bytes client to peer.
    pub relay_bytes_to_peer: IntCounter,
    /// Relayed payload bytes peer to client.
    pub relay_bytes_to_client: IntCounter,
    /// Authentication failures by reason.
    pub auth_failures: IntCounterVec,
    /// Logins by backend (`open|users|jwt`) and result (`ok|denied|error|rate_limited`).
    pub logins: IntCounterVec,
    /// Login request duration.
    pub login_duration: Histogram,
    /// TURN credentials issued by path (`login|ice_servers|rest_api|refresh`).
    pub turn_credentials_issued: IntCounterVec,
    /// Open WebSocket connections.
    pub ws_connections_active: IntGauge,
    /// Open rooms.
    pub rooms_active: IntGauge,
    /// Peers in rooms (connected or within their resume window).
    pub peers_active: IntGauge,
    /// Signaling frames by direction (`in|out`) and a bounded `type` label.
    pub signaling_frames: IntCounterVec,
    /// Packets or frames dropped, and limits hit, by reason.
    pub drops: IntCounterVec,
    /// Resume attempts by outcome (`resumed|expired|rejected`).
    pub resumes: IntCounterVec,
    /// Open TCP/TLS connections on the STUN/TURN ports, by transport (`tcp|tls`).
    pub stream_connections_active: IntGaugeVec,
    /// TLS handshakes in progress, by listener (`turns|https`).
    pub tls_handshakes_active: IntGaugeVec,
    /// Password hashes being checked right now (bounded by `auth.max_concurrent_password_checks`).
    pub password_checks_active: IntGauge,
    /// Cluster bus messages by direction (`publish|receive`).
    pub cluster_bus_messages: IntCounterVec,
    /// Time from forwarding a request to the room's owner until its answer arrives.
    pub cluster_forward_seconds: Histogram,
    /// Rooms this node owns (holds the lease of).
    pub cluster_rooms_owned: IntGauge,
    /// Room ownership changes on this node, by event
    /// (`acquired|takeover|reacquired|lost|released`).
    pub cluster_ownership_changes: IntCounterVec,
    /// 1 while Redis answers and this node's pub/sub subscription delivers; 0 otherwise.
    pub cluster_redis_up: IntGauge,
    /// 1 while another live process claims this node's `cluster.node_id` (alert on it).
    pub cluster_node_id_conflict: IntGauge,
    /// Allocates answered 300 Try Alternate, by reason (`draining|capacity`).
    pub turn_redirects: IntCounterVec,
    /// Ready nodes in this node's TURN membership snapshot (itself included).
    pub cluster_nodes_ready: IntGauge,
    /// This node's TURN membership state: 1 for the state it is in (`ready|draining`).
    pub cluster_node_state: IntGaugeVec,
    /// Relayed payload bytes by client transport (`udp|tcp|tls`) and direction.
    pub relay_bytes_by_transport: ByTransport,
    /// Webhook events by final outcome (`delivered|failed`), and retries (`retried`).
    pub webhook_deliveries: IntCounterVec,
    /// Time one webhook POST took, failures included.
    pub webhook_latency: Histogram,
    /// Server API requests by result (`ok|unauthorized|not_found|bad_request`).
    pub admin_requests: IntCounterVec,
    /// JWKS fetches (`auth.jwt.jwks_url`) by result (`ok|failed`): a rising `failed` means
    /// logins run on the last good key set.
    pub jwks_fetches: IntCounterVec,
    /// Open signaling connections by wire protocol (`peerjs`; `/v1/ws` keeps
    /// `ws_connections_active`).
    pub protocol_connections_active: IntGaugeVec,
    /// Signaling messages by wire protocol, direction (`in|out`) and a bounded `type`.
    pub protocol_messages: IntCounterVec,
    /// The served certificate's expiry and the ACME renewals (`[tls.acme]`).
    pub acme: AcmeMetrics,
}

/// Certificate metrics: what an operator alerts on before a certificate runs out.
#[derive(Clone)]
pub struct AcmeMetrics {
    /// ACME orders by result (`ok|error`).
    pub renewals: IntCounterVec,
    /// 1 while the last ACME order failed (the previous certificate keeps serving).
    pub renewal_failing: IntGauge,
    /// Unix time of the served certificate's notAfter; 0 while none is served.
    pub cert_expiry: IntGauge,
}

impl AcmeMetrics {
    fn register(r: &Registry) -> AcmeMetrics {
        let renewals = IntCounterVec::new(
            Opts::new(
                "acme_renewals_total",
                "ACME certificate orders by result: ok, error (the old certificate stays).",
            ),
            &["result"],
        )
        .expect("static metric definition is valid");
        let renewal_failing = IntGauge::new(
            "acme_renewal_failing",
            "1 while the last ACME order failed; the previous certificate keeps serving.",
        )
        .expect("static metric definition is valid");
        let cert_expiry = IntGauge::new(
            "tls_cert_expiry_seconds",
            "Unix time of the served TLS certificate's notAfter (0: none served yet).",
        )
        .expect("static metric definition is valid");
        for c in [
            Box::new(renewals.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(renewal_failing.clone()),
            Box::new(cert_expiry.clone()),
        ] {
            r.register(c).expect("metric names are unique");
        }
        for v in ["ok", "error"] {
            renewals.with_label_values(&[v]);
        }
        AcmeMetrics {
            renewals,
            renewal_failing,
            cert_expiry,
        }
    }
}

/// Pre-resolved relayed-byte counters for each client transport and direction, so the relay
/// path adds to one without a label lookup.
#[derive(Clone)]
pub struct ByTransport {
    to_peer: [IntCounter; 3],
    to_client: [IntCounter; 3],
}

impl ByTransport {
    fn index(transport: &str) -> usize {
        match transport {
            "tcp" => 1,
            "tls" => 2,
            _ => 0,
        }
    }
    /// The client-to-peer byte counter of `transport` (`udp|tcp|tls`).
    pub fn to_peer(&self, transport: &str) -> &IntCounter {
        &self.to_peer[Self::index(transport)]
    }
    /// The peer-to-client byte counter of `transport`.
    pub fn to_client(&self, transport: &str) -> &IntCounter {
        &self.to_client[Self::index(transport)]
    }
}

impl Metrics {
    /// Create and register the full catalogue in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("switchboard".into()), None)
            .unwrap_or_else(|_| Registry::new());
        fn cv(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("static metric definition is valid");
            r.register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        }
        fn gv(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)
                .expect("static metric definition is valid");
            r.register(Box::new(g.clone()))
                .expect("metric names are unique");
            g
        }
        fn g(r: &Registry, name: &str, help: &str) -> IntGauge {
            let g = IntGauge::new(name, help).expect("static metric definition is valid");
            r.register(Box::new(g.clone()))
                .expect("metric names are unique");
            g
        }
        let r = &registry;
        let relay_packets = cv(
            r,
            "turn_relayed_packets_total",
            "Packets relayed through TURN allocations.",
            &["direction"],
        );
        let offload_packets = cv(
            r,
            "turn_offload_relayed_packets_total",
            "Packets relayed by the kernel fast path (also counted in turn_relayed_packets_total).",
            &["direction"],
        );
        let relay_bytes = cv(
            r,
            "turn_relayed_bytes_total",
            "Payload bytes relayed through TURN allocations.",
            &["direction"],
        );
        let by_transport = cv(
            r,
            "turn_relayed_transport_bytes_total",
            "Payload bytes relayed through TURN allocations, by client transport and direction.",
            &["transport", "direction"],
        );
        let relay_bytes_by_transport = ByTransport {
            to_peer: ["udp", "tcp", "tls"].map(|t| by_transport.with_label_values(&[t, "to_peer"])),
            to_client: ["udp", "tcp", "tls"]
                .map(|t| by_transport.with_label_values(&[t, "to_client"])),
        };
        let webhook_latency = Histogram::with_opts(
            HistogramOpts::new(
                "webhook_post_duration_seconds",
                "Time one webhook POST took, failures included.",
            )
            .buckets(vec![0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )
        .expect("static metric definition is valid");
        r.register(Box::new(webhook_latency.clone()))
            .expect("metric names are unique");
        let login_duration = Histogram::with_opts(
            HistogramOpts::new("login_duration_seconds", "Time to answer POST /v1/login.")
                .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
        )
        .expect("static metric definition is valid");
        r.register(Box::new(login_duration.clone()))
            .expect("metric names are unique");
        let cluster_forward_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "cluster_forward_seconds",
                "Time from forwarding a signaling request to the room's owner node until its answer.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )
        .expect("static metric definition is valid");
        r.register(Box::new(cluster_forward_seconds.clone()))
            .expect("metric names are unique");
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            // Registration only fails on a duplicate, which a fresh registry cannot have.
            let _ = r.register(Box::new(pc));
        }
        let m = Metrics {
            stun_requests: cv(
                r,
                "stun_requests_total",
                "STUN Binding requests by result.",
                &["result"],
            ),
            turn_allocations_active: gv(
                r,
                "turn_allocations_active",
                "TURN allocations currently active.",
                &["transport"],
            ),
            turn_allocations_created: cv(
                r,
                "turn_allocations_created_total",
                "TURN allocations created.",
                &["transport"],
            ),
            turn_allocations_deleted: cv(
                r,
                "turn_allocations_deleted_total",
                "TURN allocations deleted, by reason.",
                &["reason"],
            ),
            turn_errors: cv(
                r,
                "turn_error_responses_total",
                "TURN requests answered with an error response, by STUN error code.",
                &["code"],
            ),
            turn_permissions_active: g(
                r,
                "turn_permissions_active",
                "TURN permissions currently installed.",
            ),
            turn_channels_active: g(
                r,
                "turn_channels_active",
                "TURN channel bindings currently active.",
            ),
            relay_packets_to_peer: relay_packets.with_label_values(&["to_peer"]),
            relay_packets_to_client: relay_packets.with_label_values(&["to_client"]),
            offload_packets_to_peer: offload_packets.with_label_values(&["to_peer"]),
            offload_packets_to_client: offload_packets.with_label_values(&["to_client"]),
            relay_bytes_to_peer: relay_bytes.with_label_values(&["to_peer"]),
            relay_bytes_to_client: relay_bytes.with_label_values(&["to_client"]),
            auth_failures: cv(
                r,
                "auth_failures_total",
                "Rejected credentials, by reason.",
                &["reason"],
            ),
            logins: cv(
                r,
                "logins_total",
                "Login attempts by backend and result.",
                &["backend", "result"],
            ),
            login_duration,
            turn_credentials_issued: cv(
                r,
                "turn_credentials_issued_total",
                "Time-limited TURN credentials issued, by path.",
                &["via"],
            ),
            protocol_connections_active: gv(
                r,
                "protocol_connections_active",
                "Signaling connections currently open, by wire protocol.",
                &["protocol"],
            ),
            protocol_messages: cv(
                r,
                "protocol_messages_total",
                "Signaling messages by wire protocol, direction and type.",
                &["protocol", "direction", "type"],
            ),
            ws_connections_active: g(
                r,
                "ws_connections_active",
                "Signaling WebSocket connections currently open.",
            ),
            rooms_active: g(r, "rooms_active", "Signaling rooms currently open."),
            peers_active: g(
                r,
                "peers_active",
                "Peers in rooms, connected or within their resume window.",
            ),
            signaling_frames: cv(
                r,
                "signaling_frames_total",
                "Signaling frames by direction and type.",
                &["direction", "type"],
            ),
            drops: cv(
                r,
                "dropped_total",
                "Packets or frames dropped and limits hit, by reason.",
                &["reason"],
            ),
            resumes: cv(
                r,
                "resumes_total",
                "Signaling resume attempts by outcome.",
                &["outcome"],
            ),
            stream_connections_active: gv(
                r,
                "stream_connections_active",
                "Open TCP/TLS connections on the STUN/TURN ports.",
                &["transport"],
            ),
            tls_handshakes_active: gv(
                r,
                "tls_handshakes_active",
                "TLS handshakes in progress.",
                &["listener"],
            ),
            password_checks_active: g(
                r,
                "password_checks_active",
                "Password hashes being verified right now.",
            ),
            cluster_bus_messages: cv(
                r,
                "cluster_bus_messages_total",
                "Messages between nodes over the Redis bus, by direction.",
                &["direction"],
            ),
            cluster_forward_seconds,
            cluster_rooms_owned: g(
                r,
                "cluster_rooms_owned",
                "Rooms whose lease this node holds.",
            ),
            cluster_ownership_changes: cv(
                r,
                "cluster_ownership_changes_total",
                "Room ownership changes on this node, by event.",
                &["event"],
            ),
            cluster_redis_up: g(
                r,
                "cluster_redis_up",
                "1 while Redis answers and this node's subscription delivers (0 in single-node mode).",
            ),
            cluster_node_id_conflict: g(
                r,
                "cluster_node_id_conflict",
                "1 while another live process claims this node's cluster.node_id: it owns no room.",
            ),
            turn_redirects: cv(
                r,
                "turn_redirects_total",
                "Allocates answered 300 Try Alternate, by reason (draining, capacity).",
                &["reason"],
            ),
            cluster_nodes_ready: g(
                r,
                "cluster_nodes_ready",
                "Ready nodes in this node's TURN membership snapshot, itself included.",
            ),
            cluster_node_state: gv(
                r,
                "cluster_node_state",
                "1 for this node's TURN membership state (ready or draining), 0 for the other.",
                &["state"],
            ),
            relay_bytes_by_transport,
            webhook_deliveries: cv(
                r,
                "webhook_events_total",
                "Webhook events by outcome: delivered, failed (given up), retried (per retry).",
                &["outcome"],
            ),
            webhook_latency,
            jwks_fetches: cv(
                r,
                "jwks_fetches_total",
                "JWKS fetches by result: ok, failed (the last good key set stays in use).",
                &["result"],
            ),
            admin_requests: cv(
                r,
                "admin_requests_total",
                "Server API requests by result.",
                &["result"],
            ),
            acme: AcmeMetrics::register(r),
            registry,
        };
        for t in ["tcp", "tls"] {
            m.stream_connections_active.with_label_values(&[t]);
        }
        for l in ["turns", "https", "shared"] {
            m.tls_handshakes_active.with_label_values(&[l]);
        }
        // Pre-create the common label values so dashboards show zeros, not gaps.
        for t in ["udp", "tcp", "tls"] {
            m.turn_allocations_active.with_label_values(&[t]);
            m.turn_allocations_created.with_label_values(&[t]);
        }
        for r in ["success", "error", "malformed"] {
            m.stun_requests.with_label_values(&[r]);
        }
        for r in [
            "missing",
            "malformed",
            "expired",
            "bad_signature",
            "unknown_user",
            "wrong_credentials",
            "too_old",
            "revoked",
        ] {
            m.auth_failures.with_label_values(&[r]);
        }
        for r in [
            "expired",
            "refreshed_zero",
            "quota",
            "shutdown",
            "closed",
            "max_age",
            "revoked",
        ] {
            m.turn_allocations_deleted.with_label_values(&[r]);
        }
        for c in [
            "400", "401", "403", "420", "437", "438", "441", "442", "486", "508",
        ] {
            m.turn_errors.with_label_values(&[c]);
        }
        for b in ["open", "users", "jwt"] {
            for r in ["ok", "denied", "bad_request", "rate_limited", "busy"] {
                m.logins.with_label_values(&[b, r]);
            }
        }
        for v in ["login", "ice_servers", "rest_api", "refresh"] {
            m.turn_credentials_issued.with_label_values(&[v]);
        }
        for r in ["draining", "capacity"] {
            m.turn_redirects.with_label_values(&[r]);
        }
        for st in ["ready", "draining"] {
            m.cluster_node_state.with_label_values(&[st]);
        }
        for r in [
            "not_stun",
            "no_permission",
            "client_send_full",
            "stream_idle",
            "stream_garbage",
            "stream_first_message_timeout",
            "stream_per_ip_limit",
            "stream_global_limit",
            "tls_handshake_failed",
            "tls_handshake_timeout",
            "shared_plain_http",
            "shared_plain_turn_off",
            "ws_rate_limited",
            "ws_frame_too_large",
            "ws_connections_per_ip",
            "ws_slow_consumer",
            "peer_datagram_oversized",
            "unauthenticated_rate",
            "peer_connections_per_allocation",
            "connection_bind_refused",
            "data_connection_idle",
            "data_connection_allocation_gone",
            "webhook_queue_full",
            "webhook_shutdown",
        ] {
            m.drops.with_label_values(&[r]);
        }
        for o in ["delivered", "failed", "retried"] {
            m.webhook_deliveries.with_label_values(&[o]);
        }
        for o in ["ok", "unauthorized", "not_found", "bad_request"] {
            m.admin_requests.with_label_values(&[o]);
        }
        for o in ["ok", "failed"] {
            m.jwks_fetches.with_label_values(&[o]);
        }
        for o in ["resumed", "rejected", "expired"] {
            m.resumes.with_label_values(&[o]);
        }
        for d in ["publish", "receive"] {
            m.cluster_bus_messages.with_label_values(&[d]);
        }
        for e in ["acquired", "takeover", "reacquired", "lost", "released"] {
            m.cluster_ownership_changes.with_label_values(&[e]);
        }
        for r in [
            "cluster_unavailable",
            "cluster_publish_failed",
            "cluster_stale_owner",
            "cluster_fenced",
            "cluster_queue_full",
        ] {
            m.drops.with_label_values(&[r]);
        }
        for d in ["in", "out"] {
            m.signaling_frames.with_label_values(&[d, "signal"]);
        }
        m
    }

    /// Render the registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if let Err(e) = enc.encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_catalogue_with_prefix() {
        let m = Metrics::new();
        m.relay_packets_to_peer.inc_by(3);
        m.stun_requests.with_label_values(&["success"]).inc();
        let text = m.render();
        assert!(text.contains("switchboard_turn_relayed_packets_total{direction=\"to_peer\"} 3"));
        assert!(text.contains("switchboard_stun_requests_total{result=\"success\"} 1"));
        assert!(text.contains("switchboard_turn_allocations_active{transport=\"udp\"} 0"));
    }
}
