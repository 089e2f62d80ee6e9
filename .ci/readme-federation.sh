#!/usr/bin/env bash
# Runs README.md's "Running a real federation" block as written, so the README
# cannot drift from the binaries: certificates and merchant kits, the
# coordinator, three agents, `status`, the dashboard, a churn run, `score`, a
# recommender run, `recommend`, and the merchant's JSON API (`serve`).
#
# The commands are read from the README's first ```sh block after the
# section's heading and run in a scratch copy of the repository's layout with
# `bash -e`. Only these substitutions are made, and they are printed:
#   - `cargo build --release` is skipped and `target/release` becomes
#     `target/debug` (CI's `cargo build --workspace --bins` built those);
#   - the ports 50051, 9090 and 8080 become free ports;
#   - the example configurations' `rounds` become 2 (a short run).
# Every step must succeed; the whole run is bounded by READMEFED_TIMEOUT
# seconds (default 600). Background processes are ended by their PIDs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

for bin in fedcart-coordinator fedcart-client; do
    if [ ! -x "target/debug/$bin" ]; then
        echo "readme-federation: target/debug/$bin is missing (run cargo build --workspace --bins)" >&2
        exit 1
    fi
done

# The block: from the first ```sh after the heading to the closing ```.
block=$(awk '
    /^## Running a real federation/ { in_section = 1; next }
    in_section && /^## / { exit }
    in_section && !in_block && /^```sh$/ { in_block = 1; next }
    in_block && /^```$/ { exit }
    in_block { print }
' README.md)
if [ -z "$block" ]; then
    echo "readme-federation: no \`\`\`sh block under \"## Running a real federation\" in README.md" >&2
    exit 1
fi

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
grpc=$(free_port)
http=$(free_port)
api=$(free_port)

work=$(mktemp -d)
mkdir -p "$work/coordinator/examples"
cp coordinator/examples/*.toml "$work/coordinator/examples/"
ln -s "$root/data" "$work/data"
ln -s "$root/target" "$work/target"
for f in "$work"/coordinator/examples/*.toml; do
    sed -i -e "s/^rounds = .*/rounds = 2/" -e "s/:50051\"/:$grpc\"/" -e "s/:9090\"/:$http\"/" "$f"
done

script="$work/readme-block.sh"
{
    echo 'set -euo pipefail'
    # `status` defaults to port 50051; the agents' kits name the port too.
    echo "export FEDCART_COORDINATOR=https://localhost:$grpc"
    echo "$block" |
        sed -e '/^cargo build --release$/d' \
            -e 's#target/release#target/debug#g' \
            -e "s/:50051/:$grpc/g" -e "s/:9090/:$http/g" -e "s/:8080/:$api/g"
    # Reached only if every line above succeeded.
    echo 'echo "readme-federation: every step of the README block succeeded"'
} >"$script"

echo "== README block as run (in $work; ports $grpc, $http, $api; rounds = 2):"
grep -v '^#' "$script"
echo "=="

cleanup() {
    # End what the block left running (agents, `serve`) by PID: every
    # process still in the block's process group.
    for pid in $(pgrep -g "$pgid" 2>/dev/null || true); do
        kill "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}

# `timeout` leads a process group of its own in a new session: on expiry it
# signals the whole group, and at the end `cleanup` finds exactly the
# block's processes in it.
cd "$work"
timeout_s=${READMEFED_TIMEOUT:-600}
set +e
setsid timeout "$timeout_s" bash -x "$script" &
pgid=$!
trap cleanup EXIT
wait "$pgid"
rc=$?
set -e
if [ "$rc" -eq 124 ]; then
    echo "readme-federation: FAILED: timed out after ${timeout_s}s" >&2
    exit 1
elif [ "$rc" -ne 0 ]; then
    echo "readme-federation: FAILED (exit $rc): the README's federation block no longer runs as written" >&2
    exit "$rc"
fi
echo "readme-federation: ok"
