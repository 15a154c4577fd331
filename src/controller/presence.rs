//! What the registry says of a run's images. Checks run in rounds, in a task of their own
//! that sends each answer back through a channel; [`Presence::collect`] takes what has
//! arrived. A round that fails (a refused credential, an unreachable registry) or hears
//! nothing for the stall timeout says why in `Degraded` and is tried again later; the
//! error clears once a round ends with every image that is still wanted known.
//!
//! Final images are asked about first; an input (the builder, a base) only once some
//! image built on it is known to be missing. A run whose final images all exist asks
//! nothing more: its inputs are not needed (the scheduler skips them as such).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::context::Ctx;
use crate::api::ImageBuildRun;
use crate::metrics::RunId;
use crate::plan::{Phase, Plan};
use crate::registry::{self, DockerConfig, RegistryChecker, RegistryError};
use crate::schedule::{NodeState, Registry};

/// Wait before checking again images a failed round left unknown.
pub const RECHECK: Duration = Duration::from_secs(30);

/// Checks of one run's images in flight at once.
const CHECKS_IN_FLIGHT: usize = 64;

/// Images of one repository to ask about from which its tag list is read instead.
const LIST_FROM: usize = 16;

/// A repository is listed only while it has at most this many tags per image asked
/// about (listing costs a request per thousand tags, checking one per image).
const TAGS_PER_IMAGE_ASKED: usize = 100;

type Answer = (usize, Result<registry::Presence, RegistryError>);

/// `image`'s repository and tag (`None` without a tag: a digest reference).
fn split_tag(image: &str) -> Option<(&str, &str)> {
    let (repository, tag) = image.rsplit_once(':')?;
    (!tag.contains('/') && !repository.contains('@')).then_some((repository, tag))
}

/// The registry's answers for a run, and the round of checks in flight.
#[derive(Debug)]
pub struct Presence {
    known: Vec<Registry>,
    error: Option<String>,
    round: Option<Round>,
    recheck_at: Option<Instant>,
}

#[derive(Debug)]
struct Round {
    answers: mpsc::UnboundedReceiver<Answer>,
    pending: usize,
    /// When the round started, or last heard an answer.
    heard: Instant,
    task: AbortHandle,
    /// Where the round asks (for the stall message).
    registries: String,
    /// The round's error, if a check failed.
    error: Option<String>,
}

impl Drop for Round {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Presence {
    /// Nothing known of `nodes` images; with `forced` (a forced rebuild) every image
    /// counts as missing and the registry is never asked.
    pub fn new(nodes: usize, forced: bool) -> Presence {
        let known = if forced {
            Registry::Missing
        } else {
            Registry::Unknown
        };
        Presence {
            known: vec![known; nodes],
            error: None,
            round: None,
            recheck_at: None,
        }
    }

    /// What is known of each node's image.
    pub fn known(&self) -> &[Registry] {
        &self.known
    }

    /// Why the registry could not say (for `Degraded`).
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Whether checks are under way (the reconcile looks again soon).
    pub fn checking(&self) -> bool {
        self.round.is_some()
    }

    /// Takes the answers that arrived; ends the round when all are in, or when it heard
    /// nothing for `stall`.
    pub fn collect(&mut self, plan: &Plan, states: &[NodeState], now: Instant, stall: Duration) {
        if let Some(round) = &mut self.round {
            while let Ok((node, answer)) = round.answers.try_recv() {
                round.pending = round.pending.saturating_sub(1);
                round.heard = now;
                match answer {
                    Ok(registry::Presence::Exists(_)) => self.known[node] = Registry::Exists,
                    Ok(registry::Presence::Missing) => self.known[node] = Registry::Missing,
                    Err(e) => {
                        // Once a round: a refused credential fails every check alike.
                        if round.error.is_none() {
                            tracing::warn!(error = %e, "registry check failed");
                        }
                        round.error = Some(e.to_string());
                    }
                }
            }
            let stalled = now.duration_since(round.heard) >= stall;
            if round.pending > 0 && stalled {
                round.error = Some(format!(
                    "the registry ({}) did not answer for {}s: {} images not checked yet",
                    round.registries,
                    stall.as_secs(),
                    round.pending
                ));
            }
            if round.pending == 0 || stalled {
                let error = round.error.take();
                self.round = None;
                match error {
                    Some(error) => {
                        self.error = Some(error);
                        self.recheck_at = Some(now + RECHECK);
                    }
                    None => self.error = None,
                }
            }
        }
        // Nothing left to ask about (images that failed meanwhile are not wanted any
        // more): whatever went wrong no longer matters.
        if self.round.is_none() && self.todo(plan, states).is_empty() {
            self.error = None;
            self.recheck_at = None;
        }
    }

    /// The nodes to check now (see [`Presence::todo`]), if no round is running or
    /// waiting.
    pub fn due(&self, plan: &Plan, states: &[NodeState], now: Instant) -> Vec<usize> {
        if self.round.is_some() || self.recheck_at.is_some_and(|t| now < t) {
            return Vec::new();
        }
        self.todo(plan, states)
    }

    /// The unknown images worth asking about, in plan order: final images not yet
    /// ended, and inputs of an image that will be built (known missing, not ended).
    /// An input whose dependents are unknown waits for their answers.
    fn todo(&self, plan: &Plan, states: &[NodeState]) -> Vec<usize> {
        // Once every answer is in (most of a run), there is nothing to walk the plan for.
        if !self.known.contains(&Registry::Unknown) {
            return Vec::new();
        }
        let n = self.known.len().min(plan.nodes.len());
        let mut built = vec![false; n];
        let mut todo = Vec::new();
        // Backwards: the plan lists every image after its inputs.
        for i in (0..n).rev() {
            if states.get(i).is_none_or(|s| s.is_terminal()) {
                continue;
            }
            let wanted = matches!(plan.phase(i), Phase::Assembly | Phase::PostAssembly)
                || plan.dependents(i).iter().any(|&d| d < n && built[d]);
            match self.known[i] {
                _ if !wanted => {}
                Registry::Unknown => todo.push(i),
                Registry::Missing => built[i] = true,
                Registry::Exists => {}
            }
        }
        todo.reverse();
        todo
    }

    /// A round could not start (the push Secret could not be read): say so and try
    /// again later.
    pub fn not_started(&mut self, error: String, now: Instant) {
        self.error = Some(error);
        self.recheck_at = Some(now + RECHECK);
    }

    /// Starts a round over `todo` with `checker`, in a task of its own, which calls
    /// `done` once every answer is sent.
    pub fn start(
        &mut self,
        checker: RegistryChecker,
        plan: &Arc<Plan>,
        todo: Vec<usize>,
        now: Instant,
        done: impl FnOnce() + Send + 'static,
    ) {
        let (send, answers) = mpsc::unbounded_channel();
        let pending = todo.len();
        let mut hosts: Vec<String> = todo
            .iter()
            .filter_map(|&i| plan.nodes[i].image.split('/').next().map(str::to_string))
            .collect();
        hosts.sort();
        hosts.dedup();
        let plan = plan.clone();
        let task = tokio::spawn(async move {
            // A repository with many images to ask about is listed first: a page of its
            // tag list answers for up to a thousand of them. What it does not list (any
            // the list left out) is asked one by one, unless the registry said the
            // repository does not exist. Not listed past 100 tags per image asked about.
            let mut by_repository: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
            for &i in &todo {
                let repository = split_tag(&plan.nodes[i].image).map_or("", |(r, _)| r);
                by_repository.entry(repository).or_default().push(i);
            }
            let mut one_by_one = Vec::new();
            for (repository, nodes) in by_repository {
                let listed = match repository {
                    "" => None,
                    _ if nodes.len() < LIST_FROM => None,
                    _ => {
                        let max = nodes.len().saturating_mul(TAGS_PER_IMAGE_ASKED);
                        checker.tags(&plan.nodes[nodes[0]].image, max).await
                    }
                };
                let Some(tags) = listed else {
                    one_by_one.extend(nodes);
                    continue;
                };
                for i in nodes {
                    let tag = split_tag(&plan.nodes[i].image).map_or("", |(_, t)| t);
                    let answer = match (tags.names.contains(tag), tags.complete) {
                        (true, _) => registry::Presence::Exists(None),
                        (false, true) => registry::Presence::Missing,
                        (false, false) => {
                            one_by_one.push(i);
                            continue;
                        }
                    };
                    if send.send((i, Ok(answer))).is_err() {
                        return;
                    }
                }
            }
            let checks = one_by_one.into_iter().map(|i| {
                let checker = checker.clone();
                let image = plan.nodes[i].image.clone();
                async move { (i, checker.check(&image).await) }
            });
            let mut answers = futures::stream::iter(checks).buffer_unordered(CHECKS_IN_FLIGHT);
            while let Some(answer) = answers.next().await {
                if send.send(answer).is_err() {
                    return;
                }
            }
            done();
        });
        self.recheck_at = None;
        self.round = Some(Round {
            answers,
            pending,
            heard: now,
            task: task.abort_handle(),
            registries: hosts.join(", "),
            error: None,
        });
    }
}

/// A registry checker with the run's push credentials, counting its requests.
pub async fn checker_for(run: &ImageBuildRun, ctx: &Ctx) -> Result<RegistryChecker, String> {
    let ns = run.namespace().unwrap_or_default();
    let config = match &run.spec.registry.push_secret_ref {
        None => DockerConfig::default(),
        Some(secret) => {
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            let s = secrets
                .get(&secret.name)
                .await
                .map_err(|e| format!("reading push Secret {}: {e}", secret.name))?;
            let data = s
                .data
                .as_ref()
                .and_then(|d| d.get(".dockerconfigjson"))
                .ok_or_else(|| {
                    format!("push Secret {} has no .dockerconfigjson key", secret.name)
                })?;
            DockerConfig::parse(&data.0).map_err(|e| format!("push Secret {}: {e}", secret.name))?
        }
    };
    let metrics = ctx.metrics.clone();
    let (name, uid) = (run.name_any(), run.uid().unwrap_or_default());
    Ok(RegistryChecker::new(
        config,
        run.spec.registry.insecure,
        ctx.config.registry_concurrency,
    )
    .with_observer(Arc::new(move |code| {
        let id = RunId {
            namespace: &ns,
            name: &name,
            uid: &uid,
        };
        metrics.registry_request(&id, code)
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{Failure, FailureClass};

    fn waiting(n: usize) -> Vec<NodeState> {
        vec![
            NodeState::Waiting {
                attempts: 0,
                not_before: None
            };
            n
        ]
    }

    /// A round over `todo` whose answers the test sends.
    fn round(p: &mut Presence, todo: &[usize], now: Instant) -> mpsc::UnboundedSender<Answer> {
        let (send, answers) = mpsc::unbounded_channel();
        let task = tokio::spawn(std::future::pending::<()>());
        p.recheck_at = None;
        p.round = Some(Round {
            answers,
            pending: todo.len(),
            heard: now,
            task: task.abort_handle(),
            registries: "r.io".into(),
            error: None,
        });
        send
    }

    const STALL: Duration = Duration::from_secs(30);

    /// Two instances: the builder, their bases, then their assemblies.
    fn plan() -> Plan {
        crate::plan::fixture(&["a__a-1", "b__b-1"])
    }

    fn of(plan: &Plan, phase: Phase) -> Vec<usize> {
        (0..plan.nodes.len())
            .filter(|&i| plan.nodes[i].phase == phase)
            .collect()
    }

    #[tokio::test]
    async fn final_images_are_asked_first_and_inputs_only_for_an_image_to_build() {
        let t0 = Instant::now();
        let plan = plan();
        let (builder, bases, assemblies) = (
            of(&plan, Phase::Builder),
            of(&plan, Phase::Base),
            of(&plan, Phase::Assembly),
        );
        assert_eq!((builder.len(), bases.len(), assemblies.len()), (1, 2, 2));
        let mut p = Presence::new(plan.nodes.len(), false);
        let states = waiting(plan.nodes.len());
        assert_eq!(p.due(&plan, &states, t0), assemblies);
        let send = round(&mut p, &assemblies, t0);
        // The first assembly exists, the second is missing: only the second's inputs
        // are worth asking about.
        send.send((assemblies[0], Ok(registry::Presence::Exists(None))))
            .unwrap();
        send.send((assemblies[1], Ok(registry::Presence::Missing)))
            .unwrap();
        p.collect(&plan, &states, t0, STALL);
        assert!(!p.checking());
        let base = plan.nodes[assemblies[1]]
            .deps
            .iter()
            .copied()
            .find(|d| bases.contains(d))
            .unwrap();
        assert_eq!(p.due(&plan, &states, t0), vec![builder[0], base]);
        // Every final image exists: nothing else is asked.
        let mut p = Presence::new(plan.nodes.len(), false);
        let send = round(&mut p, &assemblies, t0);
        for &a in &assemblies {
            send.send((a, Ok(registry::Presence::Exists(None))))
                .unwrap();
        }
        p.collect(&plan, &states, t0, STALL);
        assert!(p.due(&plan, &states, t0).is_empty());
    }

    #[tokio::test]
    async fn answers_become_known_and_an_error_clears_when_nothing_wanted_is_unknown() {
        let t0 = Instant::now();
        let plan = plan();
        let assemblies = of(&plan, Phase::Assembly);
        let (a0, a1) = (assemblies[0], assemblies[1]);
        let mut p = Presence::new(plan.nodes.len(), false);
        let mut states = waiting(plan.nodes.len());
        // The builder (node 0) and a base are asked about once an assembly built on
        // them is known missing.
        p.known[a0] = Registry::Missing;
        let base = plan.nodes[a0]
            .deps
            .iter()
            .copied()
            .find(|&d| d != 0)
            .unwrap();
        assert_eq!(p.due(&plan, &states, t0), vec![0, base, a1]);
        let send = round(&mut p, &[0, base, a1], t0);
        send.send((0, Ok(registry::Presence::Missing))).unwrap();
        send.send((
            a1,
            Err(RegistryError::Unauthorized {
                registry: "r.io".into(),
                image: "r.io/x:1".into(),
                status: 401,
            }),
        ))
        .unwrap();
        p.collect(&plan, &states, t0, STALL);
        assert_eq!(p.known()[0], Registry::Missing);
        assert!(p.checking());
        send.send((base, Ok(registry::Presence::Exists(None))))
            .unwrap();
        p.collect(&plan, &states, t0, STALL);
        assert!(!p.checking());
        assert!(p.error().unwrap().contains("HTTP 401"), "{:?}", p.error());
        // Not again before the recheck is due.
        assert!(
            p.due(&plan, &states, t0 + Duration::from_secs(1))
                .is_empty()
        );
        assert_eq!(p.due(&plan, &states, t0 + RECHECK), vec![a1]);
        // The image it could not check failed meanwhile (an input failed): nothing
        // wanted is unknown any more, so the registry is no longer a problem.
        states[a1] = NodeState::Failed(Box::new(Failure::new(FailureClass::DependencyFailed, "x")));
        p.collect(&plan, &states, t0 + Duration::from_secs(2), STALL);
        assert_eq!(p.error(), None);
        assert!(p.due(&plan, &states, t0 + RECHECK).is_empty());
    }

    #[tokio::test]
    async fn a_registry_that_never_answers_is_reported_after_the_stall_timeout() {
        let t0 = Instant::now();
        let plan = plan();
        let assemblies = of(&plan, Phase::Assembly);
        let mut p = Presence::new(plan.nodes.len(), false);
        let states = waiting(plan.nodes.len());
        let send = round(&mut p, &assemblies, t0);
        send.send((assemblies[0], Ok(registry::Presence::Exists(None))))
            .unwrap();
        p.collect(&plan, &states, t0 + Duration::from_secs(10), STALL);
        assert!(p.checking() && p.error().is_none());
        // 30 s since the last answer: give up for now, say why, ask again later.
        p.collect(&plan, &states, t0 + Duration::from_secs(40), STALL);
        assert!(!p.checking());
        let error = p.error().unwrap();
        assert!(
            error.contains("did not answer for 30s: 1 images"),
            "{error}"
        );
        assert_eq!(
            p.due(&plan, &states, t0 + Duration::from_secs(40) + RECHECK),
            vec![assemblies[1]]
        );
        drop(send);
    }

    #[test]
    fn a_forced_rebuild_asks_nothing() {
        let plan = plan();
        let p = Presence::new(plan.nodes.len(), true);
        assert!(
            p.due(&plan, &waiting(plan.nodes.len()), Instant::now())
                .is_empty()
        );
        assert!(p.known().iter().all(|r| *r == Registry::Missing));
    }
}
