//! Device selection by the binary's flavour: one engine code path, the device is the
//! only difference between llorch-cpu, llorch-cuda and llorch-metal.

use candle_core::Device;

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda(_) => "cuda",
            Backend::Metal(_) => "metal",
        }
    }

    /// `cpu`, `cuda:0`, `metal:0`.
    pub fn label(self) -> String {
        match self {
            Backend::Cpu => "cpu".into(),
            Backend::Cuda(n) => format!("cuda:{n}"),
            Backend::Metal(n) => format!("metal:{n}"),
        }
    }

    /// `host` for CPU, `vram-only` for discrete GPUs, `unified` for Apple Silicon.
    pub fn memory_architecture(self) -> &'static str {
        match self {
            Backend::Cpu => "host",
            Backend::Cuda(_) => "vram-only",
            Backend::Metal(_) => "unified",
        }
    }

    /// Opens the device; a missing driver or GPU is an error, not a panic.
    pub fn open(self) -> Result<Device> {
        let r = std::panic::catch_unwind(|| match self {
            Backend::Cpu => Ok(Device::Cpu),
            Backend::Cuda(n) => Device::new_cuda(n),
            Backend::Metal(n) => Device::new_metal(n),
        });
        match r {
            Ok(Ok(d)) => Ok(d),
            Ok(Err(e)) => Err(EngineError::Device(format!(
                "cannot open {}: {e}",
                self.label()
            ))),
            Err(_) => Err(EngineError::Device(format!(
                "cannot open {}: the driver panicked",
                self.label()
            ))),
        }
    }
}

/// Physical cores, for the default thread count (hyper-threads do not help matmuls).
pub fn physical_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Sets the CPU thread count for Candle's pools. Call before any tensor work.
pub fn set_cpu_threads(n: Option<usize>) {
    if let Some(n) = n.filter(|n| *n > 0) {
        // SAFETY (edition 2021: not unsafe): called at start-up, before other threads exist.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
}

/// Peak resident set size of this process in bytes (Linux; 0 elsewhere).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<u64>().ok())
            })
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
