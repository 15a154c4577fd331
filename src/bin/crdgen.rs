//! Writes the ImageBuildRun CustomResourceDefinition as YAML to stdout or to a file.

use std::process::ExitCode;

fn main() -> ExitCode {
    let yaml = match imagebuild_operator::crd::render() {
        Ok(yaml) => yaml,
        Err(err) => {
            eprintln!("crdgen: {err}");
            return ExitCode::FAILURE;
        }
    };
    match std::env::args().nth(1) {
        Some(path) => match std::fs::write(&path, yaml) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("crdgen: writing {path}: {err}");
                ExitCode::FAILURE
            }
        },
        None => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
    }
}
