//! The reflector limit: a per-source byte budget for the answers the STUN/TURN port sends
//! without authentication (Binding success, 401, 400, 438, …), so a spoofed source cannot
//! turn the UDP port into an amplifier towards a victim.
//!
//! Sans-IO: plain data that takes `now`; each UDP shard owns one, so nothing is shared or
//! locked on the hot path. The key space is bounded: at most `max_sources` addresses are
//! tracked; when the table is full, addresses whose budget has refilled are dropped (at most
//! once a second), and sources that still find no room share one overflow budget, so a flood
//! from more spoofed addresses than the table holds gets one source's budget in all.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::Message;

/// Addresses one limiter tracks before pruning (about 40 bytes each).
pub const MAX_SOURCES: usize = 65_536;

/// Whether a response the port is about to send is unauthenticated (no MESSAGE-INTEGRITY or
/// MESSAGE-INTEGRITY-SHA256), and so costs a stranger nothing to provoke.
pub fn is_unauthenticated(response: &[u8]) -> bool {
    match Message::parse(response) {
        Ok(m) => !m.has_integrity() && !m.has_integrity_sha256(),
        // Not a STUN message: nothing the port answers with; count it to be safe.
        Err(_) => true,
    }
}

#[derive(Debug, Clone, Copy)]
struct Budget {
    /// Bytes available, in millibytes (so slow refills are not lost to rounding).
    milli: u64,
    last: Instant,
}

impl Budget {
    fn full(l: &Limits, now: Instant) -> Budget {
        Budget {
            milli: l.burst.saturating_mul(1000),
            last: now,
        }
    }

    fn refill(&mut self, l: &Limits, now: Instant) {
        let el = now.saturating_duration_since(self.last);
        // rate bytes/s = rate millibytes/ms; micros * rate / 1000 = millibytes.
        let add = (el.as_micros() as u64).saturating_mul(l.rate) / 1000;
        self.milli = self
            .milli
            .saturating_add(add)
            .min(l.burst.saturating_mul(1000));
        self.last = now;
    }

    fn take(&mut self, l: &Limits, now: Instant, n: usize) -> bool {
        self.refill(l, now);
        let cost = (n as u64).saturating_mul(1000);
        if self.milli >= cost {
            self.milli -= cost;
            true
        } else {
            false
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    rate: u64,
    burst: u64,
}

/// Per-source budget for unauthenticated answers, in bytes per second with a burst.
#[derive(Debug)]
pub struct ReflectLimiter {
    limits: Limits,
    sources: HashMap<IpAddr, Budget>,
    overflow: Option<Budget>,
    max_sources: usize,
    last_prune: Option<Instant>,
}

impl ReflectLimiter {
    /// A limiter allowing `rate` bytes per second and `burst` bytes at once per source;
    /// `rate == 0` turns it off.
    pub fn new(rate: u64, burst: u64) -> ReflectLimiter {
        ReflectLimiter::with_capacity(rate, burst, MAX_SOURCES)
    }

    /// [`ReflectLimiter::new`] tracking at most `max_sources` addresses (tests use few).
    pub fn with_capacity(rate: u64, burst: u64, max_sources: usize) -> ReflectLimiter {
        ReflectLimiter {
            limits: Limits { rate, burst },
            sources: HashMap::new(),
            overflow: None,
            max_sources: max_sources.max(1),
            last_prune: None,
        }
    }

    /// The budget of one of `shards` workers that together allow `rate` and `burst` per
    /// source: a source's datagrams spread over the shards by port, so each takes its share
    /// (never less than `min_burst` bytes, so one answer always fits).
    pub fn for_shard(rate: u64, burst: u64, shards: usize, min_burst: u64) -> ReflectLimiter {
        let n = shards.max(1) as u64;
        ReflectLimiter::new(rate.div_ceil(n), (burst / n).max(min_burst))
    }

    /// Whether an answer of `len` bytes to `src` may be sent now; takes it from the source's
    /// budget when it may.
    pub fn allow(&mut self, now: Instant, src: IpAddr, len: usize) -> bool {
        if self.limits.rate == 0 {
            return true;
        }
        let key = crate::net::ip_key(src);
        let l = self.limits;
        if let Some(b) = self.sources.get_mut(&key) {
            return b.take(&l, now, len);
        }
        if self.sources.len() >= self.max_sources {
            self.prune(now);
        }
        if self.sources.len() >= self.max_sources {
            return self
                .overflow
                .get_or_insert_with(|| Budget::full(&l, now))
                .take(&l, now, len);
        }
        let mut b = Budget::full(&l, now);
        let ok = b.take(&l, now, len);
        self.sources.insert(key, b);
        ok
    }

    /// Drop sources whose budget is full again (they would start over identically), at most
    /// once a second.
    fn prune(&mut self, now: Instant) {
        if self
            .last_prune
            .is_some_and(|p| now.saturating_duration_since(p) < Duration::from_secs(1))
        {
            return;
        }
        self.last_prune = Some(now);
        let l = self.limits;
        let full = l.burst.saturating_mul(1000);
        self.sources.retain(|_, b| {
            b.refill(&l, now);
            b.milli < full
        });
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// Whether no address is tracked.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn burst_then_rate_per_source() {
        let t0 = Instant::now();
        let mut l = ReflectLimiter::new(1000, 2000);
        let v = ip("192.0.2.7");
        // The burst: 2000 bytes in 100-byte answers, then nothing.
        assert_eq!((0..30).filter(|_| l.allow(t0, v, 100)).count(), 20);
        // Half a second refills 500 bytes.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..30).filter(|_| l.allow(t1, v, 100)).count(), 5);
        // Another source is untouched.
        assert!(l.allow(t1, ip("192.0.2.8"), 100));
        // Over ten seconds of a steady flood, at most burst + rate * 10 s gets through.
        let mut sent = 0;
        for ms in 0..10_000u64 {
            let t = t1 + Duration::from_millis(ms);
            if l.allow(t, v, 80) {
                sent += 80;
            }
        }
        assert!(sent <= 10_000 + 100, "{sent}");
        assert!(sent >= 9_000, "{sent}");
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_as_v4() {
        let t0 = Instant::now();
        let mut l = ReflectLimiter::new(10, 200);
        assert!(l.allow(t0, ip("2001:db8:1:2::1"), 200));
        assert!(!l.allow(t0, ip("2001:db8:1:2:ffff::9"), 1));
        assert!(l.allow(t0, ip("2001:db8:1:3::1"), 200));
        assert!(l.allow(t0, ip("192.0.2.1"), 200));
        assert!(!l.allow(t0, ip("::ffff:192.0.2.1"), 1));
    }

    #[test]
    fn table_is_bounded_and_overflow_shares_one_budget() {
        let t0 = Instant::now();
        let mut l = ReflectLimiter::with_capacity(100, 300, 4);
        for i in 0..4 {
            assert!(l.allow(t0, ip(&format!("192.0.2.{i}")), 300));
        }
        // Full, nothing refilled: new sources share one 300-byte budget.
        let fresh = (10..20)
            .filter(|i| l.allow(t0, ip(&format!("192.0.2.{i}")), 100))
            .count();
        assert_eq!(fresh, 3);
        assert_eq!(l.len(), 4);
        // Once the tracked sources have refilled (3 s at 100 B/s), they are pruned and a new
        // source gets its own budget.
        let t1 = t0 + Duration::from_secs(4);
        assert!(l.allow(t1, ip("198.51.100.1"), 300));
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn zero_rate_is_off() {
        let mut l = ReflectLimiter::new(0, 0);
        let t0 = Instant::now();
        assert!((0..1000).all(|_| l.allow(t0, ip("192.0.2.1"), 1500)));
        assert!(l.is_empty());
    }

    #[test]
    fn shard_share_keeps_the_total() {
        let l = ReflectLimiter::for_shard(1000, 4000, 4, 576);
        assert_eq!((l.limits.rate, l.limits.burst), (250, 1000));
        let l = ReflectLimiter::for_shard(1000, 1000, 4, 576);
        assert_eq!(l.limits.burst, 576);
    }

    #[test]
    fn signed_answers_are_not_counted() {
        use crate::stun::{method, Class, Encoder};
        let mut out = Vec::new();
        let mut e = Encoder::new(&mut out, method::ALLOCATE, Class::Error, &[1; 12]);
        e.error_code(401, "Unauthorized");
        e.finish();
        assert!(is_unauthenticated(&out));
        let mut out = Vec::new();
        let mut e = Encoder::new(&mut out, method::ALLOCATE, Class::Success, &[1; 12]);
        e.integrity(&[7; 16]);
        e.finish_with_fingerprint();
        assert!(!is_unauthenticated(&out));
    }
}
