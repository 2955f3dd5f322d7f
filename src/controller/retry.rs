//! Failed rows that a fix outside the rows may cure (the config, the encryption keys, the
//! API token) are retried when those inputs change; each new leadership term checks.

use crate::db::subscriptions;

/// Rows that failed on something an operator fixes outside the rows (a plan's server type,
/// a missing encryption key, a rejected token) are retried when that changes. `fingerprint`
/// identifies those inputs (see `inputs_fingerprint`); it is kept in the database between
/// terms. Returns how many failed rows were marked for a retry (none the first time).
pub async fn retry_after_config_change(
    db: &sea_orm::DatabaseConnection,
    fingerprint: &str,
) -> Result<u64, crate::db::DbError> {
    const KEY: &str = "inputs_fingerprint";
    let previous = crate::db::state::get(db, KEY).await?;
    if previous.as_deref() == Some(fingerprint) {
        return Ok(0);
    }
    let retried = match previous {
        Some(_) => subscriptions::retry(db, None).await?,
        None => 0,
    };
    crate::db::state::set(db, KEY, fingerprint).await?;
    if retried > 0 {
        tracing::info!(
            retried,
            "the configuration, encryption keys or token changed: failed rows are retried"
        );
    }
    Ok(retried)
}

/// A fingerprint of what decides whether a failed row could succeed now: the config, the
/// encryption key ids and `Token::fingerprint` of the API token (never the token itself).
pub fn inputs_fingerprint(
    config: &crate::config::Config,
    sealer: &crate::keys::Sealer,
    token_fingerprint: &str,
) -> String {
    let text = format!(
        "{}|{}|{token_fingerprint}",
        config.fingerprint(),
        sealer.configured_ids(),
    );
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
