//! Tokenizers: `tokenizer.json` through the `tokenizers` crate when there is one, else
//! built from the GGUF's embedded vocabulary (`tokenizer.ggml.*`):
//! - `gpt2` (byte-level BPE: SmolLM2, Qwen, Llama 3): a `tokenizer.json` is assembled in
//!   memory from tokens + merges + the pre-tokenizer regex llama.cpp uses for
//!   `tokenizer.ggml.pre`, and loaded by the `tokenizers` crate;
//! - `llama` (SentencePiece: Llama 2, Gemma): [`Spm`], llama.cpp's algorithm (merge the
//!   adjacent pair with the best score, byte fallback), since no `tokenizers` model
//!   reproduces it from scores alone.
//!
//! [`StreamDecoder`] turns token ids into text deltas that never split a UTF-8 character.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::json;

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

/// A model's tokenizer plus the special tokens generation needs.
pub struct Tokenizer {
    inner: Inner,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Tokens that end generation: EOS plus end-of-turn tokens (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, ...).
    pub stop_ids: Vec<u32>,
    pub add_bos: bool,
    /// The GGUF's `tokenizer.chat_template` or `tokenizer_config.json`'s `chat_template`.
    pub chat_template: Option<String>,
}

enum Inner {
    Hf(Box<tokenizers::Tokenizer>),
    Spm(Box<Spm>),
}

/// Text of tokens that end a turn in common chat formats.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|end|>",
    "</s>",
    "<|end_of_text|>",
];

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// For a GGUF: `<stem>.tokenizer.json` beside the file when present, else the
    /// embedded vocabulary. Special ids and the chat template come from the GGUF.
    pub fn from_gguf_or_sidecar(g: &GgufFile, path: &Path) -> Result<Self> {
        let stem = path
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let stem = stem.strip_suffix(".gguf").unwrap_or(&stem).to_string();
        let sidecar = path.with_file_name(format!("{stem}.tokenizer.json"));
        let inner = if sidecar.exists() {
            Inner::Hf(Box::new(
                tokenizers::Tokenizer::from_file(&sidecar).map_err(tok_err)?,
            ))
        } else {
            build_from_gguf(g)?
        };
        Ok(Self::with_gguf_specials(inner, g))
    }

    /// Only the GGUF's embedded vocabulary, even when a sidecar `tokenizer.json` exists.
    pub fn from_gguf_embedded(g: &GgufFile) -> Result<Self> {
        Ok(Self::with_gguf_specials(build_from_gguf(g)?, g))
    }

    fn with_gguf_specials(inner: Inner, g: &GgufFile) -> Self {
        let bos_id = g.get_u64("tokenizer.ggml.bos_token_id").map(|x| x as u32);
        let eos_id = g.get_u64("tokenizer.ggml.eos_token_id").map(|x| x as u32);
        let add_bos = g.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
        let mut t = Self {
            inner,
            bos_id,
            eos_id,
            stop_ids: vec![],
            add_bos,
            chat_template: g.get_str("tokenizer.chat_template"),
        };
        if let Some(e) = g.get_u64("tokenizer.ggml.eot_token_id") {
            t.stop_ids.push(e as u32);
        }
        t.finish_stop_ids();
        t
    }

    /// For a SafeTensors folder: `tokenizer.json`, with `tokenizer_config.json` (chat
    /// template, bos/eos) and `generation_config.json` (eos ids) when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Err(EngineError::MissingFile {
                path: dir.display().to_string(),
                what: "tokenizer.json".into(),
            });
        }
        let hf = tokenizers::Tokenizer::from_file(&tj).map_err(tok_err)?;
        let cfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(json!({}));
        let token_str = |v: &serde_json::Value| -> Option<String> {
            match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string),
                _ => None,
            }
        };
        let bos_id = cfg
            .get("bos_token")
            .and_then(token_str)
            .and_then(|s| hf.token_to_id(&s));
        let eos_id = cfg
            .get("eos_token")
            .and_then(token_str)
            .and_then(|s| hf.token_to_id(&s));
        let mut stop_ids = vec![];
        if let Ok(s) = std::fs::read_to_string(dir.join("generation_config.json")) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&s) {
                match v.get("eos_token_id") {
                    Some(serde_json::Value::Number(n)) => {
                        stop_ids.extend(n.as_u64().map(|x| x as u32))
                    }
                    Some(serde_json::Value::Array(a)) => {
                        stop_ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                    }
                    _ => {}
                }
            }
        }
        let mut t = Self {
            inner: Inner::Hf(Box::new(hf)),
            bos_id,
            eos_id,
            stop_ids,
            add_bos: cfg
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            chat_template: cfg
                .get("chat_template")
                .and_then(|v| v.as_str())
                .map(str::to_string),
        };
        t.finish_stop_ids();
        Ok(t)
    }

    fn finish_stop_ids(&mut self) {
        if let Some(e) = self.eos_id {
            self.stop_ids.push(e);
        }
        for s in END_OF_TURN {
            if let Some(id) = self.token_to_id(s) {
                self.stop_ids.push(id);
            }
        }
        self.stop_ids.sort_unstable();
        self.stop_ids.dedup();
    }

    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Hf(t) => t.get_vocab_size(true),
            Inner::Spm(s) => s.pieces.len(),
        }
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        match &self.inner {
            Inner::Hf(t) => t.token_to_id(s),
            Inner::Spm(p) => p.map.get(s).copied(),
        }
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.inner {
            Inner::Hf(t) => t.id_to_token(id),
            Inner::Spm(p) => p.pieces.get(id as usize).cloned(),
        }
    }

    /// Text → ids. Special tokens written in the text (`<|im_start|>`) are recognised.
    /// With `add_special`, the BOS token is prepended when the model wants one.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let mut ids = match &self.inner {
            Inner::Hf(t) => t
                .encode(text, add_special)
                .map_err(tok_err)?
                .get_ids()
                .to_vec(),
            Inner::Spm(p) => p.encode(text),
        };
        if add_special && self.add_bos {
            if let Some(b) = self.bos_id {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
        }
        Ok(ids)
    }

    /// Ids → text, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.inner {
            Inner::Hf(t) => t.decode(ids, true).map_err(tok_err),
            Inner::Spm(p) => Ok(p.decode(ids)),
        }
    }

    /// The text of the BOS token, as chat templates want it.
    pub fn bos_text(&self) -> String {
        self.bos_id
            .and_then(|i| self.id_to_token(i))
            .unwrap_or_default()
    }

    pub fn eos_text(&self) -> String {
        self.eos_id
            .and_then(|i| self.id_to_token(i))
            .unwrap_or_default()
    }
}

/// Incremental detokenizer: feed ids one by one, get text pieces that concatenate to
/// `decode(all ids)` and never end inside a UTF-8 character.
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl StreamDecoder {
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let after = tok.decode(&self.ids[self.prefix..])?;
        if after.len() > before.len()
            && !after.ends_with('\u{FFFD}')
            && after.is_char_boundary(before.len())
        {
            let delta = after[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }
}

fn gguf_strings(g: &GgufFile, key: &str) -> Result<Vec<String>> {
    let v = g
        .get(key)
        .ok_or_else(|| EngineError::Tokenizer(format!("{}: metadata {key} is missing", g.path)))?;
    let arr = v.to_vec().map_err(tok_err)?;
    arr.iter()
        .map(|x| x.to_string().cloned().map_err(tok_err))
        .collect()
}

fn gguf_numbers(g: &GgufFile, key: &str) -> Vec<f64> {
    g.get(key)
        .and_then(|v| v.to_vec().ok())
        .map(|a| {
            a.iter()
                .map(|x| match x {
                    Value::F32(f) => *f as f64,
                    Value::F64(f) => *f,
                    other => crate::gguf::value_as_u64(other)
                        .map(|u| u as f64)
                        .unwrap_or_else(|| match other {
                            Value::I32(i) => *i as f64,
                            _ => 0.0,
                        }),
                })
                .collect()
        })
        .unwrap_or_default()
}

// llama.cpp token types
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre` (llama-vocab.cpp).
fn pre_tokenizer_for(pre: &str) -> serde_json::Value {
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let split = |re: &str| json!({"type":"Split","pattern":{"Regex":re},"behavior":"Isolated","invert":false});
    let bytelevel =
        json!({"type":"ByteLevel","add_prefix_space":false,"trim_offsets":false,"use_regex":false});
    let seq = |mut v: Vec<serde_json::Value>| {
        v.push(bytelevel.clone());
        json!({"type":"Sequence","pretokenizers":v})
    };
    match pre {
        "qwen2" | "deepseek-r1-qwen" => seq(vec![split(QWEN2)]),
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" => seq(vec![split(LLAMA3)]),
        "smollm" => seq(vec![split(r"\p{N}"), split(GPT2)]),
        _ => seq(vec![split(GPT2)]),
    }
}

/// A byte-level BPE `tokenizer.json` document from a vocabulary, token types and merges.
pub fn gpt2_tokenizer_json(
    tokens: &[String],
    types: &[i64],
    merges: &[String],
    pre: &str,
) -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            matches!(
                types.get(*i),
                Some(&TYPE_CONTROL) | Some(&TYPE_USER_DEFINED)
            )
        })
        .map(|(i, t)| {
            json!({"id":i,"content":t,"single_word":false,"lstrip":false,"rstrip":false,
                   "normalized":false,"special":true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer_for(pre),
        "post_processor": null,
        "decoder": {"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true},
        "model": {"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,
                  "end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,
                  "ignore_merges":false,"vocab":vocab,"merges":merges}
    })
}

fn build_from_gguf(g: &GgufFile) -> Result<Inner> {
    let model = g.get_str("tokenizer.ggml.model").unwrap_or_default();
    let tokens = gguf_strings(g, "tokenizer.ggml.tokens")?;
    let types: Vec<i64> = gguf_numbers(g, "tokenizer.ggml.token_type")
        .into_iter()
        .map(|x| x as i64)
        .collect();
    match model.as_str() {
        "gpt2" => {
            let merges = gguf_strings(g, "tokenizer.ggml.merges")?;
            let pre = g
                .get_str("tokenizer.ggml.pre")
                .unwrap_or_else(|| "default".into());
            let doc = gpt2_tokenizer_json(&tokens, &types, &merges, &pre);
            let bytes = serde_json::to_vec(&doc).map_err(tok_err)?;
            Ok(Inner::Hf(Box::new(
                tokenizers::Tokenizer::from_bytes(bytes).map_err(tok_err)?,
            )))
        }
        "llama" => {
            let scores: Vec<f32> = gguf_numbers(g, "tokenizer.ggml.scores")
                .into_iter()
                .map(|x| x as f32)
                .collect();
            let add_space_prefix = g
                .get_bool("tokenizer.ggml.add_space_prefix")
                .unwrap_or(true);
            let spm = Spm::new(tokens, scores, types, add_space_prefix);
            Ok(Inner::Spm(Box::new(spm)))
        }
        other => Err(EngineError::Tokenizer(format!(
            "{}: tokenizer.ggml.model '{other}' is not supported (gpt2, llama)",
            g.path
        ))),
    }
}

/// SentencePiece tokenization as llama.cpp does it for `tokenizer.ggml.model = llama`.
pub struct Spm {
    pieces: Vec<String>,
    scores: Vec<f32>,
    map: HashMap<String, u32>,
    bytes: [Option<u32>; 256],
    /// Control and user-defined tokens, matched literally in the input (longest first).
    specials: Vec<(String, u32)>,
    special_ids: Vec<bool>,
    add_space_prefix: bool,
}

impl Spm {
    pub fn new(
        pieces: Vec<String>,
        scores: Vec<f32>,
        types: Vec<i64>,
        add_space_prefix: bool,
    ) -> Self {
        let map: HashMap<String, u32> = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), i as u32))
            .collect();
        let mut bytes = [None; 256];
        for (b, slot) in bytes.iter_mut().enumerate() {
            *slot = map.get(&format!("<0x{b:02X}>")).copied();
        }
        let mut specials: Vec<(String, u32)> = pieces
            .iter()
            .enumerate()
            .filter(|(i, p)| {
                !p.is_empty()
                    && matches!(
                        types.get(*i),
                        Some(&TYPE_CONTROL) | Some(&TYPE_USER_DEFINED)
                    )
            })
            .map(|(i, p)| (p.clone(), i as u32))
            .collect();
        specials.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        let special_ids = (0..pieces.len())
            .map(|i| matches!(types.get(i), Some(&TYPE_CONTROL)))
            .collect();
        Self {
            pieces,
            scores,
            map,
            bytes,
            specials,
            special_ids,
            add_space_prefix,
        }
    }

    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        let mut first = true;
        while !rest.is_empty() {
            // the earliest special token in the rest of the text
            let hit = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|pos| (pos, s.len(), *id)))
                .min_by_key(|&(pos, len, _)| (pos, std::cmp::Reverse(len)));
            let (plain, special) = match hit {
                Some((pos, len, id)) => (&rest[..pos], Some((len, id, pos))),
                None => (rest, None),
            };
            if !plain.is_empty() {
                self.encode_plain(plain, first, &mut out);
            }
            first = false;
            match special {
                Some((len, id, pos)) => {
                    out.push(id);
                    rest = &rest[pos + len..];
                }
                None => break,
            }
        }
        out
    }

    fn encode_plain(&self, text: &str, first: bool, out: &mut Vec<u32>) {
        let mut s = String::with_capacity(text.len() + 3);
        if first && self.add_space_prefix {
            s.push('\u{2581}');
        }
        s.push_str(&text.replace(' ', "\u{2581}"));
        let mut syms: Vec<String> = s.chars().map(|c| c.to_string()).collect();
        loop {
            let mut best: Option<(f32, usize)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                let cat = format!("{}{}", syms[i], syms[i + 1]);
                if let Some(&id) = self.map.get(&cat) {
                    let sc = self.scores.get(id as usize).copied().unwrap_or(0.0);
                    if best.is_none_or(|(b, _)| sc > b) {
                        best = Some((sc, i));
                    }
                }
            }
            let Some((_, i)) = best else { break };
            let next = syms.remove(i + 1);
            syms[i].push_str(&next);
        }
        for sym in syms {
            match self.map.get(&sym) {
                Some(&id) => out.push(id),
                None => {
                    for b in sym.bytes() {
                        if let Some(id) = self.bytes[b as usize] {
                            out.push(id);
                        }
                    }
                }
            }
        }
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let i = id as usize;
            if self.special_ids.get(i).copied().unwrap_or(false) {
                continue;
            }
            let Some(p) = self.pieces.get(i) else {
                continue;
            };
            if p.len() == 6 && p.starts_with("<0x") && p.ends_with('>') {
                if let Ok(b) = u8::from_str_radix(&p[3..5], 16) {
                    bytes.push(b);
                    continue;
                }
            }
            bytes.extend_from_slice(p.replace('\u{2581}', " ").as_bytes());
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spm() -> Spm {
        let pieces: Vec<String> = [
            "<unk>",
            "<s>",
            "\u{2581}",
            "a",
            "b",
            "\u{2581}a",
            "ab",
            "\u{2581}ab",
            "<0xC3>",
            "<0xA9>",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let scores = vec![0.0, 0.0, -1.0, -1.0, -1.0, -2.0, -3.0, -0.5, 0.0, 0.0];
        let types = vec![2, 3, 1, 1, 1, 1, 1, 1, 6, 6];
        Spm::new(pieces, scores, types, true)
    }

    #[test]
    fn spm_merges_by_score_and_falls_back_to_bytes() {
        let s = spm();
        // "▁ab": ▁+a (-2) vs a+b (-3) → ▁a first, then ▁a+b = ▁ab (-0.5)
        assert_eq!(s.encode("ab"), vec![7]);
        // é is not in the vocabulary: two byte tokens
        assert_eq!(s.encode("é"), vec![2, 8, 9]);
        assert_eq!(s.decode(&[7, 8, 9]), " abé");
        // a control token in the text is matched literally
        assert_eq!(s.encode("a<s>a"), vec![5, 1, 3]);
    }
}
