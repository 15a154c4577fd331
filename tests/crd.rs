//! The committed CRD must be exactly what `crdgen` produces, and the schema must carry the
//! rules users rely on (printer columns, CEL rules, defaults).

use imagebuild_operator::crd::{CRD_PATH, render};

#[test]
fn committed_crd_is_current() {
    let committed = std::fs::read_to_string(CRD_PATH).expect("committed CRD is readable");
    let fresh = render().expect("CRD renders");
    assert!(
        committed == fresh,
        "{CRD_PATH} is stale: run `cargo run --bin crdgen -- {CRD_PATH}` and commit the result"
    );
}

#[test]
fn the_charts_crd_is_the_generated_crd() {
    let chart = "charts/imagebuild-operator/crds/imagebuild.dev_imagebuildruns.yaml";
    let in_chart = std::fs::read_to_string(chart).expect("the chart carries the CRD");
    let generated = std::fs::read_to_string(CRD_PATH).unwrap();
    assert!(
        in_chart == generated,
        "{chart} differs from {CRD_PATH}: copy it (cp {CRD_PATH} {chart})"
    );
}

#[test]
fn crd_carries_columns_short_name_and_status() {
    let crd: serde_json::Value = serde_yaml_ng::from_str(&render().unwrap()).unwrap();
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "ibr");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        [
            "Phase",
            "Builder",
            "Bases",
            "Assemblies",
            "Failed",
            "ETA",
            "Age"
        ]
    );
}

/// Every property of the schema must have a description for `kubectl explain`.
#[test]
fn every_field_is_described() {
    let crd: serde_json::Value = serde_yaml_ng::from_str(&render().unwrap()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut missing = Vec::new();
    walk(&schema["properties"]["spec"], "spec", &mut missing);
    walk(&schema["properties"]["status"], "status", &mut missing);
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
}

fn walk(node: &serde_json::Value, path: &str, missing: &mut Vec<String>) {
    if let Some(props) = node.get("properties").and_then(|p| p.as_object()) {
        for (name, child) in props {
            let child_path = format!("{path}.{name}");
            if child.get("description").is_none() {
                missing.push(child_path.clone());
            }
            walk(child, &child_path, missing);
        }
    }
    if let Some(items) = node.get("items") {
        walk(items, path, missing);
    }
}
