//! The worker registry and supervision. Each worker has one supervisor task that owns
//! its process: spawn → `starting` → (readiness callback) `ready` → health checks; a
//! crash or three missed checks restart it with exponential backoff; too many restarts in
//! a window open the circuit (`failed`); a stop drains it, sends SIGTERM, then SIGKILL
//! after the grace period. Children get a parent-death signal, so no worker outlives a
//! manager that is killed outright.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llorch_api::pool::{DeviceInfo, PoolState, WorkerInfo};
use llorch_api::ReadyCallback;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{watch, Notify};

use crate::config::{parse_device, DeviceSpec, Pool, PoolConfig};
use crate::devices;
use crate::metrics::PoolMetrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Starting,
    Ready,
    Draining,
    Stopped,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::Ready => "ready",
            Status::Draining => "draining",
            Status::Stopped => "stopped",
            Status::Failed => "failed",
        }
    }
}

pub struct WorkerEntry {
    pub id: String,
    pub pool: Pool,
    /// `cpu`, `cuda:N`, `metal:N`.
    pub device: String,
    pub status: Status,
    pub uri: Option<String>,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub started_at: u64,
    pub token: String,
    /// The model id the worker reports (from its /info), for routing by name.
    pub model_id: Option<String>,
    pub in_flight: Arc<AtomicUsize>,
    pub last_error: Option<String>,
    ready: Arc<Notify>,
    stop_tx: watch::Sender<Option<&'static str>>,
}

pub struct Manager {
    pub cfg: PoolConfig,
    /// `host:port` the manager listens on (for the callback URL).
    pub bind: String,
    pub devices: Vec<DeviceInfo>,
    pub bin_dir: PathBuf,
    pub workers: Mutex<HashMap<String, WorkerEntry>>,
    pub metrics: PoolMetrics,
    pub http: reqwest::Client,
    pub shutting_down: AtomicBool,
    next_id: AtomicUsize,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

enum Exit {
    /// Asked to stop (reason for the metrics).
    Stopped(&'static str),
    /// The process died or stopped answering: restart it.
    Crashed(String),
    /// Start timed out or could not spawn: failed without restart.
    Failed(String),
}

impl Manager {
    pub fn new(cfg: PoolConfig, bind: String, bin_dir: PathBuf) -> Arc<Self> {
        let devices = devices::detect();
        let metrics = PoolMetrics::new();
        for d in &devices {
            metrics
                .device_memory
                .with_label_values(&[&d.id, "total"])
                .set(d.memory_total as f64);
            metrics
                .device_memory
                .with_label_values(&[&d.id, "free"])
                .set(d.memory_free as f64);
        }
        Arc::new(Self {
            cfg,
            bind,
            devices,
            bin_dir,
            workers: Mutex::new(HashMap::new()),
            metrics,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .pool_idle_timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            shutting_down: AtomicBool::new(false),
            next_id: AtomicUsize::new(0),
            tasks: Mutex::new(Vec::new()),
        })
    }

    /// Resolves a pool's device to a concrete one found on this machine.
    pub fn resolve_device(&self, spec: &str) -> Result<String, String> {
        match parse_device(spec) {
            None => Err(format!(
                "device '{spec}': expected auto, cpu, cuda:N or metal:N"
            )),
            Some(DeviceSpec::Auto) => Ok(devices::best(&self.devices)),
            Some(DeviceSpec::Cpu) => Ok("cpu".into()),
            Some(_) if self.devices.iter().any(|d| d.id == spec) => Ok(spec.to_string()),
            Some(_) => Err(format!(
                "device '{spec}' was not found on this machine (found: {})",
                self.devices
                    .iter()
                    .map(|d| d.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// Starts every configured replica.
    pub fn start_configured(self: &Arc<Self>) -> Result<Vec<String>, String> {
        let mut ids = vec![];
        for pool in self.cfg.pools.clone() {
            let device = self.resolve_device(pool.device.get_ref())?;
            for _ in 0..pool.replicas {
                ids.push(self.start_worker(pool.clone(), device.clone()));
            }
        }
        Ok(ids)
    }

    /// Registers a worker and starts its supervisor; returns its id.
    pub fn start_worker(self: &Arc<Self>, pool: Pool, device: String) -> String {
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        let id = format!("w{n}-{}", device.replace(':', ""));
        let (stop_tx, stop_rx) = watch::channel(None);
        let entry = WorkerEntry {
            id: id.clone(),
            pool,
            device,
            status: Status::Starting,
            uri: None,
            pid: None,
            restarts: 0,
            started_at: unix_now(),
            token: uuid::Uuid::new_v4().simple().to_string(),
            model_id: None,
            in_flight: Arc::new(AtomicUsize::new(0)),
            last_error: None,
            ready: Arc::new(Notify::new()),
            stop_tx,
        };
        self.workers.lock().unwrap().insert(id.clone(), entry);
        let me = self.clone();
        let wid = id.clone();
        let h = tokio::spawn(async move { me.supervise(wid, stop_rx).await });
        self.tasks.lock().unwrap().push(h);
        id
    }

    fn set(&self, id: &str, f: impl FnOnce(&mut WorkerEntry)) {
        if let Some(w) = self.workers.lock().unwrap().get_mut(id) {
            f(w);
        }
    }

    fn binary_for(&self, device: &str) -> (PathBuf, Vec<String>) {
        match parse_device(device) {
            Some(DeviceSpec::Cuda(n)) => (
                self.bin_dir.join("llorch-cuda"),
                vec!["--cuda-device".into(), n.to_string()],
            ),
            Some(DeviceSpec::Metal(n)) => (
                self.bin_dir.join("llorch-metal"),
                vec!["--metal-device".into(), n.to_string()],
            ),
            _ => (self.bin_dir.join("llorch-cpu"), vec![]),
        }
    }

    fn spawn(&self, id: &str) -> Result<Child, String> {
        let (pool, device, token) = {
            let w = self.workers.lock().unwrap();
            let w = w.get(id).ok_or("worker vanished")?;
            (w.pool.clone(), w.device.clone(), w.token.clone())
        };
        let (bin, mut args) = self.binary_for(&device);
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        args.extend([
            "--worker-id".into(),
            id.into(),
            "--model".into(),
            pool.model.clone(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--callback-url".into(),
            format!("http://{}/v2/internal/workers/ready", self.bind),
        ]);
        for (flag, v) in [
            ("--ctx-size", pool.ctx_size),
            ("--max-batch", pool.max_batch),
            ("--max-queue", pool.max_queue),
            ("--threads", pool.threads),
        ] {
            if let Some(v) = v {
                args.extend([flag.to_string(), v.to_string()]);
            }
        }
        let mut cmd = Command::new(&bin);
        cmd.args(&args)
            // secrets go through the environment, not argv (visible in `ps`)
            .env("LLORCH_CALLBACK_TOKEN", &token)
            .env_remove("LLORCH_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(k) = &self.cfg.api_key {
            cmd.env("LLORCH_API_KEY", k);
        }
        #[cfg(target_os = "linux")]
        unsafe {
            // SAFETY: prctl is async-signal-safe; it makes the kernel SIGKILL the worker when
            // the manager thread that spawned it dies, even if the manager is SIGKILLed.
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        for (stream, is_err) in [
            (
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
                false,
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
                true,
            ),
        ] {
            if let Some(s) = stream {
                let wid = id.to_string();
                tokio::spawn(async move {
                    let mut lines = BufReader::new(s).lines();
                    while let Ok(Some(l)) = lines.next_line().await {
                        if is_err {
                            tracing::info!(worker = %wid, "{l}");
                        } else {
                            tracing::info!(worker = %wid, stream = "stdout", "{l}");
                        }
                    }
                });
            }
        }
        let pid = child.id();
        self.set(id, |w| {
            w.pid = pid;
            w.uri = Some(format!("http://127.0.0.1:{port}"));
            w.status = Status::Starting;
            w.started_at = unix_now();
        });
        tracing::info!(worker = %id, pid = ?pid, "started {} {}", bin.display(), args.join(" "));
        Ok(child)
    }

    async fn supervise(
        self: Arc<Self>,
        id: String,
        mut stop_rx: watch::Receiver<Option<&'static str>>,
    ) {
        let t = self.cfg.timeouts.clone();
        let policy = self.cfg.restart.clone();
        let mut restarts: VecDeque<Instant> = VecDeque::new();
        let mut backoff = Duration::from_millis(policy.backoff_initial_ms);
        loop {
            let ready = match self.workers.lock().unwrap().get(&id) {
                Some(w) => w.ready.clone(),
                None => return,
            };
            let mut child = match self.spawn(&id) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(worker = %id, "{e}");
                    self.metrics
                        .worker_starts
                        .with_label_values(&["spawn_error"])
                        .inc();
                    self.set(&id, |w| {
                        w.status = Status::Failed;
                        w.last_error = Some(e);
                    });
                    return;
                }
            };
            let exit = self
                .run_once(&id, &mut child, &ready, &mut stop_rx, &t)
                .await;
            match exit {
                Exit::Stopped(reason) => {
                    self.stop_child(&id, &mut child, t.stop_grace_secs).await;
                    self.metrics.worker_stops.with_label_values(&[reason]).inc();
                    self.set(&id, |w| {
                        w.status = Status::Stopped;
                        w.pid = None;
                    });
                    return;
                }
                Exit::Failed(e) => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    tracing::error!(worker = %id, "failed: {e}");
                    self.metrics
                        .worker_stops
                        .with_label_values(&["start_timeout"])
                        .inc();
                    self.set(&id, |w| {
                        w.status = Status::Failed;
                        w.pid = None;
                        w.last_error = Some(e);
                    });
                    return;
                }
                Exit::Crashed(e) => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    tracing::warn!(worker = %id, "{e}");
                    let now = Instant::now();
                    restarts.push_back(now);
                    while restarts.front().is_some_and(|t0| {
                        now.duration_since(*t0) > Duration::from_secs(policy.window_secs)
                    }) {
                        restarts.pop_front();
                    }
                    if restarts.len() as u32 > policy.max_restarts {
                        let msg = format!(
                            "circuit open: {} restarts within {}s; last: {e}",
                            restarts.len(),
                            policy.window_secs
                        );
                        tracing::error!(worker = %id, "{msg}");
                        self.metrics
                            .worker_stops
                            .with_label_values(&["circuit_open"])
                            .inc();
                        self.set(&id, |w| {
                            w.status = Status::Failed;
                            w.pid = None;
                            w.last_error = Some(msg);
                        });
                        return;
                    }
                    self.set(&id, |w| {
                        w.status = Status::Starting;
                        w.pid = None;
                        w.last_error = Some(e);
                        w.restarts += 1;
                    });
                    self.metrics.worker_restarts.inc();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop_rx.changed() => {
                            self.set(&id, |w| w.status = Status::Stopped);
                            return;
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_millis(policy.backoff_max_ms));
                }
            }
        }
    }

    /// One life of a worker process, until it must be stopped, restarted or failed.
    async fn run_once(
        &self,
        id: &str,
        child: &mut Child,
        ready: &Notify,
        stop_rx: &mut watch::Receiver<Option<&'static str>>,
        t: &crate::config::Timeouts,
    ) -> Exit {
        // starting: wait for the callback
        tokio::select! {
            _ = ready.notified() => {
                self.metrics.worker_starts.with_label_values(&["ready"]).inc();
            }
            st = child.wait() => {
                self.metrics.worker_starts.with_label_values(&["exited"]).inc();
                return Exit::Crashed(format!("exited before it was ready ({})", st.map(|s| s.to_string()).unwrap_or_default()));
            }
            _ = tokio::time::sleep(Duration::from_secs(t.start_secs)) => {
                self.metrics.worker_starts.with_label_values(&["timeout"]).inc();
                return Exit::Failed(format!("no readiness callback within {}s", t.start_secs));
            }
            _ = stop_rx.changed() => return Exit::Stopped(stop_rx.borrow().unwrap_or("requested")),
        }
        self.learn_model_id(id).await;
        // ready: health checks
        let mut misses = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(t.health_interval_secs));
        tick.tick().await;
        loop {
            tokio::select! {
                st = child.wait() => {
                    return Exit::Crashed(format!("exited unexpectedly ({})", st.map(|s| s.to_string()).unwrap_or_default()));
                }
                _ = stop_rx.changed() => return Exit::Stopped(stop_rx.borrow().unwrap_or("requested")),
                _ = tick.tick() => {
                    if self.health_ok(id).await {
                        misses = 0;
                    } else {
                        misses += 1;
                        tracing::warn!(worker = %id, "health check failed ({misses}/{})", t.health_misses);
                        if misses >= t.health_misses {
                            return Exit::Crashed(format!("{misses} health checks failed in a row"));
                        }
                    }
                }
            }
        }
    }

    async fn health_ok(&self, id: &str) -> bool {
        let uri = match self.workers.lock().unwrap().get(id) {
            Some(w) if w.status == Status::Draining => return true,
            Some(w) => w.uri.clone(),
            None => return false,
        };
        let Some(uri) = uri else { return false };
        matches!(
            self.http.get(format!("{uri}/health")).timeout(Duration::from_secs(2)).send().await,
            Ok(r) if r.status().is_success()
        )
    }

    async fn learn_model_id(&self, id: &str) {
        let Some(uri) = self
            .workers
            .lock()
            .unwrap()
            .get(id)
            .and_then(|w| w.uri.clone())
        else {
            return;
        };
        let mut req = self
            .http
            .get(format!("{uri}/v1/models"))
            .timeout(Duration::from_secs(3));
        if let Some(k) = &self.cfg.api_key {
            req = req.bearer_auth(k);
        }
        if let Ok(r) = req.send().await {
            if let Ok(v) = r.json::<serde_json::Value>().await {
                if let Some(m) = v["data"][0]["id"].as_str() {
                    let m = m.to_string();
                    self.set(id, |w| w.model_id = Some(m));
                }
            }
        }
    }

    /// Drain, SIGTERM, wait the grace period, SIGKILL.
    async fn stop_child(&self, id: &str, child: &mut Child, grace: u64) {
        self.set(id, |w| w.status = Status::Draining);
        if let Some(pid) = child.id() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(Duration::from_secs(grace), child.wait())
            .await
            .is_err()
        {
            tracing::warn!(worker = %id, "did not exit within {grace}s of SIGTERM: SIGKILL");
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        tracing::info!(worker = %id, "stopped");
    }

    /// The readiness callback. Err((status, message)).
    pub fn on_ready(&self, cb: &ReadyCallback, bearer: Option<&str>) -> Result<(), (u16, String)> {
        let mut ws = self.workers.lock().unwrap();
        let Some(w) = ws.get_mut(&cb.worker_id) else {
            return Err((
                404,
                format!("worker '{}' was not started by this manager", cb.worker_id),
            ));
        };
        if self.cfg.api_key.is_some() && bearer != Some(w.token.as_str()) {
            return Err((
                401,
                format!(
                    "wrong or missing callback token for worker '{}'",
                    cb.worker_id
                ),
            ));
        }
        if w.status != Status::Starting {
            return Err((
                409,
                format!(
                    "worker '{}' is {}, not starting",
                    cb.worker_id,
                    w.status.as_str()
                ),
            ));
        }
        w.uri = Some(cb.uri.clone());
        w.pid = Some(cb.pid);
        w.status = Status::Ready;
        w.last_error = None;
        w.ready.notify_one();
        tracing::info!(worker = %cb.worker_id, "ready at {} ({} on {})", cb.uri, cb.model_ref, cb.device);
        Ok(())
    }

    pub fn request_stop(&self, id: &str, reason: &'static str) -> bool {
        match self.workers.lock().unwrap().get_mut(id) {
            Some(w) => {
                if matches!(w.status, Status::Ready | Status::Starting) {
                    w.status = Status::Draining;
                }
                let _ = w.stop_tx.send(Some(reason));
                true
            }
            None => false,
        }
    }

    pub fn drain(&self, id: &str) -> bool {
        match self.workers.lock().unwrap().get_mut(id) {
            Some(w) => {
                if w.status == Status::Ready {
                    w.status = Status::Draining;
                }
                true
            }
            None => false,
        }
    }

    /// Stops every worker and waits for their supervisors.
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let ids: Vec<String> = self.workers.lock().unwrap().keys().cloned().collect();
        for id in &ids {
            self.request_stop(id, "shutdown");
        }
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock().unwrap());
        let grace = Duration::from_secs(self.cfg.timeouts.stop_grace_secs + 5);
        let _ = tokio::time::timeout(grace, futures::future::join_all(tasks)).await;
    }

    pub fn state(&self) -> PoolState {
        let ws = self.workers.lock().unwrap();
        let mut workers: Vec<WorkerInfo> = ws
            .values()
            .map(|w| WorkerInfo {
                id: w.id.clone(),
                model_ref: w.pool.model.clone(),
                device: w.device.clone(),
                uri: w.uri.clone(),
                status: w.status.as_str().into(),
                pid: w.pid,
                restarts: w.restarts,
                started_at: w.started_at,
                last_error: w.last_error.clone(),
            })
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        PoolState {
            pool_id: self.cfg.pool_id.clone(),
            devices: self.devices.clone(),
            workers,
        }
    }

    pub fn update_status_gauges(&self) {
        let ws = self.workers.lock().unwrap();
        for s in [
            Status::Starting,
            Status::Ready,
            Status::Draining,
            Status::Stopped,
            Status::Failed,
        ] {
            let n = ws.values().filter(|w| w.status == s).count();
            self.metrics
                .workers
                .with_label_values(&[s.as_str()])
                .set(n as f64);
        }
    }

    fn serves(w: &WorkerEntry, model: &str) -> bool {
        model.is_empty()
            || w.pool.model == model
            || w.model_id.as_deref() == Some(model)
            || llorch_api::models::same_model(&w.pool.model, model)
    }

    /// The least-loaded ready worker serving `model` (any model when empty).
    /// Err: (status, message) — 404 when no pool serves it, 503 when none is ready.
    pub fn pick(&self, model: &str) -> Result<(String, String, Arc<AtomicUsize>), (u16, String)> {
        let ws = self.workers.lock().unwrap();
        let serving: Vec<&WorkerEntry> = ws.values().filter(|w| Self::serves(w, model)).collect();
        if serving.is_empty() {
            let known: Vec<String> = ws
                .values()
                .map(|w| w.model_id.clone().unwrap_or(w.pool.model.clone()))
                .collect();
            return Err((
                404,
                format!(
                    "model '{model}' is not served by this pool (served: {})",
                    known.join(", ")
                ),
            ));
        }
        let best = serving
            .iter()
            .filter(|w| w.status == Status::Ready && w.uri.is_some())
            .min_by_key(|w| w.in_flight.load(Ordering::SeqCst));
        match best {
            Some(w) => Ok((w.id.clone(), w.uri.clone().unwrap(), w.in_flight.clone())),
            None => {
                let states: Vec<String> = serving
                    .iter()
                    .map(|w| format!("{} {}", w.id, w.status.as_str()))
                    .collect();
                let name = if model.is_empty() { "(any)" } else { model };
                Err((
                    503,
                    format!("model '{name}' has no ready worker ({})", states.join(", ")),
                ))
            }
        }
    }

    /// Model ids of ready workers, for `/v1/models`.
    pub fn ready_models(&self) -> Vec<String> {
        let ws = self.workers.lock().unwrap();
        let mut v: Vec<String> = ws
            .values()
            .filter(|w| w.status == Status::Ready)
            .map(|w| w.model_id.clone().unwrap_or_else(|| w.pool.model.clone()))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}
