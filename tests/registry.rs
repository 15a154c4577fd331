//! Retries of the registry check, against a stand-in registry that answers 503 or 429 as
//! scripted (the real registries never do; everything else is tested against them in
//! tests/e2e_registry.rs).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::http::{HeaderMap, Method, StatusCode};
use imagebuild_operator::registry::{
    Backoff, DockerConfig, Presence, RegistryChecker, RegistryError,
};

/// A registry whose manifest endpoint fails with `status` for the first `failures` HEAD
/// requests, then answers with a digest. (After a failed HEAD the client tries a GET, which
/// fails the same way.) Returns its address and the number of HEAD requests.
async fn flaky_registry(status: StatusCode, failures: u32) -> (String, Arc<AtomicU32>) {
    let heads = Arc::new(AtomicU32::new(0));
    let seen = heads.clone();
    let manifests = move |method: Method| {
        let seen = seen.clone();
        async move {
            let n = if method == Method::HEAD {
                seen.fetch_add(1, Ordering::SeqCst)
            } else {
                seen.load(Ordering::SeqCst) - 1
            };
            let mut headers = HeaderMap::new();
            if n < failures {
                return (status, headers);
            }
            headers.insert("Docker-Content-Digest", "sha256:1111".parse().unwrap());
            (StatusCode::OK, headers)
        }
    };
    let app = axum::Router::new()
        .route("/v2/", axum::routing::get(|| async { "{}" }))
        .route("/v2/{repo}/manifests/{tag}", axum::routing::get(manifests));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr.to_string(), heads)
}

fn checker() -> RegistryChecker {
    RegistryChecker::new(DockerConfig::default(), true, 2).with_backoff(Backoff {
        attempts: 4,
        initial: Duration::from_millis(20),
    })
}

#[tokio::test]
async fn transient_errors_are_retried_with_backoff() {
    for status in [
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        let (addr, count) = flaky_registry(status, 2).await;
        let got = checker().check(&format!("{addr}/repo:tag")).await;
        assert_eq!(
            got,
            Ok(Presence::Exists(Some("sha256:1111".into()))),
            "{status}"
        );
        assert_eq!(
            count.load(Ordering::SeqCst),
            3,
            "{status}: two failures, then the answer"
        );
    }
}

#[tokio::test]
async fn persistent_errors_end_as_unavailable_after_the_attempts() {
    let (addr, count) = flaky_registry(StatusCode::BAD_GATEWAY, u32::MAX).await;
    let got = checker().check(&format!("{addr}/repo:tag")).await;
    assert!(
        matches!(got, Err(RegistryError::Unavailable { .. })),
        "{got:?}"
    );
    assert_eq!(count.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn the_observer_hears_the_status_code_of_every_attempt() {
    for (status, code) in [
        (StatusCode::SERVICE_UNAVAILABLE, "503"),
        (StatusCode::TOO_MANY_REQUESTS, "429"),
    ] {
        let (addr, _) = flaky_registry(status, 2).await;
        let heard = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let ears = heard.clone();
        let got = checker()
            .with_observer(Arc::new(move |c| ears.lock().unwrap().push(c.to_string())))
            .check(&format!("{addr}/repo:tag"))
            .await;
        assert!(got.is_ok(), "{got:?}");
        assert_eq!(*heard.lock().unwrap(), vec![code, code, "200"], "{status}");
    }
    // Nothing listening: no status code.
    let heard = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let ears = heard.clone();
    let free = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let got = checker()
        .with_observer(Arc::new(move |c| ears.lock().unwrap().push(c.to_string())))
        .check(&format!("{addr}/repo:tag"))
        .await;
    assert!(got.is_err());
    assert_eq!(*heard.lock().unwrap(), vec!["network"; 4]);
}

/// A registry whose repository `r` has tags `t00000`..`t{n-1}`, listed in pages of `?n=`
/// after `?last=`, or (`ignores_last`) always from the first. Returns its address and the
/// number of list requests.
async fn listing_registry(n: usize, ignores_last: bool) -> (String, Arc<AtomicU32>) {
    let lists = Arc::new(AtomicU32::new(0));
    let seen = lists.clone();
    let list = move |query: axum::extract::Query<std::collections::HashMap<String, String>>| {
        seen.fetch_add(1, Ordering::SeqCst);
        let page: usize = query.get("n").and_then(|n| n.parse().ok()).unwrap_or(100);
        let last = query.get("last").filter(|_| !ignores_last);
        let tags: Vec<String> = (0..n)
            .map(|i| format!("t{i:05}"))
            .filter(|t| last.is_none_or(|l| t > l))
            .take(page)
            .collect();
        async move { axum::Json(serde_json::json!({"name": "r", "tags": tags})) }
    };
    let app = axum::Router::new()
        .route("/v2/", axum::routing::get(|| async { "{}" }))
        .route("/v2/r/tags/list", axum::routing::get(list));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr.to_string(), lists)
}

#[tokio::test]
async fn a_tag_list_is_read_page_by_page_within_its_bound() {
    // 2,500 tags: three pages of a thousand.
    let (addr, lists) = listing_registry(2500, false).await;
    let tags = checker()
        .tags(&format!("{addr}/r:x"), 10_000)
        .await
        .unwrap();
    assert_eq!(tags.names.len(), 2500);
    assert!(tags.names.contains("t00000") && tags.names.contains("t02499"));
    assert!(!tags.complete);
    assert_eq!(lists.load(Ordering::SeqCst), 3);
    // Past the caller's bound it stops with what it has (the rest is checked one by one).
    let (addr, lists) = listing_registry(2500, false).await;
    let tags = checker().tags(&format!("{addr}/r:x"), 1500).await.unwrap();
    assert_eq!((tags.names.len(), lists.load(Ordering::SeqCst)), (2000, 2));
    // A registry that ignores `last` gives the first page for ever: it stops at the
    // first page that brings nothing new.
    let (addr, lists) = listing_registry(2500, true).await;
    let tags = checker()
        .tags(&format!("{addr}/r:x"), 10_000)
        .await
        .unwrap();
    assert_eq!((tags.names.len(), lists.load(Ordering::SeqCst)), (1000, 2));
}
