//! The sink's ceiling on this machine: how many rows per second the dedup
//! script alone takes, fed with the benchmark's rows (no database involved),
//! at several chunk sizes. `scripts/bench` runs it and divides the agent's
//! first-cycle rate by the best figure.
//!
//! The rows are the ones `scripts/bench` puts in its table, built the same way
//! the agent builds them (`RowShape::build`: payload JSON, XXH3 digest), so the
//! script receives byte-identical arguments. Each chunk size gets its own
//! stream and state keys (empty at the start: every row is new, as in a first
//! cycle), deleted afterwards. Only the script calls are timed, one after the
//! other as the agent issues them; building the rows is not.
//!
//! ```sh
//! cargo run --release --example sink_ceiling -- --config bench.toml --entity first \
//!     --rows 1000000 --base-epoch-us 1700000000000000 --chunks 100,250,500,1000,2000,5000
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use highwater::change::{Change, RowShape, Value};
use highwater::config::{Config, CursorKind, EntitySettings, PayloadMode};
use highwater::sink::Sink;

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
    /// How many times each chunk size is tried (its best time counts), so a
    /// burst of load from elsewhere does not pick the chunk size.
    #[arg(long, default_value_t = 2)]
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

/// Feeds rows 1..=rows in chunks of `chunk` to fresh keys; returns the time
/// spent in the script calls.
async fn feed(
    sink: &Sink,
    base: &Base,
    settings: &mut EntitySettings,
    chunk: usize,
    rows: u64,
    generator: &mut Rows,
) -> Result<Duration, String> {
    settings.name = format!("{}-ceiling-{chunk}", base.name);
    settings.stream = format!("{}-ceiling-{chunk}", base.stream);
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
    // later ones expect it.
    let mut expect_state = false;
    let mut batch = Vec::with_capacity(chunk);
    let mut id = 1;
    while id <= rows {
        batch.clear();
        while batch.len() < chunk && id <= rows {
            batch.push(generator.change(id));
            id += 1;
        }
        let started = Instant::now();
        let (emitted, _) = sink
            .apply_chunk(settings, &keys, &batch, expect_state, Some(lease))
            .await
            .map_err(|e| highwater::agent::error_chain(&e))?;
        spent += started.elapsed();
        expect_state |= emitted > 0;
        if emitted != batch.len() as u64 {
            return Err(format!(
                "chunk size {chunk}: {emitted} of {} new rows emitted",
                batch.len()
            ));
        }
    }
    redis::cmd("DEL")
        .arg(&clean)
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| format!("cannot delete the ceiling keys: {e}"))?;
    Ok(spent)
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

    let sample = args.sample.min(args.rows);
    let mut best: Option<(usize, f64)> = None;
    for &chunk in &args.chunks {
        match feed(&sink, &base, &mut settings, chunk, sample, &mut rows).await {
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
    match feed(&sink, &base, &mut settings, chunk, args.rows, &mut rows).await {
        Ok(spent) => {
            let r = rate(args.rows, spent);
            println!(
                "best chunk {chunk}: {} rows in {:.3}s = {r:.0} rows/s",
                args.rows,
                spent.as_secs_f64()
            );
            println!("ceiling_rows_per_s={r:.0} chunk={chunk}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
