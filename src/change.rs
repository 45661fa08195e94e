//! Row → change: the key as one string, the cursor as an integer epoch, a
//! 64-bit digest of every selected column, and the payload as JSON bytes.
//!
//! Backends decode their columns into [`Value`]s; everything after that is
//! the same for every database, so a row reads the same on every stream.

use std::borrow::Cow;
use std::fmt::Write as _;

use base64::Engine as _;
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};

use crate::config::{CursorKind, PayloadMode};

/// One column of one row, as decoded by a backend.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'r> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    /// Exact decimal digits, sent as a JSON string so no precision is lost.
    Decimal(Cow<'r, str>),
    Text(Cow<'r, str>),
    /// JSON text, nested as is.
    Json(Cow<'r, str>),
    Bytes(Cow<'r, [u8]>),
    /// Microseconds since 1970-01-01 UTC.
    Timestamp(i64),
    Date(NaiveDate),
}

/// `upsert`, or `delete` when the entity's delete column marks the row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Upsert,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Upsert => "upsert",
            Op::Delete => "delete",
        }
    }
}

/// One row, ready for the dedup script.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub pkey: String,
    pub epoch: i64,
    /// XXH3-64 of the payload JSON (always computed, also with `payload = "key"`).
    pub digest: u64,
    pub op: Op,
    /// The JSON object, or `None` with `payload = "key"`.
    pub payload: Option<String>,
}

/// Why a row could not become a change. The poller adds entity and row number.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RowError {
    #[error("key column {column} is NULL in the row {row}")]
    NullKey { column: String, row: String },
    #[error("cursor column {column} is NULL in the row with key {pkey}")]
    NullCursor { column: String, pkey: String },
    #[error("cursor column {column} holds {value}, which is not a {expected}, in the row with key {pkey}")]
    BadCursor {
        column: String,
        pkey: String,
        value: String,
        expected: &'static str,
    },
}

/// How the columns of an entity's result map onto a change. Built once per
/// prepared query, used for every row.
#[derive(Debug, Clone)]
pub struct RowShape {
    /// Column names, in result order.
    pub columns: Vec<String>,
    /// `"name":` with the name JSON-escaped, ready to append.
    json_keys: Vec<String>,
    key: Vec<usize>,
    cursor: usize,
    delete: Option<usize>,
    cursor_kind: CursorKind,
    timezone: chrono_tz::Tz,
    payload: PayloadMode,
    /// Per column: text to nest as JSON (`json_columns`).
    nest_json: Vec<bool>,
}

impl RowShape {
    /// Finds key, cursor and delete columns by name; `Err` names the first
    /// one missing, with the columns the query does return.
    pub fn new(
        columns: Vec<String>,
        key: &[String],
        cursor: &str,
        delete: Option<&str>,
        cursor_kind: CursorKind,
        timezone: chrono_tz::Tz,
        payload: PayloadMode,
    ) -> Result<RowShape, String> {
        let find = |name: &str, role: &str| {
            columns.iter().position(|c| c == name).ok_or_else(|| {
                format!(
                    "the query returns no {role} column {name:?} (it returns: {})",
                    columns.join(", ")
                )
            })
        };
        let key = key
            .iter()
            .map(|k| find(k, "key"))
            .collect::<Result<Vec<_>, _>>()?;
        let cursor = find(cursor, "cursor")?;
        let delete = delete.map(|d| find(d, "delete")).transpose()?;
        for (i, c) in columns.iter().enumerate() {
            if columns[..i].contains(c) {
                return Err(format!(
                    "the query returns two columns named {c:?}; give them distinct aliases (AS ...)"
                ));
            }
        }
        let json_keys = columns
            .iter()
            .map(|c| {
                let mut k = serde_json::to_string(c).unwrap_or_else(|_| format!("\"{c}\""));
                k.push(':');
                k
            })
            .collect();
        Ok(RowShape {
            nest_json: vec![false; columns.len()],
            columns,
            json_keys,
            key,
            cursor,
            delete,
            cursor_kind,
            timezone,
            payload,
        })
    }

    /// Marks text columns whose content goes into the payload as nested
    /// JSON (text that is not valid JSON still goes out as a string).
    pub fn with_json_columns(mut self, names: &[String]) -> Result<RowShape, String> {
        for name in names {
            let Some(i) = self.columns.iter().position(|c| c == name) else {
                return Err(format!(
                    "json_columns names {name:?}, which the query does not return (it returns: {})",
                    self.columns.join(", ")
                ));
            };
            self.nest_json[i] = true;
        }
        Ok(self)
    }

    /// Index of the cursor column.
    pub fn cursor_index(&self) -> usize {
        self.cursor
    }

    /// The cursor's epoch, if `value` (the cursor column's) holds one.
    pub fn cursor_epoch(&self, value: &Value<'_>) -> Option<i64> {
        cursor_epoch(value, self.cursor_kind, self.timezone).ok()
    }

    /// Turns one decoded row into a change. `json` is scratch space reused across rows.
    pub fn build(&self, values: &[Value<'_>], json: &mut String) -> Result<Change, RowError> {
        json.clear();
        json.push('{');
        for (i, value) in values.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&self.json_keys[i]);
            match value {
                Value::Text(text) if self.nest_json[i] => {
                    write_json(&Value::Json(Cow::Borrowed(text)), json)
                }
                _ => write_json(value, json),
            }
        }
        json.push('}');
        let digest = xxhash_rust::xxh3::xxh3_64(json.as_bytes());

        let pkey = self.pkey(values, json)?;
        let cursor_column = &self.columns[self.cursor];
        let epoch = match cursor_epoch(&values[self.cursor], self.cursor_kind, self.timezone) {
            Ok(epoch) => epoch,
            Err(None) => {
                return Err(RowError::NullCursor {
                    column: cursor_column.clone(),
                    pkey,
                })
            }
            Err(Some(expected)) => {
                let mut value = String::new();
                write_json(&values[self.cursor], &mut value);
                return Err(RowError::BadCursor {
                    column: cursor_column.clone(),
                    pkey,
                    value,
                    expected,
                });
            }
        };
        let op = match self.delete.map(|i| &values[i]) {
            Some(marker) if is_truthy(marker) => Op::Delete,
            _ => Op::Upsert,
        };
        let payload = match self.payload {
            PayloadMode::Row => Some(json.clone()),
            PayloadMode::Key => None,
        };
        Ok(Change {
            pkey,
            epoch,
            digest,
            op,
            payload,
        })
    }

    /// The key as one string: a single key's plain text, or a JSON array for a composite key.
    fn pkey(&self, values: &[Value<'_>], json: &str) -> Result<String, RowError> {
        for &i in &self.key {
            if values[i] == Value::Null {
                return Err(RowError::NullKey {
                    column: self.columns[i].clone(),
                    row: preview(json),
                });
            }
        }
        if let [single] = self.key[..] {
            return Ok(plain_text(&values[single]));
        }
        let mut out = String::from("[");
        for (n, &i) in self.key.iter().enumerate() {
            if n > 0 {
                out.push(',');
            }
            write_json(&values[i], &mut out);
        }
        out.push(']');
        Ok(out)
    }
}

/// The row's JSON, shortened for an error message.
fn preview(json: &str) -> String {
    const MAX: usize = 200;
    if json.len() <= MAX {
        return json.to_owned();
    }
    let mut end = MAX;
    while !json.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &json[..end])
}

/// A value as plain text: strings unquoted, everything else as in JSON.
pub fn plain_text(value: &Value<'_>) -> String {
    match value {
        Value::Text(s) | Value::Decimal(s) => s.to_string(),
        Value::Timestamp(us) => format_timestamp(*us),
        Value::Date(d) => d.format("%Y-%m-%d").to_string(),
        Value::Bytes(b) => base64::engine::general_purpose::STANDARD.encode(b),
        other => {
            let mut out = String::new();
            write_json(other, &mut out);
            out
        }
    }
}

/// Appends the JSON form of a value (DESIGN.md §5's mapping).
pub fn write_json(value: &Value<'_>, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(i) => {
            if *i < 0 {
                out.push('-');
            }
            push_decimal(out, i.unsigned_abs());
        }
        Value::UInt(u) => push_decimal(out, *u),
        Value::Float(f) if f.is_finite() => {
            let _ = write!(out, "{f}");
        }
        // JSON has no NaN or infinity: send them as strings (spelled as
        // PostgreSQL and JavaScript do) rather than fail the row.
        Value::Float(f) if f.is_nan() => out.push_str("\"NaN\""),
        Value::Float(f) if *f > 0.0 => out.push_str("\"Infinity\""),
        Value::Float(_) => out.push_str("\"-Infinity\""),
        Value::Decimal(s) | Value::Text(s) => write_json_string(s, out),
        Value::Json(raw) => match serde_json::from_str::<&serde_json::value::RawValue>(raw) {
            Ok(valid) => out.push_str(valid.get()),
            // A "JSON" column holding invalid JSON (MySQL/SQLite do not check): send it as a string.
            Err(_) => write_json_string(raw, out),
        },
        Value::Bytes(b) => {
            out.push('"');
            base64::engine::general_purpose::STANDARD.encode_string(b, out);
            out.push('"');
        }
        Value::Timestamp(us) => {
            out.push('"');
            write_timestamp(*us, out);
            out.push('"');
        }
        Value::Date(d) => {
            let _ = write!(out, "\"{}\"", d.format("%Y-%m-%d"));
        }
    }
}

/// Appends `s` as a JSON string, escaped byte for byte as serde_json does
/// (`\"`, `\\`, `\b \f \n \r \t`, other control characters as `\u00xx`),
/// so digests stay what they were; without serde_json's intermediate String,
/// which cost an allocation per text column of every row.
fn write_json_string(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push('"');
    let bytes = s.as_bytes();
    // Skip whole 8-byte words that need no escape (most text): a word test
    // instead of eight byte tests.
    let mut clean_words = 0;
    while clean_words + 8 <= bytes.len() {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[clean_words..clean_words + 8]);
        if needs_escape(u64::from_le_bytes(word)) {
            break;
        }
        clean_words += 8;
    }
    let mut clean = 0;
    for (i, &byte) in bytes.iter().enumerate().skip(clean_words) {
        let short = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        // Every byte escaped is ASCII, so `i` is on a character boundary.
        out.push_str(&s[clean..i]);
        if short.is_empty() {
            out.push_str("\\u00");
            out.push(HEX[usize::from(byte >> 4)] as char);
            out.push(HEX[usize::from(byte & 0xf)] as char);
        } else {
            out.push_str(short);
        }
        clean = i + 1;
    }
    out.push_str(&s[clean..]);
    out.push('"');
}

/// Does any byte of the word need a JSON escape: below 0x20, `"` or `\\`?
/// (The classic "has a byte less than n / equal to c" bit tricks: exact as
/// to whether any byte matches.)
fn needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let has_quote = quote.wrapping_sub(ONES) & !quote & HIGH;
    let has_backslash = backslash.wrapping_sub(ONES) & !backslash & HIGH;
    below_space | has_quote | has_backslash != 0
}

/// RFC 3339 in UTC, with as many fractional digits as needed (0, 3 or 6).
pub fn format_timestamp(micros: i64) -> String {
    let mut out = String::with_capacity(27);
    write_timestamp(micros, &mut out);
    out
}

/// Appends [`format_timestamp`]'s text without allocating: every row's
/// cursor goes through here.
pub fn write_timestamp(micros: i64, out: &mut String) {
    const DAY_US: i64 = 86_400_000_000;
    let (year, month, day) = civil_from_days(micros.div_euclid(DAY_US));
    if !(0..=9999).contains(&year) {
        // chrono's own forms for years outside four digits (+10000, -0001)
        // and for instants it cannot represent.
        match DateTime::<Utc>::from_timestamp_micros(micros) {
            Some(t) => out.push_str(&t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
            None => {
                let _ = write!(out, "{micros}");
            }
        }
        return;
    }
    let of_day = micros.rem_euclid(DAY_US);
    let seconds = (of_day / 1_000_000) as u32;
    let micro = (of_day % 1_000_000) as u32;
    push_digits(out, year as u32, 4);
    out.push('-');
    push_digits(out, month, 2);
    out.push('-');
    push_digits(out, day, 2);
    out.push('T');
    push_digits(out, seconds / 3600, 2);
    out.push(':');
    push_digits(out, seconds / 60 % 60, 2);
    out.push(':');
    push_digits(out, seconds % 60, 2);
    if micro.is_multiple_of(1000) && micro != 0 {
        out.push('.');
        push_digits(out, micro / 1000, 3);
    } else if micro != 0 {
        out.push('.');
        push_digits(out, micro, 6);
    }
    out.push('Z');
}

/// Year, month, day of a day number (days since 1970-01-01) in the
/// proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Appends an integer's decimal digits (what `write!` does, without the
/// formatting machinery: every row has a few).
fn push_decimal(out: &mut String, value: u64) {
    let mut buf = [0u8; 20];
    let mut rest = value;
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for &digit in &buf[start..] {
        out.push(char::from(digit));
    }
}

/// Appends `value` as exactly `width` (at most 6) decimal digits, zero-padded.
fn push_digits(out: &mut String, value: u32, width: usize) {
    let mut buf = [b'0'; 6];
    let mut rest = value;
    for slot in buf[..width].iter_mut().rev() {
        *slot = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    for &digit in &buf[..width] {
        out.push(char::from(digit));
    }
}

/// A naive wall-clock time read in `tz`, as microseconds since 1970 UTC.
/// Ambiguous times (the hour repeated when clocks go back) take the earlier
/// instant; times that do not exist (skipped when clocks go forward) are
/// read as if the clock had not jumped yet.
pub fn naive_to_epoch(naive: NaiveDateTime, tz: chrono_tz::Tz) -> i64 {
    match tz.from_local_datetime(&naive) {
        chrono::LocalResult::Single(t) => t.timestamp_micros(),
        chrono::LocalResult::Ambiguous(early, _) => early.timestamp_micros(),
        chrono::LocalResult::None => {
            let shifted = naive + chrono::Duration::hours(1);
            match tz.from_local_datetime(&shifted) {
                chrono::LocalResult::Single(t) | chrono::LocalResult::Ambiguous(t, _) => {
                    t.timestamp_micros() - 3_600_000_000
                }
                chrono::LocalResult::None => naive.and_utc().timestamp_micros(),
            }
        }
    }
}

/// An epoch as a naive wall-clock time in `tz` (the inverse of [`naive_to_epoch`]).
pub fn epoch_to_naive(epoch: i64, tz: chrono_tz::Tz) -> NaiveDateTime {
    let utc = DateTime::<Utc>::from_timestamp_micros(epoch).unwrap_or(if epoch < 0 {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    });
    utc.with_timezone(&tz).naive_local()
}

/// The cursor value as an epoch. `Err(None)`: NULL; `Err(Some(what))`: not a `what`.
fn cursor_epoch(
    value: &Value<'_>,
    kind: CursorKind,
    tz: chrono_tz::Tz,
) -> Result<i64, Option<&'static str>> {
    match (kind, value) {
        (_, Value::Null) => Err(None),
        (CursorKind::Time, Value::Timestamp(us)) => Ok(*us),
        (CursorKind::Time, Value::Date(d)) => {
            Ok(naive_to_epoch(d.and_time(chrono::NaiveTime::MIN), tz))
        }
        // Unix seconds in an integer column (SQLite, legacy schemas).
        (CursorKind::Time, Value::Int(secs)) => {
            secs.checked_mul(1_000_000).ok_or(Some("timestamp"))
        }
        (CursorKind::Time, Value::Text(text)) => parse_text_time(text, tz).ok_or(Some("timestamp")),
        (CursorKind::Time, _) => Err(Some("timestamp")),
        (CursorKind::Version, Value::Int(v)) => Ok(*v),
        (CursorKind::Version, Value::UInt(v)) => {
            i64::try_from(*v).map_err(|_| Some("version below 2^63"))
        }
        (CursorKind::Version, Value::Decimal(d) | Value::Text(d)) => {
            d.parse().map_err(|_| Some("whole number"))
        }
        (CursorKind::Version, _) => Err(Some("whole number")),
    }
}

/// Reads the text forms timestamps take in SQLite: `YYYY-MM-DD HH:MM:SS[.fff]`
/// (as `datetime('now')` writes it, read in `tz`), the same with a `T`, RFC 3339
/// with an offset, or a bare date.
pub fn parse_text_time(text: &str, tz: chrono_tz::Tz) -> Option<i64> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_micros());
    }
    for format in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(text, format) {
            return Some(naive_to_epoch(naive, tz));
        }
    }
    if let Some(utc_text) = text.strip_suffix('Z') {
        if let Ok(naive) = NaiveDateTime::parse_from_str(utc_text, "%Y-%m-%d %H:%M:%S%.f") {
            return Some(naive.and_utc().timestamp_micros());
        }
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .map(|d| naive_to_epoch(d.and_time(chrono::NaiveTime::MIN), tz))
}

/// Does a delete-marker value say "deleted"? true, non-zero, or any
/// non-NULL timestamp/text (a `deleted_at` column).
fn is_truthy(value: &Value<'_>) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Int(i) => *i != 0,
        Value::UInt(u) => *u != 0,
        Value::Float(f) => *f != 0.0,
        Value::Decimal(s) => s.bytes().any(|b| (b'1'..=b'9').contains(&b)),
        Value::Text(s) => !matches!(
            s.trim().to_ascii_lowercase().as_str(),
            "" | "0" | "f" | "false" | "n" | "no"
        ),
        Value::Bytes(b) => b.iter().any(|&x| x != 0),
        Value::Json(_) | Value::Timestamp(_) | Value::Date(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(key: &[&str]) -> RowShape {
        RowShape::new(
            vec![
                "id".into(),
                "line".into(),
                "name".into(),
                "updated_at".into(),
                "deleted".into(),
            ],
            &key.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
            "updated_at",
            Some("deleted"),
            CursorKind::Time,
            chrono_tz::UTC,
            PayloadMode::Row,
        )
        .unwrap()
    }

    fn row(name: Value<'static>) -> Vec<Value<'static>> {
        vec![
            Value::Text("o-1".into()),
            Value::Int(3),
            name,
            Value::Timestamp(1_700_000_000_123_456),
            Value::Bool(false),
        ]
    }

    #[test]
    fn composite_key_is_a_json_array_and_payload_is_an_object() {
        let mut buf = String::new();
        let change = shape(&["id", "line"])
            .build(&row(Value::Text("a \"b\"".into())), &mut buf)
            .unwrap();
        assert_eq!(change.pkey, r#"["o-1",3]"#);
        assert_eq!(change.epoch, 1_700_000_000_123_456);
        assert_eq!(
            change.payload.as_deref(),
            Some(
                r#"{"id":"o-1","line":3,"name":"a \"b\"","updated_at":"2023-11-14T22:13:20.123456Z","deleted":false}"#
            )
        );
        assert_eq!(change.op, Op::Upsert);
    }

    #[test]
    fn digest_changes_with_any_column() {
        let mut buf = String::new();
        let s = shape(&["id"]);
        let a = s.build(&row(Value::Text("x".into())), &mut buf).unwrap();
        let b = s.build(&row(Value::Text("y".into())), &mut buf).unwrap();
        let c = s.build(&row(Value::Null), &mut buf).unwrap();
        assert_ne!(a.digest, b.digest);
        assert_ne!(a.digest, c.digest);
        assert_eq!(a.pkey, "o-1");
    }

    #[test]
    fn null_key_and_cursor_are_named() {
        let mut buf = String::new();
        let s = shape(&["id"]);
        let mut r = row(Value::Null);
        r[0] = Value::Null;
        assert_eq!(
            s.build(&r, &mut buf).unwrap_err().to_string(),
            r#"key column id is NULL in the row {"id":null,"line":3,"name":null,"updated_at":"2023-11-14T22:13:20.123456Z","deleted":false}"#
        );
        let mut r = row(Value::Null);
        r[3] = Value::Null;
        assert_eq!(
            s.build(&r, &mut buf).unwrap_err().to_string(),
            "cursor column updated_at is NULL in the row with key o-1"
        );
    }

    #[test]
    fn json_columns_nest_text_and_keep_invalid_json_a_string() {
        let shape = shape(&["id"])
            .with_json_columns(&["name".to_owned()])
            .unwrap();
        let mut buf = String::new();
        let nested = shape
            .build(&row(Value::Text(r#"{"a": [1, 2]}"#.into())), &mut buf)
            .unwrap();
        assert!(nested.payload.unwrap().contains(r#""name":{"a": [1, 2]}"#));
        let plain = shape
            .build(&row(Value::Text("not json".into())), &mut buf)
            .unwrap();
        assert!(plain.payload.unwrap().contains(r#""name":"not json""#));
        let err = shape.with_json_columns(&["nope".to_owned()]).unwrap_err();
        assert!(
            err.starts_with("json_columns names \"nope\", which the query does not return"),
            "{err}"
        );
    }

    #[test]
    fn missing_columns_are_listed() {
        let err = RowShape::new(
            vec!["id".into(), "name".into()],
            &["id".into()],
            "updated_at",
            None,
            CursorKind::Time,
            chrono_tz::UTC,
            PayloadMode::Row,
        )
        .unwrap_err();
        assert_eq!(
            err,
            "the query returns no cursor column \"updated_at\" (it returns: id, name)"
        );
    }

    #[test]
    fn sqlite_text_times_parse_in_the_source_zone() {
        let utc = parse_text_time("2024-03-01 12:00:00", chrono_tz::UTC).unwrap();
        assert_eq!(utc, 1_709_294_400_000_000);
        let berlin = parse_text_time("2024-03-01 13:00:00", chrono_tz::Europe::Berlin).unwrap();
        assert_eq!(berlin, utc);
        assert_eq!(
            parse_text_time("2024-03-01T12:00:00.5Z", chrono_tz::UTC),
            Some(utc + 500_000)
        );
        assert_eq!(
            parse_text_time("2024-03-01", chrono_tz::UTC),
            Some(utc - 12 * 3_600_000_000)
        );
        assert_eq!(parse_text_time("yesterday", chrono_tz::UTC), None);
    }

    #[test]
    fn json_strings_are_escaped_as_serde_json_does() {
        let mut samples: Vec<String> = (0u8..=0x7f).map(|b| (b as char).to_string()).collect();
        samples.extend(
            [
                "",
                "plain",
                "a \"quoted\" \\ path\n\ttab",
                "\u{7f} del, é, 漢字, 🦀",
                "\u{1}\u{1f}end",
            ]
            .map(String::from),
        );
        for sample in samples {
            let mut out = String::from("x");
            write_json_string(&sample, &mut out);
            assert_eq!(
                out[1..],
                serde_json::to_string(&sample).unwrap(),
                "{sample:?}"
            );
        }
    }

    #[test]
    fn integers_read_as_display_writes_them() {
        for i in [0, 1, -1, 9, 10, -10, 1234567890, i64::MIN, i64::MAX] {
            let mut out = String::new();
            write_json(&Value::Int(i), &mut out);
            assert_eq!(out, i.to_string());
        }
        let mut out = String::new();
        write_json(&Value::UInt(u64::MAX), &mut out);
        assert_eq!(out, u64::MAX.to_string());
    }

    #[test]
    fn long_strings_with_escapes_at_any_offset_match_serde_json() {
        for special in ["\"", "\\", "\n", "\u{1f}", "\u{0}", "é"] {
            for at in 0..20 {
                let text = format!("{}{special}{}", "a".repeat(at), "b".repeat(19 - at));
                let mut out = String::new();
                write_json_string(&text, &mut out);
                assert_eq!(out, serde_json::to_string(&text).unwrap(), "{text:?}");
            }
        }
    }

    #[test]
    fn timestamps_read_as_chrono_writes_them() {
        let chrono_form = |us: i64| {
            DateTime::<Utc>::from_timestamp_micros(us)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        };
        for us in [
            0,
            1,
            999,
            1_000,
            1_000_000,
            1_700_000_000_123_456,
            1_700_000_000_123_000,
            1_700_000_000_000_000,
            -1,
            -1_000,
            -62_135_596_800_000_000,
            253_402_300_799_999_999,
            253_402_300_800_000_000,
            -62_135_596_800_000_001,
        ] {
            assert_eq!(format_timestamp(us), chrono_form(us), "{us}");
        }
        // Years 0000 to 9999, at odd steps (every month, day and time of day).
        let mut us = -62_167_219_200_000_000i64;
        while us < 253_402_300_800_000_000 {
            assert_eq!(format_timestamp(us), chrono_form(us), "{us}");
            assert_eq!(format_timestamp(us + 123_000), chrono_form(us + 123_000));
            us += 98_765_432_101_234;
        }
    }

    #[test]
    fn delete_marker_reads_flags_and_timestamps() {
        assert!(is_truthy(&Value::Bool(true)));
        assert!(!is_truthy(&Value::Int(0)));
        assert!(is_truthy(&Value::Timestamp(0)));
        assert!(!is_truthy(&Value::Null));
        assert!(!is_truthy(&Value::Decimal("0.00".into())));
        assert!(is_truthy(&Value::Decimal("1.0".into())));
    }
}
