#!/usr/bin/env bash
# shellcheck disable=SC2154  # dry_run and help[NAME] belong to the sourcing script
# Helpers the launch scripts source: print commands as they will run, honour --dry-run, and
# refuse unset variables by name.
#   quote WORD...        one line that a shell reads back as the same words
#   run CMD...           print "+ CMD", then run it unless the caller set dry_run=1
#   require NAME...      exit 2 naming the first unset NAME, with the caller's help[NAME]
set -euo pipefail

quote() {
  local out=() word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {
  echo "+ $(quote "$@")"
  if ((!dry_run)); then
    "$@"
  fi
}

require() {
  local name
  for name in "$@"; do
    if [[ -z "${!name:-}" ]]; then
      echo "error: $name is not set: ${help[$name]}" >&2
      exit 2
    fi
  done
}
