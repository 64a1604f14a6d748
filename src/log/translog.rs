//! The transparency-log formats, behind one module: RFC 6962 Merkle tree (via `tlog_tiles`),
//! C2SP tlog-checkpoint bodies (via `tlog_tiles`) and C2SP signed notes (via `signed_note`).
//! Both crates are pinned and expected to change API; nothing else in hsmca imports them.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use signed_note::{Note, Verifier, VerifierList};
use tlog_tiles::tlog::{self, Hash, HashReader};

use crate::keys::{KeyType, PublicKey};
use crate::signer::{CaSigner, SignError};

/// Signature type byte for Ed25519 notes (C2SP signed-note).
const TYPE_ED25519: u8 = 0x01;
/// Signature type byte for ECDSA notes (DER signature over SHA-256, key id from the SPKI).
const TYPE_ECDSA: u8 = 0x02;

/// An RFC 6962 tree over the log's lines, kept as Go sumdb's "stored hashes" (about two hashes
/// per entry), so the root at any earlier size and any inclusion proof are cheap to recompute.
///
/// In memory for a scan; for the writer, backed by a file (`log/hashes`, 32 bytes per stored
/// hash in stored-hash order) so that opening a log of a million entries reads only the right
/// edge of the tree, not every line. Hashes are kept in memory until [`Tree::flush`] writes
/// them, which the log does only after the lines they hash are durable: the file is derived
/// data that may lag the log, never lead it.
#[derive(Debug, Default)]
pub struct Tree {
    /// Hashes not yet in `file` (all of them for an in-memory tree).
    stored: Pages,
    /// Stored hashes already in `file`.
    base: u64,
    file: Option<std::fs::File>,
    size: u64,
}

/// Hashes in fixed pages rather than one vector: a growing vector briefly holds its old and new
/// buffers, which for a log of 100,000 certificates was a 25 MB spike in a batch's peak memory.
#[derive(Debug, Default, Clone)]
struct Pages {
    pages: Vec<Vec<Hash>>,
    len: usize,
}

/// Hashes per page (2 MiB).
const PAGE: usize = 1 << 16;

impl Pages {
    fn get(&self, i: usize) -> Option<&Hash> {
        self.pages.get(i / PAGE)?.get(i % PAGE)
    }

    fn push(&mut self, h: Hash) {
        if self.len.is_multiple_of(PAGE) && self.pages.len() == self.len / PAGE {
            self.pages.push(Vec::with_capacity(PAGE));
        }
        if let Some(page) = self.pages.get_mut(self.len / PAGE) {
            page.push(h);
            self.len += 1;
        }
    }

    fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        let keep = len.div_ceil(PAGE);
        self.pages.truncate(keep);
        if let Some(last) = self.pages.last_mut() {
            last.truncate(len - (keep - 1) * PAGE);
        }
        self.len = len;
    }
}

impl HashReader for Tree {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog::Error> {
        use std::os::unix::fs::FileExt;
        indexes
            .iter()
            .map(|&i| {
                if i >= self.base {
                    return usize::try_from(i - self.base)
                        .ok()
                        .and_then(|i| self.stored.get(i))
                        .copied()
                        .ok_or(tlog::Error::IndexesNotInTree);
                }
                let file = self.file.as_ref().ok_or(tlog::Error::IndexesNotInTree)?;
                let mut h = [0u8; 32];
                file.read_exact_at(&mut h, i * 32)
                    .map_err(|_| tlog::Error::IndexesNotInTree)?;
                Ok(Hash(h))
            })
            .collect()
    }
}

/// The number of stored hashes of a tree of `size` leaves, refused before it is computed when
/// a file of `len` bytes cannot hold them (each leaf stores at least its own hash): `size`
/// comes from the index, which is hostile data, and a huge one must not overflow.
fn stored_count_within(size: u64, len: u64) -> std::io::Result<u64> {
    if size > len / 32 {
        return Err(std::io::Error::other(format!(
            "holds {} hashes, too few for {size} entries",
            len / 32
        )));
    }
    Ok(tlog::stored_hash_count(size))
}

impl Tree {
    /// The tree of the first `size` leaves whose stored hashes are in `file`. Hashes past them
    /// (a run that wrote hashes and died before its index caught up) are cut off; a file too
    /// short for `size` is an error, and the caller rebuilds it from the log.
    pub fn on_file(file: std::fs::File, size: u64) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        let base = stored_count_within(size, len)?;
        if len < base * 32 {
            return Err(std::io::Error::other(format!(
                "holds {} hashes but {size} entries need {base}",
                len / 32
            )));
        }
        if len > base * 32 {
            file.set_len(base * 32)?;
        }
        Ok(Self {
            stored: Pages::default(),
            base,
            file: Some(file),
            size,
        })
    }

    /// The tree of the first `size` leaves in `file`, to grow in memory only: the file is
    /// never written or cut (for checking what was appended after a checkpoint).
    pub fn overlay(file: std::fs::File, size: u64) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        let base = stored_count_within(size, len)?;
        if len < base * 32 {
            return Err(std::io::Error::other(format!(
                "holds too few hashes for {size} entries"
            )));
        }
        Ok(Self {
            stored: Pages::default(),
            base,
            file: Some(file),
            size,
        })
    }

    /// Whether the tree of `new_size` leaves with root `new_root` extends the one of
    /// `old_size` with `old_root`: an RFC 6962 consistency proof taken from this tree and
    /// checked against both roots, so it holds whatever the hashes file contains.
    pub fn consistent(
        &self,
        old_size: u64,
        old_root: [u8; 32],
        new_size: u64,
        new_root: [u8; 32],
    ) -> bool {
        tlog::prove_tree(new_size, old_size, self).is_ok_and(|p| {
            tlog::check_tree(&p, new_size, Hash(new_root), old_size, Hash(old_root)).is_ok()
        })
    }

    /// An empty tree written to `file` (truncated).
    pub fn new_on_file(file: std::fs::File) -> std::io::Result<Self> {
        file.set_len(0)?;
        Self::on_file(file, 0)
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf (the exact line bytes, without the newline).
    pub fn push(&mut self, leaf: &[u8]) {
        // stored_hashes only reads hashes this tree already holds.
        if let Ok(new) = tlog::stored_hashes(self.size, leaf, self) {
            for h in new {
                self.stored.push(h);
            }
            self.size += 1;
        }
    }

    /// Writes the hashes held in memory to the file (no-op for an in-memory tree). Called only
    /// once the lines they hash are durable; not synced here (see [`Tree::sync`]).
    pub fn flush(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let Some(file) = &self.file else {
            return Ok(());
        };
        let mut buf = Vec::with_capacity(self.stored.len * 32);
        for page in &self.stored.pages {
            for h in page {
                buf.extend_from_slice(&h.0);
            }
        }
        file.write_all_at(&buf, self.base * 32)?;
        self.base += self.stored.len as u64;
        self.stored = Pages::default();
        Ok(())
    }

    /// Where the tree is now, for [`Tree::rewind`].
    pub fn mark(&self) -> (u64, usize) {
        (self.size, self.stored.len)
    }

    /// Forgets every leaf pushed since `mark`: an append whose write failed. Cheaper than
    /// cloning the tree before every append, which held two copies of every hash (megabytes at
    /// 100,000 certificates) and copied them once per chunk. Leaves already flushed are never
    /// rewound (they were durable in the log).
    pub fn rewind(&mut self, (size, stored): (u64, usize)) {
        if stored <= self.stored.len {
            self.size = size;
            self.stored.truncate(stored);
        }
    }

    /// Root at `size` (≤ current size); the empty-tree hash for 0.
    pub fn root_at(&self, size: u64) -> Option<[u8; 32]> {
        if size > self.size {
            return None;
        }
        tlog::tree_hash(size, self).ok().map(|h| h.0)
    }

    /// RFC 6962 inclusion proof of leaf `index` in the tree of `size` leaves, sibling first.
    pub fn prove(&self, index: u64, size: u64) -> Option<Vec<[u8; 32]>> {
        if size > self.size {
            return None;
        }
        tlog::prove_record(size, index, self)
            .ok()
            .map(|p| p.into_iter().map(|h| h.0).collect())
    }

    /// The stored leaf hash of entry `index`.
    pub fn leaf(&self, index: u64) -> Option<[u8; 32]> {
        if index >= self.size {
            return None;
        }
        self.read_hashes(&[tlog::stored_hash_index(0, index)])
            .ok()
            .and_then(|v| v.first().map(|h| h.0))
    }

    /// Root of the whole tree.
    pub fn root(&self) -> [u8; 32] {
        self.root_at(self.size).unwrap_or(tlog::EMPTY_HASH.0)
    }
}

/// An RFC 6962 tree kept as its compact range (the roots of its perfect subtrees, at most
/// 64), for a verifier that streams the log: memory does not grow with the log. It knows the
/// root at its current size and at the sizes it was asked to remember before the stream
/// passed them (the checkpoints to check).
#[derive(Debug, Default)]
pub struct Streaming {
    /// (height, hash) of each perfect subtree, largest first.
    range: Vec<(u32, Hash)>,
    size: u64,
    /// Sizes whose root to keep, and the roots kept.
    remember: std::collections::BTreeMap<u64, Option<[u8; 32]>>,
}

impl Streaming {
    /// A streaming tree that keeps the root at each of `sizes` as it passes them.
    pub fn remembering(sizes: impl IntoIterator<Item = u64>) -> Self {
        let mut t = Self {
            remember: sizes.into_iter().map(|s| (s, None)).collect(),
            ..Self::default()
        };
        if let Some(slot) = t.remember.get_mut(&0) {
            *slot = Some(tlog::EMPTY_HASH.0);
        }
        t
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf (the exact line bytes, without the newline).
    pub fn push(&mut self, leaf: &[u8]) {
        let mut node = (0u32, tlog::record_hash(leaf));
        while let Some(&(h, left)) = self.range.last() {
            if h != node.0 {
                break;
            }
            self.range.pop();
            node = (h + 1, tlog::node_hash(left, node.1));
        }
        self.range.push(node);
        self.size += 1;
        if self.remember.contains_key(&self.size) {
            let root = self.root();
            self.remember.insert(self.size, Some(root));
        }
    }

    /// Root of the whole tree.
    pub fn root(&self) -> [u8; 32] {
        let mut it = self.range.iter().rev();
        let Some(&(_, mut acc)) = it.next() else {
            return tlog::EMPTY_HASH.0;
        };
        for &(_, left) in it {
            acc = tlog::node_hash(left, acc);
        }
        acc.0
    }

    /// Root at `size`: the current size, or one remembered.
    pub fn root_at(&self, size: u64) -> Option<[u8; 32]> {
        if size == self.size {
            return Some(self.root());
        }
        self.remember.get(&size).copied().flatten()
    }
}

/// The RFC 6962 leaf hash of a line.
pub fn leaf_hash(line: &[u8]) -> [u8; 32] {
    tlog::record_hash(line).0
}

/// Whether `proof` leads from leaf `index` (hash `leaf`) to `root` of a tree of `size`.
pub fn check_inclusion(
    proof: &[[u8; 32]],
    size: u64,
    root: [u8; 32],
    index: u64,
    leaf: [u8; 32],
) -> bool {
    let p: Vec<Hash> = proof.iter().map(|h| Hash(*h)).collect();
    tlog::check_record(&p, size, Hash(root), index, Hash(leaf)).is_ok()
}

/// Base64 of a root hash.
pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// The log's checkpoint key: a key in the token, with the note name (the log origin).
pub struct NoteKey<'a> {
    name: String,
    key_id: u32,
    signer: &'a dyn CaSigner,
    /// The signer's error behind signed_note's opaque one, so a token fault while signing a
    /// checkpoint keeps its kind (and exit code) instead of becoming a log error.
    error: std::sync::Mutex<Option<SignError>>,
}

impl<'a> NoteKey<'a> {
    /// Wraps a token key for signing notes named `origin`.
    pub fn new(origin: &str, signer: &'a dyn CaSigner) -> Result<Self, String> {
        let (key_id, _) = key_material(origin, signer.public_key())?;
        Ok(Self {
            name: origin.to_owned(),
            key_id,
            signer,
            error: std::sync::Mutex::new(None),
        })
    }

    /// The token's error from the last failed signature, if any.
    pub fn take_error(&self) -> Option<SignError> {
        self.error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

impl signed_note::Signer for NoteKey<'_> {
    fn name(&self) -> &str {
        &self.name
    }

    fn key_id(&self) -> u32 {
        self.key_id
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        self.signer.sign(msg).map_err(|e| {
            let opaque = signature::Error::from_source(e.clone());
            *self
                .error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
            opaque
        })
    }
}

/// Key id and encoded key (type byte + key) per C2SP signed-note.
fn key_material(name: &str, key: &PublicKey) -> Result<(u32, Vec<u8>), String> {
    match key.key_type {
        KeyType::Ed25519 => {
            let mut enc = vec![TYPE_ED25519];
            enc.extend_from_slice(&key.raw);
            Ok((signed_note::key_id(name, &enc), enc))
        }
        KeyType::EcdsaP256 => {
            let digest = ring::digest::digest(&ring::digest::SHA256, &key.spki_der);
            let id = u32::from_be_bytes([
                digest.as_ref()[0],
                digest.as_ref()[1],
                digest.as_ref()[2],
                digest.as_ref()[3],
            ]);
            let mut enc = vec![TYPE_ECDSA];
            enc.extend_from_slice(&key.spki_der);
            Ok((id, enc))
        }
        other => Err(format!(
            "a {other} key cannot sign log checkpoints (ed25519 or ecdsa-p256 can)"
        )),
    }
}

/// The verifier key string `name+hexid+base64(type||key)` that Go's `sumdb/note` (Ed25519)
/// and transparency-dev/formats (ECDSA) accept.
pub fn vkey(origin: &str, key: &PublicKey) -> Result<String, String> {
    if !signed_note::is_key_name_valid(origin) {
        return Err(format!(
            "log origin {origin:?} must be non-empty without spaces or '+'"
        ));
    }
    let (id, enc) = key_material(origin, key)?;
    Ok(format!("{origin}+{id:08x}+{}", B64.encode(enc)))
}

/// Signs a checkpoint for `size` / `root` and returns the signed note bytes. `extension` is
/// zero or more C2SP extension lines, each ending in a newline (verifiers that do not know them
/// skip them).
pub fn sign_checkpoint(
    origin: &str,
    size: u64,
    root: [u8; 32],
    extension: &str,
    key: &NoteKey<'_>,
) -> Result<Vec<u8>, String> {
    let body = tlog_tiles::Checkpoint::new(origin, size, Hash(root), extension)
        .map_err(|e| e.to_string())?;
    let mut note = Note::new(&body.to_bytes(), &[]).map_err(|e| e.to_string())?;
    note.add_sigs(&[key]).map_err(|e| e.to_string())?;
    Ok(note.to_bytes())
}

/// A C2SP `tlog-proof@v1` for leaf `index`: the inclusion path and the signed checkpoint note.
pub fn tlog_proof(index: u64, path: &[[u8; 32]], checkpoint_note: &[u8]) -> Vec<u8> {
    let mut out = format!("c2sp.org/tlog-proof@v1\nindex {index}\n").into_bytes();
    for h in path {
        out.extend_from_slice(b64(h).as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    out.extend_from_slice(checkpoint_note);
    out
}

/// A checkpoint whose signature verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCheckpoint {
    /// Origin line.
    pub origin: String,
    /// Tree size.
    pub size: u64,
    /// Root hash.
    pub root: [u8; 32],
    /// Extension lines (signed with the rest), each ending in a newline.
    pub extension: String,
}

/// Parses a signed checkpoint and checks its signature against `vkey`.
pub fn open_checkpoint(note_bytes: &[u8], vkey: &str) -> Result<VerifiedCheckpoint, String> {
    let note = Note::from_bytes(note_bytes).map_err(|e| format!("not a signed note: {e}"))?;
    let verifier = verifier(vkey)?;
    note.verify(&VerifierList::new(vec![verifier]))
        .map_err(|e| format!("signature check failed: {e}"))?;
    let cp = tlog_tiles::Checkpoint::from_bytes(note.text())
        .map_err(|e| format!("not a tlog checkpoint: {e}"))?;
    Ok(VerifiedCheckpoint {
        origin: cp.origin().to_owned(),
        size: cp.size(),
        root: cp.hash().0,
        extension: cp.extension().to_owned(),
    })
}

fn verifier(vkey: &str) -> Result<Box<dyn Verifier>, String> {
    let parts: Vec<&str> = vkey.splitn(3, '+').collect();
    let [name, id, key] = parts.as_slice() else {
        return Err("malformed verifier key".into());
    };
    let enc = B64
        .decode(key)
        .map_err(|_| "malformed verifier key (base64)".to_string())?;
    match enc.first() {
        Some(&TYPE_ED25519) => Ok(Box::new(
            signed_note::StandardVerifier::new(vkey).map_err(|e| e.to_string())?,
        )),
        Some(&TYPE_ECDSA) => {
            let key_id = u32::from_str_radix(id, 16)
                .map_err(|_| "malformed verifier key (id)".to_string())?;
            let public = PublicKey::from_spki_der(&enc[1..]).map_err(|e| e.to_string())?;
            let (expected, _) = key_material(name, &public)?;
            if expected != key_id {
                return Err("verifier key id does not match its key".into());
            }
            Ok(Box::new(EcdsaVerifier {
                name: (*name).to_owned(),
                key_id,
                public,
            }))
        }
        _ => Err("unsupported verifier key type".into()),
    }
}

struct EcdsaVerifier {
    name: String,
    key_id: u32,
    public: PublicKey,
}

impl Verifier for EcdsaVerifier {
    fn name(&self) -> &str {
        &self.name
    }

    fn key_id(&self) -> u32 {
        self.key_id
    }

    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        self.public.verify(msg, sig)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn paged_tree_agrees_with_plain_hashes_across_pages_and_rewinds() {
        struct Plain<'a>(&'a [super::Hash]);
        impl super::HashReader for Plain<'_> {
            fn read_hashes(&self, idx: &[u64]) -> Result<Vec<super::Hash>, super::tlog::Error> {
                Ok(idx.iter().map(|i| self.0[*i as usize]).collect())
            }
        }
        let mut tree = super::Tree::default();
        let mut plain = Vec::new();
        let n = 40_000u64; // about 80,000 stored hashes: more than one page
        let mut mark = None;
        let mut root_at_mark = None;
        for i in 0..n {
            let leaf = i.to_be_bytes();
            plain.extend(super::tlog::stored_hashes(i, &leaf, &Plain(&plain)).unwrap());
            tree.push(&leaf);
            if i == 33_000 {
                mark = Some(tree.mark());
                root_at_mark = Some(tree.root());
            }
        }
        let plain_root = super::tlog::tree_hash(n, &Plain(&plain)).unwrap().0;
        assert_eq!(tree.root(), plain_root);
        assert!(tree.prove(12_345, n).is_some());
        tree.rewind(mark.unwrap());
        assert_eq!(tree.size(), 33_001);
        assert_eq!(tree.root(), root_at_mark.unwrap());
        tree.push(b"again");
        assert_eq!(tree.size(), 33_002);
    }

    use super::*;

    #[test]
    fn the_streaming_tree_agrees_with_the_stored_one_at_every_size_it_remembers() {
        let mut full = Tree::default();
        let mut streaming = Streaming::remembering([0, 1, 5, 64, 1000, 1023, 1024, 4097]);
        for i in 0..5000u64 {
            let leaf = format!("{{\"seq\":{i}}}");
            full.push(leaf.as_bytes());
            streaming.push(leaf.as_bytes());
            assert_eq!(streaming.root(), full.root(), "size {}", i + 1);
        }
        for size in [0, 1, 5, 64, 1000, 1023, 1024, 4097, 5000] {
            assert_eq!(streaming.root_at(size), full.root_at(size), "size {size}");
        }
        assert_eq!(
            streaming.root_at(77),
            None,
            "a size it was not asked to remember"
        );
    }

    #[test]
    fn rfc6962_vectors_from_the_reference_notes() {
        let mut t = Tree::default();
        for i in 0..7 {
            t.push(format!("{{\"seq\":{i}}}").as_bytes());
        }
        assert_eq!(
            b64(&t.root_at(5).unwrap()),
            "FH3Ed0eaO2miSx/2Abb8YoT98V/VCr/rDPcOqONyLB0="
        );
        assert_eq!(
            b64(&t.root()),
            "EvKAi8pMShoFMXCjvEsCuz6D/gv4VOQsdbNQL7mqlaI="
        );
        assert_eq!(
            b64(&t.root_at(0).unwrap()),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        assert!(t.root_at(8).is_none());
        let path: Vec<String> = t.prove(3, 7).unwrap().iter().map(|h| b64(h)).collect();
        assert_eq!(
            path,
            [
                "0+CmKo96klbIvrcVr97YPkMm0sRzedJZsXCahArS8R0=",
                "/FLXGjaKeY/Zbsflt+5fj5/dEMf/mrFGxOrB5qChsQo=",
                "W2qHXU9KHoTXZASQVliH8n4vPTTJGZZRQ2ZkO/A30QA="
            ]
        );
    }

    #[test]
    fn c2sp_example_checkpoint_verifies() {
        // From shared/reference/issuance-log.md §2.2 (seed 32 × 0x07).
        let note = "ca.example.org/root-2026/log\n7\nEvKAi8pMShoFMXCjvEsCuz6D/gv4VOQsdbNQL7mqlaI=\n\n\u{2014} ca.example.org/root-2026/log i7RqnXyERC5piKaFmsYqSKF0PJzq+cMcCO/CnoJGF1LNwT72OGhEQGGo4idM4vaZyaeY7fM2dWtUQaJHm+WXiFpO9gE=\n";
        let vkey =
            "ca.example.org/root-2026/log+8bb46a9d+AepKbGPinFIKvvVQexMuxfmVR3auvr57kkIe6mkURtIs";
        let cp = open_checkpoint(note.as_bytes(), vkey).unwrap();
        assert_eq!(cp.size, 7);
        assert_eq!(
            b64(&cp.root),
            "EvKAi8pMShoFMXCjvEsCuz6D/gv4VOQsdbNQL7mqlaI="
        );
        let tampered = note.replace("\n7\n", "\n6\n");
        assert!(open_checkpoint(tampered.as_bytes(), vkey).is_err());
    }
}
