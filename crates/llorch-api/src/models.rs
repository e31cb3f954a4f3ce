//! The names of the models llorch knows, shared by the engine (fetch, `--model NAME`) and
//! pool-managerd (matching a request's `model` to a pool). How to fetch them lives in
//! `llorch_engine::catalog`.

pub struct ModelName {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    /// The file in the models directory.
    pub file: &'static str,
}

pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

pub const MODEL_NAMES: &[ModelName] = &[
    ModelName {
        name: "smollm2-135m-instruct",
        aliases: &["smollm2", "default"],
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    ModelName {
        name: "qwen2.5-coder-0.5b-instruct",
        aliases: &["qwen2.5-coder-0.5b", "qwen"],
        file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    },
    ModelName {
        name: "gemma-3-270m",
        aliases: &["gemma3"],
        file: "gemma-3-270m-q4_k_m.gguf",
    },
];

/// The known model a name, alias, file name or model id (file name without `.gguf`) refers to.
pub fn find(name: &str) -> Option<&'static ModelName> {
    let n = name.to_ascii_lowercase();
    let n = n.rsplit('/').next().unwrap_or(&n);
    MODEL_NAMES.iter().find(|m| {
        let file = m.file.to_ascii_lowercase();
        m.name == n || m.aliases.contains(&n) || file == n || file.strip_suffix(".gguf") == Some(n)
    })
}

/// Whether two model references name the same known model.
pub fn same_model(a: &str, b: &str) -> bool {
    matches!((find(a), find(b)), (Some(x), Some(y)) if x.name == y.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve() {
        assert_eq!(find("default").unwrap().name, DEFAULT_MODEL);
        assert_eq!(
            find("SmolLM2-135M-Instruct.Q4_1").unwrap().name,
            DEFAULT_MODEL
        );
        assert_eq!(
            find("/m/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
                .unwrap()
                .name,
            "qwen2.5-coder-0.5b-instruct"
        );
        assert!(find("gpt-5").is_none());
        assert!(same_model("default", "smollm2-135m-instruct"));
        assert!(!same_model("default", "qwen"));
        assert!(!same_model("x", "x"));
    }
}
