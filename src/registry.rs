//! Does an image already exist? A manifest HEAD (OCI and Docker media types), or for many
//! images of one repository its tag list (a page answers for a thousand images), through
//! oci-client, with the run's push credentials (a docker config JSON Secret) or the
//! anonymous bearer-token flow, bounded concurrency, and backoff on 429 and 5xx.
//! A 401 or 403 is an error for the run's status, never taken as "missing".

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use tokio::sync::Semaphore;

/// Tags asked for per page of a repository's tag list.
pub const TAGS_PAGE: usize = 1000;

/// What one request (with its retries) came to.
enum Asked<T> {
    Found(T),
    NotFound,
    NoRepository,
}

/// What a repository's tag list said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tags {
    /// The tags listed: each exists.
    pub names: HashSet<String>,
    /// Every tag is listed (the repository does not exist): one not listed is missing.
    pub complete: bool,
}

/// What the registry says about an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Presence {
    /// The manifest exists, with this digest (none when its tag was found in the
    /// repository's tag list).
    Exists(Option<String>),
    /// No such manifest (or repository).
    Missing,
}

/// Why the registry could not say.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The registry refused the credentials (or their absence).
    #[error(
        "registry {registry} refused access to {image} (HTTP {status}): check spec.registry.pushSecretRef"
    )]
    Unauthorized {
        /// The registry host.
        registry: String,
        /// The image asked for.
        image: String,
        /// 401 or 403.
        status: u16,
    },
    /// 429, 5xx or a network error, still so after the retries.
    #[error("registry {registry} unavailable for {image}: {message}")]
    Unavailable {
        /// The registry host.
        registry: String,
        /// The image asked for.
        image: String,
        /// The last error.
        message: String,
    },
    /// The reference does not parse, or the answer made no sense.
    #[error("cannot check {image}: {message}")]
    Invalid {
        /// The image asked for.
        image: String,
        /// What went wrong.
        message: String,
    },
}

/// A docker config JSON (`.dockerconfigjson` of a `kubernetes.io/dockerconfigjson` Secret).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Why a docker config JSON is unusable.
#[derive(Debug, thiserror::Error)]
#[error("invalid docker config JSON: {0}")]
pub struct DockerConfigError(String);

impl DockerConfig {
    /// Parses the JSON of a docker config.
    pub fn parse(json: &[u8]) -> Result<DockerConfig, DockerConfigError> {
        let config: DockerConfig =
            serde_json::from_slice(json).map_err(|e| DockerConfigError(e.to_string()))?;
        for (host, auth) in &config.auths {
            if let Some(encoded) = &auth.auth {
                decode_auth(encoded).ok_or_else(|| {
                    DockerConfigError(format!("auths.{host}.auth is not base64 of user:password"))
                })?;
            }
        }
        Ok(config)
    }

    /// The credentials for `registry` (a host, `docker.io` for Docker Hub), or anonymous.
    pub fn auth_for(&self, registry: &str) -> RegistryAuth {
        let wanted = canonical_host(registry);
        self.auths
            .iter()
            .find(|(host, _)| canonical_host(host) == wanted)
            .and_then(
                |(_, auth)| match (&auth.username, &auth.password, &auth.auth) {
                    (Some(user), Some(password), _) => Some((user.clone(), password.clone())),
                    (_, _, Some(encoded)) => decode_auth(encoded),
                    _ => None,
                },
            )
            .map(|(user, password)| RegistryAuth::Basic(user, password))
            .unwrap_or(RegistryAuth::Anonymous)
    }
}

fn decode_auth(encoded: &str) -> Option<(String, String)> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// `https://index.docker.io/v1/`, `index.docker.io`, `registry-1.docker.io` and
/// `docker.io` all name Docker Hub; other keys may carry a scheme and a path.
fn canonical_host(key: &str) -> String {
    let host = key
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".into(),
        _ => host,
    }
}

/// Retries of one check.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// Attempts in all.
    pub attempts: u32,
    /// Wait after the first failed attempt; doubled after each.
    pub initial: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            attempts: 4,
            initial: Duration::from_millis(500),
        }
    }
}

/// Longest a connection to a registry may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a registry may stay silent within an answer.
const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest one manifest request may take in all.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Checks images of one run: one credential set, a bound on requests in flight.
#[derive(Clone)]
pub struct RegistryChecker {
    client: Arc<Client>,
    config: Arc<DockerConfig>,
    permits: Arc<Semaphore>,
    backoff: Backoff,
    observer: Option<Observer>,
}

/// Told the HTTP status code of every manifest request (`network` for no answer).
pub type Observer = Arc<dyn Fn(&str) + Send + Sync>;

impl RegistryChecker {
    /// A checker with `config`'s credentials, at most `concurrency` requests at once.
    /// `insecure` speaks plain HTTP (`spec.registry.insecure`).
    pub fn new(config: DockerConfig, insecure: bool, concurrency: usize) -> RegistryChecker {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let protocol = if insecure {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        RegistryChecker {
            client: Arc::new(Client::new(ClientConfig {
                protocol,
                connect_timeout: Some(CONNECT_TIMEOUT),
                read_timeout: Some(READ_TIMEOUT),
                ..Default::default()
            })),
            config: Arc::new(config),
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            backoff: Backoff::default(),
            observer: None,
        }
    }

    /// The same checker, telling `observer` the status code of every request.
    pub fn with_observer(mut self, observer: Observer) -> RegistryChecker {
        self.observer = Some(observer);
        self
    }

    /// The same checker with other retry settings.
    pub fn with_backoff(mut self, backoff: Backoff) -> RegistryChecker {
        self.backoff = backoff;
        self
    }

    /// Whether `image` exists.
    pub async fn check(&self, image: &str) -> Result<Presence, RegistryError> {
        let (reference, auth) = self.parse(image)?;
        let asked = self
            .ask(image, &reference, || {
                self.client.fetch_manifest_digest(&reference, &auth)
            })
            .await?;
        Ok(match asked {
            Asked::Found(digest) => Presence::Exists(Some(digest)),
            Asked::NotFound | Asked::NoRepository => Presence::Missing,
        })
    }

    /// Tags of `image`'s repository, listed [`TAGS_PAGE`] at a time until a page brings
    /// nothing new or more than `max` are known. Possibly not all of them (a registry may
    /// cap a page, or ignore `last`): a tag listed exists, one not listed may still, so
    /// the caller checks those one by one, unless the registry said the repository does
    /// not exist (`NAME_UNKNOWN`: [`Tags::complete`], none). `None` if the registry would
    /// not list them.
    pub async fn tags(&self, image: &str, max: usize) -> Option<Tags> {
        let (reference, auth) = self.parse(image).ok()?;
        let mut tags = Tags::default();
        let mut last: Option<String> = None;
        loop {
            let page = self
                .ask(image, &reference, || {
                    let last = last.as_deref();
                    self.client
                        .list_tags(&reference, &auth, Some(TAGS_PAGE), last)
                })
                .await;
            let page = match page {
                Ok(Asked::Found(page)) => page.tags,
                // Said of the repository in the registry's own words; a bare 404 may be a
                // registry without tag lists.
                Ok(Asked::NoRepository) => {
                    tags.complete = tags.names.is_empty();
                    return Some(tags);
                }
                Ok(Asked::NotFound) => return Some(tags).filter(|t| !t.names.is_empty()),
                Err(e) => {
                    tracing::debug!(%image, error = %e, "the registry did not list the repository's tags");
                    return Some(tags).filter(|t| !t.names.is_empty());
                }
            };
            let (full, before) = (page.len() >= TAGS_PAGE, tags.names.len());
            // Tags come in lexical order by the spec; not every registry sorts them.
            last = page.iter().max().cloned();
            tags.names.extend(page);
            if !full || tags.names.len() == before || tags.names.len() > max {
                return Some(tags);
            }
        }
    }

    fn parse(&self, image: &str) -> Result<(Reference, RegistryAuth), RegistryError> {
        let reference = crate::reference::parse(image).map_err(|e| RegistryError::Invalid {
            image: image.to_string(),
            message: format!("{e}"),
        })?;
        let auth = self.config.auth_for(reference.registry());
        Ok((reference, auth))
    }

    /// One request (`call`) about `image`, retried with backoff while the registry is
    /// unavailable.
    async fn ask<T, F, Fut>(
        &self,
        image: &str,
        reference: &Reference,
        mut call: F,
    ) -> Result<Asked<T>, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
    {
        let registry = reference.resolve_registry().to_string();
        #[allow(
            clippy::expect_used,
            reason = "the semaphore is owned by self and never closed"
        )]
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("semaphore is never closed");
        let mut wait = self.backoff.initial;
        let mut attempt = 1;
        loop {
            // A registry that trickles its answer gets no more than this either.
            let result = match tokio::time::timeout(REQUEST_TIMEOUT, call()).await {
                Ok(result) => result,
                Err(_) => Err(oci_client::errors::OciDistributionError::IoError(
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()),
                    ),
                )),
            };
            if let Some(observe) = &self.observer {
                observe(&status_code(&result));
            }
            let err = match result {
                Ok(found) => return Ok(Asked::Found(found)),
                Err(err) => err,
            };
            match classify(err) {
                Answer::NotFound => return Ok(Asked::NotFound),
                Answer::NoRepository => return Ok(Asked::NoRepository),
                Answer::Refused(status) => {
                    return Err(RegistryError::Unauthorized {
                        registry,
                        image: image.to_string(),
                        status,
                    });
                }
                Answer::Invalid(message) => {
                    return Err(RegistryError::Invalid {
                        image: image.to_string(),
                        message,
                    });
                }
                Answer::Retry(message) if attempt >= self.backoff.attempts => {
                    return Err(RegistryError::Unavailable {
                        registry,
                        image: image.to_string(),
                        message,
                    });
                }
                Answer::Retry(message) => {
                    tracing::debug!(%image, attempt, %message, "registry check failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = wait.saturating_mul(2);
                    attempt += 1;
                }
            }
        }
    }
}

/// The HTTP status code behind a manifest request's result, as a label.
fn status_code<T>(result: &Result<T, OciDistributionError>) -> String {
    use OciDistributionError as E;
    let err = match result {
        Ok(_) => return "200".into(),
        Err(err) => err,
    };
    match err {
        E::RegistryError { envelope, .. } => {
            let code = envelope.errors.iter().find_map(|e| match e.code {
                OciErrorCode::ManifestUnknown
                | OciErrorCode::NameUnknown
                | OciErrorCode::NotFound => Some("404"),
                OciErrorCode::Unauthorized => Some("401"),
                OciErrorCode::Denied => Some("403"),
                OciErrorCode::Toomanyrequests => Some("429"),
                _ => None,
            });
            code.unwrap_or("other").into()
        }
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => "401".into(),
        E::ServerError { code, .. } => code.to_string(),
        E::RequestError(_) | E::IoError(_) => "network".into(),
        _ => "other".into(),
    }
}

enum Answer {
    NotFound,
    /// The registry says the repository does not exist (`NAME_UNKNOWN`).
    NoRepository,
    Refused(u16),
    Retry(String),
    Invalid(String),
}

fn classify(err: OciDistributionError) -> Answer {
    use OciDistributionError as E;
    match &err {
        E::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes.iter().any(|c| matches!(c, OciErrorCode::NameUnknown)) {
                Answer::NoRepository
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::ManifestUnknown | OciErrorCode::NotFound))
            {
                Answer::NotFound
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized))
            {
                Answer::Refused(401)
            } else if codes.iter().any(|c| matches!(c, OciErrorCode::Denied)) {
                Answer::Refused(403)
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Toomanyrequests))
            {
                Answer::Retry(err.to_string())
            } else {
                Answer::Invalid(err.to_string())
            }
        }
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => Answer::Refused(401),
        E::ServerError { code, .. } => match code {
            404 => Answer::NotFound,
            401 | 403 => Answer::Refused(*code),
            429 | 500..=599 => Answer::Retry(err.to_string()),
            _ => Answer::Invalid(err.to_string()),
        },
        E::RequestError(_) | E::IoError(_) => Answer::Retry(err.to_string()),
        _ => Answer::Invalid(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_credentials_by_host() {
        let json = br#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},
            "ghcr.io":{"username":"bot","password":"tok"}}}"#;
        let config = DockerConfig::parse(json).unwrap();
        assert_eq!(
            config.auth_for("docker.io"),
            RegistryAuth::Basic("user".into(), "pass".into())
        );
        assert_eq!(
            config.auth_for("ghcr.io"),
            RegistryAuth::Basic("bot".into(), "tok".into())
        );
        assert_eq!(config.auth_for("quay.io"), RegistryAuth::Anonymous);
        assert!(DockerConfig::parse(br#"{"auths":{"x":{"auth":"!!"}}}"#).is_err());
    }
}
