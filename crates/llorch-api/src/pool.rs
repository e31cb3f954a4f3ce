//! `pool-managerd`'s own API (`/v2/*`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// `cpu`, `cuda:0`, `metal:0`.
    pub id: String,
    /// `cpu`, `cuda` or `metal`.
    pub kind: String,
    pub name: String,
    pub memory_total: u64,
    pub memory_free: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: String,
    pub model_ref: String,
    pub device: String,
    pub uri: Option<String>,
    /// `starting`, `ready`, `draining`, `stopped`, `failed`.
    pub status: String,
    pub pid: Option<u32>,
    pub restarts: u32,
    /// Unix seconds.
    pub started_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolState {
    pub pool_id: String,
    pub devices: Vec<DeviceInfo>,
    pub workers: Vec<WorkerInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartWorkerRequest {
    pub model_ref: String,
    pub device: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartWorkerResponse {
    pub worker_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopWorkerRequest {
    pub worker_id: String,
}
