//! Weights quantized at load (`--quantize int8|fp8`) and the INT8 activations.
//!
//! - INT8: symmetric per output channel (`w ≈ s_n · q`, q in -127..=127, [`quantize_row`]),
//!   rows padded with zeros to a multiple of 32, stored and multiplied as the `I8` format of
//!   [`super::act8`]. Activations are quantized per token on the fly, in groups of 32 with
//!   a scale each, their outliers kept in f32 ([`QuantActs`]); each group's dot product is
//!   exact integer arithmetic, and every instruction-set path sums the groups in the same
//!   order, so they give the same bits, and a row's output never depends on the batch it
//!   is in.
//! - FP8: OCP E4M3 codes with one f32 scale per output channel (`w ≈ s_n · e4m3(q)`,
//!   amax mapped to 448), the layout cuBLASLt takes. On CPU the codes are widened in
//!   registers (E4M3 → f16 bits → F16C) and multiplied in f32 with f32 activations.
//!
//! ```text
//!   x[m, K] f32 ──per token──▶ xq[m, Kp] i8, s_x[m, Kp/32], outliers (m, col, f32)
//!   W[N, K]     ──at load───▶ wq[N, Kp] i8, s_w[N]
//!   y[m, n] = s_w[n] · Σ_g s_x[m, g] · (xq[m, g] · wq[n, g])  +  Σ_outliers x · s_w[n] · wq[n, col]
//! ```

use super::matmul::Kernel;
use super::SyncPtr;
use crate::threadpool::ThreadPool;

/// INT8 rows are padded to this many columns (one AVX2 register of bytes).
pub const I8_ALIGN: usize = 32;

/// `f` folded over `row` in eight lanes (lane l takes elements l, l + 8, ..., in order):
/// eight independent chains where a serial fold has one, which the compiler turns into
/// vector operations; the caller combines the lanes in a fixed order.
#[inline(always)]
pub(crate) fn fold_lanes<T: Copy>(row: &[f32], init: T, f: impl Fn(T, f32) -> T) -> [T; 8] {
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

/// The INT8 instruction-set path for an f32 [`Kernel`] choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum I8Kernel {
    /// AVX-512 VNNI: `vpdpbusd` (four u8 x i8 products added into each 32-bit lane in one
    /// instruction) on the 16-column panels of [`super::act8`]; signed weights are flipped
    /// to unsigned (`w ^ 0x80 = w + 128`) and the lane starts at `-128 · Σx` of the
    /// group's activation codes, which keeps the integer dot product exact.
    #[cfg(target_arch = "x86_64")]
    Vnni,
    /// `vpmaddubsw` and `vpmaddwd` into 32-bit lanes, eight columns of a panel at a time,
    /// then the same FMAs per group.
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
}
