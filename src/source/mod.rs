//! The databases highwater polls: PostgreSQL, MySQL/MariaDB and SQLite.
//!
//! A [`Source`] promises three things: the database's own clock
//! ([`Source::now`]), a [`Prepared`] query per entity whose columns were
//! checked once (key, cursor, types), and the window's rows streamed one at a
//! time, never all in memory: each as a fingerprinted [`RawRow`], decoded
//! into a [`Change`] only when the agent does not know it already. Each
//! backend decodes its own types (sqlx's `Any` driver cannot decode
//! timestamps, numerics, UUIDs or JSON); types highwater does not know are
//! sent as their text form.

mod mysql;
pub mod placeholder;
mod postgres;
mod row;
mod sqlite;
pub mod transactions;

pub use row::{RawRow, Scratch};
pub use transactions::{Clock, Hidden, OpenTransaction, Sessions};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};

use crate::change::{Change, RowError, RowShape};
use crate::config::{mask_url, Backend, CursorKind, EntitySettings, SourceSettings};
use row::{DecodeError, FetchError};

/// An error from a source, with the source and entity it concerns.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source {source_name} ({url}): invalid connection URL")]
    Url {
        source_name: String,
        url: String,
        #[source]
        error: sqlx::Error,
    },
    #[error("source {source_name} ({url}): cannot connect")]
    Connect {
        source_name: String,
        url: String,
        #[source]
        error: sqlx::Error,
    },
    #[error("entity {entity}: query ({origin}) failed on source {source_name}")]
    Query {
        entity: String,
        source_name: String,
        origin: String,
        #[source]
        error: sqlx::Error,
    },
    #[error("entity {entity}: query ({origin}): {message}")]
    Shape {
        entity: String,
        origin: String,
        message: String,
    },
    #[error("entity {entity}: row {row} of the window: {error}")]
    Row {
        entity: String,
        row: u64,
        #[source]
        error: RowError,
    },
    #[error("entity {entity}: query ({origin}) now returns other columns than when it was prepared ({columns}): the table changed; preparing it again")]
    ColumnsChanged {
        entity: String,
        origin: String,
        columns: String,
    },
    #[error("source {source_name}: no answer within {}", humantime::format_duration(*.timeout))]
    Timeout {
        source_name: String,
        timeout: Duration,
    },
}

impl SourceError {
    /// Worth retrying unchanged (the network, the server, a lock), as
    /// opposed to needing a fix in the config, the query or the data.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Url { .. } | SourceError::Shape { .. } | SourceError::Row { .. } => false,
            SourceError::Timeout { .. } | SourceError::ColumnsChanged { .. } => true,
            SourceError::Connect { error, .. } | SourceError::Query { error, .. } => {
                is_transient_sqlx(error)
            }
        }
    }
}

fn is_transient_sqlx(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // The retry runs on connections opened after the change (see
        // `Statements`), so it describes and prepares the query afresh.
        error if is_stale_statement(error) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                // Connection exceptions, shutdown, serialization, deadlock, resources, cancel.
                Some(_) => {
                    code.starts_with("08")
                        || code.starts_with("53")
                        || code.starts_with("57")
                        || code == "40001"
                        || code == "40P01"
                }
                None => {
                    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
                        // Too many connections, shutdown, lock wait, deadlock, gone away.
                        matches!(my.number(), 1040 | 1053 | 1205 | 1213 | 2006 | 2013 | 1927)
                    } else {
                        // SQLite: BUSY, LOCKED.
                        matches!(code.as_ref(), "5" | "6" | "517" | "262")
                    }
                }
            }
        }
        _ => false,
    }
}

/// A prepared statement the server refuses because the tables under it
/// changed: PostgreSQL's "cached plan must not change result type" (a column
/// added, renamed or retyped under `SELECT *`), MySQL's "needs to be
/// re-prepared".
fn is_stale_statement(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else {
        return false;
    };
    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return my.number() == 1615;
    }
    // 0A000 is "feature not supported" in general: the routine that raised
    // it (not translated, unlike the message) tells this case apart.
    db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some_and(|pg| pg.code() == "0A000" && pg.routine() == Some("RevalidateCachedQuery"))
}

/// The generation of a source's prepared statements. Each pooled connection
/// caches the statements it prepared, with the columns they returned then;
/// after a schema change the server refuses them, and sqlx would go on
/// describing the query from that cache. Marking the statements stale makes
/// the pool close every connection opened before, instead of lending it out.
#[derive(Debug, Default)]
pub(crate) struct Statements {
    stale_since: Mutex<Option<Instant>>,
}

impl Statements {
    fn mark_stale(&self) {
        *self.stale_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// May a connection opened `age` ago be lent out?
    fn is_current(&self, age: Duration) -> bool {
        match *self.stale_since.lock().unwrap_or_else(|e| e.into_inner()) {
            None => true,
            Some(stale) => Instant::now()
                .checked_sub(age)
                .is_some_and(|opened| opened > stale),
        }
    }
}

/// Pool settings every backend shares: lazy, bounded, and never lending a
/// connection whose statements went stale.
pub(crate) fn pool_options<DB: sqlx::Database>(
    settings: &SourceSettings,
    statements: &Arc<Statements>,
) -> sqlx::pool::PoolOptions<DB> {
    let statements = Arc::clone(statements);
    sqlx::pool::PoolOptions::new()
        .max_connections(settings.max_connections)
        .min_connections(0)
        .acquire_timeout(settings.timeout)
        .before_acquire(move |_, meta| {
            let current = statements.is_current(meta.age);
            Box::pin(async move { Ok(current) })
        })
}

/// How the `:since` value is bound: decided once per entity from what the
/// query compares it with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinceBinding {
    /// A UTC timestamp (`timestamptz`, MySQL `TIMESTAMP`).
    Utc,
    /// A naive timestamp in the source's time zone (`timestamp`, `DATETIME`).
    Naive,
    /// A date in the source's time zone (floor of the epoch).
    Date,
    /// Unix seconds (an integer column holding times).
    UnixSeconds,
    /// The integer itself (version cursors).
    Integer,
    /// SQLite's text form `YYYY-MM-DD HH:MM:SS` in the source's time zone.
    SqliteText,
    /// PostgreSQL text parameter: the timestamp as text.
    Text,
}

/// An entity's query, checked against the database: rewritten SQL, how its
/// columns decode and which of them are key and cursor.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub entity: String,
    pub origin: String,
    /// The SQL sent to the server (placeholders rewritten, maybe wrapped).
    pub sql: String,
    /// How many placeholders to bind (MySQL binds `?` once per occurrence).
    pub since_occurrences: usize,
    pub since: SinceBinding,
    pub shape: RowShape,
    /// One decoder per column, meaning depends on the backend.
    pub(crate) columns: Vec<ColumnDecoder>,
    /// Column type names as the database reported them (for `check`).
    pub column_types: Vec<String>,
    /// Identifies how this query's rows turn into changes (SQL, columns,
    /// types, decoders, key, cursor, payload options, time zone): it seeds
    /// the rows' fingerprints, so a fingerprint taken under another layout
    /// (a table altered, a config changed) never matches.
    pub layout: u64,
}

/// How one column decodes into a [`crate::change::Value`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ColumnDecoder {
    Null,
    Bool,
    /// MySQL `TINYINT(1)`: 0 and 1 as booleans, anything else as a number.
    TinyBool,
    Int,
    UInt,
    Float32,
    Float64,
    Decimal,
    Text,
    /// Binary strings: text when valid UTF-8 (MySQL flags `_bin` collations binary too), else base64.
    BytesOrText,
    Bytes,
    Json,
    Jsonb,
    Utc,
    Naive,
    Date,
    Uuid,
    /// MySQL `TIME` (may exceed 24 h or be negative), sent as text.
    MySqlTime,
    /// MySQL `BIT(n)`, sent as a number.
    Bit,
    /// SQLite: whatever the value's storage class says.
    Dynamic {
        temporal: bool,
        boolean: bool,
    },
}

/// A source's connection pool, by backend (for `check`, which runs its own
/// diagnostic SQL: `EXPLAIN`, open transactions).
pub enum Pool {
    Postgres(sqlx::PgPool),
    MySql(sqlx::MySqlPool),
    Sqlite(sqlx::SqlitePool),
}

/// A configured database, with a lazily connecting pool.
pub struct Source {
    pub name: String,
    pub backend: Backend,
    masked_url: String,
    pool: Pool,
    statements: Arc<Statements>,
    /// Whether the server shows other sessions' transactions.
    visibility: transactions::Visibility,
    timezone: chrono_tz::Tz,
    timeout: Duration,
}

/// The earliest epoch: `start = "beginning"` binds the backend's minimum.
pub const BEGINNING: i64 = i64::MIN;

impl Source {
    /// Builds the pool without connecting: a database that is down at start
    /// is retried by the cycles, not fatal.
    pub fn new(settings: &SourceSettings) -> Result<Source, SourceError> {
        let masked_url = mask_url(&settings.url);
        let url_error = |error| SourceError::Url {
            source_name: settings.name.clone(),
            url: masked_url.clone(),
            error,
        };
        let statements = Arc::new(Statements::default());
        let pool = match settings.backend {
            Backend::Postgres => {
                Pool::Postgres(postgres::pool(settings, &statements).map_err(url_error)?)
            }
            Backend::MySql => Pool::MySql(mysql::pool(settings, &statements).map_err(url_error)?),
            Backend::Sqlite => {
                Pool::Sqlite(sqlite::pool(settings, &statements).map_err(url_error)?)
            }
        };
        Ok(Source {
            name: settings.name.clone(),
            backend: settings.backend,
            masked_url,
            pool,
            statements,
            visibility: transactions::Visibility::default(),
            timezone: settings.timezone,
            timeout: settings.timeout,
        })
    }

    /// The URL with the password masked.
    pub fn masked_url(&self) -> &str {
        &self.masked_url
    }

    /// The connection pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// How long a connect or an answer may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// When the pool holds no connection (at start, after an outage), one
    /// direct connection attempt: a refused connection or a bad password is
    /// then reported at once and as itself, where the pool would retry until
    /// its timeout and report only "pool timed out".
    async fn probe(&self) -> Result<(), SourceError> {
        let result = match &self.pool {
            Pool::Postgres(pool) => self.timed(probe_pool(pool)).await,
            Pool::MySql(pool) => self.timed(probe_pool(pool)).await,
            Pool::Sqlite(pool) => self.timed(probe_pool(pool)).await,
        }?;
        result.map_err(|error| self.connect_error(error))
    }

    /// The database's own clock, microseconds since 1970 UTC.
    pub async fn now(&self) -> Result<i64, SourceError> {
        self.probe().await?;
        let result = match &self.pool {
            Pool::Postgres(pool) => self.timed(postgres::now(pool)).await,
            Pool::MySql(pool) => self.timed(mysql::now(pool)).await,
            Pool::Sqlite(pool) => self.timed(sqlite::now(pool)).await,
        }?;
        result.map_err(|error| self.connect_error(error))
    }

    /// The database's clock and, with `sessions`, the oldest open
    /// transaction of another session, read in the same statement (see
    /// [`transactions`]). Where the server does not show other sessions (a
    /// missing grant, a standby, SQLite) the clock comes alone, and why is
    /// logged once.
    pub async fn clock(&self, sessions: bool) -> Result<Clock, SourceError> {
        let unseen = |now| Clock {
            now,
            sessions: Sessions::Unseen,
        };
        if !sessions || self.backend == Backend::Sqlite || !self.visibility.worth_asking() {
            return Ok(unseen(self.now().await?));
        }
        self.probe().await?;
        let read = match &self.pool {
            Pool::Postgres(pool) => self.timed(postgres::clock(pool)).await?,
            Pool::MySql(pool) => match self.timed(mysql::clock(pool)).await? {
                Ok((now, oldest)) => Ok((now, Ok(oldest))),
                Err(error) if mysql::is_missing_process_grant(&error) => {
                    match self.timed(mysql::clock_and_account(pool)).await? {
                        Ok((now, account)) => Ok((now, Err(Hidden {
                            reason: format!("{account} lacks the PROCESS privilege: GRANT PROCESS ON *.* TO {account}"),
                        }))),
                        Err(error) => Err(error),
                    }
                }
                Err(error) => Err(error),
            },
            Pool::Sqlite(_) => return Ok(unseen(self.now().await?)),
        };
        match read.map_err(|error| self.connect_error(error))? {
            (now, Ok(oldest)) => {
                if self.visibility.seen() {
                    tracing::info!(source = %self.name, "open transactions of other sessions are visible now: windows reach back to them again");
                }
                Ok(Clock {
                    now,
                    sessions: Sessions::Seen(oldest),
                })
            }
            (now, Err(hidden)) => {
                if let Some(hidden) = self.visibility.hidden(hidden) {
                    tracing::warn!(
                        source = %self.name,
                        reason = %hidden.reason,
                        "open transactions of other sessions are not visible: windows keep their fixed lookback, and a write transaction longer than lookback can be missed"
                    );
                }
                Ok(unseen(now))
            }
        }
    }

    /// Why this source does not show other sessions' transactions, as the
    /// last [`Source::clock`] found (`None`: it does, or was not asked).
    pub fn sessions_hidden(&self) -> Option<Hidden> {
        self.visibility.reason()
    }

    /// The server's version string.
    pub async fn server_version(&self) -> Result<String, SourceError> {
        self.probe().await?;
        let result = match &self.pool {
            Pool::Postgres(pool) => self.timed(postgres::version(pool)).await,
            Pool::MySql(pool) => self.timed(mysql::version(pool)).await,
            Pool::Sqlite(pool) => self.timed(sqlite::version(pool)).await,
        }?;
        result.map_err(|error| self.connect_error(error))
    }

    /// Checks an entity's query against the database: the placeholders, the
    /// key and cursor columns, how each column decodes and how `:since` binds.
    pub async fn prepare(&self, entity: &EntitySettings) -> Result<Prepared, SourceError> {
        self.probe().await?;
        let sql = entity
            .query
            .trim()
            .trim_end_matches(';')
            .trim_end()
            .to_owned();
        let query_error = |error| SourceError::Query {
            entity: entity.name.clone(),
            source_name: self.name.clone(),
            origin: entity.query_origin.clone(),
            error,
        };
        let described = match &self.pool {
            Pool::Postgres(pool) => self.timed(postgres::describe(pool, &sql)).await,
            Pool::MySql(pool) => self.timed(mysql::describe(pool, &sql)).await,
            Pool::Sqlite(pool) => self.timed(sqlite::describe(pool, &sql)).await,
        }?
        .map_err(query_error)?;

        let shape_error = |message: String| SourceError::Shape {
            entity: entity.name.clone(),
            origin: entity.query_origin.clone(),
            message,
        };
        let shape = RowShape::new(
            described.names.clone(),
            &entity.key,
            &entity.cursor,
            entity.delete_column.as_deref(),
            entity.cursor_kind,
            self.timezone,
            entity.payload,
        )
        .and_then(|shape| shape.with_json_columns(&entity.json_columns))
        .map_err(shape_error)?;
        let cursor = shape.cursor_index();
        let since = match entity.cursor_kind {
            CursorKind::Version => SinceBinding::Integer,
            CursorKind::Time => described
                .time_binding
                .or_else(|| {
                    let cursor_type = described.types[cursor].as_str();
                    match self.backend {
                        Backend::Postgres => postgres::binding_for(cursor_type),
                        Backend::MySql => mysql::binding_for_cursor(cursor_type),
                        Backend::Sqlite => sqlite::binding_for_cursor(cursor_type),
                    }
                })
                .ok_or_else(|| {
                shape_error(format!(
                    "cannot bind :since for cursor {:?} of type {}: use a timestamp, datetime or date column, or an integer one with an integer lookback",
                    entity.cursor, described.types[cursor]
                ))
            })?,
        };
        if entity.cursor_kind == CursorKind::Version
            && !matches!(
                described.decoders[cursor],
                ColumnDecoder::Int
                    | ColumnDecoder::UInt
                    | ColumnDecoder::Decimal
                    | ColumnDecoder::Dynamic { .. }
            )
        {
            return Err(shape_error(format!(
                "cursor {:?} is of type {}, but an integer lookback needs an integer version column",
                entity.cursor, described.types[cursor]
            )));
        }
        let layout = xxhash_rust::xxh3::xxh3_64(
            format!(
                "{:?}|{:?}|{:?}|{:?}|{:?}",
                described.sql, described.types, described.decoders, shape, self.timezone
            )
            .as_bytes(),
        );
        Ok(Prepared {
            layout,
            entity: entity.name.clone(),
            origin: entity.query_origin.clone(),
            // Marked, so that other agents' clock reads tell it from a writer.
            sql: format!("{} {}", transactions::WINDOW_MARKER, described.sql),
            since_occurrences: described.since_occurrences,
            since,
            shape,
            columns: described.decoders,
            column_types: described.types,
        })
    }

    /// The window the database is asked for when the agent means `since`:
    /// the epoch of the value actually bound, in the precision the
    /// parameter carries (see [`bound_epoch`]). Rows are checked against
    /// this, not `since`, and the dedup state is trimmed below it: a row the
    /// query rightly returns is never "below the window".
    pub fn bound_since(&self, prepared: &Prepared, since: i64) -> i64 {
        bound_epoch(prepared.since, self.backend, self.timezone, since)
    }

    /// Streams the window's rows, fingerprinted but not decoded. `since` is
    /// the window's start epoch ([`BEGINNING`] for everything), as
    /// [`Source::bound_since`] gave it. Each wait for
    /// the next row is bounded by the source's timeout.
    pub fn changes<'a>(
        &'a self,
        prepared: &'a Prepared,
        since: i64,
    ) -> BoxStream<'a, Result<RawRow, SourceError>> {
        let rows = match &self.pool {
            Pool::Postgres(pool) => postgres::changes(pool, prepared, since, self.timezone),
            Pool::MySql(pool) => mysql::changes(pool, prepared, since, self.timezone),
            Pool::Sqlite(pool) => sqlite::changes(pool, prepared, since, self.timezone),
        };
        let timeout = self.timeout;
        // Each wait is bounded; after a timeout or an error the stream ends.
        let stream = futures_util::stream::unfold(Some((rows, 0u64)), move |state| async move {
            let (mut rows, number) = state?;
            // Most rows are already buffered: take them without arming a
            // timer (a clock read and a timer entry per row); only a real
            // wait for the database is bounded.
            let next = match rows.next().now_or_never() {
                Some(next) => Ok(next),
                None => tokio::time::timeout(timeout, rows.next()).await,
            };
            let item = match next {
                Err(_) => Err(SourceError::Timeout {
                    source_name: self.name.clone(),
                    timeout,
                }),
                Ok(None) => return None,
                Ok(Some(Err(FetchError::Driver(error)))) => {
                    if is_stale_statement(&error) {
                        self.statements.mark_stale();
                    }
                    Err(self.query_error(prepared, error))
                }
                Ok(Some(Err(FetchError::ColumnsChanged(columns)))) => {
                    // sqlx would describe the query from its statement cache again.
                    self.statements.mark_stale();
                    Err(SourceError::ColumnsChanged {
                        entity: prepared.entity.clone(),
                        origin: prepared.origin.clone(),
                        columns,
                    })
                }
                Ok(Some(Ok(row))) => Ok(RawRow {
                    number: number + 1,
                    ..row
                }),
            };
            let next = if item.is_ok() {
                Some((rows, number + 1))
            } else {
                None
            };
            Some((item, next))
        });
        Box::pin(stream)
    }

    /// Decodes a row of [`Source::changes`] into its change.
    pub fn decode(
        &self,
        prepared: &Prepared,
        row: RawRow,
        scratch: &mut Scratch,
    ) -> Result<Change, SourceError> {
        let number = row.number;
        row.decode(prepared, self.timezone, scratch)
            .map_err(|error| match error {
                DecodeError::Driver(error) => self.query_error(prepared, error),
                DecodeError::Row(error) => SourceError::Row {
                    entity: prepared.entity.clone(),
                    row: number,
                    error,
                },
            })
    }

    fn query_error(&self, prepared: &Prepared, error: sqlx::Error) -> SourceError {
        SourceError::Query {
            entity: prepared.entity.clone(),
            source_name: self.name.clone(),
            origin: prepared.origin.clone(),
            error,
        }
    }

    async fn timed<T>(&self, work: impl std::future::Future<Output = T>) -> Result<T, SourceError> {
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| SourceError::Timeout {
                source_name: self.name.clone(),
                timeout: self.timeout,
            })
    }

    fn connect_error(&self, error: sqlx::Error) -> SourceError {
        SourceError::Connect {
            source_name: self.name.clone(),
            url: self.masked_url.clone(),
            error,
        }
    }

    /// Closes the pool's connections.
    pub async fn close(&self) {
        match &self.pool {
            Pool::Postgres(pool) => pool.close().await,
            Pool::MySql(pool) => pool.close().await,
            Pool::Sqlite(pool) => pool.close().await,
        }
    }
}

async fn probe_pool<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) -> Result<(), sqlx::Error> {
    use sqlx::{ConnectOptions, Connection};
    if pool.size() > 0 {
        return Ok(());
    }
    pool.connect_options().connect().await?.close().await
}

/// What a backend learned from preparing a query.
pub(crate) struct Described {
    /// The SQL to run (rewritten, maybe wrapped to cast unknown types to text).
    sql: String,
    since_occurrences: usize,
    names: Vec<String>,
    types: Vec<String>,
    decoders: Vec<ColumnDecoder>,
    /// How a time cursor's `:since` binds, if the parameter's type told;
    /// else the cursor column's type decides.
    time_binding: Option<SinceBinding>,
}

const SECOND_US: i64 = 1_000_000;

/// The epoch of the `:since` value a backend binds for `since`, never after
/// it. Where the parameter is coarser than the agent's microseconds the
/// value is floored:
///
/// - SQLite text (`YYYY-MM-DD HH:MM:SS`) and unix seconds: to the second;
/// - dates: to midnight in the source's time zone;
/// - MySQL/MariaDB times: to the second. A `DATETIME`/`TIMESTAMP` column of
///   lower precision than a fractional parameter compares differently
///   across versions and column types; whole seconds compare exactly on all.
///
/// Naive times go through the time zone and back, so that in the hour
/// repeated when clocks go back the bound is the instant a row stamped with
/// that wall-clock time reads as. PostgreSQL times and version cursors
/// bind exactly. (In a zone whose clocks jump over midnight, a date's bound
/// can read back as the day before: the window is a day wider and its
/// extra rows are counted as below it, never lost nor sent twice.)
pub(crate) fn bound_epoch(
    binding: SinceBinding,
    backend: Backend,
    tz: chrono_tz::Tz,
    since: i64,
) -> i64 {
    use crate::change::{epoch_to_naive, naive_to_epoch};
    use chrono::Timelike;
    if since == BEGINNING {
        return since;
    }
    let whole_seconds = |epoch: i64| epoch.div_euclid(SECOND_US).saturating_mul(SECOND_US);
    let naive = |floor: fn(chrono::NaiveDateTime) -> chrono::NaiveDateTime| {
        naive_to_epoch(floor(epoch_to_naive(since, tz)), tz)
    };
    let to_second = |t: chrono::NaiveDateTime| t.with_nanosecond(0).unwrap_or(t);
    let bound = match (binding, backend) {
        (SinceBinding::Integer, _) => since,
        (SinceBinding::Utc, Backend::Postgres) => since,
        (SinceBinding::Naive | SinceBinding::Text, Backend::Postgres) => naive(|t| t),
        (SinceBinding::UnixSeconds, _) | (SinceBinding::Utc, _) => whole_seconds(since),
        (SinceBinding::Naive | SinceBinding::Text | SinceBinding::SqliteText, _) => {
            naive(to_second)
        }
        (SinceBinding::Date, _) => naive(|t| t.date().and_time(chrono::NaiveTime::MIN)),
    };
    bound.min(since)
}

/// Floor of an epoch for a bind in whole seconds.
pub(crate) fn epoch_secs(epoch: i64) -> i64 {
    epoch.div_euclid(1_000_000)
}

/// A float read from a 4-byte column, as the shortest decimal that reads back
/// the same (0.1f32 is "0.1", not 0.10000000149011612).
pub(crate) fn widen_f32(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// Bytes as text when they are UTF-8, else as bytes (base64 in JSON).
pub(crate) fn bytes_or_text(bytes: &[u8]) -> crate::change::Value<'_> {
    match std::str::from_utf8(bytes) {
        Ok(s) => crate::change::Value::Text(s.into()),
        Err(_) => crate::change::Value::Bytes(bytes.into()),
    }
}
