//! `--quantize act8`: the checkpoint's 4-bit GGUF blocks kept as they are, activations
//! quantized to INT8 on the fly, and integer dot products per block: llama.cpp's
//! arithmetic for a decode step, which reads 20 bytes per 32 weights of Q4_1 instead of
//! the 36 of per-channel INT8.
//!
//! Q4_1 layers stay Q4_1; every other layer (Q8_0, Q4_0, Q5_0, K-quants, f32) becomes
//! Q8_0 blocks (`d = amax / 127` in f16, codes `round(w / d)`), the format llama.cpp
//! pairs with its INT8 activations too. Activations are [`QuantActs`]: per token, groups
//! of 32 with a scale each, outliers apart in f32 (as for `--quantize int8`).
//!
//! ```text
//!   Q4_1 block j, group g:  w = d·q + m (q in 0..16)    Q8_0:  w = d·q (q in -127..=127)
//!   y[i, j] = Σ_g (s_x[i,g]·d[j,g]) · (xq[i,g] · q[j,g])  +  Σ_g m[j,g] · (s_x[i,g] · Σ xq[i,g])
//!             + Σ_outliers x · w[j, col]
//! ```
//!
//! Each group's integer dot product is exact; the groups are summed in f32 in eight lanes
//! (lane l holds codes 4l..4l+3) with one FMA each, the Q4_1 offsets in one scalar FMA
//! chain, in the same order on every instruction-set path, so the paths agree bitwise.

use std::cell::RefCell;

use half::f16;

use super::matmul::Weight;
use super::quant::{I8Kernel, QuantActs, I8_ALIGN};
use crate::threadpool::ThreadPool;

/// The block formats the INT8-activation kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum A8Format {
    /// `{d: f16, m: f16, qs: [u8; 16]}` (low nibbles: codes 0..16, high: 16..32).
    Q4_1,
    /// `{d: f16, qs: [i8; 32]}`.
    Q8_0,
}

impl A8Format {
    pub const fn block_bytes(self) -> usize {
        match self {
            A8Format::Q4_1 => 20,
            A8Format::Q8_0 => 34,
        }
    }

    /// Element `e` (0..32) of the block at `blk` as f32 (`d·q + m`, `d·q`); `half` widens
    /// an f16 (every way is exact, so the paths agree bitwise).
    ///
    /// # Safety
    /// `blk` points to a whole block of this format.
    #[inline(always)]
    unsafe fn value(self, blk: *const u8, e: usize, half: impl Fn(*const u8) -> f32) -> f32 {
        match self {
            A8Format::Q4_1 => half(blk) * q4_1_code(blk.add(4), e) as f32 + half(blk.add(2)),
            A8Format::Q8_0 => half(blk) * q8_0_code(blk.add(2), e) as f32,
        }
    }
}

/// Code `e` (0..32) of a Q4_1 block's nibbles starting at `q`: low nibbles, then high.
#[inline(always)]
unsafe fn q4_1_code(q: *const u8, e: usize) -> i32 {
    if e < 16 {
        (*q.add(e) & 0x0f) as i32
    } else {
        (*q.add(e - 16) >> 4) as i32
    }
}

/// Code `e` of a Q8_0 block's codes starting at `q`.
#[inline(always)]
unsafe fn q8_0_code(q: *const u8, e: usize) -> i32 {
    *q.add(e) as i8 as i32
}

/// Weights `[N, K]` in a block format, for INT8 activations. K is a multiple of 32.
#[derive(Debug, Clone)]
pub struct A8Weight {
    pub format: A8Format,
    pub blocks: Vec<u8>,
}

impl A8Weight {
    /// `w` as it will be read with INT8 activations: Q4_1 as it is, anything else as Q8_0
    /// (dequantized first). `None` when K is not a multiple of 32.
    pub fn from_weight(w: &Weight, n: usize, k: usize) -> Option<A8Weight> {
        if !k.is_multiple_of(I8_ALIGN) {
            return None;
        }
        if let Weight::Q4_1(b) = w {
            return Some(A8Weight { format: A8Format::Q4_1, blocks: b.clone() });
        }
        let mut dense = vec![0f32; n * k];
        w.dequant_rows(0, k, &mut dense);
        Some(A8Weight { format: A8Format::Q8_0, blocks: quantize_q8_0(&dense) })
    }

    pub fn row_bytes(&self, k: usize) -> usize {
        k / I8_ALIGN * self.format.block_bytes()
    }

    /// Element `col` of row `j`, as f32 (what an outlier activation multiplies).
    fn at(&self, k: usize, j: usize, col: usize) -> f32 {
        let start = j * self.row_bytes(k) + col / 32 * self.format.block_bytes();
        let blk = &self.blocks[start..start + self.format.block_bytes()];
        // SAFETY: `blk` is one whole block of this format.
        unsafe { self.format.value(blk.as_ptr(), col % 32, |p| f16_at(p)) }
    }

    /// Rows `n0 .. n0 + out.len() / k` as f32.
    pub fn dequant_rows(&self, n0: usize, k: usize, out: &mut [f32]) {
        for (r, row) in out.chunks_exact_mut(k).enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = self.at(k, n0 + r, c);
            }
        }
    }
}

/// GGUF Q8_0 of rows whose length is a multiple of 32: per block `d = amax / 127` stored
/// as f16, codes `round(w / d)` (as llama.cpp's reference quantizer).
pub fn quantize_q8_0(w: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(w.len() / 32 * 34);
    for blk in w.chunks_exact(32) {
        let amax = blk.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(blk.iter().map(|&v| ((v * id).round() as i32).clamp(-127, 127) as i8 as u8));
    }
    out
}

thread_local! {
    static ACTS: RefCell<(QuantActs, Vec<f32>)> = const { RefCell::new((QuantActs::new(), Vec::new())) };
}

/// `y[m, N] = x[m, K] · Wᵀ` with W in blocks and x quantized per token and group.
pub fn matmul_a8(kern: I8Kernel, pool: &ThreadPool, x: &[f32], k: usize, w: &A8Weight, n: usize, y: &mut [f32]) {
    with_acts(pool, x, k, |acts, sums| gemm_a8(kern, pool, acts, sums, w, n, y))
}

/// `f` on `x[m, k]` quantized (on `pool`), with its [`group_sums`] (per-thread buffers).
pub fn with_acts<R>(pool: &ThreadPool, x: &[f32], k: usize, f: impl FnOnce(&QuantActs, &[f32]) -> R) -> R {
    ACTS.with(|a| {
        let (acts, sums) = &mut *a.borrow_mut();
        acts.quantize_on(pool, x, k, k);
        group_sums(acts, sums);
        f(acts, sums)
    })
}

/// `s_x[i, g] · Σ xq[i, g]` for every row and group (the Q4_1 offsets multiply it).
pub fn group_sums(a: &QuantActs, out: &mut Vec<f32>) {
    out.clear();
    for (codes, &s) in a.xq.chunks_exact(32).zip(&a.sx) {
        out.push(s * codes.iter().map(|&c| c as i32).sum::<i32>() as f32);
    }
}

/// The GEMM (see the module doc); `sums` from [`group_sums`].
pub fn gemm_a8(kern: I8Kernel, pool: &ThreadPool, a: &QuantActs, sums: &[f32], w: &A8Weight, n: usize, y: &mut [f32]) {
    assert_eq!(y.len(), a.m * n);
    assert_eq!(w.blocks.len(), n * w.row_bytes(a.kp));
    if a.m == 0 {
        return;
    }
    // SAFETY: each task writes only its own columns.
    super::matmul::par_cols(pool, a.m, n, y, &|n0, rows, y| unsafe { gemm_a8_cols(kern, (a, sums), w, n, n0, rows, y) });
}

/// Columns `n0 .. n0 + rows` of `y[m, n]` (one pool task of [`gemm_a8`]).
///
/// # Safety
/// `y` holds `m` rows of `n`; nothing else writes these columns meanwhile.
pub(crate) unsafe fn gemm_a8_cols(kern: I8Kernel, (a, sums): (&QuantActs, &[f32]), w: &A8Weight, n: usize, n0: usize, rows: usize, y: *mut f32) {
    let (m, kp) = (a.m, a.kp);
    let rb = w.row_bytes(kp);
    let strip = A8Strip { w: w.blocks[n0 * rb..].as_ptr(), rb, xq0: a.xq.as_ptr(), sx: a.sx.as_ptr(), xs: sums.as_ptr(), kp };
    // xq holds m rows of kp codes, sx and xs their per-group values, the strip `rows` block rows.
    let yt = y.add(n0);
    match (kern, w.format) {
        #[cfg(target_arch = "x86_64")]
        (I8Kernel::Vnni, A8Format::Q4_1) => x86::gemm_q4_1_vnni(&strip, m, rows, yt, n),
        #[cfg(target_arch = "x86_64")]
        (I8Kernel::Vnni, A8Format::Q8_0) => x86::gemm_q8_0_vnni(&strip, m, rows, yt, n),
        #[cfg(target_arch = "x86_64")]
        (I8Kernel::Avx2, A8Format::Q4_1) => x86::gemm_q4_1(&strip, m, rows, yt, n),
        #[cfg(target_arch = "x86_64")]
        (I8Kernel::Avx2, A8Format::Q8_0) => x86::gemm_q8_0(&strip, m, rows, yt, n),
        (I8Kernel::Portable, A8Format::Q4_1) => portable::gemm_q4_1(&strip, m, rows, yt, n),
        (I8Kernel::Portable, A8Format::Q8_0) => portable::gemm_q8_0(&strip, m, rows, yt, n),
    }
    let out = Outliers { a, w: &strip, format: w.format, rows, y: yt, ldy: n };
    match kern {
        #[cfg(target_arch = "x86_64")]
        I8Kernel::Avx2 | I8Kernel::Vnni => x86::outliers(&out),
        I8Kernel::Portable => out.add(|p| f16_at(p)),
    }
}

/// The f32 side of the outlier activations of a strip: `y[i, c] += x · w[c, col]`, in the
/// order found, `w` as [`A8Weight::at`] computes it.
struct Outliers<'a> {
    a: &'a QuantActs,
    w: &'a A8Strip,
    format: A8Format,
    rows: usize,
    y: *mut f32,
    ldy: usize,
}

impl Outliers<'_> {
    /// `half` widens an f16, as for [`A8Format::value`].
    #[inline(always)]
    unsafe fn add(&self, half: impl Fn(*const u8) -> f32) {
        let bb = self.format.block_bytes();
        for i in 0..self.a.m {
            for &(col, v) in self.of_row(i) {
                let (g, e) = (col as usize / 32, col as usize % 32);
                for c in 0..self.rows {
                    let wv = self.format.value(self.w.w.add(c * self.w.rb + g * bb), e, &half);
                    *self.y.add(i * self.ldy + c) += v * wv;
                }
            }
        }
    }

    fn of_row(&self, i: usize) -> &[(u32, f32)] {
        &self.a.outliers[self.a.row_outliers[i]..self.a.row_outliers[i + 1]]
    }
}

/// What a tile reads: a strip of block rows (`rb` bytes apart) and the activations.
pub struct A8Strip {
    pub w: *const u8,
    pub rb: usize,
    pub xq0: *const i8,
    pub sx: *const f32,
    pub xs: *const f32,
    pub kp: usize,
}

impl A8Strip {
    /// Group scales and group sums of the activation row that starts at `x`.
    #[inline(always)]
    unsafe fn row(&self, x: *const i8) -> (*const f32, *const f32) {
        let row = (x.offset_from(self.xq0) as usize) / self.kp;
        let g = row * (self.kp / 32);
        (self.sx.add(g), self.xs.add(g))
    }
}

#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    f16::from_le_bytes([*p, *p.add(1)]).to_f32()
}

#[allow(clippy::needless_range_loop)]
mod portable {
    use std::borrow::Borrow;

    use super::super::quant::lane_sum;
    use super::{f16_at, q4_1_code, q8_0_code, A8Strip};

    /// Code `e` (0..32) of a block's codes starting at `q`.
    type Code = unsafe fn(*const u8, usize) -> i32;

    #[inline(always)]
    unsafe fn tile_fmt<const MR: usize, const NR: usize>(x: *const i8, kp: usize, w: &A8Strip, c0: usize, y: *mut f32, ldy: usize, q41: bool) {
        let (bb, qoff, code): (usize, usize, Code) = if q41 { (20, 4, q4_1_code) } else { (34, 2, q8_0_code) };
        let mut acc = [[[0f32; 8]; NR]; MR];
        let mut accm = [[0f32; NR]; MR];
        let rows: [(*const f32, *const f32); MR] = std::array::from_fn(|r| w.row(x.add(r * kp)));
        for g in 0..kp / 32 {
            for c in 0..NR {
                let blk = w.w.add((c0 + c) * w.rb + g * bb);
                let d = f16_at(blk);
                let q = blk.add(qoff);
                for r in 0..MR {
                    let xr = x.add(r * kp + g * 32);
                    let s = *rows[r].0.add(g) * d;
                    for l in 0..8 {
                        let mut dot = 0i32;
                        for e in 4 * l..4 * l + 4 {
                            dot += code(q, e) * *xr.add(e) as i32;
                        }
                        acc[r][c][l] = (dot as f32).mul_add(s, acc[r][c][l]);
                    }
                    if q41 {
                        accm[r][c] = f16_at(blk.add(2)).mul_add(*rows[r].1.add(g), accm[r][c]);
                    }
                }
            }
        }
        for r in 0..MR {
            for c in 0..NR {
                *y.add(r * ldy + c) = lane_sum(acc[r][c]) + accm[r][c];
            }
        }
    }

    unsafe fn tile_q4_1<const MR: usize, const NR: usize, S: Borrow<A8Strip>>(x: *const i8, kp: usize, w: &S, c0: usize, y: *mut f32, ldy: usize) {
        tile_fmt::<MR, NR>(x, kp, w.borrow(), c0, y, ldy, true)
    }

    unsafe fn tile_q8_0<const MR: usize, const NR: usize, S: Borrow<A8Strip>>(x: *const i8, kp: usize, w: &S, c0: usize, y: *mut f32, ldy: usize) {
        tile_fmt::<MR, NR>(x, kp, w.borrow(), c0, y, ldy, false)
    }

    pub unsafe fn gemm_q4_1(w: &A8Strip, m: usize, n: usize, y: *mut f32, ldy: usize) {
        let (x, kp) = (w.xq0, w.kp);
        tiled_driver!(tile_q4_1, 2, 4, x, m, kp, w, n, y, ldy)
    }

    pub unsafe fn gemm_q8_0(w: &A8Strip, m: usize, n: usize, y: *mut f32, ldy: usize) {
        let (x, kp) = (w.xq0, w.kp);
        tiled_driver!(tile_q8_0, 2, 4, x, m, kp, w, n, y, ldy)
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;
    use std::borrow::Borrow;

    use super::super::quant::lane_sum;
    use super::super::quant::x86::{dot_ss, dot_us, prep_w, prep_x};
    use super::A8Strip;

    /// (d, m) of a block: its first four bytes as two f16, widened by F16C.
    #[inline(always)]
    unsafe fn dm(blk: *const u8) -> (f32, f32) {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps::<1>(v, v)))
    }

    /// Q4_1: the 32 nibbles as bytes in code order (low nibbles, then high), unsigned,
    /// against the signed activation codes ([`dot_us`]: `vpmaddubsw` + `vpmaddwd`; VNNI
    /// machines take [`tile_q4_1_vnni`]); one FMA each with `s_x · d`; the offset `m` in a
    /// scalar FMA with the group sum.
    #[inline(always)]
    unsafe fn tile_q4_1_on<const MR: usize, const NR: usize>(x: *const i8, kp: usize, w: &A8Strip, c0: usize, y: *mut f32, ldy: usize) {
        const { assert!(NR <= 4, "the offsets of a tile's columns share one 4-lane register") };
        let low = _mm_set1_epi8(0x0f);
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        // Lane c: the offset FMA chain of column c (lanes past NR stay 0).
        let mut accm = [_mm_setzero_ps(); MR];
        let rows: [(*const f32, *const f32); MR] = std::array::from_fn(|r| w.row(x.add(r * kp)));
        let pf = w.w.wrapping_add((c0 + NR) * w.rb);
        for g in 0..kp / 32 {
            for l in 0..(NR * 20).div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(g * 20 * NR + l * 64) as *const i8);
            }
            let mut wv = [_mm256_setzero_si256(); NR];
            let mut dv = [_mm256_setzero_ps(); NR];
            let mut mv = [0f32; 4];
            for c in 0..NR {
                let blk = w.w.add((c0 + c) * w.rb + g * 20);
                let (d, m) = dm(blk);
                (dv[c], mv[c]) = (_mm256_set1_ps(d), m);
                let q = _mm_loadu_si128(blk.add(4) as *const __m128i);
                let lo = _mm_and_si128(q, low);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), low);
                wv[c] = _mm256_set_m128i(hi, lo);
            }
            let mv = _mm_loadu_ps(mv.as_ptr());
            for r in 0..MR {
                let xv = _mm256_loadu_si256(x.add(r * kp + g * 32) as *const __m256i);
                let (sx, xs) = (_mm256_set1_ps(*rows[r].0.add(g)), *rows[r].1.add(g));
                for c in 0..NR {
                    // s_x · d as a vector multiply: the same rounding as the scalar one.
                    let dot = _mm256_cvtepi32_ps(dot_us::<false>(wv[c], xv));
                    acc[r][c] = _mm256_fmadd_ps(dot, _mm256_mul_ps(sx, dv[c]), acc[r][c]);
                }
                accm[r] = _mm_fmadd_ps(mv, _mm_set1_ps(xs), accm[r]);
            }
        }
        for r in 0..MR {
            let mut m = [0f32; 4];
            _mm_storeu_ps(m.as_mut_ptr(), accm[r]);
            for c in 0..NR {
                let mut a = [0f32; 8];
                _mm256_storeu_ps(a.as_mut_ptr(), acc[r][c]);
                *y.add(r * ldy + c) = lane_sum(a) + m[c];
            }
        }
    }

    /// Q8_0: signed codes by signed codes ([`dot_ss`]), as the INT8 kernel.
    #[inline(always)]
    unsafe fn tile_q8_0_on<const MR: usize, const NR: usize>(x: *const i8, kp: usize, w: &A8Strip, c0: usize, y: *mut f32, ldy: usize) {
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let rows: [(*const f32, *const f32); MR] = std::array::from_fn(|r| w.row(x.add(r * kp)));
        let pf = w.w.wrapping_add((c0 + NR) * w.rb);
        for g in 0..kp / 32 {
            for l in 0..(NR * 34).div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(g * 34 * NR + l * 64) as *const i8);
            }
            let mut wv = [_mm256_setzero_si256(); NR];
            let mut dv = [_mm256_setzero_ps(); NR];
            for c in 0..NR {
                let blk = w.w.add((c0 + c) * w.rb + g * 34);
                dv[c] = _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const u16).read_unaligned() as i32))));
                wv[c] = prep_w::<false>(_mm256_loadu_si256(blk.add(2) as *const __m256i));
            }
            for r in 0..MR {
                let xv = prep_x::<false>(_mm256_loadu_si256(x.add(r * kp + g * 32) as *const __m256i));
                let sx = _mm256_set1_ps(*rows[r].0.add(g));
                for c in 0..NR {
                    let dot = _mm256_cvtepi32_ps(dot_ss::<false>(wv[c], xv));
                    acc[r][c] = _mm256_fmadd_ps(dot, _mm256_mul_ps(sx, dv[c]), acc[r][c]);
                }
            }
        }
        for r in 0..MR {
            for c in 0..NR {
                let mut a = [0f32; 8];
                _mm256_storeu_ps(a.as_mut_ptr(), acc[r][c]);
                *y.add(r * ldy + c) = lane_sum(a);
            }
        }
    }

    #[inline(always)]
    unsafe fn tile_q4_1<const MR: usize, const NR: usize, S: Borrow<A8Strip>>(x: *const i8, kp: usize, w: &S, c0: usize, y: *mut f32, ldy: usize) {
        tile_q4_1_on::<MR, NR>(x, kp, w.borrow(), c0, y, ldy)
    }

    #[inline(always)]
    unsafe fn tile_q8_0<const MR: usize, const NR: usize, S: Borrow<A8Strip>>(x: *const i8, kp: usize, w: &S, c0: usize, y: *mut f32, ldy: usize) {
        tile_q8_0_on::<MR, NR>(x, kp, w.borrow(), c0, y, ldy)
    }

    /// The column pairs of a tile of `NR <= 4` columns: pair `p` holds columns `2p` and
    /// `2p + 1` (the last column twice where `NR` is odd; its second copy is dropped).
    #[inline(always)]
    fn pair<const NR: usize>(p: usize) -> (usize, usize) {
        (2 * p, (2 * p + 1).min(NR - 1))
    }

    /// Two f32 values as a 512-bit register: `a` in lanes 0..8, `b` in lanes 8..16.
    #[inline(always)]
    unsafe fn halves(a: f32, b: f32) -> __m512 {
        _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(a), _mm512_set1_ps(b))
    }

    /// The 32 activation codes of a group in both halves of a 512-bit register.
    #[inline(always)]
    unsafe fn codes_twice(x: *const i8) -> __m512i {
        _mm512_broadcast_i64x4(_mm256_loadu_si256(x as *const __m256i))
    }

    /// Writes a tile's sums: pair `p`'s lanes 0..8 are column `2p`, 8..16 column `2p + 1`,
    /// each summed as [`lane_sum`] sums eight lanes, plus `m[c]`.
    #[inline(always)]
    unsafe fn store_pairs<const MR: usize, const NR: usize>(acc: &[[__m512; 2]; MR], m: &[[f32; 4]; MR], y: *mut f32, ldy: usize) {
        for r in 0..MR {
            for p in 0..NR.div_ceil(2) {
                let mut a = [0f32; 16];
                _mm512_storeu_ps(a.as_mut_ptr(), acc[r][p]);
                let (ca, cb) = pair::<NR>(p);
                *y.add(r * ldy + ca) = lane_sum(a[..8].try_into().unwrap()) + m[r][ca];
                if cb != ca {
                    *y.add(r * ldy + cb) = lane_sum(a[8..].try_into().unwrap()) + m[r][cb];
                }
            }
        }
    }

    /// One group of a VNNI tile's weights as the tiles use them: per column pair the codes
    /// and `d` ([`halves`]), and the four columns' offsets `m` (Q4_1; zero for Q8_0).
    #[derive(Clone, Copy)]
    struct GroupW {
        wv: [__m512i; 2],
        dv: [__m512; 2],
        mv: __m128,
    }

    /// Where a VNNI tile gets group `g` of its columns' weights.
    trait GroupSrc {
        unsafe fn group(&self, g: usize) -> GroupW;
    }

    /// Prepared from the blocks when asked (a tile of one to four rows reads each group
    /// once), requesting the next columns' blocks.
    struct Direct<'a, const NR: usize, const Q41: bool> {
        w: &'a A8Strip,
        c0: usize,
    }

    impl<const NR: usize, const Q41: bool> GroupSrc for Direct<'_, NR, Q41> {
        #[inline(always)]
        unsafe fn group(&self, g: usize) -> GroupW {
            let bb = if Q41 { 20 } else { 34 };
            let pf = self.w.w.wrapping_add((self.c0 + NR) * self.w.rb);
            for l in 0..(NR * bb).div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(g * bb * NR + l * 64) as *const i8);
            }
            if Q41 {
                prep_q4_1::<NR>(self.w, self.c0, g)
            } else {
                prep_q8_0::<NR>(self.w, self.c0, g)
            }
        }
    }

    /// Prepared once per column tile for all its row tiles (batches of more than four
    /// rows; a tile's groups take 4.6 KB at K = 576, so they stay in L1).
    struct Packed<'a>(&'a [GroupW]);

    impl GroupSrc for Packed<'_> {
        #[inline(always)]
        unsafe fn group(&self, g: usize) -> GroupW {
            self.0[g]
        }
    }

    /// Q4_1 group `g` of columns `c0 .. c0 + NR`: the nibbles of [q_a, q_a, q_b, q_b]
    /// shifted per 128-bit lane (low, high, low, high), so each half holds one column's 32
    /// codes in code order.
    #[inline(always)]
    unsafe fn prep_q4_1<const NR: usize>(w: &A8Strip, c0: usize, g: usize) -> GroupW {
        const { assert!(NR <= 4, "a tile's offsets share one 4-lane register and its columns two pairs") };
        let (low, shifts) = (_mm512_set1_epi8(0x0f), _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4));
        let mut gw = GroupW { wv: [_mm512_setzero_si512(); 2], dv: [_mm512_setzero_ps(); 2], mv: _mm_setzero_ps() };
        let mut mv = [0f32; 4];
        for p in 0..NR.div_ceil(2) {
            let (ca, cb) = pair::<NR>(p);
            let (ba, bb) = (w.w.add((c0 + ca) * w.rb + g * 20), w.w.add((c0 + cb) * w.rb + g * 20));
            let ((da, ma), (db, mb)) = (dm(ba), dm(bb));
            (mv[ca], mv[cb]) = (ma, mb);
            gw.dv[p] = halves(da, db);
            let q = _mm256_set_m128i(_mm_loadu_si128(bb.add(4) as *const __m128i), _mm_loadu_si128(ba.add(4) as *const __m128i));
            let q = _mm512_shuffle_i64x2::<0b01_01_00_00>(_mm512_castsi256_si512(q), _mm512_castsi256_si512(q));
            gw.wv[p] = _mm512_and_si512(_mm512_srlv_epi64(q, shifts), low);
        }
        gw.mv = _mm_loadu_ps(mv.as_ptr());
        gw
    }

    /// Q8_0 group `g` of columns `c0 .. c0 + NR`: the signed codes flipped to unsigned
    /// (`w + 128`, as [`prep_w`] does for VNNI).
    #[inline(always)]
    unsafe fn prep_q8_0<const NR: usize>(w: &A8Strip, c0: usize, g: usize) -> GroupW {
        const { assert!(NR <= 4, "a tile's columns are two pairs") };
        let mut gw = GroupW { wv: [_mm512_setzero_si512(); 2], dv: [_mm512_setzero_ps(); 2], mv: _mm_setzero_ps() };
        for p in 0..NR.div_ceil(2) {
            let (ca, cb) = pair::<NR>(p);
            let (ba, bb) = (w.w.add((c0 + ca) * w.rb + g * 34), w.w.add((c0 + cb) * w.rb + g * 34));
            gw.dv[p] = halves(dm(ba).0, dm(bb).0);
            let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(_mm256_loadu_si256(ba.add(2) as *const __m256i)), _mm256_loadu_si256(bb.add(2) as *const __m256i));
            gw.wv[p] = _mm512_xor_si512(q, _mm512_set1_epi8(-128));
        }
        gw
    }

    /// [`tile_q4_1_on`] (`Q41`) or [`tile_q8_0_on`] with two columns per 512-bit register
    /// ([`pair`]): each lane sees the operations, in the order, of its lane in the 256-bit
    /// tile (one `vpdpbusd`, the convert, `s_x · d`, one FMA per group; Q4_1's offsets in
    /// one 4-lane FMA chain), so the bits are the same; half the instructions per weight.
    #[inline(always)]
    unsafe fn tile_from<const MR: usize, const NR: usize, const Q41: bool, G: GroupSrc>(x: *const i8, kp: usize, w: &A8Strip, src: &G, y: *mut f32, ldy: usize) {
        let flip = _mm512_set1_epi8(-128);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let mut accm = [_mm_setzero_ps(); MR];
        let rows: [(*const f32, *const f32); MR] = std::array::from_fn(|r| w.row(x.add(r * kp)));
        for g in 0..kp / 32 {
            let gw = src.group(g);
            for r in 0..MR {
                let xv = codes_twice(x.add(r * kp + g * 32));
                // Q4_1 codes are unsigned as they are; Q8_0's were flipped to w + 128, and
                // Σ (w + 128)·x onto -128 · Σx is the exact signed dot product ([`dot_ss`]).
                let base = if Q41 { _mm512_setzero_si512() } else { _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), flip, xv)) };
                let sx = _mm512_set1_ps(*rows[r].0.add(g));
                for p in 0..NR.div_ceil(2) {
                    let dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(base, gw.wv[p], xv));
                    acc[r][p] = _mm512_fmadd_ps(dot, _mm512_mul_ps(sx, gw.dv[p]), acc[r][p]);
                }
                if Q41 {
                    accm[r] = _mm_fmadd_ps(gw.mv, _mm_set1_ps(*rows[r].1.add(g)), accm[r]);
                }
            }
        }
        let m: [[f32; 4]; MR] = std::array::from_fn(|r| {
            let mut m = [0f32; 4];
            _mm_storeu_ps(m.as_mut_ptr(), accm[r]);
            m
        });
        store_pairs::<MR, NR>(&acc, &m, y, ldy);
    }

    #[inline(always)]
    unsafe fn tile_q4_1_vnni<const MR: usize, const NR: usize, S: Borrow<A8Strip>>(x: *const i8, kp: usize, w: &S, c0: usize, y: *mut f32, ldy: usize) {
        let w = w.borrow();
        tile_from::<MR, NR, true, _>(x, kp, w, &Direct::<NR, true> { w, c0 }, y, ldy)
    }

    #[inline(always)]
    unsafe fn tile_q8_0_vnni<const MR: usize, const NR: usize, S: Borrow<A8Strip>>(x: *const i8, kp: usize, w: &S, c0: usize, y: *mut f32, ldy: usize) {
        let w = w.borrow();
        tile_from::<MR, NR, false, _>(x, kp, w, &Direct::<NR, false> { w, c0 }, y, ldy)
    }

    /// Batches of more than four rows: each tile of four columns has its groups prepared
    /// once ([`Packed`]) and every row tile reads them (the direct tiles prepared them once
    /// per four rows: a third of a 16-row GEMM's instructions); columns past a multiple of
    /// four go through the direct tiles.
    #[inline(always)]
    unsafe fn gemm_packed<const Q41: bool>(w: &A8Strip, m: usize, n: usize, y: *mut f32, ldy: usize) {
        let (x, kp) = (w.xq0, w.kp);
        let n4 = n / 4 * 4;
        let mut pack: Vec<GroupW> = Vec::with_capacity(kp / 32);
        for j in (0..n4).step_by(4) {
            let direct = Direct::<4, Q41> { w, c0: j };
            pack.clear();
            // A plain loop: through `extend(map(..))`'s generic calls the preparation was not
            // inlined into this target-feature code and its intrinsics stayed calls (2-3x slower).
            for g in 0..kp / 32 {
                pack.push(direct.group(g));
            }
            let src = Packed(&pack);
            let mut i = 0;
            while i < m {
                let (xi, yi) = (x.add(i * kp), y.add(i * ldy + j));
                let mr = (m - i).min(4);
                match mr {
                    4 => tile_from::<4, 4, Q41, _>(xi, kp, w, &src, yi, ldy),
                    3 => tile_from::<3, 4, Q41, _>(xi, kp, w, &src, yi, ldy),
                    2 => tile_from::<2, 4, Q41, _>(xi, kp, w, &src, yi, ldy),
                    _ => tile_from::<1, 4, Q41, _>(xi, kp, w, &src, yi, ldy),
                }
                i += mr;
            }
        }
        if n4 < n {
            let rest = &A8Strip { w: w.w.add(n4 * w.rb), ..*w };
            let (y, n) = (y.add(n4), n - n4);
            if Q41 {
                tiled_driver!(tile_q4_1_vnni, 4, 4, x, m, kp, rest, n, y, ldy)
            } else {
                tiled_driver!(tile_q8_0_vnni, 4, 4, x, m, kp, rest, n, y, ldy)
            }
        }
    }

    /// The low 16 bits of each lane, as f16, widened.
    #[inline(always)]
    unsafe fn low_halves(v: __m256i) -> __m256 {
        let v = _mm256_and_si256(v, _mm256_set1_epi32(0xffff));
        _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v)))
    }

    /// Column `col` of the strip's weight rows `0 .. rows` into `dst`, eight rows at a
    /// time: each row's block header and code byte gathered (32-bit loads that stay inside
    /// the block), `d·q + m` as a multiply then an add, as [`A8Format::value`] computes
    /// it; the rows past a multiple of eight the scalar way.
    #[inline(always)]
    unsafe fn weight_column(o: &super::Outliers<'_>, col: usize, dst: &mut [f32]) {
        let half = |p: *const u8| _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128((p as *const u16).read_unaligned() as i32)));
        let (w, bb) = (o.w, o.format.block_bytes());
        let q41 = o.format == super::A8Format::Q4_1;
        let rows8 = o.rows / 8 * 8;
        let offs = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(w.rb as i32));
        let (g, e) = (col / 32, col % 32);
        // The code's byte in its block, and a 32-bit load around it that starts inside
        // the block: the byte sits at `p - at` in the loaded lane.
        let p = if q41 { 4 + e % 16 } else { 2 + e };
        let at = p.saturating_sub(3);
        let up = _mm_cvtsi32_si128(8 * (3 - (p - at)) as i32);
        let nib = _mm_cvtsi32_si128(if e < 16 { 0 } else { 4 });
        for c in (0..rows8).step_by(8) {
            let blk = w.w.add(c * w.rb + g * bb);
            let head = _mm256_i32gather_epi32::<1>(blk as *const i32, offs);
            let byte = _mm256_sll_epi32(_mm256_i32gather_epi32::<1>(blk.add(at) as *const i32, offs), up);
            let wv = if q41 {
                let q = _mm256_and_si256(_mm256_srl_epi32(_mm256_srli_epi32::<24>(byte), nib), _mm256_set1_epi32(0x0f));
                _mm256_add_ps(_mm256_mul_ps(low_halves(head), _mm256_cvtepi32_ps(q)), low_halves(_mm256_srli_epi32::<16>(head)))
            } else {
                _mm256_mul_ps(low_halves(head), _mm256_cvtepi32_ps(_mm256_srai_epi32::<24>(byte)))
            };
            _mm256_storeu_ps(dst.as_mut_ptr().add(c), wv);
        }
        for (c, d) in dst.iter_mut().enumerate().take(o.rows).skip(rows8) {
            *d = o.format.value(w.w.add(c * w.rb + g * bb), e, half);
        }
    }

    /// The outliers: each distinct outlier column's weights decoded once
    /// ([`weight_column`]; a batch's tokens put their outliers in the same few channels),
    /// then `y + x·w` over the rows, a multiply then an add, eight at a time, in the
    /// scalar path's order, so the bits are those of [`super::Outliers::add`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn outliers(o: &super::Outliers<'_>) {
        if o.a.outliers.is_empty() {
            return;
        }
        let (rows, rows8) = (o.rows, o.rows / 8 * 8);
        let (mut cols, mut wbuf): (Vec<u32>, Vec<f32>) = (Vec::new(), Vec::new());
        for i in 0..o.a.m {
            for &(col, v) in o.of_row(i) {
                let at = match cols.iter().position(|&c| c == col) {
                    Some(at) => at,
                    None => {
                        cols.push(col);
                        wbuf.resize(cols.len() * rows, 0.0);
                        weight_column(o, col as usize, &mut wbuf[(cols.len() - 1) * rows..]);
                        cols.len() - 1
                    }
                };
                let wc = &wbuf[at * rows..(at + 1) * rows];
                let vv = _mm256_set1_ps(v);
                let y = o.y.add(i * o.ldy);
                for c in (0..rows8).step_by(8) {
                    let yc = y.add(c);
                    _mm256_storeu_ps(yc, _mm256_add_ps(_mm256_loadu_ps(yc), _mm256_mul_ps(vv, _mm256_loadu_ps(wc.as_ptr().add(c)))));
                }
                for c in rows8..rows {
                    *y.add(c) += v * wc[c];
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemm_q4_1(w: &A8Strip, m: usize, n: usize, y: *mut f32, ldy: usize) {
        let (x, kp) = (w.xq0, w.kp);
        if m == 1 {
            tiled_driver!(tile_q4_1, 1, 4, x, m, kp, w, n, y, ldy)
        } else {
            tiled_driver!(tile_q4_1, 4, 2, x, m, kp, w, n, y, ldy)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemm_q8_0(w: &A8Strip, m: usize, n: usize, y: *mut f32, ldy: usize) {
        let (x, kp) = (w.xq0, w.kp);
        if m == 1 {
            tiled_driver!(tile_q8_0, 1, 4, x, m, kp, w, n, y, ldy)
        } else {
            tiled_driver!(tile_q8_0, 4, 2, x, m, kp, w, n, y, ldy)
        }
    }

    /// The VNNI tiles: 4 rows x 2 column pairs; more than four rows through
    /// [`gemm_packed`] (8-row tiles measured no faster: their accumulators spill).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn gemm_q4_1_vnni(w: &A8Strip, m: usize, n: usize, y: *mut f32, ldy: usize) {
        let (x, kp) = (w.xq0, w.kp);
        match m {
            1 => tiled_driver!(tile_q4_1_vnni, 1, 4, x, m, kp, w, n, y, ldy),
            2..=4 => tiled_driver!(tile_q4_1_vnni, 4, 4, x, m, kp, w, n, y, ldy),
            _ => gemm_packed::<true>(w, m, n, y, ldy),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn gemm_q8_0_vnni(w: &A8Strip, m: usize, n: usize, y: *mut f32, ldy: usize) {
        let (x, kp) = (w.xq0, w.kp);
        match m {
            1 => tiled_driver!(tile_q8_0_vnni, 1, 4, x, m, kp, w, n, y, ldy),
            2..=4 => tiled_driver!(tile_q8_0_vnni, 4, 4, x, m, kp, w, n, y, ldy),
            _ => gemm_packed::<false>(w, m, n, y, ldy),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::quant::lane_sum;
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Both formats, every path, against a scalar reference of the same arithmetic (exact
    /// block dot products, FMAs per lane, the fixed lane tree, the offsets' FMA chain), on
    /// the issue's odd shapes with outliers: the paths agree bitwise; the products stay
    /// near the float products of the dequantized weights.
    #[test]
    fn every_act8_path_matches_the_scalar_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let pool = ThreadPool::new(2);
        for &(m, k, n) in &[(1usize, 576usize, 49152usize), (3, 576, 1536), (17, 1536, 576), (128, 576, 192), (5, 64, 9), (2, 32, 70)] {
            let dense: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let q41 = super::super::matmul::quantize_q4_1(&dense);
            for w in [A8Weight { format: A8Format::Q4_1, blocks: q41.clone() }, A8Weight { format: A8Format::Q8_0, blocks: quantize_q8_0(&dense) }] {
                let mut x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                if k >= 64 {
                    // Massive activations: a column of each even row's own, and one that
                    // several rows share (its weights are decoded once per task).
                    for i in (0..m).step_by(2) {
                        x[i * k + (i * 7) % k] = 40.0;
                        if k >= 512 {
                            x[i * k + 33] = -35.0;
                        }
                    }
                }
                let mut acts = QuantActs::new();
                acts.quantize(&x, k, k);
                let mut sums = Vec::new();
                group_sums(&acts, &mut sums);
                let mut want = vec![0f32; m * n];
                let bb = w.format.block_bytes();
                for i in 0..m {
                    for j in 0..n {
                        let (mut lanes, mut accm) = ([0f32; 8], 0f32);
                        for g in 0..k / 32 {
                            let blk = &w.blocks[j * w.row_bytes(k) + g * bb..];
                            let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                            let s = acts.sx[i * k / 32 + g] * d;
                            let code = |e: usize| -> i32 {
                                match w.format {
                                    A8Format::Q4_1 => (if e < 16 { blk[4 + e] & 0x0f } else { blk[4 + e - 16] >> 4 }) as i32,
                                    A8Format::Q8_0 => blk[2 + e] as i8 as i32,
                                }
                            };
                            for (l, lane) in lanes.iter_mut().enumerate() {
                                let dot: i32 = (4 * l..4 * l + 4).map(|e| code(e) * acts.xq[i * k + g * 32 + e] as i32).sum();
                                *lane = (dot as f32).mul_add(s, *lane);
                            }
                            if w.format == A8Format::Q4_1 {
                                accm = f16::from_le_bytes([blk[2], blk[3]]).to_f32().mul_add(sums[i * k / 32 + g], accm);
                            }
                        }
                        want[i * n + j] = lane_sum(lanes) + accm;
                        for &(col, v) in &acts.outliers[acts.row_outliers[i]..acts.row_outliers[i + 1]] {
                            want[i * n + j] += v * w.at(k, j, col as usize);
                        }
                    }
                }
                for kern in I8Kernel::available() {
                    let mut y = vec![f32::NAN; m * n];
                    gemm_a8(kern, &pool, &acts, &sums, &w, n, &mut y);
                    assert_eq!(y, want, "{kern:?} {:?} m={m} k={k} n={n}", w.format);
                }
                let mut deq = vec![0f32; n * k];
                w.dequant_rows(0, k, &mut deq);
                for i in [0, m - 1] {
                    for j in [0, n / 2, n - 1] {
                        let exact: f32 = (0..k).map(|p| x[i * k + p] * deq[j * k + p]).sum();
                        let tol = 0.02 * (k as f32).sqrt();
                        assert!((want[i * n + j] - exact).abs() < tol, "{:?} m={m} k={k}: {} vs {exact}", w.format, want[i * n + j]);
                    }
                }
            }
        }
    }

    #[test]
    fn q4_1_blocks_dequantize_as_the_matmul_path_does() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        let (n, k) = (3, 96);
        let dense: Vec<f32> = (0..n * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let w = Weight::Q4_1(super::super::matmul::quantize_q4_1(&dense));
        let a8 = A8Weight::from_weight(&w, n, k).unwrap();
        assert_eq!(a8.format, A8Format::Q4_1);
        let (mut want, mut got) = (vec![0f32; n * k], vec![0f32; n * k]);
        w.dequant_rows(0, k, &mut want);
        a8.dequant_rows(0, k, &mut got);
        assert_eq!(got, want);
        let q8 = A8Weight::from_weight(&Weight::F32(dense.clone()), n, k).unwrap();
        assert_eq!(q8.format, A8Format::Q8_0);
        q8.dequant_rows(0, k, &mut got);
        for (g, d) in got.iter().zip(&dense) {
            assert!((g - d).abs() <= 2.0 / 127.0 * 0.5 + 1e-3, "{g} vs {d}");
        }
        assert!(A8Weight::from_weight(&Weight::F32(vec![0.0; 2 * 33]), 2, 33).is_none());
    }
}
