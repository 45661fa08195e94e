//! `highwater run` as a child process: started, killed with `kill -9`,
//! stopped with SIGTERM, paused (SIGSTOP) and resumed, restarted, its JSON
//! log lines of every run kept.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The stderr lines of every run of the agent in a scenario.
#[derive(Clone, Default)]
pub struct AgentLog {
    lines: Arc<Mutex<Vec<String>>>,
}

/// One completed cycle, microseconds since 1970: it started no earlier than
/// `start` and had ended by `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CycleSpan {
    /// No later than the cycle's start (the log time minus its duration).
    pub start: i64,
    /// No earlier than the cycle's end (the log line's time).
    pub end: i64,
}

impl AgentLog {
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// The JSON log events from line `from` on.
    pub fn events_since(&self, from: usize) -> Vec<Value> {
        let lines = self.lines.lock().unwrap();
        lines[from.min(lines.len())..]
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Events whose message is `message`, from line `from` on.
    pub fn named_since(&self, from: usize, message: &str) -> Vec<Value> {
        self.events_since(from)
            .into_iter()
            .filter(|e| e["message"] == message)
            .collect()
    }

    /// The line after the first event named `message` from line `from` on
    /// (the log's length if there is none).
    pub fn position_since(&self, from: usize, message: &str) -> usize {
        let lines = self.lines.lock().unwrap();
        (from.min(lines.len())..lines.len())
            .find(|&i| {
                serde_json::from_str::<Value>(&lines[i]).is_ok_and(|e| e["message"] == message)
            })
            .map_or(lines.len(), |i| i + 1)
    }

    /// The cycles that completed (not interrupted), with their time span.
    pub fn completed_cycles(&self) -> Vec<CycleSpan> {
        let mut spans: Vec<CycleSpan> = self
            .named_since(0, "cycle")
            .iter()
            .filter(|e| e["interrupted"] != true)
            .map(|e| {
                let end = timestamp(e).expect("a cycle event has a timestamp");
                let duration_ms = e["duration_ms"].as_i64().expect("cycle duration_ms");
                // duration_ms is truncated: the start may be up to 1 ms earlier.
                CycleSpan {
                    start: end - (duration_ms + 1) * 1000,
                    end,
                }
            })
            .collect();
        spans.sort_by_key(|s| s.start);
        spans
    }

    /// How many lines contain `text`.
    pub fn count_containing(&self, text: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    }

    /// The last `n` lines, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
    }
}

/// The event's time, microseconds since 1970.
pub fn timestamp(event: &Value) -> Option<i64> {
    let text = event["timestamp"].as_str()?;
    Some(
        chrono::DateTime::parse_from_rfc3339(text)
            .ok()?
            .timestamp_micros(),
    )
}

/// A running `highwater run`.
pub struct AgentProcess {
    child: Child,
    reader: Option<std::thread::JoinHandle<()>>,
    /// The harness killed it with `kill -9`: its exit says nothing.
    killed: bool,
}

impl AgentProcess {
    /// Starts `highwater run --config <config> --log-format json`, with
    /// `HIGHWATER_CRASH_AT` set when `crash_at` is given and `env` added
    /// (`HIGHWATER_UNFENCED=1`). Core dumps are turned off (crash points
    /// abort).
    pub fn start(
        config: &Path,
        log: &AgentLog,
        crash_at: Option<&str>,
        env: &[(&str, &str)],
    ) -> AgentProcess {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg("ulimit -c 0; exec \"$0\" \"$@\"")
            .arg(env!("CARGO_BIN_EXE_highwater"))
            .args(["run", "--config"])
            .arg(config)
            .args(["--log-format", "json"])
            .env("HIGHWATER_LOG", "info")
            .env_remove("HIGHWATER_CRASH_AT")
            .env_remove("HIGHWATER_UNFENCED")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(point) = crash_at {
            command.env("HIGHWATER_CRASH_AT", point);
        }
        let mut child = command.spawn().expect("start highwater run");
        log.push(format!(
            "--- highwater run (pid {}{}{}) ---",
            child.id(),
            crash_at
                .map(|p| format!(", HIGHWATER_CRASH_AT={p}"))
                .unwrap_or_default(),
            env.iter()
                .map(|(k, v)| format!(", {k}={v}"))
                .collect::<String>()
        ));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.push(line);
            }
        });
        AgentProcess {
            child,
            reader: Some(reader),
            killed: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9 <pid>`, as an operator (or the OOM killer) would, and waits
    /// for the process to be gone.
    pub fn kill9(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-9", &self.pid().to_string()])
            .status()
            .expect("run kill");
        // It may have exited by itself just before.
        let _ = status;
        self.killed = true;
        let exit = self.child.wait().expect("wait for highwater");
        self.join_reader();
        exit
    }

    /// Whether the harness killed it with `kill -9`.
    pub fn killed(&self) -> bool {
        self.killed
    }

    /// SIGTERM.
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// SIGSTOP: the process stops where it is, holding what it holds (its
    /// leases, a chunk read but not written), as a paused VM would.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`AgentProcess::pause`].
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {name} {} failed", self.pid());
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.try_wait().expect("wait for highwater");
        if status.is_some() {
            self.join_reader();
        }
        status
    }

    /// Waits for the process to exit; `None` if it still runs after `deadline`.
    pub async fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if started.elapsed() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every line of the process is in the log once this returns.
    fn join_reader(&mut self) {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
