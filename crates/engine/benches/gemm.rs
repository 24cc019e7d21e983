//! Linear-layer kernels on the default model's shapes, each weight format, the
//! instruction-set path this CPU picks: GEMV (one token; reported as weight bytes read per
//! second, against the `stream` read bandwidth measured in the same run) and GEMM (16 and
//! 128 tokens; reported as elements = 2·M·N·K flops per second).
//!
//!   cargo bench -p tessera-engine --bench gemm
//!   cargo bench -p tessera-engine --bench gemm -- 'gemv/int8'     (a subset)

use std::hint::black_box;
use std::time::Duration;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engine::cpu::act8::{quantize_q8_0, A8Format, A8Weight};
use engine::cpu::matmul::{matmul, Linear, Weight};
use engine::cpu::quant::F8Weight;
use engine::threadpool::ThreadPool;
use rand::{Rng, SeedableRng};

/// (name, N, K) of SmolLM2-135M's linear layers.
const SHAPES: &[(&str, usize, usize)] = &[
    ("q_o_576x576", 576, 576),
    ("k_v_192x576", 192, 576),
    ("gate_up_1536x576", 1536, 576),
    ("down_576x1536", 576, 1536),
    ("head_49152x576", 49152, 576),
];

fn weights(n: usize, k: usize, rng: &mut rand::rngs::StdRng) -> Vec<(&'static str, Linear)> {
    let dense: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    let t = Tensor::from_vec(dense.clone(), (n, k), &Device::Cpu).unwrap();
    let q41 = QTensor::quantize(&t, GgmlDType::Q4_1).unwrap().data().unwrap().into_owned();
    vec![
        ("f32", Linear::new(Weight::F32(dense.clone()), n, k).unwrap()),
        ("q4_1", Linear::new(Weight::Q4_1(q41.clone()), n, k).unwrap()),
        ("act8_q4_1", Linear::new(Weight::A8(A8Weight::from_blocks(A8Format::Q4_1, &q41, n, k)), n, k).unwrap()),
        ("act8_q8_0", Linear::new(Weight::A8(A8Weight::from_blocks(A8Format::Q8_0, &quantize_q8_0(&dense), n, k)), n, k).unwrap()),
        ("int8", Linear::new(Weight::A8(A8Weight::int8(&dense, n, k)), n, k).unwrap()),
        ("fp8", Linear::new(Weight::F8(F8Weight::quantize(&dense, n, k)), n, k).unwrap()),
    ]
}

fn config() -> Criterion {
    Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1))
}

fn threads() -> usize {
    std::env::var("TESSERA_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2)
}

/// Read bandwidth of this machine with the same pool: the roof for GEMV.
fn stream(c: &mut Criterion) {
    let pool = ThreadPool::new(threads());
    let buf: Vec<u64> = (0..(64usize << 20) / 8).map(|i| i as u64).collect();
    let mut g = c.benchmark_group("stream");
    g.throughput(Throughput::Bytes((buf.len() * 8) as u64));
    let chunk = buf.len() / 64;
    g.bench_function("read_64MiB", |b| {
        b.iter(|| {
            let sums: Vec<std::sync::atomic::AtomicU64> = (0..64).map(|_| Default::default()).collect();
            pool.run(64, &|t| {
                let s = buf[t * chunk..(t + 1) * chunk].iter().fold(0u64, |a, &v| a.wrapping_add(v));
                sums[t].store(s, std::sync::atomic::Ordering::Relaxed);
            });
            black_box(sums)
        })
    });
    g.finish();
}

fn gemv(c: &mut Criterion) {
    let pool = ThreadPool::new(threads());
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut g = c.benchmark_group("gemv");
    for &(name, n, k) in SHAPES {
        let x: Vec<f32> = (0..k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut y = vec![0f32; n];
        for (fmt, lin) in weights(n, k, &mut rng) {
            g.throughput(Throughput::Bytes(lin.weight.storage_bytes() as u64));
            g.bench_with_input(BenchmarkId::new(fmt, name), &lin, |b, lin| b.iter(|| matmul(&pool, black_box(&x), 1, lin, &mut y)));
        }
    }
    g.finish();
}

fn gemm(c: &mut Criterion) {
    let pool = ThreadPool::new(threads());
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut g = c.benchmark_group("gemm");
    for &(name, n, k) in SHAPES.iter().filter(|s| s.1 <= 1536) {
        let lins = weights(n, k, &mut rng);
        for m in [16usize, 128] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let mut y = vec![0f32; m * n];
            g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            for (fmt, lin) in &lins {
                g.bench_with_input(BenchmarkId::new(*fmt, format!("{name}/m{m}")), lin, |b, lin| b.iter(|| matmul(&pool, black_box(&x), m, lin, &mut y)));
            }
        }
    }
    g.finish();
}

criterion_group! { name = benches; config = config(); targets = stream, gemv, gemm }
criterion_main!(benches);
