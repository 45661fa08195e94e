//! Compares what arrived on the stream with every committed version.
//!
//! Polling sees states, not every write, so not every version must arrive.
//! What must, and what is counted as lost when missing:
//!
//! - the final version of every row (the agent had time to catch up);
//! - every version that stayed the row's committed state during the whole of
//!   a cycle that completed: from after its commit returned to before the
//!   next version's commit was sent, the cycle's start (its log line's time
//!   minus its duration) and end (the log line's time) in between. That
//!   cycle read it (its window reaches back `lookback` from a watermark no
//!   later than the commit, and every transaction is shorter than the
//!   look-back, or the window reaches back to it: the oldest open
//!   transaction, up to `max_lookback`), so it emitted it or found it
//!   already on the stream.
//!   With several agents the cycles of all of them count: a cycle is logged
//!   as completed only when its commit went through, and with leases a
//!   commit goes through only if every write of the cycle did (the fence
//!   refuses a stale holder's). Their cycles may overlap (a paused agent's
//!   last one around its successor's), so any completed cycle inside the
//!   interval will do, not only the first one to start.
//!
//! Every message must be a committed version (same columns, same cursor),
//! per key the versions must increase (`v` order is commit order, the writes
//! bump `v` under the row lock), and no (key, version) may arrive twice. A
//! message whose version is below one already on the stream for its key is
//! out of order, whether or not it arrived before (a stale writer re-sending
//! an old version counts as both out of order and duplicated).

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::common::Message;
use crate::model::agent::CycleSpan;
use crate::model::workload::{CommitTiming, RowVersion};

/// The figures of one check.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    /// Committed versions (audit rows).
    pub versions: usize,
    /// Versions the rule above says must be on the stream.
    pub required: usize,
    /// Messages on the stream.
    pub emitted: usize,
    pub lost: usize,
    /// Messages whose (key, version) arrived before.
    pub duplicated: usize,
    /// Messages whose version is below the highest already on the stream
    /// for their key.
    pub out_of_order: usize,
    /// Messages that match no committed version.
    pub phantom: usize,
    /// Rows whose last message is not the row as it is now.
    pub final_mismatch: usize,
    /// Messages of a partitioned entity on another stream than the one
    /// their key's CRC-32 names (see [`misplaced`]); set by the run.
    pub misplaced: usize,
    /// Completed cycles the rule used.
    pub cycles: usize,
    /// Versions with the same cursor value as the row's previous version
    /// (two commits in one second on a 1-second `DATETIME`), and how many
    /// of them arrived.
    pub ties: usize,
    pub ties_arrived: usize,
    /// Versions stamped earlier than the row's previous version (a held
    /// transaction, a clock ahead): commit order is not cursor order.
    pub inversions: usize,
    pub inversions_arrived: usize,
    /// A few examples of each problem, for the failure message.
    pub examples: Vec<String>,
}

impl Counts {
    pub fn figures(&self) -> String {
        format!(
            "versions={} required={} emitted={} lost={} duplicated={} out_of_order={} phantom={} final_mismatch={} cycles={} ties={}/{} inversions={}/{}",
            self.versions,
            self.required,
            self.emitted,
            self.lost,
            self.duplicated,
            self.out_of_order,
            self.phantom,
            self.final_mismatch,
            self.cycles,
            self.ties_arrived,
            self.ties,
            self.inversions_arrived,
            self.inversions,
        )
    }

    fn example(&mut self, text: String) {
        if self.examples.len() < 12 {
            self.examples.push(text);
        }
    }
}

/// Margin (µs) around the instants compared with log times.
const MARGIN_US: i64 = 1_000;

/// Checks `messages` (stream order) against `audit` (every committed
/// version, commit order), `finals` (the rows now), the commits' `timings`
/// and the completed `cycles`.
pub fn check(
    audit: &[RowVersion],
    finals: &[RowVersion],
    timings: &HashMap<(i64, i64), CommitTiming>,
    messages: &[Message],
    cycles: &[CycleSpan],
) -> Counts {
    let mut counts = Counts {
        versions: audit.len(),
        emitted: messages.len(),
        cycles: cycles.len(),
        ..Counts::default()
    };
    let cycles = Cycles::new(cycles);

    // Per key, the audit's commit order must be the version order: else the
    // harness, not the agent, is wrong.
    let mut by_key: BTreeMap<i64, Vec<&RowVersion>> = BTreeMap::new();
    for version in audit {
        let versions = by_key.entry(version.id).or_default();
        if let Some(last) = versions.last() {
            assert!(
                version.v == last.v + 1,
                "harness: audit of row {} has v={} after v={}",
                version.id,
                version.v,
                last.v
            );
        } else {
            assert_eq!(version.v, 1, "harness: row {} starts at v=1", version.id);
        }
        versions.push(version);
    }
    let known: HashMap<(i64, i64), &RowVersion> = audit.iter().map(|r| ((r.id, r.v), r)).collect();

    // The stream, message by message.
    let mut arrived: HashSet<(i64, i64)> = HashSet::new();
    let mut highest: HashMap<i64, i64> = HashMap::new();
    let mut last_of: HashMap<i64, (i64, i64)> = HashMap::new();
    for message in messages {
        let Some((id, v)) = identify(message) else {
            counts.phantom += 1;
            counts.example(format!("unreadable message {message:?}"));
            continue;
        };
        match known.get(&(id, v)) {
            Some(version) if matches(message, version) => {}
            Some(version) => {
                counts.phantom += 1;
                counts.example(format!(
                    "message {} differs from committed {version:?}",
                    message.id
                ));
            }
            None => {
                counts.phantom += 1;
                counts.example(format!(
                    "message {} is row {id} v={v}, never committed",
                    message.id
                ));
            }
        }
        if !arrived.insert((id, v)) {
            counts.duplicated += 1;
            counts.example(format!("row {id} v={v} arrived again ({})", message.id));
        }
        if highest.get(&id).is_some_and(|&h| v < h) {
            counts.out_of_order += 1;
            counts.example(format!(
                "row {id} v={v} arrived after v={} ({})",
                highest[&id], message.id
            ));
        }
        let h = highest.entry(id).or_insert(v);
        *h = (*h).max(v);
        last_of.insert(id, (id, v));
    }

    // What must have arrived.
    for (id, versions) in &by_key {
        for (i, version) in versions.iter().enumerate() {
            if let Some(previous) = i.checked_sub(1).map(|p| versions[p]) {
                let arrived = usize::from(arrived.contains(&(version.id, version.v)));
                if version.epoch == previous.epoch {
                    counts.ties += 1;
                    counts.ties_arrived += arrived;
                } else if version.epoch < previous.epoch {
                    counts.inversions += 1;
                    counts.inversions_arrived += arrived;
                }
            }
            let is_last = i + 1 == versions.len();
            let required = is_last || {
                let from = timings.get(&(version.id, version.v)).map(|t| t.done);
                let until = versions
                    .get(i + 1)
                    .and_then(|next| timings.get(&(next.id, next.v)))
                    .map(|t| t.sent);
                match (from, until) {
                    (Some(from), Some(until)) => cycles.one_within(from, until),
                    // A commit whose outcome the writer did not see: no claim.
                    _ => false,
                }
            };
            if required {
                counts.required += 1;
                if !arrived.contains(&(version.id, version.v)) {
                    counts.lost += 1;
                    counts.example(format!(
                        "lost: row {id} v={} ({}){}",
                        version.v,
                        if is_last {
                            "its final version"
                        } else {
                            "the row's state during a whole cycle"
                        },
                        timings
                            .get(&(version.id, version.v))
                            .map(|t| format!(", committed at {}", t.done))
                            .unwrap_or_default()
                    ));
                }
            }
        }
    }

    // The last message of each row is the row as it is now.
    for row in finals {
        match last_of.get(&row.id) {
            Some(&(_, v)) if v == row.v => {}
            other => {
                counts.final_mismatch += 1;
                counts.example(format!(
                    "row {} is at v={}, its last message is {:?}",
                    row.id,
                    row.v,
                    other.map(|&(_, v)| v)
                ));
            }
        }
    }
    counts
}

/// The completed cycles, by start, with the earliest end among the cycles
/// from each one on: the cycles of several agents may overlap, so the first
/// one to start after an instant is not always the first to end.
struct Cycles {
    spans: Vec<CycleSpan>,
    earliest_end_from: Vec<i64>,
}

impl Cycles {
    fn new(cycles: &[CycleSpan]) -> Cycles {
        let mut spans = cycles.to_vec();
        spans.sort_by_key(|c| c.start);
        let mut earliest_end_from = vec![i64::MAX; spans.len()];
        let mut earliest = i64::MAX;
        for (i, span) in spans.iter().enumerate().rev() {
            earliest = earliest.min(span.end);
            earliest_end_from[i] = earliest;
        }
        Cycles {
            spans,
            earliest_end_from,
        }
    }

    /// Did a completed cycle run entirely within `[from, until]`?
    fn one_within(&self, from: i64, until: i64) -> bool {
        let first = self.spans.partition_point(|c| c.start < from + MARGIN_US);
        self.earliest_end_from
            .get(first)
            .is_some_and(|&end| end + MARGIN_US <= until)
    }
}

/// The messages of partition streams `0..N` (`streams[p]` read from
/// `<stream>:p`) that are not where `crc32(pkey) % N` puts them: how many,
/// and a few examples. A key always goes to the same partition, so a key
/// found on two streams is misplaced on at least one of them.
pub fn misplaced(streams: &[Vec<Message>]) -> (usize, Vec<String>) {
    let n = streams.len() as u32;
    let mut count = 0;
    let mut examples = Vec::new();
    for (p, messages) in streams.iter().enumerate() {
        for message in messages {
            let expected = (crc32(message.pkey.as_bytes()) % n) as usize;
            if expected != p {
                count += 1;
                if examples.len() < 12 {
                    examples.push(format!(
                        "misplaced: row {} on partition {p} ({}), crc32 % {n} names partition {expected}",
                        message.pkey, message.id
                    ));
                }
            }
        }
    }
    (count, examples)
}

/// CRC-32 as zlib computes it (IEEE 802.3, reflected, polynomial
/// 0xEDB88320), bit by bit: the checker's own, not highwater's.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// (id, v) from the message's payload.
fn identify(message: &Message) -> Option<(i64, i64)> {
    let payload = message.payload.as_ref()?;
    Some((payload["id"].as_i64()?, payload["v"].as_i64()?))
}

/// The message carries exactly this version: key, cursor, columns, op.
fn matches(message: &Message, version: &RowVersion) -> bool {
    let Some(payload) = message.payload.as_ref() else {
        return false;
    };
    let updated_at = payload["updated_at"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp_micros());
    message.pkey == version.id.to_string()
        && message.epoch == version.epoch
        && message.op == if version.deleted { "delete" } else { "upsert" }
        && payload["name"] == version.name.as_str()
        && payload["deleted"] == version.deleted
        && updated_at == Some(version.epoch)
        && payload.as_object().is_some_and(|o| o.len() == 5)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(id: i64, v: i64) -> RowVersion {
        RowVersion {
            id,
            v,
            name: format!("n{v}"),
            deleted: false,
            epoch: 1_000_000 * v,
        }
    }

    fn message(n: usize, r: &RowVersion) -> Message {
        Message {
            id: format!("{n}-0"),
            pkey: r.id.to_string(),
            epoch: r.epoch,
            variant: "items".into(),
            op: "upsert".into(),
            payload: Some(serde_json::json!({
                "id": r.id, "v": r.v, "name": r.name, "deleted": r.deleted,
                "updated_at": chrono::DateTime::from_timestamp_micros(r.epoch).unwrap().to_rfc3339(),
            })),
        }
    }

    fn timing(sent: i64) -> CommitTiming {
        CommitTiming {
            sent,
            done: sent + 100,
        }
    }

    #[test]
    fn crc32_is_zlibs_and_misplaced_messages_are_counted() {
        // The standard check value; zlib.crc32(b"42") and (b"7") in Python.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"42"), 841_265_288);
        assert_eq!(crc32(b"7"), 1_790_921_346);
        // With 4 partitions, zlib puts rows 1, 2, 4 on 3, 1, 0.
        let on = |ids: &[i64]| -> Vec<Message> {
            ids.iter()
                .map(|&id| message(id as usize, &version(id, 1)))
                .collect()
        };
        let right = [on(&[4]), on(&[2]), vec![], on(&[1])];
        assert_eq!(misplaced(&right).0, 0);
        let wrong = [on(&[4, 1]), on(&[2]), on(&[2]), on(&[1])];
        assert_eq!(misplaced(&wrong).0, 2, "row 1 on 0, row 2 on 2");
    }

    #[test]
    fn the_checker_counts_each_kind_of_failure() {
        // Row 1: v1 stable during the cycle [10_000, 20_000], v2 replaced it
        // at 50_000, v3 final. Row 2: only v1.
        let audit = [version(1, 1), version(1, 2), version(1, 3), version(2, 1)];
        let timings = HashMap::from([
            ((1, 1), timing(1_000)),
            ((1, 2), timing(50_000)),
            ((1, 3), timing(60_000)),
            ((2, 1), timing(1_000)),
        ]);
        let cycles = [CycleSpan {
            start: 10_000,
            end: 20_000,
        }];
        let finals = [version(1, 3), version(2, 1)];

        let perfect = [
            message(1, &audit[0]),
            message(2, &audit[2]),
            message(3, &audit[3]),
        ];
        let counts = check(&audit, &finals, &timings, &perfect, &cycles);
        assert_eq!(
            (
                counts.lost,
                counts.duplicated,
                counts.out_of_order,
                counts.phantom,
                counts.final_mismatch
            ),
            (0, 0, 0, 0, 0),
            "{counts:?}"
        );
        // v1 (stable during the cycle) and both finals; v2 lived between cycles.
        assert_eq!(counts.required, 3);

        let broken = [
            message(1, &audit[2]),
            message(2, &audit[1]),
            message(3, &audit[2]),
        ];
        let counts = check(&audit, &finals, &timings, &broken, &cycles);
        assert_eq!(counts.lost, 2, "row 1 v1 and row 2 v1: {counts:?}");
        assert_eq!(counts.out_of_order, 1, "v2 after v3: {counts:?}");
        assert_eq!(counts.duplicated, 1, "v3 twice: {counts:?}");
        assert_eq!(counts.final_mismatch, 1, "row 2 never arrived: {counts:?}");

        // A stale writer sends v1 again after v3: twice, and back in time.
        let stale = [
            message(1, &audit[0]),
            message(2, &audit[2]),
            message(3, &audit[0]),
            message(4, &audit[3]),
        ];
        let counts = check(&audit, &finals, &timings, &stale, &cycles);
        assert_eq!(
            (counts.duplicated, counts.out_of_order),
            (1, 1),
            "{counts:?}"
        );
        assert_eq!(counts.final_mismatch, 1, "row 1 ends at v1: {counts:?}");

        // Two agents: a long cycle of one (paused in its middle) around a
        // short one of the other. v1 was stable during the short one.
        let overlapping = [
            CycleSpan {
                start: 5_000,
                end: 55_000,
            },
            CycleSpan {
                start: 10_000,
                end: 20_000,
            },
        ];
        let counts = check(&audit, &finals, &timings, &broken, &overlapping);
        assert_eq!(counts.required, 3, "{counts:?}");
        assert_eq!(counts.lost, 2, "row 1 v1 and row 2 v1: {counts:?}");

        let mut forged = message(1, &audit[0]);
        forged.payload.as_mut().unwrap()["name"] = "other".into();
        let counts = check(&audit, &finals, &timings, &[forged], &cycles);
        assert_eq!(counts.phantom, 1, "{counts:?}");
    }
}
