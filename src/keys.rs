//! SSH key pairs for subscriptions, and sealing of private keys at rest.
//!
//! # Key pairs
//! [`generate`] makes one key pair per subscription. The public half is an OpenSSH
//! `authorized_keys` line (uploaded to Hetzner and put into cloud-init); the private half is
//! kept only in sealed form (see [`Sealer`]) so the customer can fetch it later.
//!
//! Private key formats:
//! - RSA-4096 (default): PKCS#8 PEM, `-----BEGIN PRIVATE KEY-----`. OpenSSH, OpenSSL, Node's
//!   `crypto` and `ssh2` all read it.
//! - Ed25519: OpenSSH private key format, `-----BEGIN OPENSSH PRIVATE KEY-----` (unencrypted).
//!   PKCS#8 would be easy to produce, but OpenSSH before 9.x (e.g. Debian 12's 9.2) refuses
//!   PKCS#8 Ed25519 keys, so a customer could not log in with it; every OpenSSH since 6.5
//!   reads the OpenSSH format.
//!
//! RSA-4096 generation takes about a second of CPU, so [`generate`] runs it on tokio's
//! blocking pool, never on a runtime worker.
//!
//! # Sealing
//! [`Sealer`] encrypts private keys with AES-256-GCM before they reach the database:
//! `v1:<key id>:<base64(nonce || ciphertext || tag)>`, a random 96-bit nonce per value and the
//! subscription id as associated data, so a sealed value copied onto another row does not
//! open. The key id is the first 8 hex digits of SHA-256 over the 32 raw key bytes (check it by
//! hand with `echo "$KEY" | base64 -d | sha256sum | cut -c1-8`); it tells which key sealed a
//! value, which makes key rotation work without extra configuration: configure the new key as
//! current and the old ones as previous, and values sealed with an old key still open.
//! [`rotate`] (`vps-controller keys rotate`) then re-seals the stored values under the current
//! key, so the old one can be dropped (docs/keys.md).

pub mod rotate;

use std::fmt;
use std::path::PathBuf;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// Which kind of SSH key pair to generate for a subscription. YAML: `rsa-4096` | `ed25519`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAlgorithm {
    /// RSA with a 4096-bit modulus and e = 65537; private key as PKCS#8 PEM.
    // kebab-case alone would spell it "rsa4096".
    #[default]
    #[serde(rename = "rsa-4096")]
    Rsa4096,
    /// Ed25519; private key in the OpenSSH private key format.
    Ed25519,
}

impl KeyAlgorithm {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlgorithm::Rsa4096 => "rsa-4096",
            KeyAlgorithm::Ed25519 => "ed25519",
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const RSA_BITS: usize = 4096;

/// A freshly generated SSH key pair. The private key is wiped from memory on drop and never
/// shown by `Debug`.
#[derive(Clone)]
pub struct KeyPair {
    /// OpenSSH public key line: `ssh-rsa AAAA... comment` or `ssh-ed25519 AAAA... comment`.
    pub public_openssh: String,
    /// Hetzner's fingerprint of the public key: MD5, lowercase hex pairs joined by `:`.
    pub fingerprint_md5: String,
    private_pem: Zeroizing<String>,
}

impl KeyPair {
    /// The private key: PKCS#8 PEM for RSA, OpenSSH format for Ed25519 (see the module docs).
    pub fn private_pem(&self) -> &str {
        &self.private_pem
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public_openssh", &self.public_openssh)
            .field("fingerprint_md5", &self.fingerprint_md5)
            .field("private_pem", &"<redacted>")
            .finish()
    }
}

/// Errors from key generation and fingerprinting. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("SSH key comment must be a single line of printable characters")]
    InvalidComment,
    #[error("generating a {algorithm} key pair failed: {reason}")]
    Generation {
        algorithm: KeyAlgorithm,
        reason: String,
    },
    #[error("encoding the {what} failed: {reason}")]
    Encoding { what: &'static str, reason: String },
    #[error("not an OpenSSH public key: {reason}")]
    InvalidPublicKey { reason: String },
    #[error("key generation task did not finish: {0}")]
    Task(String),
}

/// Generates a key pair on the calling thread. RSA-4096 takes about a second of CPU: call
/// [`generate`] from async code.
pub fn generate_blocking(alg: KeyAlgorithm, comment: &str) -> Result<KeyPair, KeyError> {
    if comment.chars().any(char::is_control) {
        return Err(KeyError::InvalidComment);
    }
    let (public, private_pem) = match alg {
        KeyAlgorithm::Rsa4096 => generate_rsa(comment)?,
        KeyAlgorithm::Ed25519 => generate_ed25519(comment)?,
    };
    let public_openssh = public.to_openssh().map_err(|e| KeyError::Encoding {
        what: "public key",
        reason: e.to_string(),
    })?;
    let fingerprint_md5 = md5_fingerprint(&public_openssh)?;
    Ok(KeyPair {
        public_openssh,
        fingerprint_md5,
        private_pem,
    })
}

/// Generates a key pair on tokio's blocking pool, so runtime workers keep serving other tasks.
pub async fn generate(alg: KeyAlgorithm, comment: &str) -> Result<KeyPair, KeyError> {
    let comment = comment.to_owned();
    tokio::task::spawn_blocking(move || generate_blocking(alg, &comment))
        .await
        .map_err(|e| KeyError::Task(e.to_string()))?
}

fn generate_rsa(comment: &str) -> Result<(ssh_key::PublicKey, Zeroizing<String>), KeyError> {
    use rsa::pkcs8::EncodePrivateKey as _;
    let generation_failed = |reason: String| KeyError::Generation {
        algorithm: KeyAlgorithm::Rsa4096,
        reason,
    };
    let private = rsa::RsaPrivateKey::new(&mut rand::rng(), RSA_BITS)
        .map_err(|e| generation_failed(e.to_string()))?;
    let private_pem = private
        .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
        .map_err(|e| KeyError::Encoding {
            what: "RSA private key as PKCS#8",
            reason: e.to_string(),
        })?;
    let public = ssh_key::public::RsaPublicKey::try_from(private.as_public_key())
        .map_err(|e| generation_failed(e.to_string()))?;
    Ok((
        ssh_key::PublicKey::new(ssh_key::public::KeyData::Rsa(public), comment),
        private_pem,
    ))
}

fn generate_ed25519(comment: &str) -> Result<(ssh_key::PublicKey, Zeroizing<String>), KeyError> {
    let keypair = ssh_key::private::Ed25519Keypair::random(&mut rand::rng());
    let private = ssh_key::PrivateKey::new(ssh_key::private::KeypairData::from(keypair), comment)
        .map_err(|e| KeyError::Generation {
        algorithm: KeyAlgorithm::Ed25519,
        reason: e.to_string(),
    })?;
    let private_pem =
        private
            .to_openssh(ssh_key::LineEnding::LF)
            .map_err(|e| KeyError::Encoding {
                what: "Ed25519 private key in OpenSSH format",
                reason: e.to_string(),
            })?;
    Ok((private.public_key().clone(), private_pem))
}

/// The public half of a private key as this module writes it (PKCS#8 PEM RSA, or OpenSSH
/// format), as the base64 blob of its OpenSSH public key line. Used to check that a stored
/// private key really belongs to the public key on the row and at Hetzner.
pub fn public_blob_of_private(private: &str) -> Result<String, KeyError> {
    let invalid = |reason: String| KeyError::InvalidPublicKey {
        reason: format!("the private key does not parse: {reason}"),
    };
    let public = if private.contains("BEGIN OPENSSH PRIVATE KEY") {
        let key = ssh_key::PrivateKey::from_openssh(private).map_err(|e| invalid(e.to_string()))?;
        key.public_key().clone()
    } else {
        use rsa::pkcs8::DecodePrivateKey as _;
        let key =
            rsa::RsaPrivateKey::from_pkcs8_pem(private).map_err(|e| invalid(e.to_string()))?;
        let public = ssh_key::public::RsaPublicKey::try_from(key.as_public_key())
            .map_err(|e| invalid(e.to_string()))?;
        ssh_key::PublicKey::new(ssh_key::public::KeyData::Rsa(public), "")
    };
    let line = public.to_openssh().map_err(|e| KeyError::Encoding {
        what: "public key",
        reason: e.to_string(),
    })?;
    line.split_ascii_whitespace()
        .nth(1)
        .map(str::to_owned)
        .ok_or_else(|| invalid("no key blob".to_owned()))
}

/// Hetzner's fingerprint of an OpenSSH public key line (`<type> <base64> [comment]`): MD5 over
/// the decoded key blob, lowercase hex pairs joined by `:` — what `ssh-keygen -l -E md5` prints
/// after `MD5:`.
pub fn md5_fingerprint(public_openssh: &str) -> Result<String, KeyError> {
    use md5::Digest as _;
    let line = public_openssh.trim();
    // Parsing checks the type, the blob's structure and that the type inside the blob matches.
    ssh_key::PublicKey::from_openssh(line).map_err(|e| KeyError::InvalidPublicKey {
        reason: e.to_string(),
    })?;
    // Hash the blob exactly as written (as Hetzner does), not a re-encoding of the parsed key.
    let blob_base64 =
        line.split_ascii_whitespace()
            .nth(1)
            .ok_or_else(|| KeyError::InvalidPublicKey {
                reason: "no base64 key blob after the key type".to_owned(),
            })?;
    let blob = BASE64
        .decode(blob_base64)
        .map_err(|e| KeyError::InvalidPublicKey {
            reason: format!("key blob is not base64: {e}"),
        })?;
    let digest = md5::Md5::digest(&blob);
    Ok(hex_pairs(&digest, ":"))
}

fn hex_pairs(bytes: &[u8], separator: &str) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(separator)
}

// ---------------------------------------------------------------------------------------------
// Sealing

/// Environment variable with the current sealing key (base64 of 32 bytes).
pub const ENV_KEY: &str = "VPS_CONTROLLER_ENCRYPTION_KEY";
/// Environment variable naming a file that holds the current sealing key (base64).
pub const ENV_KEY_FILE: &str = "VPS_CONTROLLER_ENCRYPTION_KEY_FILE";
/// Environment variable with earlier sealing keys, comma-separated base64, for rotation.
pub const ENV_PREVIOUS_KEYS: &str = "VPS_CONTROLLER_PREVIOUS_ENCRYPTION_KEYS";

const SEAL_VERSION: &str = "v1";
const KEY_LEN: usize = 32;
const KEY_ID_LEN: usize = 8;
const TAG_LEN: usize = 16;
const GENERATE_HINT: &str = "generate one with `openssl rand -base64 32`";

/// Errors from loading sealing keys and from sealing/opening. Messages never contain key
/// material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{source_name}: {problem}")]
    InvalidKey {
        /// Where the key came from, e.g. `VPS_CONTROLLER_ENCRYPTION_KEY` or `previous key 2`.
        source_name: String,
        problem: String,
    },
    #[error("both {ENV_KEY} and {ENV_KEY_FILE} are set; set only one of them")]
    BothKeySourcesSet,
    #[error("{ENV_PREVIOUS_KEYS} is set but neither {ENV_KEY} nor {ENV_KEY_FILE} is")]
    PreviousKeysWithoutCurrent,
    #[error("cannot read {ENV_KEY_FILE} file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("two different encryption keys have the same key id {key_id}; remove one of them")]
    DuplicateKeyId { key_id: String },
    #[error("malformed sealed value: {0}")]
    Malformed(String),
    #[error(
        "value was sealed with encryption key id {key_id}, which is not configured \
         (configured: {configured}); add that key to {ENV_PREVIOUS_KEYS}"
    )]
    UnknownKeyId { key_id: String, configured: String },
    #[error(
        "cannot open value sealed with key id {key_id}: authentication failed \
         (wrong key, tampered value, or sealed for another subscription)"
    )]
    AuthenticationFailed { key_id: String },
    #[error("opened value is not valid UTF-8")]
    NotUtf8,
    #[error("encryption failed")]
    SealFailed,
    #[error("the system random number generator failed")]
    Random,
}

struct SealingKey {
    id: String,
    /// Full SHA-256 of the key: tells a key listed twice apart from a key id collision.
    digest: [u8; 32],
    key: LessSafeKey,
}

impl SealingKey {
    fn from_bytes(bytes: &[u8]) -> Option<SealingKey> {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).ok()?;
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, bytes)
            .as_ref()
            .try_into()
            .ok()?;
        let mut id = hex_pairs(&digest, "");
        id.truncate(KEY_ID_LEN);
        Some(SealingKey {
            id,
            digest,
            key: LessSafeKey::new(unbound),
        })
    }

    fn from_base64(source_name: &str, text: &str) -> Result<SealingKey, SealError> {
        let invalid = |problem: String| SealError::InvalidKey {
            source_name: source_name.to_owned(),
            problem,
        };
        let text = text.trim();
        if text.is_empty() {
            return Err(invalid(format!("is empty; {GENERATE_HINT}")));
        }
        let bytes = Zeroizing::new(
            BASE64
                .decode(text)
                .map_err(|_| invalid(format!("is not valid base64; {GENERATE_HINT}")))?,
        );
        if bytes.len() != KEY_LEN {
            return Err(invalid(format!(
                "decodes to {} bytes, expected exactly {KEY_LEN}; {GENERATE_HINT}",
                bytes.len()
            )));
        }
        SealingKey::from_bytes(&bytes).ok_or_else(|| invalid("rejected by AES-256-GCM".to_owned()))
    }
}

/// Seals secrets (private keys) for storage with AES-256-GCM. Holds the current key, used for
/// sealing, and optional previous keys, used only for opening values sealed before a rotation.
pub struct Sealer {
    current: SealingKey,
    previous: Vec<SealingKey>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("key_id", &self.current.id)
            .field(
                "previous_key_ids",
                &self
                    .previous
                    .iter()
                    .map(|k| k.id.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// Builds a sealer from base64 keys (each exactly 32 bytes after decoding). A previous key
    /// equal to the current one is ignored.
    pub fn from_base64(current: &str, previous: &[&str]) -> Result<Sealer, SealError> {
        let current = SealingKey::from_base64("current encryption key", current)?;
        let previous = previous
            .iter()
            .enumerate()
            .map(|(i, text)| {
                SealingKey::from_base64(&format!("previous encryption key {}", i + 1), text)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Sealer::from_keys(current, previous)
    }

    fn from_keys(current: SealingKey, previous: Vec<SealingKey>) -> Result<Sealer, SealError> {
        let mut sealer = Sealer {
            current,
            previous: Vec::with_capacity(previous.len()),
        };
        for key in previous {
            // Same id: either the same key listed twice (harmless, skip it) or a 32-bit id
            // collision between different keys (refuse: we could not tell them apart).
            if let Some(existing) = sealer.key_by_id(&key.id) {
                if existing.digest != key.digest {
                    return Err(SealError::DuplicateKeyId { key_id: key.id });
                }
                continue;
            }
            sealer.previous.push(key);
        }
        Ok(sealer)
    }

    /// Reads the sealing keys from the environment:
    /// - `VPS_CONTROLLER_ENCRYPTION_KEY` (base64 of 32 bytes), or
    ///   `VPS_CONTROLLER_ENCRYPTION_KEY_FILE` (a file holding that base64; surrounding
    ///   whitespace is ignored); both set is an error;
    /// - optionally `VPS_CONTROLLER_PREVIOUS_ENCRYPTION_KEYS`: comma-separated base64 keys that
    ///   values may have been sealed with before a rotation.
    ///
    /// Returns `Ok(None)` when none of them is set. A variable set to an empty string counts
    /// as set (and is then an error), so a broken secret mount is not mistaken for "no key".
    pub fn from_env() -> Result<Option<Sealer>, SealError> {
        Sealer::from_lookup(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into()))
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<Sealer>, SealError> {
        let inline = lookup(ENV_KEY).map(Zeroizing::new);
        let file = lookup(ENV_KEY_FILE);
        let previous = lookup(ENV_PREVIOUS_KEYS).map(Zeroizing::new);
        let current = match (inline, file) {
            (Some(_), Some(_)) => return Err(SealError::BothKeySourcesSet),
            (Some(text), None) => SealingKey::from_base64(ENV_KEY, &text)?,
            (None, Some(path)) => {
                let path = PathBuf::from(path);
                let text = Zeroizing::new(std::fs::read_to_string(&path).map_err(|source| {
                    SealError::KeyFile {
                        path: path.clone(),
                        source,
                    }
                })?);
                let name = format!("{ENV_KEY_FILE} file {}", path.display());
                SealingKey::from_base64(&name, &text)?
            }
            (None, None) if previous.is_some() => {
                return Err(SealError::PreviousKeysWithoutCurrent);
            }
            (None, None) => return Ok(None),
        };
        let previous = previous
            .as_deref()
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .enumerate()
                    .map(|(i, text)| {
                        SealingKey::from_base64(
                            &format!("{ENV_PREVIOUS_KEYS} item {}", i + 1),
                            text,
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        Sealer::from_keys(current, previous).map(Some)
    }

    /// A sealer with a random key that lives only as long as the process: for
    /// `run --simulate` demos, where nothing sealed needs to survive a restart.
    pub fn ephemeral() -> Sealer {
        use rand::Rng as _;
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        rand::rng().fill_bytes(bytes.as_mut());
        match SealingKey::from_bytes(bytes.as_ref()) {
            Some(current) => Sealer {
                current,
                previous: Vec::new(),
            },
            // AES-256-GCM accepts every 32-byte key; this arm only satisfies the type system.
            None => unreachable!("AES-256-GCM rejected a 32-byte key"),
        }
    }

    /// Id of the current key: first 8 hex digits of SHA-256 over its 32 raw bytes.
    pub fn key_id(&self) -> &str {
        &self.current.id
    }

    /// Encrypts `plaintext` for the row of `subscription_id` with the current key:
    /// `v1:<key id>:<base64(nonce || ciphertext || tag)>`.
    pub fn seal(&self, plaintext: &str, subscription_id: &str) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        // Holds the plaintext until it is encrypted in place; wiped if sealing fails.
        let mut buffer = Zeroizing::new(Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN));
        buffer.extend_from_slice(&nonce);
        buffer.extend_from_slice(plaintext.as_bytes());
        let tag = self
            .current
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(subscription_id.as_bytes()),
                &mut buffer[NONCE_LEN..],
            )
            .map_err(|_| SealError::SealFailed)?;
        buffer.extend_from_slice(tag.as_ref());
        Ok(format!(
            "{SEAL_VERSION}:{}:{}",
            self.current.id,
            BASE64.encode(buffer.as_slice())
        ))
    }

    /// Whether `value` has the shape of a value this controller sealed (`v1:<key id>:...`).
    /// Anything else in `ssh_private_key` was written by someone else (e.g. the web app).
    pub fn looks_sealed(value: &str) -> bool {
        Sealer::sealed_key_id(value).is_some()
    }

    /// The id of the key a value made by [`Sealer::seal`] names (`v1:<key id>:...`), read
    /// without opening it; `None` for anything that does not look sealed. Key ids are not
    /// secret: they are part of every sealed value.
    pub fn sealed_key_id(value: &str) -> Option<&str> {
        let mut parts = value.trim().splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(SEAL_VERSION), Some(id), Some(_)) if is_key_id(id) => Some(id),
            _ => None,
        }
    }

    /// Whether `value` names the current key (by its key id; the value is not opened).
    pub fn is_sealed_under_current(&self, value: &str) -> bool {
        Sealer::sealed_key_id(value) == Some(self.current.id.as_str())
    }

    /// Whether a key with this id is configured, current or previous.
    pub fn has_key_id(&self, key_id: &str) -> bool {
        self.key_by_id(key_id).is_some()
    }

    /// The ids of the previous keys, in the order they were configured.
    pub fn previous_key_ids(&self) -> Vec<&str> {
        self.previous.iter().map(|k| k.id.as_str()).collect()
    }

    /// Opens `sealed` (a value for the row of `subscription_id`, under any configured key) and
    /// seals the same plaintext under the current key, with a fresh nonce. The new value is
    /// opened again and compared before it is returned, so a value this returns always opens
    /// to what the old one held. The plaintext never leaves this function and is wiped.
    pub fn reseal(&self, sealed: &str, subscription_id: &str) -> Result<String, SealError> {
        let plaintext = self.open(sealed, subscription_id)?;
        let resealed = self.seal(&plaintext, subscription_id)?;
        let check = self.open(&resealed, subscription_id)?;
        if *check != *plaintext {
            return Err(SealError::SealFailed);
        }
        Ok(resealed)
    }

    /// Decrypts a value made by [`Sealer::seal`] for the same `subscription_id`, with whichever
    /// configured key (current or previous) its key id names.
    pub fn open(
        &self,
        sealed: &str,
        subscription_id: &str,
    ) -> Result<Zeroizing<String>, SealError> {
        let mut parts = sealed.trim().splitn(3, ':');
        let (Some(version), Some(key_id), Some(payload)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(SealError::Malformed(
                "expected \"v1:<key id>:<base64>\"".to_owned(),
            ));
        };
        if version != SEAL_VERSION {
            return Err(SealError::Malformed(describe_version(version)));
        }
        if !is_key_id(key_id) {
            return Err(SealError::Malformed(
                "key id is not 8 lowercase hex digits".to_owned(),
            ));
        }
        let mut data = BASE64
            .decode(payload)
            .map_err(|_| SealError::Malformed("payload is not valid base64".to_owned()))?;
        if data.len() < NONCE_LEN + TAG_LEN {
            return Err(SealError::Malformed(format!(
                "payload is {} bytes, shorter than nonce and tag ({} bytes)",
                data.len(),
                NONCE_LEN + TAG_LEN
            )));
        }
        let key = self
            .key_by_id(key_id)
            .ok_or_else(|| SealError::UnknownKeyId {
                key_id: key_id.to_owned(),
                configured: self.configured_ids(),
            })?;
        let (nonce, ciphertext) = data.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| SealError::Malformed("bad nonce length".to_owned()))?;
        let plaintext = key
            .key
            .open_in_place(nonce, Aad::from(subscription_id.as_bytes()), ciphertext)
            .map_err(|_| SealError::AuthenticationFailed {
                key_id: key_id.to_owned(),
            })?;
        let plaintext = Zeroizing::new(plaintext.to_vec());
        // The buffer held the plaintext in place; wipe it before it is freed.
        zeroize::Zeroize::zeroize(&mut data);
        match std::str::from_utf8(&plaintext) {
            Ok(text) => Ok(Zeroizing::new(text.to_owned())),
            Err(_) => Err(SealError::NotUtf8),
        }
    }

    fn key_by_id(&self, id: &str) -> Option<&SealingKey> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == id)
    }

    /// The ids of every configured key (current first), comma-separated. Ids are not secret:
    /// they are part of every sealed value.
    pub fn configured_ids(&self) -> String {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .map(|k| k.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// 8 lowercase hex digits, as [`SealingKey`] makes them.
fn is_key_id(id: &str) -> bool {
    id.len() == KEY_ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn describe_version(version: &str) -> String {
    let looks_like_version = version.len() <= 4
        && version.starts_with('v')
        && version.len() > 1
        && version[1..].bytes().all(|b| b.is_ascii_digit());
    if looks_like_version {
        format!("unsupported version {version:?} (this build reads {SEAL_VERSION})")
    } else {
        "does not start with a version such as \"v1:\"".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const KEY_B: &str = "H/79/Pv6+fj39vX08/Lx8O/u7ezr6uno5+bl5OPi4eA=";

    fn from_vars(vars: &[(&str, &str)]) -> Result<Option<Sealer>, SealError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Sealer::from_lookup(|name| vars.get(name).cloned())
    }

    fn id_of(key: &str) -> String {
        Sealer::from_base64(key, &[]).unwrap().key_id().to_owned()
    }

    #[test]
    fn a_private_key_yields_its_own_public_key_and_no_other() {
        for alg in [KeyAlgorithm::Ed25519, KeyAlgorithm::Rsa4096] {
            let pair = generate_blocking(alg, "c").unwrap();
            let other = generate_blocking(KeyAlgorithm::Ed25519, "c").unwrap();
            let blob = public_blob_of_private(pair.private_pem()).unwrap();
            assert_eq!(
                Some(blob.as_str()),
                pair.public_openssh.split_whitespace().nth(1)
            );
            assert_ne!(
                Some(blob.as_str()),
                other.public_openssh.split_whitespace().nth(1)
            );
        }
        let error = public_blob_of_private(
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("does not parse"), "{error}");
    }

    #[test]
    fn only_our_sealed_format_looks_sealed() {
        let sealer = Sealer::ephemeral();
        assert!(Sealer::looks_sealed(&sealer.seal("x", "sub").unwrap()));
        for foreign in [
            "-----BEGIN PRIVATE KEY-----",
            "enc:abc",
            "v1:nothex00:abc",
            "v2:0123abcd:abc",
            "",
        ] {
            assert!(!Sealer::looks_sealed(foreign), "{foreign}");
        }
    }

    #[test]
    fn reseal_moves_a_value_to_the_current_key_and_keeps_what_it_holds() {
        let old = Sealer::from_base64(KEY_B, &[]).unwrap();
        let rotating = Sealer::from_base64(KEY_A, &[KEY_B]).unwrap();
        let sealed = old.seal("the private key", "sub-1").unwrap();
        assert_eq!(Sealer::sealed_key_id(&sealed), Some(id_of(KEY_B).as_str()));
        assert!(!rotating.is_sealed_under_current(&sealed));
        assert!(rotating.has_key_id(&id_of(KEY_B)));
        assert_eq!(rotating.previous_key_ids(), vec![id_of(KEY_B)]);

        let resealed = rotating.reseal(&sealed, "sub-1").unwrap();
        assert!(rotating.is_sealed_under_current(&resealed));
        assert_ne!(
            resealed,
            rotating.reseal(&sealed, "sub-1").unwrap(),
            "fresh nonce"
        );
        // The new key alone opens it, for its own row only.
        let new_only = Sealer::from_base64(KEY_A, &[]).unwrap();
        assert_eq!(
            new_only.open(&resealed, "sub-1").unwrap().as_str(),
            "the private key"
        );
        assert!(matches!(
            new_only.open(&resealed, "sub-2"),
            Err(SealError::AuthenticationFailed { .. })
        ));

        // What does not open is refused, never re-sealed into something else.
        assert!(matches!(
            rotating.reseal(&sealed, "sub-2"),
            Err(SealError::AuthenticationFailed { .. })
        ));
        let unknown = Sealer::ephemeral().seal("x", "sub-1").unwrap();
        assert!(matches!(
            rotating.reseal(&unknown, "sub-1"),
            Err(SealError::UnknownKeyId { .. })
        ));
        for foreign in ["-----BEGIN PRIVATE KEY-----", "v1:NOTHEX00:abc", "enc:1:2"] {
            assert_eq!(Sealer::sealed_key_id(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn no_variables_means_no_sealer() {
        assert!(from_vars(&[]).unwrap().is_none());
    }

    #[test]
    fn inline_key_with_previous_keys() {
        let sealer = from_vars(&[
            (ENV_KEY, KEY_A),
            (ENV_PREVIOUS_KEYS, &format!(" {KEY_B} ,, ")),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(sealer.key_id(), id_of(KEY_A));
        let old = Sealer::from_base64(KEY_B, &[]).unwrap();
        let sealed = old.seal("x", "s").unwrap();
        assert_eq!(sealer.open(&sealed, "s").unwrap().as_str(), "x");
    }

    #[test]
    fn key_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, format!("\n  {KEY_A}\n\n")).unwrap();
        let sealer = from_vars(&[(ENV_KEY_FILE, path.to_str().unwrap())])
            .unwrap()
            .unwrap();
        assert_eq!(sealer.key_id(), id_of(KEY_A));
    }

    #[test]
    fn configuration_mistakes_are_errors() {
        let both = from_vars(&[(ENV_KEY, KEY_A), (ENV_KEY_FILE, "/nonexistent")]);
        assert!(
            matches!(both, Err(SealError::BothKeySourcesSet)),
            "{both:?}"
        );

        let previous_only = from_vars(&[(ENV_PREVIOUS_KEYS, KEY_B)]);
        assert!(
            matches!(previous_only, Err(SealError::PreviousKeysWithoutCurrent)),
            "{previous_only:?}"
        );

        let missing = from_vars(&[(ENV_KEY_FILE, "/nonexistent/key")]).unwrap_err();
        assert!(matches!(missing, SealError::KeyFile { .. }));
        assert!(
            missing.to_string().contains("/nonexistent/key"),
            "{missing}"
        );

        // Set but empty (e.g. an optional secret that is missing) is not "no key".
        let empty = from_vars(&[(ENV_KEY, "")]).unwrap_err();
        assert!(empty.to_string().starts_with(ENV_KEY), "{empty}");

        let bad_previous =
            from_vars(&[(ENV_KEY, KEY_A), (ENV_PREVIOUS_KEYS, "short")]).unwrap_err();
        assert!(
            bad_previous
                .to_string()
                .starts_with(&format!("{ENV_PREVIOUS_KEYS} item 1")),
            "{bad_previous}"
        );
    }

    #[test]
    fn algorithm_names_match_the_config_spelling() {
        for alg in [KeyAlgorithm::Rsa4096, KeyAlgorithm::Ed25519] {
            let yaml = serde_norway::to_string(&alg).unwrap();
            assert_eq!(yaml.trim(), alg.as_str());
            assert_eq!(
                serde_norway::from_str::<KeyAlgorithm>(alg.as_str()).unwrap(),
                alg
            );
        }
    }
}
