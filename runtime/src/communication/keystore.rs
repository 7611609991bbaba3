//! Agent keys at rest: each identity's two secrets wrapped with AES-256-GCM under a
//! key-encryption key (KEK) kept in a 0600 file, stored in the runtime's [`Store`].
//!
//! Record layout (table [`KEY_TABLE`], key `<agent>/<epoch, 10 digits>`), JSON:
//! `{ v, agent, epoch, created_ms, retired_ms, ed25519_public, x25519_public, nonce, wrapped }`
//! where `wrapped = AES-256-GCM(KEK, nonce, ed25519 secret || x25519 secret,
//! aad = "symbiont/v1/keywrap" || agent || epoch)`. Nonces are random 96-bit values: a KEK
//! wraps one record per key generation, far below the 2^32 messages after which random GCM
//! nonces become a concern. The AAD binds a record to its agent and epoch, so a wrapped key
//! moved to another record does not unwrap.
//!
//! The KEK file is created with `O_CREAT | O_EXCL` and mode 0600 and is refused at load when
//! its permissions allow group or other access, or when it is not exactly 32 bytes.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::Aes256Gcm;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::crypto::{random_bytes, Identity};
use super::CommunicationError;
use crate::storage::{decode_json, encode_json, Store};
use crate::types::AgentId;

/// Store table holding wrapped agent keys.
pub const KEY_TABLE: &str = "comm_keys";
const WRAP_AAD: &[u8] = b"symbiont/v1/keywrap\0";

/// The key-encryption key, loaded from (or created in) a 0600 file.
pub struct KeyEncryptionKey {
    cipher: Aes256Gcm,
    path: PathBuf,
}

impl std::fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEncryptionKey")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl KeyEncryptionKey {
    /// Loads the KEK at `path`, creating it (32 random bytes, mode 0600, parent 0700) when
    /// absent. Refuses a file readable or writable by group or others (SEC_001).
    pub fn load_or_create(path: impl AsRef<Path>) -> Result<Self, CommunicationError> {
        let path = path.as_ref().to_path_buf();
        let ks = |m: String| CommunicationError::KeyStore(m);
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() && !parent.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(|e| ks(format!("create {}: {e}", parent.display())))?;
            }
        }
        let created = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut f) => {
                let key = Zeroizing::new(random_bytes::<32>().map_err(ks)?);
                f.write_all(&key[..])
                    .and_then(|_| f.sync_all())
                    .map_err(|e| ks(format!("write {}: {e}", path.display())))?;
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(ks(format!("create {}: {e}", path.display()))),
        };
        let meta =
            std::fs::metadata(&path).map_err(|e| ks(format!("stat {}: {e}", path.display())))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CommunicationError::Security(format!(
                "key-encryption key {} has mode {mode:o}; it must not be accessible to group or \
                 others (run `chmod 600 {}`)",
                path.display(),
                path.display()
            )));
        }
        let bytes = Zeroizing::new(
            std::fs::read(&path).map_err(|e| ks(format!("read {}: {e}", path.display())))?,
        );
        if bytes.len() != 32 {
            return Err(ks(format!(
                "key-encryption key {} must be exactly 32 bytes, found {}",
                path.display(),
                bytes.len()
            )));
        }
        let cipher = Aes256Gcm::new_from_slice(&bytes[..]).map_err(|e| ks(e.to_string()))?;
        if created {
            tracing::info!(path = %path.display(), "created communication key-encryption key");
        }
        Ok(Self { cipher, path })
    }

    /// Where the KEK lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn aad(agent: AgentId, epoch: u32) -> Vec<u8> {
        let mut aad = WRAP_AAD.to_vec();
        aad.extend_from_slice(agent.as_uuid().as_bytes());
        aad.extend_from_slice(&epoch.to_be_bytes());
        aad
    }

    fn wrap(
        &self,
        agent: AgentId,
        epoch: u32,
        secret: &[u8; 64],
    ) -> Result<([u8; 12], Vec<u8>), String> {
        let nonce = random_bytes::<12>()?;
        let mut buf = secret.to_vec();
        let tag = self
            .cipher
            .encrypt_inout_detached(
                &nonce.into(),
                &Self::aad(agent, epoch),
                buf.as_mut_slice().into(),
            )
            .map_err(|_| "key wrap failed".to_string())?;
        buf.extend_from_slice(&tag);
        Ok((nonce, buf))
    }

    fn unwrap_key(
        &self,
        agent: AgentId,
        epoch: u32,
        nonce: &[u8; 12],
        wrapped: &[u8],
    ) -> Result<Zeroizing<[u8; 64]>, String> {
        if wrapped.len() != 64 + 16 {
            return Err("wrapped key has the wrong length".into());
        }
        let mut buf = Zeroizing::new([0u8; 64]);
        buf.copy_from_slice(&wrapped[..64]);
        let tag: [u8; 16] = wrapped[64..]
            .try_into()
            .map_err(|_| "bad tag".to_string())?;
        self.cipher
            .decrypt_inout_detached(
                &(*nonce).into(),
                &Self::aad(agent, epoch),
                buf.as_mut_slice().into(),
                &tag.into(),
            )
            .map_err(|_| {
                "wrapped key does not authenticate (wrong KEK or tampered record)".to_string()
            })?;
        Ok(buf)
    }
}

#[derive(Serialize, Deserialize)]
struct KeyRecord {
    v: u32,
    agent: AgentId,
    epoch: u32,
    created_ms: u64,
    retired_ms: Option<u64>,
    ed25519_public: String,
    x25519_public: String,
    nonce: String,
    wrapped: String,
}

/// Persists wrapped identities in a [`Store`].
#[derive(Clone)]
pub(crate) struct KeyStore {
    store: Arc<dyn Store>,
    kek: Arc<KeyEncryptionKey>,
}

impl KeyStore {
    pub fn new(store: Arc<dyn Store>, kek: KeyEncryptionKey) -> Self {
        Self {
            store,
            kek: Arc::new(kek),
        }
    }

    fn key(agent: AgentId, epoch: u32) -> String {
        format!("{agent}/{epoch:010}")
    }

    /// Writes (or rewrites) one identity.
    pub fn save(&self, agent: AgentId, id: &Identity) -> Result<(), CommunicationError> {
        let (nonce, wrapped) = self
            .kek
            .wrap(agent, id.epoch, &id.secrets())
            .map_err(CommunicationError::KeyStore)?;
        let rec = KeyRecord {
            v: 1,
            agent,
            epoch: id.epoch,
            created_ms: id.created_ms,
            retired_ms: id.retired_ms,
            ed25519_public: hex::encode(id.verifying.as_bytes()),
            x25519_public: hex::encode(id.x_public.as_bytes()),
            nonce: hex::encode(nonce),
            wrapped: hex::encode(wrapped),
        };
        let bytes = encode_json(&rec).map_err(|e| CommunicationError::KeyStore(e.to_string()))?;
        self.store
            .put(KEY_TABLE, &Self::key(agent, id.epoch), &bytes)
            .map_err(|e| CommunicationError::KeyStore(e.to_string()))
    }

    /// Every stored identity of `agent`, oldest epoch first.
    pub fn load(&self, agent: AgentId) -> Result<Vec<Identity>, CommunicationError> {
        let prefix = format!("{agent}/");
        let mut out = Vec::new();
        let rows = self
            .store
            .scan(KEY_TABLE)
            .map_err(|e| CommunicationError::KeyStore(e.to_string()))?;
        for (k, v) in rows.into_iter().filter(|(k, _)| k.starts_with(&prefix)) {
            let rec: KeyRecord = decode_json(KEY_TABLE, &k, &v)
                .map_err(|e| CommunicationError::KeyStore(e.to_string()))?;
            let bad = |m: &str| CommunicationError::KeyStore(format!("{KEY_TABLE}/{k}: {m}"));
            if rec.agent != agent {
                return Err(bad("record belongs to another agent"));
            }
            let nonce: [u8; 12] = hex::decode(&rec.nonce)
                .ok()
                .and_then(|n| n.try_into().ok())
                .ok_or_else(|| bad("bad nonce"))?;
            let wrapped = hex::decode(&rec.wrapped).map_err(|_| bad("bad wrapped key"))?;
            let secrets = self
                .kek
                .unwrap_key(agent, rec.epoch, &nonce, &wrapped)
                .map_err(|m| bad(&m))?;
            let mut ed = Zeroizing::new([0u8; 32]);
            let mut x = Zeroizing::new([0u8; 32]);
            ed.copy_from_slice(&secrets[..32]);
            x.copy_from_slice(&secrets[32..]);
            let id = Identity::from_secrets(rec.epoch, &ed, &x, rec.created_ms, rec.retired_ms);
            if hex::encode(id.verifying.as_bytes()) != rec.ed25519_public {
                return Err(bad("public key does not match the unwrapped secret"));
            }
            out.push(id);
        }
        out.sort_by_key(|i| i.epoch);
        Ok(out)
    }

    /// Removes one identity.
    pub fn delete(&self, agent: AgentId, epoch: u32) -> Result<(), CommunicationError> {
        self.store
            .delete(KEY_TABLE, &Self::key(agent, epoch))
            .map(|_| ())
            .map_err(|e| CommunicationError::KeyStore(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStore;

    #[test]
    fn kek_is_created_0600_and_loose_permissions_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/comm.kek");
        let _kek = KeyEncryptionKey::load_or_create(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _again = KeyEncryptionKey::load_or_create(&path).expect("reload");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = KeyEncryptionKey::load_or_create(&path).expect_err("loose perms");
        assert_eq!(err.code(), "SEC_001");
    }

    #[test]
    fn identities_round_trip_wrapped_and_secrets_are_not_in_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let ks = KeyStore::new(
            store.clone(),
            KeyEncryptionKey::load_or_create(dir.path().join("k")).expect("kek"),
        );
        let agent = AgentId::new();
        let id = Identity::generate(1, 5).expect("id");
        ks.save(agent, &id).expect("save");
        let secrets = id.secrets();
        let all: Vec<u8> = store
            .scan(KEY_TABLE)
            .expect("scan")
            .into_iter()
            .flat_map(|(_, v)| v)
            .collect();
        let text = String::from_utf8_lossy(&all);
        assert!(!text.contains(&hex::encode(&secrets[..32])));
        assert!(!text.contains(&hex::encode(&secrets[32..])));
        let back = ks.load(agent).expect("load");
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].verifying, id.verifying);

        // A record moved to another agent does not unwrap.
        let other = AgentId::new();
        let v = store
            .get(KEY_TABLE, &format!("{agent}/{:010}", 1))
            .expect("get")
            .expect("present");
        let moved = String::from_utf8(v)
            .expect("utf8")
            .replace(&agent.to_string(), &other.to_string());
        store
            .put(KEY_TABLE, &format!("{other}/{:010}", 1), moved.as_bytes())
            .expect("put");
        assert!(ks.load(other).is_err());

        // A different KEK cannot unwrap.
        let ks2 = KeyStore::new(
            store,
            KeyEncryptionKey::load_or_create(dir.path().join("k2")).expect("kek2"),
        );
        assert!(ks2.load(agent).is_err());
    }
}
