//! Weights quantized at load (`--quantize int8|fp8`) and the INT8 GEMM.
//!
//! - INT8: symmetric per output channel (`w ≈ s_n · q`, q in -127..=127), rows padded with
//!   zeros to a multiple of 32. Activations are quantized per token on the fly, in groups
//!   of 32 with a scale each, their outliers kept in f32 ([`QuantActs`]); each group's dot
//!   product is exact integer arithmetic, and every instruction-set path sums the groups in
//!   the same order ([`gemm_i8`]), so they give the same bits, and a row's output never
//!   depends on the batch it is in.
//! - FP8: OCP E4M3 codes with one f32 scale per output channel (`w ≈ s_n · e4m3(q)`,
//!   amax mapped to 448), the layout cuBLASLt takes. On CPU the codes are widened in
//!   registers (E4M3 → f16 bits → F16C) and multiplied in f32 with f32 activations.
//!
//! ```text
//!   x[m, K] f32 ──per token──▶ xq[m, Kp] i8, s_x[m, Kp/32], outliers (m, col, f32)
//!   W[N, K]     ──at load───▶ wq[N, Kp] i8, s_w[N]
//!   y[m, n] = s_w[n] · Σ_g s_x[m, g] · (xq[m, g] · wq[n, g])  +  Σ_outliers x · s_w[n] · wq[n, col]
//! ```

use std::cell::RefCell;

use super::matmul::Kernel;
use super::SyncPtr;
use crate::threadpool::ThreadPool;

/// INT8 rows are padded to this many columns (one AVX2 register of bytes).
pub const I8_ALIGN: usize = 32;

/// Weights `[N, K]` as symmetric INT8 per output channel.
#[derive(Debug, Clone)]
pub struct I8Weight {
    /// `N` rows of `kp` codes (the tail past K is zero).
    pub q: Vec<i8>,
    /// One scale per row.
    pub scale: Vec<f32>,
    /// Row stride: K rounded up to [`I8_ALIGN`].
    pub kp: usize,
}

impl I8Weight {
    /// Quantizes `w[n, k]` (row-major f32).
    pub fn quantize(w: &[f32], n: usize, k: usize) -> I8Weight {
        assert_eq!(w.len(), n * k);
        let kp = k.next_multiple_of(I8_ALIGN);
        let mut q = vec![0i8; n * kp];
        let mut scale = vec![0f32; n];
        for (j, row) in w.chunks_exact(k).enumerate() {
            scale[j] = quantize_row(row, &mut q[j * kp..j * kp + k]);
        }
        I8Weight { q, scale, kp }
    }

    /// Rows `n0 .. n0 + out.len() / k` as f32 (`s · q`).
    pub fn dequant_rows(&self, n0: usize, k: usize, out: &mut [f32]) {
        for (r, o) in out.chunks_exact_mut(k).enumerate() {
            let (s, row) = (self.scale[n0 + r], &self.q[(n0 + r) * self.kp..]);
            for (v, &c) in o.iter_mut().zip(row) {
                *v = s * c as f32;
            }
        }
    }
}

/// `f` folded over `row` in eight lanes (lane l takes elements l, l + 8, ..., in order):
/// eight independent chains where a serial fold has one, which the compiler turns into
/// vector operations; the caller combines the lanes in a fixed order.
#[inline(always)]
fn fold_lanes<T: Copy>(row: &[f32], init: T, f: impl Fn(T, f32) -> T) -> [T; 8] {
    let mut lanes = [init; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = f(*l, v);
        }
    }
    for (l, &v) in lanes.iter_mut().zip(rest) {
        *l = f(*l, v);
    }
    lanes
}

/// The largest magnitude of `row` (0 for an empty or all-zero row; NaN is passed over):
/// [`fold_lanes`], then across the lanes, the same value as a serial fold (a maximum does
/// not round).
#[inline(always)]
pub fn abs_max(row: &[f32]) -> f32 {
    fold_lanes(row, 0f32, |l, v| l.max(v.abs())).iter().fold(0f32, |a, &l| a.max(l))
}

/// Symmetric INT8 of one row: returns the scale (`amax / 127`, 0 for an all-zero row) and
/// writes `round(v / scale)` into `q` (ties to even, in -127..=127).
#[inline(always)]
pub fn quantize_row(row: &[f32], q: &mut [i8]) -> f32 {
    let amax = abs_max(row);
    if amax == 0.0 || !amax.is_finite() {
        q[..row.len()].fill(0);
        return if amax.is_finite() { 0.0 } else { f32::NAN };
    }
    let scale = amax / 127.0;
    let inv = 127.0 / amax;
    // Adding and subtracting 1.5 · 2^23 rounds to an integer, ties to even, for |v| < 2^22
    // (here |v| <= 127): the same as `round_ties_even`, which is a libm call on baseline
    // x86-64 and cost 7% of a decode step.
    const MAGIC: f32 = 12_582_912.0;
    for (c, &v) in q.iter_mut().zip(row) {
        let r = (v * inv).clamp(-127.0, 127.0) + MAGIC - MAGIC;
        // NaN to 0 by a select, as `as i8` does, so that the convert needs no checks and
        // the loop vectorizes (the saturating `as` stayed one scalar convert per value).
        let r = if r.is_nan() { 0.0 } else { r };
        // SAFETY: r is an integer in -127..=127, so it fits an i32 (and then an i8).
        *c = unsafe { r.to_int_unchecked::<i32>() } as i8;
    }
    scale
}

/// Weights `[N, K]` as OCP FP8 E4M3 codes with one scale per output channel.
#[derive(Debug, Clone)]
pub struct F8Weight {
    /// `N` rows of `K` codes.
    pub q: Vec<u8>,
    /// One scale per row: `w ≈ scale · e4m3(q)`.
    pub scale: Vec<f32>,
}

/// Largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

impl F8Weight {
    pub fn quantize(w: &[f32], n: usize, k: usize) -> F8Weight {
        assert_eq!(w.len(), n * k);
        let mut q = vec![0u8; n * k];
        let mut scale = vec![0f32; n];
        for (j, row) in w.chunks_exact(k).enumerate() {
            let amax = abs_max(row);
            let s = if amax > 0.0 { amax / E4M3_MAX } else { 0.0 };
            scale[j] = s;
            if s > 0.0 {
                for (c, &v) in q[j * k..(j + 1) * k].iter_mut().zip(row) {
                    *c = f32_to_e4m3(v / s);
                }
            }
        }
        F8Weight { q, scale }
    }

    pub fn dequant_rows(&self, n0: usize, k: usize, out: &mut [f32]) {
        let lut = e4m3_table();
        for (r, o) in out.chunks_exact_mut(k).enumerate() {
            let (s, row) = (self.scale[n0 + r], &self.q[(n0 + r) * k..(n0 + r + 1) * k]);
            for (v, &c) in o.iter_mut().zip(row) {
                *v = lut[c as usize] * s;
            }
        }
    }
}

/// E4M3 (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no infinities, 0x7f/0xff
/// NaN) to f32.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = ((b >> 3) & 0x0f, b & 0x07);
    if e == 0x0f && m == 0x07 {
        return f32::NAN;
    }
    let mag = if e == 0 { m as f32 * 2f32.powi(-9) } else { (1.0 + m as f32 / 8.0) * 2f32.powi(e as i32 - 7) };
    sign * mag
}

/// The 256 E4M3 codes as f32.
pub fn e4m3_table() -> &'static [f32; 256] {
    static T: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    T.get_or_init(|| std::array::from_fn(|i| e4m3_to_f32(i as u8)))
}

/// f32 to the nearest E4M3 code (ties to even), saturating at ±448; NaN to 0x7f.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    let code = if a >= E4M3_MAX {
        0x7e
    } else if a < 2f32.powi(-6) {
        // Subnormals m · 2^-9 (m = 8 rounds up into the smallest normal, code 0x08).
        (a * 512.0).round_ties_even() as u8
    } else {
        // Round the f32 mantissa to 3 bits, ties to even; a carry moves into the exponent.
        let bits = a.to_bits();
        let r = (bits + 0x7ffff + ((bits >> 20) & 1)) >> 20;
        let e = (r >> 3) as i32 - 127 + 7;
        (((e as u32) << 3) | (r & 7)).min(0x7e) as u8
    };
    sign | code
}

// ---------------------------------------------------------------- INT8 GEMM

thread_local! {
    static ACTS: RefCell<QuantActs> = const { RefCell::new(QuantActs::new()) };
}

/// The INT8 instruction-set path for an f32 [`Kernel`] choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum I8Kernel {
    /// AVX-512 VNNI: `vpdpbusd` (four u8 x i8 products added into each 32-bit lane in one
    /// instruction) on 256-bit registers, so a lane holds the same four codes as on the
    /// AVX2 path; signed weights are flipped to unsigned (`w ^ 0x80 = w + 128`) and the
    /// lane starts at `-128 · Σx` of its four activation codes, which keeps the integer
    /// dot product exact. 32 vector registers allow larger tiles.
    #[cfg(target_arch = "x86_64")]
    Vnni,
    /// `vpmaddubsw` on |x| and sign(x)·w, `vpmaddwd` into 32-bit lanes, then one FMA per
    /// group with the activation scale.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl I8Kernel {
    /// The INT8 path that goes with an f32 path: AVX-512 machines with VNNI take
    /// [`I8Kernel::Vnni`], other AVX-512 and AVX2 machines [`I8Kernel::Avx2`].
    pub fn for_kernel(k: Kernel) -> I8Kernel {
        match k {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 if Self::has_vnni() && super::matmul::isa_cap() >= super::matmul::IsaLevel::Avx512Vnni => I8Kernel::Vnni,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 | Kernel::Avx2 => I8Kernel::Avx2,
            Kernel::Portable => I8Kernel::Portable,
        }
    }

    /// Whether this CPU runs [`I8Kernel::Vnni`] (it also needs the AVX2 path's features,
    /// which its tiles share).
    #[cfg(target_arch = "x86_64")]
    fn has_vnni() -> bool {
        std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }

    /// Paths this CPU can run, best first (each one forced in turn by the tests).
    pub fn available() -> Vec<I8Kernel> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if Self::has_vnni() {
            v.push(I8Kernel::Vnni);
        }
        for k in Kernel::available().into_iter().map(|k| match k {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => I8Kernel::Avx2,
            _ => I8Kernel::for_kernel(k),
        }) {
            if !v.contains(&k) {
                v.push(k);
            }
        }
        v
    }
}

/// An activation is an outlier when its magnitude exceeds this many times its token's
/// RMS. Small Llamas put a few huge values on the special tokens of chat prompts (the
/// "massive activations" of attention sinks) in the inputs of the MLP: quantized with
/// their group they crush their neighbours to zero, and greedy outputs change (on the
/// default model the first token of every chat fixture). Outliers are kept in f32 and
/// multiplied with their weight column separately, as LLM.int8() does.
pub const OUTLIER_RATIO: f32 = 6.0;

/// Activations of `m` tokens in INT8: each token's row cut into groups of [`I8_ALIGN`]
/// with a scale each (an outlier of one group costs only that group's resolution; on the
/// default model one scale per token gives +5.0% perplexity, per-32 groups +0.6%), and
/// the outliers apart in f32.
#[derive(Debug, Default)]
pub struct QuantActs {
    pub m: usize,
    pub kp: usize,
    /// `m` rows of `kp` codes (outliers and the padding are 0).
    pub xq: Vec<i8>,
    /// `m` rows of `kp / 32` group scales.
    pub sx: Vec<f32>,
    /// (column, value) of every outlier, row by row.
    pub outliers: Vec<(u32, f32)>,
    /// Row `i`'s outliers are `outliers[row_outliers[i]..row_outliers[i + 1]]`.
    pub row_outliers: Vec<usize>,
    /// Per row, its outliers while rows are quantized in parallel (kept for their capacity).
    row_scratch: Vec<Vec<(u32, f32)>>,
}

impl QuantActs {
    pub const fn new() -> QuantActs {
        QuantActs { m: 0, kp: 0, xq: Vec::new(), sx: Vec::new(), outliers: Vec::new(), row_outliers: Vec::new(), row_scratch: Vec::new() }
    }

    /// Quantizes `x[m, k]` for weights of row stride `kp`.
    pub fn quantize(&mut self, x: &[f32], k: usize, kp: usize) {
        self.resize(x.len() / k, kp);
        let groups = kp / I8_ALIGN;
        for (i, row) in x.chunks_exact(k).enumerate() {
            quantize_token(row, &mut self.xq[i * kp..(i + 1) * kp], &mut self.sx[i * groups..(i + 1) * groups], &mut self.outliers);
            self.row_outliers.push(self.outliers.len());
        }
    }

    /// [`QuantActs::quantize`] with the rows spread over `pool` (the same bits: each row is
    /// quantized alone, and its outliers are put in row order after). One row stays on the
    /// calling thread, where waking the pool would cost more than it saves.
    pub fn quantize_on(&mut self, pool: &ThreadPool, x: &[f32], k: usize, kp: usize) {
        let m = x.len() / k;
        if m < 2 || pool.threads() < 2 {
            return self.quantize(x, k, kp);
        }
        self.resize(m, kp);
        let groups = kp / I8_ALIGN;
        if self.row_scratch.len() < m {
            self.row_scratch.resize_with(m, Vec::new);
        }
        let (xq, sx, outs) = (SyncPtr(self.xq.as_mut_ptr()), SyncPtr(self.sx.as_mut_ptr()), SyncPtr(self.row_scratch.as_mut_ptr()));
        pool.run(m, &|i| {
            let _ = (&xq, &sx, &outs);
            // SAFETY: task i touches only row i of `xq` and `sx` and its own scratch vector,
            // all of which exist (resized above), and nothing else reads them meanwhile.
            unsafe {
                let out = &mut *outs.0.add(i);
                out.clear();
                quantize_token(
                    &x[i * k..(i + 1) * k],
                    std::slice::from_raw_parts_mut(xq.0.add(i * kp), kp),
                    std::slice::from_raw_parts_mut(sx.0.add(i * groups), groups),
                    out,
                );
            }
        });
        for out in &self.row_scratch[..m] {
            self.outliers.extend_from_slice(out);
            self.row_outliers.push(self.outliers.len());
        }
    }

    /// `m` rows for weights of row stride `kp`, zeroed (so the padding reads 0), no outliers.
    fn resize(&mut self, m: usize, kp: usize) {
        self.m = m;
        self.kp = kp;
        self.xq.clear();
        self.xq.resize(m * kp, 0);
        self.sx.clear();
        self.sx.resize(m * (kp / I8_ALIGN), 0.0);
        self.outliers.clear();
        self.row_outliers.clear();
        self.row_outliers.push(0);
    }
}

/// One token: its group scales into `sx`, codes into `xq` (its first `row.len()` of `kp`),
/// the activations above [`OUTLIER_RATIO`] times its RMS appended to `outliers` (and 0 in
/// their groups). Compiled a second time for AVX2 where the CPU has it: the body is
/// lane-wise adds, compares and maxima in a fixed order (no FMA), so both give the same bits.
fn quantize_token(row: &[f32], xq: &mut [i8], sx: &mut [f32], outliers: &mut Vec<(u32, f32)>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { quantize_token_avx2(row, xq, sx, outliers) };
    }
    quantize_token_body(row, xq, sx, outliers)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_token_avx2(row: &[f32], xq: &mut [i8], sx: &mut [f32], outliers: &mut Vec<(u32, f32)>) {
    quantize_token_body(row, xq, sx, outliers)
}

#[inline(always)]
fn quantize_token_body(row: &[f32], xq: &mut [i8], sx: &mut [f32], outliers: &mut Vec<(u32, f32)>) {
    let limit = OUTLIER_RATIO * token_rms(row);
    let mut part = [0f32; I8_ALIGN];
    for (g, src) in row.chunks(I8_ALIGN).enumerate() {
        let at = g * I8_ALIGN;
        // Outliers are rare: a branch-free test first, the sorting-out only where one is.
        let any = src.iter().fold(false, |a, &v| a | (v.abs() > limit));
        let vals = if any {
            let part = &mut part[..src.len()];
            for (j, (d, &v)) in part.iter_mut().zip(src).enumerate() {
                if v.abs() > limit {
                    outliers.push(((at + j) as u32, v));
                    *d = 0.0;
                } else {
                    *d = v;
                }
            }
            &*part
        } else {
            src
        };
        sx[g] = quantize_row(vals, &mut xq[at..at + src.len()]);
    }
}

/// The RMS of a token's activations: squares summed in f64 in eight lanes
/// ([`fold_lanes`]), the lanes added in a fixed tree; a serial sum was a chain of
/// dependent adds, 5% of a 16-stream decode step.
#[inline(always)]
fn token_rms(row: &[f32]) -> f32 {
    let acc = fold_lanes(row, 0f64, |a, v| a + v as f64 * v as f64);
    let sum = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    (sum / row.len() as f64).sqrt() as f32
}

/// `y[m, N] = x[m, K] · Wᵀ` with W in INT8 and x quantized per token and group.
/// `x` holds whole rows of `k`.
pub fn matmul_i8(kern: Kernel, pool: &ThreadPool, x: &[f32], k: usize, w: &I8Weight, n: usize, y: &mut [f32]) {
    with_acts(pool, x, k, w.kp, |acts| gemm_i8(I8Kernel::for_kernel(kern), pool, acts, w, n, y))
}

/// `f` on `x[m, k]` quantized (on `pool`) for weights of row stride `kp` (a per-thread buffer).
pub fn with_acts<R>(pool: &ThreadPool, x: &[f32], k: usize, kp: usize, f: impl FnOnce(&QuantActs) -> R) -> R {
    ACTS.with(|acts| {
        let mut acts = acts.borrow_mut();
        acts.quantize_on(pool, x, k, kp);
        f(&acts)
    })
}

/// The GEMM over quantized activations:
/// `y[i, j] = s_w[j] · Σ_g s_x[i, g] · (xq[i, g] · wq[j, g])`, each group's integer dot
/// product exact, the groups summed in f32 in eight lanes (lane l holds codes 4l..4l+3 of
/// every group) with one FMA each, then the lanes in a fixed tree; then each outlier
/// `x[i, c]` adds `x[i, c] · (s_w[j] · wq[j, c])` in the order found. Every path does
/// exactly this, so they agree bitwise.
pub fn gemm_i8(kern: I8Kernel, pool: &ThreadPool, a: &QuantActs, w: &I8Weight, n: usize, y: &mut [f32]) {
    assert_eq!(a.kp, w.kp);
    assert_eq!(y.len(), a.m * n);
    if a.m == 0 {
        return;
    }
    // SAFETY: each task writes only its own columns.
    super::matmul::par_cols(pool, a.m, n, y, &|n0, rows, y| unsafe { gemm_i8_cols(kern, a, w, n, n0, rows, y) });
}

/// Columns `n0 .. n0 + rows` of `y[m, n]` (one pool task of [`gemm_i8`]).
///
/// # Safety
/// `y` holds `m` rows of `n`; nothing else writes these columns meanwhile.
pub(crate) unsafe fn gemm_i8_cols(kern: I8Kernel, a: &QuantActs, w: &I8Weight, n: usize, n0: usize, rows: usize, y: *mut f32) {
    let (m, kp) = (a.m, w.kp);
    let strip = I8Strip { q: w.q[n0 * kp..].as_ptr(), s: w.scale[n0..].as_ptr(), xq0: a.xq.as_ptr(), sx: a.sx.as_ptr(), kp };
    // xq holds m rows of kp codes, sx their group scales, the strip `rows` rows of kp codes.
    let yt = y.add(n0);
    match kern {
        #[cfg(target_arch = "x86_64")]
        I8Kernel::Vnni => x86::gemm_vnni(&strip, m, rows, yt, n),
        #[cfg(target_arch = "x86_64")]
        I8Kernel::Avx2 => x86::gemm(&strip, m, rows, yt, n),
        I8Kernel::Portable => portable::gemm(&strip, m, rows, yt, n),
    }
    match kern {
        #[cfg(target_arch = "x86_64")]
        I8Kernel::Vnni | I8Kernel::Avx2 => x86::outliers(a, w, n0, rows, yt, n),
        I8Kernel::Portable => outliers_from(a, w, n0, 0, rows, yt, n),
    }
}

/// The f32 side of the outliers for weight rows `n0 + c0 .. n0 + rows`:
/// `y[i, c] += x · (s_w · wq[c, col])`, in the order found.
///
/// # Safety
/// As [`gemm_i8_cols`].
#[inline(always)]
unsafe fn outliers_from(a: &QuantActs, w: &I8Weight, n0: usize, c0: usize, rows: usize, yt: *mut f32, n: usize) {
    let kp = w.kp;
    for i in 0..a.m {
        for &(col, v) in &a.outliers[a.row_outliers[i]..a.row_outliers[i + 1]] {
            for c in c0..rows {
                let j = n0 + c;
                *yt.add(i * n + c) += v * (w.scale[j] * w.q[j * kp + col as usize] as f32);
            }
        }
    }
}

/// What a tile kernel reads: a strip of INT8 weight rows with their scales, and the
/// activations (their first row, to find the group scales of the rows a tile is given).
pub struct I8Strip {
    pub q: *const i8,
    pub s: *const f32,
    pub xq0: *const i8,
    pub sx: *const f32,
    pub kp: usize,
}

impl I8Strip {
    /// Group scales of the activation row that starts at `x` (rows are `kp` codes apart).
    #[inline(always)]
    unsafe fn sx_row(&self, x: *const i8) -> *const f32 {
        let row = (x.offset_from(self.xq0) as usize) / self.kp;
        self.sx.add(row * (self.kp / I8_ALIGN))
    }
}

/// Sum of eight lanes in the tree `hsum256` uses: `((0+4)+(2+6)) + ((1+5)+(3+7))`.
#[inline(always)]
pub(super) fn lane_sum(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

#[allow(clippy::needless_range_loop)]
mod portable {
    use std::borrow::Borrow;

    use super::{lane_sum, I8Strip};

    pub unsafe fn tile<const MR: usize, const NR: usize, S: Borrow<I8Strip>>(x: *const i8, kp: usize, w: &S, c0: usize, y: *mut f32, ldy: usize) {
        let w = w.borrow();
        let mut acc = [[[0f32; 8]; NR]; MR];
        let sxr: [*const f32; MR] = std::array::from_fn(|r| w.sx_row(x.add(r * kp)));
        for g in 0..kp / 32 {
            for r in 0..MR {
                let xr = x.add(r * kp + g * 32);
                let s = *sxr[r].add(g);
                for c in 0..NR {
                    let wr = w.q.add((c0 + c) * kp + g * 32);
                    for l in 0..8 {
                        let mut d = 0i32;
                        for q in 0..4 {
                            d += *xr.add(4 * l + q) as i32 * *wr.add(4 * l + q) as i32;
                        }
                        acc[r][c][l] = (d as f32).mul_add(s, acc[r][c][l]);
                    }
                }
            }
        }
        for r in 0..MR {
            for c in 0..NR {
                *y.add(r * ldy + c) = lane_sum(acc[r][c]) * *w.s.add(c0 + c);
            }
        }
    }

    pub unsafe fn gemm(w: &I8Strip, m: usize, n: usize, y: *mut f32, ldy: usize) {
        let (x, kp) = (w.xq0, w.kp);
        tiled_driver!(tile, 2, 4, x, m, kp, w, n, y, ldy)
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use std::borrow::Borrow;

    use super::{lane_sum, I8Strip};

    const PF_TILES: usize = 1;

    /// The activation codes of one group as a signed-by-signed dot product wants them:
    /// AVX2 `(|x|, x)`; VNNI `(x, -128 · Σx per lane)` (see [`dot_ss`]).
    #[inline(always)]
    unsafe fn prep_x<const VNNI: bool>(xv: __m256i) -> (__m256i, __m256i) {
        if VNNI {
            let bias = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(-128), xv);
            (xv, _mm256_sub_epi32(_mm256_setzero_si256(), bias))
        } else {
            (_mm256_sign_epi8(xv, xv), xv)
        }
    }

    /// Signed weight codes as [`dot_ss`] wants them: VNNI flips them to unsigned
    /// (`w ^ 0x80 = w + 128`), AVX2 keeps them.
    #[inline(always)]
    unsafe fn prep_w<const VNNI: bool>(wv: __m256i) -> __m256i {
        if VNNI {
            _mm256_xor_si256(wv, _mm256_set1_epi8(-128))
        } else {
            wv
        }
    }

    /// Exact `Σ w·x` of each lane's four signed codes, from [`prep_w`] and [`prep_x`].
    /// AVX2: `|x|` (unsigned) times `sign(x) · w` in `vpmaddubsw` (pairs stay within i16:
    /// 2 · 127 · 127), `vpmaddwd` with ones. VNNI: `Σ (w + 128)·x` added onto
    /// `-128 · Σx`.
    #[inline(always)]
    unsafe fn dot_ss<const VNNI: bool>(w: __m256i, (a, b): (__m256i, __m256i)) -> __m256i {
        if VNNI {
            _mm256_dpbusd_epi32(b, w, a)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(w, b)), _mm256_set1_epi16(1))
        }
    }

    /// One MR x NR block over the full (padded) K, a group of 32 codes a step: each
    /// group's exact integer dot product in eight i32 lanes ([`dot_ss`]), and one FMA
    /// adds them, times the group's activation scale, to the f32 accumulator.
    #[inline(always)]
    unsafe fn tile_on<const MR: usize, const NR: usize, const VNNI: bool>(x: *const i8, kp: usize, w: &I8Strip, c0: usize, y: *mut f32, ldy: usize) {
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let sxr: [*const f32; MR] = std::array::from_fn(|r| w.sx_row(x.add(r * kp)));
        // The rows of this tile and of the next ones are contiguous; short rows (K = 576 is
        // 19 groups) end before the hardware prefetcher ramps up, so fetch the rows
        // `PF_TILES` tile(s) ahead, a group's worth of bytes per group.
        let pf = w.q.wrapping_add((c0 + PF_TILES * NR) * kp);
        for g in 0..kp / 32 {
            let p = g * 32;
            for l in 0..(NR * 32).div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(g * NR * 32 + l * 64));
            }
            let mut wv = [_mm256_setzero_si256(); NR];
            for c in 0..NR {
                wv[c] = prep_w::<VNNI>(_mm256_loadu_si256(w.q.add((c0 + c) * kp + p) as *const __m256i));
            }
            for r in 0..MR {
                let xv = prep_x::<VNNI>(_mm256_loadu_si256(x.add(r * kp + p) as *const __m256i));
                let s = _mm256_broadcast_ss(&*sxr[r].add(g));
                for c in 0..NR {
                    let d = _mm256_cvtepi32_ps(dot_ss::<VNNI>(wv[c], xv));
                    acc[r][c] = _mm256_fmadd_ps(d, s, acc[r][c]);
                }
            }
        }
        for r in 0..MR {
            for c in 0..NR {
                let mut a = [0f32; 8];
                _mm256_storeu_ps(a.as_mut_ptr(), acc[r][c]);
                *y.add(r * ldy + c) = lane_sum(a) * *w.s.add(c0 + c);
            }
        }
    }

    #[inline(always)]
    unsafe fn tile<const MR: usize, const NR: usize, S: Borrow<I8Strip>>(x: *const i8, kp: usize, w: &S, c0: usize, y: *mut f32, ldy: usize) {
        tile_on::<MR, NR, false>(x, kp, w.borrow(), c0, y, ldy)
    }

    #[inline(always)]
    unsafe fn tile_vnni<const MR: usize, const NR: usize, S: Borrow<I8Strip>>(x: *const i8, kp: usize, w: &S, c0: usize, y: *mut f32, ldy: usize) {
        tile_on::<MR, NR, true>(x, kp, w.borrow(), c0, y, ldy)
    }

    /// The outliers, eight weight rows at a time: each row's code gathered (a 32-bit
    /// load that ends at it, or starts at it near the row's start), `y + x·(s_w·q)` as
    /// the scalar path computes it, so the bits are the same; the rows past a multiple
    /// of eight the scalar way.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn outliers(a: &super::QuantActs, w: &super::I8Weight, n0: usize, rows: usize, yt: *mut f32, n: usize) {
        let kp = w.kp;
        let rows8 = rows / 8 * 8;
        let offs = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(kp as i32));
        for i in 0..a.m {
            for &(col, v) in &a.outliers[a.row_outliers[i]..a.row_outliers[i + 1]] {
                let col = col as usize;
                let at = col.saturating_sub(3);
                let up = _mm_cvtsi32_si128(8 * (3 - (col - at)) as i32);
                let vv = _mm256_set1_ps(v);
                let y = yt.add(i * n);
                for c in (0..rows8).step_by(8) {
                    let row = w.q.as_ptr().add((n0 + c) * kp + at);
                    let q = _mm256_srai_epi32::<24>(_mm256_sll_epi32(_mm256_i32gather_epi32::<1>(row as *const i32, offs), up));
                    let wv = _mm256_mul_ps(_mm256_loadu_ps(w.scale.as_ptr().add(n0 + c)), _mm256_cvtepi32_ps(q));
                    _mm256_storeu_ps(y.add(c), _mm256_add_ps(_mm256_loadu_ps(y.add(c)), _mm256_mul_ps(vv, wv)));
                }
            }
        }
        super::outliers_from(a, w, n0, rows8, rows, yt, n);
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemm(w: &I8Strip, m: usize, n: usize, y: *mut f32, ldy: usize) {
        let (x, kp) = (w.xq0, w.kp);
        if m == 1 {
            tiled_driver!(tile, 1, 4, x, m, kp, w, n, y, ldy)
        } else {
            tiled_driver!(tile, 4, 2, x, m, kp, w, n, y, ldy)
        }
    }

    /// With 32 registers: 4 x 4 tiles (16 accumulators) for batches.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn gemm_vnni(w: &I8Strip, m: usize, n: usize, y: *mut f32, ldy: usize) {
        let (x, kp) = (w.xq0, w.kp);
        if m == 1 {
            tiled_driver!(tile_vnni, 1, 4, x, m, kp, w, n, y, ldy)
        } else {
            tiled_driver!(tile_vnni, 4, 4, x, m, kp, w, n, y, ldy)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn activations_quantized_on_the_pool_equal_the_serial_ones() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let pool = ThreadPool::new(3);
        let (mut serial, mut pooled) = (QuantActs::new(), QuantActs::new());
        for &(m, k, kp) in &[(1usize, 576usize, 576usize), (2, 64, 64), (17, 576, 576), (5, 40, 64), (64, 1536, 1536)] {
            let mut x = rand_vec(&mut rng, m * k);
            // Outliers: none in row 0, one in some rows, several in others.
            for i in 1..m {
                for o in 0..i % 4 {
                    x[i * k + (i * 13 + o * 7) % k] = 30.0 + o as f32;
                }
            }
            serial.quantize(&x, k, kp);
            // A second call with other data must not leave anything of the first behind.
            pooled.quantize_on(&pool, &rand_vec(&mut rng, (m + 3) * k), k, kp);
            pooled.quantize_on(&pool, &x, k, kp);
            assert_eq!((pooled.m, pooled.kp), (serial.m, serial.kp));
            assert_eq!(pooled.xq, serial.xq, "m={m} k={k}");
            assert_eq!(pooled.sx, serial.sx);
            assert_eq!(pooled.outliers, serial.outliers);
            assert_eq!(pooled.row_outliers, serial.row_outliers);
            if m > 2 && k >= 576 {
                // Long rows: every planted value is far above the limit.
                assert_eq!(serial.outliers.len(), (1..m).map(|i| i % 4).sum::<usize>());
            }
        }
    }

    /// The definition, written plainly: RMS by a serial f64 sum, outliers above
    /// `OUTLIER_RATIO · rms` out (0 in their group), each group's `amax / 127` scale by a
    /// serial maximum and its codes rounded to even, NaN to 0.
    fn quantize_token_reference(row: &[f32], kp: usize) -> (Vec<i8>, Vec<f32>, Vec<(u32, f32)>) {
        let rms = (row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / row.len() as f64).sqrt() as f32;
        let limit = OUTLIER_RATIO * rms;
        let (mut xq, mut sx, mut outs) = (vec![0i8; kp], vec![0f32; kp / I8_ALIGN], Vec::new());
        for (g, src) in row.chunks(I8_ALIGN).enumerate() {
            let vals: Vec<f32> = src.iter().enumerate().map(|(j, &v)| if v.abs() > limit { outs.push(((g * I8_ALIGN + j) as u32, v)); 0.0 } else { v }).collect();
            let amax = vals.iter().fold(0f32, |a, &v| a.max(v.abs()));
            sx[g] = if amax.is_finite() { amax / 127.0 } else { f32::NAN };
            if amax == 0.0 || !amax.is_finite() {
                continue;
            }
            for (j, &v) in vals.iter().enumerate() {
                let r = (v * (127.0 / amax)).clamp(-127.0, 127.0).round_ties_even();
                xq[g * I8_ALIGN + j] = if r.is_nan() { 0 } else { r as i8 };
            }
        }
        (xq, sx, outs)
    }

    #[test]
    fn activation_quantization_matches_its_definition_on_every_path() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        for &k in &[1usize, 7, 31, 32, 33, 100, 576, 1536] {
            let kp = k.div_ceil(I8_ALIGN) * I8_ALIGN;
            let mut rows = vec![rand_vec(&mut rng, k), vec![0.0; k]];
            let mut big = rand_vec(&mut rng, k);
            // Outliers, one group with two of them, and halfway values (ties).
            for (j, v) in [(0usize, 50.0f32), (k / 2, -60.0), (k / 2 + 1, 45.0), (k - 1, 70.0)] {
                big[j.min(k - 1)] = v;
            }
            rows.push(big);
            let mut ties: Vec<f32> = (0..k).map(|j| (j % 255) as f32 - 127.0 + 0.5).collect();
            ties[0] = 127.0;
            rows.push(ties);
            let mut nan = rand_vec(&mut rng, k);
            nan[k / 3] = f32::NAN;
            rows.push(nan);
            for row in &rows {
                let (xq_ref, sx_ref, out_ref) = quantize_token_reference(row, kp);
                let mut acts = QuantActs::new();
                acts.quantize(row, k, kp);
                // The portable body alone (on AVX2 machines the dispatch takes the other copy).
                let (mut xq, mut sx, mut outs) = (vec![0i8; kp], vec![0f32; kp / I8_ALIGN], Vec::new());
                quantize_token_body(row, &mut xq, &mut sx, &mut outs);
                let nan_row = row.iter().any(|v| v.is_nan());
                for (name, (xq, sx, outs)) in [("dispatch", (acts.xq, acts.sx, acts.outliers)), ("portable", (xq, sx, outs))] {
                    assert_eq!(xq, xq_ref, "{name} k={k}");
                    assert_eq!(sx.iter().map(|s| s.to_bits()).collect::<Vec<_>>(), sx_ref.iter().map(|s| s.to_bits()).collect::<Vec<_>>(), "{name} k={k}");
                    if nan_row {
                        // NaN never equals itself: compare the outliers by their bits.
                        assert_eq!(outs.iter().map(|&(c, v)| (c, v.to_bits())).collect::<Vec<_>>(), out_ref.iter().map(|&(c, v)| (c, v.to_bits())).collect::<Vec<_>>());
                    } else {
                        assert_eq!(outs, out_ref, "{name} k={k}");
                    }
                }
            }
        }
    }

    #[test]
    fn e4m3_codes_round_trip_and_round_to_nearest() {
        let lut = e4m3_table();
        for b in 0..=255u8 {
            if b & 0x7f == 0x7f {
                assert!(lut[b as usize].is_nan());
                continue;
            }
            let back = f32_to_e4m3(lut[b as usize]);
            // -0 and +0 are both zero.
            assert!(back == b || (b & 0x7f == 0 && back & 0x7f == 0), "code {b:#x} -> {} -> {back:#x}", lut[b as usize]);
        }
        assert_eq!(lut[0x7e], 448.0);
        assert_eq!(lut[0x01], 2f32.powi(-9));
        assert_eq!(lut[0x08], 2f32.powi(-6));
        let finite: Vec<f32> = (0..=0x7eu8).map(|b| lut[b as usize]).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for i in 0..20000 {
            let v = if i % 2 == 0 { rng.random_range(-500.0f32..500.0) } else { rng.random_range(-0.03f32..0.03) };
            let got = lut[f32_to_e4m3(v) as usize];
            let best = finite.iter().map(|&c| (c - v.abs()).abs()).fold(f32::MAX, f32::min);
            assert!((got.abs() - v.abs()).abs() <= best, "{v}: got {got}, nearest is {best} away");
            assert!(got == 0.0 || got.signum() == v.signum());
        }
        // Ties go to the even mantissa: 1.0625 lies between 1.0 (m=0) and 1.125 (m=1).
        assert_eq!(lut[f32_to_e4m3(1.0625) as usize], 1.0);
        assert_eq!(lut[f32_to_e4m3(1.1875) as usize], 1.25);
        assert_eq!(f32_to_e4m3(1e9), 0x7e);
        assert_eq!(f32_to_e4m3(-1e9), 0xfe);
    }

    #[test]
    fn int8_rows_quantize_symmetrically_within_half_a_step() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        for k in [1usize, 31, 32, 33, 576] {
            let row = rand_vec(&mut rng, k);
            let mut q = vec![0i8; k];
            let s = quantize_row(&row, &mut q);
            let amax = row.iter().fold(0f32, |a, &v| a.max(v.abs()));
            assert_eq!(q.iter().map(|c| c.unsigned_abs()).max().unwrap(), 127, "amax maps to 127");
            for (&v, &c) in row.iter().zip(&q) {
                assert!((v - s * c as f32).abs() <= s * 0.5 + amax * 1e-6, "k={k}: {v} vs {}", s * c as f32);
            }
        }
        let mut q = vec![0i8; 7];
        assert_eq!(quantize_row(&[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -127.0], &mut q), 1.0);
        assert_eq!(q, [127, 0, 2, 2, 0, -2, -127], "ties go to even");
        let mut q = vec![5i8; 4];
        assert_eq!(quantize_row(&[0.0; 4], &mut q), 0.0);
        assert_eq!(q, [0; 4]);
    }

    /// Every INT8 path against a scalar reference of the same arithmetic (exact group dot
    /// products, f32 FMAs per lane, the fixed lane tree), on the issue's odd shapes: the
    /// paths agree bitwise; and the product stays near the float product.
    #[test]
    fn every_int8_path_matches_the_scalar_reference_on_odd_shapes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let pool = ThreadPool::new(2);
        let shapes = [(1usize, 576usize, 49152usize), (3, 576, 1536), (17, 1536, 576), (128, 576, 192), (1, 1536, 576), (5, 13, 9), (2, 33, 70)];
        for &(m, k, n) in &shapes {
            let w = I8Weight::quantize(&rand_vec(&mut rng, n * k), n, k);
            let mut x = rand_vec(&mut rng, m * k);
            // A massive activation in some rows: it must go the f32 way.
            if k >= 64 {
                for i in (0..m).step_by(2) {
                    x[i * k + (i * 7) % k] = 40.0;
                }
            }
            let kp = w.kp;
            let mut acts = QuantActs::new();
            acts.quantize(&x, k, kp);
            let (xq, sx) = (&acts.xq, &acts.sx);
            let mut want = vec![0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    let mut lanes = [0f32; 8];
                    for g in 0..kp / 32 {
                        for (l, lane) in lanes.iter_mut().enumerate() {
                            let d: i32 = (0..4).map(|q| xq[i * kp + g * 32 + 4 * l + q] as i32 * w.q[j * kp + g * 32 + 4 * l + q] as i32).sum();
                            *lane = (d as f32).mul_add(sx[i * kp / 32 + g], *lane);
                        }
                    }
                    want[i * n + j] = lane_sum(lanes) * w.scale[j];
                    for &(col, v) in &acts.outliers[acts.row_outliers[i]..acts.row_outliers[i + 1]] {
                        want[i * n + j] += v * (w.scale[j] * w.q[j * kp + col as usize] as f32);
                    }
                }
            }
            if k >= 64 {
                assert_eq!(acts.outliers.len(), m.div_ceil(2), "one outlier in every other row");
            }
            for kern in I8Kernel::available() {
                let mut y = vec![f32::NAN; m * n];
                gemm_i8(kern, &pool, &acts, &w, n, &mut y);
                assert_eq!(y, want, "{kern:?} m={m} k={k} n={n}");
            }
            let mut deq = vec![0f32; n * k];
            w.dequant_rows(0, k, &mut deq);
            for i in [0, m - 1] {
                for j in [0, n / 2, n - 1] {
                    let exact: f32 = (0..k).map(|p| x[i * k + p] * deq[j * k + p]).sum();
                    let tol = 0.01 * (k as f32).sqrt();
                    assert!((want[i * n + j] - exact).abs() < tol, "m={m} k={k}: {} vs {exact}", want[i * n + j]);
                }
            }
        }
    }
}
