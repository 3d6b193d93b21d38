# shellcheck shell=bash
# Shell words for the commands the scripts print and run; sourced by scripts/gcp/common.sh and
# scripts/slurm/run_jkd.sh.

# quote ARG: ARG as a shell word; quoted only when it has characters a shell would interpret.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# cmdline ARG...: the arguments as one line of shell words.
cmdline() {
  local out='' arg
  for arg in "$@"; do
    out+="${out:+ }$(quote "$arg")"
  done
  printf '%s' "$out"
}
