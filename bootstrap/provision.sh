#!/usr/bin/env bash
# bootstrap/provision.sh — turns a stock Ubuntu 22.04/24.04 into an agent-fleet image.
#
# Packer runs `provision.sh all` as root on the builder instance (packer/agent-fleet.pkr.hcl).
# Each step can also run alone, and against another root directory; bootstrap/test.sh
# runs the steps that need no network that way:
#
#   ROOT=/tmp/img bootstrap/provision.sh create_agent_user install_units
#
# Steps, in the order `all` runs them. Each is idempotent: a second run changes nothing.
#
#   wait_for_boot               let cloud-init finish first boot (it holds the apt lock)   [image]
#   remove_unattended_upgrades  no package upgrades or apt runs behind a job's back        [image]
#   install_packages            security updates, Docker, git and the usual CI tools       [image]
#   create_agent_user           `semaphore`, own group, bash; subordinate ids for rootless Docker
#   install_agent               the Semaphore agent release, sha256-pinned, in /opt/semaphore/agent
#   install_toolbox             the Semaphore toolbox (checkout, cache, artifact, …)       [image]
#   install_supervisor          agent-supervisor: SUPERVISOR_BINARY, or built from source
#   install_units               the systemd unit, enabled; the supervisor's work dir
#   install_isolation           apply-isolation and what both job isolation levels need;
#                               the image's own level is vm until the supervisor applies one
#   install_github_keys         GitHub's SSH host keys from its meta API, checked, for instances
#                               whose stack's parameter holds none yet (the supervisor's fallback)
#   clean_image                 forget the builder: machine-id, its SSH key, cloud-init state
#
# [image] steps install packages or run vendor installers that write to absolute paths,
# so they refuse any ROOT but /.
#
# Settings (environment):
#   ROOT               root directory to provision (default /). ROOT=/ also needs
#                      AGENT_FLEET_IMAGE_BUILD=yes, so nobody provisions a workstation by mistake.
#   ARCH               x86_64 or arm64 (default: this machine's)
#   AGENT_VERSION      Semaphore agent release tag (default v2.4.0)
#   AGENT_SHA256       sha256 of agent_Linux_<ARCH>.tar.gz. Required: no pin, no agent.
#   AGENT_ARCHIVE      a local copy of that archive (default: download the release)
#   TOOLBOX_VERSION    Semaphore toolbox release tag (default v1.20.5)
#   TOOLBOX_SHA256     sha256 of its self-hosted-linux[-arm].tar; checked when set
#   TOOLBOX_ARCHIVE    a local copy of that archive (default: download the release)
#   EXTRA_PACKAGES     more apt packages for the jobs, space-separated
#   SUPERVISOR_BINARY  a built agent-supervisor for ARCH (default: build the source this
#                      script sits in, with RUST_TOOLCHAIN; needs the network)
#   SUPERVISOR_VERSION when set, the installed binary must report this version
#   RUST_TOOLCHAIN     toolchain for that build (default 1.95.0)
#   GITHUB_META_URL    GitHub's meta API (default https://api.github.com/meta; GitHub
#                      Enterprise: https://<host>/api/v3/meta)
#   GITHUB_META_FILE   a saved answer of that API (default: fetch it)
set -euo pipefail
umask 022

# Where things go. These match the supervisor's defaults (`agent-supervisor run --help`)
# and the unit's ExecStart: change them together or not at all.
readonly AGENT_USER=semaphore
readonly AGENT_DIR=/opt/semaphore/agent
readonly SUPERVISOR_BIN=/usr/local/bin/agent-supervisor
readonly WORK_DIR=/var/lib/agent-supervisor
readonly UNIT_DIR=/usr/lib/systemd/system
readonly UNIT=agent-supervisor.service
# Job isolation (SEMAPHORE_AGENT_JOB_ISOLATION): isolation/apply-isolation and what it
# runs on. Its own paths are named at its top.
readonly LIB_DIR=/usr/local/lib/agent-fleet
readonly ROOTLESS_UNIT=/usr/lib/systemd/user/docker.service
readonly APPARMOR_PROFILE=/etc/apparmor.d/rootlesskit
# GitHub's SSH host keys as the image was baked (the supervisor's --known-hosts-fallback).
readonly GITHUB_KNOWN_HOSTS=/usr/local/share/agent-fleet/github_known_hosts
# Host-key algorithms the supervisor takes (supervisor/src/known_hosts.rs, ALGORITHMS).
readonly HOST_KEY_ALGORITHMS='ssh-ed25519|ecdsa-sha2-nistp(256|384|521)|ssh-rsa|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com'

# Docker comes from Ubuntu's own archive (docker.io, with docker-buildx and
# docker-compose-v2 for `docker buildx` and `docker compose`), not from Docker's apt
# repository: the image then trusts one signing key, Canonical's, which it already has;
# no third-party repository or key has to be fetched and pinned at build time; and
# Ubuntu backports security fixes into it. The cost is an Engine a few releases behind
# Docker's; jobs that need the newest can install it themselves (at job isolation vm).
readonly DOCKER_PACKAGES=(docker.io docker-buildx docker-compose-v2)
# Rootless Docker, for job isolation strict, from Ubuntu's archive too: rootlesskit (its
# namespaces, and rootlesskit-docker-proxy for Docker before 28), slirp4netns (the
# network; it works with 22.04's rootlesskit too, where pasta does not), uidmap
# (newuidmap, newgidmap), dbus-user-session (the user's systemd, which gives rootless
# dockerd its cgroups). Ubuntu's docker.io ships no dockerd-rootless.sh (before 26.04);
# isolation/dockerd-rootless is the image's own.
readonly ROOTLESS_PACKAGES=(rootlesskit slirp4netns uidmap dbus-user-session)
# What CI jobs expect of a Linux machine, and what the toolbox calls: git and ssh for
# `checkout`, tar, gzip and friends for `cache`, a compiler for native extensions.
readonly BASE_PACKAGES=(build-essential ca-certificates curl git gnupg jq
  openssh-client rsync unzip wget xz-utils zip)

ROOT=${ROOT:-/}
ARCH=${ARCH:-$(uname -m)}
AGENT_VERSION=${AGENT_VERSION:-v2.4.0}
AGENT_SHA256=${AGENT_SHA256:-}
AGENT_ARCHIVE=${AGENT_ARCHIVE:-}
TOOLBOX_VERSION=${TOOLBOX_VERSION:-v1.20.5}
TOOLBOX_SHA256=${TOOLBOX_SHA256:-}
TOOLBOX_ARCHIVE=${TOOLBOX_ARCHIVE:-}
EXTRA_PACKAGES=${EXTRA_PACKAGES:-}
SUPERVISOR_BINARY=${SUPERVISOR_BINARY:-}
SUPERVISOR_VERSION=${SUPERVISOR_VERSION:-}
RUST_TOOLCHAIN=${RUST_TOOLCHAIN:-1.95.0}
GITHUB_META_URL=${GITHUB_META_URL:-https://api.github.com/meta}
GITHUB_META_FILE=${GITHUB_META_FILE:-}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The repository, or the bundle Packer uploads (the same files).
readonly SOURCE_DIR=${HERE%/*}

readonly STEPS=(wait_for_boot remove_unattended_upgrades install_packages create_agent_user
  install_agent install_toolbox install_supervisor install_units install_isolation install_github_keys
  clean_image)

log() { printf 'provision: %s\n' "$*"; }
die() {
  printf 'provision: error: %s\n' "$*" >&2
  exit 1
}

# A path inside ROOT.
at() { printf '%s%s' "${ROOT%/}" "$1"; }

# For what only makes sense on the builder itself: apt, vendor installers that write
# absolute paths, downloads of toolchains.
image_only() { # STEP WHY
  [[ $ROOT == / ]] || die "$1 $2, so it runs only on the image being built (ROOT=/), not in $ROOT"
}

apt_get() {
  DEBIAN_FRONTEND=noninteractive apt-get -y -q -o DPkg::Lock::Timeout=600 \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"
}

download() { # URL FILE
  log "downloading $1"
  curl -fsSL --proto '=https' --retry 5 --retry-connrefused -o "$2" "$1"
}

# Fails unless FILE's sha256 is WANT. An empty or malformed WANT fails too.
verify_sha256() { # FILE WANT WHAT
  local want=${2,,} got
  [[ $want =~ ^[0-9a-f]{64}$ ]] || die "$3: the pin '$2' is not a sha256 (64 hex digits)"
  got=$(sha256sum "$1" | cut -d' ' -f1)
  [[ $got == "$want" ]] || die "$3: sha256 mismatch: the archive has $got, the pin is $want; refusing to install it"
  log "$3: sha256 $got matches the pin"
}

# Users and groups as ROOT's own files say, not the host's NSS.
field_of() { # FILE NAME FIELD
  awk -F: -v n="$2" -v f="$3" '$1 == n { print $f; found = 1 } END { exit !found }' "$(at "$1")"
}
uid_of() { field_of /etc/passwd "$1" 3; }
gid_of() { field_of /etc/group "$1" 3; }
home_of() { field_of /etc/passwd "$1" 6; }
in_group() { # GROUP USER
  local members
  members=$(field_of /etc/group "$1" 4) && [[ ,$members, == *,"$2",* ]]
}

wait_for_boot() {
  image_only wait_for_boot "waits for the builder's cloud-init"
  if command -v cloud-init >/dev/null; then
    cloud-init status --wait >/dev/null || log "cloud-init reported errors on the builder (see /var/log/cloud-init.log); going on"
  fi
}

# unattended-upgrades upgrades packages and restarts their services (docker among
# them) in the middle of a job. With it gone, apt-daily.timer would still run
# `apt-get update` at random times and hold the apt lock that a job's
# `sudo apt-get install` waits on: the timers are masked too. Security updates come
# from rebuilding the image (install_packages upgrades everything).
remove_unattended_upgrades() {
  image_only remove_unattended_upgrades "removes packages"
  systemctl mask --now apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service
  apt_get purge unattended-upgrades
}

install_packages() {
  image_only install_packages "installs packages"
  local extra
  read -r -a extra <<<"$EXTRA_PACKAGES"
  apt_get update
  apt_get dist-upgrade
  apt_get install "${BASE_PACKAGES[@]}" "${DOCKER_PACKAGES[@]}" "${ROOTLESS_PACKAGES[@]}" "${extra[@]}"
  apt_get autoremove --purge
  systemctl enable docker.service
}

create_agent_user() {
  # docker.io creates the group; in a bare root there is none yet. Membership, like
  # sudo, is the job isolation level's (install_isolation, apply-isolation).
  field_of /etc/group docker 3 >/dev/null || groupadd --root "$ROOT" --system docker
  if ! uid_of "$AGENT_USER" >/dev/null; then
    useradd --root "$ROOT" --create-home --user-group --shell /bin/bash "$AGENT_USER"
    log "created user $AGENT_USER"
  fi
  add_subordinate_ids subuid
  add_subordinate_ids subgid
}

# Rootless Docker maps its containers' users into the agent user's subordinate ids:
# 65536 of them, after every range already given out (Ubuntu's default user has
# 100000-165535 on the builder).
add_subordinate_ids() { # subuid|subgid
  local file first
  file=$(at "/etc/$1")
  [[ -e $file ]] || install -m 0644 -o 0 -g 0 /dev/null "$file"
  if awk -F: -v n="$AGENT_USER" '$1 == n && $3 >= 65536 { found = 1 } END { exit !found }' "$file"; then
    return
  fi
  first=$(awk -F: 'BEGIN { next_id = 100000 } NF >= 3 && $2 + $3 > next_id { next_id = $2 + $3 } END { print next_id }' "$file")
  local flag=--add-subuids
  [[ $1 == subgid ]] && flag=--add-subgids
  usermod --root "$ROOT" "$flag" "$first-$((first + 65535))" "$AGENT_USER"
  log "$AGENT_USER: $1 $first-$((first + 65535))"
}

# Root-owned, so that a job (running as the agent user) cannot replace the binary that
# the next agent start would run.
install_agent() {
  local name=agent_Linux_${ARCH}.tar.gz archive=$AGENT_ARCHIVE
  # Check that there is a pin before spending a download on it.
  [[ -n $AGENT_SHA256 ]] || die "$name: AGENT_SHA256 is not set; pin the release's sha256 (its agent_checksums.txt lists it)"
  if [[ -z $archive ]]; then
    archive=$SCRATCH/$name
    download "https://github.com/semaphoreci/agent/releases/download/$AGENT_VERSION/$name" "$archive"
  fi
  verify_sha256 "$archive" "$AGENT_SHA256" "$name"

  # Unpack beside the old copy, then swap: a failure leaves the old one whole.
  local new
  new=$(at "$AGENT_DIR").new
  rm -rf "$new"
  mkdir -p "$new"
  tar -xzf "$archive" -C "$new" --no-same-owner --no-same-permissions
  [[ -f $new/agent ]] || die "$name has no agent binary at its top level"
  chown -R 0:0 "$new"
  chmod -R u+rwX,go+rX,go-w "$new"
  chmod 0755 "$new/agent"
  rm -rf "$(at "$AGENT_DIR")"
  mv "$new" "$(at "$AGENT_DIR")"
  log "agent $AGENT_VERSION ($ARCH) in $AGENT_DIR"
}

# The toolbox lives in the agent user's ~/.toolbox; its own installer links the CLIs
# into /usr/local/bin and jobs load it from ~/.bash_profile (as Semaphore's agent
# installer does). The agent's `when` CLI needs Erlang and is left out without it.
# ~/.toolbox is root's and read-only to the agent user, at both isolation levels (the
# toolbox never writes there): a job cannot edit the CLIs that /usr/local/bin links to.
# It can still rename the directory, its home being its own; with one job per instance
# nothing it does there reaches another job.
install_toolbox() {
  image_only install_toolbox "runs the toolbox's installer, which links into /usr/local/bin"
  local home stamp want name archive=$TOOLBOX_ARCHIVE tmp=$SCRATCH/toolbox
  home=$(home_of "$AGENT_USER") || die "no user $AGENT_USER: run create_agent_user first"
  stamp=$home/.toolbox/.agent-fleet
  want="$TOOLBOX_VERSION $ARCH ${TOOLBOX_SHA256:-unpinned}"
  if [[ -f $stamp && $(<"$stamp") == "$want" ]]; then
    log "toolbox $TOOLBOX_VERSION already installed"
    return
  fi
  name=self-hosted-linux.tar
  [[ $ARCH == arm64 ]] && name=self-hosted-linux-arm.tar
  mkdir -p "$tmp"
  if [[ -z $archive ]]; then
    archive=$tmp/$name
    download "https://github.com/semaphoreci/toolbox/releases/download/$TOOLBOX_VERSION/$name" "$archive"
  fi
  if [[ -n $TOOLBOX_SHA256 ]]; then
    verify_sha256 "$archive" "$TOOLBOX_SHA256" "$name"
  else
    log "warning: $name is not pinned (TOOLBOX_SHA256 unset); installing it unchecked"
  fi
  tar -xf "$archive" -C "$tmp"
  [[ -f $tmp/toolbox/install-toolbox ]] || die "$name has no toolbox/install-toolbox"
  rm -rf "$home/.toolbox"
  mv "$tmp/toolbox" "$home/.toolbox"
  install -d -m 0700 -o "$AGENT_USER" -g "$AGENT_USER" "$home/.ssh"
  # As root, with the agent user's HOME: the installer then links without sudo. Its
  # output goes to a file, so that nothing it leaves running holds Packer's SSH session.
  HOME=$home bash "$home/.toolbox/install-toolbox" >"$tmp/install.log" 2>&1 </dev/null ||
    { cat "$tmp/install.log"; die "the toolbox installer failed"; }
  cat "$tmp/install.log"
  grep -qxF 'source ~/.toolbox/toolbox' "$home/.bash_profile" 2>/dev/null ||
    echo 'source ~/.toolbox/toolbox' >>"$home/.bash_profile"
  echo "$want" >"$stamp"
  chown -R 0:0 "$home/.toolbox"
  chmod -R u+rwX,go+rX,go-w "$home/.toolbox"
  chown -R "$AGENT_USER:$AGENT_USER" "$home/.ssh" "$home/.bash_profile"
  log "toolbox $TOOLBOX_VERSION ($ARCH) in $home/.toolbox"
}

# Cargo.toml's rust-version is the declared minimum, and the lockfile's AWS SDK crates
# need a newer compiler than that; RUST_TOOLCHAIN is the one the repository is built
# and tested with. rustup, cargo and the build live in the scratch directory, removed
# when the script ends: the image carries no toolchain.
build_supervisor() {
  [[ -f $SOURCE_DIR/Cargo.lock ]] || die "no SUPERVISOR_BINARY and no source to build at $SOURCE_DIR"
  local build=$SCRATCH/build
  mkdir -p "$build"
  download https://sh.rustup.rs "$build/rustup-init.sh"
  RUSTUP_HOME=$build/rustup CARGO_HOME=$build/cargo \
    sh "$build/rustup-init.sh" -y --no-modify-path --profile minimal --default-toolchain "$RUST_TOOLCHAIN"
  log "building agent-supervisor with Rust $RUST_TOOLCHAIN (several minutes)"
  RUSTUP_HOME=$build/rustup CARGO_HOME=$build/cargo CARGO_TARGET_DIR=$build/target \
    "$build/cargo/bin/cargo" "+$RUST_TOOLCHAIN" build --release --locked -p agent-supervisor \
    --manifest-path "$SOURCE_DIR/Cargo.toml"
  SUPERVISOR_BINARY=$build/target/release/agent-supervisor
}

install_supervisor() {
  if [[ -z $SUPERVISOR_BINARY ]]; then
    image_only install_supervisor "without SUPERVISOR_BINARY downloads a toolchain and builds"
    build_supervisor
  fi
  [[ -f $SUPERVISOR_BINARY ]] || die "SUPERVISOR_BINARY $SUPERVISOR_BINARY does not exist"
  local bin version
  bin=$(at "$SUPERVISOR_BIN")
  install -D -m 0755 -o 0 -g 0 "$SUPERVISOR_BINARY" "$bin"
  # Running it proves it is for this machine's architecture, and says what it is.
  version=$("$bin" --version) || die "$SUPERVISOR_BIN does not run here (built for another arch?)"
  if [[ -n $SUPERVISOR_VERSION && $version != "agent-supervisor $SUPERVISOR_VERSION" ]]; then
    die "$SUPERVISOR_BIN says '$version', but this image is agent-fleet $SUPERVISOR_VERSION"
  fi
  log "$version in $SUPERVISOR_BIN"
}

install_units() {
  local gid
  gid=$(gid_of "$AGENT_USER") || die "no user $AGENT_USER: run create_agent_user first"
  install -D -m 0644 -o 0 -g 0 "$HERE/systemd/$UNIT" "$(at "$UNIT_DIR/$UNIT")"
  systemctl --root="$ROOT" --quiet enable "$UNIT"
  # The supervisor writes config.yaml, shutdown-hook.sh and hook.sock here as root;
  # the agent user must get through to them, nobody else needs to.
  install -d -m 0750 -o 0 -g "$gid" "$(at "$WORK_DIR")"
  log "$UNIT installed and enabled; work dir $WORK_DIR"
}

# Everything either job isolation level needs, so that the level is chosen at boot
# (SEMAPHORE_AGENT_JOB_ISOLATION) and not when the image is built. The supervisor runs
# LIB_DIR/apply-isolation with the stack's level before the first agent starts; until
# then, and on an instance started without the supervisor, the image is at vm, applied
# here to files only (APPLY_LIVE=no): the reference's sudo and docker group.
install_isolation() {
  local src=$HERE/isolation lib
  field_of /etc/passwd "$AGENT_USER" 3 >/dev/null || die "no user $AGENT_USER: run create_agent_user first"
  lib=$(at "$LIB_DIR")
  install -d -m 0755 -o 0 -g 0 "$lib"
  install -m 0755 -o 0 -g 0 "$src/apply-isolation" "$src/dockerd-rootless" "$src/sudo-strict" "$lib/"
  install -m 0644 -o 0 -g 0 "$src/job-env-strict.sh" "$lib/"
  install -D -m 0644 -o 0 -g 0 "$src/docker.service" "$(at "$ROOTLESS_UNIT")"
  install -D -m 0644 -o 0 -g 0 "$src/user@.service.d-agent-fleet.conf" "$(at /etc/systemd/system/user@.service.d/agent-fleet.conf)"
  install -D -m 0644 -o 0 -g 0 "$src/90-agent-fleet-ptrace.conf" "$(at /etc/sysctl.d/90-agent-fleet-ptrace.conf)"
  install_apparmor_profile
  ROOT=$ROOT APPLY_LIVE=no "$lib/apply-isolation" vm >/dev/null ||
    die "apply-isolation vm failed on the image (its line above says why)"
  log "job isolation: apply-isolation in $LIB_DIR; the image is at vm until the supervisor applies the stack's level"
}

# rootlesskit's AppArmor profile (isolation/rootlesskit.apparmor says why it is needed).
# One profile by one name may attach to /usr/bin/rootlesskit: Ubuntu's apparmor package
# ships it on 24.04 at this path, and then it stays as it is; ours goes where it is
# absent. AppArmor before 4 (22.04) has no user namespace rule and no restriction.
install_apparmor_profile() {
  local dest
  dest=$(at "$APPARMOR_PROFILE")
  if [[ ! -e $(at /etc/apparmor.d/abi/4.0) ]]; then
    log "AppArmor before 4.0 here: user namespaces are not restricted, no rootlesskit profile needed"
    return
  fi
  if [[ -e $dest ]] && ! grep -q '^# agent-fleet:' "$dest"; then
    { grep -q '/usr/bin/rootlesskit' "$dest" && grep -qE '^[[:space:]]*userns,' "$dest"; } ||
      die "$APPARMOR_PROFILE is not agent-fleet's and does not let /usr/bin/rootlesskit make user namespaces; remove it or add 'userns,' to it"
    log "rootlesskit AppArmor profile: the apparmor package's $APPARMOR_PROFILE"
  else
    install -m 0644 -o 0 -g 0 "$HERE/isolation/rootlesskit.apparmor" "$dest"
    log "rootlesskit AppArmor profile: $APPARMOR_PROFILE"
  fi
  # Loaded now and cached (-W), so the first boot needs no compile; apparmor.service
  # loads it at every boot.
  if [[ $ROOT == / && -d /sys/kernel/security/apparmor ]] && command -v apparmor_parser >/dev/null; then
    apparmor_parser -r -W "$APPARMOR_PROFILE"
  fi
}

# The keys the supervisor adds to the agent user's known_hosts while the stack's parameter
# holds none (a new stack, before its leader first fetched them; a stack without dynamic
# scaling, which has no leader). The same checks as the supervisor's: 1 to 10 keys, each a
# known algorithm and a base64 SSH public-key blob that names it; anything else fails the
# build rather than bake a file the supervisor would ignore.
install_github_keys() {
  local meta=$GITHUB_META_FILE keys key alg body n=0 out
  if [[ -z $meta ]]; then
    meta=$SCRATCH/github-meta.json
    download "$GITHUB_META_URL" "$meta"
  fi
  keys=$(jq -er '.ssh_keys | if type == "array" and length > 0 then .[] else error("no ssh_keys") end' "$meta") ||
    die "$GITHUB_META_URL: no ssh_keys array in its answer"
  out=$SCRATCH/github_known_hosts
  : >"$out"
  while read -r alg body; do
    n=$((n + 1))
    [[ $alg =~ ^($HOST_KEY_ALGORITHMS)$ ]] || die "ssh_keys: '$alg' is not a known host-key algorithm"
    [[ ${#body} -le 2048 && $body =~ ^[A-Za-z0-9+/]+={0,2}$ && $((${#body} % 4)) -eq 0 ]] ||
      die "ssh_keys: the $alg key is not base64 (or over 2048 characters)"
    # The blob opens with its algorithm's name: a 4-byte length, then the name.
    key=$(base64 -d <<<"$body" 2>/dev/null | head -c $((4 + ${#alg})) | tail -c +5) || true
    [[ $key == "$alg" ]] || die "ssh_keys: the $alg key is not an $alg public key"
    printf 'github.com %s %s\n' "$alg" "$body" >>"$out"
  done <<<"$keys"
  ((n <= 10)) || die "ssh_keys: $n keys, more than the 10 the supervisor takes"
  install -D -m 0644 -o 0 -g 0 "$out" "$(at "$GITHUB_KNOWN_HOSTS")"
  log "GitHub's SSH host keys ($n) in $GITHUB_KNOWN_HOSTS"
}

# Instances must not look like the builder or like each other. What is not here is
# handled at each instance's first boot already: systemd makes a new machine-id when
# /etc/machine-id is empty, and cloud-init (per instance id) regenerates the SSH host
# keys, sets the hostname and installs the instance's key pair. So there is no
# first-boot unit of our own.
clean_image() {
  local f
  f=$(at /etc/machine-id)
  if [[ -s $f ]]; then : >"$f"; fi
  # Ubuntu links dbus's copy to /etc/machine-id; a regular file would keep the old id.
  f=$(at /var/lib/dbus/machine-id)
  if [[ -f $f && ! -L $f ]]; then rm -f "$f"; fi
  # The builder's login key (Packer's temporary key pair).
  rm -f "$(at /root/.ssh/authorized_keys)" "$(at /home)"/*/.ssh/authorized_keys
  rm -f "$(at /var/cache/apt/archives)"/*.deb
  # The builder's cloud-init state and logs: instances start a first boot of their own.
  if [[ $ROOT == / ]] && command -v cloud-init >/dev/null; then
    cloud-init clean --logs
  fi
  log "image cleaned"
}

main() {
  (($#)) || die "usage: provision.sh all | STEP... (steps: ${STEPS[*]})"
  if [[ $* == all ]]; then set -- "${STEPS[@]}"; fi
  local step
  for step; do
    [[ " ${STEPS[*]} " == *" $step "* ]] || die "unknown step '$step' (steps: ${STEPS[*]})"
  done
  ((EUID == 0)) || die "run as root (files are installed root-owned)"
  [[ -d $ROOT ]] || die "ROOT $ROOT is not a directory"
  if [[ $ROOT == / && ${AGENT_FLEET_IMAGE_BUILD:-} != yes ]]; then
    die "this would provision this machine (ROOT=/): set AGENT_FLEET_IMAGE_BUILD=yes on an image builder, or ROOT to a directory"
  fi
  case $ARCH in
  x86_64 | arm64) ;;
  aarch64) ARCH=arm64 ;;
  *) die "ARCH must be x86_64 or arm64, not '$ARCH'" ;;
  esac
  # Downloads, archives being unpacked, the supervisor's build: gone when this ends.
  SCRATCH=$(mktemp -d)
  trap 'rm -rf "$SCRATCH"' EXIT
  for step; do
    log "== $step"
    "$step"
  done
}

main "$@"
