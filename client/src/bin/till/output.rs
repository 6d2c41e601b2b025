//! Human-readable output for the CLI.

use std::time::{Duration, UNIX_EPOCH};

use till_protocol::{Claims, ServiceInfo, StatusReply, TokenInfo};

fn time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

pub fn status(s: &StatusReply) {
    println!("tilld {}", s.version);
    println!(
        "uptime       {}",
        humantime::format_duration(Duration::from_secs(s.uptime_secs))
    );
    println!("socket       {}", s.socket);
    println!("gateway      {}", s.gateway.as_deref().unwrap_or("off"));
    println!("services     {}", s.services);
    println!("live tokens  {}", s.live_tokens);
    for w in &s.warnings {
        println!("warning      {w}");
    }
}

pub fn services(list: &[ServiceInfo]) {
    if list.is_empty() {
        println!(
            "no services: start tilld with a provider key in its environment (e.g. OPENAI_API_KEY) or configure till.toml"
        );
    }
    for s in list {
        println!(
            "{}  {}  ({}; a token: at most {} activations, for at most {})",
            s.name,
            s.base_url,
            s.inject,
            s.max_uses,
            humantime::format_duration(Duration::from_secs(s.max_ttl_secs))
        );
        for r in &s.allow {
            println!("    {r}");
        }
    }
}

pub fn tokens(list: &[TokenInfo]) {
    if list.is_empty() {
        println!("no tokens");
        return;
    }
    println!(
        "{:<32}  {:<12}  {:<8}  {:>9}  {:<20}  RULES",
        "ID", "SERVICE", "STATE", "LEFT", "EXPIRES"
    );
    for t in list {
        println!(
            "{:<32}  {:<12}  {:<8}  {:>9}  {:<20}  {}",
            t.id,
            t.service,
            t.state.as_str(),
            format!("{}/{}", t.remaining, t.uses),
            t.expires_at.map(time).unwrap_or_else(|| "never".into()),
            t.rules.join(", ")
        );
    }
}

pub fn token(t: &TokenInfo) {
    println!("id           {}", t.id);
    println!("service      {}", t.service);
    println!("state        {}", t.state.as_str());
    println!(
        "activations  {} left of {} ({} used)",
        t.remaining, t.uses, t.used
    );
    if let Some(budget) = t.budget {
        println!(
            "budget       {} LLM tokens left of {budget} ({} used)",
            budget.saturating_sub(t.budget_used),
            t.budget_used
        );
    }
    println!("issued       {}", time(t.issued_at));
    println!(
        "expires      {}",
        t.expires_at.map(time).unwrap_or_else(|| "never".into())
    );
    println!("signing key  {}", t.key_id);
    if let Some(p) = &t.parent {
        println!("parent       {p}");
    }
    if let Some(u) = t.holder_uid {
        println!("bound to uid {u}");
    }
    if let Some(n) = &t.note {
        println!("note         {n}");
    }
    println!("rules");
    for r in &t.rules {
        println!("    {r}");
    }
}

pub fn claims(c: &Claims) {
    println!("id           {}", c.id);
    println!("service      {}", c.service);
    println!("activations  {}", c.uses);
    if let Some(budget) = c.budget {
        println!("budget       {budget} LLM tokens");
    }
    println!("issued       {}", time(c.issued_at));
    println!(
        "expires      {}",
        c.expires_at.map(time).unwrap_or_else(|| "never".into())
    );
    println!("signing key  {}", c.key_id);
    if let Some(p) = c.parent {
        println!("parent       {p}");
    }
    if let Some(u) = c.holder_uid {
        println!("bound to uid {u}");
    }
    println!("rules");
    for r in &c.rules {
        println!("    {r}");
    }
}

pub fn audit(lines: &[String]) {
    for l in lines {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            println!("{l}");
            continue;
        };
        let s = |k: &str| v[k].as_str().unwrap_or("-").to_owned();
        let target = match (v["method"].as_str(), v["path"].as_str()) {
            (Some(m), Some(p)) => format!("{m} {p}"),
            _ => "-".into(),
        };
        println!(
            "{:>6}  {}  {:<8}  {:<32}  {:<10}  {}  uid={}  {}",
            v["seq"].as_u64().unwrap_or(0),
            s("ts"),
            s("event"),
            s("token_id"),
            s("service"),
            target,
            v["peer"]["uid"]
                .as_u64()
                .map_or("-".into(), |u| u.to_string()),
            match (v["reason"].as_str(), v["status"].as_u64()) {
                (Some(r), _) => r.to_owned(),
                (None, Some(status)) => format!("status {status}"),
                (None, None) => "-".into(),
            }
        );
    }
}
