//! The cryptography of the bus: agent identities (Ed25519 + X25519), per-pair AES-256-GCM
//! keys (X25519 + HKDF-SHA256, domain-separated), the canonical envelope header (the AEAD's
//! associated data and, with the ciphertext, what the signature covers), and the signed
//! session handshake.
//!
//! Nonces: every envelope carries a sequence number unique per sender within one bus instance
//! (a per-sender 64-bit counter); the 96-bit nonce is `mode byte || 3 zero bytes || seq`.
//! Every key is specific to one direction (sender, recipient), one pair of key epochs (or one
//! session) and one bus instance (the HKDF salt is the instance's random 128-bit id), so a
//! (key, nonce) pair is never used twice, including across restarts of the runtime.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey as XPublic, StaticSecret};
use zeroize::Zeroizing;

use crate::types::{AgentId, MessageId, Priority};

/// Domain prefix of envelope signatures.
pub(crate) const SIG_DOMAIN: &[u8] = b"symbiont/v1/envelope-signature\0";
const PAIR_KEY_INFO: &[u8] = b"symbiont/v1/pair-key\0";
const SESSION_KEY_INFO: &[u8] = b"symbiont/v1/session-key\0";
const HS_INIT_DOMAIN: &[u8] = b"symbiont/v1/handshake-init\0";
const HS_RESP_DOMAIN: &[u8] = b"symbiont/v1/handshake-response\0";
const HEADER_MAGIC: &[u8; 4] = b"SYMB";
const HEADER_VERSION: u8 = 1;

/// Fills `buf` from the operating system's CSPRNG.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], String> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|e| format!("system random source failed: {e}"))?;
    Ok(buf)
}

/// One generation (epoch) of an agent's keys. Private parts never leave the runtime.
pub(crate) struct Identity {
    pub epoch: u32,
    pub signing: SigningKey,
    pub verifying: VerifyingKey,
    pub x_secret: StaticSecret,
    pub x_public: XPublic,
    pub created_ms: u64,
    /// When a rotation replaced it (it still verifies/decrypts until `retired_ms + grace`).
    pub retired_ms: Option<u64>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("epoch", &self.epoch)
            .field("verifying", &hex::encode(self.verifying.as_bytes()))
            .field("retired_ms", &self.retired_ms)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh identity from the system CSPRNG.
    pub fn generate(epoch: u32, now_ms: u64) -> Result<Self, String> {
        let ed = Zeroizing::new(random_bytes::<32>()?);
        let x = Zeroizing::new(random_bytes::<32>()?);
        Ok(Self::from_secrets(epoch, &ed, &x, now_ms, None))
    }

    /// Rebuilds an identity from its two 32-byte secrets.
    pub fn from_secrets(
        epoch: u32,
        ed_secret: &[u8; 32],
        x_secret: &[u8; 32],
        created_ms: u64,
        retired_ms: Option<u64>,
    ) -> Self {
        let signing = SigningKey::from_bytes(ed_secret);
        let verifying = signing.verifying_key();
        let x_secret = StaticSecret::from(*x_secret);
        let x_public = XPublic::from(&x_secret);
        Self {
            epoch,
            signing,
            verifying,
            x_secret,
            x_public,
            created_ms,
            retired_ms,
        }
    }

    /// The two secrets, for wrapping at rest.
    pub fn secrets(&self) -> Zeroizing<[u8; 64]> {
        let mut out = Zeroizing::new([0u8; 64]);
        out[..32].copy_from_slice(&self.signing.to_bytes());
        out[32..].copy_from_slice(self.x_secret.as_bytes());
        out
    }
}

/// Derives the AES-256-GCM key for messages `from → to` under the given key epochs.
pub(crate) fn derive_pair_key(
    instance: &[u8; 16],
    from: AgentId,
    to: AgentId,
    from_epoch: u32,
    to_epoch: u32,
    my_secret: &StaticSecret,
    their_public: &XPublic,
) -> Result<Aes256Gcm, String> {
    let shared = my_secret.diffie_hellman(their_public);
    if !shared.was_contributory() {
        return Err("X25519 agreement produced a non-contributory secret".into());
    }
    let hk = Hkdf::<Sha256>::new(Some(instance), shared.as_bytes());
    let mut okm = Zeroizing::new([0u8; 32]);
    hk.expand_multi_info(
        &[
            PAIR_KEY_INFO,
            from.as_uuid().as_bytes(),
            to.as_uuid().as_bytes(),
            &from_epoch.to_be_bytes(),
            &to_epoch.to_be_bytes(),
        ],
        &mut okm[..],
    )
    .map_err(|e| format!("hkdf: {e}"))?;
    Aes256Gcm::new_from_slice(&okm[..]).map_err(|e| format!("aes key: {e}"))
}

/// How an envelope is authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EnvelopeMode {
    /// Ed25519 signature over header and ciphertext, AES-256-GCM under the static pair key.
    Signed,
    /// AES-256-GCM under a session key agreed by a signed handshake; no per-message signature.
    Session,
}

impl EnvelopeMode {
    fn byte(self) -> u8 {
        match self {
            EnvelopeMode::Signed => 1,
            EnvelopeMode::Session => 2,
        }
    }
}

/// How a message is meant to be handled by its recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum MessageKind {
    /// Sent to one agent.
    Direct,
    /// A copy of a topic publication.
    Topic,
    /// A request awaiting a reply.
    Request,
    /// A reply to a request.
    Reply,
}

impl MessageKind {
    fn byte(self) -> u8 {
        match self {
            MessageKind::Direct => 0,
            MessageKind::Topic => 1,
            MessageKind::Request => 2,
            MessageKind::Reply => 3,
        }
    }
}

fn priority_byte(p: Priority) -> u8 {
    match p {
        Priority::Low => 0,
        Priority::Normal => 1,
        Priority::High => 2,
        Priority::Critical => 3,
    }
}

/// The authenticated header of an envelope. Every field is covered by the signature (signed
/// mode) and by the AEAD tag as associated data (both modes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvelopeHeader {
    /// Authentication mode.
    pub mode: EnvelopeMode,
    /// What kind of message.
    pub kind: MessageKind,
    /// The message id.
    pub message_id: MessageId,
    /// Sender.
    pub from: AgentId,
    /// Recipient.
    pub to: AgentId,
    /// For replies: the request's id.
    pub correlation: Option<MessageId>,
    /// Topic.
    pub topic: String,
    /// Priority.
    pub priority: Priority,
    /// When it was sealed (bus clock, Unix milliseconds).
    pub created_ms: u64,
    /// When it expires (bus clock, Unix milliseconds).
    pub expires_ms: u64,
    /// Per-sender sequence number (replay protection and nonce).
    pub seq: u64,
    /// The sender's key epoch (signed mode).
    pub sender_epoch: u32,
    /// The recipient's key epoch (signed mode).
    pub recipient_epoch: u32,
    /// The session (session mode), zero otherwise.
    pub session_id: [u8; 16],
    /// The bus instance that sealed it.
    pub instance: [u8; 16],
    /// True when the body is AES-256-GCM ciphertext (false: plaintext + GMAC tag in session
    /// mode, plaintext in signed mode).
    pub encrypted: bool,
    /// Length of the body in bytes.
    pub body_len: u32,
}

impl EnvelopeHeader {
    /// The canonical byte encoding (fixed layout, big-endian).
    pub fn to_bytes(&self) -> Vec<u8> {
        let topic = self.topic.as_bytes();
        let mut b = Vec::with_capacity(180 + topic.len());
        b.extend_from_slice(HEADER_MAGIC);
        b.push(HEADER_VERSION);
        b.push(self.mode.byte());
        b.push(self.kind.byte());
        b.push(priority_byte(self.priority));
        b.push(self.encrypted as u8);
        b.extend_from_slice(self.message_id.as_uuid().as_bytes());
        b.extend_from_slice(self.from.as_uuid().as_bytes());
        b.extend_from_slice(self.to.as_uuid().as_bytes());
        match self.correlation {
            Some(c) => {
                b.push(1);
                b.extend_from_slice(c.as_uuid().as_bytes());
            }
            None => {
                b.push(0);
                b.extend_from_slice(&[0u8; 16]);
            }
        }
        b.extend_from_slice(&self.created_ms.to_be_bytes());
        b.extend_from_slice(&self.expires_ms.to_be_bytes());
        b.extend_from_slice(&self.seq.to_be_bytes());
        b.extend_from_slice(&self.sender_epoch.to_be_bytes());
        b.extend_from_slice(&self.recipient_epoch.to_be_bytes());
        b.extend_from_slice(&self.session_id);
        b.extend_from_slice(&self.instance);
        b.extend_from_slice(&self.body_len.to_be_bytes());
        b.extend_from_slice(&(topic.len() as u32).to_be_bytes());
        b.extend_from_slice(topic);
        b
    }

    /// The AEAD nonce of this envelope.
    pub fn nonce(&self) -> Nonce<aes_gcm::aead::consts::U12> {
        let mut n = [0u8; 12];
        n[0] = self.mode.byte();
        n[4..].copy_from_slice(&self.seq.to_be_bytes());
        n.into()
    }
}

/// A sealed message: header, body (ciphertext and tag) and, in signed mode, the sender's
/// Ed25519 signature over `domain || header || body`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The authenticated header.
    pub header: EnvelopeHeader,
    /// Ciphertext followed by the 16-byte GCM tag.
    pub body: Vec<u8>,
    /// Signature (signed mode).
    pub signature: Option<[u8; 64]>,
}

impl Envelope {
    /// Bytes held for this envelope (for mailbox accounting).
    pub fn size(&self) -> usize {
        self.body.len() + self.header.topic.len() + 200
    }

    /// The bytes the signature covers.
    pub(crate) fn signed_bytes(header_bytes: &[u8], body: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(SIG_DOMAIN.len() + header_bytes.len() + body.len());
        m.extend_from_slice(SIG_DOMAIN);
        m.extend_from_slice(header_bytes);
        m.extend_from_slice(body);
        m
    }
}

/// Encrypts (or, when `encrypt` is false, authenticates) `payload` in place and returns the
/// body: ciphertext || tag, or plaintext || GMAC tag.
pub(crate) fn seal_body(
    cipher: &Aes256Gcm,
    header: &EnvelopeHeader,
    header_bytes: &[u8],
    mut payload: Vec<u8>,
    encrypt: bool,
) -> Result<Vec<u8>, String> {
    let nonce = header.nonce();
    if encrypt {
        let tag = cipher
            .encrypt_inout_detached(&nonce, header_bytes, payload.as_mut_slice().into())
            .map_err(|_| "AES-GCM encryption failed".to_string())?;
        payload.extend_from_slice(&tag);
    } else {
        let mut aad = Vec::with_capacity(header_bytes.len() + payload.len());
        aad.extend_from_slice(header_bytes);
        aad.extend_from_slice(&payload);
        let tag = cipher
            .encrypt_inout_detached(&nonce, &aad, (&mut [][..]).into())
            .map_err(|_| "AES-GCM authentication failed".to_string())?;
        payload.extend_from_slice(&tag);
    }
    Ok(payload)
}

/// Authenticates and decrypts a body sealed by [`seal_body`] in place: on success `body`
/// holds the plaintext; on failure (altered header, ciphertext or wrong key) it is left
/// unchanged.
pub(crate) fn open_body_in_place(
    cipher: &Aes256Gcm,
    header: &EnvelopeHeader,
    header_bytes: &[u8],
    body: &mut Vec<u8>,
) -> Result<(), ()> {
    if body.len() < 16 {
        return Err(());
    }
    let split = body.len() - 16;
    let tag: [u8; 16] = body[split..].try_into().map_err(|_| ())?;
    let nonce = header.nonce();
    if header.encrypted {
        cipher
            .decrypt_inout_detached(
                &nonce,
                header_bytes,
                body[..split].as_mut().into(),
                &tag.into(),
            )
            .map_err(|_| ())?;
    } else {
        let mut aad = Vec::with_capacity(header_bytes.len() + split);
        aad.extend_from_slice(header_bytes);
        aad.extend_from_slice(&body[..split]);
        cipher
            .decrypt_inout_detached(&nonce, &aad, (&mut [][..]).into(), &tag.into())
            .map_err(|_| ())?;
    }
    body.truncate(split);
    Ok(())
}

/// Like [`open_body_in_place`] on a copy.
#[cfg(test)]
pub(crate) fn open_body(
    cipher: &Aes256Gcm,
    header: &EnvelopeHeader,
    header_bytes: &[u8],
    body: &[u8],
) -> Result<Vec<u8>, ()> {
    let mut out = body.to_vec();
    open_body_in_place(cipher, header, header_bytes, &mut out)?;
    Ok(out)
}

/// Signs `domain || header || body`.
pub(crate) fn sign_envelope(key: &SigningKey, header_bytes: &[u8], body: &[u8]) -> [u8; 64] {
    key.sign(&Envelope::signed_bytes(header_bytes, body))
        .to_bytes()
}

/// Verifies an envelope signature (strict: rejects malleable and small-order encodings).
pub(crate) fn verify_envelope(
    key: &VerifyingKey,
    header_bytes: &[u8],
    body: &[u8],
    signature: &[u8; 64],
) -> bool {
    let sig = Signature::from_bytes(signature);
    key.verify_strict(&Envelope::signed_bytes(header_bytes, body), &sig)
        .is_ok()
}

/// The first message of the session handshake, signed by the initiator's Ed25519 key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeInit {
    /// Random session id.
    pub session_id: [u8; 16],
    /// The bus instance.
    pub instance: [u8; 16],
    /// Who starts.
    pub initiator: AgentId,
    /// Who answers.
    pub responder: AgentId,
    /// The initiator's key epoch (its signing key).
    pub initiator_epoch: u32,
    /// The initiator's ephemeral X25519 public key.
    pub ephemeral: [u8; 32],
    /// When it was made (bus clock, Unix ms).
    pub created_ms: u64,
    /// Ed25519 signature over all the fields above.
    pub signature: [u8; 64],
}

impl HandshakeInit {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(160);
        b.extend_from_slice(HS_INIT_DOMAIN);
        b.extend_from_slice(&self.session_id);
        b.extend_from_slice(&self.instance);
        b.extend_from_slice(self.initiator.as_uuid().as_bytes());
        b.extend_from_slice(self.responder.as_uuid().as_bytes());
        b.extend_from_slice(&self.initiator_epoch.to_be_bytes());
        b.extend_from_slice(&self.ephemeral);
        b.extend_from_slice(&self.created_ms.to_be_bytes());
        b
    }

    fn transcript(&self) -> Vec<u8> {
        let mut b = self.signed_bytes();
        b.extend_from_slice(&self.signature);
        b
    }
}

/// The answer of the session handshake, signed by the responder over the initiator's whole
/// message and its own ephemeral key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeResponse {
    /// The responder's key epoch.
    pub responder_epoch: u32,
    /// The responder's ephemeral X25519 public key.
    pub ephemeral: [u8; 32],
    /// Ed25519 signature over `SHA-256(init transcript) || epoch || ephemeral`.
    pub signature: [u8; 64],
}

impl HandshakeResponse {
    fn signed_bytes(init: &HandshakeInit, epoch: u32, ephemeral: &[u8; 32]) -> Vec<u8> {
        let mut b = Vec::with_capacity(120);
        b.extend_from_slice(HS_RESP_DOMAIN);
        b.extend_from_slice(&Sha256::digest(init.transcript()));
        b.extend_from_slice(&epoch.to_be_bytes());
        b.extend_from_slice(ephemeral);
        b
    }
}

/// The two directional keys of an established session.
pub(crate) struct SessionKeys {
    /// initiator → responder.
    pub i2r: Aes256Gcm,
    /// responder → initiator.
    pub r2i: Aes256Gcm,
}

fn session_keys(
    init: &HandshakeInit,
    resp: &HandshakeResponse,
    shared: &x25519_dalek::SharedSecret,
) -> Result<SessionKeys, String> {
    if !shared.was_contributory() {
        return Err("handshake agreement produced a non-contributory secret".into());
    }
    let mut transcript = Sha256::new();
    transcript.update(init.transcript());
    transcript.update(resp.responder_epoch.to_be_bytes());
    transcript.update(resp.ephemeral);
    transcript.update(resp.signature);
    let th = transcript.finalize();
    let hk = Hkdf::<Sha256>::new(Some(&init.session_id), shared.as_bytes());
    let mut a = Zeroizing::new([0u8; 32]);
    let mut b = Zeroizing::new([0u8; 32]);
    hk.expand_multi_info(&[SESSION_KEY_INFO, &th, b"i2r"], &mut a[..])
        .map_err(|e| format!("hkdf: {e}"))?;
    hk.expand_multi_info(&[SESSION_KEY_INFO, &th, b"r2i"], &mut b[..])
        .map_err(|e| format!("hkdf: {e}"))?;
    Ok(SessionKeys {
        i2r: Aes256Gcm::new_from_slice(&a[..]).map_err(|e| format!("aes key: {e}"))?,
        r2i: Aes256Gcm::new_from_slice(&b[..]).map_err(|e| format!("aes key: {e}"))?,
    })
}

/// Starts a handshake: a fresh ephemeral key and a signed init message.
pub(crate) fn handshake_init(
    instance: [u8; 16],
    initiator: AgentId,
    responder: AgentId,
    identity: &Identity,
    now_ms: u64,
) -> Result<(HandshakeInit, StaticSecret), String> {
    let eph = StaticSecret::from(*Zeroizing::new(random_bytes::<32>()?));
    let mut init = HandshakeInit {
        session_id: random_bytes::<16>()?,
        instance,
        initiator,
        responder,
        initiator_epoch: identity.epoch,
        ephemeral: XPublic::from(&eph).to_bytes(),
        created_ms: now_ms,
        signature: [0u8; 64],
    };
    init.signature = identity.signing.sign(&init.signed_bytes()).to_bytes();
    Ok((init, eph))
}

/// Answers a handshake after verifying the initiator's signature with `initiator_key`.
pub(crate) fn handshake_respond(
    init: &HandshakeInit,
    initiator_key: &VerifyingKey,
    identity: &Identity,
) -> Result<(HandshakeResponse, SessionKeys), String> {
    initiator_key
        .verify_strict(
            &init.signed_bytes(),
            &Signature::from_bytes(&init.signature),
        )
        .map_err(|_| "handshake init signature does not verify".to_string())?;
    let eph = StaticSecret::from(*Zeroizing::new(random_bytes::<32>()?));
    let ephemeral = XPublic::from(&eph).to_bytes();
    let signature = identity
        .signing
        .sign(&HandshakeResponse::signed_bytes(
            init,
            identity.epoch,
            &ephemeral,
        ))
        .to_bytes();
    let resp = HandshakeResponse {
        responder_epoch: identity.epoch,
        ephemeral,
        signature,
    };
    let shared = eph.diffie_hellman(&XPublic::from(init.ephemeral));
    let keys = session_keys(init, &resp, &shared)?;
    Ok((resp, keys))
}

/// Completes a handshake on the initiator's side after verifying the responder's signature.
pub(crate) fn handshake_finish(
    init: &HandshakeInit,
    eph: &StaticSecret,
    resp: &HandshakeResponse,
    responder_key: &VerifyingKey,
) -> Result<SessionKeys, String> {
    responder_key
        .verify_strict(
            &HandshakeResponse::signed_bytes(init, resp.responder_epoch, &resp.ephemeral),
            &Signature::from_bytes(&resp.signature),
        )
        .map_err(|_| "handshake response signature does not verify".to_string())?;
    let shared = eph.diffie_hellman(&XPublic::from(resp.ephemeral));
    session_keys(init, resp, &shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> EnvelopeHeader {
        EnvelopeHeader {
            mode: EnvelopeMode::Signed,
            kind: MessageKind::Direct,
            message_id: MessageId::new(),
            from: AgentId::new(),
            to: AgentId::new(),
            correlation: None,
            topic: "t".into(),
            priority: Priority::Normal,
            created_ms: 1,
            expires_ms: 2,
            seq: 7,
            sender_epoch: 1,
            recipient_epoch: 1,
            session_id: [0; 16],
            instance: [9; 16],
            encrypted: true,
            body_len: 0,
        }
    }

    #[test]
    fn every_header_field_changes_the_encoding() {
        let base = header();
        let b = base.to_bytes();
        type Change = Box<dyn Fn(&mut EnvelopeHeader)>;
        let variants: Vec<Change> = vec![
            Box::new(|h| h.mode = EnvelopeMode::Session),
            Box::new(|h| h.kind = MessageKind::Reply),
            Box::new(|h| h.message_id = MessageId::new()),
            Box::new(|h| h.from = AgentId::new()),
            Box::new(|h| h.to = AgentId::new()),
            Box::new(|h| h.correlation = Some(MessageId::new())),
            Box::new(|h| h.topic = "u".into()),
            Box::new(|h| h.priority = Priority::Critical),
            Box::new(|h| h.created_ms += 1),
            Box::new(|h| h.expires_ms += 1),
            Box::new(|h| h.seq += 1),
            Box::new(|h| h.sender_epoch += 1),
            Box::new(|h| h.recipient_epoch += 1),
            Box::new(|h| h.session_id[0] = 1),
            Box::new(|h| h.instance[0] = 1),
            Box::new(|h| h.encrypted = false),
            Box::new(|h| h.body_len = 1),
        ];
        for change in variants {
            let mut h = base.clone();
            change(&mut h);
            assert_ne!(h.to_bytes(), b, "{h:?}");
        }
    }

    #[test]
    fn pair_keys_agree_and_are_directional() {
        let a = Identity::generate(1, 0).expect("a");
        let b = Identity::generate(1, 0).expect("b");
        let (ida, idb) = (AgentId::new(), AgentId::new());
        let inst = [1u8; 16];
        let k_ab_at_a =
            derive_pair_key(&inst, ida, idb, 1, 1, &a.x_secret, &b.x_public).expect("k");
        let k_ab_at_b =
            derive_pair_key(&inst, ida, idb, 1, 1, &b.x_secret, &a.x_public).expect("k");
        let k_ba = derive_pair_key(&inst, idb, ida, 1, 1, &b.x_secret, &a.x_public).expect("k");
        let h = header();
        let hb = h.to_bytes();
        let body = seal_body(&k_ab_at_a, &h, &hb, b"secret".to_vec(), true).expect("seal");
        assert_ne!(&body[..6], b"secret");
        assert_eq!(
            open_body(&k_ab_at_b, &h, &hb, &body).expect("open"),
            b"secret"
        );
        assert!(open_body(&k_ba, &h, &hb, &body).is_err());
        let mut other = h.clone();
        other.seq += 1;
        assert!(open_body(&k_ab_at_b, &other, &other.to_bytes(), &body).is_err());
    }

    #[test]
    fn unencrypted_body_is_still_authenticated() {
        let a = Identity::generate(1, 0).expect("a");
        let b = Identity::generate(1, 0).expect("b");
        let k = derive_pair_key(
            &[0; 16],
            AgentId::new(),
            AgentId::new(),
            1,
            1,
            &a.x_secret,
            &b.x_public,
        )
        .expect("k");
        let mut h = header();
        h.encrypted = false;
        let hb = h.to_bytes();
        let mut body = seal_body(&k, &h, &hb, b"plain".to_vec(), false).expect("seal");
        assert_eq!(&body[..5], b"plain");
        assert_eq!(open_body(&k, &h, &hb, &body).expect("open"), b"plain");
        body[0] ^= 1;
        assert!(open_body(&k, &h, &hb, &body).is_err());
    }

    #[test]
    fn handshake_agrees_and_refuses_forgery() {
        let a = Identity::generate(1, 0).expect("a");
        let b = Identity::generate(1, 0).expect("b");
        let (ida, idb) = (AgentId::new(), AgentId::new());
        let (init, eph) = handshake_init([3; 16], ida, idb, &a, 5).expect("init");
        let (resp, kr) = handshake_respond(&init, &a.verifying, &b).expect("respond");
        let ki = handshake_finish(&init, &eph, &resp, &b.verifying).expect("finish");
        let h = header();
        let hb = h.to_bytes();
        let body = seal_body(&ki.i2r, &h, &hb, b"x".to_vec(), true).expect("seal");
        assert_eq!(open_body(&kr.i2r, &h, &hb, &body).expect("open"), b"x");
        assert!(open_body(&kr.r2i, &h, &hb, &body).is_err());

        let mut forged = init.clone();
        forged.ephemeral[0] ^= 1;
        assert!(handshake_respond(&forged, &a.verifying, &b).is_err());
        assert!(handshake_respond(&init, &b.verifying, &b).is_err());
        let mut bad_resp = resp.clone();
        bad_resp.ephemeral[0] ^= 1;
        assert!(handshake_finish(&init, &eph, &bad_resp, &b.verifying).is_err());
    }

    #[test]
    fn identity_round_trips_through_its_secrets() {
        let a = Identity::generate(3, 10).expect("a");
        let s = a.secrets();
        let mut ed = [0u8; 32];
        let mut x = [0u8; 32];
        ed.copy_from_slice(&s[..32]);
        x.copy_from_slice(&s[32..]);
        let b = Identity::from_secrets(3, &ed, &x, 10, None);
        assert_eq!(a.verifying, b.verifying);
        assert_eq!(a.x_public.as_bytes(), b.x_public.as_bytes());
    }
}
