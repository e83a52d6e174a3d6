"""Toy stages for engine tests: `numbers` writes integers, `square` squares them in chunks,
`report` (like publish: not chunked, no tables) writes a files folder from the squares.

`square` waits inside its first chunk while RETRACE_TEST_HOLD names a file that does not exist
yet (after creating `<that file>.waiting`), appends each chunk it computes to the file named by
RETRACE_TEST_LOG, and kills its own process (SIGKILL-like os._exit) before returning the chunk
whose first value equals RETRACE_TEST_KILL_AT, so tests can crash or hold a run mid-stage.
"""

from fakestages import numbers, report, square

STAGES = {"numbers": numbers, "square": square, "report": report}
