//! The CA key behind a small trait, and the adapter that lets rcgen sign with it.
//!
//! rcgen builds the `TBSCertificate` and calls `sign` once; the adapter hands those bytes to a
//! [`CaSigner`]. Because rcgen can only report a payload-less `RemoteKeyError`, the adapter
//! keeps the real error for the caller. A capture mode records the TBS bytes without touching
//! the token, so the exact bytes can be logged as an intent before anything is signed.

use std::cell::RefCell;

use crate::keys::PublicKey;

/// Whose fault a token or signing error is: decides exit codes and when a batch stops. All are
/// exit 3 except [`FaultKind::BadSignature`], treated like a certificate failing its
/// post-signing check (exit 5: a token that signs wrongly must not be used further).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Setup or operator problem: module, token label, PIN, key label, missing mechanism.
    /// Retrying the same thing fails the same way.
    Setup,
    /// The token failed an operation (`CKR_DEVICE_ERROR`, `CKR_GENERAL_ERROR`, a failed RNG
    /// health check, ...).
    Token,
    /// The session or the token went away (`CKR_SESSION_HANDLE_INVALID`, `CKR_SESSION_CLOSED`,
    /// `CKR_DEVICE_REMOVED`, `CKR_TOKEN_NOT_PRESENT`, `CKR_USER_NOT_LOGGED_IN`, ...): a token
    /// fault too, but one a reconnect may cure.
    SessionLost,
    /// The token returned a signature that is malformed or does not verify.
    BadSignature,
}

impl FaultKind {
    /// The exit code for a run stopped by this fault: 5 for a bad signature, else 3.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::BadSignature => 5,
            Self::Setup | Self::Token | Self::SessionLost => 3,
        }
    }

    /// What the operator can do next, for the faults that are the token's.
    pub fn hint(self) -> Option<&'static str> {
        Some(match self {
            Self::Setup => return None,
            Self::Token => {
                "the token reported a failure (look the CKR_ code up in its manual); check it, then run the same command again; it finishes the work and issues nothing twice"
            }
            Self::SessionLost => {
                "the token or its session went away (unplugged, reset or timed out): reconnect it and run the same command again; it finishes the work and issues nothing twice"
            }
            Self::BadSignature => {
                "the token signs wrongly: stop using it, have it checked or replaced; nothing it signed this way was released"
            }
        })
    }
}

/// Consecutive [`FaultKind::Token`] failures after which a batch stops: one failure may be a
/// hiccup worth an abandoned intent and a retry on the next certificate; three in a row is a
/// failing token, and signing on would only turn every remaining CSR into an intent and an
/// abandon entry.
pub const MAX_CONSECUTIVE_FAULTS: usize = 3;

/// Decides when a run of signing failures stops a batch (the engine feeds it every signature's
/// outcome, in the order they finish). A lost session, a wrong signature or a setup problem
/// stops at once; token faults stop at the [`MAX_CONSECUTIVE_FAULTS`]th in a row; a success
/// resets the count.
#[derive(Debug, Default)]
pub struct FaultStreak {
    consecutive: usize,
}

impl FaultStreak {
    /// Records one signature's outcome; returns the fault that must stop the batch, if any
    /// (its [`FaultKind::exit_code`] is the run's exit code).
    pub fn record(&mut self, outcome: Result<(), &SignError>) -> Option<FaultKind> {
        let Err(e) = outcome else {
            self.consecutive = 0;
            return None;
        };
        match e.kind() {
            FaultKind::Token => {
                self.consecutive += 1;
                (self.consecutive >= MAX_CONSECUTIVE_FAULTS).then_some(FaultKind::Token)
            }
            kind => Some(kind),
        }
    }
}

/// A signing failure, with the PKCS#11 function and return value where there is one, and
/// whose fault it is ([`FaultKind`]) so a batch can stop on a failing token and pick the exit
/// code without reading the message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SignError {
    kind: FaultKind,
    message: String,
}

impl SignError {
    /// A failure of `kind`; `message` names the key, the PKCS#11 function and its `CKR_` code.
    pub fn new(kind: FaultKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// Whose fault it was: the token, a lost session, or a signature that came back wrong.
    pub fn kind(&self) -> FaultKind {
        self.kind
    }
}

/// The CA private key, wherever it lives.
pub trait CaSigner {
    /// The CA's public key; compared with the CA certificate when the key is opened.
    fn public_key(&self) -> &PublicKey;

    /// Signs DER `TBSCertificate` (or `TBSCertList`) bytes. Returns the signature exactly as it
    /// goes in the certificate: DER `Ecdsa-Sig-Value` for ECDSA, never the token's raw r‖s.
    fn sign(&self, tbs: &[u8]) -> Result<Vec<u8>, SignError>;
}

/// What the adapter does when rcgen asks for a signature.
enum Mode<'a> {
    /// Record the message and return a placeholder signature.
    Capture,
    /// Sign with the CA key.
    Sign(&'a dyn CaSigner),
}

/// Implements `rcgen::SigningKey` over a [`CaSigner`] (or in capture mode).
pub(crate) struct RcgenKey<'a> {
    public: &'a PublicKey,
    mode: Mode<'a>,
    seen: RefCell<Option<Vec<u8>>>,
    error: RefCell<Option<SignError>>,
}

impl<'a> RcgenKey<'a> {
    /// An adapter that only records what would be signed.
    pub(crate) fn capture(public: &'a PublicKey) -> Self {
        Self {
            public,
            mode: Mode::Capture,
            seen: RefCell::new(None),
            error: RefCell::new(None),
        }
    }

    /// An adapter that signs with `signer`.
    pub(crate) fn signing(signer: &'a dyn CaSigner) -> Self {
        Self {
            public: signer.public_key(),
            mode: Mode::Sign(signer),
            seen: RefCell::new(None),
            error: RefCell::new(None),
        }
    }

    /// The message rcgen asked to sign, if it asked.
    pub(crate) fn take_message(&self) -> Option<Vec<u8>> {
        self.seen.borrow_mut().take()
    }

    /// The signer's error behind an rcgen `RemoteKeyError`, if any.
    pub(crate) fn take_error(&self) -> Option<SignError> {
        self.error.borrow_mut().take()
    }
}

impl rcgen::PublicKeyData for RcgenKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.public.raw
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.public.key_type.rcgen_algorithm()
    }
}

impl rcgen::SigningKey for RcgenKey<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        *self.seen.borrow_mut() = Some(msg.to_vec());
        match &self.mode {
            Mode::Capture => Ok(vec![0; 64]),
            Mode::Sign(signer) => signer.sign(msg).map_err(|e| {
                *self.error.borrow_mut() = Some(e);
                rcgen::Error::RemoteKeyError
            }),
        }
    }
}

/// What the issuance engine needs of a token: random bytes, the keys it signs with, and new
/// key pairs for intermediates. `token::Token` is the real one; tests use software keys, so the
/// engine's refusals, stop rules and crash points run in-process.
pub trait Keystore {
    /// `len` random bytes.
    fn random(&self, len: usize) -> Result<Vec<u8>, crate::Error>;
    /// The private key labelled `label`, with its public key.
    fn key(&self, label: &str) -> Result<Box<dyn CaSigner + '_>, crate::Error>;
    /// The key labelled `label`, refused unless its public key is `expected` (the CA
    /// certificate's).
    fn key_matching(
        &self,
        label: &str,
        expected: &PublicKey,
    ) -> Result<Box<dyn CaSigner + '_>, crate::Error>;
    /// A new key pair, generated inside the token (sensitive, never extractable).
    fn generate_key_pair(
        &self,
        key_type: crate::keys::KeyType,
        label: &str,
        id: &[u8],
    ) -> Result<PublicKey, crate::Error>;
    /// The key pair labelled `label` if the token already holds one (`ca create` run again
    /// after a failure), with what the token says about how it was made.
    fn existing(&self, label: &str) -> Result<Option<crate::token::ExistingKey>, crate::Error>;
    /// `count` keys for `label` on sessions of their own, one per signing thread.
    fn workers(
        &self,
        label: &str,
        expected: &PublicKey,
        count: usize,
    ) -> Result<Vec<Box<dyn CaSigner + Send>>, crate::Error>;
    /// The log heads (signed checkpoints) kept in the token under `label`: normally one.
    /// Software keystores keep none.
    fn log_head(&self, label: &str) -> Result<Vec<Vec<u8>>, crate::Error> {
        let _ = label;
        Ok(Vec::new())
    }
    /// Replaces the log head kept under `label`.
    fn store_log_head(&self, label: &str, note: &[u8]) -> Result<(), crate::Error> {
        let _ = (label, note);
        Ok(())
    }
}

impl Keystore for crate::token::Token {
    fn random(&self, len: usize) -> Result<Vec<u8>, crate::Error> {
        Ok(crate::token::Token::random(self, len)?)
    }

    fn key(&self, label: &str) -> Result<Box<dyn CaSigner + '_>, crate::Error> {
        Ok(Box::new(crate::token::Token::key(self, label)?))
    }

    fn key_matching(
        &self,
        label: &str,
        expected: &PublicKey,
    ) -> Result<Box<dyn CaSigner + '_>, crate::Error> {
        Ok(Box::new(crate::token::Token::key_matching(
            self, label, expected,
        )?))
    }

    fn generate_key_pair(
        &self,
        key_type: crate::keys::KeyType,
        label: &str,
        id: &[u8],
    ) -> Result<PublicKey, crate::Error> {
        Ok(crate::token::Token::generate_key_pair(
            self, key_type, label, id,
        )?)
    }

    fn existing(&self, label: &str) -> Result<Option<crate::token::ExistingKey>, crate::Error> {
        Ok(crate::token::Token::existing_key(self, label)?)
    }

    fn workers(
        &self,
        label: &str,
        expected: &PublicKey,
        count: usize,
    ) -> Result<Vec<Box<dyn CaSigner + Send>>, crate::Error> {
        Ok(crate::token::Token::workers(self, label, expected, count)?
            .into_iter()
            .map(|k| Box::new(k) as Box<dyn CaSigner + Send>)
            .collect())
    }

    fn log_head(&self, label: &str) -> Result<Vec<Vec<u8>>, crate::Error> {
        Ok(crate::token::Token::read_data(self, label)?)
    }

    fn store_log_head(&self, label: &str, note: &[u8]) -> Result<(), crate::Error> {
        Ok(crate::token::Token::write_data(self, label, note)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streak_of_token_faults_stops_the_batch_and_other_faults_stop_it_at_once() {
        let fault = |kind| SignError::new(kind, "C_Sign returned CKR_X");
        let token = fault(FaultKind::Token);
        let mut streak = FaultStreak::default();
        assert_eq!(streak.record(Err(&token)), None);
        assert_eq!(streak.record(Err(&token)), None);
        assert_eq!(streak.record(Ok(())), None);
        assert_eq!(streak.record(Err(&token)), None);
        assert_eq!(streak.record(Err(&token)), None);
        assert_eq!(streak.record(Err(&token)), Some(FaultKind::Token));
        for kind in [
            FaultKind::SessionLost,
            FaultKind::BadSignature,
            FaultKind::Setup,
        ] {
            let mut streak = FaultStreak::default();
            assert_eq!(streak.record(Err(&fault(kind))), Some(kind));
        }
    }
}
