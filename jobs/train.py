"""Ray job entrypoint for `svdray train`:

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train.py --config configs/demo.yaml --set output_dir=$PWD/demo/job ...

Same arguments as `svdray train`; paths must be absolute (see svdray/jobs.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the svdray next to this file

from svdray.jobs import run_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job("train", sys.argv[1:]))
