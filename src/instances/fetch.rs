//! Reading an instance source: the inline list, a ConfigMap key, a Hugging Face dataset,
//! or a local file that replaces the source (the CLI's `--instances-file`).

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};

use super::huggingface::HfClient;
use super::{InstanceError, RawInstance, parse_lines};
use crate::api::InstanceSource;

/// Reads the instances of `source` (before `select` and `limit`). A ConfigMap source needs a
/// `client`; `namespace` is the run's.
pub async fn fetch(
    source: &InstanceSource,
    namespace: &str,
    client: Option<&Client>,
) -> Result<Vec<RawInstance>, InstanceError> {
    if let Some(list) = &source.list {
        return Ok(list
            .iter()
            .map(|id| RawInstance {
                id: id.clone(),
                image: None,
            })
            .collect());
    }
    if let Some(hf) = &source.hugging_face {
        return Ok(HfClient::new(&hf.endpoint)?.fetch(hf).await?);
    }
    let Some(cm_ref) = &source.config_map else {
        return Err(InstanceError::Source(
            "spec.instances sets none of list, configMap or huggingFace".into(),
        ));
    };
    let Some(client) = client else {
        return Err(InstanceError::Source(format!(
            "instances come from ConfigMap {namespace}/{}: that needs a cluster (or pass an instances file)",
            cm_ref.name
        )));
    };
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let origin = format!("ConfigMap {namespace}/{} key {}", cm_ref.name, cm_ref.key);
    let cm = api
        .get_opt(&cm_ref.name)
        .await
        .map_err(|e| InstanceError::Source(format!("reading {origin}: {e}")))?
        .ok_or_else(|| InstanceError::Source(format!("{origin}: the ConfigMap does not exist")))?;
    if cm
        .binary_data
        .as_ref()
        .is_some_and(|b| b.contains_key(&cm_ref.key))
    {
        return Err(InstanceError::Source(format!(
            "{origin}: the key is binaryData; an instance list is text (UTF-8) under data"
        )));
    }
    let data = cm.data.unwrap_or_default();
    let text = data.get(&cm_ref.key).ok_or_else(|| {
        let keys: Vec<&String> = data.keys().take(20).collect();
        InstanceError::Source(format!("{origin}: no such key (keys: {keys:?})"))
    })?;
    parse_lines(text, &origin)
}

/// Reads instances from a local file (one id a line, or JSON lines).
pub fn from_file(path: &std::path::Path) -> Result<Vec<RawInstance>, InstanceError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| InstanceError::Source(format!("reading {}: {e}", path.display())))?;
    parse_lines(&text, &format!("file {}", path.display()))
}
