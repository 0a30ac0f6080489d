"""Developer tooling, run from the checkout's root and never shipped in the wheel:

    python -m tools.gpucheck ...    # `make gpu-check` / `make gpu-rehearsal`: the budgeted GPU harvest
    python -m tools.aot ...         # `make gpu-rehearsal`: sm_90 AOT compile of every kernel config
    python -m tools.rl_compare ...  # RL methods vs SFT at equal env steps -> bench/results/rl_compare.csv
    python -m tools.lavapipe        # `make maniskill` without CUDA: Mesa's software Vulkan driver
    python tools/wheels.py ...      # `make wheel`

``tools/harvest.py`` has no command line of its own: ``vlafast bench import DIR`` loads it from
the checkout. Run as modules (``-m``) from the root, the checkout's ``vlafast`` and ``tools``
both import without any path set-up. The runtime package ``vlafast`` imports nothing from here.
"""
