//! `HfClient` against a local datasets-server fixture speaking the real `/rows` and `/splits`
//! formats, with a scripted list of failures served before the normal answers.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, routing::get};
use imagebuild_operator::api::HuggingFaceSource;
use imagebuild_operator::instances::huggingface::{HfClient, HfError, RetryPolicy};
use serde_json::{Value, json};

type Params = HashMap<String, String>;

/// What the fixture serves: rows of split `test` in config `default`, unless `splits` says
/// otherwise; `claim_total` overrides `num_rows_total` to fake a server that never finishes.
#[derive(Default)]
struct Dataset {
    rows: Vec<Value>,
    splits: Vec<(&'static str, &'static str)>,
    claim_total: Option<usize>,
}

struct Fixture {
    dataset: Dataset,
    /// Statuses (with `{"error": ...}` bodies) to answer before serving normally.
    faults: Mutex<VecDeque<StatusCode>>,
    /// Every request as (path, query parameters).
    log: Mutex<Vec<(String, Params)>>,
}

struct Server {
    base: String,
    state: Arc<Fixture>,
}

impl Server {
    fn requests(&self) -> Vec<(String, Params)> {
        self.state.log.lock().unwrap().clone()
    }
}

async fn handle(State(fx): State<Arc<Fixture>>, uri: Uri, Query(q): Query<Params>) -> Response {
    fx.log
        .lock()
        .unwrap()
        .push((uri.path().to_owned(), q.clone()));
    if let Some(status) = fx.faults.lock().unwrap().pop_front() {
        let error = match status {
            StatusCode::NOT_FOUND => "The dataset does not exist, or is not accessible.".to_owned(),
            _ => format!("scripted failure {status}"),
        };
        // 429 asks for a 1 s wait, which the client must cap at its max backoff.
        let retry_after = [(header::RETRY_AFTER, "1")];
        return match status {
            StatusCode::TOO_MANY_REQUESTS => {
                (status, retry_after, Json(json!({"error": error}))).into_response()
            }
            _ => (status, Json(json!({"error": error}))).into_response(),
        };
    }
    let ds = &fx.dataset;
    let splits = if ds.splits.is_empty() {
        vec![("default", "test")]
    } else {
        ds.splits.clone()
    };
    if uri.path() == "/splits" {
        let splits: Vec<Value> = (splits.iter())
            .map(|(c, s)| json!({"dataset": q["dataset"], "config": c, "split": s}))
            .collect();
        return Json(json!({"splits": splits, "pending": [], "failed": []})).into_response();
    }
    if !splits.contains(&(q["config"].as_str(), q["split"].as_str())) {
        let error = json!({"error": "The config or the split does not exist in the dataset"});
        return (StatusCode::NOT_FOUND, Json(error)).into_response();
    }
    let (offset, length): (usize, usize) =
        (q["offset"].parse().unwrap(), q["length"].parse().unwrap());
    let page = ds
        .rows
        .iter()
        .enumerate()
        .skip(offset)
        .take(length.min(100));
    let rows: Vec<Value> = page
        .map(|(i, row)| {
            // A row may carry `_truncated: [...]` to simulate cells the server cut short.
            let mut row = row.clone();
            let truncated = row.as_object_mut().unwrap().remove("_truncated");
            json!({"row_idx": i, "row": row, "truncated_cells": truncated.unwrap_or(json!([]))})
        })
        .collect();
    let columns = ds
        .rows
        .first()
        .and_then(Value::as_object)
        .into_iter()
        .flatten();
    let string = json!({"dtype": "string", "_type": "Value"});
    let features: Vec<Value> = (columns.enumerate())
        .map(|(i, (name, _))| json!({"feature_idx": i, "name": name, "type": string}))
        .collect();
    let total = ds.claim_total.unwrap_or(ds.rows.len());
    let body = json!({"features": features, "rows": rows, "num_rows_total": total,
        "num_rows_per_page": 100, "partial": false});
    Json(body).into_response()
}

async fn serve(dataset: Dataset, faults: &[StatusCode]) -> Server {
    let state = Arc::new(Fixture {
        dataset,
        faults: Mutex::new(faults.iter().copied().collect()),
        log: Mutex::default(),
    });
    let app = Router::new()
        .route("/rows", get(handle))
        .route("/splits", get(handle))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server { base, state }
}

/// `n` SWE-bench-like rows with ids `org__repo-0000`...
fn rows(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let id = format!("org__repo-{i:04}");
            json!({"repo": "org/repo", "instance_id": id, "image_name": format!("img:{i}")})
        })
        .collect()
}

fn source(config: Option<&str>) -> HuggingFaceSource {
    HuggingFaceSource {
        dataset: "org/bench".into(),
        split: "test".into(),
        config: config.map(str::to_owned),
        id_field: "instance_id".into(),
        image_field: None,
        endpoint: String::new(),
    }
}

fn client(server: &Server, attempts: u32) -> HfClient {
    let retry = RetryPolicy {
        attempts,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        timeout: Duration::from_secs(5),
    };
    HfClient::new(&server.base).unwrap().with_retry(retry)
}

async fn fetch(server: &Server, src: &HuggingFaceSource) -> Result<Vec<String>, HfError> {
    let instances = client(server, 4).fetch(src).await?;
    Ok(instances.into_iter().map(|i| i.id).collect())
}

/// (path, offset, length) of every request; `/splits` has neither.
fn paging(server: &Server) -> Vec<(String, Option<String>, Option<String>)> {
    (server.requests().into_iter())
        .map(|(path, q)| (path, q.get("offset").cloned(), q.get("length").cloned()))
        .collect()
}

fn page(offset: &str) -> (String, Option<String>, Option<String>) {
    ("/rows".into(), Some(offset.into()), Some("100".into()))
}

fn splits_request() -> (String, Option<String>, Option<String>) {
    ("/splits".into(), None, None)
}

#[tokio::test]
async fn reads_every_page_in_order() {
    let server = serve(
        Dataset {
            rows: rows(250),
            ..Default::default()
        },
        &[],
    )
    .await;
    let ids = fetch(&server, &source(Some("default"))).await.unwrap();
    let want: Vec<String> = (0..250).map(|i| format!("org__repo-{i:04}")).collect();
    assert_eq!(ids, want);
    assert_eq!(paging(&server), vec![page("0"), page("100"), page("200")]);
    let (_, first) = &server.requests()[0];
    assert_eq!(
        (
            &first["dataset"][..],
            &first["config"][..],
            &first["split"][..]
        ),
        ("org/bench", "default", "test")
    );
}

#[tokio::test]
async fn discovers_the_single_config_that_has_the_split() {
    let splits = vec![
        ("default", "train"),
        ("verified", "test"),
        ("verified", "dev"),
    ];
    let server = serve(
        Dataset {
            rows: rows(3),
            splits,
            ..Default::default()
        },
        &[],
    )
    .await;
    let ids = fetch(&server, &source(None)).await.unwrap();
    assert_eq!(ids.len(), 3);
    assert_eq!(paging(&server), vec![splits_request(), page("0")]);
    assert_eq!(server.requests()[1].1["config"], "verified");
}

#[tokio::test]
async fn missing_split_names_dataset_split_and_existing_splits() {
    let splits = vec![("default", "train"), ("lite", "dev")];
    let server = serve(
        Dataset {
            rows: rows(3),
            splits,
            ..Default::default()
        },
        &[],
    )
    .await;
    let err = fetch(&server, &source(None)).await.unwrap_err();
    assert_eq!(err.kind(), "split_not_found");
    let text = err.to_string();
    for part in ["org/bench", "\"test\"", "default/train", "lite/dev"] {
        assert!(text.contains(part), "{part:?} not in {text}");
    }
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn ambiguous_split_asks_for_config() {
    let splits = vec![("full", "test"), ("lite", "test")];
    let server = serve(
        Dataset {
            rows: rows(3),
            splits,
            ..Default::default()
        },
        &[],
    )
    .await;
    let err = fetch(&server, &source(None)).await.unwrap_err();
    assert_eq!(err.kind(), "ambiguous_config");
    let text = err.to_string();
    assert!(
        text.contains("full, lite") && text.contains("`config`"),
        "{text}"
    );
}

#[tokio::test]
async fn reads_image_field_when_set() {
    let server = serve(
        Dataset {
            rows: rows(2),
            ..Default::default()
        },
        &[],
    )
    .await;
    let src = HuggingFaceSource {
        image_field: Some("image_name".into()),
        ..source(Some("default"))
    };
    let instances = client(&server, 1).fetch(&src).await.unwrap();
    let got: Vec<(&str, Option<&str>)> = instances
        .iter()
        .map(|i| (&i.id[..], i.image.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            ("org__repo-0000", Some("img:0")),
            ("org__repo-0001", Some("img:1"))
        ]
    );
    // Without image_field the column is ignored.
    let plain = client(&server, 1)
        .fetch(&source(Some("default")))
        .await
        .unwrap();
    assert!(plain.iter().all(|i| i.image.is_none()));
}

#[tokio::test]
async fn retries_429_with_retry_after_capped_at_max_backoff() {
    let server = serve(
        Dataset {
            rows: rows(5),
            ..Default::default()
        },
        &[StatusCode::TOO_MANY_REQUESTS],
    )
    .await;
    let started = Instant::now();
    let ids = fetch(&server, &source(Some("default"))).await.unwrap();
    assert_eq!(ids.len(), 5);
    assert_eq!(paging(&server), vec![page("0"), page("0")]);
    // The fixture asks for 1 s; max_backoff (20 ms) must win.
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn retries_503_twice_then_succeeds() {
    let faults = [
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::SERVICE_UNAVAILABLE,
    ];
    let server = serve(
        Dataset {
            rows: rows(150),
            ..Default::default()
        },
        &faults,
    )
    .await;
    let ids = fetch(&server, &source(Some("default"))).await.unwrap();
    assert_eq!(ids.len(), 150);
    assert_eq!(
        paging(&server),
        vec![page("0"), page("0"), page("0"), page("100")]
    );
}

#[tokio::test]
async fn persistent_500_gives_up_after_all_attempts() {
    let server = serve(
        Dataset {
            rows: rows(5),
            ..Default::default()
        },
        &[StatusCode::INTERNAL_SERVER_ERROR; 10],
    )
    .await;
    let err = fetch(&server, &source(Some("default"))).await.unwrap_err();
    assert_eq!(err.kind(), "retries_exhausted");
    let text = err.to_string();
    assert!(
        text.contains("4 attempts") && text.contains("500"),
        "{text}"
    );
    assert_eq!(server.requests().len(), 4);
}

#[tokio::test]
async fn not_found_fails_at_once_with_server_message() {
    let server = serve(
        Dataset {
            rows: rows(5),
            ..Default::default()
        },
        &[StatusCode::NOT_FOUND],
    )
    .await;
    let err = fetch(&server, &source(Some("default"))).await.unwrap_err();
    assert_eq!(err.kind(), "status");
    let text = err.to_string();
    for part in [
        "404",
        "The dataset does not exist",
        "/rows?dataset=org%2Fbench",
    ] {
        assert!(text.contains(part), "{part:?} not in {text}");
    }
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn connection_refused_is_retried_then_reported() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let retry = RetryPolicy {
        attempts: 2,
        initial_backoff: Duration::from_millis(1),
        ..RetryPolicy::default()
    };
    let err = HfClient::new(&base)
        .unwrap()
        .with_retry(retry)
        .fetch(&source(Some("default")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "retries_exhausted");
    assert!(err.to_string().contains("2 attempts"), "{err}");
}

#[tokio::test]
async fn missing_id_field_names_field_and_row() {
    let mut data = rows(10);
    data[7].as_object_mut().unwrap().remove("instance_id");
    let server = serve(
        Dataset {
            rows: data,
            ..Default::default()
        },
        &[],
    )
    .await;
    let err = fetch(&server, &source(Some("default"))).await.unwrap_err();
    assert_eq!(err.kind(), "missing_field");
    let text = err.to_string();
    assert!(
        text.contains("row 7") && text.contains("\"instance_id\"") && text.contains("org/bench"),
        "{text}"
    );
}

#[tokio::test]
async fn non_string_or_truncated_cells_are_errors() {
    let mut data = rows(3);
    data[1]["instance_id"] = json!(42);
    let server = serve(
        Dataset {
            rows: data,
            ..Default::default()
        },
        &[],
    )
    .await;
    let err = fetch(&server, &source(Some("default"))).await.unwrap_err();
    assert_eq!(err.kind(), "wrong_type");
    assert!(
        err.to_string().contains("row 1") && err.to_string().contains("a number"),
        "{err}"
    );

    let mut data = rows(3);
    data[2]["_truncated"] = json!(["image_name"]);
    let server = serve(
        Dataset {
            rows: data,
            ..Default::default()
        },
        &[],
    )
    .await;
    let src = HuggingFaceSource {
        image_field: Some("image_name".into()),
        ..source(Some("default"))
    };
    let err = client(&server, 1).fetch(&src).await.unwrap_err();
    assert_eq!(err.kind(), "truncated");
    assert!(err.to_string().contains("row 2"), "{err}");
}

#[tokio::test]
async fn empty_page_before_total_stops_with_error() {
    let server = serve(
        Dataset {
            rows: rows(120),
            claim_total: Some(500),
            ..Default::default()
        },
        &[],
    )
    .await;
    let err = fetch(&server, &source(Some("default"))).await.unwrap_err();
    assert_eq!(err.kind(), "no_progress");
    assert!(err.to_string().contains("offset 120"), "{err}");
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn rejects_non_http_endpoint() {
    let err = HfClient::new("ftp://example.org").unwrap_err();
    assert_eq!(err.kind(), "config");
    assert!(HfClient::new("not a url").is_err());
}
