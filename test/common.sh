# shellcheck shell=bash
# test/common.sh: shell helpers shared by setup_and_demo.sh, run_tests.sh and bench/run.sh.
#
# Sourced, not executed.  Words used here:
#   PG_CONFIG   the pg_config of the PostgreSQL we build against and install into (default: the
#               system's PostgreSQL 15); set it to use a private copy instead
#   pg user     the OS user that owns throwaway clusters: "postgres" when we run as root, else
#               ourselves (initdb refuses to run as root)
#   build copy  a copy of the source tree in a temp dir, owned by the pg user, where the scripts
#               build and test: the user's clone is only read, never written or chowned

# Debian packages, by what needs them (README, "Quick start", lists the same).
# shellcheck disable=SC2034  # used by the scripts that source this file
UB_PACKAGES=(postgresql-15 postgresql-server-dev-15 libcurl4-openssl-dev libcjson-dev
             python3 build-essential)                  # build, install, demo (mock Stripe)
# shellcheck disable=SC2034
UB_TEST_PACKAGES=(libipc-run-perl)                     # tap stage (PostgreSQL::Test::Cluster)
# shellcheck disable=SC2034
UB_FUZZ_PACKAGES=(clang libclang-rt-14-dev)            # fuzz stage (libFuzzer)

ub_log()  { printf '==> %s\n' "$*"; }
ub_warn() { printf 'WARNING: %s\n' "$*" >&2; }
ub_die()  { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

ub_is_root() { [ "$(id -u)" -eq 0 ]; }

# Prints the packages of "$@" that dpkg does not report as installed.
ub_missing_packages() {
    local p status
    for p in "$@"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        if [ "$status" != "installed" ]; then
            printf '%s\n' "$p"
        fi
    done
}

# Installs the missing packages of "$@" with apt-get (root, or sudo without a password);
# does nothing, not even apt-get update, when everything is there.
ub_ensure_packages() {
    local missing
    if ! command -v dpkg-query >/dev/null 2>&1; then
        ub_warn "dpkg-query not found: not a Debian system? Assuming the packages are installed: $*"
        return 0
    fi
    mapfile -t missing < <(ub_missing_packages "$@")
    if [ "${#missing[@]}" -eq 0 ]; then
        ub_log "packages already installed: $*"
        return 0
    fi
    ub_log "installing missing packages: ${missing[*]}"
    local sudo=()
    if ! ub_is_root; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            ub_die "missing packages: ${missing[*]}. Run this script as root, or install them: sudo apt-get install ${missing[*]}"
        fi
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
}

# Sets PG_CONFIG and PGBIN (the server's bindir); PG_CONFIG from the environment wins.
ub_find_pg() {
    if [ -z "${PG_CONFIG:-}" ]; then
        if [ -x /usr/lib/postgresql/15/bin/pg_config ]; then
            PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
        else
            PG_CONFIG=$(command -v pg_config || true)
        fi
    fi
    case "$PG_CONFIG" in
        */*) ;;
        ?*) PG_CONFIG=$(command -v "$PG_CONFIG" || true) ;;
    esac
    if [ -z "$PG_CONFIG" ] || [ ! -x "$PG_CONFIG" ]; then
        ub_die "pg_config not found (install postgresql-server-dev-15 or set PG_CONFIG)"
    fi
    PGBIN=$("$PG_CONFIG" --bindir)
    local v
    v=$("$PG_CONFIG" --version)
    case "$v" in
        "PostgreSQL 15"*) ;;
        *) ub_warn "expected PostgreSQL 15, $PG_CONFIG says: $v" ;;
    esac
    export PG_CONFIG PGBIN
}

# The OS user that runs throwaway clusters.
ub_pg_user() {
    if ub_is_root; then echo postgres; else id -un; fi
}

# Runs "$@" as the pg user (runuser as root, directly otherwise).
ub_as_pg() {
    if ub_is_root; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# ub_copy_tree SRC DST: copies the source tree SRC into the existing directory DST, without
# .git and without build or test output; DST then belongs to the pg user.  SRC is only read.
ub_copy_tree() {
    tar -C "$1" --exclude=./.git --exclude='*.o' --exclude='*.so' --exclude='*.bc' \
        --exclude=./results --exclude='./tmp_check*' --exclude=./log \
        --exclude=./test/isolation/output_iso --exclude=./regression.diffs \
        --exclude=./regression.out --exclude='__pycache__' -cf - . |
        tar -C "$2" --no-same-owner -xf -
    if ub_is_root; then chown -R postgres: "$2"; fi
}

# ub_make_build_copy PREFIX: a build copy of the current directory; prints its path.
ub_make_build_copy() {
    local d
    d=$(ub_mktemp_pg "$1")
    ub_copy_tree "$PWD" "$d"
    printf '%s\n' "$d"
}

# Runs make install in the current directory (a build copy), with sudo when we may not write
# the install dirs.
ub_make_install() {
    local libdir sharedir
    libdir=$("$PG_CONFIG" --pkglibdir)
    sharedir=$("$PG_CONFIG" --sharedir)/extension
    if ub_is_root || { [ -w "$libdir" ] && [ -w "$sharedir" ]; }; then
        make -s PG_CONFIG="$PG_CONFIG" install
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n make -s PG_CONFIG="$PG_CONFIG" install
    elif ub_installed_matches; then
        ub_log "cannot write $libdir, but the installed copy is identical to this build: using it"
    else
        ub_die "cannot write $libdir or $sharedir and the installed copy differs from this build: run as root, or 'sudo make install' first, or point PG_CONFIG at a PostgreSQL you own"
    fi
}

# True when the installed library, control file and SQL scripts are byte-identical to the
# current directory's build.
ub_installed_matches() {
    local libdir sharedir f
    libdir=$("$PG_CONFIG" --pkglibdir)
    sharedir=$("$PG_CONFIG" --sharedir)/extension
    cmp -s usage_billing.so "$libdir/usage_billing.so" || return 1
    cmp -s usage_billing.control "$sharedir/usage_billing.control" || return 1
    for f in sql/usage_billing--*.sql; do
        cmp -s "$f" "$sharedir/${f#sql/}" || return 1
    done
}

# ub_build_and_install DIR [MAKE-ARGS...]: builds the build copy DIR as the pg user (with
# MAKE-ARGS, e.g. COPT=-Werror) and installs it (UB_SKIP_INSTALL=1 skips the install).
ub_build_and_install() {
    local dir=$1; shift
    ub_log "building in $dir with $PG_CONFIG${*:+ ($*)}"
    (cd "$dir" && ub_as_pg make -s PG_CONFIG="$PG_CONFIG" "$@")
    if [ "${UB_SKIP_INSTALL:-0}" = 1 ]; then
        ub_log "UB_SKIP_INSTALL=1: not installing"
    else
        ub_log "installing into $("$PG_CONFIG" --pkglibdir) and $("$PG_CONFIG" --sharedir)/extension"
        (cd "$dir" && ub_make_install)
    fi
}

# Creates a private temp dir the pg user owns; prints its path.
ub_mktemp_pg() {
    local d
    d=$(mktemp -d "${TMPDIR:-/tmp}/${1:-usage_billing}.XXXXXX")
    chmod 700 "$d"
    if ub_is_root; then chown postgres: "$d"; fi
    printf '%s\n' "$d"
}

# ub_initdb DIR: initdb a throwaway cluster in DIR/data with trust auth for local sockets.
ub_initdb() {
    ub_as_pg "$PGBIN/initdb" -D "$1/data" --auth=trust --no-instructions -E UTF8 \
        --locale=C.UTF-8 >"$1/initdb.log" 2>&1 || {
        cat "$1/initdb.log" >&2
        ub_die "initdb failed"
    }
}

# ub_conf DIR LINE...: appends settings to the cluster's postgresql.conf (as the pg user).
ub_conf() {
    local d=$1; shift
    printf '%s\n' "$@" | ub_as_pg tee -a "$d/data/postgresql.conf" >/dev/null
}

# ub_pg_start DIR / ub_pg_stop DIR
ub_pg_start() {
    ub_as_pg "$PGBIN/pg_ctl" -D "$1/data" -l "$1/server.log" -w -t 60 start >/dev/null || {
        tail -n 40 "$1/server.log" >&2 || true
        ub_die "the throwaway server did not start (log above)"
    }
}
ub_pg_stop() {
    if [ -f "$1/data/postmaster.pid" ]; then
        ub_as_pg "$PGBIN/pg_ctl" -D "$1/data" -m fast -w -t 30 stop >/dev/null 2>&1 ||
            ub_as_pg "$PGBIN/pg_ctl" -D "$1/data" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
    fi
}
