//! `pool.toml`: what to serve and how to supervise it. Unknown keys and bad values are
//! errors that name the key and the line. See `deploy/pool.toml` for a documented example.

use std::path::PathBuf;

use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    #[serde(default = "default_pool_id")]
    pub pool_id: String,
    /// Address the manager listens on (the `--bind` flag wins).
    pub bind: Option<String>,
    /// Bearer token required on the manager's API and given to its workers.
    pub api_key: Option<String>,
    /// Where llorch-cpu / llorch-cuda / llorch-metal are (default: beside pool-managerd).
    pub worker_bin_dir: Option<PathBuf>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default)]
    pub pools: Vec<Pool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    /// Model path or known name (see `llorch models list`).
    pub model: String,
    /// `auto`, `cpu`, `cuda:N` or `metal:N`.
    #[serde(default = "default_device")]
    pub device: toml::Spanned<String>,
    #[serde(default = "one")]
    pub replicas: usize,
    pub ctx_size: Option<usize>,
    pub max_batch: Option<usize>,
    pub max_queue: Option<usize>,
    pub threads: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// A worker that has not called back within this many seconds is killed and failed.
    pub start_secs: u64,
    /// Seconds between health checks of a ready worker.
    pub health_interval_secs: u64,
    /// Consecutive failed health checks before a restart.
    pub health_misses: u32,
    /// Seconds a stopping worker gets between SIGTERM and SIGKILL.
    pub stop_grace_secs: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            start_secs: 120,
            health_interval_secs: 3,
            health_misses: 3,
            stop_grace_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartPolicy {
    /// More restarts than this within `window_secs` open the circuit: the worker stays failed.
    pub max_restarts: u32,
    pub window_secs: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            window_secs: 60,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
        }
    }
}

fn default_pool_id() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "pool".into())
}
fn default_device() -> toml::Spanned<String> {
    toml::Spanned::new(0..0, "auto".to_string())
}
fn one() -> usize {
    1
}

/// A device as written in the config, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Cuda(usize),
    Metal(usize),
}

pub fn parse_device(s: &str) -> Option<DeviceSpec> {
    match s {
        "auto" => Some(DeviceSpec::Auto),
        "cpu" => Some(DeviceSpec::Cpu),
        _ => {
            let (kind, n) = s.split_once(':')?;
            let n: usize = n.parse().ok()?;
            match kind {
                "cuda" => Some(DeviceSpec::Cuda(n)),
                "metal" => Some(DeviceSpec::Metal(n)),
                _ => None,
            }
        }
    }
}

impl PoolConfig {
    /// No config file: the default model on the best device.
    pub fn default_with(model: &str) -> Self {
        Self {
            pool_id: default_pool_id(),
            bind: None,
            api_key: None,
            worker_bin_dir: None,
            timeouts: Timeouts::default(),
            restart: RestartPolicy::default(),
            pools: vec![Pool {
                model: model.into(),
                device: default_device(),
                replicas: 1,
                ctx_size: None,
                max_batch: None,
                max_queue: None,
                threads: None,
            }],
        }
    }

    pub fn parse(text: &str, path: &str) -> Result<Self, ConfigError> {
        let bad = |message: String| ConfigError::Invalid {
            path: path.into(),
            message,
        };
        let cfg: PoolConfig =
            toml::from_str(text).map_err(|e| bad(e.to_string().trim_end().to_string()))?;
        let line_of = |off: usize| text[..off.min(text.len())].matches('\n').count() + 1;
        for (i, p) in cfg.pools.iter().enumerate() {
            if parse_device(p.device.get_ref()).is_none() {
                return Err(bad(format!(
                    "line {}: pools[{i}].device = {:?}: expected auto, cpu, cuda:N or metal:N",
                    line_of(p.device.span().start),
                    p.device.get_ref()
                )));
            }
            if p.replicas == 0 || p.replicas > 64 {
                return Err(bad(format!(
                    "pools[{i}].replicas = {}: expected 1 to 64",
                    p.replicas
                )));
            }
            if p.model.is_empty() {
                return Err(bad(format!("pools[{i}].model is empty")));
            }
        }
        if cfg.timeouts.health_misses == 0 || cfg.timeouts.health_interval_secs == 0 {
            return Err(bad(
                "timeouts.health_interval_secs and timeouts.health_misses must be at least 1"
                    .into(),
            ));
        }
        Ok(cfg)
    }

    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: p.clone(),
            source,
        })?;
        Self::parse(&text, &p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses() {
        let c = PoolConfig::parse(include_str!("../../../deploy/pool.toml"), "pool.toml").unwrap();
        assert!(!c.pools.is_empty());
    }

    #[test]
    fn errors_name_key_and_line() {
        let e = PoolConfig::parse("[[pools]]\nmodel = \"x\"\nreplica = 2\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("replica") && e.contains("line 3"), "{e}");
        let e = PoolConfig::parse("[[pools]]\nmodel = \"x\"\n\ndevice = \"gpu:0\"\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 4") && e.contains("pools[0].device"), "{e}");
        let e = PoolConfig::parse("[timeouts]\nstart_secs = \"soon\"\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("start_secs") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cuda:1"), Some(DeviceSpec::Cuda(1)));
        assert_eq!(parse_device("metal:0"), Some(DeviceSpec::Metal(0)));
        assert_eq!(parse_device("tpu:0"), None);
        assert_eq!(parse_device("cuda:x"), None);
    }
}
