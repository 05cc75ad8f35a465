//! The event store, on SQLite (WAL, `synchronous=FULL`) or PostgreSQL through sqlx's `Any`
//! driver with the same SQL.
//!
//! - `events`: every change, unique on (aggregate id, version) and on event id, each with a
//!   SHA-256 hash chaining it to the previous event of its aggregate (tamper evidence).
//! - `snapshots`: an aggregate's state at a version.
//! - `outbox`: the events to publish, written in the same transaction as the change.
//! - `idempotency`: the first answer to each `Idempotency-Key`, in the same transaction too.
//!
//! Commands are written in batches ([`Store::append_batch`]): one transaction and one fsync for
//! many commands. Batches are serialised (SQLite `BEGIN IMMEDIATE`, a PostgreSQL
//! transaction-scoped advisory lock), so sequence numbers commit in order and readers following
//! `seq` never skip an event. Each member names the version it expects each aggregate to be at;
//! a member whose aggregate moved on is left out of the batch alone ([`Outcome::Retry`]).

use std::time::Duration;

use serde::Serialize;
use sqlx::{AnyConnection, AnyPool, Row, any::AnyPoolOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(String),
    #[error("{0}")]
    Config(String),
    /// An aggregate's log (or snapshot) holds data that does not parse: that aggregate cannot
    /// be served, the others can.
    #[error("{0}")]
    Unreadable(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Db(e.to_string())
    }
}

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: String,
    pub event_type: String,
    pub payload: String,
    pub correlation_id: String,
    pub causation_id: String,
}

/// Events for one aggregate, appended only if it is at `expected_version`.
#[derive(Debug, Clone)]
pub struct Append {
    pub aggregate_id: String,
    pub aggregate_type: &'static str,
    pub expected_version: u64,
    pub events: Vec<NewEvent>,
}

/// One command's share of a batch: its appends and its idempotency record.
#[derive(Debug, Clone)]
pub struct Member {
    pub appends: Vec<Append>,
    pub idem: Option<Idempotent>,
    /// The W3C `traceparent` of the command that decided these events: their outbox rows keep
    /// it, and the bus carries it (CloudEvents distributed tracing), so a delivery links back.
    pub traceparent: Option<String>,
}

/// What became of one member of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Durable, with its events as stored.
    Committed(Vec<Recorded>),
    /// An aggregate it expected at `expected` is at `actual` (or an earlier member touching it
    /// was left out): decide it again on fresh state.
    Retry { aggregate: String, expected: u64, actual: u64 },
    /// Its idempotency key was already stored (by another instance, or an earlier batch).
    Replayed(Idempotent),
}

/// The first answer to an idempotency key, stored with the change it answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Idempotent {
    pub key: String,
    pub request_hash: String,
    pub status: u16,
    pub response: String,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recorded {
    pub seq: i64,
    pub aggregate_id: String,
    pub aggregate_type: String,
    pub version: u64,
    pub event_id: String,
    pub event_type: String,
    pub payload: String,
    pub correlation_id: String,
    pub causation_id: String,
    pub recorded_at_ms: i64,
    pub prev_hash: String,
    pub hash: String,
}

/// An outbox row not yet published.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: String,
    pub topic: String,
    pub key: String,
    pub event_type: String,
    pub payload: String,
    pub created_at_ms: i64,
    /// The trace of the command that caused it (CloudEvents distributed tracing extension).
    pub traceparent: Option<String>,
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const SCHEMA_SQLITE: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, aggregate_id TEXT NOT NULL, aggregate_type TEXT NOT NULL, version BIGINT NOT NULL, event_id TEXT NOT NULL UNIQUE, event_type TEXT NOT NULL, payload TEXT NOT NULL, correlation_id TEXT NOT NULL, causation_id TEXT NOT NULL, recorded_at BIGINT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL, UNIQUE (aggregate_id, version))",
    "CREATE TABLE IF NOT EXISTS snapshots (aggregate_id TEXT PRIMARY KEY, version BIGINT NOT NULL, state TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL, topic TEXT NOT NULL, msg_key TEXT NOT NULL, event_type TEXT NOT NULL, payload TEXT NOT NULL, created_at BIGINT NOT NULL, published_at BIGINT, traceparent TEXT)",
    "CREATE TABLE IF NOT EXISTS idempotency (idem_key TEXT PRIMARY KEY, request_hash TEXT NOT NULL, status BIGINT NOT NULL, response TEXT NOT NULL, created_at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (published_at, id)",
    "CREATE TABLE IF NOT EXISTS checkpoints (number BIGINT PRIMARY KEY, seq BIGINT NOT NULL, body TEXT NOT NULL)",
];

const SCHEMA_POSTGRES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS events (seq BIGSERIAL PRIMARY KEY, aggregate_id TEXT NOT NULL, aggregate_type TEXT NOT NULL, version BIGINT NOT NULL, event_id TEXT NOT NULL UNIQUE, event_type TEXT NOT NULL, payload TEXT NOT NULL, correlation_id TEXT NOT NULL, causation_id TEXT NOT NULL, recorded_at BIGINT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL, UNIQUE (aggregate_id, version))",
    "CREATE TABLE IF NOT EXISTS snapshots (aggregate_id TEXT PRIMARY KEY, version BIGINT NOT NULL, state TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS outbox (id BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL, topic TEXT NOT NULL, msg_key TEXT NOT NULL, event_type TEXT NOT NULL, payload TEXT NOT NULL, created_at BIGINT NOT NULL, published_at BIGINT, traceparent TEXT)",
    "CREATE TABLE IF NOT EXISTS idempotency (idem_key TEXT PRIMARY KEY, request_hash TEXT NOT NULL, status BIGINT NOT NULL, response TEXT NOT NULL, created_at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (published_at, id)",
    "CREATE TABLE IF NOT EXISTS checkpoints (number BIGINT PRIMARY KEY, seq BIGINT NOT NULL, body TEXT NOT NULL)",
];

/// The chain hash of one event.
pub fn chain_hash(prev: &str, r: &Recorded) -> String {
    let parts = [
        prev,
        &r.event_id,
        &r.aggregate_id,
        &r.version.to_string(),
        &r.event_type,
        &r.payload,
        &r.correlation_id,
        &r.causation_id,
        &r.recorded_at_ms.to_string(),
    ];
    let parts: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
    mesh_runtime::hex(&mesh_runtime::sha256_parts(&parts))
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

/// The store's write lock, held from [`Store::lock_writes`] until the batch it was taken for is
/// written (or it is dropped, which rolls back).
pub struct WriteLock(sqlx::Transaction<'static, sqlx::Any>);

fn row_to_recorded(row: &sqlx::any::AnyRow) -> Result<Recorded, StoreError> {
    Ok(Recorded {
        seq: row.try_get("seq")?,
        aggregate_id: row.try_get("aggregate_id")?,
        aggregate_type: row.try_get("aggregate_type")?,
        version: row.try_get::<i64, _>("version")? as u64,
        event_id: row.try_get("event_id")?,
        event_type: row.try_get("event_type")?,
        payload: row.try_get("payload")?,
        correlation_id: row.try_get("correlation_id")?,
        causation_id: row.try_get("causation_id")?,
        recorded_at_ms: row.try_get("recorded_at")?,
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

fn row_to_idempotent(r: &sqlx::any::AnyRow) -> Result<Idempotent, StoreError> {
    Ok(Idempotent {
        key: r.try_get("idem_key")?,
        request_hash: r.try_get("request_hash")?,
        status: r.try_get::<i64, _>("status")? as u16,
        response: r.try_get("response")?,
    })
}

/// Bind parameters per statement of a batch (SQLite allows 32,766, PostgreSQL 65,535).
const CHUNK: usize = 990;

/// `n` placeholders for the parameters numbered from `first`: `$first, $first+1, …` on
/// PostgreSQL, `?, ?, …` on SQLite (where looking up numbered names costs a scan per parameter,
/// quadratic in a batch statement).
fn placeholders(backend: Backend, first: usize, n: usize) -> String {
    match backend {
        Backend::Sqlite => vec!["?"; n].join(", "),
        Backend::Postgres => (first..first + n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", "),
    }
}

const EVENT_COLUMNS: &str = "seq, aggregate_id, aggregate_type, version, event_id, event_type, payload, correlation_id, causation_id, recorded_at, prev_hash, hash";

impl Store {
    /// Connects (`sqlite://PATH` creates the file; `postgres://…`) and migrates.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::Config(format!(
                "--database-url {url:?}: use sqlite://PATH or postgres://…"
            )));
        };
        let url = match backend {
            Backend::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_string(),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 16 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn: &mut AnyConnection, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        for pragma in [
                            "PRAGMA busy_timeout = 10000",
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = FULL",
                        ] {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(|e| StoreError::Config(format!("cannot open the database {url}: {e}")))?;
        let store = Store { pool, backend };
        let schema = match backend {
            Backend::Sqlite => SCHEMA_SQLITE,
            Backend::Postgres => SCHEMA_POSTGRES,
        };
        for stmt in schema {
            sqlx::query(*stmt).execute(&store.pool).await?;
        }
        store.add_column("outbox", "traceparent TEXT").await?;
        Ok(store)
    }

    /// Adds a column a database made by an earlier version lacks (a no-op when it has it).
    async fn add_column(&self, table: &str, column: &str) -> Result<(), StoreError> {
        let sql = match self.backend {
            Backend::Postgres => format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column}"),
            Backend::Sqlite => format!("ALTER TABLE {table} ADD COLUMN {column}"),
        };
        match sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&self.pool).await {
            Err(e) if e.to_string().contains("duplicate column") => Ok(()),
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Takes the store's write lock (SQLite's `BEGIN IMMEDIATE`, a PostgreSQL advisory lock):
    /// until it is given to [`Store::append_batch`] or dropped, no other writer commits, so what
    /// is read meanwhile stays the latest state.
    pub async fn lock_writes(&self) -> Result<WriteLock, StoreError> {
        Ok(WriteLock(self.begin_write().await?))
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        match self.backend {
            Backend::Sqlite => Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?),
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock(7411)").execute(&mut *tx).await?;
                Ok(tx)
            }
        }
    }

    /// Commits a batch of commands in one transaction (one fsync), in order. Each member's
    /// appends name the versions they expect; a member whose aggregate moved on since it was
    /// decided (another writer, or an earlier member that was dropped) is left out with
    /// [`Outcome::Retry`], one whose idempotency key is already stored with
    /// [`Outcome::Replayed`], and the rest commit together with their outbox rows (when
    /// `publish`) and idempotency records. The hash chain continues from each aggregate's stored
    /// head. Nothing of a batch is written if the database fails. With `lock` (taken before the
    /// members were decided) no other writer can have moved their aggregates.
    pub async fn append_batch(
        &self,
        members: &[Member],
        publish: bool,
        now_ms: i64,
        lock: Option<WriteLock>,
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut tx = match lock {
            Some(WriteLock(tx)) => tx,
            None => self.begin_write().await?,
        };
        let mut heads = self.heads(&mut tx, members).await?;
        let mut stored = self.idempotent_in(&mut tx, members).await?;
        let mut tainted = std::collections::HashSet::new();
        let mut outcomes = Vec::with_capacity(members.len());
        let mut rows: Vec<(usize, Recorded)> = Vec::new();
        let mut idems = Vec::new();
        for (i, m) in members.iter().enumerate() {
            let touches = || m.appends.iter().map(|a| a.aggregate_id.clone());
            if let Some(found) = m.idem.as_ref().and_then(|k| stored.get(&k.key)) {
                outcomes.push(Outcome::Replayed(found.clone()));
                tainted.extend(touches());
                continue;
            }
            let moved = m.appends.iter().find_map(|a| {
                let actual = heads.get(&a.aggregate_id).map_or(0, |h| h.0);
                (tainted.contains(&a.aggregate_id) || actual != a.expected_version)
                    .then(|| (a.aggregate_id.clone(), a.expected_version, actual))
            });
            if let Some((aggregate, expected, actual)) = moved {
                outcomes.push(Outcome::Retry { aggregate, expected, actual });
                tainted.extend(touches());
                continue;
            }
            for a in &m.appends {
                let head = heads.entry(a.aggregate_id.clone()).or_insert((0, GENESIS.to_string()));
                for e in &a.events {
                    let mut r = Recorded {
                        seq: 0,
                        aggregate_id: a.aggregate_id.clone(),
                        aggregate_type: a.aggregate_type.to_string(),
                        version: head.0 + 1,
                        event_id: e.event_id.clone(),
                        event_type: e.event_type.clone(),
                        payload: e.payload.clone(),
                        correlation_id: e.correlation_id.clone(),
                        causation_id: e.causation_id.clone(),
                        recorded_at_ms: now_ms,
                        prev_hash: head.1.clone(),
                        hash: String::new(),
                    };
                    r.hash = chain_hash(&head.1, &r);
                    *head = (r.version, r.hash.clone());
                    rows.push((i, r));
                }
            }
            if let Some(k) = &m.idem {
                stored.insert(k.key.clone(), k.clone());
                idems.push(k);
            }
            outcomes.push(Outcome::Committed(Vec::new()));
        }
        let seqs = self.insert_events(&mut tx, rows.iter().map(|(_, r)| r)).await?;
        if publish {
            let traced = rows.iter().map(|(i, r)| (r, members[*i].traceparent.as_deref()));
            self.insert_outbox(&mut tx, traced, now_ms).await?;
        }
        for k in idems {
            sqlx::query("INSERT INTO idempotency (idem_key, request_hash, status, response, created_at) VALUES ($1, $2, $3, $4, $5)")
                .bind(k.key.clone())
                .bind(k.request_hash.clone())
                .bind(i64::from(k.status))
                .bind(k.response.clone())
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        for (i, mut r) in rows {
            r.seq = seqs.get(&r.event_id).copied().unwrap_or_default();
            if let Outcome::Committed(list) = &mut outcomes[i] {
                list.push(r);
            }
        }
        Ok(outcomes)
    }

    /// The stored head (version, hash) of every aggregate the batch touches.
    async fn heads(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        members: &[Member],
    ) -> Result<std::collections::HashMap<String, (u64, String)>, StoreError> {
        let mut ids: Vec<&str> =
            members.iter().flat_map(|m| m.appends.iter().map(|a| a.aggregate_id.as_str())).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut heads = std::collections::HashMap::new();
        // One indexed probe per aggregate (its last version), not a scan of its history.
        for chunk in ids.chunks(200) {
            let sql = (1..=chunk.len())
                .map(|i| {
                    let p = placeholders(self.backend, i, 1);
                    format!("SELECT * FROM (SELECT aggregate_id, version, hash FROM events WHERE aggregate_id = {p} ORDER BY version DESC LIMIT 1) AS h{i}")
                })
                .collect::<Vec<_>>()
                .join(" UNION ALL ");
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in chunk {
                q = q.bind(id.to_string());
            }
            for r in q.fetch_all(&mut **tx).await? {
                heads.insert(
                    r.try_get::<String, _>("aggregate_id")?,
                    (r.try_get::<i64, _>("version")? as u64, r.try_get::<String, _>("hash")?),
                );
            }
        }
        Ok(heads)
    }

    /// The stored answers to the batch's idempotency keys.
    async fn idempotent_in(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        members: &[Member],
    ) -> Result<std::collections::HashMap<String, Idempotent>, StoreError> {
        let keys: Vec<&str> =
            members.iter().filter_map(|m| m.idem.as_ref().map(|i| i.key.as_str())).collect();
        let mut found = std::collections::HashMap::new();
        for chunk in keys.chunks(CHUNK) {
            let sql = format!(
                "SELECT idem_key, request_hash, status, response FROM idempotency WHERE idem_key IN ({})",
                placeholders(self.backend, 1, chunk.len())
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for k in chunk {
                q = q.bind(k.to_string());
            }
            for r in q.fetch_all(&mut **tx).await? {
                let i = row_to_idempotent(&r)?;
                found.insert(i.key.clone(), i);
            }
        }
        Ok(found)
    }

    /// Inserts events in multi-row statements; returns each event's sequence number by id.
    async fn insert_events<'r>(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        rows: impl Iterator<Item = &'r Recorded>,
    ) -> Result<std::collections::HashMap<String, i64>, StoreError> {
        let rows: Vec<&Recorded> = rows.collect();
        let mut seqs = std::collections::HashMap::with_capacity(rows.len());
        for chunk in rows.chunks(CHUNK / 11) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| format!("({})", placeholders(self.backend, i * 11 + 1, 11)))
                .collect();
            let sql = format!(
                "INSERT INTO events (aggregate_id, aggregate_type, version, event_id, event_type, payload, correlation_id, causation_id, recorded_at, prev_hash, hash) VALUES {} RETURNING seq, event_id",
                values.join(", ")
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                q = q
                    .bind(r.aggregate_id.clone())
                    .bind(r.aggregate_type.clone())
                    .bind(r.version as i64)
                    .bind(r.event_id.clone())
                    .bind(r.event_type.clone())
                    .bind(r.payload.clone())
                    .bind(r.correlation_id.clone())
                    .bind(r.causation_id.clone())
                    .bind(r.recorded_at_ms)
                    .bind(r.prev_hash.clone())
                    .bind(r.hash.clone());
            }
            for row in q.fetch_all(&mut **tx).await? {
                seqs.insert(row.try_get::<String, _>("event_id")?, row.try_get::<i64, _>("seq")?);
            }
        }
        Ok(seqs)
    }

    /// The outbox rows of committed events: topic `<aggregate type>-events`, keyed by the
    /// entity's own id (`market-<id>` → `<id>`), so consumers can name it in paths (cache
    /// invalidation: `/markets/{key}`).
    async fn insert_outbox<'r>(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        rows: impl Iterator<Item = (&'r Recorded, Option<&'r str>)>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let rows: Vec<_> = rows.collect();
        for chunk in rows.chunks(CHUNK / 7) {
            let values: Vec<String> =
                (0..chunk.len()).map(|i| format!("({})", placeholders(self.backend, i * 7 + 1, 7))).collect();
            let sql = format!(
                "INSERT INTO outbox (event_id, topic, msg_key, event_type, payload, created_at, traceparent) VALUES {}",
                values.join(", ")
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (r, traceparent) in chunk {
                let prefix = format!("{}-", r.aggregate_type);
                q = q
                    .bind(r.event_id.clone())
                    .bind(format!("{}-events", r.aggregate_type))
                    .bind(r.aggregate_id.strip_prefix(&prefix).unwrap_or(&r.aggregate_id).to_string())
                    .bind(r.event_type.clone())
                    .bind(r.payload.clone())
                    .bind(now_ms)
                    .bind(traceparent.map(str::to_string));
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// The stored answer to an idempotency key.
    pub async fn idempotent(&self, key: &str) -> Result<Option<Idempotent>, StoreError> {
        let row = sqlx::query(
            "SELECT idem_key, request_hash, status, response FROM idempotency WHERE idem_key = $1",
        )
        .bind(key.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(row_to_idempotent).transpose()
    }

    /// The aggregate's latest snapshot (version, state JSON) and the events after it.
    pub async fn load(
        &self,
        aggregate_id: &str,
    ) -> Result<(Option<(u64, String)>, Vec<Recorded>), StoreError> {
        let snap = sqlx::query("SELECT version, state FROM snapshots WHERE aggregate_id = $1")
            .bind(aggregate_id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .map(|r| {
                Ok::<_, StoreError>((
                    r.try_get::<i64, _>("version")? as u64,
                    r.try_get::<String, _>("state")?,
                ))
            })
            .transpose()?;
        let after = snap.as_ref().map_or(0, |(v, _)| *v) as i64;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_id = $1 AND version > $2 ORDER BY version"
        )))
        .bind(aggregate_id.to_string())
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        let events = rows.iter().map(row_to_recorded).collect::<Result<_, _>>()?;
        Ok((snap, events))
    }

    /// One event by its id.
    pub async fn event(&self, event_id: &str) -> Result<Option<Recorded>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE event_id = $1"
        )))
        .bind(event_id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(row_to_recorded).transpose()
    }

    /// Every event of one aggregate, in order.
    pub async fn stream(&self, aggregate_id: &str) -> Result<Vec<Recorded>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_id = $1 ORDER BY version"
        )))
        .bind(aggregate_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row_to_recorded).collect()
    }

    /// Events after `seq`, in commit order.
    pub async fn after(&self, seq: i64, limit: i64) -> Result<Vec<Recorded>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE seq > $1 ORDER BY seq LIMIT $2"
        )))
        .bind(seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row_to_recorded).collect()
    }

    /// Stores snapshots (aggregate, version, state), each unless a newer one is there, in one
    /// transaction.
    pub async fn save_snapshots(&self, rows: &[(String, u64, String)]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for (aggregate_id, version, state) in rows {
            sqlx::query("INSERT INTO snapshots (aggregate_id, version, state) VALUES ($1, $2, $3) ON CONFLICT (aggregate_id) DO UPDATE SET version = excluded.version, state = excluded.state WHERE excluded.version > snapshots.version")
                .bind(aggregate_id.clone())
                .bind(*version as i64)
                .bind(state.clone())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Unpublished outbox rows, oldest first.
    pub async fn outbox_pending(&self, limit: i64) -> Result<Vec<OutboxRow>, StoreError> {
        let rows = sqlx::query("SELECT id, event_id, topic, msg_key, event_type, payload, created_at, traceparent FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT $1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxRow {
                    id: r.try_get("id")?,
                    event_id: r.try_get("event_id")?,
                    topic: r.try_get("topic")?,
                    key: r.try_get("msg_key")?,
                    event_type: r.try_get("event_type")?,
                    payload: r.try_get("payload")?,
                    created_at_ms: r.try_get("created_at")?,
                    traceparent: r.try_get("traceparent")?,
                })
            })
            .collect()
    }

    pub async fn mark_published(&self, ids: &[i64], now_ms: i64) -> Result<(), StoreError> {
        for id in ids {
            sqlx::query("UPDATE outbox SET published_at = $1 WHERE id = $2")
                .bind(now_ms)
                .bind(*id)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Writes the next audit checkpoint, if the log moved since the last one: in one write
    /// transaction (so instances never write two with one number), `make` gets the last
    /// checkpoint (number, covered seq, body) and the head (aggregate, version, hash) of every
    /// aggregate that changed after it, with the seq now covered, and returns the new body; it is
    /// stored and queued in the outbox (topic `audit-checkpoints`) for the bus. Returns it.
    pub async fn write_checkpoint(
        &self,
        make: impl FnOnce(Option<(u64, i64, String)>, Vec<(String, u64, String)>, i64) -> Result<String, String>,
        now_ms: i64,
    ) -> Result<Option<(u64, String)>, StoreError> {
        let mut tx = self.begin_write().await?;
        let last = sqlx::query("SELECT number, seq, body FROM checkpoints ORDER BY number DESC LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| {
                Ok::<_, StoreError>((
                    r.try_get::<i64, _>("number")? as u64,
                    r.try_get::<i64, _>("seq")?,
                    r.try_get::<String, _>("body")?,
                ))
            })
            .transpose()?;
        let after = last.as_ref().map_or(0, |l| l.1);
        let rows = sqlx::query("SELECT e.aggregate_id, e.version, e.hash, e.seq FROM events e JOIN (SELECT aggregate_id, MAX(seq) AS s FROM events WHERE seq > $1 GROUP BY aggregate_id) m ON e.seq = m.s ORDER BY e.aggregate_id")
            .bind(after)
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut heads = Vec::with_capacity(rows.len());
        let mut covered = after;
        for r in &rows {
            covered = covered.max(r.try_get::<i64, _>("seq")?);
            heads.push((
                r.try_get::<String, _>("aggregate_id")?,
                r.try_get::<i64, _>("version")? as u64,
                r.try_get::<String, _>("hash")?,
            ));
        }
        let number = last.as_ref().map_or(1, |l| l.0 + 1);
        let body = make(last, heads, covered).map_err(StoreError::Config)?;
        sqlx::query("INSERT INTO checkpoints (number, seq, body) VALUES ($1, $2, $3)")
            .bind(number as i64)
            .bind(covered)
            .bind(body.clone())
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO outbox (event_id, topic, msg_key, event_type, payload, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(uuid::Uuid::now_v7().to_string())
            .bind("audit-checkpoints")
            .bind("checkpoint")
            .bind("AuditCheckpoint")
            .bind(body.clone())
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some((number, body)))
    }

    /// The checkpoints this database keeps (bodies, oldest first) — a copy: the bus holds the
    /// ones an insider cannot quietly remove.
    pub async fn checkpoints(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT body FROM checkpoints ORDER BY number").fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok(r.try_get::<String, _>("body")?)).collect()
    }

    /// Every aggregate with an event at or before `seq`.
    pub async fn aggregates_through(&self, seq: i64) -> Result<Vec<String>, StoreError> {
        let rows =
            sqlx::query("SELECT DISTINCT aggregate_id FROM events WHERE seq <= $1 ORDER BY aggregate_id")
                .bind(seq)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(|r| Ok(r.try_get::<String, _>("aggregate_id")?)).collect()
    }

    /// The number of events after `seq`.
    pub async fn count_after(&self, seq: i64) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM events WHERE seq > $1")
            .bind(seq)
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        Ok(n as u64)
    }

    /// The version an aggregate is at (0: none).
    pub async fn version(&self, aggregate_id: &str) -> Result<u64, StoreError> {
        let row =
            sqlx::query("SELECT version FROM events WHERE aggregate_id = $1 ORDER BY version DESC LIMIT 1")
                .bind(aggregate_id.to_string())
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.try_get::<i64, _>("version")).transpose()?.unwrap_or(0) as u64)
    }

    /// Runs raw SQL (tests that tamper with stored events).
    pub async fn execute_unchecked(&self, sql: String) -> Result<u64, StoreError> {
        Ok(sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&self.pool).await?.rows_affected())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Checks an aggregate's chain: each event's hash over its content and its predecessor's hash.
/// Returns the first version that does not verify.
pub fn verify_chain(events: &[Recorded]) -> Result<usize, (u64, String)> {
    let mut prev = GENESIS.to_string();
    for (i, e) in events.iter().enumerate() {
        if e.version != i as u64 + 1 {
            return Err((e.version, format!("expected version {}", i + 1)));
        }
        if e.prev_hash != prev {
            return Err((e.version, "does not link to the previous event".into()));
        }
        if chain_hash(&prev, e) != e.hash {
            return Err((e.version, "content does not match its hash: the event was modified".into()));
        }
        prev = e.hash.clone();
    }
    Ok(events.len())
}
