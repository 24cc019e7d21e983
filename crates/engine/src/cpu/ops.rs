//! Element-wise and row-wise ops of the model forward, on `[tokens, dim]` row-major f32.

/// `out[t] = x[t] / rms(x[t]) * (weight + offset)`; offset is 0 for Llama, 1 for Gemma.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, offset: f32, out: &mut [f32]) {
    let dim = weight.len();
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let ss = sum_sq(xr);
        let scale = 1.0 / ((ss / dim as f32) + eps).sqrt();
        for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * scale * (w + offset);
        }
    }
}

/// In-place variant of [`rms_norm`].
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32, offset: f32) {
    let dim = weight.len();
    for xr in x.chunks_exact_mut(dim) {
        let ss = sum_sq(xr);
        let scale = 1.0 / ((ss / dim as f32) + eps).sqrt();
        for (v, &w) in xr.iter_mut().zip(weight) {
            *v = *v * scale * (w + offset);
        }
    }
}

/// Sum of squares with 8 fixed lanes (vectorizes; order independent of the caller).
fn sum_sq(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l] * c[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &v in rem {
        s += v * v;
    }
    s
}

/// `e^x` in plain multiplies and adds, so that loops of it vectorize and every path rounds
/// alike: x = n·ln2 + r with n rounded to nearest by the 1.5·2^23 trick, Cephes' degree-6
/// polynomial for e^r (about 1 ulp), 2^n put together in the exponent bits. x is first
/// clamped to -87.3 ..= 88.3, where e^x is a normal float (NaN becomes -87.3): below, it
/// gives e^-87.3; above, e^88.3 (no infinity).
#[inline(always)]
// Not `clamp`: that keeps NaN, and a NaN exponent would make 2^n garbage.
#[allow(clippy::manual_clamp)]
pub fn exp_poly(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.3).min(88.3);
    // t = 1.5·2^23 + n: its bits are 0x4B40_0000 + n, whose low nine bits give 2^n below.
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (x - n * 0.693_359_4) - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    // (n + 127) << 23 without a float-to-int conversion (a saturating `as` stays one
    // scalar convert per value; integer adds and shifts vectorize).
    e * f32::from_bits(t.to_bits().wrapping_add(127) << 23)
}

/// The largest of `v` (`-inf` when empty; NaNs never win), in 16 lanes and then across
/// them: a maximum is exact, so this is the value a left-to-right fold gives, without its
/// chain of dependent compares.
#[inline(always)]
pub fn max_of(v: &[f32]) -> f32 {
    let pick = |m: f32, x: f32| if x > m { x } else { m };
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = pick(*m, x);
        }
    }
    let m = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| pick(m, x));
    lanes.iter().fold(m, |a, &x| pick(a, x))
}

/// `gate[i] = silu(gate[i]) * up[i]`, `silu(g) = g / (1 + e^-g)` with [`exp_poly`]: a
/// loop that vectorizes (libm's `expf`, a call per value, was 3% of a decode step's
/// time on the calling thread), on the widest registers the CPU has; the same bits on
/// every path (no FMA).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    silu_mul_on(super::matmul::Kernel::detect(), gate, up)
}

/// [`silu_mul`] on a given instruction-set path.
pub fn silu_mul_on(kern: super::matmul::Kernel, gate: &mut [f32], up: &[f32]) {
    // Below -88.3 the clamped e^-g would leave g / 2.3e38, not ~0 (-1e38 would give -0.44).
    gated_on(kern, gate, up, |g| if g < -88.3 { -0.0 } else { g / (1.0 + exp_poly(-g)) })
}

/// `gate[i] = gelu_tanh(gate[i]) * up[i]` (GeGLU), `gelu_tanh(x) = x / (1 + e^-2y)` with
/// `y = sqrt(2/pi) (x + 0.044715 x^3)`: the same value as `0.5 x (1 + tanh y)` (since
/// `1 + tanh y = 2 / (1 + e^-2y)`), vectorized as [`silu_mul`] is.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    gelu_tanh_mul_on(super::matmul::Kernel::detect(), gate, up)
}

/// [`gelu_tanh_mul`] on a given instruction-set path.
pub fn gelu_tanh_mul_on(kern: super::matmul::Kernel, gate: &mut [f32], up: &[f32]) {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    gated_on(kern, gate, up, |x| {
        let z = -2.0 * (C * (x + 0.044715 * x * x * x));
        // As for SiLU: far below zero the value is ~0, not x / 2.3e38.
        if z > 88.3 { -0.0 } else { x / (1.0 + exp_poly(z)) }
    })
}

/// `gate[i] = act(gate[i]) * up[i]` on `kern`'s registers.
#[inline(always)]
fn gated_on(kern: super::matmul::Kernel, gate: &mut [f32], up: &[f32], act: impl Fn(f32) -> f32) {
    on_registers(kern, || gated_body(gate, up, act))
}

/// `out[i] = f(x[i])` on the widest registers `kern` has (`f` inlined into each path).
#[inline(always)]
pub fn map_on(kern: super::matmul::Kernel, x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32) {
    on_registers(kern, || map_body(x, out, f))
}

/// Runs `body` compiled for `kern`'s instruction set: `body` (a closure over an
/// `#[inline(always)]` loop) inlines into a function with those target features, so its
/// loops vectorize on the widest registers. No FMA is enabled: the paths give the same bits.
#[inline(always)]
fn on_registers(kern: super::matmul::Kernel, body: impl FnOnce()) {
    use super::matmul::Kernel;
    match kern {
        // SAFETY: `Kernel::available` found these features.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { on_avx512(body) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { on_avx2(body) },
        Kernel::Portable => body(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn on_avx512(body: impl FnOnce()) {
    body()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn on_avx2(body: impl FnOnce()) {
    body()
}

#[inline(always)]
fn map_body(x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f(v);
    }
}

#[inline(always)]
fn gated_body(gate: &mut [f32], up: &[f32], act: impl Fn(f32) -> f32) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = act(*g) * u;
    }
}

pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Rotary position embedding tables: `cos[pos][i]`, `sin[pos][i]` for i < rot_dim / 2.
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
    /// GGUF llama weights: pairs (2i, 2i+1); HF weights: halves (i, i + half).
    pub interleaved: bool,
}

impl Rope {
    /// `inv_freq[i]` for i < rot_dim/2, already scaled as the config asks.
    pub fn new(inv_freq: &[f32], max_pos: usize, interleaved: bool, attention_factor: f32) -> Rope {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for &f in inv_freq {
                let a = p as f64 * f as f64;
                cos.push((a.cos() as f32) * attention_factor);
                sin.push((a.sin() as f32) * attention_factor);
            }
        }
        Rope { cos, sin, half, interleaved }
    }

    pub fn max_positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Rotates every head of `x` (`[heads, head_dim]`) for position `pos`.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, pos: usize) {
        let h = self.half;
        let cos = &self.cos[pos * h..(pos + 1) * h];
        let sin = &self.sin[pos * h..(pos + 1) * h];
        for head in x.chunks_exact_mut(head_dim) {
            if self.interleaved {
                for i in 0..h {
                    let (a, b) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = a * cos[i] - b * sin[i];
                    head[2 * i + 1] = a * sin[i] + b * cos[i];
                }
            } else {
                for i in 0..h {
                    let (a, b) = (head[i], head[i + h]);
                    head[i] = a * cos[i] - b * sin[i];
                    head[i + h] = a * sin[i] + b * cos[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exponential within 2.5e-7 relative error of e^x over its range, exact at 0;
    /// clamped (finite, no NaN) outside it.
    #[test]
    fn exp_poly_is_accurate() {
        assert_eq!(exp_poly(0.0), 1.0);
        let mut worst = 0f64;
        for i in 0..=4_000_000 {
            let x = -87.0 + 175.0 * i as f32 / 4e6;
            let want = (x as f64).exp();
            worst = worst.max(((exp_poly(x) as f64 - want) / want).abs());
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert!(exp_poly(-1000.0) < 1e-37 && exp_poly(f32::NEG_INFINITY) < 1e-37 && exp_poly(f32::NAN) < 1e-37);
        assert!(exp_poly(1000.0).is_finite() && exp_poly(f32::INFINITY) > 1e38);
    }

    /// SiLU·up and GELU(tanh)·up on every instruction-set path give the portable path's
    /// bits (lengths with tails, values across the exponential's clamps, zeros, NaN) and
    /// stay near the f64 definitions (SiLU 1e-6 relative error; GELU 1e-5: far below zero
    /// the f32 rounding of its cubic argument, ~30 in size, shows in e^-2y).
    #[test]
    fn gated_activations_agree_on_every_path_and_match_their_definitions() {
        use super::super::matmul::Kernel;
        use rand::{Rng, SeedableRng};
        type On = fn(Kernel, &mut [f32], &[f32]);
        let silu = |x: f64| x / (1.0 + (-x).exp());
        // 0.5 x (1 + tanh y), written as x / (1 + e^-2y): in f64 too, 1 + tanh y rounds to 0
        // for y below about -19, where the value is still far from 0 relative to 1e-6.
        let gelu = |x: f64| x / (1.0 + (-2.0 * (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).exp());
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        for (name, on, def, tol) in [("silu", silu_mul_on as On, &silu as &dyn Fn(f64) -> f64, 1e-6), ("gelu_tanh", gelu_tanh_mul_on as On, &gelu, 1e-5)] {
            for n in [1usize, 7, 16, 33, 1536] {
                let mut g: Vec<f32> = (0..n).map(|_| rng.random_range(-20.0f32..20.0)).collect();
                let u: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect();
                let specials = [0.0, -0.0, 100.0, -100.0, 1e-30, -95.0, f32::NAN, -1e38, f32::NEG_INFINITY, f32::INFINITY];
                for (x, &v) in g.iter_mut().zip(&specials) {
                    *x = v;
                }
                let mut want = g.clone();
                on(Kernel::Portable, &mut want, &u);
                for kern in Kernel::available() {
                    let mut got = g.clone();
                    on(kern, &mut got, &u);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "{name} {kern:?} n={n}");
                }
                for ((&x, &u), &y) in g.iter().zip(&u).zip(&want) {
                    if x.is_nan() {
                        assert!(y.is_nan());
                        continue;
                    }
                    if x.is_infinite() {
                        // act(-inf) = 0, act(inf) = inf.
                        assert_eq!(y, if x > 0.0 { x * u } else { 0.0 }, "{name}({x}) * {u}");
                        continue;
                    }
                    let exact = def(x as f64) * u as f64;
                    // (Far below zero the clamped exponential leaves a remainder under 1e-35.)
                    assert!((y as f64 - exact).abs() <= tol * exact.abs() + 1e-35, "{name}({x}) * {u}: {y} vs {exact}");
                }
            }
        }
    }

    #[test]
    fn rms_norm_matches_definition() {
        let x = [1.0f32, -2.0, 3.0, 0.5, 0.0, 4.0, -1.0, 2.0, 7.0];
        let w = [0.5f32; 9];
        let mut out = [0f32; 9];
        rms_norm(&x, &w, 1e-5, 0.0, &mut out);
        let rms = (x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 9.0 + 1e-5).sqrt();
        for (o, v) in out.iter().zip(x) {
            assert!((*o as f64 - v as f64 / rms * 0.5).abs() < 1e-6);
        }
    }

    #[test]
    fn interleaved_and_half_split_rope_agree_after_permutation() {
        let inv: Vec<f32> = (0..4).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 8.0)).collect();
        let a = Rope::new(&inv, 16, true, 1.0);
        let b = Rope::new(&inv, 16, false, 1.0);
        let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.3 - 1.0).collect();
        // interleaved layout (x0,y0,x1,y1,..) vs half layout (x0,x1,..,y0,y1,..)
        let mut xi = x.clone();
        let mut xh: Vec<f32> = (0..4).map(|i| x[2 * i]).chain((0..4).map(|i| x[2 * i + 1])).collect();
        a.apply(&mut xi, 8, 5);
        b.apply(&mut xh, 8, 5);
        for i in 0..4 {
            assert!((xi[2 * i] - xh[i]).abs() < 1e-6);
            assert!((xi[2 * i + 1] - xh[i + 4]).abs() < 1e-6);
        }
    }
}
