//! MySQL and MariaDB. The session runs in UTC (`TIMESTAMP` columns arrive
//! as UTC); `DATETIME` columns are read in the source's time zone. Spatial
//! columns are wrapped in `ST_AsText`; `ENUM`, `SET`, `DECIMAL`, `TIME`
//! go out as text, `YEAR` and `BIT` as numbers.

use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use sqlx::mysql::{MySqlArguments, MySqlConnectOptions, MySqlPool, MySqlRow};
use sqlx::{Column, ConnectOptions, Executor, MySql, Row, Statement, TypeInfo, ValueRef};

use super::placeholder::rewrite_since;
use super::row::{self, FetchError, RawRow, Undecoded};
use super::transactions::OpenTransaction;
use super::Statements;
use super::{
    bytes_or_text, epoch_secs, widen_f32, ColumnDecoder, Described, Prepared, SinceBinding,
    BEGINNING,
};
use crate::change::{epoch_to_naive, naive_to_epoch, Value};
use crate::config::{Backend, SourceSettings};

/// The earliest time bound for `start = "beginning"`: MySQL's `1000-01-01`.
const FLOOR_US: i64 = -30_610_224_000_000_000;

pub(super) fn pool(
    settings: &SourceSettings,
    statements: &Arc<Statements>,
) -> Result<MySqlPool, sqlx::Error> {
    let url = settings.url.replacen("mariadb://", "mysql://", 1);
    // Keep the server's own SQL mode: sqlx would add PIPES_AS_CONCAT, which
    // changes what `||` means in the user's query.
    let options = MySqlConnectOptions::from_str(&url)?
        .disable_statement_logging()
        .pipes_as_concat(false)
        .no_engine_substitution(false)
        .timezone(Some("+00:00".to_owned()));
    Ok(super::pool_options(settings, statements).connect_lazy_with(options))
}

pub(super) async fn now(pool: &MySqlPool) -> Result<i64, sqlx::Error> {
    let now: NaiveDateTime = sqlx::query_scalar("SELECT UTC_TIMESTAMP(6)")
        .fetch_one(pool)
        .await?;
    Ok(now.and_utc().timestamp_micros())
}

/// The clock and, in the same statement, the oldest of: a transaction of
/// another session that modified rows (from its start; `trx_started` is in
/// the server's system time zone, whole seconds), a running statement of
/// another session (from its start, whole seconds, rounded down), the
/// agent's own window queries aside. Fails with "access denied" (1227)
/// without the `PROCESS` privilege.
pub(super) async fn clock(pool: &MySqlPool) -> Result<(i64, Option<OpenTransaction>), sqlx::Error> {
    let (now, age, thread, user): (NaiveDateTime, Option<i64>, Option<i64>, Option<String>) =
        sqlx::query_as(&format!(
            "SELECT UTC_TIMESTAMP(6), o.age_us, o.id, o.user
             FROM (SELECT 1 AS one) AS one
             LEFT JOIN (
                 SELECT p.ID AS id, p.USER AS user,
                        GREATEST(
                            IF(t.trx_rows_modified > 0,
                               TIMESTAMPDIFF(MICROSECOND, t.trx_started,
                                             CONVERT_TZ(UTC_TIMESTAMP(6), '+00:00', 'SYSTEM')),
                               0),
                            IF(p.COMMAND = 'Query' AND COALESCE(p.INFO, '') NOT LIKE '{}%',
                               (p.TIME + 1) * 1000000, 0)) AS age_us
                 FROM information_schema.PROCESSLIST AS p
                 LEFT JOIN information_schema.INNODB_TRX AS t ON t.trx_mysql_thread_id = p.ID
                 WHERE p.ID <> CONNECTION_ID()
                 ORDER BY age_us DESC LIMIT 1
             ) AS o ON o.age_us > 0",
            super::transactions::WINDOW_MARKER
        ))
        .fetch_one(pool)
        .await?;
    let now = now.and_utc().timestamp_micros();
    let oldest = age.map(|age| OpenTransaction {
        since: now.saturating_sub(age.max(0)),
        who: format!("thread {}", thread.unwrap_or_default()),
        user: user.unwrap_or_default(),
    });
    Ok((now, oldest))
}

/// The clock, with the account the agent runs as (for a missing grant).
pub(super) async fn clock_and_account(pool: &MySqlPool) -> Result<(i64, String), sqlx::Error> {
    let (now, account): (NaiveDateTime, String) =
        sqlx::query_as("SELECT UTC_TIMESTAMP(6), CURRENT_USER()")
            .fetch_one(pool)
            .await?;
    // `user@host` as a GRANT names it: 'user'@'host'.
    let account = match account.rsplit_once('@') {
        Some((user, host)) => format!("'{user}'@'{host}'"),
        None => account,
    };
    Ok((now.and_utc().timestamp_micros(), account))
}

/// The refusal of a query that needs the `PROCESS` privilege.
pub(super) fn is_missing_process_grant(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db)
        if db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .is_some_and(|my| my.number() == 1227))
}

pub(super) async fn version(pool: &MySqlPool) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT VERSION()").fetch_one(pool).await
}

pub(super) async fn describe(pool: &MySqlPool, sql: &str) -> Result<Described, sqlx::Error> {
    let rewritten = rewrite_since(sql, Backend::MySql, "?");
    let mut conn = pool.acquire().await?;
    let statement = (&mut *conn).prepare(&rewritten.sql).await?;

    let mut names = Vec::new();
    let mut types = Vec::new();
    let mut decoders = Vec::new();
    for column in statement.columns() {
        let type_name = column.type_info().name().to_owned();
        names.push(column.name().to_owned());
        decoders.push(decoder_for(&type_name));
        types.push(type_name);
    }

    let spatial = |t: &str| t == "GEOMETRY";
    let sql = if types.iter().any(|t| spatial(t)) {
        let list = names
            .iter()
            .zip(&types)
            .map(|(name, t)| {
                let quoted = format!("`{}`", name.replace('`', "``"));
                if spatial(t) {
                    format!("ST_AsText(q.{quoted}) AS {quoted}")
                } else {
                    format!("q.{quoted}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let wrapped = format!("SELECT {list} FROM (\n{}\n) AS q", rewritten.sql);
        (&mut *conn).prepare(&wrapped).await?;
        for (decoder, t) in decoders.iter_mut().zip(&types) {
            if spatial(t) {
                *decoder = ColumnDecoder::BytesOrText;
            }
        }
        wrapped
    } else {
        rewritten.sql
    };
    Ok(Described {
        sql,
        since_occurrences: rewritten.occurrences,
        names,
        types,
        decoders,
        // MySQL does not report parameter types: the cursor column's type decides.
        time_binding: None,
    })
}

/// How `:since` binds for a cursor column of this type.
pub(super) fn binding_for_cursor(type_name: &str) -> Option<SinceBinding> {
    match type_name {
        "TIMESTAMP" => Some(SinceBinding::Utc),
        // Text columns holding times compare correctly with a DATETIME parameter.
        "DATETIME" | "CHAR" | "VARCHAR" | "TEXT" => Some(SinceBinding::Naive),
        "DATE" => Some(SinceBinding::Date),
        t if t.contains("INT") => Some(SinceBinding::UnixSeconds),
        _ => None,
    }
}

fn decoder_for(type_name: &str) -> ColumnDecoder {
    match type_name {
        "NULL" => ColumnDecoder::Null,
        "BOOLEAN" => ColumnDecoder::TinyBool,
        "TINYINT" | "SMALLINT" | "MEDIUMINT" | "INT" | "BIGINT" | "YEAR" => ColumnDecoder::Int,
        t if t.ends_with(" UNSIGNED") => ColumnDecoder::UInt,
        "FLOAT" => ColumnDecoder::Float32,
        "DOUBLE" => ColumnDecoder::Float64,
        "DECIMAL" => ColumnDecoder::Decimal,
        "JSON" => ColumnDecoder::Json,
        "DATE" => ColumnDecoder::Date,
        "DATETIME" => ColumnDecoder::Naive,
        "TIMESTAMP" => ColumnDecoder::Utc,
        "TIME" => ColumnDecoder::MySqlTime,
        "BIT" => ColumnDecoder::Bit,
        "BINARY" | "VARBINARY" | "TINYBLOB" | "BLOB" | "MEDIUMBLOB" | "LONGBLOB" | "GEOMETRY" => {
            ColumnDecoder::BytesOrText
        }
        // CHAR, VARCHAR, *TEXT, ENUM, SET, and anything newer: text.
        _ => ColumnDecoder::Text,
    }
}

/// Streams the window's rows, fingerprinted from the bytes the server sent.
pub(super) fn changes<'a>(
    pool: &'a MySqlPool,
    prepared: &'a Prepared,
    since: i64,
    tz: chrono_tz::Tz,
) -> BoxStream<'a, Result<RawRow, FetchError>> {
    let mut query = sqlx::query::<MySql>(&prepared.sql);
    for _ in 0..prepared.since_occurrences {
        query = bind(query, prepared.since, since, tz);
    }
    let mut buffer = Vec::new();
    let mut checked = false;
    query
        .fetch(pool)
        .map(move |my_row| {
            let my_row = my_row?;
            if !checked {
                row::check_columns(&my_row, prepared)?;
                checked = true;
            }
            let columns = (0..prepared.columns.len()).map(|i| raw_bytes(&my_row, i));
            Ok(RawRow {
                fingerprint: row::fingerprint(prepared.layout, columns, &mut buffer),
                epoch: row::cursor_epoch(&my_row, prepared, tz, decode),
                number: 0,
                row: Undecoded::MySql(my_row),
            })
        })
        .boxed()
}

/// A column's bytes as the server sent them (binary protocol); `None` for
/// NULL and the zero dates sqlx reads as NULL.
fn raw_bytes(row: &MySqlRow, i: usize) -> Option<&[u8]> {
    if row.try_get_raw(i).ok()?.is_null() {
        return None;
    }
    row.try_get_unchecked::<&[u8], _>(i).ok()
}

type MySqlQuery<'q> = sqlx::query::Query<'q, MySql, MySqlArguments>;

fn bind(
    query: MySqlQuery<'_>,
    binding: SinceBinding,
    since: i64,
    tz: chrono_tz::Tz,
) -> MySqlQuery<'_> {
    let time = if since == BEGINNING {
        FLOOR_US
    } else {
        since.max(FLOOR_US)
    };
    match binding {
        SinceBinding::Integer => query.bind(since),
        SinceBinding::Utc => query.bind(
            DateTime::<Utc>::from_timestamp_micros(time)
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
                .naive_utc(),
        ),
        SinceBinding::Naive | SinceBinding::Text | SinceBinding::SqliteText => {
            query.bind(epoch_to_naive(time, tz))
        }
        SinceBinding::Date => query.bind(epoch_to_naive(time, tz).date()),
        SinceBinding::UnixSeconds => query.bind(if since == BEGINNING {
            i64::MIN
        } else {
            epoch_secs(since)
        }),
    }
}

pub(super) fn decode<'r>(
    row: &'r MySqlRow,
    i: usize,
    decoder: ColumnDecoder,
    tz: chrono_tz::Tz,
) -> Result<Value<'r>, sqlx::Error> {
    if row.try_get_raw(i)?.is_null() {
        return Ok(Value::Null);
    }
    Ok(match decoder {
        ColumnDecoder::Null => Value::Null,
        ColumnDecoder::TinyBool => match row.try_get_unchecked::<i64, _>(i)? {
            v @ (0 | 1) => Value::Bool(v == 1),
            v => Value::Int(v),
        },
        ColumnDecoder::Int => Value::Int(row.try_get_unchecked::<i64, _>(i)?),
        ColumnDecoder::UInt => Value::UInt(row.try_get_unchecked::<u64, _>(i)?),
        ColumnDecoder::Float32 => Value::Float(widen_f32(row.try_get_unchecked::<f32, _>(i)?)),
        ColumnDecoder::Float64 => Value::Float(row.try_get_unchecked::<f64, _>(i)?),
        ColumnDecoder::Decimal => Value::Decimal(row.try_get_unchecked::<&str, _>(i)?.into()),
        ColumnDecoder::Json => Value::Json(row.try_get_unchecked::<&str, _>(i)?.into()),
        ColumnDecoder::Date => Value::Date(row.try_get_unchecked::<NaiveDate, _>(i)?),
        ColumnDecoder::Naive => Value::Timestamp(naive_to_epoch(
            row.try_get_unchecked::<NaiveDateTime, _>(i)?,
            tz,
        )),
        ColumnDecoder::Utc => Value::Timestamp(
            row.try_get_unchecked::<DateTime<Utc>, _>(i)?
                .timestamp_micros(),
        ),
        ColumnDecoder::MySqlTime => Value::Text(
            time_text(&row.try_get_unchecked::<sqlx::mysql::types::MySqlTime, _>(i)?).into(),
        ),
        ColumnDecoder::Bit => {
            let bytes = row.try_get_unchecked::<&[u8], _>(i)?;
            Value::UInt(bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
        }
        ColumnDecoder::BytesOrText | ColumnDecoder::Bytes => {
            bytes_or_text(row.try_get_unchecked::<&[u8], _>(i)?)
        }
        _ => Value::Text(String::from_utf8_lossy(
            row.try_get_unchecked::<&[u8], _>(i)?,
        )),
    })
}

/// A `TIME` as MySQL prints it: `[-]HH:MM:SS[.ffffff]`, at least two hour
/// digits (sqlx's `Display` writes `8:05:00`), the fraction without trailing zeros.
fn time_text(time: &sqlx::mysql::types::MySqlTime) -> String {
    // Not `time.is_negative()`: in sqlx 0.8 it returns `is_positive()`.
    let sign = if time.sign().is_negative() { "-" } else { "" };
    let mut text = format!(
        "{sign}{:02}:{:02}:{:02}",
        time.hours(),
        time.minutes(),
        time.seconds()
    );
    if time.microseconds() != 0 {
        let fraction = format!("{:06}", time.microseconds());
        text.push('.');
        text.push_str(fraction.trim_end_matches('0'));
    }
    text
}
