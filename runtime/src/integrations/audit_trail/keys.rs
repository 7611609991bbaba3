//! The runtime's Ed25519 audit key pair: generated on first start, the private key stored
//! with mode 0600 (hex of the 32-byte seed), the public key exported beside it as
//! `<key>.pub` (64 hex digits) for verifiers.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use super::AuditError;

/// The public-key file written beside a private key: `<key_path>.pub`.
pub fn public_key_path(key_path: &Path) -> PathBuf {
    let mut name = key_path.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// The private audit key. Its `Debug` shows only the public half.
pub struct AuditKey {
    signing: SigningKey,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey")
            .field("public", &self.public_key().to_hex())
            .finish()
    }
}

impl AuditKey {
    /// A fresh random key (from the OS's random source).
    pub fn generate() -> Result<Self, AuditError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| AuditError::Key(format!("no randomness for a new key: {e}")))?;
        let key = Self {
            signing: SigningKey::from_bytes(&seed),
        };
        seed.fill(0);
        Ok(key)
    }

    /// A key from its 32-byte seed (tests and tools).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(seed),
        }
    }

    /// Reads the private key at `path`, refusing a file that group or others can access.
    pub fn load(path: &Path) -> Result<Self, AuditError> {
        let meta = fs::metadata(path)
            .map_err(|e| AuditError::Key(format!("cannot read {}: {e}", path.display())))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(AuditError::Key(format!(
                "{} has mode {mode:04o}; the audit key must be private (chmod 600 {})",
                path.display(),
                path.display()
            )));
        }
        let text = fs::read_to_string(path)
            .map_err(|e| AuditError::Key(format!("cannot read {}: {e}", path.display())))?;
        let mut seed = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut seed).map_err(|_| {
            AuditError::Key(format!(
                "{} is not an audit key (expected 64 hex digits)",
                path.display()
            ))
        })?;
        let key = Self::from_seed(&seed);
        seed.fill(0);
        Ok(key)
    }

    /// Loads the key at `path`, or generates one there (mode 0600, parent directory 0700)
    /// when there is none; either way makes sure `<path>.pub` holds its public key.
    /// Returns the key and whether it was generated now.
    pub fn load_or_generate(path: &Path) -> Result<(Self, bool), AuditError> {
        let (key, generated) = match Self::load(path) {
            Ok(key) => (key, false),
            Err(_) if !path.exists() => match Self::generate()?.save_new(path) {
                Ok(key) => (key, true),
                // Someone else created it between our check and our create: use theirs.
                Err(_) if path.exists() => (Self::load(path)?, false),
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        };
        key.export_public(&public_key_path(path))?;
        if generated {
            tracing::info!(path = %path.display(), public_key = %key.public_key().to_hex(),
                "generated a new audit key");
        }
        Ok((key, generated))
    }

    /// Writes this key to `path`, which must not exist yet (mode 0600).
    fn save_new(self, path: &Path) -> Result<Self, AuditError> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| AuditError::Key(format!("cannot create {}: {e}", parent.display())))?;
            let _ = fs::set_permissions(parent, fs::Permissions::from_mode(0o700));
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| AuditError::Key(format!("cannot create {}: {e}", path.display())))?;
        let mut text = hex::encode(self.signing.to_bytes());
        text.push('\n');
        let written = file
            .write_all(text.as_bytes())
            .and_then(|_| file.sync_all());
        // Do not leave the hex copy of the seed lying around longer than needed.
        text.clear();
        written.map_err(|e| AuditError::Key(format!("cannot write {}: {e}", path.display())))?;
        Ok(self)
    }

    /// Writes the public key to `path` (replacing a stale one).
    pub fn export_public(&self, path: &Path) -> Result<(), AuditError> {
        let hex_key = self.public_key().to_hex();
        if fs::read_to_string(path).is_ok_and(|t| t.trim() == hex_key) {
            return Ok(());
        }
        let tmp = path.with_extension("pub.tmp");
        fs::write(&tmp, format!("{hex_key}\n"))
            .and_then(|_| fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)))
            .and_then(|_| fs::rename(&tmp, path))
            .map_err(|e| AuditError::Key(format!("cannot write {}: {e}", path.display())))
    }

    /// The public half.
    pub fn public_key(&self) -> AuditPublicKey {
        AuditPublicKey {
            key: self.signing.verifying_key(),
        }
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }
}

/// An audit public key, as verifiers use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditPublicKey {
    key: VerifyingKey,
}

impl AuditPublicKey {
    /// From its 32 bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, AuditError> {
        VerifyingKey::from_bytes(bytes)
            .map(|key| Self { key })
            .map_err(|e| AuditError::Key(format!("not an Ed25519 public key: {e}")))
    }

    /// From 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, AuditError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes)
            .map_err(|_| AuditError::Key("a public key is 64 hex digits (32 bytes)".to_string()))?;
        Self::from_bytes(&bytes)
    }

    /// Reads a public-key file (64 hex digits).
    pub fn read_file(path: &Path) -> Result<Self, AuditError> {
        let text = fs::read_to_string(path)
            .map_err(|e| AuditError::Key(format!("cannot read {}: {e}", path.display())))?;
        Self::from_hex(&text).map_err(|e| AuditError::Key(format!("{}: {e}", path.display())))
    }

    /// The 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Lower-case hex of the 32 bytes.
    pub fn to_hex(&self) -> String {
        hex::encode(self.key.to_bytes())
    }

    /// Whether `sig` is this key's signature of `message` (strict RFC 8032 checks).
    pub fn verify(&self, message: &[u8], sig: &[u8; 64]) -> bool {
        self.key
            .verify_strict(message, &Signature::from_bytes(sig))
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_is_private_and_exports_its_public_half() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys").join("audit.ed25519");
        let (key, generated) = AuditKey::load_or_generate(&path).expect("generate");
        assert!(generated);
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let public = AuditPublicKey::read_file(&public_key_path(&path)).expect("pub");
        assert_eq!(public, key.public_key());
        let (again, generated) = AuditKey::load_or_generate(&path).expect("load");
        assert!(!generated);
        assert_eq!(again.public_key(), key.public_key());
    }

    #[test]
    fn a_world_readable_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.ed25519");
        AuditKey::load_or_generate(&path).expect("generate");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = AuditKey::load(&path).expect_err("must refuse");
        assert_eq!(err.code(), "AUDIT_003");
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn signatures_verify_only_with_the_right_key_and_message() {
        let a = AuditKey::from_seed(&[1; 32]);
        let b = AuditKey::from_seed(&[2; 32]);
        let sig = a.sign(b"hello");
        assert!(a.public_key().verify(b"hello", &sig));
        assert!(!a.public_key().verify(b"hellO", &sig));
        assert!(!b.public_key().verify(b"hello", &sig));
    }
}
