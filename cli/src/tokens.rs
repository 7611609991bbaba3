//! API bearer tokens: created and revoked offline by `symbiont token`, checked by the
//! daemon on every request but `GET /health`.
//!
//! A token is `sym_` followed by 64 hex digits (256 random bits from the OS). Only its
//! SHA-256 is stored, in `<data_dir>/api_tokens.json` (mode 0600, replaced atomically by
//! rename), so a leaked token file grants nothing. The daemon keeps the set of hashes in
//! memory and re-reads the file when its identity (inode, size, modification time)
//! changes, so `token create` and `token revoke` take effect on the next request without a
//! restart.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The token file's name under the data directory.
pub const TOKEN_FILE: &str = "api_tokens.json";
/// Prefix of every token.
pub const TOKEN_PREFIX: &str = "sym_";

/// One stored token (its hash, never the token).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenEntry {
    /// A short public id (the first 12 hex digits of the hash), for `token revoke`.
    pub id: String,
    /// A name chosen at creation.
    pub name: String,
    /// SHA-256 of the token, hex.
    pub sha256: String,
    /// When it was created (RFC 3339).
    pub created_at: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    tokens: Vec<TokenEntry>,
}

/// SHA-256 of a token, hex.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The token file of a data directory.
pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKEN_FILE)
}

fn read_file(path: &Path) -> Result<TokenFile> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a token file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenFile::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_file(path: &Path, file: &TokenFile) -> Result<()> {
    let dir = path.parent().context("token file has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(file)?)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Creates a token named `name` in `data_dir`'s token file; returns the token (shown
/// once) and its entry.
pub fn create(data_dir: &Path, name: &str) -> Result<(String, TokenEntry)> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("system random source: {e}"))?;
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(secret));
    let sha256 = hash_token(&token);
    let entry = TokenEntry {
        id: sha256[..12].to_string(),
        name: name.to_string(),
        sha256,
        created_at: crate::api::rfc3339(SystemTime::now()),
    };
    let path = token_path(data_dir);
    let _lock = crate::lockfile::lock(&data_dir.join("api_tokens.lock"))?;
    let mut file = read_file(&path)?;
    file.tokens.push(entry.clone());
    write_file(&path, &file)?;
    Ok((token, entry))
}

/// Every stored token.
pub fn list(data_dir: &Path) -> Result<Vec<TokenEntry>> {
    Ok(read_file(&token_path(data_dir))?.tokens)
}

/// Revokes the tokens whose id or name is `which`; returns them. Fails when none matches.
pub fn revoke(data_dir: &Path, which: &str) -> Result<Vec<TokenEntry>> {
    let path = token_path(data_dir);
    let _lock = crate::lockfile::lock(&data_dir.join("api_tokens.lock"))?;
    let mut file = read_file(&path)?;
    let (gone, kept): (Vec<_>, Vec<_>) = file
        .tokens
        .into_iter()
        .partition(|t| t.id == which || t.name == which);
    if gone.is_empty() {
        bail!("no token with id or name `{which}` (see `symbiont token list`)");
    }
    file.tokens = kept;
    write_file(&path, &file)?;
    Ok(gone)
}

/// The daemon's view of the token file: the set of valid hashes, reloaded when the file
/// changes.
#[derive(Debug)]
pub struct TokenSet {
    path: PathBuf,
    state: RwLock<Loaded>,
}

#[derive(Debug, Default)]
struct Loaded {
    /// (inode, size, mtime ns) of the file the hashes came from; `None` when absent.
    stamp: Option<(u64, u64, i128)>,
    hashes: HashSet<[u8; 32]>,
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A token that is not (or no longer) valid.
    Invalid,
    /// No token exists at all yet.
    NoTokens,
}

fn stamp(path: &Path) -> Option<(u64, u64, i128)> {
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.ino(),
        m.size(),
        i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    ))
}

impl TokenSet {
    /// The token set of `data_dir` (read lazily on first check).
    pub fn new(data_dir: &Path) -> Self {
        TokenSet {
            path: token_path(data_dir),
            state: RwLock::new(Loaded::default()),
        }
    }

    fn refresh(&self) {
        let now = stamp(&self.path);
        if self.state.read().stamp == now && now.is_some() {
            return;
        }
        let hashes = match read_file(&self.path) {
            Ok(file) => file
                .tokens
                .iter()
                .filter_map(|t| {
                    let bytes = hex::decode(&t.sha256).ok()?;
                    <[u8; 32]>::try_from(bytes.as_slice()).ok()
                })
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the API token file; refusing every token");
                HashSet::new()
            }
        };
        let mut st = self.state.write();
        st.stamp = now;
        st.hashes = hashes;
    }

    /// Checks an `Authorization` header value.
    pub fn check(&self, authorization: Option<&str>) -> Result<(), AuthFailure> {
        self.refresh();
        let token = authorization
            .and_then(|h| {
                let (scheme, rest) = h.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| !t.is_empty());
        let st = self.state.read();
        let Some(token) = token else {
            return Err(if st.hashes.is_empty() {
                AuthFailure::NoTokens
            } else {
                AuthFailure::Missing
            });
        };
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if st.hashes.contains(&digest) {
            Ok(())
        } else if st.hashes.is_empty() {
            Err(AuthFailure::NoTokens)
        } else {
            Err(AuthFailure::Invalid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_tokens_authenticate_until_revoked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let set = TokenSet::new(dir.path());
        assert_eq!(set.check(None), Err(AuthFailure::NoTokens));
        let (token, entry) = create(dir.path(), "ci").expect("create");
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() == 4 + 64);
        let header = format!("Bearer {token}");
        assert_eq!(set.check(Some(&header)), Ok(()));
        assert_eq!(
            set.check(Some("Bearer sym_nope")),
            Err(AuthFailure::Invalid)
        );
        assert_eq!(set.check(Some(&token)), Err(AuthFailure::Missing));
        assert_eq!(set.check(None), Err(AuthFailure::Missing));
        // Only the hash is on disk, and the file is private.
        let text = std::fs::read_to_string(token_path(dir.path())).expect("read");
        assert!(!text.contains(&token[4..]));
        assert!(text.contains(&entry.sha256));
        let mode = std::fs::metadata(token_path(dir.path()))
            .expect("meta")
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (other, _) = create(dir.path(), "second").expect("create");
        revoke(dir.path(), &entry.id).expect("revoke");
        assert_eq!(set.check(Some(&header)), Err(AuthFailure::Invalid));
        assert_eq!(set.check(Some(&format!("bearer {other}"))), Ok(()));
        assert!(revoke(dir.path(), "nobody").is_err());
        assert_eq!(list(dir.path()).expect("list").len(), 1);
    }
}
