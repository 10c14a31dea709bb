//! Planning and building: the artifact graph, fingerprints and dirty reasons, early cutoff,
//! and the parallel scheduler with resource pools.

pub use forge_cache::canonical;
pub mod command;
pub mod dirty;
pub mod engine;
pub mod events;
pub mod executor;
pub mod fingerprint;
pub mod plan;
pub mod remote;
pub mod workspace;

pub use dirty::DirtyReason;
pub use engine::{BuildOptions, Engine, Status};
pub use events::{Collect, Event, EventSink, Summary};
pub use executor::{
    ActionContext, ActionError, CancelToken, Cause, Cost, Estimate, EstimateContext, Executor, Log, Registry, StagePlan,
};
pub use fingerprint::{FORGE_VERSION, Fingerprint};
pub use plan::{Plan, SelectError};
pub use remote::{Remote, RemoteConfig, RemoteCounts};
pub use workspace::{LoadOptions, Workspace, WorkspaceError, find_manifest};
