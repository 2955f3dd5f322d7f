//! The host key of a server the controller creates: an Ed25519 key derived from the
//! subscription's own private key, handed to cloud-init (`ssh_keys`) at create and pinned on
//! the row (`ssh_host_key`).
//!
//! Derived, not stored: the row already holds the sealed private key, and a second sealed
//! secret per row would be a second thing to back up and to re-seal on key rotation. The
//! derivation is HMAC-SHA256 keyed with a fixed label over the private key's text, so the host
//! key is the same for every server of the subscription (a replaced server presents the same
//! key) and changes only with the key pair. Whoever can read the private key could derive the
//! host key, but they could also log in as root and read it from `/etc/ssh`.

use ring::hmac;
use ssh_key::private::{Ed25519Keypair, KeypairData};
use zeroize::Zeroizing;

use crate::keys::KeyError;

const DERIVATION_LABEL: &[u8] = b"vps-controller ssh host key v1";

/// A host key pair: the OpenSSH private key for cloud-init and the public line to pin.
pub struct HostKey {
    pub private_openssh: Zeroizing<String>,
    pub public_openssh: String,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey")
            .field("public_openssh", &self.public_openssh)
            .finish_non_exhaustive()
    }
}

/// The host key of every server of the subscription whose private key is `private_key`.
pub fn derive(private_key: &str, comment: &str) -> Result<HostKey, KeyError> {
    let label = hmac::Key::new(hmac::HMAC_SHA256, DERIVATION_LABEL);
    let tag = hmac::sign(&label, private_key.trim().as_bytes());
    let mut seed = Zeroizing::new([0u8; 32]);
    seed.copy_from_slice(&tag.as_ref()[..32]);
    let pair = Ed25519Keypair::from_seed(&seed);
    let private = ssh_key::PrivateKey::new(KeypairData::from(pair), comment).map_err(|e| {
        KeyError::Encoding {
            what: "SSH host key",
            reason: e.to_string(),
        }
    })?;
    let private_openssh =
        private
            .to_openssh(ssh_key::LineEnding::LF)
            .map_err(|e| KeyError::Encoding {
                what: "SSH host key in OpenSSH format",
                reason: e.to_string(),
            })?;
    let public_openssh = private
        .public_key()
        .to_openssh()
        .map_err(|e| KeyError::Encoding {
            what: "SSH host public key",
            reason: e.to_string(),
        })?;
    Ok(HostKey {
        private_openssh,
        public_openssh,
    })
}

#[cfg(test)]
mod tests {
    use super::derive;

    #[test]
    fn the_same_private_key_gives_the_same_host_key_and_another_gives_another() {
        let a = derive(
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "a",
        )
        .unwrap();
        let again = derive(
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
            "b",
        )
        .unwrap();
        let other = derive(
            "-----BEGIN PRIVATE KEY-----\nAAAB\n-----END PRIVATE KEY-----\n",
            "a",
        )
        .unwrap();
        let blob = |line: &str| line.split_whitespace().nth(1).unwrap().to_owned();
        assert!(a.public_openssh.starts_with("ssh-ed25519 "));
        assert_eq!(blob(&a.public_openssh), blob(&again.public_openssh));
        assert_ne!(blob(&a.public_openssh), blob(&other.public_openssh));
        assert!(a.private_openssh.contains("BEGIN OPENSSH PRIVATE KEY"));
        assert!(
            !format!("{a:?}").contains("PRIVATE"),
            "Debug never shows the private key"
        );
    }
}
