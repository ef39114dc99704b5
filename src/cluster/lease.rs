//! Room ownership as a Redis lease with an epoch (fencing token). The lease value is
//! `"<epoch> <node>"`; every change goes through a Lua script that compares before it sets, so
//! two nodes can never both believe a renewal or a mirror write succeeded for one room.

use redis::aio::ConnectionManager;
use redis::Script;

use crate::signaling::room::RoomState;

/// The lease key of a room (hash tags keep a room's keys in one slot).
pub fn lease_key(room: &str) -> String {
    format!("sb:{{{room}}}:lease")
}

/// The epoch counter of a room: it outlives leases so that epochs only grow, and tells a node
/// whose lease ran out whether another node held the room since.
pub fn epoch_key(room: &str) -> String {
    format!("sb:{{{room}}}:epoch")
}

/// The mirrored seats of a room, read by a node that takes it over.
pub fn mirror_key(room: &str) -> String {
    format!("sb:{{{room}}}:state")
}

/// The pub/sub channel of a node.
pub fn channel(node: &str) -> String {
    format!("sb:node:{node}")
}

/// Who holds a lease, parsed from its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Fencing token: grows with every new holder.
    pub epoch: u64,
    /// Holding node.
    pub node: String,
}

impl Owner {
    /// Parse `"<epoch> <node>"`.
    pub fn parse(v: &str) -> Option<Owner> {
        let (e, n) = v.split_once(' ')?;
        Some(Owner {
            epoch: e.parse().ok()?,
            node: n.to_string(),
        })
    }

    /// The lease value.
    pub fn value(&self) -> String {
        format!("{} {}", self.epoch, self.node)
    }
}

/// Epoch counters live a week after their last use.
const EPOCH_TTL_MS: u64 = 7 * 86_400_000;

/// Lua for a new epoch: above the stored one, above `held` and at least Redis's clock in
/// microseconds, so that epochs keep growing when Redis loses its data (or the counter expires)
/// and restarts from nothing. Formatted with `%d`: Lua's `tostring` would print 16 digits as
/// a float.
const NEXT_EPOCH: &str = r"
local function next_epoch(ek, held, ttl)
  local t = redis.call('TIME')
  local e = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local cur = tonumber(redis.call('GET', ek) or '0') or 0
  if cur >= e then e = cur + 1 end
  if held >= e then e = held + 1 end
  local s = string.format('%d', e)
  redis.call('SET', ek, s, 'PX', ttl)
  return e, s
end
";

const ACQUIRE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local sp = string.find(cur, ' ', 1, true)
  local owner = string.sub(cur, sp + 1)
  if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {tonumber(string.sub(cur, 1, sp - 1)), owner, false, 0}
  end
  return {0, owner, false, 0}
end
local e, es = next_epoch(KEYS[2], 0, ARGV[4])
redis.call('SET', KEYS[1], es .. ' ' .. ARGV[1], 'PX', ARGV[2])
local m = false
if ARGV[3] == '1' then m = redis.call('GET', KEYS[3]) end
return {e, ARGV[1], m, 1}
";

/// A lease found missing is taken back only when its epoch counter is gone too (Redis lost its
/// data) or still holds this node's epoch (it expired and nobody took the room over). Any
/// other value means another node held the room since, and may have closed it: taking it back
/// would raise a room from the dead.
const RENEW: &str = r"
local out = {}
local n = #KEYS / 3
for i = 1, n do
  local l, ek, mk = KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i]
  local mine = ARGV[3+i] .. ' ' .. ARGV[1]
  local cur = redis.call('GET', l)
  if cur == mine then
    redis.call('PEXPIRE', l, ARGV[2])
    redis.call('PEXPIRE', mk, ARGV[3])
    redis.call('PEXPIRE', ek, ARGV[3+n+1])
    out[i] = tonumber(ARGV[3+i])
  elseif not cur then
    local seen = redis.call('GET', ek)
    if (not seen) or seen == ARGV[3+i] then
      local e, es = next_epoch(ek, tonumber(ARGV[3+i]), ARGV[3+n+1])
      redis.call('SET', l, es .. ' ' .. ARGV[1], 'PX', ARGV[2])
      out[i] = -e
    else
      out[i] = 0
    end
  else
    out[i] = 0
  end
end
return out
";

const MIRROR: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[2]) else redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3]) end
return 1
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] == '1' then redis.call('DEL', KEYS[2]) end
return 1
";

/// What `acquire` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// This node holds the lease now, with this epoch; `fresh` when it was free before.
    Mine {
        /// Fencing token.
        epoch: u64,
        /// Whether the lease was free (a new holder) rather than already ours.
        fresh: bool,
        /// The mirrored room, when asked for and present.
        mirror: Option<RoomState>,
    },
    /// Another node holds it.
    Theirs(Owner),
}

/// One renewal's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewed {
    /// Still ours, same epoch.
    Kept,
    /// It was gone (expired with nobody taking the room over, or Redis lost its data) and is
    /// ours again with a new epoch.
    Again(u64),
    /// Another node holds it, or held it since (and may have closed the room).
    Lost,
}

/// The Lua scripts, loaded once (EVALSHA, with EVAL after a Redis restart).
pub struct Leases {
    node: String,
    ttl_ms: u64,
    mirror_ttl_ms: u64,
    acquire: Script,
    renew: Script,
    mirror: Script,
    release: Script,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases").field("node", &self.node).finish()
    }
}

impl Leases {
    /// Leases for `node`, living `ttl_ms`; mirrors outlive them by `grace_ms` so a room can be
    /// taken over while its peers may still resume.
    pub fn new(node: &str, ttl_ms: u64, grace_ms: u64) -> Leases {
        Leases {
            node: node.to_string(),
            ttl_ms,
            mirror_ttl_ms: ttl_ms + grace_ms,
            acquire: Script::new(&format!("{NEXT_EPOCH}{ACQUIRE}")),
            renew: Script::new(&format!("{NEXT_EPOCH}{RENEW}")),
            mirror: Script::new(MIRROR),
            release: Script::new(RELEASE),
        }
    }

    /// Take the lease of `room` if it is free (or already ours); with `mirror`, also read the
    /// mirrored seats in the same step.
    pub async fn acquire(
        &self,
        con: &mut ConnectionManager,
        room: &str,
        mirror: bool,
    ) -> redis::RedisResult<Acquired> {
        let (epoch, owner, m, fresh): (u64, String, Option<String>, i64) = self
            .acquire
            .key(lease_key(room))
            .key(epoch_key(room))
            .key(mirror_key(room))
            .arg(&self.node)
            .arg(self.ttl_ms)
            .arg(if mirror { "1" } else { "0" })
            .arg(EPOCH_TTL_MS)
            .invoke_async(con)
            .await?;
        if epoch == 0 {
            return Ok(Acquired::Theirs(Owner { epoch, node: owner }));
        }
        Ok(Acquired::Mine {
            epoch,
            fresh: fresh == 1,
            mirror: m.and_then(|s| serde_json::from_str(&s).ok()),
        })
    }

    /// Renew every lease in `rooms` (room, epoch) in one step.
    pub async fn renew(
        &self,
        con: &mut ConnectionManager,
        rooms: &[(String, u64)],
    ) -> redis::RedisResult<Vec<Renewed>> {
        if rooms.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.renew.prepare_invoke();
        for (r, _) in rooms {
            inv.key(lease_key(r)).key(epoch_key(r)).key(mirror_key(r));
        }
        inv.arg(&self.node).arg(self.ttl_ms).arg(self.mirror_ttl_ms);
        for (_, e) in rooms {
            inv.arg(*e);
        }
        inv.arg(EPOCH_TTL_MS);
        let out: Vec<i64> = inv.invoke_async(con).await?;
        Ok(out
            .into_iter()
            .map(|v| match v {
                0 => Renewed::Lost,
                v if v < 0 => Renewed::Again(v.unsigned_abs()),
                _ => Renewed::Kept,
            })
            .collect())
    }

    /// Write (or with `None`, delete) the mirror of `room`, only while `epoch` holds its lease.
    pub async fn write_mirror(
        &self,
        con: &mut ConnectionManager,
        room: &str,
        epoch: u64,
        state: Option<&RoomState>,
    ) -> redis::RedisResult<bool> {
        let json = state
            .and_then(|s| serde_json::to_string(s).ok())
            .unwrap_or_default();
        let ok: i64 = self
            .mirror
            .key(lease_key(room))
            .key(mirror_key(room))
            .arg(self.value(epoch))
            .arg(json)
            .arg(self.mirror_ttl_ms)
            .invoke_async(con)
            .await?;
        Ok(ok == 1)
    }

    /// Give the lease of `room` up; `forget` also deletes its mirror (the room closed), else
    /// the next owner takes it over from the mirror.
    pub async fn release(
        &self,
        con: &mut ConnectionManager,
        room: &str,
        epoch: u64,
        forget: bool,
    ) -> redis::RedisResult<bool> {
        let ok: i64 = self
            .release
            .key(lease_key(room))
            .key(mirror_key(room))
            .arg(self.value(epoch))
            .arg(if forget { "1" } else { "0" })
            .invoke_async(con)
            .await?;
        Ok(ok == 1)
    }

    fn value(&self, epoch: u64) -> String {
        format!("{epoch} {}", self.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_values_round_trip() {
        let o = Owner::parse("12 node-a.b").unwrap();
        assert_eq!(o.epoch, 12);
        assert_eq!(o.node, "node-a.b");
        assert_eq!(o.value(), "12 node-a.b");
        assert!(Owner::parse("x y").is_none());
        assert!(Owner::parse("12").is_none());
    }
}
