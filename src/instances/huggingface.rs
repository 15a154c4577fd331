//! Hugging Face datasets-server client: reads every row of one dataset split through the
//! public `/rows` API (discovering the config through `/splits` when none is given) and
//! turns each row into a [`RawInstance`]. It owns paging, retries with backoff and the
//! error messages a user sees when a dataset, split or column is wrong; selection and
//! image templating happen elsewhere.

use std::time::Duration;

use reqwest::{StatusCode, Url, header::RETRY_AFTER};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::api::HuggingFaceSource;
use crate::instances::RawInstance;

/// Largest page the datasets-server `/rows` endpoint serves.
const PAGE_LENGTH: u64 = 100;

/// Why reading a dataset failed. [`HfError::kind`] gives a stable label for metrics/status.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// The endpoint is not an absolute http(s) URL.
    #[error("invalid datasets-server endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    /// The HTTP client or a request could not be built; retrying cannot help.
    #[error("cannot build HTTP client or request for {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    /// The server refused the request with a 4xx status other than 429.
    #[error("GET {url} returned HTTP {status}: {message}")]
    Status {
        status: u16,
        url: String,
        message: String,
    },
    /// Every attempt hit a retryable failure (429, 5xx, connection error or timeout).
    #[error("GET {url} failed after {attempts} attempts; last failure: {last}")]
    RetriesExhausted {
        url: String,
        attempts: u32,
        last: String,
    },
    /// The response body is not the JSON the datasets-server API documents.
    #[error("cannot decode response of GET {url}: {reason}")]
    Decode { url: String, reason: String },
    /// No config of the dataset has the requested split; `available` lists config/split.
    #[error(
        "dataset {dataset} has no split {split:?}; existing splits (config/split): {available}"
    )]
    SplitNotFound {
        dataset: String,
        split: String,
        available: String,
    },
    /// Several configs have the requested split, so the choice must be explicit.
    #[error("dataset {dataset} has split {split:?} in configs {configs}; set `config` to one")]
    AmbiguousConfig {
        dataset: String,
        split: String,
        configs: String,
    },
    /// The id or image cell of a row is unusable.
    #[error("dataset {dataset}: row {row}: field {field:?} {problem}")]
    Cell {
        dataset: String,
        row: u64,
        field: String,
        problem: CellProblem,
    },
    /// The server returned an empty page before delivering `num_rows_total` rows.
    #[error("dataset {dataset}: empty page at offset {offset} although it reports {total} rows")]
    NoProgress {
        dataset: String,
        offset: u64,
        total: u64,
    },
}

/// What is wrong with a row's id or image cell.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CellProblem {
    /// The row has no such column.
    #[error("is missing")]
    Missing,
    /// The value is not a string; holds a description such as `"a number"`.
    #[error("is {0}, expected a string")]
    NotString(&'static str),
    /// The server cut the value short, so it is unusable.
    #[error("was truncated by the server")]
    Truncated,
}

impl HfError {
    /// Short stable label of the error class, e.g. `"status"` or `"missing_field"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidEndpoint { .. } => "config",
            Self::Http { .. } => "http",
            Self::Status { .. } => "status",
            Self::RetriesExhausted { .. } => "retries_exhausted",
            Self::Decode { .. } => "decode",
            Self::SplitNotFound { .. } => "split_not_found",
            Self::AmbiguousConfig { .. } => "ambiguous_config",
            Self::Cell {
                problem: CellProblem::Missing,
                ..
            } => "missing_field",
            Self::Cell {
                problem: CellProblem::NotString(_),
                ..
            } => "wrong_type",
            Self::Cell {
                problem: CellProblem::Truncated,
                ..
            } => "truncated",
            Self::NoProgress { .. } => "no_progress",
        }
    }
}

/// How often and how patiently a request is retried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total tries per request, including the first (at least 1 is always made).
    pub attempts: u32,
    /// Delay before the second try; doubles on each further try.
    pub initial_backoff: Duration,
    /// Upper bound of any delay, including one asked for by `Retry-After`.
    pub max_backoff: Duration,
    /// Limit of one request, from connecting to reading the whole body.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            timeout: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Delay after failed try number `attempt` (1-based): the server's `Retry-After` when
    /// given, else exponential backoff; both capped at `max_backoff`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let delay = retry_after.unwrap_or_else(|| {
            // Cap the shift so the multiplication cannot overflow on absurd attempt counts.
            let factor = 1u32 << attempt.saturating_sub(1).min(20);
            self.initial_backoff.saturating_mul(factor)
        });
        delay.min(self.max_backoff)
    }
}

/// Client of one datasets-server endpoint.
#[derive(Clone, Debug)]
pub struct HfClient {
    http: reqwest::Client,
    endpoint: String,
    retry: RetryPolicy,
}

/// One failed try: `Retry(reason, server-requested delay)` may succeed later, `Fatal` not.
enum Failure {
    Retry(String, Option<Duration>),
    Fatal(HfError),
}

#[derive(Deserialize)]
struct RowsPage {
    rows: Vec<RowEntry>,
    num_rows_total: u64,
    #[serde(default)]
    partial: bool,
}

#[derive(Deserialize)]
struct RowEntry {
    row_idx: u64,
    row: Map<String, Value>,
    #[serde(default)]
    truncated_cells: Vec<String>,
}

#[derive(Deserialize)]
struct SplitsResponse {
    splits: Vec<SplitEntry>,
}

#[derive(Deserialize)]
struct SplitEntry {
    config: String,
    split: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

impl HfClient {
    /// Client of `endpoint` (e.g. `https://datasets-server.huggingface.co`) with the default
    /// [`RetryPolicy`]. Installs the ring TLS provider process-wide if none is installed.
    pub fn new(endpoint: &str) -> Result<Self, HfError> {
        let invalid = |reason: String| HfError::InvalidEndpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let url = Url::parse(endpoint).map_err(|e| invalid(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(format!(
                "scheme {:?} is not http or https",
                url.scheme()
            )));
        }
        // reqwest is built without a rustls provider; Err only means one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .user_agent(concat!("imagebuild-operator/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| HfError::Http {
                url: endpoint.to_owned(),
                source,
            })?;
        let endpoint = endpoint.trim_end_matches('/').to_owned();
        Ok(Self {
            http,
            endpoint,
            retry: RetryPolicy::default(),
        })
    }

    /// The same client with another retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Every row of `source.split` as instances, in dataset order. Requests go to this
    /// client's endpoint; `source.endpoint` is the caller's input to [`HfClient::new`].
    pub async fn fetch(&self, source: &HuggingFaceSource) -> Result<Vec<RawInstance>, HfError> {
        let (dataset, split) = (source.dataset.as_str(), source.split.as_str());
        let config = match &source.config {
            Some(config) => config.clone(),
            None => self.discover_config(dataset, split).await?,
        };
        let (mut instances, mut offset) = (Vec::new(), 0u64);
        loop {
            let (offset_text, length) = (offset.to_string(), PAGE_LENGTH.to_string());
            let query = [("dataset", dataset), ("config", &config), ("split", split)];
            let paging = [("offset", offset_text.as_str()), ("length", &length)];
            let url = self.url("rows", query.iter().chain(&paging))?;
            let page: RowsPage = self.get_json(url).await?;
            if page.partial && offset == 0 {
                tracing::warn!(
                    dataset,
                    config,
                    split,
                    "datasets-server serves only part of this split"
                );
            }
            let total = page.num_rows_total;
            if page.rows.is_empty() && offset < total {
                // Without this an endpoint answering empty pages would be polled forever.
                return Err(HfError::NoProgress {
                    dataset: dataset.to_owned(),
                    offset,
                    total,
                });
            }
            for entry in &page.rows {
                let id = cell(entry, &source.id_field, dataset)?;
                let image = match &source.image_field {
                    Some(field) => Some(cell(entry, field, dataset)?),
                    None => None,
                };
                instances.push(RawInstance { id, image });
            }
            offset += page.rows.len() as u64;
            if offset >= total {
                return Ok(instances);
            }
        }
    }

    /// The only config of `dataset` that has `split`.
    async fn discover_config(&self, dataset: &str, split: &str) -> Result<String, HfError> {
        let url = self.url("splits", [("dataset", dataset)].iter())?;
        let splits = self.get_json::<SplitsResponse>(url).await?.splits;
        let mut configs: Vec<&str> = (splits.iter().filter(|s| s.split == split))
            .map(|s| s.config.as_str())
            .collect();
        configs.dedup();
        let (dataset, split) = (dataset.to_owned(), split.to_owned());
        match configs[..] {
            [config] => Ok(config.to_owned()),
            [] => {
                let all: Vec<String> = splits
                    .iter()
                    .map(|s| format!("{}/{}", s.config, s.split))
                    .collect();
                let available = if all.is_empty() {
                    "none".to_owned()
                } else {
                    all.join(", ")
                };
                Err(HfError::SplitNotFound {
                    dataset,
                    split,
                    available,
                })
            }
            _ => Err(HfError::AmbiguousConfig {
                dataset,
                split,
                configs: configs.join(", "),
            }),
        }
    }

    fn url<'a>(
        &self,
        path: &str,
        query: impl Iterator<Item = &'a (&'a str, &'a str)>,
    ) -> Result<Url, HfError> {
        Url::parse_with_params(&format!("{}/{path}", self.endpoint), query).map_err(|e| {
            HfError::InvalidEndpoint {
                endpoint: self.endpoint.clone(),
                reason: e.to_string(),
            }
        })
    }

    /// GET `url` with retries and decode its JSON body.
    async fn get_json<T: DeserializeOwned>(&self, url: Url) -> Result<T, HfError> {
        let shown = show(&url);
        let attempts = self.retry.attempts.max(1);
        let mut last = String::new();
        for attempt in 1..=attempts {
            match self.try_once(&url, &shown).await {
                Ok(body) => {
                    let decode = |e: serde_json::Error| HfError::Decode {
                        url: shown,
                        reason: e.to_string(),
                    };
                    return serde_json::from_str(&body).map_err(decode);
                }
                Err(Failure::Fatal(error)) => return Err(error),
                Err(Failure::Retry(reason, retry_after)) if attempt < attempts => {
                    let delay = self.retry.delay(attempt, retry_after);
                    tracing::warn!(url = %shown, attempt, attempts, failure = %reason, ?delay, "retrying datasets-server request");
                    tokio::time::sleep(delay).await;
                }
                Err(Failure::Retry(reason, _)) => {
                    tracing::debug!(url = %shown, attempt, failure = %reason, "last attempt failed");
                    last = reason;
                }
            }
        }
        Err(HfError::RetriesExhausted {
            url: shown,
            attempts,
            last,
        })
    }

    /// One GET: the body on 2xx, else whether another try may help.
    async fn try_once(&self, url: &Url, shown: &str) -> Result<String, Failure> {
        let transport = |e: reqwest::Error| match e.is_builder() {
            // A request that cannot even be built will not build on the next try either.
            true => Failure::Fatal(HfError::Http {
                url: shown.to_owned(),
                source: e,
            }),
            // Connection errors, timeouts and broken bodies are usually transient.
            false => Failure::Retry(error_chain(&e), None),
        };
        let request = self.http.get(url.clone()).timeout(self.retry.timeout);
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let retry_after = (response.headers().get(RETRY_AFTER))
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response.text().await.map_err(transport)?;
        if status.is_success() {
            return Ok(body);
        }
        let message = error_message(&body);
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(Failure::Retry(
                format!("HTTP {status}: {message}"),
                retry_after,
            ));
        }
        let (status, url) = (status.as_u16(), shown.to_owned());
        Err(Failure::Fatal(HfError::Status {
            status,
            url,
            message,
        }))
    }
}

/// The string value of `field` in a row, or an error naming the field, row and dataset.
fn cell(entry: &RowEntry, field: &str, dataset: &str) -> Result<String, HfError> {
    let problem = match entry.row.get(field) {
        _ if entry.truncated_cells.iter().any(|c| c == field) => CellProblem::Truncated,
        Some(Value::String(s)) => return Ok(s.clone()),
        None => CellProblem::Missing,
        Some(Value::Null) => CellProblem::NotString("null"),
        Some(Value::Bool(_)) => CellProblem::NotString("a boolean"),
        Some(Value::Number(_)) => CellProblem::NotString("a number"),
        Some(Value::Array(_)) => CellProblem::NotString("an array"),
        Some(Value::Object(_)) => CellProblem::NotString("an object"),
    };
    let (dataset, field, row) = (dataset.to_owned(), field.to_owned(), entry.row_idx);
    Err(HfError::Cell {
        dataset,
        row,
        field,
        problem,
    })
}

/// The `error` string datasets-server puts in failure bodies, else a prefix of the raw body.
fn error_message(body: &str) -> String {
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(parsed) => parsed.error,
        Err(_) if body.trim().is_empty() => "(empty body)".to_owned(),
        Err(_) => body.trim().chars().take(200).collect(),
    }
}

/// Path and query of `url`, which is what identifies the request to a user.
fn show(url: &Url) -> String {
    match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    }
}

/// reqwest's top-level message hides the cause (e.g. "connection refused"), so join them.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_respects_cap_and_retry_after() {
        let policy = RetryPolicy::default();
        let secs = |s| Duration::from_secs(s);
        let delays: Vec<_> = (1..=7).map(|a| policy.delay(a, None)).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30].map(secs));
        assert_eq!(policy.delay(u32::MAX, None), secs(30));
        assert_eq!(policy.delay(1, Some(secs(7))), secs(7));
        assert_eq!(policy.delay(1, Some(secs(120))), secs(30));
    }

    #[test]
    fn error_message_prefers_json_error_field() {
        assert_eq!(error_message(r#"{"error":"gone"}"#), "gone");
        assert_eq!(error_message("  "), "(empty body)");
        assert_eq!(error_message(" <h1>bad</h1>"), "<h1>bad</h1>");
    }
}
