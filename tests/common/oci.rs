//! Pushing small images to the local registries (standing in for BuildKit's push).

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::cluster::install_crypto_provider;

/// A plain-HTTP OCI client (the local registries have no TLS).
pub fn oci() -> Client {
    install_crypto_provider();
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    })
}

/// A small image: one layer and a config, each with content unique to this call.
pub fn tiny_image() -> (Vec<ImageLayer>, Config) {
    let nonce = format!("{:016x}", rand::random::<u64>());
    let layer = ImageLayer::oci_v1(format!("layer {nonce}").into_bytes(), None);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}},"config":{{"Labels":{{"nonce":"{nonce}"}}}}}}"#,
        layer.sha256_digest()
    );
    (vec![layer], Config::oci_v1(config.into_bytes(), None))
}

pub fn reference(registry: &str, repo: &str, tag: &str) -> Reference {
    format!("{registry}/{repo}:{tag}").parse().unwrap()
}

/// `Docker-Content-Digest` of a pushed manifest, as the registry reports it.
pub async fn pushed_digest(client: &Client, image: &Reference, auth: &RegistryAuth) -> String {
    let (layers, config) = tiny_image();
    let pushed = client
        .push(image, &layers, config, auth, None)
        .await
        .unwrap();
    let digest = pushed.manifest_url.rsplit('/').next().unwrap().to_string();
    assert!(digest.starts_with("sha256:"), "{}", pushed.manifest_url);
    digest
}
