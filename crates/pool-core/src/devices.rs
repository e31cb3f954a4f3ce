//! Device detection: NVIDIA GPUs (`nvidia-smi`), Apple Silicon (`sysctl` on macOS), and
//! the CPU, always. A missing tool or driver means "no such device", never an error.
//! Parsing is separate from running the tools so it can be tested on captured output.

use std::process::Command;

use llorch_api::pool::DeviceInfo;

/// Runs a command with a short timeout; None when it is missing or fails.
fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub const NVIDIA_SMI_ARGS: &[&str] = &[
    "--query-gpu=index,name,memory.total,memory.free,uuid",
    "--format=csv,noheader,nounits",
];

/// Parses `nvidia-smi --query-gpu=index,name,memory.total,memory.free,uuid
/// --format=csv,noheader,nounits` (memory in MiB).
pub fn parse_nvidia_smi(text: &str) -> Vec<DeviceInfo> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            if f.len() < 4 {
                return None;
            }
            let idx: usize = f[0].parse().ok()?;
            let mib = |s: &str| s.parse::<u64>().ok().map(|m| m * 1024 * 1024);
            Some(DeviceInfo {
                id: format!("cuda:{idx}"),
                kind: "cuda".into(),
                name: f[1].to_string(),
                memory_total: mib(f[2])?,
                memory_free: mib(f[3]).unwrap_or(0),
            })
        })
        .collect()
}

/// Parses `sysctl hw.optional.arm64 machdep.cpu.brand_string hw.memsize` (macOS).
pub fn parse_sysctl(text: &str) -> Option<DeviceInfo> {
    let get = |k: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(k)
                .map(|v| v.trim_start_matches([':', ' ']).trim().to_string())
        })
    };
    if get("hw.optional.arm64")? != "1" {
        return None;
    }
    let mem: u64 = get("hw.memsize").and_then(|m| m.parse().ok()).unwrap_or(0);
    Some(DeviceInfo {
        id: "metal:0".into(),
        kind: "metal".into(),
        name: get("machdep.cpu.brand_string").unwrap_or_else(|| "Apple Silicon".into()),
        memory_total: mem,
        memory_free: mem,
    })
}

/// Parses `/proc/meminfo` and the CPU model name from `/proc/cpuinfo`.
pub fn parse_linux_cpu(meminfo: &str, cpuinfo: &str, cores: usize) -> DeviceInfo {
    let kb = |k: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v * 1024)
            .unwrap_or(0)
    };
    let name = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "CPU".into());
    DeviceInfo {
        id: "cpu".into(),
        kind: "cpu".into(),
        name: format!("{name} ({cores} threads)"),
        memory_total: kb("MemTotal:"),
        memory_free: kb("MemAvailable:"),
    }
}

pub fn detect_cpu() -> DeviceInfo {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    parse_linux_cpu(&mem, &cpu, cores)
}

/// Every device found: NVIDIA GPUs, then Apple Silicon, then the CPU.
pub fn detect() -> Vec<DeviceInfo> {
    let mut out = Vec::new();
    if let Some(t) = output("nvidia-smi", NVIDIA_SMI_ARGS) {
        out.extend(parse_nvidia_smi(&t));
    }
    if cfg!(target_os = "macos") {
        if let Some(t) = output(
            "sysctl",
            &[
                "hw.optional.arm64",
                "machdep.cpu.brand_string",
                "hw.memsize",
            ],
        ) {
            out.extend(parse_sysctl(&t));
        }
    }
    out.push(detect_cpu());
    out
}

/// The device "auto" means: CUDA, else Metal, else CPU.
pub fn best(devices: &[DeviceInfo]) -> String {
    for kind in ["cuda", "metal"] {
        if let Some(d) = devices.iter().find(|d| d.kind == kind) {
            return d.id.clone();
        }
    }
    "cpu".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured on the project's GPU machine (H100) and on a two-GPU host.
    const SMI_H100: &str =
        "0, NVIDIA H100 80GB HBM3, 81559, 81007, GPU-5f3e2b1c-8d4a-4e2f-9c71-0a6b3d2e1f90\n";
    const SMI_TWO: &str = "0, NVIDIA GeForce RTX 4090, 24564, 23911, GPU-aaaa\n1, NVIDIA GeForce RTX 3090, 24576, 120, GPU-bbbb\n";

    #[test]
    fn nvidia_smi_csv() {
        let d = parse_nvidia_smi(SMI_H100);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].id, "cuda:0");
        assert_eq!(d[0].name, "NVIDIA H100 80GB HBM3");
        assert_eq!(d[0].memory_total, 81559 * 1024 * 1024);
        assert_eq!(d[0].memory_free, 81007 * 1024 * 1024);
        let d = parse_nvidia_smi(SMI_TWO);
        assert_eq!(
            d.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
            ["cuda:0", "cuda:1"]
        );
        assert!(parse_nvidia_smi("").is_empty());
        assert!(parse_nvidia_smi(
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
        )
        .is_empty());
    }

    #[test]
    fn macos_sysctl() {
        let m = "hw.optional.arm64: 1\nmachdep.cpu.brand_string: Apple M2 Pro\nhw.memsize: 34359738368\n";
        let d = parse_sysctl(m).unwrap();
        assert_eq!(
            (d.id.as_str(), d.name.as_str(), d.memory_total),
            ("metal:0", "Apple M2 Pro", 34359738368)
        );
        // Intel Macs: no arm64 key, or 0
        assert!(
            parse_sysctl("machdep.cpu.brand_string: Intel(R) Core(TM) i9\nhw.memsize: 1\n")
                .is_none()
        );
        assert!(parse_sysctl("hw.optional.arm64: 0\n").is_none());
    }

    #[test]
    fn linux_cpu() {
        let mem =
            "MemTotal:       24576000 kB\nMemFree:        1000 kB\nMemAvailable:   20000000 kB\n";
        let cpu = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n";
        let d = parse_linux_cpu(mem, cpu, 2);
        assert_eq!(d.memory_total, 24576000 * 1024);
        assert_eq!(d.memory_free, 20000000 * 1024);
        assert_eq!(d.name, "Intel(R) Xeon(R) Processor (2 threads)");
        assert_eq!(detect().last().unwrap().kind, "cpu");
    }

    #[test]
    fn best_prefers_cuda_then_metal() {
        let cpu = detect_cpu();
        let mut all = parse_nvidia_smi(SMI_TWO);
        all.push(cpu.clone());
        assert_eq!(best(&all), "cuda:0");
        assert_eq!(best(&[cpu]), "cpu");
    }
}
