//! `llorch`: the user CLI. Run one prompt, benchmark a model, fetch/list/inspect the
//! known models, and write synthetic models. Flags only; the work is in llorch-engine.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use llorch_engine::catalog;
use llorch_engine::chat::Message;
use llorch_engine::device::{self, Backend};
use llorch_engine::engine::{generate_blocking, Final};
use llorch_engine::{Engine, EngineConfig, SamplingParams};

#[derive(Parser)]
#[command(
    name = "llorch",
    version,
    about = "llorch: run, benchmark and manage LLMs on Candle"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct DeviceArgs {
    /// CPU threads (default: physical cores).
    #[arg(long, env = "LLORCH_THREADS")]
    threads: Option<usize>,
    /// Run on this CUDA device (build with --features cuda).
    #[arg(long, env = "LLORCH_CUDA_DEVICE")]
    cuda_device: Option<usize>,
    /// Run on this Metal device (build with --features metal).
    #[arg(long, env = "LLORCH_METAL_DEVICE")]
    metal_device: Option<usize>,
}

impl DeviceArgs {
    fn backend(&self) -> Backend {
        match (self.cuda_device, self.metal_device) {
            (Some(n), _) => Backend::Cuda(n),
            (_, Some(n)) => Backend::Metal(n),
            _ => Backend::Cpu,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate from one prompt, streaming text to stdout; timings go to stderr.
    Run {
        /// GGUF file, SafeTensors folder, or a known model name (see `llorch models list`).
        #[arg(long, env = "LLORCH_MODEL", default_value = catalog::DEFAULT_MODEL)]
        model: String,
        /// The prompt text.
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 256)]
        max_tokens: i64,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus sampling mass (1.0 = off).
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Keep only the k most likely tokens (0 = off).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Drop tokens below min_p × the top probability (0 = off).
        #[arg(long, default_value_t = 0.0)]
        min_p: f32,
        /// Penalty for tokens seen in the last 64 (1.0 = off).
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f32,
        /// Random seed (same seed → same output).
        #[arg(long)]
        seed: Option<u64>,
        /// Stop at this text (repeatable); it is not printed.
        #[arg(long)]
        stop: Vec<String>,
        /// Context length to use (default: the model's).
        #[arg(long)]
        ctx_size: Option<usize>,
        #[command(flatten)]
        dev: DeviceArgs,
    },
    /// Measure load time, prefill and decode speed, and peak memory.
    Bench {
        /// GGUF file, SafeTensors folder, or a known model name.
        #[arg(long, default_value = catalog::DEFAULT_MODEL)]
        model: String,
        /// Measured runs.
        #[arg(long, default_value_t = 5)]
        iterations: usize,
        /// Unmeasured runs first (kernel JIT, caches).
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Tokens generated per run (decode is timed from the first to the last).
        #[arg(long, default_value_t = 128)]
        tokens: usize,
        /// Prompt length in tokens (prefill).
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Also write the results as JSON here.
        #[arg(long)]
        output_json: Option<PathBuf>,
        /// Time each phase of the forward pass (per layer op) and print where the time goes.
        #[arg(long)]
        profile: bool,
        #[command(flatten)]
        dev: DeviceArgs,
    },
    /// Numerics check: last-token logits of a fixed prompt and the greedy continuation,
    /// as JSON, for comparing devices (CPU vs CUDA) on the same weights.
    Check {
        /// GGUF file, SafeTensors folder, or a known model name.
        #[arg(long)]
        model: String,
        /// Prompt token ids, comma-separated (default: 1..=32 spread over the vocabulary).
        #[arg(long)]
        prompt_ids: Option<String>,
        /// Greedy tokens to generate after the prompt.
        #[arg(long, default_value_t = 32)]
        tokens: usize,
        /// Write the JSON here (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Dequantize GGUF weights at load (dense f32 matmuls, no activation quantization):
        /// the exact-product reference for the quantized kernels.
        #[arg(long)]
        dequantize: bool,
        #[command(flatten)]
        dev: DeviceArgs,
    },
    /// Fetch, list and inspect models.
    Models {
        #[command(subcommand)]
        cmd: ModelsCmd,
    },
    /// Write a model of a real model's shape with seeded random weights.
    Synth {
        /// llama, qwen2, qwen3 or gemma3.
        #[arg(long, default_value = "llama")]
        arch: String,
        /// tinyllama-1.1b, smollm2-135m, qwen2.5-0.5b, gemma3-270m or tiny.
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// q4_k_m, q4_k, q6_k, q8_0, q5_0, q4_1, q4_0 (GGUF file; "q4_k_m" is llama.cpp's mix: Q4_K with Q6_K for the output matrix and about half the layers' V and down matrices; the others write every matrix in that type) or f16, bf16, f32 (SafeTensors folder).
        #[arg(long, default_value = "q4_k_m")]
        dtype: String,
        /// Output file (GGUF) or folder (SafeTensors).
        #[arg(long)]
        out: PathBuf,
        /// Random seed of the weights.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum ModelsCmd {
    /// Download a known model into $LLORCH_MODELS_DIR (default ~/.cache/llorch/models).
    Fetch {
        /// Model name or alias; `all` for every known model.
        #[arg(default_value = catalog::DEFAULT_MODEL)]
        name: String,
    },
    /// List known models and what is in the models directory.
    List,
    /// Print a GGUF file's or SafeTensors folder's metadata.
    Inspect {
        /// A path or a known model name.
        path: String,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Run {
            model,
            prompt,
            chat,
            max_tokens,
            temperature,
            top_p,
            top_k,
            min_p,
            repetition_penalty,
            seed,
            stop,
            ctx_size,
            dev,
        } => {
            let sampling = SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                repetition_penalty,
                seed,
                ..Default::default()
            };
            let (engine, load) = start_engine(&model, &dev, ctx_size.unwrap_or(0), 1)?;
            eprintln!("loaded {} in {:.2}s", engine.info.id, load);
            let prompt_ids = if chat {
                engine.chat_prompt(&[Message::new("user", &prompt)])?
            } else {
                engine.tokenizer.encode(&prompt, true)?
            };
            let mut out = std::io::stdout().lock();
            let f = generate_blocking(
                &engine,
                prompt_ids,
                Some(max_tokens),
                sampling,
                stop,
                false,
                |t, _| {
                    let _ = out.write_all(t.as_bytes());
                    let _ = out.flush();
                },
            )?;
            writeln!(out)?;
            print_summary(&f);
        }
        Cmd::Bench {
            model,
            iterations,
            warmup,
            tokens,
            prompt_tokens,
            output_json,
            profile,
            dev,
        } => {
            llorch_engine::profile::enable(profile);
            bench(
                &model,
                &dev,
                iterations,
                warmup,
                tokens,
                prompt_tokens,
                output_json.as_deref(),
            )?
        }
        Cmd::Models { cmd } => models(cmd)?,
        Cmd::Check {
            model,
            prompt_ids,
            tokens,
            out,
            dequantize,
            dev,
        } => {
            llorch_engine::model::set_dequantize(dequantize);
            check(&model, prompt_ids.as_deref(), tokens, out.as_deref(), &dev)?
        }
        Cmd::Synth {
            arch,
            preset,
            dtype,
            out,
            seed,
        } => {
            let a = match arch.as_str() {
                "llama" => llorch_engine::model::family::Arch::Llama,
                "qwen2" => llorch_engine::model::family::Arch::Qwen2,
                "qwen3" => llorch_engine::model::family::Arch::Qwen3,
                "gemma3" => llorch_engine::model::family::Arch::Gemma3,
                other => bail!("--arch {other}: expected llama, qwen2, qwen3 or gemma3"),
            };
            let shape = llorch_engine::synth::preset(&preset, a).ok_or_else(|| {
                anyhow!(
                    "--preset {preset}: expected one of {}",
                    llorch_engine::synth::PRESETS
                )
            })?;
            let d = llorch_engine::synth::parse_dtype(&dtype).ok_or_else(|| {
                anyhow!("--dtype {dtype}: expected q4_k_m, q4_k, q6_k, q8_0, q5_0, q4_1, q4_0, f16, bf16 or f32")
            })?;
            let t = Instant::now();
            llorch_engine::synth::write(&shape, d, &out, seed)?;
            eprintln!(
                "wrote {} ({arch}, {preset}, {dtype}) in {:.1}s",
                out.display(),
                t.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

/// Loads a model with a progress bar on a terminal (log lines otherwise) and starts the engine.
fn start_engine(
    model: &str,
    dev: &DeviceArgs,
    ctx: usize,
    max_batch: usize,
) -> Result<(Engine, f64)> {
    device::set_cpu_threads(dev.threads);
    let path = catalog::resolve(model)?;
    let backend = dev.backend();
    let device = backend.open()?;
    let t = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} tensors")
                .unwrap()
                .progress_chars("=> "),
        );
        b.set_message(path.display().to_string());
        b
    });
    let mut last_decile = 0;
    let mut progress = |done: usize, total: usize| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
        } else if total > 0 && done * 10 / total > last_decile {
            last_decile = done * 10 / total;
            eprintln!("loading {}: {}%", path.display(), last_decile * 10);
        }
    };
    let loaded = llorch_engine::load(&path, &device, &mut progress)
        .with_context(|| format!("loading {}", path.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let load_s = t.elapsed().as_secs_f64();
    let engine = Engine::start(
        loaded,
        EngineConfig {
            max_batch,
            context_length: ctx,
            warmup: false,
            ..Default::default()
        },
    )?;
    Ok((engine, load_s))
}

fn print_summary(f: &Final) {
    let decode = f.decode_time.as_secs_f64();
    let prefill = f.prefill_time.as_secs_f64();
    eprintln!(
        "finish={} prompt={} tok ({:.1} tok/s prefill, {:.0} ms) generated={} tok ({:.1} tok/s decode)",
        f.finish.as_str(),
        f.prompt_tokens,
        f.prompt_tokens as f64 / prefill.max(1e-9),
        prefill * 1000.0,
        f.completion_tokens,
        if f.completion_tokens > 1 && decode > 0.0 {
            (f.completion_tokens - 1) as f64 / decode
        } else {
            0.0
        },
    );
}

/// Median, min and max of a sample.
fn stats(v: &[f64]) -> serde_json::Value {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let median = if s.is_empty() {
        0.0
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    serde_json::json!({
        "median": median,
        "min": s.first().copied().unwrap_or(0.0),
        "max": s.last().copied().unwrap_or(0.0),
        "samples": v,
    })
}

fn bench(
    model: &str,
    dev: &DeviceArgs,
    iterations: usize,
    warmup: usize,
    tokens: usize,
    prompt_tokens: usize,
    out: Option<&Path>,
) -> Result<()> {
    if tokens < 2 || prompt_tokens < 1 {
        bail!("--tokens must be at least 2 and --prompt-tokens at least 1");
    }
    let (engine, load_s) = start_engine(model, dev, 0, 1)?;
    // A fixed English text, repeated and cut to exactly `prompt_tokens` tokens.
    let text =
        "The quick brown fox jumps over the lazy dog while the river runs past the old mill. "
            .repeat(prompt_tokens / 8 + 8);
    let mut ids = engine.tokenizer.encode(&text, true)?;
    ids.truncate(prompt_tokens);
    if ids.len() + tokens >= engine.config.context_length {
        bail!(
            "prompt + tokens exceed the context length {}",
            engine.config.context_length
        );
    }
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for i in 0..warmup + iterations {
        let f = generate_blocking(
            &engine,
            ids.clone(),
            Some(tokens as i64),
            SamplingParams::default(),
            vec![],
            true,
            |_, _| {},
        )?;
        let p = ids.len() as f64 / f.prefill_time.as_secs_f64().max(1e-9);
        let d = (f.completion_tokens - 1) as f64 / f.decode_time.as_secs_f64().max(1e-9);
        let tag = if i < warmup { "warmup" } else { "run" };
        eprintln!("{tag} {}: prefill {p:.1} tok/s, decode {d:.1} tok/s", i + 1);
        if i >= warmup {
            prefill.push(p);
            decode.push(d);
        }
    }
    let threads = std::env::var("CANDLE_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok());
    let prof = llorch_engine::profile::report();
    let total: f64 = prof.iter().map(|p| p.1.as_secs_f64()).sum();
    let generated = ((warmup + iterations) * tokens) as f64;
    if !prof.is_empty() {
        eprintln!(
            "{:<26} {:>10} {:>8} {:>14}",
            "phase", "total ms", "share", "ms per token"
        );
        for (name, d, _) in &prof {
            eprintln!(
                "{name:<26} {:>10.1} {:>7.1}% {:>14.3}",
                d.as_secs_f64() * 1e3,
                100.0 * d.as_secs_f64() / total,
                d.as_secs_f64() * 1e3 / generated
            );
        }
    }
    let profile_json: Vec<serde_json::Value> = prof
        .iter()
        .map(|(n, d, c)| serde_json::json!({"phase": n, "seconds": d.as_secs_f64(), "calls": c}))
        .collect();
    let result = serde_json::json!({
        "machine": {
            "cpu": cpu_name(),
            "logical_cpus": device::physical_cores(),
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
            "device": dev.backend().label(),
            "threads": threads,
        },
        "model": &*engine.info,
        "settings": {
            "iterations": iterations, "warmup": warmup, "tokens": tokens, "prompt_tokens": ids.len(),
            "sampling": "greedy", "llorch_version": llorch_engine::VERSION,
        },
        "load_seconds": load_s,
        "prefill_tokens_per_second": stats(&prefill),
        "decode_tokens_per_second": stats(&decode),
        "peak_rss_bytes": device::peak_rss_bytes(),
        "profile": profile_json,
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    if let Some(p) = out {
        std::fs::write(p, serde_json::to_string_pretty(&result)?)?;
    }
    Ok(())
}

fn check(
    model: &str,
    ids: Option<&str>,
    tokens: usize,
    out: Option<&Path>,
    dev: &DeviceArgs,
) -> Result<()> {
    device::set_cpu_threads(dev.threads);
    let path = catalog::resolve(model)?;
    let device = dev.backend().open()?;
    let m = llorch_engine::load(&path, &device, &mut |_, _| {})?;
    let vocab = m.info.vocab_size as u32;
    let prompt: Vec<u32> = match ids {
        Some(s) => s
            .split(',')
            .map(|x| x.trim().parse::<u32>())
            .collect::<Result<_, _>>()?,
        None => (1..=32u32).map(|i| (i * 7919) % vocab).collect(),
    };
    let dequantized = path.is_file() && llorch_engine::model::dequantize_enabled();
    let mut net = m.network;
    if net.is_cuda() {
        // as the worker does on a GPU: caches in the device pool, which is also what lets
        // decode steps run as CUDA graphs (`LLORCH_CUDA_GRAPH=0` keeps them on Candle)
        net.enable_kv_pool(1, prompt.len() + tokens + 1)?;
    }
    let mut seq = net.new_seq();
    let t = Instant::now();
    let logits: Vec<f32> = net
        .forward(&mut [(&mut seq, &prompt[..])])?
        .flatten_all()?
        .to_vec1()?;
    let mut greedy = vec![];
    // top-1 minus top-2 logit at each greedy step: where two devices part, this tells a
    // near-tie (a gap inside the numerical noise) from a real disagreement
    let mut margins = vec![];
    let mut last = logits.clone();
    for _ in 0..tokens {
        let next = last
            .iter()
            .enumerate()
            .fold(0, |b, (j, &x)| if x > last[b] { j } else { b }) as u32;
        let second = last
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != next as usize)
            .fold(f32::NEG_INFINITY, |m, (_, &x)| m.max(x));
        margins.push(last[next as usize] - second);
        greedy.push(next);
        last = net
            .forward(&mut [(&mut seq, &[next][..])])?
            .flatten_all()?
            .to_vec1()?;
    }
    let v = serde_json::json!({
        "model": path.display().to_string(), "device": dev.backend().label(),
        "dequantized": dequantized, "prompt_ids": prompt, "logits": logits, "greedy_ids": greedy,
        "greedy_margins": margins,
        // logits after the last greedy token: a decode step (a CUDA graph on a GPU)
        "decode_logits": last,
        "seconds": t.elapsed().as_secs_f64(),
    });
    match out {
        Some(p) => std::fs::write(p, v.to_string())?,
        None => println!("{v}"),
    }
    Ok(())
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn models(cmd: ModelsCmd) -> Result<()> {
    let dir = catalog::models_dir();
    match cmd {
        ModelsCmd::Fetch { name } => {
            let list: Vec<&catalog::KnownModel> = if name == "all" {
                catalog::MODELS.iter().collect()
            } else {
                vec![catalog::find(&name).ok_or_else(|| {
                    anyhow!(
                        "unknown model '{name}'; known: {}",
                        catalog::MODELS
                            .iter()
                            .map(|m| m.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?]
            };
            for m in list {
                let p = catalog::fetch(m, &dir, &mut |l| eprintln!("{l}"))?;
                println!("{}", p.display());
            }
        }
        ModelsCmd::List => {
            println!("models directory: {}", dir.display());
            println!(
                "{:<30} {:<8} {:<10} {:>10} {:<10} path",
                "name", "present", "arch", "size", "quant"
            );
            for m in catalog::MODELS {
                let p = dir.join(m.file);
                let (present, arch, quant) = if p.exists() {
                    match llorch_engine::gguf::GgufFile::open(&p) {
                        Ok((g, _)) => (
                            "yes",
                            g.architecture().unwrap_or_default(),
                            g.quantization(),
                        ),
                        Err(_) => ("corrupt", String::new(), String::new()),
                    }
                } else {
                    ("no", String::new(), String::new())
                };
                println!(
                    "{:<30} {:<8} {:<10} {:>9.1}M {:<10} {}",
                    m.name,
                    present,
                    arch,
                    m.bytes as f64 / 1e6,
                    quant,
                    p.display()
                );
            }
        }
        ModelsCmd::Inspect { path } => {
            let p = catalog::resolve(&path)?;
            inspect(&p)?;
        }
    }
    Ok(())
}

fn inspect(p: &Path) -> Result<()> {
    if p.is_dir() {
        let (summary, cfg) = llorch_engine::model::read_hf_config(p)?;
        println!("format: safetensors");
        println!("model_type: {}", summary.model_type);
        println!("torch_dtype: {}", summary.torch_dtype);
        println!("{cfg:#?}");
        return Ok(());
    }
    let (g, _) = llorch_engine::gguf::GgufFile::open(p)?;
    println!("format: gguf");
    println!("architecture: {}", g.architecture()?);
    println!("quantization: {}", g.quantization());
    println!("parameters: {}", g.parameter_count());
    println!("tensors: {}", g.content.tensor_infos.len());
    let mut keys: Vec<_> = g.metadata().keys().cloned().collect();
    keys.sort();
    for k in keys {
        let v = &g.metadata()[&k];
        let shown = match v {
            llorch_engine::gguf::Value::Array(a) => format!("[{} items]", a.len()),
            llorch_engine::gguf::Value::String(s) if s.len() > 120 => {
                format!("{:?}…", &s[..s.floor_char_boundary(120)])
            }
            other => format!("{other:?}"),
        };
        println!("  {k} = {shown}");
    }
    Ok(())
}
