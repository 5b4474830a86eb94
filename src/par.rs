//! Deterministic data parallelism on scoped std threads, for the CPU backends.
//!
//! Work is split into contiguous ranges of output rows and every row is written by exactly one
//! thread, in a fixed order, so results are bit-identical whatever the thread count: the CPU
//! backends must be reproducible (resume equals an uninterrupted run).

use std::sync::OnceLock;

/// Below this many units of work a loop runs on the calling thread: spawning costs ~10 µs a thread.
const MIN_PARALLEL_WORK: usize = 1 << 16;

static THREADS: OnceLock<usize> = OnceLock::new();

/// The threads the CPU backends' loops use: [`set_threads`]'s, else `CAPSNET_THREADS`, else every
/// core the process may use.
pub fn threads() -> usize {
    *THREADS.get_or_init(|| {
        std::env::var("CAPSNET_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    })
}

/// Fixes the thread count before the first parallel loop (`--threads`); false if it was fixed
/// already to another count.
pub fn set_threads(n: usize) -> bool {
    *THREADS.get_or_init(|| n.max(1)) == n.max(1)
}

/// Calls `f(row_index, row)` for each `row_len`-long row of `out`. `work_per_row` is a rough cost
/// used to decide whether threads are worth starting.
pub fn par_rows<T: Send>(out: &mut [T], row_len: usize, work_per_row: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if row_len == 0 {
        return;
    }
    let rows = out.len() / row_len;
    let nt = threads().min(rows).max(1);
    if nt == 1 || rows.saturating_mul(work_per_row.max(1)) < MIN_PARALLEL_WORK {
        for (r, row) in out.chunks_mut(row_len).enumerate() {
            f(r, row);
        }
        return;
    }
    let per = rows.div_ceil(nt);
    std::thread::scope(|sc| {
        for (t, chunk) in out.chunks_mut(per * row_len).enumerate() {
            let f = &f;
            sc.spawn(move || {
                for (k, row) in chunk.chunks_mut(row_len).enumerate() {
                    f(t * per + k, row);
                }
            });
        }
    });
}

/// Calls `f(first_row, block)` once per thread, each with one contiguous block of `row_len`-long
/// rows of `out` (for loops that keep something in cache across the rows of a block).
pub fn par_blocks<T: Send>(out: &mut [T], row_len: usize, work_per_row: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if row_len == 0 {
        return;
    }
    let rows = out.len() / row_len;
    let nt = threads().min(rows).max(1);
    if nt == 1 || rows.saturating_mul(work_per_row.max(1)) < MIN_PARALLEL_WORK {
        f(0, out);
        return;
    }
    let per = rows.div_ceil(nt);
    std::thread::scope(|sc| {
        for (t, block) in out.chunks_mut(per * row_len).enumerate() {
            let f = &f;
            sc.spawn(move || f(t * per, block));
        }
    });
}

/// `(0..n).map(f).collect()`, with the indices split into contiguous ranges over the threads.
pub fn par_map<R: Send>(n: usize, work_per_item: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let nt = threads().min(n).max(1);
    if nt == 1 || n.saturating_mul(work_per_item.max(1)) < MIN_PARALLEL_WORK {
        return (0..n).map(f).collect();
    }
    let per = n.div_ceil(nt);
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..nt)
            .map(|t| {
                let f = &f;
                sc.spawn(move || (t * per..((t + 1) * per).min(n)).map(f).collect::<Vec<R>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("worker thread panicked"))
            .collect()
    })
}

/// Calls `f(index, item)` for every item, the items split into contiguous groups, one per thread.
/// Items are typically tuples of disjoint `&mut` slices (one image's outputs).
pub fn par_items<T: Send>(items: Vec<T>, work_per_item: usize, f: impl Fn(usize, T) + Sync) {
    let n = items.len();
    let nt = threads().min(n).max(1);
    if nt == 1 || n.saturating_mul(work_per_item.max(1)) < MIN_PARALLEL_WORK {
        for (k, it) in items.into_iter().enumerate() {
            f(k, it);
        }
        return;
    }
    let per = n.div_ceil(nt);
    let mut rest = items.into_iter().enumerate();
    std::thread::scope(|sc| {
        loop {
            let group: Vec<(usize, T)> = rest.by_ref().take(per).collect();
            if group.is_empty() {
                break;
            }
            let f = &f;
            sc.spawn(move || group.into_iter().for_each(|(k, it)| f(k, it)));
        }
    });
}
