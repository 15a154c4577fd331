//! `status` and `wait`: a run's progress as text, followed live with one progress bar per
//! image phase (on a terminal), and a wait that ends with the run.

use std::io::IsTerminal;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kube::runtime::{WatchStreamExt, watcher};

use super::CliError;
use super::runs::{Target, has_ended, is_final, phase};
use crate::api::{ImageBuildRun, ImageBuildRunStatus, PhaseCounts, RunPhase};

/// A phase's bar: done of total, rate, ETA, and the split.
const BAR: &str = "  {prefix:<14} [{bar:30}] {pos:>5}/{len:<5} {percent:>3}% eta {eta:>4}  {msg}";

/// The image phases as the status names them.
const PHASES: [&str; 4] = ["builder", "bases", "assemblies", "postAssemblies"];

fn counts(status: &ImageBuildRunStatus) -> [&PhaseCounts; 4] {
    [
        &status.builder,
        &status.bases,
        &status.assemblies,
        &status.post_assemblies,
    ]
}

/// One line about the run as a whole: phase, failures, rate, ETA, why it waits.
pub fn headline(run: &ImageBuildRun) -> String {
    let status = run.status.clone().unwrap_or_default();
    let mut line = format!(
        "{}: {}",
        kube::ResourceExt::name_any(run),
        status
            .phase
            .map(|p| format!("{p:?}"))
            .unwrap_or_else(|| "Pending".into())
    );
    if run.spec.cancel && !is_final(status.phase) {
        line.push_str(" (cancelling)");
    } else if run.spec.suspend && !is_final(status.phase) {
        line.push_str(" (suspended)");
    }
    if status.failed_total > 0 {
        line.push_str(&format!(", {} failed", status.failed_total));
    }
    if let Some(rate) = status.images_per_hour {
        line.push_str(&format!(", {rate:.0} images/h"));
    }
    if let Some(eta) = status.estimated_completion {
        let left = (eta - chrono::Utc::now()).num_seconds().max(0);
        line.push_str(&format!(
            ", ETA {} (in {})",
            eta.format("%H:%M:%S UTC"),
            humantime::format_duration(Duration::from_secs(left as u64))
        ));
    }
    for c in status.conditions.iter().filter(|c| {
        (c.type_ == "Stalled" || c.type_ == "Degraded") && c.status == "True"
            || c.type_ == "Ready" && c.status == "False" && status.phase == Some(RunPhase::Failed)
    }) {
        line.push_str(&format!("\n  {} {}: {}", c.type_, c.reason, c.message));
    }
    line
}

/// One phase's counts: done of total, and how they split.
fn phase_line(c: &PhaseCounts) -> String {
    format!(
        "{}/{} done: {} built, {} skipped, {} failed, {} running, {} pending",
        c.succeeded + c.skipped + c.failed,
        c.total,
        c.succeeded,
        c.skipped,
        c.failed,
        c.running,
        c.pending
    )
}

/// The run's progress as text: the headline, then one line per phase that has images.
pub fn render(run: &ImageBuildRun) -> String {
    let status = run.status.clone().unwrap_or_default();
    let mut out = headline(run);
    for (name, c) in PHASES.iter().zip(counts(&status)) {
        if c.total > 0 {
            out.push_str(&format!("\n  {name:<14} {}", phase_line(c)));
        }
    }
    if let Some(retry) = &status.last_retry {
        out.push_str(&format!("\n  last retry: {}", retry.message));
    }
    out
}

/// The run's changes, from its current state on, until `stop` says so.
async fn follow(
    target: &Target,
    mut each: impl FnMut(&ImageBuildRun) -> bool,
) -> Result<ImageBuildRun, CliError> {
    // A first read says at once whether the run exists and may be read.
    let first = target.get().await?;
    if !each(&first) {
        return Ok(first);
    }
    let config = watcher::Config::default().fields(&format!("metadata.name={}", target.name));
    let mut stream = watcher(target.api(), config).default_backoff().boxed();
    let uid = first.metadata.uid.clone();
    loop {
        match stream.try_next().await {
            Ok(Some(watcher::Event::Apply(run) | watcher::Event::InitApply(run))) => {
                // The same name, created again, is another run: this one is gone.
                if run.metadata.uid != uid {
                    return Err(target.explain("watch ImageBuildRuns", gone()));
                }
                if !each(&run) {
                    return Ok(run);
                }
            }
            Ok(Some(watcher::Event::Delete(_))) => {
                return Err(target.explain("watch ImageBuildRuns", gone()));
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(CliError::Usage("the watch of the run ended".into())),
            Err(
                watcher::Error::WatchError(e)
                | watcher::Error::InitialListFailed(kube::Error::Api(e)),
            ) if e.code == 403 => {
                return Err(target.explain("watch ImageBuildRuns", kube::Error::Api(e)));
            }
            // Anything else is retried by the backoff.
            Err(_) => {}
        }
    }
}

/// The error of a run deleted while it was followed: what a read of it would answer.
fn gone() -> kube::Error {
    kube::Error::Api(
        kube::core::Status::failure("the run was deleted", "NotFound")
            .with_code(404)
            .boxed(),
    )
}

/// Bars, one per phase with images, under a headline.
struct Bars {
    multi: MultiProgress,
    head: ProgressBar,
    phases: Vec<Option<ProgressBar>>,
}

impl Bars {
    fn new() -> Bars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let head = multi.add(ProgressBar::new_spinner());
        head.enable_steady_tick(Duration::from_millis(250));
        Bars {
            multi,
            head,
            phases: vec![None, None, None, None],
        }
    }

    fn update(&mut self, run: &ImageBuildRun) {
        let status = run.status.clone().unwrap_or_default();
        self.head.set_message(headline(run));
        #[allow(
            clippy::expect_used,
            reason = "a constant template, checked by the unit test of this module"
        )]
        let style = ProgressStyle::with_template(BAR)
            .expect("a valid template")
            .progress_chars("=> ");
        for (i, (name, c)) in PHASES.iter().zip(counts(&status)).enumerate() {
            if c.total == 0 {
                continue;
            }
            let bar = self.phases[i].get_or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(u64::from(c.total)));
                bar.set_style(style.clone());
                bar.set_prefix(*name);
                bar
            });
            bar.set_length(u64::from(c.total));
            bar.set_position(u64::from(c.succeeded + c.skipped + c.failed));
            bar.set_message(format!(
                "{} built, {} skipped, {} failed, {} running",
                c.succeeded, c.skipped, c.failed, c.running
            ));
        }
    }

    fn finish(&self) {
        self.head.finish();
        for bar in self.phases.iter().flatten() {
            bar.finish();
        }
    }
}

/// Prints the run's progress; with `watch`, follows it until it ends: live bars on a
/// terminal, a line per change otherwise.
pub async fn status(target: &Target, watch: bool) -> Result<String, CliError> {
    if !watch {
        return Ok(render(&target.get().await?));
    }
    if std::io::stdout().is_terminal() {
        let mut bars = Bars::new();
        let last = follow(target, |run| {
            bars.update(run);
            !has_ended(run)
        })
        .await?;
        bars.finish();
        return Ok(render(&last));
    }
    let mut previous = String::new();
    let last = follow(target, |run| {
        let now = render(run);
        if now != previous {
            println!("{now}");
            previous = now;
        }
        !has_ended(run)
    })
    .await?;
    Ok(format!("{} ended: {:?}", target.name, phase(&last)))
}

/// How a wait ended.
pub struct Waited {
    /// The run succeeded.
    pub succeeded: bool,
    /// What to print.
    pub text: String,
}

/// Waits until the run ends (at most `timeout`): `succeeded` only when it Succeeded;
/// otherwise the text is its summary's failures.
pub async fn wait(target: &Target, timeout: Duration) -> Result<Waited, CliError> {
    let ended = tokio::time::timeout(timeout, follow(target, |run| !has_ended(run))).await;
    let run = match ended {
        Ok(run) => run?,
        Err(_) => {
            let run = target.get().await?;
            return Err(CliError::Timeout(format!(
                "{} did not end within {}: {}",
                target.name,
                humantime::format_duration(timeout),
                render(&run)
            )));
        }
    };
    if phase(&run) == Some(RunPhase::Succeeded) {
        return Ok(Waited {
            succeeded: true,
            text: render(&run),
        });
    }
    let report = super::report(&target.client, &run, &target.namespace).await?;
    Ok(Waited {
        succeeded: false,
        text: format!("{}\n\n{}", render(&run), report.markdown()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_template_is_valid() {
        assert!(ProgressStyle::with_template(BAR).is_ok());
    }
}
