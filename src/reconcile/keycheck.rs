//! Keys are checked, not assumed: the sealed private key on a row is opened and compared with
//! the row's public key (and, by the planner, with the key at Hetzner). A check is cached per
//! row until the key columns change, so each row is opened once after a start, and again
//! whenever the controller is about to create or repair anything for it.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::db::entities::subscription;
use crate::keys::{self, Sealer};

use super::desired;
use super::plan::KeyState;

/// Where the README explains what to do about an unusable key pair.
const RECOVERY: &str = "nothing was replaced (Hetzner injects keys only when a server is created, \
                        so a new key would open nothing); see README \"Recovering a lost key pair\"";

/// The row's private key if this controller sealed it (the only kind it can open), `None`
/// when there is none or it is the web app's (`ssh_key_origin = external`, or not in our
/// sealed format): the rule `KeyChecks::check` starts with.
pub fn sealed_by_controller(row: &subscription::Model) -> Option<&str> {
    row.ssh_private_key
        .as_deref()
        .filter(|key| Sealer::looks_sealed(key))
        .filter(|_| row.ssh_key_origin.as_deref() != Some("external"))
}

/// Results of key checks since this process started, by subscription id.
#[derive(Debug, Default)]
pub struct KeyChecks(Mutex<HashMap<String, (u64, KeyState)>>);

impl KeyChecks {
    /// The state of `row`'s key pair. `fresh` ignores a cached result.
    pub fn check(&self, sealer: &Sealer, row: &subscription::Model, fresh: bool) -> KeyState {
        // Adopted with the web app's key (or none): never opened, never replaced.
        if row.ssh_key_origin.as_deref() == Some("external") {
            return KeyState::External;
        }
        let Some(private) = row.ssh_private_key.as_deref() else {
            return KeyState::Missing;
        };
        if !Sealer::looks_sealed(private) {
            return KeyState::External;
        }
        let digest = digest(row);
        if !fresh
            && let Some((seen, state)) = self.lock().get(&row.id)
            && *seen == digest
        {
            return state.clone();
        }
        let state = check_sealed(sealer, row, private);
        if let KeyState::Unusable(reason) = &state {
            tracing::warn!(subscription = %desired::shown_id(&row.id), "{reason}");
        }
        self.lock().insert(row.id.clone(), (digest, state.clone()));
        state
    }

    /// Records a key pair this process just generated, sealed and stored as `sealed` and
    /// `public`: it belongs together by construction, so the next pass over the row (a
    /// resync's verdict, 10,000 of them after a bulk provisioning) need not open it.
    pub fn record_generated(&self, subscription_id: &str, sealed: &str, public: &str) {
        let state = match keys::md5_fingerprint(public) {
            Ok(fingerprint) => KeyState::Sealed { fingerprint },
            // Never for a key generated here; checked the long way next time.
            Err(_) => return,
        };
        self.lock().insert(
            subscription_id.to_string(),
            (digest_of(Some(sealed), Some(public)), state),
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, KeyState)>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn check_sealed(sealer: &Sealer, row: &subscription::Model, sealed: &str) -> KeyState {
    let private = match sealer.open(sealed, &row.id) {
        Ok(private) => private,
        Err(e) => {
            return KeyState::Unusable(format!(
                "ssh_private_key cannot be opened ({e}); {RECOVERY}"
            ));
        }
    };
    let Some(public) = row.ssh_public_key.as_deref() else {
        return KeyState::Unusable(format!(
            "ssh_public_key is missing next to a sealed private key; {RECOVERY}"
        ));
    };
    let derived = match keys::public_blob_of_private(&private) {
        Ok(blob) => blob,
        Err(e) => return KeyState::Unusable(format!("ssh_private_key: {e}; {RECOVERY}")),
    };
    if public.split_ascii_whitespace().nth(1) != Some(derived.as_str()) {
        return KeyState::Unusable(format!(
            "the sealed private key does not belong to ssh_public_key on the row; {RECOVERY}"
        ));
    }
    match keys::md5_fingerprint(public) {
        Ok(fingerprint) => KeyState::Sealed { fingerprint },
        Err(e) => KeyState::Unusable(format!("ssh_public_key: {e}; {RECOVERY}")),
    }
}

/// Identifies the key columns' content, so a changed column invalidates the cached check.
fn digest(row: &subscription::Model) -> u64 {
    digest_of(
        row.ssh_private_key.as_deref(),
        row.ssh_public_key.as_deref(),
    )
}

fn digest_of(private: Option<&str>, public: Option<&str>) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    private.hash(&mut hasher);
    public.hash(&mut hasher);
    hasher.finish()
}

/// How many sealed keys the start-up check tries to open.
const STARTUP_SAMPLE: u64 = 20;

/// Refuses to start when the configured encryption keys open none of the sealed keys
/// stored: a wrong `VPS_CONTROLLER_ENCRYPTION_KEY` would otherwise fail every row of the
/// fleet. A database without sealed keys (a new one) passes.
pub async fn check_sealer_opens_stored_keys(
    db: &sea_orm::DatabaseConnection,
    sealer: &Sealer,
) -> Result<(), String> {
    use sea_orm::{ConnectionTrait, Statement};
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "SELECT id, ssh_private_key FROM subscriptions \
             WHERE id IS NOT NULL AND ssh_private_key LIKE 'v1:%' ORDER BY id LIMIT $1",
            [STARTUP_SAMPLE.into()],
        ))
        .await
        .map_err(|e| format!("reading sealed keys: {e}"))?;
    let sealed: Vec<(String, String)> = rows
        .iter()
        .filter_map(|row| {
            Some((
                row.try_get::<String>("", "id").ok()?,
                row.try_get::<String>("", "ssh_private_key").ok()?,
            ))
        })
        .filter(|(_, value)| Sealer::looks_sealed(value))
        .collect();
    if sealed.is_empty()
        || sealed
            .iter()
            .any(|(id, value)| sealer.open(value, id).is_ok())
    {
        return Ok(());
    }
    let mut seen: Vec<&str> = sealed
        .iter()
        .filter_map(|(_, value)| value.split(':').nth(1))
        .collect();
    seen.sort_unstable();
    seen.dedup();
    Err(format!(
        "the encryption keys configured (key ids {}) open none of the {} sealed private keys \
         sampled (sealed with key ids {}): refusing to start, since every subscription would \
         fail. Set VPS_CONTROLLER_ENCRYPTION_KEY to the key in use, or list the old one in \
         VPS_CONTROLLER_PREVIOUS_ENCRYPTION_KEYS",
        sealer.configured_ids(),
        sealed.len(),
        seen.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;
    use crate::keys::KeyAlgorithm;

    fn sealer(byte: u8) -> Sealer {
        let key = base64::engine::general_purpose::STANDARD.encode([byte; 32]);
        Sealer::from_base64(&key, &[]).expect("a valid test key")
    }

    fn row(private: &str, public: &str) -> subscription::Model {
        subscription::Model {
            ssh_private_key: Some(private.into()),
            ssh_public_key: Some(public.into()),
            ..subscription::Model::example("sub-1")
        }
    }

    /// The checks are told about a key generated here and do not open it again; anything
    /// else is opened. A sealer with the wrong key shows which: opening fails with it.
    #[test]
    fn a_generated_key_is_not_opened_again_until_its_columns_change() {
        let pair = keys::generate_blocking(KeyAlgorithm::Ed25519, "vps-1").unwrap();
        let sealed = sealer(1).seal(pair.private_pem(), "sub-1").unwrap();
        let public = pair.public_openssh.clone();
        let generated = row(&sealed, &public);
        let wrong = sealer(2);

        let untold = KeyChecks::default();
        assert!(matches!(
            untold.check(&wrong, &generated, false),
            KeyState::Unusable(_)
        ));

        let told = KeyChecks::default();
        told.record_generated("sub-1", &sealed, &public);
        let fingerprint = keys::md5_fingerprint(&public).unwrap();
        assert_eq!(
            told.check(&wrong, &generated, false),
            KeyState::Sealed {
                fingerprint: fingerprint.clone()
            }
        );
        // The right sealer agrees with what was recorded.
        assert_eq!(
            told.check(&sealer(1), &generated, true),
            KeyState::Sealed { fingerprint }
        );
        // A fresh check, or changed columns, open the key.
        let told = KeyChecks::default();
        told.record_generated("sub-1", &sealed, &public);
        assert!(matches!(
            told.check(&wrong, &generated, true),
            KeyState::Unusable(_)
        ));
        let told = KeyChecks::default();
        told.record_generated("sub-1", &sealed, &public);
        let other = keys::generate_blocking(KeyAlgorithm::Ed25519, "vps-1").unwrap();
        let replaced = row(&sealed, &other.public_openssh);
        assert!(matches!(
            told.check(&wrong, &replaced, false),
            KeyState::Unusable(_)
        ));
    }
}
