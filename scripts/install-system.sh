#!/usr/bin/env bash
# Installs Till as a system service: binaries in /usr/local/bin, a `till` user that alone can read the
# keys, a `till-agents` group whose members may use the sockets, the units, an example config and
# bash completion for `till`.
# Run as root from a checkout. Safe to run again (nothing existing is overwritten but the binaries,
# the units and the completion script).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (sudo $0)" >&2; exit 1; }

cargo install --locked --path daemon --root /usr/local --force
cargo install --locked --path client --root /usr/local --force

getent group till >/dev/null || groupadd --system till
getent group till-agents >/dev/null || groupadd --system till-agents
getent passwd till >/dev/null || useradd --system --gid till --home-dir /var/lib/till --no-create-home \
  --shell /usr/sbin/nologin --comment "Till credential broker" till

install -m 0644 systemd/tilld.service systemd/tilld.socket /etc/systemd/system/
install -m 0644 systemd/tilld.tmpfiles /etc/tmpfiles.d/till.conf
systemd-tmpfiles --create /etc/tmpfiles.d/till.conf
if [ ! -e /etc/till/till.toml ]; then
  install -m 0640 -g till examples/system-till.toml /etc/till/till.toml
fi
if [ -d /usr/share/bash-completion/completions ]; then
  /usr/local/bin/till completions bash > /usr/share/bash-completion/completions/till
fi
systemctl daemon-reload

cat <<'NEXT'
Installed. Next:
  1. Put each key in /etc/till/credentials/NAME.key (root-owned, mode 0600), e.g.
       install -m 0600 /dev/stdin /etc/till/credentials/openai.key <<< "sk-..."
     and list it in the unit: `systemctl edit tilld` →
       [Service]
       LoadCredential=NAME:/etc/till/credentials/NAME.key
     with `secret = { credential = "NAME" }` in /etc/till/till.toml.
  2. Check the config:         tilld --check --config /etc/till/till.toml
     (as the service sees it: systemd-run -P -p LoadCredential=openai:/etc/till/credentials/openai.key \
        -p User=till tilld --check --config /etc/till/till.toml)
  3. Start it:                 systemctl enable --now tilld.socket tilld.service
  4. Let a developer in:       usermod -aG till-agents alice   (then log in again)
     and they use it with:     till status   (it finds /run/till/till.sock by itself)
NEXT
