//! Who may write an entity: one lease per entity, on Redis's clock, and the
//! token in it that the dedup and commit scripts check (the fence); the
//! live agents of a config, and how they share the entities.
//!
//! The promise: at any moment at most one agent's writes to an entity are
//! applied. A lease is a key in the entity's slot holding `"<token> <agent
//! id>"` with an expiry (lua/lease.lua); every write carries the caller's
//! lease value and the script refuses it, writing nothing, unless it is the
//! current one. An agent that pauses past its lease (a stopped VM) finds its
//! next write refused, whoever holds the entity by then.
//!
//! Sharing: each agent registers in a sorted set with an expiry, with the
//! number of leases it holds (lua/agents.lua). With `E` entities and `n`
//! live agents, an agent holds at most `ceil(E / n)`: above that it gives
//! leases up between cycles; below it, it takes free ones, preferring the
//! entities that hash highest for its id. An agent above `floor(E / n)`
//! also gives one up while another holds fewer than `floor(E / n)`, so a
//! late starter gets its share; otherwise a lease stays where it is (no
//! bouncing back after a takeover). Nobody takes a lease that is held: a
//! lease changes hands when its holder gives it up (rebalancing, SIGTERM)
//! or stops renewing it (killed, cut off, paused).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Script;
use tokio::sync::{watch, Notify};

use crate::config::{AgentSettings, Config};
use crate::sink::{EntityKeys, Sink, SinkError};

const LEASE_LUA: &str = include_str!("../lua/lease.lua");
const AGENTS_LUA: &str = include_str!("../lua/agents.lua");

/// How often the keeper looks at the agents and the leases: a standby takes
/// over a released entity within this.
const TICK: Duration = Duration::from_millis(250);

/// The channel told when a lease is released or an agent joins or leaves.
pub fn changes_channel(prefix: &str) -> String {
    format!("{prefix}:{{agents}}:changes")
}

/// The keys of the live agents' sorted set and of their lease counts (one slot).
pub fn agents_keys(prefix: &str) -> (String, String) {
    (
        format!("{prefix}:{{agents}}:live"),
        format!("{prefix}:{{agents}}:held"),
    )
}

/// A lease value, `"<token> <agent id>"`, split.
pub fn parse_value(value: &str) -> (Option<u64>, &str) {
    match value.split_once(' ') {
        Some((token, holder)) => (token.parse().ok(), holder),
        None => (None, value),
    }
}

/// The agent id in a lease value, for messages.
pub fn holder_of(value: &str) -> &str {
    parse_value(value).1
}

/// What a lease call found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new token was issued to the caller; `previous` held the entity last.
    Acquired {
        value: String,
        previous: Option<String>,
    },
    /// The caller holds it; it lasts another lease from now.
    Renewed { value: String },
    /// Another agent holds it (its lease value) for `expires_in` more.
    Held { value: String, expires_in: Duration },
    /// The caller held it and gave it up.
    Released,
    /// The caller's value is not the current one (another's, or none).
    Lost { value: Option<String> },
}

/// One entity's lease as this agent sees it, shared by the entity's polling
/// task and the keeper. A cycle runs only while the lease is held, and the
/// keeper gives up only a lease that no cycle is using.
#[derive(Debug)]
pub struct Claim {
    pub entity: String,
    pub keys: EntityKeys,
    /// Preference of this agent for the entity (rendezvous hash).
    preference: u64,
    state: Mutex<ClaimState>,
    /// Woken when the lease is taken: the entity polls at once.
    taken: Notify,
}

#[derive(Debug)]
struct ClaimState {
    held: Option<String>,
    renewed: Instant,
    in_cycle: bool,
}

impl Claim {
    pub fn new(entity: &str, keys: EntityKeys, agent: &str) -> Claim {
        Claim {
            entity: entity.to_owned(),
            keys,
            preference: xxhash_rust::xxh3::xxh3_64(format!("{entity}\0{agent}").as_bytes()),
            state: Mutex::new(ClaimState {
                held: None,
                renewed: Instant::now(),
                in_cycle: false,
            }),
            taken: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClaimState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lease value, if this agent holds it.
    pub fn held(&self) -> Option<String> {
        self.lock().held.clone()
    }

    /// Starts a cycle if the lease is held: returns the value to fence its
    /// writes with. The keeper does not give the lease up until [`Claim::end_cycle`].
    pub fn begin_cycle(&self) -> Option<String> {
        let mut state = self.lock();
        let value = state.held.clone()?;
        state.in_cycle = true;
        Some(value)
    }

    pub fn end_cycle(&self) {
        self.lock().in_cycle = false;
    }

    /// A cycle that started at `at` completed: its state read renewed the
    /// lease after `at`.
    pub fn renewed_since(&self, value: &str, at: Instant) {
        let mut state = self.lock();
        if state.held.as_deref() == Some(value) && at > state.renewed {
            state.renewed = at;
        }
    }

    /// Resolves when the lease is taken.
    pub async fn taken(&self) {
        self.taken.notified().await
    }

    /// This agent took the lease: `value` fences its writes from now on.
    pub fn take(&self, value: String) {
        {
            let mut state = self.lock();
            state.held = Some(value);
            state.renewed = Instant::now();
        }
        crate::metrics::global().record_lease_held(&self.entity, true);
        self.taken.notify_one();
    }

    /// The lease `value` is no longer this agent's (`holder`: whose it is
    /// now; `noticed`: how this agent found out). Logs once per loss; a
    /// value already replaced is ignored.
    pub fn lose(&self, value: &str, holder: Option<&str>, noticed: &'static str) {
        {
            let mut state = self.lock();
            if state.held.as_deref() != Some(value) {
                return;
            }
            state.held = None;
        }
        let metrics = crate::metrics::global();
        metrics.record_lease_held(&self.entity, false);
        metrics.record_lease_lost(&self.entity);
        match holder {
            Some(holder) => tracing::warn!(
                entity = %self.entity,
                holder = %holder_of(holder),
                noticed,
                "lost the lease on entity {} to agent {}; standing by",
                self.entity,
                holder_of(holder)
            ),
            None => tracing::warn!(
                entity = %self.entity,
                noticed,
                "lost the lease on entity {}: it expired before this agent renewed it; standing by",
                self.entity
            ),
        }
    }

    /// Gives the lease up if no cycle uses it: the value to release.
    fn give_up(&self) -> Option<String> {
        let mut state = self.lock();
        if state.in_cycle {
            return None;
        }
        let value = state.held.take();
        if value.is_some() {
            crate::metrics::global().record_lease_held(&self.entity, false);
        }
        value
    }

    /// The value, if held and not renewed for `after`.
    fn due(&self, after: Duration) -> Option<String> {
        let state = self.lock();
        state
            .held
            .clone()
            .filter(|_| state.renewed.elapsed() >= after)
    }
}

/// A live agent, as the agents' set holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveAgent {
    pub id: String,
    /// How long its registration lasts without another heartbeat.
    pub expires_in: Duration,
    /// Leases it held at its last heartbeat.
    pub held: usize,
}

/// The lease scripts, for one agent.
#[derive(Clone)]
pub struct Leases {
    sink: Sink,
    agent: String,
    lease: Duration,
    agents_keys: (String, String),
    channel: String,
    /// For the connection that listens on `channel` (`None`: the settings
    /// did not make a client, and the keeper only ticks).
    client: Option<redis::Client>,
    timeout: Duration,
    lease_script: Script,
    agents_script: Script,
}

impl Leases {
    pub fn new(sink: &Sink, config: &Config) -> Leases {
        let agent: &AgentSettings = &config.agent;
        let prefix = &config.redis.key_prefix;
        Leases {
            sink: sink.clone(),
            agent: agent.id.clone(),
            lease: agent.lease,
            agents_keys: agents_keys(prefix),
            channel: changes_channel(prefix),
            client: crate::sink::client(&config.redis).ok(),
            timeout: config.redis.timeout,
            lease_script: Script::new(LEASE_LUA),
            agents_script: Script::new(AGENTS_LUA),
        }
    }

    pub fn agent(&self) -> &str {
        &self.agent
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn lease_cmd(&self, keys: &EntityKeys, mode: &str, mine: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.lease_script.get_hash())
            .arg(2)
            .arg(&keys.lease)
            .arg(&keys.tokens)
            .arg(mode)
            .arg(mine)
            .arg(&self.agent)
            .arg(self.lease.as_millis() as u64)
            .arg(&self.channel);
        cmd
    }

    /// One lease call per entry, in one round trip.
    async fn calls(
        &self,
        calls: &[(&EntityKeys, &str, &str)],
        entity: &str,
    ) -> Result<Vec<Outcome>, SinkError> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let cmds = || {
            calls
                .iter()
                .map(|(keys, mode, mine)| (keys.lease.as_str(), self.lease_cmd(keys, mode, mine)))
                .collect::<Vec<_>>()
        };
        let error = |error| SinkError::Command {
            entity: entity.to_owned(),
            action: "the lease script",
            error,
        };
        let mut conn = self.sink.connection();
        let replies: Vec<(String, String, i64, String)> = match conn.pipelined(cmds()).await {
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                self.lease_script
                    .prepare_invoke()
                    .load_async(&mut conn)
                    .await
                    .map_err(error)?;
                conn.pipelined(cmds()).await.map_err(error)?
            }
            other => other.map_err(error)?,
        };
        Ok(replies
            .into_iter()
            .map(|(status, value, ms, previous)| {
                let value_opt = Some(value.clone()).filter(|v| !v.is_empty());
                match status.as_str() {
                    "acquired" => Outcome::Acquired {
                        value,
                        previous: Some(previous).filter(|p| !p.is_empty()),
                    },
                    "renewed" => Outcome::Renewed { value },
                    "held" => Outcome::Held {
                        value,
                        expires_in: Duration::from_millis(ms.max(0) as u64),
                    },
                    "released" => Outcome::Released,
                    _ => Outcome::Lost { value: value_opt },
                }
            })
            .collect())
    }

    /// Takes the entity's lease if nobody holds it.
    pub async fn acquire(&self, entity: &str, keys: &EntityKeys) -> Result<Outcome, SinkError> {
        let mut outcomes = self.calls(&[(keys, "acquire", "")], entity).await?;
        Ok(outcomes.pop().unwrap_or(Outcome::Lost { value: None }))
    }

    /// Gives these leases up, each its lease value, in one round trip (a
    /// value that is no longer current is left alone).
    async fn release(&self, releases: &[(&Arc<Claim>, String)]) -> Result<(), SinkError> {
        let calls: Vec<_> = releases
            .iter()
            .map(|(c, v)| (&c.keys, "release", v.as_str()))
            .collect();
        self.calls(&calls, "").await.map(drop)
    }

    /// Registers (`beat`, holding `held` leases), leaves or lists; returns
    /// the live agents.
    async fn agents(&self, mode: &str, held: usize) -> Result<Vec<LiveAgent>, SinkError> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.agents_script.get_hash())
            .arg(2)
            .arg(&self.agents_keys.0)
            .arg(&self.agents_keys.1)
            .arg(mode)
            .arg(&self.agent)
            .arg(self.lease.as_millis() as u64)
            .arg(held)
            .arg(&self.channel);
        let live: Vec<(String, i64, i64)> = self
            .sink
            .query_script(&self.agents_script, &cmd)
            .await
            .map_err(|error| SinkError::Command {
                entity: String::new(),
                action: "the agents script",
                error,
            })?;
        Ok(live
            .into_iter()
            .map(|(id, ms, held)| LiveAgent {
                id,
                expires_in: Duration::from_millis(ms.max(0) as u64),
                held: held.max(0) as usize,
            })
            .collect())
    }

    /// The live agents, sorted by id (for `status`).
    pub async fn live_agents(&self) -> Result<Vec<LiveAgent>, SinkError> {
        let mut live = self.agents("list", 0).await?;
        live.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(live)
    }

    /// Renews the due leases of `claims` in one round trip; a lease found
    /// lost is let go (logged once).
    async fn renew_due(&self, claims: &[Arc<Claim>]) -> Result<(), SinkError> {
        let renewing = Instant::now();
        let due: Vec<(&Arc<Claim>, String)> = claims
            .iter()
            .filter_map(|c| c.due(self.lease / 3).map(|v| (c, v)))
            .collect();
        let calls: Vec<_> = due
            .iter()
            .map(|(c, v)| (&c.keys, "renew", v.as_str()))
            .collect();
        let outcomes = self.calls(&calls, "").await?;
        for ((claim, value), outcome) in due.iter().zip(outcomes) {
            match outcome {
                Outcome::Renewed { .. } => claim.renewed_since(value, renewing),
                Outcome::Lost { value: holder } => {
                    claim.lose(value, holder.as_deref(), "renewing it")
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// What one agent should do about its share of `entities` among the
/// `live` agents (itself counted in), holding `held` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Give up this many leases.
    GiveUp(usize),
    /// Take up to this many free leases.
    Take(usize),
    Keep,
}

pub fn balance(entities: usize, live: &[LiveAgent], me: &str, held: usize) -> Balance {
    let others: Vec<&LiveAgent> = live.iter().filter(|a| a.id != me).collect();
    let n = others.len() + 1;
    let (floor, ceil) = (entities / n, entities.div_ceil(n));
    if held > ceil {
        Balance::GiveUp(held - ceil)
    } else if held > floor && others.iter().any(|a| a.held < floor) {
        Balance::GiveUp(1)
    } else if held < ceil {
        Balance::Take(ceil - held)
    } else {
        Balance::Keep
    }
}

/// Keeps this agent's leases: registers it, renews the leases no cycle
/// renewed lately, and takes or gives up leases to hold its share.
pub struct Keeper {
    leases: Leases,
    claims: Vec<Arc<Claim>>,
    /// Take and give up leases (`run`); `false` only renews (`once`).
    balance: bool,
    /// Set by [`Keeper::run`]: a keeper of an agent that is stopping takes
    /// no more leases (another agent's release can wake it just then).
    stop: Option<watch::Receiver<bool>>,
}

impl Keeper {
    pub fn new(leases: Leases, claims: Vec<Arc<Claim>>, balance: bool) -> Keeper {
        Keeper {
            leases,
            claims,
            balance,
            stop: None,
        }
    }

    /// One round: renewals, heartbeat, then the share; returns what the
    /// share asked for.
    pub async fn tick(&self) -> Result<Balance, SinkError> {
        self.leases.renew_due(&self.claims).await?;
        if !self.balance {
            return Ok(Balance::Keep);
        }
        let mut held: Vec<&Arc<Claim>> =
            self.claims.iter().filter(|c| c.held().is_some()).collect();
        let live = self.leases.agents("beat", held.len()).await?;
        crate::metrics::global().record_leases_checked();
        let decided = balance(self.claims.len(), &live, self.leases.agent(), held.len());
        match decided {
            Balance::GiveUp(n) => {
                // The least preferred first.
                held.sort_by_key(|c| c.preference);
                let releases: Vec<(&Arc<Claim>, String)> = held
                    .iter()
                    .filter_map(|c| c.give_up().map(|v| (*c, v)))
                    .take(n)
                    .collect();
                self.leases.release(&releases).await?;
                for (claim, _) in &releases {
                    tracing::info!(entity = %claim.entity, agents = live.len(), "gave up the lease on entity {} to rebalance", claim.entity);
                }
            }
            Balance::Take(_) if self.stop.as_ref().is_some_and(|stop| *stop.borrow()) => {}
            Balance::Take(n) => self.take_free(n).await?,
            Balance::Keep => {}
        }
        Ok(decided)
    }

    /// Takes up to `wanted` leases that nobody holds, most preferred first.
    async fn take_free(&self, wanted: usize) -> Result<(), SinkError> {
        let mut candidates: Vec<&Arc<Claim>> =
            self.claims.iter().filter(|c| c.held().is_none()).collect();
        candidates.sort_by_key(|c| std::cmp::Reverse(c.preference));
        // Which are free: one round trip of GETs.
        let mut conn = self.leases.sink.connection();
        let exists: Vec<bool> = conn
            .pipelined(
                candidates
                    .iter()
                    .map(|claim| {
                        let mut cmd = redis::cmd("EXISTS");
                        cmd.arg(&claim.keys.lease);
                        (claim.keys.lease.as_str(), cmd)
                    })
                    .collect(),
            )
            .await
            .map_err(|error| SinkError::Command {
                entity: String::new(),
                action: "reading the leases",
                error,
            })?;
        let free: Vec<&Arc<Claim>> = candidates
            .into_iter()
            .zip(exists)
            .filter(|(_, exists)| !exists)
            .map(|(c, _)| c)
            .take(wanted)
            .collect();
        let calls: Vec<_> = free.iter().map(|c| (&c.keys, "acquire", "")).collect();
        let outcomes = self.leases.calls(&calls, "").await?;
        for (claim, outcome) in free.into_iter().zip(outcomes) {
            if let Outcome::Acquired { value, previous } = outcome {
                let (token, _) = parse_value(&value);
                match previous.as_deref() {
                    Some(previous) if previous != self.leases.agent() => {
                        crate::metrics::global().record_takeover(&claim.entity);
                        tracing::info!(entity = %claim.entity, token = token.unwrap_or(0), previous = %previous, "took over entity {} from agent {}", claim.entity, previous);
                    }
                    _ => {
                        tracing::info!(entity = %claim.entity, token = token.unwrap_or(0), "took the lease on entity {}", claim.entity)
                    }
                }
                claim.take(value);
            }
        }
        Ok(())
    }

    /// Ticks until `stop`, logging (once per outage) when Redis fails.
    /// While the agent is under its share it ticks every [`TICK`], so a
    /// lease that expires is taken over soon after; at its share, a few
    /// times per lease (renewals, heartbeat). Either way a lease released
    /// or an agent joining or leaving wakes every keeper at once (a
    /// message on the changes channel).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Keeper {
        self.stop = Some(stop.clone());
        let mut failing = false;
        let mut changes = Changes::new(&self.leases);
        loop {
            let hungry = match self.tick().await {
                Ok(decided) => {
                    if failing {
                        failing = false;
                        tracing::info!("leases: redis works again");
                    }
                    matches!(decided, Balance::Take(_) | Balance::GiveUp(_))
                }
                Err(e) => {
                    if !failing {
                        failing = true;
                        tracing::warn!(error = %crate::agent::error_chain(&e), "leases: redis failed; held leases expire unless renewed in time");
                    }
                    true
                }
            };
            let pause = if hungry || !self.balance {
                TICK.min(self.leases.lease / 4)
            } else {
                self.leases.lease / 3
            };
            if self.balance {
                changes.listen().await;
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = changes.next(), if self.balance => {}
                _ = stop.changed() => return self,
            }
            if *stop.borrow() {
                return self;
            }
        }
    }

    /// Gives every lease up and leaves the agents' set (shutdown): another
    /// agent takes the entities over at its next tick.
    pub async fn release_all(&self) {
        let releases: Vec<(&Arc<Claim>, String)> = self
            .claims
            .iter()
            .filter_map(|c| c.give_up().map(|v| (c, v)))
            .collect();
        let released = self.leases.release(&releases).await;
        let left = if self.balance {
            self.leases.agents("leave", 0).await.map(|_| ())
        } else {
            Ok(())
        };
        match released.and(left) {
            Ok(()) => {
                if !releases.is_empty() {
                    tracing::info!(
                        leases = releases.len(),
                        "released the leases: other agents take the entities over"
                    )
                }
            }
            Err(e) => {
                tracing::warn!(error = %crate::agent::error_chain(&e), "cannot release the leases: other agents take the entities over when they expire")
            }
        }
    }
}

/// The changes channel, listened to on a connection of its own.
struct Changes {
    client: Option<redis::Client>,
    channel: String,
    timeout: Duration,
    stream: Option<redis::aio::PubSubStream>,
    tried: Option<Instant>,
}

/// How often a lost listening connection is opened again.
const CHANGES_RETRY: Duration = Duration::from_secs(5);

impl Changes {
    fn new(leases: &Leases) -> Changes {
        Changes {
            client: leases.client.clone(),
            channel: leases.channel.clone(),
            timeout: leases.timeout,
            stream: None,
            tried: None,
        }
    }

    /// Subscribes if not listening (at most every [`CHANGES_RETRY`]);
    /// without it the keeper only ticks.
    async fn listen(&mut self) {
        if self.stream.is_some() || self.tried.is_some_and(|t| t.elapsed() < CHANGES_RETRY) {
            return;
        }
        let Some(client) = &self.client else { return };
        self.tried = Some(Instant::now());
        let subscribe = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&self.channel).await?;
            Ok::<_, redis::RedisError>(pubsub.into_on_message())
        };
        match tokio::time::timeout(self.timeout, subscribe).await {
            Ok(Ok(stream)) => self.stream = Some(stream),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "leases: cannot listen for changes; ticking only")
            }
            Err(_) => tracing::debug!("leases: listening for changes timed out; ticking only"),
        }
    }

    /// Resolves on the next change; never while not listening.
    async fn next(&mut self) {
        use futures_util::StreamExt;
        let Some(stream) = &mut self.stream else {
            return std::future::pending().await;
        };
        if stream.next().await.is_none() {
            // The connection dropped: listen again later.
            self.stream = None;
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(held: &[(&str, usize)]) -> Vec<LiveAgent> {
        held.iter()
            .map(|(id, held)| LiveAgent {
                id: id.to_string(),
                expires_in: Duration::from_secs(1),
                held: *held,
            })
            .collect()
    }

    /// Lets agents take turns at balancing, as their ticks do, until none
    /// moves; returns the leases each holds.
    fn settle(entities: usize, mut held: Vec<usize>) -> Vec<usize> {
        let ids: Vec<String> = (0..held.len()).map(|i| format!("agent-{i}")).collect();
        for _round in 0..100 {
            let mut moved = false;
            for me in 0..held.len() {
                let now: Vec<(&str, usize)> = ids
                    .iter()
                    .map(String::as_str)
                    .zip(held.iter().copied())
                    .collect();
                let free = entities - held.iter().sum::<usize>();
                match balance(entities, &live(&now), &ids[me], held[me]) {
                    Balance::GiveUp(n) => {
                        held[me] -= n;
                        moved = true;
                    }
                    Balance::Take(n) if free > 0 => {
                        held[me] += n.min(free);
                        moved = true;
                    }
                    _ => {}
                }
            }
            if !moved {
                return held;
            }
        }
        panic!("no settling: {held:?}");
    }

    #[test]
    fn agents_settle_on_shares_that_differ_by_at_most_one() {
        for entities in [0, 1, 2, 9, 10, 11, 1000] {
            for n in 1..=5 {
                // The first agent started alone and took everything.
                let mut start = vec![0; n];
                start[0] = entities;
                let held = settle(entities, start);
                assert_eq!(
                    held.iter().sum::<usize>(),
                    entities,
                    "{entities}/{n}: {held:?}"
                );
                let (min, max) = (held.iter().min().unwrap(), held.iter().max().unwrap());
                assert!(max - min <= 1, "{entities}/{n}: {held:?}");
            }
        }
        assert_eq!(settle(10, vec![4, 4, 2]).iter().max(), Some(&4));
    }

    #[test]
    fn a_lease_stays_where_it_is_when_shares_allow() {
        // One entity, two agents: whoever holds it keeps it.
        let now = live(&[("a", 0), ("b", 1)]);
        assert_eq!(balance(1, &now, "b", 1), Balance::Keep);
        assert_eq!(balance(1, &now, "a", 0), Balance::Take(1));
        // Not registered yet: counted in.
        assert_eq!(balance(10, &live(&[("a", 10)]), "b", 0), Balance::Take(5));
        assert_eq!(
            balance(10, &live(&[("a", 10), ("b", 0)]), "a", 10),
            Balance::GiveUp(5)
        );
    }

    #[test]
    fn a_lease_value_holds_the_token_and_the_agent() {
        assert_eq!(parse_value("17 web 3"), (Some(17), "web 3"));
        assert_eq!(holder_of("17 web-3"), "web-3");
        assert_eq!(parse_value("x"), (None, "x"));
    }
}
