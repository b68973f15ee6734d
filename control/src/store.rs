//! The state database: redb (embedded, one host) or PostgreSQL (shared by many hosts).
//!
//! It holds the Session Storage's tables (sealed sessions, account records, the resolution cache).
//! Both backends implement one trait, [`StoreBackend`] — a key → bytes map per [`Table`] —
//! and [`contract`] is the behaviour each must show (run against redb always, against
//! PostgreSQL by `tests/interop/run storage`).

use crate::config::{DatabaseBackend, DatabaseConfig};
use redb::TableDefinition;
use std::path::Path;
use std::sync::Arc;

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("telegram_sessions");
const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("telegram_accounts");
const PEERS: TableDefinition<&str, &[u8]> = TableDefinition::new("telegram_peers");
const GATEWAYS: TableDefinition<&str, &[u8]> = TableDefinition::new("gateways");
const USAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("gateway_usage");
const CONNECTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sip_connections");

/// The tables behind the key → bytes API; each is a table in redb and in PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Account name → sealed MTProto session (auth keys; never stored in the clear).
    Sessions,
    /// Account name → account record (JSON: phone, user id, state).
    Accounts,
    /// `account/kind:value` → resolved peer (JSON: user id, access hash, names).
    Peers,
    /// Gateway name → gateway settings made through the control API (JSON).
    Gateways,
    /// Gateway name → what its plan limits count (JSON: the month's talk time, recent failed
    /// calls), so limits survive a Manager restart.
    Usage,
    /// Connection name → SIP connection settings made through the control API (JSON).
    Connections,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Sessions => "telegram_sessions",
            Table::Accounts => "telegram_accounts",
            Table::Peers => "telegram_peers",
            Table::Gateways => "gateways",
            Table::Usage => "gateway_usage",
            Table::Connections => "sip_connections",
        }
    }

    fn redb(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            Table::Sessions => SESSIONS,
            Table::Accounts => ACCOUNTS,
            Table::Peers => PEERS,
            Table::Gateways => GATEWAYS,
            Table::Usage => USAGE,
            Table::Connections => CONNECTIONS,
        }
    }

    const ALL: [Table; 6] = [
        Table::Sessions,
        Table::Accounts,
        Table::Peers,
        Table::Gateways,
        Table::Usage,
        Table::Connections,
    ];
}

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

/// A boxed future, as backends are used behind `dyn`.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Entries of a table: (key, value), in key order.
pub type Entries = Vec<(String, Vec<u8>)>;

/// What a database backend offers: one key → bytes map per table.
pub trait StoreBackend: Send + Sync + 'static {
    /// `redb` or `postgres`, for status.
    fn name(&self) -> &'static str;
    /// Saves (or replaces) `key` in `table`.
    fn put<'a>(
        &'a self,
        table: Table,
        key: &'a str,
        data: &'a [u8],
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Loads `key` from `table`.
    fn get<'a>(
        &'a self,
        table: Table,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>>;
    /// Removes `key` from `table`; true if it was there.
    fn delete<'a>(&'a self, table: Table, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Every entry of `table` whose key starts with `prefix`, in key order.
    fn list<'a>(
        &'a self,
        table: Table,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<Entries, StoreError>>;
}

/// The embedded database (one host).
pub struct RedbStore(redb::Database);

/// PostgreSQL (state shared by many hosts).
pub struct PgStore(tokio_postgres::Client);

impl RedbStore {
    /// Opens (and creates) the file and its tables.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let db = redb::Database::create(path).map_err(redb_err("open"))?;
        let tx = db.begin_write().map_err(redb_err("begin"))?;
        for t in Table::ALL {
            tx.open_table(t.redb()).map_err(redb_err("create table"))?;
        }
        tx.commit().map_err(redb_err("commit"))?;
        tracing::info!(path = %path.display(), "redb database open");
        Ok(Self(db))
    }

    fn put_now(&self, table: Table, key: &str, data: &[u8]) -> Result<(), StoreError> {
        let tx = self.0.begin_write().map_err(redb_err("begin"))?;
        {
            let mut t = tx
                .open_table(table.redb())
                .map_err(redb_err("open table"))?;
            t.insert(key, data).map_err(redb_err("insert"))?;
        }
        tx.commit().map_err(redb_err("commit"))
    }

    fn get_now(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.0.begin_read().map_err(redb_err("begin"))?;
        let t = tx
            .open_table(table.redb())
            .map_err(redb_err("open table"))?;
        let v = t.get(key).map_err(redb_err("get"))?;
        Ok(v.map(|g| g.value().to_vec()))
    }

    fn delete_now(&self, table: Table, key: &str) -> Result<bool, StoreError> {
        let tx = self.0.begin_write().map_err(redb_err("begin"))?;
        let had = {
            let mut t = tx
                .open_table(table.redb())
                .map_err(redb_err("open table"))?;
            let had = t.remove(key).map_err(redb_err("remove"))?.is_some();
            had
        };
        tx.commit().map_err(redb_err("commit"))?;
        Ok(had)
    }

    fn list_now(&self, table: Table, prefix: &str) -> Result<Entries, StoreError> {
        let tx = self.0.begin_read().map_err(redb_err("begin"))?;
        let t = tx
            .open_table(table.redb())
            .map_err(redb_err("open table"))?;
        let mut out = Vec::new();
        for item in t.range(prefix..).map_err(redb_err("range"))? {
            let (k, v) = item.map_err(redb_err("range"))?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }
}

// redb is fast and local: its calls run inline (each is one short transaction).
impl StoreBackend for RedbStore {
    fn name(&self) -> &'static str {
        "redb"
    }
    fn put<'a>(
        &'a self,
        table: Table,
        key: &'a str,
        data: &'a [u8],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.put_now(table, key, data) })
    }
    fn get<'a>(
        &'a self,
        table: Table,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async move { self.get_now(table, key) })
    }
    fn delete<'a>(&'a self, table: Table, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move { self.delete_now(table, key) })
    }
    fn list<'a>(
        &'a self,
        table: Table,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<Entries, StoreError>> {
        Box::pin(async move { self.list_now(table, prefix) })
    }
}

fn pg_err(op: &'static str) -> impl Fn(tokio_postgres::Error) -> StoreError {
    move |source| StoreError::Postgres { op, source }
}

impl PgStore {
    /// Connects and creates the tables.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(pg_err("connect"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::error!(error = %e, "postgres connection lost");
            }
        });
        for t in Table::ALL {
            client
                .batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {} (name TEXT PRIMARY KEY, data BYTEA NOT NULL)",
                    t.name()
                ))
                .await
                .map_err(pg_err("create table"))?;
        }
        tracing::info!("postgres database open");
        Ok(Self(client))
    }
}

impl StoreBackend for PgStore {
    fn name(&self) -> &'static str {
        "postgres"
    }
    fn put<'a>(
        &'a self,
        table: Table,
        key: &'a str,
        data: &'a [u8],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.0
                .execute(
                    &format!(
                        "INSERT INTO {} (name, data) VALUES ($1, $2)
                         ON CONFLICT (name) DO UPDATE SET data = EXCLUDED.data",
                        table.name()
                    ),
                    &[&key, &data],
                )
                .await
                .map(drop)
                .map_err(pg_err("insert"))
        })
    }
    fn get<'a>(
        &'a self,
        table: Table,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async move {
            self.0
                .query_opt(
                    &format!("SELECT data FROM {} WHERE name = $1", table.name()),
                    &[&key],
                )
                .await
                .map(|row| row.map(|r| r.get::<_, Vec<u8>>(0)))
                .map_err(pg_err("select"))
        })
    }
    fn delete<'a>(&'a self, table: Table, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            self.0
                .execute(
                    &format!("DELETE FROM {} WHERE name = $1", table.name()),
                    &[&key],
                )
                .await
                .map(|n| n > 0)
                .map_err(pg_err("delete"))
        })
    }
    fn list<'a>(
        &'a self,
        table: Table,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<Entries, StoreError>> {
        Box::pin(async move {
            // LIKE with the prefix's own wildcards escaped.
            let like = format!(
                "{}%",
                prefix
                    .replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_")
            );
            self.0
                .query(
                    &format!(
                        "SELECT name, data FROM {} WHERE name LIKE $1 ORDER BY name",
                        table.name()
                    ),
                    &[&like],
                )
                .await
                .map(|rows| {
                    rows.iter()
                        .map(|r| (r.get::<_, String>(0), r.get::<_, Vec<u8>>(1)))
                        .collect()
                })
                .map_err(pg_err("select"))
        })
    }
}

/// An open database: the configured backend behind [`StoreBackend`]. Cheap to clone.
#[derive(Clone)]
pub struct Store(Arc<dyn StoreBackend>);

impl Store {
    /// Opens (and creates) the configured database; relative paths are resolved against `base`.
    pub async fn open(cfg: &DatabaseConfig, base: &Path) -> Result<Self, StoreError> {
        Ok(match cfg.backend {
            DatabaseBackend::Redb => {
                let path = crate::config::resolve(base, &cfg.path);
                Store(Arc::new(RedbStore::open(&path)?))
            }
            DatabaseBackend::Postgres => Store(Arc::new(
                PgStore::connect(cfg.url.as_deref().unwrap_or_default()).await?,
            )),
        })
    }

    /// A store over any backend.
    pub fn from_backend(backend: Arc<dyn StoreBackend>) -> Self {
        Store(backend)
    }

    /// Which backend this is.
    pub fn backend(&self) -> &'static str {
        self.0.name()
    }

    /// Saves (or replaces) `key` in `table`.
    pub async fn put(&self, table: Table, key: &str, data: &[u8]) -> Result<(), StoreError> {
        self.0.put(table, key, data).await
    }

    /// Loads `key` from `table`.
    pub async fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(table, key).await
    }

    /// Removes `key` from `table`; true if it was there.
    pub async fn delete(&self, table: Table, key: &str) -> Result<bool, StoreError> {
        self.0.delete(table, key).await
    }

    /// Every entry of `table` whose key starts with `prefix`, in key order.
    pub async fn list(&self, table: Table, prefix: &str) -> Result<Entries, StoreError> {
        self.0.list(table, prefix).await
    }

    /// Saves (or replaces) a Telegram session (sealed by the caller).
    pub async fn put_session(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        self.put(Table::Sessions, name, data).await
    }

    /// Loads a Telegram session.
    pub async fn get_session(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(Table::Sessions, name).await
    }

    /// Number of stored sessions.
    pub async fn count_sessions(&self) -> Result<u64, StoreError> {
        Ok(self.list(Table::Sessions, "").await?.len() as u64)
    }
}

/// The behaviour every backend must show; run against redb always and PostgreSQL when
/// `SIPTG_TEST_POSTGRES_URL` is set (`tests/interop/run storage` starts one).
#[cfg(test)]
pub(crate) async fn contract(s: &Store) {
    s.put(Table::Accounts, "a/1", b"one").await.unwrap();
    s.put(Table::Accounts, "a/2", b"two").await.unwrap();
    s.put(Table::Accounts, "a_x", b"other").await.unwrap();
    s.put(Table::Accounts, "b/1", b"b").await.unwrap();
    s.put(Table::Accounts, "a/1", b"uno").await.unwrap();
    let got = s.list(Table::Accounts, "a/").await.unwrap();
    assert_eq!(
        got,
        vec![
            ("a/1".to_string(), b"uno".to_vec()),
            ("a/2".to_string(), b"two".to_vec())
        ]
    );
    assert_eq!(
        s.get(Table::Accounts, "b/1").await.unwrap().as_deref(),
        Some(&b"b"[..])
    );
    // Tables are separate.
    assert_eq!(s.get(Table::Peers, "b/1").await.unwrap(), None);
    assert!(s.delete(Table::Accounts, "b/1").await.unwrap());
    assert!(!s.delete(Table::Accounts, "b/1").await.unwrap());
    assert_eq!(s.get(Table::Accounts, "b/1").await.unwrap(), None);
    for k in ["a/1", "a/2", "a_x"] {
        s.delete(Table::Accounts, k).await.unwrap();
    }
    // The gateways' usage (plan limits) is a table of its own, overwritten in place.
    s.put(Table::Usage, "gw", br#"{"used_ms":1}"#)
        .await
        .unwrap();
    s.put(Table::Usage, "gw", br#"{"used_ms":2}"#)
        .await
        .unwrap();
    assert_eq!(
        s.list(Table::Usage, "").await.unwrap(),
        vec![("gw".to_string(), br#"{"used_ms":2}"#.to_vec())]
    );
    assert_eq!(s.get(Table::Gateways, "gw").await.unwrap(), None);
    assert!(s.delete(Table::Usage, "gw").await.unwrap());
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
        contract(&s).await;
    }

    #[tokio::test]
    async fn postgres_keeps_the_same_contract() {
        let Ok(url) = std::env::var("SIPTG_TEST_POSTGRES_URL") else {
            eprintln!("SIPTG_TEST_POSTGRES_URL not set: PostgreSQL contract runs in tests/interop/run storage");
            return;
        };
        let cfg = DatabaseConfig {
            backend: DatabaseBackend::Postgres,
            path: Default::default(),
            url: Some(url),
        };
        let s = Store::open(&cfg, Path::new(".")).await.unwrap();
        contract(&s).await;
        s.put_session("pg-acc", b"sealed").await.unwrap();
        assert_eq!(
            s.get_session("pg-acc").await.unwrap().as_deref(),
            Some(&b"sealed"[..])
        );
        s.delete(Table::Sessions, "pg-acc").await.unwrap();
    }
}
