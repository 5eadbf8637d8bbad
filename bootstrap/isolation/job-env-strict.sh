# shellcheck shell=sh
# agent-fleet: /etc/profile.d/agent-fleet-strict.sh at job isolation level strict
# (apply-isolation installs it for strict and removes it for vm). Jobs run in a login
# shell, so this points their docker CLI at the agent user's rootless Docker; the
# system's /var/run/docker.sock is stopped at strict. A value the job's environment
# already has is kept.
if [ "$(id -un)" = semaphore ]; then
  : "${XDG_RUNTIME_DIR:=/run/user/$(id -u)}"
  : "${DOCKER_HOST:=unix://$XDG_RUNTIME_DIR/docker.sock}"
  export XDG_RUNTIME_DIR DOCKER_HOST
fi
