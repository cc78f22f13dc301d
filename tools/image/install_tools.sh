#!/usr/bin/env bash
# Installs the Debian packages the image build or its test needs, when their command is missing.
# Usage: install_tools.sh <command>[=<package>] ...   (the package defaults to the command's name)
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
missing=()
for spec in "$@"; do
    cmd="${spec%%=*}"
    pkg="${spec#*=}"
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    printf '[image] installing %s with apt-get\n' "${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
