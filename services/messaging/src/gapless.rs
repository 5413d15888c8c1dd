//! The gap-free rule, in one place: a consumer of a conversation's messages remembers the
//! highest seq it passed on, and for every next message decides whether it is the next one
//! (pass it on), one it already passed (drop it), or one that skips ahead (the messages in
//! between must be read from history first, or the consumer must say it cannot).
//!
//! Both consumers use it: a feed (one per conversation per instance, over pub/sub, which
//! can drop or repeat) and every stream's subscription (which also sees history replay).

/// What to do with the message numbered `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// It is the next one: pass it on, then [`Cursor::advance`].
    Pass,
    /// Already passed on (or older): drop it.
    Duplicate,
    /// It skips ahead: seqs `after + 1 .. seq` are missing and come first.
    Missing {
        /// The last seq passed on.
        after: u64,
    },
}

/// The highest seq passed on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    passed: u64,
}

impl Cursor {
    /// A cursor that has passed everything up to `seq` (0: nothing yet).
    pub fn at(seq: u64) -> Self {
        Self { passed: seq }
    }

    /// The highest seq passed on.
    pub fn passed(&self) -> u64 {
        self.passed
    }

    /// What to do with message `seq`. Any `u64` may come from the wire or a store, so the
    /// arithmetic saturates: nothing follows `u64::MAX`.
    pub fn check(&self, seq: u64) -> Next {
        if seq <= self.passed {
            Next::Duplicate
        } else if seq == self.passed.saturating_add(1) {
            Next::Pass
        } else {
            Next::Missing { after: self.passed }
        }
    }

    /// Records that `seq` was passed on. Never moves back.
    pub fn advance(&mut self, seq: u64) {
        self.passed = self.passed.max(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn next_duplicate_and_missing() {
        let mut c = Cursor::at(0);
        assert_eq!(c.check(1), Next::Pass);
        c.advance(1);
        assert_eq!(c.check(1), Next::Duplicate);
        assert_eq!(c.check(0), Next::Duplicate);
        assert_eq!(c.check(3), Next::Missing { after: 1 });
        c.advance(0);
        assert_eq!(c.passed(), 1, "a cursor never moves back");
    }

    #[test]
    fn saturates_at_the_top() {
        let c = Cursor::at(u64::MAX);
        assert_eq!(c.check(u64::MAX), Next::Duplicate);
        assert_eq!(Cursor::at(u64::MAX - 1).check(u64::MAX), Next::Pass);
        assert_eq!(Cursor::at(0).check(u64::MAX), Next::Missing { after: 0 });
    }

    proptest! {
        /// Whatever arrives, in whatever order and repetition, a consumer that passes
        /// `Pass`, drops `Duplicate` and fills `Missing` from the complete history passes
        /// every seq exactly once, in order.
        #[test]
        fn passes_every_seq_once_in_order(arrivals in proptest::collection::vec(1u64..60, 0..200)) {
            let mut c = Cursor::default();
            let mut out = Vec::new();
            for seq in arrivals {
                loop {
                    match c.check(seq) {
                        Next::Pass => { out.push(seq); c.advance(seq); break }
                        Next::Duplicate => break,
                        Next::Missing { after } => {
                            // History holds every seq: pass the first missing one.
                            prop_assert_eq!(c.check(after + 1), Next::Pass);
                            out.push(after + 1);
                            c.advance(after + 1);
                        }
                    }
                }
            }
            let expected: Vec<u64> = (1..=c.passed()).collect();
            prop_assert_eq!(out, expected);
        }
    }
}
