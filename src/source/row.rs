//! A row of the window between the database and the dedup script: read,
//! fingerprinted and with its cursor decoded, but not yet turned into a
//! [`Change`].
//!
//! An unchanged re-scan is most of what a polling agent does. Decoding every
//! column, building the JSON payload and its digest for a row the agent
//! already confirmed would make a re-scan cost as much as a first cycle. So a
//! row is first fingerprinted from the bytes the database sent, and only rows
//! the agent's memory does not know by that fingerprint are decoded.
//!
//! The promise: two rows with the same fingerprint (and the same [`Prepared`]
//! layout) become the same change, key, cursor and payload alike; with a
//! 64-bit hash that holds but for a chance of about one in 2^64 per pair.

use sqlx::mysql::MySqlRow;
use sqlx::postgres::PgRow;

use super::{ColumnDecoder, Prepared};
use crate::change::{Change, RowError, Value};

/// One row of the window, read but not yet decoded.
pub struct RawRow {
    /// Identifies the row's content: see the module's promise.
    pub fingerprint: u64,
    /// The cursor as an epoch; `None` when it does not decode (NULL, not a
    /// time): such a row always goes through [`RawRow::decode`], which says why.
    pub epoch: Option<i64>,
    /// 1-based position in the window, for error messages (numbered by
    /// [`super::Source::changes`]; backends leave it 0).
    pub number: u64,
    pub(super) row: Undecoded,
}

pub(super) enum Undecoded {
    Postgres(PgRow),
    MySql(MySqlRow),
    /// SQLite hands out typed values, not the bytes it stores: its rows are
    /// decoded as they are read and fingerprinted from the change.
    Decoded(Result<Change, RowError>),
}

/// Buffers reused from row to row, so that decoding allocates nothing per row.
#[derive(Default)]
pub struct Scratch {
    json: String,
    values: Vec<Value<'static>>,
}

/// Why a row could not be decoded: the driver could not read a column, or
/// the values do not make a change (NULL key, bad cursor).
pub(super) enum DecodeError {
    Driver(sqlx::Error),
    Row(RowError),
}

/// Why the next row of the window could not be read.
pub(super) enum FetchError {
    Driver(sqlx::Error),
    /// The rows carry other columns than the query had when it was prepared
    /// (these columns, now): the table changed under it.
    ColumnsChanged(String),
}

impl From<sqlx::Error> for FetchError {
    fn from(error: sqlx::Error) -> FetchError {
        FetchError::Driver(error)
    }
}

/// Checks that `row` has the columns the query was prepared with. A table
/// altered under `SELECT *` changes them: MariaDB and SQLite re-prepare
/// silently and send the new columns, which the prepared decoders would
/// misread or drop.
pub(super) fn check_columns<R: sqlx::Row>(row: &R, prepared: &Prepared) -> Result<(), FetchError> {
    use sqlx::Column;
    let columns = row.columns();
    let same = columns.len() == prepared.shape.columns.len()
        && columns
            .iter()
            .zip(&prepared.shape.columns)
            .all(|(column, name)| column.name() == name);
    if same {
        return Ok(());
    }
    let now: Vec<&str> = columns.iter().map(|c| c.name()).collect();
    Err(FetchError::ColumnsChanged(now.join(", ")))
}

/// Reads one column of a backend's row.
pub(super) type ColumnReader<R> =
    for<'r> fn(&'r R, usize, ColumnDecoder, chrono_tz::Tz) -> Result<Value<'r>, sqlx::Error>;

impl RawRow {
    /// Turns the row into a change: every column decoded, the payload built.
    pub(super) fn decode(
        self,
        prepared: &Prepared,
        tz: chrono_tz::Tz,
        scratch: &mut Scratch,
    ) -> Result<Change, DecodeError> {
        match self.row {
            Undecoded::Postgres(row) => build(&row, prepared, tz, scratch, super::postgres::decode),
            Undecoded::MySql(row) => build(&row, prepared, tz, scratch, super::mysql::decode),
            Undecoded::Decoded(change) => change.map_err(DecodeError::Row),
        }
    }
}

/// Decodes every column of `row` and builds its change.
pub(super) fn build<R>(
    row: &R,
    prepared: &Prepared,
    tz: chrono_tz::Tz,
    scratch: &mut Scratch,
    read: ColumnReader<R>,
) -> Result<Change, DecodeError> {
    // One allocation for every row's values, not one per row.
    let mut values = recycle(std::mem::take(&mut scratch.values));
    for (i, &decoder) in prepared.columns.iter().enumerate() {
        match read(row, i, decoder, tz) {
            Ok(value) => values.push(value),
            Err(error) => {
                scratch.values = recycle(values);
                return Err(DecodeError::Driver(error));
            }
        }
    }
    let change = prepared.shape.build(&values, &mut scratch.json);
    scratch.values = recycle(values);
    change.map_err(DecodeError::Row)
}

/// The cursor's epoch, from the cursor column alone.
pub(super) fn cursor_epoch<R>(
    row: &R,
    prepared: &Prepared,
    tz: chrono_tz::Tz,
    read: ColumnReader<R>,
) -> Option<i64> {
    let cursor = prepared.shape.cursor_index();
    let value = read(row, cursor, prepared.columns[cursor], tz).ok()?;
    prepared.shape.cursor_epoch(&value)
}

/// XXH3 of the row's columns as the database sent them, seeded with the
/// query's layout. Each column is written as its length and bytes, a NULL as
/// a length no value can have, so that no two rows' encodings run together.
pub(super) fn fingerprint<'v>(
    layout: u64,
    columns: impl Iterator<Item = Option<&'v [u8]>>,
    buffer: &mut Vec<u8>,
) -> u64 {
    buffer.clear();
    for column in columns {
        match column {
            Some(bytes) => {
                buffer.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
                buffer.extend_from_slice(bytes);
            }
            None => buffer.extend_from_slice(&u64::MAX.to_le_bytes()),
        }
    }
    xxhash_rust::xxh3::xxh3_64_with_seed(buffer, layout)
}

/// The fingerprint of an already decoded row (SQLite): its key and digest,
/// which is what the module's promise asks of a fingerprint.
pub(super) fn change_fingerprint(layout: u64, change: &Change) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(change.pkey.as_bytes(), layout ^ change.digest)
}

/// An emptied vector of values, its allocation kept for values that borrow
/// from another row (nothing is moved: the vector is empty).
#[allow(
    clippy::unnecessary_filter_map,
    reason = "the map changes the values' lifetime, which `filter` cannot"
)]
fn recycle<'b>(mut values: Vec<Value<'_>>) -> Vec<Value<'b>> {
    values.clear();
    values.into_iter().filter_map(|_| None).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(columns: &[Option<&[u8]>]) -> u64 {
        fingerprint(7, columns.iter().copied(), &mut Vec::new())
    }

    #[test]
    fn columns_do_not_run_together() {
        assert_ne!(
            of(&[Some(b"ab"), Some(b"c")]),
            of(&[Some(b"a"), Some(b"bc")])
        );
        assert_ne!(of(&[None, Some(b"")]), of(&[Some(b""), None]));
        assert_ne!(of(&[Some(b"")]), of(&[None]));
        assert_eq!(of(&[Some(b"x"), None]), of(&[Some(b"x"), None]));
    }

    #[test]
    fn the_layout_is_part_of_the_fingerprint() {
        let row: [Option<&[u8]>; 1] = [Some(b"x")];
        assert_ne!(
            fingerprint(1, row.iter().copied(), &mut Vec::new()),
            fingerprint(2, row.iter().copied(), &mut Vec::new())
        );
    }
}
