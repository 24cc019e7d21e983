//! Paged KV cache: a pool of fixed-size blocks and the per-layer K/V storage.
//!
//! ```text
//! token position p of a request  ──►  block_table[p / block_size], offset p % block_size
//! slot = block_id * block_size + offset
//! layer storage  V: [num_blocks, block_size, num_kv_heads, head_dim]  (f32 or f16)
//!                     └──────── slot ────────┘
//!                K: [num_blocks, num_kv_heads, head_dim, block_size]  (transposed in a block)
//! ```
//!
//! K is stored transposed inside each block so that attention reads a run of keys of one
//! dimension as contiguous memory: it scores a query against a tile of keys lane by lane
//! (one lane a key), with no transposition when it reads the cache.

use half::f16;
use half::slice::HalfFloatSliceExt;

pub use crate::config::KvDtype;

/// Index of a block in the pool; issued by [`BlockPool::allocate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

#[derive(Debug, Clone)]
struct Block {
    ref_count: u32,
}

/// Flat pool of blocks with a free stack and reference counts; O(1) allocate and free.
#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<Block>,
    free: Vec<BlockId>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        BlockPool {
            blocks: vec![Block { ref_count: 0 }; num_blocks],
            // Reverse so that low ids are handed out first.
            free: (0..num_blocks as u32).rev().map(BlockId).collect(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_used(&self) -> usize {
        self.blocks.len() - self.free.len()
    }

    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = self.free.pop()?;
        let b = &mut self.blocks[id.0 as usize];
        debug_assert_eq!(b.ref_count, 0);
        b.ref_count = 1;
        Some(id)
    }

    /// Drops one reference; the block returns to the free list at zero.
    /// Panics on a double free: that is an engine bug, never input-driven.
    pub fn free(&mut self, id: BlockId) {
        let b = &mut self.blocks[id.0 as usize];
        assert!(b.ref_count > 0, "double free of block {}", id.0);
        b.ref_count -= 1;
        if b.ref_count == 0 {
            self.free.push(id);
        }
    }

    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.blocks[id.0 as usize].ref_count
    }
}

/// Shape of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    /// Bytes per cached token over `num_layers` layers, K and V, in `dtype`.
    pub fn bytes_per_token(num_layers: usize, num_kv_heads: usize, head_dim: usize, dtype: KvDtype) -> usize {
        2 * num_layers * num_kv_heads * head_dim * dtype.bytes()
    }

    /// Values in one slot (one token of one layer, K or V).
    pub fn slot_floats(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Where K of `slot`, KV head `head`, dimension `e` sits in a layer's K storage; the
    /// next dimension is `block_size` further, the next slot of the block one further.
    pub fn k_index(&self, slot: usize, head: usize, e: usize) -> usize {
        let (block, o) = (slot / self.block_size, slot % self.block_size);
        ((block * self.num_kv_heads + head) * self.head_dim + e) * self.block_size + o
    }

    /// Where V of `slot`, KV head `head`, dimension `e` sits (slot-major, as the rows the
    /// model produces).
    pub fn v_index(&self, slot: usize, head: usize, e: usize) -> usize {
        (slot * self.num_kv_heads + head) * self.head_dim + e
    }
}

/// One layer's K or V storage.
#[derive(Debug, Clone)]
pub enum KvBuf {
    F32(Vec<f32>),
    /// IEEE half precision (`--kv-cache-dtype f16`), widened exactly when read.
    F16(Vec<f16>),
}

impl KvBuf {
    fn zeros(dtype: KvDtype, n: usize) -> KvBuf {
        match dtype {
            KvDtype::F32 => KvBuf::F32(vec![0.0; n]),
            KvDtype::F16 => KvBuf::F16(vec![f16::ZERO; n]),
        }
    }

    pub fn as_slice(&self) -> KvSlice<'_> {
        match self {
            KvBuf::F32(v) => KvSlice::F32(v),
            KvBuf::F16(v) => KvSlice::F16(v),
        }
    }

    /// `dst[..src.len()]` from `src`, rounded to nearest even when stored as f16.
    fn store(&mut self, at: usize, src: &[f32]) {
        match self {
            KvBuf::F32(v) => v[at..at + src.len()].copy_from_slice(src),
            KvBuf::F16(v) => v[at..at + src.len()].convert_from_f32_slice(src),
        }
    }

    /// One value, rounded as [`KvBuf::store`] rounds.
    fn store_one(&mut self, at: usize, x: f32) {
        match self {
            KvBuf::F32(v) => v[at] = x,
            KvBuf::F16(v) => v[at] = f16::from_f32(x),
        }
    }
}

/// A layer's K or V storage as attention reads it.
#[derive(Debug, Clone, Copy)]
pub enum KvSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl KvSlice<'_> {
    pub fn len(&self) -> usize {
        match self {
            KvSlice::F32(v) => v.len(),
            KvSlice::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Per-layer K and V storage. Layers marked `windowed` live in the sliding-window pool
/// (`window_blocks` blocks, their own block ids); the others in the main pool.
pub struct KvCache {
    pub layout: KvLayout,
    pub dtype: KvDtype,
    pub k: Vec<KvBuf>,
    pub v: Vec<KvBuf>,
    pub windowed: Vec<bool>,
}

impl KvCache {
    /// An f32 cache of one pool.
    pub fn new(layout: KvLayout) -> Self {
        Self::with_window_pool(layout, KvDtype::F32, 0, &[])
    }

    /// `windowed[l]`: layer l stores its K/V in the window pool of `window_blocks` blocks.
    pub fn with_window_pool(layout: KvLayout, dtype: KvDtype, window_blocks: usize, windowed: &[bool]) -> Self {
        let per_block = layout.block_size * layout.slot_floats();
        let windowed: Vec<bool> = (0..layout.num_layers).map(|l| windowed.get(l).copied().unwrap_or(false)).collect();
        let size = |l: usize| if windowed[l] { window_blocks } else { layout.num_blocks } * per_block;
        KvCache {
            layout,
            dtype,
            k: (0..layout.num_layers).map(|l| KvBuf::zeros(dtype, size(l))).collect(),
            v: (0..layout.num_layers).map(|l| KvBuf::zeros(dtype, size(l))).collect(),
            windowed,
        }
    }

    /// Writes K and V of `tokens` rows (`[tokens, kv_heads * head_dim]`) into their slots
    /// (K transposed within its block: [`KvLayout::k_index`]).
    pub fn write(&mut self, layer: usize, slots: &[usize], k: &[f32], v: &[f32]) {
        let l = self.layout;
        let sf = l.slot_floats();
        let (kc, vc) = (&mut self.k[layer], &mut self.v[layer]);
        for (t, &slot) in slots.iter().enumerate() {
            let krow = &k[t * sf..(t + 1) * sf];
            for h in 0..l.num_kv_heads {
                for e in 0..l.head_dim {
                    kc.store_one(l.k_index(slot, h, e), krow[h * l.head_dim + e]);
                }
            }
            vc.store(l.v_index(slot, 0, 0), &v[t * sf..(t + 1) * sf]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn randomized_allocate_free_keeps_counts_consistent() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut pool = BlockPool::new(64);
        let mut held: Vec<BlockId> = Vec::new();
        for _ in 0..20_000 {
            if rng.random_bool(0.55) {
                match pool.allocate() {
                    Some(id) => {
                        assert!(!held.contains(&id), "block {id:?} handed out twice");
                        held.push(id)
                    }
                    None => assert_eq!(held.len(), 64),
                }
            } else if !held.is_empty() {
                let i = rng.random_range(0..held.len());
                pool.free(held.swap_remove(i));
            }
            assert_eq!(pool.num_used(), held.len());
        }
        for id in held.drain(..) {
            pool.free(id);
        }
        assert_eq!(pool.num_free(), 64);
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_is_caught() {
        let mut pool = BlockPool::new(2);
        let id = pool.allocate().unwrap();
        pool.free(id);
        pool.free(id);
    }
}
