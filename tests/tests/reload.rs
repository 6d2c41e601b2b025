//! Live reload and key rotation without a failed request.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use till_protocol::{CallRequest, ErrorCode, MintRequest};
use till_tests::{Client, ClientError, SECRET, TestDaemon, Upstream, http, standard_config};

const NEW_KEY: &str = "sk-live-ROTATED-99999999999999";

fn replace_file(path: &std::path::Path, text: &str) {
    // As editors and secret managers do: write aside, then rename over.
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).expect("write");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replaced_secret_file_switches_keys_with_no_failed_request() {
    let up = Upstream::start(None).await;
    // Room for more activations than 32 clients can spend while the switch is noticed: under
    // load that can take long enough to spend a thousand, and a spent token would stop the
    // traffic this test waits on.
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = standard_config(tmp.path(), &up.url(), "gateway = \"127.0.0.1:0\"")
        .replace("max_uses = 1000\n", "max_uses = 1000000000\n");
    std::fs::write(tmp.path().join("till.toml"), text).expect("config");
    let d = TestDaemon::start_in(tmp.path());
    let g = d.gateway_url().await;
    let token = d.mint("echo", "GET /r", 1_000_000_000).await.token;
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (stop, failed, g, token, h) = (
            stop.clone(),
            failed.clone(),
            g.clone(),
            token.clone(),
            http(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let ok = h
                    .get(format!("{g}/proxy/echo/r"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    up.wait_hits(64).await;
    replace_file(&d.dir.join("echo.key"), &format!("{NEW_KEY}\n"));
    // Wait until the upstream sees the new key, then for a little more traffic.
    loop {
        let n = up.hits();
        up.wait_hits(n + 1).await;
        if up.seen().iter().any(|s| {
            s.headers
                .get("authorization")
                .is_some_and(|a| a.contains(NEW_KEY))
        }) {
            break;
        }
    }
    let n = up.hits();
    up.wait_hits(n + 64).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("client");
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request failed across the switch"
    );
    let keys: Vec<bool> = up
        .seen()
        .iter()
        .map(|s| s.headers["authorization"].contains(NEW_KEY))
        .collect();
    let first_new = keys.iter().position(|k| *k).expect("the new key arrived");
    assert!(keys[..first_new].iter().all(|k| !k));
    // Requests already in flight at the switch (at most one per client) finish with the old key.
    let late_old = keys[first_new..].iter().filter(|k| !**k).count();
    assert!(
        late_old <= 32,
        "{late_old} old-key requests after the switch"
    );
    assert!(
        keys[first_new + 32..].iter().all(|k| *k),
        "after the in-flight ones, only the new key"
    );
    assert!(
        up.seen()
            .iter()
            .all(|s| s.headers["authorization"].starts_with("Bearer sk-"))
    );
    let audit = d.audit_text();
    assert!(
        audit.contains("\"event\":\"reload\"") && audit.contains("echo.key changed"),
        "the switch is in the trail"
    );
    assert!(!audit.contains(NEW_KEY) && !audit.contains(SECRET));
    assert!(!d.log_text().contains(NEW_KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_refused_and_the_old_one_keeps_serving() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    let mut c = d.client().await;
    let other = c
        .mint(MintRequest {
            service: "other".into(),
            allow: vec!["GET /o".into()],
            uses: Some(3),
            ..MintRequest::default()
        })
        .await
        .expect("mint")
        .token;
    let good = std::fs::read_to_string(&d.config).expect("config");

    // Invalid: an unknown key. Refused with the reason; everything still works.
    replace_file(&d.config, &format!("{good}\n[daemon2]\nx = 1\n"));
    let out = d.till(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused") && err.contains("daemon2"), "{err}");
    c.call(CallRequest {
        token: Some(other.clone()),
        method: "GET".into(),
        path: "/o".into(),
        ..CallRequest::default()
    })
    .await
    .expect("still served with the old config");

    // Valid: `other` removed, `echo`'s ceiling narrowed.
    let start = good.find("[services.other]").expect("other");
    let end = good[start..].find("[services.q]").expect("q") + start;
    let next = format!("{}{}", &good[..start], &good[end..])
        .replace("allow = [\"* /**\"]", "allow = [\"GET /only/**\"]");
    replace_file(&d.config, &next);
    let out = d.till(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed other"));
    match c
        .call(CallRequest {
            token: Some(other),
            method: "GET".into(),
            path: "/o".into(),
            ..CallRequest::default()
        })
        .await
    {
        Err(ClientError::Refused {
            code: ErrorCode::UnknownService,
            message,
        }) => {
            assert!(message.contains("no service named \"other\""), "{message}")
        }
        r => panic!("{r:?}"),
    }
    let refused = c
        .mint(MintRequest {
            service: "echo".into(),
            allow: vec!["POST /x".into()],
            ..MintRequest::default()
        })
        .await;
    assert!(
        matches!(
            refused,
            Err(ClientError::Refused {
                code: ErrorCode::OverCeiling,
                ..
            })
        ),
        "{refused:?}"
    );
    assert!(d.audit_text().contains("refused (till reload"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn till_rotate_reads_the_new_key_from_stdin() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    let mut child = d
        .till_command(&["rotate", "echo"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("till rotate");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), NEW_KEY.as_bytes())
        .expect("key");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    let mode = std::fs::metadata(d.dir.join("echo.key"))
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let r = d
        .client()
        .await
        .call(CallRequest {
            service: Some("echo".into()),
            method: "GET".into(),
            path: "/after".into(),
            ..CallRequest::default()
        })
        .await
        .expect("call");
    assert!(
        !String::from_utf8_lossy(&r.body).contains(NEW_KEY),
        "the new key is scrubbed too"
    );
    assert_eq!(
        up.seen().last().expect("seen").headers["authorization"],
        format!("Bearer {NEW_KEY}")
    );
}

/// On a terminal, `till rotate` prompts and reads one line with echo off: the key typed is not
/// shown (nor kept in the scrollback), and the terminal gets its echo back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(unsafe_code)]
async fn till_rotate_on_a_terminal_does_not_echo_the_key() {
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    let (mut master, slave) = {
        let (mut m, mut s) = (0, 0);
        // SAFETY: openpty writes two descriptors, which are owned from here on.
        let rc = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty");
        // SAFETY: fresh descriptors from openpty, each owned once.
        unsafe {
            (
                std::fs::File::from(OwnedFd::from_raw_fd(m)),
                OwnedFd::from_raw_fd(s),
            )
        }
    };
    let mut child = d
        .till_command(&["rotate", "echo"])
        .stdin(std::process::Stdio::from(slave))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("till rotate");
    // The prompt is written once echo is off: wait for it, then type the key.
    let mut stderr = child.stderr.take().expect("stderr");
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("Enter to end): ") {
        let mut b = [0u8; 256];
        let n = stderr.read(&mut b).expect("prompt");
        assert!(n > 0, "no prompt: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&b[..n]);
    }
    master
        .write_all(format!("{NEW_KEY}\n").as_bytes())
        .expect("type the key");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What the terminal showed: the child has exited and no one else holds the slave, so the
    // read ends (EIO) after what is buffered.
    let mut screen = Vec::new();
    let mut b = [0u8; 4096];
    while let Ok(n) = master.read(&mut b) {
        if n == 0 {
            break;
        }
        screen.extend_from_slice(&b[..n]);
    }
    let screen = String::from_utf8_lossy(&screen);
    assert!(!screen.contains(NEW_KEY), "the key was echoed: {screen:?}");
    assert_eq!(
        std::fs::read_to_string(d.dir.join("echo.key"))
            .expect("key file")
            .trim(),
        NEW_KEY
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_tokens_are_swept_after_their_retention() {
    let up = Upstream::start(None).await;
    let mut d = TestDaemon::start_extra(&up, "retention = \"1s\"");
    let tmp = d.keep_dir();
    let mut c = d.client().await;
    let spent = c
        .call(CallRequest {
            service: Some("echo".into()),
            method: "GET".into(),
            path: "/s".into(),
            ..CallRequest::default()
        })
        .await
        .expect("one-shot")
        .token_id;
    let live = c
        .mint(MintRequest {
            service: "echo".into(),
            allow: vec!["GET /l".into()],
            uses: Some(2),
            ttl_secs: Some(3600),
            ..MintRequest::default()
        })
        .await
        .expect("mint")
        .info
        .id;
    // The sweeper runs every second; the spent token goes once its second of retention is over.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let all: Vec<String> = c
            .tokens(true)
            .await
            .expect("tokens")
            .tokens
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert!(all.contains(&live), "a live token is never swept");
        if !all.contains(&spent) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not swept within 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Gone from the store too: a restart does not bring it back.
    d.terminate();
    let d2 = TestDaemon::start_in(&d.dir);
    let all: Vec<String> = d2.all_tokens().await.into_iter().map(|t| t.id).collect();
    assert!(all.contains(&live) && !all.contains(&spent), "{all:?}");
    drop(tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_outlive_a_signing_key_rotation_until_they_expire() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start_extra(&up, "retention = \"3s\"");
    let mut c = d.client().await;
    let before = c
        .mint(MintRequest {
            service: "echo".into(),
            allow: vec!["GET /k".into()],
            uses: Some(5),
            ttl_secs: Some(2),
            ..MintRequest::default()
        })
        .await
        .expect("mint");
    let out = d.till(&["rotate-signing-key"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        listed.contains("(current)")
            && listed.contains(&format!("{} ", before.info.key_id))
            && listed.contains("retires"),
        "{listed}"
    );

    // Signed by the old key: still good. New tokens carry the new key.
    c.call(CallRequest {
        token: Some(before.token.clone()),
        method: "GET".into(),
        path: "/k".into(),
        ..CallRequest::default()
    })
    .await
    .expect("a token signed before the rotation still works");
    let after = c
        .mint(MintRequest {
            service: "echo".into(),
            allow: vec!["GET /k".into()],
            ..MintRequest::default()
        })
        .await
        .expect("mint");
    assert_ne!(after.info.key_id, before.info.key_id);

    // Once the old key's last token has expired, the key is retired and the token refused as such.
    let expires = before.info.expires_at.expect("expiry");
    while std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        < expires
    {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let refusal = async |c: &mut Client| match c
        .call(CallRequest {
            token: Some(before.token.clone()),
            method: "GET".into(),
            path: "/k".into(),
            ..CallRequest::default()
        })
        .await
    {
        Err(ClientError::Refused {
            code: ErrorCode::BadToken,
            message,
        }) => message,
        r => panic!("{r:?}"),
    };
    let message = refusal(&mut c).await;
    assert!(message.contains("retired"), "{message}");
    // `till pubkey` no longer lists it.
    let keys = c.pubkey().await.expect("pubkey").keys;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0].key_id, after.info.key_id);
    // After the retention the sweeper forgets the key altogether (as it does dead tokens).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let message = refusal(&mut c).await;
        if message.contains("does not hold") {
            break;
        }
        assert!(message.contains("retired"), "{message}");
        assert!(
            std::time::Instant::now() < deadline,
            "the retired key was never forgotten"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_older_than_its_max_age_is_flagged() {
    let up = Upstream::start(None).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = till_tests::standard_config(tmp.path(), &up.url(), "gateway = \"127.0.0.1:0\"")
        .replace("max_ttl = \"1h\"", "max_ttl = \"1h\"\nmax_age = \"30d\"");
    std::fs::write(tmp.path().join("till.toml"), text).expect("config");
    let key = std::fs::File::options()
        .write(true)
        .open(tmp.path().join("other.key"))
        .expect("key");
    key.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(90 * 86400))
        .expect("mtime");
    let d = TestDaemon::start_in(tmp.path());
    let out = d.till(&["status"]);
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("warning")
            && status.contains("service other's key is")
            && status.contains("max_age"),
        "{status}"
    );
    assert!(
        !status.contains("service echo's key"),
        "echo has no max_age"
    );
    let g = d.gateway_url().await;
    let metrics = http()
        .get(format!("{g}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("till_secret_age_seconds{service=\"other\"}"))
        .expect("gauge");
    let age: u64 = line
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("number");
    assert!(age >= 90 * 86400, "{line}");
    assert!(d.log_text().contains("over its max_age"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_trail_beside_the_config_is_flagged_at_start() {
    const FLAG: &str = "the audit trail is in a directory watched for config changes";
    let up = Upstream::start(None).await;
    // The test configs keep the trail beside till.toml, in the directory the watcher watches.
    let beside = TestDaemon::start(&up);
    assert!(beside.log_text().contains(FLAG), "{}", beside.log_text());
    // The benchmarks' daemon keeps it in the state directory, as the defaults do.
    let (_tmp, in_state) = till_tests::bench_daemon(&up);
    let minted = in_state.mint("echo", "GET /r", 1).await;
    let trail = std::fs::read_to_string(in_state.dir.join("state/audit.jsonl")).expect("trail");
    assert!(trail.contains(&minted.info.id), "{trail}");
    assert!(!in_state.log_text().contains(FLAG));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_named_by_a_relative_path_is_watched_and_reads_trigger_nothing() {
    let up = Upstream::start(None).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let config = till_tests::standard_config(dir, &up.url(), "");
    std::fs::write(dir.join("till.toml"), &config).expect("config");
    // `tilld --config till.toml`, from the config's directory.
    let d = TestDaemon::start_in_cwd(dir, "till.toml");
    let mut c = d.client().await;
    // Reading the watched files, as the daemon does on every reload, is no change.
    std::fs::read(dir.join("till.toml")).expect("read");
    std::fs::read(dir.join("echo.key")).expect("read");
    let more = format!(
        "{config}\n[services.added]\nbase_url = \"{}\"\nsecret = {{ file = \"{}/echo.key\" }}\nallow = [\"GET /**\"]\n",
        up.url(),
        dir.display()
    );
    replace_file(&dir.join("till.toml"), &more);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let services = c.services().await.expect("services");
        if services.services.iter().any(|s| s.name == "added") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the edit of a config named by a relative path was never picked up"
        );
        tokio::task::yield_now().await;
    }
    let reloads = d.audit_text().matches("\"event\":\"reload\"").count();
    assert_eq!(reloads, 1, "one edit, one reload:\n{}", d.audit_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_style_secret_update_is_picked_up() {
    // How Kubernetes updates a mounted secret: keys/echo.key -> ..data/echo.key, and ..data ->
    // ..v1. The update writes ..v2, points a new symlink at it and renames that over ..data. No
    // event names echo.key itself.
    use std::os::unix::fs::symlink;
    let up = Upstream::start(None).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let keys = dir.join("keys");
    let version = |name: &str, key: &str| {
        let v = keys.join(name);
        std::fs::create_dir_all(&v).expect("mkdir");
        let f = v.join("echo.key");
        std::fs::write(&f, format!("{key}\n")).expect("key");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    };
    version("..v1", SECRET);
    symlink("..v1", keys.join("..data")).expect("symlink");
    symlink("..data/echo.key", keys.join("echo.key")).expect("symlink");
    let config = till_tests::standard_config(dir, &up.url(), "")
        + &format!(
            "\n[services.mounted]\nbase_url = \"{}\"\nsecret = {{ file = \"{}/echo.key\" }}\nallow = [\"GET /**\"]\nmax_uses = 1000000\n",
            up.url(),
            keys.display()
        );
    std::fs::write(dir.join("till.toml"), config).expect("config");
    let d = TestDaemon::start_in(dir);
    let mut c = d.client().await;
    let token = c
        .mint(MintRequest {
            service: "mounted".into(),
            allow: vec!["GET /**".into()],
            uses: Some(1000000),
            ..MintRequest::default()
        })
        .await
        .expect("mint")
        .token;
    let mut key_seen = async || {
        let call = CallRequest {
            token: Some(token.clone()),
            method: "GET".into(),
            path: "/k".into(),
            ..CallRequest::default()
        };
        c.call(call).await.expect("call");
        up.seen().last().expect("seen").headers["authorization"].clone()
    };
    assert_eq!(key_seen().await, format!("Bearer {SECRET}"));

    version("..v2", NEW_KEY);
    symlink("..v2", keys.join("..data_tmp")).expect("symlink");
    std::fs::rename(keys.join("..data_tmp"), keys.join("..data")).expect("swap");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while key_seen().await != format!("Bearer {NEW_KEY}") {
        assert!(
            std::time::Instant::now() < deadline,
            "the swapped secret was never picked up"
        );
    }
    let audit = d.audit_text();
    assert!(audit.contains("keys/echo.key changed"), "{audit}");
    assert!(!audit.contains(NEW_KEY) && !d.log_text().contains(NEW_KEY));
}
