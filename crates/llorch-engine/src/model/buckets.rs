//! Which decode-attention kernel of `decode.cu` a batch bucket of the CUDA graph takes
//! ([`super::graph`]). Kept apart from the CUDA code so that the choice, measured on the H100
//! bucket by bucket (`bench/README.md`), is tested on every build.

/// A decode-attention kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attention {
    /// `attention_one`: one sequence, a 512-thread block per KV head and chunk of positions,
    /// started on SMs that the QKV product leaves free.
    One,
    /// `attention_split`: a block per query head and chunk of positions.
    Split,
    /// `attention_split_small`: the same in blocks of 64 threads, so more of them start beside
    /// the QKV product's.
    SplitSmall,
    /// `attention_gqa`: a block per KV head and chunk, each cached key and value read once for
    /// the query heads that share it.
    Gqa,
    /// `attention_group`: a block per KV head, all positions.
    Group,
}

impl Attention {
    /// Whether the kernel splits positions into chunks, combined by the last block to finish
    /// (it takes the chunk results' buffer and counters).
    pub fn chunked(self) -> bool {
        self != Attention::Group
    }
}

/// The kernel for a bucket of `nb` rows; `gqa`: whether `attention_gqa` suits the model (at
/// most `ATT_GMAX` query heads per KV head, its shared memory within bounds); `one`: whether
/// `attention_one` does (head size 64 as well).
///
/// Measured with `bench/gpu/kernels.py` (H100, TinyLlama shape, Q4_K step): at 1 row
/// `attention_one` on SMs of its own (position 600 0.602 -> 0.577 ms, 2,000: 0.700 -> 0.632,
/// 3,500: 0.817 -> 0.696; 1-2% slower under 250 positions), else a block per query head; at 2
/// a block per query head (`attention_gqa`'s larger blocks start late beside the QKV product:
/// batch 1 0.635 vs 0.812 ms); at 4, 8 and 16 `attention_gqa` (batch 8 2.582 -> 2.217 ms,
/// 16: 2.328 -> 2.246 against `attention_group`); at 32 `attention_group` (3.165 ms with
/// `attention_gqa`'s 2,048 blocks against 2.906).
pub fn attention_for(nb: usize, gqa: bool, one: bool) -> Attention {
    match nb {
        0 | 1 if one => Attention::One,
        0 | 1 => Attention::Split,
        2 => Attention::SplitSmall,
        4..=16 if gqa => Attention::Gqa,
        _ if nb < 16 => Attention::Split,
        _ => Attention::Group,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels of the buckets 1, 2, 4, 8, 16 and 32.
    fn picks(gqa: bool, one: bool) -> Vec<Attention> {
        [1, 2, 4, 8, 16, 32]
            .iter()
            .map(|&nb| attention_for(nb, gqa, one))
            .collect()
    }

    #[test]
    fn buckets_take_the_measured_kernels() {
        use Attention::*;
        assert_eq!(picks(true, true), [One, SplitSmall, Gqa, Gqa, Gqa, Group]);
    }

    #[test]
    fn without_attention_one_a_single_row_takes_a_block_per_query_head() {
        use Attention::*;
        assert_eq!(
            picks(true, false),
            [Split, SplitSmall, Gqa, Gqa, Gqa, Group]
        );
    }

    #[test]
    fn without_gqa_the_chunked_kernels_go_up_to_8_then_a_block_per_kv_head() {
        use Attention::*;
        assert_eq!(
            picks(false, false),
            [Split, SplitSmall, Split, Split, Group, Group]
        );
    }

    #[test]
    fn only_the_block_per_kv_head_takes_no_chunk_buffers() {
        use Attention::*;
        assert!([One, Split, SplitSmall, Gqa].iter().all(|k| k.chunked()));
        assert!(!Group.chunked());
    }
}
