//! imagebuild-operator: builds a benchmark's container image fleet (one builder, one base per
//! upstream image, one assembly per instance) as Kubernetes Jobs.
//!
//! Pure modules decide (`plan`, `schedule`, `template`, `instances` parsing); the few that
//! hold a client apply. See `docs/architecture.md`.

// Data never panics the operator: every unwrap, expect or panic outside tests carries a
// written reason next to it (see clippy.toml for tests).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod api;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod instances;
pub mod job;
pub mod leader;
pub mod manifest;
pub mod memory;
pub mod metrics;
pub mod names;
pub mod operator;
pub mod plan;
pub mod reference;
pub mod registry;
pub mod schedule;
pub mod summary;
pub mod template;
pub mod text;
pub mod validate;
