//! This database's installation id: a random id made once by `migrate` and never replaced.
//! Resources at Hetzner carry it as a label, so a controller pointed at another database (a
//! copy, a staging restore, another team's) never touches them.

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
