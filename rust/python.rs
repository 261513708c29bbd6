//! The only module that knows Python. It converts arguments into owned Rust values,
//! releases the GIL around every call that computes or touches a file, and maps
//! `EngineError` to exception classes in one place. No decisions live here.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use numpy::{PyArray1, PyArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use pyo3::IntoPyObjectExt;

use crate::batching::{Batcher, ThreadScope, TokenSink, DEFAULT_MAX_BATCH};
use crate::error::{panic_message, EngineError};
use crate::generate::{GenerateRequest, GeneratedToken, Outcome, StopReason};
use crate::gguf::{GgufFile, MetadataArray, MetadataValue};
use crate::kv_cache::KvType;
use crate::model::Model;
use crate::sampling::{derive_call_seed, SamplingParams, TokenMask};
use crate::tokenizer::Tokenizer;

create_exception!(
    sampler_sdk._engine,
    ModelFormatError,
    PyValueError,
    "The model file is malformed, or uses a format, architecture or type this engine does not support."
);
create_exception!(
    sampler_sdk._engine,
    ContextOverflowError,
    PyValueError,
    "The prompt plus requested tokens do not fit the model's context window."
);

impl From<EngineError> for PyErr {
    fn from(err: EngineError) -> PyErr {
        let msg = err.to_string();
        match err {
            EngineError::InvalidArgument { .. } => PyValueError::new_err(msg),
            EngineError::WrongType { .. } => PyTypeError::new_err(msg),
            EngineError::FileNotFound { .. } => PyFileNotFoundError::new_err(msg),
            EngineError::Io { .. } => PyOSError::new_err(msg),
            EngineError::MalformedFile { .. }
            | EngineError::Unsupported { .. }
            | EngineError::MissingTensor { .. }
            | EngineError::MissingKey { .. } => ModelFormatError::new_err(msg),
            EngineError::ContextOverflow { .. } => ContextOverflowError::new_err(msg),
            EngineError::Internal(_) => PyRuntimeError::new_err(msg),
        }
    }
}

/// Runs engine work off the GIL and turns a panic into an exception instead of letting
/// it cross into Python as a `PanicException` (which `except Exception` misses).
fn run_detached<T: Send>(
    py: Python<'_>,
    work: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    py.detach(|| catch_panic(work)).map_err(PyErr::from)
}

/// Runs engine work, turning a panic into `EngineError::Internal` with its message.
fn catch_panic<T>(work: impl FnOnce() -> crate::Result<T>) -> crate::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
        .unwrap_or_else(|panic| Err(EngineError::Internal(panic_message(&*panic))))
}

#[pyclass(name = "Model", module = "sampler_sdk._engine", frozen)]
struct PyModel {
    inner: Arc<Model>,
    path: PathBuf,
    max_batch: usize,
    /// The scheduler that decodes this model's generations together, started by the
    /// first `generate` (a model used only for logits never starts a thread).
    batcher: OnceLock<std::result::Result<Batcher, String>>,
}

#[pymethods]
impl PyModel {
    /// `threads`: forward-pass threads (default: physical cores); `tokenizer`: a SentencePiece
    /// `.model` file to use instead of the GGUF's vocabulary; `max_batch`: generations
    /// decoded together at most (more wait for a place); `kv_cache_type`: "f16" (default,
    /// as llama.cpp's) or "f32".
    #[new]
    #[pyo3(signature = (path, threads = None, tokenizer = None, max_batch = None, kv_cache_type = None))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        threads: Option<usize>,
        tokenizer: Option<PathBuf>,
        max_batch: Option<usize>,
        kv_cache_type: Option<String>,
    ) -> PyResult<Self> {
        let max_batch = max_batch.unwrap_or(DEFAULT_MAX_BATCH);
        if max_batch == 0 {
            return Err(PyValueError::new_err("max_batch: must be at least 1"));
        }
        let kv_type = kv_cache_type
            .as_deref()
            .map(KvType::from_name)
            .transpose()
            .map_err(PyErr::from)?
            .unwrap_or_default();
        let p = path.clone();
        let model = run_detached(py, move || {
            let tokenizer = tokenizer
                .map(|t| Tokenizer::from_sentencepiece_file(&t))
                .transpose()?;
            Ok(Model::load_with(&p, threads, tokenizer)?.with_kv_type(kv_type))
        })?;
        Ok(Self {
            inner: Arc::new(model),
            path,
            max_batch,
            batcher: OnceLock::new(),
        })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Threads the forward pass runs on.
    #[getter]
    fn n_threads(&self) -> usize {
        self.inner.n_threads()
    }

    /// How sequences cache keys and values: "f16" (the default, as llama.cpp's) or "f32".
    #[getter]
    fn kv_cache_type(&self) -> &'static str {
        self.inner.kv_type().name()
    }

    #[getter]
    fn architecture(&self) -> &'static str {
        self.inner.config.arch.name()
    }

    #[getter]
    fn n_vocab(&self) -> usize {
        self.inner.config.n_vocab
    }

    #[getter]
    fn n_ctx_train(&self) -> usize {
        self.inner.config.n_ctx_train
    }

    #[getter]
    fn n_embd(&self) -> usize {
        self.inner.config.n_embd
    }

    #[getter]
    fn n_layer(&self) -> usize {
        self.inner.config.n_layer
    }

    #[getter]
    fn bos_id(&self) -> Option<u32> {
        self.inner.tokenizer.bos()
    }

    #[getter]
    fn eos_id(&self) -> Option<u32> {
        self.inner.tokenizer.eos()
    }

    /// Whether the model's metadata asks for BOS at the start of a context.
    #[getter]
    fn add_bos(&self) -> bool {
        self.inner.tokenizer.add_bos()
    }

    #[getter]
    fn end_of_generation_ids(&self) -> Vec<u32> {
        self.inner.tokenizer.end_of_generation_ids().to_vec()
    }

    #[pyo3(signature = (text, add_special = true, parse_special = false))]
    fn tokenize(
        &self,
        py: Python<'_>,
        text: String,
        add_special: bool,
        parse_special: bool,
    ) -> PyResult<Vec<u32>> {
        let model = Arc::clone(&self.inner);
        run_detached(py, move || {
            Ok(model.tokenizer.encode(&text, add_special, parse_special))
        })
    }

    #[pyo3(signature = (token_id, render_special = false))]
    fn token_bytes<'py>(
        &self,
        py: Python<'py>,
        token_id: u32,
        render_special: bool,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.check_ids(&[token_id])?;
        Ok(PyBytes::new(
            py,
            self.inner.tokenizer.token_bytes(token_id, render_special),
        ))
    }

    /// The vocabulary string of a token (as stored in the model file).
    fn token_piece(&self, token_id: u32) -> PyResult<String> {
        self.check_ids(&[token_id])?;
        Ok(self.inner.tokenizer.token_to_piece(token_id).to_string())
    }

    /// The id of a vocabulary string, or None.
    fn token_id(&self, piece: &str) -> Option<u32> {
        self.inner.tokenizer.token_id(piece)
    }

    #[pyo3(signature = (token_ids, render_special = false))]
    fn detokenize_bytes<'py>(
        &self,
        py: Python<'py>,
        token_ids: Vec<u32>,
        render_special: bool,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.check_ids(&token_ids)?;
        let model = Arc::clone(&self.inner);
        let bytes = run_detached(py, move || {
            Ok(model.tokenizer.decode(&token_ids, render_special))
        })?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Decoded text; invalid UTF-8 (a character cut at the end) becomes U+FFFD.
    #[pyo3(signature = (token_ids, render_special = false))]
    fn detokenize(
        &self,
        py: Python<'_>,
        token_ids: Vec<u32>,
        render_special: bool,
    ) -> PyResult<String> {
        self.check_ids(&token_ids)?;
        let model = Arc::clone(&self.inner);
        let bytes = run_detached(py, move || {
            Ok(model.tokenizer.decode(&token_ids, render_special))
        })?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Logits after the last of `token_ids`, evaluated from an empty context.
    fn logits<'py>(
        &self,
        py: Python<'py>,
        token_ids: Vec<u32>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let model = Arc::clone(&self.inner);
        let logits = run_detached(py, move || {
            let mut seq = model.new_sequence(token_ids.len());
            model.prefill(&mut seq, &token_ids, 1)
        })?;
        Ok(PyArray1::from_vec(py, logits))
    }

    /// Logits at the last `n_last` positions of `token_ids` (default: every position),
    /// shape (n_last, n_vocab).
    #[pyo3(signature = (token_ids, n_last = None))]
    fn logits_all<'py>(
        &self,
        py: Python<'py>,
        token_ids: Vec<u32>,
        n_last: Option<usize>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let model = Arc::clone(&self.inner);
        let n = n_last.unwrap_or(token_ids.len());
        let logits = run_detached(py, move || {
            let mut seq = model.new_sequence(token_ids.len());
            model.prefill(&mut seq, &token_ids, n)
        })?;
        let array = PyArray1::from_vec(py, logits);
        Ok(array.reshape([n, self.inner.config.n_vocab])?.into_any())
    }

    /// Starts generating on an engine thread. `on_event(kind, payload)` is called from
    /// that thread for each event: ("token", (id, bytes, text, prob, logprob_raw, top_k,
    /// attention)), then exactly one of ("done", dict) or ("error", exception). If
    /// `on_event` raises, the generation is cancelled. Arguments are validated here, so
    /// bad ones raise before any work starts.
    #[pyo3(signature = (
        prompt, on_event, *, max_len = 256, temperature = 0.7, nucleus_p = 0.95, seed = 0,
        allowed_tokens = None, disallowed_tokens = None, stop_token_ids = Vec::new(),
        stop_strings = Vec::new(), return_attention = false, context_limit = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        prompt: Vec<u32>,
        on_event: Py<PyAny>,
        max_len: usize,
        temperature: f32,
        nucleus_p: f32,
        seed: u64,
        allowed_tokens: Option<Vec<u32>>,
        disallowed_tokens: Option<Vec<u32>>,
        stop_token_ids: Vec<u32>,
        stop_strings: Vec<String>,
        return_attention: bool,
        context_limit: Option<usize>,
    ) -> PyResult<PyGeneration> {
        let n_vocab = self.inner.config.n_vocab;
        let mask = match (allowed_tokens, disallowed_tokens) {
            (Some(_), Some(_)) => {
                return Err(PyValueError::new_err(
                    "allowed_tokens, disallowed_tokens: give at most one of the two",
                ))
            }
            (Some(ids), None) => Some(TokenMask::allow_only(n_vocab, &ids)?),
            (None, Some(ids)) => Some(TokenMask::disallow(n_vocab, &ids)?),
            (None, None) => None,
        };
        let request = GenerateRequest {
            prompt,
            max_len,
            sampling: SamplingParams {
                temperature,
                nucleus_p,
                mask,
            },
            seed,
            stop_token_ids,
            stop_strings,
            return_attention,
            context_limit,
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(Finished::default());
        let sink = PySink {
            on_event: Some(on_event),
            finished: Arc::clone(&finished),
        };
        self.batcher()?
            .submit(request, Arc::clone(&cancel), Box::new(sink))?;
        Ok(PyGeneration { cancel, finished })
    }

    /// Counters of the continuous batcher: `steps` (batched forward calls),
    /// `sequence_steps` (sequences advanced, summed over steps) and `peak_batch` (most
    /// sequences in one step). All zero before the first `generate`.
    fn batching_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let read = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        let (steps, sequence_steps, peak) = match self.batcher.get() {
            Some(Ok(b)) => {
                let s = b.stats();
                (read(&s.steps), read(&s.sequence_steps), read(&s.peak_batch))
            }
            _ => (0, 0, 0),
        };
        d.set_item("steps", steps)?;
        d.set_item("sequence_steps", sequence_steps)?;
        d.set_item("peak_batch", peak)?;
        d.set_item("max_batch", self.max_batch)?;
        Ok(d)
    }

    /// Greedy (argmax) continuation, stopping after an end-of-generation token.
    fn generate_greedy(
        &self,
        py: Python<'_>,
        token_ids: Vec<u32>,
        max_tokens: usize,
    ) -> PyResult<Vec<u32>> {
        let model = Arc::clone(&self.inner);
        run_detached(py, move || model.generate_greedy(&token_ids, max_tokens))
    }
}

/// Set by a generation thread once it will never touch Python again.
#[derive(Default)]
struct Finished {
    done: std::sync::Mutex<bool>,
    signal: std::sync::Condvar,
}

impl Finished {
    fn set(&self) {
        if let Ok(mut done) = self.done.lock() {
            *done = true;
        }
        self.signal.notify_all();
    }

    fn is_set(&self) -> bool {
        self.done.lock().map(|d| *d).unwrap_or(true)
    }

    fn wait(&self, timeout: Option<std::time::Duration>) -> bool {
        let Ok(guard) = self.done.lock() else {
            return true;
        };
        match timeout {
            None => self
                .signal
                .wait_while(guard, |done| !*done)
                .map(|d| *d)
                .unwrap_or(true),
            Some(t) => self
                .signal
                .wait_timeout_while(guard, t, |done| !*done)
                .map(|(d, _)| *d)
                .unwrap_or(true),
        }
    }
}

/// A running generation: cancel it, wait for it, or ask whether it has finished.
#[pyclass(name = "Generation", module = "sampler_sdk._engine", frozen, weakref)]
struct PyGeneration {
    cancel: Arc<AtomicBool>,
    finished: Arc<Finished>,
}

#[pymethods]
impl PyGeneration {
    /// Asks the engine to stop; it does so before the next token or prefill chunk.
    fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// True once the engine thread has delivered its last event and let go of Python.
    #[getter]
    fn finished(&self) -> bool {
        self.finished.is_set()
    }

    /// Blocks (without the GIL) until the engine thread is done with Python; returns
    /// whether it is, which is false only when `timeout` seconds passed first. Waiting
    /// before interpreter shutdown keeps a native thread from calling into a
    /// finalizing interpreter.
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let timeout = match timeout {
            Some(t) if !(t.is_finite() && t >= 0.0) => {
                return Err(PyValueError::new_err(format!(
                    "timeout: must be a non-negative number, got {t}"
                )))
            }
            Some(t) => Some(std::time::Duration::from_secs_f64(t)),
            None => None,
        };
        let finished = Arc::clone(&self.finished);
        Ok(py.detach(move || finished.wait(timeout)))
    }
}

fn token_event(py: Python<'_>, t: GeneratedToken) -> PyResult<Py<PyAny>> {
    let attention = match t.attention {
        Some(a) => PyArray1::from_vec(py, a).into_any().unbind(),
        None => py.None(),
    };
    (
        t.id,
        PyBytes::new(py, &t.bytes),
        t.text,
        t.prob,
        t.logprob_raw,
        t.top_k,
        attention,
    )
        .into_py_any(py)
}

fn outcome_event(py: Python<'_>, outcome: &Outcome) -> PyResult<Py<PyAny>> {
    let d = PyDict::new(py);
    d.set_item("stop_reason", outcome.stop_reason.name())?;
    match outcome.stop_reason {
        StopReason::StopToken(id) | StopReason::EndOfSequence(id) => {
            d.set_item("stop_token_id", id)?
        }
        StopReason::StopString(i) => d.set_item("stop_string_index", i)?,
        _ => {}
    }
    d.set_item("prompt_tokens", outcome.usage.prompt_tokens)?;
    d.set_item("sampled_tokens", outcome.usage.sampled_tokens)?;
    d.set_item("trailing_text", &outcome.trailing_text)?;
    d.into_py_any(py)
}

/// The batcher thread holds one interpreter thread state for its whole life, detached
/// while it computes, so a step's delivery only takes the GIL. Attaching from a thread
/// without one creates and destroys a thread state (and its frame stack) every time:
/// 78 against 32 us per delivered token, and a few percent of a stream's rate.
fn batcher_thread_scope() -> ThreadScope {
    Box::new(|run| {
        Python::attach(|py| {
            py.detach(move || {
                run();
                // The loop ends when the model is dropped. Models left at exit are dropped
                // during interpreter finalization, when taking the GIL back would make
                // CPython end this thread from inside Rust frames: it parks instead, and
                // ends with the process.
                // SAFETY: Py_IsInitialized only reads the runtime's state.
                if unsafe { pyo3::ffi::Py_IsInitialized() } == 0 {
                    loop {
                        std::thread::park();
                    }
                }
            })
        })
    })
}

impl PyModel {
    fn batcher(&self) -> PyResult<&Batcher> {
        let started = self.batcher.get_or_init(|| {
            let delivery = Box::new(|deliver: &mut dyn FnMut()| Python::attach(|_py| deliver()));
            Batcher::start_in(
                Arc::clone(&self.inner),
                self.max_batch,
                delivery,
                batcher_thread_scope(),
            )
            .map_err(|e| e.to_string())
        });
        started
            .as_ref()
            .map_err(|e| PyRuntimeError::new_err(e.clone()))
    }

    fn check_ids(&self, ids: &[u32]) -> PyResult<()> {
        let n = self.inner.tokenizer.n_vocab();
        match ids.iter().find(|&&id| id as usize >= n) {
            Some(bad) => Err(PyValueError::new_err(format!(
                "token_ids: token id {bad} is outside the vocabulary of {n} tokens"
            ))),
            None => Ok(()),
        }
    }
}

/// Hands one generation's events to its Python callback, on the batcher thread inside
/// its once-per-step GIL section.
struct PySink {
    /// Taken when the generation finishes: nothing of Python is held after that.
    on_event: Option<Py<PyAny>>,
    finished: Arc<Finished>,
}

impl PySink {
    fn deliver(&self, kind: &str, make: impl FnOnce(Python<'_>) -> PyResult<Py<PyAny>>) -> bool {
        let Some(on_event) = &self.on_event else {
            return false;
        };
        Python::attach(|py| {
            match make(py).and_then(|payload| on_event.call1(py, (kind, payload))) {
                Ok(_) => true,
                Err(err) => {
                    // The consumer is gone (closed event loop, raising callback): stop quietly.
                    log::debug!("generation event callback failed: {err}");
                    false
                }
            }
        })
    }

    /// Lets go of the callback while attached, then reports the generation finished.
    fn release(&mut self) {
        if let Some(on_event) = self.on_event.take() {
            Python::attach(move |_py| drop(on_event));
        }
        self.finished.set();
    }
}

impl TokenSink for PySink {
    fn token(&mut self, token: GeneratedToken) -> bool {
        self.deliver("token", |py| token_event(py, token))
    }

    fn finish(&mut self, result: crate::Result<Outcome>) {
        match result {
            Ok(outcome) => self.deliver("done", |py| outcome_event(py, &outcome)),
            Err(err) => self.deliver("error", |py| Ok(PyErr::from(err).into_value(py).into_any())),
        };
        self.release();
    }
}

impl Drop for PySink {
    /// Only reached with the callback still held if the batcher thread died: the consumer
    /// still gets its one final event instead of waiting forever.
    fn drop(&mut self) {
        if self.on_event.is_some() {
            self.finish(Err(EngineError::Internal(
                "the batcher thread stopped before this generation finished".into(),
            )));
        }
    }
}

/// The seed of the `call_index`-th call of a sampler created with `initial_seed`.
#[pyfunction(name = "derive_call_seed")]
fn py_derive_call_seed(initial_seed: u64, call_index: u64) -> u64 {
    derive_call_seed(initial_seed, call_index)
}

/// Arrays longer than this are summarised in `inspect_gguf` (a vocabulary has 262k entries).
const MAX_LISTED_ARRAY: usize = 64;

fn array_to_py(py: Python<'_>, array: &MetadataArray) -> PyResult<Py<PyAny>> {
    fn list<T: Clone + for<'a> IntoPyObject<'a>>(py: Python<'_>, v: &[T]) -> PyResult<Py<PyAny>> {
        if v.len() > MAX_LISTED_ARRAY {
            return format!("<array of {} values>", v.len()).into_py_any(py);
        }
        PyList::new(py, v.iter().cloned())?.into_py_any(py)
    }
    match array {
        MetadataArray::U8(v) => list(py, v),
        MetadataArray::I8(v) => list(py, v),
        MetadataArray::U16(v) => list(py, v),
        MetadataArray::I16(v) => list(py, v),
        MetadataArray::U32(v) => list(py, v),
        MetadataArray::I32(v) => list(py, v),
        MetadataArray::U64(v) => list(py, v),
        MetadataArray::I64(v) => list(py, v),
        MetadataArray::F32(v) => list(py, v),
        MetadataArray::F64(v) => list(py, v),
        MetadataArray::Bool(v) => list(py, v),
        MetadataArray::String(v) => list(py, v),
        MetadataArray::Array(v) => {
            if v.len() > MAX_LISTED_ARRAY {
                return format!("<array of {} arrays>", v.len()).into_py_any(py);
            }
            let items = v
                .iter()
                .map(|a| array_to_py(py, a))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_py_any(py)
        }
    }
}

fn value_to_py(py: Python<'_>, value: &MetadataValue) -> PyResult<Py<PyAny>> {
    match value {
        MetadataValue::U8(v) => v.into_py_any(py),
        MetadataValue::I8(v) => v.into_py_any(py),
        MetadataValue::U16(v) => v.into_py_any(py),
        MetadataValue::I16(v) => v.into_py_any(py),
        MetadataValue::U32(v) => v.into_py_any(py),
        MetadataValue::I32(v) => v.into_py_any(py),
        MetadataValue::U64(v) => v.into_py_any(py),
        MetadataValue::I64(v) => v.into_py_any(py),
        MetadataValue::F32(v) => v.into_py_any(py),
        MetadataValue::F64(v) => v.into_py_any(py),
        MetadataValue::Bool(v) => v.into_py_any(py),
        MetadataValue::String(v) => v.into_py_any(py),
        MetadataValue::Array(a) => array_to_py(py, a),
    }
}

/// Header, metadata and tensor table of a GGUF file, without loading a model.
#[pyfunction]
fn inspect_gguf<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let file = run_detached(py, move || GgufFile::open(&path))?;
    let out = PyDict::new(py);
    out.set_item("version", file.version())?;
    out.set_item("alignment", file.alignment())?;
    let md = PyDict::new(py);
    for key in file.metadata().keys() {
        if let Some(v) = file.metadata().get(key) {
            md.set_item(key, value_to_py(py, v)?)?;
        }
    }
    out.set_item("metadata", md)?;
    let tensors = PyList::empty(py);
    for t in file.tensors() {
        let d = PyDict::new(py);
        d.set_item("name", &t.name)?;
        d.set_item("type", t.ggml_type.name())?;
        d.set_item("dims", t.dims.clone())?;
        d.set_item("offset", t.offset)?;
        d.set_item("size_bytes", t.size_bytes)?;
        tensors.append(d)?;
    }
    out.set_item("tensors", tensors)?;
    Ok(out)
}

/// A tensor dequantised to float32, in numpy's axis order (GGUF dims reversed).
#[pyfunction]
fn read_tensor<'py>(py: Python<'py>, path: PathBuf, name: String) -> PyResult<Bound<'py, PyAny>> {
    let (values, dims) = run_detached(py, move || {
        let file = GgufFile::open(&path)?;
        let info = file
            .tensor(&name)
            .ok_or_else(|| EngineError::MissingTensor { name: name.clone() })?;
        let n = usize::try_from(info.n_elements).map_err(|_| {
            EngineError::invalid("name", format!("tensor {name} is too large to read"))
        })?;
        let mut out = vec![0.0f32; n];
        crate::quant::dequantize(info.ggml_type, file.tensor_data(info), &mut out)?;
        Ok((out, info.dims.clone()))
    })?;
    let shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
    Ok(PyArray1::from_vec(py, values).reshape(shape)?.into_any())
}

#[pymodule(gil_used = true)]
fn _engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // The gRPC protocol, compiled from the package's .proto files by build.rs.
    m.add(
        "PROTO_DESCRIPTOR_SET",
        PyBytes::new(
            m.py(),
            include_bytes!(concat!(env!("OUT_DIR"), "/protos.binpb")),
        ),
    )?;
    m.add_class::<PyModel>()?;
    m.add_class::<PyGeneration>()?;
    m.add_function(wrap_pyfunction!(py_derive_call_seed, m)?)?;
    m.add_function(wrap_pyfunction!(inspect_gguf, m)?)?;
    m.add_function(wrap_pyfunction!(read_tensor, m)?)?;
    m.add_class::<PyTokenizer>()?;
    m.add_function(wrap_pyfunction!(load_sentencepiece, m)?)?;
    m.add("ModelFormatError", m.py().get_type::<ModelFormatError>())?;
    m.add(
        "ContextOverflowError",
        m.py().get_type::<ContextOverflowError>(),
    )?;
    Ok(())
}

// ---- SentencePiece tokenizer files (.model) ---------------------------------------------------

/// A tokenizer read from a SentencePiece `.model` file; `encode` and `decode` give the ids
/// and text of the `sentencepiece` package.
#[pyclass(name = "Tokenizer", module = "sampler_sdk._engine", frozen)]
struct PyTokenizer {
    inner: Arc<Tokenizer>,
}

#[pymethods]
impl PyTokenizer {
    #[pyo3(signature = (text, add_special = false, parse_special = false))]
    fn encode(
        &self,
        py: Python<'_>,
        text: String,
        add_special: bool,
        parse_special: bool,
    ) -> PyResult<Vec<u32>> {
        let tokenizer = Arc::clone(&self.inner);
        run_detached(py, move || {
            Ok(tokenizer.encode(&text, add_special, parse_special))
        })
    }

    fn decode(&self, py: Python<'_>, token_ids: Vec<u32>) -> PyResult<String> {
        self.check_ids(&token_ids)?;
        let tokenizer = Arc::clone(&self.inner);
        let bytes = run_detached(py, move || Ok(tokenizer.decode(&token_ids, false)))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    #[pyo3(signature = (token_id, render_special = false))]
    fn token_bytes<'py>(
        &self,
        py: Python<'py>,
        token_id: u32,
        render_special: bool,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.check_ids(&[token_id])?;
        Ok(PyBytes::new(
            py,
            self.inner.token_bytes(token_id, render_special),
        ))
    }

    #[getter]
    fn n_vocab(&self) -> usize {
        self.inner.n_vocab()
    }
}

impl PyTokenizer {
    fn check_ids(&self, ids: &[u32]) -> PyResult<()> {
        let n = self.inner.n_vocab();
        match ids.iter().find(|&&id| id as usize >= n) {
            Some(id) => Err(EngineError::invalid(
                "token_ids",
                format!("token id {id} is out of range for a vocabulary of {n}"),
            )
            .into()),
            None => Ok(()),
        }
    }
}

/// Reads a SentencePiece `.model` file.
#[pyfunction]
fn load_sentencepiece(py: Python<'_>, path: PathBuf) -> PyResult<PyTokenizer> {
    let tokenizer = run_detached(py, move || Tokenizer::from_sentencepiece_file(&path))?;
    Ok(PyTokenizer {
        inner: Arc::new(tokenizer),
    })
}
