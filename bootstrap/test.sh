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
#     second run leaves every path, mode, owner and hash as it was);
#   - the job isolation levels: isolation/apply-isolation vm and strict, back and forth,
#     with stand-ins for the running system (systemctl, sysctl, apparmor_parser,
#     runuser), the rootless launcher's first half, the AppArmor profile's structure.
#
# Prints a line per check and ends with `bootstrap: N passed, N failed, N skipped`;
# exits 1 if any check failed. Writes only to its temp dir, the venv ($VENV, default
# .venv; bootstrap/requirements-test.txt) and $TOOLS_DIR (default .tools; Debian's packer
# and visudo, unpacked with dpkg-deb, not installed).
# Compound assertions are handed to check as single-quoted `eval` strings, expanded
# when check runs them:
# shellcheck disable=SC2016
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
for f in bootstrap/*.sh bootstrap/isolation/{apply-isolation,dockerd-rootless,sudo-strict,job-env-strict.sh}; do
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
  for unit in bootstrap/systemd/*.service; do
    cp "$unit" "$vroot/usr/lib/systemd/system/"
    check "systemd-analyze verify $unit" verify_clean "$vroot" "${unit##*/}"
  done
  # The agent user's manager with agent-fleet's delegation drop-in (stand-in at its
  # ExecStart too).
  mkdir -p "$vroot/etc/systemd/system/user@.service.d" "$vroot/lib/systemd"
  cp bootstrap/isolation/user@.service.d-agent-fleet.conf "$vroot/etc/systemd/system/user@.service.d/agent-fleet.conf"
  cp "$work/fake-supervisor" "$vroot/lib/systemd/systemd"
  check "systemd-analyze verify user@.service with bootstrap/isolation's drop-in" verify_clean "$vroot" user@1000.service
  # Rootless Docker's unit is a user unit: verified as the user's manager reads it, with
  # ExecStart pointed at the launcher in this checkout (verify checks that it exists).
  mkdir -p "$work/user-units" "$work/xdg"
  chmod 0700 "$work/xdg"
  sed "s|^ExecStart=/usr/local/lib/agent-fleet/|ExecStart=$REPO/bootstrap/isolation/|" \
    bootstrap/isolation/docker.service >"$work/user-units/docker.service"
  check "systemd-analyze verify --user bootstrap/isolation/docker.service" \
    env XDG_RUNTIME_DIR="$work/xdg" bash -c 'out=$(systemd-analyze verify --user "$1" 2>&1) && [[ -z $out ]] || { printf "%s\n" "$out"; exit 1; }' _ "$work/user-units/docker.service"
fi

echo "== job isolation files"
# No AppArmor 4 parser here (Debian's apparmor is 3.x, which knows neither abi/4.0 nor
# `userns`), so the profile's structure is checked instead; where a 4.x parser exists it
# compiles the profile too.
aa_structure() { # FILE
  awk '
    /^[[:space:]]*(#|$)/ { next }
    /^abi <abi\/4\.0>,$/ { abi++; next }
    /^include <tunables\/global>$/ { tunables++; next }
    /^profile rootlesskit \/usr\/bin\/rootlesskit flags=\(unconfined\) \{$/ { profiles++; depth++; next }
    /^[[:space:]]*include if exists <local\/rootlesskit>$/ && depth == 1 { next }
    /^[[:space:]]*userns,$/ && depth == 1 { userns++; next }
    /^\}$/ { depth--; next }
    { print "unexpected line: " $0; bad++ }
    END {
      if (abi != 1) print "want one abi <abi/4.0>"
      if (tunables != 1) print "want one include <tunables/global>"
      if (profiles != 1) print "want one profile rootlesskit /usr/bin/rootlesskit flags=(unconfined)"
      if (userns != 1) print "want one userns rule inside it"
      if (depth != 0) print "unbalanced braces"
      exit (bad || abi != 1 || tunables != 1 || profiles != 1 || userns != 1 || depth != 0)
    }' "$1"
}
check "AppArmor profile bootstrap/isolation/rootlesskit.apparmor: abi 4.0, one unconfined profile for /usr/bin/rootlesskit with userns" \
  aa_structure bootstrap/isolation/rootlesskit.apparmor
if command -v apparmor_parser >/dev/null && apparmor_parser --version | grep -q 'version [4-9]'; then
  check "  … which apparmor_parser compiles" apparmor_parser -Q -K bootstrap/isolation/rootlesskit.apparmor
else
  skip "apparmor_parser on the rootlesskit profile" "no AppArmor 4 parser here (loaded on the builder, and by apparmor.service at boot)"
fi
check "sysctl drop-in: kernel.yama.ptrace_scope = 1 and nothing else" \
  test "$(grep -v '^[[:space:]]*\(#\|$\)' bootstrap/isolation/90-agent-fleet-ptrace.conf)" = "kernel.yama.ptrace_scope = 1"

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
  # Ubuntu's default user holds the first subordinate id range; AppArmor 4 (24.04).
  echo 'ubuntu:100000:65536' | tee "$root/etc/subuid" >"$root/etc/subgid"
  mkdir -p "$root/etc/apparmor.d/abi"
  touch "$root/etc/apparmor.d/abi/4.0"

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
  # Debian's visudo, unpacked, for apply-isolation's check of the sudoers drop-in; where
  # there is none, a stand-in that accepts only the one line it writes.
  mkdir -p "$work/bin"
  if [[ -n $visudo ]]; then
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "${visudo%/usr/sbin/visudo}/usr/libexec/sudo" "$visudo" >"$work/bin/visudo"
  else
    printf '#!/bin/sh\neval "f=\\${$#}"\ngrep -v "^#" "$f" | grep -qx "semaphore ALL=(ALL) NOPASSWD: ALL"\n' >"$work/bin/visudo"
  fi
  chmod 0755 "$work/bin/visudo"

  # GitHub's meta API, saved: three made-up keys of GitHub's algorithms (valid SSH blobs),
  # and answers install_github_keys must refuse.
  python3 - "$work" <<'EOF'
import base64, json, struct, sys
def key(alg, extra, name=None):
    name = (name or alg).encode()
    return alg + " " + base64.b64encode(struct.pack(">I", len(name)) + name + bytes(range(extra))).decode()
good = [key("ssh-ed25519", 36), key("ecdsa-sha2-nistp256", 90), key("ssh-rsa", 200)]
answers = {
    "good": {"ssh_keys": good, "web": ["192.30.252.0/22"]},
    "alg": {"ssh_keys": good[:1] + [key("ssh-dss", 40)]},
    "b64": {"ssh_keys": ["ssh-ed25519 not*base64"]},
    "blob": {"ssh_keys": [key("ssh-ed25519", 36, name="ssh-rsa")]},
    "empty": {"ssh_keys": []},
}
for name, doc in answers.items():
    with open(f"{sys.argv[1]}/meta-{name}.json", "w") as f:
        json.dump(doc, f)
with open(f"{sys.argv[1]}/meta-good.known_hosts", "w") as f:
    f.writelines(f"github.com {k}\n" for k in good)
EOF
  prov() {
    env TMPDIR="$work" PATH="$work/bin:$PATH" ROOT="$root" ARCH=x86_64 AGENT_ARCHIVE="$work/agent-good.tar.gz" \
      AGENT_SHA256="$pin" SUPERVISOR_BINARY="$supervisor" SUPERVISOR_VERSION="$version" \
      GITHUB_META_FILE="$work/meta-good.json" "$@"
  }
  steps=(create_agent_user install_agent install_supervisor install_units install_isolation install_github_keys clean_image)

  refuses "install_agent without a pin" "AGENT_SHA256 is not set" prov AGENT_SHA256= "$provision" install_agent
  refuses "install_agent with a malformed pin" "is not a sha256" prov AGENT_SHA256=abc123 "$provision" install_agent
  refuses "install_agent with an archive that does not match the pin" "sha256 mismatch" \
    prov AGENT_ARCHIVE="$work/agent-bad.tar.gz" "$provision" install_agent
  check "  … and none of them installed an agent" absent "$root/opt/semaphore/agent"

  check "steps: ${steps[*]}" quiet prov "$provision" "${steps[@]}"
  check "agent user semaphore: own group, in docker, bash, owns its home" agent_user "$root"
  check "  … subordinate ids 165536-231071 for rootless Docker, after ubuntu's" \
    quiet grep -qx 'semaphore:165536:65536' "$root/etc/subuid" "$root/etc/subgid"
  sudoers=$root/etc/sudoers.d/90-agent-fleet
  check "image baked at job isolation vm: a sudoers drop-in for semaphore" grep -qx 'semaphore ALL=(ALL) NOPASSWD: ALL' "$sudoers"
  check "  … root 440" owned "$sudoers" "440 0:0"
  if [[ -n $visudo ]]; then
    check "  … which visudo accepts" "$work/bin/visudo" -cf "$sudoers"
  else
    skip "visudo on the sudoers drop-in" "no visudo here, and no Debian sudo package to unpack (a stand-in checked the line; apply-isolation checks it on the instance)"
  fi
  lib=$root/usr/local/lib/agent-fleet
  check "apply-isolation, dockerd-rootless, sudo-strict in /usr/local/lib/agent-fleet: root 755" \
    eval 'owned "$lib/apply-isolation" "755 0:0" && owned "$lib/dockerd-rootless" "755 0:0" && owned "$lib/sudo-strict" "755 0:0"'
  check "rootless Docker's user unit in /usr/lib/systemd/user, root 644, not enabled in the image" \
    eval 'owned "$root/usr/lib/systemd/user/docker.service" "644 0:0" && absent "$root/etc/systemd/user/default.target.wants/docker.service"'
  check "user@.service delegation drop-in, ptrace sysctl drop-in" \
    eval 'cmp "$root/etc/sysctl.d/90-agent-fleet-ptrace.conf" bootstrap/isolation/90-agent-fleet-ptrace.conf &&
      cmp "$root/etc/systemd/system/user@.service.d/agent-fleet.conf" bootstrap/isolation/user@.service.d-agent-fleet.conf' 
  check "AppArmor 4: the rootlesskit profile in /etc/apparmor.d" cmp "$root/etc/apparmor.d/rootlesskit" bootstrap/isolation/rootlesskit.apparmor
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

  known_hosts=$root/usr/local/share/agent-fleet/github_known_hosts
  check "GitHub's SSH host keys baked: one github.com line per key of the meta answer" \
    cmp "$known_hosts" "$work/meta-good.known_hosts"
  check "  … root 644" owned "$known_hosts" "644 0:0"
  for bad in alg:"is not a known host-key algorithm" b64:"is not base64" \
    blob:"is not an ssh-ed25519 public key" empty:"no ssh_keys"; do
    refuses "install_github_keys refuses a meta answer with a bad ${bad%%:*}" "${bad#*:}" \
      prov GITHUB_META_FILE="$work/meta-${bad%%:*}.json" "$provision" install_github_keys
  done
  check "  … and leaves the baked keys as they were" cmp "$known_hosts" "$work/meta-good.known_hosts"

  manifest "$root" >"$work/first"
  check "the same steps again" quiet prov "$provision" "${steps[@]}"
  manifest "$root" >"$work/second"
  check "  … change no path, mode, owner or hash (idempotent)" diff -u "$work/first" "$work/second"
  refuses "a bad archive over an installed agent" "sha256 mismatch" \
    prov AGENT_ARCHIVE="$work/agent-bad.tar.gz" "$provision" install_agent
  manifest "$root" >"$work/third"
  check "  … leaves it as it was" diff -u "$work/first" "$work/third"

  # The AppArmor profile where Ubuntu's apparmor package already put one (24.04), and
  # where AppArmor predates 4 (22.04): copies of the image, install_isolation again.
  cp -a "$root" "$work/root-ubuntu-aa"
  printf 'abi <abi/4.0>,\nprofile rootlesskit /usr/bin/rootlesskit flags=(unconfined) {\n  userns,\n}\n' >"$work/root-ubuntu-aa/etc/apparmor.d/rootlesskit"
  cp "$work/root-ubuntu-aa/etc/apparmor.d/rootlesskit" "$work/ubuntu-aa"
  check "AppArmor profile from Ubuntu's apparmor package: kept as it is" \
    eval 'quiet prov ROOT="$work/root-ubuntu-aa" "$provision" install_isolation &&
      cmp "$work/root-ubuntu-aa/etc/apparmor.d/rootlesskit" "$work/ubuntu-aa"' 
  cp -a "$root" "$work/root-jammy"
  rm -rf "$work/root-jammy/etc/apparmor.d"
  check "AppArmor before 4 (22.04): no profile" \
    eval 'quiet prov ROOT="$work/root-jammy" "$provision" install_isolation && absent "$work/root-jammy/etc/apparmor.d/rootlesskit"' 
  rm -rf "$work/root-ubuntu-aa" "$work/root-jammy"

  echo "== job isolation: apply-isolation, with stand-ins for the running system"
  # Stand-ins, first on PATH, that log each call to $calls and keep the contract of the
  # real commands where a later step looks at its result: systemctl's runtime masks, the
  # rootless socket and rootlesskit's child_pid a started docker.service leaves, the
  # profile list apparmor_parser -r adds to. systemctl --root and usermod/gpasswd (files
  # only) run for real.
  shims=$work/shims calls=$work/calls
  mkdir -p "$shims"
  cat >"$shims/systemctl" <<'EOF'
#!/bin/bash
echo "systemctl $*" >>"$CALLS"
for a; do [[ $a == --root* ]] && exec /usr/bin/systemctl "$@"; done
if [[ -n ${SHIM_FAIL:-} && "systemctl $*" == *"$SHIM_FAIL"* ]]; then
  printf 'Job for %s failed because the control process exited with error code.\nSee "systemctl status" for details.\n' "${*: -1}" >&2
  exit 1
fi
args=" $* "
units=()
for a; do [[ $a == docker.s* ]] && units+=("$a"); done
case $args in
*" mask --runtime "*) mkdir -p "$ROOT/run/systemd/system"; for u in "${units[@]}"; do ln -sfn /dev/null "$ROOT/run/systemd/system/$u"; done ;;
*" unmask --runtime "*) for u in "${units[@]}"; do rm -f "$ROOT/run/systemd/system/$u"; done ;;
*" --user start docker.service "*)
  mkdir -p "$ROOT$XDG_RUNTIME_DIR/dockerd-rootless"
  rm -f "$ROOT$XDG_RUNTIME_DIR/docker.sock"
  python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])' "$ROOT$XDG_RUNTIME_DIR/docker.sock"
  echo 4242 >"$ROOT$XDG_RUNTIME_DIR/dockerd-rootless/child_pid" ;;
*" stop user@"*) uid=${args##*stop user@}; rm -rf "$ROOT/run/user/${uid%%.service*}" ;;
esac
exit 0
EOF
  cat >"$shims/runuser" <<'EOF'
#!/bin/bash
echo "runuser $*" >>"$CALLS"
while (($#)) && [[ $1 != -- ]]; do shift; done
shift
exec "$@"
EOF
  cat >"$shims/sysctl" <<'EOF'
#!/bin/bash
echo "sysctl $*" >>"$CALLS"
EOF
  cat >"$shims/apparmor_parser" <<'EOF'
#!/bin/bash
echo "apparmor_parser $*" >>"$CALLS"
[[ -n ${SHIM_AA_NOLOAD:-} ]] || echo 'rootlesskit (unconfined)' >>"$ROOT/sys/kernel/security/apparmor/profiles"
EOF
  for tool in usermod gpasswd; do
    printf '#!/bin/bash\necho "%s $*" >>"$CALLS"\nexec %s "$@"\n' "$tool" "$(command -v "$tool")" >"$shims/$tool"
  done
  chmod 0755 "$shims"/*
  apply() { # LEVEL [ENV=VALUE...]: apply-isolation in $root, live, against the stand-ins
    local level=$1
    shift
    : >"$calls"
    env TMPDIR="$work" PATH="$shims:$work/bin:$PATH" CALLS="$calls" ROOT="$root" APPLY_LIVE=yes "$@" \
      "$lib/apply-isolation" "$level"
  }
  called() { # LINE...: each was called, in this order
    local want got
    want=$(printf '%s\n' "$@")
    got=$(grep -xF -f <(printf '%s\n' "$@") "$calls" || true)
    [[ $got == "$want" ]] || {
      printf 'wanted, in order:\n%s\ncalled:\n%s\n' "$want" "$(cat "$calls")"
      return 1
    }
  }
  not_called() { # PATTERN
    ! grep -E -- "$1" "$calls"
  }
  one_line() { # STDERR-FILE: one line, naming the fix
    [[ $(wc -l <"$1") == 1 ]] || { echo "stderr has $(wc -l <"$1") lines:"; cat "$1"; return 1; }
  }
  uid=$(field "$root" passwd semaphore 3) gid=$(field "$root" group semaphore 3)
  # What the image's packages bring (rootless Docker), and a kernel that restricts user
  # namespaces with rootlesskit's profile not loaded yet.
  for t in dockerd rootlesskit slirp4netns newuidmap newgidmap; do
    install -D -m 0755 /dev/null "$root/usr/bin/$t"
  done
  mkdir -p "$root/proc/sys/kernel" "$root/sys/kernel/security/apparmor"
  echo 1 >"$root/proc/sys/kernel/apparmor_restrict_unprivileged_userns"
  : >"$root/sys/kernel/security/apparmor/profiles"
  manifest "$root" >"$work/vm-baked"

  check "apply-isolation vm on the baked image: nothing to change" quiet apply vm
  manifest "$root" >"$work/vm-again"
  check "  … no path, mode, owner or hash changed" diff -u "$work/vm-baked" "$work/vm-again"
  check "  … docker.service started, rootless Docker's user manager stopped, no group or sudoers edit" \
    called "systemctl stop user@$uid.service" "systemctl start docker.socket docker.service"
  check "  … and nothing else: no group edit, no (un)mask and so no daemon reload" not_called "^(usermod|gpasswd|systemctl (un)?mask|systemctl --root)"

  check "apply-isolation strict" quiet apply strict
  check "  … no sudoers drop-in" absent "$sudoers"
  check "  … semaphore not in the docker group (group and gshadow)" \
    eval 'test -z "$(field "$root" group docker 4)" -a -z "$(field "$root" gshadow docker 4)"' 
  check "  … sudo and the group taken away before anything is started" \
    called "gpasswd --root $root --delete semaphore docker" "systemctl mask --runtime --now --quiet docker.socket docker.service" \
    "systemctl start user@$uid.service"
  check "  … ptrace_scope set from the image's sysctl drop-in" \
    called "sysctl -q -p $root/etc/sysctl.d/90-agent-fleet-ptrace.conf"
  check "  … rootlesskit's AppArmor profile loaded (user namespaces restricted, not yet loaded)" \
    called "apparmor_parser -r $root/etc/apparmor.d/rootlesskit"
  check "  … linger for semaphore, rootless docker.service enabled for its manager and started as semaphore" \
    called "systemctl --root $root --global --quiet enable docker.service" "systemctl start user@$uid.service" \
    "runuser -u semaphore -- env XDG_RUNTIME_DIR=/run/user/$uid systemctl --user start docker.service"
  check "  … /var/lib/systemd/linger/semaphore; default.target.wants/docker.service -> the user unit" \
    eval 'test -f "$root/var/lib/systemd/linger/semaphore" -a \
      "$(readlink "$root/etc/systemd/user/default.target.wants/docker.service")" = /usr/lib/systemd/user/docker.service' 
  dirs_ok() {
    local d
    for d in /run/mysqld /run/postgresql /var/tmp/mysql /var/tmp/mysqld /var/tmp/postgres /var/tmp/redis /var/tmp/valkey /var/tmp/mongodb; do
      owned "$root$d" "777 $uid:$gid" || return 1
    done
  }
  check "  … the directories sem-service would sudo mkdir: made, semaphore's, 777" dirs_ok
  check "  … /usr/local/bin/sudo: the stand-in; DOCKER_HOST for jobs in /etc/profile.d" \
    eval 'cmp "$root/usr/local/bin/sudo" bootstrap/isolation/sudo-strict && owned "$root/usr/local/bin/sudo" "755 0:0" &&
      cmp "$root/etc/profile.d/agent-fleet-strict.sh" bootstrap/isolation/job-env-strict.sh' 
  check "  … /run/agent-fleet/job-isolation says strict" test "$(cat "$root/run/agent-fleet/job-isolation")" = strict
  manifest "$root" >"$work/strict1"
  check "apply-isolation strict again" quiet apply strict
  manifest "$root" >"$work/strict2"
  check "  … changes nothing, and neither masks again nor edits a group" \
    eval 'diff -u "$work/strict1" "$work/strict2" && not_called "^(gpasswd|usermod|systemctl mask|apparmor_parser)"' 

  check "apply-isolation vm after strict" quiet apply vm
  check "  … passwordless sudo again (checked by visudo), semaphore in docker again" \
    eval 'grep -qx "semaphore ALL=(ALL) NOPASSWD: ALL" "$sudoers" && "$work/bin/visudo" -cqf "$sudoers" && agent_user "$root"' 
  check "  … docker.service unmasked and started; rootless Docker's manager stopped" \
    called "systemctl --root $root --global --quiet disable docker.service" "systemctl stop user@$uid.service" \
    "systemctl unmask --runtime --quiet docker.socket docker.service" "systemctl start docker.socket docker.service"
  # Left behind on purpose: the sem-service directories (sem-service makes them itself at
  # vm, where a job is root anyway), and the directories that held strict's files, empty.
  # The fake kernel's profile list is the stand-ins' own.
  held='etc/profile.d|etc/systemd/user|run/systemd|run/user|var/lib/systemd'
  vm_state() { manifest "$1" | grep -vE "^(\./|[0-9a-f]{64}  \./)(run/mysqld|run/postgresql|var/tmp|sys|$held)[ /]"; }
  vm_state "$root" >"$work/vm-after"
  mkdir -p "$work/baked"
  check "  … vm -> strict -> vm: every other path, mode, owner and hash as baked (no stale grant or stand-in)" \
    eval 'diff -u <(grep -vE "^(\./|[0-9a-f]{64}  \./)(run/mysqld|run/postgresql|var/tmp|sys|$held)[ /]" "$work/vm-baked") "$work/vm-after"'
  check "  … and the directories strict used hold nothing but directories" \
    eval 'test -z "$(cd "$root" && find ${held//|/ } ! -type d)"'
  check "  … /run/agent-fleet/job-isolation says vm" test "$(cat "$root/run/agent-fleet/job-isolation")" = vm

  refuses "apply-isolation with a level it does not know" "unknown job isolation level 'root'; SEMAPHORE_AGENT_JOB_ISOLATION must be vm or strict" \
    apply root
  apply root 2>"$work/err" >/dev/null || true
  check "  … in one line on stderr" one_line "$work/err"
  check "  … changing nothing" quiet agent_user "$root"
  refuses "apply-isolation with no level" "usage: apply-isolation vm\|strict" "$lib/apply-isolation"

  mv "$root/usr/bin/rootlesskit" "$work/rootlesskit.aside"
  refuses "strict on an image without rootlesskit" "/usr/bin/rootlesskit is missing; rebuild the AMI" apply strict
  apply strict 2>"$work/err" >/dev/null || true
  check "  … in one line on stderr" one_line "$work/err"
  check "  … having taken sudo and the docker group away first" \
    eval 'absent "$sudoers" && test -z "$(field "$root" group docker 4)"' 
  check "  … and no level recorded" absent "$root/run/agent-fleet/job-isolation"
  mv "$work/rootlesskit.aside" "$root/usr/bin/rootlesskit"
  refuses "strict when rootless Docker does not start" "starting rootless Docker failed \(Job for docker.service failed because the control process exited with error code.\); see journalctl" \
    apply strict SHIM_FAIL="--user start docker.service"
  apply strict SHIM_FAIL="--user start docker.service" 2>"$work/err" >/dev/null || true
  check "  … in one line on stderr" one_line "$work/err"
  : >"$root/sys/kernel/security/apparmor/profiles"
  refuses "strict when the rootlesskit profile will not load" "the rootlesskit AppArmor profile is not loaded" \
    apply strict SHIM_AA_NOLOAD=1
  printf '#!/bin/sh\nexit 1\n' >"$shims/visudo"
  chmod 0755 "$shims/visudo"
  refuses "vm when visudo rejects the drop-in" "visudo rejects the sudoers drop-in" apply vm
  check "  … which is not installed, and leaves no candidate behind" \
    eval 'absent "$sudoers" && test -z "$(find "$root/etc/sudoers.d" -name ".90-agent-fleet*")"' 
  rm "$shims/visudo"
  check "vm again with visudo" quiet apply vm
  t0=$(date +%s%N)
  apply vm >/dev/null
  echo "      (apply-isolation vm with nothing to change: $((($(date +%s%N) - t0) / 1000000)) ms here, stand-ins for systemctl)"

  # The launcher's first half (the second runs inside rootlesskit's namespaces): as the
  # user, with a stand-in rootlesskit that prints what it was given.
  printf '#!/bin/sh\necho "rootlesskit $*"\n' >"$shims/rootlesskit"
  chmod 0755 "$shims/rootlesskit"
  install -D -m 0755 bootstrap/isolation/dockerd-rootless "$work/launcher/dockerd-rootless"
  launch() { env PATH="$shims:$PATH" "$@" "$work/launcher/dockerd-rootless" 2>&1; }
  refuses "dockerd-rootless as root" "run it as the agent user, not as root" launch XDG_RUNTIME_DIR="$work/xdg"
  mkdir -p "$work/xdg-nobody"
  chown nobody "$work/xdg-nobody"
  chmod 0755 "$work"
  refuses "dockerd-rootless without XDG_RUNTIME_DIR" "XDG_RUNTIME_DIR must be set and writable" \
    launch setpriv --reuid=nobody --regid=nogroup --clear-groups env -u XDG_RUNTIME_DIR
  check "dockerd-rootless as the user: rootlesskit with its state in \$XDG_RUNTIME_DIR/dockerd-rootless, slirp4netns, then itself" \
    quiet grep -qx "rootlesskit --state-dir=$work/xdg-nobody/dockerd-rootless --net=slirp4netns --mtu=65520 --slirp4netns-sandbox=auto --slirp4netns-seccomp=auto --disable-host-loopback --port-driver=builtin --copy-up=/etc --copy-up=/run --propagation=rslave $work/launcher/dockerd-rootless" \
    <(launch setpriv --reuid=nobody --regid=nogroup --clear-groups env XDG_RUNTIME_DIR="$work/xdg-nobody")
  rm -f "$shims/rootlesskit"

  # What a strict job meets: sudo refusing at once (the real one would wait for a
  # password on its pty), DOCKER_HOST at the rootless socket. `id` stands in for the
  # agent user, whom this machine does not have.
  mkdir -p "$work/as-agent"
  printf '#!/bin/sh\ncase "$1" in -un) echo semaphore ;; -u) echo 1001 ;; esac\n' >"$work/as-agent/id"
  chmod 0755 "$work/as-agent/id"
  refuses "sudo-strict as the agent user: refused at once, saying why" "not available to CI jobs at job isolation level strict" \
    timeout 5 env PATH="$work/as-agent:$PATH" sh bootstrap/isolation/sudo-strict true
  check "job-env-strict.sh for the agent user: DOCKER_HOST=unix:///run/user/1001/docker.sock" \
    test "$(env -u DOCKER_HOST -u XDG_RUNTIME_DIR PATH="$work/as-agent:$PATH" sh -c '. bootstrap/isolation/job-env-strict.sh; echo "$DOCKER_HOST"')" \
    = unix:///run/user/1001/docker.sock
  check "  … and a DOCKER_HOST already set is kept" \
    test "$(DOCKER_HOST=tcp://x:2375 PATH="$work/as-agent:$PATH" sh -c '. bootstrap/isolation/job-env-strict.sh; echo "$DOCKER_HOST"')" = tcp://x:2375

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
