//! This database's installation id: a random id made once by `migrate`. Resources at Hetzner
//! carry it as a label, so a controller pointed at another database (another team's, a test
//! file on a laptop) never touches them.
//!
//! A copy of the database (a dump restored for staging, a copied SQLite file) carries the id
//! along, so the id is also bound to the database it was made in ([`identity`]): the first
//! controller to run records where it is, and [`check_binding`] refuses a database that has
//! moved until an operator says whether it is the same installation moved (`keep`) or a copy
//! that must own nothing of the original's (`renew`).

use sea_orm::{ConnectionTrait, Statement};

use super::DbError;

/// Length of the id the migration makes (16 lowercase hex characters).
pub const ID_LEN: usize = 16;

/// The installation id. Fails with [`DbError::NotMigrated`] when the migration has not run and
/// with [`DbError::BadData`] when the stored value is not 16 lowercase hex characters (it must
/// be usable as a Hetzner label value).
pub async fn id(db: &impl ConnectionTrait) -> Result<String, DbError> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT installation_id FROM vps_controller_installation WHERE id = 1",
        ))
        .await
        // The table itself may be missing: say what to do rather than "no such table".
        .map_err(|err| {
            if err.to_string().contains("vps_controller_installation") {
                DbError::NotMigrated(format!("cannot read the installation id ({err})"))
            } else {
                DbError::Query(err)
            }
        })?;
    let Some(row) = row else {
        return Err(DbError::NotMigrated(
            "the database has no installation id".into(),
        ));
    };
    let value: String = row
        .try_get("", "installation_id")
        .map_err(|err| bad(format!("column installation_id: {err}")))?;
    check(&value).map_err(bad)?;
    Ok(value)
}

/// Where this database is: PostgreSQL's cluster system identifier (when readable) and the
/// database's OID, which a physical replica shares and a restored dump does not; SQLite's
/// file (path, device and inode), which a copy or restored file does not share.
pub async fn identity(db: &impl ConnectionTrait) -> Result<String, DbError> {
    let backend = db.get_database_backend();
    match backend {
        sea_orm::DbBackend::Postgres => {
            let oid = db
                .query_one_raw(Statement::from_string(
                    backend,
                    "SELECT oid::text AS oid FROM pg_database WHERE datname = current_database()",
                ))
                .await?
                .and_then(|row| row.try_get::<String>("", "oid").ok())
                .unwrap_or_default();
            // Restricted to privileged roles on some servers: the OID alone then.
            let system = db
                .query_one_raw(Statement::from_string(
                    backend,
                    "SELECT system_identifier::text AS system FROM pg_control_system()",
                ))
                .await
                .ok()
                .flatten()
                .and_then(|row| row.try_get::<String>("", "system").ok())
                .unwrap_or_else(|| "-".into());
            Ok(format!("postgres:{system}:{oid}"))
        }
        _ => {
            let rows = db
                .query_all_raw(Statement::from_string(backend, "PRAGMA database_list"))
                .await?;
            let file = rows
                .iter()
                .find(|row| row.try_get::<String>("", "name").ok().as_deref() == Some("main"))
                .and_then(|row| row.try_get::<String>("", "file").ok())
                .unwrap_or_default();
            if file.is_empty() {
                return Ok("sqlite:memory".into());
            }
            let path = std::fs::canonicalize(&file).unwrap_or_else(|_| file.clone().into());
            let (dev, ino) = file_id(&path);
            Ok(format!("sqlite:{}:{dev}:{ino}", path.display()))
        }
    }
}

#[cfg(unix)]
fn file_id(path: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).map_or((0, 0), |m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(_path: &std::path::Path) -> (u64, u64) {
    (0, 0)
}

/// Whether this database is where its installation id was made (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    /// Bound here (now, if this is the first check).
    Here,
    /// Bound elsewhere: a copy or a moved database. Nothing may act until an operator decides.
    Moved { bound_to: String, here: String },
}

/// Checks, and on the first call records, where the installation id is bound.
pub async fn check_binding(db: &impl ConnectionTrait) -> Result<Binding, DbError> {
    let here = identity(db).await?;
    let backend = db.get_database_backend();
    let bound_to = db
        .query_one_raw(Statement::from_string(
            backend,
            "SELECT bound_to FROM vps_controller_installation WHERE id = 1",
        ))
        .await?
        .ok_or_else(|| DbError::NotMigrated("the database has no installation id".into()))?
        .try_get::<Option<String>>("", "bound_to")
        .map_err(|err| bad(format!("column bound_to: {err}")))?;
    match bound_to {
        Some(bound_to) if bound_to == here => Ok(Binding::Here),
        Some(bound_to) => Ok(Binding::Moved { bound_to, here }),
        None => {
            bind_here(db, &here).await?;
            Ok(Binding::Here)
        }
    }
}

/// The database was moved (same installation, e.g. a restore of itself): bind the id here.
pub async fn keep(db: &impl ConnectionTrait) -> Result<String, DbError> {
    let here = identity(db).await?;
    bind_here(db, &here).await?;
    id(db).await
}

/// The database is a copy: give it a new installation id of its own, bound here. Resources
/// labelled with the old id are the original's and are never touched from this database.
pub async fn renew(db: &impl ConnectionTrait) -> Result<String, DbError> {
    let here = identity(db).await?;
    let mut bytes = [0u8; ID_LEN / 2];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| bad("the system random number generator failed".into()))?;
    let new_id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "UPDATE vps_controller_installation SET installation_id = $1, bound_to = $2 WHERE id = 1",
        [new_id.clone().into(), here.into()],
    ))
    .await?;
    Ok(new_id)
}

async fn bind_here(db: &impl ConnectionTrait, here: &str) -> Result<(), DbError> {
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "UPDATE vps_controller_installation SET bound_to = $1 WHERE id = 1",
        [here.into()],
    ))
    .await?;
    Ok(())
}

fn bad(problem: String) -> DbError {
    DbError::BadData {
        what: "the installation id (vps_controller_installation)".into(),
        problem,
    }
}

fn check(value: &str) -> Result<(), String> {
    if value.len() == ID_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        let shown: String = value.chars().take(40).collect();
        Err(format!(
            "{shown:?} is not {ID_LEN} lowercase hex characters; it is a label value on every \
             resource, so restore the original value instead of inventing one"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn only_sixteen_lowercase_hex_characters_pass() {
        assert!(check("0123456789abcdef").is_ok());
        assert!(check("0123456789ABCDEF").is_err());
        assert!(check("0123456789abcde").is_err());
        assert!(check("0123456789abcdefa").is_err());
        assert!(check("0123456789abcdeg").is_err());
        let err = check("").unwrap_err();
        assert!(err.contains("16 lowercase hex"), "{err}");
    }
}
