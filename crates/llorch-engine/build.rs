//! With the `cuda` feature, compiles the fused decode kernels (`src/model/decode.cu`) into a
//! fatbin: SASS for `CUDA_COMPUTE_CAP` (default 90, as for Candle's kernels) so the GPU
//! loads them without a JIT pass, plus PTX of that architecture for newer GPUs.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/model/decode.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let cap: String = std::env::var("CUDA_COMPUTE_CAP")
        .unwrap_or_else(|_| "90".into())
        .chars()
        .filter(|c| c.is_ascii_digit())
        .collect();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| match std::env::var("CUDA_HOME") {
        Ok(h) => format!("{h}/bin/nvcc"),
        Err(_) => "nvcc".into(),
    });
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("decode.fatbin");
    let status = Command::new(&nvcc)
        .args([
            "--fatbin",
            "-O3",
            &format!("-gencode=arch=compute_{cap},code=[sm_{cap},compute_{cap}]"),
            "-o",
        ])
        .arg(&out)
        .arg("src/model/decode.cu")
        .status()
        .unwrap_or_else(|e| panic!("running {nvcc} (set NVCC or CUDA_HOME): {e}"));
    assert!(status.success(), "{nvcc} failed on src/model/decode.cu");
}
