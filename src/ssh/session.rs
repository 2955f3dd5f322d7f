//! One SSH connection to a server, as the bootstrap uses it: log in with the subscription's
//! key, check the host key, run commands (optionally feeding stdin) with a time limit each.
//! Built on russh (pure Rust); nothing shells out to `ssh`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use russh::client;
use russh::keys::{Algorithm, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::{ChannelMsg, Disconnect};

use super::SshError;

/// Most output kept of one command (stdout and stderr each); the rest is counted, not kept.
const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// What a command printed and how it ended.
#[derive(Debug, Default)]
pub struct Output {
    /// `None` when the channel closed without an exit status (killed by a signal).
    pub exit_status: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.exit_status == Some(0)
    }

    /// The last line of stderr (or stdout), bounded, for an error message.
    pub fn summary(&self) -> String {
        let text = if self.stderr.is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let text = String::from_utf8_lossy(text);
        let line = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        line.chars().take(200).collect()
    }
}

/// The host key the server must present: a key (pinned), or none yet (the first login pins
/// whatever it presents).
#[derive(Clone, Debug)]
pub enum HostKeyCheck {
    Pinned(PublicKey),
    FirstUse,
}

/// Checks the server's host key during the handshake and remembers what it presented.
struct Verifier {
    check: HostKeyCheck,
    presented: Arc<Mutex<Option<PublicKey>>>,
}

impl client::Handler for Verifier {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // A certificate is not a pinned key: never accepted.
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = server else {
            return Ok(false);
        };
        *self
            .presented
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(key.clone());
        Ok(match &self.check {
            HostKeyCheck::Pinned(expected) => expected.key_data() == key.key_data(),
            HostKeyCheck::FirstUse => true,
        })
    }
}

/// A logged-in connection.
pub struct Session {
    handle: client::Handle<Verifier>,
    /// The host key the server presented (the pinned one, or the one to pin).
    pub host_key: PublicKey,
}

impl Session {
    /// Connects to `addr`, checks the host key and logs in as `user` with `key`, all within
    /// `timeout`.
    pub async fn connect(
        addr: SocketAddr,
        user: &str,
        key: PrivateKey,
        check: HostKeyCheck,
        timeout: Duration,
    ) -> Result<Session, SshError> {
        let presented = Arc::new(Mutex::new(None));
        let expected = match &check {
            HostKeyCheck::Pinned(key) => Some(key.clone()),
            HostKeyCheck::FirstUse => None,
        };
        let verifier = Verifier {
            check,
            presented: Arc::clone(&presented),
        };
        let config = Arc::new(client::Config {
            // Only the key type the controller hands to cloud-init (and pins): a server that
            // also has RSA or ECDSA host keys presents its Ed25519 one.
            preferred: russh::Preferred {
                key: std::borrow::Cow::Borrowed(&[Algorithm::Ed25519]),
                ..Default::default()
            },
            inactivity_timeout: Some(Duration::from_secs(60 * 60)),
            nodelay: true,
            ..Default::default()
        });
        let login = async {
            let mut handle =
                client::connect(config, addr, verifier)
                    .await
                    .map_err(|e| match e {
                        russh::Error::UnknownKey => {
                            let presented = presented
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .clone();
                            SshError::HostKeyMismatch {
                                expected: expected.as_ref().map(fingerprint).unwrap_or_default(),
                                presented: presented.as_ref().map(fingerprint).unwrap_or_default(),
                            }
                        }
                        russh::Error::IO(io) => SshError::Connect(io.to_string()),
                        other => SshError::Connect(other.to_string()),
                    })?;
            let hash = handle
                .best_supported_rsa_hash()
                .await
                .map_err(|e| SshError::Protocol(e.to_string()))?
                .flatten();
            let auth = handle
                .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(key), hash))
                .await
                .map_err(|e| SshError::Protocol(e.to_string()))?;
            if !auth.success() {
                return Err(SshError::LoginRejected {
                    user: user.to_owned(),
                });
            }
            Ok(handle)
        };
        let handle =
            tokio::time::timeout(timeout, login)
                .await
                .map_err(|_| SshError::Timeout {
                    what: "connecting and logging in".into(),
                    seconds: timeout.as_secs(),
                })??;
        let host_key = presented
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| SshError::Protocol("the server presented no host key".into()))?;
        Ok(Session { handle, host_key })
    }

    /// Runs `command` (as the login shell would), feeding `stdin` and then end-of-file, and
    /// waits for it to exit, at most `timeout`. `what` names the step in errors.
    pub async fn exec(
        &self,
        command: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
        what: &str,
    ) -> Result<Output, SshError> {
        let run = async {
            let mut channel = self
                .handle
                .channel_open_session()
                .await
                .map_err(|e| SshError::Protocol(e.to_string()))?;
            channel
                .exec(true, command)
                .await
                .map_err(|e| SshError::Protocol(e.to_string()))?;
            if let Some(data) = stdin {
                channel
                    .data(data)
                    .await
                    .map_err(|e| SshError::Protocol(e.to_string()))?;
            }
            channel
                .eof()
                .await
                .map_err(|e| SshError::Protocol(e.to_string()))?;
            let mut output = Output::default();
            while let Some(message) = channel.wait().await {
                match message {
                    ChannelMsg::Data { data } => keep(&mut output.stdout, &data),
                    ChannelMsg::ExtendedData { data, .. } => keep(&mut output.stderr, &data),
                    ChannelMsg::ExitStatus { exit_status } => {
                        output.exit_status = Some(exit_status)
                    }
                    _ => {}
                }
            }
            Ok(output)
        };
        tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| SshError::Timeout {
                what: what.to_owned(),
                seconds: timeout.as_secs(),
            })?
    }

    /// Says goodbye; errors are of no interest by then.
    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await;
    }
}

fn keep(buffer: &mut Vec<u8>, data: &[u8]) {
    let room = MAX_OUTPUT_BYTES.saturating_sub(buffer.len());
    buffer.extend_from_slice(&data[..data.len().min(room)]);
}

/// `SHA256:...` as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(russh::keys::HashAlg::Sha256).to_string()
}

/// `word` as one POSIX shell word: bare when it is plainly safe, else in single quotes (an
/// embedded `'` written `'\''`).
pub fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./:=@%+,-".contains(&b));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quoting_keeps_plain_words_and_quotes_the_rest() {
        let cases = [
            ("/etc/motd", "/etc/motd"),
            ("0644", "0644"),
            ("", "''"),
            ("a b", "'a b'"),
            ("it's", r"'it'\''s'"),
            ("$(reboot)", "'$(reboot)'"),
            ("x;y", "'x;y'"),
            ("new\nline", "'new\nline'"),
        ];
        for (word, quoted) in cases {
            assert_eq!(quote(word), quoted, "{word:?}");
        }
    }
}
