//! A tower layer for the Kubernetes client that counts every request by verb and answer
//! (`imagebuild_kubernetes_requests_total`), watches included, and times those that are
//! not watches (`imagebuild_kubernetes_request_duration_seconds`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service};

use super::Metrics;

/// Counts requests into [`Metrics`].
#[derive(Clone)]
pub struct CountRequests(pub Arc<Metrics>);

impl<S> Layer<S> for CountRequests {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// The service [`CountRequests`] wraps.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// The verb label of a request: the HTTP method, or WATCH for a watch.
pub fn verb<B>(request: &Request<B>) -> &'static str {
    let watch = request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    match *request.method() {
        Method::GET if watch => "WATCH",
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "OTHER",
    }
}

impl<S, B, R> Service<Request<B>> for Counted<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let verb = verb(&request);
        let metrics = self.metrics.clone();
        let sent = Instant::now();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let result = answer.await;
            // A watch answers its headers at once and then streams for minutes.
            if verb != "WATCH" {
                metrics.api_request_took(verb, sent.elapsed());
            }
            match &result {
                Ok(response) => {
                    metrics.api_request(verb, response.status().as_str());
                    if !response.status().is_server_error() {
                        metrics.api_answered();
                    }
                }
                Err(_) => metrics.api_request(verb, "error"),
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs() {
        let req = |method: Method, uri: &str| {
            Request::builder().method(method).uri(uri).body(()).unwrap()
        };
        assert_eq!(
            verb(&req(Method::GET, "/api/v1/pods?watch=true&x=1")),
            "WATCH"
        );
        assert_eq!(verb(&req(Method::GET, "/api/v1/pods?watchy=true")), "GET");
        assert_eq!(verb(&req(Method::PATCH, "/apis/x")), "PATCH");
    }

    #[tokio::test]
    async fn counts_answers_and_failures() {
        let metrics = Arc::new(Metrics::new());
        let layer = CountRequests(metrics.clone());
        let mut ok = layer.layer(tower::service_fn(|_: Request<()>| async {
            Ok::<_, std::io::Error>(Response::builder().status(409).body(()).unwrap())
        }));
        let mut broken = layer.layer(tower::service_fn(|_: Request<()>| async {
            Err::<Response<()>, _>(std::io::Error::other("connection refused"))
        }));
        let post = || {
            Request::builder()
                .method(Method::POST)
                .uri("/x")
                .body(())
                .unwrap()
        };
        ok.call(post()).await.unwrap();
        ok.call(post()).await.unwrap();
        broken.call(post()).await.unwrap_err();
        let text = metrics.gather().await;
        assert!(text.contains(r#"imagebuild_kubernetes_requests_total{code="409",verb="POST"} 2"#));
        assert!(
            text.contains(r#"imagebuild_kubernetes_requests_total{code="error",verb="POST"} 1"#)
        );
        // Answered or not, each request was timed once.
        assert!(
            text.contains(r#"imagebuild_kubernetes_request_duration_seconds_count{verb="POST"} 3"#)
        );
    }

    // The paused clock advances by exactly the sleep, so the bucket is not left to chance.
    #[tokio::test(start_paused = true)]
    async fn times_requests_but_not_watches() {
        let metrics = Arc::new(Metrics::new());
        let mut service =
            CountRequests(metrics.clone()).layer(tower::service_fn(|_: Request<()>| async {
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
                Ok::<_, std::io::Error>(Response::builder().status(200).body(()).unwrap())
            }));
        let get = |uri: &str| Request::builder().uri(uri).body(()).unwrap();
        service.call(get("/api/v1/pods")).await.unwrap();
        service.call(get("/api/v1/pods?watch=true")).await.unwrap();
        let text = metrics.gather().await;
        assert!(
            text.contains(r#"imagebuild_kubernetes_request_duration_seconds_count{verb="GET"} 1"#)
        );
        // The 30 ms it took is past the 25 ms bucket, within the 50 ms one.
        assert!(text.contains(
            r#"imagebuild_kubernetes_request_duration_seconds_bucket{verb="GET",le="0.025"} 0"#
        ));
        assert!(text.contains(
            r#"imagebuild_kubernetes_request_duration_seconds_bucket{verb="GET",le="0.05"} 1"#
        ));
        assert!(!text.contains(r#"request_duration_seconds_count{verb="WATCH"}"#));
    }
}
