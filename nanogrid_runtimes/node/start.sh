#!/bin/sh
# Starts the Node.js bootstrap with its channel on fd 3 and fds 1 and 2 on the capture files (appended to, so a
# call's output can be emptied in place): node cannot move its own fds, so the shell does it before node starts.
work="${NANOGRID_WORK_DIR:-$PWD}"
mkdir -p "$work" || exit 70
exec node "$(dirname "$0")/bootstrap.js" 3>&1 4>&2 1>>"$work/stdout.log" 2>>"$work/stderr.log"
