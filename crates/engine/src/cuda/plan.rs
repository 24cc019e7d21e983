//! Host side of the CUDA paged attention: how a packed batch is cut into tiles of
//! (query, head) rows and key-range partitions. Plain data, tested without a device.

use crate::cpu::attention::{AttnParams, SeqAttn};

/// (query, head) rows per thread block: `MAX_ROWS` in `kernels/attention.cu`.
pub const MAX_ROWS: usize = 16;
/// Key positions per partition when the key range is split.
pub const PARTITION: usize = 512;
/// Largest head size the kernel keeps in registers (`MAX_D`).
pub const MAX_HEAD_DIM: usize = 256;

/// One launch's tables, ready to upload (all `i32`, as the kernel reads them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttnPlan {
    /// `[tiles, 5]`: sequence, first query, queries, first head within the group, heads.
    pub tiles: Vec<i32>,
    pub query_start: Vec<i32>,
    pub query_len: Vec<i32>,
    pub context_len: Vec<i32>,
    /// `[seqs, max_blocks]`, padded with 0.
    pub block_tables: Vec<i32>,
    pub max_blocks: usize,
    pub num_partitions: usize,
}

impl AttnPlan {
    /// Tiles every sequence's rows; splits the key range when the tiles alone would leave
    /// most of the `sms` multiprocessors idle and the context is long.
    pub fn new(seqs: &[SeqAttn<'_>], p: &AttnParams<'_>, sms: usize) -> AttnPlan {
        let group = p.num_heads / p.num_kv_heads;
        let (nh, qt) = if group >= MAX_ROWS { (MAX_ROWS, 1) } else { (group, MAX_ROWS / group) };
        let mut tiles = Vec::new();
        for (s, seq) in seqs.iter().enumerate() {
            for q0 in (0..seq.query_len).step_by(qt) {
                let nq = qt.min(seq.query_len - q0);
                for h0 in (0..group).step_by(nh) {
                    tiles.extend([s, q0, nq, h0, nh.min(group - h0)].map(|v| v as i32));
                }
            }
        }
        let max_blocks = seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0).max(1);
        let mut block_tables = vec![0i32; seqs.len() * max_blocks];
        for (s, seq) in seqs.iter().enumerate() {
            for (j, &b) in seq.block_table.iter().enumerate() {
                block_tables[s * max_blocks + j] = b as i32;
            }
        }
        let max_ctx = seqs.iter().map(|s| s.context_len).max().unwrap_or(0);
        let blocks = tiles.len() / 5 * p.num_kv_heads;
        let num_partitions = if blocks < 2 * sms && max_ctx > PARTITION { max_ctx.div_ceil(PARTITION) } else { 1 };
        AttnPlan {
            tiles,
            query_start: seqs.iter().map(|s| s.query_start as i32).collect(),
            query_len: seqs.iter().map(|s| s.query_len as i32).collect(),
            context_len: seqs.iter().map(|s| s.context_len as i32).collect(),
            block_tables,
            max_blocks,
            num_partitions,
        }
    }

    pub fn num_tiles(&self) -> usize {
        self.tiles.len() / 5
    }

    /// Dynamic shared memory of one block: q rows, the padded K tile and the V tile.
    pub fn shared_bytes(head_dim: usize) -> usize {
        4 * (MAX_ROWS * head_dim + 32 * (head_dim + 1) + 32 * head_dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(h: usize, kvh: usize) -> AttnParams<'static> {
        AttnParams {
            num_heads: h,
            num_kv_heads: kvh,
            head_dim: 64,
            block_size: 16,
            scale: 0.125,
            sliding_window: None,
            softcap: None,
            alibi_slopes: None,
        }
    }

    /// Every (token, head) of the batch is a row of exactly one tile per KV head group.
    #[test]
    fn tiles_cover_every_query_head_once() {
        let table: Vec<u32> = (0..300).collect();
        for (h, kvh) in [(9, 3), (4, 1), (32, 1), (8, 8), (48, 2)] {
            let seqs = [
                SeqAttn { query_start: 0, query_len: 1, context_len: 40, block_table: &table[..3] },
                SeqAttn { query_start: 1, query_len: 37, context_len: 37, block_table: &table[..3] },
                SeqAttn { query_start: 38, query_len: 5, context_len: 4000, block_table: &table[..250] },
            ];
            let p = params(h, kvh);
            let plan = AttnPlan::new(&seqs, &p, 132);
            let group = h / kvh;
            let mut seen = vec![0u32; 43 * group];
            for t in plan.tiles.chunks_exact(5) {
                let [s, q0, nq, h0, nh] = [t[0], t[1], t[2], t[3], t[4]].map(|v| v as usize);
                assert!(nq * nh <= MAX_ROWS && nq >= 1 && nh >= 1);
                for qi in q0..q0 + nq {
                    for hh in h0..h0 + nh {
                        seen[(seqs[s].query_start + qi) * group + hh] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{h}/{kvh}");
            assert_eq!(plan.max_blocks, 250);
            assert_eq!(plan.block_tables[2 * 250 + 249], 249);
        }
    }

    #[test]
    fn long_contexts_split_only_when_blocks_are_few() {
        let table: Vec<u32> = (0..300).collect();
        let one = [SeqAttn { query_start: 0, query_len: 1, context_len: 4096, block_table: &table[..256] }];
        assert_eq!(AttnPlan::new(&one, &params(9, 3), 132).num_partitions, 8);
        let short = [SeqAttn { query_start: 0, query_len: 1, context_len: 300, block_table: &table[..19] }];
        assert_eq!(AttnPlan::new(&short, &params(9, 3), 132).num_partitions, 1);
        let many: Vec<_> = (0..128)
            .map(|i| SeqAttn { query_start: i, query_len: 1, context_len: 4096, block_table: &table[..256] })
            .collect();
        assert_eq!(AttnPlan::new(&many, &params(9, 3), 132).num_partitions, 1);
    }
}
