"""Ray job entrypoint for `svdray tune` (a Ray Tune sweep, the config's `tune` section):

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/tune.py --config configs/demo.yaml --set output_dir=$PWD/demo/sweep ...

Same arguments as `svdray tune`; paths must be absolute (see svdray/jobs.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the svdray next to this file

from svdray.jobs import run_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job("tune", sys.argv[1:]))
