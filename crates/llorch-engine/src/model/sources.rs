//! Weight sources for [`super::family::FamilyModel`]: GGUF tensors (kept quantized) and
//! SafeTensors folders (HF names mapped onto GGUF's).

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::family::WeightSource;
use super::Progress;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

pub struct GgufSource<'a> {
    g: &'a GgufFile,
    reader: &'a mut BufReader<File>,
    device: Device,
    done: usize,
    total: usize,
    progress: Progress<'a>,
}

impl<'a> GgufSource<'a> {
    pub fn new(
        g: &'a GgufFile,
        reader: &'a mut BufReader<File>,
        device: &Device,
        total: usize,
        progress: Progress<'a>,
    ) -> Self {
        Self {
            g,
            reader,
            device: device.clone(),
            done: 0,
            total,
            progress,
        }
    }
}

impl WeightSource for GgufSource<'_> {
    fn matrix(&mut self, name: &str) -> Result<Arc<QTensor>> {
        if !self.has(name) {
            return Err(EngineError::BadModelFile {
                path: self.g.path.clone(),
                reason: format!("tensor {name} is missing"),
            });
        }
        let t = self
            .g
            .content
            .tensor(self.reader, name, &self.device)
            .map_err(|e| EngineError::BadModelFile {
                path: self.g.path.clone(),
                reason: format!("tensor {name}: {e}"),
            })?;
        self.done += 1;
        (self.progress)(self.done, self.total);
        Ok(Arc::new(requant(t)?))
    }

    fn vector(&mut self, name: &str, dtype: DType) -> Result<Tensor> {
        let q = self.matrix(name)?;
        Ok(q.dequantize(&self.device)?.to_dtype(dtype)?)
    }

    fn has(&self, name: &str) -> bool {
        self.g.content.tensor_infos.contains_key(name)
    }

    fn dense(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
        if !DEQUANTIZE.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let q = self.matrix(name)?;
        Ok(Some(q.dequantize(&self.device)?.to_dtype(dtype)?))
    }
}

static DEQUANTIZE: AtomicBool = AtomicBool::new(false);

/// Load GGUF matrices dequantized (dense, in the compute dtype) instead of quantized.
/// A numerics aid for `llorch check --dequantize`: the same weights without activation
/// quantization in the matmuls, so two devices can be compared on identical math and
/// each quantized kernel against the exact product. Costs 4 bytes per weight in f32.
pub fn set_dequantize(on: bool) {
    DEQUANTIZE.store(on, Ordering::Relaxed);
}

pub fn dequantize_enabled() -> bool {
    DEQUANTIZE.load(Ordering::Relaxed)
}

/// `LLORCH_REQUANT=q8_0`: re-quantize Q4_0/Q4_1/Q5_0/Q5_1 matrices to Q8_0 at load.
/// Candle's CPU kernels for those legacy types are scalar-ish (3-4 GB/s of weights here),
/// while Q8_0 runs on its AVX-512 VNNI repacked path; the price is memory (8.5 bits per
/// weight instead of 4.5-5.5) and a second rounding of every weight.
fn requant(t: QTensor) -> Result<QTensor> {
    use candle_core::quantized::GgmlDType as G;
    let want = std::env::var("LLORCH_REQUANT").unwrap_or_default();
    if want != "q8_0" {
        return Ok(t);
    }
    match t.dtype() {
        G::Q4_0 | G::Q4_1 | G::Q5_0 | G::Q5_1
            if t.shape().dims().last().is_some_and(|k| k % 32 == 0) =>
        {
            let dev = t.device();
            let f = t.dequantize(&dev)?;
            Ok(QTensor::quantize(&f, G::Q8_0)?)
        }
        _ => Ok(t),
    }
}

pub struct SafetensorsSource<'a> {
    st: MmapedSafetensors,
    path: String,
    device: Device,
    done: usize,
    total: usize,
    progress: Progress<'a>,
}

impl<'a> SafetensorsSource<'a> {
    pub fn open(files: &[PathBuf], device: &Device, progress: Progress<'a>) -> Result<Self> {
        let path = files[0]
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        // SAFETY: the files are memory-mapped read-only; like every mmap-based loader we
        // assume they are not modified while the model is loaded.
        let st =
            unsafe { MmapedSafetensors::multi(files) }.map_err(|e| EngineError::BadModelFile {
                path: path.clone(),
                reason: format!("cannot read safetensors: {e}"),
            })?;
        let total = st.tensors().len();
        Ok(Self {
            st,
            path,
            device: device.clone(),
            done: 0,
            total,
            progress,
        })
    }

    /// The dtype of the weights (that of the embedding table).
    pub fn dtype(&self) -> DType {
        self.st
            .get("model.embed_tokens.weight")
            .ok()
            .and_then(|v| DType::try_from(v.dtype()).ok())
            .unwrap_or(DType::F32)
    }

    pub fn parameter_count(&self) -> u64 {
        self.st
            .tensors()
            .iter()
            .map(|(_, v)| v.shape().iter().product::<usize>() as u64)
            .sum()
    }

    fn load(&mut self, gguf_name: &str, dtype: DType) -> Result<Tensor> {
        let name = hf_name(gguf_name);
        let t = self
            .st
            .load(&name, &self.device)
            .map_err(|e| EngineError::BadModelFile {
                path: self.path.clone(),
                reason: format!("tensor {name}: {e}"),
            })?;
        self.done += 1;
        (self.progress)(self.done, self.total);
        Ok(t.to_dtype(dtype)?)
    }
}

impl WeightSource for SafetensorsSource<'_> {
    fn matrix(&mut self, name: &str) -> Result<Arc<QTensor>> {
        let t = self.load(name, DType::F32)?;
        Ok(Arc::new(QTensor::quantize(
            &t,
            candle_core::quantized::GgmlDType::F32,
        )?))
    }

    fn vector(&mut self, name: &str, dtype: DType) -> Result<Tensor> {
        self.load(name, dtype)
    }

    fn has(&self, name: &str) -> bool {
        self.st.get(&hf_name(name)).is_ok()
    }

    fn dense(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
        Ok(Some(self.load(name, dtype)?))
    }
}

/// GGUF tensor name → HF transformers name.
pub fn hf_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return gguf.to_string();
    };
    let mut parts = rest.splitn(3, '.');
    let (Some(i), Some(what), Some(kind)) = (parts.next(), parts.next(), parts.next()) else {
        return gguf.to_string();
    };
    let hf = match what {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        other => return format!("model.layers.{i}.{other}.{kind}"),
    };
    format!("model.layers.{i}.{hf}.{kind}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map() {
        assert_eq!(
            hf_name("blk.3.attn_q.bias"),
            "model.layers.3.self_attn.q_proj.bias"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight"),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(hf_name("output.weight"), "lm_head.weight");
    }
}
