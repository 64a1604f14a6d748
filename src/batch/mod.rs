//! Batch ceremonies: a directory of CSRs (with a manifest, one profile for all, or kubeadm's
//! `generate-csr` layout), planned without the token, reviewed, then signed in one sitting.
//!
//! Planning parses, verifies and decides every CSR in parallel and writes a plan with a
//! content hash. Signing refuses a plan whose inputs changed and logs the plan's hash (or, for
//! `sign-dir INPUT`, decides each chunk as it goes and logs the hash at the end). Then a
//! pipeline, in chunks: while the token sessions sign one chunk, the next is decided and its
//! TBSs built on every core; one append (one fsync) commits the finished chunk's results with
//! the next chunk's intents, one checkpoint follows, and only then are the finished chunk's
//! files written. Sessions only sign; verifier threads check each certificate before its
//! result is logged. A refused CSR never stops the rest, and a rerun writes out what the log
//! already holds instead of issuing it again.

mod output;
mod pipeline;
mod plan;

pub use output::{Done, Report, ReportFile};
pub use pipeline::{sign, sign_input};
pub use plan::{Allowed, Item, ManifestEntry, Plan, Verdict, plan, read_plan};

/// How many CSRs are decided, logged and signed together: one append (one fsync) carries a
/// finished chunk's results and the next chunk's intents, then one checkpoint. Bounds memory:
/// at most three chunks are held at a time.
pub const CHUNK: usize = 512;

/// The first chunk's size. Chunks double from here up to [`CHUNK`], so the token starts
/// signing after a few CSRs are decided instead of waiting for a whole chunk.
const FIRST_CHUNK: usize = 32;

/// The ranges of a batch of `len` CSRs that are staged, logged and signed together.
fn chunk_ranges(len: usize) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let (mut start, mut size) = (0, FIRST_CHUNK);
    while start < len {
        let end = (start + size).min(len);
        ranges.push(start..end);
        (start, size) = (end, (size * 2).min(CHUNK));
    }
    ranges
}

/// How many certificates a token session takes from its queue at a time.
const JOB: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_ramp_up_then_cover_the_batch_in_order() {
        assert!(chunk_ranges(0).is_empty());
        assert_eq!(chunk_ranges(5), vec![0..5]);
        let ranges = chunk_ranges(10_000);
        let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
        assert_eq!(sizes[..6], [32, 64, 128, 256, 512, 512]);
        assert!(sizes.iter().all(|s| *s <= CHUNK));
        // Contiguous, in order, nothing left out.
        assert_eq!(ranges[0].start, 0);
        assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(ranges.last().map(|r| r.end), Some(10_000));
    }
}
