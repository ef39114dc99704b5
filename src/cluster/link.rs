//! The node's tasks against Redis: the publisher (queued messages, batched per node, in
//! order), the subscriber with its own liveness probe (a subscription that stops delivering
//! counts as down and is made anew), and the heartbeat (lease renewal, re-registration after
//! an outage or an empty restart, watching the owners of remote seats, the drain hand-over).

use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::bus::Out;
use super::lease::{self, Owner, Renewed};
use super::wire::{Envelope, Wire};
use super::{lock, Cluster};
use crate::lifecycle::shutdown_signal;
use crate::signaling::bus::Outbound;

/// How often a node probes its own subscription.
const PROBE: Duration = Duration::from_millis(500);
/// Silence on the subscription after which it counts as broken.
const SILENCE: Duration = Duration::from_millis(2000);
/// Messages per batch taken from the publisher queue.
const BATCH: usize = 1024;

impl Cluster {
    /// Run the cluster tasks until shutdown.
    pub async fn run(self: Arc<Self>) {
        let Some(queue) = lock(&self.queue).take() else {
            return;
        };
        let p = tokio::spawn(self.clone().publisher(queue));
        let s = tokio::spawn(self.clone().subscriber());
        self.clone().heartbeat().await;
        let _ = s.await;
        p.abort();
    }

    async fn publisher(self: Arc<Self>, mut q: super::bus::Queue) {
        let mut stop = std::pin::pin!(shutdown_signal(self.lifecycle.subscribe()));
        let mut con = self.con();
        loop {
            let first = tokio::select! {
                x = q.rx.recv() => x,
                _ = &mut stop => return,
            };
            let Some(first) = first else { return };
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match q.rx.try_recv() {
                    Ok(x) => batch.push(x),
                    Err(_) => break,
                }
            }
            q.taken(&batch);
            // Consecutive publishes become one envelope per node; lease work is a barrier.
            let mut envs: Vec<(Arc<str>, Vec<Wire>)> = Vec::new();
            for item in batch {
                match item {
                    Out::Publish(node, w) => match envs.iter_mut().find(|(n, _)| *n == node) {
                        Some((_, v)) => v.push(w),
                        None => envs.push((node, vec![w])),
                    },
                    Out::Mirror(room, epoch, state) => {
                        self.flush(&mut con, &mut envs).await;
                        if let Err(e) = self
                            .leases
                            .write_mirror(&mut con, &room, epoch, state.as_ref())
                            .await
                        {
                            tracing::debug!(error = %e, "cluster: mirror write failed");
                        }
                    }
                    Out::Release(room, epoch, forget) => {
                        self.flush(&mut con, &mut envs).await;
                        if let Err(e) = self.leases.release(&mut con, &room, epoch, forget).await {
                            tracing::debug!(error = %e, "cluster: lease release failed");
                        }
                    }
                }
            }
            self.flush(&mut con, &mut envs).await;
        }
    }

    async fn flush(
        &self,
        con: &mut redis::aio::ConnectionManager,
        envs: &mut Vec<(Arc<str>, Vec<Wire>)>,
    ) {
        if envs.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        let mut n = 0u64;
        for (node, msgs) in envs.drain(..) {
            n += msgs.iter().filter(|w| !matches!(w, Wire::Ping)).count() as u64;
            let env = Envelope {
                from: self.node.to_string(),
                msgs,
            };
            let Ok(text) = serde_json::to_string(&env) else {
                continue;
            };
            pipe.cmd("PUBLISH")
                .arg(lease::channel(&node))
                .arg(text)
                .ignore();
        }
        match pipe.query_async::<()>(con).await {
            Ok(()) => self
                .metrics
                .cluster_bus_messages
                .with_label_values(&["publish"])
                .inc_by(n),
            Err(e) => {
                tracing::debug!(error = %e, "cluster: publish failed");
                self.metrics
                    .drops
                    .with_label_values(&["cluster_publish_failed"])
                    .inc_by(n.max(1));
            }
        }
    }

    async fn subscriber(self: Arc<Self>) {
        let mut stop = std::pin::pin!(shutdown_signal(self.lifecycle.subscribe()));
        let me: Arc<str> = self.node.clone();
        let chan = lease::channel(&me);
        loop {
            let connect = async {
                let mut ps = self.client.get_async_pubsub().await?;
                ps.subscribe(&chan).await?;
                Ok::<_, redis::RedisError>(ps)
            };
            let ps = tokio::select! {
                r = tokio::time::timeout(SILENCE, connect) => r,
                _ = &mut stop => return,
            };
            let ps = match ps {
                Ok(Ok(ps)) => ps,
                _ => {
                    self.set_down();
                    tokio::select! {
                        _ = tokio::time::sleep(PROBE) => continue,
                        _ = &mut stop => return,
                    }
                }
            };
            let mut stream = ps.into_on_message();
            let mut probe = tokio::time::interval(PROBE);
            let mut last = Instant::now();
            loop {
                tokio::select! {
                    m = stream.next() => {
                        let Some(m) = m else { break };
                        last = Instant::now();
                        if !self.up.load(Ordering::Acquire) {
                            self.set_up();
                        }
                        // Messages for this node id may be meant for the other process.
                        if self.clash.load(Ordering::Acquire) {
                            continue;
                        }
                        match serde_json::from_slice::<Envelope>(m.get_payload_bytes()) {
                            Ok(env) => {
                                let n = env.msgs.iter().filter(|w| !matches!(w, Wire::Ping)).count();
                                self.metrics
                                    .cluster_bus_messages
                                    .with_label_values(&["receive"])
                                    .inc_by(n as u64);
                                self.handle(env);
                            }
                            Err(e) => tracing::warn!(error = %e, "cluster: malformed bus message"),
                        }
                    }
                    _ = probe.tick() => {
                        if last.elapsed() > SILENCE {
                            tracing::warn!("cluster: subscription silent; reconnecting");
                            break;
                        }
                        self.remote.publish(&me, Wire::Ping);
                    }
                    _ = &mut stop => return,
                }
            }
            self.set_down();
        }
    }

    fn set_up(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            tracing::info!("cluster: Redis reachable; re-registering rooms");
            self.metrics.cluster_redis_up.set(1);
            self.beat.notify_one();
        }
    }

    /// Redis is lost: cross-node seats cannot be served. Connections seated elsewhere are
    /// closed so that their clients resume once it is back; seats of other nodes' connections
    /// in rooms owned here enter their resume window.
    fn set_down(&self) {
        if !self.up.swap(false, Ordering::AcqRel) {
            self.metrics.cluster_redis_up.set(0);
            return;
        }
        tracing::warn!("cluster: Redis unreachable; local rooms go on, cross-node requests fail");
        self.metrics.cluster_redis_up.set(0);
        let seats: Vec<_> = lock(&self.seats).drain().map(|(c, _)| c).collect();
        for c in seats {
            self.push(c, Outbound::Moved);
        }
        lock(&self.pending).clear();
        let now = Instant::now();
        for (p, proxy) in self.remote.take_proxies() {
            self.sig.apply(&self.metrics, &proxy.room, |h, out| {
                h.disconnect(now, p, out)
            });
        }
    }

    async fn heartbeat(self: Arc<Self>) {
        let mut stop = std::pin::pin!(shutdown_signal(self.lifecycle.subscribe()));
        let every = self.lease_ttl / 3;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.beat.notified() => {}
                _ = &mut stop => {
                    self.hand_over();
                    // Let the publisher send the releases.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    self.release_claim().await;
                    return;
                }
            }
            if self.lifecycle.is_draining() && !self.handed_over.load(Ordering::Acquire) {
                self.hand_over();
                continue;
            }
            if !self.up.load(Ordering::Acquire) {
                continue;
            }
            // Another live process with this node id: no lease work until the id is ours.
            if !self.refresh_claim().await {
                continue;
            }
            self.renew().await;
            self.watch().await;
        }
    }

    async fn renew(&self) {
        let rooms: Vec<(String, u64)> = lock(&self.owned)
            .iter()
            .map(|(r, e)| (r.clone(), *e))
            .collect();
        let res = match self.leases.renew(&mut self.con(), &rooms).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "cluster: lease renewal failed");
                return;
            }
        };
        for ((room, _), r) in rooms.iter().zip(res) {
            match r {
                Renewed::Kept => {}
                Renewed::Again(e) => {
                    self.set_owned(room, Some(e));
                    self.change("reacquired");
                    self.mirror(room);
                }
                Renewed::Lost => {
                    tracing::warn!("cluster: lost a room's lease to another node");
                    self.set_owned(room, None);
                    self.change("lost");
                    self.moved(room);
                }
            }
        }
    }

    /// Close remote-seated connections whose room changed hands (its owner died or lost it),
    /// so that their clients resume where it lives now.
    async fn watch(&self) {
        let seats: Vec<(u64, String, Owner)> = lock(&self.seats)
            .iter()
            .map(|(c, (r, o))| (*c, r.clone(), o.clone()))
            .collect();
        if seats.is_empty() {
            return;
        }
        let mut rooms: HashMap<String, Option<Owner>> = HashMap::new();
        for (_, r, _) in &seats {
            rooms.insert(r.clone(), None);
        }
        let names: Vec<String> = rooms.keys().cloned().collect();
        let keys: Vec<String> = names.iter().map(|r| lease::lease_key(r)).collect();
        let vals: Vec<Option<String>> = match redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.con())
            .await
        {
            Ok(v) => v,
            Err(_) => return,
        };
        for (r, v) in names.into_iter().zip(vals) {
            rooms.insert(r, v.as_deref().and_then(Owner::parse));
        }
        for (c, r, o) in seats {
            if rooms.get(&r).and_then(|x| x.as_ref()) != Some(&o) {
                lock(&self.seats).remove(&c);
                self.metrics
                    .drops
                    .with_label_values(&["cluster_stale_owner"])
                    .inc();
                self.push(c, Outbound::Moved);
            }
        }
    }

    /// Drain: stop owning rooms, once.
    fn hand_over(&self) {
        if self.handed_over.swap(true, Ordering::AcqRel) {
            return;
        }
        self.give_up_rooms();
    }

    /// Stop owning rooms. Each room's lease is released with its mirror kept, and its
    /// connections are closed, so that their clients resume on other nodes, which take the
    /// rooms over. Connections seated elsewhere are closed too.
    pub(crate) fn give_up_rooms(&self) {
        let rooms: Vec<(String, u64)> = lock(&self.owned).drain().collect();
        self.metrics.cluster_rooms_owned.set(0);
        for (room, epoch) in &rooms {
            self.mirror_now(room, *epoch);
            self.remote.send(Out::Release(room.clone(), *epoch, false));
            self.change("released");
        }
        for (room, _) in &rooms {
            self.moved(room);
        }
        let seats: Vec<_> = lock(&self.seats).drain().map(|(c, _)| c).collect();
        for c in seats {
            self.push(c, Outbound::Moved);
        }
        if !rooms.is_empty() {
            tracing::info!(rooms = rooms.len(), "cluster: rooms handed over");
        }
    }

    fn mirror_now(&self, room: &str, epoch: u64) {
        let snap = self.sig.peek(room, |h| h.snapshot(room));
        self.remote.send(Out::Mirror(room.to_string(), epoch, snap));
    }
}
