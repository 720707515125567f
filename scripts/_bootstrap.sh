# Sourced by the scripts: makes sure .venv exists with the pinned dependencies,
# the daemon and client installed editable, and the pinned claude CLI on its PATH.
# Idempotent and quick when nothing changed (a stamp keyed on the requirement files).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

_stamp_inputs() {
  cat "$ROOT"/requirements/*.txt "$ROOT/pyproject.toml" "$ROOT/client/pyproject.toml"
}

bootstrap() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  local want have
  want="$(_stamp_inputs | sha256sum | cut -d' ' -f1)"
  have="$(cat "$VENV/.atomizerd-stamp" 2>/dev/null || true)"
  if [ "$want" != "$have" ]; then
    echo "setting up $VENV (pinned dependencies)..." >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements/dev.txt"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$ROOT/requirements/agent.txt"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$ROOT/client" -e "$ROOT"
    echo "$want" > "$VENV/.atomizerd-stamp"
  fi
  # The pinned Claude Code CLI ships inside the claude-agent-sdk wheel.
  local bundled
  # (Located without importing the SDK: it is installed --no-deps, only for the binary.)
  bundled="$("$VENV/bin/python" -c 'import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec("claude_agent_sdk").submodule_search_locations[0]) / "_bundled" / "claude")' 2>/dev/null || true)"
  if [ -n "$bundled" ] && [ -x "$bundled" ]; then ln -sf "$bundled" "$VENV/bin/claude"; fi
  export PATH="$VENV/bin:$PATH"
}
