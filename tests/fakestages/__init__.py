"""Two toy stages for engine tests: `numbers` writes integers, `square` squares them in chunks.

`square` appends each chunk it computes to the file named by RETRACE_TEST_LOG and kills its own
process (SIGKILL-like os._exit) before returning the chunk whose first value equals
RETRACE_TEST_KILL_AT, so tests can crash a run mid-stage.
"""

from fakestages import numbers, square

STAGES = {"numbers": numbers, "square": square}
