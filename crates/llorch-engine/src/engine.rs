//! The scheduler: one thread owns the model; requests arrive on a bounded queue; each
//! step runs one forward over every running sequence (decodes plus a bounded chunk of
//! prompt prefill), samples each sequence's next token and streams it to that request's
//! own channel. Sequences join and leave at any step (continuous batching). A request
//! whose receiver is gone, or whose cancel flag is set, ends at the next step.

use rayon::prelude::*;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::chat::{ChatTemplate, Message, CHATML};
use crate::error::{EngineError, Result};
use crate::model::{LoadedModel, ModelInfo, Network, RowOut, SeqState};
use crate::sampler::{Sampler, SamplingParams};
use crate::stop::{StopMatcher, StopOutcome};
use crate::tokenizer::{StreamDecoder, Tokenizer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop sequence matched.
    Stop,
    /// `max_tokens` or the context ran out.
    Length,
    /// The model produced EOS or an end-of-turn token.
    Eos,
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// The final record of a request.
#[derive(Debug, Clone)]
pub struct Final {
    pub finish: FinishReason,
    pub stop_sequence: Option<String>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub queue_time: Duration,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// The request left the queue and its prefill began.
    Started {
        prompt_tokens: usize,
        queue_time: Duration,
    },
    /// One generated token. `text` is what may be shown now: it can be empty (half a
    /// UTF-8 character, or text held back as a possible stop sequence).
    Token {
        text: String,
        id: u32,
        logprob: f32,
        index: usize,
    },
    /// Text released at the end without a new token (held back as a possible stop
    /// sequence that did not complete).
    Text(String),
    Done(Final),
    Error(String),
}

pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Keep generating past EOS (benchmarks want exactly `max_tokens`).
    pub ignore_eos: bool,
    pub events: UnboundedSender<Event>,
    pub cancel: Arc<AtomicBool>,
    pub enqueued: Instant,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together in one step.
    pub max_batch: usize,
    /// Requests waiting for a place in the batch; more are refused.
    pub max_queue: usize,
    /// Context length served (the model's, or less).
    pub context_length: usize,
    /// Bytes for KV caches of all running sequences together.
    pub kv_budget_bytes: u64,
    /// Prompt tokens prefilled per step, so running streams keep flowing.
    pub prefill_chunk: usize,
    /// Run a short forward before reporting ready (first-use kernel compilation on GPUs).
    pub warmup: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            max_queue: 64,
            context_length: 0,
            kv_budget_bytes: 2 << 30,
            prefill_chunk: 256,
            warmup: true,
        }
    }
}

/// Called with the batch size of every engine step.
pub type BatchObserver = Box<dyn Fn(usize) + Send>;

/// Live counters the HTTP layer turns into metrics.
#[derive(Default)]
pub struct EngineStats {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    /// KV tokens reserved by running sequences.
    pub kv_reserved_tokens: AtomicUsize,
    pub kv_capacity_tokens: AtomicUsize,
    /// Engine steps run (each one forward over the batch).
    pub steps: AtomicU64,
    pub batch_observer: std::sync::Mutex<Option<BatchObserver>>,
}

impl EngineStats {
    pub fn kv_usage_ratio(&self) -> f64 {
        let cap = self.kv_capacity_tokens.load(Ordering::Relaxed);
        if cap == 0 {
            return 0.0;
        }
        self.kv_reserved_tokens.load(Ordering::Relaxed) as f64 / cap as f64
    }
}

/// The handle: cheap to clone, shared by HTTP handlers.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<GenerationRequest>,
    pub stats: Arc<EngineStats>,
    pub info: Arc<ModelInfo>,
    pub tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    pub config: EngineConfig,
}

/// A validated request's token budget.
pub struct Budget {
    pub max_tokens: usize,
}

impl Engine {
    /// Starts the scheduler thread over a loaded model.
    pub fn start(model: LoadedModel, mut cfg: EngineConfig) -> Result<Engine> {
        let LoadedModel {
            info,
            mut network,
            tokenizer,
            device: _,
        } = model;
        if cfg.context_length == 0 || cfg.context_length > info.context_length {
            cfg.context_length = info.context_length;
        }
        cfg.max_batch = cfg.max_batch.clamp(1, network.max_batch());
        cfg.max_queue = cfg.max_queue.max(1);
        cfg.prefill_chunk = cfg.prefill_chunk.max(16);
        let per_token = network.kv_bytes_per_token().max(1) as u64;
        // Room for at least one full-context sequence, whatever the budget says.
        let capacity = ((cfg.kv_budget_bytes / per_token) as usize).max(cfg.context_length);
        if network.is_cuda() {
            // On a GPU, per-sequence caches make batched decode launch-bound; pool them.
            // As many full-context slots as the KV budget holds, at most one per batch row;
            // sequences beyond the slots get caches of their own.
            let slot_bytes = per_token * cfg.context_length as u64;
            let slots =
                ((cfg.kv_budget_bytes / slot_bytes.max(1)) as usize).clamp(1, cfg.max_batch);
            network.enable_kv_pool(slots, cfg.context_length)?;
            tracing::info!(
                slots,
                positions = cfg.context_length,
                "KV pool on the device"
            );
        }
        let stats = Arc::new(EngineStats::default());
        stats.kv_capacity_tokens.store(capacity, Ordering::Relaxed);
        let template = match &tokenizer.chat_template {
            Some(src) => ChatTemplate::new(src)?,
            None => ChatTemplate::new(CHATML)?,
        };
        let tokenizer = Arc::new(tokenizer);
        if std::env::var_os("LLORCH_PROFILE").is_some() {
            // per-phase host time of the engine's steps, logged whenever it goes idle
            crate::profile::enable(true);
        }
        if cfg.warmup {
            let ids = tokenizer.encode("Hello", true)?;
            let mut s = network.new_seq();
            network.forward(&mut [(&mut s, &ids[..])])?;
            network.forward(&mut [(&mut s, &ids[..1])])?;
            // a prompt longer than the fused GPU step's rows takes the general path: warm
            // that one too, or the first long prompt pays its kernels' first use (~0.1 s)
            let long = network.graph_rows() + 8;
            if network.graph_rows() > 0 && long < cfg.context_length {
                let ids: Vec<u32> = ids.iter().cycle().take(long).copied().collect();
                let mut s = network.new_seq();
                network.forward(&mut [(&mut s, &ids[..])])?;
            }
        }
        let (tx, rx) = sync_channel(cfg.max_queue);
        let sched = Scheduler {
            rx,
            graph_rows: network.graph_rows(),
            network,
            tokenizer: tokenizer.clone(),
            stats: stats.clone(),
            cfg: cfg.clone(),
            kv_capacity: capacity,
        };
        std::thread::Builder::new()
            .name("llorch-engine".into())
            .spawn(move || sched.run())
            .map_err(EngineError::Io)?;
        Ok(Engine {
            tx,
            stats,
            info: Arc::new(info),
            tokenizer,
            template: Arc::new(template),
            config: cfg,
        })
    }

    /// Checks a prompt's length and a requested `max_tokens` against the context.
    /// `None` means: up to the end of the context, at most 512 (a chat answer, not a novel).
    pub fn budget(&self, prompt_tokens: usize, max_tokens: Option<i64>) -> Result<Budget> {
        let ctx = self.config.context_length;
        if prompt_tokens == 0 {
            return Err(EngineError::invalid("prompt", "the prompt is empty"));
        }
        if prompt_tokens >= ctx {
            return Err(EngineError::PromptTooLong {
                prompt_tokens,
                context_length: ctx,
            });
        }
        let room = ctx - prompt_tokens;
        let max_tokens = match max_tokens {
            None => room.min(512),
            Some(m) if m <= 0 => {
                return Err(EngineError::invalid(
                    "max_tokens",
                    "max_tokens must be at least 1",
                ))
            }
            Some(m) if m as u64 > ctx as u64 => {
                return Err(EngineError::invalid(
                    "max_tokens",
                    format!("max_tokens {m} exceeds the context length {ctx}"),
                ))
            }
            Some(m) => (m as usize).min(room),
        };
        Ok(Budget { max_tokens })
    }

    /// Renders chat messages with the model's template and tokenizes them.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.render_chat(messages)?;
        let bos = self.tokenizer.bos_text();
        // Templates that write the BOS themselves must not get a second one.
        let add_special = bos.is_empty() || !text.starts_with(&bos);
        self.tokenizer.encode(&text, add_special)
    }

    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        self.template.render(
            messages,
            true,
            &self.tokenizer.bos_text(),
            &self.tokenizer.eos_text(),
        )
    }

    /// Queues a request; fails at once when the queue is full.
    pub fn submit(&self, req: GenerationRequest) -> Result<()> {
        self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(req) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(EngineError::QueueFull(self.config.max_queue))
            }
            Err(TrySendError::Disconnected(_)) => {
                self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(EngineError::EngineStopped)
            }
        }
    }
}

struct Seq {
    req: GenerationRequest,
    state: SeqState,
    /// Prompt tokens not yet fed.
    fed: usize,
    output: Vec<u32>,
    history: Vec<u32>,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    reserved: usize,
    started: Instant,
    first_token: Option<Instant>,
    done: bool,
}

struct Scheduler {
    rx: Receiver<GenerationRequest>,
    network: Network,
    tokenizer: Arc<Tokenizer>,
    stats: Arc<EngineStats>,
    cfg: EngineConfig,
    kv_capacity: usize,
    /// Rows of the network's fused GPU step (0: none); see [`Scheduler::step`].
    graph_rows: usize,
}

impl Scheduler {
    fn run(mut self) {
        let mut running: Vec<Seq> = Vec::new();
        let mut held: VecDeque<GenerationRequest> = VecDeque::new();
        let mut reserved = 0usize;
        loop {
            // Admit new requests while there is room in the batch and in the KV budget.
            while running.len() < self.cfg.max_batch {
                let req = match held.pop_front() {
                    Some(r) => r,
                    None if running.is_empty() => match self.idle_recv() {
                        Ok(r) => r,
                        Err(_) => return,
                    },
                    None => match self.rx.try_recv() {
                        Ok(r) => r,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => break,
                    },
                };
                let need = req.prompt.len() + req.max_tokens;
                if reserved + need > self.kv_capacity && !running.is_empty() {
                    held.push_front(req);
                    break;
                }
                self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                if req.cancel.load(Ordering::Relaxed) || req.events.is_closed() {
                    let _ = req.events.send(Event::Done(cancelled_final(&req)));
                    continue;
                }
                reserved += need;
                self.stats.running.fetch_add(1, Ordering::SeqCst);
                self.stats
                    .kv_reserved_tokens
                    .fetch_add(need, Ordering::SeqCst);
                let _ = req.events.send(Event::Started {
                    prompt_tokens: req.prompt.len(),
                    queue_time: req.enqueued.elapsed(),
                });
                running.push(Seq {
                    state: self.network.new_seq(),
                    fed: 0,
                    output: Vec::new(),
                    history: req.prompt.clone(),
                    sampler: Sampler::new(req.sampling.clone()),
                    decoder: StreamDecoder::default(),
                    stops: StopMatcher::new(req.stop.clone()),
                    reserved: need,
                    started: Instant::now(),
                    first_token: None,
                    done: false,
                    req,
                });
            }
            if running.is_empty() {
                continue;
            }
            // Drop requests nobody waits for any more.
            for s in running.iter_mut() {
                if s.req.cancel.load(Ordering::Relaxed) || s.req.events.is_closed() {
                    self.finish(s, FinishReason::Cancelled, None);
                }
            }
            self.step(&mut running);
            running.retain(|s| {
                if s.done {
                    reserved -= s.reserved;
                }
                !s.done
            });
        }
    }

    /// Waits for a request with nothing running; first logs the per-phase time of the steps
    /// since the last idle moment when `LLORCH_PROFILE` is set.
    /// Without it the table is left alone: `llorch bench --profile` reads it after its runs
    /// (emptied here, its report printed nothing).
    fn idle_recv(&self) -> std::result::Result<GenerationRequest, std::sync::mpsc::RecvError> {
        let phases = match std::env::var_os("LLORCH_PROFILE") {
            Some(_) => crate::profile::report(),
            None => Vec::new(),
        };
        if !phases.is_empty() {
            for (phase, total, calls) in phases {
                tracing::info!(
                    phase,
                    total_ms = total.as_secs_f64() * 1e3,
                    calls,
                    per_call_us = total.as_secs_f64() * 1e6 / calls.max(1) as f64,
                    "engine profile"
                );
            }
            crate::profile::reset();
        }
        self.rx.recv()
    }

    /// One forward over the running sequences: every decoding sequence feeds its last
    /// token; prefilling ones feed a chunk of their prompt within the step's budget.
    /// With a fused GPU step of `graph_rows` rows (a row per token), a prompt no longer than
    /// that is fed into the rows the decoders leave free, so it never takes the slower
    /// general path; longer prompts take `prefill_chunk`-sized chunks of the general path.
    fn step(&mut self, running: &mut [Seq]) {
        let mut budget = self.cfg.prefill_chunk;
        let decoders = running
            .iter()
            .filter(|s| !s.done && s.fed >= s.req.prompt.len())
            .count();
        let mut free = self.graph_rows.saturating_sub(decoders);
        let mut plan: Vec<(usize, usize, usize)> = Vec::new(); // (seq index, start, len) of tokens to feed
        for (i, s) in running.iter().enumerate() {
            if s.done {
                continue;
            }
            let left = s.req.prompt.len() - s.fed.min(s.req.prompt.len());
            if left > 0 {
                if s.req.prompt.len() <= self.graph_rows && free > 0 {
                    let len = left.min(free);
                    free -= len;
                    plan.push((i, s.fed, len));
                    continue;
                }
                if budget == 0 {
                    continue;
                }
                let len = left.min(budget);
                budget -= len;
                plan.push((i, s.fed, len));
            } else {
                plan.push((i, usize::MAX, 1));
            }
        }
        if plan.is_empty() {
            return;
        }
        if let Some(obs) = self.stats.batch_observer.lock().unwrap().as_ref() {
            obs(plan.len());
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let t_step = crate::profile::start();
        let logits = {
            let mut toks: Vec<Vec<u32>> = Vec::with_capacity(plan.len());
            for &(i, start, len) in &plan {
                let s = &running[i];
                toks.push(if start == usize::MAX {
                    vec![*s.output.last().expect("a decoding sequence has output")]
                } else {
                    s.req.prompt[start..start + len].to_vec()
                });
            }
            let greedy: Vec<bool> = plan
                .iter()
                .map(|&(i, _, _)| running[i].sampler.is_greedy())
                .collect();
            // Disjoint &mut borrows of the planned sequences' states.
            let mut states: Vec<Option<&mut SeqState>> =
                running.iter_mut().map(|s| Some(&mut s.state)).collect();
            let mut batch: Vec<(&mut SeqState, &[u32])> = Vec::with_capacity(plan.len());
            for (k, &(i, _, _)) in plan.iter().enumerate() {
                batch.push((states[i].take().unwrap(), &toks[k][..]));
            }
            let t = crate::profile::start();
            let out = self.network.forward_rows(&mut batch, &greedy);
            crate::profile::stop("forward", t);
            out
        };
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "forward failed");
                for &(i, _, _) in &plan {
                    let s = &mut running[i];
                    self.release(s);
                    let _ = s
                        .req
                        .events
                        .send(Event::Error(format!("forward failed: {e}")));
                }
                return;
            }
        };
        let t = crate::profile::start();
        // which row of logits each sequence samples from this step
        let mut row: Vec<Option<usize>> = vec![None; running.len()];
        for (k, &(i, start, len)) in plan.iter().enumerate() {
            let s = &mut running[i];
            if start != usize::MAX {
                s.fed += len;
                if s.fed < s.req.prompt.len() {
                    continue; // more prompt to go: these logits are not needed
                }
            }
            row[i] = Some(k);
        }
        // Sampling (a pass or more over the vocabulary, plus the log-probability) costs
        // ~0.1 ms a sequence: serial, it would bound a step of 32 decoders on a GPU.
        let pick = |(s, k): (&mut Seq, &Option<usize>)| {
            k.map(|k| match &logits[k] {
                RowOut::Picked { id, logprob } => (*id, *logprob),
                RowOut::Logits(l) => s.sampler.sample(l, &s.history),
            })
        };
        let picks: Vec<Option<(u32, f32)>> = if plan.len() >= 4 {
            running.par_iter_mut().zip(&row).map(pick).collect()
        } else {
            running.iter_mut().zip(&row).map(pick).collect()
        };
        for (s, pick) in running.iter_mut().zip(picks) {
            if let Some((id, logprob)) = pick {
                self.on_token(s, id, logprob);
            }
        }
        crate::profile::stop("sample_detokenize_stream", t);
        crate::profile::stop("engine_step", t_step);
    }

    fn on_token(&self, s: &mut Seq, id: u32, logprob: f32) {
        let now = Instant::now();
        if s.first_token.is_none() {
            s.first_token = Some(now);
        }
        if !s.req.ignore_eos && self.tokenizer.stop_ids.contains(&id) {
            self.finish(s, FinishReason::Eos, None);
            return;
        }
        s.output.push(id);
        s.history.push(id);
        let delta = s.decoder.push(&self.tokenizer, id).unwrap_or_default();
        let index = s.output.len() - 1;
        match s.stops.push(&delta) {
            StopOutcome::Continue(text) => {
                let _ = s.req.events.send(Event::Token {
                    text,
                    id,
                    logprob,
                    index,
                });
            }
            StopOutcome::Stopped { text, matched } => {
                let _ = s.req.events.send(Event::Token {
                    text,
                    id,
                    logprob,
                    index,
                });
                self.finish(s, FinishReason::Stop, Some(matched));
                return;
            }
        }
        let ctx_full = s.state.len() + 1 >= self.cfg.context_length;
        if s.output.len() >= s.req.max_tokens || ctx_full {
            self.finish(s, FinishReason::Length, None);
        }
    }

    /// Marks a sequence done and gives back its batch place and KV reservation, before
    /// its last event is sent (so a client that saw the end sees the engine free).
    fn release(&self, s: &mut Seq) -> bool {
        if s.done {
            return false;
        }
        s.done = true;
        self.stats.running.fetch_sub(1, Ordering::SeqCst);
        self.stats
            .kv_reserved_tokens
            .fetch_sub(s.reserved, Ordering::SeqCst);
        true
    }

    fn finish(&self, s: &mut Seq, reason: FinishReason, stop: Option<String>) {
        if !self.release(s) {
            return;
        }
        if reason != FinishReason::Stop && reason != FinishReason::Cancelled {
            let rest = s.stops.flush();
            if !rest.is_empty() {
                let _ = s.req.events.send(Event::Text(rest));
            }
        }
        let first = s.first_token.unwrap_or_else(Instant::now);
        let _ = s.req.events.send(Event::Done(Final {
            finish: reason,
            stop_sequence: stop,
            prompt_tokens: s.req.prompt.len(),
            completion_tokens: s.output.len(),
            queue_time: s.started.duration_since(s.req.enqueued),
            prefill_time: first.saturating_duration_since(s.started),
            decode_time: Instant::now().saturating_duration_since(first),
        }));
    }
}

fn cancelled_final(req: &GenerationRequest) -> Final {
    Final {
        finish: FinishReason::Cancelled,
        stop_sequence: None,
        prompt_tokens: req.prompt.len(),
        completion_tokens: 0,
        queue_time: req.enqueued.elapsed(),
        prefill_time: Duration::ZERO,
        decode_time: Duration::ZERO,
    }
}

/// Runs one request to completion on the calling thread's view of `engine`, calling
/// `on_text` for each piece of text: the blocking convenience the CLI and tests use.
pub fn generate_blocking(
    engine: &Engine,
    prompt: Vec<u32>,
    max_tokens: Option<i64>,
    sampling: SamplingParams,
    stop: Vec<String>,
    ignore_eos: bool,
    mut on_token: impl FnMut(&str, u32),
) -> Result<Final> {
    let budget = engine.budget(prompt.len(), max_tokens)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    engine.submit(GenerationRequest {
        prompt,
        max_tokens: budget.max_tokens,
        sampling,
        stop,
        ignore_eos,
        events: tx,
        cancel: Arc::new(AtomicBool::new(false)),
        enqueued: Instant::now(),
    })?;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Started { .. } => {}
            Event::Token { text, id, .. } => on_token(&text, id),
            Event::Text(text) => on_token(&text, u32::MAX),
            Event::Done(f) => return Ok(f),
            Event::Error(e) => return Err(EngineError::Device(e)),
        }
    }
    Err(EngineError::EngineStopped)
}
