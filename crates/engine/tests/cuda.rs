//! The CUDA backend (feature `cuda`).
//!
//! Without a device: every kernel of `kernels/` compiles through NVRTC for each supported
//! architecture (libnvrtc from the nvidia-cuda-nvrtc-cu12 package; `scripts/test` puts it
//! on `LD_LIBRARY_PATH`), and opening a device on a machine without a driver is an error
//! that says so.
//!
//! On a device (`#[ignore]`, run by `scripts/gpu-check` with `--ignored`): every kernel
//! against the CPU op on fresh random inputs, output buffers poisoned with NaN first, with
//! the tolerance stated at each check; and the timings `gpu-check` records.
#![cfg(feature = "cuda")]

use engine::cpu::attention::{paged_attention, AttnParams, SeqAttn};
use engine::cpu::ops::{self, Rope};
use engine::cpu::quant::quantize_row;
use engine::cpu::quant::{e4m3_to_f32, F8Weight};
use engine::cuda::backend::{DeviceRope, LoraBatch, LoraSite, Norm};
use engine::cuda::gemm::GemmKind;
use engine::cuda::linear::DeviceLinear;
use engine::cuda::kernels::{compile, Arch, KernelCache, SOURCES};
use engine::cuda::{driver_available, CudaBackend};
use engine::threadpool::ThreadPool;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ARCHS: [Arch; 4] =
    [Arch { major: 8, minor: 0 }, Arch { major: 8, minor: 6 }, Arch { major: 8, minor: 9 }, Arch { major: 9, minor: 0 }];

#[test]
fn every_kernel_compiles_with_nvrtc() {
    for arch in ARCHS {
        for src in SOURCES {
            let ptx = compile(src, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(ptx.contains(&format!(".target {arch}")), "{}: {arch}", src.family);
            for f in src.functions {
                assert!(ptx.contains(&format!(".entry {f}(")), "{}: no entry {f} for {arch}", src.family);
            }
        }
    }
}

#[test]
fn the_kernel_cache_stores_and_reuses_ptx() {
    let dir = std::env::temp_dir().join(format!("tessera-kcache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cache = KernelCache::new(Some(&dir));
    let arch = ARCHS[3];
    let src = &SOURCES[2];
    let ptx = cache.get(src, arch).unwrap();
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(std::fs::read_to_string(&files[0]).unwrap(), ptx);
    // A damaged entry is compiled again and replaced.
    std::fs::write(&files[0], "garbage").unwrap();
    assert_eq!(cache.get(src, arch).unwrap(), ptx);
    assert_eq!(std::fs::read_to_string(&files[0]).unwrap(), ptx);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Without a driver, opening a device is an error naming what is missing, not a panic.
#[test]
fn opening_a_device_says_why_it_cannot() {
    match CudaBackend::open(0, &KernelCache::new(None)) {
        Ok(b) => assert!(driver_available(), "opened {} without a driver", b.name),
        Err(e) => {
            let msg = e.to_string();
            if !driver_available() {
                assert!(msg.contains("no CUDA driver"), "{msg}");
            }
        }
    }
}

// ------------------------------------------------------------------ on a device

fn backend() -> CudaBackend {
    let dir = std::env::temp_dir().join("tessera-kernels");
    CudaBackend::open(0, &KernelCache::new(Some(&dir))).unwrap_or_else(|e| panic!("{e}"))
}

/// Fresh inputs each run; `TESSERA_TEST_SEED=<seed>` replays the run a failure printed.
fn rng(name: &str) -> StdRng {
    let seed: u64 = match std::env::var("TESSERA_TEST_SEED") {
        Ok(s) => s.parse().expect("TESSERA_TEST_SEED is a u64"),
        Err(_) => rand::rng().random(),
    };
    println!("{name}: seed {seed}");
    StdRng::seed_from_u64(seed)
}

fn randn(r: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (r.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

/// A device buffer of `n` NaNs: an output the kernel forgets to write shows up.
fn poisoned(b: &CudaBackend, n: usize) -> cudarc::driver::CudaSlice<f32> {
    b.upload(&vec![f32::NAN; n]).unwrap()
}

#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}");
    let mut worst = (0usize, 0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(err <= atol + rtol * w.abs(), "{what}[{i}]: {g} vs {w} (atol {atol}, rtol {rtol})");
        if err > worst.1 {
            worst = (i, err);
        }
    }
    println!("{what}: max abs error {:.3e} at {}", worst.1, worst.0);
}

#[test]
#[ignore = "needs a CUDA device"]
fn rms_norm_matches_cpu() {
    let b = backend();
    let mut r = rng("rms_norm");
    for (rows, dim, offset) in [(1, 576, 0.0), (17, 576, 0.0), (5, 640, 1.0), (3, 4096, 0.0)] {
        let x = randn(&mut r, rows * dim, 3.0);
        let res = randn(&mut r, rows * dim, 3.0);
        let w = randn(&mut r, dim, 1.0);
        let n = Norm { dim, eps: 1e-5, offset };
        let (dx, dw) = (b.upload(&x).unwrap(), b.upload(&w).unwrap());
        let mut out = poisoned(&b, rows * dim);
        b.rms_norm(&dx, &dw, &mut out, n).unwrap();
        let mut want = vec![0f32; rows * dim];
        ops::rms_norm(&x, &w, 1e-5, offset, &mut want);
        // rsqrtf (2 ulp) and a different summation order than the CPU's 8 lanes.
        assert_close("rms_norm", &b.download(&out).unwrap(), &want, 1e-5, 2e-5);

        let mut dres = b.upload(&res).unwrap();
        let mut out = poisoned(&b, rows * dim);
        b.add_rms_norm(&mut dres, &dx, &dw, &mut out, n).unwrap();
        let mut sum = res.clone();
        ops::add_inplace(&mut sum, &x);
        ops::rms_norm(&sum, &w, 1e-5, offset, &mut want);
        assert_eq!(b.download(&dres).unwrap(), sum, "add_rms_norm residual (one f32 add, exact)");
        assert_close("add_rms_norm", &b.download(&out).unwrap(), &want, 1e-5, 2e-5);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn rope_matches_cpu() {
    let b = backend();
    let mut r = rng("rope");
    for (interleaved, heads, hd) in [(false, 9, 64), (true, 3, 64), (false, 4, 256)] {
        let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / hd as f32)).collect();
        let rope = Rope::new(&inv, 4096, interleaved, 1.0);
        let dr: DeviceRope = b.upload_rope(&rope).unwrap();
        let tokens = 19;
        let pos: Vec<i32> = (0..tokens).map(|_| r.random_range(0..4096)).collect();
        let x = randn(&mut r, tokens * heads * hd, 2.0);
        let mut dx = b.upload(&x).unwrap();
        b.rope(&mut dx, &b.upload(&pos).unwrap(), &dr, hd).unwrap();
        let mut want = x.clone();
        for (t, &p) in pos.iter().enumerate() {
            rope.apply(&mut want[t * heads * hd..(t + 1) * heads * hd], hd, p as usize);
        }
        // One rounding of a*c - b*s (FMA on the device) per element.
        assert_close("rope", &b.download(&dx).unwrap(), &want, 1e-6, 1e-6);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gated_activations_match_cpu() {
    let b = backend();
    let mut r = rng("activations");
    let n = 3 * 1536 + 7;
    let (g, u) = (randn(&mut r, n, 6.0), randn(&mut r, n, 2.0));
    let mut dg = b.upload(&g).unwrap();
    b.silu_mul(&mut dg, &b.upload(&u).unwrap()).unwrap();
    let mut want = g.clone();
    ops::silu_mul(&mut want, &u);
    assert_close("silu_mul", &b.download(&dg).unwrap(), &want, 1e-6, 1e-5);
    let mut dg = b.upload(&g).unwrap();
    b.gelu_tanh_mul(&mut dg, &b.upload(&u).unwrap()).unwrap();
    let mut want = g.clone();
    ops::gelu_tanh_mul(&mut want, &u);
    assert_close("gelu_tanh_mul", &b.download(&dg).unwrap(), &want, 1e-6, 1e-5);
}

#[test]
#[ignore = "needs a CUDA device"]
fn embedding_and_cache_write_are_exact() {
    let b = backend();
    let mut r = rng("embedding");
    let (vocab, dim) = (1000, 576);
    let table = randn(&mut r, vocab * dim, 1.0);
    let ids: Vec<i32> = (0..13).map(|_| r.random_range(0..vocab as i32)).collect();
    let mut out = poisoned(&b, ids.len() * dim);
    b.embedding(&b.upload(&table).unwrap(), &b.upload(&ids).unwrap(), &mut out, 1.0).unwrap();
    let want: Vec<f32> = ids.iter().flat_map(|&i| table[i as usize * dim..(i as usize + 1) * dim].to_vec()).collect();
    assert_eq!(b.download(&out).unwrap(), want, "embedding");

    let (slots_total, kv_dim) = (64 * 16, 3 * 64);
    let (k, v) = (randn(&mut r, 13 * kv_dim, 1.0), randn(&mut r, 13 * kv_dim, 1.0));
    let mut slots: Vec<i32> = (0..slots_total as i32).collect();
    for i in (1..slots.len()).rev() {
        slots.swap(i, r.random_range(0..=i));
    }
    slots.truncate(13);
    slots[5] = -1; // padding row: skipped
    let mut kc = poisoned(&b, slots_total * kv_dim);
    let mut vc = poisoned(&b, slots_total * kv_dim);
    b.reshape_and_cache(&b.upload(&k).unwrap(), &b.upload(&v).unwrap(), (&mut kc, &mut vc), &b.upload(&slots).unwrap())
        .unwrap();
    let (kh, vh) = (b.download(&kc).unwrap(), b.download(&vc).unwrap());
    for (t, &s) in slots.iter().enumerate() {
        if s < 0 {
            continue;
        }
        let s = s as usize;
        assert_eq!(&kh[s * kv_dim..(s + 1) * kv_dim], &k[t * kv_dim..(t + 1) * kv_dim]);
        assert_eq!(&vh[s * kv_dim..(s + 1) * kv_dim], &v[t * kv_dim..(t + 1) * kv_dim]);
    }
    let written = kh.iter().filter(|x| !x.is_nan()).count();
    assert_eq!(written, 12 * kv_dim, "only the 12 real rows are written");
}

#[test]
#[ignore = "needs a CUDA device"]
fn activation_quantization_matches_cpu_bitwise() {
    let b = backend();
    let mut r = rng("quant");
    let (rows, k) = (17, 1536);
    let mut x = randn(&mut r, rows * k, 3.0);
    x[k..2 * k].fill(0.0); // an all-zero row: scale 0, codes 0
    let dx = b.upload(&x).unwrap();
    let mut q = b.upload(&vec![99i8; rows * k]).unwrap();
    let mut s = poisoned(&b, rows);
    b.quantize_int8_rows(&dx, &mut q, &mut s).unwrap();
    let (qh, sh) = (b.download(&q).unwrap(), b.download(&s).unwrap());
    let mut f8 = b.upload(&vec![0x55u8; rows * k]).unwrap();
    let mut s8 = poisoned(&b, rows);
    b.quantize_fp8_rows(&dx, &mut f8, &mut s8).unwrap();
    let (f8h, s8h) = (b.download(&f8).unwrap(), b.download(&s8).unwrap());
    for i in 0..rows {
        let row = &x[i * k..(i + 1) * k];
        let mut want = vec![0i8; k];
        let scale = quantize_row(row, &mut want);
        assert_eq!(sh[i], scale, "int8 scale of row {i}");
        assert_eq!(&qh[i * k..(i + 1) * k], &want[..], "int8 codes of row {i}");
        // The same codes as the CPU's per-channel weight quantizer gives a row.
        let want8 = F8Weight::quantize(row, 1, k);
        assert_eq!(s8h[i], want8.scale[0], "fp8 scale of row {i}");
        assert_eq!(&f8h[i * k..(i + 1) * k], &want8.q[..], "fp8 codes of row {i}");
    }
    // Epilogues.
    let n = 96;
    let acc: Vec<i32> = (0..rows * n).map(|_| r.random_range(-100_000..100_000)).collect();
    let sw = randn(&mut r, n, 0.01);
    let mut y = poisoned(&b, rows * n);
    b.dequant_i32(&b.upload(&acc).unwrap(), &s, &b.upload(&sw).unwrap(), &mut y).unwrap();
    let want: Vec<f32> = (0..rows * n).map(|i| acc[i] as f32 * sh[i / n] * sw[i % n]).collect();
    assert_eq!(b.download(&y).unwrap(), want, "dequant_i32");
    let base = randn(&mut r, rows * n, 5.0);
    let mut y = b.upload(&base).unwrap();
    b.scale_rows_cols(&mut y, &s, &b.upload(&sw).unwrap()).unwrap();
    let want: Vec<f32> = (0..rows * n).map(|i| base[i] * (sh[i / n] * sw[i % n])).collect();
    assert_eq!(b.download(&y).unwrap(), want, "scale_rows_cols");
}

#[test]
#[ignore = "needs a CUDA device"]
fn lora_segments_match_the_reference() {
    let b = backend();
    let mut r = rng("lora");
    let (tokens, ind, outd) = (23, 576, 192);
    // Two adapters of ranks 8 and 16 over two sites; at site 1 the first adapter leaves
    // the layer alone (rank 0). Segments: rows 0..5 slot 1, 9..20 slot 0, 20..23 slot 1.
    let sites = 2;
    let ranks = [[8usize, 0], [16, 16]]; // [slot][site]
    let scales = [2.0f32, 0.5];
    let a: Vec<Vec<Vec<f32>>> = ranks.iter().map(|rs| rs.iter().map(|&rk| randn(&mut r, rk * ind, 0.1)).collect()).collect();
    let bt: Vec<Vec<Vec<f32>>> = ranks.iter().map(|rs| rs.iter().map(|&rk| randn(&mut r, rk * outd, 0.1)).collect()).collect();
    let da: Vec<Vec<_>> = a.iter().map(|v| v.iter().map(|w| b.upload(&w.clone().max_len1()).unwrap()).collect()).collect();
    let dbt: Vec<Vec<_>> = bt.iter().map(|v| v.iter().map(|w| b.upload(&w.clone().max_len1()).unwrap()).collect()).collect();
    let segs = [(0usize, 5usize, 1usize), (9, 11, 0), (20, 3, 1)];
    let table = |f: &dyn Fn(usize, usize) -> u64| -> Vec<u64> { (0..2).flat_map(|sl| (0..sites).map(move |st| (sl, st))).map(|(sl, st)| f(sl, st)).collect() };
    let lb = LoraBatch {
        seg_start: b.upload(&segs.map(|s| s.0 as i32)).unwrap(),
        seg_len: b.upload(&segs.map(|s| s.1 as i32)).unwrap(),
        seg_slot: b.upload(&segs.map(|s| s.2 as i32)).unwrap(),
        a_ptrs: b.upload(&table(&|sl, st| b.address(&da[sl][st]))).unwrap(),
        bt_ptrs: b.upload(&table(&|sl, st| b.address(&dbt[sl][st]))).unwrap(),
        ranks: b.upload(&table(&|sl, st| ranks[sl][st] as u64).iter().map(|&v| v as i32).collect::<Vec<_>>()).unwrap(),
        scales: b.upload(&[scales[0], scales[0], scales[1], scales[1]]).unwrap(),
        sites,
        num_segments: segs.len(),
        max_rank: 16,
    };
    let x = randn(&mut r, tokens * ind, 1.0);
    for site in 0..sites {
        let y0 = randn(&mut r, tokens * outd, 1.0);
        let mut y = b.upload(&y0).unwrap();
        let mut t = poisoned(&b, tokens * 16);
        b.lora(&b.upload(&x).unwrap(), &mut y, &mut t, &lb, LoraSite { site, in_dim: ind, out_dim: outd }).unwrap();
        let mut want = y0.clone();
        for &(start, n, slot) in &segs {
            let rk = ranks[slot][site];
            for row in start..start + n {
                let xr = &x[row * ind..(row + 1) * ind];
                let t: Vec<f32> = (0..rk)
                    .map(|j| scales[slot] * xr.iter().zip(&a[slot][site][j * ind..(j + 1) * ind]).map(|(p, q)| p * q).sum::<f32>())
                    .collect();
                for c in 0..outd {
                    want[row * outd + c] += (0..rk).map(|j| t[j] * bt[slot][site][j * outd + c]).sum::<f32>();
                }
            }
        }
        let got = b.download(&y).unwrap();
        // Rows outside every segment (5..9), and rank-0 rows, stay exactly as they were.
        assert_eq!(&got[5 * outd..9 * outd], &y0[5 * outd..9 * outd]);
        if site == 1 {
            assert_eq!(&got[9 * outd..20 * outd], &y0[9 * outd..20 * outd]);
        }
        assert_close(&format!("lora site {site}"), &got, &want, 1e-4, 1e-4);
    }
}

/// A rank-0 site still needs a buffer to point at.
trait MaxLen1 {
    fn max_len1(self) -> Self;
}
impl MaxLen1 for Vec<f32> {
    fn max_len1(mut self) -> Self {
        if self.is_empty() {
            self.push(0.0);
        }
        self
    }
}

/// Each GEMM kind against the CPU arithmetic it stands for, on the odd shapes of the
/// default model (K = 576, 1536; N = 49152 for the head).
#[test]
#[ignore = "needs a CUDA device"]
fn gemms_match_cpu() {
    let b = backend();
    let mut r = rng("gemm");
    let fp8 = (b.arch.major, b.arch.minor) >= (8, 9);
    for (m, n, k) in [(1, 576, 576), (3, 1536, 576), (17, 576, 1536), (128, 192, 576), (5, 49152, 576)] {
        let x = randn(&mut r, m * k, 2.0);
        let w = randn(&mut r, n * k, 0.1);
        let bias = randn(&mut r, n, 1.0);
        let dx = b.upload(&x).unwrap();
        let mut kinds = vec![GemmKind::F32, GemmKind::Bf16, GemmKind::Int8];
        if fp8 {
            kinds.push(GemmKind::Fp8);
        }
        for kind in kinds {
            let lin = DeviceLinear::new(&b, &w, (n, k), Some(&bias), kind).unwrap();
            let mut y = poisoned(&b, m * n);
            lin.forward(&b, &dx, &mut y).unwrap();
            let got = b.download(&y).unwrap();
            // The CPU side of each kind: inputs as the kind sees them, sums in f64.
            let (xs, ws): (Vec<f64>, Vec<f64>) = match kind {
                GemmKind::F32 => (x.iter().map(|&v| v as f64).collect(), w.iter().map(|&v| v as f64).collect()),
                GemmKind::Bf16 => (
                    x.iter().map(|&v| half::bf16::from_f32(v).to_f64()).collect(),
                    w.iter().map(|&v| half::bf16::from_f32(v).to_f64()).collect(),
                ),
                GemmKind::Int8 => {
                    let q = |v: &[f32], rows: usize| {
                        let mut out = Vec::new();
                        for row in v.chunks_exact(k).take(rows) {
                            let mut c = vec![0i8; k];
                            let s = quantize_row(row, &mut c);
                            out.extend(c.iter().map(|&c| c as f64 * s as f64));
                        }
                        out
                    };
                    (q(&x, m), q(&w, n))
                }
                GemmKind::Fp8 => {
                    let fx = F8Weight::quantize(&x, m, k);
                    let fw = F8Weight::quantize(&w, n, k);
                    let d = |f: &F8Weight| -> Vec<f64> {
                        f.q.iter().enumerate().map(|(i, &c)| e4m3_to_f32(c) as f64 * f.scale[i / k] as f64).collect()
                    };
                    (d(&fx), d(&fw))
                }
            };
            let mut want = vec![0f32; m * n];
            let mut mag = vec![0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    let (a, c) = (&xs[i * k..(i + 1) * k], &ws[j * k..(j + 1) * k]);
                    want[i * n + j] = (a.iter().zip(c).map(|(p, q)| p * q).sum::<f64>() + bias[j] as f64) as f32;
                    mag[i * n + j] = a.iter().zip(c).map(|(p, q)| (p * q).abs()).sum::<f64>() as f32 + bias[j].abs();
                }
            }
            // Same inputs on both sides, so only the summation differs: a few f32 ulps of
            // the sum of |terms| (INT8's sums are exact integers; its scales are f32).
            for (i, ((&g, &wv), &mg)) in got.iter().zip(&want).zip(&mag).enumerate() {
                assert!((g - wv).abs() <= 1e-5 * mg + 1e-6, "{kind:?} m{m} n{n} k{k} [{i}]: {g} vs {wv}");
            }
        }
        println!("gemm m{m} n{n} k{k}: ok");
    }
}

struct AttnCase {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// (query_len, context_len) per sequence.
    seqs: Vec<(usize, usize)>,
    modifier: usize,
}

/// Runs one batch on both paths; returns the number of key-range partitions used.
fn attention_case(b: &CudaBackend, pool: &ThreadPool, r: &mut StdRng, c: &AttnCase) -> usize {
    let bs = 16;
    let tokens: usize = c.seqs.iter().map(|s| s.0).sum();
    let blocks: usize = c.seqs.iter().map(|s| s.1.div_ceil(bs)).sum::<usize>() + 3;
    // Shuffled block ids: paging is exercised, not a contiguous layout.
    let mut ids: Vec<u32> = (0..blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, r.random_range(0..=i));
    }
    let mut tables = Vec::new();
    let mut next = 0;
    for &(_, ctx) in &c.seqs {
        let n = ctx.div_ceil(bs);
        tables.push(ids[next..next + n].to_vec());
        next += n;
    }
    let mut seqs = Vec::new();
    let mut start = 0;
    for (i, &(ql, ctx)) in c.seqs.iter().enumerate() {
        seqs.push(SeqAttn { query_start: start, query_len: ql, context_len: ctx, block_table: &tables[i] });
        start += ql;
    }
    let slopes: Vec<f32> = (0..c.heads).map(|h| 2f32.powf(-8.0 * (h + 1) as f32 / c.heads as f32)).collect();
    let p = AttnParams {
        num_heads: c.heads,
        num_kv_heads: c.kv_heads,
        head_dim: c.head_dim,
        block_size: bs,
        scale: 1.0 / (c.head_dim as f32).sqrt(),
        sliding_window: (c.modifier == 1).then_some(45),
        softcap: (c.modifier == 2).then_some(5.0),
        alibi_slopes: (c.modifier == 3).then_some(&slopes[..]),
    };
    let kv = blocks * bs * c.kv_heads * c.head_dim;
    let q = randn(r, tokens * c.heads * c.head_dim, 1.0);
    let (kc, vc) = (randn(r, kv, 1.0), randn(r, kv, 1.0));
    // The device cache is slot-major for K and V; the CPU keeps K transposed within each
    // block: the same values, moved to the CPU's layout for the reference.
    let layout = engine::kv_cache::KvLayout { num_layers: 1, num_blocks: blocks, block_size: bs, num_kv_heads: c.kv_heads, head_dim: c.head_dim };
    let mut kc_cpu = vec![f32::NAN; kv];
    for slot in 0..blocks * bs {
        for h in 0..c.kv_heads {
            for e in 0..c.head_dim {
                kc_cpu[layout.k_index(slot, h, e)] = kc[layout.v_index(slot, h, e)];
            }
        }
    }
    let mut want = vec![0f32; q.len()];
    paged_attention(pool, &q, engine::kv_cache::KvSlice::F32(&kc_cpu), engine::kv_cache::KvSlice::F32(&vc), &seqs, &p, &mut want);
    let plan = b.plan_attention(&seqs, &p).unwrap();
    let mut out = poisoned(b, q.len());
    let alibi = b.upload(&slopes).unwrap();
    b.paged_attention(
        &b.upload(&q).unwrap(),
        (&b.upload(&kc).unwrap(), &b.upload(&vc).unwrap()),
        &plan,
        &p,
        (c.modifier == 3).then_some(&alibi),
        &mut out,
    )
    .unwrap();
    let got = b.download(&out).unwrap();
    let what = format!(
        "attention {}/{} d{} mod{} parts{} {:?}",
        c.heads, c.kv_heads, c.head_dim, c.modifier, plan.plan.num_partitions, c.seqs
    );
    // Outputs are convex combinations of V rows in [-1, 1]; fp32 with other summation
    // orders and expf of the device's math library.
    assert_close(&what, &got, &want, 2e-5, 1e-4);
    plan.plan.num_partitions
}

#[test]
#[ignore = "needs a CUDA device"]
fn paged_attention_matches_cpu() {
    let b = backend();
    let pool = ThreadPool::new(4);
    let mut r = rng("attention");
    let mixed = vec![(1, 40), (37, 37), (5, 300), (1, 1), (16, 100), (1, 2000)];
    for (heads, kv_heads, head_dim) in [(9, 3, 64), (4, 1, 256), (8, 8, 128), (32, 1, 64), (6, 2, 80)] {
        for modifier in 0..4 {
            let c = AttnCase { heads, kv_heads, head_dim, seqs: mixed.clone(), modifier };
            attention_case(&b, &pool, &mut r, &c);
        }
    }
    // Decode at long contexts: the key range is split into partitions and reduced.
    let c = AttnCase { heads: 9, kv_heads: 3, head_dim: 64, seqs: vec![(1, 4096), (1, 1500), (1, 513)], modifier: 0 };
    assert!(attention_case(&b, &pool, &mut r, &c) > 1);
    let c = AttnCase { heads: 9, kv_heads: 3, head_dim: 64, seqs: vec![(1, 4096), (3, 3000)], modifier: 1 };
    attention_case(&b, &pool, &mut r, &c);
}

/// Seconds per call of `f`, averaged over `reps` after one warm-up, device synchronized.
fn time(b: &CudaBackend, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    b.synchronize().unwrap();
    let t = std::time::Instant::now();
    for _ in 0..reps {
        f();
    }
    b.synchronize().unwrap();
    t.elapsed().as_secs_f64() / reps as f64
}

/// Contiguous sequences of `ctx` tokens each (block ids in order), one query per
/// sequence (decode) or `ctx` queries (prefill).
fn timing_batch(batch: usize, ctx: usize, decode: bool) -> (Vec<Vec<u32>>, Vec<(usize, usize)>) {
    let per = ctx.div_ceil(16);
    let tables = (0..batch).map(|s| (s * per..(s + 1) * per).map(|v| v as u32).collect()).collect();
    (tables, (0..batch).map(|_| (if decode { 1 } else { ctx }, ctx)).collect())
}

/// The timings `scripts/gpu-check` records, as `TIMING {json}` lines. No asserts on time.
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_timings() {
    let b = backend();
    // Copy bandwidth: device to device, 1 GiB each way.
    let n = 1 << 28;
    let src = b.zeros::<f32>(n).unwrap();
    let mut dst = b.zeros::<f32>(n).unwrap();
    let t = time(&b, 20, || b.stream.memcpy_dtod(&src, &mut dst).unwrap());
    let copy = 2.0 * 4.0 * n as f64 / t;
    println!("TIMING {{\"what\":\"copy\",\"bytes_per_s\":{copy:.4e}}}");
    drop((src, dst));
    // GEMMs at the M against bf16, N = K = 4096, activation quantization included.
    let (n, k) = (4096, 4096);
    let w = vec![0.01f32; n * k];
    let mut kinds = vec![GemmKind::Bf16, GemmKind::Int8, GemmKind::F32];
    if (b.arch.major, b.arch.minor) >= (8, 9) {
        kinds.push(GemmKind::Fp8);
    }
    let lins: Vec<_> = kinds.iter().map(|&kd| DeviceLinear::new(&b, &w, (n, k), None, kd).unwrap()).collect();
    for m in [1usize, 16, 256, 4096] {
        let x = b.upload(&vec![0.5f32; m * k]).unwrap();
        let mut y = b.zeros::<f32>(m * n).unwrap();
        for lin in &lins {
            let t = time(&b, 20, || lin.forward(&b, &x, &mut y).unwrap());
            println!(
                "TIMING {{\"what\":\"gemm\",\"kind\":\"{:?}\",\"m\":{m},\"n\":{n},\"k\":{k},\"seconds\":{t:.4e},\"tflops\":{:.3}}}",
                lin.kind(),
                2.0 * (m * n * k) as f64 / t / 1e12
            );
        }
    }
    drop(lins);
    for (heads, kvh, d) in [(9usize, 3usize, 64usize), (32, 8, 128)] {
        for decode in [true, false] {
            let (batch, ctx) = if decode { (64, 4096) } else { (4, 1024) };
            let (tables, shape) = timing_batch(batch, ctx, decode);
            let mut seqs = Vec::new();
            let mut start = 0;
            for (i, &(ql, c)) in shape.iter().enumerate() {
                seqs.push(SeqAttn { query_start: start, query_len: ql, context_len: c, block_table: &tables[i] });
                start += ql;
            }
            let p = AttnParams {
                num_heads: heads,
                num_kv_heads: kvh,
                head_dim: d,
                block_size: 16,
                scale: 1.0 / (d as f32).sqrt(),
                sliding_window: None,
                softcap: None,
                alibi_slopes: None,
            };
            let slots = batch * ctx.div_ceil(16) * 16;
            let kc = b.zeros::<f32>(slots * kvh * d).unwrap();
            let vc = b.zeros::<f32>(slots * kvh * d).unwrap();
            let q = b.upload(&vec![0.01f32; start * heads * d]).unwrap();
            let mut out = b.zeros::<f32>(start * heads * d).unwrap();
            let plan = b.plan_attention(&seqs, &p).unwrap();
            let t = time(&b, 20, || b.paged_attention(&q, (&kc, &vc), &plan, &p, None, &mut out).unwrap());
            let kv_bytes = (2 * batch * ctx * kvh * d * 4) as f64;
            if decode {
                println!(
                    "TIMING {{\"what\":\"decode_attention\",\"batch\":{batch},\"ctx\":{ctx},\"heads\":{heads},\"kv_heads\":{kvh},\"head_dim\":{d},\"partitions\":{},\"seconds\":{t:.4e},\"kv_bytes_per_s\":{:.4e},\"fraction_of_copy\":{:.3}}}",
                    plan.plan.num_partitions,
                    kv_bytes / t,
                    kv_bytes / t / copy
                );
            } else {
                let flops = 4.0 * batch as f64 * (ctx * (ctx + 1) / 2) as f64 * (heads * d) as f64;
                println!(
                    "TIMING {{\"what\":\"prefill_attention\",\"batch\":{batch},\"ctx\":{ctx},\"heads\":{heads},\"kv_heads\":{kvh},\"head_dim\":{d},\"seconds\":{t:.4e},\"tflops\":{:.3}}}",
                    flops / t / 1e12
                );
            }
        }
    }
}
