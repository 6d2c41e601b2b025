//! Examples live in this directory; see `mint_and_call.rs` and the config files.
