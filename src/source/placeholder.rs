//! Rewrites the named parameter `:since` into the backend's placeholder
//! (`$1` for PostgreSQL, `?` for MySQL, `?1` for SQLite), leaving `::casts`,
//! string literals, quoted identifiers and comments alone.

use crate::config::Backend;

/// The query with every `:since` replaced, and how many there were.
#[derive(Debug, PartialEq, Eq)]
pub struct Rewritten {
    pub sql: String,
    pub occurrences: usize,
}

/// Rewrites `:since` for `backend`; `placeholder` is what replaces it.
pub fn rewrite_since(sql: &str, backend: Backend, placeholder: &str) -> Rewritten {
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut occurrences = 0;
    let mut i = 0;
    // Copies sql[from..to] verbatim.
    let mut copied = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let skip_to = match c {
            b'\'' => Some(end_of_quoted(
                bytes,
                i,
                b'\'',
                backslash_escapes(backend, bytes, i),
            )),
            b'"' => Some(end_of_quoted(bytes, i, b'"', backend == Backend::MySql)),
            b'`' if backend != Backend::Postgres => Some(end_of_quoted(bytes, i, b'`', false)),
            b'[' if backend == Backend::Sqlite => Some(
                bytes[i..]
                    .iter()
                    .position(|&b| b == b']')
                    .map_or(bytes.len(), |p| i + p + 1),
            ),
            b'-' if bytes.get(i + 1) == Some(&b'-') => Some(end_of_line(bytes, i)),
            b'#' if backend == Backend::MySql => Some(end_of_line(bytes, i)),
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                Some(end_of_block_comment(bytes, i, backend == Backend::Postgres))
            }
            b'$' if backend == Backend::Postgres => dollar_quote_end(bytes, i),
            b':' => {
                if bytes.get(i + 1) == Some(&b':') {
                    // A cast (`x::date`): skip both colons.
                    Some(i + 2)
                } else if is_since_at(bytes, i) {
                    out.push_str(&sql[copied..i]);
                    out.push_str(placeholder);
                    occurrences += 1;
                    i += ":since".len();
                    copied = i;
                    continue;
                } else {
                    None
                }
            }
            _ => None,
        };
        i = match skip_to {
            Some(end) => end.max(i + 1),
            None => i + 1,
        };
    }
    out.push_str(&sql[copied.min(sql.len())..]);
    Rewritten {
        sql: out,
        occurrences,
    }
}

fn is_since_at(bytes: &[u8], i: usize) -> bool {
    let word = b":since";
    if bytes.len() < i + word.len() || !bytes[i..i + word.len()].eq_ignore_ascii_case(word) {
        return false;
    }
    let before_ok = i == 0 || !is_ident(bytes[i - 1]);
    // `:since::timestamptz` is the parameter followed by a cast.
    let after_ok = bytes
        .get(i + word.len())
        .is_none_or(|&b| b == b':' || !is_ident(b));
    before_ok && after_ok
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b == b':'
}

/// PostgreSQL's `E'...'` strings and every MySQL string treat `\` as an escape.
fn backslash_escapes(backend: Backend, bytes: &[u8], quote_at: usize) -> bool {
    match backend {
        Backend::MySql => true,
        Backend::Postgres => {
            quote_at > 0
                && matches!(bytes[quote_at - 1], b'E' | b'e')
                && (quote_at < 2 || !is_ident(bytes[quote_at - 2]))
        }
        Backend::Sqlite => false,
    }
}

/// Index just past the closing quote; a doubled quote is an escaped quote.
fn end_of_quoted(bytes: &[u8], start: usize, quote: u8, backslash: bool) -> usize {
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if backslash => i += 2,
            b if b == quote => {
                if bytes.get(i + 1) == Some(&quote) {
                    i += 2;
                } else {
                    return i + 1;
                }
            }
            _ => i += 1,
        }
    }
    bytes.len()
}

fn end_of_line(bytes: &[u8], start: usize) -> usize {
    bytes[start..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |p| start + p + 1)
}

fn end_of_block_comment(bytes: &[u8], start: usize, nested: bool) -> usize {
    let mut depth = 0;
    let mut i = start;
    while i + 1 < bytes.len() {
        if bytes[i] == b'/' && bytes[i + 1] == b'*' && (nested || depth == 0) {
            depth += 1;
            i += 2;
        } else if bytes[i] == b'*' && bytes[i + 1] == b'/' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    bytes.len()
}

/// PostgreSQL dollar quoting: `$tag$ ... $tag$` (a `$1` placeholder is no quote).
fn dollar_quote_end(bytes: &[u8], start: usize) -> Option<usize> {
    if start > 0 && is_ident(bytes[start - 1]) {
        return None;
    }
    let tag_len = bytes[start + 1..].iter().position(|&b| b == b'$')?;
    let tag = &bytes[start..start + tag_len + 2];
    if tag[1..tag.len() - 1]
        .iter()
        .any(|&b| !(b.is_ascii_alphanumeric() || b == b'_'))
        || tag.get(1).is_some_and(u8::is_ascii_digit)
    {
        return None;
    }
    let body = start + tag.len();
    let end = bytes[body..]
        .windows(tag.len())
        .position(|w| w == tag)
        .map_or(bytes.len(), |p| body + p + tag.len());
    Some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(sql: &str) -> (String, usize) {
        let r = rewrite_since(sql, Backend::Postgres, "$1");
        (r.sql, r.occurrences)
    }

    #[test]
    fn replaces_the_parameter_everywhere_it_is_code() {
        assert_eq!(
            pg("SELECT * FROM t WHERE a >= :since OR b >= :since"),
            ("SELECT * FROM t WHERE a >= $1 OR b >= $1".into(), 2)
        );
        assert_eq!(pg("WHERE x>=:since)"), ("WHERE x>=$1)".into(), 1));
    }

    #[test]
    fn leaves_casts_strings_and_comments_alone() {
        let sql = "SELECT ':since', \"a:since\", x::date, $$ :since $$, $t$:since$t$ -- :since\n\
                   /* :since /* nested :since */ */ FROM t WHERE u >= :since::timestamptz";
        let (out, n) = pg(sql);
        assert_eq!(n, 1);
        assert!(out.ends_with("WHERE u >= $1::timestamptz"), "{out}");
        assert!(
            out.contains("':since'") && out.contains("$$ :since $$") && out.contains("-- :since")
        );
        assert_eq!(
            pg("SELECT :sinceX, a::since"),
            ("SELECT :sinceX, a::since".into(), 0)
        );
    }

    #[test]
    fn mysql_escapes_and_hash_comments() {
        let r = rewrite_since(
            "SELECT 'it\\'s :since', `:since` # :since\nFROM t WHERE u >= :since",
            Backend::MySql,
            "?",
        );
        assert_eq!(r.occurrences, 1);
        assert!(r.sql.ends_with("WHERE u >= ?"));
    }

    #[test]
    fn postgres_e_strings_escape_quotes() {
        let (out, n) = pg("SELECT E'\\' :since' WHERE u >= :since");
        assert_eq!(n, 1);
        assert!(out.ends_with("u >= $1"));
    }
}
