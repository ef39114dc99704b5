//! The cluster-wide PeerJS id registry and relay (docs/peerjs.md, "Cluster mode"). Each id is
//! a Redis hash `sb:pj:id:<id>` naming the node, this process's instance nonce and the holder
//! (a session user or a token hash), with a lifetime the node refreshes while it holds the id.
//! A node relaying to an id that is nowhere adds itself to `sb:pj:wait:<id>`; the node that
//! claims the id next tells the waiting nodes, which hand their held messages over. Messages
//! travel on the ordered per-node bus as `Wire::Peerjs`.

use futures_util::future::BoxFuture;
use redis::Script;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::wire::Wire;
use super::Cluster;
use crate::peerjs::router::{Claimed, Located, PeerjsRouter, RemoteMsg};
use crate::peerjs::PeerJs;

/// The registry key of a PeerJS id.
pub fn id_key(id: &str) -> String {
    format!("sb:pj:id:{id}")
}

/// The nodes holding messages for an id that is nowhere.
pub fn wait_key(id: &str) -> String {
    format!("sb:pj:wait:{id}")
}

/// Claim: `{0}` when another holder has the id; else `{1, previous node or '', waiting...}`.
const CLAIM: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'node', 'inst', 'holder')
local prev = ''
if cur[1] then
  if cur[3] ~= ARGV[3] then return {0} end
  if cur[2] ~= ARGV[2] then prev = cur[1] end
end
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'inst', ARGV[2], 'holder', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local w = redis.call('SMEMBERS', KEYS[2])
redis.call('DEL', KEYS[2])
local out = {1, prev}
for _, n in ipairs(w) do table.insert(out, n) end
return out
";

/// Refresh: 1 when the claim is this instance's (made anew when it lapsed), 0 when another
/// instance holds the id now.
const REFRESH: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'inst')
if cur[1] and cur[1] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'inst', ARGV[2], 'holder', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

const RELEASE: &str = r"
if redis.call('HGET', KEYS[1], 'inst') == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

/// Locate: the holding node, or (nowhere) register this node as waiting and answer nil.
const LOCATE: &str = r"
local n = redis.call('HGET', KEYS[1], 'node')
if n then return n end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return false
";

/// The PeerJS half of this node's cluster part.
pub struct PjCluster {
    /// The realm, once built (it holds the router, so this side holds it weakly).
    realm: std::sync::OnceLock<Weak<PeerJs>>,
    /// This process's instance nonce: a restarted node does not mistake old claims for its own.
    inst: String,
    /// How long a claim lives without refresh.
    ttl: Duration,
    /// How long a node waits to be told about an id that is nowhere.
    wait: Duration,
    claim: Script,
    refresh: Script,
    release: Script,
    locate: Script,
}

impl std::fmt::Debug for PjCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PjCluster").finish_non_exhaustive()
    }
}

impl PjCluster {
    /// Claims living `ttl` without refresh; waits as long as messages are held (`hold`).
    pub fn new(ttl: Duration, hold: Duration) -> PjCluster {
        PjCluster {
            realm: std::sync::OnceLock::new(),
            inst: format!("{:016x}-{}", rand::random::<u64>(), std::process::id()),
            ttl,
            wait: hold + Duration::from_secs(1),
            claim: Script::new(CLAIM),
            refresh: Script::new(REFRESH),
            release: Script::new(RELEASE),
            locate: Script::new(LOCATE),
        }
    }
}

impl Cluster {
    /// Hand bus messages for PeerJS to `realm` (it is built after the cluster).
    pub fn attach_peerjs(&self, realm: &Arc<PeerJs>) {
        let _ = self.pj.realm.set(Arc::downgrade(realm));
    }

    /// A PeerJS message from another node.
    pub(crate) fn peerjs_in(&self, from: &str, msg: RemoteMsg) {
        if let Some(realm) = self.pj.realm.get().and_then(Weak::upgrade) {
            realm.on_remote(from, msg);
        }
    }

    fn ms(d: Duration) -> u64 {
        d.as_millis().max(1) as u64
    }

    async fn pj_claim(&self, id: &str, holder: &str) -> Claimed {
        if !self.is_up() {
            return Claimed::Unavailable;
        }
        let r: redis::RedisResult<Vec<redis::Value>> = self
            .pj
            .claim
            .key(id_key(id))
            .key(wait_key(id))
            .arg(&*self.node)
            .arg(&self.pj.inst)
            .arg(holder)
            .arg(Self::ms(self.pj.ttl))
            .invoke_async(&mut self.con())
            .await;
        let v = match r {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "peerjs: cannot claim an id in Redis");
                return Claimed::Unavailable;
            }
        };
        let text = |v: &redis::Value| -> Option<String> { redis::from_redis_value(v.clone()).ok() };
        let ok = v
            .first()
            .and_then(|x| redis::from_redis_value::<i64>(x.clone()).ok());
        if ok != Some(1) {
            return Claimed::Taken;
        }
        let previous = v
            .get(1)
            .and_then(text)
            .filter(|n| !n.is_empty() && n.as_str() != &*self.node);
        let waiting = v
            .iter()
            .skip(2)
            .filter_map(text)
            .filter(|n| n.as_str() != &*self.node)
            .collect();
        Claimed::Mine { waiting, previous }
    }

    async fn pj_locate(&self, id: &str) -> Located {
        if !self.is_up() {
            return Located::Unavailable;
        }
        let r: redis::RedisResult<Option<String>> = self
            .pj
            .locate
            .key(id_key(id))
            .key(wait_key(id))
            .arg(&*self.node)
            .arg(Self::ms(self.pj.wait))
            .invoke_async(&mut self.con())
            .await;
        match r {
            Ok(Some(n)) if n == *self.node => Located::Here,
            Ok(Some(n)) => Located::On(n),
            Ok(None) => Located::Nowhere,
            Err(e) => {
                tracing::debug!(error = %e, "peerjs: cannot locate an id in Redis");
                Located::Unavailable
            }
        }
    }

    async fn pj_refresh(&self, ids: Vec<(String, String)>) -> Vec<String> {
        if !self.is_up() {
            return Vec::new();
        }
        // EVALSHA in a pipeline does not load the script by itself.
        let mut pipe = redis::pipe();
        pipe.load_script(&self.pj.refresh).ignore();
        for (id, holder) in &ids {
            pipe.invoke_script(
                self.pj
                    .refresh
                    .key(id_key(id))
                    .arg(&*self.node)
                    .arg(&self.pj.inst)
                    .arg(holder)
                    .arg(Self::ms(self.pj.ttl)),
            );
        }
        let r: redis::RedisResult<Vec<i64>> = pipe.query_async(&mut self.con()).await;
        match r {
            Ok(v) => ids
                .into_iter()
                .zip(v)
                .filter(|(_, ok)| *ok == 0)
                .map(|((id, _), _)| id)
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "peerjs: id claim refresh failed");
                Vec::new()
            }
        }
    }

    fn pj_release(self: &Arc<Self>, ids: Vec<String>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut pipe = redis::pipe();
            pipe.load_script(&me.pj.release).ignore();
            for id in &ids {
                pipe.invoke_script(me.pj.release.key(id_key(id)).arg(&me.pj.inst))
                    .ignore();
            }
            let mut con = me.con();
            let f = pipe.query_async::<()>(&mut con);
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(2), f).await {
                tracing::debug!(error = %e, "peerjs: id release failed");
            }
        });
    }
}

/// The router PeerJS is given in cluster mode: the cluster behind an `Arc`, so that background
/// releases can outlive the call.
#[derive(Debug)]
pub struct Router(pub Arc<Cluster>);

impl PeerjsRouter for Router {
    fn claim<'a>(&'a self, id: &'a str, holder: &'a str) -> BoxFuture<'a, Claimed> {
        Box::pin(self.0.pj_claim(id, holder))
    }
    fn release(&self, ids: Vec<String>) {
        self.0.pj_release(ids)
    }
    fn locate<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Located> {
        Box::pin(self.0.pj_locate(id))
    }
    fn send(&self, node: &str, msg: RemoteMsg) -> bool {
        if !self.0.is_up() {
            return false;
        }
        self.0.remote.publish(&Arc::from(node), Wire::Peerjs(msg))
    }
    fn refresh(&self, ids: Vec<(String, String)>) -> BoxFuture<'_, Vec<String>> {
        Box::pin(self.0.pj_refresh(ids))
    }
    fn refresh_every(&self) -> Duration {
        self.0.pj.ttl / 3
    }
}
