//! The sink's ceiling on this machine: how many rows per second the dedup
//! script alone takes, fed with the benchmark's rows (no database involved),
//! at several chunk sizes. `scripts/bench` runs it and divides the agent's
//! first-cycle rate by the best figure.
//!
//! The rows are the ones `scripts/bench` puts in its table, built the same way
//! the agent builds them (`RowShape::build`: payload JSON, XXH3 digest), so the
//! script receives byte-identical arguments. Each chunk size gets its own
//! stream and state keys (empty at the start: every row is new, as in a first
//! cycle), deleted afterwards. Only the script calls are timed, sent as the
//! agent sends them (up to `poller::CHUNKS_IN_FLIGHT` unanswered on the one
//! connection); building the rows and the calls is not.
//!
//! At the best chunk size, all rows also go through an XADD-only script
//! (the same arguments, one XADD per row with the same fields, nothing
//! else): the floor of writing a stream from Lua, so that the ratio shows
//! what the dedup adds per row.
//!
//! ```sh
//! cargo run --release --example sink_ceiling -- --config bench.toml --entity first \
//!     --rows 1000000 --base-epoch-us 1700000000000000 --chunks 100,250,500,1000,2000,5000
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::FutureExt;
use highwater::change::{Change, RowShape, Value};
use highwater::config::{Config, CursorKind, EntitySettings, PayloadMode};
use highwater::poller::CHUNKS_IN_FLIGHT;
use highwater::sink::{Link, Sink};

#[derive(Parser)]
struct Args {
    /// The benchmark's config: Redis URL, key prefix, the entity's settings.
    #[arg(long)]
    config: PathBuf,
    /// The entity whose settings (variant, payload, stream cap) the calls use.
    #[arg(long)]
    entity: String,
    /// Rows of the table (ids 1..=rows); the best chunk size is fed all of them.
    #[arg(long)]
    rows: u64,
    /// Rows fed to each chunk size while searching for the best one.
    #[arg(long, default_value_t = 200_000)]
    sample: u64,
    /// `updated_at` of the row with id 0, microseconds since 1970 (the table's `base`).
    #[arg(long)]
    base_epoch_us: i64,
    /// How many times the dedup script and the XADD-only script are fed all
    /// rows at the best chunk size, alternated (the best of each counts), so
    /// that a burst of load from elsewhere falls on both alike.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Chunk sizes to try.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "100,250,500,1000,2000,5000"
    )]
    chunks: Vec<usize>,
    /// Print the payload of this row and exit (to check it matches the agent's).
    #[arg(long)]
    print_row: Option<u64>,
}

const COLUMNS: [&str; 7] = [
    "id",
    "name",
    "email",
    "city",
    "note",
    "amount",
    "updated_at",
];
const CITIES: [&str; 8] = [
    "Berlin", "Lisbon", "Oslo", "Madrid", "Vienna", "Dublin", "Prague", "Warsaw",
];

/// One row of the benchmark table, as `scripts/bench` generates it in SQL.
struct Rows {
    shape: RowShape,
    base_epoch_us: i64,
    json: String,
}

impl Rows {
    fn new(base_epoch_us: i64) -> Rows {
        let shape = RowShape::new(
            COLUMNS.iter().map(|c| c.to_string()).collect(),
            &["id".to_owned()],
            "updated_at",
            None,
            CursorKind::Time,
            chrono_tz::UTC,
            PayloadMode::Row,
        )
        .expect("the benchmark's columns include key and cursor");
        Rows {
            shape,
            base_epoch_us,
            json: String::new(),
        }
    }

    fn change(&mut self, id: u64) -> Change {
        let cents = id % 100_000;
        let values = [
            Value::Int(id as i64),
            Value::Text(format!("customer {id}").into()),
            Value::Text(format!("customer{id}@example.com").into()),
            Value::Text(CITIES[(id % 8) as usize].into()),
            Value::Text(
                format!("lorem ipsum dolor sit amet, consectetur adipiscing elit {id}").into(),
            ),
            Value::Decimal(format!("{}.{:02}", cents / 100, cents % 100).into()),
            Value::Timestamp(self.base_epoch_us + id as i64 * 1000),
        ];
        self.shape
            .build(&values, &mut self.json)
            .expect("benchmark rows have a key and a cursor")
    }
}

/// The floor of writing the stream from Lua: the dedup script's arguments,
/// one XADD per row with the same fields, and nothing else (no state, no
/// fence). The dedup script's rate against this one is what deduplication
/// adds per row.
const XADD_ONLY_LUA: &str = r#"
local stream, maxlen, variant = KEYS[3], tonumber(ARGV[1]), ARGV[2]
local rows = 0
for i = 8, #ARGV, 5 do
  if maxlen > 0 then
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'pkey', ARGV[i], 'epoch', ARGV[i + 1], 'variant', variant, 'op', ARGV[i + 3], 'payload', ARGV[i + 4])
  else
    redis.call('XADD', stream, '*', 'pkey', ARGV[i], 'epoch', ARGV[i + 1], 'variant', variant, 'op', ARGV[i + 3], 'payload', ARGV[i + 4])
  end
  rows = rows + 1
end
return {rows, 0}
"#;

/// Which script a feed calls.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Script {
    Dedup,
    /// [`XADD_ONLY_LUA`], loaded under this SHA1.
    XaddOnly(&'static str),
}

/// Chunks built ahead of each timed stretch of calls.
const BATCH_CHUNKS: usize = 32;

/// Feeds rows 1..=rows in chunks of `chunk` to fresh keys; returns the time
/// spent in the script calls. The calls go as the agent's do: up to
/// `CHUNKS_IN_FLIGHT` at once on the one connection, each chunk after the
/// first naming its predecessor (the dedup script checks it).
async fn feed(
    sink: &Sink,
    base: &Base,
    settings: &mut EntitySettings,
    chunk: usize,
    rows: u64,
    generator: &mut Rows,
    script: Script,
) -> Result<Duration, String> {
    let label = match script {
        Script::Dedup => "ceiling",
        Script::XaddOnly(_) => "xadd-only",
    };
    settings.name = format!("{}-{label}-{chunk}", base.name);
    settings.stream = format!("{}-{label}-{chunk}", base.stream);
    settings.chunk_rows = chunk;
    let settings = &*settings;
    let keys = sink.keys(settings);
    let mut conn = sink.connection();
    let clean = [&keys.stream, &keys.seen, &keys.digest, &keys.state];
    redis::cmd("DEL")
        .arg(&clean)
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| format!("cannot clear the ceiling keys: {e}"))?;
    // Fenced like the agent's writes: the script checks this lease per chunk.
    let lease = "1 sink-ceiling";
    redis::cmd("SET")
        .arg(&keys.lease)
        .arg(lease)
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| format!("cannot set the ceiling's lease: {e}"))?;

    let mut spent = Duration::ZERO;
    // As in a cycle: the first chunk that emits creates the state hash,
    // later ones expect it (and may travel several at once).
    let mut expect_state = false;
    let mut batch = Vec::with_capacity(chunk);
    let mut calls: Vec<(redis::Cmd, usize)> = Vec::with_capacity(BATCH_CHUNKS);
    let mut sent = 0u64;
    let mut last_name: Option<String> = None;
    let mut id = 1;
    while id <= rows {
        calls.clear();
        // The first chunk alone: it creates the state.
        let chunks = if expect_state { BATCH_CHUNKS } else { 1 };
        while calls.len() < chunks && id <= rows {
            batch.clear();
            while batch.len() < chunk && id <= rows {
                batch.push(generator.change(id));
                id += 1;
            }
            sent += 1;
            let name = expect_state.then(|| format!("ceiling:{sent}"));
            let link = Link {
                after: name.as_ref().and(last_name.as_deref()),
                name: name.as_deref(),
            };
            let cmd = sink.chunk_command(settings, &keys, &batch, expect_state, Some(lease), link);
            last_name = name;
            let cmd = match script {
                Script::Dedup => cmd,
                Script::XaddOnly(sha) => with_sha(&cmd, sha),
            };
            calls.push((cmd, batch.len()));
        }
        let started = Instant::now();
        let replies = pipelined(&conn, &calls).await;
        spent += started.elapsed();
        for (reply, &(_, len)) in replies.into_iter().zip(&calls) {
            let (emitted, _): (u64, i64) = reply.map_err(|e| format!("chunk size {chunk}: {e}"))?;
            if emitted != len as u64 {
                return Err(format!(
                    "chunk size {chunk}: {emitted} of {len} new rows emitted"
                ));
            }
            expect_state = true;
        }
    }
    redis::cmd("DEL")
        .arg(&clean)
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| format!("cannot delete the ceiling keys: {e}"))?;
    Ok(spent)
}

/// The same call with another script's SHA1 (EVALSHA's first argument).
fn with_sha(cmd: &redis::Cmd, sha: &str) -> redis::Cmd {
    let mut copy = redis::Cmd::new();
    for (i, arg) in cmd.args_iter().enumerate() {
        match arg {
            redis::Arg::Simple(_) if i == 1 => copy.arg(sha.as_bytes()),
            redis::Arg::Simple(bytes) => copy.arg(bytes),
            redis::Arg::Cursor => copy.cursor_arg(0),
        };
    }
    copy
}

/// Sends the calls with up to `CHUNKS_IN_FLIGHT` unanswered at a time, in
/// order (each polled once as it is sent: queued on the connection), as
/// the poller does; the replies in the same order.
async fn pipelined(
    conn: &highwater::connection::Connection,
    calls: &[(redis::Cmd, usize)],
) -> Vec<redis::RedisResult<(u64, i64)>> {
    let mut replies = Vec::with_capacity(calls.len());
    let mut in_flight = std::collections::VecDeque::new();
    for (cmd, _) in calls {
        if in_flight.len() == CHUNKS_IN_FLIGHT {
            let (reply, early) = in_flight.pop_front().expect("a call in flight");
            replies.push(settle(reply, early).await);
        }
        let mut conn = conn.clone();
        let mut reply = async move { cmd.query_async::<(u64, i64)>(&mut conn).await }.boxed();
        let early = futures_util::future::poll_immediate(&mut reply).await;
        in_flight.push_back((reply, early));
    }
    while let Some((reply, early)) = in_flight.pop_front() {
        replies.push(settle(reply, early).await);
    }
    replies
}

async fn settle<T>(reply: futures_util::future::BoxFuture<'_, T>, early: Option<T>) -> T {
    match early {
        Some(value) => value,
        None => reply.await,
    }
}

/// The configured entity's name and stream; each chunk size derives its own from them.
struct Base {
    name: String,
    stream: String,
}

fn rate(rows: u64, spent: Duration) -> f64 {
    rows as f64 / spent.as_secs_f64().max(1e-9)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut rows = Rows::new(args.base_epoch_us);
    if let Some(id) = args.print_row {
        println!("{}", rows.change(id).payload.unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    let mut config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {}", highwater::agent::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let Some(mut settings) = config.entities.remove(&args.entity) else {
        eprintln!("error: no entity {:?} in the config", args.entity);
        return ExitCode::FAILURE;
    };
    let base = Base {
        name: settings.name.clone(),
        stream: settings.stream.clone(),
    };
    let sink = match Sink::connect(&config.redis).await {
        Ok(sink) => sink,
        Err(e) => {
            eprintln!("error: {}", highwater::agent::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };

    // The calls are sent as they are (EVALSHA), without the sink's reload
    // on NOSCRIPT: the scripts are loaded first.
    if let Err(e) = redis::Script::new(include_str!("../lua/dedup.lua"))
        .prepare_invoke()
        .load_async(&mut sink.connection())
        .await
    {
        eprintln!("error: cannot load lua/dedup.lua: {e}");
        return ExitCode::FAILURE;
    }
    let sample = args.sample.min(args.rows);
    let mut best: Option<(usize, f64)> = None;
    for &chunk in &args.chunks {
        match feed(
            &sink,
            &base,
            &mut settings,
            chunk,
            sample,
            &mut rows,
            Script::Dedup,
        )
        .await
        {
            Ok(spent) => {
                let r = rate(sample, spent);
                println!(
                    "chunk {chunk}: {sample} rows in {:.3}s = {r:.0} rows/s",
                    spent.as_secs_f64()
                );
                if best.is_none_or(|(_, b)| r > b) {
                    best = Some((chunk, r));
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let Some((chunk, _)) = best else {
        eprintln!("error: no chunk sizes given");
        return ExitCode::FAILURE;
    };
    // The floor beside it: the XADD-only script over the same entries.
    let xadd_only = redis::Script::new(XADD_ONLY_LUA);
    let sha: &'static str = Box::leak(xadd_only.get_hash().to_owned().into_boxed_str());
    if let Err(e) = xadd_only
        .prepare_invoke()
        .load_async(&mut sink.connection())
        .await
    {
        eprintln!("error: cannot load the XADD-only script: {e}");
        return ExitCode::FAILURE;
    }
    // Alternated, the best of `rounds` each: the machine's load drifts.
    let mut best_of: [Option<(f64, Duration)>; 2] = [None, None];
    for _ in 0..args.rounds.max(1) {
        for (slot, script) in [Script::Dedup, Script::XaddOnly(sha)]
            .into_iter()
            .enumerate()
        {
            match feed(
                &sink,
                &base,
                &mut settings,
                chunk,
                args.rows,
                &mut rows,
                script,
            )
            .await
            {
                Ok(spent) => {
                    let r = rate(args.rows, spent);
                    if best_of[slot].is_none_or(|(b, _)| r > b) {
                        best_of[slot] = Some((r, spent));
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    let figures: Vec<(f64, Duration)> = best_of.into_iter().flatten().collect();
    let ((dedup, dedup_spent), (xadd, xadd_spent)) = (figures[0], figures[1]);
    println!(
        "best chunk {chunk}: {} rows in {:.3}s = {dedup:.0} rows/s (best of {} rounds)",
        args.rows,
        dedup_spent.as_secs_f64(),
        args.rounds.max(1)
    );
    println!(
        "xadd-only script, chunk {chunk}: {} rows in {:.3}s = {xadd:.0} rows/s (dedup.lua: {:.0} % of it; alternated with it)",
        args.rows,
        xadd_spent.as_secs_f64(),
        dedup / xadd * 100.0
    );
    println!("ceiling_rows_per_s={dedup:.0} chunk={chunk}");
    println!("xadd_only_rows_per_s={xadd:.0}");
    ExitCode::SUCCESS
}
