//! Read-ahead for one stream of reads (an open file, an HTTP response), after
//! mountpoint-s3's prefetcher: detect sequential reads, start with a window of one block
//! and double it on each sequential read up to a maximum, halve it when the shared memory
//! budget is short, and tolerate the small seeks that out-of-order kernel read-ahead
//! makes (backwards within the window, forwards within a few windows) without starting
//! over. Pure logic: the reader issues the fetches.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Cap on the read length that widens the tolerance behind the front.
const MAX_READ_TOLERANCE: u64 = 16 << 20;

/// Tuning of a stream's window, in blocks.
#[derive(Clone, Copy, Debug)]
pub struct WindowOpts {
    pub initial: u64,
    pub max: u64,
    /// A forward jump within this many windows still counts as sequential.
    pub forward_windows: u64,
}

impl Default for WindowOpts {
    fn default() -> Self {
        WindowOpts {
            initial: 1,
            max: 128,
            forward_windows: 4,
        }
    }
}

#[derive(Debug)]
pub struct Stream {
    opts: WindowOpts,
    block_size: u64,
    /// Where the next sequential read starts (bytes).
    next: u64,
    window: u64,
    /// Blocks before this index were already asked for.
    issued_to: u64,
    started: bool,
    /// `next`, shared with the fetches ahead: a block wholly behind it was read already.
    front: Arc<AtomicU64>,
    /// Where the current sequential run began (bytes).
    run_start: u64,
    /// The longest read seen (bytes, capped): reads behind the front by up to twice
    /// that still count as sequential.
    max_len: u64,
}

impl Stream {
    pub fn new(block_size: u32, opts: WindowOpts) -> Stream {
        Stream {
            opts,
            block_size: u64::from(block_size.max(1)),
            next: 0,
            window: opts.initial.max(1),
            issued_to: 0,
            started: false,
            front: Arc::new(AtomicU64::new(0)),
            run_start: 0,
            max_len: 0,
        }
    }

    /// Where the current sequential run began: what lies between it and `next` was read.
    pub fn run_start(&self) -> u64 {
        self.run_start
    }

    /// How far the stream has read (bytes), as it moves.
    pub fn front(&self) -> Arc<AtomicU64> {
        self.front.clone()
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    fn sequential(&self, offset: u64) -> bool {
        let span = self.window * self.block_size;
        // Behind the front by a window, or by two reads: the kernel's parallel reads
        // arrive out of order, and a read cut short is asked again at the same offset
        // (a 1 MiB read is four blocks, more than a young window).
        let back = self.next.saturating_sub(span.max(2 * self.max_len));
        let fwd = self
            .next
            .saturating_add(span.saturating_mul(self.opts.forward_windows));
        self.started && offset >= back && offset <= fwd
    }

    /// A read of `len` bytes at `offset` of a file of `blocks` blocks: the blocks to
    /// fetch ahead now (possibly none). `short` says the memory budget refused the last
    /// fetches ahead: the window halves.
    pub fn on_read(&mut self, offset: u64, len: u64, blocks: u64, short: bool) -> Range<u64> {
        let first = offset / self.block_size;
        let last = (offset + len.max(1) - 1) / self.block_size;
        let sequential = self.sequential(offset);
        self.max_len = self.max_len.max(len.min(MAX_READ_TOLERANCE));
        if sequential {
            // Reads behind the front (parallel kernel read-ahead) neither grow nor reset.
            if offset >= self.next {
                self.window = (self.window * 2).min(self.opts.max.max(1));
            }
            self.next = self.next.max(offset + len);
        } else {
            self.window = self.opts.initial.max(1);
            self.issued_to = first;
            self.next = offset + len;
            self.run_start = offset;
        }
        if short {
            self.window = (self.window / 2).max(1);
        }
        self.started = true;
        self.front.store(self.next, Ordering::Relaxed);
        let start = self.issued_to.max(last + 1);
        let end = (last + 1 + self.window).min(blocks);
        if start >= end {
            return start..start;
        }
        self.issued_to = end;
        start..end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u64 = 1000;

    #[test]
    fn the_window_doubles_on_sequential_reads_up_to_the_maximum() {
        let mut s = Stream::new(BS as u32, WindowOpts::default());
        let mut windows = Vec::new();
        let mut asked = 0..0;
        for i in 0..10 {
            let r = s.on_read(i * BS, BS, 1000, false);
            assert_eq!(r.start, asked.end.max(i + 1), "no block asked twice");
            asked = r;
            windows.push(s.window());
        }
        assert_eq!(windows, vec![1, 2, 4, 8, 16, 32, 64, 128, 128, 128]);
    }

    #[test]
    fn small_seeks_keep_the_window_and_a_far_one_resets_it() {
        let mut s = Stream::new(BS as u32, WindowOpts::default());
        for i in 0..5 {
            s.on_read(i * BS, BS, 1000, false);
        }
        let w = s.window();
        assert_eq!(w, 16);
        // Out of order by a block (kernel read-ahead in parallel): still sequential.
        s.on_read(3 * BS, BS, 1000, false);
        assert_eq!(s.window(), w);
        // Forward within a few windows: still sequential.
        s.on_read(20 * BS, BS, 1000, false);
        assert!(s.window() >= w);
        // A jump far away: start over from one block, at the new place.
        let r = s.on_read(900 * BS, BS, 1000, false);
        assert_eq!(s.window(), 1);
        assert_eq!(r, 901..902);
    }

    #[test]
    fn a_short_budget_halves_the_window_and_the_end_of_file_clips_it() {
        let mut s = Stream::new(BS as u32, WindowOpts::default());
        for i in 0..6 {
            s.on_read(i * BS, BS, 1000, false);
        }
        assert_eq!(s.window(), 32);
        s.on_read(6 * BS, BS, 1000, true);
        assert_eq!(s.window(), 32, "doubled to 64, then halved");
        s.on_read(7 * BS, BS, 1000, true);
        assert_eq!(s.window(), 32);
        let mut t = Stream::new(BS as u32, WindowOpts::default());
        assert_eq!(t.on_read(0, 3 * BS, 3, false), 3..3, "nothing past the end");
    }

    #[test]
    fn a_read_asked_again_keeps_the_run() {
        // 1 MiB reads over small blocks: a read cut short on the FUSE thread is asked
        // again at the same offset, behind the front by more than a young window.
        let mut s = Stream::new(BS as u32, WindowOpts::default());
        let mib = 4 * BS + 100;
        s.on_read(0, mib, 1000, false);
        s.on_read(mib, mib, 1000, false);
        s.on_read(mib, mib, 1000, false);
        assert_eq!(s.run_start(), 0, "the run goes on");
        assert!(s.window() >= 2, "the window was not reset: {}", s.window());
        // A far seek still starts a new run.
        s.on_read(500 * BS, mib, 1000, false);
        assert_eq!(s.run_start(), 500 * BS);
    }
}
