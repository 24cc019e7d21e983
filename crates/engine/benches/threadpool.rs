//! The compute pool's cost per job: a decode step runs a few hundred jobs (each linear
//! layer, attention, the activation quantization, per layer), so the time from publishing
//! a job to a worker taking its share counts at small batches. A job here is 32 tasks of
//! about a microsecond (a one-token GEMV of the default model is 36 tasks of about that),
//! back to back as in a step, against the same work on one thread; and a job after a pause
//! long enough for the workers to sleep.
//!
//!   cargo bench -p tessera-engine --bench threadpool

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use engine::threadpool::ThreadPool;

/// About a microsecond of arithmetic that the compiler cannot drop.
fn work(seed: u64) -> u64 {
    let mut x = seed | 1;
    for _ in 0..400 {
        x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407));
    }
    x
}

fn bench(c: &mut Criterion) {
    let pool = ThreadPool::new(2);
    let sink = AtomicU64::new(0);
    let task = |i: usize| {
        sink.fetch_add(work(i as u64), Ordering::Relaxed);
    };
    let mut g = c.benchmark_group("threadpool");
    g.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    g.bench_function("job_32x1us_back_to_back", |b| b.iter(|| pool.run(32, &task)));
    g.bench_function("serial_32x1us", |b| b.iter(|| (0..32).for_each(&task)));
    g.sample_size(20);
    g.bench_function("job_32x1us_after_5ms_idle", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                std::thread::sleep(Duration::from_millis(5));
                let t0 = std::time::Instant::now();
                pool.run(32, &task);
                total += t0.elapsed();
            }
            total
        })
    });
    g.finish();
    black_box(sink.load(Ordering::Relaxed));
}

criterion_group!(benches, bench);
criterion_main!(benches);
