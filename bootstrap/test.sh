#!/usr/bin/env bash
# bootstrap/test.sh — checks the AMI side (packer/, bootstrap/) with no AWS account and
# no network but the package registries:
#
#   - shellcheck on every script; `packer fmt -check` and a parse of the template, and
#     bootstrap/check_template.py for what the Packer here cannot check;
#   - the bundle Packer uploads;
#   - `systemd-analyze verify` on every unit;
#   - the provisioning steps that need no network, in throwaway roots: the agent's
#     sha256 pin (a good, a bad, a malformed and a missing one), the agent user, owners
#     and modes, the unit and its enablement, the image clean-up, and idempotence (a
#     second run leaves every path, mode, owner and hash as it was).
#
# Prints a line per check and ends with `bootstrap: N passed, N failed, N skipped`;
# exits 1 if any check failed. Writes only to its temp dir, the venv ($VENV, default
# .venv; bootstrap/requirements-test.txt) and $TOOLS_DIR (default .tools; Debian's packer
# and visudo, unpacked with dpkg-deb, not installed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
VENV=$(realpath -m "${VENV:-.venv}")
TOOLS_DIR=$(realpath -m "${TOOLS_DIR:-.tools}")
TARGET_DIR=${CARGO_TARGET_DIR:-target}

passed=0 failed=0 skipped=0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

ok() {
  printf 'ok    %s\n' "$1"
  passed=$((passed + 1))
}
fail() {
  printf 'FAIL  %s\n' "$1"
  if [[ -n ${2:-} ]]; then printf '%s\n' "$2" | sed 's/^/      /'; fi
  failed=$((failed + 1))
}
skip() {
  printf 'skip  %s: %s\n' "$1" "$2"
  skipped=$((skipped + 1))
}

# check WHAT CMD...: passes when CMD succeeds; shows its output when it does not.
check() {
  local what=$1 out
  shift
  if out=$("$@" 2>&1); then ok "$what"; else fail "$what" "$out"; fi
}

# refuses WHAT PATTERN CMD...: passes when CMD fails saying PATTERN.
refuses() {
  local what=$1 pattern=$2 out
  shift 2
  if out=$("$@" 2>&1); then
    fail "$what" "it succeeded: $out"
  elif ! grep -qE -- "$pattern" <<<"$out"; then
    fail "$what" "it failed, but without /$pattern/: $out"
  else
    ok "$what"
  fi
}

# Assertions for check: silent when true, saying what they found when not.
quiet() { # CMD...: its output only if it fails
  local out
  out=$("$@" 2>&1) || {
    printf '%s\n' "$out"
    return 1
  }
}
owned() { # PATH "MODE UID:GID"
  local got
  got=$(stat -c '%a %u:%g' "$1") && [[ $got == "$2" ]] || {
    echo "$1 is '$got', expected '$2'"
    return 1
  }
}
absent() { # PATH...
  local p
  for p; do [[ ! -e $p ]] || {
    echo "$p exists"
    return 1
  }; done
}
lists() { # ARCHIVE PATH...: the tar archive has these members
  local members p
  members=$(tar -tzf "$1")
  shift
  for p; do grep -qxF "./$p" <<<"$members" || {
    echo "no $p in the bundle"
    return 1
  }; done
}
lacks() { # ARCHIVE REGEX: no member matches
  ! tar -tzf "$1" | grep -E "$2"
}
verify_clean() { # ROOT UNIT: systemd-analyze verify exits 0 even on unknown keys: clean is silent
  local out
  out=$(systemd-analyze verify --root="$1" "$2" 2>&1) && [[ -z $out ]] || {
    printf '%s\n' "$out"
    return 1
  }
}
field() { awk -F: -v n="$3" -v f="$4" '$1 == n { print $f }' "$1/etc/$2"; } # ROOT FILE NAME FIELD
agent_user() { # ROOT: semaphore with its own group, in docker, bash, owning its home
  local r=$1 gid
  gid=$(field "$r" passwd semaphore 4)
  [[ -n $gid && $(field "$r" group semaphore 3) == "$gid" ]] || { echo "no group semaphore as primary group"; return 1; }
  [[ ,$(field "$r" group docker 4), == *,semaphore,* ]] || { echo "semaphore is not in docker: $(field "$r" group docker 4)"; return 1; }
  [[ $(field "$r" passwd semaphore 6):$(field "$r" passwd semaphore 7) == /home/semaphore:/bin/bash ]] || { grep semaphore "$r/etc/passwd"; return 1; }
  owned "$r/home/semaphore" "$(stat -c %a "$r/home/semaphore") $(field "$r" passwd semaphore 3):$gid"
}
# Every path under ROOT with its type, mode, owner, group and link target, then every
# file's hash.
manifest() {
  (cd "$1" && find . -printf '%p %y %m %U %G %l\n' | LC_ALL=C sort &&
    find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
}

# A tool from a Debian package, unpacked into $TOOLS_DIR/deb/PACKAGE (nothing is
# installed on this machine). Prints its path.
deb_tool() { # PACKAGE PATH
  local dir=$TOOLS_DIR/deb/$1 dl
  if [[ ! -x $dir/$2 ]]; then
    command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || return 1
    dl=$(mktemp -d -p "$work")
    chmod 755 "$dl" # apt's download user writes there
    if ! (cd "$dl" && apt-get download -q "$1" >/dev/null 2>&1); then
      ((EUID == 0)) || return 1
      echo "      (apt-get download $1 failed: updating apt's package lists and trying again)" >&2
      apt-get update -qq >/dev/null 2>&1 && (cd "$dl" && apt-get download -q "$1" >/dev/null 2>&1) || return 1
    fi
    mkdir -p "$dir"
    dpkg-deb -x "$dl/$1"_*.deb "$dir"
  fi
  printf '%s\n' "$dir/$2"
}

echo "== tools"
[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
if ! cmp -s bootstrap/requirements-test.txt "$VENV/.bootstrap-requirements"; then
  echo "      (installing bootstrap/requirements-test.txt into $VENV)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r bootstrap/requirements-test.txt
  cp bootstrap/requirements-test.txt "$VENV/.bootstrap-requirements"
fi
shellcheck=$VENV/bin/shellcheck
packer=$(command -v packer || deb_tool packer usr/bin/packer || true)
visudo=$(command -v visudo || deb_tool sudo usr/sbin/visudo || true)
echo "      shellcheck $("$shellcheck" --version | sed -n 's/^version: //p'); ${packer:+$("$packer" version | head -1)}"

echo "== scripts and template"
for f in bootstrap/*.sh; do
  check "shellcheck $f" "$shellcheck" "$f"
done
if [[ -z $packer ]]; then
  skip "packer fmt and validate" "no packer here, and no Debian package to unpack"
else
  check "packer fmt -check packer/" "$packer" fmt -check -diff packer/
  # Packer before 1.7 cannot read plugins.pkr.hcl's required_plugins, so it gets the
  # template alone. -syntax-only either way: the amazon plugin is not installed here.
  if "$packer" version | grep -q '^Packer v1\.[0-6]\.'; then
    check "packer validate -syntax-only packer/agent-fleet.pkr.hcl" "$packer" validate -syntax-only packer/agent-fleet.pkr.hcl
  else
    check "packer validate -syntax-only packer/" "$packer" validate -syntax-only packer/
  fi
fi
rc=0
out=$("$VENV/bin/python" bootstrap/check_template.py "$REPO" 2>&1) || rc=$?
printf '%s\n' "$out"
passed=$((passed + $(grep -c '^ok' <<<"$out" || true)))
n=$(grep -c '^FAIL' <<<"$out" || true)
failed=$((failed + n))
if ((rc != 0 && n == 0)); then fail "bootstrap/check_template.py" "exit $rc"; fi

# What Packer uploads: the source (compiled on the builder), or a prebuilt binary.
printf '#!/bin/sh\necho agent-supervisor 0\n' >"$work/fake-supervisor"
chmod 0755 "$work/fake-supervisor"
check "bundle.sh with source" quiet bootstrap/bundle.sh "$work/src.tar.gz"
check "  … has provision.sh, the unit and the workspace" lists "$work/src.tar.gz" \
  bootstrap/provision.sh bootstrap/systemd/agent-supervisor.service Cargo.toml Cargo.lock supervisor/src/main.rs cfn/agent-fleet.yaml
check "  … and no build output" lacks "$work/src.tar.gz" '^\./(target|\.venv|\.tools)/'
check "bundle.sh with a binary" quiet bootstrap/bundle.sh "$work/bin.tar.gz" "$work/fake-supervisor"
check "  … has bootstrap/ and bin/agent-supervisor" lists "$work/bin.tar.gz" bootstrap/provision.sh bin/agent-supervisor
check "  … and no source" lacks "$work/bin.tar.gz" '^\./(Cargo\.lock|supervisor/)'

echo "== systemd units"
if ! command -v systemd-analyze >/dev/null; then
  skip "systemd-analyze verify" "systemd-analyze is not installed here"
else
  # A root of its own: this machine's units (for the targets ours names) and a stand-in
  # at the ExecStart path, whose existence verify checks.
  vroot=$work/verify
  mkdir -p "$vroot/usr/lib/systemd/system" "$vroot/usr/local/bin"
  for d in /usr/lib/systemd/system /lib/systemd/system; do
    if [[ -d $d ]]; then cp -a "$d/." "$vroot/usr/lib/systemd/system/"; fi
  done
  cp "$work/fake-supervisor" "$vroot/usr/local/bin/agent-supervisor"
  for unit in bootstrap/systemd/*; do
    cp "$unit" "$vroot/usr/lib/systemd/system/"
    check "systemd-analyze verify $unit" verify_clean "$vroot" "${unit##*/}"
  done
fi

echo "== provisioning, in throwaway roots"
provision=$REPO/bootstrap/provision.sh
skip "wait_for_boot, remove_unattended_upgrades, install_packages, install_toolbox" \
  "apt, cloud-init and the toolbox's installer run on the image being built only (that they refuse other roots is checked below)"
skip "install_supervisor's build" "downloads rustup and crates on the builder; a built binary stands in here"
if ((EUID != 0)); then
  skip "provisioning steps" "they need root (useradd --root, chown)"
else
  # A bare Ubuntu-like root: accounts, the builder's machine-id and SSH keys, an apt cache.
  root=$work/root
  mkdir -p "$root"/etc/skel "$root"/root/.ssh "$root"/home/ubuntu/.ssh "$root"/var/lib/dbus "$root"/var/cache/apt/archives
  printf 'root:x:0:0:root:/root:/bin/bash\nubuntu:x:1000:1000::/home/ubuntu:/bin/bash\n' >"$root/etc/passwd"
  printf 'root:x:0:\nubuntu:x:1000:\n' >"$root/etc/group"
  printf 'root:*:19000:0:99999:7:::\nubuntu:!:19000:0:99999:7:::\n' >"$root/etc/shadow"
  printf 'root:*::\nubuntu:!::\n' >"$root/etc/gshadow"
  chmod 0640 "$root/etc/shadow" "$root/etc/gshadow"
  echo 'export PATH' >"$root/etc/skel/.profile"
  echo 0123456789abcdef0123456789abcdef >"$root/etc/machine-id"
  cp "$root/etc/machine-id" "$root/var/lib/dbus/machine-id"
  echo 'ssh-ed25519 AAAA packer' >"$root/root/.ssh/authorized_keys"
  cp "$root/root/.ssh/authorized_keys" "$root/home/ubuntu/.ssh/authorized_keys"
  echo deb >"$root/var/cache/apt/archives/git_1_amd64.deb"

  # Agent release archives made here: the pinned one, and one that is not.
  mkdir -p "$work/agent-good" "$work/agent-bad"
  printf '#!/bin/sh\necho agent v2.4.0\n' >"$work/agent-good/agent"
  printf '#!/bin/sh\necho not the agent\n' >"$work/agent-bad/agent"
  echo '#!/bin/bash' >"$work/agent-good/install.sh"
  cp "$work/agent-good/install.sh" "$work/agent-bad/install.sh"
  chmod 0700 "$work"/agent-*/agent
  tar -czf "$work/agent-good.tar.gz" -C "$work/agent-good" .
  tar -czf "$work/agent-bad.tar.gz" -C "$work/agent-bad" .
  pin=$(sha256sum "$work/agent-good.tar.gz" | cut -d' ' -f1)

  # The real supervisor if `make build` made one (its --version is then checked for
  # real), else a stand-in that answers the same way.
  version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
  supervisor=$TARGET_DIR/debug/agent-supervisor
  if [[ ! -x $supervisor ]]; then
    echo "      (no $supervisor: a stand-in reports agent-supervisor $version)"
    supervisor=$work/stand-in-supervisor
    printf '#!/bin/sh\necho "agent-supervisor %s"\n' "$version" >"$supervisor"
    chmod 0755 "$supervisor"
  fi
  # Debian's visudo, unpacked, for provision.sh's check of the sudoers drop-in.
  mkdir -p "$work/bin"
  if [[ -n $visudo ]]; then
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "${visudo%/usr/sbin/visudo}/usr/libexec/sudo" "$visudo" >"$work/bin/visudo"
    chmod 0755 "$work/bin/visudo"
  fi

  prov() {
    env TMPDIR="$work" PATH="$work/bin:$PATH" ROOT="$root" ARCH=x86_64 AGENT_ARCHIVE="$work/agent-good.tar.gz" \
      AGENT_SHA256="$pin" SUPERVISOR_BINARY="$supervisor" SUPERVISOR_VERSION="$version" "$@"
  }
  steps=(create_agent_user install_agent install_supervisor install_units clean_image)

  refuses "install_agent without a pin" "AGENT_SHA256 is not set" prov AGENT_SHA256= "$provision" install_agent
  refuses "install_agent with a malformed pin" "is not a sha256" prov AGENT_SHA256=abc123 "$provision" install_agent
  refuses "install_agent with an archive that does not match the pin" "sha256 mismatch" \
    prov AGENT_ARCHIVE="$work/agent-bad.tar.gz" "$provision" install_agent
  check "  … and none of them installed an agent" absent "$root/opt/semaphore/agent"

  check "steps: ${steps[*]}" quiet prov "$provision" "${steps[@]}"
  check "agent user semaphore: own group, in docker, bash, owns its home" agent_user "$root"
  check "no passwordless sudo unless asked" absent "$root/etc/sudoers.d/90-agent-fleet"
  check "agent /opt/semaphore/agent/agent: the pinned archive's, root 755" \
    cmp "$root/opt/semaphore/agent/agent" "$work/agent-good/agent"
  check "  … owned by root, so jobs cannot swap it" owned "$root/opt/semaphore/agent/agent" "755 0:0"
  check "supervisor /usr/local/bin/agent-supervisor: root 755" owned "$root/usr/local/bin/agent-supervisor" "755 0:0"
  unit=$root/usr/lib/systemd/system/agent-supervisor.service
  check "unit in /usr/lib/systemd/system, as in bootstrap/systemd" cmp "$unit" bootstrap/systemd/agent-supervisor.service
  check "  … root 644" owned "$unit" "644 0:0"
  check "  … enabled for multi-user.target" test "$(readlink "$root/etc/systemd/system/multi-user.target.wants/agent-supervisor.service")" \
    = /usr/lib/systemd/system/agent-supervisor.service
  check "work dir /var/lib/agent-supervisor: root:semaphore 750" \
    owned "$root/var/lib/agent-supervisor" "750 0:$(field "$root" group semaphore 3)"
  check "clean_image: machine-id empty (a new one at each instance's first boot)" test -f "$root/etc/machine-id" -a ! -s "$root/etc/machine-id"
  check "clean_image: no dbus machine-id, builder's SSH keys or downloaded packages" absent "$root/var/lib/dbus/machine-id" \
    "$root/root/.ssh/authorized_keys" "$root/home/ubuntu/.ssh/authorized_keys" "$root/var/cache/apt/archives/git_1_amd64.deb"

  manifest "$root" >"$work/first"
  check "the same steps again" quiet prov "$provision" "${steps[@]}"
  manifest "$root" >"$work/second"
  check "  … change no path, mode, owner or hash (idempotent)" diff -u "$work/first" "$work/second"
  refuses "a bad archive over an installed agent" "sha256 mismatch" \
    prov AGENT_ARCHIVE="$work/agent-bad.tar.gz" "$provision" install_agent
  manifest "$root" >"$work/third"
  check "  … leaves it as it was" diff -u "$work/first" "$work/third"

  sudoers=$root/etc/sudoers.d/90-agent-fleet
  check "AGENT_SUDO=true" quiet prov AGENT_SUDO=true "$provision" create_agent_user
  check "  … a sudoers drop-in for semaphore" grep -qx 'semaphore ALL=(ALL) NOPASSWD: ALL' "$sudoers"
  check "  … root 440" owned "$sudoers" "440 0:0"
  if [[ -x $work/bin/visudo ]]; then
    check "  … which visudo accepts" "$work/bin/visudo" -cf "$sudoers"
  else
    skip "visudo on the sudoers drop-in" "no visudo here, and no Debian sudo package to unpack (the builder checks it)"
  fi
  manifest "$root" >"$work/sudo1"
  check "  … again" quiet prov AGENT_SUDO=true "$provision" create_agent_user
  manifest "$root" >"$work/sudo2"
  check "  … changes nothing" diff -u "$work/sudo1" "$work/sudo2"
  check "AGENT_SUDO=false" quiet prov AGENT_SUDO=false "$provision" create_agent_user
  check "  … removes the drop-in" absent "$sudoers"

  refuses "a supervisor that reports another version" "but this image is agent-fleet 9\.9\.9" \
    prov SUPERVISOR_VERSION=9.9.9 "$provision" install_supervisor
  for step in wait_for_boot remove_unattended_upgrades install_packages install_toolbox; do
    refuses "$step in a root other than /" "runs only on the image being built" prov "$provision" "$step"
  done
  refuses "an unknown step, before any step runs" "unknown step" prov "$provision" create_agent_user rm_rf
  # Tried only where the step it names would do nothing if the guard failed: wait_for_boot
  # without cloud-init.
  if command -v cloud-init >/dev/null; then
    skip "ROOT=/ without AGENT_FLEET_IMAGE_BUILD=yes" "this machine has cloud-init, which the step would wait for"
  else
    refuses "ROOT=/ without AGENT_FLEET_IMAGE_BUILD=yes" "would provision this machine" \
      env ROOT=/ AGENT_FLEET_IMAGE_BUILD= "$provision" wait_for_boot
  fi
fi

echo "bootstrap: $passed passed, $failed failed, $skipped skipped"
((failed == 0))
