//! Token sampling: greedy at temperature 0, else temperature → top-k → top-p → min-p
//! over the softmax, after a repetition penalty over a window of recent tokens.
//! A seeded sampler is deterministic: same seed and same logits give the same tokens.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means off.
    pub top_k: usize,
    /// 1.0 means off.
    pub top_p: f32,
    /// 0 means off.
    pub min_p: f32,
    /// 1.0 means off. >1 discourages tokens seen in the last `repeat_window` tokens.
    pub repetition_penalty: f32,
    pub repeat_window: usize,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repeat_window: 64,
            seed: None,
        }
    }
}

pub struct Sampler {
    p: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(p: SamplingParams) -> Self {
        let rng = match p.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self { p, rng }
    }

    /// Whether [`Self::sample`] is a plain argmax of the raw logits (greedy, no penalty):
    /// then the device may pick the token itself.
    pub fn is_greedy(&self) -> bool {
        self.p.temperature <= 0.0 && (self.p.repetition_penalty == 1.0 || self.p.repeat_window == 0)
    }

    /// Picks the next token from `logits` given the tokens so far (prompt + output).
    /// Returns the token and its log-probability under the sampling distribution
    /// (under the plain softmax when greedy).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> (u32, f32) {
        let mut l = logits.to_vec();
        if self.p.repetition_penalty != 1.0 && self.p.repeat_window > 0 {
            let start = history.len().saturating_sub(self.p.repeat_window);
            let mut seen = std::collections::HashSet::new();
            for &t in &history[start..] {
                if seen.insert(t) {
                    if let Some(x) = l.get_mut(t as usize) {
                        *x = if *x > 0.0 {
                            *x / self.p.repetition_penalty
                        } else {
                            *x * self.p.repetition_penalty
                        };
                    }
                }
            }
        }
        if self.p.temperature <= 0.0 {
            let (best, _) =
                l.iter()
                    .enumerate()
                    .fold((0usize, f32::NEG_INFINITY), |acc, (i, &x)| {
                        if x > acc.1 {
                            (i, x)
                        } else {
                            acc
                        }
                    });
            return (best as u32, log_softmax_at(&l, best));
        }
        let inv_t = 1.0 / self.p.temperature;
        let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut cands: Vec<(u32, f32)> = l
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as u32, ((x - max) * inv_t).exp()))
            .filter(|(_, p)| *p > 0.0)
            .collect();
        let k = self.p.top_k;
        if k > 0 && k < cands.len() {
            cands.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            cands.truncate(k);
        }
        cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f32 = cands.iter().map(|c| c.1).sum();
        if self.p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = cands.len();
            for (i, c) in cands.iter().enumerate() {
                cum += c.1 / total;
                if cum >= self.p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep.max(1));
        }
        if self.p.min_p > 0.0 {
            let top = cands[0].1;
            cands.retain(|c| c.1 >= self.p.min_p * top);
        }
        let total: f32 = cands.iter().map(|c| c.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        let mut pick = cands[cands.len() - 1];
        for c in &cands {
            r -= c.1;
            if r <= 0.0 {
                pick = *c;
                break;
            }
        }
        (pick.0, (pick.1 / total).ln())
    }
}

fn log_softmax_at(l: &[f32], i: usize) -> f32 {
    let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = l.iter().map(|x| (x - max).exp()).sum();
    l[i] - max - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(p: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(p);
        let mut c = vec![0; logits.len()];
        for _ in 0..n {
            c[s.sample(logits, &[]).0 as usize] += 1;
        }
        c
    }

    fn seeded(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            seed: Some(7),
            ..Default::default()
        }
    }

    const L: [f32; 5] = [2.0, 1.5, 1.0, 0.0, -1.0];

    #[test]
    fn greedy_is_argmax_with_logprob() {
        let mut s = Sampler::new(SamplingParams::default());
        let (t, lp) = s.sample(&L, &[]);
        assert_eq!(t, 0);
        assert!(lp < 0.0 && lp > -2.0);
    }

    #[test]
    fn temperature_spreads_or_sharpens() {
        let cold = counts(seeded(0.2), &L, 2000);
        let hot = counts(seeded(5.0), &L, 2000);
        assert!(cold[0] > 1800, "{cold:?}");
        assert!(hot[4] > 150 && hot[0] < 800, "{hot:?}");
    }

    #[test]
    fn top_k_limits_candidates() {
        let c = counts(
            SamplingParams {
                top_k: 2,
                ..seeded(5.0)
            },
            &L,
            2000,
        );
        assert!(
            c[2] == 0 && c[3] == 0 && c[4] == 0 && c[0] > 0 && c[1] > 0,
            "{c:?}"
        );
    }

    #[test]
    fn top_p_cuts_the_tail() {
        // at T=1: p ≈ [0.43, 0.26, 0.16, 0.06, 0.02]; top_p 0.6 keeps the first two
        let c = counts(
            SamplingParams {
                top_p: 0.6,
                ..seeded(1.0)
            },
            &L,
            2000,
        );
        assert!(c[2] == 0 && c[3] == 0 && c[0] > 0 && c[1] > 0, "{c:?}");
    }

    #[test]
    fn min_p_drops_unlikely() {
        // min_p 0.3 keeps p >= 0.3 * 0.43 = 0.13: tokens 0..=2
        let c = counts(
            SamplingParams {
                min_p: 0.3,
                ..seeded(1.0)
            },
            &L,
            2000,
        );
        assert!(c[3] == 0 && c[4] == 0 && c[2] > 0, "{c:?}");
    }

    #[test]
    fn repetition_penalty_discourages_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 10.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&L, &[0]).0, 1);
        // outside the window the penalty no longer applies
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 10.0,
            repeat_window: 1,
            ..Default::default()
        });
        assert_eq!(s.sample(&L, &[0, 3]).0, 0);
    }

    #[test]
    fn same_seed_same_tokens() {
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                ..seeded(1.0)
            });
            (0..50).map(|_| s.sample(&L, &[]).0).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }
}
