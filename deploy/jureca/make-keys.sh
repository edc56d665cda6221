#!/bin/bash
# Make the files a relay worker needs, and print what goes to the login node and the exit.
#
#   make-keys.sh KEY_ID EXIT_HOST:PORT FROM_PATTERN [DIR]
#
# KEY_ID        the worker's key id at the exit, e.g. jureca-1
# EXIT_HOST:PORT the exit as the login node dials it, e.g. exit.example.org:80
# FROM_PATTERN  the compute nodes as the login node sees them, for authorized_keys from=
#               (sshd patterns or CIDR, comma-separated), e.g. "10.0.0.0/8"
# DIR           where to write the files (default: the current directory)
#
# Writes (all mode 0600): relay_ed25519 + .pub (SSH key, no passphrase: a batch job has
# nobody to type it), KEY_ID.secret (the tunnel secret), socks.auth (local SOCKS5 password).
# Never overwrites an existing file.
set -euo pipefail

if [ $# -lt 3 ] || [ $# -gt 4 ]; then
    sed -n '4,17p' "$0" >&2
    exit 2
fi
key_id="$1"
exit_addr="$2"
from_pattern="$3"
dir="${4:-.}"

if ! [[ "${key_id}" =~ ^[A-Za-z0-9._-]{1,64}$ ]]; then
    echo "make-keys.sh: KEY_ID must be 1-64 characters from A-Z a-z 0-9 . _ -" >&2
    exit 2
fi
if ! [[ "${exit_addr}" =~ ^[^[:space:]\"]+:[0-9]+$ ]]; then
    echo "make-keys.sh: EXIT_HOST:PORT expected, got '${exit_addr}'" >&2
    exit 2
fi
if [[ "${from_pattern}" == *[[:space:]\"]* ]]; then
    echo "make-keys.sh: FROM_PATTERN must not contain spaces or quotes" >&2
    exit 2
fi

umask 077
mkdir -p "${dir}"
for name in relay_ed25519 relay_ed25519.pub "${key_id}.secret" socks.auth; do
    if [ -e "${dir}/${name}" ]; then
        echo "make-keys.sh: ${dir}/${name} exists; not overwriting anything" >&2
        exit 1
    fi
done

random() {
    # URL-safe base64 of 32 random bytes: no whitespace, nothing a shell or TOML would mangle.
    head -c 32 /dev/urandom | base64 | tr -d '\n=' | tr '+/' '-_'
}

ssh-keygen -q -t ed25519 -N "" -C "hpc-relay ${key_id}" -f "${dir}/relay_ed25519"
secret="$(random)"
printf '%s\n' "${secret}" > "${dir}/${key_id}.secret"
printf 'glidein:%s\n' "$(random)" > "${dir}/socks.auth"
chmod 0600 "${dir}/relay_ed25519" "${dir}/${key_id}.secret" "${dir}/socks.auth"

pubkey="$(cat "${dir}/relay_ed25519.pub")"
cat <<INSTRUCTIONS
Wrote ${dir}/relay_ed25519(.pub), ${dir}/${key_id}.secret, ${dir}/socks.auth (mode 0600).

1. Login nodes: add this line to ~/.ssh/authorized_keys of the batch account (or register it
   the way the site requires). It allows nothing but forwarding to the exit, and only from
   the compute nodes:

from="${from_pattern}",restrict,port-forwarding,permitopen="${exit_addr}",command="/bin/false" ${pubkey}

2. Exit VM: append this line to /etc/hpc-relay/exit.keys (owner hpc-relay, mode 0600), send
   it over a private channel, then run: systemctl reload relay-exit

${key_id} ${secret}

3. known_hosts: fetch the login nodes' host keys and compare the fingerprints with the ones
   the site publishes before trusting them:

   ssh-keyscan -t ed25519 LOGIN_NODE >> ${dir}/known_hosts && ssh-keygen -lf ${dir}/known_hosts

4. Check the chain: relay check --config worker.toml --probe COLLECTOR:9618
INSTRUCTIONS
