//! `till`: the command line for `tilld`.
//!
//! Exit codes: 0 success, 1 refused or failed, 2 usage error (clap), 3 the daemon cannot be reached.

/// `println!` for this binary, here before the modules so that it is theirs too: when stdout's
/// reader has gone (`till audit --json | head`), `till` ends quietly with status 0, as `cat` does,
/// where std's `println!` panics ("failed printing to stdout: Broken pipe").
macro_rules! println {
    () => {
        $crate::stdout_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::stdout_line(format_args!($($arg)*))
    };
}

mod mcp;
mod output;
mod tty;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clap::{Parser, Subcommand};
use till_client::till_protocol::ErrorCode;
use till_client::{Client, ClientError, socket_path};
use till_protocol::{CallRequest, MintRequest, RevokeTarget, Token, TokensRequest};

#[derive(Parser)]
#[command(
    name = "till",
    version,
    about = "Use API keys without holding them: mint, call, inspect and revoke Till tokens"
)]
struct Cli {
    /// The daemon's socket (else $TILL_SOCKET, else the default path).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Daemon version, uptime, socket and counts.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Services and the rules tokens for them may carry (never secrets).
    Services {
        #[arg(long)]
        json: bool,
    },
    /// Mint a capability token; prints only the token unless --json.
    Mint {
        service: String,
        /// A rule 'METHOD /path' (repeatable); default: the service's whole ceiling.
        #[arg(long = "allow", value_name = "RULE")]
        allow: Vec<String>,
        /// Activations: how many upstream requests the token may make.
        #[arg(long)]
        uses: Option<u32>,
        /// Lifetime, e.g. 30s, 15m, 1h.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// A note kept with the token (shown by `till tokens`).
        #[arg(long)]
        note: Option<String>,
        /// Bind the token to your uid: no other user can spend it.
        #[arg(long)]
        bind: bool,
        /// Narrow this token (for a sub-agent): fewer rules, activations and lifetime, all taken
        /// from its budget.
        #[arg(long, value_name = "TOKEN")]
        from: Option<String>,
        /// A tripwire token: no honest agent spends it; presenting it raises an alert.
        #[arg(long)]
        canary: bool,
        /// At most this many LLM tokens (input and output, as the service's answers report them)
        /// for all its requests together; the request that crosses it completes, the next is
        /// refused. For LLM services only.
        #[arg(long, value_name = "LLM_TOKENS")]
        budget: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Make one request through Till; body to stdout, status line to stderr.
    Call {
        service: String,
        method: String,
        /// Path and optional query, e.g. /v1/models?limit=2
        path: String,
        /// Request body, or @FILE to read it from a file (@- for stdin).
        #[arg(short = 'd', long = "data", value_name = "BODY|@FILE")]
        data: Option<String>,
        /// A header 'Name: value' (repeatable).
        #[arg(short = 'H', long = "header", value_name = "HEADER")]
        headers: Vec<String>,
        /// Spend this token (else a one-shot token is minted for exactly this request).
        #[arg(long, env = "TILL_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Exit 1 when the upstream answers with a status of 400 or more.
        #[arg(long)]
        fail: bool,
        /// Print the answer's status line and headers before its body, as `curl -i` does (a
        /// `Link` header names the next page, a `Location` where a resource moved).
        #[arg(short = 'i', long)]
        include: bool,
    },
    /// Live tokens and their remaining activations.
    Tokens {
        /// Include spent, expired and revoked tokens.
        #[arg(long)]
        all: bool,
        /// Show the newest N (default 1000).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// A token's claims and state, without spending an activation.
    Inspect {
        #[arg(value_name = "TOKEN|ID")]
        token: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke one token (by id or whole token), every token of a service, or all.
    Revoke {
        #[arg(value_name = "ID|TOKEN", required_unless_present_any = ["service", "all"], conflicts_with_all = ["service", "all"])]
        token: Option<String>,
        #[arg(long, conflicts_with = "all")]
        service: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Read the audit trail (admin); `till audit verify [FILE]` checks its hash chain.
    Audit {
        /// How many of the latest events.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
        /// Keep printing new events as they are written (Ctrl-C to stop); a restart of the
        /// daemon is waited out.
        #[arg(long)]
        follow: bool,
        /// Only events about this token id.
        #[arg(long)]
        token: Option<String>,
        #[arg(long)]
        service: Option<String>,
        /// Only events of this kind: mint, activate, answer, charge, deny, revoke, reload, start, stop, alert, checkpoint.
        #[arg(long)]
        event: Option<String>,
        /// Only events at or after this time (RFC 3339, e.g. 2026-11-27T18:00:00Z), or this long ago (e.g. 1h, 30m, 2d).
        #[arg(long)]
        since: Option<String>,
        #[command(subcommand)]
        verify: Option<AuditCmd>,
    },
    /// Re-read the config and every secret now (admin); all or nothing.
    Reload,
    /// Replace a service's key with one read from stdin, or typed unseen at a prompt (admin); new requests use it at once.
    Rotate { service: String },
    /// Make a new signing key current (admin); tokens signed by the old one work until they expire.
    RotateSigningKey,
    /// The daemon's signing public key(s).
    Pubkey,
    /// MCP on stdio, for agent hosts: hands stdio to the daemon's MCP socket (or relays it).
    Mcp {
        /// The daemon's MCP socket (else $TILL_MCP_SOCKET, else mcp.sock beside the native socket).
        #[arg(long, value_name = "PATH")]
        mcp_socket: Option<PathBuf>,
        /// Copy bytes between stdio and the socket instead of handing stdio to the daemon.
        #[arg(long)]
        relay: bool,
        /// How long to wait for a daemon that stopped mid-session (a restart, an upgrade) to
        /// come back and take the session on, before answering every tool with the reason.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Check a token's signature and claims offline.
    Verify {
        token: String,
        /// A public key (base64url, from `till pubkey`); repeatable. Without one, asks the daemon.
        #[arg(long = "key", env = "TILL_PUBKEY", allow_hyphen_values = true)]
        keys: Vec<String>,
    },
    /// Print a completion script for a shell, e.g.
    /// `till completions bash > ~/.local/share/bash-completion/completions/till`.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the trail's hash chain and name the first bad line (edited, removed, inserted or
    /// reordered). Exit 0 when it holds, 1 when it does not.
    Verify {
        /// The trail file(s), oldest first, e.g. `audit.jsonl.1 audit.jsonl` across a rotation
        /// (default: the daemon's live file, as `till status` reports it).
        files: Vec<PathBuf>,
        /// The audit key (base64url, from `till pubkey`); without it, asks the daemon.
        #[arg(long = "key", env = "TILL_AUDIT_KEY", allow_hyphen_values = true)]
        keys: Vec<String>,
    },
}

/// Exit code 1 with a message: a refusal or a failure.
struct Failed(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("till: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            if let Some(ClientError::Unreachable { .. }) = e.downcast_ref::<ClientError>() {
                eprintln!("till: {e}");
                return ExitCode::from(3);
            }
            if let Some(f) = e.downcast_ref::<Failed>() {
                eprintln!("till: {}", f.0);
            } else {
                eprintln!("till: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

impl std::fmt::Debug for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Failed {}

/// What [`println!`] does: one line to stdout.
fn stdout_line(args: std::fmt::Arguments) {
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| out.write_all(b"\n"));
    quit_on_broken_pipe(written);
}

/// Ends the process quietly (status 0) when stdout's reader has gone; any other failure to write
/// is said on stderr (status 1).
fn quit_on_broken_pipe(written: std::io::Result<()>) {
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("till: cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }
}

/// A reply's body to stdout. A reader that has gone is not an error: the call happened, and
/// its status line (stderr) and exit status still say how.
fn body_to_stdout(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => written,
    }
}

async fn connect(cli_socket: &Option<PathBuf>) -> Result<Client> {
    Ok(Client::connect(&socket_path(cli_socket.as_deref())).await?)
}

/// An audit line's `seq`.
fn seq(line: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v["seq"].as_u64())
}

/// Whether the daemon went away (stopped, restarting), as opposed to refusing.
fn lost(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Io(_)
            | ClientError::Unreachable { .. }
            | ClientError::Refused {
                code: ErrorCode::ShuttingDown,
                ..
            }
    )
}

/// Connects again once the daemon is back, trying twice a second; a refusal ends it.
async fn reconnect(path: &Path) -> Result<Client> {
    loop {
        match Client::connect(path).await {
            Ok(c) => return Ok(c.reconnecting(false)),
            Err(e) if lost(&e) => tokio::time::sleep(Duration::from_millis(500)).await,
            Err(e) => return Err(e.into()),
        }
    }
}

fn read_body(data: Option<String>) -> Result<Vec<u8>> {
    match data {
        None => Ok(Vec::new()),
        Some(d) if d == "@-" => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            Ok(buf)
        }
        Some(d) => match d.strip_prefix('@') {
            Some(file) => std::fs::read(file).with_context(|| format!("cannot read {file}")),
            None => Ok(d.into_bytes()),
        },
    }
}

fn parse_headers(headers: Vec<String>) -> Result<Vec<(String, String)>> {
    headers
        .into_iter()
        .map(|h| {
            let (k, v) = h
                .split_once(':')
                .ok_or_else(|| anyhow!("header {h:?} must look like 'Name: value'"))?;
            Ok((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect()
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Status { json } => {
            let s = connect(&cli.socket).await?.status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                output::status(&s);
            }
        }
        Cmd::Services { json } => {
            let s = connect(&cli.socket).await?.services().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s.services)?);
            } else {
                output::services(&s.services);
            }
        }
        Cmd::Mint {
            service,
            allow,
            uses,
            ttl,
            note,
            bind,
            from,
            canary,
            budget,
            json,
        } => {
            let reply = connect(&cli.socket)
                .await?
                .mint(MintRequest {
                    service,
                    allow,
                    uses,
                    // Whole seconds, rounded up; zero stays zero, for the daemon to refuse.
                    ttl_secs: ttl.map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0)),
                    note,
                    bind_to_peer: bind,
                    from,
                    canary,
                    budget,
                })
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
            } else {
                println!("{}", reply.token);
            }
        }
        Cmd::Call {
            service,
            method,
            path,
            data,
            headers,
            token,
            fail,
            include,
        } => {
            let req = CallRequest {
                token,
                service: Some(service),
                method,
                path,
                headers: parse_headers(headers)?,
                body: read_body(data)?,
            };
            let reply = connect(&cli.socket).await?.call(req).await?;
            if include {
                let mut head = format!("HTTP {}\n", reply.status);
                for (k, v) in &reply.headers {
                    head.push_str(&format!("{k}: {v}\n"));
                }
                head.push('\n');
                body_to_stdout(head.as_bytes())?;
            }
            body_to_stdout(&reply.body)?;
            eprintln!(
                "HTTP {} (token {}, {} activation(s) left)",
                reply.status, reply.token_id, reply.activations_remaining
            );
            if fail && reply.status >= 400 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Tokens { all, limit, json } => {
            let t = connect(&cli.socket)
                .await?
                .list_tokens(TokensRequest { all, limit })
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t.tokens)?);
            } else {
                output::tokens(&t.tokens);
            }
            if t.count > t.tokens.len() {
                eprintln!(
                    "the newest {} of {} tokens; --limit N for more",
                    t.tokens.len(),
                    t.count
                );
            }
        }
        Cmd::Inspect { token, json } => {
            let info = connect(&cli.socket).await?.inspect(&token).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                output::token(&info);
            }
        }
        Cmd::Revoke {
            token,
            service,
            all,
        } => {
            let target = match (token, service, all) {
                (Some(t), _, _) => RevokeTarget::Token(t),
                (None, Some(s), _) => RevokeTarget::Service(s),
                (None, None, true) => RevokeTarget::All,
                (None, None, false) => {
                    bail!("say what to revoke: an id or token, --service S, or --all")
                }
            };
            let reply = connect(&cli.socket).await?.revoke(target).await?;
            for t in &reply.revoked {
                println!(
                    "revoked {} ({}, {} of {} activation(s) used)",
                    t.id, t.service, t.used, t.uses
                );
            }
            let unlisted = reply.count.saturating_sub(reply.revoked.len());
            if unlisted > 0 {
                println!("and {unlisted} more: {} token(s) revoked", reply.count);
            }
            if reply.revoked.is_empty() {
                println!("nothing to revoke");
            }
        }
        Cmd::Audit {
            verify: Some(AuditCmd::Verify { files, keys }),
            ..
        } => {
            let mut keys = keys;
            let files = if files.is_empty() {
                // The live trail: have the daemon sign a checkpoint first, so it ends with one.
                let mut c = connect(&cli.socket).await?;
                c.audit_checkpoint().await?;
                vec![PathBuf::from(c.status().await?.audit_log.ok_or_else(
                    || anyhow!("the daemon did not say where its trail is; give FILE"),
                )?)]
            } else {
                files
            };
            let file = PathBuf::from(
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" + "),
            );
            if keys.is_empty() {
                let k = connect(&cli.socket).await?.pubkey().await?.audit_key;
                keys.extend(k);
            }
            let keys = keys
                .iter()
                .map(|k| parse_key(k))
                .collect::<Result<Vec<_>>>()?;
            let mut text = String::new();
            for f in &files {
                // Bytes that are not UTF-8 (a line cut short inside a character, or damaged)
                // become U+FFFD, so the check names their line instead of refusing the file.
                let bytes =
                    std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
                text.push_str(&String::from_utf8_lossy(&bytes));
            }
            match till_protocol::audit::verify_trail(&text, &keys) {
                Ok(r) => println!(
                    "{}: {} events, chain intact, {} signed checkpoint(s), ends signed",
                    file.display(),
                    r.events,
                    r.checkpoints
                ),
                Err((line, why)) => {
                    return Err(Failed(format!("{}: line {line}: {why}", file.display())).into());
                }
            }
        }
        Cmd::Audit {
            limit,
            json,
            follow,
            token,
            service,
            event,
            since,
            verify: None,
        } => {
            // A follower notices a restart itself (below): the trail it follows may not be the
            // one the daemon comes back with.
            let mut c = connect(&cli.socket).await?.reconnecting(false);
            let mut req = till_protocol::AuditRequest {
                limit: Some(limit),
                token,
                service,
                event,
                since,
                ..Default::default()
            };
            loop {
                let reply = match c.audit_query(req.clone()).await {
                    Ok(reply) => reply,
                    // As `tail -F` outlives a rotated file, a follower outlives a restart of the
                    // daemon (an upgrade, `systemctl restart`), saying so on stderr; it goes on
                    // after the last line it printed.
                    Err(e) if follow && lost(&e) => {
                        eprintln!("till: lost tilld ({e}); following on when it is back");
                        c = reconnect(&socket_path(cli.socket.as_deref())).await?;
                        eprintln!("till: tilld is back; following on");
                        // A trail whose newest line comes before the last one printed is not the
                        // one followed (a new `audit_log`, a fresh state): all of it is new.
                        let newest = c
                            .audit_query(till_protocol::AuditRequest {
                                limit: Some(1),
                                ..Default::default()
                            })
                            .await?;
                        if let (Some(last), Some(newest)) =
                            (req.after_seq, newest.lines.last().and_then(|l| seq(l)))
                            && newest < last
                        {
                            eprintln!(
                                "till: this is another trail (its newest line is {newest}, the last one printed was {last}); following it from its first line"
                            );
                            req.after_seq = Some(0);
                        }
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                if let Some(last) = reply.lines.last() {
                    req.after_seq = seq(last);
                }
                if json {
                    for l in &reply.lines {
                        println!("{l}");
                    }
                } else {
                    output::audit(&reply.lines);
                }
                if !follow {
                    if reply.lines.is_empty() {
                        // On stderr, so scripts reading stdout see an empty list.
                        eprintln!("till: no event in the trail matches");
                    }
                    break;
                }
                quit_on_broken_pipe(std::io::stdout().flush());
                // Polling the daemon twice a second is plenty for a person watching.
                tokio::time::sleep(Duration::from_millis(500)).await;
                req.limit = Some(100_000);
            }
        }
        Cmd::Reload => {
            let r = connect(&cli.socket).await?.reload().await?;
            println!("{}", r.summary);
        }
        Cmd::Rotate { service } => {
            let secret = tty::read_new_key(&service).await?;
            let r = connect(&cli.socket).await?.rotate(&service, secret).await?;
            println!("{}", r.summary);
        }
        Cmd::Pubkey | Cmd::RotateSigningKey => {
            let mut c = connect(&cli.socket).await?;
            let reply = if matches!(cli.cmd, Cmd::RotateSigningKey) {
                c.rotate_signing_key().await?
            } else {
                c.pubkey().await?
            };
            for k in &reply.keys {
                let state = match (k.current, k.retire_at) {
                    (true, _) => " (current)".to_string(),
                    (false, Some(t)) => format!(
                        " (retires {})",
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t)
                        )
                    ),
                    (false, None) => String::new(),
                };
                println!("{} {}{state}", k.key_id, k.public_key);
            }
            if let Some(a) = &reply.audit_key {
                println!("audit {a} (signs the trail's checkpoints)");
            }
        }
        Cmd::Verify { token, keys } => return verify(&cli.socket, &token, keys).await,
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "till", &mut script);
            quit_on_broken_pipe(std::io::stdout().write_all(&script));
        }
        Cmd::Mcp {
            mcp_socket,
            relay,
            wait,
        } => {
            let native = socket_path(cli.socket.as_deref());
            let path = mcp::mcp_socket_path(mcp_socket.as_deref(), &native);
            mcp::run(&path, relay, wait).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A public key as `till pubkey` prints it (base64url, 32 bytes).
fn parse_key(k: &str) -> Result<ed25519_dalek::VerifyingKey> {
    let raw = URL_SAFE_NO_PAD
        .decode(k.trim())
        .map_err(|_| anyhow!("--key {k:?} is not base64url"))?;
    let bytes: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| anyhow!("--key {k:?} is not a 32-byte ed25519 key"))?;
    ed25519_dalek::VerifyingKey::from_bytes(&bytes)
        .map_err(|_| anyhow!("--key {k:?} is not a valid ed25519 key"))
}

async fn verify(socket: &Option<PathBuf>, token: &str, mut keys: Vec<String>) -> Result<ExitCode> {
    let t = Token::decode(token).map_err(|e| Failed(e.to_string()))?;
    if keys.is_empty() {
        keys = connect(socket)
            .await?
            .pubkey()
            .await?
            .keys
            .into_iter()
            .map(|k| k.public_key)
            .collect();
    }
    let mut verified = false;
    for k in &keys {
        let key = parse_key(k)?;
        if t.verify(&key).is_ok() {
            verified = true;
            break;
        }
    }
    output::claims(t.claims());
    if !verified {
        return Err(
            Failed("the signature does not verify with any of the given keys".into()).into(),
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if t.claims().expires_at.is_some_and(|e| now >= e) {
        return Err(Failed("the signature is valid but the token has expired".into()).into());
    }
    println!(
        "signature valid (key {}); activations left are known only to the daemon (`till inspect`)",
        t.claims().key_id
    );
    Ok(ExitCode::SUCCESS)
}
