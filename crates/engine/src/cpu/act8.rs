//! `--quantize act8`: the checkpoint's 4-bit GGUF blocks kept (Q4_1 as it is, other formats
//! as Q8_0), activations quantized to INT8 on the fly, and integer dot products per block:
//! llama.cpp's arithmetic for a decode step, which reads 20 bytes per 32 weights of Q4_1
//! instead of the 36 of per-channel INT8.
//!
//! Q4_1 layers stay Q4_1; every other layer (Q8_0, Q4_0, Q5_0, K-quants, f32) becomes
//! Q8_0 blocks (`d = amax / 127` in f16, codes `round(w / d)`), the format llama.cpp
//! pairs with its INT8 activations too. Activations are [`QuantActs`]: per token, groups
//! of 32 with a scale each, outliers apart in f32 (as for `--quantize int8`).
//!
//! ```text
//!   Q4_1 block j, group g:  w = d·q + m (q in 0..16)    Q8_0:  w = d·q (q in -127..=127)
//!   y[i, j] = Σ_g (s_x[i,g]·d[j,g]) · (xq[i,g] · q[j,g])  +  m[j,g] · (s_x[i,g] · Σ xq[i,g])
//!             + Σ_outliers x · w[j, col]
//! ```
//!
//! `--quantize int8` uses the same panels and kernels as the format [`A8Format::I8`]:
//! per-channel INT8 codes with no per-group scale, so a group adds `dot · s_x` (one FMA)
//! and the column's f32 scale multiplies the sum at the end (`y = s_w · Σ_g ...`).
//!
//! Each group's integer dot product is exact (whole, over its 32 codes); per group, in
//! order, one FMA adds it times `s_x · d` to the output's f32 sum and (Q4_1) a second FMA
//! adds `m` times the group sum, on every instruction-set path, so the paths agree bitwise.
//!
//! The blocks are stored in panels of [`PANEL`] output columns, group by group: the
//! panel's 16 `d` (and `m`) as f16, then its codes four at a time, column by column
//! (`[quad][column][4]`), the layout of a `vpdpbusd` that multiplies 16 columns by four
//! activation codes broadcast to every lane. One 512-bit register is then one quad of
//! sixteen columns, and a group's dot products of 16 columns are 8 instructions (the
//! row-major blocks took a horizontal sum or a lane-wise FMA per column and quad).

use std::cell::RefCell;

use half::f16;

use super::matmul::Weight;
use super::quant::{quantize_row, I8Kernel, QuantActs, I8_ALIGN};
use crate::threadpool::ThreadPool;

/// Output columns per panel (one 512-bit register of i32 or f32 lanes).
pub const PANEL: usize = 16;

/// The block formats the INT8-activation kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum A8Format {
    /// GGUF `{d: f16, m: f16, qs: [u8; 16]}` (low nibbles: codes 0..16, high: 16..32).
    Q4_1,
    /// GGUF `{d: f16, qs: [i8; 32]}`.
    Q8_0,
    /// `--quantize int8`: symmetric INT8 per output channel, a "block" being 32 codes
    /// (`qs: [i8; 32]`, no scale); each column's one f32 scale is kept beside the panels
    /// ([`A8Weight::scales`]) and multiplies its sum once, at the end.
    I8,
}

impl A8Format {
    /// Bytes of one GGUF block (32 weights of one row).
    pub const fn block_bytes(self) -> usize {
        match self {
            A8Format::Q4_1 => 20,
            A8Format::Q8_0 => 34,
            A8Format::I8 => 32,
        }
    }

    /// Bytes of a panel's scales per group: 16 `d` (and 16 `m` for Q4_1) as f16.
    const fn head_bytes(self) -> usize {
        match self {
            A8Format::Q4_1 => 64,
            A8Format::Q8_0 => 32,
            A8Format::I8 => 0,
        }
    }

    /// Bytes of one group of one panel: its scales, then its codes.
    pub const fn group_bytes(self) -> usize {
        PANEL * self.block_bytes()
    }

    /// The bytes of a block that hold its codes (after `d` and `m`).
    const fn block_head(self) -> usize {
        self.block_bytes() - self.code_words() * 4
    }

    /// 32-bit words of codes per column and group: Q4_1's 16 nibble bytes, Q8_0's 32
    /// code bytes.
    const fn code_words(self) -> usize {
        match self {
            A8Format::Q4_1 => 4,
            A8Format::Q8_0 | A8Format::I8 => 8,
        }
    }

    /// Code `e` (0..32) of a column: which of its code words holds it, and the shift
    /// that brings it to the word's low bits (Q4_1: word `q` holds codes `4q..4q+4` in
    /// its low nibbles and `16 + 4q..` in its high ones; Q8_0 and I8: codes `4q..4q+4`).
    const fn code_at(self, e: usize) -> (usize, u32) {
        match self {
            A8Format::Q4_1 => (e % 16 / 4, 8 * (e % 4) as u32 + if e >= 16 { 4 } else { 0 }),
            A8Format::Q8_0 | A8Format::I8 => (e / 4, 8 * (e % 4) as u32),
        }
    }

    /// Where the bytes of column `c`'s GGUF block sit in its panel group, as (offset in
    /// the block, offset in the group, length): `d`, `m` (Q4_1), then each code word. The
    /// one definition of the layout that [`A8Weight::from_blocks`] and
    /// [`A8Weight::blocks_of`] copy along, one way and back.
    fn block_pieces(self, c: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        let scales = match self {
            A8Format::Q4_1 => 2,
            A8Format::Q8_0 => 1,
            A8Format::I8 => 0,
        };
        let (head, codes) = (self.block_head(), self.head_bytes());
        [(0, 2 * c, 2), (2, 32 + 2 * c, 2)]
            .into_iter()
            .take(scales)
            .chain((0..self.code_words()).map(move |q| (head + 4 * q, codes + 64 * q + 4 * c, 4)))
    }
}

/// Weights `[N, K]` in a block format, for INT8 activations, in panels (see the module
/// doc). K is a multiple of 32 (`I8` rows are padded to one with zero codes); the last
/// panel is padded with zero columns.
#[derive(Debug, Clone)]
pub struct A8Weight {
    pub format: A8Format,
    pub n: usize,
    pub k: usize,
    pub panels: Vec<u8>,
    /// `I8`: one scale per column, `n` rounded up to [`PANEL`] (the padding 0); empty for
    /// the GGUF formats, whose scales sit in the panels.
    pub scales: Vec<f32>,
}

impl A8Weight {
    /// `w` as it will be read with INT8 activations: Q4_1 as it is, anything else as Q8_0
    /// (dequantized first). `None` when K is not a multiple of 32.
    pub fn from_weight(w: &Weight, n: usize, k: usize) -> Option<A8Weight> {
        if !k.is_multiple_of(I8_ALIGN) {
            return None;
        }
        if let Weight::Q4_1(b) = w {
            return Some(A8Weight::from_blocks(A8Format::Q4_1, b, n, k));
        }
        let mut dense = vec![0f32; n * k];
        w.dequant_rows(0, k, &mut dense);
        Some(A8Weight::from_blocks(A8Format::Q8_0, &quantize_q8_0(&dense), n, k))
    }

    /// `w[n, k]` (row-major f32) as symmetric INT8 per output channel (`--quantize int8`):
    /// each row's codes and scale from [`quantize_row`], rows padded to a multiple of 32.
    pub fn int8(w: &[f32], n: usize, k: usize) -> A8Weight {
        assert_eq!(w.len(), n * k);
        let kp = k.next_multiple_of(I8_ALIGN);
        let mut codes = vec![0i8; n * kp];
        let scales: Vec<f32> = w.chunks_exact(k).zip(codes.chunks_exact_mut(kp)).map(|(row, q)| quantize_row(row, &mut q[..k])).collect();
        A8Weight::from_codes(&codes, &scales, n, kp)
    }

    /// Panels of `n` rows of `kp` INT8 codes (a multiple of 32) with a scale per row.
    pub fn from_codes(codes: &[i8], scales: &[f32], n: usize, kp: usize) -> A8Weight {
        assert_eq!(scales.len(), n);
        // SAFETY: i8 and u8 have the same size and alignment, and every bit pattern is valid.
        let bytes = unsafe { std::slice::from_raw_parts(codes.as_ptr() as *const u8, codes.len()) };
        let mut w = A8Weight::from_blocks(A8Format::I8, bytes, n, kp);
        w.scales = scales.to_vec();
        w.scales.resize(n.next_multiple_of(PANEL), 0.0);
        w
    }

    /// Panels of `n` rows of GGUF blocks of `format` (row-major, `k / 32` blocks a row;
    /// `I8`: codes, with the scales still to set).
    pub fn from_blocks(format: A8Format, blocks: &[u8], n: usize, k: usize) -> A8Weight {
        assert!(k.is_multiple_of(I8_ALIGN), "act8 rows are whole blocks");
        let (bb, groups) = (format.block_bytes(), k / 32);
        let rb = groups * bb;
        assert_eq!(blocks.len(), n * rb, "{n} rows of {k} as {format:?} blocks");
        let mut panels = vec![0u8; n.div_ceil(PANEL) * groups * format.group_bytes()];
        for (pg, dst) in panels.chunks_exact_mut(format.group_bytes()).enumerate() {
            let (p, g) = (pg / groups, pg % groups);
            for c in 0..PANEL.min(n - p * PANEL) {
                let blk = &blocks[(p * PANEL + c) * rb + g * bb..][..bb];
                for (b, at, len) in format.block_pieces(c) {
                    dst[at..at + len].copy_from_slice(&blk[b..b + len]);
                }
            }
        }
        A8Weight { format, n, k, panels, scales: Vec::new() }
    }

    /// Rows `n0 .. n0 + rows` as GGUF blocks (row-major) into `out`: the inverse of
    /// [`A8Weight::from_blocks`].
    pub fn blocks_of(&self, n0: usize, rows: usize, out: &mut Vec<u8>) {
        let f = self.format;
        let (bb, groups) = (f.block_bytes(), self.k / 32);
        assert!(n0 + rows <= self.n);
        out.clear();
        out.resize(rows * groups * bb, 0);
        for (r, row) in out.chunks_exact_mut(groups * bb).enumerate() {
            let (p, c) = ((n0 + r) / PANEL, (n0 + r) % PANEL);
            for (g, blk) in row.chunks_exact_mut(bb).enumerate() {
                let src = &self.panels[(p * groups + g) * f.group_bytes()..][..f.group_bytes()];
                for (b, at, len) in f.block_pieces(c) {
                    blk[b..b + len].copy_from_slice(&src[at..at + len]);
                }
            }
        }
    }

    /// Bytes of one row as GGUF blocks (what a decode step reads per output column);
    /// `I8`: its padded codes and its scale.
    pub fn row_bytes(&self) -> usize {
        match self.format {
            A8Format::I8 => self.k + 4,
            f => self.k / I8_ALIGN * f.block_bytes(),
        }
    }

    /// Bytes held: the panels (with their padding) and the `I8` scales.
    pub fn storage_bytes(&self) -> usize {
        self.panels.len() + 4 * self.scales.len()
    }

    /// Element `col` of row `j`, as f32 (what an outlier activation multiplies).
    #[cfg(test)]
    fn at(&self, j: usize, col: usize) -> f32 {
        let strip = A8Strip { w: self.panels.as_ptr(), scales: self.scales.as_ptr(), format: self.format, groups: self.k / 32, ..A8Strip::EMPTY };
        assert!(j < self.n && col < self.k);
        // SAFETY: (j, col) is inside the panels.
        unsafe { strip.value(j, col, |p| f16_at(p)) }
    }

    /// Rows `n0 .. n0 + out.len() / k` as f32 (as the GGUF blocks dequantize; `I8`:
    /// `s · q`, the first `k` of each row's padded codes).
    pub fn dequant_rows(&self, n0: usize, k: usize, out: &mut [f32]) {
        let mut blocks = Vec::new();
        self.blocks_of(n0, out.len() / k, &mut blocks);
        let rows = match self.format {
            A8Format::Q4_1 => Weight::Q4_1(blocks),
            A8Format::Q8_0 => Weight::Q8_0(blocks),
            A8Format::I8 => {
                for (r, (o, codes)) in out.chunks_exact_mut(k).zip(blocks.chunks_exact(self.k)).enumerate() {
                    let s = self.scales[n0 + r];
                    for (v, &c) in o.iter_mut().zip(codes) {
                        *v = s * c as i8 as f32;
                    }
                }
                return;
            }
        };
        rows.dequant_rows(0, k, out)
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

/// Per row and group of the activations: `s_x · Σ xq` (what Q4_1's `m` multiplies) and
/// `Σ xq` (what turns Q8_0's codes flipped to unsigned back into a signed dot product).
#[derive(Debug, Default)]
pub struct GroupSums {
    pub scaled: Vec<f32>,
    pub codes: Vec<i32>,
}

impl GroupSums {
    pub const fn new() -> GroupSums {
        GroupSums { scaled: Vec::new(), codes: Vec::new() }
    }
}

thread_local! {
    static ACTS: RefCell<(QuantActs, GroupSums)> = const { RefCell::new((QuantActs::new(), GroupSums::new())) };
}

/// `y[m, N] = x[m, K] · Wᵀ` with W in blocks and x quantized per token and group.
pub fn matmul_a8(kern: I8Kernel, pool: &ThreadPool, x: &[f32], k: usize, w: &A8Weight, n: usize, y: &mut [f32]) {
    with_acts(pool, x, k, w.k, |acts, sums| gemm_a8(kern, pool, acts, sums, w, n, y))
}

/// `f` on `x[m, k]` quantized (on `pool`) for weights of `kp` columns (K or, for `I8`, K
/// padded to 32), with its [`group_sums`] (per-thread buffers).
pub fn with_acts<R>(pool: &ThreadPool, x: &[f32], k: usize, kp: usize, f: impl FnOnce(&QuantActs, &GroupSums) -> R) -> R {
    ACTS.with(|a| {
        let (acts, sums) = &mut *a.borrow_mut();
        acts.quantize_on(pool, x, k, kp);
        group_sums(acts, sums);
        f(acts, sums)
    })
}

/// The [`GroupSums`] of `a`.
pub fn group_sums(a: &QuantActs, out: &mut GroupSums) {
    out.scaled.clear();
    out.codes.clear();
    for (codes, &s) in a.xq.chunks_exact(32).zip(&a.sx) {
        let sum = codes.iter().map(|&c| c as i32).sum::<i32>();
        out.codes.push(sum);
        out.scaled.push(s * sum as f32);
    }
}

/// The GEMM (see the module doc); `sums` from [`group_sums`].
pub fn gemm_a8(kern: I8Kernel, pool: &ThreadPool, a: &QuantActs, sums: &GroupSums, w: &A8Weight, n: usize, y: &mut [f32]) {
    assert_eq!(y.len(), a.m * n);
    assert_eq!((w.n, w.k), (n, a.kp), "act8 weight of the wrong shape");
    if a.m == 0 {
        return;
    }
    // SAFETY: each task writes only its own columns.
    super::matmul::par_cols(pool, a.m, n, y, &|n0, cols, y| unsafe { gemm_a8_cols(kern, (a, sums), w, n, n0, cols, y) });
}

/// Columns `n0 .. n0 + cols` of `y[m, n]` (one pool task of [`gemm_a8`]).
///
/// # Safety
/// `y` holds `m` rows of `n`; nothing else writes these columns meanwhile.
pub(crate) unsafe fn gemm_a8_cols(kern: I8Kernel, (a, sums): (&QuantActs, &GroupSums), w: &A8Weight, n: usize, n0: usize, cols: usize, y: *mut f32) {
    assert!(w.n == n && w.k == a.kp && n0 + cols <= n && sums.codes.len() == a.m * (a.kp / 32));
    let strip = A8Strip {
        w: w.panels.as_ptr(),
        scales: w.scales.as_ptr(),
        format: w.format,
        groups: a.kp / 32,
        xq0: a.xq.as_ptr(),
        sx: a.sx.as_ptr(),
        xs: sums.scaled.as_ptr(),
        xi: sums.codes.as_ptr(),
        kp: a.kp,
        outliers: a.outliers.as_ptr(),
        row_outliers: a.row_outliers.as_ptr(),
    };
    // The strip reads panels n0 / 16 ..= (n0 + cols - 1) / 16 (inside `w.panels`) and
    // m rows of activations; the kernels write only columns n0 .. n0 + cols.
    let yt = y.add(n0);
    #[cfg(target_arch = "x86_64")]
    use x86::{F_I8, F_Q41, F_Q80};
    match (kern, w.format) {
        #[cfg(target_arch = "x86_64")]
        (I8Kernel::Vnni, A8Format::Q4_1) => x86::gemm_vnni::<F_Q41>(&strip, a.m, n0, cols, yt, n),
        #[cfg(target_arch = "x86_64")]
        (I8Kernel::Vnni, A8Format::Q8_0) => x86::gemm_vnni::<F_Q80>(&strip, a.m, n0, cols, yt, n),
        #[cfg(target_arch = "x86_64")]
        (I8Kernel::Vnni, A8Format::I8) => x86::gemm_vnni::<F_I8>(&strip, a.m, n0, cols, yt, n),
        #[cfg(target_arch = "x86_64")]
        (I8Kernel::Avx2, A8Format::Q4_1) => x86::gemm_avx2::<F_Q41>(&strip, a.m, n0, cols, yt, n),
        #[cfg(target_arch = "x86_64")]
        (I8Kernel::Avx2, A8Format::Q8_0) => x86::gemm_avx2::<F_Q80>(&strip, a.m, n0, cols, yt, n),
        #[cfg(target_arch = "x86_64")]
        (I8Kernel::Avx2, A8Format::I8) => x86::gemm_avx2::<F_I8>(&strip, a.m, n0, cols, yt, n),
        (I8Kernel::Portable, _) => portable::gemm(&strip, a.m, n0, cols, yt, n),
    }
}

/// What a kernel reads: the panels of a weight (and its `I8` column scales) and the
/// activations (`m` rows of `kp` codes, per row and group the scale `sx` and the
/// [`GroupSums`] `xs` and `xi`, and the outliers of [`QuantActs`]).
///
/// Every path adds a row's outliers to each output as the last step before storing it,
/// `y += x · w[j, col]` (a multiply, then an add) in the order found, `w` as
/// [`A8Strip::value`] computes it: the panel is still in L1 (a separate pass read the
/// weights and `y` again, and took 7% of a decode profile).
pub struct A8Strip {
    pub w: *const u8,
    pub scales: *const f32,
    pub format: A8Format,
    pub groups: usize,
    pub xq0: *const i8,
    pub sx: *const f32,
    pub xs: *const f32,
    pub xi: *const i32,
    pub kp: usize,
    pub outliers: *const (u32, f32),
    /// `m + 1` offsets: row `i`'s outliers are `outliers[row_outliers[i]..row_outliers[i + 1]]`.
    pub row_outliers: *const usize,
}

impl A8Strip {
    #[cfg(test)]
    const EMPTY: A8Strip = A8Strip {
        w: std::ptr::null(),
        scales: std::ptr::null(),
        format: A8Format::Q8_0,
        groups: 0,
        xq0: std::ptr::null(),
        sx: std::ptr::null(),
        xs: std::ptr::null(),
        xi: std::ptr::null(),
        kp: 0,
        outliers: std::ptr::null(),
        row_outliers: std::ptr::null(),
    };

    /// Group `g` of panel `p`: its scales, then its codes.
    #[inline(always)]
    unsafe fn group(&self, p: usize, g: usize) -> *const u8 {
        self.w.add((p * self.groups + g) * self.format.group_bytes())
    }

    /// Code `e` (0..32) of column `c` (0..16) in the group at `grp`.
    #[inline(always)]
    unsafe fn code(&self, grp: *const u8, c: usize, e: usize) -> i32 {
        let (word, shift) = self.format.code_at(e);
        let w = (grp.add(self.format.head_bytes() + 64 * word + 4 * c) as *const u32).read_unaligned();
        match self.format {
            A8Format::Q4_1 => (w >> shift & 0x0f) as i32,
            A8Format::Q8_0 | A8Format::I8 => ((w << (24 - shift)) as i32) >> 24,
        }
    }

    /// Row `i`'s outliers, (column, value) in the order found.
    #[inline(always)]
    unsafe fn row_outliers(&self, i: usize) -> &[(u32, f32)] {
        let (a, b) = (*self.row_outliers.add(i), *self.row_outliers.add(i + 1));
        std::slice::from_raw_parts(self.outliers.add(a), b - a)
    }

    /// Weight `col` of output column `j` as f32: `d·q + m` (a multiply, then an add),
    /// `d·q`, or `s·q` with the column's scale; `half` widens an f16 (every way is exact,
    /// so the paths agree bitwise).
    #[inline(always)]
    unsafe fn value(&self, j: usize, col: usize, half: impl Fn(*const u8) -> f32) -> f32 {
        let (c, grp) = (j % PANEL, self.group(j / PANEL, col / 32));
        let q = self.code(grp, c, col % 32) as f32;
        match self.format {
            A8Format::Q4_1 => half(grp.add(2 * c)) * q + half(grp.add(32 + 2 * c)),
            A8Format::Q8_0 => half(grp.add(2 * c)) * q,
            A8Format::I8 => *self.scales.add(j) * q,
        }
    }
}

#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    f16::from_le_bytes([*p, *p.add(1)]).to_f32()
}

mod portable {
    use super::{f16_at, A8Format, A8Strip, PANEL};

    /// Columns `c0 .. c0 + cols` (`y` at column `c0`), a panel at a time as the x86 kernels
    /// take them, with plain arrays the compiler vectorizes for the target's baseline
    /// (NEON on aarch64, SSE2 on x86-64): a code word holds four codes of one column, so
    /// the sixteen columns' words decode with a shift and a mask per lane, and the group's
    /// sixteen dot products and FMAs run lane-wise, products in i16 (at most 127·127, or
    /// 15·127 twice for Q4_1's two nibbles) added to i32. Per output the arithmetic is the
    /// module doc's, in its order, so the result is that of every other path, bit for bit.
    pub unsafe fn gemm(s: &A8Strip, m: usize, c0: usize, cols: usize, y: *mut f32, ldy: usize) {
        if cols == 0 {
            return;
        }
        for p in c0 / PANEL..=(c0 + cols - 1) / PANEL {
            let lanes = c0.max(p * PANEL) - p * PANEL..(c0 + cols).min((p + 1) * PANEL) - p * PANEL;
            for i in 0..m {
                let acc = match s.format {
                    A8Format::Q4_1 => panel::<true>(s, p, i),
                    A8Format::Q8_0 | A8Format::I8 => panel::<false>(s, p, i),
                };
                for c in lanes.clone() {
                    let j = p * PANEL + c;
                    let mut v = acc[c];
                    if s.format == A8Format::I8 {
                        v *= *s.scales.add(j);
                    }
                    for &(col, x) in s.row_outliers(i) {
                        v += x * s.value(j, col as usize, |p| f16_at(p));
                    }
                    *y.add(i * ldy + j - c0) = v;
                }
            }
        }
    }

    /// Row `i`'s sums over every group of panel `p` (before an I8 column scale and the
    /// outliers). `Q41`: nibbles (word `q`'s low nibbles are codes `4q..`, its high ones
    /// `16 + 4q..`); otherwise signed bytes (word `q` holds codes `4q..4q + 4`).
    #[inline(always)]
    unsafe fn panel<const Q41: bool>(s: &A8Strip, p: usize, i: usize) -> [f32; PANEL] {
        let x = s.xq0.add(i * s.kp);
        let head = s.format.head_bytes();
        let mut acc = [0f32; PANEL];
        for g in 0..s.groups {
            let grp = s.group(p, g);
            let xg = (x.add(g * 32) as *const [i8; 32]).read_unaligned();
            let word = |q: usize| (grp.add(head + 64 * q) as *const [u32; PANEL]).read_unaligned();
            let mut dot = [0i32; PANEL];
            if Q41 {
                for q in 0..4 {
                    let w = word(q);
                    for b in 0..4 {
                        let (lo, hi) = (xg[4 * q + b] as i16, xg[16 + 4 * q + b] as i16);
                        for c in 0..PANEL {
                            let v = w[c] >> (8 * b);
                            dot[c] += ((v & 0x0f) as i16 * lo + (v >> 4 & 0x0f) as i16 * hi) as i32;
                        }
                    }
                }
            } else {
                for q in 0..8 {
                    let w = word(q);
                    for b in 0..4 {
                        let xb = xg[4 * q + b] as i16;
                        for c in 0..PANEL {
                            dot[c] += ((w[c] >> (8 * b)) as u8 as i8 as i16 * xb) as i32;
                        }
                    }
                }
            }
            let at = i * s.groups + g;
            let sx = *s.sx.add(at);
            for c in 0..PANEL {
                // I8: `s_x · 1`, as the other paths (no per-group scale).
                let scale = if s.format == A8Format::I8 { sx } else { sx * f16_at(grp.add(2 * c)) };
                acc[c] = (dot[c] as f32).mul_add(scale, acc[c]);
                if Q41 {
                    acc[c] = f16_at(grp.add(32 + 2 * c)).mul_add(*s.xs.add(at), acc[c]);
                }
            }
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    use super::{A8Strip, PANEL};

    /// [`super::A8Format`] as the kernels' const parameter.
    pub const F_Q41: u8 = 0;
    pub const F_Q80: u8 = 1;
    pub const F_I8: u8 = 2;

    /// The format a const parameter stands for.
    const fn format(f: u8) -> super::A8Format {
        match f {
            F_Q41 => super::A8Format::Q4_1,
            F_Q80 => super::A8Format::Q8_0,
            _ => super::A8Format::I8,
        }
    }

    /// The panels that hold columns `c0 .. c0 + cols`, each with the mask of its lanes
    /// among them.
    fn panels(c0: usize, cols: usize) -> impl Iterator<Item = (usize, u16)> {
        (c0 / PANEL..(c0 + cols).div_ceil(PANEL)).map(move |p| {
            let lo = c0.max(p * PANEL) - p * PANEL;
            let hi = (c0 + cols).min(p * PANEL + PANEL) - p * PANEL;
            (p, ((1u32 << hi) - (1u32 << lo)) as u16)
        })
    }

    /// Four activation codes (a quad) in every 32-bit lane.
    #[inline(always)]
    unsafe fn quad512(x: *const i8) -> __m512i {
        _mm512_set1_epi32((x as *const i32).read_unaligned())
    }

    #[inline(always)]
    unsafe fn quad256(x: *const i8) -> __m256i {
        _mm256_set1_epi32((x as *const i32).read_unaligned())
    }

    /// Rows `i0 .. i0 + MR` against panel `p`: per group, the eight quads of the
    /// panel's codes as unsigned bytes (Q4_1's nibbles; Q8_0's and I8's codes flipped to
    /// `w + 128`, the dot product then starting from `-128 · Σx`, exact), one `vpdpbusd`
    /// per quad and row in two chains (quads 0..4, 4..8) added, then the two FMAs of the
    /// module doc (I8: one FMA by `s_x`, and the column scales at the end).
    #[inline(always)]
    unsafe fn panel_vnni<const MR: usize, const F: u8>(s: &A8Strip, p: usize, i0: usize) -> [__m512; MR] {
        let q41 = F == F_Q41;
        let (low, flip) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(-128));
        let mut acc = [_mm512_setzero_ps(); MR];
        for g in 0..s.groups {
            let grp = s.group(p, g);
            let d = if F == F_I8 { _mm512_set1_ps(1.0) } else { _mm512_cvtph_ps(_mm256_loadu_si256(grp as *const __m256i)) };
            let mut w = [_mm512_setzero_si512(); 8];
            let mut mv = _mm512_setzero_ps();
            if q41 {
                mv = _mm512_cvtph_ps(_mm256_loadu_si256(grp.add(32) as *const __m256i));
                for q in 0..4 {
                    let v = _mm512_loadu_si512(grp.add(64 + 64 * q) as *const _);
                    w[q] = _mm512_and_si512(v, low);
                    w[q + 4] = _mm512_and_si512(_mm512_srli_epi32::<4>(v), low);
                }
            } else {
                for q in 0..8 {
                    w[q] = _mm512_xor_si512(_mm512_loadu_si512(grp.add(format(F).head_bytes() + 64 * q) as *const _), flip);
                }
            }
            for r in 0..MR {
                let at = (i0 + r) * s.groups + g;
                let x = s.xq0.add((i0 + r) * s.kp + g * 32);
                let mut d0 = if q41 { _mm512_setzero_si512() } else { _mm512_set1_epi32(-128 * *s.xi.add(at)) };
                let mut d1 = _mm512_setzero_si512();
                // w[q] holds codes 4q..4q+4 of every column (Q4_1: word q's low nibbles;
                // w[q + 4] its high nibbles, codes 16 + 4q..), as Q8_0's words in order.
                for q in 0..4 {
                    d0 = _mm512_dpbusd_epi32(d0, w[q], quad512(x.add(4 * q)));
                    d1 = _mm512_dpbusd_epi32(d1, w[q + 4], quad512(x.add(16 + 4 * q)));
                }
                let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1));
                // I8: `s_x · 1`, the same value as `s_x`.
                acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(_mm512_set1_ps(*s.sx.add(at)), d), acc[r]);
                if q41 {
                    acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(*s.xs.add(at)), acc[r]);
                }
            }
        }
        if F == F_I8 {
            let sw = _mm512_loadu_ps(s.scales.add(p * PANEL));
            for r in 0..MR {
                acc[r] = _mm512_mul_ps(acc[r], sw);
            }
        }
        for r in 0..MR {
            for &(col, v) in s.row_outliers(i0 + r) {
                acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(_mm512_set1_ps(v), column512::<F>(s, p, col as usize)));
            }
        }
        acc
    }

    /// Weight `col` of panel `p`'s sixteen columns, as [`A8Strip::value`] computes it
    /// (`d·q + m` as a multiply then an add): the code word of every column is one load.
    #[inline(always)]
    unsafe fn column512<const F: u8>(s: &A8Strip, p: usize, col: usize) -> __m512 {
        let grp = s.group(p, col / 32);
        let (word, shift) = format(F).code_at(col % 32);
        let words = _mm512_loadu_si512(grp.add(format(F).head_bytes() + 64 * word) as *const _);
        if F == F_Q41 {
            let q = _mm512_and_si512(_mm512_srl_epi32(words, _mm_cvtsi32_si128(shift as i32)), _mm512_set1_epi32(0x0f));
            let (d, m) = (_mm512_cvtph_ps(_mm256_loadu_si256(grp as *const __m256i)), _mm512_cvtph_ps(_mm256_loadu_si256(grp.add(32) as *const __m256i)));
            _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(q)), m)
        } else {
            let q = _mm512_srai_epi32::<24>(_mm512_sll_epi32(words, _mm_cvtsi32_si128(24 - shift as i32)));
            let d = if F == F_I8 { _mm512_loadu_ps(s.scales.add(p * PANEL)) } else { _mm512_cvtph_ps(_mm256_loadu_si256(grp as *const __m256i)) };
            _mm512_mul_ps(d, _mm512_cvtepi32_ps(q))
        }
    }

    /// Eight columns (half `h` of panel `p`) on AVX2, as [`panel_vnni`] computes them: Q4_1
    /// nibbles by codes in `vpmaddubsw` (two products per i16, at most 2·15·127 in size;
    /// the eight quads add up to at most 30480: no saturation) summed to i32 once; Q8_0
    /// as `|w|` by `x` signed as `w` (codes within ±127), to i32 per quad.
    #[inline(always)]
    unsafe fn half_avx2<const MR: usize, const F: u8>(s: &A8Strip, p: usize, h: usize, i0: usize) -> [__m256; MR] {
        let q41 = F == F_Q41;
        let (low, ones) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi16(1));
        let mut acc = [_mm256_setzero_ps(); MR];
        for g in 0..s.groups {
            let grp = s.group(p, g);
            let d = if F == F_I8 { _mm256_set1_ps(1.0) } else { _mm256_cvtph_ps(_mm_loadu_si128(grp.add(16 * h) as *const __m128i)) };
            let mut w = [_mm256_setzero_si256(); 8];
            let mut mv = _mm256_setzero_ps();
            if q41 {
                mv = _mm256_cvtph_ps(_mm_loadu_si128(grp.add(32 + 16 * h) as *const __m128i));
                for q in 0..4 {
                    let v = _mm256_loadu_si256(grp.add(64 + 64 * q + 32 * h) as *const __m256i);
                    w[q] = _mm256_and_si256(v, low);
                    w[q + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                }
            } else {
                for q in 0..8 {
                    w[q] = _mm256_loadu_si256(grp.add(format(F).head_bytes() + 64 * q + 32 * h) as *const __m256i);
                }
            }
            for r in 0..MR {
                let at = (i0 + r) * s.groups + g;
                let x = s.xq0.add((i0 + r) * s.kp + g * 32);
                let dot = if q41 {
                    let mut s16 = _mm256_setzero_si256();
                    for q in 0..4 {
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[q], quad256(x.add(4 * q))));
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[q + 4], quad256(x.add(16 + 4 * q))));
                    }
                    _mm256_madd_epi16(s16, ones)
                } else {
                    let mut s32 = _mm256_setzero_si256();
                    for q in 0..8 {
                        let xq = quad256(x.add(4 * q));
                        let prod = _mm256_maddubs_epi16(_mm256_abs_epi8(w[q]), _mm256_sign_epi8(xq, w[q]));
                        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(prod, ones));
                    }
                    s32
                };
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(_mm256_set1_ps(*s.sx.add(at)), d), acc[r]);
                if q41 {
                    acc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(*s.xs.add(at)), acc[r]);
                }
            }
        }
        if F == F_I8 {
            let sw = _mm256_loadu_ps(s.scales.add(p * PANEL + 8 * h));
            for r in 0..MR {
                acc[r] = _mm256_mul_ps(acc[r], sw);
            }
        }
        for r in 0..MR {
            for &(col, v) in s.row_outliers(i0 + r) {
                acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(_mm256_set1_ps(v), column256::<F>(s, p, h, col as usize)));
            }
        }
        acc
    }

    /// As [`column512`], for the eight columns of half `h` of panel `p`.
    #[inline(always)]
    unsafe fn column256<const F: u8>(s: &A8Strip, p: usize, h: usize, col: usize) -> __m256 {
        let grp = s.group(p, col / 32);
        let (word, shift) = format(F).code_at(col % 32);
        let words = _mm256_loadu_si256(grp.add(format(F).head_bytes() + 64 * word + 32 * h) as *const __m256i);
        if F == F_Q41 {
            let q = _mm256_and_si256(_mm256_srl_epi32(words, _mm_cvtsi32_si128(shift as i32)), _mm256_set1_epi32(0x0f));
            let d = _mm256_cvtph_ps(_mm_loadu_si128(grp.add(16 * h) as *const __m128i));
            let m = _mm256_cvtph_ps(_mm_loadu_si128(grp.add(32 + 16 * h) as *const __m128i));
            _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(q)), m)
        } else {
            let q = _mm256_srai_epi32::<24>(_mm256_sll_epi32(words, _mm_cvtsi32_si128(24 - shift as i32)));
            let d = if F == F_I8 {
                _mm256_loadu_ps(s.scales.add(p * PANEL + 8 * h))
            } else {
                _mm256_cvtph_ps(_mm_loadu_si128(grp.add(16 * h) as *const __m128i))
            };
            _mm256_mul_ps(d, _mm256_cvtepi32_ps(q))
        }
    }

    #[inline(always)]
    unsafe fn store512<const MR: usize>(acc: [__m512; MR], y: *mut f32, ldy: usize, mask: u16) {
        for r in 0..MR {
            _mm512_mask_storeu_ps(y.wrapping_add(r * ldy), mask, acc[r]);
        }
    }

    /// `y` at column `c0`, row 0: columns `c0 .. c0 + cols`, rows `0 .. m`, panel by panel,
    /// rows eight at a time (the panel's groups stay in L1 for the next eight).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn gemm_vnni<const F: u8>(s: &A8Strip, m: usize, c0: usize, cols: usize, y: *mut f32, ldy: usize) {
        for (p, mask) in panels(c0, cols) {
            // Column 16p of row 0: the masked stores write only the task's columns.
            let yp = y.wrapping_add(p * PANEL).wrapping_sub(c0);
            let mut i = 0;
            while i < m {
                let yi = yp.wrapping_add(i * ldy);
                i += match m - i {
                    8.. => {
                        store512(panel_vnni::<8, F>(s, p, i), yi, ldy, mask);
                        8
                    }
                    4..=7 => {
                        store512(panel_vnni::<4, F>(s, p, i), yi, ldy, mask);
                        4
                    }
                    2 | 3 => {
                        store512(panel_vnni::<2, F>(s, p, i), yi, ldy, mask);
                        2
                    }
                    _ => {
                        store512(panel_vnni::<1, F>(s, p, i), yi, ldy, mask);
                        1
                    }
                };
            }
        }
    }

    #[inline(always)]
    unsafe fn store256<const MR: usize>(acc: [__m256; MR], y: *mut f32, ldy: usize, lanes: std::ops::Range<usize>) {
        for r in 0..MR {
            let mut v = [0f32; 8];
            _mm256_storeu_ps(v.as_mut_ptr(), acc[r]);
            for l in lanes.clone() {
                *y.wrapping_add(r * ldy + l) = v[l];
            }
        }
    }

    /// As [`gemm_vnni`], eight columns (half a panel) and four rows at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemm_avx2<const F: u8>(s: &A8Strip, m: usize, c0: usize, cols: usize, y: *mut f32, ldy: usize) {
        for (p, mask) in panels(c0, cols) {
            for h in 0..2 {
                let lanes = (0..8).filter(|l| mask >> (8 * h + l) & 1 == 1);
                let (Some(lo), Some(hi)) = (lanes.clone().min(), lanes.max()) else { continue };
                let yp = y.wrapping_add(p * PANEL + 8 * h).wrapping_sub(c0);
                let mut i = 0;
                while i < m {
                    let yi = yp.wrapping_add(i * ldy);
                    i += match m - i {
                        4.. => {
                            store256(half_avx2::<4, F>(s, p, h, i), yi, ldy, lo..hi + 1);
                            4
                        }
                        2 | 3 => {
                            store256(half_avx2::<2, F>(s, p, h, i), yi, ldy, lo..hi + 1);
                            2
                        }
                        _ => {
                            store256(half_avx2::<1, F>(s, p, h, i), yi, ldy, lo..hi + 1);
                            1
                        }
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The module doc's arithmetic, straight from the GGUF blocks (not the panels), for
    /// output `(i, j)`; `I8`: before the column's scale.
    fn reference(format: A8Format, blocks: &[u8], k: usize, acts: &QuantActs, sums: &GroupSums, i: usize, j: usize) -> f32 {
        let (bb, groups) = (format.block_bytes(), k / 32);
        let mut acc = 0f32;
        for g in 0..groups {
            let blk = &blocks[(j * groups + g) * bb..][..bb];
            let half = |at: usize| f16::from_le_bytes([blk[at], blk[at + 1]]).to_f32();
            let code = |e: usize| -> i32 {
                match format {
                    A8Format::Q4_1 => (if e < 16 { blk[4 + e] & 0x0f } else { blk[4 + e - 16] >> 4 }) as i32,
                    A8Format::Q8_0 => blk[2 + e] as i8 as i32,
                    A8Format::I8 => blk[e] as i8 as i32,
                }
            };
            let dot: i32 = (0..32).map(|e| code(e) * acts.xq[i * k + g * 32 + e] as i32).sum();
            // I8's column scale multiplies the sum after (the caller's).
            let d = if format == A8Format::I8 { 1.0 } else { half(0) };
            acc = (dot as f32).mul_add(acts.sx[i * groups + g] * d, acc);
            if format == A8Format::Q4_1 {
                acc = half(2).mul_add(sums.scaled[i * groups + g], acc);
            }
        }
        acc
    }

    /// Both formats, every path, against the scalar reference above (exact whole-group
    /// dot products, the two FMAs per group, the outliers in order), on the issue's odd
    /// shapes with outliers and column counts that end inside a panel: the paths agree
    /// bitwise; the products stay near the float products of the dequantized weights.
    #[test]
    fn every_act8_path_matches_the_scalar_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let pool = ThreadPool::new(2);
        for &(m, k, n) in &[(1usize, 576usize, 49152usize), (3, 576, 1536), (17, 1536, 576), (128, 576, 192), (5, 64, 9), (2, 32, 70), (9, 96, 33)] {
            let dense: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            for (format, blocks) in [(A8Format::Q4_1, super::super::matmul::quantize_q4_1(&dense)), (A8Format::Q8_0, quantize_q8_0(&dense))] {
                let w = A8Weight::from_blocks(format, &blocks, n, k);
                let mut x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                if k >= 64 {
                    // Massive activations: a column of each even row's own, and one that
                    // several rows share.
                    for i in (0..m).step_by(2) {
                        x[i * k + (i * 7) % k] = 40.0;
                        if k >= 512 {
                            x[i * k + 33] = -35.0;
                        }
                    }
                }
                let mut acts = QuantActs::new();
                acts.quantize(&x, k, k);
                let mut sums = GroupSums::new();
                group_sums(&acts, &mut sums);
                let mut want = vec![0f32; m * n];
                for i in 0..m {
                    for j in 0..n {
                        want[i * n + j] = reference(format, &blocks, k, &acts, &sums, i, j);
                        for &(col, v) in &acts.outliers[acts.row_outliers[i]..acts.row_outliers[i + 1]] {
                            want[i * n + j] += v * w.at(j, col as usize);
                        }
                    }
                }
                for kern in I8Kernel::available() {
                    let mut y = vec![f32::NAN; m * n];
                    gemm_a8(kern, &pool, &acts, &sums, &w, n, &mut y);
                    assert_eq!(y, want, "{kern:?} {format:?} m={m} k={k} n={n}");
                    // A task that starts and ends inside panels writes its columns only.
                    if n > 20 {
                        let (c0, cols) = (5, n - 11);
                        let mut y = vec![f32::NAN; m * n];
                        // SAFETY: y holds m rows of n; one call, no other writer.
                        unsafe { gemm_a8_cols(kern, (&acts, &sums), &w, n, c0, cols, y.as_mut_ptr()) };
                        for (at, (&got, &want)) in y.iter().zip(&want).enumerate() {
                            if (c0..c0 + cols).contains(&(at % n)) {
                                assert_eq!(got, want, "{kern:?} {format:?} task column {}", at % n);
                            } else {
                                assert!(got.is_nan(), "{kern:?} {format:?} wrote column {} outside its task", at % n);
                            }
                        }
                    }
                }
                let mut deq = vec![0f32; n * k];
                w.dequant_rows(0, k, &mut deq);
                for i in [0, m - 1] {
                    for j in [0, n / 2, n - 1] {
                        let exact: f32 = (0..k).map(|p| x[i * k + p] * deq[j * k + p]).sum();
                        let tol = 0.02 * (k as f32).sqrt();
                        assert!((want[i * n + j] - exact).abs() < tol, "{format:?} m={m} k={k}: {} vs {exact}", want[i * n + j]);
                    }
                }
            }
        }
    }

    /// The largest dot products the formats allow (every Q4_1 nibble 15, every Q8_0 code
    /// ±127, activations all at +127 or -127 after quantization, or alternating): every
    /// path equals the reference, so AVX2's i16 sums of nibble products (at most 30480 per
    /// lane over a group) and the sign trick of its Q8_0 products do not saturate.
    #[test]
    fn extreme_codes_do_not_saturate() {
        let pool = ThreadPool::new(2);
        let (m, k, n) = (4, 64, 40);
        let one = f16::from_f32(0.5).to_le_bytes();
        let q41: Vec<u8> = (0..n * k / 32).flat_map(|_| one.into_iter().chain(one).chain([0xffu8; 16])).collect();
        let q80: Vec<u8> = (0..n * k / 32).flat_map(|b| one.into_iter().chain(std::iter::repeat_n(if b % 2 == 0 { 127u8 } else { (-127i8) as u8 }, 32))).collect();
        let x: Vec<f32> = (0..m * k).map(|i| match i / k {
            0 => 1.0,
            1 => -1.0,
            2 => if i % 2 == 0 { 1.0 } else { -1.0 },
            _ => if (i / 4) % 2 == 0 { 1.0 } else { -1.0 },
        }).collect();
        let mut acts = QuantActs::new();
        acts.quantize(&x, k, k);
        assert!(acts.xq[..k].iter().all(|&c| c == 127) && acts.xq[k..2 * k].iter().all(|&c| c == -127));
        let mut sums = GroupSums::new();
        group_sums(&acts, &mut sums);
        let i8: Vec<u8> = q80.chunks_exact(34).flat_map(|b| b[2..].to_vec()).collect();
        for (format, blocks) in [(A8Format::Q4_1, q41), (A8Format::Q8_0, q80), (A8Format::I8, i8)] {
            let mut w = A8Weight::from_blocks(format, &blocks, n, k);
            if format == A8Format::I8 {
                w.scales = vec![0.5; n.next_multiple_of(PANEL)];
            }
            let want: Vec<f32> = (0..m * n).map(|at| reference(format, &blocks, k, &acts, &sums, at / n, at % n) * if format == A8Format::I8 { 0.5 } else { 1.0 }).collect();
            if format == A8Format::Q4_1 {
                // Per group 32 codes of 15 by 127 times s_x · d = 0.5 / 127, plus m = 0.5
                // times s_x · Σx = 32: 256 per group.
                assert!((want[0] - 512.0).abs() < 1e-3, "{}", want[0]);
            }
            for kern in I8Kernel::available() {
                let mut y = vec![f32::NAN; m * n];
                gemm_a8(kern, &pool, &acts, &sums, &w, n, &mut y);
                assert_eq!(y, want, "{kern:?} {format:?}");
            }
        }
    }

    /// Panels hold the blocks as they were: back to row-major blocks bit for bit, for
    /// row ranges that start and end inside panels; the padding columns are zero.
    #[test]
    fn panels_give_back_the_blocks() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (n, k) = (37, 96);
        for format in [A8Format::Q4_1, A8Format::Q8_0, A8Format::I8] {
            let blocks: Vec<u8> = (0..n * k / 32 * format.block_bytes()).map(|_| rng.random()).collect();
            let w = A8Weight::from_blocks(format, &blocks, n, k);
            assert_eq!(w.panels.len(), 3 * 3 * format.group_bytes());
            let rb = k / 32 * format.block_bytes();
            let mut out = Vec::new();
            for (n0, rows) in [(0, n), (3, 20), (17, 20), (36, 1)] {
                w.blocks_of(n0, rows, &mut out);
                assert_eq!(out, blocks[n0 * rb..(n0 + rows) * rb], "{format:?} rows {n0}..{}", n0 + rows);
            }
            let last = A8Weight::from_blocks(format, &vec![0u8; 16 * k / 32 * format.block_bytes()], 16, k);
            for g in 0..3 {
                let pad = &w.panels[(2 * 3 + g) * format.group_bytes()..][..format.group_bytes()];
                let zero = &last.panels[g * format.group_bytes()..][..format.group_bytes()];
                for c in 5..16 {
                    if format != A8Format::I8 {
                        assert_eq!(pad[2 * c..2 * c + 2], zero[2 * c..2 * c + 2], "{format:?} d of padding column {c}");
                    }
                    for q in 0..format.code_words() {
                        let at = format.head_bytes() + 64 * q + 4 * c;
                        assert_eq!(pad[at..at + 4], [0; 4], "{format:?} codes of padding column {c}");
                    }
                }
            }
        }
    }

    /// `--quantize int8` (the `I8` format) on every path against a scalar reference
    /// computed from the rows' own codes and scales ([`quantize_row`], not the panels):
    /// per group an exact dot product and one FMA by `s_x`, the column's scale times the
    /// sum, then the outliers; K not a multiple of 32 (rows padded with zero codes) among
    /// the issue's odd shapes. The paths agree bitwise and stay near the float product.
    #[test]
    fn every_int8_path_matches_the_scalar_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let pool = ThreadPool::new(2);
        let shapes = [(1usize, 576usize, 49152usize), (3, 576, 1536), (17, 1536, 576), (128, 576, 192), (1, 1536, 576), (5, 13, 9), (2, 33, 70)];
        for &(m, k, n) in &shapes {
            let dense: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let w = A8Weight::int8(&dense, n, k);
            let kp = k.next_multiple_of(32);
            assert_eq!((w.format, w.n, w.k), (A8Format::I8, n, kp));
            let mut codes = vec![0i8; n * kp];
            let scales: Vec<f32> = dense.chunks_exact(k).zip(codes.chunks_exact_mut(kp)).map(|(r, q)| quantize_row(r, &mut q[..k])).collect();
            let mut x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            if k >= 64 {
                for i in (0..m).step_by(2) {
                    x[i * k + (i * 7) % k] = 40.0;
                }
            }
            let mut acts = QuantActs::new();
            acts.quantize(&x, k, kp);
            if k >= 64 {
                assert_eq!(acts.outliers.len(), m.div_ceil(2), "one outlier in every other row");
            }
            let mut sums = GroupSums::new();
            group_sums(&acts, &mut sums);
            let mut want = vec![0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0f32;
                    for g in 0..kp / 32 {
                        let dot: i32 = (0..32).map(|e| acts.xq[i * kp + g * 32 + e] as i32 * codes[j * kp + g * 32 + e] as i32).sum();
                        acc = (dot as f32).mul_add(acts.sx[i * kp / 32 + g], acc);
                    }
                    want[i * n + j] = acc * scales[j];
                    for &(col, v) in &acts.outliers[acts.row_outliers[i]..acts.row_outliers[i + 1]] {
                        want[i * n + j] += v * (scales[j] * codes[j * kp + col as usize] as f32);
                    }
                }
            }
            for kern in I8Kernel::available() {
                let mut y = vec![f32::NAN; m * n];
                gemm_a8(kern, &pool, &acts, &sums, &w, n, &mut y);
                assert_eq!(y, want, "{kern:?} m={m} k={k} n={n}");
            }
            let mut deq = vec![0f32; n * k];
            w.dequant_rows(0, k, &mut deq);
            for (j, row) in deq.chunks_exact(k).enumerate() {
                assert!(row.iter().zip(&codes[j * kp..]).all(|(&v, &c)| v == scales[j] * c as f32), "dequantized row {j}");
            }
            for i in [0, m - 1] {
                for j in [0, n / 2, n - 1] {
                    let exact: f32 = (0..k).map(|p| x[i * k + p] * dense[j * k + p]).sum();
                    let tol = 0.01 * (k as f32).sqrt();
                    assert!((want[i * n + j] - exact).abs() < tol, "m={m} k={k}: {} vs {exact}", want[i * n + j]);
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
