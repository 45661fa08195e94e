//! One cycle of one entity: read the watermark, read the database's clock,
//! stream the window `cursor >= W - lookback` through the dedup script in
//! chunks, then commit the new watermark.
//!
//! The watermark moves only after the whole window was read: a cycle that
//! fails or is stopped half-way leaves it where it was, and the next cycle
//! re-reads the same window (the dedup state filters what was already sent).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;

use crate::change::Change;
use crate::config::{CursorKind, EntitySettings, OnStateLoss};
use crate::sink::{
    Commit, CycleFigures, EntityKeys, LeaseRenewal, Link, Sink, SinkError, StateSnapshot,
};
use crate::source::{Prepared, RawRow, Scratch, Sessions, Source, SourceError, BEGINNING};

/// Why a cycle failed.
#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("entity {entity}: Redis lost this entity's state ({evidence}); not starting over silently. Restore Redis (and run it with persistence), or set on_state_loss = \"resnapshot\" to re-read everything the query returns")]
    StateLost { entity: String, evidence: String },
    /// Another agent holds the entity now (`holder`, its lease value), or
    /// the lease expired: this cycle wrote nothing after that, and stops.
    /// `refused`: a chunk or the commit was refused by the fence (else the
    /// state read at cycle start found the lease gone).
    #[error("entity {entity}: this agent no longer holds its lease ({})", holder.as_deref().map_or("it expired", crate::lease::holder_of))]
    LeaseLost {
        entity: String,
        holder: Option<String>,
        refused: bool,
    },
    /// The entity's state in Redis was written with another `partitions`.
    #[error("entity {entity}: its state in Redis was written with partitions = {was}, the config says {now}: a key would move to another stream and lose its order. Set partitions = {was} again, or start the entity over: delete its streams and state keys (`highwater status` names the streams) and let it re-read (start = \"beginning\")")]
    PartitionsChanged { entity: String, was: u32, now: u32 },
}

impl CycleError {
    /// Worth retrying unchanged (see the source and sink classifications).
    pub fn is_transient(&self) -> bool {
        match self {
            CycleError::Source(e) => e.is_transient(),
            CycleError::Sink(e) => e.is_transient(),
            CycleError::StateLost { .. } => false,
            CycleError::LeaseLost { .. } => true,
            CycleError::PartitionsChanged { .. } => false,
        }
    }
}

/// How many of a stream's latest entries are searched for an entity's own
/// messages when its state is missing.
const LOSS_EVIDENCE_DEPTH: usize = 1000;

/// What an entity's poller remembers between cycles of one process.
#[derive(Debug, Default)]
pub struct EntityMemory {
    /// A cycle of this process found or created the entity's state in Redis.
    pub had_state: bool,
    /// Fingerprints of the rows the last complete cycle confirmed as the
    /// last emitted version of their key in Redis. A row whose fingerprint
    /// is here is skipped without being decoded or sent: an unchanged
    /// re-scan costs no Redis command per row. Rebuilt every cycle from that
    /// cycle's rows only, so a key that went A → B → A is asked about again.
    confirmed: Confirmed,
    /// The state's write counter when `confirmed` was built; a different
    /// value at cycle start means the state changed behind this process's
    /// back (lost, reset, another agent) and `confirmed` is dropped.
    writes: Option<Vec<i64>>,
    /// This process runs one cycle only (`once`): building `confirmed`
    /// would cost 8 bytes per row for nothing.
    single_cycle: bool,
    /// The transaction last warned about as open longer than `max_lookback`
    /// (its identity): each is warned about once.
    beyond_max: Option<String>,
}

impl EntityMemory {
    /// Forgets what was confirmed: another agent may write the entity's
    /// state from now on, so Redis decides every row again.
    pub fn forget(&mut self) {
        self.confirmed.clear();
        self.writes = None;
    }

    /// The memory of a process that runs one cycle and exits: it remembers nothing.
    pub fn single_cycle() -> EntityMemory {
        EntityMemory {
            single_cycle: true,
            ..EntityMemory::default()
        }
    }
}

/// A set of row fingerprints: sorted, plus where each run of equal top
/// bits starts. A lookup reads the two neighbouring starts and a couple of
/// adjacent hashes (about two cache misses) where a binary search over
/// millions of hashes misses the cache a dozen times per row — most of an
/// unchanged re-scan's CPU. The hashes are XXH3 outputs, so the top bits
/// spread them evenly; the index costs about 2 bytes per hash.
#[derive(Debug, Default)]
struct Confirmed {
    hashes: Vec<u64>,
    /// `starts[b]..starts[b + 1]` are the hashes whose top bits equal `b`.
    starts: Vec<u32>,
    /// 64 minus the number of top bits indexed.
    shift: u32,
}

impl Confirmed {
    fn new(mut hashes: Vec<u64>) -> Confirmed {
        // Beyond u32 positions the index cannot point; such a window is
        // simply not remembered (Redis decides every row, as without memory).
        if hashes.is_empty() || hashes.len() >= u32::MAX as usize {
            return Confirmed::default();
        }
        hashes.sort_unstable();
        // About two hashes per bucket.
        let bits = (usize::BITS - (hashes.len() / 2).leading_zeros()).clamp(1, 32);
        let shift = 64 - bits;
        let buckets = 1usize << bits;
        let mut starts = Vec::with_capacity(buckets + 1);
        let mut i = 0;
        for bucket in 0..=buckets {
            while i < hashes.len() && ((hashes[i] >> shift) as usize) < bucket {
                i += 1;
            }
            starts.push(i as u32);
        }
        Confirmed {
            hashes,
            starts,
            shift,
        }
    }

    /// Sets `known[i]` to whether `hashes[i]` is in the set. Two passes, so
    /// that the lookups' cache misses overlap: every bucket's bounds first
    /// (independent loads, no branch on their values), then the hashes within.
    fn contains_each(&self, hashes: &[u64], bounds: &mut Vec<(u32, u32)>, known: &mut Vec<bool>) {
        known.clear();
        if self.hashes.is_empty() {
            known.resize(hashes.len(), false);
            return;
        }
        bounds.clear();
        bounds.extend(hashes.iter().map(|&hash| {
            let bucket = (hash >> self.shift) as usize;
            (self.starts[bucket], self.starts[bucket + 1])
        }));
        known.extend(
            hashes
                .iter()
                .zip(bounds.iter())
                .map(|(hash, &(from, to))| self.hashes[from as usize..to as usize].contains(hash)),
        );
    }

    fn len(&self) -> usize {
        self.hashes.len()
    }

    fn clear(&mut self) {
        *self = Confirmed::default();
    }
}

/// Rows for the dedup script, with the fingerprint each was read with.
struct Chunk {
    changes: Vec<Change>,
    fingerprints: Vec<u64>,
}

impl Chunk {
    fn with_capacity(rows: usize) -> Chunk {
        Chunk {
            changes: Vec::with_capacity(rows),
            fingerprints: Vec::with_capacity(rows),
        }
    }

    fn len(&self) -> usize {
        self.changes.len()
    }

    fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    fn push(&mut self, change: Change, fingerprint: u64) {
        self.changes.push(change);
        self.fingerprints.push(fingerprint);
    }
}

/// How many chunks of a cycle may be in Redis's hands at once (sent, not
/// answered). Two keep Redis busy while the agent reads the next chunk; the
/// others absorb the bursts of the source's reads.
pub const CHUNKS_IN_FLIGHT: usize = 4;

/// A chunk sent to the dedup script: its rows (confirmed in the agent's
/// memory once applied) and the reply to come (`early`: it came at once,
/// e.g. an error).
struct InFlight<'a> {
    chunk: Chunk,
    reply: BoxFuture<'a, Result<(u64, i64), SinkError>>,
    early: Option<Result<(u64, i64), SinkError>>,
}

/// Reads a window into chunks, skipping rows below the window and rows the
/// agent's memory confirms as already emitted; only the rest are decoded.
struct Window<'a> {
    source: &'a Source,
    prepared: &'a Prepared,
    rows: futures_util::stream::BoxStream<'a, Result<RawRow, SourceError>>,
    since: i64,
    chunk_rows: usize,
    confirmed: &'a Confirmed,
    /// Collect `next_confirmed` (not for a single cycle).
    remember: bool,
    next_confirmed: Vec<u64>,
    /// Rows read and not yet sorted (kept to reuse the allocation).
    pending: Vec<RawRow>,
    /// Scratch for the memory lookups of `pending`: fingerprints, bucket
    /// bounds, and which rows the memory knows.
    fingerprints: Vec<u64>,
    bounds: Vec<(u32, u32)>,
    known_rows: Vec<bool>,
    scratch: Scratch,
    max_epoch: Option<i64>,
    read: u64,
    below_window: u64,
}

impl Window<'_> {
    /// Fills `chunk` up to `chunk_rows`; `Ok(true)` when the window is exhausted.
    async fn fill(&mut self, chunk: &mut Chunk) -> Result<bool, SourceError> {
        while chunk.len() < self.chunk_rows {
            let wanted = self.chunk_rows - chunk.len();
            let mut pending = std::mem::take(&mut self.pending);
            let mut ended = false;
            while pending.len() < wanted {
                let Some(row) = self.rows.next().await else {
                    ended = true;
                    break;
                };
                match row {
                    Ok(row) => pending.push(row),
                    Err(error) => {
                        pending.clear();
                        self.pending = pending;
                        return Err(error);
                    }
                }
            }
            self.read += pending.len() as u64;
            let sorted = self.sort(&mut pending, chunk);
            self.pending = pending;
            sorted?;
            if ended {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Empties `rows` into: rows below the window (counted, ignored), rows
    /// the memory knows (remembered again, not decoded) and the rest
    /// (decoded into `chunk`). The memory lookups run first, for the whole
    /// batch, so that the CPU overlaps their cache misses (a lookup between
    /// two rows' decoding could not).
    fn sort(&mut self, rows: &mut Vec<RawRow>, chunk: &mut Chunk) -> Result<(), SourceError> {
        self.fingerprints.clear();
        self.fingerprints
            .extend(rows.iter().map(|row| row.fingerprint));
        self.confirmed
            .contains_each(&self.fingerprints, &mut self.bounds, &mut self.known_rows);
        for (row, &known) in rows.drain(..).zip(&self.known_rows) {
            let fingerprint = row.fingerprint;
            // A row whose cursor did not decode is decoded in full, which
            // reports why.
            let epoch = match row.epoch {
                Some(epoch) if epoch < self.since => {
                    self.below_window += 1;
                    continue;
                }
                Some(epoch) if known => {
                    self.next_confirmed.push(fingerprint);
                    epoch
                }
                _ => {
                    let change = self.source.decode(self.prepared, row, &mut self.scratch)?;
                    if change.epoch < self.since {
                        self.below_window += 1;
                        continue;
                    }
                    let epoch = change.epoch;
                    chunk.push(change, fingerprint);
                    epoch
                }
            };
            self.max_epoch = Some(self.max_epoch.map_or(epoch, |m| m.max(epoch)));
        }
        Ok(())
    }

    /// After the dedup script applied `chunk`, each row's digest is the last
    /// emitted one of its key (emitted now or before).
    fn confirm(&mut self, chunk: &Chunk) {
        if self.remember {
            self.next_confirmed.extend(&chunk.fingerprints);
        }
    }
}

/// What one cycle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CycleReport {
    pub entity: String,
    /// Rows the query returned.
    pub rows: u64,
    /// Rows written to the stream.
    pub emitted: u64,
    /// Rows whose version was already on the stream.
    pub skipped: u64,
    /// Rows the query returned although their cursor is before the window
    /// (the query does not filter on `:since`): ignored, they may have been trimmed.
    pub below_window: u64,
    pub duration: Duration,
    /// The window's start epoch.
    pub since: i64,
    /// The watermark after the cycle (`None`: not committed or never set).
    pub watermark: Option<i64>,
    /// Stopped between chunks by a shutdown: the watermark did not move.
    pub interrupted: bool,
    /// The database's clock at cycle start (time cursors), microseconds.
    pub db_now: Option<i64>,
    /// When the cycle started, this machine's clock, milliseconds since 1970.
    pub started_at_ms: i64,
    /// Keys in the dedup set and entries in the stream after the commit
    /// (`None`: the cycle did not commit).
    pub sizes: Option<(u64, u64)>,
    /// What the commit's stream retention did, per stream (empty: the
    /// cycle did not commit).
    pub retained: Vec<(String, crate::retention::Retained)>,
    /// How much earlier than `W - lookback` the window started
    /// (microseconds): an open transaction stretched it.
    pub extension: i64,
    /// The oldest open transaction the clock read saw (time cursors, where
    /// the source shows other sessions).
    pub horizon: Option<crate::source::OpenTransaction>,
    /// A transaction open longer than `max_lookback` was seen for the first
    /// time (warned about, counted).
    pub beyond_max: bool,
}

/// Runs one cycle. `stop` turning true ends the cycle after the chunk in
/// flight, without committing. `lease`: the caller's lease value and how
/// long a renewal lasts; every write is fenced with it (the state read
/// renews it), and a write refused as stale ends the cycle with
/// [`CycleError::LeaseLost`]. `None` writes unfenced.
pub async fn run_cycle(
    entity: &EntitySettings,
    source: &Source,
    prepared: &Prepared,
    sink: &Sink,
    stop: &watch::Receiver<bool>,
    memory: &mut EntityMemory,
    lease: Option<(&str, Duration)>,
) -> Result<CycleReport, CycleError> {
    let started = Instant::now();
    let started_at_ms = chrono::Utc::now().timestamp_millis();
    let partitioned = entity.partitions > 1;
    let lane_keys = sink.partition_keys(entity);
    // One stream: the lease itself fences every write. Partitions live in
    // other slots than the lease: they are fenced by its token
    // (lua/dedup.lua).
    let token_fence = lease
        .filter(|_| partitioned)
        .map(|(value, _)| format!("#{}", crate::lease::parse_value(value).0.unwrap_or(0)));
    let fence: Option<&str> = match &token_fence {
        Some(token) => Some(token),
        None => lease.map(|(value, _)| value),
    };

    let states = read_states(entity, sink, &lane_keys, lease).await?;
    let lost = find_loss(entity, sink, memory, &lane_keys, &states).await?;
    let mut resnapshot = false;
    if let Some(evidence) = lost {
        match entity.on_state_loss {
            OnStateLoss::Fail => {
                return Err(CycleError::StateLost {
                    entity: entity.name.clone(),
                    evidence,
                })
            }
            OnStateLoss::Resnapshot => {
                tracing::error!(
                    entity = %entity.name,
                    evidence = %evidence,
                    "redis lost this entity's state: re-reading everything the query returns (on_state_loss = \"resnapshot\"); consumers will see rows again"
                );
                resnapshot = true;
            }
        }
    }
    // The clock (and what it saw of open transactions) is read before the
    // window's snapshot is taken: every change committed after the snapshot
    // carries a cursor >= T0 - (transaction length), or belongs to a
    // transaction open at T0.
    let (t0, sessions) = match entity.cursor_kind {
        CursorKind::Time => {
            let clock = source.clock(crate::window::extends(entity)).await?;
            (Some(clock.now), clock.sessions)
        }
        CursorKind::Version => (None, Sessions::Unseen),
    };
    // Each partition's window as if it were alone; the cycle reads from the
    // earliest, and each partition ignores what is below its own (it was
    // read and committed there before; its digests may be trimmed).
    let windows: Vec<crate::window::Window> = states
        .iter()
        .map(|state| {
            let watermark = if resnapshot { None } else { state.watermark };
            crate::window::start(entity, watermark, t0, &state.window, &sessions)
        })
        .collect();
    let lane_since: Vec<i64> = windows
        .iter()
        .map(|w| {
            if resnapshot {
                BEGINNING
            } else {
                source.bound_since(prepared, w.since)
            }
        })
        .collect();
    let earliest = (0..windows.len())
        .min_by_key(|&i| lane_since[i])
        .unwrap_or(0);
    let window = &windows[earliest];
    let since = lane_since[earliest];
    let beyond_max = window
        .beyond_max
        .as_ref()
        .filter(|t| memory.beyond_max.as_deref() != Some(&t.identity()));
    if let Some(t) = beyond_max {
        memory.beyond_max = Some(t.identity());
        tracing::warn!(
            entity = %entity.name,
            source = %entity.source,
            transaction = %t.who,
            user = %t.user,
            started = %crate::change::format_timestamp(t.since),
            max_lookback = %humantime::format_duration(Duration::from_micros(entity.max_lookback.unsigned_abs())),
            "a transaction has been open longer than max_lookback: the window stops at max_lookback, and rows it stamped earlier are missed when it commits"
        );
    }

    let mut report = CycleReport {
        entity: entity.name.clone(),
        rows: 0,
        emitted: 0,
        skipped: 0,
        below_window: 0,
        duration: Duration::ZERO,
        since,
        watermark: states.iter().map(|s| s.watermark).min().flatten(),
        interrupted: false,
        db_now: t0,
        started_at_ms,
        sizes: None,
        retained: Vec::new(),
        extension: if resnapshot { 0 } else { window.extension },
        horizon: crate::window::horizon(&sessions).cloned(),
        beyond_max: beyond_max.is_some(),
    };
    // The agent's memory of confirmed versions is valid only while nobody
    // else wrote this entity's state since this process last did.
    let writes_now: Vec<i64> = states.iter().map(|s| s.writes).collect();
    if memory.writes.as_ref() != Some(&writes_now) {
        memory.confirmed.clear();
    }
    let tracked: u64 = states.iter().map(|s| s.tracked).sum();
    let mut window = Window {
        source,
        prepared,
        rows: source.changes(prepared, since),
        since,
        // Over N partitions a chunk read is N times as large, so that each
        // partition's share is about `chunk_rows` rows per script call.
        chunk_rows: entity.chunk_rows * lane_keys.len(),
        confirmed: &memory.confirmed,
        remember: !memory.single_cycle,
        // Sized for a window like the last one (the keys Redis tracks):
        // no regrowth, and no copy of millions of hashes, while the cycle runs.
        next_confirmed: Vec::with_capacity(if memory.single_cycle {
            0
        } else {
            let tracked = usize::try_from(tracked).unwrap_or(0).min(1 << 26);
            let expected = memory.confirmed.len().max(tracked);
            expected + expected / 16
        }),
        // Grows to what the window needs (a small one stays small).
        pending: Vec::new(),
        fingerprints: Vec::new(),
        bounds: Vec::new(),
        known_rows: Vec::new(),
        scratch: Scratch::default(),
        max_epoch: None,
        read: 0,
        below_window: 0,
    };
    let cycle = format!("{:016x}", rand::random::<u64>());
    let mut lanes: Vec<Lane<'_>> = lane_keys
        .iter()
        .zip(&states)
        .zip(&lane_since)
        .map(|((keys, state), &since)| Lane {
            keys,
            since,
            // From here on the state hash must not vanish: the scripts
            // check it, so that a loss during the cycle is not recreated as
            // a fresh state.
            expect_state: state.exists,
            script_cached: false,
            in_flight: VecDeque::with_capacity(CHUNKS_IN_FLIGHT),
            sent: 0,
            last_link: None,
            expected_writes: state.writes,
            foreign_writes: false,
        })
        .collect();
    let mut progress = crate::progress::CycleProgress::start(&entity.name);
    let mut applied_chunks = 0u64;
    let mut ended = false;
    let mut read_error: Option<SourceError> = None;
    let mut failed: Option<SinkError> = None;
    loop {
        // Chunks sent and not answered yet, oldest first, per partition.
        // Once a partition's state hash exists, several travel at once, so
        // that Redis never waits for the agent to read the next one; each
        // names the one before it, and the dedup script applies it only
        // right after that one (lua/dedup.lua ARGV[6]): a chunk after one
        // that failed writes nothing. Until a chunk of the cycle was applied
        // (the dedup script is in Redis's script cache) chunks go one at a
        // time, because a chunk sent while a NOSCRIPT reply is being handled
        // would overtake the ones before it; and before the state exists,
        // the chunk that creates it must be answered before the next is
        // sent: the next one's state check depends on it.
        if !ended && !report.interrupted && lanes.iter().all(Lane::has_room) {
            let mut chunk = Chunk::with_capacity(window.chunk_rows);
            match window.fill(&mut chunk).await {
                Ok(done) => ended = done,
                Err(e) => {
                    // The chunks in flight are settled first, as applied.
                    read_error = Some(e);
                    ended = true;
                    continue;
                }
            }
            for (p, part) in split(chunk, &lanes, entity.partitions) {
                let lane = &mut lanes[p];
                lane.sent += 1;
                let name = lane.expect_state.then(|| format!("{cycle}:{}", lane.sent));
                let link = Link {
                    after: name.as_ref().and(lane.last_link.as_deref()),
                    name: name.as_deref(),
                };
                let cmd = sink.chunk_command(
                    entity,
                    lane.keys,
                    &part.changes,
                    lane.expect_state,
                    fence,
                    link,
                );
                lane.last_link = name;
                let (reply, early) = queue_now(sink.send_chunk(entity, cmd)).await;
                lane.in_flight.push_back(InFlight {
                    chunk: part,
                    reply,
                    early,
                });
            }
            continue;
        }
        // Settle the oldest chunk of a full partition (or, at the end, of
        // any that has one in flight).
        let Some(lane) = lanes
            .iter()
            .position(|l| !l.has_room() && !l.in_flight.is_empty())
            .or_else(|| lanes.iter().position(|l| !l.in_flight.is_empty()))
        else {
            break;
        };
        let lane = &mut lanes[lane];
        let Some(flight) = lane.in_flight.pop_front() else {
            break;
        };
        let applied = match flight.early {
            Some(applied) => applied,
            None => flight.reply.await,
        };
        let (emitted, writes) = match applied {
            Ok(applied) => applied,
            Err(e) => {
                // Nothing after a failed chunk counts as applied (the
                // script refuses what follows it).
                failed = Some(e);
                break;
            }
        };
        lane.script_cached = true;
        lane.expect_state |= emitted > 0;
        report.emitted += emitted;
        progress.update(window.read, report.emitted);
        // A chunk that emitted created the state hash.
        memory.had_state |= emitted > 0;
        if emitted > 0 {
            lane.expected_writes += 1;
        }
        lane.foreign_writes |= writes != lane.expected_writes;
        lane.expected_writes = writes;
        window.confirm(&flight.chunk);
        applied_chunks += 1;
        crate::fault::after_chunk(applied_chunks);
        if *stop.borrow() {
            // The chunks already sent are finished; nothing more is sent.
            report.interrupted = true;
        }
    }
    for lane in &mut lanes {
        lane.in_flight.clear();
    }
    if let Some(e) = failed {
        drop(window);
        return Err(state_vanished(entity, memory, e));
    }
    if let Some(e) = read_error {
        return Err(e.into());
    }
    report.rows = window.read;
    report.below_window = window.below_window;
    let max_epoch = window.max_epoch;
    let next_confirmed = std::mem::take(&mut window.next_confirmed);
    drop(window);
    if lanes.iter().any(|l| l.foreign_writes) || report.interrupted {
        // Someone else wrote this entity's state meanwhile (or the cycle is
        // incomplete): forget, and let Redis decide every row next time.
        memory.confirmed.clear();
        memory.writes = None;
    } else {
        memory.confirmed = Confirmed::new(next_confirmed);
        memory.writes = Some(lanes.iter().map(|l| l.expected_writes).collect());
    }
    report.skipped = report.rows - report.below_window - report.emitted;
    if report.below_window > 0 {
        tracing::warn!(
            entity = %entity.name,
            rows = report.below_window,
            "the query returned rows whose cursor is before the window start: they were ignored; filter with `cursor >= :since`"
        );
    }

    if !report.interrupted {
        crate::fault::before_commit();
        let candidate = match entity.cursor_kind {
            CursorKind::Time => t0,
            CursorKind::Version => max_epoch,
        };
        let figures = CycleFigures {
            started_at_ms,
            duration_ms: started.elapsed().as_millis() as u64,
            rows: report.rows,
            emitted: report.emitted,
            skipped: report.skipped,
            db_now: t0,
            extension: report.extension,
            horizon: report.horizon.clone(),
            partitions: entity.partitions,
        };
        // Each partition commits its own watermark; the next window starts
        // from the oldest, so a crash between two commits re-reads.
        let commits: Vec<_> = lanes
            .iter()
            .zip(&states)
            .enumerate()
            .map(|(p, (lane, state))| {
                let watermark = if resnapshot { None } else { state.watermark };
                // No later window of this partition starts before this, as the
                // database will be asked for it (src/window.rs); the script's
                // W_new is at least this one's.
                let trim_below = watermark.max(candidate).map(|w| {
                    source.bound_since(
                        prepared,
                        crate::window::trim_below(entity, w, t0, &sessions),
                    )
                });
                let figures = &figures;
                let (keys, expect_state) = (lane.keys, lane.expect_state);
                let last_chunk = lane.last_link.as_deref();
                async move {
                    if p > 0 {
                        crate::fault::between_partition_commits(p);
                    }
                    // On a replicated Redis, the cycle is done once a replica
                    // holds its writes: a failover before that may roll them
                    // back, and a version overwritten before the re-read would
                    // be gone.
                    let replicas = sink.replicas_wanted(entity, keys).await?;
                    sink.commit(
                        entity,
                        keys,
                        &Commit {
                            candidate,
                            trim_below,
                            figures,
                            expect_state,
                            fence,
                            last_chunk,
                            replicas,
                        },
                    )
                    .await
                }
            })
            .collect();
        // At once they go to their shards in parallel (one after the other
        // on one server would cost a round trip each); the crash point
        // between two of them needs them in order.
        let committed = if crate::fault::crash_between_partitions() {
            let mut all = Vec::new();
            for commit in commits {
                all.push(commit.await);
            }
            all
        } else {
            futures_util::future::join_all(commits).await
        };
        let mut sizes = (0, 0);
        let mut watermark: Option<Option<i64>> = None;
        for (lane, result) in lanes.iter().zip(committed) {
            let committed = result.map_err(|e| state_vanished(entity, memory, e))?;
            watermark = Some(match watermark {
                None => committed.watermark,
                Some(w) => w.min(committed.watermark),
            });
            sizes.0 += committed.dedup_keys;
            sizes.1 += committed.stream_entries;
            crate::retention::log_dropped(entity, &lane.keys.stream, &committed.retained);
            report
                .retained
                .push((lane.keys.stream.clone(), committed.retained));
        }
        report.watermark = watermark.flatten();
        report.sizes = Some(sizes);
        memory.had_state = true;
    } else {
        memory.had_state |= report.emitted > 0;
    }
    report.duration = started.elapsed();
    Ok(report)
}

/// Polls a Redis call once now, which queues it on its connection: calls
/// travel in the order they were first polled, and the chunks of a
/// partition must (each names the one before it). The poll runs outside
/// tokio's task budget: once the cycle's task has used up its budget (rows
/// read, replies received), a channel send answers Pending without queuing,
/// and the chunk would go out after the next one, whose chain check then
/// refuses it and fails the cycle. Returns the call, and its reply if it
/// came at once (an error, say).
async fn queue_now<'a, T>(
    call: impl std::future::Future<Output = T> + Send + 'a,
) -> (BoxFuture<'a, T>, Option<T>) {
    let mut reply = tokio::task::unconstrained(call).boxed();
    let early = futures_util::future::poll_immediate(&mut reply).await;
    (reply, early)
}

/// One partition of a cycle (the only one of an entity without partitions).
struct Lane<'a> {
    keys: &'a EntityKeys,
    /// This partition's own window start: rows below it were read and
    /// committed here by an earlier cycle.
    since: i64,
    expect_state: bool,
    script_cached: bool,
    in_flight: VecDeque<InFlight<'a>>,
    sent: u64,
    last_link: Option<String>,
    expected_writes: i64,
    foreign_writes: bool,
}

impl Lane<'_> {
    fn has_room(&self) -> bool {
        let room = if self.expect_state && self.script_cached {
            CHUNKS_IN_FLIGHT
        } else {
            1
        };
        self.in_flight.len() < room
    }
}

/// A chunk's rows by partition (`partitions` = 1: the chunk itself), each
/// non-empty part with its partition; rows below their partition's own
/// window are left out (they count as skipped).
fn split(chunk: Chunk, lanes: &[Lane<'_>], partitions: u32) -> Vec<(usize, Chunk)> {
    if chunk.is_empty() {
        return Vec::new();
    }
    if partitions <= 1 {
        return vec![(0, chunk)];
    }
    let mut parts: Vec<Chunk> = (0..lanes.len())
        .map(|_| Chunk::with_capacity(chunk.len() / lanes.len() + 1))
        .collect();
    for (change, fingerprint) in chunk.changes.into_iter().zip(chunk.fingerprints) {
        let p = crate::partition::of(&change.pkey, partitions);
        if change.epoch >= lanes[p].since {
            parts[p].push(change, fingerprint);
        }
    }
    parts
        .into_iter()
        .enumerate()
        .filter(|(_, part)| !part.is_empty())
        .collect()
}

/// What each partition's state holds at cycle start, read at once, and the
/// lease renewed. Partitions live in other slots than the lease: the lease
/// is renewed with the entity's own keys, and a state found there (the
/// entity ran without partitions) or a partition written with another
/// `partitions` is refused.
async fn read_states(
    entity: &EntitySettings,
    sink: &Sink,
    lane_keys: &[EntityKeys],
    lease: Option<(&str, Duration)>,
) -> Result<Vec<StateSnapshot>, CycleError> {
    let lost_lease = |state: &StateSnapshot| match &state.lease {
        LeaseRenewal::Lost { holder } => Some(holder.clone()),
        _ => None,
    };
    if entity.partitions <= 1 {
        let state = sink
            .snapshot(&entity.name, &lane_keys[0], lease, None)
            .await?;
        if let Some(holder) = lost_lease(&state) {
            return Err(CycleError::LeaseLost {
                entity: entity.name.clone(),
                holder,
                refused: false,
            });
        }
        if !state.exists {
            if let Some(was) = sink.partitions_written(entity).await? {
                return Err(partitions_changed(entity, was));
            }
        }
        return Ok(vec![state]);
    }
    let own = sink.keys(entity);
    // Each partition's fence is raised to this holder's token as its state
    // is read: from here on an older holder's writes there are refused.
    let token = lease.and_then(|(value, _)| crate::lease::parse_value(value).0);
    let (base, partitions) = futures_util::future::join(
        sink.snapshot(&entity.name, &own, lease, None),
        futures_util::future::try_join_all(
            lane_keys
                .iter()
                .map(|keys| sink.snapshot(&entity.name, keys, None, token)),
        ),
    )
    .await;
    let base = base?;
    if let Some(holder) = lost_lease(&base) {
        return Err(CycleError::LeaseLost {
            entity: entity.name.clone(),
            holder,
            refused: false,
        });
    }
    if base.exists {
        return Err(partitions_changed(entity, 1));
    }
    let partitions = partitions?;
    if partitions
        .iter()
        .any(|s| matches!(s.lease, LeaseRenewal::Lost { .. }))
    {
        return Err(CycleError::LeaseLost {
            entity: entity.name.clone(),
            holder: None,
            refused: true,
        });
    }
    if let Some(was) = partitions
        .iter()
        .filter_map(|s| s.partitions)
        .find(|&n| n != entity.partitions)
    {
        return Err(partitions_changed(entity, was));
    }
    Ok(partitions)
}

fn partitions_changed(entity: &EntitySettings, was: u32) -> CycleError {
    CycleError::PartitionsChanged {
        entity: entity.name.clone(),
        was,
        now: entity.partitions,
    }
}

/// Evidence that Redis lost state of the entity (of any partition).
async fn find_loss(
    entity: &EntitySettings,
    sink: &Sink,
    memory: &EntityMemory,
    lane_keys: &[EntityKeys],
    states: &[StateSnapshot],
) -> Result<Option<String>, CycleError> {
    let of = |keys: &EntityKeys| {
        if entity.partitions > 1 {
            format!(" (partition stream {})", keys.stream)
        } else {
            String::new()
        }
    };
    for (keys, state) in lane_keys.iter().zip(states) {
        let lost = if state.digests_vanished() {
            Some(format!(
                "its digest hash is empty although the last cycle left {} keys in it{}",
                state.tracked,
                of(keys)
            ))
        } else if state.exists {
            None
        } else if memory.had_state {
            Some(format!(
                "its state keys vanished while this agent was running{}",
                of(keys)
            ))
        } else if sink
            .stream_has_variant(&entity.name, keys, &entity.variant, LOSS_EVIDENCE_DEPTH)
            .await?
        {
            Some(format!(
                "its state keys are missing but stream {} holds its messages",
                keys.stream
            ))
        } else {
            None
        };
        if lost.is_some() {
            return Ok(lost);
        }
    }
    Ok(None)
}

/// A sink error, unless it says the state vanished during the cycle: then
/// the loss is handled as if found at the start of a cycle (stop, or let the
/// next cycle re-read everything).
fn state_vanished(
    entity: &EntitySettings,
    memory: &mut EntityMemory,
    error: SinkError,
) -> CycleError {
    if let SinkError::Fenced { holder, .. } = error {
        memory.forget();
        return CycleError::LeaseLost {
            entity: entity.name.clone(),
            holder,
            refused: true,
        };
    }
    if !matches!(error, SinkError::StateVanished { .. }) {
        return error.into();
    }
    memory.had_state = true;
    memory.confirmed.clear();
    memory.writes = None;
    match entity.on_state_loss {
        OnStateLoss::Fail => CycleError::StateLost {
            entity: entity.name.clone(),
            evidence: "its state keys vanished during a cycle".to_owned(),
        },
        OnStateLoss::Resnapshot => error.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    /// The chunks of a partition must reach Redis in the order they were
    /// sent: a send polled once by a task that has used up its budget must
    /// still queue at once.
    #[tokio::test]
    async fn a_call_queues_at_its_first_poll_even_with_the_task_budget_spent() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(8);
        // Spend the task's budget: receives that are ready, until tokio
        // answers Pending to make the task yield.
        let (spend, mut spent) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..10_000 {
            spend.send(i).unwrap();
        }
        let mut received = 0;
        while spent.recv().now_or_never().is_some() {
            received += 1;
        }
        assert!(received < 10_000, "tokio no longer budgets a task's polls");
        // The hazard: a plain send does not queue now, so a later one would
        // overtake it.
        let plain_tx = tx.clone();
        let mut plain = Box::pin(async move { plain_tx.send(1).await });
        assert!(futures_util::future::poll_immediate(&mut plain)
            .await
            .is_none());
        assert!(rx.try_recv().is_err());
        // queue_now's send is queued at once.
        let (_call, early) = queue_now(async move { tx.send(2).await }).await;
        assert!(matches!(early, Some(Ok(()))));
        assert_eq!(rx.try_recv().ok(), Some(2));
    }
}
