//! Typed configuration: TOML file, then `SWITCHBOARD_<SECTION>__<KEY>` environment overrides.
//!
//! Every key has a default, so an empty file (or none) gives a working localhost server.
//! Unknown keys, unparsable values and out-of-range numbers are errors that name the key.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use crate::secret::Secret;
use std::path::{Path, PathBuf};

/// Why a configuration was rejected; the message always names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File that failed.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// TOML syntax error.
    #[error("config file {path}: {message}")]
    Syntax {
        /// File that failed.
        path: PathBuf,
        /// Parser message with line and column.
        message: String,
    },
    /// A key has the wrong type, an unparsable value, or is unknown.
    #[error("config key `{key}`: {message}")]
    Key {
        /// Dotted key path, e.g. `turn.relay_port_min`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Key {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The whole effective configuration of one switchboard process.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Process lifecycle.
    pub server: ServerConfig,
    /// Logging.
    pub log: LogConfig,
    /// HTTP API, WebSocket signaling, probes and metrics.
    pub http: HttpConfig,
    /// STUN/TURN listeners and relay policy.
    pub turn: TurnConfig,
    /// Secrets, login backends and credential lifetimes.
    pub auth: AuthConfig,
    /// Addresses advertised to clients (behind NAT or DNS).
    pub public: PublicConfig,
    /// Certificate for `turns:` and `https:`/`wss:`.
    pub tls: TlsConfig,
    /// One TCP port (usually 443) carrying HTTPS, WSS, `turns:` and `turn:` over TCP.
    pub shared_port: SharedPortConfig,
    /// Room signaling limits and timers.
    pub signaling: SignalingConfig,
    /// Signed HTTP callbacks that tell the app backend what happens in rooms and relays.
    pub webhooks: WebhooksConfig,
    /// Several nodes sharing rooms through Redis (off unless `redis_url` is set).
    pub cluster: ClusterConfig,
    /// The PeerJS server protocol, so apps written for PeerJS switch servers unchanged.
    pub peerjs: PeerJsConfig,
}

/// The PeerJS server protocol (`peerjs` 1.x clients), off by default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PeerJsConfig {
    /// Serve the PeerJS protocol under `path`.
    pub enabled: bool,
    /// Where it is served: the client's `path` option (`/<path>/peerjs` is the WebSocket).
    pub path: String,
    /// The client's `key` option; another key gets `INVALID-KEY`.
    pub key: String,
    /// `open` (any id, the PeerJS token decides) or `session` (the `token` is a session
    /// token from `/v1/login` and the id is bound to its user).
    pub auth: PeerJsAuth,
    /// Answer `GET <path>/<key>/peers` with the connected ids.
    pub allow_discovery: bool,
    /// Seconds a message for an id that is not connected is held before `EXPIRE`.
    pub expire_timeout_secs: u64,
    /// Ids registered at once on this node.
    pub max_peers: usize,
    /// Messages held for one id that is not connected.
    pub max_held_per_peer: usize,
    /// Bytes held for all ids together.
    pub max_held_bytes: usize,
}

/// How a PeerJS connection proves who it is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PeerJsAuth {
    /// As the PeerJS server: anyone may register a free id.
    Open,
    /// A switchboard session token in the `token` query parameter.
    Session,
}

impl Default for PeerJsConfig {
    fn default() -> Self {
        PeerJsConfig {
            enabled: false,
            path: "/peerjs".into(),
            key: "peerjs".into(),
            auth: PeerJsAuth::Session,
            allow_discovery: false,
            expire_timeout_secs: 5,
            max_peers: 100_000,
            max_held_per_peer: 64,
            max_held_bytes: 16 * 1024 * 1024,
        }
    }
}

impl PeerJsConfig {
    /// Checks of the `[peerjs]` keys.
    fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.path;
        let ok = p.starts_with('/')
            && p.len() > 1
            && !p.ends_with('/')
            && p.split('/').skip(1).all(|seg| {
                !seg.is_empty()
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            })
            && p != "/v1"
            && !p.starts_with("/v1/");
        if !ok {
            return Err(ConfigError::key(
                "peerjs.path",
                "must look like /peerjs: a leading /, no trailing /, letters, digits, - _ . only, not under /v1",
            ));
        }
        if self.key.is_empty()
            || self.key.len() > 64
            || !self
                .key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(ConfigError::key(
                "peerjs.key",
                "must be 1 to 64 letters, digits, - _ or .",
            ));
        }
        if self.expire_timeout_secs == 0 || self.expire_timeout_secs > 300 {
            return Err(ConfigError::key(
                "peerjs.expire_timeout_secs",
                "must be between 1 and 300",
            ));
        }
        if self.max_peers == 0 {
            return Err(ConfigError::key("peerjs.max_peers", "must be at least 1"));
        }
        if self.max_held_per_peer == 0 {
            return Err(ConfigError::key(
                "peerjs.max_held_per_peer",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Cluster mode: rooms owned by one node each, with connections on any node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Redis URL (`redis://[:password@]host:port[/db]`); empty keeps the single-node mode.
    pub redis_url: String,
    /// This node's name, unique in the cluster; empty means the host name.
    pub node_id: String,
    /// Milliseconds a room lease lives without renewal (renewed every third of it).
    pub lease_ms: u64,
    /// Milliseconds a forwarded request waits for the owner before `cluster_unavailable`.
    pub forward_timeout_ms: u64,
    /// Bytes of messages queued for Redis before more are dropped (bounds memory while Redis
    /// is slow or away).
    pub publish_queue_bytes: usize,
    /// Milliseconds a node's TURN membership record lives without refresh (refreshed every
    /// second); a dead node leaves login answers within it.
    pub node_ttl_ms: u64,
    /// Which node a login's `iceServers` point at: `self` or `least_loaded`.
    pub turn_placement: TurnPlacement,
}

/// How a login picks the TURN node it hands out.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TurnPlacement {
    /// The node that answers the login.
    #[default]
    #[serde(rename = "self")]
    Own,
    /// The ready node with the fewest allocations for its capacity.
    LeastLoaded,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis_url: String::new(),
            node_id: String::new(),
            lease_ms: 6000,
            forward_timeout_ms: 2000,
            publish_queue_bytes: 64 << 20,
            node_ttl_ms: 5000,
            turn_placement: TurnPlacement::Own,
        }
    }
}

impl TurnConfig {
    /// Whether `turn.relay_ip = "auto"`.
    pub fn relay_auto(&self) -> bool {
        self.relay_ip.iter().any(RelayIp::is_auto)
    }
}

impl ClusterConfig {
    /// Whether cluster mode is on.
    pub fn enabled(&self) -> bool {
        !self.redis_url.is_empty()
    }
}

/// Process lifecycle settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Seconds to let allocations and calls finish after SIGTERM before exiting.
    pub drain_timeout_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            drain_timeout_secs: 30,
        }
    }
}

/// Log output shape.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Logging settings; `RUST_LOG` refines the filter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// Default filter when `RUST_LOG` is unset.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// HTTP listener settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the HTTP API, signaling WebSocket, probes and metrics.
    pub listen: SocketAddr,
    /// Optional separate address for `/metrics` only.
    pub metrics_listen: Option<SocketAddr>,
    /// Serve HTTPS/WSS with the `[tls]` certificate.
    pub tls: bool,
    /// Origins allowed for CORS and the WebSocket `Origin` check; `*` allows any.
    pub allowed_origins: Vec<String>,
    /// Serve the demo page and JS client at `/`.
    pub demo: bool,
    /// Reverse proxies (CIDRs) whose `X-Forwarded-For` / `Forwarded` headers are believed.
    pub trusted_proxies: Vec<String>,
    /// Serve the server API for app backends under `/v1/admin/` (bearer `auth.admin_tokens`).
    pub admin_api: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            metrics_listen: None,
            tls: false,
            allowed_origins: vec!["*".into()],
            demo: true,
            trusted_proxies: Vec::new(),
            admin_api: false,
        }
    }
}

/// How the program is attached at TC ingress (`turn.kernel_offload_attach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffloadAttach {
    /// A TCX link on kernels 6.6 and later (the kernel detaches it when the process dies,
    /// even by SIGKILL), the clsact qdisc before.
    #[default]
    Auto,
    /// Always a clsact filter (what kernels before 6.6 get), e.g. next to tools that manage
    /// tc filters; it outlives a killed process until the routes' deadlines pass.
    Clsact,
}

/// Whether to use the kernel fast path (`turn.kernel_offload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffloadMode {
    /// User space relays everything.
    #[default]
    Off,
    /// Use the kernel when it loads; otherwise log once and relay in user space.
    Auto,
    /// Require the kernel path: start-up fails (exit 2) when it cannot load.
    On,
}

/// STUN/TURN listener and relay settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TurnConfig {
    /// Addresses that serve STUN and TURN (UDP and/or TCP on each).
    pub listen: Vec<SocketAddr>,
    /// Serve on UDP.
    pub udp: bool,
    /// Serve on TCP.
    pub tcp: bool,
    /// Addresses that serve STUN and TURN over TLS (`turns:`).
    pub tls_listen: Vec<SocketAddr>,
    /// Enable the TURN relay; when false only STUN Binding is answered.
    pub relay: bool,
    /// Realm for the long-term credential mechanism.
    pub realm: String,
    /// IP that relay sockets bind to; defaults to the first listen IP.
    pub relay_bind: Option<IpAddr>,
    /// Public addresses reported in XOR-RELAYED-ADDRESS behind 1:1 NAT: `public` or
    /// `public/private` pairs (coturn's `external-ip`); a string or a list in TOML.
    #[serde(deserialize_with = "one_or_many")]
    pub relay_ip: Vec<RelayIp>,
    /// IPv6 address that relay sockets bind to for IPv6 allocations.
    pub relay_bind_v6: Option<IpAddr>,
    /// Lowest relay port.
    pub relay_port_min: u16,
    /// Highest relay port.
    pub relay_port_max: u16,
    /// Allocation lifetime when the client does not ask for one (seconds).
    pub default_lifetime_secs: u32,
    /// Longest allocation lifetime granted (seconds).
    pub max_lifetime_secs: u32,
    /// Absolute cap on an allocation's age, however often it is refreshed (seconds).
    pub max_allocation_age_secs: u64,
    /// How long a NONCE stays valid before 438 Stale Nonce (seconds).
    pub nonce_lifetime_secs: u32,
    /// Allocations one username may hold at once (486 beyond).
    pub max_allocations_per_user: u32,
    /// Allocations the whole server may hold at once (508 beyond).
    pub max_allocations: u32,
    /// Allocations this node advertises as its capacity; in cluster mode an Allocate beyond
    /// it is redirected (300) to a node with room. 0 means `max_allocations`.
    pub capacity_allocations: u32,
    /// Per-allocation relay bandwidth cap in bytes per second; 0 means unlimited.
    pub max_bps_per_allocation: u64,
    /// Peer CIDRs allowed even if they fall in a denied range.
    pub allow_peers: Vec<String>,
    /// Extra peer CIDRs to deny on top of the built-in private/special ranges.
    pub deny_peers: Vec<String>,
    /// Answer new Allocates with 300 ALTERNATE-SERVER to this address while draining.
    pub alternate_server: Option<SocketAddr>,
    /// Close TCP/TLS connections with no allocation after this many seconds without a
    /// complete STUN message (stray bytes do not count).
    pub tcp_idle_timeout_secs: u64,
    /// Seconds a new TCP/TLS connection has to send its first valid STUN message.
    pub stream_first_message_timeout_secs: u64,
    /// TCP and TLS connections open at once on the STUN/TURN ports; accepting pauses beyond.
    pub max_stream_connections: usize,
    /// TCP and TLS connections open at once from one client IP (one /64 for IPv6).
    pub max_stream_connections_per_ip: usize,
    /// Bytes queued to one stream client before its packets are dropped.
    pub tcp_send_buffer_bytes: usize,
    /// RFC 6062 peer connections of one allocation waiting for ConnectionBind at once.
    pub max_pending_connections_per_allocation: usize,
    /// Seconds an RFC 6062 data connection may carry no byte either way before it closes.
    pub data_connection_idle_timeout_secs: u64,
    /// Kernel (eBPF at TC ingress) fast path for ChannelData: off, auto or on.
    pub kernel_offload: OffloadMode,
    /// How the kernel program attaches: `auto` (TCX on 6.6+, clsact before) or `clsact`.
    pub kernel_offload_attach: OffloadAttach,
    /// UDP worker shards on each listen address, each a thread with its own SO_REUSEPORT
    /// socket and its own allocations; 0 means one per CPU core.
    pub shards: usize,
    /// SOFTWARE attribute value; empty (the default) leaves the attribute out, which keeps
    /// unauthenticated answers small and the version private.
    pub software: String,
    /// Put MAPPED-ADDRESS next to XOR-MAPPED-ADDRESS in Binding responses, for clients that
    /// send the RFC 5389 cookie but read only the old attribute; off keeps answers lean.
    pub mapped_address: bool,
    /// Bytes per second of unauthenticated UDP answers (Binding, 401, 400, 438, …) one source
    /// address (IPv6: one /64) may receive; beyond, they are dropped (reflector limit). 0: off.
    pub unauthenticated_bytes_per_second: u64,
    /// Burst of unauthenticated UDP answers one source may receive at once, in bytes.
    pub unauthenticated_burst_bytes: u64,
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 3478))],
            udp: true,
            tcp: true,
            tls_listen: Vec::new(),
            relay: true,
            realm: "switchboard".into(),
            relay_bind: None,
            relay_ip: Vec::new(),
            relay_bind_v6: None,
            relay_port_min: 49152,
            relay_port_max: 65535,
            default_lifetime_secs: 600,
            max_lifetime_secs: 3600,
            max_allocation_age_secs: 12 * 3600,
            nonce_lifetime_secs: 600,
            max_allocations_per_user: 10,
            max_allocations: 10_000,
            capacity_allocations: 0,
            max_bps_per_allocation: 0,
            allow_peers: Vec::new(),
            deny_peers: Vec::new(),
            alternate_server: None,
            tcp_idle_timeout_secs: 30,
            stream_first_message_timeout_secs: 10,
            max_stream_connections: 10_000,
            max_stream_connections_per_ip: 64,
            tcp_send_buffer_bytes: 256 * 1024,
            max_pending_connections_per_allocation: 8,
            data_connection_idle_timeout_secs: 300,
            kernel_offload: OffloadMode::Off,
            kernel_offload_attach: OffloadAttach::Auto,
            shards: 0,
            software: String::new(),
            mapped_address: false,
            unauthenticated_bytes_per_second: 8 * 1024,
            unauthenticated_burst_bytes: 32 * 1024,
        }
    }
}

/// One `turn.relay_ip` entry: the public address clients reach a relay at, for relay sockets
/// bound to `private` (or to any address of that family when `private` is absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayIp {
    /// Address written into XOR-RELAYED-ADDRESS and `iceServers`.
    pub public: IpAddr,
    /// Local address this mapping applies to; `None` maps every local address of the family.
    pub private: Option<IpAddr>,
}

impl RelayIp {
    /// `"auto"`: learn the public address by STUN (`public.discover_stun`) at start and
    /// every few minutes, paired with the local address that asked.
    pub const AUTO: RelayIp = RelayIp {
        public: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        private: None,
    };

    /// Whether this entry is `"auto"` (a literal never has an unspecified public address).
    pub fn is_auto(&self) -> bool {
        self.public.is_unspecified()
    }
}

impl std::str::FromStr for RelayIp {
    type Err = String;
    fn from_str(s: &str) -> Result<RelayIp, String> {
        if s.trim() == "auto" {
            return Ok(RelayIp::AUTO);
        }
        let (p, l) = match s.split_once('/') {
            Some((p, l)) => (p, Some(l)),
            None => (s, None),
        };
        let ip = |x: &str| {
            x.trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("`{s}` is not `public` or `public/private` (IP addresses)"))
        };
        let public = ip(p)?;
        let private = l.map(ip).transpose()?;
        if private.is_some_and(|l| l.is_ipv4() != public.is_ipv4()) {
            return Err(format!("`{s}` maps between address families"));
        }
        if public.is_unspecified() || public.is_multicast() {
            return Err(format!(
                "`{s}`: the public address must be a unicast address"
            ));
        }
        if private.is_some_and(|l| l.is_unspecified()) {
            return Err(format!(
                "`{s}`: leave out the private part to map every local address"
            ));
        }
        Ok(RelayIp { public, private })
    }
}

impl std::fmt::Display for RelayIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_auto() {
            return f.write_str("auto");
        }
        match self.private {
            Some(l) => write!(f, "{}/{}", self.public, l),
            None => write!(f, "{}", self.public),
        }
    }
}

impl Serialize for RelayIp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RelayIp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RelayIp, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Accept one value or a list (`relay_ip = "203.0.113.10"` and `relay_ip = ["…", "…"]`).
fn one_or_many<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    let v = toml::Value::deserialize(d)?;
    if let toml::Value::Array(_) = v {
        return Vec::<T>::deserialize(v).map_err(serde::de::Error::custom);
    }
    T::deserialize(v)
        .map(|t| vec![t])
        .map_err(serde::de::Error::custom)
}

/// Login backend kinds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Any display name logs in; development only.
    Open,
    /// Static users with argon2id password hashes.
    Users,
    /// Bearer JWTs signed by the operator's app backend.
    Jwt,
}

/// One static login user.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    /// Login name, which becomes the user id.
    pub name: String,
    /// Argon2id PHC string from `switchboard hash-password` (redacted when printed: a
    /// leaked hash invites offline guessing).
    pub password_hash: Secret,
}

/// JWT verification settings for the `jwt` backend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// Shared secret for HS256.
    pub hs256_secret: Option<Secret>,
    /// File holding the HS256 secret (instead of `hs256_secret`).
    pub hs256_secret_file: Option<PathBuf>,
    /// PEM public key file for RS256, ES256 or EdDSA.
    pub public_key_file: Option<PathBuf>,
    /// Further keys, each with the `kid` that tokens signed with it name in their header.
    pub keys: Vec<JwtKeyConfig>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// Allowed clock skew in seconds for `exp`/`nbf`.
    pub leeway_secs: u64,
    /// The issuer's JSON Web Key Set, fetched, cached and refreshed so that its key rotation
    /// needs no configuration change (https, or http to loopback only).
    pub jwks_url: Option<String>,
    /// Seconds between scheduled JWKS refreshes.
    pub jwks_refresh_secs: u64,
    /// Least seconds between two JWKS fetches caused by tokens that name an unknown `kid`,
    /// so that a flood of made-up kids cannot turn into a flood of fetches.
    pub jwks_min_interval_secs: u64,
}

impl Default for JwtConfig {
    fn default() -> JwtConfig {
        JwtConfig {
            hs256_secret: None,
            hs256_secret_file: None,
            public_key_file: None,
            keys: Vec::new(),
            issuer: None,
            audience: None,
            leeway_secs: 0,
            jwks_url: None,
            jwks_refresh_secs: 300,
            jwks_min_interval_secs: 30,
        }
    }
}

/// One `[[auth.jwt.keys]]` entry: a verification key selected by the token's `kid`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JwtKeyConfig {
    /// Key id that tokens name in their header.
    pub kid: String,
    /// Shared secret for HS256.
    pub hs256_secret: Option<Secret>,
    /// File holding the HS256 secret.
    pub hs256_secret_file: Option<PathBuf>,
    /// PEM public key file for RS256, ES256 or EdDSA.
    pub public_key_file: Option<PathBuf>,
}

/// Secrets, login backends and credential lifetimes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// TURN REST shared secrets (coturn `static-auth-secret`); the first signs, all verify.
    /// Empty means a random secret per process.
    pub turn_secrets: Vec<Secret>,
    /// File with the TURN REST secrets, one per line (instead of `turn_secrets`).
    pub turn_secrets_file: Option<PathBuf>,
    /// Static TURN users (`name = "password"`) for tools that take a plain user and password.
    pub turn_users: BTreeMap<String, Secret>,
    /// File with static TURN users, `name:password` per line (instead of `turn_users`).
    pub turn_users_file: Option<PathBuf>,
    /// Keys that sign session tokens; the first signs, all verify. Empty means random per process.
    pub session_keys: Vec<Secret>,
    /// File with the session keys, one per line (instead of `session_keys`).
    pub session_keys_file: Option<PathBuf>,
    /// Session token lifetime in seconds.
    pub session_ttl_secs: u64,
    /// Longest time a login stays good, in seconds: refreshed session tokens (and the TURN
    /// credentials pushed with them) never reach past the original login plus this.
    pub max_session_age_secs: u64,
    /// TURN credential lifetime in seconds.
    pub turn_credential_ttl_secs: u64,
    /// Enabled login backends.
    pub backends: Vec<Backend>,
    /// Permit the `open` backend on a non-loopback HTTP address.
    pub allow_open_on_public: bool,
    /// Static users for the `users` backend.
    pub users: Vec<UserEntry>,
    /// File with the `users` backend's users, `name:argon2id-hash` per line (instead of
    /// `users`), so the hashes stay out of the config file.
    pub users_file: Option<PathBuf>,
    /// Settings of the `jwt` backend.
    pub jwt: JwtConfig,
    /// API keys accepted by `GET /v1/turn-credentials`.
    pub api_keys: Vec<Secret>,
    /// File with the API keys, one per line (instead of `api_keys`).
    pub api_keys_file: Option<PathBuf>,
    /// Login attempts allowed per client IP per minute.
    pub login_rate_per_minute: u32,
    /// Password hashes checked at once; 0 means one per CPU core. Beyond, logins get 503.
    pub max_concurrent_password_checks: usize,
    /// Bearer tokens accepted by the server API (`/v1/admin/`); any listed one is valid.
    pub admin_tokens: Vec<Secret>,
    /// File with more admin tokens, one per line, so they stay out of the config file.
    pub admin_tokens_file: Option<PathBuf>,
}

impl AuthConfig {
    /// Effective number of concurrent password checks (`0` = the number of cores).
    pub fn password_check_slots(&self) -> usize {
        match self.max_concurrent_password_checks {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            turn_secrets: Vec::new(),
            turn_secrets_file: None,
            turn_users: Default::default(),
            turn_users_file: None,
            session_keys: Vec::new(),
            session_keys_file: None,
            session_ttl_secs: 600,
            max_session_age_secs: 12 * 3600,
            turn_credential_ttl_secs: 3600,
            backends: vec![Backend::Open],
            allow_open_on_public: false,
            users: Vec::new(),
            users_file: None,
            jwt: JwtConfig::default(),
            api_keys: Vec::new(),
            api_keys_file: None,
            login_rate_per_minute: 30,
            max_concurrent_password_checks: 0,
            admin_tokens: Vec::new(),
            admin_tokens_file: None,
        }
    }
}

/// Addresses advertised to clients; each defaults to the bound address.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PublicConfig {
    /// Host name or IP put in `stun:`/`turn:` URIs.
    pub host: Option<String>,
    /// Port put in `stun:` and `turn:` URIs.
    pub turn_port: Option<u16>,
    /// Port put in `turns:` URIs.
    pub turns_port: Option<u16>,
    /// Full signaling URL (`wss://…/v1/ws`) handed out at login.
    pub signaling_url: Option<String>,
    /// STUN servers (`stun:host[:port]`) that `public.host = "auto"` and
    /// `turn.relay_ip = "auto"` ask for this node's public address.
    pub discover_stun: Vec<String>,
    /// Seconds between two public address discoveries after the first.
    pub discover_interval_secs: u64,
    /// Per-node host name in cluster mode (`{node}.turn.example.com`); empty: IP literals.
    pub node_host: Option<String>,
    /// Shared `turns:` name that the certificate covers, added to per-node `iceServers`.
    pub turns_host: Option<String>,
}

impl Default for PublicConfig {
    fn default() -> Self {
        PublicConfig {
            host: None,
            turn_port: None,
            turns_port: None,
            signaling_url: None,
            discover_stun: Vec::new(),
            discover_interval_secs: 300,
            node_host: None,
            turns_host: None,
        }
    }
}

impl PublicConfig {
    /// Whether `public.host = "auto"`.
    pub fn host_auto(&self) -> bool {
        self.host.as_deref() == Some("auto")
    }
}

/// Certificate and key, PEM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain PEM file.
    pub cert_file: Option<PathBuf>,
    /// Private key PEM file.
    pub key_file: Option<PathBuf>,
    /// TLS handshakes in progress at once on each TLS listener; accepting pauses beyond.
    pub max_concurrent_handshakes: usize,
    /// Certificates ordered and renewed over ACME instead of files, when set.
    pub acme: Option<AcmeConfig>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: None,
            key_file: None,
            max_concurrent_handshakes: 128,
            acme: None,
        }
    }
}

/// One TCP port for networks that let out only TCP 443: each connection is routed by its
/// first bytes and ALPN to HTTPS/WSS, TURN over TLS, or plain TURN over TCP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SharedPortConfig {
    /// Addresses of the shared port, e.g. `["0.0.0.0:443"]`; empty turns it off.
    pub listen: Vec<SocketAddr>,
    /// Also serve plain (non-TLS) TURN over TCP there, for clients that cannot do `turns:`.
    pub plain_turn: bool,
    /// Port put in the 443 URIs and redirects, when a NAT or load balancer renames it.
    pub public_port: Option<u16>,
}

impl Default for SharedPortConfig {
    fn default() -> Self {
        SharedPortConfig {
            listen: Vec::new(),
            plain_turn: true,
            public_port: None,
        }
    }
}

/// Room signaling limits and timers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SignalingConfig {
    /// Largest accepted WebSocket frame in bytes.
    pub max_frame_bytes: usize,
    /// Sustained frames per second per connection.
    pub rate_per_sec: u32,
    /// Burst of frames per connection above the sustained rate.
    pub rate_burst: u32,
    /// Peers per room unless `create` asks for fewer.
    pub room_capacity: usize,
    /// Rooms open at once.
    pub max_rooms: usize,
    /// WebSocket connections per client IP.
    pub max_connections_per_ip: usize,
    /// Seconds between WebSocket pings.
    pub ping_interval_secs: u64,
    /// Seconds without any frame before a peer counts as gone.
    pub dead_peer_timeout_secs: u64,
    /// Seconds a dropped peer may resume its place.
    pub resume_grace_secs: u64,
    /// Frames kept per peer for replay on resume.
    pub resume_buffer_frames: usize,
    /// Bytes kept per peer for replay on resume.
    pub resume_buffer_bytes: usize,
    /// Bytes kept for replay by all peers of the node together.
    pub resume_total_bytes: usize,
    /// Frames queued for one connection before it counts as too slow (closed with 4002).
    pub outbox_frames: usize,
    /// Bytes queued for one connection before it counts as too slow (closed with 4002).
    pub outbox_bytes: usize,
    /// Bytes queued for all connections of the node together.
    pub outbox_total_bytes: usize,
    /// Seconds a connection without a token in its header has to send `hello`.
    pub hello_timeout_secs: u64,
    /// Open rooms one user may have created.
    pub max_rooms_per_user: usize,
    /// Independent shards of the room table (0: four per CPU).
    pub hub_shards: usize,
    /// Seconds an empty room stays open.
    pub empty_room_grace_secs: u64,
    /// Push fresh `ice-servers` this many seconds before TURN credentials expire.
    pub ice_refresh_before_secs: u64,
}

impl Default for SignalingConfig {
    fn default() -> Self {
        SignalingConfig {
            max_frame_bytes: 64 * 1024,
            rate_per_sec: 50,
            rate_burst: 100,
            room_capacity: 16,
            max_rooms: 10_000,
            max_connections_per_ip: 32,
            ping_interval_secs: 10,
            dead_peer_timeout_secs: 30,
            resume_grace_secs: 30,
            resume_buffer_frames: 256,
            resume_buffer_bytes: 256 * 1024,
            resume_total_bytes: 256 * 1024 * 1024,
            outbox_frames: 512,
            outbox_bytes: 1024 * 1024,
            outbox_total_bytes: 256 * 1024 * 1024,
            hello_timeout_secs: 10,
            max_rooms_per_user: 16,
            hub_shards: 0,
            empty_room_grace_secs: 30,
            ice_refresh_before_secs: 300,
        }
    }
}

/// Webhook delivery to the app backend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Endpoints that receive every event as a signed JSON POST; empty disables webhooks.
    pub urls: Vec<String>,
    /// HMAC-SHA256 signing secret shared with the receivers.
    pub secret: Option<Secret>,
    /// File holding the signing secret (first line), so it stays out of the config file.
    pub secret_file: Option<PathBuf>,
    /// Events queued per URL before new ones are dropped (and counted).
    pub queue_size: usize,
    /// Seconds one delivery attempt may take, connect included.
    pub timeout_secs: u64,
    /// Attempts per event before it is given up (and counted).
    pub max_attempts: u32,
    /// Wait before the first retry in milliseconds; doubles on every further retry.
    pub retry_initial_ms: u64,
    /// Longest wait between two retries in seconds.
    pub retry_max_secs: u64,
    /// PEM roots trusted for `https://` URLs; unset uses the system bundle.
    pub ca_file: Option<PathBuf>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            urls: Vec::new(),
            secret: None,
            secret_file: None,
            queue_size: 4096,
            timeout_secs: 5,
            max_attempts: 6,
            retry_initial_ms: 500,
            retry_max_secs: 30,
            ca_file: None,
        }
    }
}

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "SWITCHBOARD_";

impl Config {
    /// Load from an optional TOML file, then apply environment overrides, then validate.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Syntax {
                        path: p.to_path_buf(),
                        message: e.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        apply_env(&mut table, env)?;
        Self::from_table(table)
    }

    /// Parse a TOML document (used by tests and `load`).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let table = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::Syntax {
                path: PathBuf::from("<string>"),
                message: e.to_string(),
            })?;
        Self::from_table(table)
    }

    /// Parse a TOML document, then apply environment overrides: `load` without the file, so
    /// the fuzz target drives both inputs.
    #[doc(hidden)]
    pub fn from_toml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::Syntax {
                path: PathBuf::from("<string>"),
                message: e.to_string(),
            })?;
        apply_env(&mut table, env)?;
        Self::from_table(table)
    }

    fn from_table(table: toml::Table) -> Result<Config, ConfigError> {
        let value = toml::Value::Table(table);
        let cfg: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::key(key, e.into_inner().to_string())
        })?;
        let mut cfg = cfg;
        cfg.read_secret_files()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Fill each secret that has a `*_file` key from that file (at start and on every
    /// reload). Setting both a secret and its file is an error naming the file key.
    pub fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        use crate::secret::{read_list, read_one};
        fn both(key: &str) -> ConfigError {
            let inline = key.trim_end_matches("_file");
            ConfigError::key(key, format!("set either {inline} or {key}, not both"))
        }
        let file_err =
            |key: &str, e: crate::secret::SecretFileError| ConfigError::key(key, e.to_string());
        let a = &mut self.auth;
        if let Some(p) = &a.turn_secrets_file {
            if !a.turn_secrets.is_empty() {
                return Err(both("auth.turn_secrets_file"));
            }
            a.turn_secrets = read_list(p).map_err(|e| file_err("auth.turn_secrets_file", e))?;
        }
        if let Some(p) = &a.session_keys_file {
            if !a.session_keys.is_empty() {
                return Err(both("auth.session_keys_file"));
            }
            a.session_keys = read_list(p).map_err(|e| file_err("auth.session_keys_file", e))?;
        }
        if let Some(p) = &a.api_keys_file {
            if !a.api_keys.is_empty() {
                return Err(both("auth.api_keys_file"));
            }
            a.api_keys = read_list(p).map_err(|e| file_err("auth.api_keys_file", e))?;
        }
        if let Some(p) = &a.turn_users_file {
            let key = "auth.turn_users_file";
            if !a.turn_users.is_empty() {
                return Err(both(key));
            }
            for (i, line) in read_list(p)
                .map_err(|e| file_err(key, e))?
                .iter()
                .enumerate()
            {
                // Never echo the line: it holds a password.
                let (name, pass) = line.expose().split_once(':').ok_or_else(|| {
                    ConfigError::key(key, format!("entry {} is not `name:password`", i + 1))
                })?;
                if name.trim().is_empty() || pass.is_empty() {
                    return Err(ConfigError::key(
                        key,
                        format!("entry {} has an empty name or password", i + 1),
                    ));
                }
                a.turn_users
                    .insert(name.trim().to_string(), Secret::from(pass));
            }
        }
        if let Some(p) = &a.users_file {
            let key = "auth.users_file";
            if !a.users.is_empty() {
                return Err(both(key));
            }
            for (i, line) in read_list(p)
                .map_err(|e| file_err(key, e))?
                .iter()
                .enumerate()
            {
                // Never echo the line: it holds a password hash.
                let (name, hash) = line.expose().split_once(':').ok_or_else(|| {
                    ConfigError::key(key, format!("entry {} is not `name:hash`", i + 1))
                })?;
                if name.trim().is_empty() || hash.is_empty() {
                    return Err(ConfigError::key(
                        key,
                        format!("entry {} has an empty name or hash", i + 1),
                    ));
                }
                a.users.push(UserEntry {
                    name: name.trim().to_string(),
                    password_hash: Secret::from(hash),
                });
            }
        }
        if let Some(p) = &a.jwt.hs256_secret_file {
            if a.jwt.hs256_secret.is_some() {
                return Err(both("auth.jwt.hs256_secret_file"));
            }
            a.jwt.hs256_secret =
                Some(read_one(p).map_err(|e| file_err("auth.jwt.hs256_secret_file", e))?);
        }
        for (i, k) in a.jwt.keys.iter_mut().enumerate() {
            if let Some(p) = &k.hs256_secret_file {
                let key = format!("auth.jwt.keys[{i}].hs256_secret_file");
                if k.hs256_secret.is_some() {
                    return Err(both(&key));
                }
                k.hs256_secret = Some(read_one(p).map_err(|e| file_err(&key, e))?);
            }
        }
        Ok(())
    }

    /// Render the effective configuration as TOML (for `--print-config`). Secrets print as
    /// `[redacted]`; secrets read from a `*_file` key are left out, the file key stays.
    pub fn to_toml(&self) -> String {
        let mut c = self.clone();
        // A Redis URL may carry a password (`redis://:pw@host`): print the host only.
        if let Some((scheme, rest)) = c.cluster.redis_url.split_once("://") {
            if let Some((_, host)) = rest.rsplit_once('@') {
                c.cluster.redis_url = format!("{scheme}://{}@{host}", crate::secret::REDACTED);
            }
        }
        let a = &mut c.auth;
        if a.turn_secrets_file.is_some() {
            a.turn_secrets.clear();
        }
        if a.session_keys_file.is_some() {
            a.session_keys.clear();
        }
        if a.api_keys_file.is_some() {
            a.api_keys.clear();
        }
        if a.turn_users_file.is_some() {
            a.turn_users.clear();
        }
        if a.users_file.is_some() {
            a.users.clear();
        }
        if a.jwt.hs256_secret_file.is_some() {
            a.jwt.hs256_secret = None;
        }
        for k in &mut a.jwt.keys {
            if k.hs256_secret_file.is_some() {
                k.hs256_secret = None;
            }
        }
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// Check relations between keys that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_turn()?;
        self.validate_tls()?;
        self.validate_http()?;
        self.validate_auth()?;
        validate_discovery(self)?;
        self.validate_cluster()?;
        self.validate_admin()?;
        self.validate_webhooks()?;
        self.peerjs.validate()?;
        self.validate_signaling()
    }

    /// `[turn]`: ports, listeners, lifetimes, stream caps, peer ranges and relay addresses.
    fn validate_turn(&self) -> Result<(), ConfigError> {
        let t = &self.turn;
        if t.relay_port_min == 0 || t.relay_port_min > t.relay_port_max {
            return Err(ConfigError::key(
                "turn.relay_port_min",
                format!(
                    "must be between 1 and turn.relay_port_max ({})",
                    t.relay_port_max
                ),
            ));
        }
        if t.listen.is_empty() && t.tls_listen.is_empty() {
            return Err(ConfigError::key(
                "turn.listen",
                "at least one STUN/TURN listen address is required",
            ));
        }
        // The shared port serves STUN/TURN over TCP and TLS too (a 443-only deployment).
        if !t.udp && !t.tcp && t.tls_listen.is_empty() && self.shared_port.listen.is_empty() {
            return Err(ConfigError::key(
                "turn.udp",
                "turn.udp, turn.tcp, turn.tls_listen and shared_port.listen are all off; \
                 nothing would serve STUN",
            ));
        }
        if t.default_lifetime_secs == 0 || t.default_lifetime_secs > t.max_lifetime_secs {
            return Err(ConfigError::key(
                "turn.default_lifetime_secs",
                "must be between 1 and turn.max_lifetime_secs",
            ));
        }
        if t.nonce_lifetime_secs == 0 {
            return Err(ConfigError::key(
                "turn.nonce_lifetime_secs",
                "must be positive",
            ));
        }
        if t.unauthenticated_bytes_per_second > 0 && t.unauthenticated_burst_bytes < 1500 {
            return Err(ConfigError::key(
                "turn.unauthenticated_burst_bytes",
                "must be at least 1500 (one answer) while turn.unauthenticated_bytes_per_second is on",
            ));
        }
        if t.realm.is_empty() || t.realm.len() > 127 {
            return Err(ConfigError::key(
                "turn.realm",
                "must be 1 to 127 characters",
            ));
        }
        for (key, v) in [
            ("turn.max_stream_connections", t.max_stream_connections),
            (
                "turn.max_stream_connections_per_ip",
                t.max_stream_connections_per_ip,
            ),
            (
                "turn.stream_first_message_timeout_secs",
                t.stream_first_message_timeout_secs as usize,
            ),
            (
                "turn.max_allocation_age_secs",
                t.max_allocation_age_secs as usize,
            ),
            (
                "turn.max_pending_connections_per_allocation",
                t.max_pending_connections_per_allocation,
            ),
            (
                "turn.data_connection_idle_timeout_secs",
                t.data_connection_idle_timeout_secs as usize,
            ),
            (
                "tls.max_concurrent_handshakes",
                self.tls.max_concurrent_handshakes,
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::key(key, "must be positive"));
            }
        }
        for (i, c) in t.allow_peers.iter().enumerate() {
            crate::turn::policy::Cidr::parse(c)
                .map_err(|m| ConfigError::key(format!("turn.allow_peers[{i}]"), m))?;
        }
        validate_relay_addresses(t)?;
        for (i, c) in t.deny_peers.iter().enumerate() {
            crate::turn::policy::Cidr::parse(c)
                .map_err(|m| ConfigError::key(format!("turn.deny_peers[{i}]"), m))?;
        }
        Ok(())
    }

    /// `[tls]`: a certificate and key wherever TLS is served.
    fn validate_tls(&self) -> Result<(), ConfigError> {
        if let Some(acme) = &self.tls.acme {
            return acme.validate(self);
        }
        if !self.turn.tls_listen.is_empty() || self.http.tls {
            if self.tls.cert_file.is_none() {
                return Err(ConfigError::key(
                    "tls.cert_file",
                    "required when turn.tls_listen or http.tls is set",
                ));
            }
            if self.tls.key_file.is_none() {
                return Err(ConfigError::key(
                    "tls.key_file",
                    "required when turn.tls_listen or http.tls is set",
                ));
            }
        }
        if !self.shared_port.listen.is_empty() {
            for key in ["tls.cert_file", "tls.key_file"] {
                let set = match key {
                    "tls.cert_file" => self.tls.cert_file.is_some(),
                    _ => self.tls.key_file.is_some(),
                };
                if !set {
                    return Err(ConfigError::key(
                        key,
                        "required when shared_port.listen is set",
                    ));
                }
            }
            if self.shared_port.public_port == Some(0) {
                return Err(ConfigError::key(
                    "shared_port.public_port",
                    "must be positive",
                ));
            }
        }
        Ok(())
    }

    /// `[http]`: trusted proxy ranges and allowed origins.
    fn validate_http(&self) -> Result<(), ConfigError> {
        for (i, c) in self.http.trusted_proxies.iter().enumerate() {
            crate::turn::policy::Cidr::parse(c)
                .map_err(|m| ConfigError::key(format!("http.trusted_proxies[{i}]"), m))?;
        }
        for (i, o) in self.http.allowed_origins.iter().enumerate() {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                return Err(ConfigError::key(
                    format!("http.allowed_origins[{i}]"),
                    "must be `*` or an origin like https://app.example.com",
                ));
            }
        }
        Ok(())
    }

    /// `[auth]`: backends, keys, lifetimes and the length of every secret.
    fn validate_auth(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        if a.backends.is_empty() {
            return Err(ConfigError::key(
                "auth.backends",
                "at least one of open, users, jwt is required",
            ));
        }
        if a.backends.contains(&Backend::Open)
            && !self.http.listen.ip().is_loopback()
            && !a.allow_open_on_public
        {
            return Err(ConfigError::key(
                "auth.backends",
                format!(
                    "the `open` backend lets anyone log in and is refused on the non-loopback address {}; \
                     use `users` or `jwt`, or set auth.allow_open_on_public = true",
                    self.http.listen
                ),
            ));
        }
        if a.backends.contains(&Backend::Jwt)
            && a.jwt.hs256_secret.is_none()
            && a.jwt.public_key_file.is_none()
            && a.jwt.keys.is_empty()
            && a.jwt.jwks_url.is_none()
        {
            return Err(ConfigError::key(
                "auth.jwt",
                "the jwt backend needs hs256_secret, public_key_file, keys or jwks_url",
            ));
        }
        if let Some(u) = &a.jwt.jwks_url {
            jwks_url_ok(u).map_err(|m| ConfigError::key("auth.jwt.jwks_url", m))?;
        }
        if a.jwt.jwks_refresh_secs == 0 {
            return Err(ConfigError::key(
                "auth.jwt.jwks_refresh_secs",
                "must be at least 1",
            ));
        }
        if a.jwt.jwks_min_interval_secs == 0 {
            return Err(ConfigError::key(
                "auth.jwt.jwks_min_interval_secs",
                "must be at least 1",
            ));
        }
        for (i, k) in a.jwt.keys.iter().enumerate() {
            if k.kid.is_empty() {
                return Err(ConfigError::key(
                    format!("auth.jwt.keys[{i}].kid"),
                    "must not be empty",
                ));
            }
            if a.jwt.keys[..i].iter().any(|o| o.kid == k.kid) {
                return Err(ConfigError::key(
                    format!("auth.jwt.keys[{i}].kid"),
                    "an earlier key has the same kid",
                ));
            }
            if k.hs256_secret.is_some() == k.public_key_file.is_some() {
                return Err(ConfigError::key(
                    format!("auth.jwt.keys[{i}]"),
                    "set exactly one of hs256_secret, hs256_secret_file, public_key_file",
                ));
            }
        }
        if a.max_session_age_secs < a.session_ttl_secs {
            return Err(ConfigError::key(
                "auth.max_session_age_secs",
                "must be at least auth.session_ttl_secs",
            ));
        }
        let mut secrets: Vec<(String, &Secret)> = Vec::new();
        secrets.extend(
            a.turn_secrets
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("auth.turn_secrets[{i}]"), s)),
        );
        secrets.extend(
            a.session_keys
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("auth.session_keys[{i}]"), s)),
        );
        secrets.extend(
            a.api_keys
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("auth.api_keys[{i}]"), s)),
        );
        secrets.extend(
            a.turn_users
                .iter()
                .map(|(n, s)| (format!("auth.turn_users.{n}"), s)),
        );
        secrets.extend(
            a.users
                .iter()
                .enumerate()
                .map(|(i, u)| (format!("auth.users[{i}].password_hash"), &u.password_hash)),
        );
        secrets.extend(
            a.jwt
                .hs256_secret
                .iter()
                .map(|s| ("auth.jwt.hs256_secret".to_string(), s)),
        );
        secrets.extend(
            a.admin_tokens
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("auth.admin_tokens[{i}]"), s)),
        );
        secrets.extend(
            self.webhooks
                .secret
                .iter()
                .map(|s| ("webhooks.secret".to_string(), s)),
        );
        secrets.extend(a.jwt.keys.iter().enumerate().filter_map(|(i, k)| {
            k.hs256_secret
                .as_ref()
                .map(|s| (format!("auth.jwt.keys[{i}].hs256_secret"), s))
        }));
        for (key, s) in secrets {
            if s.is_placeholder() {
                return Err(ConfigError::key(
                    key,
                    "is the `[redacted]` placeholder that --print-config writes; \
                     put the real secret here or in the matching *_file key",
                ));
            }
        }
        if a.session_ttl_secs == 0 {
            return Err(ConfigError::key(
                "auth.session_ttl_secs",
                "must be positive",
            ));
        }
        if a.turn_credential_ttl_secs == 0 {
            return Err(ConfigError::key(
                "auth.turn_credential_ttl_secs",
                "must be positive",
            ));
        }
        for (i, s) in a.turn_secrets.iter().enumerate() {
            if s.is_empty() {
                return Err(ConfigError::key(
                    format!("auth.turn_secrets[{i}]"),
                    "must not be empty",
                ));
            }
        }
        for (i, s) in a.session_keys.iter().enumerate() {
            if s.len() < 16 {
                return Err(ConfigError::key(
                    format!("auth.session_keys[{i}]"),
                    "must be at least 16 characters",
                ));
            }
        }
        Ok(())
    }

    /// `[cluster]`: Redis, timings, the node id, and the secrets every node must share.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let k = &self.cluster;
        if k.enabled() {
            if !(1000..=60_000).contains(&k.node_ttl_ms) {
                return Err(ConfigError::key(
                    "cluster.node_ttl_ms",
                    "must be between 1000 and 60000",
                ));
            }
            if !(k.redis_url.starts_with("redis://") || k.redis_url.starts_with("redis+unix://")) {
                return Err(ConfigError::key(
                    "cluster.redis_url",
                    "must be a redis:// URL (or redis+unix://)",
                ));
            }
            // Nodes verify each other's session tokens and TURN credentials: a random key per
            // process would make every cross-node resume and relay fail.
            if self.auth.session_keys.is_empty() {
                return Err(ConfigError::key(
                    "auth.session_keys",
                    "cluster mode needs session keys shared by every node",
                ));
            }
            if self.turn.relay && self.auth.turn_secrets.is_empty() {
                return Err(ConfigError::key(
                    "auth.turn_secrets",
                    "cluster mode needs TURN secrets shared by every node",
                ));
            }
            if k.lease_ms < 1000 {
                return Err(ConfigError::key(
                    "cluster.lease_ms",
                    "must be at least 1000",
                ));
            }
            if k.forward_timeout_ms == 0 {
                return Err(ConfigError::key(
                    "cluster.forward_timeout_ms",
                    "must be positive",
                ));
            }
            if k.publish_queue_bytes < 1 << 20 {
                return Err(ConfigError::key(
                    "cluster.publish_queue_bytes",
                    "must be at least 1048576 (1 MiB)",
                ));
            }
            if k.node_id.len() > 64
                || !k
                    .node_id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(ConfigError::key(
                    "cluster.node_id",
                    "up to 64 of A-Z a-z 0-9 - _ .",
                ));
            }
        }
        Ok(())
    }

    /// The server API (`http.admin_api`): admin tokens long enough, and required off loopback.
    fn validate_admin(&self) -> Result<(), ConfigError> {
        for (i, t) in self.auth.admin_tokens.iter().enumerate() {
            if t.len() < 16 {
                return Err(ConfigError::key(
                    format!("auth.admin_tokens[{i}]"),
                    "must be at least 16 characters",
                ));
            }
        }
        if self.http.admin_api
            && self.auth.admin_tokens.is_empty()
            && self.auth.admin_tokens_file.is_none()
            && !self.http.listen.ip().is_loopback()
        {
            return Err(ConfigError::key(
                "auth.admin_tokens",
                format!(
                    "http.admin_api is on and http.listen ({}) is not a loopback address: \
                     set auth.admin_tokens or auth.admin_tokens_file",
                    self.http.listen
                ),
            ));
        }
        Ok(())
    }

    /// `[signaling]`: frame, room, outbox and rate bounds.
    fn validate_signaling(&self) -> Result<(), ConfigError> {
        let s = &self.signaling;
        if s.max_frame_bytes < 1024 {
            return Err(ConfigError::key(
                "signaling.max_frame_bytes",
                "must be at least 1024",
            ));
        }
        if s.room_capacity < 2 {
            return Err(ConfigError::key(
                "signaling.room_capacity",
                "must be at least 2",
            ));
        }
        if s.outbox_bytes < 4 * s.max_frame_bytes {
            return Err(ConfigError::key(
                "signaling.outbox_bytes",
                "must be at least 4 × signaling.max_frame_bytes (a connection must be able to \
                 queue a few frames of the largest size)",
            ));
        }
        if s.max_rooms_per_user == 0 {
            return Err(ConfigError::key(
                "signaling.max_rooms_per_user",
                "must be at least 1",
            ));
        }
        if s.rate_per_sec == 0 {
            return Err(ConfigError::key(
                "signaling.rate_per_sec",
                "must be positive",
            ));
        }
        Ok(())
    }

    fn validate_webhooks(&self) -> Result<(), ConfigError> {
        let w = &self.webhooks;
        for (i, u) in w.urls.iter().enumerate() {
            let ok = reqwest::Url::parse(u)
                .map(|p| matches!(p.scheme(), "http" | "https") && p.host().is_some())
                .unwrap_or(false);
            if !ok {
                return Err(ConfigError::key(
                    format!("webhooks.urls[{i}]"),
                    "must be an http:// or https:// URL",
                ));
            }
        }
        if w.secret.is_some() && w.secret_file.is_some() {
            return Err(ConfigError::key(
                "webhooks.secret_file",
                "set webhooks.secret or webhooks.secret_file, not both",
            ));
        }
        if w.secret.as_ref().is_some_and(|s| s.len() < 16) {
            return Err(ConfigError::key(
                "webhooks.secret",
                "must be at least 16 characters",
            ));
        }
        if !w.urls.is_empty() && w.secret.is_none() && w.secret_file.is_none() {
            return Err(ConfigError::key(
                "webhooks.secret",
                "webhooks.urls is set: a signing secret (webhooks.secret or webhooks.secret_file) is required",
            ));
        }
        if w.queue_size == 0 {
            return Err(ConfigError::key("webhooks.queue_size", "must be positive"));
        }
        if w.timeout_secs == 0 {
            return Err(ConfigError::key(
                "webhooks.timeout_secs",
                "must be positive",
            ));
        }
        if w.max_attempts == 0 {
            return Err(ConfigError::key(
                "webhooks.max_attempts",
                "must be positive",
            ));
        }
        Ok(())
    }

    /// True when every STUN/TURN and HTTP listener is on a loopback address.
    pub fn loopback_only(&self) -> bool {
        self.http.listen.ip().is_loopback()
            && self
                .turn
                .listen
                .iter()
                .chain(self.turn.tls_listen.iter())
                .chain(self.shared_port.listen.iter())
                .all(|a| a.ip().is_loopback())
    }
}

/// `"auto"` addresses need a STUN server to ask; per-node names need their placeholder.
fn validate_discovery(c: &Config) -> Result<(), ConfigError> {
    let p = &c.public;
    if c.turn.relay_auto() && c.turn.relay_ip.len() > 1 {
        return Err(ConfigError::key(
            "turn.relay_ip",
            "\"auto\" learns every address itself: list nothing else",
        ));
    }
    if (c.turn.relay_auto() || p.host_auto()) && p.discover_stun.is_empty() {
        let key = if p.host_auto() {
            "public.host"
        } else {
            "turn.relay_ip"
        };
        return Err(ConfigError::key(
            "public.discover_stun",
            format!("{key} = \"auto\" needs a STUN server to ask (stun:host:port)"),
        ));
    }
    for (i, u) in p.discover_stun.iter().enumerate() {
        if stun_target(u).is_none() {
            return Err(ConfigError::key(
                format!("public.discover_stun[{i}]"),
                "must be stun:host or stun:host:port",
            ));
        }
    }
    if p.discover_interval_secs < 10 {
        return Err(ConfigError::key(
            "public.discover_interval_secs",
            "must be at least 10",
        ));
    }
    if let Some(h) = &p.node_host {
        if !h.contains("{node}") || h.contains(['/', ' ', ':']) {
            return Err(ConfigError::key(
                "public.node_host",
                "must be a host name with {node}, like {node}.turn.example.com",
            ));
        }
    }
    Ok(())
}

/// `stun:host[:port]` → (host, port), for `public.discover_stun`.
pub fn stun_target(uri: &str) -> Option<(String, u16)> {
    let rest = uri.strip_prefix("stun:")?;
    if rest.is_empty() || rest.contains(['/', '?', ' ']) {
        return None;
    }
    if let Ok(a) = rest.parse::<SocketAddr>() {
        return Some((a.ip().to_string(), a.port()));
    }
    if let Some(v6) = rest.strip_prefix('[') {
        let (h, p) = v6.split_once(']')?;
        let port = match p.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if p.is_empty() => 3478,
            None => return None,
        };
        return Some((h.to_string(), port));
    }
    match rest.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((rest.to_string(), 3478)),
    }
}

/// Relay addressing: every relay socket must have an address that clients can be told.
fn validate_relay_addresses(t: &TurnConfig) -> Result<(), ConfigError> {
    for (i, a) in t.relay_ip.iter().enumerate() {
        let clash = t.relay_ip[..i].iter().any(|b| {
            b.private == a.private
                && (a.private.is_some() || b.public.is_ipv4() == a.public.is_ipv4())
        });
        if clash {
            return Err(ConfigError::key(
                format!("turn.relay_ip[{i}]"),
                format!("`{a}` maps a local address that an earlier entry already maps"),
            ));
        }
    }
    let catch_all = |v4: bool| {
        t.relay_auto()
            || t.relay_ip
                .iter()
                .any(|r| r.private.is_none() && r.public.is_ipv4() == v4)
    };
    if let Some(b) = t.relay_bind {
        if b.is_unspecified() && !catch_all(b.is_ipv4()) {
            return Err(ConfigError::key(
                "turn.relay_ip",
                format!(
                    "turn.relay_bind = \"{b}\" binds relay sockets to every interface, so no \
                     relayed address is known: set turn.relay_ip to the address clients reach, \
                     or leave turn.relay_bind unset to bind the address each request reached"
                ),
            ));
        }
    }
    if let Some(b) = t.relay_bind_v6 {
        if !b.is_ipv6() {
            return Err(ConfigError::key(
                "turn.relay_bind_v6",
                "must be an IPv6 address",
            ));
        }
        if b.is_unspecified() && !catch_all(false) {
            return Err(ConfigError::key(
                "turn.relay_ip",
                "turn.relay_bind_v6 = \"::\" binds relay sockets to every interface, so no \
                 relayed address is known: set turn.relay_ip to the IPv6 address clients reach, \
                 or leave turn.relay_bind_v6 unset",
            ));
        }
    }
    Ok(())
}

/// Apply `SWITCHBOARD_SECTION__KEY=value` overrides to a parsed TOML table.
///
/// The value is read as a TOML value when it parses as one (numbers, booleans, arrays),
/// and as a plain string otherwise.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.len() < 2 || path.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::key(
                name.clone(),
                "environment overrides look like SWITCHBOARD_<SECTION>__<KEY>",
            ));
        }
        let value = parse_env_value(&raw);
        let mut cur = &mut *table;
        for seg in &path[..path.len() - 1] {
            let entry = cur
                .entry(seg.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cur = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::key(
                        path.join("."),
                        format!("{name} overrides a key whose parent is not a table"),
                    ))
                }
            };
        }
        if let Some(last) = path.last() {
            cur.insert(last.clone(), value);
        }
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

/// A JWKS URL must be https, or http to a loopback address: keys fetched over plain HTTP
/// from elsewhere could be swapped on the way, and would then sign anyone in.
fn jwks_url_ok(u: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(u).map_err(|e| e.to_string())?;
    match url.scheme() {
        "https" => Ok(()),
        "http" => {
            let host = url.host_str().unwrap_or("");
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(())
            } else {
                Err("http:// is accepted only for a loopback host; use https://".into())
            }
        }
        other => Err(format!("scheme {other}: expected https")),
    }
}

// ---- [tls.acme] ----

/// Let's Encrypt's production directory, the default `tls.acme.directory`.
pub const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// `[tls.acme]`: certificates for the shared port ordered and renewed over ACME (TLS-ALPN-01),
/// so an operator needs no certificate files and no restart at renewal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AcmeConfig {
    /// DNS names on the certificate (no wildcards: TLS-ALPN-01 cannot prove them).
    pub domains: Vec<String>,
    /// Account contacts, each `mailto:`; the CA writes there about expiry and incidents.
    pub contact: Vec<String>,
    /// The ACME directory URL (https); Let's Encrypt production by default.
    pub directory: String,
    /// PEM CA bundle trusted for the directory instead of the system roots (test or private CAs).
    pub directory_ca_file: Option<PathBuf>,
    /// Where the account key and the certificate live (0600), so a restart orders nothing.
    pub cache_dir: PathBuf,
    /// Whether this node orders; unset means yes alone and no in cluster mode (one issuer).
    pub issuer: Option<bool>,
    /// Renew this long before notAfter, or at 2/3 of the lifetime when that comes first.
    pub renew_before_secs: u64,
    /// First wait after a failed order; doubled per failure up to `retry_max_secs`.
    pub retry_min_secs: u64,
    /// Longest wait between failed orders.
    pub retry_max_secs: u64,
    /// How often a node that does not order looks for a newer certificate in `cache_dir`.
    pub follow_interval_secs: u64,
}

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig {
            domains: Vec::new(),
            contact: Vec::new(),
            directory: LETS_ENCRYPT_DIRECTORY.into(),
            directory_ca_file: None,
            cache_dir: PathBuf::from("/var/lib/switchboard/acme"),
            issuer: None,
            renew_before_secs: 30 * 86_400,
            retry_min_secs: 60,
            retry_max_secs: 6 * 3600,
            follow_interval_secs: 300,
        }
    }
}

impl AcmeConfig {
    /// Whether this node orders certificates (see `issuer`).
    pub fn orders(&self, cluster: bool) -> bool {
        self.issuer.unwrap_or(!cluster)
    }

    /// Checks of the `[tls.acme]` keys and of what ACME needs elsewhere.
    fn validate(&self, c: &Config) -> Result<(), ConfigError> {
        if c.tls.cert_file.is_some() || c.tls.key_file.is_some() {
            return Err(ConfigError::key(
                "tls.acme",
                "set either tls.cert_file/tls.key_file or [tls.acme], not both",
            ));
        }
        if c.shared_port.listen.is_empty() && !c.http.tls {
            return Err(ConfigError::key(
                "tls.acme",
                "needs shared_port.listen (or http.tls): TLS-ALPN-01 is answered there",
            ));
        }
        if self.domains.is_empty() {
            return Err(ConfigError::key(
                "tls.acme.domains",
                "must name at least one domain",
            ));
        }
        for d in &self.domains {
            let ok = !d.starts_with("*.")
                && d.len() <= 253
                && d.contains('.')
                && d.parse::<std::net::IpAddr>().is_err()
                && d.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !ok {
                return Err(ConfigError::key(
                    "tls.acme.domains",
                    format!("{d:?} is not a DNS name (no wildcards, no IP addresses)"),
                ));
            }
        }
        if let Some(bad) = self
            .contact
            .iter()
            .find(|m| !m.starts_with("mailto:") || m.len() <= "mailto:".len() || !m.contains('@'))
        {
            return Err(ConfigError::key(
                "tls.acme.contact",
                format!("{bad:?} must look like mailto:ops@example.com"),
            ));
        }
        if !self.directory.starts_with("https://") || self.directory.len() <= "https://".len() {
            return Err(ConfigError::key(
                "tls.acme.directory",
                "must be an https:// URL",
            ));
        }
        if self.cache_dir.as_os_str().is_empty() {
            return Err(ConfigError::key("tls.acme.cache_dir", "must be set"));
        }
        if self.retry_min_secs == 0 || self.retry_max_secs < self.retry_min_secs {
            return Err(ConfigError::key(
                "tls.acme.retry_min_secs",
                "must be positive and at most retry_max_secs",
            ));
        }
        if self.follow_interval_secs == 0 {
            return Err(ConfigError::key(
                "tls.acme.follow_interval_secs",
                "must be positive",
            ));
        }
        if c.shared_port.public_port == Some(0) {
            return Err(ConfigError::key(
                "shared_port.public_port",
                "must be positive",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn acme_keys_are_checked_with_clear_errors() {
        let base = "[shared_port]\nlisten = [\"0.0.0.0:443\"]\n[tls.acme]\n";
        let ok = format!(
            "{base}domains = [\"turn.example.com\"]\ncontact = [\"mailto:ops@example.com\"]\n"
        );
        let c = Config::from_toml(&ok).expect("valid acme config");
        let a = c.tls.acme.as_ref().expect("acme");
        assert_eq!(a.directory, LETS_ENCRYPT_DIRECTORY);
        assert!(
            a.orders(false) && !a.orders(true),
            "one issuer by default in a cluster"
        );
        for (extra, want) in [
            ("domains = []\n", "tls.acme.domains"),
            ("domains = [\"*.example.com\"]\n", "no wildcards"),
            ("domains = [\"203.0.113.10\"]\n", "tls.acme.domains"),
            (
                "domains = [\"a.example.com\"]\ncontact = [\"ops@example.com\"]\n",
                "mailto:",
            ),
            (
                "domains = [\"a.example.com\"]\ndirectory = \"http://ca.example/dir\"\n",
                "https://",
            ),
            (
                "domains = [\"a.example.com\"]\nretry_min_secs = 0\n",
                "retry_min_secs",
            ),
        ] {
            let e = err_of(&format!("{base}{extra}"));
            assert!(e.contains(want), "{extra}: {e}");
        }
        let e = err_of(
            "[shared_port]\nlisten = [\"0.0.0.0:443\"]\n[tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\n\
             [tls.acme]\ndomains = [\"a.example.com\"]\n",
        );
        assert!(e.contains("not both"), "{e}");
        let e = err_of("[tls.acme]\ndomains = [\"a.example.com\"]\n");
        assert!(e.contains("shared_port.listen"), "{e}");
        // The one issuer of a cluster is chosen per pod by environment (deploy/kubernetes).
        let c = Config::from_toml_with_env(
            &ok,
            [(
                "SWITCHBOARD_TLS__ACME__ISSUER".to_string(),
                "true".to_string(),
            )],
        )
        .expect("env override");
        assert_eq!(c.tls.acme.as_ref().and_then(|a| a.issuer), Some(true));
        // No [tls.acme]: ACME stays off, as with no config at all.
        assert!(Config::from_toml("").expect("defaults").tls.acme.is_none());
    }

    #[test]
    fn auto_addresses_need_a_stun_server_and_node_names_their_placeholder() {
        let e = err_of("[turn]\nrelay_ip = \"auto\"\n");
        assert!(
            e.contains("public.discover_stun") && e.contains("turn.relay_ip"),
            "{e}"
        );
        let e = err_of("[public]\nhost = \"auto\"\n");
        assert!(
            e.contains("public.discover_stun") && e.contains("public.host"),
            "{e}"
        );
        let e = err_of("[turn]\nrelay_ip = [\"auto\", \"203.0.113.1\"]\n[public]\ndiscover_stun = [\"stun:a\"]\n");
        assert!(e.contains("turn.relay_ip"), "{e}");
        let e = err_of("[public]\ndiscover_stun = [\"turn:a:3478\"]\n");
        assert!(e.contains("public.discover_stun[0]"), "{e}");
        let e = err_of("[public]\nnode_host = \"turn.example.com\"\n");
        assert!(e.contains("public.node_host"), "{e}");
        let c = Config::from_toml(
            "[turn]\nrelay_ip = \"auto\"\nrelay_bind = \"0.0.0.0\"\n[public]\nhost = \"auto\"\n\
             discover_stun = [\"stun:stun.example.net\", \"stun:[2001:db8::1]:3479\"]\n\
             node_host = \"{node}.turn.example.com\"\n",
        )
        .unwrap();
        assert!(c.turn.relay_auto() && c.public.host_auto());
        assert_eq!(c.turn.relay_ip[0].to_string(), "auto");
        assert_eq!(
            stun_target(&c.public.discover_stun[0]),
            Some(("stun.example.net".into(), 3478))
        );
        assert_eq!(
            stun_target(&c.public.discover_stun[1]),
            Some(("2001:db8::1".into(), 3479))
        );
        // It prints back as it was written.
        let again = Config::from_toml(&c.to_toml()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn cluster_turn_keys_are_checked() {
        let base = "[auth]\nsession_keys = [\"k-0123456789abcdef\"]\nturn_secrets = [\"s\"]\n\
                    [cluster]\nredis_url = \"redis://127.0.0.1\"\n";
        let e = err_of(&format!("{base}node_ttl_ms = 500\n"));
        assert!(e.contains("cluster.node_ttl_ms"), "{e}");
        let c = Config::from_toml(&format!("{base}turn_placement = \"least_loaded\"\n")).unwrap();
        assert_eq!(c.cluster.turn_placement, TurnPlacement::LeastLoaded);
        let e = err_of(&format!("{base}turn_placement = \"random\"\n"));
        assert!(e.contains("cluster.turn_placement"), "{e}");
    }

    #[test]
    fn empty_is_default_and_valid() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.http.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.turn.listen, vec!["127.0.0.1:3478".parse().unwrap()]);
        assert!(c.loopback_only());
    }

    #[test]
    fn reflector_burst_must_hold_one_answer() {
        let e = err_of("[turn]\nunauthenticated_burst_bytes = 100\n");
        assert!(e.contains("turn.unauthenticated_burst_bytes"), "{e}");
        // With the limit off the burst does not matter.
        Config::from_toml(
            "[turn]\nunauthenticated_bytes_per_second = 0\nunauthenticated_burst_bytes = 0\n",
        )
        .unwrap();
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err_of("[turn]\nrelay_portz = 5\n");
        assert!(e.contains("turn"), "{e}");
        assert!(e.contains("relay_portz"), "{e}");
    }

    #[test]
    fn port_out_of_range_is_named() {
        let e = err_of("[turn]\nrelay_port_max = 70000\n");
        assert!(e.contains("turn.relay_port_max"), "{e}");
    }

    #[test]
    fn bad_address_is_named() {
        let e = err_of("[http]\nlisten = \"localhost:eighty\"\n");
        assert!(e.contains("http.listen"), "{e}");
    }

    #[test]
    fn relation_errors_are_named() {
        let e = err_of("[turn]\nrelay_port_min = 6000\nrelay_port_max = 5000\n");
        assert!(e.contains("turn.relay_port_min"), "{e}");
        let e = err_of("[turn]\nallow_peers = [\"10.0.0.0/33\"]\n");
        assert!(e.contains("turn.allow_peers[0]"), "{e}");
    }

    #[test]
    fn relay_ip_takes_one_or_many_pairs_and_wildcards_need_it() {
        let c = Config::from_toml("[turn]\nrelay_ip = \"203.0.113.10\"\n").unwrap();
        assert_eq!(c.turn.relay_ip.len(), 1);
        assert_eq!(c.turn.relay_ip[0].private, None);
        let c = Config::from_toml(
            "[turn]\nrelay_ip = [\"203.0.113.10/10.0.0.5\", \"2001:db8::10/fd00::5\"]\n",
        )
        .unwrap();
        assert_eq!(c.turn.relay_ip[1].to_string(), "2001:db8::10/fd00::5");
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
        let e = err_of("[turn]\nrelay_ip = [\"203.0.113.10/fd00::5\"]\n");
        assert!(e.contains("turn.relay_ip"), "{e}");
        let e = err_of("[turn]\nrelay_ip = \"0.0.0.0\"\n");
        assert!(e.contains("turn.relay_ip"), "{e}");
        let e =
            err_of("[turn]\nrelay_ip = [\"198.51.100.1/10.0.0.5\", \"198.51.100.2/10.0.0.5\"]\n");
        assert!(e.contains("turn.relay_ip[1]"), "{e}");
        // A wildcard relay bind has nothing true to report without relay_ip.
        let e = err_of("[turn]\nrelay_bind = \"0.0.0.0\"\n");
        assert!(e.contains("turn.relay_ip"), "{e}");
        Config::from_toml("[turn]\nrelay_bind = \"0.0.0.0\"\nrelay_ip = \"203.0.113.10\"\n")
            .unwrap();
        let env = vec![(
            "SWITCHBOARD_TURN__RELAY_IP".to_string(),
            "203.0.113.10".to_string(),
        )];
        assert_eq!(Config::load(None, env).unwrap().turn.relay_ip.len(), 1);
        let e = err_of("[http]\ntrusted_proxies = [\"10.0.0.0/40\"]\n");
        assert!(e.contains("http.trusted_proxies[0]"), "{e}");
    }

    #[test]
    fn jwks_url_must_be_https_or_loopback_http() {
        let jwt =
            |u: &str| format!("[auth]\nbackends = [\"jwt\"]\n[auth.jwt]\njwks_url = \"{u}\"\n");
        Config::from_toml(&jwt("https://idp.example.com/jwks.json")).unwrap();
        Config::from_toml(&jwt("http://127.0.0.1:9000/jwks")).unwrap();
        Config::from_toml(&jwt("http://[::1]:9000/jwks")).unwrap();
        Config::from_toml(&jwt("http://localhost/jwks")).unwrap();
        for bad in [
            "http://203.0.113.5/jwks",
            "http://idp.example.com/jwks",
            "ftp://x/",
            "::",
        ] {
            let e = err_of(&jwt(bad));
            assert!(e.contains("auth.jwt.jwks_url"), "{bad}: {e}");
        }
        let e = err_of(&format!(
            "{}jwks_min_interval_secs = 0\n",
            jwt("https://idp.example.com/jwks.json")
        ));
        assert!(e.contains("auth.jwt.jwks_min_interval_secs"), "{e}");
    }

    #[test]
    fn admin_api_needs_a_token_off_loopback_and_webhooks_need_a_secret() {
        let e = err_of("[http]\nadmin_api = true\nlisten = \"0.0.0.0:8080\"\n[auth]\nallow_open_on_public = true\n");
        assert!(e.contains("auth.admin_tokens"), "{e}");
        Config::from_toml("[http]\nadmin_api = true\n").unwrap();
        Config::from_toml(
            "[http]\nadmin_api = true\nlisten = \"0.0.0.0:8080\"\n[auth]\nallow_open_on_public = true\nadmin_tokens = [\"0123456789abcdef\"]\n",
        )
        .unwrap();
        let e = err_of("[auth]\nadmin_tokens = [\"short\"]\n");
        assert!(e.contains("auth.admin_tokens[0]"), "{e}");
        let e = err_of("[webhooks]\nurls = [\"http://127.0.0.1:9/hook\"]\n");
        assert!(e.contains("webhooks.secret"), "{e}");
        let e = err_of("[webhooks]\nurls = [\"ftp://x/\"]\nsecret = \"0123456789abcdef\"\n");
        assert!(e.contains("webhooks.urls[0]"), "{e}");
        Config::from_toml(
            "[webhooks]\nurls = [\"http://127.0.0.1:9/hook\"]\nsecret = \"0123456789abcdef\"\n",
        )
        .unwrap();
    }

    #[test]
    fn open_backend_refused_on_public_address() {
        let e = err_of("[http]\nlisten = \"0.0.0.0:8080\"\n");
        assert!(e.contains("auth.backends"), "{e}");
        Config::from_toml(
            "[http]\nlisten = \"0.0.0.0:8080\"\n[auth]\nallow_open_on_public = true\n",
        )
        .unwrap();
    }

    #[test]
    fn env_overrides_apply_and_are_typed() {
        let env = vec![
            (
                "SWITCHBOARD_TURN__RELAY_PORT_MIN".to_string(),
                "50000".to_string(),
            ),
            (
                "SWITCHBOARD_TURN__REALM".to_string(),
                "example.org".to_string(),
            ),
            (
                "SWITCHBOARD_AUTH__TURN_SECRETS".to_string(),
                "[\"a\", \"b\"]".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let c = Config::load(None, env).unwrap();
        assert_eq!(c.turn.relay_port_min, 50000);
        assert_eq!(c.turn.realm, "example.org");
        assert_eq!(c.auth.turn_secrets, vec!["a".into(), "b".into()]);
    }

    #[test]
    fn env_override_errors_name_the_key() {
        let env = vec![(
            "SWITCHBOARD_TURN__RELAY_PORT_MIN".to_string(),
            "99999".to_string(),
        )];
        let e = Config::load(None, env).unwrap_err().to_string();
        assert!(e.contains("turn.relay_port_min"), "{e}");
        let env = vec![("SWITCHBOARD_NOPE__X".to_string(), "1".to_string())];
        let e = Config::load(None, env).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn print_config_round_trips() {
        let c = Config::default();
        let again = Config::from_toml(&c.to_toml()).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn shipped_example_config_parses() {
        let text = include_str!("../config/switchboard.toml");
        let c = Config::from_toml(text).unwrap();
        assert_eq!(
            c,
            Config::default(),
            "config/switchboard.toml documents the defaults"
        );
    }

    /// Every kind of secret, set inline.
    const SECRETS_TOML: &str = "[auth]\n\
        turn_secrets = [\"TS-one-secret\"]\n\
        session_keys = [\"SK-0123456789abcdef\"]\n\
        api_keys = [\"AK-api-key\"]\n\
        backends = [\"open\", \"jwt\"]\n\
        admin_tokens = [\"AT-admin-token-0123\"]\n\
        [auth.turn_users]\nalice = \"TU-alice-pass\"\n\
        [[auth.users]]\nname = \"ann\"\npassword_hash = \"PH-$argon2id$x\"\n\
        [auth.jwt]\nhs256_secret = \"JW-hs-secret\"\n\
        [[auth.jwt.keys]]\nkid = \"k1\"\nhs256_secret = \"JK-kid-secret\"\n\
        [webhooks]\nsecret = \"WH-webhook-secret-01\"\n";
    const SECRET_VALUES: [&str; 10] = [
        "AT-admin-token-0123",
        "WH-webhook-secret-01",
        "TS-one-secret",
        "SK-0123456789abcdef",
        "AK-api-key",
        "TU-alice-pass",
        "PH-$argon2id$x",
        "JW-hs-secret",
        "JK-kid-secret",
        "0123456789abcdef",
    ];

    #[test]
    fn print_config_and_debug_show_no_secret() {
        let c = Config::from_toml(SECRETS_TOML).unwrap();
        assert_eq!(c.auth.turn_users["alice"].expose(), "TU-alice-pass");
        let printed = c.to_toml();
        let debug = format!("{c:?} {c:#?}");
        for s in SECRET_VALUES {
            assert!(!printed.contains(s), "print-config leaks {s}:\n{printed}");
            assert!(!debug.contains(s), "Debug leaks {s}");
        }
        assert!(printed.contains("[redacted]"), "{printed}");
        // Fed back as is, the placeholder is refused and named.
        let e = err_of(&printed);
        assert!(
            e.contains("auth.turn_secrets[0]") && e.contains("placeholder"),
            "{e}"
        );
    }

    #[test]
    fn secret_files_fill_every_secret_and_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            p
        };
        let text = format!(
            "[auth]\nturn_secrets_file = {:?}\nsession_keys_file = {:?}\napi_keys_file = {:?}\n\
             turn_users_file = {:?}\nusers_file = {:?}\nbackends = [\"jwt\"]\n\
             [auth.jwt]\nhs256_secret_file = {:?}\n\
             [[auth.jwt.keys]]\nkid = \"k1\"\nhs256_secret_file = {:?}\n",
            f("turn", "# newest first\nTS-new\nTS-old\n"),
            f("session", "SK-0123456789abcdef\n"),
            f("api", "AK-1\n"),
            f("users", "alice:TU-a:b\n"),
            f("login-users", "ann:PH-$argon2id$v=19$x\n"),
            f("jwt", "JW-secret\n"),
            f("kid", "JK-secret"),
        );
        let c = Config::from_toml(&text).unwrap();
        let a = &c.auth;
        assert_eq!(
            a.turn_secrets
                .iter()
                .map(Secret::expose)
                .collect::<Vec<_>>(),
            ["TS-new", "TS-old"]
        );
        assert_eq!(a.session_keys[0].expose(), "SK-0123456789abcdef");
        assert_eq!(a.api_keys[0].expose(), "AK-1");
        assert_eq!(a.turn_users["alice"].expose(), "TU-a:b");
        assert_eq!(a.users[0].name, "ann");
        assert_eq!(a.users[0].password_hash.expose(), "PH-$argon2id$v=19$x");
        assert_eq!(a.jwt.hs256_secret.as_ref().unwrap().expose(), "JW-secret");
        assert_eq!(
            a.jwt.keys[0].hs256_secret.as_ref().unwrap().expose(),
            "JK-secret"
        );
        // print-config keeps the file keys, shows no secret, and reads back the same.
        let printed = c.to_toml();
        for s in [
            "TS-new",
            "SK-0123",
            "AK-1",
            "TU-a",
            "PH-$argon2id",
            "JW-secret",
            "JK-secret",
        ] {
            assert!(!printed.contains(s), "{printed}");
        }
        assert_eq!(Config::from_toml(&printed).unwrap(), c);

        // Errors name the key; a missing file, an empty one, a bad line, both set.
        let e = err_of("[auth]\nturn_secrets_file = \"/nonexistent/turn\"\n");
        assert!(
            e.contains("auth.turn_secrets_file") && e.contains("/nonexistent/turn"),
            "{e}"
        );
        let empty = f("empty", "\n# nothing\n");
        let e = err_of(&format!("[auth]\nsession_keys_file = {empty:?}\n"));
        assert!(e.contains("auth.session_keys_file"), "{e}");
        let bad = f("bad", "no-colon-here\n");
        let e = err_of(&format!("[auth]\nturn_users_file = {bad:?}\n"));
        assert!(
            e.contains("auth.turn_users_file") && !e.contains("no-colon-here"),
            "{e}"
        );
        let one = f("one", "x\n");
        let e = err_of(&format!(
            "[auth]\napi_keys = [\"y\"]\napi_keys_file = {one:?}\n"
        ));
        assert!(e.contains("auth.api_keys_file"), "{e}");
        let e = err_of(&format!(
            "[auth.jwt]\nhs256_secret = \"y\"\nhs256_secret_file = {one:?}\n"
        ));
        assert!(e.contains("auth.jwt.hs256_secret_file"), "{e}");
    }

    #[test]
    fn session_age_and_jwt_keys_are_validated() {
        let e = err_of("[auth]\nsession_ttl_secs = 600\nmax_session_age_secs = 60\n");
        assert!(e.contains("auth.max_session_age_secs"), "{e}");
        let e = err_of("[[auth.jwt.keys]]\nkid = \"\"\nhs256_secret = \"x\"\n");
        assert!(e.contains("auth.jwt.keys[0].kid"), "{e}");
        let e = err_of(
            "[[auth.jwt.keys]]\nkid = \"a\"\nhs256_secret = \"x\"\n\
             [[auth.jwt.keys]]\nkid = \"a\"\nhs256_secret = \"y\"\n",
        );
        assert!(e.contains("auth.jwt.keys[1].kid"), "{e}");
        let e = err_of("[[auth.jwt.keys]]\nkid = \"a\"\n");
        assert!(e.contains("auth.jwt.keys[0]"), "{e}");
    }
}
