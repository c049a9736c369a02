"""Run CPython's own Executor tests against ``procsched.Pool``.

    python3.13 scripts/stdlib_compat.py

Needs an interpreter that ships its test package in the 3.12+ layout
(``test.test_concurrent_futures``); many distributions strip it. The
generic Executor tests (submit, map, shutdown, cancel_futures, free
references), ``wait``, ``as_completed`` and the initializer run in process. The tests that
start a fresh interpreter importing ``concurrent.futures.<Executor>`` are
skipped: that import cannot name a class outside the stdlib.
"""

from __future__ import annotations

import sys
import unittest

import procsched

SUBPROCESS_TESTS = {"test_interpreter_shutdown", "test_hang_gh83386", "test_submit_after_interpreter_shutdown"}


def main() -> int:
    try:
        from test.test_concurrent_futures import executor, test_as_completed, test_init, test_shutdown, test_wait
        from test.test_concurrent_futures.util import BaseTestCase, ExecutorMixin
    except ImportError as e:
        print(f"no stdlib test package here ({e}); use an interpreter that ships it", file=sys.stderr)
        return 2

    class PoolMixin(ExecutorMixin):  # type: ignore[misc]
        executor_type = procsched.Pool

    suite = unittest.TestSuite()
    loader = unittest.TestLoader()
    for module, name in [
        (executor, "ExecutorTest"),
        (test_wait, "WaitTests"),
        (test_as_completed, "AsCompletedTests"),
        (test_shutdown, "ExecutorShutdownTest"),
        (test_init, "InitializerMixin"),  # (its failing-initializer twin reads the stdlib's private _broken)
    ]:
        case = type(f"Pool{name}", (PoolMixin, getattr(module, name), BaseTestCase), {"__module__": module.__name__})
        for test in loader.loadTestsFromTestCase(case):
            if test._testMethodName not in SUBPROCESS_TESTS:
                suite.addTest(test)
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
