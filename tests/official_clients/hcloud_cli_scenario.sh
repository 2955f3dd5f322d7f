#!/usr/bin/env bash
# Drive the Hetzner Cloud API simulator with Hetzner's `hcloud` CLI, unchanged (Debian's
# hcloud-cli 1.30, built on hcloud-go 1.35: `apt-get install hcloud-cli`).
#
# Usage:
#     HCLOUD_ENDPOINT=http://127.0.0.1:4000/v1 HCLOUD_TOKEN=secret hcloud_cli_scenario.sh
#     (HCLOUD_CLI names another `hcloud` binary; run with a temporary HOME so no config file leaks in)
#
# Covers SSH keys (create, list, describe, delete), firewalls with rules (create --rules-file,
# add-rule, apply-to-resource, describe), `server create` by image name with type and location,
# power actions, labels, label selectors and deletes. Every step checks its exit status and its
# output; the first failing step is named and ends the run with status 1 (later steps build on
# earlier ones). The last line on success is "hcloud CLI scenario: N checks passed, 0 failed".
#
# The simulator should have short actions (e.g. 0.1 s). Names and labels carry a per-run suffix,
# and the run deletes what it made, so it can run twice against one simulator.

set -uo pipefail

HCLOUD=${HCLOUD_CLI:-hcloud}
: "${HCLOUD_ENDPOINT:?set HCLOUD_ENDPOINT to the simulator, e.g. http://127.0.0.1:4000/v1}"
: "${HCLOUD_TOKEN:?set HCLOUD_TOKEN to the simulator token}"

run_id="$$$RANDOM"
env_label="cli-$run_id"
key_name="cli-key-$run_id"
fw_name="cli-fw-$run_id"
s1="cli-s1-$run_id"
s2="cli-s2-$run_id"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A fixed ed25519 public key (no ssh-keygen needed); its legacy MD5 fingerprint is the MD5 of
# the decoded key blob (API-NOTES §4, SSH keys).
key_blob="AAAAC3NzaC1lZDI1NTE5AAAAIHRJLpvlWbRHZkTvP3FLOQ9SwnAkYWJfmJEqDCmoUSbk"
printf 'ssh-ed25519 %s hcloud-cli-scenario\n' "$key_blob" >"$work/key.pub"
fingerprint=$(printf '%s' "$key_blob" | base64 -d | md5sum | cut -d' ' -f1 | sed 's/../&:/g; s/:$//')

checks=0
step=""
out=""

fail() {
  echo "FAIL [$step]: $*" >&2
  printf '%s\n' "--- output of the step" "$out" >&2
  echo "hcloud CLI scenario: $checks checks passed, 1 failed" >&2
  exit 1
}

# run STEP ARGS...: `hcloud ARGS...` must exit 0; its stdout+stderr land in $out.
run() {
  step=$1
  shift
  echo "== $step: hcloud $*"
  out=$("$HCLOUD" "$@" 2>&1)
  local rc=$?
  [ "$rc" -eq 0 ] || fail "exit status $rc (expected 0)"
  checks=$((checks + 1))
}

# run_fails STEP ARGS...: `hcloud ARGS...` must fail.
run_fails() {
  step=$1
  shift
  echo "== $step: hcloud $* (must fail)"
  out=$("$HCLOUD" "$@" 2>&1)
  [ $? -ne 0 ] || fail "exit status 0 (expected a failure)"
  checks=$((checks + 1))
}

# expect REGEX: the last step's output matches (grep -E).
expect() {
  grep -Eq -- "$1" <<<"$out" || fail "output does not match /$1/"
  checks=$((checks + 1))
}

# expect_not REGEX: the last step's output does not match.
expect_not() {
  if grep -Eq -- "$1" <<<"$out"; then fail "output matches /$1/ but must not"; fi
  checks=$((checks + 1))
}

# expect_eq TEXT: the last step's output, trimmed, is exactly TEXT.
expect_eq() {
  local got
  got=$(sed -e 's/[[:space:]]*$//' <<<"$out")
  [ "$got" = "$1" ] || fail "output is '$got', expected '$1'"
  checks=$((checks + 1))
}

# --- SSH keys ----------------------------------------------------------------------------------
run "ssh-key create" ssh-key create --name "$key_name" --public-key-from-file "$work/key.pub" \
  --label "env=$env_label"
expect "^SSH key [0-9]+ created"
run "ssh-key list" ssh-key list -o noheader -o columns=name,fingerprint
expect "^$key_name +$fingerprint\$"
run "ssh-key list by label" ssh-key list -l "env=$env_label" -o noheader -o columns=name
expect_eq "$key_name"
run "ssh-key describe" ssh-key describe "$key_name"
expect "^Name:[[:space:]]+$key_name\$"
expect "^Fingerprint:[[:space:]]+$fingerprint\$"
expect "^ssh-ed25519 $key_blob"
expect "env: $env_label"
run_fails "ssh-key create duplicate key" ssh-key create --name "$key_name-again" \
  --public-key-from-file "$work/key.pub"
expect "uniqueness_error"

# --- Firewalls with rules ----------------------------------------------------------------------
cat >"$work/rules.json" <<'EOF'
[
  {"direction": "in", "protocol": "tcp", "port": "22", "source_ips": ["0.0.0.0/0", "::/0"],
   "description": "ssh"},
  {"direction": "in", "protocol": "icmp", "source_ips": ["0.0.0.0/0", "::/0"]}
]
EOF
run "firewall create --rules-file" firewall create --name "$fw_name" \
  --rules-file "$work/rules.json" --label "env=$env_label"
expect "^Firewall [0-9]+ created"
run "firewall add-rule" firewall add-rule "$fw_name" --direction in --protocol tcp --port 443 \
  --source-ips 0.0.0.0/0 --source-ips ::/0 --description https
expect "updated"
run "firewall describe rules" firewall describe "$fw_name"
expect "Description:[[:space:]]+ssh"
expect "Port:[[:space:]]+22\$"
expect "Protocol:[[:space:]]+icmp"
expect "Port:[[:space:]]+443\$"
expect "::/0"
expect "env: $env_label"
run "firewall list by label" firewall list -l "env=$env_label" -o noheader -o columns=name,rules_count
expect "^$fw_name +3 Rules\$"

# --- Servers by image name ---------------------------------------------------------------------
# The issue's command: hcloud-go 1.35 takes the first image named ubuntu-24.04, which must be the
# x86 one for a cx23 (as at Hetzner).
run "server create by image name" server create --name "$s1" --type cx23 --image ubuntu-24.04 \
  --location fsn1 --label "env=$env_label"
expect "^Server [0-9]+ created"
expect "^Root password: "
run "server describe s1" server describe "$s1" \
  -o 'format={{.Image.ID}} {{.Image.Name}} {{.ServerType.Name}} {{.Status}}'
expect_eq "161547269 ubuntu-24.04 cx23 running"
run "server create with key and labels" server create --name "$s2" --type cpx22 \
  --image debian-12 --location nbg1 --ssh-key "$key_name" --label "env=$env_label" \
  --label role=web
expect "^Server [0-9]+ created"
expect_not "Root password"
run "server describe s2" server describe "$s2" \
  -o 'format={{.Image.Name}} {{.ServerType.Name}} {{.Status}} {{index .Labels "role"}}'
expect_eq "debian-12 cpx22 running web"

# --- Firewall applied to a server and to a label selector --------------------------------------
run "firewall apply-to-resource server" firewall apply-to-resource "$fw_name" --type server \
  --server "$s1"
expect "applied"
run "firewall apply-to-resource label_selector" firewall apply-to-resource "$fw_name" \
  --type label_selector --label-selector role=web
expect "applied"
run "firewall describe applied_to" firewall describe "$fw_name"
expect "Server Name:[[:space:]]+$s1\$"
expect "Label Selector:[[:space:]]+role=web\$"
run "server s2 has the firewall via its selector" server describe "$s2" \
  -o 'format={{range .PublicNet.Firewalls}}{{.Firewall.ID}}:{{.Status}} {{end}}'
expect "^[0-9]+:applied"
run_fails "firewall delete while applied" firewall delete "$fw_name"
expect "resource_in_use"

# --- Power actions -----------------------------------------------------------------------------
run "server poweroff" server poweroff "$s1"
expect "stopped"
run "status after poweroff" server describe "$s1" -o 'format={{.Status}}'
expect_eq "off"
run "server poweron" server poweron "$s1"
expect "started"
run "status after poweron" server describe "$s1" -o 'format={{.Status}}'
expect_eq "running"
run "server reboot" server reboot "$s1"
expect "rebooted"
run "status after reboot" server describe "$s1" -o 'format={{.Status}}'
expect_eq "running"
run "server shutdown" server shutdown "$s1"
expect "shut down"

# --- Labels and label selectors ----------------------------------------------------------------
run "server add-label" server add-label "$s1" tier=db
expect "added"
run "list by two labels" server list -l "env=$env_label,tier=db" -o noheader -o columns=name
expect_eq "$s1"
run "list by env" server list -l "env=$env_label" -o noheader -o columns=name
expect "^$s1\$"
expect "^$s2\$"
run "list by absent key" server list -l "env=$env_label,!role" -o noheader -o columns=name
expect_eq "$s1"
run "list by set" server list -l "env=$env_label,role in (web,api)" -o noheader -o columns=name
expect_eq "$s2"
run "list by inequality" server list -l "env=$env_label,tier!=db" -o noheader -o columns=name
expect_eq "$s2"
run "server remove-label" server remove-label "$s1" tier
expect "removed"
run "list after remove-label" server list -l "tier=db" -o noheader -o columns=name
expect_eq ""

# --- Deletes -----------------------------------------------------------------------------------
run "firewall remove-from-resource server" firewall remove-from-resource "$fw_name" \
  --type server --server "$s1"
run "firewall remove-from-resource label_selector" firewall remove-from-resource "$fw_name" \
  --type label_selector --label-selector role=web
run "firewall describe after removal" firewall describe "$fw_name"
expect_not "Server Name:"
expect_not "Label Selector:"
run "firewall delete" firewall delete "$fw_name"
expect "deleted"
run_fails "firewall describe deleted" firewall describe "$fw_name"
expect "not found"
run "server delete s1" server delete "$s1"
expect "deleted"
run "server delete s2" server delete "$s2"
expect "deleted"
run "server list after deletes" server list -l "env=$env_label" -o noheader -o columns=name
expect_eq ""
run_fails "server describe deleted" server describe "$s1"
expect "not found"
run "ssh-key delete" ssh-key delete "$key_name"
expect "deleted"
run "ssh-key list after delete" ssh-key list -l "env=$env_label" -o noheader -o columns=name
expect_eq ""
run_fails "ssh-key describe deleted" ssh-key describe "$key_name"
expect "not found"

echo "hcloud CLI scenario: $checks checks passed, 0 failed"
