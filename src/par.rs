//! Deterministic data parallelism for the CPU backends, on one pool of threads kept for the process.
//!
//! Work is split into contiguous ranges of output rows and every row is written by exactly one
//! part, in a fixed order, so results are bit-identical whatever the thread count: the CPU
//! backends must be reproducible (resume equals an uninterrupted run). Which pool thread runs a part
//! does not matter: a part is named by its index, never by the thread.

use std::sync::{Mutex, OnceLock};

/// Below this many units of work a loop runs on the calling thread: handing parts to the pool costs
/// a few µs.
const MIN_PARALLEL_WORK: usize = 1 << 16;

static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();

/// The pool, [`threads`] threads started at the first parallel loop and kept (a training step runs
/// about a hundred loops: a thread started for each cost ~40 µs with its stack, and came up cold);
/// None where the system would not start them (the loops then run on the calling thread).
fn pool() -> Option<&'static rayon::ThreadPool> {
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads())
            .thread_name(|i| format!("capsnet-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// Calls `f(t, part)` for every part, the parts handed to the pool's threads at once (the calling
/// thread waits), and returns when all are done. A panic in a part is raised here once all are done.
/// A part must not take a lock that the caller holds across the call: a pool thread waiting in a loop
/// of its own may run another part meanwhile.
pub fn scatter<P: Send>(parts: Vec<P>, f: impl Fn(usize, P) + Sync) {
    let Some(pool) = pool().filter(|_| parts.len() > 1) else {
        parts.into_iter().enumerate().for_each(|(t, p)| f(t, p));
        return;
    };
    let slots: Vec<Mutex<Option<P>>> = parts.into_iter().map(|p| Mutex::new(Some(p))).collect();
    let take = |t: usize| {
        slots[t]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("each part is taken once")
    };
    let (f, take) = (&f, &take);
    pool.scope(|sc| {
        for t in 1..slots.len() {
            sc.spawn(move |_| f(t, take(t)));
        }
        f(0, take(0));
    });
}

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
    scatter(out.chunks_mut(per * row_len).collect(), |t, chunk| {
        for (k, row) in chunk.chunks_mut(row_len).enumerate() {
            f(t * per + k, row);
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
    scatter(out.chunks_mut(per * row_len).collect(), |t, block| f(t * per, block));
}

/// `(0..n).map(f).collect()`, with the indices split into contiguous ranges over the threads.
pub fn par_map<R: Send>(n: usize, work_per_item: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let nt = threads().min(n).max(1);
    if nt == 1 || n.saturating_mul(work_per_item.max(1)) < MIN_PARALLEL_WORK {
        return (0..n).map(f).collect();
    }
    let per = n.div_ceil(nt);
    let mut out: Vec<Vec<R>> = (0..n.div_ceil(per)).map(|_| Vec::new()).collect();
    scatter(out.iter_mut().collect(), |t, part| {
        *part = (t * per..((t + 1) * per).min(n)).map(&f).collect()
    });
    out.into_iter().flatten().collect()
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
    let groups: Vec<Vec<(usize, T)>> = (0..n.div_ceil(per))
        .map(|_| rest.by_ref().take(per).collect())
        .collect();
    scatter(groups, |_, group| group.into_iter().for_each(|(k, it)| f(k, it)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_part_runs_once_with_its_own_index() {
        let runs = AtomicUsize::new(0);
        let mut seen = vec![usize::MAX; 7];
        scatter(seen.iter_mut().enumerate().collect(), |t, (k, slot)| {
            assert_eq!(t, k, "part {k} was handed index {t}");
            *slot = t;
            runs.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(runs.into_inner(), 7);
        assert_eq!(seen, (0..7).collect::<Vec<_>>());
    }

    #[test]
    fn loops_inside_loops_finish_and_keep_their_order() {
        // a part that starts loops of its own (a GEMM inside a per-image loop) must not wait forever
        // on pool threads that are all busy with the outer parts
        let outer = par_map(8, MIN_PARALLEL_WORK, |i| {
            par_map(300, MIN_PARALLEL_WORK, |j| i * 1000 + j)
                .into_iter()
                .sum::<usize>()
        });
        let expected: Vec<usize> = (0..8).map(|i| (0..300).map(|j| i * 1000 + j).sum()).collect();
        assert_eq!(outer, expected);
    }

    #[test]
    fn a_panicking_part_is_raised_once_the_others_are_done() {
        let done = AtomicUsize::new(0);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            scatter((0..4).collect(), |t, _: i32| {
                if t == 1 {
                    panic!("part 1 fails");
                }
                done.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(caught.is_err(), "the part's panic was lost");
        assert_eq!(done.into_inner(), 3);
    }
}
