//! Reading GGUF files safely: header, metadata and a bounds check of every tensor against
//! the file size, so a truncated or corrupt file is refused with a reason before any
//! weight is read.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

pub use candle_core::quantized::gguf_file::{Content, Value};

use crate::error::{EngineError, Result};

/// A GGUF file's parsed header, checked against the file's length.
pub struct GgufFile {
    pub content: Content,
    pub path: String,
    pub file_size: u64,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<(Self, BufReader<File>)> {
        let p = path.display().to_string();
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => EngineError::NotFound(p.clone()),
            _ => EngineError::Io(e),
        })?;
        let file_size = file.metadata()?.len();
        let mut reader = BufReader::new(file);
        let bad = |reason: String| EngineError::BadModelFile {
            path: p.clone(),
            reason,
        };
        let content =
            Content::read(&mut reader).map_err(|e| bad(format!("cannot read GGUF header: {e}")))?;
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if elems % block != 0 {
                return Err(bad(format!(
                    "tensor {name}: {elems} elements is not a multiple of the block size {block}"
                )));
            }
            let bytes = (elems / block * info.ggml_dtype.type_size()) as u64;
            let end = content.tensor_data_offset + info.offset + bytes;
            if end > file_size {
                return Err(bad(format!(
                    "truncated: tensor {name} ends at byte {end} but the file has {file_size} bytes"
                )));
            }
        }
        Ok((
            Self {
                content,
                path: p,
                file_size,
            },
            reader,
        ))
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn architecture(&self) -> Result<String> {
        self.get_str("general.architecture")
            .ok_or_else(|| EngineError::BadModelFile {
                path: self.path.clone(),
                reason: "metadata key general.architecture is missing".into(),
            })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Option<String> {
        self.get(key).and_then(|v| v.to_string().ok().cloned())
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(value_as_u64)
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(|v| match v {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            other => value_as_u64(other).map(|x| x as f64),
        })
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(|v| v.to_bool().ok())
    }

    /// A required architecture-scoped number, e.g. `llama.block_count`.
    pub fn req_u64(&self, key: &str) -> Result<u64> {
        self.get_u64(key).ok_or_else(|| EngineError::BadModelFile {
            path: self.path.clone(),
            reason: format!("metadata key {key} is missing or not a number"),
        })
    }

    /// Human-readable summary of the file's quantization (most common tensor type).
    pub fn quantization(&self) -> String {
        if let Some(ft) = self.get_u64("general.file_type") {
            if let Some(name) = file_type_name(ft) {
                return name.to_string();
            }
        }
        let mut counts: HashMap<String, usize> = HashMap::new();
        for info in self.content.tensor_infos.values() {
            if info.shape.rank() >= 2 {
                *counts.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
            }
        }
        counts
            .into_iter()
            .max_by_key(|(_, c)| *c)
            .map(|(k, _)| k)
            .unwrap_or_else(|| "unknown".into())
    }

    pub fn parameter_count(&self) -> u64 {
        self.content
            .tensor_infos
            .values()
            .map(|i| i.shape.elem_count() as u64)
            .sum()
    }
}

pub fn value_as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::U16(x) => Some(*x as u64),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::U32(x) => Some(*x as u64),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::U64(x) => Some(*x),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}

/// llama.cpp's `general.file_type` codes (LLAMA_FTYPE_*).
pub fn file_type_name(ft: u64) -> Option<&'static str> {
    Some(match ft {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}
