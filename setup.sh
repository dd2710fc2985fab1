#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with torch, our package (whose Rust BPE
# extension is compiled by maturin during the install) and the test tools.
#   bash setup.sh            # then: source .venv/bin/activate
# On a normal machine this resolves everything from PyPI and crates.io (torch gets its CUDA build
# on Linux). On a machine without crates.io but with Debian's packaged Rust crates, it builds the
# extension offline against those (see .cargo/config.toml, written here and git-ignored).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
DEBIAN_CRATES=/usr/share/cargo/registry

log() { echo "[setup] $*"; }

# 1. Rust toolchain: maturin needs cargo to compile rustbpe/.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || { echo "[setup] error: cargo not found; install Rust (https://rustup.rs) and re-run" >&2; exit 1; }

# 2. Where crates.io is unreachable, build against Debian's packaged crates instead.
crates_io_reachable() {
    "$PYTHON" - <<'PY'
import socket, sys
try:
    socket.create_connection(("index.crates.io", 443), timeout=3).close()
except OSError:
    sys.exit(1)
PY
}
if [ "${NANOCHAT_OFFLINE_CRATES:-auto}" = "1" ] || { [ "${NANOCHAT_OFFLINE_CRATES:-auto}" = "auto" ] && ! crates_io_reachable; }; then
    if [ ! -d "$DEBIAN_CRATES/pyo3-0.17.3" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        log "crates.io unreachable: installing Debian's packaged Rust crates"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            librust-pyo3-dev librust-rayon-dev librust-fancy-regex-dev librust-ahash-dev \
            librust-indexmap-dev librust-log-dev librust-regex-dev librust-rustc-hash-dev >/dev/null
    fi
    if [ -d "$DEBIAN_CRATES/pyo3-0.17.3" ]; then
        log "using Debian's crates from $DEBIAN_CRATES (.cargo/config.toml, git-ignored)"
        mkdir -p .cargo
        cat > .cargo/config.toml <<TOML
[source.crates-io]
replace-with = "debian"
[source.debian]
directory = "$DEBIAN_CRATES"
[net]
offline = true
TOML
        rm -f rustbpe/Cargo.lock
    else
        echo "[setup] error: crates.io is unreachable and Debian's Rust crates are not installed" >&2
        exit 1
    fi
fi

# 3. Headless Chromium for the browser test of the chat UI (Debian's package; Playwright drives it).
#    Skipped where it cannot be installed (then that one test skips loudly); NANOCHAT_NO_BROWSER=1 skips it.
if [ "${NANOCHAT_NO_BROWSER:-0}" != "1" ] && ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        log "installing Debian's chromium for the browser test (NANOCHAT_NO_BROWSER=1 skips this)"
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
            || log "warning: could not install chromium; the browser test will skip"
    else
        log "note: no chromium and no root apt-get; the browser test will skip"
    fi
fi

# 3b. bubblewrap: the kernel-level sandbox for model-written code (nanochat/execution.py; HumanEval runs it).
#    Skipped where apt is unavailable: execute_code then falls back to in-process guards and warns loudly.
if ! command -v bwrap >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        log "installing Debian's bubblewrap (the sandbox for model-written code)"
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null \
            || log "warning: could not install bubblewrap; model-written code will run without kernel isolation"
    else
        log "note: no bwrap and no root apt-get; model-written code will run without kernel isolation (install bubblewrap)"
    fi
fi

# 4. The environment.
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python
# pip warns once per package about local index folders some machines configure; keep real errors only
pip_install() { "$VPY" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip_install --upgrade pip
log "installing $TORCH_SPEC"
pip_install "$TORCH_SPEC" numpy
log "installing nanochat (compiles the Rust BPE extension with maturin) and test tools"
pip_install -e ".[dev]"
"$VPY" -c "import torch, nanochat.rustbpe; print('[setup] ok: torch', torch.__version__, '| cuda', torch.cuda.is_available(), '| rustbpe', nanochat.rustbpe.__version__)"
log "done. Activate with: source .venv/bin/activate"
