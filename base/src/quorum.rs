//! The fault threshold and quorum sizes of a replica group, one rule for every layer (the
//! ordering engine, the membership, rosters and clients).
//!
//! f = (n - 1) / 3, and at least 1 for n >= 2: a group that a CRL shrank below four replicas
//! stays safe against one faulty replica, at the price of needing every replica (n = 2, 3) to
//! make progress; a quorum is ceil((n + f + 1) / 2), so that any two share f + 1 replicas (one
//! of them correct); a client needs f + 1 matching replies.
//!
//! ```
//! use securesmart_base::quorum::{faults, quorum, reply_quorum};
//! assert_eq!((faults(4), quorum(4), reply_quorum(4)), (1, 3, 2));
//! assert_eq!((faults(3), quorum(3)), (1, 3)); // degraded: every replica is needed
//! assert_eq!((faults(7), quorum(7)), (2, 5));
//! ```

/// Faults a group of `n` replicas withstands in safety.
pub const fn faults(n: usize) -> usize {
    match n {
        0 | 1 => 0,
        2..=3 => 1,
        _ => (n - 1) / 3,
    }
}

/// The quorum of a group of `n`: ceil((n + f + 1) / 2).
pub const fn quorum(n: usize) -> usize {
    (n + faults(n) + 2) / 2
}

/// Matching replies a client needs from a group of `n`: f + 1.
pub const fn reply_quorum(n: usize) -> usize {
    faults(n) + 1
}

/// Whether a group of `n` makes progress with `faults(n)` replicas down (n >= 4; smaller
/// groups are degraded and need every replica).
pub const fn is_live_under_faults(n: usize) -> bool {
    quorum(n) + faults(n) <= n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// For every size: two quorums share f + 1 replicas, and the classic sizes match PBFT's
    /// 2f + 1; from four on, the correct replicas alone form a quorum.
    #[test]
    fn quorums_intersect_and_the_classic_sizes_hold() {
        let table = [
            (1, 0, 1),
            (2, 1, 2),
            (3, 1, 3),
            (4, 1, 3),
            (5, 1, 4),
            (6, 1, 4),
            (7, 2, 5),
            (10, 3, 7),
        ];
        for (n, f, q) in table {
            assert_eq!((faults(n), quorum(n)), (f, q), "n={n}");
        }
        for n in 1..=100usize {
            let (f, q) = (faults(n), quorum(n));
            assert!(q <= n || n == 0, "n={n}");
            assert!(2 * q > n + f, "n={n}: two quorums share f + 1");
            assert_eq!(is_live_under_faults(n), n >= 4 || n == 1, "n={n}");
            if n >= 4 && n % 3 == 1 {
                assert_eq!(q, 2 * f + 1, "n={n}: the classic 2f + 1");
            }
        }
    }
}
