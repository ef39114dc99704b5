//! One seat's numbering and resume buffer: every event a seat is sent gets the next sequence
//! number and is kept, within a frame bound, a byte bound and the node-wide budget, so that a
//! peer that drops and resumes gets what it missed, in order.

use std::collections::VecDeque;

use super::frame::{Event, Frame};
use super::limits::Limits;

/// The sequence numbers and replay buffer of one seat.
#[derive(Debug)]
pub(super) struct Replay {
    /// Next sequence number to stamp.
    pub(super) next_seq: u64,
    /// Recent frames for replay: (seq, shared event).
    pub(super) buffer: VecDeque<(u64, Event)>,
    /// Bytes of the events in `buffer` (each counted against the node-wide budget too).
    pub(super) bytes: usize,
    /// Adopted from another node's mirror: the client's `lastSeq` at resume sets the numbering
    /// (frames buffered meanwhile are renumbered after it).
    seq_unknown: bool,
}

impl Replay {
    /// A fresh seat: its first event is `seq` 1.
    pub(super) fn new() -> Replay {
        Replay {
            next_seq: 1,
            buffer: VecDeque::new(),
            bytes: 0,
            seq_unknown: false,
        }
    }

    /// A seat adopted from another node, whose numbering the resuming client sets.
    pub(super) fn adopted() -> Replay {
        Replay {
            seq_unknown: true,
            ..Replay::new()
        }
    }

    /// Stamp `event` with the next sequence number and keep it for replay, evicting the oldest
    /// frames (counted in `evicted`) past the frame, byte or node-wide bounds; the newest is
    /// always kept. Returns the number stamped.
    pub(super) fn push(&mut self, limits: &Limits, evicted: &mut u64, event: &Event) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let n = event.len();
        limits.resume_total.take(n);
        self.bytes += n;
        if self.buffer.capacity() == 0 {
            // Room for one: most seats of an idle room hold a single event (the other peer's
            // `peer-joined`); a busy one grows as usual.
            self.buffer.reserve_exact(1);
        }
        self.buffer.push_back((seq, event.clone()));
        while self.buffer.len() > 1
            && (self.buffer.len() > limits.resume_buffer_frames
                || self.bytes > limits.resume_buffer_bytes
                || limits.resume_total.over())
        {
            if let Some((_, old)) = self.buffer.pop_front() {
                self.bytes -= old.len();
                limits.resume_total.give(old.len());
                *evicted += 1;
            }
        }
        seq
    }

    /// Drop every kept frame and give its bytes back to the node-wide budget.
    pub(super) fn clear(&mut self, limits: &Limits) {
        limits.resume_total.give(self.bytes);
        self.bytes = 0;
        self.buffer.clear();
    }

    /// The seat resumes having seen `last_seq`: the frames it missed, and whether they are
    /// all still here. An adopted seat first renumbers what this node buffered after the
    /// client's count (what the previous owner sent after `last_seq` is lost).
    pub(super) fn resume_after(&mut self, last_seq: u64) -> (Vec<Frame>, bool) {
        let adopted = std::mem::take(&mut self.seq_unknown);
        if adopted {
            let mut seq = last_seq;
            for (s, _) in self.buffer.iter_mut() {
                seq += 1;
                *s = seq;
            }
            self.next_seq = seq + 1;
        }
        let missed: Vec<Frame> = self
            .buffer
            .iter()
            .filter(|(s, _)| *s > last_seq)
            .map(|(seq, event)| Frame::Event {
                seq: *seq,
                event: event.clone(),
            })
            .collect();
        let first_kept = self
            .buffer
            .front()
            .map(|(s, _)| *s)
            .unwrap_or(self.next_seq);
        let complete = !adopted && last_seq + 1 >= first_kept;
        (missed, complete)
    }
}
