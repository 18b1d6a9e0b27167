# shellcheck shell=bash
# Shared by the launch scripts, which source it: declaring and parsing options (each
# also read from an environment variable), checking required ones, generated --help,
# and a runner that prints commands instead of running them in dry-run mode.

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  echo "launch/common.sh is a library: source it from a launch script" >&2
  exit 2
fi
# Namerefs and empty arrays under `set -u` need bash >= 4.4 (macOS ships 3.2).
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "${0##*/}: error: needs bash >= 4.4, this is $BASH_VERSION (macOS: brew install bash)" >&2
  exit 2
fi

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2034 # used by the scripts that source this file
REPO_DIR=$(dirname "$LAUNCH_DIR")
PROG="launch/${0##*/}" # name in messages; dispatch appends the command
DRY_RUN=${DRY_RUN:-0}
EXTRA_ARGS=()

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

log() {
  printf '%s: %s\n' "$PROG" "$*" >&2
}

# True if the variable named $1 holds 1, true or yes.
enabled() {
  [[ ${!1:-0} =~ ^(1|true|yes)$ ]]
}

dry_run() {
  enabled DRY_RUN
}

# ---------------------------------------------------------------------------------------
# Shell quoting: every printed command can be pasted back into a shell.

# Prints one word, single-quoted unless it only has characters the shell leaves alone.
# For --flag=value only the value is quoted, which keeps flags readable.
quote_word() {
  local word=$1 prefix=""
  if [[ $word =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    prefix=${BASH_REMATCH[1]}
    word=${BASH_REMATCH[2]}
  fi
  if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s%s' "$prefix" "$word"
  else
    printf "%s'%s'" "$prefix" "${word//\'/\'\\\'\'}"
  fi
}

# Prints the words as one shell-quoted line.
quote_command() {
  local quoted=() word
  for word; do
    quoted+=("$(quote_word "$word")")
  done
  printf '%s\n' "${quoted[*]}"
}

# Runs a command, or only prints it (on stdout, one line) in dry-run mode.
run() {
  if dry_run; then
    quote_command "$@"
    return 0
  fi
  log "running: $(quote_command "$@")"
  "$@"
}

# ---------------------------------------------------------------------------------------
# Options. A script (or each of its commands) calls `describe`, declares its options,
# then `parse_args "$@"`. Precedence: flag, then environment variable, then default.

_reset_options() {
  _OPT_VARS=() _OPT_FLAGS=() _OPT_KINDS=() _OPT_METAS=() _OPT_HELPS=() _OPT_DEFAULTS=()
  _REQUIRED_VARS=()
  _EXTRA_META="" _EXTRA_HELP="" _EXAMPLE=""
}
_reset_options

# describe SYNOPSIS SUMMARY: starts a new help page (and a new set of options).
describe() {
  _reset_options
  _SYNOPSIS=$1
  _SUMMARY=$2
}

# example TEXT: shown at the end of --help.
example() {
  _EXAMPLE=$1
}

# _register VAR FLAG KIND METAVAR HELP [DEFAULT]
_register() {
  _OPT_VARS+=("$1") _OPT_FLAGS+=("$2") _OPT_KINDS+=("$3") _OPT_METAS+=("$4") _OPT_HELPS+=("$5")
  _OPT_DEFAULTS+=("${6:-}")
}

# option VAR --flag METAVAR HELP [DEFAULT]: a value taken from --flag, else $VAR, else DEFAULT.
option() {
  local var=$1 default=${5:-}
  printf -v "$var" '%s' "${!var:-$default}" # defined even when empty, for `set -u`
  _register "$var" "$2" value "$3" "$4" "$default"
}

# required_option: like option, and parse_args fails when it ends up empty.
required_option() {
  option "$@"
  _REQUIRED_VARS+=("$1")
}

# switch VAR --flag HELP: --flag sets VAR=1 (the environment may say 1, true or yes).
switch() {
  printf -v "$1" '%s' "${!1:-0}"
  _register "$1" "$2" switch "" "$3"
}

# list_option VAR --flag METAVAR HELP: repeatable; VAR is an array (flags only).
list_option() {
  declare -ga "$1=()"
  _register "$1" "$2" list "$3" "$4 Repeatable."
}

# extra_args METAVAR HELP: accept arguments after `--`, collected in EXTRA_ARGS.
extra_args() {
  _EXTRA_META=$1
  _EXTRA_HELP=$2
}

_option_index() {
  local i
  for i in "${!_OPT_FLAGS[@]}"; do
    if [[ ${_OPT_FLAGS[i]} == "$1" ]]; then
      echo "$i"
      return 0
    fi
  done
  return 1
}

flag_of() {
  local i
  for i in "${!_OPT_VARS[@]}"; do
    if [[ ${_OPT_VARS[i]} == "$1" ]]; then
      echo "${_OPT_FLAGS[i]}"
      return 0
    fi
  done
  echo "$1"
}

print_usage() {
  local i flag help required=" ${_REQUIRED_VARS[*]} "
  printf 'Usage: %s %s\n\n%s\n\n' "$PROG" "$_SYNOPSIS" "$_SUMMARY"
  printf 'Options (a flag overrides the environment variable in brackets):\n'
  for i in "${!_OPT_FLAGS[@]}"; do
    flag="${_OPT_FLAGS[i]} ${_OPT_METAS[i]}"
    help=${_OPT_HELPS[i]}
    case ${_OPT_KINDS[i]} in
      value) help+=" [${_OPT_VARS[i]}]" ;;
      switch) help+=" [${_OPT_VARS[i]}=1]" ;;
    esac
    if [[ -n ${_OPT_DEFAULTS[i]} ]]; then
      help+=" (default: ${_OPT_DEFAULTS[i]})"
    fi
    if [[ $required == *" ${_OPT_VARS[i]} "* ]]; then
      help+=" (required)"
    fi
    printf '  %-30s %s\n' "$flag" "$help"
  done
  printf '  %-30s %s\n' "--dry-run" "Print the commands, one per line, instead of running them. [DRY_RUN=1]"
  printf '  %-30s %s\n' "-h, --help" "Show this help."
  if [[ -n $_EXTRA_META ]]; then
    printf '  %-30s %s\n' "-- $_EXTRA_META" "$_EXTRA_HELP"
  fi
  if [[ -n $_EXAMPLE ]]; then
    printf '\nExample:\n%s\n' "$_EXAMPLE"
  fi
}

_set_option() {
  local i=$1 value=$2
  if [[ ${_OPT_KINDS[i]} == list ]]; then
    local -n _values=${_OPT_VARS[i]}
    _values+=("$value")
  else
    printf -v "${_OPT_VARS[i]}" '%s' "$value"
  fi
}

# Parses --flag VALUE, --flag=VALUE, switches, --dry-run, --help and `-- EXTRA...`,
# then checks the required options.
parse_args() {
  local arg flag i
  while (($#)); do
    arg=$1
    shift
    case $arg in
      -h | --help)
        print_usage
        exit 0
        ;;
      --dry-run) DRY_RUN=1 ;;
      --)
        [[ -n $_EXTRA_META ]] || die "unexpected arguments after --: $*"
        # shellcheck disable=SC2034 # read by the scripts that source this file
        EXTRA_ARGS=("$@")
        break
        ;;
      --*)
        flag=${arg%%=*}
        i=$(_option_index "$flag") || die "unknown option $flag (see --help)"
        if [[ ${_OPT_KINDS[i]} == switch ]]; then
          [[ $arg == "$flag" ]] || die "$flag takes no value"
          printf -v "${_OPT_VARS[i]}" 1
        elif [[ $arg == *=* ]]; then
          _set_option "$i" "${arg#*=}"
        else
          (($#)) || die "$flag needs a value"
          _set_option "$i" "$1"
          shift
        fi
        ;;
      *) die "unexpected argument '$arg' (see --help)" ;;
    esac
  done
  require "${_REQUIRED_VARS[@]}"
}

# require VAR...: fails, naming the flag and the variable, on the first empty one.
require() {
  local var
  for var; do
    [[ -n ${!var:-} ]] || die "missing $(flag_of "$var") (or set $var)"
  done
}

# require_choice VAR CHOICE...
require_choice() {
  local var=$1 choice
  shift
  for choice; do
    [[ ${!var} != "$choice" ]] || return 0
  done
  die "$(flag_of "$var") must be one of: $* (got '${!var}')"
}

# require_count VAR...: each must be a whole number >= 1.
require_count() {
  local var
  for var; do
    [[ ${!var} =~ ^[1-9][0-9]*$ ]] || die "$(flag_of "$var") must be a whole number >= 1 (got '${!var}')"
  done
}

# dispatch "CMD1 CMD2 ..." ARGS...: calls cmd_<first arg> with the remaining arguments.
# The caller describes the overview page shown by a bare --help.
dispatch() {
  local commands=" $1 "
  shift
  case ${1:-} in
    -h | --help)
      print_usage
      exit 0
      ;;
    '') die "missing command, one of:$commands(see --help)" ;;
  esac
  [[ $commands == *" $1 "* ]] || die "unknown command '$1', one of:$commands(see --help)"
  PROG+=" $1"
  "cmd_$1" "${@:2}"
}

# ---------------------------------------------------------------------------------------
# The workdir of a multi-host run, shared by the TPU and SLURM launchers.

workdir_options() {
  option WORKDIR --workdir DIR "Workdir of the run; pass an existing one to resume it."
  option WORKDIR_ROOT --workdir-root DIR "Instead of --workdir: use DIR/RUN_NAME."
  option RUN_NAME --run-name NAME "Last part of the workdir under --workdir-root (default: UTC time, e.g. 20260131-235959)."
}

# Sets WORKDIR. Every host must get the identical workdir, so it is computed once, here
# on the launching machine, and passed to all of them as a literal.
resolve_workdir() {
  if [[ -n $WORKDIR ]]; then
    [[ -z $WORKDIR_ROOT ]] || die "give either --workdir or --workdir-root, not both"
  else
    [[ -n $WORKDIR_ROOT ]] || die "missing --workdir or --workdir-root (or set WORKDIR or WORKDIR_ROOT)"
    WORKDIR=${WORKDIR_ROOT%/}/${RUN_NAME:-$(date -u +%Y%m%d-%H%M%S)}
  fi
}

report_workdir() {
  log "workdir: $WORKDIR (to resume, run again with --workdir=$WORKDIR)"
}
