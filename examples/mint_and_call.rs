//! Mint a one-activation token through the client library, then spend it on one request.
//!
//! ```sh
//! cargo run -p till-examples --example mint_and_call -- openai GET /v1/models
//! ```
//! The socket comes from `$TILL_SOCKET` or the default path, as for the `till` CLI.

use anyhow::{Context, Result};
use till_client::till_protocol::{CallRequest, MintRequest};
use till_client::{Client, socket_path};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let service = args.next().unwrap_or_else(|| "openai".into());
    let method = args.next().unwrap_or_else(|| "GET".into());
    let path = args.next().unwrap_or_else(|| "/v1/models".into());

    let mut till = Client::connect(&socket_path(None)).await?;
    let minted = till
        .mint(MintRequest {
            service: service.clone(),
            allow: vec![format!("{method} {path}")],
            uses: Some(1),
            note: Some("examples/mint_and_call.rs".into()),
            ..MintRequest::default()
        })
        .await
        .context("mint")?;
    println!(
        "minted {} for {service}: {} activation(s)",
        minted.info.id, minted.info.uses
    );

    let reply = till
        .call(CallRequest {
            token: Some(minted.token),
            method,
            path,
            ..CallRequest::default()
        })
        .await
        .context("call")?;
    println!(
        "HTTP {} ({} bytes, {} activation(s) left)",
        reply.status,
        reply.body.len(),
        reply.activations_remaining
    );
    Ok(())
}
