//! The engine's own compute thread pool.
//!
//! One job at a time: the caller publishes a closure over `0..n_tasks`, every worker and
//! the caller itself take task indices from one atomic counter until none is left. The
//! split is dynamic and the caller waits only for tasks that were claimed, never for a
//! worker to show up, so a core taken away by another process slows the job in
//! proportion (the other threads take its share) instead of stalling every job until
//! the descheduled worker runs again. Workers spin briefly after a job on the atomic
//! claim word (no lock), then sleep on a condition variable; the caller wakes them only
//! when one sleeps, so a step's hundreds of jobs cost no system calls.
//!
//! A task that panics does not take the pool down: the panic is caught where it
//! happens (worker or caller), the job's other tasks still run to the end, and only then
//! does `run` resume the first panic in the caller. So the borrowed closure is never
//! used after `run` returns or unwinds, and a worker never dies leaving the caller
//! waiting for tasks it will not complete.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
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
    /// Workers waiting on `wake` (changed under the lock, so a job published under it
    /// either is seen by a worker before it sleeps or finds it counted here).
    sleepers: usize,
}

struct Inner {
    state: Mutex<State>,
    wake: Condvar,
    /// `generation << 32 | next task index`: a task is claimed by a compare-and-swap that
    /// also checks the generation, so a worker that wakes late never touches a finished job.
    claim: Padded<AtomicU64>,
    /// Tasks of the current job that have completed (on a cache line of its own: the
    /// threads claiming tasks do not stall on the one counting them).
    completed: Padded<AtomicUsize>,
    /// Threads in all, the caller included.
    threads: usize,
    /// The first panic of the current job's tasks, resumed by the caller once the job is done.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// A value alone on its cache line.
#[repr(align(64))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

pub struct ThreadPool {
    inner: Arc<Inner>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes callers: one job at a time.
    call: Mutex<u32>,
}

const SPIN_ITERS: usize = 20_000;

impl Inner {
    /// Claims and runs tasks of `generation` until none is left: a claim takes a quarter of
    /// a fair share of what is left (at least one task), so a job of many small tasks costs
    /// a few claims per thread instead of one contended compare-and-swap per task, while the
    /// last tasks still go one at a time to whichever thread is free.
    fn work(&self, generation: u32, n_tasks: usize, task: Task<'_>) {
        loop {
            let cur = self.claim.load(Ordering::Acquire);
            let (g, i) = ((cur >> 32) as u32, (cur & 0xffff_ffff) as usize);
            if g != generation || i >= n_tasks {
                return;
            }
            let take = ((n_tasks - i) / (4 * self.threads)).max(1);
            if self.claim.compare_exchange_weak(cur, cur + take as u64, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                // A panic skips the rest of this claim; the claim still counts as completed
                // (its tasks will never run), so the caller's wait ends.
                if let Err(p) = catch_unwind(AssertUnwindSafe(|| (i..i + take).for_each(task))) {
                    let mut first = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                    if first.is_none() {
                        *first = Some(p);
                    } else {
                        // Not dropped: a payload's own drop could panic here, before the
                        // claim is counted, and leave the caller waiting.
                        drop(first);
                        std::mem::forget(p);
                    }
                }
                self.completed.fetch_add(take, Ordering::AcqRel);
            }
        }
    }
}

impl ThreadPool {
    /// A pool of `threads` threads in all (the caller counts as one).
    pub fn new(threads: usize) -> Self {
        let inner = Arc::new(Inner {
            state: Mutex::new(State { job: None, shutdown: false, sleepers: 0 }),
            wake: Condvar::new(),
            claim: Padded(AtomicU64::new(0)),
            completed: Padded(AtomicUsize::new(0)),
            threads: threads.max(1),
            panic: Mutex::new(None),
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
    /// worker without a core costs only the tasks it actually claimed. If a task panics,
    /// the tasks of the claim it was in are skipped, every other task runs, and then the
    /// first panic resumes here.
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
        let sleepers = {
            let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
            st.job = Some(Job { task, n_tasks, generation: g });
            st.sleepers
        };
        // Published after the job: a spinning worker that sees generation `g` here finds
        // its job under the lock.
        inner.claim.store((g as u64) << 32, Ordering::Release);
        if sleepers > 0 {
            inner.wake.notify_all();
        }
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
        let panic = inner.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(generation);
        if let Some(p) = panic {
            resume_unwind(p);
        }
    }
}

fn worker(inner: Arc<Inner>) {
    let mut seen = 0u32;
    loop {
        // Spin on the claim word until it shows a new generation, then sleep.
        let mut spins = 0usize;
        while (inner.claim.load(Ordering::Acquire) >> 32) as u32 == seen && spins < SPIN_ITERS {
            spins += 1;
            std::hint::spin_loop();
        }
        let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if st.shutdown {
                return;
            }
            if let Some(job) = &st.job {
                if job.generation != seen {
                    break;
                }
            }
            st.sleepers += 1;
            st = inner.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            st.sleepers -= 1;
        }
        let job = st.job.as_ref().expect("checked above");
        let (task, n_tasks, generation) = (job.task, job.n_tasks, job.generation);
        seen = generation;
        drop(st);
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

    /// Two tasks that each wait for the other to start: done only if a worker takes one
    /// while the caller holds the other, after the workers have gone to sleep (and while
    /// they still spin). A worker left asleep fails the wait instead of hanging the test.
    #[test]
    fn sleeping_and_spinning_workers_take_the_next_job() {
        let pool = ThreadPool::new(2);
        for pause_ms in [50u64, 0, 50, 0] {
            std::thread::sleep(std::time::Duration::from_millis(pause_ms));
            let entered = AtomicUsize::new(0);
            let met = AtomicUsize::new(0);
            pool.run(2, &|_| {
                entered.fetch_add(1, Ordering::AcqRel);
                let t0 = std::time::Instant::now();
                while entered.load(Ordering::Acquire) < 2 && t0.elapsed() < std::time::Duration::from_secs(5) {
                    std::hint::spin_loop();
                }
                if entered.load(Ordering::Acquire) == 2 {
                    met.fetch_add(1, Ordering::AcqRel);
                }
            });
            assert_eq!(met.load(Ordering::Acquire), 2, "after a pause of {pause_ms} ms the worker did not join");
        }
    }

    /// A panicking task, on a worker or on the caller: `run` waits for every other task of
    /// the job (they borrow the caller's stack), then panics in the caller with the task's
    /// own message; the pool then runs the next jobs as before.
    #[test]
    fn a_panicking_task_reaches_the_caller_after_the_others_finish() {
        // On a thread of its own, so a pool that hangs (a dead worker's tasks never counted
        // as done) fails the test instead of hanging it.
        let (done, finished) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            panicking_tasks_rounds();
            let _ = done.send(());
        });
        match finished.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(()) => t.join().unwrap(),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => std::panic::resume_unwind(t.join().unwrap_err()),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("the pool hung after a task panicked"),
        }
    }

    fn panicking_tasks_rounds() {
        let pool = ThreadPool::new(2);
        for (round, n) in [(0usize, 2usize), (1, 64), (2, 1000), (3, 64)] {
            // Rounds alternate which thread panics: the caller's first claim starts at
            // task 0, so "the task 0 runs on" is the caller in most runs; the other rounds
            // panic on the last task, which the worker often takes. Both must behave the same.
            let bad = if round % 2 == 0 { 0 } else { n - 1 };
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                pool.run(n, &|i| {
                    if i == bad {
                        panic!("task {i} failed");
                    }
                    // Slow enough that the panic usually lands while others still run.
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    hits[i].fetch_add(1, Ordering::AcqRel);
                });
            }));
            let payload = result.expect_err("the task's panic must reach the caller");
            let msg = payload.downcast_ref::<String>().expect("a formatted panic message");
            assert_eq!(msg, &format!("task {bad} failed"));
            // Every task that started has finished before run unwound: none is counted later.
            let done: usize = hits.iter().map(|h| h.load(Ordering::Acquire)).sum();
            std::thread::sleep(std::time::Duration::from_millis(20));
            let later: usize = hits.iter().map(|h| h.load(Ordering::Acquire)).sum();
            assert_eq!(done, later, "round {round}: tasks still ran after run() unwound");
            assert!(hits.iter().all(|h| h.load(Ordering::Acquire) <= 1));
            assert_eq!(hits[bad].load(Ordering::Acquire), 0);
            // The pool is whole: both threads take part in the next job.
            let total = AtomicUsize::new(0);
            pool.run(100, &|i| {
                total.fetch_add(i, Ordering::Relaxed);
            });
            assert_eq!(total.load(Ordering::Relaxed), 4950, "round {round}");
        }
        // The worker survived every round: a job of two tasks that wait for each other
        // completes only with two threads.
        let entered = AtomicUsize::new(0);
        pool.run(2, &|_| {
            entered.fetch_add(1, Ordering::AcqRel);
            let t0 = std::time::Instant::now();
            while entered.load(Ordering::Acquire) < 2 {
                assert!(t0.elapsed() < std::time::Duration::from_secs(5), "the worker is gone");
                std::hint::spin_loop();
            }
        });
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
