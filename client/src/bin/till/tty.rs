//! Reading a key from a terminal without showing it, as `ssh-add` and `passwd` read theirs.

use std::io::{BufRead, IsTerminal, Read};

use anyhow::{Result, bail};

/// The new key for `till rotate`: all of stdin when it is a pipe or a file; from a terminal, one
/// line typed or pasted with echo off, so the key is neither on the screen nor in the
/// terminal's scrollback.
pub async fn read_new_key(service: &str) -> Result<String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut key = String::new();
        stdin.lock().read_to_string(&mut key)?;
        return Ok(key);
    }
    // Echo off before the prompt: what is typed after the prompt is never shown.
    let echo = EchoOff::on_stdin()?;
    eprint!("New key for {service} (not shown; Enter to end): ");
    let read = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map(|_| line)
    });
    let line = tokio::select! {
        line = read => line?,
        // Ctrl-C: the terminal gets its echo back before the process ends, which the default
        // SIGINT would not give it. (The blocked read cannot be cancelled, hence the exit.)
        _ = tokio::signal::ctrl_c() => {
            drop(echo);
            eprintln!("\ntill: cancelled; the key was not changed");
            std::process::exit(130);
        }
    };
    drop(echo);
    let line = line?;
    if line.trim().is_empty() {
        bail!("no key was entered; the key of {service} was not changed");
    }
    Ok(line)
}

/// The terminal on stdin with echo off, until dropped.
struct EchoOff(libc::termios);

#[allow(unsafe_code)]
impl EchoOff {
    fn on_stdin() -> Result<EchoOff> {
        // SAFETY: termios is plain data; tcgetattr fills it or fails, and then it is not used.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            bail!(
                "cannot read the terminal's settings: {}",
                std::io::Error::last_os_error()
            );
        }
        let mut quiet = saved;
        // Echo off, but the newline still shown (ECHONL) and line editing kept.
        quiet.c_lflag &= !libc::ECHO;
        quiet.c_lflag |= libc::ECHONL;
        // SAFETY: a termios that tcgetattr returned, one flag changed.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &quiet) } != 0 {
            bail!(
                "cannot turn the terminal's echo off: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(EchoOff(saved))
    }
}

#[allow(unsafe_code)]
impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `on_stdin`.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0) };
    }
}
