#!/bin/sh
# Container entrypoint for every vitserve serving image.
#
# Sizes the thread pools to the CPU quota the container really has (cgroup v2 `cpu.max`, or v1
# `cpu.cfs_quota_us`), not to the host's core count, then execs the server so that it is PID 1's only
# process and receives SIGTERM itself: uvicorn then stops accepting, drains what it accepted, and exits.
#
#   vitserve-entrypoint                     -> python -m server
#   vitserve-entrypoint --log-level debug   -> python -m server --log-level debug
#   vitserve-entrypoint some-command ...    -> some-command ... (with the same environment)
#
# Any VITSERVE_*_THREADS already set wins. ENTRYPOINT_CGROUP_ROOT (default /sys/fs/cgroup) exists for tests.
set -eu

cgroup_root="${ENTRYPOINT_CGROUP_ROOT:-/sys/fs/cgroup}"

# Prints the CPU quota rounded up to whole CPUs, or nothing when the container has no quota.
quota_cpus() {
    quota=""
    period=""
    if [ -r "$cgroup_root/cpu.max" ]; then
        read -r quota period < "$cgroup_root/cpu.max"
    else
        for dir in "$cgroup_root/cpu" "$cgroup_root/cpu,cpuacct" "$cgroup_root"; do
            if [ -r "$dir/cpu.cfs_quota_us" ] && [ -r "$dir/cpu.cfs_period_us" ]; then
                quota=$(cat "$dir/cpu.cfs_quota_us")
                period=$(cat "$dir/cpu.cfs_period_us")
                break
            fi
        done
    fi
    case "$quota" in
        "" | max | -*) return 0 ;;
    esac
    if [ "${period:-0}" -gt 0 ] 2>/dev/null; then
        echo $(((quota + period - 1) / period))
    fi
}

# nproc honours the CPU set and affinity mask; the quota can only lower it.
cpus=$(nproc 2>/dev/null || echo 1)
quota=$(quota_cpus)
if [ -n "$quota" ] && [ "$quota" -lt "$cpus" ]; then
    cpus=$quota
fi
[ "$cpus" -ge 1 ] || cpus=1

# One ORT session runs one batch at a time on all the CPUs the container may use; ops of a ViT graph
# are sequential, so the inter-op pool stays at 1. Decoding overlaps with inference and gets the same.
export VITSERVE_INTRA_OP_THREADS="${VITSERVE_INTRA_OP_THREADS:-$cpus}"
export VITSERVE_INTER_OP_THREADS="${VITSERVE_INTER_OP_THREADS:-1}"
export VITSERVE_DECODE_THREADS="${VITSERVE_DECODE_THREADS:-$cpus}"
# numpy's BLAS would otherwise start one thread per host core in every process.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"

echo "vitserve-entrypoint: ${cpus} CPU(s) available; intra-op ${VITSERVE_INTRA_OP_THREADS}," \
    "inter-op ${VITSERVE_INTER_OP_THREADS}, decode ${VITSERVE_DECODE_THREADS} threads" >&2

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- python -m server "$@"
fi
exec "$@"
