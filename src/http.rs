//! The HTTP endpoint of `run`: `GET /metrics` (Prometheus text format) and
//! `GET /healthz` (200 when every entity keeps up, 503 otherwise).
//!
//! A deliberately small HTTP/1.1 responder on tokio's `TcpListener`: one
//! request per connection, answered and closed. Scrapers and probes need no
//! more, and it keeps a web framework out of the agent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::Metrics;

/// Longest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What `/healthz` judges: each entity's interval, how many of them may pass
/// without a completed cycle, and when the agent started.
pub struct Health {
    entities: Vec<(String, Duration)>,
    intervals: u32,
    started: Instant,
}

impl Health {
    pub fn new(config: &Config, started: Instant) -> Health {
        Health {
            entities: config
                .entities
                .values()
                .map(|e| (e.name.clone(), e.schedule.nominal_interval()))
                .collect(),
            intervals: config.http.unhealthy_after_intervals,
            started,
        }
    }

    /// Healthy or not, and one line per entity saying why.
    pub fn judge(&self, metrics: &Metrics) -> (bool, String) {
        let mut healthy = true;
        let mut text = String::new();
        for (entity, interval) in &self.entities {
            // Another agent polls it: standing by is this agent's job, as
            // long as it can tell (Redis answered its lease keeper lately).
            let checked = metrics.leases_checked_ago();
            if !metrics.lease_held(entity)
                && checked.is_some_and(|ago| ago <= *interval + LEASE_CHECK_SLACK)
            {
                text.push_str(&format!(
                    "{entity}: ok (standing by: another agent holds its lease)\n"
                ));
                continue;
            }
            let limit = interval.saturating_mul(self.intervals);
            let last = metrics.last_success(entity);
            let since = last.unwrap_or(self.started).elapsed();
            let ok = since <= limit;
            healthy &= ok;
            let what = match last {
                Some(_) => format!("last cycle completed {} ago", seconds(since)),
                None => format!("no cycle completed yet, started {} ago", seconds(since)),
            };
            let rows = metrics.rows_in_progress(entity);
            let progress = if rows > 0 {
                format!("; a cycle in progress has read {rows} rows")
            } else {
                String::new()
            };
            text.push_str(&format!(
                "{entity}: {} ({what}, limit {}){progress}\n",
                if ok { "ok" } else { "unhealthy" },
                seconds(limit)
            ));
        }
        let verdict = if healthy { "ok\n" } else { "unhealthy\n" };
        (healthy, format!("{verdict}{text}"))
    }
}

/// How stale the lease keeper's knowledge may be for a standby to count as healthy.
const LEASE_CHECK_SLACK: Duration = Duration::from_secs(5);

fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Binds the listener (so a taken port fails the start, not a later scrape).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `/metrics` and `/healthz` until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: &'static Metrics,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let health = Arc::clone(&health);
                tokio::spawn(async move {
                    if let Err(e) = respond(stream, &health, metrics).await {
                        tracing::debug!(error = %e, "http request failed");
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn respond(mut stream: TcpStream, health: &Health, metrics: &Metrics) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()),
    };
    let (status, content_type, body) = match parse_request_line(&head) {
        None => (400, TEXT, "bad request\n".to_owned()),
        Some((method, _)) if method != "GET" && method != "HEAD" => {
            (405, TEXT, "only GET and HEAD\n".to_owned())
        }
        Some((_, "/metrics")) => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        Some((_, "/healthz")) => {
            let (healthy, text) = health.judge(metrics);
            (if healthy { 200 } else { 503 }, TEXT, text)
        }
        Some((_, "/")) => (200, TEXT, "highwater: /metrics, /healthz\n".to_owned()),
        Some(_) => (
            404,
            TEXT,
            "not found: try /metrics or /healthz\n".to_owned(),
        ),
    };
    let head_only = head.starts_with("HEAD ");
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 405 {
        response.push_str("Allow: GET, HEAD\r\n");
    }
    response.push_str("\r\n");
    if !head_only {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

const TEXT: &str = "text/plain; charset=utf-8";

/// Reads until the blank line that ends the request head (bodies are ignored).
async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.len() >= MAX_HEAD {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// `GET /metrics?x HTTP/1.1` → `("GET", "/metrics")`.
fn parse_request_line(head: &str) -> Option<(&str, &str)> {
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") || method.is_empty() {
        return None;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Some((method, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse_to_method_and_path() {
        assert_eq!(
            parse_request_line("GET /metrics?name=x HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(parse_request_line("garbage"), None);
        assert_eq!(parse_request_line("GET / SPDY/3\r\n\r\n"), None);
    }
}
