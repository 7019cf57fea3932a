"""Test setup: 8 simulated CPU devices (set before JAX starts) and shared fixtures."""

import os
import sys

# -O0 code generation: the tests' programs are small and many, so compiling them costs
# more than running them; -O0 compiles about twice as fast (the suite's CPU time falls
# by a quarter). Results stay within every test's tolerance; bitwise comparisons are
# between programs compiled alike.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tempfile  # noqa: E402

import jax  # noqa: E402

# The end-to-end tests build the same small programs many times (each train() call
# makes new jitted closures); a persistent compilation cache compiles each once.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("JAX_COMPILATION_CACHE_DIR")
    or os.path.join(tempfile.gettempdir(), "immiscible_cm_test_jax_cache"),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

# The files that take longest (measured, cold cache, seconds summed over their tests)
# run first. pytest-xdist (`--dist loadfile`, pyproject.toml) hands whole files to its two
# workers in collection order; in alphabetical order the longest file, test_train.py,
# came near the end and one worker ran it alone while the other sat idle.
LONGEST_FIRST = ("test_train.py", "test_bench.py", "test_multihost.py", "test_edm.py",
                 "test_lpips.py", "test_init_from.py", "test_ddpm.py", "test_preemption.py",
                 "test_damaged_checkpoints.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order
