//! The broker's shared state and the rules every adapter goes through.
//!
//! [`Broker`] is a cheap clonable handle. Token state lives in one `std::sync::Mutex<HashMap>`;
//! critical sections are a lookup and a few integer updates, and the lock is never held across an
//! `.await`. The store job for a change is queued while the lock is held, so the store sees changes
//! in the order they happened (see `store.rs`).

use anyhow::Context as _;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use till_protocol::{Claims, ErrorCode, ErrorReply, Response, TokenId, TokenInfo, TokenState};

use crate::audit::{Audit, Event, EventKind, PeerJson};
use crate::config::{Config, Loaded, ServiceConfig};
use crate::peer::Peer;
use crate::proxy::{self, Scrubber};
use crate::secret::Secret;
use crate::signing::Keyring;
use crate::store::{Durable, Store, TokenRecord};

/// A handler's refusal: a stable code and one sentence the caller can act on. It never holds a
/// secret, a whole token or an internal cause chain (those go to the daemon's log).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Refusal {
        Refusal::new(ErrorCode::BadRequest, message)
    }

    pub fn internal(message: impl Into<String>) -> Refusal {
        Refusal::new(ErrorCode::Internal, message)
    }

    /// How the refusal reads in an audit line's `reason`.
    pub fn audit_reason(&self) -> String {
        format!("{}: {}", self.code.as_str(), self.message)
    }

    pub fn into_response(self) -> Response {
        Response::Error(ErrorReply {
            code: self.code,
            message: self.message,
        })
    }
}

/// One service as served: its config, key, scrubber and HTTP client.
pub struct Service {
    pub config: ServiceConfig,
    pub secret: Secret,
    /// When the key was set: its file's mtime, or when the daemon read it from the environment.
    pub secret_since: std::time::SystemTime,
    pub scrubber: Scrubber,
    pub client: reqwest::Client,
}

/// What is being served right now: replaced whole by a reload. A request takes one snapshot (an
/// `Arc`) and keeps it to the end, so a request in flight finishes with the key it started with.
pub struct Served {
    pub config: Config,
    pub services: BTreeMap<String, Arc<Service>>,
}

impl Served {
    /// Builds every service (clients, scrubbers) from a config whose secrets are loaded.
    pub fn build(loaded: Loaded) -> anyhow::Result<Served> {
        let Loaded {
            config,
            mut secrets,
        } = loaded;
        let mut services = BTreeMap::new();
        for (name, svc) in &config.services {
            let secret = secrets
                .remove(name)
                .ok_or_else(|| anyhow::anyhow!("service {name} has no loaded secret"))?;
            let since = svc
                .secret
                .path()
                .ok()
                .flatten()
                .and_then(|p| std::fs::metadata(p).ok())
                .and_then(|m| m.modified().ok())
                .unwrap_or_else(std::time::SystemTime::now);
            services.insert(
                name.clone(),
                Arc::new(Service {
                    secret_since: since,
                    scrubber: Scrubber::new(&secret, &svc.inject),
                    client: proxy::client_for(svc).with_context(|| format!("services.{name}"))?,
                    config: svc.clone(),
                    secret,
                }),
            );
        }
        Ok(Served { config, services })
    }
}

pub struct Inner {
    served: std::sync::RwLock<Arc<Served>>,
    pub keyring: Keyring,
    pub store: Store,
    pub audit: Audit,
    pub started: Instant,
    pub metrics: crate::metrics::Metrics,
    pub(crate) bursts: crate::alerts::Bursts,
    /// Connections per uid to the native and MCP sockets together (`socket_max_connections`).
    pub(crate) socket_connections: Arc<crate::server::OpenConnections>,
    mismatched: Mutex<std::collections::HashSet<TokenId>>,
    tokens: Mutex<HashMap<TokenId, TokenRecord>>,
    /// Calls between the start of their checks and their upstream answer's headers (see
    /// [`CallInFlight`]).
    calls_in_flight: std::sync::atomic::AtomicUsize,
}

/// Requests being handled right now, whichever way they came in (counted by `handlers::dispatch`
/// and by the gateway's proxy routes). A native-socket connection busy-polls for its next request
/// only when there are none (see `till_protocol::io`): under load the next request comes anyway.
/// Process-wide, as the spinning it gates is: one daemon per process.
pub static REQUESTS: till_protocol::io::BusyPoll = till_protocol::io::BusyPoll::new(0);

/// Counts a call in flight for as long as it lives. A call that finds itself alone may write its
/// own activation to the journal on its own thread (see `store::Durable::wait`).
pub struct CallInFlight(Broker);

impl CallInFlight {
    /// Whether this is the only call in flight.
    pub fn alone(&self) -> bool {
        self.0
            .calls_in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    }
}

impl Drop for CallInFlight {
    fn drop(&mut self) {
        self.0
            .calls_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[derive(Clone)]
pub struct Broker(Arc<Inner>);

impl std::ops::Deref for Broker {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Broker {
    pub fn new(
        loaded: Loaded,
        keyring: Keyring,
        store: Store,
        audit: Audit,
        records: Vec<TokenRecord>,
    ) -> anyhow::Result<Broker> {
        let served = Served::build(loaded)?;
        let tokens = records.into_iter().map(|r| (TokenId(r.id), r)).collect();
        Ok(Broker(Arc::new(Inner {
            served: std::sync::RwLock::new(Arc::new(served)),
            keyring,
            store,
            audit,
            started: Instant::now(),
            metrics: crate::metrics::Metrics::default(),
            bursts: crate::alerts::Bursts::default(),
            socket_connections: Arc::new(crate::server::OpenConnections::new(
                "connections to the sockets",
                "daemon.socket_max_connections",
            )),
            mismatched: Mutex::new(std::collections::HashSet::new()),
            tokens: Mutex::new(tokens),
            calls_in_flight: std::sync::atomic::AtomicUsize::new(0),
        })))
    }

    pub fn call_in_flight(&self) -> CallInFlight {
        self.calls_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        CallInFlight(self.clone())
    }

    /// The config and services being served now (a snapshot; cheap).
    pub fn served(&self) -> Arc<Served> {
        self.served
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Swaps in a new config and services; requests already running keep their snapshot.
    pub fn replace_served(&self, next: Served) {
        *self.served.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
    }

    /// The token table. Poisoning is ignored: every critical section leaves the map consistent.
    pub fn tokens(&self) -> MutexGuard<'_, HashMap<TokenId, TokenRecord>> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn live_tokens(&self) -> u64 {
        let now = now_secs();
        self.tokens()
            .values()
            .filter(|r| r.state(now) == TokenState::Live)
            .count() as u64
    }

    /// Keys older than their service's `max_age`, as sentences for logs and `status`.
    pub fn stale_keys(&self) -> Vec<String> {
        let now = std::time::SystemTime::now();
        self.served()
            .services
            .values()
            .filter_map(|s| {
                let max = s.config.max_age?;
                let age = now.duration_since(s.secret_since).unwrap_or_default();
                (age > max).then(|| {
                    format!(
                        "service {}'s key is {} old, over its max_age of {}; rotate it (`till rotate {}`)",
                        s.config.name,
                        humantime::format_duration(std::time::Duration::from_secs(age.as_secs())),
                        humantime::format_duration(max),
                        s.config.name
                    )
                })
            })
            .collect()
    }

    pub fn is_admin(&self, peer: &Peer) -> bool {
        self.served().config.admin_uids.contains(&peer.uid)
    }

    /// Who may mint. A socket peer got past the socket file's permissions, which is the gate. A TCP
    /// peer (MCP over the gateway's `/mcp`) is anyone on this host, so only the daemon's own uid and
    /// admins may mint there; anyone else must be handed a token.
    pub fn require_minter(&self, peer: &Peer) -> Result<(), Refusal> {
        if peer.transport == crate::peer::Transport::Socket
            || peer.uid == crate::sys::uid()
            || self.is_admin(peer)
        {
            return Ok(());
        }
        Err(Refusal::new(
            ErrorCode::Forbidden,
            format!(
                "uid {} may not mint tokens over HTTP; use a token you were given, or connect \
                 through `till mcp` (the Unix socket)",
                if peer.uid == crate::peer::UNKNOWN_UID {
                    "unknown".to_string()
                } else {
                    peer.uid.to_string()
                }
            ),
        ))
    }

    /// `[[peers]]`: with rules configured, a peer mints only for the services a rule of its uid or
    /// one of its groups lists. Admins are not limited.
    pub fn require_peer_may_mint_for(&self, peer: &Peer, service: &str) -> Result<(), Refusal> {
        let rules = &self.served().config.peers;
        if rules.is_empty() || self.is_admin(peer) {
            return Ok(());
        }
        let allowed = rules.iter().any(|r| {
            let matches = match r.who {
                crate::config::PeerMatch::Uid(u) => peer.uid == u,
                crate::config::PeerMatch::Gid(g) => peer.in_group(g),
            };
            matches && r.services.iter().any(|s| s == "*" || s == service)
        });
        if allowed {
            Ok(())
        } else {
            Err(Refusal::new(
                ErrorCode::Forbidden,
                format!(
                    "uid {} may not mint tokens for service {service} ([[peers]] in till.toml); ask \
                     the operator to allow it, or for a token",
                    peer.uid
                ),
            ))
        }
    }

    pub fn require_admin(&self, peer: &Peer, what: &str) -> Result<(), Refusal> {
        if self.is_admin(peer) {
            Ok(())
        } else {
            Err(Refusal::new(
                ErrorCode::Forbidden,
                format!(
                    "{what} is an admin operation and uid {} is not in daemon.admin_uids; \
                     run it as an admin user",
                    peer.uid
                ),
            ))
        }
    }

    pub fn service(&self, name: &str) -> Result<Arc<Service>, Refusal> {
        let served = self.served();
        served.services.get(name).cloned().ok_or_else(|| {
            let names: Vec<&str> = served.services.keys().map(String::as_str).collect();
            Refusal::new(
                ErrorCode::UnknownService,
                format!(
                    "no service named {:?} is configured (configured: {}); `till services` lists them",
                    crate::clip(name, crate::MAX_QUOTED_NAME),
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                ),
            )
        })
    }

    /// Appends an audit event; a failure becomes a refusal (fail closed).
    pub fn audit(&self, kind: EventKind, event: Event) -> Result<(), Refusal> {
        self.audit.record(kind, event).map_err(|e| {
            Refusal::internal(format!("{e}; Till refuses to act without an audit record"))
        })
    }

    /// Records a denial in the trail and returns the refusal to send back.
    /// Every refusal is counted; each is logged, except that past `alerts.refusal_burst` in 10 s
    /// from one peer they are summed up in one line per window after one `refusal_burst` alert.
    pub fn deny(&self, peer: &Peer, event: Event, refusal: Refusal) -> Refusal {
        self.deny_with(peer, event, refusal, "")
    }

    /// [`Broker::deny`] for a refused request other than a call: `what` it attempted (`mint`,
    /// `revoke`, ...) leads the reason, since the line has no method and path to say it.
    pub fn deny_request(
        &self,
        peer: &Peer,
        what: &str,
        service: Option<String>,
        refusal: Refusal,
    ) -> Refusal {
        let event = Event {
            service,
            ..Event::default()
        };
        self.deny_with(peer, event, refusal, &format!("{what} refused: "))
    }

    fn deny_with(&self, peer: &Peer, mut event: Event, refusal: Refusal, lead: &str) -> Refusal {
        event.peer = Some(PeerJson::from(peer));
        event.reason = Some(format!("{lead}{}", refusal.audit_reason()));
        self.metrics.refusal(refusal.code.as_str());
        let limit = self.served().config.alerts.refusal_burst;
        let (what, carried) = self.bursts.refusal(peer, limit);
        if carried > 0 {
            let summary = Event {
                peer: Some(PeerJson::from(peer)),
                reason: Some(format!(
                    "{carried} more refusal(s) from this uid in the last window were counted, not logged one by one"
                )),
                ..Event::default()
            };
            if let Err(e) = self.audit.record(EventKind::Deny, summary) {
                tracing::error!(error = %e, "could not audit a denial");
            }
        }
        match what {
            crate::alerts::Refusals::Suppress => {}
            crate::alerts::Refusals::Log | crate::alerts::Refusals::LogAndAlert => {
                if let Err(e) = self.audit.record(EventKind::Deny, event) {
                    tracing::error!(error = %e, "could not audit a denial");
                }
            }
        }
        if matches!(what, crate::alerts::Refusals::LogAndAlert) {
            crate::alerts::raise(
                self,
                "refusal_burst",
                peer,
                None,
                format!(
                    "{limit} refusals from this uid within 10 s; further ones in this window are only counted"
                ),
            );
        }
        refusal
    }

    /// True the first time a token is seen in the hands of another uid (one alert per token).
    pub fn first_mismatch(&self, id: TokenId) -> bool {
        let mut seen = self.mismatched.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() > 100_000 {
            seen.clear();
        }
        seen.insert(id)
    }

    /// Revokes every live token minted by `uid` (an alert rule). Durable in the background.
    /// Audited when it revoked anything, or always with `always_audit`.
    pub fn revoke_minted_by(&self, uid: u32, why: &str, always_audit: bool) -> usize {
        let now = now_secs();
        let mut map = self.tokens();
        let mut n = 0;
        for rec in map.values_mut() {
            if rec.minted_by_uid == Some(uid) && rec.state(now) == TokenState::Live {
                rec.revoked_at = Some(now);
                let _ = self.store.put_durable(rec);
                n += 1;
            }
        }
        drop(map);
        if n == 0 && !always_audit {
            return 0;
        }
        let event = Event {
            reason: Some(format!(
                "alert {why}: revoked the {n} live token(s) minted by uid {uid}"
            )),
            ..Event::default()
        };
        let _ = self.audit.record(EventKind::Revoke, event);
        n
    }

    /// Inserts a new record and queues it for the store (durable with the next durable batch).
    pub fn insert(&self, record: TokenRecord) {
        let mut map = self.tokens();
        self.store.put(&record);
        map.insert(TokenId(record.id), record);
    }

    /// Checks a token's state, and that of every token it was narrowed from, and takes one
    /// activation from each of them: a narrowed token spends its ancestors' budget too, so a parent
    /// can never be overspent through its children. All changed records are queued for one durable
    /// commit. `fresh` is inserted first (a one-shot token minted for this request). Returns the
    /// pending commit, the activations left on the token itself, and whether it or a token above
    /// it has a budget (its answer's usage is then charged).
    pub fn reserve(
        &self,
        id: TokenId,
        fresh: Option<TokenRecord>,
    ) -> Result<(Durable, u32, bool), Refusal> {
        let now = now_secs();
        let mut map = self.tokens();
        if let Some(rec) = fresh {
            map.insert(id, rec);
        }
        let chain = lineage(&map, id)?;
        for (depth, link) in chain.iter().enumerate() {
            let rec = &map[link];
            let whose = if depth == 0 {
                "this token"
            } else {
                "the token this one was narrowed from"
            };
            match rec.state(now) {
                TokenState::Live => {}
                TokenState::Revoked => {
                    return Err(Refusal::new(
                        ErrorCode::Revoked,
                        format!("{whose} was revoked; ask for a new one"),
                    ));
                }
                TokenState::Expired => {
                    return Err(Refusal::new(
                        ErrorCode::Expired,
                        format!(
                            "{whose} has expired; mint a new one (with a longer --ttl if needed)"
                        ),
                    ));
                }
                TokenState::Spent if rec.used >= rec.uses => {
                    return Err(Refusal::new(
                        ErrorCode::Exhausted,
                        format!(
                            "{whose}'s {} activation(s) are all spent; mint a new one, or ask your \
                             user for more activations",
                            rec.uses
                        ),
                    ));
                }
                TokenState::Spent if rec.budget_lost => {
                    return Err(Refusal::new(
                        ErrorCode::Exhausted,
                        format!(
                            "{whose}'s budget can no longer be kept: an answer did not report the \
                             LLM tokens it used. Mint a new one; for a streamed OpenAI-style \
                             request, ask for usage with \"stream_options\": {{\"include_usage\": true}}"
                        ),
                    ));
                }
                TokenState::Spent => {
                    return Err(Refusal::new(
                        ErrorCode::Exhausted,
                        format!(
                            "{whose}'s budget of {} LLM tokens is spent ({} used); mint a new one, \
                             or ask your user for a larger budget",
                            rec.budget.unwrap_or(0),
                            rec.budget_used
                        ),
                    ));
                }
            }
        }
        // Ancestors first, the token itself last: its durable job carries the whole batch.
        for link in chain.iter().skip(1) {
            if let Some(rec) = map.get_mut(link) {
                rec.used += 1;
                self.store.put(rec);
            }
        }
        let budgeted = chain.iter().any(|l| map[l].budget.is_some());
        let rec = map.get_mut(&id).ok_or_else(unknown_token)?;
        rec.used += 1;
        rec.last_used_at = Some(now);
        let remaining = rec.uses - rec.used;
        Ok((self.store.put_durable(rec), remaining, budgeted))
    }

    /// Charges the LLM tokens an answer used to the token and every token it was narrowed from
    /// that has a budget; `None` (the answer did not say) leaves their budgets unkeepable, so
    /// they are spent. Queued for the store with the next durable batch: after a crash, a charge
    /// made in the moment before it may be missing.
    pub fn charge(&self, id: TokenId, used: Option<u64>) {
        let mut map = self.tokens();
        let Ok(chain) = lineage(&map, id) else {
            return;
        };
        let mut budgets = Vec::new();
        for link in chain {
            if let Some(rec) = map.get_mut(&link)
                && let Some(budget) = rec.budget
            {
                match used {
                    Some(n) => rec.budget_used = rec.budget_used.saturating_add(n),
                    None => rec.budget_lost = true,
                }
                self.store.put(rec);
                budgets.push(format!("{link}: {} of {budget} used", rec.budget_used));
            }
        }
        let service = map.get(&id).map(|r| r.service.clone());
        drop(map);
        let reason = match used {
            Some(n) => format!("{n} LLM token(s) charged ({})", budgets.join("; ")),
            None => {
                tracing::warn!(token = %id, "an answer did not report its LLM usage; the token's budget can no longer be kept");
                "the answer reported no LLM usage, so the budget can no longer be kept: spent"
                    .into()
            }
        };
        let event = Event {
            token_id: Some(id.to_string()),
            service,
            reason: Some(reason),
            ..Event::default()
        };
        if let Err(e) = self.audit.record(EventKind::Charge, event) {
            tracing::error!(error = %e, "could not audit a budget charge");
        }
    }

    /// Removes tokens whose final state is older than the retention, from memory and the store.
    /// A token is kept while anything narrowed from it is still kept. Returns how many went.
    pub fn sweep(&self, retention: u64) -> usize {
        let now = now_secs();
        let mut map = self.tokens();
        let parents: std::collections::HashSet<[u8; 16]> =
            map.values().filter_map(|r| r.parent).collect();
        let gone: Vec<[u8; 16]> = map
            .values()
            .filter(|r| !parents.contains(&r.id))
            .filter(|r| {
                r.final_at(now)
                    .is_some_and(|t| t.saturating_add(retention) <= now)
            })
            .map(|r| r.id)
            .collect();
        for id in &gone {
            map.remove(&TokenId(*id));
        }
        self.store.remove(&gone);
        gone.len()
    }

    /// Removes a one-shot token minted for a call that was refused before anything went
    /// upstream. Nobody holds it (the daemon minted it for that one request), so it goes rather
    /// than stay behind, live or spent, as a token nobody asked for.
    pub fn forget(&self, id: TokenId) {
        let mut map = self.tokens();
        map.remove(&id);
        // Under the state lock, so the removal is queued after the record's own write.
        self.store.remove(&[id.0]);
    }

    /// Gives back an activation whose durable commit failed (nothing was sent upstream).
    pub fn unreserve(&self, id: TokenId) {
        let mut map = self.tokens();
        let Ok(chain) = lineage(&map, id) else { return };
        for link in chain {
            if let Some(rec) = map.get_mut(&link) {
                rec.used = rec.used.saturating_sub(1);
                self.store.put(rec);
            }
        }
    }
}

/// How deep tokens may be narrowed from one another.
pub const MAX_LINEAGE: usize = 8;

fn unknown_token() -> Refusal {
    Refusal::new(
        ErrorCode::UnknownToken,
        "this token is not in the daemon's records (it may have been minted just before a crash, \
         or by another daemon); mint a new one",
    )
}

/// The token and the tokens it was narrowed from, nearest first.
pub fn lineage(map: &HashMap<TokenId, TokenRecord>, id: TokenId) -> Result<Vec<TokenId>, Refusal> {
    let mut chain = vec![id];
    let mut rec = map.get(&id).ok_or_else(unknown_token)?;
    while let Some(parent) = rec.parent {
        if chain.len() > MAX_LINEAGE {
            return Err(Refusal::internal(
                "a token's lineage is deeper than the daemon allows",
            ));
        }
        let pid = TokenId(parent);
        rec = map.get(&pid).ok_or_else(|| {
            Refusal::new(
                ErrorCode::UnknownToken,
                "the token this one was narrowed from is not in the daemon's records; mint a new one",
            )
        })?;
        chain.push(pid);
    }
    Ok(chain)
}

impl TokenRecord {
    pub fn from_claims(c: &Claims, minted_by: &Peer, note: Option<String>) -> TokenRecord {
        TokenRecord {
            id: c.id.0,
            key_id: c.key_id.to_string(),
            service: c.service.clone(),
            rules: c.rules.iter().map(ToString::to_string).collect(),
            uses: c.uses,
            used: 0,
            issued_at: c.issued_at,
            expires_at: c.expires_at,
            parent: c.parent.map(|p| p.0),
            holder_uid: c.holder_uid,
            minted_by_uid: Some(minted_by.uid),
            note,
            revoked_at: None,
            last_used_at: None,
            canary: false,
            budget: c.budget,
            budget_used: 0,
            budget_lost: false,
            revocation_unsaved: false,
        }
    }

    /// Whether its budget, if it has one, is spent (or can no longer be kept).
    pub fn over_budget(&self) -> bool {
        self.budget_lost || self.budget.is_some_and(|b| self.budget_used >= b)
    }

    /// When the token stopped being spendable, if it has.
    pub fn final_at(&self, now: u64) -> Option<u64> {
        match self.state(now) {
            TokenState::Live => None,
            TokenState::Revoked => self.revoked_at,
            TokenState::Expired => self.expires_at,
            TokenState::Spent => Some(self.last_used_at.unwrap_or(self.issued_at)),
        }
    }

    pub fn state(&self, now: u64) -> TokenState {
        if self.revoked_at.is_some() {
            TokenState::Revoked
        } else if self.used >= self.uses || self.over_budget() {
            TokenState::Spent
        } else if self.expires_at.is_some_and(|e| now >= e) {
            TokenState::Expired
        } else {
            TokenState::Live
        }
    }

    pub fn info(&self, now: u64) -> TokenInfo {
        TokenInfo {
            id: TokenId(self.id).to_string(),
            service: self.service.clone(),
            rules: self.rules.clone(),
            uses: self.uses,
            used: self.used,
            remaining: self.uses.saturating_sub(self.used),
            state: self.state(now),
            issued_at: self.issued_at,
            expires_at: self.expires_at,
            key_id: self.key_id.clone(),
            parent: self.parent.map(|p| TokenId(p).to_string()),
            holder_uid: self.holder_uid,
            minted_by_uid: self.minted_by_uid,
            note: self.note.clone(),
            budget: self.budget,
            budget_used: self.budget_used,
        }
    }
}

pub fn new_token_id() -> Result<TokenId, Refusal> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|_| Refusal::internal("the system gave no randomness"))?;
    Ok(TokenId(id))
}
