//! PostgreSQL: binary-protocol decoding of the common types; every other
//! type (numeric, enums, arrays, domains, intervals, tsvector, ...) is cast to
//! `text` by wrapping the query, so `SELECT *` on any table just works.

use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgRow, PgValueFormat, PgValueRef};
use sqlx::{
    Column, ConnectOptions, Either, Executor, Postgres, Row, Statement, TypeInfo, ValueRef,
};

use super::placeholder::rewrite_since;
use super::row::{self, FetchError, RawRow, Undecoded};
use super::transactions::{Hidden, OpenTransaction};
use super::Statements;
use super::{epoch_secs, widen_f32, ColumnDecoder, Described, Prepared, SinceBinding, BEGINNING};
use crate::change::{epoch_to_naive, naive_to_epoch, Value};
use crate::config::{Backend, SourceSettings};

/// Microseconds from 1970-01-01 to 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_US: i64 = 946_684_800_000_000;
/// The earliest time bound for `start = "beginning"`: 0001-01-01 UTC.
const FLOOR_US: i64 = -62_135_596_800_000_000;

/// Prepared statements each pooled connection keeps. Every entity's query
/// is one; with sqlx's default of 100, a source with more entities than that
/// re-prepares (parses, plans, describes) its queries on every cycle.
const STATEMENT_CACHE_CAPACITY: usize = 1024;

pub(super) fn pool(
    settings: &SourceSettings,
    statements: &Arc<Statements>,
) -> Result<PgPool, sqlx::Error> {
    // sqlx would log every statement (and slow ones as warnings, with the
    // full SQL): highwater logs its own cycle lines instead.
    let mut options = PgConnectOptions::from_str(&settings.url)?
        .disable_statement_logging()
        .statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    // The URL's `application_name` wins (e.g. one per deployment).
    if options.get_application_name().is_none() {
        options = options.application_name("highwater");
    }
    Ok(super::pool_options(settings, statements).connect_lazy_with(options))
}

pub(super) async fn now(pool: &PgPool) -> Result<i64, sqlx::Error> {
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    Ok(now.timestamp_micros())
}

/// The clock and, in the same statement, the oldest client transaction of
/// another session in this database (any, also one that only read so far:
/// `now()` is its start whenever it writes), the agent's own window queries
/// aside. The sessions are hidden without `pg_read_all_stats` (their
/// `xact_start` reads NULL) and on a standby (the primary's are elsewhere).
pub(super) async fn clock(
    pool: &PgPool,
) -> Result<(i64, Result<Option<OpenTransaction>, Hidden>), sqlx::Error> {
    type Read = (
        DateTime<Utc>,
        bool,
        bool,
        String,
        Option<DateTime<Utc>>,
        Option<i32>,
        Option<String>,
    );
    let (now, sees_all, standby, role, start, pid, user): Read = sqlx::query_as(&format!(
        "SELECT now(), pg_has_role('pg_read_all_stats', 'USAGE'), pg_is_in_recovery(),
                current_user::text, o.xact_start, o.pid, o.usename
         FROM (SELECT 1) AS one
         LEFT JOIN LATERAL (
             SELECT xact_start, pid, usename::text AS usename FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND backend_type = 'client backend' AND xact_start IS NOT NULL
               AND query NOT LIKE '{}%'
             ORDER BY xact_start LIMIT 1
         ) AS o ON true",
        super::transactions::WINDOW_MARKER
    ))
    .fetch_one(pool)
    .await?;
    let sessions = if standby {
        Err(Hidden {
            reason: "the server is a standby: the primary's transactions are not visible on it; point the source at the primary".to_owned(),
        })
    } else if !sees_all {
        Err(Hidden {
            reason: format!(
                "role {role} cannot see other roles' transactions: GRANT pg_read_all_stats TO {role}"
            ),
        })
    } else {
        Ok(start.map(|start| OpenTransaction {
            since: start.timestamp_micros(),
            who: format!("pid {}", pid.unwrap_or_default()),
            user: user.unwrap_or_default(),
        }))
    };
    Ok((now.timestamp_micros(), sessions))
}

pub(super) async fn version(pool: &PgPool) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT version()").fetch_one(pool).await
}

pub(super) async fn describe(pool: &PgPool, sql: &str) -> Result<Described, sqlx::Error> {
    let rewritten = rewrite_since(sql, Backend::Postgres, "$1");
    let mut conn = pool.acquire().await?;
    let statement = (&mut *conn).prepare(&rewritten.sql).await?;

    let mut names = Vec::new();
    let mut types = Vec::new();
    let mut decoders = Vec::new();
    let mut casts = Vec::new();
    for column in statement.columns() {
        let type_name = column.type_info().name().to_owned();
        let (decoder, cast) = decoder_for(&type_name);
        names.push(column.name().to_owned());
        types.push(type_name);
        decoders.push(decoder);
        casts.push(cast);
    }
    let time_binding = match statement.parameters() {
        Some(Either::Left([first, ..])) => binding_for(first.name()),
        // No :since in the query: nothing to bind.
        _ => Some(SinceBinding::Utc),
    };

    let sql = if casts.iter().any(|&c| c) {
        let list = names
            .iter()
            .zip(&casts)
            .map(|(name, &cast)| {
                let quoted = format!("\"{}\"", name.replace('"', "\"\""));
                if cast {
                    format!("q.{quoted}::text AS {quoted}")
                } else {
                    format!("q.{quoted}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let wrapped = format!("SELECT {list} FROM (\n{}\n) AS q", rewritten.sql);
        // Prepare it too, so a query the wrapper breaks fails now, not at the first cycle.
        (&mut *conn).prepare(&wrapped).await?;
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
        time_binding,
    })
}

/// How a column of this type decodes, and whether it must be cast to text first.
fn decoder_for(type_name: &str) -> (ColumnDecoder, bool) {
    match type_name {
        "BOOL" => (ColumnDecoder::Bool, false),
        "INT2" | "INT4" | "INT8" => (ColumnDecoder::Int, false),
        "OID" => (ColumnDecoder::UInt, false),
        "FLOAT4" => (ColumnDecoder::Float32, false),
        "FLOAT8" => (ColumnDecoder::Float64, false),
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" => (ColumnDecoder::Text, false),
        "TIMESTAMPTZ" => (ColumnDecoder::Utc, false),
        "TIMESTAMP" => (ColumnDecoder::Naive, false),
        "DATE" => (ColumnDecoder::Date, false),
        "UUID" => (ColumnDecoder::Uuid, false),
        "JSON" => (ColumnDecoder::Json, false),
        "JSONB" => (ColumnDecoder::Jsonb, false),
        "BYTEA" => (ColumnDecoder::Bytes, false),
        "NUMERIC" => (ColumnDecoder::Decimal, true),
        "VOID" => (ColumnDecoder::Null, false),
        _ => (ColumnDecoder::Text, true),
    }
}

pub(super) fn binding_for(param_type: &str) -> Option<SinceBinding> {
    match param_type {
        "TIMESTAMPTZ" => Some(SinceBinding::Utc),
        "TIMESTAMP" => Some(SinceBinding::Naive),
        "DATE" => Some(SinceBinding::Date),
        "INT8" | "INT4" => Some(SinceBinding::UnixSeconds),
        "TEXT" | "VARCHAR" => Some(SinceBinding::Text),
        _ => None,
    }
}

/// Streams the window's rows, fingerprinted from the bytes PostgreSQL sent.
pub(super) fn changes<'a>(
    pool: &'a PgPool,
    prepared: &'a Prepared,
    since: i64,
    tz: chrono_tz::Tz,
) -> BoxStream<'a, Result<RawRow, FetchError>> {
    let mut query = sqlx::query::<Postgres>(&prepared.sql);
    if prepared.since_occurrences > 0 {
        query = bind(query, prepared.since, since, tz);
    }
    let mut buffer = Vec::new();
    let mut checked = false;
    query
        .fetch(pool)
        .map(move |pg_row| {
            let pg_row = pg_row?;
            if !checked {
                row::check_columns(&pg_row, prepared)?;
                checked = true;
            }
            // One pass over the columns: their bytes for the fingerprint,
            // and the cursor's value.
            let cursor = prepared.shape.cursor_index();
            let mut epoch = None;
            let columns = (0..prepared.columns.len()).map(|i| {
                let raw = pg_row.try_get_raw(i).ok()?;
                if i == cursor {
                    epoch = decode_value(raw.clone(), prepared.columns[i], tz)
                        .ok()
                        .and_then(|value| prepared.shape.cursor_epoch(&value));
                }
                if raw.is_null() {
                    None
                } else {
                    raw.as_bytes().ok()
                }
            });
            let fingerprint = row::fingerprint(prepared.layout, columns, &mut buffer);
            Ok(RawRow {
                fingerprint,
                epoch,
                number: 0,
                row: Undecoded::Postgres(pg_row),
            })
        })
        .boxed()
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

fn bind(query: PgQuery<'_>, binding: SinceBinding, since: i64, tz: chrono_tz::Tz) -> PgQuery<'_> {
    let time = if since == BEGINNING { FLOOR_US } else { since };
    match binding {
        SinceBinding::Integer => query.bind(since),
        SinceBinding::Utc => query
            .bind(DateTime::<Utc>::from_timestamp_micros(time).unwrap_or(DateTime::<Utc>::MIN_UTC)),
        SinceBinding::Naive => query.bind(epoch_to_naive(time, tz)),
        SinceBinding::Date => query.bind(epoch_to_naive(time, tz).date()),
        SinceBinding::UnixSeconds => query.bind(if since == BEGINNING {
            i64::MIN
        } else {
            epoch_secs(since)
        }),
        SinceBinding::Text | SinceBinding::SqliteText => query.bind(
            epoch_to_naive(time, tz)
                .format("%Y-%m-%d %H:%M:%S%.6f")
                .to_string(),
        ),
    }
}

pub(super) fn decode<'r>(
    row: &'r PgRow,
    i: usize,
    decoder: ColumnDecoder,
    tz: chrono_tz::Tz,
) -> Result<Value<'r>, sqlx::Error> {
    decode_value(row.try_get_raw(i)?, decoder, tz)
}

fn decode_value(
    raw: PgValueRef<'_>,
    decoder: ColumnDecoder,
    tz: chrono_tz::Tz,
) -> Result<Value<'_>, sqlx::Error> {
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let bytes = raw.as_bytes().map_err(sqlx::Error::Decode)?;
    if raw.format() == PgValueFormat::Text {
        return Ok(Value::Text(String::from_utf8_lossy(bytes)));
    }
    Ok(decode_binary(bytes, decoder, tz))
}

/// PostgreSQL's binary formats. A value of an unexpected length (which the
/// server never sends) goes out as bytes rather than failing the row.
fn decode_binary(bytes: &[u8], decoder: ColumnDecoder, tz: chrono_tz::Tz) -> Value<'_> {
    let be_i64 = |b: &[u8]| b.try_into().ok().map(i64::from_be_bytes);
    let value = match decoder {
        ColumnDecoder::Null => Some(Value::Null),
        ColumnDecoder::Bool => bytes.first().map(|&b| Value::Bool(b != 0)),
        ColumnDecoder::Int => match bytes.len() {
            2 => Some(Value::Int(i16::from_be_bytes([bytes[0], bytes[1]]).into())),
            4 => bytes
                .try_into()
                .ok()
                .map(|b| Value::Int(i32::from_be_bytes(b).into())),
            8 => be_i64(bytes).map(Value::Int),
            _ => None,
        },
        ColumnDecoder::UInt => bytes
            .try_into()
            .ok()
            .map(|b| Value::UInt(u32::from_be_bytes(b).into())),
        ColumnDecoder::Float32 => bytes
            .try_into()
            .ok()
            .map(|b| Value::Float(widen_f32(f32::from_be_bytes(b)))),
        ColumnDecoder::Float64 => bytes
            .try_into()
            .ok()
            .map(|b| Value::Float(f64::from_be_bytes(b))),
        ColumnDecoder::Decimal => std::str::from_utf8(bytes)
            .ok()
            .map(|s| Value::Decimal(s.into())),
        ColumnDecoder::Utc | ColumnDecoder::Naive => be_i64(bytes).map(|t| match t {
            i64::MAX => Value::Text("infinity".into()),
            i64::MIN => Value::Text("-infinity".into()),
            t if decoder == ColumnDecoder::Utc || tz == chrono_tz::UTC => {
                Value::Timestamp(t.saturating_add(PG_EPOCH_US))
            }
            t => {
                let naive = DateTime::<Utc>::from_timestamp_micros(t.saturating_add(PG_EPOCH_US))
                    .map(|d| d.naive_utc());
                match naive {
                    Some(n) => Value::Timestamp(naive_to_epoch(n, tz)),
                    None => Value::Int(t),
                }
            }
        }),
        ColumnDecoder::Date => bytes.try_into().ok().map(|b| match i32::from_be_bytes(b) {
            i32::MAX => Value::Text("infinity".into()),
            i32::MIN => Value::Text("-infinity".into()),
            days => NaiveDate::from_ymd_opt(2000, 1, 1)
                .and_then(|d| d.checked_add_signed(chrono::Duration::days(days.into())))
                .map_or(Value::Int(days.into()), Value::Date),
        }),
        ColumnDecoder::Uuid => uuid::Uuid::from_slice(bytes)
            .ok()
            .map(|u| Value::Text(u.hyphenated().to_string().into())),
        ColumnDecoder::Json => std::str::from_utf8(bytes)
            .ok()
            .map(|s| Value::Json(s.into())),
        ColumnDecoder::Jsonb => match bytes.split_first() {
            Some((1, rest)) => std::str::from_utf8(rest)
                .ok()
                .map(|s| Value::Json(s.into())),
            _ => None,
        },
        ColumnDecoder::Bytes => Some(Value::Bytes(bytes.into())),
        _ => std::str::from_utf8(bytes)
            .ok()
            .map(|s| Value::Text(s.into())),
    };
    value.unwrap_or(Value::Bytes(bytes.into()))
}
