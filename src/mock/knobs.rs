//! Fault and timing knobs for the mock provider, written as `key=value` pairs separated
//! by `,` or `;` (e.g. `status=429,retry_after=2` or `ttft=200ms;chunks=8;cut_after=3`).

use std::time::Duration;

use crate::config::units::parse_duration;

#[derive(Debug, Clone, PartialEq)]
pub struct Knobs {
    /// Delay before the response headers.
    pub latency: Duration,
    /// Streams: delay between the role chunk and the first content chunk.
    pub ttft: Duration,
    /// Streams: delay between content chunks.
    pub gap: Duration,
    /// Streams: how many content chunks the answer is split into.
    pub chunks: usize,
    /// Answer with this error status (every call, or a share of calls with `error_rate`).
    pub status: Option<u16>,
    /// `Retry-After` value sent with error answers.
    pub retry_after: Option<String>,
    /// `error.code` of error answers (defaults to the usual code for the status).
    pub code: Option<String>,
    /// Share of calls (0..=1) that fail, spread evenly and deterministically.
    pub error_rate: f64,
    /// The first N calls fail (then the model recovers).
    pub fail_first: u64,
    /// Failing calls rotate through mixed faults (500, 429 with Retry-After, stall,
    /// reset, empty answer, stream cut before the first token) instead of `status`.
    pub mix: bool,
    /// Like `mix`, with only slow faults: a stall, or an answer 45 s late (past the
    /// default attempt timeout).
    pub mix_slow: bool,
    /// With `error_rate` (and `mix`): which calls fail, and with what, is drawn from
    /// this seed (failures cluster as real ones do) instead of being spread evenly.
    pub seed: Option<u64>,
    /// Answer 200 with no content and no tool calls.
    pub empty: bool,
    /// Answer 200 with a body that is not valid JSON.
    pub malformed: bool,
    /// Streams: drop the connection after this many content chunks.
    pub cut_after: Option<usize>,
    /// Never answer (until the client gives up).
    pub stall: bool,
    /// Close the connection without answering.
    pub reset: bool,
    /// The answer text; defaults to one naming the model.
    pub content: Option<String>,
    /// In OpenAI's words (stop, length, tool_calls, content_filter); each format maps it.
    pub finish_reason: Option<String>,
    /// Answer with a call to this tool (arguments `{"city":"Paris"}`).
    pub tool: Option<String>,
    /// Answer text even when the request offers tools (the mock calls the first
    /// offered tool otherwise).
    pub no_tools: bool,
    /// Embeddings: the vector size when the request does not set one.
    pub dims: Option<usize>,
    /// Gemini: block the prompt (no candidates, `promptFeedback.blockReason`); other
    /// formats answer empty with `content_filter`.
    pub blocked: bool,
    /// Streams: an in-stream error event after this many content chunks.
    pub error_event_after: Option<usize>,
    /// Prompt tokens reported as read from the provider's prompt cache.
    pub cached: u64,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            latency: Duration::ZERO,
            ttft: Duration::ZERO,
            gap: Duration::ZERO,
            chunks: 4,
            status: None,
            retry_after: None,
            code: None,
            error_rate: 0.0,
            fail_first: 0,
            mix: false,
            mix_slow: false,
            seed: None,
            empty: false,
            malformed: false,
            cut_after: None,
            stall: false,
            reset: false,
            content: None,
            finish_reason: None,
            tool: None,
            no_tools: false,
            dims: None,
            blocked: false,
            error_event_after: None,
            cached: 0,
        }
    }
}

/// One of the faults `mix` rotates through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Status500,
    RateLimited,
    Stall,
    Reset,
    Empty,
    CutBeforeFirstToken,
}

const MIX: [Fault; 6] = [
    Fault::Status500,
    Fault::RateLimited,
    Fault::Stall,
    Fault::Reset,
    Fault::Empty,
    Fault::CutBeforeFirstToken,
];

impl Knobs {
    /// The fault for failing call `index`, when `mix` is on.
    pub fn mixed_fault(&self, index: u64) -> Fault {
        let pick = match self.seed {
            Some(seed) => draw(seed ^ 0x5eed, index),
            None => index,
        };
        MIX[(pick % MIX.len() as u64) as usize]
    }

    pub fn parse(spec: &str) -> Result<Knobs, String> {
        let mut k = Knobs::default();
        for item in spec
            .split([',', ';'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            let num = |v: &str| {
                v.parse::<usize>()
                    .map_err(|_| format!("knob {key}: not a number: {v:?}"))
            };
            match key {
                "latency" => k.latency = parse_duration(value)?,
                "ttft" => k.ttft = parse_duration(value)?,
                "gap" => k.gap = parse_duration(value)?,
                "chunks" => k.chunks = num(value)?.max(1),
                "status" => {
                    k.status = Some(
                        u16::try_from(num(value)?)
                            .ok()
                            .filter(|s| (100..=599).contains(s))
                            .ok_or_else(|| format!("knob status: not an HTTP status: {value:?}"))?,
                    )
                }
                "retry_after" => k.retry_after = Some(value.to_string()),
                "code" => k.code = Some(value.to_string()),
                "error_rate" => {
                    k.error_rate = value
                        .parse::<f64>()
                        .ok()
                        .filter(|r| (0.0..=1.0).contains(r))
                        .ok_or_else(|| format!("knob error_rate: expected 0..=1, got {value:?}"))?
                }
                "fail_first" => k.fail_first = num(value)? as u64,
                "mix" => k.mix = true,
                "mix_slow" => k.mix_slow = true,
                "seed" => k.seed = Some(num(value)? as u64),
                "empty" => k.empty = true,
                "malformed" => k.malformed = true,
                "cut_after" => k.cut_after = Some(num(value)?),
                "stall" => k.stall = true,
                "reset" => k.reset = true,
                "content" => k.content = Some(value.to_string()),
                "finish_reason" => k.finish_reason = Some(value.to_string()),
                "tool" => k.tool = Some(value.to_string()),
                "no_tools" => k.no_tools = true,
                "dims" => k.dims = Some(num(value)?),
                "blocked" => k.blocked = true,
                "error_event_after" => k.error_event_after = Some(num(value)?),
                "cached" => k.cached = num(value)? as u64,
                other => return Err(format!("unknown mock knob {other:?}")),
            }
        }
        Ok(k)
    }

    /// Whether call number `index` (0-based) of this model fails with an error status.
    pub fn fails(&self, index: u64) -> bool {
        if self.fail_first > 0 {
            index < self.fail_first
        } else if let (Some(seed), true) = (self.seed, self.error_rate > 0.0) {
            ((draw(seed, index) >> 11) as f64 / ((1u64 << 53) as f64)) < self.error_rate
        } else if self.error_rate > 0.0 {
            let i = index as f64;
            ((i + 1.0) * self.error_rate).floor() > (i * self.error_rate).floor()
        } else {
            self.status.is_some()
        }
    }
}

/// A well-mixed 64-bit value for call `index` under `seed` (splitmix64).
fn draw(seed: u64, index: u64) -> u64 {
    let mut z = seed
        .wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_spreads_errors() {
        let k =
            Knobs::parse("status=429,retry_after=2;ttft=50ms,chunks=8,cut_after=3,empty").unwrap();
        assert_eq!(k.status, Some(429));
        assert_eq!(k.retry_after.as_deref(), Some("2"));
        assert_eq!(k.ttft, Duration::from_millis(50));
        assert_eq!((k.chunks, k.cut_after, k.empty), (8, Some(3), true));
        assert!(Knobs::parse("bogus=1").is_err());

        let k = Knobs::parse("fail_first=2").unwrap();
        assert_eq!(
            (0..5).map(|i| k.fails(i)).collect::<Vec<_>>(),
            [true, true, false, false, false]
        );

        let k = Knobs::parse("error_rate=0.3").unwrap();
        let fails = (0..100).filter(|&i| k.fails(i)).count();
        assert_eq!(fails, 30);
    }
}
