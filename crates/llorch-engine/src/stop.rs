//! Stop sequences over streamed text. Text that could be the start of a stop sequence
//! is held back until it is known not to be, so a stop string is never emitted, not even
//! partly, whatever the token boundaries.

pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

pub enum StopOutcome {
    /// Text safe to emit now (may be empty).
    Continue(String),
    /// A stop sequence matched: emit this text, then end.
    Stopped { text: String, matched: String },
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, delta: &str) -> StopOutcome {
        self.pending.push_str(delta);
        if self.stops.is_empty() {
            return StopOutcome::Continue(std::mem::take(&mut self.pending));
        }
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|i| (i, s)))
            .min_by_key(|(i, _)| *i);
        if let Some((i, s)) = first {
            let matched = s.clone();
            let text = self.pending[..i].to_string();
            self.pending.clear();
            return StopOutcome::Stopped { text, matched };
        }
        // keep the longest suffix that is a prefix of some stop string
        let mut keep = 0;
        for s in &self.stops {
            for (j, _) in self.pending.char_indices() {
                let suffix = &self.pending[j..];
                if suffix.len() > keep && s.starts_with(suffix) {
                    keep = suffix.len();
                    break;
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopOutcome::Continue(out)
    }

    /// Text still held back; emitted when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopOutcome::Continue(t) => out.push_str(&t),
                StopOutcome::Stopped { text, matched } => {
                    out.push_str(&text);
                    return (out, Some(matched));
                }
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn stop_across_token_boundaries_is_never_emitted() {
        assert_eq!(
            run(&["###"], &["a #", "#", "# b"]),
            ("a ".into(), Some("###".into()))
        );
        assert_eq!(
            run(&["\n\n"], &["x\n", "\ny"]),
            ("x".into(), Some("\n\n".into()))
        );
    }

    #[test]
    fn false_start_is_released() {
        assert_eq!(run(&["###"], &["a #", "#b", "c"]), ("a ##bc".into(), None));
    }

    #[test]
    fn held_text_waits_until_it_is_safe() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        match m.push("the E") {
            StopOutcome::Continue(t) => assert_eq!(t, "the "),
            _ => panic!(),
        }
        match m.push("N") {
            StopOutcome::Continue(t) => assert_eq!(t, ""),
            _ => panic!(),
        }
        match m.push("x") {
            StopOutcome::Continue(t) => assert_eq!(t, "ENx"),
            _ => panic!(),
        }
    }

    #[test]
    fn earliest_stop_wins_and_unicode_is_safe() {
        assert_eq!(run(&["b", "a"], &["xab"]), ("x".into(), Some("a".into())));
        assert_eq!(
            run(&["éz"], &["aé", "é", "zq"]),
            ("aé".into(), Some("éz".into()))
        );
    }
}
