//! TURN membership in Redis: each node publishes its record (addresses, URIs, state, load)
//! and its per-user allocation counts under a TTL, refreshed every second, and reads the
//! others' into the [`Live`] snapshot that logins and the TURN core read without waiting.
//!
//! Keys: `sb:turn:nodes` (a set of node ids), `sb:turn:node:<id>` (the JSON record, PX TTL),
//! `sb:turn:quota:<id>` (a hash user → allocations on that node, PX TTL). A node that dies
//! leaves when its keys expire; one that stops cleanly deletes them.
//!
//! While Redis is away, nothing here blocks anything else: after one TTL without a read the
//! snapshot shrinks to this node alone (logins point at it, Allocates are not redirected)
//! and the remote quota counts are dropped, so `turn.max_allocations_per_user` holds per node.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::turn::core::Pool;
use crate::turn::members::{Live, NodeRecord, NodeState, Snapshot};

const NODES: &str = "sb:turn:nodes";

fn node_key(id: &str) -> String {
    format!("sb:turn:node:{id}")
}

fn quota_key(id: &str) -> String {
    format!("sb:turn:quota:{id}")
}

/// What the membership task needs; `describe` gives this node's addresses and URIs now
/// (the app layer knows them: bound ports, discovery, `public.*`).
pub struct Membership {
    /// This node's id.
    pub node: String,
    /// `cluster.redis_url`.
    pub redis_url: String,
    /// `cluster.node_ttl_ms`.
    pub ttl: Duration,
    /// Where the snapshot goes.
    pub live: Arc<Live>,
    /// This node's allocation counts.
    pub pool: Arc<Pool>,
    /// Metrics (ready nodes, this node's state, relayed packets for the load).
    pub metrics: Arc<Metrics>,
    /// Draining and shutdown.
    pub lifecycle: Arc<Lifecycle>,
    /// This node's record without state and load.
    pub describe: Box<dyn Fn() -> NodeRecord + Send + Sync>,
}

/// CPU time of the relay shard threads (`turn-shard-*`), in clock ticks.
fn shard_ticks() -> u64 {
    let Ok(rd) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut sum = 0;
    for t in rd.flatten() {
        let p = t.path();
        let is_shard =
            std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.starts_with("turn-shard-"));
        if !is_shard {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(p.join("stat")) else {
            continue;
        };
        // Fields after the `(comm)`: state is field 3, utime 14 and stime 15.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        sum += n(11) + n(12);
    }
    sum
}

/// Clock ticks per second in `/proc/*/stat` (USER_HZ, 100 on every Linux ABI we build for;
/// asking `sysconf` would need `unsafe`).
const USER_HZ: f64 = 100.0;

fn cpus() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

impl Membership {
    fn record(&self, state: NodeState, pps: f64, cpu: f64) -> NodeRecord {
        let mut r = (self.describe)();
        r.node = self.node.clone();
        r.state = state;
        r.allocations = u64::from(self.pool.total());
        r.capacity = self.live.capacity;
        r.packets_per_sec = pps;
        r.cpu = cpu;
        r.at_ms = crate::turn::members::unix_ms();
        r
    }

    async fn publish(&self, con: &mut ConnectionManager, r: &NodeRecord) -> redis::RedisResult<()> {
        let json = serde_json::to_string(r).unwrap_or_default();
        let ttl = self.ttl.as_millis() as u64;
        let users = self.pool.users();
        let mut p = redis::pipe();
        p.atomic()
            .cmd("SET")
            .arg(node_key(&self.node))
            .arg(json)
            .arg("PX")
            .arg(ttl)
            .ignore()
            .cmd("SADD")
            .arg(NODES)
            .arg(&self.node)
            .ignore()
            .cmd("DEL")
            .arg(quota_key(&self.node))
            .ignore();
        if !users.is_empty() {
            let mut h = redis::cmd("HSET");
            h.arg(quota_key(&self.node));
            for (u, n) in &users {
                h.arg(u).arg(*n);
            }
            p.add_command(h).ignore();
            p.cmd("PEXPIRE")
                .arg(quota_key(&self.node))
                .arg(ttl)
                .ignore();
        }
        p.query_async(con).await
    }

    async fn read(
        &self,
        con: &mut ConnectionManager,
    ) -> redis::RedisResult<(Snapshot, HashMap<String, u32>)> {
        let ids: Vec<String> = redis::cmd("SMEMBERS").arg(NODES).query_async(con).await?;
        if ids.is_empty() {
            return Ok((Snapshot::default(), HashMap::new()));
        }
        let mut p = redis::pipe();
        for id in &ids {
            p.cmd("GET").arg(node_key(id));
        }
        for id in &ids {
            p.cmd("HGETALL").arg(quota_key(id));
        }
        type Reply = (Vec<Option<String>>, Vec<HashMap<String, u32>>);
        let all: Vec<redis::Value> = p.query_async(con).await?;
        let (recs, quotas): Reply = {
            let mut recs = Vec::with_capacity(ids.len());
            let mut quotas = Vec::with_capacity(ids.len());
            for (i, v) in all.into_iter().enumerate() {
                if i < ids.len() {
                    recs.push(redis::from_redis_value(v).ok().flatten());
                } else {
                    quotas.push(redis::from_redis_value(v).unwrap_or_default());
                }
            }
            (recs, quotas)
        };
        let mut nodes = Vec::new();
        let mut gone = Vec::new();
        let mut remote: HashMap<String, u32> = HashMap::new();
        for ((id, rec), quota) in ids.iter().zip(recs).zip(quotas) {
            match rec.and_then(|j| serde_json::from_str::<NodeRecord>(&j).ok()) {
                Some(r) if r.node == *id => nodes.push(r),
                _ => gone.push(id.clone()),
            }
            if *id != self.node {
                for (u, n) in quota {
                    *remote.entry(u).or_insert(0) += n;
                }
            }
        }
        if !gone.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("SREM")
                .arg(NODES)
                .arg(&gone)
                .query_async(con)
                .await;
        }
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        Ok((Snapshot { nodes }, remote))
    }

    fn set_state_metric(&self, state: NodeState) {
        let (on, off) = match state {
            NodeState::Ready => ("ready", "draining"),
            NodeState::Draining => ("draining", "ready"),
        };
        self.metrics
            .cluster_node_state
            .with_label_values(&[on])
            .set(1);
        self.metrics
            .cluster_node_state
            .with_label_values(&[off])
            .set(0);
    }

    fn apply(&self, snap: Snapshot, remote: HashMap<String, u32>) {
        let ready = snap
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Ready)
            .count();
        self.metrics.cluster_nodes_ready.set(ready as i64);
        self.live.set_members(snap);
        self.pool.set_remote(remote);
    }

    /// Publish and read every second (at once when draining starts) until shutdown; then
    /// delete this node's keys so that it leaves the cluster without waiting for the TTL.
    pub async fn run(self) {
        let rto = Duration::from_millis(500);
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(rto))
            .set_response_timeout(Some(rto))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let con = redis::Client::open(self.redis_url.as_str())
            .and_then(|c| ConnectionManager::new_lazy_with_config(c, cfg));
        let mut con = match con {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cluster membership: bad Redis URL");
                return;
            }
        };
        let mut stop = self.lifecycle.subscribe();
        let mut last_ok = Instant::now();
        let mut warned = false;
        let mut last_packets = self.packets();
        let mut last_ticks = shard_ticks();
        let mut last_at = Instant::now();
        let mut was_draining = false;
        let period = Duration::from_secs(1).min(self.ttl / 3);
        let mut next = Instant::now();
        loop {
            let draining = self.lifecycle.is_draining();
            if Instant::now() < next && draining == was_draining {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                continue;
            }
            if draining && !was_draining {
                tracing::info!("cluster membership: draining; logins and Allocates go elsewhere");
            }
            was_draining = draining;
            next = Instant::now() + period;
            let dt = last_at.elapsed().as_secs_f64().max(0.001);
            let packets = self.packets();
            let ticks = shard_ticks();
            let pps = packets.saturating_sub(last_packets) as f64 / dt;
            let cpu = ticks.saturating_sub(last_ticks) as f64 / USER_HZ / dt / cpus();
            (last_packets, last_ticks, last_at) = (packets, ticks, Instant::now());
            let state = if draining {
                NodeState::Draining
            } else {
                NodeState::Ready
            };
            self.set_state_metric(state);
            let own = self.record(state, pps, cpu);
            let r = match self.publish(&mut con, &own).await {
                Ok(()) => self.read(&mut con).await,
                Err(e) => Err(e),
            };
            match r {
                Ok((snap, remote)) => {
                    if warned {
                        tracing::info!("cluster membership: Redis answers again");
                    }
                    warned = false;
                    last_ok = Instant::now();
                    self.apply(snap, remote);
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "cluster membership: Redis unavailable");
                        warned = true;
                    }
                    if last_ok.elapsed() >= self.ttl {
                        self.apply(Snapshot { nodes: vec![own] }, HashMap::new());
                    }
                }
            }
        }
        let _: redis::RedisResult<()> = redis::pipe()
            .cmd("DEL")
            .arg(node_key(&self.node))
            .arg(quota_key(&self.node))
            .cmd("SREM")
            .arg(NODES)
            .arg(&self.node)
            .query_async(&mut con)
            .await;
    }

    fn packets(&self) -> u64 {
        self.metrics.relay_packets_to_peer.get() + self.metrics.relay_packets_to_client.get()
    }
}
