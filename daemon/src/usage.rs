//! How many LLM tokens an answer used, read from what the provider reports in it, for tokens that
//! carry a budget.
//!
//! One reader for every provider Till has a preset for, plain JSON answers and server-sent events
//! alike. It looks for a usage object where each puts one (`usage`, `message.usage`,
//! `response.usage`, `usageMetadata`) and reads the counters it knows:
//! - `total_tokens` (OpenAI and the OpenAI-compatible ones);
//! - `input_tokens`, `output_tokens` and Anthropic's cache counters (Anthropic, OpenAI's Responses);
//! - `tokens.input_tokens`, `tokens.output_tokens` (Cohere);
//! - `totalTokenCount`, `promptTokenCount`, `candidatesTokenCount` (Gemini).
//!
//! Streams report usage as they go, cumulatively (Anthropic's `message_start` has the input,
//! `message_delta` the output so far; Gemini repeats its totals), so each counter keeps the highest
//! value seen. The answer used `max(total, input + output)`.

use serde_json::Value;

/// The longest event line or JSON body read for its usage; anything longer is not read.
const MAX_READ: usize = 16 * 1024 * 1024;

pub struct UsageMeter {
    sse: bool,
    /// SSE: the line being assembled. JSON: the body so far.
    buf: Vec<u8>,
    too_long: bool,
    seen: bool,
    input: u64,
    output: u64,
    total: u64,
}

impl UsageMeter {
    /// For an answer of this content type (`text/event-stream` is read event by event).
    pub fn new(content_type: Option<&str>) -> UsageMeter {
        let sse = content_type.is_some_and(|t| {
            t.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        });
        UsageMeter {
            sse,
            buf: Vec::new(),
            too_long: false,
            seen: false,
            input: 0,
            output: 0,
            total: 0,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if !self.sse {
            if self.buf.len() + chunk.len() > MAX_READ {
                self.too_long = true;
            } else {
                self.buf.extend_from_slice(chunk);
            }
            return;
        }
        let mut rest = chunk;
        while let Some(at) = rest.iter().position(|&b| b == b'\n') {
            self.push_line_part(&rest[..at]);
            let line = std::mem::take(&mut self.buf);
            if !std::mem::take(&mut self.too_long) {
                self.event_line(&line);
            }
            rest = &rest[at + 1..];
        }
        self.push_line_part(rest);
    }

    fn push_line_part(&mut self, part: &[u8]) {
        if self.buf.len() + part.len() > MAX_READ {
            self.too_long = true;
            self.buf.clear();
        } else if !self.too_long {
            self.buf.extend_from_slice(part);
        }
    }

    fn event_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(data) = line.strip_prefix(b"data:")
            && let Ok(v) = serde_json::from_slice::<Value>(data.trim_ascii())
        {
            self.absorb(&v);
        }
    }

    fn absorb(&mut self, v: &Value) {
        let places = [
            v.get("usage"),
            v.pointer("/message/usage"),
            v.pointer("/response/usage"),
            v.get("usageMetadata"),
        ];
        for u in places.into_iter().flatten().filter(|u| u.is_object()) {
            let n = |path: &str| u.pointer(path).and_then(Value::as_u64);
            let sum = |paths: &[&str]| -> Option<u64> {
                let found: Vec<u64> = paths.iter().filter_map(|p| n(p)).collect();
                (!found.is_empty()).then(|| found.iter().sum())
            };
            let input = sum(&[
                "/input_tokens",
                "/cache_creation_input_tokens",
                "/cache_read_input_tokens",
            ])
            .or_else(|| n("/prompt_tokens"))
            .or_else(|| n("/tokens/input_tokens"))
            .or_else(|| n("/promptTokenCount"));
            let output = n("/output_tokens")
                .or_else(|| n("/completion_tokens"))
                .or_else(|| n("/tokens/output_tokens"))
                .or_else(|| n("/candidatesTokenCount"));
            let total = n("/total_tokens").or_else(|| n("/totalTokenCount"));
            for (slot, value) in [
                (&mut self.input, input),
                (&mut self.output, output),
                (&mut self.total, total),
            ] {
                if let Some(x) = value {
                    *slot = (*slot).max(x);
                    self.seen = true;
                }
            }
        }
    }

    /// The LLM tokens the answer used, or `None` if it reported none that could be read.
    pub fn finish(mut self) -> Option<u64> {
        if self.sse {
            let line = std::mem::take(&mut self.buf);
            if !self.too_long {
                self.event_line(&line);
            }
        } else if !self.too_long
            && let Ok(v) = serde_json::from_slice::<Value>(&self.buf)
        {
            self.absorb(&v);
        }
        self.seen
            .then(|| self.total.max(self.input.saturating_add(self.output)))
    }
}

/// The usage of a whole answer.
pub fn of_body(content_type: Option<&str>, body: &[u8]) -> Option<u64> {
    let mut m = UsageMeter::new(content_type);
    m.feed(body);
    m.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_providers_usage() {
        let json = Some("application/json");
        let openai = br#"{"id":"c","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}"#;
        assert_eq!(of_body(json, openai), Some(21));
        let anthropic = br#"{"type":"message","usage":{"input_tokens":10,"cache_read_input_tokens":5,"output_tokens":7}}"#;
        assert_eq!(of_body(json, anthropic), Some(22));
        let gemini = br#"{"candidates":[],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":6,"totalTokenCount":10}}"#;
        assert_eq!(of_body(json, gemini), Some(10));
        let cohere = br#"{"message":{},"usage":{"billed_units":{"input_tokens":3,"output_tokens":4},"tokens":{"input_tokens":30,"output_tokens":4}}}"#;
        assert_eq!(of_body(json, cohere), Some(34));
        assert_eq!(of_body(json, br#"{"data":[{"id":"m"}]}"#), None);
        assert_eq!(of_body(json, b"not json"), None);
    }

    #[test]
    fn reads_streams_in_any_cut() {
        let sse = Some("text/event-stream; charset=utf-8");
        let anthropic = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\r\n\r\n\
            event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\r\n\r\n\
            event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\r\n\r\n";
        let openai = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
            data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n\
            data: [DONE]\n\n";
        for (body, want) in [(anthropic, Some(40)), (openai, Some(7))] {
            for cut in 0..body.len() {
                let mut m = UsageMeter::new(sse);
                m.feed(&body.as_bytes()[..cut]);
                m.feed(&body.as_bytes()[cut..]);
                assert_eq!(m.finish(), want, "cut at {cut}");
            }
        }
        let no_usage = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";
        assert_eq!(of_body(sse, no_usage.as_bytes()), None);
    }
}
