//! The `till` CLI as a user types it: exit codes, the walkthrough of the README.

use std::process::Command;

use base64::Engine as _;
use till_tests::{SECRET, TestDaemon, Upstream, bin};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn exits_3_with_help_when_nothing_listens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nothing.sock");
    let out = Command::new(bin("till"))
        .args(["--socket", socket.to_str().expect("utf8"), "status"])
        .output()
        .expect("run till");
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert!(
        err.contains(socket.to_str().expect("utf8")),
        "says where it looked: {err}"
    );
    assert!(err.contains("tilld"), "says how to start it: {err}");
}

#[test]
fn usage_errors_exit_2() {
    let out = Command::new(bin("till"))
        .args(["mint"])
        .output()
        .expect("run till");
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin("till"))
        .args(["revoke"])
        .output()
        .expect("run till");
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walkthrough_start_mint_call_inspect_revoke() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);

    let out = d.till(&["status"]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("services     4"),
        "{}",
        text(&out.stdout)
    );

    // For scripts: the same as JSON.
    let out = d.till(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(
        (status["services"].as_u64(), status["live_tokens"].as_u64()),
        (Some(4), Some(0))
    );
    let out = d.till(&["services", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("services json");
    let echo = list
        .as_array()
        .and_then(|l| l.iter().find(|s| s["name"] == "echo"))
        .expect("echo listed");
    assert_eq!(echo["allow"][0], "* /**");
    assert!(!list.to_string().contains(SECRET));

    let out = d.till(&["services"]);
    let services = text(&out.stdout);
    assert!(
        services.contains("echo") && services.contains("GET /**"),
        "{services}"
    );
    assert!(!services.contains(SECRET));

    let out = d.till(&[
        "mint",
        "echo",
        "--allow",
        "POST /v1/chat",
        "--uses",
        "2",
        "--ttl",
        "10m",
        "--note",
        "demo",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_owned();
    assert!(token.starts_with("till_") && token.len() < 400 && !token.contains('\n'));

    // A lifetime of nothing is refused, not rounded up into a token that lives a second.
    let out = d.till(&["mint", "echo", "--ttl", "0s"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("longer than zero"),
        "{}",
        text(&out.stderr)
    );
    // One over the service's ceiling is refused in the units it was asked in.
    let out = d.till(&["mint", "other", "--ttl", "2h"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("a lifetime of 2h is longer than service other allows (1h)"),
        "{}",
        text(&out.stderr)
    );

    let out = d.till(&[
        "call",
        "echo",
        "POST",
        "/v1/chat",
        "-d",
        "{\"q\":1}",
        "-H",
        "Content-Type: application/json",
        "--token",
        &token,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("\\\"q\\\":1"),
        "the body is echoed: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("HTTP 200")
            && text(&out.stderr).contains("1 activation(s) left")
    );

    // A body too big for one message to the daemon: refused by the CLI itself, nothing sent, and
    // the daemon serves the next request.
    let big = d.dir.join("big.bin");
    std::fs::write(&big, vec![b'a'; 17 << 20]).expect("write");
    let hits = up.hits();
    let arg = format!("@{}", big.display());
    let out = d.till(&[
        "call", "echo", "POST", "/v1/chat", "-d", &arg, "--token", &token,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("a message to tilld may hold") && err.contains("smaller body"),
        "{err}"
    );
    assert_eq!(up.hits(), hits);
    assert!(d.till(&["status"]).status.success());

    // Outside the token's scope: refused, exit 1, a reason that names the rule.
    let out = d.till(&["call", "echo", "GET", "/v1/other", "--token", &token]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("POST /v1/chat"),
        "{}",
        text(&out.stderr)
    );

    let out = d.till(&["inspect", &token]);
    let inspect = text(&out.stdout);
    assert!(
        inspect.contains("1 left of 2") && inspect.contains("note         demo"),
        "{inspect}"
    );

    let out = d.till(&["tokens", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let id = list[0]["id"].as_str().expect("id").to_owned();

    let out = d.till(&["pubkey"]);
    let key = text(&out.stdout)
        .split_whitespace()
        .nth(1)
        .expect("key")
        .to_owned();
    let out = d.till(&["verify", &token, "--key", &key]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("signature valid"));
    let at = token.len() - 10;
    let swapped = if &token[at..=at] == "A" { "B" } else { "A" };
    let forged = format!("{}{swapped}{}", &token[..at], &token[at + 1..]);
    let out = d.till(&["verify", &forged, "--key", &key]);
    assert_eq!(out.status.code(), Some(1));

    let out = d.till(&["revoke", &id]);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains(&format!("revoked {id}")));
    let out = d.till(&["call", "echo", "POST", "/v1/chat", "--token", &token]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("revoked"));

    // --fail: exit 1 on an upstream status of 400 or more; a one-shot token otherwise.
    let out = d.till(&["call", "echo", "GET", "/redirect", "--fail"]);
    assert_eq!(out.status.code(), Some(0), "302 is not a failure");

    let out = d.till(&["audit"]);
    let audit = text(&out.stdout);
    for e in ["mint", "activate", "deny", "revoke"] {
        assert!(audit.contains(e), "the audit shows {e}: {audit}");
    }
    assert!(!audit.contains(&token), "never a whole token in the trail");

    // `till audit verify`: the daemon's own trail holds; edited, removed and swapped lines do not.
    let out = d.till(&["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("chain intact"));
    let trail = d.audit_text();
    let lines: Vec<&str> = trail.lines().collect();
    assert!(lines.len() > 5);
    let mut edited = lines.clone();
    let changed = lines[3].replacen("\"uid\":", "\"uid\":1", 1);
    edited[3] = &changed;
    let mut removed = lines.clone();
    removed.remove(2);
    let mut swapped = lines.clone();
    swapped.swap(1, 2);
    let mut inserted = lines.clone();
    inserted.insert(3, lines[2]);
    // Cut after the last checkpoint: the chain still holds, but the trail no longer ends signed.
    let truncated = lines[..lines.len() - 2].to_vec();
    let n = truncated.len();
    for (name, version, bad_line) in [
        ("edited", edited, 4),
        ("removed", removed, 3),
        ("swapped", swapped, 2),
        ("inserted", inserted, 4),
        ("truncated", truncated, n),
    ] {
        let path = d.dir.join(format!("{name}.jsonl"));
        std::fs::write(&path, version.join("\n") + "\n").expect("write");
        let out = d.till(&["audit", "verify", path.to_str().expect("utf8")]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let err = text(&out.stderr);
        assert!(err.contains(&format!("line {bad_line}:")), "{name}: {err}");
    }
    // A byte that is not UTF-8 (a damaged disk block, a line cut inside a character): its line
    // is named, the file is not refused whole.
    let mut damaged = (lines.join("\n") + "\n").into_bytes();
    let in_line_3 = lines[0].len() + lines[1].len() + 2 + 10;
    damaged[in_line_3] = 0xFF;
    let path = d.dir.join("damaged.jsonl");
    std::fs::write(&path, damaged).expect("write");
    let out = d.till(&["audit", "verify", path.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("line 3:"),
        "{}",
        text(&out.stderr)
    );
    // Verified against another key, the checkpoints are exposed as not the daemon's.
    let other = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
        ed25519_dalek::SigningKey::from_bytes(&[3; 32])
            .verifying_key()
            .as_bytes(),
    );
    let out = d.till(&["audit", "verify", "--key", &other]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("signature does not verify"),
        "{}",
        text(&out.stderr)
    );
    assert!(d.audit_text().contains("\"event\":\"checkpoint\""));
}

#[test]
fn check_validates_config_and_refuses_loose_secret_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("till.toml"),
        till_tests::standard_config(dir.path(), "http://127.0.0.1:9", ""),
    )
    .expect("config");
    let check = || {
        Command::new(bin("tilld"))
            .arg("--check")
            .arg("--config")
            .arg(dir.path().join("till.toml"))
            .output()
            .expect("tilld --check")
    };
    let out = check();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("OK (4 service(s)"),
        "{}",
        text(&out.stdout)
    );

    // An HTTPS origin goes through HTTPS_PROXY: a proxy URL that does not parse is an error, and
    // the error does not repeat it (it can carry the proxy's password).
    // The standard config plus one more service: its base URL, and any more lines of it.
    let with_service = |base: &str, more: &str| {
        let mut config = till_tests::standard_config(dir.path(), "http://127.0.0.1:9", "");
        config.push_str(&format!(
            "[services.added]\nbase_url = \"{base}\"\n{more}secret = {{ file = \"{}/echo.key\" }}\nallow = [\"GET /**\"]\n",
            dir.path().display()
        ));
        std::fs::write(dir.path().join("till.toml"), config).expect("config");
    };
    with_service("https://api.example.com", "");
    let out = Command::new(bin("tilld"))
        .arg("--check")
        .arg("--config")
        .arg(dir.path().join("till.toml"))
        .env("HTTPS_PROXY", "http://user:hunter2@[not-a-host")
        .output()
        .expect("tilld --check");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("HTTPS_PROXY") && err.contains("not a valid URL"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");

    // ca_file: only for https, and it must hold certificates.
    let not_pem = dir.path().join("not-a-certificate.txt");
    std::fs::write(&not_pem, "hello\n").expect("write");
    let not_pem = not_pem.display().to_string();
    let test_ca = till_tests::tls_ca().display().to_string();
    for (base, ca, why) in [
        ("http://127.0.0.1:9", test_ca.as_str(), "not one"),
        (
            "https://api.example.com",
            "/nonexistent/ca.pem",
            "cannot be read",
        ),
        (
            "https://api.example.com",
            not_pem.as_str(),
            "holds no PEM certificate",
        ),
    ] {
        with_service(base, &format!("ca_file = \"{ca}\"\n"));
        let out = check();
        assert_eq!(out.status.code(), Some(1), "{base} {ca}");
        let err = text(&out.stderr);
        assert!(err.contains("ca_file") && err.contains(why), "{err}");
    }
    std::fs::write(
        dir.path().join("till.toml"),
        till_tests::standard_config(dir.path(), "http://127.0.0.1:9", ""),
    )
    .expect("config");

    let key = dir.path().join("echo.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let out = check();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(key.to_str().expect("utf8")) && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains(SECRET));

    std::fs::write(dir.path().join("till.toml"), "[daemon]\nsokcet = \"/x\"\n").expect("config");
    let out = check();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("sokcet"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn zero_config_serves_a_preset_for_each_provider_key_in_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(bin("tilld"))
        .arg("--check")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", dir.path())
        .env("XDG_CONFIG_HOME", dir.path())
        .env("OPENAI_API_KEY", "sk-zero-config-0123456789")
        .env("GITHUB_TOKEN", "ghp_zeroconfig0123456789")
        .output()
        .expect("tilld --check");
    // As root the default config path is /etc/till/till.toml; on a machine that has one, this
    // test says nothing about the built-in defaults.
    if std::path::Path::new("/etc/till/till.toml").exists() {
        return;
    }
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("built-in defaults: OK (2 service(s)"),
        "{stdout}"
    );
    assert!(!stdout.contains("sk-zero-config"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_filters_and_follow() {
    use std::io::BufRead;
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    let t1 = text(
        &d.till(&["mint", "echo", "--allow", "GET /a", "--json"])
            .stdout,
    );
    let id1 = serde_json::from_str::<serde_json::Value>(&t1).expect("json")["info"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    d.till(&["mint", "other", "--allow", "GET /b"]);
    let out = d.till(&["audit", "--json", "--event", "mint"]);
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["event"] == "mint"));
    let out = d.till(&["audit", "--json", "--token", &id1]);
    assert_eq!(text(&out.stdout).lines().count(), 1);
    let out = d.till(&[
        "audit",
        "--json",
        "--service",
        "other",
        "--since",
        "2000-01-01T00:00:00Z",
    ]);
    assert_eq!(text(&out.stdout).lines().count(), 1);
    // Or how long ago, as journalctl and docker take it: an hour holds both mints, the future
    // nothing.
    let out = d.till(&["audit", "--json", "--event", "mint", "--since", "1h"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 2);
    let out = d.till(&["audit", "--since", "yesterday"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("like 1h"),
        "{}",
        text(&out.stderr)
    );
    // A kind that does not exist is refused, not answered with nothing (which would read as
    // "none happened").
    let out = d.till(&["audit", "--event", "activation"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("the kinds are mint, activate, answer"),
        "{}",
        text(&out.stderr)
    );
    // Nothing that matches is said, on stderr: stdout stays an empty list.
    let out = d.till(&["audit", "--service", "nosuch"]);
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    assert!(text(&out.stderr).contains("no event in the trail matches"));

    // --follow prints events written after it started.
    let mut follow = Command::new(bin("till"))
        .args([
            "--socket",
            d.socket.to_str().expect("utf8"),
            "audit",
            "--follow",
            "--json",
            "--event",
            "activate",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("follow");
    let out = d.till(&["call", "echo", "GET", "/followed"]);
    assert!(out.status.success());
    let stdout = follow.stdout.take().expect("stdout");
    let line = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .next()
            .expect("a line")
            .expect("read")
    })
    .await
    .expect("reader");
    let _ = follow.kill();
    let _ = follow.wait();
    let v: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert_eq!(
        (v["event"].as_str(), v["path"].as_str()),
        (Some("activate"), Some("/followed"))
    );
}

/// `till … | head`: when stdout's reader has gone, `till` ends quietly with status 0, as `cat`
/// does (std's `println!` panicked: "failed printing to stdout: Broken pipe"). A call still says
/// how it went on stderr; a follower stops instead of polling for nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_goes_away_ends_till_quietly() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    d.mint("echo", "GET /a", 1).await;
    let closed_stdout = || {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        writer
    };
    for args in [
        &["tokens"][..],
        &["audit", "--json"],
        &["audit", "--follow", "--json"],
        &["status", "--json"],
        &["completions", "bash"],
        &["call", "echo", "GET", "/gone"],
    ] {
        let out = d
            .till_command(args)
            .stdout(closed_stdout())
            .output()
            .expect("till");
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        if args[0] == "call" {
            assert!(stderr.contains("HTTP 200"), "{stderr}");
        }
    }
}

/// `till completions bash` is a script that bash completes `till` with: subcommands, then each
/// one's flags. Needs no daemon.
#[test]
fn completions_complete_commands_and_flags() {
    let script = Command::new(bin("till"))
        .args(["--socket", "/nonexistent/till.sock", "completions", "bash"])
        .output()
        .expect("till completions");
    assert!(script.status.success(), "{}", text(&script.stderr));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("till.bash");
    std::fs::write(&path, &script.stdout).expect("write");
    // What bash does on <TAB>: COMP_WORDS and COMP_CWORD set, the function called with the
    // command, the word being completed and the one before it.
    let complete = |words: &[&str]| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({}); COMP_CWORD={}; _till till {} {}; echo \"${{COMPREPLY[*]}}\"",
                path.display(),
                words.join(" "),
                words.len() - 1,
                words[words.len() - 1],
                words[words.len() - 2],
            ))
            .output()
            .expect("bash");
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    };
    assert_eq!(complete(&["till", "mi"]), "mint");
    assert_eq!(complete(&["till", "mint", "--u"]), "--uses");
    let audit = complete(&["till", "audit", "--"]);
    assert!(audit.split(' ').any(|f| f == "--follow"), "{audit}");
    for shell in ["zsh", "fish"] {
        let out = Command::new(bin("till"))
            .args(["completions", shell])
            .output()
            .expect("till completions");
        assert!(out.status.success());
        assert!(text(&out.stdout).contains("rotate-signing-key"), "{shell}");
    }
}

/// `till audit --follow` outlives a restart of the daemon, as `tail -F` outlives a rotation: it
/// says so on stderr and goes on after the last line it printed, printing none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_follow_outlives_a_restart() {
    use std::io::BufRead;
    let up = Upstream::start(None).await;
    let mut d = TestDaemon::start(&up);
    let tmp = d.keep_dir().expect("dir");
    let mut follow = d
        .till_command(&["audit", "--follow", "--json", "--event", "mint"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("follow");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The follower's next mint line, within a deadline (a guard, not a synchronisation).
    let next_mint = |rx: &std::sync::mpsc::Receiver<String>| {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a line from the follower");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        v["token_id"].as_str().expect("token_id").to_owned()
    };
    let minted_id = |out: std::process::Output| {
        serde_json::from_str::<serde_json::Value>(&text(&out.stdout)).expect("json")["info"]["id"]
            .as_str()
            .expect("id")
            .to_owned()
    };
    let first = minted_id(d.till(&["mint", "echo", "--allow", "GET /a", "--json"]));
    assert_eq!(next_mint(&rx), first);

    assert!(d.terminate().success());
    let mut d = TestDaemon::start_in(tmp.path());
    let second = minted_id(d.till(&["mint", "echo", "--allow", "GET /b", "--json"]));
    assert_eq!(
        next_mint(&rx),
        second,
        "the first mint came again, or a line was lost"
    );

    // Back with another trail (the config now names another file, which starts a chain of its
    // own): its lines are new, though their numbers are lower than the last one printed.
    assert!(d.terminate().success());
    let config = tmp.path().join("till.toml");
    let before = std::fs::read_to_string(&config).expect("config");
    let moved = before.replace("/audit.jsonl\"", "/audit-2.jsonl\"");
    assert_ne!(moved, before);
    std::fs::write(&config, moved).expect("config");
    let d = TestDaemon::start_in(tmp.path());
    let third = minted_id(d.till(&["mint", "echo", "--allow", "GET /c", "--json"]));
    assert_eq!(
        next_mint(&rx),
        third,
        "the new trail's mint was not printed"
    );

    assert!(
        follow.try_wait().expect("try_wait").is_none(),
        "the follower ended"
    );
    let _ = follow.kill();
    let out = follow.wait_with_output().expect("follower");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("lost tilld"), "{stderr}");
    assert!(stderr.contains("tilld is back"), "{stderr}");
    assert!(stderr.contains("this is another trail"), "{stderr}");
}

/// `tilld --dev` that cannot start (here: its temporary state does not fit) says why, and does not
/// first print the banner of a daemon that never ran.
#[test]
fn tilld_dev_that_cannot_start_prints_no_banner() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Less than the store's two 8 MiB journals.
    let Some(_mounted) = till_tests::Mounted::tmpfs(tmp.path(), "4m") else {
        eprintln!("skipped: needs root, and a machine that lets it mount a tmpfs");
        return;
    };
    let out = Command::new(bin("tilld"))
        .arg("--dev")
        .env("TMPDIR", tmp.path())
        .env("TILL_LOG", "warn")
        .output()
        .expect("tilld --dev");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("No space left on device"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !text(&out.stdout).contains("TILL_SOCKET"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tilld_dev_is_a_complete_try_it_now() {
    use std::io::BufRead;
    let mut child = Command::new(bin("tilld"))
        .arg("--dev")
        .env("TILL_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tilld --dev");
    let stdout = child.stdout.take().expect("stdout");
    let banner = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.expect("line");
            let done = line.contains("till audit");
            text.push_str(&line);
            text.push('\n');
            if done {
                break;
            }
        }
        text
    })
    .await
    .expect("banner");
    let socket = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("export TILL_SOCKET="))
        .expect("the banner prints the export line")
        .to_owned();
    let dir = std::path::Path::new(&socket)
        .parent()
        .expect("dir")
        .to_owned();
    // The daemon prints the banner once its sockets are bound; its first connection is served.
    let out = Command::new(bin("till"))
        .args(["call", "echo", "POST", "/hello", "-d", "{\"hi\": \"till\"}"])
        .env("TILL_SOCKET", &socket)
        .output()
        .expect("till call");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let body = text(&out.stdout);
    assert!(
        body.contains("[redacted by till]") && body.contains("\\\"hi\\\": \\\"till\\\""),
        "{body}"
    );
    let key = std::fs::read_to_string(dir.join("echo.key")).expect("dummy key");
    assert!(!body.contains(key.trim()));
    let gateway = banner
        .lines()
        .find_map(|l| l.split("http://").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the gateway address")
        .trim_end_matches('.')
        .to_owned();
    let token = text(
        &Command::new(bin("till"))
            .args(["mint", "echo", "--allow", "GET /**", "--uses", "2"])
            .env("TILL_SOCKET", &socket)
            .output()
            .expect("mint")
            .stdout,
    )
    .trim()
    .to_owned();
    let r = till_tests::http()
        .get(format!("http://{gateway}/proxy/echo/models"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("gateway");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["till-activations-remaining"], "1");
    till_tests::signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    assert!(
        !dir.exists(),
        "the temporary state is removed when it stops"
    );
    // A newcomer's first run warns about nothing (its own layout once did).
    assert_eq!(text(&out.stderr), "");
}

#[test]
fn a_public_key_starting_with_a_dash_is_a_value_not_a_flag() {
    // base64url keys start with '-' one time in 64; clap must not read them as flags.
    let out = Command::new(bin("till"))
        .args([
            "verify",
            "till_x",
            "--key",
            "-cAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ])
        .output()
        .expect("till verify");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("unexpected argument"),
        "{}",
        text(&out.stderr)
    );
}

/// The Rust example shipped in `examples/mint_and_call.rs` (built by scripts/test), run as its doc
/// says: it mints a one-activation token through the client library and spends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_rust_example_mints_and_calls() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    let out = Command::new(bin("examples/mint_and_call"))
        .args(["echo", "GET", "/v1/models"])
        .env("TILL_SOCKET", &d.socket)
        .output()
        .expect("run the example");
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("minted ") && lines[0].ends_with(" for echo: 1 activation(s)"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("HTTP 200 (") && lines[1].ends_with(" bytes, 0 activation(s) left)"),
        "{stdout}"
    );
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path_and_query, "/v1/models");
    assert_eq!(seen[0].headers["authorization"], format!("Bearer {SECRET}"));
}

/// An agent that gives a whole URL as the path (one copied from an answer, such as a next-page
/// link) is refused, nothing is sent, and the refusal names the path to give instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_given_as_the_path_is_refused_with_the_path_to_give() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    // `other`'s base URL is the upstream's `/other`: the path is what follows it.
    let url = format!("{}/other/v1/x?page=2#top", up.url());
    let out = d.till(&["call", "other", "GET", &url]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("give the path /v1/x?page=2"), "{err}");
    let out = d.till(&["call", "echo", "GET", "https://elsewhere.example/a/b?c=d"]);
    let err = text(&out.stderr);
    assert!(err.contains("give the path /a/b?c=d"), "{err}");
    // The hint quotes what the caller sent: never a master credential (the refusal goes into the
    // trail too), and never more than a path may be.
    let leaky = format!("https://elsewhere.example/a?key={SECRET}");
    let out = d.till(&["call", "echo", "GET", &leaky]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!text(&out.stderr).contains(SECRET));
    let long = format!("https://elsewhere.example/{}", "a".repeat(100_000));
    let out = d.till(&["call", "echo", "GET", &long]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).len() < 1_000,
        "{}",
        text(&out.stderr).len()
    );
    let trail = d.audit_text();
    assert!(!trail.contains(SECRET));
    assert!(
        trail.lines().all(|l| l.len() < 20_000),
        "a long line in the trail"
    );
    assert_eq!(up.hits(), 0);
}

/// `till call -i` prints the answer's status line and headers before its body, as `curl -i`
/// does: an agent in a shell sees the `Link` header that names the next page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_include_prints_the_status_and_headers_first() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    let out = d.till(&["call", "-i", "other", "GET", "/x"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let (head, body) = stdout
        .split_once("\n\n")
        .expect("a blank line after the headers");
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("HTTP 200"));
    assert!(
        lines.any(|l| l == "content-type: application/json"),
        "{head}"
    );
    let echoed: serde_json::Value = serde_json::from_str(body).expect("the body, whole");
    assert_eq!(echoed["path"], "/other/x");
    // Without -i, the body alone.
    let plain = text(&d.till(&["call", "other", "GET", "/x"]).stdout);
    assert!(plain.starts_with('{'), "{plain}");
}
