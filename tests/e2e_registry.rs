//! The registry check the operator skips existing images with, against the local real
//! registries (anonymous and htpasswd). Needs `e2e/cluster up`; run with `e2e/cluster test`.

mod common;

use common::cluster::Env;
use common::oci::{oci, pushed_digest, reference};
use imagebuild_operator::registry::{DockerConfig, Presence, RegistryChecker, RegistryError};
use oci_client::secrets::RegistryAuth;

fn tag() -> String {
    format!("t{:08x}", rand::random::<u32>())
}

#[tokio::test]
async fn existing_and_missing_images_anonymously() {
    let env = Env::get();
    let _logs = env.logs_on_failure();
    let tag = tag();
    let image = reference(&env.registry, "e2e/check-anon", &tag);
    let digest = pushed_digest(&oci(), &image, &RegistryAuth::Anonymous).await;

    let checker = RegistryChecker::new(DockerConfig::default(), true, 4);
    let name = format!("{}/e2e/check-anon", env.registry);
    assert_eq!(
        checker.check(&format!("{name}:{tag}")).await,
        Ok(Presence::Exists(Some(digest)))
    );
    assert_eq!(
        checker.check(&format!("{name}:{tag}-missing")).await,
        Ok(Presence::Missing)
    );
    let no_repo = format!("{}/e2e/never-pushed-{tag}:latest", env.registry);
    assert_eq!(checker.check(&no_repo).await, Ok(Presence::Missing));

    // The repository's tag list names the pushed tag.
    let tags = checker
        .tags(&format!("{name}:{tag}"), 10_000)
        .await
        .unwrap();
    assert!(tags.names.contains(&tag) && !tags.complete, "{tags:?}");
    // A repository never pushed: the registry says so (NAME_UNKNOWN), so its list is
    // complete and empty, and its images are missing without asking one by one.
    let none = checker.tags(&no_repo, 10_000).await.unwrap();
    assert!(none.names.is_empty() && none.complete, "{none:?}");
}

#[tokio::test]
async fn credentials_come_from_a_docker_config_and_refusal_is_an_error() {
    let env = Env::get();
    let _logs = env.logs_on_failure();
    let tag = tag();
    let auth = RegistryAuth::Basic(env.auth_user.clone(), env.auth_password.clone());
    let image = reference(&env.auth_registry, "e2e/check-auth", &tag);
    let digest = pushed_digest(&oci(), &image, &auth).await;
    let name = format!("{}/e2e/check-auth:{tag}", env.auth_registry);

    let json = std::fs::read(&env.auth_dockerconfig).unwrap();
    let checker = RegistryChecker::new(DockerConfig::parse(&json).unwrap(), true, 4);
    assert_eq!(
        checker.check(&name).await,
        Ok(Presence::Exists(Some(digest)))
    );
    let missing = format!("{}/e2e/check-auth:{tag}-missing", env.auth_registry);
    assert_eq!(checker.check(&missing).await, Ok(Presence::Missing));
    let tags = checker.tags(&name, 10_000).await.unwrap();
    assert!(tags.names.contains(&tag), "{tags:?}");

    let wrong = format!(
        r#"{{"auths":{{"{}":{{"username":"{}","password":"wrong"}}}}}}"#,
        env.auth_registry, env.auth_user
    );
    for config in [
        DockerConfig::default(),
        DockerConfig::parse(wrong.as_bytes()).unwrap(),
    ] {
        let checker = RegistryChecker::new(config, true, 4);
        // Not listed: its images are checked one by one, which says why.
        assert_eq!(checker.tags(&name, 10_000).await, None);
        let refused = checker.check(&name).await;
        assert!(
            matches!(
                &refused,
                Err(RegistryError::Unauthorized { status: 401, .. })
            ),
            "{refused:?}"
        );
    }
}
