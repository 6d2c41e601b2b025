//! Built-in services: one table of data, no code per provider.
//!
//! Each preset pins an origin, says how the key is injected, which environment variables a
//! zero-config `tilld` reads it from, and a ceiling an operator would sign off on for an agent:
//! the inference endpoints of the provider, and read-only access for GitHub. Widen them in `till.toml`.

pub struct Preset {
    pub name: &'static str,
    pub base_url: &'static str,
    pub env: &'static [&'static str],
    /// `None` = `Authorization: Bearer <key>`; `Some(h)` = header `h: <key>`.
    pub header: Option<&'static str>,
    pub allow: &'static [&'static str],
    /// Sent when the caller does not set them (e.g. Anthropic requires a version header).
    pub default_headers: &'static [(&'static str, &'static str)],
    /// Its answers report the LLM tokens they used, so a token for it may carry a budget.
    pub llm_usage: bool,
    /// Its JSON answers name its own URLs, which its clients follow (GitHub's hypermedia): the
    /// gateway rewrites them to itself.
    pub rewrite_urls: bool,
}

const OPENAI_STYLE: &[&str] = &[
    "GET /v1/models/**",
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "POST /v1/responses",
];

pub const PRESETS: &[Preset] = &[
    Preset {
        name: "openai",
        base_url: "https://api.openai.com",
        env: &["OPENAI_API_KEY"],
        header: None,
        allow: OPENAI_STYLE,
        default_headers: &[],
        llm_usage: true,
        rewrite_urls: false,
    },
    Preset {
        name: "anthropic",
        base_url: "https://api.anthropic.com",
        env: &["ANTHROPIC_API_KEY"],
        header: Some("x-api-key"),
        allow: &[
            "POST /v1/messages",
            "POST /v1/messages/count_tokens",
            "GET /v1/models/**",
        ],
        default_headers: &[("anthropic-version", "2023-06-01")],
        llm_usage: true,
        rewrite_urls: false,
    },
    Preset {
        name: "gemini",
        base_url: "https://generativelanguage.googleapis.com",
        env: &["GEMINI_API_KEY", "GOOGLE_API_KEY"],
        header: Some("x-goog-api-key"),
        // google-genai 1.x calls v1beta, 3.x (and the REST docs' stable examples) v1.
        allow: &[
            "GET /v1/models/**",
            "POST /v1/models/*",
            "GET /v1beta/models/**",
            "POST /v1beta/models/*",
            "* /v1beta/openai/**",
        ],
        default_headers: &[],
        llm_usage: true,
        rewrite_urls: false,
    },
    Preset {
        name: "openrouter",
        base_url: "https://openrouter.ai/api",
        env: &["OPENROUTER_API_KEY"],
        header: None,
        allow: OPENAI_STYLE,
        default_headers: &[],
        llm_usage: true,
        rewrite_urls: false,
    },
    Preset {
        name: "mistral",
        base_url: "https://api.mistral.ai",
        env: &["MISTRAL_API_KEY"],
        header: None,
        allow: OPENAI_STYLE,
        default_headers: &[],
        llm_usage: true,
        rewrite_urls: false,
    },
    Preset {
        name: "groq",
        base_url: "https://api.groq.com/openai",
        env: &["GROQ_API_KEY"],
        header: None,
        allow: OPENAI_STYLE,
        default_headers: &[],
        llm_usage: true,
        rewrite_urls: false,
    },
    Preset {
        name: "together",
        base_url: "https://api.together.xyz",
        env: &["TOGETHER_API_KEY"],
        header: None,
        allow: OPENAI_STYLE,
        default_headers: &[],
        llm_usage: true,
        rewrite_urls: false,
    },
    Preset {
        name: "fireworks",
        base_url: "https://api.fireworks.ai/inference",
        env: &["FIREWORKS_API_KEY"],
        header: None,
        allow: OPENAI_STYLE,
        default_headers: &[],
        llm_usage: true,
        rewrite_urls: false,
    },
    Preset {
        name: "perplexity",
        base_url: "https://api.perplexity.ai",
        env: &["PERPLEXITY_API_KEY"],
        header: None,
        allow: &["POST /chat/completions", "POST /v1/chat/completions"],
        default_headers: &[],
        llm_usage: true,
        rewrite_urls: false,
    },
    Preset {
        name: "deepseek",
        base_url: "https://api.deepseek.com",
        env: &["DEEPSEEK_API_KEY"],
        header: None,
        allow: &[
            "POST /chat/completions",
            "GET /models",
            "POST /v1/chat/completions",
            "GET /v1/models",
        ],
        default_headers: &[],
        llm_usage: true,
        rewrite_urls: false,
    },
    Preset {
        name: "xai",
        base_url: "https://api.x.ai",
        env: &["XAI_API_KEY"],
        header: None,
        allow: OPENAI_STYLE,
        default_headers: &[],
        llm_usage: true,
        rewrite_urls: false,
    },
    Preset {
        name: "cohere",
        base_url: "https://api.cohere.com",
        env: &["COHERE_API_KEY", "CO_API_KEY"],
        header: None,
        allow: &[
            "POST /v2/chat",
            "POST /v2/embed",
            "POST /v2/rerank",
            "GET /v1/models/**",
        ],
        default_headers: &[],
        llm_usage: true,
        rewrite_urls: false,
    },
    Preset {
        name: "github",
        base_url: "https://api.github.com",
        env: &["GITHUB_TOKEN", "GH_TOKEN"],
        header: None,
        allow: &["GET /**"],
        default_headers: &[
            ("accept", "application/vnd.github+json"),
            ("x-github-api-version", "2022-11-28"),
        ],
        llm_usage: false,
        rewrite_urls: true,
    },
];

pub fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

#[cfg(test)]
mod tests {
    use till_protocol::Rule;

    use super::*;

    #[test]
    fn every_preset_is_valid_data() {
        for p in PRESETS {
            assert!(reqwest::Url::parse(p.base_url).is_ok(), "{}", p.name);
            for r in p.allow {
                Rule::parse(r).unwrap_or_else(|e| panic!("{}: {r}: {e}", p.name));
            }
        }
    }
}
