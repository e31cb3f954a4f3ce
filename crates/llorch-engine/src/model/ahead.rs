//! Which rows of a CUDA-graph decode step a step launched ahead already computed
//! ([`super::graph::GraphDecoder::step`]). Pure bookkeeping, kept apart from the CUDA code so
//! that its rules are tested on every build.
//!
//! A row is `(token, position, slot)`. After a step whose rows are each their sequence's only
//! one, the graph decoder launches the step after it before the host has read its picks: row
//! i continues row i with its pick at the next position. The engine's next call may differ
//! (a sequence ended, a request arrived, a slot changed hands), so each of its rows takes the
//! pick computed ahead only where that is the same computation.

/// `(token, position, slot)`.
pub type Row = (u32, usize, usize);

/// For each row of `items`, the row of `ahead` that computed it: the same token, position
/// and slot, where the slot has no other row in `items`. A slot with several rows is a
/// prompt fed at consecutive positions (a new owner of the slot, whatever its tokens), so none
/// of its rows is taken from ahead.
pub fn match_rows(ahead: &[Row], items: &[Row]) -> Vec<Option<usize>> {
    items
        .iter()
        .map(|r| {
            ahead
                .iter()
                .position(|x| x == r)
                .filter(|_| single(items, r.2))
        })
        .collect()
}

/// Whether the step after `items` may be launched ahead: every row its slot's only one, with
/// a next position inside the slot's `cap` positions.
pub fn can_continue(items: &[Row], cap: usize) -> bool {
    items
        .iter()
        .all(|&(_, pos, slot)| pos + 1 < cap && single(items, slot))
}

/// The rows of the step launched after `items`: each fed its pick at the next position.
pub fn continued(items: &[Row], picks: &[(u32, f32)]) -> Vec<Row> {
    items
        .iter()
        .zip(picks)
        .map(|(&(_, pos, slot), &(tok, _))| (tok, pos + 1, slot))
        .collect()
}

fn single(items: &[Row], slot: usize) -> bool {
    items.iter().filter(|r| r.2 == slot).count() == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_batch_is_taken_whole_in_any_order() {
        let step = [(5, 10, 0), (7, 3, 2)];
        let ahead = continued(&step, &[(11, -0.1), (12, -0.2)]);
        assert_eq!(ahead, vec![(11, 11, 0), (12, 4, 2)]);
        assert_eq!(
            match_rows(&ahead, &[(12, 4, 2), (11, 11, 0)]),
            vec![Some(1), Some(0)]
        );
    }

    #[test]
    fn an_ended_sequence_leaves_the_others_matched() {
        let ahead = [(11, 11, 0), (12, 4, 2), (13, 8, 5)];
        assert_eq!(
            match_rows(&ahead, &[(11, 11, 0), (13, 8, 5)]),
            vec![Some(0), Some(2)]
        );
    }

    #[test]
    fn a_new_prompt_in_a_reused_slot_is_never_taken_from_ahead() {
        // slot 0's sequence ended; a new prompt there happens to have the same token at the
        // same position as the row computed ahead, which attended to the old sequence
        let ahead = [(11, 2, 0), (12, 4, 2)];
        let items = [(12, 4, 2), (9, 0, 0), (10, 1, 0), (11, 2, 0)];
        assert_eq!(match_rows(&ahead, &items), vec![Some(1), None, None, None]);
        assert!(!can_continue(&items, 100));
    }

    #[test]
    fn another_token_or_position_is_not_the_same_computation() {
        let ahead = [(11, 11, 0)];
        assert_eq!(match_rows(&ahead, &[(10, 11, 0)]), vec![None]);
        assert_eq!(match_rows(&ahead, &[(11, 12, 0)]), vec![None]);
        assert_eq!(match_rows(&ahead, &[(11, 11, 1)]), vec![None]);
    }

    #[test]
    fn no_step_ahead_past_the_slot() {
        assert!(can_continue(&[(1, 98, 0), (2, 5, 1)], 100));
        assert!(!can_continue(&[(1, 99, 0), (2, 5, 1)], 100));
    }
}
