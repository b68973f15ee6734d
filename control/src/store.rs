//! The state database: redb (embedded, one host) or PostgreSQL (shared by many hosts).
//!
//! For now it holds the Session Storage's Telegram sessions (name → serialized MTProto session);
//! later tables join it. Both backends present the same small API.

use crate::config::{DatabaseBackend, DatabaseConfig};
use redb::{ReadableTableMetadata, TableDefinition};
use std::path::Path;
use std::sync::Arc;

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("telegram_sessions");

/// Why the database failed; the message names the backend and the operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redb {op}: {message}")]
    Redb { op: &'static str, message: String },
    #[error("postgres {op}: {source}")]
    Postgres {
        op: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("cannot create database directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
}

fn redb_err<E: std::fmt::Display>(op: &'static str) -> impl Fn(E) -> StoreError {
    move |e| StoreError::Redb {
        op,
        message: e.to_string(),
    }
}

/// An open database.
#[derive(Clone)]
pub enum Store {
    Redb(Arc<redb::Database>),
    Postgres(Arc<tokio_postgres::Client>),
}

impl Store {
    /// Opens (and creates) the configured database; relative paths are resolved against `base`.
    pub async fn open(cfg: &DatabaseConfig, base: &Path) -> Result<Self, StoreError> {
        match cfg.backend {
            DatabaseBackend::Redb => {
                let path = crate::config::resolve(base, &cfg.path);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                        path: dir.display().to_string(),
                        source,
                    })?;
                }
                let db = redb::Database::create(&path).map_err(redb_err("open"))?;
                let tx = db.begin_write().map_err(redb_err("begin"))?;
                tx.open_table(SESSIONS).map_err(redb_err("create table"))?;
                tx.commit().map_err(redb_err("commit"))?;
                tracing::info!(path = %path.display(), "redb database open");
                Ok(Store::Redb(Arc::new(db)))
            }
            DatabaseBackend::Postgres => {
                let url = cfg.url.clone().unwrap_or_default();
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .map_err(|source| StoreError::Postgres {
                        op: "connect",
                        source,
                    })?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::error!(error = %e, "postgres connection lost");
                    }
                });
                client
                    .batch_execute(
                        "CREATE TABLE IF NOT EXISTS telegram_sessions (
                            name TEXT PRIMARY KEY, data BYTEA NOT NULL)",
                    )
                    .await
                    .map_err(|source| StoreError::Postgres {
                        op: "create table",
                        source,
                    })?;
                tracing::info!("postgres database open");
                Ok(Store::Postgres(Arc::new(client)))
            }
        }
    }

    /// Which backend this is.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Redb(_) => "redb",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Saves (or replaces) a Telegram session.
    pub async fn put_session(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        match self {
            Store::Redb(db) => {
                let tx = db.begin_write().map_err(redb_err("begin"))?;
                {
                    let mut t = tx.open_table(SESSIONS).map_err(redb_err("open table"))?;
                    t.insert(name, data).map_err(redb_err("insert"))?;
                }
                tx.commit().map_err(redb_err("commit"))
            }
            Store::Postgres(c) => c
                .execute(
                    "INSERT INTO telegram_sessions (name, data) VALUES ($1, $2)
                     ON CONFLICT (name) DO UPDATE SET data = EXCLUDED.data",
                    &[&name, &data],
                )
                .await
                .map(drop)
                .map_err(|source| StoreError::Postgres {
                    op: "insert",
                    source,
                }),
        }
    }

    /// Loads a Telegram session.
    pub async fn get_session(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Store::Redb(db) => {
                let tx = db.begin_read().map_err(redb_err("begin"))?;
                let t = tx.open_table(SESSIONS).map_err(redb_err("open table"))?;
                let v = t.get(name).map_err(redb_err("get"))?;
                Ok(v.map(|g| g.value().to_vec()))
            }
            Store::Postgres(c) => c
                .query_opt(
                    "SELECT data FROM telegram_sessions WHERE name = $1",
                    &[&name],
                )
                .await
                .map(|row| row.map(|r| r.get::<_, Vec<u8>>(0)))
                .map_err(|source| StoreError::Postgres {
                    op: "select",
                    source,
                }),
        }
    }

    /// Number of stored sessions.
    pub async fn count_sessions(&self) -> Result<u64, StoreError> {
        match self {
            Store::Redb(db) => {
                let tx = db.begin_read().map_err(redb_err("begin"))?;
                let t = tx.open_table(SESSIONS).map_err(redb_err("open table"))?;
                t.len().map_err(redb_err("count"))
            }
            Store::Postgres(c) => c
                .query_one("SELECT count(*) FROM telegram_sessions", &[])
                .await
                .map(|r| r.get::<_, i64>(0) as u64)
                .map_err(|source| StoreError::Postgres {
                    op: "count",
                    source,
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn redb_sessions_round_trip_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DatabaseConfig {
            backend: DatabaseBackend::Redb,
            path: "db/s.redb".into(),
            url: None,
        };
        {
            let s = Store::open(&cfg, dir.path()).await.unwrap();
            s.put_session("acc1", b"authkey").await.unwrap();
            assert_eq!(s.count_sessions().await.unwrap(), 1);
        }
        let s = Store::open(&cfg, dir.path()).await.unwrap();
        assert_eq!(
            s.get_session("acc1").await.unwrap().as_deref(),
            Some(&b"authkey"[..])
        );
        assert_eq!(s.get_session("nope").await.unwrap(), None);
    }
}
