# Shared by scripts/run and scripts/test: where cargo builds, and installing Debian packages once.

# Builds go outside the clone so CI's fresh clones reuse the compiled dependencies.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/messina-target}"

log() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }

# ensure_commands PACKAGE COMMAND... installs PACKAGE with apt-get when any COMMAND is missing.
ensure_commands() {
  local package=$1; shift
  local cmd
  for cmd in "$@"; do
    if ! command -v "$cmd" >/dev/null 2>&1; then
      log "installing $package (for $cmd)"
      if [ "$(id -u)" -ne 0 ]; then
        log "need root to run apt-get; install $package yourself: sudo apt-get install $package"
        exit 1
      fi
      if [ -z "${APT_UPDATED:-}" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
      fi
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null
      return
    fi
  done
}

ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    log "cargo not found: install Rust with rustup (https://rustup.rs), then run this again"
    exit 1
  fi
}
