//! The operator's kit (`deploy/`) against the real agent: every metric the
//! Grafana dashboard and the Prometheus rules name exists in the `/metrics`
//! of a running `highwater run`, and the rules (and the dashboard's queries)
//! parse with `promtool` (Debian's `prometheus` package; `./scripts/test`
//! installs it).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const DEADLINE: Duration = Duration::from_secs(30);

const DASHBOARD: &str = "deploy/grafana/highwater.json";
const RULES: &str = "deploy/prometheus/highwater-rules.yml";

/// Series the kit may name that Prometheus makes itself, not highwater.
const PROMETHEUS_OWN: &[&str] = &["up"];

fn kit_file(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read_kit(relative: &str) -> String {
    std::fs::read_to_string(kit_file(relative)).unwrap_or_else(|e| panic!("read {relative}: {e}"))
}

// ---------------------------------------------------------------------------
// The queries of the kit
// ---------------------------------------------------------------------------

/// A PromQL expression of the kit and where it is.
#[derive(Debug)]
struct Query {
    place: String,
    expr: String,
}

/// Every query of the dashboard: the panels' targets (rows nest panels) and
/// the template variables' queries (`label_values(<selector>, label)`
/// reduced to the selector).
fn dashboard_queries() -> Vec<Query> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read_kit(DASHBOARD)).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    fn panels(list: &serde_json::Value, queries: &mut Vec<Query>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    queries.push(Query {
                        place: format!("{DASHBOARD}: panel {title:?}"),
                        expr: expr.to_owned(),
                    });
                }
            }
            panels(&panel["panels"], queries);
        }
    }
    panels(&dashboard["panels"], &mut queries);
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] != "query" {
            continue;
        }
        let name = variable["name"].as_str().unwrap_or("?");
        let query = variable["query"]["query"]
            .as_str()
            .or_else(|| variable["query"].as_str())
            .unwrap_or_else(|| panic!("variable {name} has no query"));
        let expr = grafana_variable_selector(query)
            .unwrap_or_else(|| panic!("variable {name}: cannot read its query {query:?}"));
        queries.push(Query {
            place: format!("{DASHBOARD}: variable {name}"),
            expr,
        });
    }
    queries
}

/// The PromQL inside a Grafana Prometheus variable query:
/// `label_values(sel, label)` → `sel`, `query_result(expr)` → `expr`,
/// `label_values(label)` → nothing to check (an empty expression).
fn grafana_variable_selector(query: &str) -> Option<String> {
    let query = query.trim();
    let inner = |prefix: &str| {
        query
            .strip_prefix(prefix)
            .and_then(|rest| rest.trim_start().strip_prefix('('))
            .and_then(|rest| rest.strip_suffix(')'))
    };
    if let Some(args) = inner("label_values") {
        return Some(match args.rsplit_once(',') {
            Some((selector, _label)) => selector.trim().to_owned(),
            None => String::new(),
        });
    }
    if let Some(expr) = inner("query_result") {
        return Some(expr.to_owned());
    }
    inner("metrics").map(|_| String::new())
}

/// Every `expr` of the rules file, by alert or record name.
fn rules_queries() -> Vec<Query> {
    let docs = yaml_rust2::YamlLoader::load_from_str(&read_kit(RULES))
        .unwrap_or_else(|e| panic!("{RULES} is not YAML: {e}"));
    let mut queries = Vec::new();
    for doc in &docs {
        for group in doc["groups"].as_vec().into_iter().flatten() {
            for rule in group["rules"].as_vec().into_iter().flatten() {
                let name = rule["alert"]
                    .as_str()
                    .or_else(|| rule["record"].as_str())
                    .unwrap_or("?");
                let expr = rule["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{RULES}: rule {name} has no expr string"));
                queries.push(Query {
                    place: format!("{RULES}: rule {name}"),
                    expr: expr.to_owned(),
                });
            }
        }
    }
    queries
}

// ---------------------------------------------------------------------------
// Metric names out of PromQL
// ---------------------------------------------------------------------------

/// Words that are PromQL syntax, never a metric name (case-insensitive).
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
];

/// Aggregation operators, which may take `by (…)` before their argument.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

#[derive(Debug, PartialEq)]
enum Token {
    Ident(String),
    Open,
    Close,
    Other,
}

/// The metric names an expression selects: identifiers that are neither
/// functions, keywords, label names (in `{…}` and `by (…)` lists) nor
/// Grafana variables, plus `{__name__="…"}`. Strings, durations and
/// comments are skipped.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let tokens = tokenize(expr, &mut names);
    let mut i = 0;
    while i < tokens.len() {
        if let Token::Ident(word) = &tokens[i] {
            let lower = word.to_ascii_lowercase();
            let next_opens = tokens.get(i + 1) == Some(&Token::Open);
            if LABEL_LISTS.contains(&lower.as_str()) && next_opens {
                // Skip the label list up to its closing parenthesis.
                let mut depth = 0;
                i += 1;
                while i < tokens.len() {
                    match tokens[i] {
                        Token::Open => depth += 1,
                        Token::Close => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
            } else if AGGREGATIONS.contains(&lower.as_str())
                && matches!(tokens.get(i + 1), Some(Token::Ident(w)) if ["by", "without"].contains(&w.to_ascii_lowercase().as_str()))
            {
                // `sum by (…) (…)`: an aggregation, its label list next.
            } else if !next_opens && !KEYWORDS.contains(&lower.as_str()) {
                names.insert(word.clone());
            }
        }
        i += 1;
    }
    names
}

/// Identifiers, parentheses and the rest; strings, `{…}` matchers, `[…]`
/// ranges, numbers and durations, `$variables` and `# comments` become
/// [`Token::Other`]. A `__name__="…"` matcher adds its name to `names`.
fn tokenize(expr: &str, names: &mut BTreeSet<String>) -> Vec<Token> {
    let chars: Vec<char> = expr.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let ident_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                string_at(&chars, &mut i);
                tokens.push(Token::Other);
            }
            '{' => {
                // Label matchers: names and strings; only __name__ matters.
                i += 1;
                let mut last_label = String::new();
                while i < chars.len() && chars[i] != '}' {
                    if matches!(chars[i], '"' | '\'' | '`') {
                        let value = string_at(&chars, &mut i);
                        if last_label == "__name__" {
                            names.insert(value);
                        }
                    } else if ident_start(chars[i]) {
                        let start = i;
                        while i < chars.len() && ident_char(chars[i]) {
                            i += 1;
                        }
                        last_label = chars[start..i].iter().collect();
                    } else {
                        if chars[i] == ',' {
                            last_label.clear();
                        }
                        i += 1;
                    }
                }
                i += 1;
                tokens.push(Token::Other);
            }
            '[' => {
                while i < chars.len() && chars[i] != ']' {
                    i += 1;
                }
                i += 1;
                tokens.push(Token::Other);
            }
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '$' => {
                // A Grafana variable: $name, ${name} or ${name:format}.
                i += 1;
                if chars.get(i) == Some(&'{') {
                    while i < chars.len() && chars[i] != '}' {
                        i += 1;
                    }
                    i += 1;
                } else {
                    while i < chars.len() && ident_char(chars[i]) {
                        i += 1;
                    }
                }
                tokens.push(Token::Other);
            }
            '(' => {
                tokens.push(Token::Open);
                i += 1;
            }
            ')' => {
                tokens.push(Token::Close);
                i += 1;
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                // A number or a duration: 0.99, 1e3, 0x1f, 5m, 1h30m.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
                tokens.push(Token::Other);
            }
            c if ident_start(c) => {
                let start = i;
                while i < chars.len() && ident_char(chars[i]) {
                    i += 1;
                }
                tokens.push(Token::Ident(chars[start..i].iter().collect()));
            }
            c if c.is_whitespace() => i += 1,
            _ => {
                tokens.push(Token::Other);
                i += 1;
            }
        }
    }
    tokens
}

/// The string literal starting at `chars[*i]` (its quote), unescaped enough
/// for a metric name; leaves `*i` past the closing quote.
fn string_at(chars: &[char], i: &mut usize) -> String {
    let quote = chars[*i];
    let mut value = String::new();
    *i += 1;
    while *i < chars.len() && chars[*i] != quote {
        if chars[*i] == '\\' && quote != '`' {
            *i += 1;
        }
        if let Some(&c) = chars.get(*i) {
            value.push(c);
        }
        *i += 1;
    }
    *i += 1;
    value
}

/// The metric families of an exposition: name → type (from `# TYPE`).
fn families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| {
            let mut words = rest.split_whitespace();
            Some((words.next()?.to_owned(), words.next()?.to_owned()))
        })
        .collect()
}

/// Whether `name` is a series of one of `families`: the family itself, or a
/// histogram's `_bucket`/`_sum`/`_count`, or a summary's `_sum`/`_count`.
fn served(name: &str, families: &BTreeMap<String, String>) -> bool {
    if families.contains_key(name) {
        return true;
    }
    [
        ("_bucket", &["histogram"][..]),
        ("_sum", &["histogram", "summary"][..]),
        ("_count", &["histogram", "summary"][..]),
    ]
    .iter()
    .any(|(suffix, kinds)| {
        name.strip_suffix(suffix)
            .and_then(|base| families.get(base))
            .is_some_and(|kind| kinds.contains(&kind.as_str()))
    })
}

#[test]
fn metric_names_are_read_out_of_promql_without_functions_labels_or_strings() {
    let names = |expr: &str| metric_names(expr).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (entity, le) (rate(highwater_cycle_duration_seconds_bucket{job=~"$job", entity="highwater_rows_read_total"}[$__rate_interval])))"#
        ),
        ["highwater_cycle_duration_seconds_bucket"]
    );
    assert_eq!(
        names(
            "sum by (agent) (highwater_lease_held * on (job, instance) group_left (agent) highwater_agent_info) / count without (x) (highwater_build_info)"
        ),
        ["highwater_agent_info", "highwater_build_info", "highwater_lease_held"]
    );
    assert_eq!(
        names(
            "(sum without (outcome) (increase(highwater_cycles_total{outcome=~\"error\"}[15m])) > 0)\nunless on (job, instance, entity) # not when one committed\n(highwater_lag_seconds offset 5m > bool 3 * 60)"
        ),
        ["highwater_cycles_total", "highwater_lag_seconds"]
    );
    assert_eq!(
        names(r#"count({__name__="highwater_build_info", job='x'}) AND up == 1e3"#),
        ["highwater_build_info", "up"]
    );
    assert_eq!(
        names("time() - highwater_last_success_timestamp_seconds > ${threshold:raw}"),
        ["highwater_last_success_timestamp_seconds"]
    );
    assert_eq!(
        grafana_variable_selector("label_values(highwater_build_info{job=~\"$job\"}, instance)")
            .as_deref(),
        Some("highwater_build_info{job=~\"$job\"}")
    );
    assert_eq!(
        grafana_variable_selector("label_values(job)").as_deref(),
        Some("")
    );
    let histogram: BTreeMap<String, String> = [(
        "highwater_cycle_duration_seconds".to_owned(),
        "histogram".to_owned(),
    )]
    .into();
    assert!(served("highwater_cycle_duration_seconds_count", &histogram));
    assert!(served("highwater_cycle_duration_seconds", &histogram));
    assert!(!served(
        "highwater_cycle_duration_seconds_total",
        &histogram
    ));
}

// ---------------------------------------------------------------------------
// Against a running agent
// ---------------------------------------------------------------------------

#[tokio::test]
async fn every_metric_the_dashboard_and_the_rules_name_is_in_a_running_agents_metrics() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("kit");
    pg_exec(
        &pool,
        &format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, name text, updated_at timestamptz NOT NULL DEFAULT now());\
             INSERT INTO {table} (id, name) VALUES (1, 'a'), (2, 'b')"
        ),
    )
    .await;
    let port = free_port();
    let config = env.config(&format!(
        r#"
[http]
listen = "127.0.0.1:{port}"

[sources.db]
url = "{url}"

[entities.{table}]
source = "db"
query = "SELECT id, name, updated_at FROM {table} WHERE updated_at >= :since"
key = "id"
cursor = "updated_at"
lookback = "5m"
every = "1s"
start = "beginning"
"#,
        url = pg_url()
    ));
    let agent = Agent::start(&config);

    // After a committed cycle every family is registered (the agent's id,
    // the entity's lease and gauges).
    let committed = format!("highwater_cycles_total{{entity=\"{table}\",outcome=\"ok\"}} ");
    let start = Instant::now();
    let metrics = loop {
        if let Ok((200, body)) = http_get(port, "/metrics") {
            let done = body
                .lines()
                .find_map(|l| l.strip_prefix(&committed))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .is_some_and(|n| n >= 1.0);
            if done {
                break body;
            }
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for a committed cycle in /metrics; stderr:\n{}",
            agent.stderr().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let families = families(&metrics);

    let dashboard = dashboard_queries();
    let rules = rules_queries();
    // A parse that found nothing would pass vacuously.
    assert!(
        dashboard.len() >= 20,
        "{} dashboard queries",
        dashboard.len()
    );
    assert!(rules.len() >= 8, "{} rules", rules.len());
    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for query in dashboard.iter().chain(&rules) {
        let names = metric_names(&query.expr);
        assert!(
            !names.is_empty() || query.expr.trim().is_empty(),
            "{}: no metric found in {:?}",
            query.place,
            query.expr
        );
        for name in names {
            used.entry(name).or_default().push(query.place.clone());
        }
    }
    let missing: Vec<String> = used
        .iter()
        .filter(|(name, _)| !PROMETHEUS_OWN.contains(&name.as_str()) && !served(name, &families))
        .map(|(name, places)| format!("{name} (in {})", places.join("; ")))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics the kit names that /metrics does not serve:\n  {}\n/metrics serves: {:?}",
        missing.join("\n  "),
        families.keys().collect::<Vec<_>>()
    );
    // The kit covers what the issue asks for.
    for name in [
        "highwater_cycles_total",
        "highwater_rows_read_total",
        "highwater_rows_emitted_total",
        "highwater_rows_skipped_total",
        "highwater_lag_seconds",
        "highwater_lease_held",
        "highwater_lease_takeovers_total",
        "highwater_leases_lost_total",
        "highwater_window_extension_seconds",
        "highwater_long_transactions_total",
        "highwater_open_transaction_start_timestamp_seconds",
    ] {
        assert!(
            dashboard
                .iter()
                .any(|q| metric_names(&q.expr).contains(name)),
            "the dashboard shows no {name}"
        );
    }
}

// ---------------------------------------------------------------------------
// promtool
// ---------------------------------------------------------------------------

/// `promtool check rules <file>`: its output; fails the test when promtool
/// is missing (it must not pass without having checked anything).
fn promtool_check_rules(file: &std::path::Path) -> (bool, String) {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(file)
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed, so the rules cannot be checked: ./scripts/test installs it \
             (Debian package prometheus; or apt-get install --no-install-recommends prometheus)"
        ),
        Err(e) => panic!("run promtool: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_alert_rules_parse_with_promtool() {
    let (ok, text) = promtool_check_rules(&kit_file(RULES));
    assert!(ok, "promtool check rules {RULES}:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn the_dashboards_queries_parse_with_promtool() {
    // Each panel's query as a recording rule, Grafana's variables replaced
    // by what they expand to.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let queries = dashboard_queries();
    for (n, query) in queries.iter().enumerate() {
        if query.expr.trim().is_empty() {
            continue;
        }
        let expr = query
            .expr
            .replace("$__rate_interval", "5m")
            .replace("$__range", "6h")
            .replace("$__interval", "1m")
            .replace("$job", ".*")
            .replace("$instance", ".*")
            .replace("$entity", ".*");
        rules.push_str(&format!(
            "      # {}\n      - record: dashboard:query_{n}\n        expr: '{}'\n",
            query.place.replace('\n', " "),
            expr.replace('\'', "''").replace('\n', " ")
        ));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, &rules).expect("write the rules");
    let (ok, text) = promtool_check_rules(&file);
    assert!(
        ok,
        "the dashboard's queries do not parse:\n{text}\nas rules:\n{rules}"
    );
}
