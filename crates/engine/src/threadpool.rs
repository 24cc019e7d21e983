//! The engine's own compute thread pool.
//!
//! One job at a time: the caller publishes a closure over `0..n_tasks`, every worker and
//! the caller itself take task indices from one atomic counter until none is left. The
//! split is dynamic and the caller waits only for tasks that were claimed, never for a
//! worker to show up, so a core taken away by another process slows the job in
//! proportion (the other threads take its share) instead of stalling every job until
//! the descheduled worker runs again. Workers spin briefly after a job, then sleep on a
//! condition variable.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Job {
    /// Lifetime erased; only called after claiming a task of this job's generation, and
    /// the caller does not return before every claimed task has completed.
    task: Task<'static>,
    n_tasks: usize,
    generation: u32,
}

struct State {
    job: Option<Job>,
    shutdown: bool,
}

struct Inner {
    state: Mutex<State>,
    wake: Condvar,
    /// `generation << 32 | next task index`: a task is claimed by a compare-and-swap that
    /// also checks the generation, so a worker that wakes late never touches a finished job.
    claim: AtomicU64,
    /// Tasks of the current job that have completed.
    completed: AtomicUsize,
}

pub struct ThreadPool {
    inner: Arc<Inner>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes callers: one job at a time.
    call: Mutex<u32>,
}

const SPIN_ITERS: usize = 20_000;

impl Inner {
    /// Claims and runs tasks of `generation` until none is left.
    fn work(&self, generation: u32, n_tasks: usize, task: Task<'_>) {
        loop {
            let cur = self.claim.load(Ordering::Acquire);
            let (g, i) = ((cur >> 32) as u32, (cur & 0xffff_ffff) as usize);
            if g != generation || i >= n_tasks {
                return;
            }
            if self.claim.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                task(i);
                self.completed.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

impl ThreadPool {
    /// A pool of `threads` threads in all (the caller counts as one).
    pub fn new(threads: usize) -> Self {
        let inner = Arc::new(Inner {
            state: Mutex::new(State { job: None, shutdown: false }),
            wake: Condvar::new(),
            claim: AtomicU64::new(0),
            completed: AtomicUsize::new(0),
        });
        let workers = (1..threads.max(1))
            .map(|i| {
                let inner = inner.clone();
                std::thread::Builder::new()
                    .name(format!("tessera-compute-{i}"))
                    .spawn(move || worker(inner))
                    .expect("spawning a compute thread")
            })
            .collect();
        ThreadPool { inner, workers, call: Mutex::new(0) }
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(i)` for every `i in 0..n_tasks` across the pool; returns when all are done.
    /// The caller takes tasks too and never waits for a worker that has not started: a
    /// worker without a core costs only the tasks it actually claimed.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        if self.workers.is_empty() || n_tasks == 1 {
            (0..n_tasks).for_each(f);
            return;
        }
        assert!(n_tasks < u32::MAX as usize, "too many tasks in one job");
        let mut generation = self.call.lock().unwrap_or_else(|e| e.into_inner());
        *generation = generation.wrapping_add(1);
        let g = *generation;
        let inner = &*self.inner;
        // SAFETY: workers call `task` only after claiming a task of generation `g`, and this
        // function returns only after every claimed task of `g` has completed; afterwards
        // no claim of `g` can succeed (the index is exhausted or the generation moved on).
        let task: Task<'static> = unsafe { std::mem::transmute::<Task<'_>, Task<'static>>(f) };
        inner.completed.store(0, Ordering::Release);
        inner.claim.store((g as u64) << 32, Ordering::Release);
        {
            let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
            st.job = Some(Job { task, n_tasks, generation: g });
        }
        inner.wake.notify_all();
        inner.work(g, n_tasks, f);
        let mut spins = 0usize;
        while inner.completed.load(Ordering::Acquire) < n_tasks {
            spins += 1;
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

fn worker(inner: Arc<Inner>) {
    let mut seen = 0u32;
    loop {
        let mut spins = 0;
        let (task, n_tasks, generation) = loop {
            {
                let st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
                if st.shutdown {
                    return;
                }
                if let Some(job) = &st.job {
                    if job.generation != seen {
                        seen = job.generation;
                        break (job.task, job.n_tasks, job.generation);
                    }
                }
                if spins >= SPIN_ITERS / 100 {
                    let st = inner.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                    drop(st);
                    continue;
                }
            }
            spins += 1;
            for _ in 0..100 {
                std::hint::spin_loop();
            }
        };
        inner.work(generation, n_tasks, task);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner()).shutdown = true;
        self.inner.wake.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_exactly_once() {
        let pool = ThreadPool::new(3);
        for n in [0usize, 1, 2, 7, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n = {n}");
        }
    }

    #[test]
    fn many_small_jobs_in_a_row_complete() {
        let pool = ThreadPool::new(2);
        let total = AtomicUsize::new(0);
        for _ in 0..2000 {
            pool.run(4, &|i| {
                total.fetch_add(i, Ordering::Relaxed);
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 2000 * 6);
    }
}
