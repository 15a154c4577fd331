//! Before a run's first Job: the Jobs its spec makes, as the API server takes them. One
//! Job of each phase (the first node of each, with the pod annotations of the last
//! attempt the retry policy allows) is sent with `dryRun=All`: the API server checks
//! everything the spec puts in a Job (quantities, tolerations, affinity, node selector,
//! annotations, the executor image) with its own rules, and a refusal fails the run at
//! once, naming the field, instead of every create being refused in a loop. A dry run
//! that cannot be made (a full quota, a webhook down) is skipped: the creates then go
//! ahead, and one refused as invalid still fails the run (`sends`). Once the Jobs are
//! accepted, the run's wrapper ConfigMap, which they mount, is made.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::PostParams;

use super::context::Error;
use crate::job::JobInputs;
use crate::plan::{Phase, PodAnnotations};

/// What the dry run found.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Every Job would be accepted.
    Accepted,
    /// The spec cannot make a Job the API server takes: why, field named.
    Refused(String),
}

/// The Jobs of the first node of each phase in `plan`, for the last attempt; a Job the
/// spec cannot make at all is a refusal already.
pub fn sample_jobs(
    plan: &crate::plan::Plan,
    inputs: &JobInputs<'_>,
    attempts: u32,
) -> Result<Vec<Job>, String> {
    let annotations = PodAnnotations::compile(inputs.spec).map_err(|e| e.to_string())?;
    let mut jobs = Vec::new();
    for phase in [
        Phase::Builder,
        Phase::Base,
        Phase::Assembly,
        Phase::PostAssembly,
    ] {
        let Some(node) = plan.nodes.iter().find(|n| n.phase == phase) else {
            continue;
        };
        jobs.push(super::actions::make_job(
            &annotations,
            inputs,
            node,
            attempts,
        )?);
    }
    Ok(jobs)
}

/// Sends `jobs` with `dryRun=All`. A Job of that name that exists already (the run is
/// under way) says nothing of the spec and counts as accepted; a refusal of the object
/// (422 Invalid, 400 Bad Request) is the verdict; any other error is the reconcile's.
pub async fn dry_run(api: &Api<Job>, jobs: &[Job]) -> Result<Verdict, Error> {
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    for job in jobs {
        match api.create(&params, job).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => {
                return Ok(Verdict::Refused(refusal(&e.message)));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Verdict::Accepted)
}

/// The whole check for a run's spec: its sample Jobs made and sent with `dryRun=All`, then,
/// if they are accepted, its wrapper ConfigMap made. A dry run that cannot be made says
/// nothing of the spec (a quota full while builds run, an admission webhook down): it is
/// logged, and the spec accepted (a create then refused as invalid still fails the run).
pub async fn check(
    client: &kube::Client,
    plan: &crate::plan::Plan,
    inputs: &JobInputs<'_>,
    attempts: u32,
) -> Result<Verdict, Error> {
    let verdict = match sample_jobs(plan, inputs, attempts) {
        Ok(jobs) => {
            let api: Api<Job> = Api::namespaced(client.clone(), inputs.namespace);
            dry_run(&api, &jobs).await.unwrap_or_else(|e| {
                tracing::warn!(
                    run = %format!("{}/{}", inputs.namespace, inputs.run_name),
                    error = %e,
                    "the dry run of the build Jobs failed; going ahead without it"
                );
                Verdict::Accepted
            })
        }
        Err(message) => Verdict::Refused(message),
    };
    if verdict == Verdict::Accepted {
        wrapper(client, inputs).await?;
    }
    Ok(verdict)
}

/// Creates the run's wrapper ConfigMap, which its build Jobs mount (see
/// [`crate::job::wrapper_config_map`]); one there already (made before a restart) is fine.
pub async fn wrapper(client: &kube::Client, inputs: &JobInputs<'_>) -> Result<(), Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), inputs.namespace);
    let object = crate::job::wrapper_object(inputs);
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The run's condition message for a Job the API server refuses.
pub fn refusal(message: &str) -> String {
    format!(
        "the API server refuses the build Jobs this spec makes (check spec.placement, spec.executor and the templates): {message}"
    )
}

#[cfg(test)]
mod tests {
    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::json;

    use super::*;

    fn job(name: &str) -> Job {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns"}})).unwrap()
    }

    /// The dry run asks with `dryRun=All`; an existing name is accepted, a 422 is the
    /// verdict with the API server's words, a 403 is an error.
    #[tokio::test]
    async fn verdicts() {
        for (answer, expect) in [
            (201, Ok(Verdict::Accepted)),
            (409, Ok(Verdict::Accepted)),
            (
                422,
                Ok(Verdict::Refused(refusal(
                    "spec.template.spec.tolerations[0].operator: Unsupported value",
                ))),
            ),
            (403, Err("kube")),
        ] {
            let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            let api: Api<Job> = Api::namespaced(kube::Client::new(service, "ns"), "ns");
            let server = tokio::spawn(async move {
                let (request, send) = handle.next_request().await.unwrap();
                assert!(
                    request.uri().query().unwrap_or("").contains("dryRun=All"),
                    "{}",
                    request.uri()
                );
                let body = if answer == 201 {
                    serde_json::to_vec(&job("a")).unwrap()
                } else {
                    serde_json::to_vec(&json!({
                        "kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "message": "spec.template.spec.tolerations[0].operator: Unsupported value",
                        "reason": "Invalid", "code": answer
                    }))
                    .unwrap()
                };
                send.send_response(
                    Response::builder()
                        .status(StatusCode::from_u16(answer).unwrap())
                        .body(Body::from(body))
                        .unwrap(),
                );
            });
            let got = dry_run(&api, &[job("a")]).await.map_err(|e| e.kind());
            assert_eq!(got, expect, "answer {answer}");
            server.await.unwrap();
        }
    }
}
