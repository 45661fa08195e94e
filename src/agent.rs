//! The agent: `once` runs one cycle per entity and reports; `run` polls every
//! entity on its schedule until shutdown. Cycles of one entity never overlap
//! (one task per entity), ticks missed by a slow cycle are skipped, entities
//! poll concurrently, and a failed cycle backs off and retries while the
//! rest of the agent keeps going.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rand::Rng;
use tokio::sync::{mpsc, watch};

use crate::config::{Config, EntitySettings};
use crate::lease::{holder_of, Claim, Keeper, Leases, Outcome};
use crate::poller::{run_cycle, CycleError, CycleReport, EntityMemory};
use crate::sink::{Sink, SinkError};
use crate::source::{Prepared, Source, SourceError};

/// Why the agent could not start or a `once` cycle failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Cycle(#[from] CycleError),
    #[error("{0}")]
    Usage(String),
    #[error("http.listen: cannot listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        error: std::io::Error,
    },
}

/// The first retry waits this long; each failure doubles it up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The sources of a config, by name, built without connecting.
pub fn sources(config: &Config) -> Result<BTreeMap<String, Arc<Source>>, SourceError> {
    config
        .sources
        .iter()
        .map(|(name, settings)| Ok((name.clone(), Arc::new(Source::new(settings)?))))
        .collect()
}

/// What `once` did with one entity.
#[derive(Debug)]
pub enum OnceOutcome {
    /// The cycle ran.
    Done(Box<CycleReport>),
    /// Another agent holds the entity's lease: skipped (nothing written).
    Held {
        /// The holder's agent id.
        holder: String,
        /// How long its lease lasts unless renewed.
        expires_in: Option<Duration>,
    },
}

/// Runs one cycle of each selected entity, concurrently, each under the
/// entity's lease: an entity another agent holds is skipped
/// ([`OnceOutcome::Held`]), or with `wait_for_lease` waited for. Each
/// entity's result is reported separately; Redis unreachable fails them all
/// at once. The leases are released at the end.
pub async fn once(
    config: &Config,
    only: Option<&str>,
    wait_for_lease: bool,
) -> Result<Vec<(String, Result<OnceOutcome, AgentError>)>, AgentError> {
    let entities = config.select_entities(only).map_err(AgentError::Usage)?;
    let sink = Sink::connect(&config.redis).await?;
    let sources = sources(config)?;
    let leases = Leases::new(&sink, config);
    let claims: Vec<Arc<Claim>> = entities
        .iter()
        .map(|e| Arc::new(Claim::new(&e.name, sink.keys(e), leases.agent())))
        .collect();
    // Renews the leases while long cycles run.
    let (keeper_stop_tx, keeper_stop) = watch::channel(false);
    let keeper = tokio::spawn(Keeper::new(leases.clone(), claims.clone(), false).run(keeper_stop));
    // A `once` is never interrupted: the receiver stays false.
    let (_keep, stop) = watch::channel(false);
    let cycles = entities.into_iter().zip(&claims).map(|(entity, claim)| {
        let source = &sources[&entity.source];
        let (sink, stop, leases) = (&sink, &stop, &leases);
        async move {
            let result = async {
                let value = match take_lease(leases, claim, wait_for_lease).await? {
                    Ok(value) => value,
                    Err(held) => return Ok(held),
                };
                let prepared = source.prepare(entity).await?;
                let mut memory = EntityMemory::single_cycle();
                let cycle = run_cycle(
                    entity,
                    source,
                    &prepared,
                    sink,
                    stop,
                    &mut memory,
                    Some((&value, leases.lease())),
                )
                .await;
                match cycle {
                    Ok(report) => Ok(OnceOutcome::Done(Box::new(report))),
                    Err(CycleError::LeaseLost {
                        holder, refused, ..
                    }) => {
                        claim.lose(&value, holder.as_deref(), lost_how(refused));
                        Ok(OnceOutcome::Held {
                            holder: holder.as_deref().map_or("nobody", holder_of).to_owned(),
                            expires_in: None,
                        })
                    }
                    Err(e) => Err(e.into()),
                }
            }
            .await;
            (entity.name.clone(), result)
        }
    });
    let results = futures_util::future::join_all(cycles).await;
    let _ = keeper_stop_tx.send(true);
    if let Ok(keeper) = keeper.await {
        keeper.release_all().await;
    }
    for source in sources.values() {
        source.close().await;
    }
    Ok(results)
}

/// Takes the entity's lease for `once`: the value, or who holds it. With
/// `wait`, retries until the holder gives it up or stops renewing it.
async fn take_lease(
    leases: &Leases,
    claim: &Claim,
    wait: bool,
) -> Result<Result<String, OnceOutcome>, AgentError> {
    let mut said = false;
    loop {
        match leases.acquire(&claim.entity, &claim.keys).await? {
            Outcome::Acquired { value, .. } | Outcome::Renewed { value } => {
                claim.take(value.clone());
                return Ok(Ok(value));
            }
            Outcome::Held { value, expires_in } if !wait => {
                return Ok(Err(OnceOutcome::Held {
                    holder: holder_of(&value).to_owned(),
                    expires_in: Some(expires_in),
                }))
            }
            Outcome::Held { value, expires_in } if !said => {
                said = true;
                eprintln!(
                    "{}: held by agent {} (lease expires in {:.1}s unless renewed); waiting for it",
                    claim.entity,
                    holder_of(&value),
                    expires_in.as_secs_f64()
                );
            }
            _ => {}
        }
        tokio::time::sleep(LEASE_POLL.min(leases.lease() / 4)).await;
    }
}

/// How a cycle found out it lost its lease, for the log line.
fn lost_how(refused: bool) -> &'static str {
    if refused {
        "a write of its cycle was refused"
    } else {
        "starting a cycle"
    }
}

/// How often `once --wait` asks for a held lease.
const LEASE_POLL: Duration = Duration::from_millis(250);

/// Polls every entity on its schedule until `shutdown` resolves, then lets
/// each finish the chunk in flight and returns.
///
/// A query that cannot work (missing columns, a syntax error) stops the
/// start; a database or Redis that is down does not: cycles retry.
///
/// Under systemd (`NOTIFY_SOCKET`), READY=1 goes once Redis answered and
/// every query was checked or found its database down; the loop that waits
/// for shutdown feeds the watchdog (see [`crate::systemd`]).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let (stop_tx, stop) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let notifier = crate::systemd::Notifier::from_env();
    notifier.status("connecting to Redis");

    let metrics = crate::metrics::global();
    for entity in config.entities.values() {
        metrics.register_entity(&entity.name, entity.cursor_kind);
    }
    for (name, settings) in &config.sources {
        metrics.register_source(name);
        tracing::info!(source = %name, url = %crate::config::mask_url(&settings.url), "source");
    }
    // Listening first: a configured port that is taken fails the start, and
    // /healthz answers (unhealthy) while Redis or a database is unreachable.
    let listener = match config.http.listen {
        Some(addr) => match crate::http::bind(addr).await {
            Ok(listener) => Some(listener),
            Err(error) if config.http.listen_configured => {
                return Err(AgentError::Listen { addr, error })
            }
            Err(error) => {
                tracing::error!(address = %addr, error = %error, "cannot serve /metrics and /healthz on the default address; polling without them (set [http] listen)");
                None
            }
        },
        None => None,
    };
    let http = match listener {
        Some(listener) => {
            let address = listener
                .local_addr()
                .map_or_else(|_| "?".to_owned(), |a| a.to_string());
            tracing::info!(address = %address, "serving /metrics and /healthz");
            let health = Arc::new(crate::http::Health::new(&config, std::time::Instant::now()));
            Some(tokio::spawn(crate::http::serve(
                listener,
                health,
                metrics,
                stop.clone(),
            )))
        }
        None => None,
    };

    let sink = tokio::select! {
        sink = connect_with_retry(&config, &notifier, stop.clone()) => match sink {
            Some(sink) => sink,
            None => return Ok(()),
        },
        () = &mut shutdown => {
            notifier.stopping("shut down before Redis answered");
            return Ok(());
        }
    };
    let sources = sources(&config)?;

    // Check every query before polling: a broken one is a config error.
    let mut prepared = BTreeMap::new();
    for entity in config.entities.values() {
        // A database that does not answer takes up to its timeout to say so.
        let timeout = config.sources[&entity.source].timeout;
        notifier.starting(
            timeout + START_MARGIN,
            &format!("checking the query of entity {}", entity.name),
        );
        match sources[&entity.source].prepare(entity).await {
            Ok(p) => {
                prepared.insert(entity.name.clone(), p);
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(entity = %entity.name, error = %error_chain(&e), "cannot check the query yet; will retry");
            }
            Err(e) => return Err(e.into()),
        }
    }

    let config = Arc::new(config);
    let (fatal_tx, mut fatal) = mpsc::channel::<AgentError>(1);
    let pause = spawn_memory_watch(sink.clone(), config.redis.pause_at_memory, stop.clone());
    // The leases: this agent's share of the entities, taken before the
    // first cycles so that they start at once.
    let leases = Leases::new(&sink, &config);
    metrics.register_agent(leases.agent());
    let fenced = !crate::fault::unfenced();
    let claims: BTreeMap<String, Arc<Claim>> = config
        .entities
        .values()
        .map(|e| {
            let claim = Claim::new(&e.name, sink.keys(e), leases.agent());
            (e.name.clone(), Arc::new(claim))
        })
        .collect();
    let keeper = if fenced {
        let keeper = Keeper::new(leases.clone(), claims.values().cloned().collect(), true);
        if let Err(e) = keeper.tick().await {
            tracing::warn!(error = %error_chain(&e), "leases: cannot take any yet; will retry");
        }
        Some(tokio::spawn(keeper.run(stop.clone())))
    } else {
        tracing::warn!(
            "HIGHWATER_UNFENCED=1: no leases, every entity is written unfenced (a test setting)"
        );
        None
    };
    let mut tasks = Vec::new();
    for entity in config.entities.values() {
        if !fenced {
            metrics.record_lease_held(&entity.name, true);
        }
        let task = EntityTask {
            claim: fenced.then(|| Arc::clone(&claims[&entity.name])),
            lease: leases.lease(),
            config: Arc::clone(&config),
            entity: entity.name.clone(),
            source: Arc::clone(&sources[&entity.source]),
            sink: sink.clone(),
            prepared: prepared.remove(&entity.name),
            stop: stop.clone(),
            memory: EntityMemory::default(),
            pause: pause.clone(),
            fatal: fatal_tx.clone(),
        };
        tasks.push(tokio::spawn(task.run()));
    }
    tracing::info!(entities = tasks.len(), agent = %leases.agent(), lease = ?leases.lease(), "polling");

    drop(fatal_tx);
    let names: Vec<&str> = config.entities.keys().map(String::as_str).collect();
    let mut said = polling_status(leases.agent(), &names, &pause);
    notifier.ready(&said);
    // The scheduler's own loop: it waits for shutdown, feeds the watchdog and
    // keeps the STATUS line current. A watchdog tick comes only from here,
    // so a runtime too blocked to run this loop stops feeding it; and it stops
    // when a task that should run until shutdown has ended (a panic), so that
    // systemd restarts the agent rather than leaving an entity unpolled.
    let mut watchdog = tokio::time::interval(notifier.watchdog_period().unwrap_or(STATUS_EVERY));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dead: Option<String> = None;
    let outcome = loop {
        tokio::select! {
            // Shutdown and a fatal error first: a task that ended with a
            // fatal error sent it before it ended.
            biased;
            () = &mut shutdown => {
                notifier.stopping("shutting down: finishing the chunks in flight");
                tracing::info!("shutting down: finishing the chunks in flight");
                break Ok(());
            }
            Some(error) = fatal.recv() => {
                let error_text = error_chain(&error);
                notifier.stopping(&format!("stopping: {error_text}"));
                tracing::error!(error = %error_text, "stopping the agent");
                break Err(error);
            }
            _ = watchdog.tick(), if notifier.enabled() => {
                match (ended_early(&tasks, &names, keeper.as_ref()), &dead) {
                    (None, _) => notifier.feed_watchdog(),
                    (Some(what), None) => {
                        let why = format!("{what} ended before shutdown; no longer feeding the watchdog");
                        tracing::error!("{why}");
                        notifier.status(&why);
                        dead = Some(why);
                    }
                    (Some(_), Some(_)) => {}
                }
                let now = polling_status(leases.agent(), &names, &pause);
                if dead.is_none() && now != said {
                    notifier.status(&now);
                    said = now;
                }
            }
        }
    };
    let _ = stop_tx.send(true);
    if let Some(http) = http {
        let _ = http.await;
    }
    for task in tasks {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "an entity task panicked");
        }
    }
    // Every cycle has stopped: the leases go at once, so that another agent
    // takes over within its next tick instead of after the lease.
    if let Some(keeper) = keeper {
        if let Ok(keeper) = keeper.await {
            keeper.release_all().await;
        }
    }
    for source in sources.values() {
        source.close().await;
    }
    outcome
}

/// How often the STATUS line is brought up to date without a watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Added to each step's own timeout in EXTEND_TIMEOUT_USEC while starting.
const START_MARGIN: Duration = Duration::from_secs(10);

/// Which task that should run until shutdown has ended (it panicked): an
/// entity's polling loop or the lease keeper.
fn ended_early<T, K>(
    tasks: &[tokio::task::JoinHandle<T>],
    names: &[&str],
    keeper: Option<&tokio::task::JoinHandle<K>>,
) -> Option<String> {
    if let Some((_, name)) = tasks.iter().zip(names).find(|(t, _)| t.is_finished()) {
        return Some(format!("the polling task of entity {name}"));
    }
    keeper
        .filter(|k| k.is_finished())
        .map(|_| "the lease keeper".to_owned())
}

/// The STATUS line while polling: leases held, or why polling is paused.
fn polling_status(
    agent: &str,
    entities: &[&str],
    pause: &watch::Receiver<Option<String>>,
) -> String {
    if let Some(why) = pause.borrow().as_deref() {
        return format!("paused: {why}");
    }
    let metrics = crate::metrics::global();
    let held = entities.iter().filter(|e| metrics.lease_held(e)).count();
    format!(
        "polling as agent {agent}: {held} of {} entities held by this agent",
        entities.len()
    )
}

/// How often the memory watch reads `INFO memory`.
const MEMORY_WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Watches Redis memory once a second for all entities: the receiver holds
/// why polling is paused (`used_memory / maxmemory` above `threshold`), or
/// `None`. Writes refused with OOM are retried by the cycles' backoff anyway;
/// pausing first keeps the agent from hammering a full Redis.
fn spawn_memory_watch(
    sink: Sink,
    threshold: f64,
    mut stop: watch::Receiver<bool>,
) -> watch::Receiver<Option<String>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        loop {
            let ratio = sink.memory_ratio().await;
            let reason = match ratio {
                Ok(Some(ratio)) if ratio > threshold => Some(format!(
                    "redis memory at {:.0}% of maxmemory, above pause_at_memory = {:.0}%: waiting for consumer groups to acknowledge entries, which the retention then trims",
                    ratio * 100.0,
                    threshold * 100.0
                )),
                // Unknown (Redis unreachable): the cycles find out and back off.
                _ => None,
            };
            crate::metrics::global().record_memory(ratio.ok().flatten(), reason.is_some());
            if *tx.borrow() != reason {
                match &reason {
                    Some(why) => tracing::warn!(reason = %why, "polling paused"),
                    None => tracing::info!("polling resumed"),
                }
                let _ = tx.send(reason);
            }
            tokio::select! {
                () = tokio::time::sleep(MEMORY_WATCH_INTERVAL) => {}
                _ = stop.changed() => return,
            }
        }
    });
    rx
}

/// Connects to Redis, retrying with backoff; `None` when stopped first.
/// Each retry tells systemd the start goes on (and why it takes so long).
async fn connect_with_retry(
    config: &Config,
    notifier: &crate::systemd::Notifier,
    mut stop: watch::Receiver<bool>,
) -> Option<Sink> {
    let mut failures = 0;
    loop {
        match Sink::connect(&config.redis).await {
            Ok(sink) => return Some(sink),
            Err(e) => {
                failures += 1;
                crate::metrics::global().record_redis_connection_error();
                let wait = backoff(failures);
                let error = error_chain(&e);
                notifier.starting(
                    wait + config.redis.timeout + START_MARGIN,
                    &format!(
                        "waiting for Redis ({failures} attempts failed, next in {:.1}s): {error}",
                        wait.as_secs_f64()
                    ),
                );
                tracing::error!(error = %error, retry_in = ?wait, "redis unreachable");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return None,
                }
            }
        }
    }
}

/// One entity's polling loop.
struct EntityTask {
    /// The entity's lease; `None`: unfenced (no leases at all).
    claim: Option<Arc<Claim>>,
    /// How long a renewal lasts.
    lease: Duration,
    config: Arc<Config>,
    entity: String,
    source: Arc<Source>,
    sink: Sink,
    prepared: Option<Prepared>,
    stop: watch::Receiver<bool>,
    memory: EntityMemory,
    /// Why polling is paused (Redis memory), if it is.
    pause: watch::Receiver<Option<String>>,
    /// Where an error that must stop the whole agent goes.
    fatal: mpsc::Sender<AgentError>,
}

impl EntityTask {
    fn settings(&self) -> &EntitySettings {
        &self.config.entities[&self.entity]
    }

    /// While polling is paused, applies the stream's retention once per
    /// memory reading, so that what the consumer groups acknowledge goes
    /// and memory comes down (no cycle commits meanwhile). Only the agent
    /// that holds the entity's lease does (or any, unfenced). Returns true
    /// when the agent is stopping.
    async fn retain_while_paused(&mut self) -> bool {
        let mut failed = false;
        loop {
            if self.claim.as_ref().is_none_or(|c| c.held().is_some()) {
                let entity = self.settings();
                let mut result = Ok(());
                for keys in self.sink.partition_keys(entity) {
                    match self.sink.retain(entity, &keys).await {
                        Ok(retained) => {
                            crate::retention::log_dropped(entity, &keys.stream, &retained);
                            crate::metrics::global().record_retention(
                                &entity.name,
                                &keys.stream,
                                &retained,
                            );
                        }
                        Err(error) => result = Err(error),
                    }
                }
                match result {
                    Ok(()) => failed = false,
                    // Once per run of failures: the memory watch says how Redis is.
                    Err(error) if !failed => {
                        tracing::warn!(entity = %self.entity, error = %error_chain(&error), "applying the stream's retention while paused failed");
                        failed = true;
                    }
                    Err(_) => {}
                }
            }
            tokio::select! {
                _ = self.pause.wait_for(Option::is_none) => return false,
                _ = self.stop.changed() => return true,
                () = tokio::time::sleep(MEMORY_WATCH_INTERVAL) => {}
            }
        }
    }

    async fn run(mut self) {
        let origin = Utc::now();
        let mut failures: u32 = 0;
        // The first cycle runs at once; then on the schedule.
        let mut next = origin;
        loop {
            let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            let claim = self.claim.clone();
            let taken = async {
                match &claim {
                    Some(claim) => claim.taken().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                // A lease just taken: poll at once.
                () = taken => {}
                _ = self.stop.changed() => return,
            }
            if *self.stop.borrow() {
                return;
            }
            if self.pause.borrow().is_some() {
                // Wait for the pause to lift (or shutdown), then poll at once.
                if self.retain_while_paused().await {
                    return;
                }
                next = Utc::now();
                continue;
            }
            // Standing by while another agent holds the entity.
            let value = match &self.claim {
                Some(claim) => match claim.begin_cycle() {
                    Some(value) => Some(value),
                    None => {
                        next = self.settings().schedule.next_after(Utc::now(), origin);
                        continue;
                    }
                },
                None => None,
            };
            let started = std::time::Instant::now();
            let result = self.cycle(value.as_deref()).await;
            if let (Some(claim), Some(value)) = (&self.claim, &value) {
                claim.end_cycle();
                if result.is_ok() {
                    claim.renewed_since(value, started);
                }
            }
            match result {
                Err(CycleError::LeaseLost {
                    holder, refused, ..
                }) => {
                    // Not a failure: another agent writes the entity now.
                    if refused {
                        tracing::info!(entity = %self.entity, "cycle stopped: the fence refused its write (another agent holds the lease)");
                    }
                    if let (Some(claim), Some(value)) = (&self.claim, &value) {
                        claim.lose(value, holder.as_deref(), lost_how(refused));
                    }
                    self.memory.forget();
                    failures = 0;
                    next = self.settings().schedule.next_after(Utc::now(), origin);
                }
                Ok(report) => {
                    failures = 0;
                    log_cycle(&report);
                    crate::metrics::global().record_cycle(&report);
                    if let Some((dedup_keys, stream_entries)) = report.sizes {
                        crate::metrics::global().record_sizes(
                            &self.entity,
                            dedup_keys,
                            stream_entries,
                        );
                    }
                    for (stream, retained) in &report.retained {
                        crate::metrics::global().record_retention(&self.entity, stream, retained);
                    }
                    if report.interrupted {
                        return;
                    }
                    let now = Utc::now();
                    let planned = next;
                    next = self.settings().schedule.next_after(now, origin);
                    let missed = self.missed_ticks(planned, now, origin);
                    if missed > 0 {
                        tracing::warn!(entity = %self.entity, missed, "the cycle outlasted its schedule: ticks skipped");
                    }
                }
                Err(CycleError::StateLost { entity, evidence }) => {
                    let error = CycleError::StateLost { entity, evidence };
                    self.record_failure(&error).await;
                    let _ = self.fatal.send(error.into()).await;
                    return;
                }
                Err(e) => {
                    self.record_failure(&e).await;
                    failures += 1;
                    // Re-check the query next time: the table may have changed.
                    self.prepared = None;
                    let wait = backoff(failures);
                    let error = error_chain(&e);
                    if e.is_transient() {
                        tracing::warn!(entity = %self.entity, error = %error, retry_in = ?wait, "cycle failed");
                    } else {
                        tracing::error!(entity = %self.entity, error = %error, retry_in = ?wait, "cycle failed; fix the query, data or config");
                    }
                    next = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
                }
            }
        }
    }

    /// Counts the failure and leaves it in Redis for `status`.
    async fn record_failure(&self, error: &CycleError) {
        crate::metrics::global().record_failure(&self.entity, error);
        crate::status::record_failure(
            &self.sink,
            &self.config.redis.key_prefix,
            self.settings(),
            error,
        )
        .await;
    }

    async fn cycle(&mut self, lease: Option<&str>) -> Result<CycleReport, CycleError> {
        let prepared = match self.prepared.take() {
            Some(prepared) => prepared,
            None => self.source.prepare(self.settings()).await?,
        };
        let entity = &self.config.entities[&self.entity];
        let result = run_cycle(
            entity,
            &self.source,
            &prepared,
            &self.sink,
            &self.stop,
            &mut self.memory,
            lease.map(|value| (value, self.lease)),
        )
        .await;
        self.prepared = Some(prepared);
        result
    }

    /// Ticks that fell strictly between the planned tick and `now`.
    fn missed_ticks(
        &self,
        planned: chrono::DateTime<Utc>,
        now: chrono::DateTime<Utc>,
        origin: chrono::DateTime<Utc>,
    ) -> u64 {
        let schedule = &self.settings().schedule;
        let mut tick = schedule.next_after(planned, origin);
        let mut missed = 0;
        while tick < now && missed < 10_000 {
            missed += 1;
            tick = schedule.next_after(tick, origin);
        }
        missed
    }
}

fn log_cycle(report: &CycleReport) {
    tracing::info!(
        entity = %report.entity,
        rows = report.rows,
        emitted = report.emitted,
        skipped = report.skipped,
        started_at = %crate::change::format_timestamp(report.started_at_ms.saturating_mul(1000)),
        duration_ms = report.duration.as_millis() as u64,
        watermark = report.watermark.map(crate::change::format_timestamp).unwrap_or_default(),
        interrupted = report.interrupted,
        "cycle"
    );
}

/// Exponential backoff with ±25 % jitter, so agents do not retry in lockstep.
pub fn backoff(failures: u32) -> Duration {
    let base = FIRST_BACKOFF.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let base = base.min(MAX_BACKOFF);
    let jitter = rand::rng().random_range(0.75..1.25);
    base.mul_f64(jitter)
}

/// An error and its causes on one line: `a: b: c`. A Redis error among the
/// causes reads as [`crate::sink::describe`] says (an ACL refusal names the
/// command and the rule it needs).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = match cause.downcast_ref::<redis::RedisError>() {
            Some(redis) => crate::sink::describe(redis),
            None => cause.to_string(),
        };
        // Some errors repeat their source's message; say it once.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= Duration::from_millis(625));
        assert!(backoff(3) >= Duration::from_millis(1500));
        assert!(backoff(50) <= MAX_BACKOFF.mul_f64(1.25));
    }
}
