//! Phi-3 through Candle's quantized model. Its KV cache lives inside the model, so it
//! serves one sequence at a time (the scheduler sees `max_batch() == 1`).

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_phi3::ModelWeights;

use crate::error::Result;

pub struct Phi3 {
    w: ModelWeights,
    device: Device,
    kv_bytes_per_token: usize,
}

impl Phi3 {
    pub fn load<R: std::io::Read + std::io::Seek>(
        ct: Content,
        r: &mut R,
        device: &Device,
    ) -> Result<Self> {
        let get = |k: &str| {
            ct.metadata
                .get(k)
                .and_then(|v| v.to_u32().ok())
                .unwrap_or(0) as usize
        };
        let (layers, hidden, heads, kv) = (
            get("phi3.block_count"),
            get("phi3.embedding_length"),
            get("phi3.attention.head_count").max(1),
            get("phi3.attention.head_count_kv"),
        );
        let kv_bytes_per_token = 2 * layers * (hidden / heads) * kv.max(1) * 4;
        Ok(Self {
            w: ModelWeights::from_gguf(false, ct, r, device)?,
            device: device.clone(),
            kv_bytes_per_token,
        })
    }

    pub fn kv_bytes_per_token(&self) -> usize {
        self.kv_bytes_per_token
    }

    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Tensor> {
        let x = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let logits = self.w.forward(&x, pos)?;
        Ok(logits.to_dtype(candle_core::DType::F32)?.reshape((1, ()))?)
    }
}
