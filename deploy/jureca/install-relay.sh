#!/bin/bash
# Install hpc-relay into a virtualenv on a shared filesystem, without root.
#
#   install-relay.sh RELAY_HOME [PACKAGE...]
#
# RELAY_HOME   a directory every compute node mounts at the same path (project space)
# PACKAGE      what pip installs (default: hpc-relay); a wheel, a source directory or a
#              requirement such as hpc-relay==0.2.0. Login nodes reach PyPI over 443.
# PYTHON       environment variable: the interpreter to build the venv from (default python3;
#              >= 3.9). Load the site's Python module first if the system one is older, and
#              put the same module load into site_setup() of glidein.sbatch.
set -euo pipefail

if [ $# -lt 1 ]; then
    sed -n '4,12p' "$0" >&2
    exit 2
fi
relay_home="$1"
shift
if [ $# -eq 0 ]; then
    set -- hpc-relay
fi
python="${PYTHON:-python3}"

if ! "${python}" -c 'import sys; sys.exit(sys.version_info < (3, 9))'; then
    echo "install-relay.sh: ${python} is older than 3.9; set PYTHON or load the site's module" >&2
    exit 2
fi

umask 022
mkdir -p "${relay_home}/etc" "${relay_home}/logs"
chmod 0700 "${relay_home}/etc"
if [ ! -x "${relay_home}/venv/bin/python" ]; then
    "${python}" -m venv "${relay_home}/venv"
fi
"${relay_home}/venv/bin/python" -m pip install --quiet --upgrade pip
"${relay_home}/venv/bin/python" -m pip install --quiet --upgrade "$@"
"${relay_home}/venv/bin/relay" version
echo "installed into ${relay_home}/venv; configuration goes to ${relay_home}/etc (mode 0700)"
