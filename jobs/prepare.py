"""Ray job entrypoint that probes a manifest once and writes the cleaned one (svdray.data.prepare):

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/prepare.py --manifest /data/train.jsonl --out /data/prepared
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the svdray next to this file

from svdray.jobs import run_prepare_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_prepare_job(sys.argv[1:]))
