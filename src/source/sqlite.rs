//! SQLite: values are typed per row (storage classes), so columns decode by
//! what each value holds; the declared type adds meaning (`BOOLEAN` 0/1 as
//! booleans, `DATETIME` text as RFC 3339). `:since` binds in SQLite's own
//! text form (`YYYY-MM-DD HH:MM:SS`) for text cursors, as unix seconds for
//! integer ones.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use sqlx::sqlite::{SqliteArguments, SqliteConnectOptions, SqlitePool, SqliteRow};
use sqlx::{Column, ConnectOptions, Executor, Row, Sqlite, Statement, TypeInfo, ValueRef};

use super::placeholder::rewrite_since;
use super::row::{self, DecodeError, FetchError, RawRow, Scratch, Undecoded};
use super::Statements;
use super::{epoch_secs, ColumnDecoder, Described, Prepared, SinceBinding, BEGINNING};
use crate::change::{epoch_to_naive, parse_text_time, Value};
use crate::config::{Backend, SourceSettings};

pub(super) fn pool(
    settings: &SourceSettings,
    statements: &Arc<Statements>,
) -> Result<SqlitePool, sqlx::Error> {
    // No statement cache: SQLite re-prepares a statement silently when the
    // table under it changes, but sqlx would keep the column names it cached,
    // and a renamed column would go unnoticed. Preparing costs microseconds.
    let options = SqliteConnectOptions::from_str(&settings.url)?
        .statement_cache_capacity(0)
        .disable_statement_logging()
        .create_if_missing(false)
        .busy_timeout(Duration::from_secs(5).min(settings.timeout));
    Ok(super::pool_options(settings, statements).connect_lazy_with(options))
}

pub(super) async fn now(pool: &SqlitePool) -> Result<i64, sqlx::Error> {
    // julianday('now') is SQLite's clock with millisecond precision.
    sqlx::query_scalar(
        "SELECT CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000",
    )
    .fetch_one(pool)
    .await
}

pub(super) async fn version(pool: &SqlitePool) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT 'SQLite ' || sqlite_version()")
        .fetch_one(pool)
        .await
}

pub(super) async fn describe(pool: &SqlitePool, sql: &str) -> Result<Described, sqlx::Error> {
    let rewritten = rewrite_since(sql, Backend::Sqlite, "?1");
    let mut conn = pool.acquire().await?;
    let statement = (&mut *conn).prepare(&rewritten.sql).await?;
    let mut names = Vec::new();
    let mut types = Vec::new();
    let mut decoders = Vec::new();
    for column in statement.columns() {
        let declared = column.type_info().name().to_owned();
        names.push(column.name().to_owned());
        decoders.push(ColumnDecoder::Dynamic {
            temporal: matches!(declared.as_str(), "DATETIME" | "DATE" | "TIMESTAMP"),
            boolean: declared == "BOOLEAN",
        });
        types.push(declared);
    }
    Ok(Described {
        sql: rewritten.sql,
        since_occurrences: rewritten.occurrences,
        names,
        types,
        decoders,
        time_binding: None,
    })
}

/// Integer columns hold unix seconds; anything else is compared as text.
pub(super) fn binding_for_cursor(declared: &str) -> Option<SinceBinding> {
    match declared {
        "INTEGER" | "INT" | "BIGINT" => Some(SinceBinding::UnixSeconds),
        _ => Some(SinceBinding::SqliteText),
    }
}

/// Streams the window's rows, decoded as they are read (see [`Undecoded::Decoded`]).
pub(super) fn changes<'a>(
    pool: &'a SqlitePool,
    prepared: &'a Prepared,
    since: i64,
    tz: chrono_tz::Tz,
) -> BoxStream<'a, Result<RawRow, FetchError>> {
    let mut query = sqlx::query::<Sqlite>(&prepared.sql);
    if prepared.since_occurrences > 0 {
        query = bind(query, prepared.since, since, tz);
    }
    let mut scratch = Scratch::default();
    let mut checked = false;
    query
        .fetch(pool)
        .map(move |sqlite_row| {
            let sqlite_row = sqlite_row?;
            if !checked {
                row::check_columns(&sqlite_row, prepared)?;
                checked = true;
            }
            let change = match row::build(&sqlite_row, prepared, tz, &mut scratch, decode) {
                Ok(change) => Ok(change),
                Err(DecodeError::Row(error)) => Err(error),
                Err(DecodeError::Driver(error)) => return Err(error.into()),
            };
            Ok(RawRow {
                fingerprint: change
                    .as_ref()
                    .map_or(0, |c| row::change_fingerprint(prepared.layout, c)),
                epoch: change.as_ref().ok().map(|c| c.epoch),
                number: 0,
                row: Undecoded::Decoded(change),
            })
        })
        .boxed()
}

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>;

fn bind(
    query: SqliteQuery<'_>,
    binding: SinceBinding,
    since: i64,
    tz: chrono_tz::Tz,
) -> SqliteQuery<'_> {
    match binding {
        SinceBinding::Integer => query.bind(since),
        SinceBinding::UnixSeconds => query.bind(if since == BEGINNING {
            i64::MIN
        } else {
            epoch_secs(since)
        }),
        // Text compares as text: the empty string sorts before every time.
        _ if since == BEGINNING => query.bind(String::new()),
        _ => query.bind(
            epoch_to_naive(since, tz)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string(),
        ),
    }
}

fn decode<'r>(
    row: &'r SqliteRow,
    i: usize,
    decoder: ColumnDecoder,
    tz: chrono_tz::Tz,
) -> Result<Value<'r>, sqlx::Error> {
    let raw = row.try_get_raw(i)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let storage = raw.type_info().name().to_owned();
    let ColumnDecoder::Dynamic { temporal, boolean } = decoder else {
        return Ok(Value::Text(row.try_get_unchecked::<&str, _>(i)?.into()));
    };
    Ok(match storage.as_str() {
        "INTEGER" | "BOOLEAN" => {
            let v = row.try_get_unchecked::<i64, _>(i)?;
            if boolean && (v == 0 || v == 1) {
                Value::Bool(v == 1)
            } else {
                Value::Int(v)
            }
        }
        "REAL" => Value::Float(row.try_get_unchecked::<f64, _>(i)?),
        "BLOB" => Value::Bytes(row.try_get_unchecked::<&[u8], _>(i)?.into()),
        _ => {
            let text = row.try_get_unchecked::<&str, _>(i)?;
            match temporal.then(|| parse_text_time(text, tz)).flatten() {
                Some(epoch) if text.trim().len() > 10 => Value::Timestamp(epoch),
                Some(_) => match chrono::NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d") {
                    Ok(date) => Value::Date(date),
                    Err(_) => Value::Text(text.into()),
                },
                None => Value::Text(text.into()),
            }
        }
    })
}
