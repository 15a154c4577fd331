//! The controller: reconciles ImageBuildRuns into build Jobs. `records` and `observe` are
//! pure; the reconciler reads the world, asks the scheduler, and applies its actions.

pub mod observe;
pub mod records;
