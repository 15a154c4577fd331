//! Sharing an operator-wide worker cap between runs (`--max-total-workers`): max-min fair
//! (water-filling). A run never gets more than it asks for; what one run cannot use goes
//! to the others; the remainder of an uneven split goes to the first runs in order.

/// The workers each run may have in flight, given what each asks for (`demands`, in a
/// stable order) and the cap. The result sums to `min(cap, sum(demands))`.
pub fn fair_shares(cap: u32, demands: &[u32]) -> Vec<u32> {
    let mut shares = vec![0u32; demands.len()];
    let mut left = cap;
    // Runs still asking for more, smallest demand first.
    let mut open: Vec<usize> = (0..demands.len()).filter(|&i| demands[i] > 0).collect();
    open.sort_by_key(|&i| (demands[i], i));
    while left > 0 && !open.is_empty() {
        let even = left / open.len() as u32;
        if even == 0 {
            // Fewer workers than runs: one each, in the runs' order.
            let mut order = open.clone();
            order.sort_unstable();
            for i in order.into_iter().take(left as usize) {
                shares[i] += 1;
            }
            break;
        }
        let mut still = Vec::with_capacity(open.len());
        for i in open {
            let give = even.min(demands[i] - shares[i]);
            shares[i] += give;
            left -= give;
            if shares[i] < demands[i] {
                still.push(i);
            }
        }
        open = still;
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(fair_shares(8, &[10, 10]), [4, 4]);
        assert_eq!(fair_shares(8, &[2, 10]), [2, 6]);
        assert_eq!(fair_shares(8, &[2, 3]), [2, 3]);
        assert_eq!(fair_shares(7, &[10, 10]), [4, 3]);
        assert_eq!(fair_shares(2, &[5, 5, 5]), [1, 1, 0]);
        assert_eq!(fair_shares(4, &[0, 9]), [0, 4]);
        assert_eq!(fair_shares(0, &[3]), [0]);
        assert!(fair_shares(5, &[]).is_empty());
    }

    proptest! {
        #[test]
        fn work_conserving_bounded_and_max_min_fair(
            cap in 0u32..200,
            demands in prop::collection::vec(0u32..60, 0..12),
        ) {
            let shares = fair_shares(cap, &demands);
            let total: u32 = shares.iter().sum();
            prop_assert_eq!(total, cap.min(demands.iter().sum()));
            for (s, d) in shares.iter().zip(&demands) {
                prop_assert!(s <= d);
            }
            // Max-min: a run short of its demand has at least as much as any other run,
            // less one for the uneven remainder.
            for (i, (s, d)) in shares.iter().zip(&demands).enumerate() {
                if s < d {
                    for (j, other) in shares.iter().enumerate() {
                        prop_assert!(*other <= s + 1, "run {} has {} while run {} short at {}", j, other, i, s);
                    }
                }
            }
        }
    }
}
