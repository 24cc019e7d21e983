//! Linear layers: `y[M, N] = x[M, K] · W[N, K]ᵀ` with W kept in its checkpoint format.
//!
//! Each task dequantizes a strip of W rows (exactly as the reference dequantizer does:
//! `d * q + m` in f32) into a thread-local scratch, then runs a register-tiled f32 kernel
//! over every row of x. Every output element is one dot product whose arithmetic order
//! depends only on K and the instruction set, never on M, on the tile it fell into or on
//! the thread that ran it: a request's logits are bitwise the same whatever else is in
//! the batch (batch invariance).
//!
//! ```text
//!            K                     K
//!   x  ┌───────────┐        W ┌───────────┐ n0 ┐
//!    M │ rows      │          │ strip     │    │ NC rows, dequantized to f32
//!      └───────────┘          │           │ ───┘
//!                             └───────────┘ N
//!   y[m, n0..n0+NC] = tile kernel (MR x NR blocks) over x[m..m+MR] and the strip
//! ```

use std::cell::RefCell;

use half::f16;

use super::act8::{A8Format, A8Weight};
use super::quant::F8Weight;
use crate::threadpool::ThreadPool;

/// A weight matrix `[N, K]`, row-major, in one of the formats the kernel reads directly.
#[derive(Debug, Clone)]
pub enum Weight {
    F32(Vec<f32>),
    /// GGUF Q8_0: blocks of 32, `{d: f16, qs: [i8; 32]}`.
    Q8_0(Vec<u8>),
    /// GGUF Q4_0: blocks of 32, `{d: f16, qs: [u8; 16]}`, value `d * (q - 8)`.
    Q4_0(Vec<u8>),
    /// GGUF Q4_1: blocks of 32, `{d: f16, m: f16, qs: [u8; 16]}`, value `d * q + m`.
    Q4_1(Vec<u8>),
    /// GGUF Q5_0: blocks of 32, `{d: f16, qh: [u8; 4], qs: [u8; 16]}`, value
    /// `d * ((low nibble | high bit << 4) - 16)`.
    Q5_0(Vec<u8>),
    /// OCP FP8 E4M3 with a scale per output channel (`--quantize fp8`).
    F8(F8Weight),
    /// GGUF blocks multiplied with INT8 activations (`--quantize act8`).
    A8(A8Weight),
}

pub const QK: usize = 32;

impl Weight {
    pub fn format_name(&self) -> &'static str {
        match self {
            Weight::F32(_) => "f32",
            Weight::Q8_0(_) => "q8_0",
            Weight::Q4_0(_) => "q4_0",
            Weight::Q4_1(_) => "q4_1",
            Weight::Q5_0(_) => "q5_0",
            Weight::F8(_) => "fp8",
            Weight::A8(w) => match w.format {
                A8Format::Q4_1 => "q4_1+a8",
                A8Format::Q8_0 => "q8_0+a8",
                A8Format::I8 => "int8",
            },
        }
    }

    /// Bytes of one row of `k` elements.
    pub fn row_bytes(&self, k: usize) -> usize {
        match self {
            Weight::F32(_) => k * 4,
            Weight::Q8_0(_) => k / QK * 34,
            Weight::Q4_0(_) => k / QK * 18,
            Weight::Q4_1(_) => k / QK * 20,
            Weight::Q5_0(_) => k / QK * 22,
            Weight::F8(_) => k + 4,
            Weight::A8(w) => w.row_bytes(),
        }
    }

    pub fn storage_bytes(&self) -> usize {
        match self {
            Weight::F32(v) => v.len() * 4,
            Weight::Q8_0(v) | Weight::Q4_0(v) | Weight::Q4_1(v) | Weight::Q5_0(v) => v.len(),
            Weight::F8(w) => w.q.len() + w.scale.len() * 4,
            Weight::A8(w) => w.storage_bytes(),
        }
    }

    /// Writes rows `n0 .. n0 + out.len() / k` as f32 into `out`.
    pub fn dequant_rows(&self, n0: usize, k: usize, out: &mut [f32]) {
        let rows = out.len() / k;
        match self {
            Weight::F32(w) => out.copy_from_slice(&w[n0 * k..(n0 + rows) * k]),
            Weight::Q8_0(b) => {
                let rb = self.row_bytes(k);
                dequant_q8_0(&b[n0 * rb..(n0 + rows) * rb], out)
            }
            Weight::Q4_0(b) => {
                let rb = self.row_bytes(k);
                dequant_q4_0(&b[n0 * rb..(n0 + rows) * rb], out)
            }
            Weight::Q4_1(b) => {
                let rb = self.row_bytes(k);
                dequant_q4_1(&b[n0 * rb..(n0 + rows) * rb], out)
            }
            Weight::Q5_0(b) => {
                let rb = self.row_bytes(k);
                dequant_q5_0(&b[n0 * rb..(n0 + rows) * rb], out)
            }
            Weight::F8(w) => w.dequant_rows(n0, k, out),
            Weight::A8(w) => w.dequant_rows(n0, k, out),
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn dequant_q8_0(src: &[u8], out: &mut [f32]) {
    for (blk, o) in src.chunks_exact(34).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        for (j, v) in o.iter_mut().enumerate() {
            *v = d * (blk[2 + j] as i8) as f32;
        }
    }
}

fn dequant_q4_0(src: &[u8], out: &mut [f32]) {
    for (blk, o) in src.chunks_exact(18).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        let (lo, hi) = o.split_at_mut(QK / 2);
        for j in 0..QK / 2 {
            let q = blk[2 + j];
            lo[j] = d * ((q & 0x0f) as i32 - 8) as f32;
            hi[j] = d * ((q >> 4) as i32 - 8) as f32;
        }
    }
}

fn dequant_q4_1(src: &[u8], out: &mut [f32]) {
    for (blk, o) in src.chunks_exact(20).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        let m = f16_at(blk, 2);
        let (lo, hi) = o.split_at_mut(QK / 2);
        for j in 0..QK / 2 {
            let q = blk[4 + j];
            // Two roundings (mul, then add), as the reference dequantizer computes it.
            lo[j] = d * (q & 0x0f) as f32 + m;
            hi[j] = d * (q >> 4) as f32 + m;
        }
    }
}

fn dequant_q5_0(src: &[u8], out: &mut [f32]) {
    for (blk, o) in src.chunks_exact(22).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let (lo, hi) = o.split_at_mut(QK / 2);
        for j in 0..QK / 2 {
            let q = blk[6 + j];
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            lo[j] = d * (((q & 0x0f) as u32 | h0) as i32 - 16) as f32;
            hi[j] = d * (((q >> 4) as u32 | h1) as i32 - 16) as f32;
        }
    }
}

/// A linear layer without bias: `out_features` x `in_features`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    pub out_features: usize,
    pub in_features: usize,
}

impl Linear {
    pub fn new(weight: Weight, out_features: usize, in_features: usize) -> crate::Result<Self> {
        if let Weight::A8(w) = &weight {
            // Panels know their shape (`I8` rows padded to whole groups).
            let k = if w.format == A8Format::I8 { in_features.next_multiple_of(QK) } else { in_features };
            if (w.n, w.k) != (out_features, k) {
                return Err(crate::EngineError::Load(format!(
                    "{} weight is [{}, {}], expected [{out_features}, {k}]",
                    weight.format_name(),
                    w.n,
                    w.k
                )));
            }
            return Ok(Linear { weight, out_features, in_features });
        }
        let expect = match &weight {
            Weight::F32(v) => v.len() * 4,
            // What the weight holds, against what its shape needs (below).
            Weight::F8(_) => weight.storage_bytes(),
            _ => {
                if !in_features.is_multiple_of(QK) {
                    return Err(crate::EngineError::Load(format!(
                        "{} weight with in_features {in_features} not a multiple of {QK}",
                        weight.format_name()
                    )));
                }
                weight.storage_bytes()
            }
        };
        if expect != weight.row_bytes(in_features) * out_features {
            return Err(crate::EngineError::Load(format!(
                "{} weight has {} bytes, expected {} for [{out_features}, {in_features}]",
                weight.format_name(),
                weight.storage_bytes(),
                weight.row_bytes(in_features) * out_features
            )));
        }
        Ok(Linear { weight, out_features, in_features })
    }

    /// This layer with its weights converted to `q` (from whatever format they are in,
    /// dequantized first); `Quantize::None` is a copy.
    pub fn quantized(&self, q: crate::config::Quantize) -> Linear {
        use crate::config::Quantize;
        let (n, k) = (self.out_features, self.in_features);
        let dense = || {
            let mut w = vec![0f32; n * k];
            self.weight.dequant_rows(0, k, &mut w);
            w
        };
        let weight = match q {
            Quantize::None => self.weight.clone(),
            Quantize::Int8 => Weight::A8(A8Weight::int8(&dense(), n, k)),
            Quantize::Fp8 => Weight::F8(F8Weight::quantize(&dense(), n, k)),
            // K not a multiple of 32 (no GGUF block format has that): per-channel INT8.
            Quantize::Act8 => Weight::A8(A8Weight::from_weight(&self.weight, n, k).unwrap_or_else(|| A8Weight::int8(&dense(), n, k))),
        };
        Linear { weight, out_features: n, in_features: k }
    }

    /// `y[m, N] = x[m, K] · Wᵀ`.
    pub fn forward(&self, pool: &ThreadPool, x: &[f32], m: usize, y: &mut [f32]) {
        matmul(pool, x, m, self, y)
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Rows of act8 panels as row-major GGUF blocks, for [`Kernel::dequant`].
    static A8_ROWS: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Up to this many rows, quantized weights are expanded in registers (read once from
/// memory); above it, a strip is dequantized once and reused for every row.
const FUSED_MAX_M: usize = 4;

/// `y[m, N] = x[m, K] · W[N, K]ᵀ` over the pool.
pub fn matmul(pool: &ThreadPool, x: &[f32], m: usize, lin: &Linear, y: &mut [f32]) {
    matmul_on(Kernel::detect(), pool, x, m, lin, y)
}

/// [`matmul`] on a given instruction-set path (tests and benchmarks).
pub fn matmul_on(kern: Kernel, pool: &ThreadPool, x: &[f32], m: usize, lin: &Linear, y: &mut [f32]) {
    matmul_acts(kern, pool, x, m, lin, y, Acts::AsStored)
}

/// What the activations of a call are multiplied as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acts {
    /// As the weight's format asks: INT8 for `int8` and `act8` weights, f32 otherwise.
    AsStored,
    /// f32 whatever the weight: act8 weights (GGUF blocks as they are) are then read as
    /// the `none` path reads them, exactly. INT8 weights keep INT8 activations.
    F32,
}

/// Whether `w` is multiplied with INT8 activations when a call asks for `acts`.
fn int8_acts(w: &Weight, acts: Acts) -> Option<&A8Weight> {
    match w {
        Weight::A8(w) if acts == Acts::AsStored || w.format == A8Format::I8 => Some(w),
        _ => None,
    }
}

/// [`matmul_on`] with activations multiplied as `acts` says.
pub fn matmul_acts(kern: Kernel, pool: &ThreadPool, x: &[f32], m: usize, lin: &Linear, y: &mut [f32], acts: Acts) {
    let (n, k) = (lin.out_features, lin.in_features);
    assert_eq!(x.len(), m * k, "matmul: x is not [{m}, {k}]");
    assert_eq!(y.len(), m * n, "matmul: y is not [{m}, {n}]");
    if m == 0 {
        return;
    }
    if let Some(w) = int8_acts(&lin.weight, acts) {
        return super::act8::matmul_a8(super::quant::I8Kernel::for_kernel(kern), pool, x, k, w, n, y);
    }
    // SAFETY: each task writes only its own columns.
    par_cols(pool, m, n, y, &|n0, rows, y| unsafe { plain_cols(kern, lin, x, m, n0, rows, y) });
}

/// Output columns per pool task, for `n` columns in all (over every layer of one
/// dispatch) on `threads` threads. Batches: 64 columns (at 16, a task's 64 bytes of a row
/// of `y` share cache lines with its neighbours' unless `y` is line-aligned, and the INT8
/// outlier pass, which reads `y` back, took 8.5% of a 16-stream act8 decode profile; 3.6%
/// at 64). One to four tokens
/// (decode): about `n / (PER_THREAD · threads)` columns, a multiple of 16, 16 to 1024:
/// each task then reads one long contiguous run of weight rows, which the hardware
/// prefetcher follows (runs of 16 rows, 6 KB of Q4_1 at K = 576, end before it ramps up),
/// and a decode step claims a few hundred tasks instead of ~13,000 (each claim is an
/// atomic both cores fight over).
pub(crate) fn col_chunk(m: usize, n: usize, threads: usize) -> usize {
    const PER_THREAD: usize = 4;
    if m <= FUSED_MAX_M {
        (n / (PER_THREAD * threads.max(1))).next_multiple_of(16).clamp(16, 1024)
    } else {
        64
    }
}

/// Runs `f(n0, rows, y)` over the pool for every chunk of [`col_chunk`] columns of
/// `y[m, n]`; `f` must write only columns `n0 .. n0 + rows` of each row of `y`.
pub(crate) fn par_cols(pool: &ThreadPool, m: usize, n: usize, y: &mut [f32], f: &(dyn Fn(usize, usize, *mut f32) + Sync)) {
    assert_eq!(y.len(), m * n);
    let nc = col_chunk(m, n, pool.threads());
    let yp = super::SyncPtr(y.as_mut_ptr());
    pool.run(n.div_ceil(nc), &|t| {
        let _ = &yp;
        f(t * nc, nc.min(n - t * nc), yp.0)
    });
}

/// Columns `n0 .. n0 + rows` of `y[m, N]` for f32 activations (one pool task of
/// [`matmul_on`]): small batches expand the weights in registers, larger ones dequantize
/// a strip once and reuse it for every row.
///
/// # Safety
/// `y` holds `m` rows of `lin.out_features`; nothing else writes these columns meanwhile.
unsafe fn plain_cols(kern: Kernel, lin: &Linear, x: &[f32], m: usize, n0: usize, rows: usize, y: *mut f32) {
    let (n, k) = (lin.out_features, lin.in_features);
    let args = GemmArgs { x: x.as_ptr(), m, k, y: y.add(n0), ldy: n };
    if m <= FUSED_MAX_M && kern.run_fused(&args, &lin.weight, n0, rows) {
        return;
    }
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < rows * k {
            s.resize(rows * k, 0.0);
        }
        let strip = &mut s[..rows * k];
        kern.dequant(&lin.weight, n0, k, strip);
        // x and the strip are valid for the sizes given.
        kern.run(&args, strip.as_ptr(), rows);
    });
}

/// `y_i[m, N_i] = x[m, K] · W_iᵀ` for several layers that read the same `x` (q/k/v,
/// gate/up): one pool dispatch for all their columns and, for the INT8-activation
/// formats, one quantization of `x`. The same bits as one [`matmul`] per layer (each
/// column is computed by the same task code); layers of different kinds run one by one.
pub fn matmul_many(pool: &ThreadPool, x: &[f32], m: usize, outs: &mut [(&Linear, &mut [f32])]) {
    matmul_many_acts(pool, x, m, outs, Acts::AsStored)
}

/// [`matmul_many`] with activations multiplied as `acts` says.
pub fn matmul_many_acts(pool: &ThreadPool, x: &[f32], m: usize, outs: &mut [(&Linear, &mut [f32])], acts: Acts) {
    use super::quant::I8Kernel;
    let kern = Kernel::detect();
    let Some(k) = outs.first().map(|o| o.0.in_features) else { return };
    for (lin, y) in outs.iter() {
        assert_eq!(lin.in_features, k, "matmul_many: layers read different widths");
        assert_eq!(y.len(), m * lin.out_features, "matmul_many: y is not [{m}, {}]", lin.out_features);
    }
    assert_eq!(x.len(), m * k, "matmul_many: x is not [{m}, {k}]");
    if m == 0 {
        return;
    }
    // None: plain; Some(kp): INT8 activations for weights of this padded width.
    let kind = |w: &Weight| int8_acts(w, acts).map(|w| w.k);
    let first = kind(&outs[0].0.weight);
    if outs.len() == 1 || outs.iter().any(|o| kind(&o.0.weight) != first) {
        for (lin, y) in outs.iter_mut() {
            matmul_acts(kern, pool, x, m, lin, y, acts);
        }
        return;
    }
    let nc = col_chunk(m, outs.iter().map(|o| o.0.out_features).sum(), pool.threads());
    let lins: Vec<&Linear> = outs.iter().map(|o| o.0).collect();
    let ys: Vec<super::SyncPtr> = outs.iter_mut().map(|o| super::SyncPtr(o.1.as_mut_ptr())).collect();
    let tasks: Vec<(usize, usize)> =
        lins.iter().enumerate().flat_map(|(i, l)| (0..l.out_features).step_by(nc).map(move |n0| (i, n0))).collect();
    let run = |body: &(dyn Fn(&Linear, usize, usize, *mut f32) + Sync)| {
        pool.run(tasks.len(), &|t| {
            let (i, n0) = tasks[t];
            let _ = &ys;
            body(lins[i], n0, nc.min(lins[i].out_features - n0), ys[i].0)
        })
    };
    let k8 = I8Kernel::for_kernel(kern);
    // SAFETY (every body): task t writes only columns n0..n0+rows of layer i's output.
    match first {
        None => run(&|lin, n0, rows, y| unsafe { plain_cols(kern, lin, x, m, n0, rows, y) }),
        Some(kp) => super::act8::with_acts(pool, x, k, kp, |qa, sums| {
            run(&|lin, n0, rows, y| {
                let w = int8_acts(&lin.weight, acts).expect("checked: every layer has INT8 activations");
                unsafe { super::act8::gemm_a8_cols(k8, (qa, sums), w, lin.out_features, n0, rows, y) }
            })
        }),
    }
}

/// The activation side of one kernel call: `x[m, k]` in, `y` rows of stride `ldy` out.
#[derive(Debug, Clone, Copy)]
pub struct GemmArgs {
    pub x: *const f32,
    pub m: usize,
    pub k: usize,
    pub y: *mut f32,
    pub ldy: usize,
}

/// Instruction-set levels, lowest first, for `TESSERA_CPU_ISA`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum IsaLevel {
    Portable,
    Avx2,
    Avx512,
    Avx512Vnni,
}

/// The most the kernels may use: `TESSERA_CPU_ISA` = `portable`, `avx2`, `avx512` (no
/// VNNI) or `avx512-vnni` (the default: no cap, the best the CPU has). For benchmarks that
/// compare the paths on one machine; every path gives the same bits.
pub fn isa_cap() -> IsaLevel {
    static CAP: std::sync::OnceLock<IsaLevel> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| match std::env::var("TESSERA_CPU_ISA").as_deref() {
        Ok("portable") => IsaLevel::Portable,
        Ok("avx2") => IsaLevel::Avx2,
        Ok("avx512") => IsaLevel::Avx512,
        Ok("avx512-vnni") | Ok("") | Err(_) => IsaLevel::Avx512Vnni,
        Ok(other) => {
            tracing::warn!("TESSERA_CPU_ISA={other:?} is not one of portable, avx2, avx512, avx512-vnni: ignored");
            IsaLevel::Avx512Vnni
        }
    })
}

/// The instruction-set path of the f32 kernels, chosen at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Kernel {
    /// The best path this CPU has, within `TESSERA_CPU_ISA` ([`isa_cap`]).
    pub fn detect() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let cap = isa_cap();
            Kernel::available().into_iter().find(|k| k.level() <= cap).unwrap_or(Kernel::Portable)
        })
    }

    /// Paths this CPU can run, best first (whatever `TESSERA_CPU_ISA` says: tests force
    /// each one in turn).
    pub fn available() -> Vec<Kernel> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("f16c")
                // Its INT8 and act8 GEMMs are the AVX2 (or VNNI) kernels.
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                v.push(Kernel::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("f16c") {
                v.push(Kernel::Avx2);
            }
        }
        v.push(Kernel::Portable);
        v
    }

    /// Rank on the [`isa_cap`] scale.
    fn level(self) -> IsaLevel {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => IsaLevel::Avx512,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => IsaLevel::Avx2,
            Kernel::Portable => IsaLevel::Portable,
        }
    }


    /// `y[i, j] = dot(x[i, :], W[j, :])` with W rows read straight from GGUF Q4_1/Q8_0
    /// blocks; false when this path has no fused kernel for the format (then dequantize).
    ///
    /// # Safety
    /// x: m*k floats, w: n rows of `weight.row_bytes(k)` bytes, y as in [`Kernel::run`].
    pub unsafe fn run_fused(self, a: &GemmArgs, weight: &Weight, n0: usize, n: usize) -> bool {
        let rb = weight.row_bytes(a.k);
        match (self, weight) {
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512, Weight::Q4_1(b)) => x86::gemm_avx512(a, &x86::Q41Strip { b: b.as_ptr().add(n0 * rb), row_bytes: rb }, n),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512, Weight::Q8_0(b)) => x86::gemm_avx512(a, &x86::Q80Strip { b: b.as_ptr().add(n0 * rb), row_bytes: rb }, n),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, Weight::Q4_1(b)) => x86::gemm_avx2(a, &x86::Q41Strip { b: b.as_ptr().add(n0 * rb), row_bytes: rb }, n),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, Weight::Q8_0(b)) => x86::gemm_avx2(a, &x86::Q80Strip { b: b.as_ptr().add(n0 * rb), row_bytes: rb }, n),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512, Weight::Q5_0(b)) => x86::gemm_avx512(a, &x86::Q50Strip { b: b.as_ptr().add(n0 * rb), row_bytes: rb }, n),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, Weight::Q5_0(b)) => x86::gemm_avx2(a, &x86::Q50Strip { b: b.as_ptr().add(n0 * rb), row_bytes: rb }, n),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512, Weight::F8(w)) => x86::gemm_avx512(a, &x86::F8Strip::new(w, n0, a.k), n),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, Weight::F8(w)) => x86::gemm_avx2(a, &x86::F8Strip::new(w, n0, a.k), n),
            _ => return false,
        }
        true
    }

    /// Rows `n0 .. n0 + out.len() / k` of `weight` as f32, with SIMD where this path has
    /// it; the same bits as [`Weight::dequant_rows`].
    pub fn dequant(self, weight: &Weight, n0: usize, k: usize, out: &mut [f32]) {
        let rows = out.len() / k;
        let rb = weight.row_bytes(k);
        // SAFETY: the strips cover rows n0..n0+rows of the weight (checked by the slice
        // index below) and `out` holds rows * k floats.
        unsafe {
            match (self, weight) {
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx512, Weight::Q4_1(b)) => {
                    let b = &b[n0 * rb..(n0 + rows) * rb];
                    x86::dequant_avx512(&x86::Q41Strip { b: b.as_ptr(), row_bytes: rb }, rows, k, out.as_mut_ptr())
                }
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx512, Weight::Q8_0(b)) => {
                    let b = &b[n0 * rb..(n0 + rows) * rb];
                    x86::dequant_avx512(&x86::Q80Strip { b: b.as_ptr(), row_bytes: rb }, rows, k, out.as_mut_ptr())
                }
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx2, Weight::Q4_1(b)) => {
                    let b = &b[n0 * rb..(n0 + rows) * rb];
                    x86::dequant_avx2(&x86::Q41Strip { b: b.as_ptr(), row_bytes: rb }, rows, k, out.as_mut_ptr())
                }
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx2, Weight::Q8_0(b)) => {
                    let b = &b[n0 * rb..(n0 + rows) * rb];
                    x86::dequant_avx2(&x86::Q80Strip { b: b.as_ptr(), row_bytes: rb }, rows, k, out.as_mut_ptr())
                }
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx512, Weight::Q5_0(b)) => {
                    let b = &b[n0 * rb..(n0 + rows) * rb];
                    x86::dequant_avx512(&x86::Q50Strip { b: b.as_ptr(), row_bytes: rb }, rows, k, out.as_mut_ptr())
                }
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx2, Weight::Q5_0(b)) => {
                    let b = &b[n0 * rb..(n0 + rows) * rb];
                    x86::dequant_avx2(&x86::Q50Strip { b: b.as_ptr(), row_bytes: rb }, rows, k, out.as_mut_ptr())
                }
                // act8 weights are GGUF Q4_1 or Q8_0 blocks in panels: the strip's rows
                // go back to row-major blocks (20 or 34 bytes per 32 weights, against the
                // 128 of f32 written) and through the GGUF strips.
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx512 | Kernel::Avx2, Weight::A8(w)) if w.format != A8Format::I8 => A8_ROWS.with(|b| {
                    let mut b = b.borrow_mut();
                    w.blocks_of(n0, rows, &mut b);
                    let (b, o) = (b.as_ptr(), out.as_mut_ptr());
                    match (self, w.format) {
                        (Kernel::Avx512, A8Format::Q4_1) => x86::dequant_avx512(&x86::Q41Strip { b, row_bytes: rb }, rows, k, o),
                        (Kernel::Avx512, A8Format::Q8_0) => x86::dequant_avx512(&x86::Q80Strip { b, row_bytes: rb }, rows, k, o),
                        (_, A8Format::Q4_1) => x86::dequant_avx2(&x86::Q41Strip { b, row_bytes: rb }, rows, k, o),
                        (_, A8Format::Q8_0) => x86::dequant_avx2(&x86::Q80Strip { b, row_bytes: rb }, rows, k, o),
                        (_, A8Format::I8) => unreachable!("matched above"),
                    }
                }),
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx512, Weight::F8(w)) if k.is_multiple_of(32) => {
                    assert!(w.q.len() >= (n0 + rows) * k);
                    x86::dequant_avx512(&x86::F8Strip::new(w, n0, k), rows, k, out.as_mut_ptr())
                }
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx2, Weight::F8(w)) if k.is_multiple_of(32) => {
                    assert!(w.q.len() >= (n0 + rows) * k);
                    x86::dequant_avx2(&x86::F8Strip::new(w, n0, k), rows, k, out.as_mut_ptr())
                }
                _ => weight.dequant_rows(n0, k, out),
            }
        }
    }

    /// `y[i, j] = dot(x[i, :], w[j, :])` for i < m, j < n; y has row stride `ldy`.
    ///
    /// # Safety
    /// x: m*k floats, w: n*k floats, y: (m-1)*ldy + n floats, all valid.
    pub unsafe fn run(self, a: &GemmArgs, w: *const f32, n: usize) {
        let k = a.k;
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => x86::gemm_avx512_f32(a, &x86::F32Strip { w, k }, n),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => x86::gemm_avx2(a, &x86::F32Strip { w, k }, n),
            Kernel::Portable => portable::gemm(a, w, n),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over const-size register tiles
mod x86 {
    //! The tile kernels read W through a `Strip`: either f32 rows in memory, or GGUF
    //! blocks expanded in registers (`d * q + m`, the same two roundings as the scalar
    //! dequantizer). Either way each output is the same sequence of FMAs, so the fused
    //! path (small M) and the dequantize-then-multiply path (large M) agree bitwise.
    use std::arch::x86_64::*;

    pub trait Strip {
        /// 16 (AVX-512) or 8 (AVX2) weights of column `c` starting at `p` (quantized
        /// strips take them from their block loaders below).
        unsafe fn w512(&self, c: usize, p: usize) -> __m512;
        unsafe fn w256(&self, c: usize, p: usize) -> __m256;
        /// One weight (only for the tail of an f32 strip; quantized K is a multiple of 32).
        unsafe fn scalar(&self, c: usize, p: usize) -> f32;
        /// Hints the cache line that holds column `c`'s weights at `p`. Quantized rows are
        /// short (K = 576 is 360 bytes of Q4_1) and end before the hardware prefetcher
        /// ramps up, so the tiles fetch the next tile's rows as they go.
        #[inline(always)]
        unsafe fn prefetch(&self, _c: usize, _p: usize) {}
        /// The 32 weights of column `c` from `p` (a multiple of 32) as two 16-lane halves;
        /// quantized strips decode the block header once for both.
        #[inline(always)]
        unsafe fn w512x2(&self, c: usize, p: usize) -> [__m512; 2] {
            [self.w512(c, p), self.w512(c, p + 16)]
        }
        #[inline(always)]
        unsafe fn w256x4(&self, c: usize, p: usize) -> [__m256; 4] {
            [self.w256(c, p), self.w256(c, p + 8), self.w256(c, p + 16), self.w256(c, p + 24)]
        }
    }

    pub struct F32Strip {
        pub w: *const f32,
        pub k: usize,
    }

    impl Strip for F32Strip {
        #[inline(always)]
        unsafe fn w512(&self, c: usize, p: usize) -> __m512 {
            _mm512_loadu_ps(self.w.add(c * self.k + p))
        }
        #[inline(always)]
        unsafe fn w256(&self, c: usize, p: usize) -> __m256 {
            _mm256_loadu_ps(self.w.add(c * self.k + p))
        }
        #[inline(always)]
        unsafe fn scalar(&self, c: usize, p: usize) -> f32 {
            *self.w.add(c * self.k + p)
        }
    }

    #[inline(always)]
    unsafe fn half_to_f32(p: *const u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const u16) as i32)))
    }

    pub struct Q41Strip {
        pub b: *const u8,
        pub row_bytes: usize,
    }

    impl Strip for Q41Strip {
        #[inline(always)]
        unsafe fn prefetch(&self, c: usize, p: usize) {
            _mm_prefetch::<_MM_HINT_T0>(self.b.wrapping_add(c * self.row_bytes + p / 32 * 20) as *const i8);
        }
        #[inline(always)]
        unsafe fn w512(&self, c: usize, p: usize) -> __m512 {
            self.w512x2(c, p / 32 * 32)[(p / 16) % 2]
        }
        #[inline(always)]
        unsafe fn w256(&self, c: usize, p: usize) -> __m256 {
            self.w256x4(c, p / 32 * 32)[(p / 8) % 4]
        }
        unsafe fn scalar(&self, _c: usize, _p: usize) -> f32 {
            unreachable!("quantized rows have no tail")
        }
        #[inline(always)]
        unsafe fn w512x2(&self, c: usize, p: usize) -> [__m512; 2] {
            let blk = self.b.add(c * self.row_bytes + p / 32 * 20);
            let (d, m) = (_mm512_set1_ps(half_to_f32(blk)), _mm512_set1_ps(half_to_f32(blk.add(2))));
            let qs = _mm_loadu_si128(blk.add(4) as *const __m128i);
            let mask = _mm_set1_epi8(0x0f);
            let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(qs, mask)));
            let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(qs, 4), mask)));
            [_mm512_add_ps(_mm512_mul_ps(d, lo), m), _mm512_add_ps(_mm512_mul_ps(d, hi), m)]
        }
        #[inline(always)]
        unsafe fn w256x4(&self, c: usize, p: usize) -> [__m256; 4] {
            let blk = self.b.add(c * self.row_bytes + p / 32 * 20);
            let (d, m) = (_mm256_set1_ps(half_to_f32(blk)), _mm256_set1_ps(half_to_f32(blk.add(2))));
            let qs = _mm_loadu_si128(blk.add(4) as *const __m128i);
            let mask = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
            let f = |q: __m128i| _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q))), m);
            [f(lo), f(_mm_srli_si128(lo, 8)), f(hi), f(_mm_srli_si128(hi, 8))]
        }
    }

    pub struct Q80Strip {
        pub b: *const u8,
        pub row_bytes: usize,
    }

    impl Strip for Q80Strip {
        #[inline(always)]
        unsafe fn prefetch(&self, c: usize, p: usize) {
            _mm_prefetch::<_MM_HINT_T0>(self.b.wrapping_add(c * self.row_bytes + p / 32 * 34) as *const i8);
        }
        #[inline(always)]
        unsafe fn w512(&self, c: usize, p: usize) -> __m512 {
            self.w512x2(c, p / 32 * 32)[(p / 16) % 2]
        }
        #[inline(always)]
        unsafe fn w256(&self, c: usize, p: usize) -> __m256 {
            self.w256x4(c, p / 32 * 32)[(p / 8) % 4]
        }
        unsafe fn scalar(&self, _c: usize, _p: usize) -> f32 {
            unreachable!("quantized rows have no tail")
        }
        #[inline(always)]
        unsafe fn w512x2(&self, c: usize, p: usize) -> [__m512; 2] {
            let blk = self.b.add(c * self.row_bytes + p / 32 * 34);
            let d = _mm512_set1_ps(half_to_f32(blk));
            let q0 = _mm_loadu_si128(blk.add(2) as *const __m128i);
            let q1 = _mm_loadu_si128(blk.add(18) as *const __m128i);
            [_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0))), _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)))]
        }
        #[inline(always)]
        unsafe fn w256x4(&self, c: usize, p: usize) -> [__m256; 4] {
            let blk = self.b.add(c * self.row_bytes + p / 32 * 34);
            let d = _mm256_set1_ps(half_to_f32(blk));
            let f = |o: usize| _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(2 + o) as *const __m128i))));
            [f(0), f(8), f(16), f(24)]
        }
    }

    /// FP8 E4M3 rows of `k` codes and their scales. A code widens to f16 bits exactly
    /// (`(b & 0x7f) << 7 | sign << 15` is the value · 2^-8, subnormals included), F16C makes
    /// it f32, and the row scale · 2^8 undoes the shift: the same bits as the table.
    pub struct F8Strip {
        pub b: *const u8,
        pub s: *const f32,
        pub k: usize,
    }

    impl F8Strip {
        pub fn new(w: &super::F8Weight, n0: usize, k: usize) -> F8Strip {
            F8Strip { b: w.q[n0 * k..].as_ptr(), s: w.scale[n0..].as_ptr(), k }
        }

        #[inline(always)]
        unsafe fn halves(h: __m128i) -> __m128i {
            let mag = _mm_slli_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7f)), 7);
            let sign = _mm_slli_epi16(_mm_and_si128(h, _mm_set1_epi16(0x80)), 8);
            _mm_or_si128(mag, sign)
        }
    }

    impl Strip for F8Strip {
        #[inline(always)]
        unsafe fn prefetch(&self, c: usize, p: usize) {
            _mm_prefetch::<_MM_HINT_T0>(self.b.wrapping_add(c * self.k + p) as *const i8);
        }
        #[inline(always)]
        unsafe fn w512(&self, c: usize, p: usize) -> __m512 {
            let h = _mm256_cvtepu8_epi16(_mm_loadu_si128(self.b.add(c * self.k + p) as *const __m128i));
            let lo = Self::halves(_mm256_castsi256_si128(h));
            let hi = Self::halves(_mm256_extracti128_si256(h, 1));
            let f = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
            _mm512_mul_ps(f, _mm512_set1_ps(*self.s.add(c) * 256.0))
        }
        #[inline(always)]
        unsafe fn w256(&self, c: usize, p: usize) -> __m256 {
            let h = _mm_cvtepu8_epi16(_mm_loadl_epi64(self.b.add(c * self.k + p) as *const __m128i));
            _mm256_mul_ps(_mm256_cvtph_ps(Self::halves(h)), _mm256_set1_ps(*self.s.add(c) * 256.0))
        }
        #[inline(always)]
        unsafe fn scalar(&self, c: usize, p: usize) -> f32 {
            super::super::quant::e4m3_table()[*self.b.add(c * self.k + p) as usize] * *self.s.add(c)
        }
    }

    pub struct Q50Strip {
        pub b: *const u8,
        pub row_bytes: usize,
    }

    impl Strip for Q50Strip {
        #[inline(always)]
        unsafe fn prefetch(&self, c: usize, p: usize) {
            _mm_prefetch::<_MM_HINT_T0>(self.b.wrapping_add(c * self.row_bytes + p / 32 * 22) as *const i8);
        }
        #[inline(always)]
        unsafe fn w512(&self, c: usize, p: usize) -> __m512 {
            self.w512x2(c, p / 32 * 32)[(p / 16) % 2]
        }
        #[inline(always)]
        unsafe fn w256(&self, c: usize, p: usize) -> __m256 {
            self.w256x4(c, p / 32 * 32)[(p / 8) % 4]
        }
        unsafe fn scalar(&self, _c: usize, _p: usize) -> f32 {
            unreachable!("quantized rows have no tail")
        }
        #[inline(always)]
        unsafe fn w512x2(&self, c: usize, p: usize) -> [__m512; 2] {
            let blk = self.b.add(c * self.row_bytes + p / 32 * 22);
            let d = _mm512_set1_ps(half_to_f32(blk));
            let qh = std::ptr::read_unaligned(blk.add(2) as *const u32);
            let qs = _mm_loadu_si128(blk.add(6) as *const __m128i);
            let mask = _mm_set1_epi8(0x0f);
            let sixteen = _mm512_set1_epi32(16);
            let f = |nib: __m128i, bits: u32| {
                let q = _mm512_cvtepu8_epi32(nib);
                let hi = _mm512_maskz_mov_epi32(bits as __mmask16, sixteen);
                let v = _mm512_sub_epi32(_mm512_or_si512(q, hi), sixteen);
                _mm512_mul_ps(d, _mm512_cvtepi32_ps(v))
            };
            [f(_mm_and_si128(qs, mask), qh & 0xffff), f(_mm_and_si128(_mm_srli_epi16(qs, 4), mask), qh >> 16)]
        }
        #[inline(always)]
        unsafe fn w256x4(&self, c: usize, p: usize) -> [__m256; 4] {
            let blk = self.b.add(c * self.row_bytes + p / 32 * 22);
            let d = _mm256_set1_ps(half_to_f32(blk));
            let qh = std::ptr::read_unaligned(blk.add(2) as *const u32);
            let qs = _mm_loadu_si128(blk.add(6) as *const __m128i);
            let mask = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let f = |nib: __m128i, shift: u32| {
                let q = _mm256_cvtepu8_epi32(nib);
                let bits = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((qh >> shift) as i32), lanes), _mm256_set1_epi32(1));
                let v = _mm256_sub_epi32(_mm256_or_si256(q, _mm256_slli_epi32(bits, 4)), _mm256_set1_epi32(16));
                _mm256_mul_ps(d, _mm256_cvtepi32_ps(v))
            };
            [f(lo, 0), f(_mm_srli_si128(lo, 8), 8), f(hi, 16), f(_mm_srli_si128(hi, 8), 24)]
        }
    }

    /// One MR x NR block of outputs over the full K: lanes accumulate k ≡ lane (mod 16),
    /// then a fixed horizontal sum, then the scalar tail.
    #[inline(always)]
    unsafe fn tile512<const MR: usize, const NR: usize, S: Strip>(x: *const f32, k: usize, w: &S, c0: usize, y: *mut f32, ldy: usize) {
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        let kv = k / 16 * 16;
        let mut p = 0;
        while p + 32 <= kv {
            let mut wv = [[_mm512_setzero_ps(); 2]; NR];
            for c in 0..NR {
                w.prefetch(c0 + NR + c, p);
                wv[c] = w.w512x2(c0 + c, p);
            }
            for r in 0..MR {
                let x0 = _mm512_loadu_ps(x.add(r * k + p));
                let x1 = _mm512_loadu_ps(x.add(r * k + p + 16));
                for c in 0..NR {
                    acc[r][c] = _mm512_fmadd_ps(x0, wv[c][0], acc[r][c]);
                    acc[r][c] = _mm512_fmadd_ps(x1, wv[c][1], acc[r][c]);
                }
            }
            p += 32;
        }
        while p < kv {
            let mut wv = [_mm512_setzero_ps(); NR];
            for c in 0..NR {
                wv[c] = w.w512(c0 + c, p);
            }
            for r in 0..MR {
                let xv = _mm512_loadu_ps(x.add(r * k + p));
                for c in 0..NR {
                    acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
                }
            }
            p += 16;
        }
        for r in 0..MR {
            for c in 0..NR {
                let mut s = _mm512_reduce_add_ps(acc[r][c]);
                for q in kv..k {
                    s += *x.add(r * k + q) * w.scalar(c0 + c, q);
                }
                *y.add(r * ldy + c) = s;
            }
        }
    }

    /// Writes `rows` columns of the strip, `k` weights each, as f32 (k a multiple of 32).
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn dequant_avx512<S: Strip>(w: &S, rows: usize, k: usize, out: *mut f32) {
        for c in 0..rows {
            for p in (0..k).step_by(32) {
                let [a, b] = w.w512x2(c, p);
                _mm512_storeu_ps(out.add(c * k + p), a);
                _mm512_storeu_ps(out.add(c * k + p + 16), b);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dequant_avx2<S: Strip>(w: &S, rows: usize, k: usize, out: *mut f32) {
        for c in 0..rows {
            for p in (0..k).step_by(32) {
                let v = w.w256x4(c, p);
                for (h, x) in v.iter().enumerate() {
                    _mm256_storeu_ps(out.add(c * k + p + 8 * h), *x);
                }
            }
        }
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn gemm_avx512<S: Strip>(a: &super::GemmArgs, w: &S, n: usize) {
        let super::GemmArgs { x, m, k, y, ldy } = *a;
        tiled_driver!(tile512, 4, 4, x, m, k, w, n, y, ldy)
    }

    /// f32 weights in memory (a dequantized strip, batches). From 64 rows (prefill chunks)
    /// and up to K = 768, tiles of 8 rows x 2 columns, so each weight vector loaded (from
    /// L2: a strip of 64 columns is 147 KB at K = 576) serves 8 rows instead of 4; the rows
    /// past a multiple of 8 in 4 x 4 tiles. Gemm bench, q4_1 at m = 128, K = 576: +5-35%
    /// (q_o, k_v, gate_up); at K = 1536 (down) 20-40% slower (eight rows of x, 48 KB, no
    /// longer fit L1) and at m = 16 10-15% slower, so those keep 4 x 4. Each output is the
    /// same chain of FMAs whatever the tile, so the bits do not change.
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn gemm_avx512_f32(a: &super::GemmArgs, w: &F32Strip, n: usize) {
        let super::GemmArgs { x, m, k, y, ldy } = *a;
        let m8 = if m >= 64 && k <= 768 { m / 8 * 8 } else { 0 };
        for i in (0..m8).step_by(8) {
            let (xi, yi) = (x.add(i * k), y.add(i * ldy));
            let mut j = 0;
            while j + 2 <= n {
                tile512::<8, 2, _>(xi, k, w, j, yi.add(j), ldy);
                j += 2;
            }
            if j < n {
                tile512::<8, 1, _>(xi, k, w, j, yi.add(j), ldy);
            }
        }
        if m8 < m {
            let (x, y, m) = (x.add(m8 * k), y.add(m8 * ldy), m - m8);
            tiled_driver!(tile512, 4, 4, x, m, k, w, n, y, ldy)
        }
    }

    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(v, 1);
        let lo = _mm256_castps256_ps128(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn tile256<const MR: usize, const NR: usize, S: Strip>(x: *const f32, k: usize, w: &S, c0: usize, y: *mut f32, ldy: usize) {
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let kv = k / 8 * 8;
        let mut p = 0;
        while p + 32 <= kv {
            let mut wv = [[_mm256_setzero_ps(); 4]; NR];
            for c in 0..NR {
                w.prefetch(c0 + NR + c, p);
                wv[c] = w.w256x4(c0 + c, p);
            }
            for r in 0..MR {
                for h in 0..4 {
                    let xv = _mm256_loadu_ps(x.add(r * k + p + 8 * h));
                    for c in 0..NR {
                        acc[r][c] = _mm256_fmadd_ps(xv, wv[c][h], acc[r][c]);
                    }
                }
            }
            p += 32;
        }
        while p < kv {
            let mut wv = [_mm256_setzero_ps(); NR];
            for c in 0..NR {
                wv[c] = w.w256(c0 + c, p);
            }
            for r in 0..MR {
                let xv = _mm256_loadu_ps(x.add(r * k + p));
                for c in 0..NR {
                    acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
                }
            }
            p += 8;
        }
        for r in 0..MR {
            for c in 0..NR {
                let mut s = hsum256(acc[r][c]);
                for q in kv..k {
                    s += *x.add(r * k + q) * w.scalar(c0 + c, q);
                }
                *y.add(r * ldy + c) = s;
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemm_avx2<S: Strip>(a: &super::GemmArgs, w: &S, n: usize) {
        let super::GemmArgs { x, m, k, y, ldy } = *a;
        tiled_driver!(tile256, 4, 2, x, m, k, w, n, y, ldy)
    }
}

#[allow(clippy::needless_range_loop)]
mod portable {
    const L: usize = 8;

    pub struct F32Strip {
        pub w: *const f32,
    }

    unsafe fn tile<const MR: usize, const NR: usize, S: AsStrip>(x: *const f32, k: usize, s: &S, c0: usize, y: *mut f32, ldy: usize) {
        let w = s.ptr().add(c0 * k);
        let mut acc = [[[0f32; L]; NR]; MR];
        let kv = k / L * L;
        let mut p = 0;
        while p < kv {
            for r in 0..MR {
                for c in 0..NR {
                    for l in 0..L {
                        acc[r][c][l] += *x.add(r * k + p + l) * *w.add(c * k + p + l);
                    }
                }
            }
            p += L;
        }
        for r in 0..MR {
            for c in 0..NR {
                let a = acc[r][c];
                let mut s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
                for q in kv..k {
                    s += *x.add(r * k + q) * *w.add(c * k + q);
                }
                *y.add(r * ldy + c) = s;
            }
        }
    }

    pub trait AsStrip {
        fn ptr(&self) -> *const f32;
    }

    impl AsStrip for F32Strip {
        fn ptr(&self) -> *const f32 {
            self.w
        }
    }

    pub unsafe fn gemm(a: &super::GemmArgs, w: *const f32, n: usize) {
        let super::GemmArgs { x, m, k, y, ldy } = *a;
        let strip = F32Strip { w };
        let w = &strip;
        tiled_driver!(tile, 2, 2, x, m, k, w, n, y, ldy)
    }
}

/// GGUF Q4_1 of rows whose length is a multiple of 32 (min/max per block), for tests.
#[cfg(test)]
pub(crate) fn quantize_q4_1(w: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for blk in w.chunks_exact(QK) {
        let (mn, mx) = blk.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let d = (mx - mn) / 15.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(mn).to_le_bytes());
        for j in 0..QK / 2 {
            let q0 = ((blk[j] - mn) * id).round().clamp(0.0, 15.0) as u8;
            let q1 = ((blk[j + 16] - mn) * id).round().clamp(0.0, 15.0) as u8;
            out.push(q0 | (q1 << 4));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn every_kernel_path_matches_reference_on_odd_shapes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for kern in Kernel::available() {
            for &(m, k, n) in &[(1, 576, 192), (3, 576, 67), (17, 1536, 33), (5, 13, 9), (128, 64, 130), (2, 7, 1)] {
                let x = rand_vec(&mut rng, m * k);
                let w = rand_vec(&mut rng, n * k);
                let mut y = vec![f32::NAN; m * n];
                let args = GemmArgs { x: x.as_ptr(), m, k, y: y.as_mut_ptr(), ldy: n };
                unsafe { kern.run(&args, w.as_ptr(), n) };
                let r = reference(&x, m, k, &w, n);
                for (a, b) in y.iter().zip(&r) {
                    assert!((a - b).abs() <= 1e-4 * (k as f32).sqrt(), "{kern:?} m={m} k={k} n={n}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn output_rows_do_not_depend_on_batch_size() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let pool = ThreadPool::new(2);
        let (k, n) = (576, 200);
        let lin = Linear::new(Weight::F32(rand_vec(&mut rng, n * k)), n, k).unwrap();
        let x = rand_vec(&mut rng, 37 * k);
        let mut all = vec![0f32; 37 * n];
        matmul(&pool, &x, 37, &lin, &mut all);
        for i in [0usize, 5, 36] {
            let mut one = vec![0f32; n];
            matmul(&pool, &x[i * k..(i + 1) * k], 1, &lin, &mut one);
            assert_eq!(&all[i * n..(i + 1) * n], &one[..], "row {i}");
        }
    }

    /// act8 layers with f32 activations (`Acts::F32`, the engine's prompt rows) give
    /// exactly what the `none` path gives on the same blocks: Q4_1 as the checkpoint holds
    /// it, other formats as the Q8_0 blocks act8 made of them; every path, through
    /// `matmul_many_acts` too, on batch sizes of both the fused and the strip paths.
    #[test]
    fn act8_layers_with_f32_activations_equal_the_none_path_on_their_blocks() {
        use crate::config::Quantize;
        let mut rng = rand::rngs::StdRng::seed_from_u64(33);
        let pool = ThreadPool::new(2);
        let k = 576;
        let q41 = Linear::new(Weight::Q4_1(quantize_q4_1(&rand_vec(&mut rng, 150 * k))), 150, k).unwrap();
        let f32w = Linear::new(Weight::F32(rand_vec(&mut rng, 70 * k)), 70, k).unwrap();
        for src in [&q41, &f32w] {
            let a8 = src.quantized(Quantize::Act8);
            let Weight::A8(w) = &a8.weight else { panic!("act8 of a {} layer is {}", src.weight.format_name(), a8.weight.format_name()) };
            let mut blocks = Vec::new();
            w.blocks_of(0, a8.out_features, &mut blocks);
            let plain = Linear::new(
                match w.format {
                    A8Format::Q4_1 => Weight::Q4_1(blocks),
                    A8Format::Q8_0 => Weight::Q8_0(blocks),
                    A8Format::I8 => panic!("act8 made per-channel INT8 of K = {k}, a multiple of 32"),
                },
                a8.out_features,
                k,
            )
            .unwrap();
            let n = a8.out_features;
            for m in [1usize, 3, 17] {
                let x = rand_vec(&mut rng, m * k);
                for kern in Kernel::available() {
                    let (mut want, mut got, mut int8) = (vec![0f32; m * n], vec![f32::NAN; m * n], vec![0f32; m * n]);
                    matmul_on(kern, &pool, &x, m, &plain, &mut want);
                    matmul_acts(kern, &pool, &x, m, &a8, &mut got, Acts::F32);
                    assert_eq!(got, want, "{kern:?} m={m} {:?}", w.format);
                    matmul_on(kern, &pool, &x, m, &a8, &mut int8);
                    assert_ne!(int8, want, "the INT8 path differs, so the test can tell them apart");
                }
                let mut many = vec![f32::NAN; m * n];
                matmul_many_acts(&pool, &x, m, &mut [(&a8, &mut many)], Acts::F32);
                let mut want = vec![0f32; m * n];
                matmul(&pool, &x, m, &plain, &mut want);
                assert_eq!(many, want);
            }
        }
    }

    /// One dispatch for several layers gives the bits of one matmul per layer, for every
    /// kind (f32 and GGUF blocks, INT8, act8) and for layers of mixed kinds.
    #[test]
    fn matmul_many_equals_one_matmul_per_layer() {
        use crate::config::Quantize;
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let pool = ThreadPool::new(2);
        let k = 576;
        let base: Vec<Linear> = [576usize, 192, 192]
            .iter()
            .map(|&n| Linear::new(Weight::Q4_1(quantize_q4_1(&rand_vec(&mut rng, n * k))), n, k).unwrap())
            .collect();
        for m in [1usize, 3, 37] {
            let mut x = rand_vec(&mut rng, m * k);
            x[5] = 30.0; // an outlier for the INT8-activation kinds
            for q in [Quantize::None, Quantize::Int8, Quantize::Act8] {
                let lins: Vec<Linear> = base.iter().map(|l| l.quantized(q)).collect();
                let mut mixed = lins.clone();
                mixed[1] = Linear::new(Weight::F32(rand_vec(&mut rng, 192 * k)), 192, k).unwrap();
                for set in [&lins, &mixed] {
                    let want: Vec<Vec<f32>> = set
                        .iter()
                        .map(|l| {
                            let mut y = vec![0f32; m * l.out_features];
                            matmul(&pool, &x, m, l, &mut y);
                            y
                        })
                        .collect();
                    let mut got: Vec<Vec<f32>> = set.iter().map(|l| vec![f32::NAN; m * l.out_features]).collect();
                    let mut outs: Vec<(&Linear, &mut [f32])> = set.iter().zip(got.iter_mut()).map(|(l, y)| (l, y.as_mut_slice())).collect();
                    matmul_many(&pool, &x, m, &mut outs);
                    assert_eq!(got, want, "{q:?} m={m}");
                }
            }
        }
    }

    /// Small batches expand quantized blocks in registers, large ones dequantize a strip
    /// first: both must give the same bits, on every instruction-set path.
    #[test]
    fn fused_and_strip_paths_agree_bitwise_for_quantized_weights() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let pool = ThreadPool::new(2);
        for &(k, n) in &[(576usize, 192usize), (1536, 70), (64, 49)] {
            let dense = rand_vec(&mut rng, n * k);
            for weight in [
                Weight::Q4_1(quantize_q4_1(&dense)),
                Weight::Q8_0(super::super::act8::quantize_q8_0(&dense)),
                Weight::Q5_0(quantize_q5_0(&dense)),
                Weight::F8(F8Weight::quantize(&dense, n, k)),
            ] {
                let lin = Linear::new(weight, n, k).unwrap();
                let mut deq = vec![0f32; n * k];
                lin.weight.dequant_rows(0, k, &mut deq);
                for kern in Kernel::available() {
                    let mut simd = vec![f32::NAN; 5 * k];
                    kern.dequant(&lin.weight, 3, k, &mut simd);
                    assert_eq!(&simd[..], &deq[3 * k..8 * k], "{kern:?} dequant");
                }
                // 20 rows: 4 x 4 strip tiles; 77: 8 x 2 tiles (odd n: an 8 x 1 at the end)
                // and 5 rows past them.
                let x = rand_vec(&mut rng, 77 * k);
                for kern in Kernel::available() {
                    for big_m in [20usize, 77] {
                        let mut big = vec![0f32; big_m * n];
                        matmul_on(kern, &pool, &x[..big_m * k], big_m, &lin, &mut big);
                        for (r0, m) in [(0usize, 1usize), (0, 3), (0, 8), (9, 4), (big_m - 5, 5)] {
                            let mut small = vec![0f32; m * n];
                            matmul_on(kern, &pool, &x[r0 * k..(r0 + m) * k], m, &lin, &mut small);
                            assert_eq!(&big[r0 * n..(r0 + m) * n], &small[..], "{kern:?} {} k={k} rows {r0}+{m} of {big_m}", lin.weight.format_name());
                        }
                        let r = reference(&x, big_m, k, &deq, n);
                        for (a, b) in big.iter().zip(&r) {
                            assert!((a - b).abs() <= 1e-3, "{kern:?} m={big_m}: {a} vs {b}");
                        }
                    }
                }
            }
        }
    }

    /// FP8 and INT8 layers on the issue's odd shapes, every path this CPU has: FP8
    /// against the f64 product of its dequantized weights; INT8 rows must not depend on
    /// the batch they are in, and stay near the float product.
    #[test]
    fn fp8_and_int8_layers_on_odd_shapes_every_path() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(31);
        let pool = ThreadPool::new(2);
        for &(m, k, n) in &[(1usize, 576usize, 49152usize), (3, 576, 1536), (17, 1536, 576), (128, 576, 96), (2, 13, 9), (5, 33, 40)] {
            let dense = rand_vec(&mut rng, n * k);
            let x = rand_vec(&mut rng, m * k);
            let f8 = Linear::new(Weight::F8(F8Weight::quantize(&dense, n, k)), n, k).unwrap();
            let mut deq = vec![0f32; n * k];
            f8.weight.dequant_rows(0, k, &mut deq);
            let want = reference(&x, m, k, &deq, n);
            for kern in Kernel::available() {
                let mut y = vec![f32::NAN; m * n];
                matmul_on(kern, &pool, &x, m, &f8, &mut y);
                for (a, b) in y.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-4 * (k as f32).sqrt(), "fp8 {kern:?} m={m} k={k} n={n}: {a} vs {b}");
                }
            }
            let i8 = Linear::new(Weight::A8(A8Weight::int8(&dense, n, k)), n, k).unwrap();
            let exact = reference(&x, m, k, &dense, n);
            for kern in Kernel::available() {
                let mut y = vec![f32::NAN; m * n];
                matmul_on(kern, &pool, &x, m, &i8, &mut y);
                // f32 activations asked for (prompt rows under act8): INT8 weights keep INT8.
                let mut f32_acts = vec![f32::NAN; m * n];
                matmul_acts(kern, &pool, &x, m, &i8, &mut f32_acts, Acts::F32);
                assert_eq!(f32_acts, y, "int8 {kern:?} m={m}: Acts::F32");
                let last = &x[(m - 1) * k..];
                let mut one = vec![f32::NAN; n];
                matmul_on(kern, &pool, last, 1, &i8, &mut one);
                assert_eq!(&y[(m - 1) * n..], &one[..], "int8 {kern:?} m={m}: last row alone");
                for (a, b) in y.iter().zip(&exact) {
                    assert!((a - b).abs() <= 0.02 * (k as f32).sqrt(), "int8 {kern:?} m={m} k={k} n={n}: {a} vs {b}");
                }
            }
        }
    }

    fn quantize_q5_0(w: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for blk in w.chunks_exact(QK) {
            let amax = blk.iter().fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
            let d = amax / -16.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q: Vec<u8> = blk.iter().map(|&v| ((v * id + 16.5) as i32).clamp(0, 31) as u8).collect();
            let mut qh = 0u32;
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            for j in 0..QK / 2 {
                qh |= ((q[j] as u32 >> 4) & 1) << j;
                qh |= ((q[j + 16] as u32 >> 4) & 1) << (j + 16);
            }
            out.extend_from_slice(&qh.to_le_bytes());
            out.extend((0..QK / 2).map(|j| (q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4)));
        }
        out
    }

    #[test]
    fn q5_0_dequantizes_like_candle() {
        use candle_core::quantized::GgmlDType;
        use candle_core::Device;
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let (n, k) = (3, 96);
        let raw = quantize_q5_0(&rand_vec(&mut rng, n * k));
        let qt = candle_core::quantized::QTensor::new(
            candle_core::quantized::QStorage::from_data(std::borrow::Cow::Borrowed(&raw[..]), &Device::Cpu, GgmlDType::Q5_0).unwrap(),
            (n, k),
        )
        .unwrap();
        let want: Vec<f32> = qt.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let mut got = vec![0f32; n * k];
        Weight::Q5_0(raw).dequant_rows(0, k, &mut got);
        assert_eq!(got, want);
    }

    #[test]
    fn q4_1_dequantizes_like_candle() {
        use candle_core::quantized::GgmlDType;
        use candle_core::Device;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (n, k) = (4, 64);
        let raw = quantize_q4_1(&rand_vec(&mut rng, n * k));
        let qt = candle_core::quantized::QTensor::new(
            candle_core::quantized::QStorage::from_data(std::borrow::Cow::Borrowed(&raw[..]), &Device::Cpu, GgmlDType::Q4_1).unwrap(),
            (n, k),
        )
        .unwrap();
        let want: Vec<f32> = qt.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let mut got = vec![0f32; n * k];
        Weight::Q4_1(raw).dequant_rows(0, k, &mut got);
        assert_eq!(got, want);
    }
}
