//! Randomized bad input on every way in (the native socket, the gateway, `till mcp`): thousands of
//! requests made by mutating good ones. Whatever comes in, each gets an answer or a closed
//! connection (never a hang), no answer carries a key, and afterwards the daemon still serves, its
//! trail still verifies and its log holds no panic. The seed is printed; `TILL_JUNK_SEED=N`
//! replays a run.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use till_tests::{OTHER_SECRET, SECRET, TestDaemon, Upstream};

/// xorshift64*: enough to pick mutations, and replayable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

fn seeded() -> Rng {
    let seed = std::env::var("TILL_JUNK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64
        })
        | 1;
    eprintln!("TILL_JUNK_SEED={seed}");
    Rng(seed)
}

/// A string made of pieces that have broken parsers before: traversal, encoded separators,
/// control characters, odd Unicode, a token-like prefix, sheer length.
fn junk_string(rng: &mut Rng, token: &str) -> String {
    const PIECES: &[&str] = &[
        "",
        "/",
        "//",
        "..",
        "/../..",
        "/./",
        "%2e%2e",
        "%2F",
        "%00",
        "%",
        "%zz",
        "?key=x",
        "&key=",
        "#frag",
        "\0",
        "\r\n",
        "\t",
        " ",
        "\"",
        "\\",
        "🔒",
        "\u{202e}",
        "\u{feff}",
        "GET",
        "* /**",
        "GET /**",
        "/v1/models",
        "/status/500",
        "echo",
        "other",
        "till_",
        "{secret}",
        "-1",
        "18446744073709551616",
        "1e400",
    ];
    let mut s = String::new();
    for _ in 0..=rng.below(4) {
        match rng.below(12) {
            0 => s.push_str(token),
            // A token with one character changed.
            1 => {
                let mut t: Vec<char> = token.chars().collect();
                let i = rng.below(t.len());
                t[i] = rng.pick(&['A', '_', '-', '=', '.', '\0']);
                s.extend(t);
            }
            2 => s.push_str(&"a".repeat(rng.below(10_000))),
            _ => s.push_str(rng.pick(PIECES)),
        }
    }
    s
}

fn junk_value(rng: &mut Rng, token: &str, depth: u32) -> Value {
    match rng.below(if depth > 2 { 7 } else { 9 }) {
        0 => Value::Null,
        1 => json!(rng.chance(50)),
        2 => json!(rng.pick(&[0i64, -1, i64::MIN, i64::MAX, 4_294_967_296, 1])),
        3 => json!(rng.pick(&[u64::MAX, 1_000_000_000_000])),
        4 => json!(rng.pick(&[0.5f64, -0.0, 1e300])),
        5 | 6 => json!(junk_string(rng, token)),
        7 => Value::Array(
            (0..rng.below(4))
                .map(|_| junk_value(rng, token, depth + 1))
                .collect(),
        ),
        _ => {
            let mut m = serde_json::Map::new();
            for _ in 0..rng.below(4) {
                m.insert(junk_string(rng, token), junk_value(rng, token, depth + 1));
            }
            Value::Object(m)
        }
    }
}

/// Changes one thing in a request: mostly inside one of its fields, now and then a field
/// removed or added, or its `type` changed (to a request that changes no daemon-wide state, or to
/// junk), so most requests still parse and reach the daemon's own checks.
fn mutate_request(v: &mut Value, rng: &mut Rng, token: &str) {
    let Value::Object(m) = v else {
        return mutate(v, rng, token);
    };
    let fields: Vec<String> = m.keys().filter(|k| *k != "type").cloned().collect();
    match rng.below(20) {
        0 => {
            let tag = rng.pick(&["mint", "call", "inspect", "tokens", "status", "zzz", ""]);
            m.insert("type".into(), json!(tag));
        }
        1 if !fields.is_empty() => {
            m.remove(&fields[rng.below(fields.len())]);
        }
        2 => {
            m.insert(junk_string(rng, token), junk_value(rng, token, 1));
        }
        _ if !fields.is_empty() => {
            let key = &fields[rng.below(fields.len())];
            mutate(m.get_mut(key).expect("field"), rng, token);
        }
        _ => {}
    }
}

/// Changes one thing somewhere in `v`: a value replaced, a key removed or added, an element
/// added or dropped. The `type` tag is only ever set to a request that changes no daemon-wide
/// state, or to junk.
fn mutate(v: &mut Value, rng: &mut Rng, token: &str) {
    match v {
        Value::Object(m) if !m.is_empty() && rng.chance(80) => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let key = keys[rng.below(keys.len())].clone();
            match rng.below(4) {
                0 => {
                    m.remove(&key);
                }
                1 => {
                    m.insert(junk_string(rng, token), junk_value(rng, token, 1));
                }
                _ if key == "type" => {
                    let tag = rng.pick(&["mint", "call", "inspect", "tokens", "status", "zzz", ""]);
                    m.insert(key, json!(tag));
                }
                _ => mutate(m.get_mut(&key).expect("key"), rng, token),
            }
        }
        Value::Array(a) if !a.is_empty() && rng.chance(70) => {
            let i = rng.below(a.len());
            match rng.below(3) {
                0 => {
                    a.remove(i);
                }
                1 => a.push(junk_value(rng, token, 1)),
                _ => mutate(&mut a[i], rng, token),
            }
        }
        // Mostly a value of the same type, so the request gets past the parser.
        Value::String(_) if rng.chance(85) => *v = json!(junk_string(rng, token)),
        Value::Number(_) if rng.chance(85) => {
            *v = json!(rng.pick(&[0u64, 1, 2, 1000, u32::MAX as u64, u32::MAX as u64 + 1]));
        }
        Value::Bool(b) if rng.chance(85) => *b = !*b,
        _ => *v = junk_value(rng, token, 0),
    }
}

/// The keys as they could leak: raw, and as basic auth carries one.
fn leaks() -> Vec<Vec<u8>> {
    vec![
        SECRET.as_bytes().to_vec(),
        OTHER_SECRET.as_bytes().to_vec(),
        STANDARD.encode(format!("api:{SECRET}")).into_bytes(),
    ]
}

fn assert_no_key(bytes: &[u8], what: &str) {
    for key in leaks() {
        assert!(
            !bytes.windows(key.len()).any(|w| w == key.as_slice()),
            "a key came back in {what}: {}",
            String::from_utf8_lossy(bytes)
        );
    }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// One reply frame, or `None` when the daemon closed the connection.
fn read_frame(s: &mut UnixStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
        Err(e) => panic!("no reply from the daemon: {e}"),
    }
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).expect("a whole reply");
    Some(buf)
}

fn connect(socket: &std::path::Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(&frame(
        br#"{"type":"hello","protocol_version":1,"client":"junk test"}"#,
    ))
    .expect("hello");
    let reply: Value = serde_json::from_slice(&read_frame(&mut s).expect("hello reply"))
        .expect("hello reply is JSON");
    assert_eq!(reply["type"], "hello", "{reply}");
    s
}

/// Checks a reply frame: JSON, with no key in it (a call's body is base64 on the wire, so it is
/// decoded first), and an error says why. Returns its kind: the reply's type, or the error's code.
fn check_reply(bytes: &[u8]) -> String {
    assert_no_key(bytes, "a reply frame");
    let v: Value = serde_json::from_slice(bytes).expect("every reply is JSON");
    let mut kind = v["type"].as_str().unwrap_or("?").to_owned();
    if v["type"] == "error" {
        let message = v["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "an error without a reason: {v}");
        kind = format!("error:{}", v["code"].as_str().unwrap_or("?"));
    }
    if let Some(body) = v["body"].as_str() {
        assert_no_key(
            &STANDARD.decode(body).expect("base64 body"),
            "a call's body",
        );
    }
    kind
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_on_the_socket_and_the_gateway_never_takes_the_daemon_down() {
    let up = Upstream::start(None).await;
    let mut d = TestDaemon::start_extra(&up, "gateway = \"127.0.0.1:0\"");
    let gateway = d.gateway_url().await;
    let addr = gateway.trim_start_matches("http://").to_owned();
    let token = d.mint("echo", "* /**", 1000).await.token;
    let socket_rounds = 1500;
    let gateway_rounds = 1500;
    let (socket, token2) = (d.socket.clone(), token.clone());

    // The native socket: good requests, most of them mutated, some also cut or mislabelled at
    // the byte level, on one connection while the daemon keeps it open.
    let good: Vec<Value> = vec![
        json!({"type": "status"}),
        json!({"type": "services"}),
        json!({"type": "mint", "service": "echo", "allow": ["GET /a/*"], "uses": 2, "ttl_secs": 60, "note": "n"}),
        json!({"type": "mint", "service": "other", "from": token, "allow": ["GET /**"]}),
        json!({"type": "call", "token": token, "method": "GET", "path": "/junk", "headers": [["x-a", "b"]], "body": "aGk="}),
        json!({"type": "call", "service": "q", "method": "GET", "path": "/junk?x=1"}),
        json!({"type": "call", "service": "basic", "method": "GET", "path": "/junk"}),
        json!({"type": "call", "token": token, "service": "echo", "method": "POST", "path": "/status/500", "body": ""}),
        json!({"type": "inspect", "token_or_id": token}),
        json!({"type": "tokens", "all": true, "limit": 5}),
        json!({"type": "audit", "limit": 5, "event": "mint"}),
        json!({"type": "pubkey"}),
    ];
    let sent_before = up.hits();
    let mut rng = seeded();
    let seeds = [rng.next() | 1, rng.next() | 1];
    let socket_task = tokio::task::spawn_blocking(move || {
        let mut rng = Rng(seeds[0]);
        let mut s: Option<UnixStream> = None;
        let mut kinds = std::collections::BTreeMap::<String, u32>::new();
        for _ in 0..socket_rounds {
            let mut v = good[rng.below(good.len())].clone();
            // A third go as they are: good requests between bad ones on the same connection.
            for _ in 0..rng.below(3) {
                mutate_request(&mut v, &mut rng, &token2);
            }
            let mut payload = serde_json::to_vec(&v).expect("json");
            let mut bytes = frame(&payload);
            let mut cut = false;
            match rng.below(40) {
                // A byte changed inside the JSON.
                0 | 1 => {
                    let i = rng.below(payload.len());
                    payload[i] = rng.next() as u8;
                    bytes = frame(&payload);
                }
                // A length that promises more than comes, or the frame cut short.
                2 => {
                    bytes[..4].copy_from_slice(&(payload.len() as u32 + 7).to_be_bytes());
                    cut = true;
                }
                3 => {
                    bytes.truncate(rng.below(bytes.len()));
                    cut = true;
                }
                // Past the frame size limit.
                4 => bytes[..4].copy_from_slice(&u32::MAX.to_be_bytes()),
                _ => {}
            }
            let conn = s.get_or_insert_with(|| connect(&socket));
            if conn.write_all(&bytes).is_err() {
                s = None;
                continue;
            }
            if cut {
                // The daemon waits for the rest; end the connection so it sees it never comes.
                let _ = conn.shutdown(Shutdown::Write);
            }
            match read_frame(conn) {
                Some(reply) => *kinds.entry(check_reply(&reply)).or_default() += 1,
                None => {
                    *kinds.entry("closed".into()).or_default() += 1;
                    s = None;
                }
            }
            if cut {
                s = None;
            }
        }
        kinds
    });

    // The gateway: raw HTTP requests put together from good and bad parts.
    let gw_task = tokio::task::spawn_blocking({
        let token = token.clone();
        let seed = seeds[1];
        move || {
            let mut rng = Rng(seed);
            let mut statuses = std::collections::BTreeMap::<String, u32>::new();
            for _ in 0..gateway_rounds {
                let (request, complete) = junk_http(&mut rng, &token);
                let mut s = TcpStream::connect(&addr).expect("connect to the gateway");
                s.set_read_timeout(Some(Duration::from_secs(30)))
                    .expect("timeout");
                // The gateway may close early (a bad request line): then the rest is not taken.
                let _ = s.write_all(&request);
                if !complete {
                    // It waits for the rest of the body; end the connection so it sees it never
                    // comes. (hyper then drops the request unanswered: a caller gone mid-request.)
                    let _ = s.shutdown(Shutdown::Write);
                }
                let mut answer = Vec::new();
                let mut reset = false;
                match s.read_to_end(&mut answer) {
                    Ok(_) => {}
                    // Closed with some of the request unread (hyper refused its head).
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => reset = true,
                    Err(e) => panic!(
                        "no answer from the gateway ({e}) to {:?}",
                        String::from_utf8_lossy(&request[..request.len().min(300)])
                    ),
                }
                assert!(
                    !answer.is_empty() || !complete || reset,
                    "no answer to a whole request: {:?}",
                    String::from_utf8_lossy(&request[..request.len().min(300)])
                );
                if !answer.is_empty() {
                    assert!(
                        answer.starts_with(b"HTTP/1."),
                        "{:?}",
                        String::from_utf8_lossy(&answer)
                    );
                }
                assert_no_key(&answer, "a gateway answer");
                assert_no_key(&dechunk(&answer), "a gateway answer, de-chunked");
                let status = String::from_utf8_lossy(&answer[..answer.len().min(12)])
                    .get(9..12)
                    .unwrap_or(if reset { "reset" } else { "closed" })
                    .to_owned();
                *statuses.entry(status).or_default() += 1;
            }
            statuses
        }
    });
    let kinds = socket_task.await.expect("socket junk");
    let statuses = gw_task.await.expect("gateway junk");
    eprintln!("socket replies: {kinds:?}\ngateway answers: {statuses:?}");
    // The junk reached deep, not only the parsers: some of it was served and sent upstream.
    for kind in ["minted", "called", "error:bad_request", "error:bad_frame"] {
        assert!(kinds.get(kind).is_some_and(|n| *n >= 10), "{kinds:?}");
    }
    for status in ["200", "400", "401", "403"] {
        assert!(
            statuses.get(status).is_some_and(|n| *n >= 10),
            "{statuses:?}"
        );
    }
    assert!(
        up.hits() >= sent_before + 50,
        "{} sent",
        up.hits() - sent_before
    );

    // Still up, still serving, still honest.
    assert!(
        d.child.try_wait().expect("the daemon's state").is_none(),
        "tilld exited:\n{}",
        d.log_text()
    );
    let fresh = d.mint("echo", "GET /after", 1).await.token;
    let hits = up.hits();
    let resp = till_tests::http()
        .get(format!("{gateway}/proxy/echo/after"))
        .bearer_auth(&fresh)
        .send()
        .await
        .expect("gateway after the junk");
    assert_eq!(resp.status(), 200);
    assert_eq!(up.hits(), hits + 1);
    assert_eq!(
        up.seen().last().expect("seen").headers["authorization"],
        format!("Bearer {SECRET}")
    );
    let mut c = connect(&d.socket);
    c.write_all(&frame(br#"{"type":"status"}"#))
        .expect("status");
    check_reply(&read_frame(&mut c).expect("status reply"));
    d.assert_trail_verifies();
    let log = d.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert_no_key(log.as_bytes(), "the log");
    assert_no_key(d.audit_text().as_bytes(), "the audit trail");
    let _ = d.terminate();
}

/// A raw HTTP/1 request from parts: each part is good most of the time and bad now and then
/// (method, target, version, where the token goes or a broken one, other headers, framing, body),
/// so most requests get past hyper's parser and into the gateway.
/// Also whether the request is whole: its framing promises no more body than it carries.
fn junk_http(rng: &mut Rng, token: &str) -> (Vec<u8>, bool) {
    let method = if rng.chance(95) {
        rng.pick(&[
            "GET", "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS",
        ])
    } else {
        rng.pick(&["CONNECT", "TRACE", "get", "G\0T", ""])
    };
    let service = rng.pick(&[
        "echo", "echo", "echo", "other", "q", "basic", "nope", "", "..", "%2e",
    ]);
    let mut tail = junk_string(rng, token);
    if rng.chance(85) {
        // What a URL may carry; the rest percent-encoded, as a client would send it.
        tail = tail
            .bytes()
            .map(|c| match c {
                b'!'..=b'~' if c != b'"' && c != b'\\' => (c as char).to_string(),
                _ => format!("%{c:02X}"),
            })
            .collect();
    }
    let target = match rng.below(10) {
        0..=4 => format!("/proxy/{service}/{tail}"),
        5..=7 => format!("/v1/{tail}"),
        8 => rng
            .pick(&[
                "/healthz",
                "/metrics",
                "/mcp",
                "*",
                "/",
                "/admin/keys",
                "http://127.0.0.1:1/x",
            ])
            .to_owned(),
        _ => tail,
    };
    let version = if rng.chance(95) {
        rng.pick(&["HTTP/1.1", "HTTP/1.0"])
    } else {
        rng.pick(&["HTTP/2.0", "HTTP/9", ""])
    };
    let mut head = format!("{method} {target} {version}\r\n").into_bytes();
    let mut header = |name: &str, value: &str| {
        head.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    };
    if rng.chance(95) {
        header(
            "Host",
            rng.pick(&["127.0.0.1", "api.openai.com", "evil.example:443", ""]),
        );
    }
    let presented = match rng.below(4) {
        0 | 1 => token.to_owned(),
        2 => junk_string(rng, token).replace(['\r', '\n'], ""),
        _ => {
            let mut t: Vec<char> = token.chars().collect();
            let i = rng.below(t.len());
            t[i] = 'A';
            t.into_iter().collect()
        }
    };
    match rng.below(6) {
        0 | 1 => header("Authorization", &format!("Bearer {presented}")),
        2 => header("Authorization", &format!("token {presented}")),
        3 => header("x-api-key", &presented),
        4 => header("x-goog-api-key", &presented),
        _ => header("Authorization", &format!("Basic {presented}")),
    }
    for _ in 0..rng.below(3) {
        let name = if rng.chance(95) {
            rng.pick(&[
                "x-till-method",
                "x-http-method-override",
                "te",
                "upgrade",
                "accept-encoding",
                "x-forwarded-host",
                "content-type",
                "cookie",
                "authorization",
                "x-api-key",
            ])
        } else {
            rng.pick(&["x\0bad", "", "a b"])
        };
        let value = junk_string(rng, token).replace(['\r', '\n', '\0'], "");
        header(name, &value);
    }
    let body: Vec<u8> = (0..rng.below(3000)).map(|_| rng.next() as u8).collect();
    let framing = rng.below(20);
    match framing {
        0..=11 => header("Content-Length", &body.len().to_string()),
        12 => header(
            "Content-Length",
            rng.pick(&["-1", "18446744073709551616", "10, 20", "999999999", "abc"]),
        ),
        13 => header(
            "Transfer-Encoding",
            rng.pick(&["chunked", "gzip, chunked", "bogus"]),
        ),
        _ => {}
    }
    header("Connection", "close");
    head.extend_from_slice(b"\r\n");
    head.extend_from_slice(&body);
    (head, !(12..=13).contains(&framing))
}

/// A chunked answer's body without its chunk framing (a key split by a chunk boundary would
/// otherwise go unseen); anything else as it is.
fn dechunk(answer: &[u8]) -> Vec<u8> {
    let Some(end) = find(answer, b"\r\n\r\n") else {
        return answer.to_vec();
    };
    let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
    if !head.contains("transfer-encoding: chunked") {
        return answer.to_vec();
    }
    let (mut rest, mut out) = (&answer[end + 4..], Vec::new());
    while let Some(line_end) = find(rest, b"\r\n") {
        let size = std::str::from_utf8(&rest[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
        let Some(size) = size.filter(|n| *n > 0 && line_end + 2 + *n <= rest.len()) else {
            break;
        };
        out.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
        rest = &rest[(line_end + 4 + size).min(rest.len())..];
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A line-oriented MCP host on `till mcp`'s stdio: writes JSON-RPC lines, reads them back.
struct McpHost {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl McpHost {
    fn start(socket: &std::path::Path) -> McpHost {
        let mut child = std::process::Command::new(till_tests::bin("till"))
            .arg("--socket")
            .arg(socket)
            .arg("mcp")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn till mcp");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        McpHost {
            child,
            stdin,
            lines,
        }
    }

    fn send(&mut self, line: &[u8]) {
        self.stdin.write_all(line).expect("write to till mcp");
        self.stdin.write_all(b"\n").expect("write to till mcp");
    }

    /// The answer to request `id`, skipping notifications; every line is checked for keys.
    fn answer(&mut self, id: u64) -> Value {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("no answer to request {id}: {e}"));
            assert_no_key(line.as_bytes(), "an MCP message");
            let v: Value = serde_json::from_str(&line).expect("every MCP message is JSON");
            if v["id"] == json!(id) {
                return v;
            }
        }
    }
}

/// An agent host that sends tool calls with mutated arguments (and now and then an unknown tool):
/// each gets an answer with its id (a result, a refusal, or a JSON-RPC error for arguments of the
/// wrong shape), none carries a key, and the session goes on to make a good call at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_tool_calls_through_till_mcp_get_answers_and_the_session_goes_on() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    let token = d.mint("echo", "* /**", 1000).await.token;
    let socket = d.socket.clone();
    let rounds = 400;
    let seed = seeded().next() | 1;
    let (outcomes, hits) = tokio::task::spawn_blocking(move || {
        let mut rng = Rng(seed);
        let mut host = McpHost::start(&socket);
        host.send(
            json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": {"name": "junk host", "version": "1"}}})
            .to_string()
            .as_bytes(),
        );
        assert!(host.answer(0)["result"].is_object(), "initialize failed");
        host.send(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        let good = [
            ("list_services", json!({})),
            (
                "request_token",
                json!({"service": "echo", "allow": ["GET /a/*"], "uses": 2, "ttl_seconds": 60, "purpose": "p"}),
            ),
            (
                "call_api",
                json!({"token": token, "method": "POST", "path": "/junk", "query": {"a": "b"}, "headers": {"x-a": "b"}, "body": "hi"}),
            ),
            (
                "call_api",
                json!({"service": "echo", "method": "GET", "path": "/junk"}),
            ),
            ("token_status", json!({"token": token})),
        ];
        let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
        for id in 1..=rounds {
            let (mut tool, mut args) = good[rng.below(good.len())].clone();
            if rng.chance(8) {
                tool = rng.pick(&["revoke_tokenx", "", "call_api\0", "🔒"]);
            }
            if rng.chance(5) {
                // A line that is not a JSON-RPC message at all, before the call.
                host.send(rng.pick(&[&b"not json"[..], b"{", b"[]", b"{\"jsonrpc\":\"2.0\"}", b"\"x\""]));
            }
            for _ in 0..rng.below(3) {
                mutate_request(&mut args, &mut rng, &token);
            }
            host.send(
                json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                    "params": {"name": tool, "arguments": args}})
                .to_string()
                .as_bytes(),
            );
            let answer = host.answer(id);
            let outcome = if answer["error"].is_object() {
                let message = answer["error"]["message"].as_str().unwrap_or_default();
                assert!(!message.is_empty(), "an error without a reason: {answer}");
                "protocol error"
            } else if answer["result"]["isError"] == json!(true) {
                "refused"
            } else {
                assert!(answer["result"].is_object(), "{answer}");
                "served"
            };
            *outcomes.entry(outcome.into()).or_default() += 1;
        }
        // The session goes on.
        let hits = up.hits();
        host.send(
            json!({"jsonrpc": "2.0", "id": rounds + 1, "method": "tools/call", "params": {
                "name": "call_api", "arguments": {"service": "echo", "method": "GET", "path": "/after"}}})
            .to_string()
            .as_bytes(),
        );
        let answer = host.answer(rounds + 1);
        assert_ne!(answer["result"]["isError"], json!(true), "{answer}");
        assert_eq!(up.hits(), hits + 1);
        let _ = host.child.kill();
        let _ = host.child.wait();
        (outcomes, up.hits())
    })
    .await
    .expect("mcp junk");
    eprintln!("MCP outcomes: {outcomes:?}");
    for outcome in ["served", "refused", "protocol error"] {
        assert!(
            outcomes.get(outcome).is_some_and(|n| *n >= 10),
            "{outcomes:?}"
        );
    }
    assert!(hits >= 20, "{hits} sent upstream");
    let log = d.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert_no_key(log.as_bytes(), "the log");
}
