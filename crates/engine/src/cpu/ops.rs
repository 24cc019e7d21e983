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

/// `gate[i] = silu(gate[i]) * up[i]`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `gate[i] = gelu_tanh(gate[i]) * up[i]` (GeGLU).
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = 0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh()) * u;
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
