//! The CRD's CEL rules, evaluated client-side with kube's CEL validator: exactly one
//! instance source and one build context, and only maxWorkers, suspend, retry and
//! timeouts may change after creation. (The API server enforces the same rules; the
//! control-plane tests apply the CRD for real.)

mod common;

use imagebuild_operator::api::{ImageBuildRun, ImageBuildRunSpec};
use kube::core::cel::{validate_cel, validate_cel_update};

fn run(spec: ImageBuildRunSpec) -> ImageBuildRun {
    ImageBuildRun::new("r", spec)
}

#[test]
fn a_valid_run_passes() {
    let result = validate_cel(&run(common::spec_with("{}")));
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn exactly_one_instance_source() {
    let two = common::spec_with(
        "{instances: {list: [a__a-1], configMap: {name: ids, key: k}, upstreamImage: 'x/y:1'}}",
    );
    let err = validate_cel(&run(two)).unwrap_err().to_string();
    assert!(
        err.contains("exactly one of list, configMap or huggingFace"),
        "{err}"
    );
}

#[test]
fn exactly_one_build_context() {
    let none = common::spec_with("{base: {context: {}, image: 'r.io/b:1'}}");
    let err = validate_cel(&run(none)).unwrap_err().to_string();
    assert!(
        err.contains("exactly one of git, configMap or inline"),
        "{err}"
    );
}

#[test]
fn only_the_operational_fields_change_after_creation() {
    let old = run(common::spec_with("{}"));
    for patch in [
        "{maxWorkers: 3}",
        "{suspend: true}",
        "{retry: {attempts: 5}}",
        "{timeouts: {build: 1h, pending: 1m, run: 2h}}",
    ] {
        let new = run(common::spec_with(patch));
        assert!(
            validate_cel_update(&new, &old).is_ok(),
            "{patch} must be allowed"
        );
    }
    for (patch, field) in [
        (
            "{instances: {list: [b__b-2], upstreamImage: 'x/y:1'}}",
            "instances",
        ),
        ("{vars: {sdkSha: fedcba9876}}", "vars"),
        (
            "{builder: {context: {inline: 'FROM x'}, image: 'r.io/b:2'}}",
            "builder",
        ),
        ("{forceRebuild: true}", "forceRebuild"),
        ("{placement: {ephemeralStorage: 10Gi}}", "placement"),
        (
            "{postAssembly: {match: '^a', context: {inline: 'FROM x'}}}",
            "postAssembly",
        ),
    ] {
        let new = run(common::spec_with(patch));
        let err = validate_cel_update(&new, &old)
            .expect_err(patch)
            .to_string();
        assert!(
            err.contains(&format!("{field} is immutable")),
            "{patch}: {err}"
        );
    }
}
