//! Narrowed tokens: a holder mints a child for a sub-agent; children spend the parent's budget.

use till_protocol::{CallRequest, ErrorCode, MintRequest, RevokeTarget, TokenState};
use till_tests::{Client, ClientError, TestDaemon, Upstream};

fn mint(uses: u32, allow: &str, from: Option<&str>) -> MintRequest {
    MintRequest {
        service: "echo".into(),
        allow: vec![allow.into()],
        uses: Some(uses),
        from: from.map(str::to_owned),
        ..MintRequest::default()
    }
}

fn call(token: &str, path: &str) -> CallRequest {
    CallRequest {
        token: Some(token.into()),
        method: "GET".into(),
        path: path.into(),
        ..CallRequest::default()
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn children_never_overspend_their_parent_under_a_race() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    let mut c = d.client().await;
    let parent = c
        .mint(mint(10, "GET /d/**", None))
        .await
        .expect("parent")
        .token;
    let mut holders = vec![parent.clone()];
    for _ in 0..3 {
        let child = c
            .mint(mint(5, "GET /d/**", Some(&parent)))
            .await
            .expect("child of 5")
            .token;
        holders.push(child);
    }
    // Four holders, eight connections each, every one spending until refused.
    let mut tasks = Vec::new();
    for token in &holders {
        for _ in 0..8 {
            let socket = d.socket.clone();
            let token = token.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = Client::connect(&socket).await.expect("connect");
                let mut ok = 0u32;
                while c.call(call(&token, "/d/x")).await.is_ok() {
                    ok += 1;
                }
                ok
            }));
        }
    }
    let mut honoured = 0;
    for t in tasks {
        honoured += t.await.expect("task");
    }
    assert_eq!(honoured, 10, "the parent's 10 activations, no more");
    assert_eq!(
        up.hits(),
        10,
        "the upstream saw at most (and here exactly) 10 requests"
    );
    let p = c.inspect(&parent).await.expect("inspect");
    assert_eq!((p.used, p.state), (10, TokenState::Spent));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_is_narrower_and_dies_with_its_parent() {
    let up = Upstream::start(None).await;
    let d = TestDaemon::start(&up);
    let mut c = d.client().await;
    let parent = c.mint(mint(4, "GET /d/**", None)).await.expect("parent");
    assert_eq!(
        code(c.mint(mint(1, "GET /other", Some(&parent.token))).await),
        ErrorCode::OverCeiling
    );
    assert_eq!(
        code(c.mint(mint(5, "GET /d/**", Some(&parent.token))).await),
        ErrorCode::OverCeiling
    );
    let mut long = mint(1, "GET /d/x", Some(&parent.token));
    long.ttl_secs = Some(24 * 3600);
    assert_eq!(code(c.mint(long).await), ErrorCode::OverCeiling);
    let mut other = mint(1, "GET /d/x", Some(&parent.token));
    other.service = "other".into();
    assert_eq!(code(c.mint(other).await), ErrorCode::WrongService);

    let child = c
        .mint(mint(2, "GET /d/x", Some(&parent.token)))
        .await
        .expect("child");
    assert_eq!(child.info.parent.as_deref(), Some(parent.info.id.as_str()));
    assert_eq!(
        code(c.call(call(&child.token, "/d/y")).await),
        ErrorCode::OutOfScope
    );
    c.call(call(&child.token, "/d/x"))
        .await
        .expect("the child spends");
    assert_eq!(
        c.inspect(&parent.token).await.expect("inspect").used,
        1,
        "and so does its parent"
    );

    // The CLI narrows too.
    let out = d.till(&[
        "mint",
        "echo",
        "--from",
        &parent.token,
        "--allow",
        "GET /d/cli",
        "--uses",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grandchild_parent = String::from_utf8_lossy(&out.stdout).trim().to_owned();

    // Two levels down.
    let grandchild = c
        .mint(mint(1, "GET /d/x", Some(&child.token)))
        .await
        .expect("grandchild")
        .token;

    let r = c
        .revoke(RevokeTarget::Token(parent.token.clone()))
        .await
        .expect("revoke the parent");
    assert_eq!(
        (r.revoked.len(), r.count),
        (4, 4),
        "the parent, its two children and its grandchild"
    );
    assert_eq!(
        c.inspect(&grandchild).await.expect("inspect").state,
        TokenState::Revoked
    );
    assert_eq!(
        code(c.call(call(&child.token, "/d/x")).await),
        ErrorCode::Revoked
    );
    assert_eq!(
        code(c.call(call(&grandchild_parent, "/d/cli")).await),
        ErrorCode::Revoked
    );
    assert_eq!(
        c.inspect(&child.token).await.expect("inspect").state,
        TokenState::Revoked
    );
    assert_eq!(up.hits(), 1);
}
