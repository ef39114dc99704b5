//! One live process per `cluster.node_id`. Leases, channels and edge connection ids are all
//! named by the node id, so two processes sharing one would silently share rooms and each
//! other's messages. Each process claims `sb:claim:<node>` with a random instance nonce
//! (`SET NX PX`, refreshed with every lease heartbeat): a second process that finds a live
//! claim of another instance refuses to start, and a running one whose claim was taken by
//! another instance (it was cut off from Redis meanwhile) stops taking rooms and alerts.

use redis::aio::ConnectionManager;
use redis::Script;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{lock, Cluster, ClusterError};

/// The claim key of a node id.
pub fn claim_key(node: &str) -> String {
    format!("sb:claim:{node}")
}

/// Take the claim when it is free, keep it when it is ours; 0 when another instance holds it.
const CLAIM: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

const UNCLAIM: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

/// This process's claim on its node id.
pub struct Claim {
    key: String,
    nonce: String,
    ttl_ms: u64,
    claim: Script,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim").field("key", &self.key).finish()
    }
}

impl Claim {
    /// A claim on `node` with a fresh nonce, living `ttl_ms` without refresh.
    pub fn new(node: &str, ttl_ms: u64) -> Claim {
        Claim {
            key: claim_key(node),
            nonce: format!("{:016x}-{}", rand::random::<u64>(), std::process::id()),
            ttl_ms,
            claim: Script::new(CLAIM),
        }
    }

    /// Take or refresh the claim; `false` when another instance holds it.
    pub async fn refresh(&self, con: &mut ConnectionManager) -> redis::RedisResult<bool> {
        let ok: i64 = self
            .claim
            .key(&self.key)
            .arg(&self.nonce)
            .arg(self.ttl_ms)
            .invoke_async(con)
            .await?;
        Ok(ok == 1)
    }

    /// Give the claim up (clean exit), so that a restart under the same id need not wait.
    pub async fn release(&self, con: &mut ConnectionManager) -> redis::RedisResult<()> {
        Script::new(UNCLAIM)
            .key(&self.key)
            .arg(&self.nonce)
            .invoke_async(con)
            .await
    }
}

impl Cluster {
    /// At start: claim this node's id. A claim of another instance may be that of this node's
    /// previous process, dead without giving it up, so it is waited out for one claim lifetime;
    /// a claim still refreshed by another instance after that means another live process uses
    /// this id, and this one refuses to start. With Redis away, the heartbeat claims later.
    pub async fn claim_node_id(&self) -> Result<(), ClusterError> {
        let life = Duration::from_millis(self.claim_ttl_ms());
        let t0 = Instant::now();
        let mut waited = false;
        loop {
            match tokio::time::timeout(life, self.claim.refresh(&mut self.con())).await {
                Ok(Ok(true)) => return Ok(()),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cluster: cannot claim the node id yet (Redis)");
                    return Ok(());
                }
                Err(_) => {
                    tracing::warn!("cluster: cannot claim the node id yet (Redis silent)");
                    return Ok(());
                }
            }
            if !waited {
                waited = true;
                tracing::warn!(
                    node = %self.node,
                    "cluster: another instance holds this node id; waiting one claim lifetime \
                     in case it is this node's previous process"
                );
            }
            if t0.elapsed() > life + Duration::from_millis(500) {
                return Err(ClusterError::NodeIdInUse(self.node.to_string()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether another live process claims this node's id (for `/readyz`).
    pub fn node_id_in_use(&self) -> bool {
        self.clash.load(Ordering::Acquire)
    }

    /// Milliseconds a claim lives without refresh: one lease time (refreshed every third).
    fn claim_ttl_ms(&self) -> u64 {
        self.lease_ttl.as_millis() as u64
    }

    /// With each heartbeat: refresh the claim. `false` while another instance holds it: this
    /// node then owns no room and takes none (it gave its rooms up, so that their peers resume
    /// elsewhere), until the claim is its own again.
    pub(crate) async fn refresh_claim(&self) -> bool {
        let r = self.claim.refresh(&mut self.con()).await;
        match r {
            Ok(true) => {
                if self.clash.swap(false, Ordering::AcqRel) {
                    self.metrics.cluster_node_id_conflict.set(0);
                    tracing::warn!(node = %self.node, "cluster: node id claim is ours again");
                }
                true
            }
            Ok(false) => {
                if !self.clash.swap(true, Ordering::AcqRel) {
                    self.metrics.cluster_node_id_conflict.set(1);
                    tracing::error!(
                        node = %self.node,
                        "cluster.node_id: another live process claimed this node id; this \
                         node gives its rooms up and takes none until the id is its own again \
                         (give every node its own cluster.node_id)"
                    );
                    self.give_up_rooms();
                    lock(&self.pending).clear();
                }
                false
            }
            Err(e) => {
                tracing::debug!(error = %e, "cluster: node id claim refresh failed");
                !self.clash.load(Ordering::Acquire)
            }
        }
    }

    /// On a clean exit: give the claim up.
    pub(crate) async fn release_claim(&self) {
        let mut con = self.con();
        let f = self.claim.release(&mut con);
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_millis(500), f).await {
            tracing::debug!(error = %e, "cluster: node id claim release failed");
        }
    }
}
