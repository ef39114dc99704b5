//! The core's bounds: byte budgets shared by many buffers, the limits and timers of a hub,
//! and the quota of rooms open on the node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::RoomError;

/// A byte budget shared by many buffers, so that their total stays bounded.
#[derive(Debug, Default)]
pub struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Budget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Budget {
        Budget {
            used: AtomicUsize::new(0),
            max,
        }
    }

    /// Take `n` bytes; `false` (and nothing taken) when that would pass the maximum.
    pub fn try_take(&self, n: usize) -> bool {
        let prev = self.used.fetch_add(n, Ordering::Relaxed);
        if prev.saturating_add(n) > self.max {
            self.used.fetch_sub(n, Ordering::Relaxed);
            false
        } else {
            true
        }
    }

    /// Take `n` bytes even past the maximum (the caller evicts until back under it).
    pub fn take(&self, n: usize) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    /// Return `n` bytes.
    pub fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// Whether the budget is overdrawn.
    pub fn over(&self) -> bool {
        self.used.load(Ordering::Relaxed) > self.max
    }

    /// Bytes in use.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Limits and timers of the room core.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Peers per room unless `create` asks for fewer.
    pub room_capacity: usize,
    /// How long a dropped peer may resume.
    pub resume_grace: Duration,
    /// Frames kept per peer for replay.
    pub resume_buffer_frames: usize,
    /// Bytes kept per peer for replay.
    pub resume_buffer_bytes: usize,
    /// All resume buffers of the node together (shared by every shard).
    pub resume_total: Arc<Budget>,
    /// How long an empty room stays open.
    pub empty_room_grace: Duration,
}

/// Rooms open on the node, in total and per creating user: a stranger cannot fill the node.
#[derive(Debug)]
pub struct RoomQuota {
    max_rooms: usize,
    max_per_user: usize,
    open: usize,
    per_user: HashMap<String, usize>,
}

impl RoomQuota {
    /// A quota of `max_rooms` open rooms, at most `max_per_user` created by one user.
    pub fn new(max_rooms: usize, max_per_user: usize) -> RoomQuota {
        RoomQuota {
            max_rooms,
            max_per_user,
            open: 0,
            per_user: HashMap::new(),
        }
    }

    /// Reserve a room for `user`.
    pub fn take(&mut self, user: &str) -> Result<(), RoomError> {
        if self.open >= self.max_rooms {
            return Err(RoomError::TooManyRooms);
        }
        let n = self.per_user.get(user).copied().unwrap_or(0);
        if n >= self.max_per_user {
            return Err(RoomError::TooManyRoomsForUser);
        }
        self.per_user.insert(user.to_string(), n + 1);
        self.open += 1;
        Ok(())
    }

    /// A room of `user` closed (or its creation failed).
    pub fn release(&mut self, user: &str) {
        self.open = self.open.saturating_sub(1);
        if let Some(n) = self.per_user.get_mut(user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_user.remove(user);
            }
        }
    }

    /// Rooms reserved.
    pub fn open(&self) -> usize {
        self.open
    }
}
