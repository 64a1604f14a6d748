//! Random bytes we can stand behind: a health check on what the token's RNG returns, mixing
//! with the operating system's RNG, and a bounded draw of unique serials.
//!
//! Real tokens have shipped broken RNGs, and a CA with guessable serials or colliding key ids
//! has lost its point. So every draw from `C_GenerateRandom` is checked here before use
//! ([`check`]), then mixed with 32 bytes from the OS ([`mix`]) so that a weak token RNG alone
//! cannot make serials or key ids guessable; the OS RNG alone cannot either, since a healthy
//! token's bytes go into the same hash.
//!
//! The health tests follow NIST SP 800-90B §4.4, scaled to what is drawn. Each byte is one
//! sample; a token RNG is a DRBG whose output should be indistinguishable from uniform, so the
//! assumed min-entropy is H = 8 bits a byte, and each test is set for a false-alarm probability
//! of α = 2⁻⁶⁴ per application (per run of bytes, per window, per draw):
//!
//! - **all zero**: a draw of 8 or more bytes that is all zero (chance 2⁻⁶⁴ or less);
//! - **repeat of an earlier draw**: the first min(16, both lengths) bytes, at least 8, equal
//!   those of one of the token's last [`HISTORY`] draws (a stuck RNG, or one cycling through a
//!   few values; chance 2⁻⁶⁴ or less a pair);
//! - **repeated block**: two aligned 16-byte blocks of one draw are equal (chance 2⁻¹²⁸ a pair);
//! - **repetition count** (§4.4.1): a run of C = 1 + ⌈64 / H⌉ = 9 equal bytes;
//! - **adaptive proportion** (§4.4.2): in each window of W = 512 bytes (the last, shorter window
//!   too, if it has at least 16), the window's first byte occurs C times or more, where C is the
//!   smallest count with P(1 + Binomial(W − 1, 1/256) ≥ C) ≤ 2⁻⁶⁴: 27 for W = 512, 11 for
//!   W = 16 ([`apt_cutoff`]).
//!
//! The largest draw hsmca makes (16 bytes × 512 serials = 8,192 bytes) applies the repetition
//! count test to 8,192 runs and the proportion test to 16 windows, so a healthy token fails a
//! draw with a probability below 2⁻⁵⁰: a failure means the token, not bad luck.
//!
//! Pure: no token, file system or clock; the OS bytes come in as an argument of [`mix`], and
//! the token keeps its own [`Monitor`] (the memory of earlier draws).

use ring::digest::{Context, SHA256};

/// Assumed min-entropy of one byte of token output, in bits (SP 800-90B's H).
pub const MIN_ENTROPY_BITS: u32 = 8;
/// The false-alarm probability of each test application is 2^-`ALPHA_BITS`.
pub const ALPHA_BITS: u32 = 64;
/// Repetition count cutoff: 1 + ⌈α bits / H⌉ equal bytes in a row fail (SP 800-90B §4.4.1).
pub const RCT_CUTOFF: usize = 1 + ALPHA_BITS.div_ceil(MIN_ENTROPY_BITS) as usize;
/// Adaptive proportion window for non-binary samples (SP 800-90B §4.4.2).
pub const APT_WINDOW: usize = 512;
/// Shortest window the proportion test is applied to; shorter ones cannot reach a cutoff.
pub const APT_MIN_WINDOW: usize = 16;
/// Size of the blocks compared by the repeated-block test (one serial).
pub const BLOCK: usize = 16;
/// How many earlier draws the repeat test remembers (their first 16 bytes each).
pub const HISTORY: usize = 1024;
/// Fewest bytes the all-zero and repeat tests look at (2⁻⁶⁴ false alarms).
const MIN_COMPARED: usize = 8;
/// Serial length in bytes: positive 16-byte DER INTEGERs.
pub const SERIAL_LEN: usize = 16;
/// Rounds [`unique_serials`] draws before it gives up: with a healthy RNG a serial repeats
/// with a probability near 2⁻¹⁰⁰, so a second round is already a sign of trouble.
pub const SERIAL_ROUNDS: usize = 4;
/// Domain separation for [`mix`].
const MIX_DOMAIN: &[u8] = b"hsmca rng mix v1";

/// Which health test a draw from the token failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthFailure {
    /// Every byte was zero.
    #[error("all-zero test: {len} bytes, all zero")]
    AllZero {
        /// Bytes drawn.
        len: usize,
    },
    /// The draw began with the same bytes as an earlier one.
    #[error(
        "repeat test: the draw begins with the same {compared} bytes as the draw {back} before it"
    )]
    RepeatOfEarlier {
        /// Bytes compared.
        compared: usize,
        /// How many draws back the repeated one was (1: the previous draw).
        back: usize,
    },
    /// Two aligned 16-byte blocks were equal.
    #[error("repeated-block test: 16-byte blocks {first} and {second} are equal")]
    RepeatedBlock {
        /// Index of the first block.
        first: usize,
        /// Index of the block that repeats it.
        second: usize,
    },
    /// A run of equal bytes reached the cutoff (SP 800-90B §4.4.1).
    #[error(
        "repetition count test (SP 800-90B 4.4.1): byte {byte:#04x} {run} times in a row at offset {offset}, cutoff {cutoff}"
    )]
    RepetitionCount {
        /// The repeated byte.
        byte: u8,
        /// Length of the run.
        run: usize,
        /// Where the run starts.
        offset: usize,
        /// The cutoff.
        cutoff: usize,
    },
    /// A byte was too frequent in a window (SP 800-90B §4.4.2).
    #[error(
        "adaptive proportion test (SP 800-90B 4.4.2): byte {byte:#04x} {count} times in the {window}-byte window at offset {offset}, cutoff {cutoff}"
    )]
    AdaptiveProportion {
        /// The frequent byte.
        byte: u8,
        /// How often it occurred.
        count: usize,
        /// Window length.
        window: usize,
        /// Where the window starts.
        offset: usize,
        /// The cutoff for that window length.
        cutoff: usize,
    },
}

/// The health of one token's RNG over its draws: remembers the start of the last [`HISTORY`]
/// draws for the repeat test.
#[derive(Debug, Default)]
pub struct Monitor {
    /// First bytes of earlier draws, most recent last.
    recent: std::collections::VecDeque<Vec<u8>>,
}

impl Monitor {
    /// Checks one draw ([`check`] against the remembered draws) and, if it passes,
    /// remembers it.
    pub fn check(&mut self, bytes: &[u8]) -> Result<(), HealthFailure> {
        check(bytes, self.recent.iter().rev().map(Vec::as_slice))?;
        if self.recent.len() == HISTORY {
            self.recent.pop_front();
        }
        self.recent
            .push_back(bytes[..bytes.len().min(BLOCK)].to_vec());
        Ok(())
    }
}

/// Checks one draw from the token's RNG; `earlier` are earlier draws (or their first 16
/// bytes), most recent first. Returns the first test that fails.
pub fn check<'a>(
    bytes: &[u8],
    earlier: impl IntoIterator<Item = &'a [u8]>,
) -> Result<(), HealthFailure> {
    let len = bytes.len();
    if len >= MIN_COMPARED && bytes.iter().all(|&b| b == 0) {
        return Err(HealthFailure::AllZero { len });
    }
    for (i, prev) in earlier.into_iter().enumerate() {
        let compared = BLOCK.min(len).min(prev.len());
        if compared >= MIN_COMPARED && bytes[..compared] == prev[..compared] {
            return Err(HealthFailure::RepeatOfEarlier {
                compared,
                back: i + 1,
            });
        }
    }
    repeated_block(bytes)?;
    repetition_count(bytes)?;
    adaptive_proportion(bytes)
}

fn repeated_block(bytes: &[u8]) -> Result<(), HealthFailure> {
    let mut seen = std::collections::HashMap::new();
    for (i, block) in bytes.chunks_exact(BLOCK).enumerate() {
        if let Some(first) = seen.insert(block, i) {
            return Err(HealthFailure::RepeatedBlock { first, second: i });
        }
    }
    Ok(())
}

fn repetition_count(bytes: &[u8]) -> Result<(), HealthFailure> {
    let mut start = 0;
    for i in 1..=bytes.len() {
        if i == bytes.len() || bytes[i] != bytes[start] {
            let run = i - start;
            if run >= RCT_CUTOFF {
                return Err(HealthFailure::RepetitionCount {
                    byte: bytes[start],
                    run,
                    offset: start,
                    cutoff: RCT_CUTOFF,
                });
            }
            start = i;
        }
    }
    Ok(())
}

fn adaptive_proportion(bytes: &[u8]) -> Result<(), HealthFailure> {
    for (w, window) in bytes.chunks(APT_WINDOW).enumerate() {
        if window.len() < APT_MIN_WINDOW {
            continue;
        }
        let byte = window[0];
        let count = window.iter().filter(|&&b| b == byte).count();
        let cutoff = apt_cutoff(window.len());
        if count >= cutoff {
            return Err(HealthFailure::AdaptiveProportion {
                byte,
                count,
                window: window.len(),
                offset: w * APT_WINDOW,
                cutoff,
            });
        }
    }
    Ok(())
}

/// The adaptive proportion cutoff for a window of `window` bytes: the smallest C with
/// P(1 + Binomial(window − 1, 2⁻ᴴ) ≥ C) ≤ 2⁻⁶⁴ (SP 800-90B §4.4.2 computes it the same way
/// with Excel's CRITBINOM). The binomial tail is summed from the top so tiny probabilities
/// keep their precision.
pub fn apt_cutoff(window: usize) -> usize {
    let n = window.saturating_sub(1);
    let p = 1.0 / f64::from(1u32 << MIN_ENTROPY_BITS);
    let alpha = 2f64.powi(-i32::try_from(ALPHA_BITS).unwrap_or(64));
    // pmf[k] = P(Binomial(n, p) = k), by the ratio pmf[k+1] / pmf[k].
    let mut pmf = Vec::with_capacity(n + 1);
    let mut term = (1.0 - p).powi(i32::try_from(n).unwrap_or(i32::MAX));
    for k in 0..=n {
        pmf.push(term);
        term *= (n - k) as f64 / (k + 1) as f64 * p / (1.0 - p);
    }
    // The smallest k with P(X ≥ k) ≤ α; the cutoff counts the window's first byte too.
    let mut tail = 0.0;
    for k in (0..=n).rev() {
        tail += pmf[k];
        if tail > alpha {
            return k + 2;
        }
    }
    1
}

/// Mixes a checked draw from the token with bytes from the OS into `len` output bytes:
/// seed = SHA-256(domain ‖ len ‖ os ‖ token), block i = SHA-256(seed ‖ i) (an
/// extract-then-expand construction as in HKDF, without HKDF's 8,160-byte output limit).
/// The output is unpredictable as long as either input is.
pub fn mix(token: &[u8], os: &[u8; 32], len: usize) -> Vec<u8> {
    let mut ctx = Context::new(&SHA256);
    ctx.update(MIX_DOMAIN);
    ctx.update(&(len as u64).to_be_bytes());
    ctx.update(os);
    ctx.update(token);
    let seed = ctx.finish();
    let mut out = Vec::with_capacity(len);
    let mut counter: u64 = 0;
    while out.len() < len {
        let mut block = Context::new(&SHA256);
        block.update(seed.as_ref());
        block.update(&counter.to_be_bytes());
        let digest = block.finish();
        let take = (len - out.len()).min(digest.as_ref().len());
        out.extend_from_slice(&digest.as_ref()[..take]);
        counter += 1;
    }
    out
}

/// Why no serials could be drawn.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SerialError {
    /// The RNG kept producing serials already used.
    #[error("after {rounds} draws only {got} of {wanted} serials were new: the RNG repeats itself")]
    Exhausted {
        /// Draws made.
        rounds: usize,
        /// Serials asked for.
        wanted: usize,
        /// New serials found.
        got: usize,
    },
    /// The draw returned another number of bytes than asked for.
    #[error("asked the RNG for {asked} bytes, got {got}")]
    ShortDraw {
        /// Bytes asked for.
        asked: usize,
        /// Bytes returned.
        got: usize,
    },
}

/// Draws `n` serials that `used` does not know and that differ from each other: positive
/// 16-byte DER INTEGERs (top bit clear, first byte non-zero, so the encoding is exactly 16
/// bytes), 16 bytes from `draw` each. At most [`SERIAL_ROUNDS`] draws are made, each for the
/// serials still missing; then [`SerialError::Exhausted`]. `draw(len)` must return `len`
/// bytes (e.g. `Token::random`).
pub fn unique_serials<E: From<SerialError>>(
    mut draw: impl FnMut(usize) -> Result<Vec<u8>, E>,
    used: impl Fn(&[u8]) -> bool,
    n: usize,
) -> Result<Vec<Vec<u8>>, E> {
    let mut out: Vec<Vec<u8>> = Vec::with_capacity(n);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..SERIAL_ROUNDS {
        if out.len() == n {
            break;
        }
        let asked = SERIAL_LEN * (n - out.len());
        let bytes = draw(asked)?;
        if bytes.len() != asked {
            return Err(SerialError::ShortDraw {
                asked,
                got: bytes.len(),
            }
            .into());
        }
        for chunk in bytes.chunks_exact(SERIAL_LEN) {
            let mut s = chunk.to_vec();
            s[0] = (s[0] & 0x7f) | 0x01;
            if !used(&s) && seen.insert(s.clone()) {
                out.push(s);
            }
        }
    }
    if out.len() < n {
        return Err(SerialError::Exhausted {
            rounds: SERIAL_ROUNDS,
            wanted: n,
            got: out.len(),
        }
        .into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic, well-mixed test bytes (SHA-256 in counter mode).
    fn good(len: usize, seed: u8) -> Vec<u8> {
        mix(&[seed], &[seed; 32], len)
    }

    #[test]
    fn healthy_bytes_pass_at_every_size_hsmca_draws() {
        for (i, len) in [8, 16, 32, 160, 512, 513, 8192].into_iter().enumerate() {
            let prev = good(16, 200);
            check(&good(len, i as u8), [prev.as_slice()]).unwrap();
        }
    }

    #[test]
    fn cutoffs_match_sp800_90b_arithmetic() {
        assert_eq!(RCT_CUTOFF, 9);
        // Computed independently (Python, exact binomial sums) for alpha = 2^-64, p = 1/256.
        for (w, c) in [
            (8, 9),
            (16, 11),
            (32, 13),
            (64, 15),
            (128, 18),
            (256, 22),
            (512, 27),
        ] {
            assert_eq!(apt_cutoff(w), c, "window {w}");
        }
    }

    #[test]
    fn each_broken_rng_fails_its_test() {
        let prev = good(16, 1);
        let mut run = good(64, 2);
        run[10..19].fill(0xAB);
        let mut blocks = good(64, 3);
        let (a, b) = blocks.split_at_mut(32);
        b[..16].copy_from_slice(&a[..16]);
        // 30 of 512 bytes equal to the first, spread out (no runs, no repeated blocks).
        let mut frequent = good(512, 4);
        frequent[0] = 0x5A;
        for i in 1..30 {
            frequent[i * 17] = 0x5A;
        }
        type Case<'a> = (&'a str, Vec<u8>, Option<&'a [u8]>);
        let cases: Vec<Case<'_>> = vec![
            ("zero", vec![0; 16], None),
            ("zero8", vec![0; 8], None),
            ("stuck", prev.clone(), Some(&prev)),
            ("run", run, None),
            ("block", blocks, None),
            ("frequent", frequent, None),
        ];
        for (name, bytes, previous) in cases {
            let got = check(&bytes, previous).unwrap_err();
            let ok = match (name, &got) {
                ("zero" | "zero8", HealthFailure::AllZero { .. }) => true,
                (
                    "stuck",
                    HealthFailure::RepeatOfEarlier {
                        compared: 16,
                        back: 1,
                    },
                ) => true,
                ("run", HealthFailure::RepetitionCount { run, .. }) => *run >= 9,
                (
                    "block",
                    HealthFailure::RepeatedBlock {
                        first: 0,
                        second: 2,
                    },
                ) => true,
                ("frequent", HealthFailure::AdaptiveProportion { count, cutoff, .. }) => {
                    *count >= 30 && *cutoff == 27
                }
                _ => false,
            };
            assert!(ok, "{name}: {got:?}");
        }
    }

    #[test]
    fn a_run_just_below_the_cutoff_and_short_zero_draws_pass() {
        let mut b = good(64, 5);
        b[20..28].fill(7);
        check(&b, []).unwrap();
        // Fewer than 8 bytes say too little to call all-zero a fault.
        check(&[0; 4], []).unwrap();
    }

    #[test]
    fn the_monitor_catches_an_rng_cycling_through_a_few_values() {
        let mut m = Monitor::default();
        let (a, b, c) = (good(16, 1), good(16, 2), good(16, 3));
        m.check(&a).unwrap();
        m.check(&b).unwrap();
        m.check(&c).unwrap();
        assert_eq!(
            m.check(&a),
            Err(HealthFailure::RepeatOfEarlier {
                compared: 16,
                back: 3
            })
        );
        // An 8-byte key id that starts like an earlier serial draw is caught too.
        assert!(m.check(&b[..8]).is_err());
        // A draw that failed is not remembered; memory is bounded.
        for i in 0..HISTORY + 10 {
            m.check(&mix(&i.to_be_bytes(), &[0; 32], 16)).unwrap();
        }
        assert_eq!(m.recent.len(), HISTORY);
    }

    #[test]
    fn mixing_depends_on_both_inputs_and_keeps_the_length() {
        let os = [9u8; 32];
        let a = mix(&[0; 16], &os, 16);
        assert_eq!(a.len(), 16);
        assert_ne!(a, vec![0; 16]);
        assert_ne!(a, mix(&[0; 16], &[8u8; 32], 16));
        assert_ne!(a, mix(&[1; 16], &os, 16));
        assert_eq!(mix(&[0; 16], &os, 8200).len(), 8200);
        check(&mix(&[0; 8192], &os, 8192), []).unwrap();
    }

    #[test]
    fn serials_are_positive_sixteen_bytes_and_new() {
        let mut calls = 0;
        let used_one = good(16, 42);
        let serials = unique_serials::<SerialError>(
            |len| {
                calls += 1;
                Ok(good(len, calls))
            },
            |s| s[1..] == used_one[1..],
            100,
        )
        .unwrap();
        assert_eq!(serials.len(), 100);
        assert_eq!(calls, 1);
        for s in &serials {
            assert_eq!(s.len(), 16);
            assert!(s[0] & 0x80 == 0 && s[0] != 0, "{s:02x?}");
        }
        let unique: std::collections::HashSet<_> = serials.iter().collect();
        assert_eq!(unique.len(), 100);
    }

    #[test]
    fn a_stuck_source_ends_after_a_bounded_number_of_draws() {
        let mut calls = 0;
        let err = unique_serials::<SerialError>(
            |len| {
                calls += 1;
                Ok(vec![7; len])
            },
            |_| false,
            3,
        )
        .unwrap_err();
        assert_eq!(calls, SERIAL_ROUNDS);
        assert_eq!(
            err,
            SerialError::Exhausted {
                rounds: SERIAL_ROUNDS,
                wanted: 3,
                got: 1
            }
        );
        let short = unique_serials::<SerialError>(|_| Ok(vec![1; 5]), |_| false, 1);
        assert_eq!(short, Err(SerialError::ShortDraw { asked: 16, got: 5 }));
        // A log that has seen everything: bounded too.
        let full = unique_serials::<SerialError>(|len| Ok(good(len, 1)), |_| true, 2);
        assert!(matches!(full, Err(SerialError::Exhausted { got: 0, .. })));
    }
}
