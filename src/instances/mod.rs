//! Instance resolution: from the run's instance source to a sorted, de-duplicated list of
//! instances. Parsing and selection are pure; fetching a ConfigMap or a Hugging Face
//! dataset is the only IO. Upstream images are templated later, by `plan`.

mod fetch;
pub mod huggingface;

pub use fetch::{fetch, from_file};

use std::collections::{BTreeMap, BTreeSet};

use crate::api::InstanceSource;

/// How many ids an error message lists before it says "and N more".
const ERROR_SAMPLE: usize = 5;

/// One instance as a source delivers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawInstance {
    /// Instance id, e.g. `django__django-11099`.
    pub id: String,
    /// Upstream image given by the source itself (dataset column or JSON line), if any.
    pub image: Option<String>,
}

/// The most instances one run builds (as many as `instances.list` may hold): a source with
/// more is split with `select` or `limit`.
pub const MAX_INSTANCES: usize = 20_000;

/// Why an instance list could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// The source, or the selection from it, is empty.
    #[error("the instance list is empty{0}")]
    Empty(&'static str),
    /// The same id appears more than once.
    #[error("duplicate instance ids: {}", sample(.0))]
    Duplicate(Vec<String>),
    /// `select` names ids the source does not have.
    #[error("instances.select names ids not in the source: {}", sample(.0))]
    SelectMissing(Vec<String>),
    /// More instances than a run may have, after `select` and `limit`.
    #[error(
        "{count} instances are selected; a run may have at most {MAX_INSTANCES}: split them over several runs (instances.select or limit)"
    )]
    TooMany {
        /// How many.
        count: usize,
    },
    /// `limit` asks for more instances than there are.
    #[error("instances.limit is {limit} but only {available} instances are selected")]
    LimitTooLarge {
        /// The limit asked for.
        limit: u32,
        /// Instances available after `select`.
        available: usize,
    },
    /// A line of a ConfigMap or file does not parse.
    #[error("{origin} line {line}: {reason}")]
    BadLine {
        /// Where the text came from.
        origin: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The ConfigMap or its key is missing, or the cluster could not be read.
    #[error("{0}")]
    Source(String),
    /// The Hugging Face dataset could not be read.
    #[error(transparent)]
    HuggingFace(#[from] huggingface::HfError),
}

impl InstanceError {
    /// Short stable label for metrics and condition reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Empty(_) => "EmptyInstanceList",
            Self::Duplicate(_) => "DuplicateInstances",
            Self::SelectMissing(_) => "SelectNotInSource",
            Self::LimitTooLarge { .. } => "LimitTooLarge",
            Self::TooMany { .. } => "TooManyInstances",
            Self::BadLine { .. } => "BadInstanceLine",
            Self::Source(_) => "InstanceSourceUnavailable",
            Self::HuggingFace(_) => "HuggingFaceError",
        }
    }
}

fn sample(ids: &[String]) -> String {
    let shown: Vec<&str> = ids.iter().take(ERROR_SAMPLE).map(String::as_str).collect();
    match ids.len().saturating_sub(ERROR_SAMPLE) {
        0 => shown.join(", "),
        more => format!("{} (+{more} more)", shown.join(", ")),
    }
}

/// Parses instance text: one id a line, or JSON lines `{"id": ..., "image": ...}`.
/// Blank lines and lines starting with `#` are ignored.
pub fn parse_lines(text: &str, origin: &str) -> Result<Vec<RawInstance>, InstanceError> {
    let mut out = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: String| InstanceError::BadLine {
            origin: origin.to_string(),
            line: index + 1,
            reason,
        };
        if line.starts_with('{') {
            let value: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
            let field = |name: &str| -> Result<Option<String>, InstanceError> {
                match value.get(name) {
                    None | Some(serde_json::Value::Null) => Ok(None),
                    Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
                    Some(other) => Err(bad(format!(
                        "`{name}` must be a non-empty string, got {other}"
                    ))),
                }
            };
            let id = field("id")?.ok_or_else(|| bad("JSON line has no `id`".into()))?;
            out.push(RawInstance {
                id,
                image: field("image")?,
            });
        } else if line.split_whitespace().count() > 1 {
            return Err(bad(format!("expected one instance id, got `{line}`")));
        } else {
            out.push(RawInstance {
                id: line.to_string(),
                image: None,
            });
        }
    }
    Ok(out)
}

/// Sorts and checks the instances from a source, then applies `select` and `limit`.
pub fn select(
    raw: Vec<RawInstance>,
    source: &InstanceSource,
) -> Result<Vec<RawInstance>, InstanceError> {
    if raw.is_empty() {
        return Err(InstanceError::Empty(" (the source has no instances)"));
    }
    let mut by_id: BTreeMap<String, RawInstance> = BTreeMap::new();
    let mut duplicates = BTreeSet::new();
    for instance in raw {
        if by_id.contains_key(&instance.id) {
            duplicates.insert(instance.id.clone());
        } else {
            by_id.insert(instance.id.clone(), instance);
        }
    }
    if !duplicates.is_empty() {
        return Err(InstanceError::Duplicate(duplicates.into_iter().collect()));
    }
    let mut selected: Vec<RawInstance> = match &source.select {
        None => by_id.into_values().collect(),
        Some(wanted) => {
            let wanted: BTreeSet<&String> = wanted.iter().collect();
            let missing: Vec<String> = wanted
                .iter()
                .filter(|id| !by_id.contains_key(**id))
                .map(|id| (*id).clone())
                .collect();
            if !missing.is_empty() {
                return Err(InstanceError::SelectMissing(missing));
            }
            by_id
                .into_values()
                .filter(|i| wanted.contains(&i.id))
                .collect()
        }
    };
    if let Some(limit) = source.limit {
        if limit as usize > selected.len() {
            return Err(InstanceError::LimitTooLarge {
                limit,
                available: selected.len(),
            });
        }
        selected.truncate(limit as usize);
    }
    if selected.is_empty() {
        return Err(InstanceError::Empty(" after select and limit"));
    }
    if selected.len() > MAX_INSTANCES {
        return Err(InstanceError::TooMany {
            count: selected.len(),
        });
    }
    Ok(selected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> InstanceSource {
        InstanceSource {
            list: Some(vec![]),
            config_map: None,
            hugging_face: None,
            select: None,
            limit: None,
            upstream_image: None,
        }
    }

    fn ids(list: &[&str]) -> Vec<RawInstance> {
        list.iter()
            .map(|id| RawInstance {
                id: id.to_string(),
                image: None,
            })
            .collect()
    }

    #[test]
    fn parses_plain_and_json_lines() {
        let text = "# SWE-Gym subset\nb__b-2\n\n{\"id\": \"a__a-1\", \"image\": \"r.io/a:1\"}\n";
        let got = parse_lines(text, "configmap ids/instances.txt").unwrap();
        assert_eq!(
            got,
            vec![
                RawInstance {
                    id: "b__b-2".into(),
                    image: None
                },
                RawInstance {
                    id: "a__a-1".into(),
                    image: Some("r.io/a:1".into())
                },
            ]
        );
    }

    #[test]
    fn bad_lines_name_origin_and_line() {
        let err = parse_lines("a\nb c\n", "file ids.txt").unwrap_err();
        assert_eq!(
            err.to_string(),
            "file ids.txt line 2: expected one instance id, got `b c`"
        );
        let err = parse_lines("{\"image\": \"x\"}", "f").unwrap_err();
        assert_eq!(err.to_string(), "f line 1: JSON line has no `id`");
        let err = parse_lines("{\"id\": 3}", "f").unwrap_err();
        assert!(
            err.to_string().contains("`id` must be a non-empty string"),
            "{err}"
        );
    }

    #[test]
    fn sorts_selects_and_limits() {
        let mut src = source();
        src.select = Some(vec!["c".into(), "a".into(), "d".into()]);
        src.limit = Some(2);
        let got = select(ids(&["d", "c", "b", "a"]), &src).unwrap();
        assert_eq!(got, ids(&["a", "c"]));
    }

    #[test]
    fn a_source_past_the_cap_is_split_with_limit() {
        let many: Vec<RawInstance> = (0..=MAX_INSTANCES)
            .map(|i| RawInstance {
                id: format!("r__n-{i}"),
                image: None,
            })
            .collect();
        let err = select(many.clone(), &source()).unwrap_err();
        assert_eq!(err.kind(), "TooManyInstances");
        assert!(
            err.to_string().starts_with("20001 instances are selected"),
            "{err}"
        );
        let mut src = source();
        src.limit = Some(20_000);
        assert_eq!(select(many, &src).unwrap().len(), MAX_INSTANCES);
    }

    #[test]
    fn rejects_bad_selections() {
        let src = source();
        assert!(matches!(select(vec![], &src), Err(InstanceError::Empty(_))));
        let err = select(ids(&["a", "b", "a"]), &src).unwrap_err();
        assert_eq!(err.to_string(), "duplicate instance ids: a");
        let mut src = source();
        src.select = Some(vec!["a".into(), "zz".into()]);
        let err = select(ids(&["a", "b"]), &src).unwrap_err();
        assert_eq!(
            err.to_string(),
            "instances.select names ids not in the source: zz"
        );
        let mut src = source();
        src.limit = Some(3);
        let err = select(ids(&["a", "b"]), &src).unwrap_err();
        assert_eq!(
            err.to_string(),
            "instances.limit is 3 but only 2 instances are selected"
        );
    }

    #[test]
    fn long_id_lists_are_sampled_in_errors() {
        let many: Vec<String> = (0..8).map(|i| format!("x{i}")).collect();
        assert_eq!(sample(&many), "x0, x1, x2, x3, x4 (+3 more)");
    }
}
