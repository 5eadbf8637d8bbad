#!/usr/bin/env bash
# bootstrap/bundle.sh — packs what Packer uploads to the builder, as one archive:
#
#   bootstrap/bundle.sh OUT.tar.gz                      bootstrap/ and the source to build the supervisor from
#   bootstrap/bundle.sh OUT.tar.gz SUPERVISOR_BINARY    bootstrap/ and that binary, as bin/agent-supervisor
#
# An empty SUPERVISOR_BINARY is the same as none (the Packer template always passes one).
#
# Files are the repository's as git lists them (tracked, and new ones not ignored), so
# an uncommitted change is built as it is and target/ or .venv/ never travel. Outside a
# git checkout, everything but those build directories.
set -euo pipefail

(($# == 1 || $# == 2)) || {
  echo "usage: bundle.sh OUT.tar.gz [SUPERVISOR_BINARY]" >&2
  exit 2
}
out=$1
binary=${2:-}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# NUL-separated repository files under the given paths.
list_files() {
  if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$repo" ls-files -z --cached --others --exclude-standard -- "$@"
  else
    (cd "$repo" && find "$@" \( -name .git -o -name target -o -name .venv -o -name .tools \
      -o -name .bed -o -path ./packer/out \) -prune -o -type f -print0)
  fi
}

if [[ -n $binary ]]; then
  [[ -f $binary ]] || {
    echo "bundle.sh: supervisor binary $binary does not exist" >&2
    exit 1
  }
  paths=(bootstrap)
  mkdir "$stage/bin"
  cp "$binary" "$stage/bin/agent-supervisor"
  chmod 0755 "$stage/bin/agent-supervisor"
else
  paths=(.)
fi

# A file git still lists but the work tree has deleted is left out.
while IFS= read -r -d '' f; do
  if [[ -f $repo/$f ]]; then printf '%s\0' "$f"; fi
done < <(list_files "${paths[@]}") | tar -C "$repo" --null -T - -cf - | tar -C "$stage" -xf -

[[ -x $stage/bootstrap/provision.sh ]] || {
  echo "bundle.sh: bootstrap/provision.sh missing from the bundle" >&2
  exit 1
}
mkdir -p "$(dirname "$out")"
tar -C "$stage" -czf "$out" .
echo "bundle.sh: $out ($(du -h "$out" | cut -f1)): $(if [[ -n $binary ]]; then echo "prebuilt supervisor"; else echo "source to build"; fi)"
