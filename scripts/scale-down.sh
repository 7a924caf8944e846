#!/usr/bin/env bash
# Take one rtc host out of a VM fleet without losing messages:
#   1. POST /admin/drain on the host. Its /health turns 503, so HAProxy (or
#      NGINX) stops sending it new connections, and every client gets the
#      "migrating" status, is closed with 1001 and resumes its session on
#      another host through the load balancer.
#   2. Poll the host's active_connections until 0, or until a deadline.
#   3. Stop the service over ssh. SIGTERM drains whatever is left within
#      rtc's --shutdown-timeout, so the stop is graceful either way.
#
# usage: scripts/scale-down.sh HOST_URL SSH_TARGET
#   HOST_URL    the host's own rtc port, not the load balancer: http://10.0.0.11:8081
#   SSH_TARGET  where the stop command runs: admin@10.0.0.11
# environment:
#   RTC_ADMIN_TOKEN  a token with "admin": true (rtc token --user ops --admin);
#                    needed unless this runs on the host itself (loopback)
#   DRAIN_DEADLINE   seconds to wait for 0 connections (default 120)
#   POLL_INTERVAL    seconds between polls (default 2)
#   SSH              the ssh command (default: ssh)
#   STOP_COMMAND     run on SSH_TARGET (default: sudo systemctl stop rtc)
# exit status: 0 drained and stopped; 1 drain refused or bad usage (nothing
# stopped); 2 deadline passed, stopped anyway; 3 the stop command failed.
# Same without this script: rtc drain --url HOST_URL && ssh SSH_TARGET sudo systemctl stop rtc
set -euo pipefail

if [[ $# -ne 2 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 1
fi
url=${1%/}
target=$2
deadline=${DRAIN_DEADLINE:-120}
interval=${POLL_INTERVAL:-2}
read -r -a ssh_cmd <<<"${SSH:-ssh}"
stop_command=${STOP_COMMAND:-sudo systemctl stop rtc}

# The token goes to curl as a config file on its stdin, never in its argv: a command
# line is visible to every local user (ps, /proc/PID/cmdline).
auth_config=""
if [[ -n ${RTC_ADMIN_TOKEN:-} ]]; then
    auth_config="header = \"Authorization: Bearer ${RTC_ADMIN_TOKEN}\""
fi

log() { printf '%s scale-down %s: %s\n' "$(date -u +%FT%TZ)" "$url" "$*" >&2; }

status=$(printf '%s\n' "$auth_config" |
    curl -sS --max-time 10 -o /dev/null -w '%{http_code}' -X POST -K - "$url/admin/drain") || status=000
if [[ $status != 202 ]]; then
    log "drain refused (HTTP $status); nothing stopped"
    exit 1
fi
log "draining"

result=2
end=$((SECONDS + deadline))
while ((SECONDS < end)); do
    # Without an Accept naming text/plain, rtc's /metrics answers JSON.
    active=$(curl -fsS --max-time 5 "$url/metrics" | jq -r '.active_connections') || active="?"
    log "active_connections=$active"
    if [[ $active == 0 ]]; then
        result=0
        break
    fi
    sleep "$interval"
done
if ((result != 0)); then
    log "deadline of ${deadline}s passed; stopping anyway (SIGTERM drains the rest)"
fi

if ! "${ssh_cmd[@]}" "$target" "$stop_command"; then
    log "stop command failed on $target"
    exit 3
fi
log "stopped on $target"
exit "$result"
