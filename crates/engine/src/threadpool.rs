//! The engine's own compute thread pool.
//!
//! One job at a time: the caller publishes a closure over `0..n_tasks`, every worker and
//! the caller itself take task indices from one atomic counter until none is left. The
//! split is dynamic, so a core taken away by another process slows the job in proportion
//! (the other threads take its share) instead of stalling it behind a static partition.
//! Workers spin briefly after a job, then sleep on a condition variable.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Job {
    /// Lifetime erased; valid while `pending > 0` (the caller waits for that).
    task: Task<'static>,
    n_tasks: usize,
}

struct State {
    job: Option<Job>,
    generation: u64,
    shutdown: bool,
}

struct Inner {
    state: Mutex<State>,
    wake: Condvar,
    next: AtomicUsize,
    /// Workers still inside the current job.
    active: AtomicUsize,
    done: Condvar,
    done_lock: Mutex<()>,
}

pub struct ThreadPool {
    inner: Arc<Inner>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes callers: one job at a time.
    call: Mutex<()>,
}

const SPIN_ITERS: usize = 20_000;

impl ThreadPool {
    /// A pool of `threads` threads in all (the caller counts as one).
    pub fn new(threads: usize) -> Self {
        let inner = Arc::new(Inner {
            state: Mutex::new(State { job: None, generation: 0, shutdown: false }),
            wake: Condvar::new(),
            next: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            done: Condvar::new(),
            done_lock: Mutex::new(()),
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
        ThreadPool { inner, workers, call: Mutex::new(()) }
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(i)` for every `i in 0..n_tasks` across the pool; returns when all are done.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        if self.workers.is_empty() || n_tasks == 1 {
            (0..n_tasks).for_each(f);
            return;
        }
        let _guard = self.call.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &*self.inner;
        // SAFETY: the reference is only used by workers while `active > 0`, and this
        // function does not return before `active` is back to 0 and the job is cleared.
        let task: Task<'static> = unsafe { std::mem::transmute::<Task<'_>, Task<'static>>(f) };
        inner.next.store(0, Ordering::SeqCst);
        inner.active.store(self.workers.len(), Ordering::SeqCst);
        {
            let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
            st.job = Some(Job { task, n_tasks });
            st.generation += 1;
        }
        inner.wake.notify_all();
        loop {
            let i = inner.next.fetch_add(1, Ordering::Relaxed);
            if i >= n_tasks {
                break;
            }
            f(i);
        }
        // Wait for the workers to leave the job.
        let mut spins = 0;
        while inner.active.load(Ordering::Acquire) != 0 {
            if spins < SPIN_ITERS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                let g = inner.done_lock.lock().unwrap_or_else(|e| e.into_inner());
                if inner.active.load(Ordering::Acquire) != 0 {
                    let _ = inner.done.wait_timeout(g, std::time::Duration::from_micros(200));
                }
            }
        }
        inner.state.lock().unwrap_or_else(|e| e.into_inner()).job = None;
    }
}

fn worker(inner: Arc<Inner>) {
    let mut seen = 0u64;
    loop {
        // Spin a little for the next job, then sleep.
        let mut spins = 0;
        let (task, n_tasks) = loop {
            {
                let st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
                if st.shutdown {
                    return;
                }
                if st.generation != seen {
                    if let Some(job) = &st.job {
                        seen = st.generation;
                        break (job.task, job.n_tasks);
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
        loop {
            let i = inner.next.fetch_add(1, Ordering::Relaxed);
            if i >= n_tasks {
                break;
            }
            task(i);
        }
        if inner.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _g = inner.done_lock.lock().unwrap_or_else(|e| e.into_inner());
            inner.done.notify_all();
        }
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
