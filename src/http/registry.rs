//! Writes to the original system's meter registry database (`[[meters]] database = ...`), the
//! table `meters(id, name, ip_address, port, ...)` that `sources::meters::load_meter_registry`
//! reads. Blocking (SQLite): callers run these in `spawn_blocking`. Only the three columns the
//! bridge reads are written; the obsolete tb_* columns are left as they are (NULL for new rows).

use std::path::Path;

use rusqlite::{params, Connection, OpenFlags};

/// Why a registry write failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("registry {path}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("registry {path} has no meter named `{name}`")]
    NotFound { path: String, name: String },
}

fn open(path: &Path) -> Result<Connection, Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| sql(path, source))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|source| sql(path, source))?;
    Ok(conn)
}

fn sql(path: &Path, source: rusqlite::Error) -> Error {
    Error::Sqlite {
        path: path.display().to_string(),
        source,
    }
}

/// Add one meter row.
pub fn insert(path: &Path, name: &str, host: &str, port: u16) -> Result<(), Error> {
    let conn = open(path)?;
    conn.execute(
        "INSERT INTO meters(name, ip_address, port) VALUES (?1, ?2, ?3)",
        params![name, host, port],
    )
    .map_err(|source| sql(path, source))?;
    Ok(())
}

/// Change the row(s) of meter `name` (names are compared trimmed, as the loader trims them).
pub fn update(path: &Path, name: &str, new_name: &str, host: &str, port: u16) -> Result<(), Error> {
    let conn = open(path)?;
    let n = conn
        .execute(
            "UPDATE meters SET name = ?1, ip_address = ?2, port = ?3 WHERE trim(name) = ?4",
            params![new_name, host, port, name],
        )
        .map_err(|source| sql(path, source))?;
    if n == 0 {
        return Err(Error::NotFound {
            path: path.display().to_string(),
            name: name.to_string(),
        });
    }
    Ok(())
}

/// Remove the row(s) of meter `name`.
pub fn delete(path: &Path, name: &str) -> Result<(), Error> {
    let conn = open(path)?;
    let n = conn
        .execute("DELETE FROM meters WHERE trim(name) = ?1", params![name])
        .map_err(|source| sql(path, source))?;
    if n == 0 {
        return Err(Error::NotFound {
            path: path.display().to_string(),
            name: name.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_written_where_the_loader_reads_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.db");
        Connection::open(&path)
            .and_then(|c| {
                c.execute_batch(
                    "CREATE TABLE meters(id INTEGER PRIMARY KEY, name TEXT, ip_address TEXT,
                     port INTEGER, tb_host TEXT, tb_port INTEGER, tb_token TEXT);",
                )
            })
            .expect("schema");
        insert(&path, "A", "10.0.0.1", 4059).expect("insert");
        update(&path, "A", "B", "10.0.0.2", 3333).expect("update");
        let entry = crate::config::MeterConfig {
            database: Some(path.clone()),
            ..Default::default()
        };
        let m = crate::sources::meters::load_meter_registry(&entry).expect("load");
        assert_eq!(
            (m[0].name.as_str(), m[0].host.as_str(), m[0].port),
            ("B", "10.0.0.2", 3333)
        );
        assert!(matches!(delete(&path, "A"), Err(Error::NotFound { .. })));
        delete(&path, "B").expect("delete");
        assert!(crate::sources::meters::load_meter_registry(&entry)
            .expect("load")
            .is_empty());
    }
}
